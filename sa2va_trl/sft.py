"""Supervised warm start of a Sa2VA model with the published SFT objective.

    python -m sa2va_trl.sft recipes/demo_sft.yaml                  # tiny model, synthetic world, CPU
    python -m sa2va_trl.sft recipes/demo_sft.yaml --max_steps 200  # CLI flags override the recipe
    python -m sa2va_trl.sft --config recipes/sft.yaml              # TRL's --config form works too

Two tasks share every step, through the policy adapter (so SFT and GRPO see identical prompts):

- region captioning (mask -> caption): the `<vp>` prompt, target = the caption + eos;
- referring segmentation (caption -> "Sure, [SEG]." + mask): target tokens + the `[SEG]`
  hidden state -> `text_hidden_fcs` -> SAM2 mask decoder -> mask logits.

Loss = text cross-entropy + 2.0 x BCE + 0.5 x Dice on the mask logits (Sa2VA's weights), plus two
optional terms for a SAM2 that did not come pretrained (the tiny model):

- ``sam2_pretrain_steps``: a prompt-following stage before SFT (:mod:`sa2va_trl.sam2_pretrain`):
  SAM2 learns to segment the shape under a point prompt given in the `[SEG]` slot;
- ``point_distillation_weight``: MSE between the `[SEG]` embedding and the point-prompt embedding
  of the target's interior point, i.e. "say where the object is the way a click would".

What trains follows the recipe: ``finetune: lora`` (LoRA on the LLM's linear layers, as the
published recipe: r 128, alpha 256) or ``full``, plus the ``train_*`` switches (projector `mlp1`,
`text_hidden_fcs`, SAM2 mask decoder, ...). The result is saved with `save_pretrained` (LoRA merged)
next to the tokenizer, loadable by ``Sa2VAPolicy.from_pretrained`` and ``python -m sa2va_trl.evaluate``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .sam2_pretrain import (
    SceneStream,
    hard_negative_weights,
    point_distillation_loss,
    point_distillation_targets,
    pretrain_prompt_following,
    prompt_following_loss,
)
from .sft_losses import SFTLoss, mask_bce_loss

logger = logging.getLogger(__name__)

SYNTHETIC = "synthetic"
BUILTIN_TINY = "builtin:tiny"
FINETUNE_MODES = ("full", "lora")
DEFAULT_LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


# ============================================================================ arguments

@dataclass
class SFTConfig:
    """Every setting of a supervised warm-start run (a recipe YAML sets any of these)."""

    # --- model
    model_name_or_path: str = field(default=BUILTIN_TINY, metadata={
        "help": f"a native Sa2VA checkpoint directory, or {BUILTIN_TINY!r} (a randomly initialised tiny model)"})
    tiny_seed: int = field(default=0, metadata={"help": "weight seed of the builtin tiny model"})
    multimask_output: bool | None = field(default=None, metadata={
        "help": "override config.multimask_output (None keeps the checkpoint's; the tiny warm start uses False: "
                "one mask token, no best-of-3 selection by an untrained IoU head)"})
    output_dir: str = field(default="outputs/sft", metadata={"help": "where the model, tokenizer and logs go"})

    # --- data
    dataset: str = field(default=SYNTHETIC, metadata={
        "help": f"{SYNTHETIC!r} (the shapes world, generated on the fly) or any source load_rows reads"})
    dataset_split: str | None = field(default="train", metadata={"help": "split of a load_rows source"})
    image_size: int = field(default=128, metadata={"help": "synthetic image side"})
    max_shapes: int = field(default=3, metadata={"help": "synthetic: at most this many shapes per image"})
    multi_shape_fraction: float = field(default=0.0, metadata={
        "help": "synthetic: at least this fraction of images hold 2+ shapes (hard negatives)"})
    canonical_caption_targets: bool = field(default=True, metadata={
        "help": "synthetic: caption targets are canonical; segmentation texts stay paraphrased"})
    segment_all_regions: bool = field(default=True, metadata={
        "help": "one segmentation prompt per region of each image (False: one random region)"})
    caption_all_regions: bool = field(default=False, metadata={
        "help": "one caption prompt per region of each image (False: one random region)"})
    seg_answer: str = field(default="Sure, [SEG].", metadata={"help": "the segmentation answer (holds [SEG])"})
    tasks: str = field(default="caption,segmentation", metadata={"help": "comma list of caption, segmentation"})

    # --- objective
    text_weight: float = field(default=1.0, metadata={"help": "weight of the token cross-entropy"})
    bce_weight: float = field(default=2.0, metadata={"help": "weight of the mask BCE (Sa2VA: 2.0)"})
    dice_weight: float = field(default=0.5, metadata={"help": "weight of the mask Dice loss (Sa2VA: 0.5)"})
    point_distillation_weight: float = field(default=0.0, metadata={
        "help": "MSE of the [SEG] embedding to the point-prompt embedding of the target (0: off)"})
    point_replay_weight: float = field(default=0.0, metadata={
        "help": "keep the point-prompt mask loss of the SAM2 stage in every SFT step with this weight"})
    negative_weight: float = field(default=1.0, metadata={
        "help": "BCE weight on the pixels of the image's other objects (hard negatives; 1: the published BCE)"})

    # --- what trains
    finetune: str = field(default="full", metadata={"help": "LLM training mode", "choices": list(FINETUNE_MODES)})
    lora_r: int = field(default=128, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=256, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    lora_target_modules: str = field(default=DEFAULT_LORA_TARGETS, metadata={
        "help": "comma list of LLM linear-layer names LoRA wraps"})
    train_vision_model: bool = field(default=False, metadata={"help": "train the vision tower"})
    train_mlp1: bool = field(default=True, metadata={"help": "train the projector mlp1"})
    train_text_hidden_fcs: bool = field(default=True, metadata={"help": "train text_hidden_fcs"})
    train_mask_decoder: bool = field(default=True, metadata={"help": "train the SAM2 mask decoder"})
    train_prompt_encoder: bool = field(default=False, metadata={"help": "train the SAM2 prompt encoder"})
    train_sam2_image_encoder: bool = field(default=False, metadata={"help": "train the SAM2 image encoder"})

    # --- SAM2 prompt-following stage
    sam2_pretrain_steps: int = field(default=0, metadata={"help": "point-prompt steps before SFT (0: skip)"})
    sam2_pretrain_batch_size: int = field(default=8, metadata={"help": "images per prompt-following step"})
    sam2_pretrain_learning_rate: float = field(default=1e-3, metadata={"help": "prompt-following AdamW lr"})
    sam2_reset_parameters: bool = field(default=False, metadata={
        "help": "before the stage, re-initialise SAM2 with PyTorch's default init (random SAM2 only)"})

    # --- optimisation
    max_steps: int = field(default=1000, metadata={"help": "SFT optimizer steps"})
    batch_size: int = field(default=8, metadata={"help": "images (synthetic) or rows per step"})
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW peak learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup_steps: int = field(default=50, metadata={"help": "linear warm-up steps, then cosine to 10%%"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (0: off)"})
    max_minutes: float = field(default=0.0, metadata={
        "help": "wall-time cap of the whole run in minutes (0: none); the lr decay follows it, SFT stops at it"})
    seed: int = field(default=0, metadata={"help": "seeds torch, numpy and the data stream"})
    num_threads: int = field(default=0, metadata={"help": "torch CPU threads (0: leave torch's default)"})

    # --- logging and saving
    logging_steps: int = field(default=25, metadata={"help": "log every this many steps"})
    save_steps: int = field(default=0, metadata={"help": "save a checkpoint every this many steps (0: end only)"})
    report_to: str = field(default="tensorboard", metadata={
        "help": "tensorboard or none", "choices": ["tensorboard", "none"]})
    logging_dir: str | None = field(default=None, metadata={
        "help": "TensorBoard directory (default: OUTPUT_DIR/runs; keep it outside a shipped model directory)"})

    def __post_init__(self):
        if self.finetune not in FINETUNE_MODES:
            raise ValueError(f"finetune must be one of {FINETUNE_MODES}, got {self.finetune!r}")
        unknown = set(self.task_list) - {"caption", "segmentation"}
        if unknown or not self.task_list:
            raise ValueError(f"tasks: unknown {sorted(unknown)} in {self.tasks!r}; use caption and/or segmentation")
        if "[SEG]" not in self.seg_answer:
            raise ValueError(f"seg_answer {self.seg_answer!r} has no [SEG] token: no mask could be decoded")
        if self.max_steps < 0 or self.batch_size < 1:
            raise ValueError(f"max_steps must be >= 0 and batch_size >= 1, got {self.max_steps}, {self.batch_size}")

    @property
    def task_list(self) -> list[str]:
        return [t.strip() for t in self.tasks.split(",") if t.strip()]


def parse_args(argv: Sequence[str] | None = None) -> SFTConfig:
    """Parse ``RECIPE.yaml [--field value ...]`` (or ``--config RECIPE.yaml``): CLI overrides YAML.

    Unknown recipe keys or flags raise, naming the key.
    """
    from trl import TrlParser

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):
        argv = ["--config", argv[0], *argv[1:]]  # TrlParser reads only the --config form
    (config,) = TrlParser((SFTConfig,)).parse_args_and_config(argv)
    return config


# ============================================================================ model

def load_model(config: SFTConfig):
    """The model and tokenizer the recipe names (the tiny builder or a saved checkpoint)."""
    if config.model_name_or_path == BUILTIN_TINY:
        from .models.tiny import build_tiny_model

        model, tokenizer = build_tiny_model(seed=config.tiny_seed)
    else:
        from transformers import AutoModel, AutoTokenizer

        from .models import modeling_sa2va  # noqa: F401  (registers the native backend)

        if not os.path.isdir(config.model_name_or_path):
            raise FileNotFoundError(f"model_name_or_path {config.model_name_or_path!r}: not a checkpoint directory "
                                    f"(a native Sa2VA checkpoint or {BUILTIN_TINY!r})")
        model = AutoModel.from_pretrained(config.model_name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(config.model_name_or_path)
    if config.multimask_output is not None:
        model.config.multimask_output = bool(config.multimask_output)
    return model, tokenizer


def trainable_groups(model, config: SFTConfig) -> dict[str, list[str]]:
    """Module-name prefixes that train (besides LoRA), from the recipe's switches."""
    prefixes = {
        "vision_model": config.train_vision_model,
        "mlp1": config.train_mlp1,
        "text_hidden_fcs": config.train_text_hidden_fcs,
        "grounding_encoder.mask_decoder": config.train_mask_decoder,
        "grounding_encoder.prompt_encoder": config.train_prompt_encoder,
        "grounding_encoder.vision_encoder": config.train_sam2_image_encoder,
        "grounding_encoder.no_memory_embedding": config.train_sam2_image_encoder,
        "language_model": config.finetune == "full",
    }
    return {prefix: [] for prefix, on in prefixes.items() if on}


def configure_trainable(model, config: SFTConfig):
    """Freeze everything, then unfreeze the recipe's parts; wrap the LLM with LoRA if asked.

    Returns:
        The model to train (a ``PeftModel`` under LoRA) and the list of trainable parameter names.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    if config.finetune == "lora":
        from peft import LoraConfig, get_peft_model

        targets = [t.strip() for t in config.lora_target_modules.split(",") if t.strip()]
        # A regex keeps LoRA inside the LLM: SAM2 and the vision tower have q_proj-like names too.
        pattern = r"language_model\..*\.(" + "|".join(targets) + r")$"
        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=pattern, bias="none")
        model = get_peft_model(model, lora)
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    prefixes = tuple(p + "." if not p.endswith("embedding") else p for p in trainable_groups(core, config))
    for name, p in core.named_parameters():
        if name.startswith(prefixes) and "lora_" not in name:
            p.requires_grad_(True)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if not names:
        raise ValueError("the recipe trains nothing: enable finetune or a train_* switch")
    return model, names


#: Where ``recipes/demo_sft.yaml`` writes the tiny warm start, shipped inside the package.
TINY_WARM_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tiny_warm")


def tiny_warm_start_path() -> str:
    """The directory of the shipped tiny warm start (``Sa2VAPolicy.from_pretrained`` reads it).

    Raises:
        FileNotFoundError: with the command that rebuilds it.
    """
    if not os.path.isfile(os.path.join(TINY_WARM_DIR, "model.safetensors")):
        raise FileNotFoundError(f"no tiny warm start in {TINY_WARM_DIR}; build it (about 30 minutes on 2 CPU cores) "
                                "with: python -m sa2va_trl.sft recipes/demo_sft.yaml")
    return TINY_WARM_DIR


def save_model(model, tokenizer, output_dir: str, summary: dict | None = None) -> str:
    """Save the model (LoRA merged into a copy) and tokenizer with ``save_pretrained``."""
    os.makedirs(output_dir, exist_ok=True)
    to_save = model
    if hasattr(model, "merge_and_unload"):
        import copy

        to_save = copy.deepcopy(model).merge_and_unload()
    to_save.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    if summary is not None:
        with open(os.path.join(output_dir, "sft_summary.json"), "w", encoding="utf-8") as handle:
            json.dump(summary, handle, indent=2, default=str)
    return output_dir


# ============================================================================ data

@dataclass
class Example:
    """One image with regions: the masks and captions to train on (parallel lists)."""

    image: object
    masks: list[np.ndarray]
    seg_texts: list[str]
    caption_targets: list[str]


class SyntheticExamples:
    """Examples drawn on the fly from the shapes world (never the evaluation splits' images)."""

    def __init__(self, config: SFTConfig):
        from PIL import Image

        self._pil = Image.fromarray
        self.stream = SceneStream(seed=config.seed, image_size=config.image_size, max_shapes=config.max_shapes,
                                  multi_shape_fraction=config.multi_shape_fraction)
        self.canonical = config.canonical_caption_targets

    def batch(self, size: int) -> list[Example]:
        out = []
        for scene in self.stream.batch(size):
            targets = [a.canonical_caption() if self.canonical else c for a, c in zip(scene.attributes, scene.captions)]
            out.append(Example(self._pil(scene.image), list(scene.masks), list(scene.captions), targets))
        return out


class RowExamples:
    """Examples from schema rows (any ``load_rows`` source): one region per example, shuffled."""

    def __init__(self, config: SFTConfig):
        from .data import load_rows
        from .data.schema import decode_region_mask

        self.rows = load_rows(config.dataset, split=config.dataset_split, require_caption=True)
        if len(self.rows) == 0:
            raise ValueError(f"dataset {config.dataset!r} split {config.dataset_split!r} has no rows")
        self._decode = decode_region_mask
        self._rng = np.random.default_rng(config.seed)
        self._order: Iterator[int] = iter(())

    def _next_index(self) -> int:
        index = next(self._order, None)
        if index is None:
            self._order = iter(self._rng.permutation(len(self.rows)).tolist())
            index = next(self._order)
        return int(index)

    def batch(self, size: int) -> list[Example]:
        out = []
        for _ in range(size):
            row = self.rows[self._next_index()]
            image = row["img"].convert("RGB")
            out.append(Example(image, [self._decode(row)], [row["caption"]], [row["caption"]]))
        return out


def build_examples(config: SFTConfig):
    return SyntheticExamples(config) if config.dataset == SYNTHETIC else RowExamples(config)


# ============================================================================ one step

def _completion_tensors(tokenizer, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded completion ids (text + eos) and their mask."""
    from .models.adapter import right_pad

    eos = tokenizer.eos_token or ""
    encoded = [tokenizer(t + eos, add_special_tokens=False)["input_ids"] for t in texts]
    return right_pad(encoded, tokenizer.pad_token_id)


class SFTStep:
    """Computes the SFT loss of one batch of examples through the policy adapter.

    Args:
        policy: a ``Sa2VAPolicy`` around the model being trained.
        config: the run's settings (tasks, loss weights, optional SAM2 terms).
        rng: draws which region to caption and the replay points.
    """

    def __init__(self, policy, config: SFTConfig, rng: np.random.Generator):
        self.policy = policy
        self.config = config
        self.rng = rng
        self.loss = SFTLoss(config.text_weight, config.bce_weight, config.dice_weight)
        self.tasks = config.task_list

    def _regions(self, example: Example, all_regions: bool) -> list[int]:
        """Every region of the example, or one drawn at random."""
        return list(range(len(example.masks))) if all_regions else [int(self.rng.integers(len(example.masks)))]

    def __call__(self, examples: Sequence[Example]) -> tuple[torch.Tensor, dict[str, float]]:
        policy, config = self.policy, self.config
        logprob_parts, mask_parts = [], []
        mask_logits = mask_targets = seg_embeddings = None
        seg_masks: list[np.ndarray] = []
        seg_others: list[np.ndarray] = []
        if "caption" in self.tasks:
            pairs = [(e, k) for e in examples for k in self._regions(e, config.caption_all_regions)]
            batch = policy.caption_prompts([e.image for e, _ in pairs], [e.masks[k] for e, k in pairs])
            ids, cmask = _completion_tensors(policy.tokenizer, [e.caption_targets[k] for e, k in pairs])
            out = policy.completion_logprobs(batch, ids, cmask)
            logprob_parts.append(out.logprobs)
            mask_parts.append(cmask.to(out.logprobs.device))
        if "segmentation" in self.tasks:
            images, texts = [], []
            for e in examples:
                for k in self._regions(e, config.segment_all_regions):
                    images.append(e.image)
                    texts.append(e.seg_texts[k])
                    seg_masks.append(e.masks[k])
                    rest = [m for j, m in enumerate(e.masks) if j != k]
                    seg_others.append(np.any(rest, axis=0) if rest else np.zeros_like(e.masks[k]))
            batch = policy.segmentation_prompts(images, texts)
            ids, cmask = _completion_tensors(policy.tokenizer, [config.seg_answer] * len(texts))
            out = policy.completion_logprobs(batch, ids, cmask, with_seg_hidden=True)
            logprob_parts.append(out.logprobs)
            mask_parts.append(cmask.to(out.logprobs.device))
            seg_embeddings = policy.seg_embeddings(out.seg_hidden)
            decoded = policy.decode_masks(batch, seg_embeddings, out.has_seg)
            mask_logits = decoded.low_res_logits
            mask_targets = torch.from_numpy(np.stack(seg_masks)).to(mask_logits.device, torch.float32)
        token_logprobs, token_mask = _pad_cat(logprob_parts, mask_parts)
        total, stats = self.loss(token_logprobs, token_mask, mask_logits, mask_targets)
        if mask_logits is not None and config.negative_weight != 1.0:
            # Hard negatives: the extra BCE on the other objects' pixels (weight - 1 on top of the plain term).
            weights = hard_negative_weights(seg_others, config.negative_weight).to(mask_logits.device)
            extra = mask_bce_loss(mask_logits, mask_targets, weights) - mask_bce_loss(mask_logits, mask_targets)
            total = total + config.bce_weight * extra
        core = policy.core
        if seg_embeddings is not None and config.point_distillation_weight > 0:
            targets = point_distillation_targets(core.grounding_encoder, seg_masks, core.config.sam2_image_size)
            distill = point_distillation_loss(seg_embeddings, targets.to(seg_embeddings.device))
            total = total + config.point_distillation_weight * distill
            stats["point_distill"] = float(distill.detach())
        if config.point_replay_weight > 0:
            scenes = [_ExampleScene(np.asarray(e.image), e.masks) for e in examples]
            replay, replay_stats = prompt_following_loss(core, scenes, self.rng, config.bce_weight, config.dice_weight,
                                                         config.negative_weight)
            total = total + config.point_replay_weight * replay
            stats["point_replay_iou"] = replay_stats["iou"]
        if mask_logits is not None:
            stats["seg_iou"] = _mean_iou(mask_logits.detach(), mask_targets)
        stats["loss"] = float(total.detach())
        return total, stats


@dataclass
class _ExampleScene:
    """The two fields of a scene that the prompt-following loss reads."""

    image: np.ndarray
    masks: list[np.ndarray]


def _pad_cat(values: list[torch.Tensor], masks: list[torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Concatenate (B_i, T_i) tensors along the batch, right-padding T with zeros."""
    if not values:
        return None, None
    length = max(v.shape[1] for v in values)
    pad = lambda t: torch.nn.functional.pad(t, (0, length - t.shape[1]))  # noqa: E731
    return torch.cat([pad(v) for v in values]), torch.cat([pad(m) for m in masks])


def _mean_iou(logits: torch.Tensor, targets: torch.Tensor) -> float:
    from .sam2_pretrain import batch_iou

    return batch_iou(logits, targets)


# ============================================================================ training loop

def _lr_factor(step: int, total: int, warmup: int, time_progress: float = 0.0) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak.

    Progress is the larger of the step fraction and ``time_progress`` (the fraction of
    ``max_minutes`` used), so a run cut by its wall-time cap still ends its decay.
    """
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, max((step - warmup) / max(1, total - warmup), time_progress))
    return 0.1 + 0.9 * 0.5 * (1.0 + float(np.cos(np.pi * progress)))


def _writer(config: SFTConfig):
    if config.report_to != "tensorboard":
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is an optional extra
        logger.warning("tensorboard is not installed: logging to the console only (pip install tensorboard)")
        return None
    return SummaryWriter(config.logging_dir or os.path.join(config.output_dir, "runs"))


def train(config: SFTConfig, model=None, tokenizer=None) -> dict:
    """Run the whole warm start (optional SAM2 stage, then SFT) and save the result.

    Args:
        config: the run's settings.
        model, tokenizer: an already built model (tests); default: :func:`load_model`.

    Returns:
        A summary: step counts, wall times, the last logged losses and the output directory.
    """
    # --- seeds and threads
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    if config.num_threads > 0:
        torch.set_num_threads(config.num_threads)
    os.makedirs(config.output_dir, exist_ok=True)
    writer = _writer(config)
    start = time.perf_counter()

    # --- model
    if model is None:
        model, tokenizer = load_model(config)
    elif config.multimask_output is not None:
        model.config.multimask_output = bool(config.multimask_output)
    examples = build_examples(config)
    summary: dict = {"config": asdict(config)}

    # --- stage 1: SAM2 prompt following (a tiny, randomly initialised SAM2 needs it)
    if config.sam2_pretrain_steps > 0:
        stream = SceneStream(seed=config.seed + 1, image_size=config.image_size, max_shapes=config.max_shapes,
                             multi_shape_fraction=max(config.multi_shape_fraction, 0.5))
        summary["sam2_pretrain"] = pretrain_prompt_following(
            model, stream, config.sam2_pretrain_steps, batch_size=config.sam2_pretrain_batch_size,
            learning_rate=config.sam2_pretrain_learning_rate, negative_weight=config.negative_weight,
            reset_parameters=config.sam2_reset_parameters, seed=config.seed,
            # Under a wall-time cap the SAM2 stage gets at most a third of it: SFT needs the rest.
            max_seconds=config.max_minutes * 60 / 3 if config.max_minutes else None,
            log_every=config.logging_steps, writer=writer)

    # --- stage 2: SFT on both tasks
    from .models.adapter import Sa2VAPolicy

    model, trainable = configure_trainable(model, config)
    policy = Sa2VAPolicy(model, tokenizer)
    params = [p for p in model.parameters() if p.requires_grad]
    logger.info("SFT: %d trainable tensors, %d parameters", len(trainable), sum(p.numel() for p in params))
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    def time_progress() -> float:
        return (time.perf_counter() - start) / 60 / config.max_minutes if config.max_minutes else 0.0

    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _lr_factor(s, config.max_steps, config.warmup_steps, time_progress()))
    step_fn = SFTStep(policy, config, np.random.default_rng([config.seed, 31]))
    model.train()
    sft_start = time.perf_counter()
    window: list[dict] = []
    history: list[dict] = []
    steps_done = 0
    bar = tqdm(range(config.max_steps), desc="SFT")
    for step in bar:
        loss, stats = step_fn(examples.batch(config.batch_size))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        steps_done = step + 1
        window = (window + [stats])[-max(1, config.logging_steps):]
        if steps_done % config.logging_steps == 0 or steps_done == config.max_steps:
            mean = {k: float(np.mean([w[k] for w in window if k in w])) for k in window[-1]}
            mean["lr"] = scheduler.get_last_lr()[0]
            mean["minutes"] = (time.perf_counter() - start) / 60
            history.append({"step": steps_done, **mean})
            bar.set_postfix({k: f"{mean[k]:.3f}" for k in ("loss", "text_ce", "seg_iou") if k in mean})
            logger.info("step %d %s", steps_done, {k: round(v, 4) for k, v in mean.items()})
            if writer is not None:
                for key, value in mean.items():
                    writer.add_scalar(f"sft/{key}", value, steps_done)
        if config.save_steps and steps_done % config.save_steps == 0 and steps_done < config.max_steps:
            save_model(model, tokenizer, os.path.join(config.output_dir, f"checkpoint-{steps_done}"))
        if config.max_minutes and (time.perf_counter() - start) / 60 >= config.max_minutes:
            logger.warning("max_minutes %.1f reached after %d SFT steps: stopping", config.max_minutes, steps_done)
            break
    bar.close()
    model.eval()

    # --- save
    summary.update({
        "sft_steps": steps_done,
        "sft_seconds": time.perf_counter() - sft_start,
        "total_seconds": time.perf_counter() - start,
        "trainable_parameters": sum(p.numel() for p in params),
        "history": history,
        "output_dir": config.output_dir,
    })
    save_model(model, tokenizer, config.output_dir, summary)
    if writer is not None:
        writer.close()
    logger.info("saved the warm start to %s (%.1f min)", config.output_dir, summary["total_seconds"] / 60)
    return summary


def main(argv: Sequence[str] | None = None) -> dict:
    """``python -m sa2va_trl.sft RECIPE.yaml [--field value ...]``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = parse_args(argv)
    summary = train(config)
    print(json.dumps({k: summary[k] for k in ("sft_steps", "sft_seconds", "total_seconds", "output_dir")}))
    return summary


if __name__ == "__main__":
    main()
