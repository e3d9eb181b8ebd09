"""Reusable callbacks: `SampleOverlayCallback` logs sampled rollouts as images (image, region, predicted mask, texts).

The EMA lives in `sa2va_trl.ema`; this module holds the other callbacks.
"""

from __future__ import annotations

import logging
import textwrap
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from transformers import TrainerCallback
from transformers.integrations import TensorBoardCallback

logger = logging.getLogger(__name__)

REGION_COLOUR = (0, 220, 0)  # the row's region (what loop 1 captions, what loop 2 should segment)
PREDICTION_COLOUR = (230, 30, 30)  # the policy's predicted mask (loop 2)


def _to_bool(mask: Any, shape: tuple[int, int]) -> np.ndarray | None:
    if mask is None:
        return None
    from sa2va_trl.rewards.masks import as_mask

    array = np.asarray(as_mask(mask), dtype=bool)
    return array if array.shape == shape else None


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of `mask` with a 4-neighbour outside the mask (its boundary)."""
    padded = np.pad(mask, 1)
    inner = padded[1:-1, :-2] & padded[1:-1, 2:] & padded[:-2, 1:-1] & padded[2:, 1:-1]
    return mask & ~inner


def render_overlay(image, region_mask=None, pred_mask=None, lines: list[str] | None = None, scale: int = 2,
                   width_chars: int = 48) -> np.ndarray:
    """One sample as an RGB array: the image, the region outlined in green, the predicted mask tinted red, and text
    lines (task, reference, completion, reward) in a strip below.

    Args:
        image: a PIL image or H x W x 3 uint8 array.
        region_mask, pred_mask: masks in any form `sa2va_trl.rewards.masks.as_mask` reads (or None).
        lines: text lines to print under the image.
        scale: integer upscaling of small images (nearest), for readability.
        width_chars: wrap the text at this many characters.

    Returns:
        (H', W', 3) uint8.

    Example:
        >>> import numpy as np
        >>> image = np.zeros((8, 8, 3), dtype=np.uint8)
        >>> mask = np.zeros((8, 8), dtype=bool); mask[2:6, 2:6] = True
        >>> out = render_overlay(image, region_mask=mask, pred_mask=mask, lines=["a red square"], scale=1)
        >>> out.shape[1], out.dtype.name, out[2, 2].tolist(), out[3, 3].tolist()
        (8, 'uint8', [0, 220, 0], [115, 15, 15])
    """
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.uint8)[..., :3].copy()
    shape = rgb.shape[:2]
    pred = _to_bool(pred_mask, shape)
    if pred is not None:  # tint: half image, half red
        rgb[pred] = (rgb[pred].astype(np.uint16) // 2 + np.array(PREDICTION_COLOUR) // 2).astype(np.uint8)
    region = _to_bool(region_mask, shape)
    if region is not None:
        rgb[_outline(region)] = REGION_COLOUR
    canvas = Image.fromarray(rgb)
    if scale > 1:
        canvas = canvas.resize((canvas.width * scale, canvas.height * scale), Image.NEAREST)
    wrapped = [part for line in (lines or []) for part in (textwrap.wrap(line, width_chars) or [""])]
    if wrapped:
        line_height = 12
        strip = Image.new("RGB", (canvas.width, line_height * len(wrapped) + 4), (255, 255, 255))
        draw = ImageDraw.Draw(strip)
        for k, line in enumerate(wrapped):
            draw.text((2, 2 + k * line_height), line, fill=(0, 0, 0))
        joined = Image.new("RGB", (canvas.width, canvas.height + strip.height))
        joined.paste(canvas, (0, 0))
        joined.paste(strip, (0, canvas.height))
        canvas = joined
    return np.asarray(canvas)


def describe_sample(sample: dict) -> list[str]:
    """The text lines printed under a sample's overlay."""
    reward = sample.get("reward")
    lines = [f"{sample.get('task')}  reward {reward:.3f}" if reward is not None else f"{sample.get('task')}"]
    if sample.get("caption"):
        lines.append(f"ref: {sample['caption']}")
    lines.append(f"out: {sample.get('completion') or ''}")
    return lines


class SampleOverlayCallback(TrainerCallback):
    """Logs a few rollouts of the latest generation as overlay images to TensorBoard, W&B and trackio.

    Each image shows the row's image with its region outlined (green), the predicted mask of loop 2 tinted (red),
    and the reference caption, the sampled completion and its reward underneath. Only the reporting integrations
    active in `args.report_to` are written to; on the main process only.

    Args:
        sample_source: returns the latest samples as dicts (see `Sa2VAGRPOTrainer.recent_samples`); typically
            `trainer.recent_samples`.
        every_n_steps: log at optimizer steps that are multiples of this.
        num_samples: images per log (one per prompt group).
        tag: the image tag / key.

    Example:
        >>> # trainer.add_callback(SampleOverlayCallback(trainer.recent_samples, every_n_steps=50))
    """

    def __init__(self, sample_source: Callable[..., list[dict]], every_n_steps: int = 50, num_samples: int = 4,
                 tag: str = "samples"):
        if every_n_steps <= 0 or num_samples <= 0:
            raise ValueError("SampleOverlayCallback: every_n_steps and num_samples must be positive.")
        self.sample_source = sample_source
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.tag = tag
        self._tensorboard: TensorBoardCallback | None = None
        self._last_step: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._last_step = None

    def images(self) -> list[tuple[np.ndarray, str]]:
        """(overlay, caption text) of the current samples."""
        out = []
        for sample in self.sample_source(self.num_samples):
            if sample.get("img") is None:
                continue
            lines = describe_sample(sample)
            out.append((render_overlay(sample["img"], sample.get("region_mask"), sample.get("pred_mask"), lines),
                        " | ".join(lines)))
        return out

    def on_log(self, args, state, control, logs=None, **kwargs):
        step = state.global_step
        if not state.is_world_process_zero or step % self.every_n_steps or step == self._last_step:
            return
        self._last_step = step
        images = self.images()
        if not images:
            return
        report_to = args.report_to or []
        if "tensorboard" in report_to:
            self._log_tensorboard(images, step)
        if "wandb" in report_to:
            self._log_wandb(images, step)
        if "trackio" in report_to:
            self._log_trackio(images)

    def _log_tensorboard(self, images, step: int) -> None:
        writer = getattr(self._tensorboard, "tb_writer", None)
        if writer is None:
            logger.debug("SampleOverlayCallback: no TensorBoard writer yet (add the callback after the trainer's).")
            return
        for k, (array, text) in enumerate(images):
            writer.add_image(f"{self.tag}/{k}", array, step, dataformats="HWC")
            writer.add_text(f"{self.tag}/{k}", text, step)
        writer.flush()

    def _log_wandb(self, images, step: int) -> None:
        try:
            import wandb
        except ImportError:
            return
        if wandb.run is not None:
            wandb.log({self.tag: [wandb.Image(a, caption=t) for a, t in images]}, step=step)

    def _log_trackio(self, images) -> None:
        try:
            import trackio
        except ImportError:
            return
        trackio.log({self.tag: [trackio.Image(a, caption=t) for a, t in images]})

    def attach_to(self, trainer) -> "SampleOverlayCallback":
        """Add to `trainer`, sharing its TensorBoard writer. Returns self."""
        self._tensorboard = next(
            (cb for cb in trainer.callback_handler.callbacks if isinstance(cb, TensorBoardCallback)), None
        )
        trainer.add_callback(self)
        return self
