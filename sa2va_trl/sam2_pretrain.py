"""Prompt-following start for a randomly initialised SAM2: point prompts in the `[SEG]` slot.

Why: a tiny SAM2 trained from scratch only through `[SEG]` learns "segment every shape" within a
minute and then ignores the prompt (../shared/notes/tiny_world.md). The published model's SAM2 was
trained on points and boxes first and follows prompts. This module gives the tiny one that start,
in the exact format the `[SEG]` path uses: the sparse prompt is the prompt encoder's two
"no point" tokens followed by ONE language embedding (`Sa2VAModel.decode_sam2_masks`). Here that
slot holds the prompt encoder's own embedding of a positive point inside the target shape, so
the mask decoder learns "the third sparse token says where the object is". The decoder then
already follows prompts when `[SEG]` arrives, and the LLM side has a concrete target: produce,
through `text_hidden_fcs`, the point embedding of the object the text names
(:func:`point_distillation_loss`, an optional auxiliary term of the SFT loss).

Every image contributes all its shapes as separate prompts, so each step holds hard negatives:
the same image, a different point, a different target.

Three things were needed for the tiny SAM2 to follow prompts at all (measured on the shapes world,
multi-shape images, 500 steps of 8 images): without them IoU stays at ~0.38, the "segment every
shape" plateau, even with point prompts.

1. :func:`tie_positional_embeddings`: transformers initialises the point encoding and the image
   encoding as two independent random matrices, so a point cannot be located in the image;
2. :func:`reset_sam2_parameters`: PyTorch's default init instead of N(0, 0.02), under which the
   decoder's logits start at ~1e-5 and the prompt barely moves them;
3. ``negative_weight`` 3: BCE weight 3 on the other shapes' pixels (IoU 0.77 after 500 steps with
   it, 0.50 without).

Example (a few steps on the tiny model)::

    model, _ = build_tiny_model(seed=0)
    stats = pretrain_prompt_following(model, SceneStream(seed=0), steps=3, batch_size=2)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .data.synthetic import Scene, generate_scene
from .models.image_processing import load_rgb_image, sam_pixel_values
from .sft_losses import dice_loss, mask_bce_loss

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- scenes

@dataclass
class SceneStream:
    """An endless, seeded stream of synthetic scenes, with optional hard-negative enrichment.

    Args:
        seed: the stream's seed (scenes differ from the evaluation splits, which use
            ``scene_rng(seed, split, index)``: this stream draws from its own generator).
        image_size: image side in pixels.
        max_shapes: at most this many shapes per image.
        multi_shape_fraction: at least this fraction of the images hold two or more shapes
            (the rest are drawn as the world draws them). Several shapes per image are the hard
            negatives that make "segment everything" a bad answer.
        canonical_only: canonical captions only (no paraphrases).
    """

    seed: int = 0
    image_size: int = 128
    max_shapes: int = 3
    multi_shape_fraction: float = 0.0
    canonical_only: bool = False

    def __post_init__(self):
        if not 0.0 <= self.multi_shape_fraction <= 1.0:
            raise ValueError(f"multi_shape_fraction must be in [0, 1], got {self.multi_shape_fraction}")
        # A salt keeps this stream apart from the world's train/validation/test generators.
        self._rng = np.random.default_rng([int(self.seed), 7919])

    def next_scene(self) -> Scene:
        """The next scene of the stream."""
        want_multi = self.max_shapes > 1 and self._rng.random() < self.multi_shape_fraction
        while True:
            scene = generate_scene(self._rng, image_size=self.image_size, max_shapes=self.max_shapes,
                                   canonical_only=self.canonical_only)
            if not want_multi or len(scene.masks) >= 2:
                return scene

    def batch(self, size: int) -> list[Scene]:
        """``size`` consecutive scenes."""
        return [self.next_scene() for _ in range(size)]

    def __iter__(self) -> Iterator[Scene]:
        while True:
            yield self.next_scene()


# ----------------------------------------------------------------------------- points

def _mask_pixels(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        raise ValueError("cannot place a point in an empty mask")
    return ys, xs


def interior_point(mask: np.ndarray) -> tuple[float, float]:
    """A deterministic point of the mask: its centroid, or the mask pixel nearest to it when the
    centroid falls outside (a ring, a C shape). Returns (x, y) in pixel units (pixel corners)."""
    ys, xs = _mask_pixels(mask)
    cx, cy = xs.mean(), ys.mean()
    if not mask[int(cy), int(cx)]:
        nearest = int(np.argmin((xs - cx) ** 2 + (ys - cy) ** 2))
        cx, cy = float(xs[nearest]), float(ys[nearest])
    return float(cx), float(cy)


def random_point(mask: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    """A uniformly drawn pixel of the mask, (x, y) in pixel units."""
    ys, xs = _mask_pixels(mask)
    k = int(rng.integers(ys.size))
    return float(xs[k]), float(ys[k])


def point_prompt_embeddings(sam2, points_xy: torch.Tensor) -> torch.Tensor:
    """SAM2 prompt-encoder embeddings of positive points: (N, 2) SAM-input pixels -> (N, D).

    Uses the public prompt-encoder forward (a label-1 point; the encoder appends a padding point,
    which is dropped), so the embedding is exactly what a SAM2 click would give.
    """
    count = points_xy.shape[0]
    dtype = sam2.prompt_encoder.point_embed.weight.dtype
    points = points_xy.to(dtype=dtype).reshape(count, 1, 1, 2)
    labels = torch.ones(count, 1, 1, dtype=torch.int32, device=points.device)
    sparse, _ = sam2.prompt_encoder(input_points=points, input_labels=labels, input_boxes=None, input_masks=None)
    return sparse[:, 0, 0, :]


def _to_sam_frame(points_xy: Sequence[tuple[float, float]], image_sizes: Sequence[tuple[int, int]],
                  sam_size: int) -> torch.Tensor:
    """Scale (x, y) pixel points of images of size (H, W) to the square SAM2 input frame."""
    scaled = [(x * sam_size / w, y * sam_size / h) for (x, y), (h, w) in zip(points_xy, image_sizes)]
    return torch.tensor(scaled, dtype=torch.float32)


def point_distillation_targets(sam2, masks: Sequence[np.ndarray], sam_size: int) -> torch.Tensor:
    """The `[SEG]`-slot embedding a prompt-following SAM2 expects for each mask: the point
    embedding of the mask's interior point (no gradient: a target)."""
    points = _to_sam_frame([interior_point(m) for m in masks], [m.shape for m in masks], sam_size)
    with torch.no_grad():
        return point_prompt_embeddings(sam2, points.to(sam2.prompt_encoder.point_embed.weight.device))


def point_distillation_loss(seg_embeddings: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean squared error between `text_hidden_fcs` outputs and point-prompt embeddings, (N, D)."""
    return torch.nn.functional.mse_loss(seg_embeddings.float(), targets.float())


# ----------------------------------------------------------------------------- training

def reset_sam2_parameters(sam2) -> int:
    """Re-initialise a from-scratch SAM2 with PyTorch's default layer initialisation.

    The original SAM2 code trains from PyTorch's default (Kaiming-uniform) initialisation. A
    `Sam2Model` built inside a transformers model instead gets N(0, 0.02) weights everywhere; in
    the tiny 32-wide decoder the signal then shrinks about tenfold per layer, the mask logits
    start near 1e-5 and the prompt token's influence on them is negligible, so the decoder learns
    the prompt-free answer "segment every object" first and never leaves it. Only for a randomly
    initialised SAM2: never call this on pretrained weights.

    Returns:
        The number of modules re-initialised.
    """
    count = 0
    for module in sam2.modules():
        if module is sam2:
            continue
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.LayerNorm,
                               torch.nn.Embedding)):
            module.reset_parameters()
            count += 1
    logger.info("re-initialised %d SAM2 layers with PyTorch's default initialisation", count)
    return count


def tie_positional_embeddings(sam2) -> bool:
    """Make the prompt encoder's point encoding use the image-wide positional encoding.

    SAM2 matches a point to image locations by comparing the two random-Fourier encodings
    (`shared_image_embedding` for the image grid, `prompt_encoder.shared_embedding` for points):
    they must be the same matrix. Published checkpoints store the same tensor in both, but
    transformers 5.23 initialises them independently when a `Sam2Model` is built from a config,
    so a randomly initialised SAM2 cannot tell where a point is and learns "segment everything".
    This copies the image encoding into the prompt encoder (a buffer, saved with the model).

    Returns:
        True when the two differed and were tied.
    """
    image_pe = sam2.shared_image_embedding.positional_embedding
    point_pe = sam2.prompt_encoder.shared_embedding.positional_embedding
    if torch.equal(image_pe, point_pe):
        return False
    with torch.no_grad():
        point_pe.copy_(image_pe)
    logger.info("tied SAM2's point positional encoding to its image positional encoding")
    return True


def scenes_to_prompt_rows(scenes: Sequence[Scene]) -> tuple[list[int], list[np.ndarray], list[np.ndarray]]:
    """Every shape of every scene as one prompt row: (image index per row, target masks, masks of
    the other shapes of the same image)."""
    image_index, masks, others = [], [], []
    for k, scene in enumerate(scenes):
        for j, mask in enumerate(scene.masks):
            image_index.append(k)
            masks.append(mask)
            rest = [m for i, m in enumerate(scene.masks) if i != j]
            others.append(np.any(rest, axis=0) if rest else np.zeros_like(mask))
    return image_index, masks, others


def hard_negative_weights(others: Sequence[np.ndarray], negative_weight: float) -> torch.Tensor | None:
    """Per-pixel BCE weights: 1 everywhere, ``negative_weight`` on the other objects' pixels
    (None when the weight is 1: plain BCE)."""
    if negative_weight == 1.0:
        return None
    return 1.0 + (negative_weight - 1.0) * torch.from_numpy(np.stack(others)).float()


def prompt_following_loss(model, scenes: Sequence[Scene], rng: np.random.Generator,
                          bce_weight: float = 2.0, dice_weight: float = 0.5,
                          negative_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
    """The SFT mask loss of SAM2 prompted by a random point of each shape, in the `[SEG]` slot.

    Args:
        model: a Sa2VA model (`grounding_encoder`, `get_sam2_features`, `decode_sam2_masks`).
        scenes: the images; every shape of each becomes one prompt.
        rng: draws the points.
        bce_weight, dice_weight: the SFT loss weights.
        negative_weight: BCE weight of the pixels of the image's other shapes (hard negatives;
            1 = plain BCE). A larger value makes "segment everything" expensive.

    Returns:
        (loss, {"bce", "dice", "iou"}) where iou is the batch's mean IoU at threshold 0.
    """
    sam2 = model.grounding_encoder
    sam_size = model.config.sam2_image_size
    device = next(sam2.parameters()).device
    pixels = torch.stack([sam_pixel_values(load_rgb_image(s.image), sam_size) for s in scenes]).to(device)
    image_index, masks, others = scenes_to_prompt_rows(scenes)
    points = _to_sam_frame([random_point(m, rng) for m in masks], [m.shape for m in masks], sam_size)
    features = model.get_sam2_features(pixels)
    embeddings = point_prompt_embeddings(sam2, points.to(device))
    logits, _, _ = model.decode_sam2_masks(features, torch.tensor(image_index, device=device), embeddings)
    targets = torch.from_numpy(np.stack(masks)).to(device=device, dtype=torch.float32)
    weights = hard_negative_weights(others, negative_weight)
    bce = mask_bce_loss(logits, targets, None if weights is None else weights.to(device))
    dice = dice_loss(logits, targets)
    with torch.no_grad():
        iou = batch_iou(logits, targets)
    return bce_weight * bce + dice_weight * dice, {"bce": float(bce.detach()), "dice": float(dice.detach()), "iou": iou}


def batch_iou(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean IoU of (N, h, w) logits (> 0, resized to the targets) against (N, H, W) targets."""
    if logits.shape[-2:] != targets.shape[-2:]:
        logits = torch.nn.functional.interpolate(logits[:, None].float(), size=targets.shape[-2:],
                                                 mode="bilinear", align_corners=False)[:, 0]
    pred = logits > 0
    truth = targets > 0.5
    inter = (pred & truth).flatten(1).sum(-1).float()
    union = (pred | truth).flatten(1).sum(-1).float()
    return float(torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter)).mean())


def pretrain_prompt_following(
    model,
    scenes: SceneStream,
    steps: int,
    batch_size: int = 8,
    learning_rate: float = 1e-3,
    weight_decay: float = 0.0,
    negative_weight: float = 1.0,
    reset_parameters: bool = False,
    max_seconds: float | None = None,
    seed: int = 0,
    log_every: int = 20,
    writer=None,
    progress: bool = True,
    on_log: Callable[[int, dict], None] | None = None,
) -> dict:
    """Train the whole SAM2 (`grounding_encoder`) to segment the shape under a point prompt.

    Only SAM2 parameters move; the rest of the model is untouched (its ``requires_grad`` flags
    are restored afterwards).

    Args:
        model: a Sa2VA model.
        scenes: the scene stream.
        steps: optimizer steps.
        batch_size: images per step (each gives one prompt per shape).
        learning_rate, weight_decay: AdamW settings.
        negative_weight: BCE weight on the other shapes' pixels (see `prompt_following_loss`).
        reset_parameters: first re-initialise SAM2 with PyTorch's default init
            (`reset_sam2_parameters`; for a randomly initialised SAM2 only).
        max_seconds: stop early after this wall time (None: run all steps).
        seed: seeds the point draws.
        log_every: log (tqdm postfix, TensorBoard, ``on_log``) every this many steps.
        writer: an optional TensorBoard ``SummaryWriter`` (tags under ``sam2_pretrain/``).
        progress: show a tqdm bar.
        on_log: optional callback ``(step, stats)``.

    Returns:
        {"steps", "seconds", "final_iou" (mean over the last ``log_every`` steps), "final_loss"}.
    """
    sam2 = model.grounding_encoder
    if reset_parameters:
        reset_sam2_parameters(sam2)
    tie_positional_embeddings(sam2)
    saved_flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in sam2.parameters():
        p.requires_grad_(True)
    params = [p for p in sam2.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(steps, warmup=min(50, steps // 10)))
    rng = np.random.default_rng([int(seed), 104729])
    was_training = model.training
    model.train()
    window: list[dict] = []
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="SAM2 prompt-following", disable=not progress)
    try:
        for step in bar:
            loss, stats = prompt_following_loss(model, scenes.batch(batch_size), rng,
                                                negative_weight=negative_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            stats["loss"] = float(loss.detach())
            window = (window + [stats])[-max(1, log_every):]
            if (step + 1) % log_every == 0 or step + 1 == steps:
                mean = {k: float(np.mean([w[k] for w in window])) for k in stats}
                bar.set_postfix(loss=f"{mean['loss']:.3f}", iou=f"{mean['iou']:.3f}")
                if writer is not None:
                    for key, value in mean.items():
                        writer.add_scalar(f"sam2_pretrain/{key}", value, step + 1)
                if on_log is not None:
                    on_log(step + 1, mean)
            if max_seconds is not None and time.perf_counter() - start >= max_seconds:
                logger.warning("SAM2 prompt-following: time cap %.0f s reached after %d steps", max_seconds, step + 1)
                steps = step + 1
                break
    finally:
        bar.close()
        for name, p in model.named_parameters():
            p.requires_grad_(saved_flags[name])
        model.train(was_training)
    seconds = time.perf_counter() - start
    final = {k: float(np.mean([w[k] for w in window])) for k in window[0]} if window else {}
    logger.info("SAM2 prompt-following: %d steps in %.1f s, final %s", steps, seconds, final)
    return {"steps": steps, "seconds": seconds, "final_iou": final.get("iou"), "final_loss": final.get("loss")}


def _warmup_cosine(total: int, warmup: int) -> Callable[[int], float]:
    """Linear warm-up then cosine decay to 10% of the peak learning rate."""
    def factor(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + np.cos(np.pi * min(1.0, progress)))
    return factor
