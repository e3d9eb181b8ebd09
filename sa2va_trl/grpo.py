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
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Sequence

import datasets
import transformers
from transformers import set_seed
from transformers.trainer_utils import get_last_checkpoint
from trl import ModelConfig, TrlParser

from sa2va_trl.compat import maybe_apply_cpu_deepspeed_fix

logger = logging.getLogger("sa2va_trl.grpo")

TINY_MODEL = "builtin:tiny"
# The embedded default: the tiny model after the supervised warm start, shipped in sa2va_trl/assets/.
TINY_WARM_MODEL = "builtin:tiny-warm"
# Module name suffixes of the parts `Sa2VAScriptArguments.train_*` switch on (native backend names).
PART_MODULES = {"train_mlp1": "mlp1", "train_text_hidden_fcs": "text_hidden_fcs", "train_mask_decoder": "mask_decoder"}
# With LoRA, these parts are trained in full through peft's `modules_to_save`; `mlp1` instead gets LoRA adapters on its
# two linear layers (the native model indexes `mlp1[1]`, which peft's ModulesToSaveWrapper does not support).
PEFT_MODULES_TO_SAVE = {"train_text_hidden_fcs": "text_hidden_fcs", "train_mask_decoder": "mask_decoder"}
MLP1_LORA_TARGETS = r"mlp1\.(1|3)"
LORA_DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# --- recipe -> objects: each one small function, so a backend or the warm start can replace it --------------------


def load_model_and_tokenizer(model_args: ModelConfig, training_args):
    """The model and tokenizer a recipe names. `builtin:tiny-warm` = the shipped warm-started tiny model (the demo's
    embedded default); `builtin:tiny` = the tiny random model with a fixed seed (tests)."""
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
            "ByteDance/Sa2VA-* checkpoint first (`python -m sa2va_trl.convert SRC DST`, SRC a local snapshot), "
            "or use `builtin:tiny` or a directory saved by this package."
        )
    model = Sa2VAModel.from_pretrained(name, revision=model_args.model_revision, dtype=model_args.dtype or "auto")
    tokenizer = transformers.AutoTokenizer.from_pretrained(name, revision=model_args.model_revision)
    return model.train(), tokenizer


@contextlib.contextmanager
def _whole_model_init(training_args):
    """Build a model whole on each rank even under ZeRO-3 (DeepSpeed partitions it when the trainer prepares it):
    the tiny model is a few MB, and its weight init does not run on zero.Init's empty shards."""
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


def set_trainable_parts(model, script_args, use_peft: bool) -> None:
    """Freeze the vision encoder and SAM2's image encoder; train the parts the recipe asks for.

    With LoRA the language model's base weights stay frozen (peft adds the adapters); the other parts are then
    trained through peft's `modules_to_save` (see `build_peft_config`)."""
    for name, param in model.named_parameters():
        part = name.split(".")
        trainable = False
        if part[0] == "language_model":
            trainable = script_args.train_language_model and not use_peft
        for flag, module in PART_MODULES.items():
            if module in part and getattr(script_args, flag):
                trainable = True
        param.requires_grad_(trainable)
    if not any(p.requires_grad for p in model.parameters()) and not use_peft:
        raise ValueError("Nothing to train: enable LoRA (`use_peft: true`) or one of the `train_*` parts.")


def build_peft_config(model_args: ModelConfig, script_args):
    """LoRA on the language model's linear layers only; the trained non-LLM parts as `modules_to_save`."""
    if not model_args.use_peft:
        return None
    from peft import LoraConfig

    targets = model_args.lora_target_modules or list(LORA_DEFAULT_TARGETS)
    if isinstance(targets, str):
        targets = [targets]
    modules_to_save = [module for flag, module in PEFT_MODULES_TO_SAVE.items() if getattr(script_args, flag)]
    modules_to_save += list(model_args.lora_modules_to_save or [])
    target_modules = rf".*language_model\..*\.({'|'.join(targets)})"  # never the vision tower
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
    """`{loop: [reward, ...]}` from the recipe's per-loop reward names (the registry resolves them)."""
    from sa2va_trl.rewards.registry import get_reward

    return {loop: [get_reward(name) for name in training_args.loop_rewards(loop)[0]] for loop in training_args.loops}


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

    # Resume from the last checkpoint
    last_checkpoint = None
    if os.path.isdir(training_args.output_dir):
        last_checkpoint = get_last_checkpoint(training_args.output_dir)
    if last_checkpoint is not None and training_args.resume_from_checkpoint is None:
        logger.info("Checkpoint detected, resuming training at %s.", last_checkpoint)

    # Data
    train_rows, eval_rows = load_splits(script_args, training_args.seed)
    if training_args.eval_strategy != "no" and eval_rows is None:
        raise ValueError("eval_strategy is set but the data source has no evaluation split: set `eval_fraction`.")
    logger.info("Rows: %d train, %s eval", len(train_rows), len(eval_rows) if eval_rows is not None else 0)

    # Tokenizer and model
    model, tokenizer = load_model_and_tokenizer(model_args, training_args)
    set_trainable_parts(model, script_args, use_peft=model_args.use_peft)
    peft_config = build_peft_config(model_args, script_args)

    # Rewards
    reward_funcs = build_loop_rewards(training_args)

    # EMA callback: the cycle partner and the KL reference
    ema = EMACallback(
        decay=training_args.ema_decay,
        warmup="linear" if training_args.ema_warmup_steps else "none",
        warmup_steps=training_args.ema_warmup_steps,
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
    )

    # Sample overlays (images of rollouts) for TensorBoard / W&B / trackio
    if training_args.sample_overlay_steps:
        SampleOverlayCallback(trainer.recent_samples, every_n_steps=training_args.sample_overlay_steps).attach_to(trainer)

    # Train
    checkpoint = training_args.resume_from_checkpoint or last_checkpoint
    training_args.resume_from_checkpoint = checkpoint  # callbacks (the EMA) read the path from here
    train_result = trainer.train(resume_from_checkpoint=checkpoint)
    metrics = train_result.metrics
    metrics["train_samples"] = len(trainer.train_dataset)
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()

    # Save
    trainer.save_model(training_args.output_dir)  # under ZeRO-3: gathered, when the DeepSpeed config says so
    if trainer.accelerator.is_main_process:
        tokenizer.save_pretrained(training_args.output_dir)
    # every rank: under ZeRO-3 the EMA model is gathered from all ranks' slices (rank 0 writes it)
    ema.save_pretrained(os.path.join(training_args.output_dir, "ema_model"), trainer.model)
    logger.info("Model saved to %s", training_args.output_dir)

    # Evaluate (referring-segmentation IoU and captioning METEOR / exact match on the evaluation rows)
    if training_args.do_eval and eval_rows is not None:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    # Push
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name, tags=["sa2va-trl"])
    return trainer


if __name__ == "__main__":
    maybe_apply_cpu_deepspeed_fix()  # before any TrainingArguments / Accelerator exists
    main(*parse_args())
