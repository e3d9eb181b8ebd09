"""GRPO fine-tuning of a Sa2VA model with the two cycle loops, from a YAML recipe.

Single process (the CPU demo, a few minutes on 2 cores):

    python -m sa2va_trl.grpo recipes/demo.yaml
    python -m sa2va_trl.grpo --config recipes/demo.yaml --max_steps 5 --output_dir /tmp/run

Eight GPUs with DeepSpeed ZeRO-2 or ZeRO-3:

    accelerate launch --config_file accelerate_configs/zero2.yaml -m sa2va_trl.grpo recipes/cycle.yaml
    accelerate launch --config_file accelerate_configs/zero3.yaml -m sa2va_trl.grpo recipes/cycle.yaml

The recipe holds the fields of `Sa2VAScriptArguments` (data, backend, trainable parts), `Sa2VAGRPOConfig` (TRL's
GRPO settings plus loops, rewards, EMA, mask action) and TRL's `ModelConfig` (model path, LoRA); command-line flags
override it. `model_name_or_path: builtin:tiny` builds the tiny random model of `sa2va_trl.models.tiny`.

Two model backends (`model_backend`): `native` (the transformers-built model of `sa2va_trl.models`, driven by
`Sa2VAPolicy`; builtin models, converted checkpoints) and `remote` (a published trust_remote_code checkpoint,
driven by `RemoteSa2VAPolicy`; needs `trust_remote_code: true`). `PART_MODULES` maps the `train_*` switches onto
each backend's module tree.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
from collections.abc import Sequence

import datasets
import transformers
from transformers import set_seed
from trl import ModelConfig, TrlParser

from sa2va_trl.checkpointing import get_last_complete_checkpoint, resolve_resume_checkpoint
from sa2va_trl.compat import maybe_apply_cpu_deepspeed_fix

logger = logging.getLogger("sa2va_trl.grpo")

TINY_MODEL = "builtin:tiny"
# The embedded default: the tiny model after the supervised warm start, shipped in sa2va_trl/assets/.
TINY_WARM_MODEL = "builtin:tiny-warm"
# The module (dotted path in the backend's module tree) of each part `Sa2VAScriptArguments.train_*` switches on; the
# language model is `language_model` in both backends (`train_language_model`, or LoRA). Everything else stays frozen:
# the vision encoder, SAM2's image encoder, its prompt encoder and (remote) its memory modules.
PART_MODULES = {
    "native": {  # sa2va_trl.models.Sa2VAModel: SAM2 is a transformers Sam2Model
        "train_mlp1": "mlp1",
        "train_text_hidden_fcs": "text_hidden_fcs",
        "train_mask_decoder": "grounding_encoder.mask_decoder",
    },
    "remote": {  # the published Sa2VAChatModel: SAM2 in facebookresearch names under grounding_encoder.sam2_model
        "train_mlp1": "mlp1",
        "train_text_hidden_fcs": "text_hidden_fcs",
        "train_mask_decoder": "grounding_encoder.sam2_model.sam_mask_decoder",
    },
}
LANGUAGE_MODEL = "language_model"
# With LoRA, these parts are trained in full through peft's `modules_to_save`; `mlp1` instead gets LoRA adapters on its
# two linear layers (both backends index `mlp1[1]`, which peft's ModulesToSaveWrapper does not support).
PEFT_FULL_PARTS = ("train_text_hidden_fcs", "train_mask_decoder")
MLP1_LORA_TARGETS = r"mlp1\.(1|3)"
LORA_DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# --- recipe -> objects: each one small function, so a backend or the warm start can replace it --------------------


def load_model_and_tokenizer(model_args: ModelConfig, training_args, backend: str = "native"):
    """The model and tokenizer a recipe names, in training mode.

    `native`: `builtin:tiny-warm` = the shipped warm-started tiny model (the demo's embedded default); `builtin:tiny` =
    the tiny random model with a fixed seed (tests); otherwise a directory holding a native checkpoint. `remote`: a
    published checkpoint (local directory or Hub id) loaded with its own code (`load_published_sa2va`)."""
    check_model_source(model_args, training_args, backend)
    if backend == "remote":
        # Whole on each rank, partitioned when the trainer prepares it: the published code does not load under
        # zero.Init (transformers 5 then reports size mismatches for the SAM2 memory modules, measured on a tiny
        # published model); host memory holds one copy per process while it loads.
        with _whole_model_init(training_args):
            return load_published_model_and_tokenizer(model_args)
    name = model_args.model_name_or_path
    if name in (None, "", TINY_MODEL):
        from sa2va_trl.models.tiny import build_tiny_model

        with _whole_model_init(training_args):
            model, tokenizer = build_tiny_model(seed=training_args.seed)
        return model.train(), tokenizer
    from sa2va_trl.models.modeling_sa2va import Sa2VAModel

    if name == TINY_WARM_MODEL:
        from sa2va_trl.sft import tiny_warm_start_path

        name = str(tiny_warm_start_path())
    if not os.path.isdir(name):
        raise ValueError(
            f"model_name_or_path {name!r} is not a local native Sa2VA checkpoint. Convert a published "
            "ByteDance/Sa2VA-* checkpoint first (`python -m sa2va_trl.convert SRC DST`, SRC a local snapshot) or train "
            "it as it is with `model_backend: remote`, or use `builtin:tiny` or a directory saved by this package."
        )
    model = Sa2VAModel.from_pretrained(name, revision=model_args.model_revision, dtype=model_args.dtype or "auto")
    tokenizer = transformers.AutoTokenizer.from_pretrained(name, revision=model_args.model_revision)
    return model.train(), tokenizer


def check_model_source(model_args: ModelConfig, training_args, backend: str) -> None:
    """Refuse, before any data is loaded, a model source the backend cannot load.

    `trust_remote_code` is TRL's `GRPOConfig.trust_remote_code` (TRL 1.x; older TRL kept it on `ModelConfig`)."""
    part_modules(backend)  # a known backend
    if backend != "remote":
        return
    name = model_args.model_name_or_path
    if not name or str(name).startswith("builtin:"):
        raise ValueError(
            f"`model_backend: remote` loads a published trust_remote_code checkpoint, but model_name_or_path is "
            f"{name!r}. The builtin models are native: use `model_backend: native` with them."
        )
    trusted = getattr(training_args, "trust_remote_code", False) or getattr(model_args, "trust_remote_code", False)
    if not trusted:
        raise ValueError(
            "`model_backend: remote` runs the checkpoint's own Python code (its modeling_sa2va_chat.py, sam2.py, ...). "
            "Read it, then set `trust_remote_code: true` in the recipe; or convert the checkpoint "
            "(`python -m sa2va_trl.convert SRC DST`) and use `model_backend: native`."
        )
    if model_args.model_revision not in (None, "", "main"):
        raise ValueError(
            f"`model_revision: {model_args.model_revision}` is not supported with `model_backend: remote`: download "
            "that revision (e.g. `hf download REPO --revision REV --local-dir DIR`) and point model_name_or_path at DIR."
        )


def load_published_model_and_tokenizer(model_args: ModelConfig):
    """A published Sa2VA checkpoint (`model_backend: remote`) and its tokenizer, in training mode.

    The model class comes from the checkpoint's own code (`sa2va_trl.models.load_published_sa2va`, which also makes
    its `save_pretrained` write that code next to the weights); the tokenizer gets its eos token as pad token when it
    has none."""
    from sa2va_trl.models.remote import load_published_sa2va

    name = model_args.model_name_or_path
    model = load_published_sa2va(name, dtype=model_args.dtype or "auto")
    tokenizer = transformers.AutoTokenizer.from_pretrained(name, trust_remote_code=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.train(), tokenizer


@contextlib.contextmanager
def _whole_model_init(training_args):
    """Build a model whole on each rank even under ZeRO-3 (DeepSpeed partitions it when the trainer prepares it):
    the tiny model is a few MB, and its weight init does not run on zero.Init's empty shards; the published
    remote-code model does not load under zero.Init."""
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    candidates = (getattr(training_args, "hf_deepspeed_config", None),
                  getattr(getattr(training_args, "deepspeed_plugin", None), "dschf", None))  # accelerate's
    hf_deepspeed_config = next((c for c in candidates if c is not None and c.is_zero3()), None)
    if hf_deepspeed_config is None or not is_deepspeed_zero3_enabled():
        yield
        return
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(hf_deepspeed_config)


def load_splits(script_args, seed: int) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Training and evaluation rows in the row schema (before loop expansion)."""
    if script_args.dataset_format == "synthetic":
        from sa2va_trl.data.synthetic import shapes_dataset

        train = shapes_dataset(script_args.synthetic_images, seed=seed, split="train")
        evaluation = shapes_dataset(max(1, script_args.synthetic_images // 4), seed=seed, split="validation")
    else:
        from sa2va_trl.data.loaders import load_rows

        def load(split, max_rows):
            return load_rows(
                script_args.dataset_name,
                format=script_args.dataset_format,
                split=split,
                column_map=script_args.dataset_column_map,
                skip_bad_rows=script_args.skip_bad_rows,
                max_rows=max_rows,
            )

        train = load(script_args.dataset_train_split, script_args.max_train_rows)
        evaluation = None
        if script_args.eval_fraction > 0:
            parts = train.train_test_split(test_size=script_args.eval_fraction, seed=seed)
            train, evaluation = parts["train"], parts["test"]
        elif script_args.dataset_test_split:
            try:
                evaluation = load(script_args.dataset_test_split, script_args.max_eval_rows)
            except ValueError as e:  # no such split: train without evaluation
                logger.warning("No evaluation split %r (%s); training without evaluation.", script_args.dataset_test_split, e)
    if script_args.max_train_rows:
        train = train.select(range(min(len(train), script_args.max_train_rows)))
    if evaluation is not None and script_args.max_eval_rows:
        evaluation = evaluation.select(range(min(len(evaluation), script_args.max_eval_rows)))
    return train, evaluation


def part_modules(backend: str) -> dict[str, str]:
    """`{train_* flag: module path}` of a backend (see `PART_MODULES`)."""
    if backend not in PART_MODULES:
        raise ValueError(f"`model_backend` must be one of {list(PART_MODULES)}, got {backend!r}.")
    return PART_MODULES[backend]


def _in_module(name: str, module: str) -> bool:
    return name == module or name.startswith(module + ".")


def warn_untrained_mask_decoder(script_args, training_args) -> bool:
    """Warn (and return True) when the recipe trains the SAM2 mask decoder but nothing gives it a policy gradient:
    only the pixel mask action does (`sa2va_trl.mask_actions`); without it the decoder stays as loaded."""
    runs_loop2 = "caption_to_mask" in training_args.loops
    if script_args.train_mask_decoder and runs_loop2 and not training_args.mask_pixel_action:
        logger.warning(
            "`train_mask_decoder` is on but `mask_pixel_action` is off: the SAM2 mask decoder gets no policy gradient "
            "(it sits after the last sampled choice) and will stay as loaded. Set `mask_pixel_action: true` to train it."
        )
        return True
    return False


def set_trainable_parts(model, script_args, use_peft: bool, backend: str | None = None) -> None:
    """Freeze the vision encoder and SAM2's image encoder; train the parts the recipe asks for.

    The parts are looked up in the backend's module tree (`PART_MODULES`; `backend` defaults to
    `script_args.model_backend`, else "native"). With LoRA the language model's base weights stay frozen (peft adds
    the adapters); the other parts are then trained through peft's `modules_to_save` (see `build_peft_config`).

    Raises:
        ValueError: a part switched on has no parameter in the model (the backend does not match the model), or
            nothing would train.
    """
    backend = backend or getattr(script_args, "model_backend", "native")
    parts = {flag: module for flag, module in part_modules(backend).items() if getattr(script_args, flag)}
    found = dict.fromkeys(parts, False)
    for name, param in model.named_parameters():
        trainable = False
        if _in_module(name, LANGUAGE_MODEL):
            trainable = script_args.train_language_model and not use_peft
        for flag, module in parts.items():
            if _in_module(name, module):
                trainable = found[flag] = True
        param.requires_grad_(trainable)
    missing = [flag for flag, hit in found.items() if not hit]
    if missing:
        raise ValueError(
            f"{', '.join(f'`{flag}`' for flag in missing)} {'is' if len(missing) == 1 else 'are'} on but the model has no "
            f"{', '.join(repr(parts[flag]) for flag in missing)} module, which `model_backend: {backend}` trains: a "
            "published Sa2VAChatModel needs `model_backend: remote`, a native Sa2VAModel `model_backend: native`."
        )
    if not any(p.requires_grad for p in model.parameters()) and not use_peft:
        raise ValueError("Nothing to train: enable LoRA (`use_peft: true`) or one of the `train_*` parts.")


def build_peft_config(model_args: ModelConfig, script_args, backend: str | None = None):
    """LoRA on the language model's linear layers (and `mlp1`'s) only; the trained `text_hidden_fcs` and mask decoder
    as `modules_to_save` (module paths of the backend, `backend` defaulting to `script_args.model_backend`)."""
    if not model_args.use_peft:
        return None
    from peft import LoraConfig

    parts = part_modules(backend or getattr(script_args, "model_backend", "native"))
    targets = model_args.lora_target_modules or list(LORA_DEFAULT_TARGETS)
    if isinstance(targets, str):
        targets = [targets]
    modules_to_save = [parts[flag] for flag in PEFT_FULL_PARTS if getattr(script_args, flag)]
    modules_to_save += list(model_args.lora_modules_to_save or [])
    target_modules = rf".*{LANGUAGE_MODEL}\..*\.({'|'.join(targets)})"  # never the vision tower nor SAM2
    if script_args.train_mlp1:
        target_modules = rf"({target_modules}|{MLP1_LORA_TARGETS})"
    return LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=target_modules,
        modules_to_save=modules_to_save or None,
        use_rslora=model_args.use_rslora,
        use_dora=model_args.use_dora,
    )


def build_loop_rewards(training_args) -> dict[str, list]:
    """`{loop: [reward, ...]}` from the recipe's per-loop reward names (the registry resolves them), each built
    with its `reward_options` entry (e.g. the `reward_net` checkpoint)."""
    from sa2va_trl.rewards.registry import get_reward

    options = training_args.reward_options or {}
    return {loop: [get_reward(name, **options.get(name, {})) for name in training_args.loop_rewards(loop)[0]]
            for loop in training_args.loops}


def drop_missing_reporters(training_args) -> None:
    """Keep only the reporting integrations that are installed (a CPU demo without tensorboard still runs)."""
    from transformers.integrations import get_available_reporting_integrations

    wanted = training_args.report_to or []
    if wanted in ("all", ["all"]) or wanted == "none":
        return
    available = set(get_available_reporting_integrations())
    missing = [name for name in wanted if name not in available and name != "none"]
    if missing:
        logger.warning("Reporting to %s is not installed; logging without it.", missing)
        training_args.report_to = [name for name in wanted if name not in missing] or ["none"]


def policy_class(backend: str):
    """The adapter class of a backend: `Sa2VAPolicy` (native) or `RemoteSa2VAPolicy` (remote)."""
    from sa2va_trl.models import RemoteSa2VAPolicy, Sa2VAPolicy

    classes = {"native": Sa2VAPolicy, "remote": RemoteSa2VAPolicy}
    if backend not in classes:
        raise ValueError(f"`model_backend` must be one of {list(classes)}, got {backend!r}.")
    return classes[backend]


def policy_factory(script_args):
    """`(model, tokenizer) -> adapter` for the recipe's backend, with its prompt settings (`min_region_cells`,
    `max_dynamic_patch`) where the recipe sets them: keyword arguments of `RemoteSa2VAPolicy` (remote), fields of the
    model config that the adapter reads and `save_pretrained` keeps (native)."""
    backend = getattr(script_args, "model_backend", "native")
    cls = policy_class(backend)
    settings = {name: getattr(script_args, name, None) for name in ("min_region_cells", "max_dynamic_patch")}
    settings = {name: int(value) for name, value in settings.items() if value is not None}
    if backend == "remote":
        return functools.partial(cls, **settings)

    def native_policy(model, tokenizer):
        config = getattr(model, "config", None)
        for name, value in settings.items():
            setattr(config, name, value)
        return cls(model, tokenizer)

    return native_policy


def resume_checkpoint(training_args) -> str | None:
    """The checkpoint the run resumes from: `resume_from_checkpoint` when the recipe sets it (a path, or true = the
    last complete checkpoint of output_dir, false = start over), else the last complete checkpoint of output_dir if
    there is one. Incomplete checkpoints (interrupted saves) are skipped with a warning."""
    requested = training_args.resume_from_checkpoint
    if requested is None:
        checkpoint = get_last_complete_checkpoint(training_args.output_dir)
    else:
        checkpoint = resolve_resume_checkpoint(requested, training_args.output_dir)
    if checkpoint is not None:
        logger.info("Resuming training at %s.", checkpoint)
    return checkpoint


def describe_data(script_args, seed: int) -> dict:
    """What the model card says about the training data."""
    if script_args.dataset_format == "synthetic":
        return {"dataset": f"the synthetic shapes world of sa2va-trl ({script_args.synthetic_images} training images, "
                           f"seed {seed})"}
    hub_id = script_args.dataset_name if script_args.dataset_format == "hf" else None
    return {"dataset": f"`{script_args.dataset_name}` ({script_args.dataset_format})", "dataset_id": hub_id}


def save_final_models(trainer, ema, tokenizer, output_dir: str, merge_base: str | None = None, seed: int = 0,
                      backend: str = "native") -> None:
    """The end of a run: the policy and its tokenizer in `output_dir`, the EMA model with the tokenizer in
    `output_dir/ema_model` (both load with the backend's `from_pretrained`: `Sa2VAPolicy` / `RemoteSa2VAPolicy`). With
    `merge_base` (LoRA runs asking for `save_merged_model`), also both with the adapters merged into that base:
    `merged_model/`, `ema_merged_model/`.

    Nothing is pushed here (the push, with the model card, comes once at the end of `main`)."""
    from sa2va_trl.merge import merge_lora
    from sa2va_trl.model_card import EMA_MERGED_MODEL_DIR, EMA_MODEL_DIR, MERGED_MODEL_DIR

    trainer.save_model(output_dir, _internal_call=True)  # every rank (gathers under DeepSpeed); no push yet
    if trainer.accelerator.is_main_process:
        tokenizer.save_pretrained(output_dir)
    # every rank: under ZeRO-3 the EMA model is gathered from all ranks' slices (rank 0 writes it)
    ema.save_pretrained(os.path.join(output_dir, EMA_MODEL_DIR), trainer.model, processing_class=tokenizer)
    if merge_base is not None and trainer.accelerator.is_main_process:
        merge_lora(output_dir, os.path.join(output_dir, MERGED_MODEL_DIR), base_model=merge_base, seed=seed,
                   backend=backend)
        merge_lora(os.path.join(output_dir, EMA_MODEL_DIR), os.path.join(output_dir, EMA_MERGED_MODEL_DIR),
                   base_model=merge_base, seed=seed, backend=backend)
    trainer.accelerator.wait_for_everyone()


# --- command line --------------------------------------------------------------------------------------------------


def make_parser() -> TrlParser:
    from sa2va_trl.config import Sa2VAGRPOConfig, Sa2VAScriptArguments

    return TrlParser((Sa2VAScriptArguments, Sa2VAGRPOConfig, ModelConfig))


def rewrite_positional_recipe(argv: Sequence[str]) -> list[str]:
    """`RECIPE.yaml ...` -> `--config RECIPE.yaml ...` (TrlParser only reads `--config`)."""
    argv = [part for arg in argv for part in (arg.split("=", 1) if arg.startswith("--config=") else [arg])]
    if argv and not argv[0].startswith("-") and argv[0].endswith((".yaml", ".yml")):
        if "--config" in argv:
            raise SystemExit("Give the recipe either as the first argument or with --config, not both.")
        argv = ["--config", argv[0], *argv[1:]]
    return argv


def parse_args(argv: Sequence[str] | None = None):
    """(script_args, training_args, model_args) from the command line (a recipe path and overrides)."""
    argv = rewrite_positional_recipe(sys.argv[1:] if argv is None else argv)
    return make_parser().parse_args_and_config(args=argv)


# --- main ------------------------------------------------------------------------------------------------------------


def main(script_args, training_args, model_args):
    from sa2va_trl.callbacks import SampleOverlayCallback
    from sa2va_trl.ema import EMACallback
    from sa2va_trl.trainer import Sa2VAGRPOTrainer

    # Seed
    set_seed(training_args.seed)

    # Logging
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    logger.info("Script arguments %s", script_args)
    logger.info("Training arguments %s", training_args)
    drop_missing_reporters(training_args)

    # Resume from the last complete checkpoint (or the one the recipe names)
    checkpoint = resume_checkpoint(training_args)

    # Data (the model source is checked first: a remote checkpoint without trust_remote_code fails fast)
    check_model_source(model_args, training_args, script_args.model_backend)
    train_rows, eval_rows = load_splits(script_args, training_args.seed)
    if training_args.eval_strategy != "no" and eval_rows is None:
        raise ValueError("eval_strategy is set but the data source has no evaluation split: set `eval_fraction`.")
    logger.info("Rows: %d train, %s eval", len(train_rows), len(eval_rows) if eval_rows is not None else 0)

    # Tokenizer and model, through the backend's adapter (Sa2VAPolicy or RemoteSa2VAPolicy)
    backend = script_args.model_backend
    model, tokenizer = load_model_and_tokenizer(model_args, training_args, backend)
    set_trainable_parts(model, script_args, use_peft=model_args.use_peft, backend=backend)
    warn_untrained_mask_decoder(script_args, training_args)
    peft_config = build_peft_config(model_args, script_args, backend=backend)

    # Rewards
    reward_funcs = build_loop_rewards(training_args)

    # EMA callback: the cycle partner and the KL reference
    ema = EMACallback(
        decay=training_args.ema_decay,
        warmup="linear" if training_args.ema_warmup_steps else "none",
        warmup_steps=training_args.ema_warmup_steps,
        save_ema_model=training_args.ema_save_model,
    )

    # Trainer
    trainer = Sa2VAGRPOTrainer(
        model=model,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=train_rows,
        eval_dataset=eval_rows,
        processing_class=tokenizer,
        callbacks=[ema],
        peft_config=peft_config,
        policy_cls=policy_factory(script_args),
    )
    trainer.model_card_info = {"base_model": model_args.model_name_or_path,
                               **describe_data(script_args, training_args.seed)}

    # Sample overlays (images of rollouts) for TensorBoard / W&B / trackio
    if training_args.sample_overlay_steps:
        SampleOverlayCallback(trainer.recent_samples, every_n_steps=training_args.sample_overlay_steps).attach_to(trainer)

    # Train
    training_args.resume_from_checkpoint = checkpoint  # callbacks (the EMA) read the path from here
    train_result = trainer.train(resume_from_checkpoint=checkpoint)
    metrics = train_result.metrics
    metrics["train_samples"] = len(trainer.train_dataset)
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()

    # Save: the policy, the EMA model (and with LoRA, on request, both merged into standalone models)
    merge_base = None
    if script_args.save_merged_model:
        if model_args.use_peft:
            merge_base = model_args.model_name_or_path or TINY_MODEL
        else:
            logger.warning("save_merged_model: the model is trained in full, so output_dir is already standalone.")
    save_final_models(trainer, ema, tokenizer, training_args.output_dir, merge_base=merge_base, seed=training_args.seed,
                      backend=script_args.model_backend)
    logger.info("Model saved to %s", training_args.output_dir)

    # Evaluate (referring-segmentation IoU and captioning METEOR / exact match on the evaluation rows)
    if training_args.do_eval and eval_rows is not None:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    # Model card (README.md: base model, loops, rewards, EMA, evaluation) and push
    trainer.create_model_card()
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name, tags=["sa2va-trl"])
    return trainer


if __name__ == "__main__":
    maybe_apply_cpu_deepspeed_fix()  # before any TrainingArguments / Accelerator exists
    main(*parse_args())
