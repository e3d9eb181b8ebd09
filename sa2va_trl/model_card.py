"""The model card (README.md) of a model trained by sa2va-trl: base model, loops, rewards and their weights, the EMA,
the GRPO settings, the evaluation table when there is one, the files, and how to load them.

`Sa2VAGRPOTrainer.create_model_card` writes it into ``output_dir/README.md`` (at every checkpoint save and before
every Hub push, in place of TRL's generic text-generation card); `build_model_card` is the pure function behind it.

Example:
    >>> from sa2va_trl.config import Sa2VAGRPOConfig
    >>> args = Sa2VAGRPOConfig(output_dir="/tmp/card", use_cpu=True, bf16=False, ema_decay=0.99)
    >>> card = build_model_card(args, model_name="demo", base_model="builtin:tiny-warm", global_step=100,
    ...                         eval_metrics={"eval_mean_iou": 0.91})
    >>> "| mask_to_caption |" in card and "decay 0.99" in card and "| mean_iou | 0.9100 |" in card
    True
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

from sa2va_trl.config import CAPTION_TO_MASK, LOOPS, MASK_TO_CAPTION

__all__ = ["build_model_card", "last_eval_metrics", "write_model_card"]

REPOSITORY = "https://github.com/sa2va-trl/sa2va-trl"
EMA_MODEL_DIR = "ema_model"
MERGED_MODEL_DIR = "merged_model"
EMA_MERGED_MODEL_DIR = "ema_merged_model"

LOOP_DESCRIPTIONS = {
    MASK_TO_CAPTION: "loop 1: mask -> caption -> mask'. The policy captions the region; the reverse (EMA) model "
    "segments the caption.",
    CAPTION_TO_MASK: "loop 2: caption -> mask -> caption'. The policy segments the caption; the reverse (EMA) model "
    "captions the predicted mask.",
}
BUILTIN_MODELS = {
    "builtin:tiny": "the tiny random Sa2VA of sa2va-trl, for tests",
    "builtin:tiny-warm": "the tiny warm-started Sa2VA shipped with sa2va-trl, for the CPU demo",
}
# Eval keys that are bookkeeping, not scores.
_EVAL_SKIP = {"eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "eval_loss", "epoch", "step"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _is_hub_id(name: str | None) -> bool:
    """Whether ``name`` can be a Hub repo id (``owner/name``) rather than a local path or a builtin name: only those
    go into the card's metadata, which the Hub validates."""
    return bool(name) and bool(_HUB_ID.match(name)) and not os.path.exists(name) and ".." not in name


def last_eval_metrics(log_history: Sequence[Mapping]) -> tuple[dict[str, float], int | None]:
    """The scores of the last evaluation in a Trainer's ``log_history`` (``eval_*`` keys) and its step."""
    for entry in reversed(list(log_history or [])):
        scores = {k: v for k, v in entry.items() if k.startswith("eval_") and k not in _EVAL_SKIP}
        if scores:
            return scores, entry.get("step")
    return {}, None


def _fmt(value) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _reward_cell(args, loop: str) -> str:
    names, weights = args.loop_rewards(loop)
    return ", ".join(f"`{name}` ({float(w):g})" for name, w in zip(names, weights)) or "-"


def build_model_card(
    args,
    *,
    model_name: str | None = None,
    base_model: str | None = None,
    dataset: str | None = None,
    dataset_id: str | None = None,
    global_step: int | None = None,
    eval_metrics: Mapping[str, float] | None = None,
    eval_step: int | None = None,
    peft_config=None,
    files: Sequence[str] = (),
    tags: Sequence[str] | None = None,
    versions: Mapping[str, str] | None = None,
    policy_class: str = "Sa2VAPolicy",
) -> str:
    """The model card as Markdown with YAML metadata.

    Args:
        args: the run's `Sa2VAGRPOConfig` (loops, rewards and weights, EMA, GRPO settings, hub_model_id).
        model_name: the card's title (default: the last part of `hub_model_id` or `output_dir`).
        base_model: what training started from (a Hub id, a local path or a `builtin:` name); only a Hub id goes
            into the metadata.
        dataset: a description of the training data; `dataset_id` a Hub dataset id for the metadata.
        global_step: optimizer steps trained.
        eval_metrics: ``{"eval_<metric>": value}``; the evaluation section is left out when empty.
        eval_step: the step of that evaluation.
        peft_config: the LoRA config when the folder holds adapters.
        files: top-level names present in the folder (decides which loading instructions are shown).
        tags: extra Hub tags.
        versions: ``{package: version}`` for the framework section (default: the installed ones).
        policy_class: the adapter that loads the folders (`Sa2VAPolicy`, or `RemoteSa2VAPolicy` for published
            remote-code models) in the loading code.
    """
    from huggingface_hub import ModelCardData

    repo_id = getattr(args, "hub_model_id", None)
    if model_name is None:
        model_name = (repo_id or os.path.basename(os.path.normpath(args.output_dir))).split("/")[-1]
    all_tags = ["sa2va", "sa2va-trl", "grpo", "trl", "referring-segmentation", "region-captioning"]
    for tag in tags or []:
        if tag not in all_tags:
            all_tags.append(tag)
    metadata = ModelCardData(
        library_name="transformers",
        base_model=base_model if _is_hub_id(base_model) else None,
        datasets=[dataset_id] if _is_hub_id(dataset_id) else None,
        tags=all_tags,
        model_name=model_name,
    )
    files = set(files)
    lines: list[str] = [f"# {model_name}", ""]
    lines += [
        "A Sa2VA model (an InternVL-style multimodal LLM whose `[SEG]` token drives a SAM2 mask decoder) fine-tuned "
        f"with GRPO on cycle-consistency rewards by [sa2va-trl]({REPOSITORY}), a `trl.GRPOTrainer` subclass.",
        "",
    ]
    base_text = f"`{base_model}`" if base_model else "unknown"
    if _is_hub_id(base_model):
        base_text = f"[{base_model}](https://huggingface.co/{base_model})"
    elif base_model in BUILTIN_MODELS:
        base_text += f" ({BUILTIN_MODELS[base_model]})"
    lines.append(f"- **Base model:** {base_text}")
    if dataset or dataset_id:
        lines.append(f"- **Training data:** {dataset or dataset_id}")
    if global_step is not None:
        lines.append(f"- **Optimizer steps:** {global_step}")
    if peft_config is not None:
        r, alpha = getattr(peft_config, "r", "?"), getattr(peft_config, "lora_alpha", "?")
        saved = getattr(peft_config, "modules_to_save", None) or []
        lines.append(f"- **Weights:** LoRA adapters (r {r}, alpha {alpha})"
                     + (f", trained in full: {', '.join(f'`{m}`' for m in saved)}" if saved else ""))
    else:
        lines.append("- **Weights:** the full model")
    lines.append("")

    lines += ["## Loops and rewards", "",
              "One GRPO step runs both cycle loops on the batch; each reward scores its loop's samples, the rewards of "
              "a loop are summed with their weights, and the loop weight multiplies that loop's advantages.", "",
              "| loop | rewards (weight) | loop weight |", "|---|---|---|"]
    for loop in LOOPS:
        if loop in args.loops:
            lines.append(f"| {loop} | {_reward_cell(args, loop)} | {float(args.loop_weight(loop)):g} |")
    lines.append("")
    for loop in LOOPS:
        if loop in args.loops:
            lines.append(f"- `{loop}`: {LOOP_DESCRIPTIONS[loop]}")
    lines.append("")

    warmup = f"linear warm-up over {args.ema_warmup_steps} steps" if args.ema_warmup_steps else "no warm-up"
    lines += ["## EMA", "",
              f"An exponential moving average of the trainable weights (decay {float(args.ema_decay):g}, {warmup}, "
              "fp32, updated after every optimizer step) is the reverse model of both loops"
              + (f" and the KL reference (beta {float(args.beta):g})." if args.beta else " (no KL term, beta 0)."),
              ""]
    if EMA_MODEL_DIR in files:
        lines += [f"`{EMA_MODEL_DIR}/` holds it as a model of its own (same format as the top level).", ""]

    settings = [
        ("num_generations (G)", args.num_generations),
        ("per_device_train_batch_size", args.per_device_train_batch_size),
        ("gradient_accumulation_steps", args.gradient_accumulation_steps),
        ("learning_rate", args.learning_rate),
        ("lr_scheduler_type", getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
        ("max_steps", args.max_steps),
        ("temperature", args.temperature),
        ("max_completion_length", args.max_completion_length),
        ("loss_type", args.loss_type),
        ("advantage_mode", args.advantage_mode),
        ("scale_rewards", args.scale_rewards),
        ("beta (KL to the EMA)", args.beta),
        ("mask_action", f"True (sigma {float(args.mask_action_sigma):g})" if args.mask_action else False),
        ("mask_pixel_action",
         f"True (temperature {float(args.mask_pixel_temperature):g})" if args.mask_pixel_action else False),
        ("seed", args.seed),
    ]
    lines += ["## GRPO settings", "", "| setting | value |", "|---|---|"]
    lines += [f"| {name} | {_fmt(value)} |" for name, value in settings]
    lines.append("")

    if eval_metrics:
        where = f" at step {eval_step}" if eval_step is not None else ""
        lines += ["## Evaluation", "",
                  f"Greedy referring segmentation and region captioning on the evaluation rows{where} "
                  "(`sa2va_trl.evaluate`):", "", "| metric | value |", "|---|---|"]
        for key, value in sorted(eval_metrics.items()):
            shown = f"{value:.4f}" if isinstance(value, float) and not key.endswith("_rows") else _fmt(value)
            if key.endswith("_rows"):  # a count
                shown = str(int(value))
            lines.append(f"| {key.removeprefix('eval_')} | {shown} |")
        lines.append("")

    lines += ["## Files", ""]
    if peft_config is not None:
        lines.append("- top level: the policy's LoRA adapters (`adapter_config.json` names the base model) and the "
                     "tokenizer.")
    else:
        lines.append("- top level: the trained policy (`config.json`, `model.safetensors`) and its tokenizer.")
    if EMA_MODEL_DIR in files:
        lines.append(f"- `{EMA_MODEL_DIR}/`: the EMA model, loadable on its own.")
    if MERGED_MODEL_DIR in files:
        lines.append(f"- `{MERGED_MODEL_DIR}/`: the policy with the LoRA adapters merged in, a standalone model.")
    if EMA_MERGED_MODEL_DIR in files:
        lines.append(f"- `{EMA_MERGED_MODEL_DIR}/`: the EMA model with the adapters merged in, a standalone model.")
    strategy = getattr(getattr(args, "hub_strategy", None), "value", getattr(args, "hub_strategy", None))
    if getattr(args, "push_to_hub", False) and strategy in ("checkpoint", "all_checkpoints"):
        folder = "last-checkpoint/" if strategy == "checkpoint" else "checkpoint-<step>/"
        lines.append(f"- `{folder}`: a complete training checkpoint (optimizer, RNG and EMA state, "
                     "`checkpoint_complete.json`): download it and pass its path as `resume_from_checkpoint` to "
                     "continue the run exactly.")
    lines.append("")

    fetch = (f'from huggingface_hub import snapshot_download\npath = snapshot_download("{repo_id}")'
             if repo_id else 'path = "PATH"  # this folder')
    merged = peft_config is not None and MERGED_MODEL_DIR in files
    policy_dir = f'f"{{path}}/{MERGED_MODEL_DIR}"' if merged else "path"
    lines += ["## Use", "", "```python", fetch, f"from sa2va_trl.models import {policy_class}", "",
              f"policy = {policy_class}.from_pretrained({policy_dir})"]
    ema_dir = EMA_MERGED_MODEL_DIR if (peft_config is not None and EMA_MERGED_MODEL_DIR in files) else EMA_MODEL_DIR
    if ema_dir in files:
        lines.append(f'ema_policy = {policy_class}.from_pretrained(f"{{path}}/{ema_dir}")')
    lines += ["masks = policy.segment([image], [\"the red circle\"])  # H x W bool masks",
              "captions = policy.caption([image], [region_mask])", "```", ""]
    if peft_config is not None:
        lines += ["Loading the adapters needs the base model named in `adapter_config.json`; "
                  "`python -m sa2va_trl.merge ADAPTER_DIR OUT_DIR` writes a standalone merged model.", ""]

    versions = dict(versions) if versions is not None else _installed_versions()
    if versions:
        lines += ["## Framework versions", ""]
        lines += [f"- {name}: {version}" for name, version in versions.items()]
        lines.append("")

    return f"---\n{metadata.to_yaml()}\n---\n\n" + "\n".join(lines)


def _installed_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("sa2va-trl", "trl", "transformers", "peft", "torch", "accelerate"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def write_model_card(trainer, model_name: str | None = None, dataset_name: str | None = None, tags=None,
                     path: str | None = None) -> str:
    """Build the card of ``trainer``'s run and write it to ``path`` (default ``output_dir/README.md``).

    Reads ``trainer.model_card_info`` (``base_model``, ``dataset``, ``dataset_id``; the entry point fills it) and
    falls back to the model config's ``_name_or_path`` for the base model.
    """
    info = dict(getattr(trainer, "model_card_info", None) or {})
    args = trainer.args
    path = path or os.path.join(args.output_dir, "README.md")
    model = trainer.accelerator.unwrap_model(trainer.model) if hasattr(trainer, "accelerator") else trainer.model
    peft_config = None
    if hasattr(model, "peft_config"):
        peft_config = next(iter(model.peft_config.values()), None)
    base_model = info.get("base_model") or getattr(getattr(model, "config", None), "_name_or_path", None)
    scores, step = last_eval_metrics(trainer.state.log_history)
    folder = os.path.dirname(path)
    files = os.listdir(folder) if os.path.isdir(folder) else []
    card = build_model_card(
        args,
        model_name=model_name,
        base_model=base_model,
        dataset=info.get("dataset"),
        dataset_id=info.get("dataset_id") or dataset_name,
        global_step=trainer.state.global_step,
        eval_metrics=scores,
        eval_step=step,
        peft_config=peft_config,
        files=files,
        tags=tags,
        policy_class="RemoteSa2VAPolicy" if type(getattr(trainer, "policy", None)).__name__ == "RemoteSa2VAPolicy"
        else "Sa2VAPolicy",
    )
    os.makedirs(folder, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(card)
    return card
