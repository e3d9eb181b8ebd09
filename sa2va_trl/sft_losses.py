"""The published Sa2VA SFT objective: text cross-entropy + 2.0 x BCE + 0.5 x Dice on mask logits.

The weights are Sa2VA's (``loss_mask`` = sigmoid cross-entropy with weight 2.0, ``loss_dice`` =
mmdet's naive Dice with eps 1 and weight 0.5, next to the LLM's token cross-entropy with weight 1).
The functions here are plain tensor maths so the SFT entry point, the SAM2 prompt-following
stage and any later trainer can share them.

Example:
    >>> import torch
    >>> logits = torch.full((1, 4, 4), 20.0)
    >>> target = torch.ones(1, 4, 4)
    >>> round(float(dice_loss(logits, target)), 4)
    0.0
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Sa2VA's published weights (projects/llava_sam2 configs: loss_mask weight 2.0, loss_dice 0.5).
DEFAULT_TEXT_WEIGHT = 1.0
DEFAULT_BCE_WEIGHT = 2.0
DEFAULT_DICE_WEIGHT = 0.5


def token_cross_entropy(token_logprobs: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood over the supervised tokens of a batch.

    Args:
        token_logprobs: (B, T) log-probabilities of the target tokens (the adapter's
            ``completion_logprobs`` output at temperature 1).
        token_mask: (B, T) 1 where a token is supervised, 0 on padding.

    Returns:
        A scalar; averaged over tokens, not sequences, like the LLM loss of the published recipe.
        Zero (with a gradient path) when no token is supervised.
    """
    mask = token_mask.to(token_logprobs.dtype)
    return -(token_logprobs * mask).sum() / mask.sum().clamp(min=1.0)


def _match_size(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Bilinearly resize (N, h, w) logits to the (N, H, W) target size when they differ."""
    if logits.shape[-2:] == target.shape[-2:]:
        return logits
    return F.interpolate(logits[:, None].float(), size=target.shape[-2:], mode="bilinear", align_corners=False)[:, 0]


def mask_bce_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pixel sigmoid cross-entropy, averaged over pixels and masks.

    ``logits`` (N, h, w) are resized to the target's (N, H, W) first, as the published code
    upsamples the low-resolution SAM2 logits before its mask loss. ``weight`` (N, H, W), optional,
    scales each pixel's term (e.g. up-weights the pixels of the other objects: hard negatives).
    """
    logits = _match_size(logits, target)
    return F.binary_cross_entropy_with_logits(logits.float(), target.float(),
                                              weight=None if weight is None else weight.float())


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """mmdet's "naive" Dice loss on sigmoid probabilities, averaged over masks.

    1 - (2 |p t| + eps) / (|p| + |t| + eps) per mask; eps 1 keeps an empty target with an empty
    prediction at zero loss instead of 0/0.
    """
    logits = _match_size(logits, target)
    prob = logits.float().sigmoid().flatten(1)
    tgt = target.float().flatten(1)
    inter = (prob * tgt).sum(-1)
    return (1.0 - (2.0 * inter + eps) / (prob.sum(-1) + tgt.sum(-1) + eps)).mean()


@dataclass
class SFTLoss:
    """Weighted sum of the three terms; returns the total and the parts for logging.

    Example:
        >>> import torch
        >>> loss = SFTLoss()
        >>> total, parts = loss(torch.log(torch.full((1, 2), 0.5)), torch.ones(1, 2),
        ...                     torch.zeros(1, 2, 2), torch.zeros(1, 2, 2))
        >>> sorted(parts)
        ['bce', 'dice', 'text_ce']
    """

    text_weight: float = DEFAULT_TEXT_WEIGHT
    bce_weight: float = DEFAULT_BCE_WEIGHT
    dice_weight: float = DEFAULT_DICE_WEIGHT

    def __call__(
        self,
        token_logprobs: torch.Tensor | None,
        token_mask: torch.Tensor | None,
        mask_logits: torch.Tensor | None,
        mask_targets: torch.Tensor | None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        parts: dict[str, torch.Tensor] = {}
        if token_logprobs is not None:
            parts["text_ce"] = token_cross_entropy(token_logprobs, token_mask)
        if mask_logits is not None and mask_logits.shape[0] > 0:
            parts["bce"] = mask_bce_loss(mask_logits, mask_targets)
            parts["dice"] = dice_loss(mask_logits, mask_targets)
        if not parts:
            raise ValueError("SFTLoss got neither text log-probs nor mask logits: nothing to train on.")
        weights = {"text_ce": self.text_weight, "bce": self.bce_weight, "dice": self.dice_weight}
        total = sum(weights[name] * value for name, value in parts.items())
        return total, {name: float(value.detach()) for name, value in parts.items()}
