"""Stochastic mask actions of loop 2: how a sampled mask gets a log-probability the policy gradient can use.

A mask comes from the text through two deterministic maps, `text_hidden_fcs` ([SEG] state -> SAM2 prompt
embedding mu) and the SAM2 mask decoder (prompt -> mask logits). A policy gradient reaches only what sits before a
sampled choice, so the trainer can sample at two places; each sample's log-probability joins the log-prob of its
`[SEG]` token:

- the prompt action: e ~ N(mu, sigma^2 I). Trains the `[SEG]` state and `text_hidden_fcs` (not the decoder).
- the pixel action: every pixel of the mask ~ Bernoulli(sigmoid(logit / tau)) of the decoder's upsampled logits.
  Trains the mask decoder too (and, through the logits, everything before it). Its mode is the greedy mask that
  evaluation uses, so what the rewards score and what evaluation measures are the same object.

Both log-probabilities are divided by their dimension (embedding size, pixel count), so one mask action weighs about
like one token in TRL's importance ratio and KL; the score keeps its direction, and Adam rescales the step of
parameters that only the mask action reaches (the decoder).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

#: Floor of a tempered mask-action log-probability: keeps exp() of ratios and KL finite when the policy has moved
#: far from a sampled action (that sample stops pulling; the others still do).
LOGPROB_FLOOR = -30.0


def sample_prompt_action(mu: torch.Tensor, sigma: float, generator: torch.Generator | None = None,
                         relative: bool = False):
    """e ~ N(mu, s^2 I) per row of `mu` (N, D), s = sigma, or with `relative` s = sigma * rms(mu) of that row.
    Returns (e, per-row s (N,)).

    With a fixed s the policy can raise its reward without a better mode: a larger |mu| drowns the noise, so
    sampled masks get closer to the greedy one (measured on the tiny world: rms(mu) +22% in 150 steps while the
    training IoU rose 0.87 -> 0.91 and the held-out IoU stayed flat). A relative s scales with mu, so growing |mu| no
    longer quiets the noise; s is a constant of the sample (no gradient through it). Measured: rms(mu) still grew
    (1.16 -> 1.30) and held-out IoU did not rise either (loop 2 alone, 300 steps: 0.9610 relative vs 0.9611
    fixed, from 0.9608)."""
    if relative:
        scale = float(sigma) * mu.detach().pow(2).mean(dim=-1).sqrt().clamp(min=1e-6)
    else:
        scale = torch.full(mu.shape[:1], float(sigma), device=mu.device, dtype=mu.dtype)
    noise = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    return mu + scale.unsqueeze(-1) * noise, scale


def prompt_action_logprob(action: torch.Tensor, mu: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Tempered Gaussian log-density -||e - mu||^2 / (2 sigma^2 D) of each row, without the constant (it cancels in
    every ratio and KL). (N,)"""
    log_density = -0.5 * ((action - mu) / scale.unsqueeze(-1)).pow(2).mean(dim=-1)
    return log_density.clamp(min=LOGPROB_FLOOR)


def _per_map(temperature: float | Sequence[float], count: int) -> list[float]:
    temperatures = list(temperature) if isinstance(temperature, (list, tuple)) else [temperature] * count
    if len(temperatures) != count:
        raise ValueError(f"{len(temperatures)} temperatures for {count} logit maps")
    if any(t <= 0 for t in temperatures):
        raise ValueError(f"the pixel action's temperature must be > 0, got {min(temperatures)}")
    return temperatures


def relative_pixel_temperatures(mask_logits: Sequence[torch.Tensor], temperature: float) -> list[float]:
    """Per map, `temperature` times the map's mean |logit| (a constant of the sample, no gradient).

    With a fixed temperature the decoder can raise the sampled masks' reward by scaling its logits up: fewer pixels
    flip, the samples get closer to the greedy mask, and the greedy mask does not improve (measured on the tiny world:
    the flip fraction halved in 600 steps while held-out IoU fell 0.9741 -> 0.9723). Scaling every logit by c scales
    the mean |logit| by c too, so with a relative temperature that shortcut is gone."""
    return [float(temperature) * max(float(logits.detach().float().abs().mean()), 1e-3) for logits in mask_logits]


def sample_pixel_action(
    mask_logits: Sequence[torch.Tensor],
    temperature: float | Sequence[float],
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> list[torch.Tensor]:
    """One Bernoulli(sigmoid(logit / temperature)) draw per pixel of each (H_i, W_i) logit map; bool masks.
    `temperature` is one for all maps or one per map; `generator` one for all maps or one per map (per-sample
    seeding)."""
    temperatures = _per_map(temperature, len(mask_logits))
    generators = list(generator) if isinstance(generator, (list, tuple)) else [generator] * len(mask_logits)
    if len(generators) != len(mask_logits):
        raise ValueError(f"{len(generators)} generators for {len(mask_logits)} logit maps")
    masks = []
    for logits, g, temp in zip(mask_logits, generators, temperatures):
        probs = torch.sigmoid(logits.detach().float() / temp)
        masks.append(torch.rand(probs.shape, generator=g, device=probs.device) < probs)
    return masks


def pixel_action_logprob(
    mask_logits: Sequence[torch.Tensor], actions: Sequence[torch.Tensor], temperature: float | Sequence[float]
) -> torch.Tensor:
    """Mean over pixels of log Bernoulli(action | sigmoid(logit / temperature)), per mask (`temperature` one for all
    or one per mask). (N,), differentiable."""
    if len(mask_logits) != len(actions):
        raise ValueError(f"{len(mask_logits)} logit maps but {len(actions)} sampled masks")
    values = []
    for logits, action, temperature in zip(mask_logits, actions, _per_map(temperature, len(mask_logits))):
        if logits.shape != action.shape:
            raise ValueError(f"logits {tuple(logits.shape)} and sampled mask {tuple(action.shape)} differ in size")
        target = action.to(device=logits.device, dtype=torch.float32)
        values.append(-F.binary_cross_entropy_with_logits(logits.float() / temperature, target))
    return torch.stack(values).clamp(min=LOGPROB_FLOOR)


def flip_fraction(mask_logits: Sequence[torch.Tensor], actions: Sequence[torch.Tensor]) -> float:
    """Fraction of pixels where the sampled mask differs from the mode (logit > 0): how much the action explores."""
    differ = sum(int(((logits.detach() > 0) != action.to(logits.device)).sum()) for logits, action in zip(mask_logits, actions))
    total = sum(action.numel() for action in actions)
    return differ / total if total else 0.0
