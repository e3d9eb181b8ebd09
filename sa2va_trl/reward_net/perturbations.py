"""Perturbed copies of a ground-truth mask, and a sampler that spreads their Dice evenly over [0, 1].

The reward network learns to predict Dice; a policy's own masks cover only its typical band, so
the training set adds perturbed ground truths of known Dice: erosion, dilation, shifts, drops
(empty masks), merges with other regions of the same image, random blobs (alone, added or cut
out), half-plane cuts, and the ground truth itself. `sample_perturbations` draws many candidates
and keeps a subset whose Dice values fall into equal-width bins in turn.

Morphology uses torch max-pooling (alternating 3 x 3 square and cross steps, an octagonal
structuring element close to a disk), so no extra dependency is needed.

Example:
    >>> import numpy as np
    >>> gt = np.zeros((32, 32), dtype=bool); gt[8:24, 8:24] = True
    >>> round(dice(gt, gt), 3), dice(np.zeros_like(gt), gt)
    (1.0, 0.0)
    >>> bool(dilate(gt, 2).sum() > gt.sum() > erode(gt, 2).sum())
    True
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.nn import functional as F

#: Every perturbation kind this module produces (the `kind` column of the generated data;
#: "policy" marks masks predicted by a Sa2VA policy and is added by `data.py`).
PERTURBATION_KINDS = (
    "gt",  # the ground truth itself (Dice 1)
    "erode",  # eroded by a random radius
    "dilate",  # dilated by a random radius
    "shift",  # translated (no wrap-around)
    "empty",  # dropped: no pixel predicted
    "merge",  # union with one or more other regions of the same image
    "blob",  # a random blob somewhere (near the region or anywhere)
    "blob_add",  # the region plus a blob touching it
    "blob_cut",  # the region minus a blob inside it
    "cut",  # the part of the region on one side of a random line
)


def dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Dice coefficient 2|P n T| / (|P| + |T|) of two boolean masks; 1.0 when both are empty.

    Args:
        pred: H x W boolean (or 0/1) mask.
        target: H x W boolean (or 0/1) mask of the same shape.

    Returns:
        The Dice coefficient in [0, 1].
    """
    pred, target = np.asarray(pred, dtype=bool), np.asarray(target, dtype=bool)
    if pred.shape != target.shape:
        raise ValueError(f"dice: shapes differ, {pred.shape} vs {target.shape}")
    total = int(pred.sum()) + int(target.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, target).sum()) / total


def _morph(mask: np.ndarray, radius: int, grow: bool) -> np.ndarray:
    """Dilate (grow=True) or erode by `radius` pixels with alternating square / cross 3 x 3 steps."""
    if radius <= 0:
        return mask.copy()
    x = torch.from_numpy(np.asarray(mask, dtype=np.float32))[None, None]
    if not grow:
        x = 1.0 - x  # erosion = complement of the dilated complement
    for step in range(int(radius)):
        if step % 2 == 0:
            x = F.max_pool2d(x, 3, stride=1, padding=1)
        else:
            x = torch.maximum(
                F.max_pool2d(x, (3, 1), stride=1, padding=(1, 0)), F.max_pool2d(x, (1, 3), stride=1, padding=(0, 1))
            )
    out = x[0, 0].numpy() > 0.5
    return out if grow else ~out


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Dilate a boolean mask by `radius` pixels (octagonal structuring element).

    Args:
        mask: H x W boolean mask.
        radius: number of pixels to grow by (0 returns a copy).

    Returns:
        The dilated H x W boolean mask.
    """
    return _morph(mask, radius, grow=True)


def erode(mask: np.ndarray, radius: int) -> np.ndarray:
    """Erode a boolean mask by `radius` pixels (octagonal structuring element; outside counts as empty).

    Args:
        mask: H x W boolean mask.
        radius: number of pixels to shrink by (0 returns a copy).

    Returns:
        The eroded H x W boolean mask.
    """
    return _morph(mask, radius, grow=False)


def shift(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Translate a mask by (dy, dx) pixels; pixels moved outside are lost, none wrap around.

    Args:
        mask: H x W boolean mask.
        dy: rows to move down (negative: up).
        dx: columns to move right (negative: left).

    Returns:
        The shifted H x W boolean mask.
    """
    height, width = mask.shape
    out = np.zeros_like(mask, dtype=bool)
    dy, dx = int(dy), int(dx)
    if abs(dy) >= height or abs(dx) >= width:
        return out
    src = mask[max(0, -dy) : height - max(0, dy), max(0, -dx) : width - max(0, dx)]
    out[max(0, dy) : max(0, dy) + src.shape[0], max(0, dx) : max(0, dx) + src.shape[1]] = src
    return out


def random_blob(shape: tuple[int, int], center: tuple[float, float], radius: float, rng: np.random.Generator) -> np.ndarray:
    """An irregular blob: smooth random noise thresholded inside a soft elliptical envelope.

    Args:
        shape: (H, W) of the mask to draw in.
        center: (y, x) of the blob's centre (may lie outside the image).
        radius: its approximate radius in pixels.
        rng: the random generator.

    Returns:
        An H x W boolean mask (may be empty when the blob falls outside the image).
    """
    height, width = shape
    radius = max(float(radius), 1.0)
    grid = int(rng.integers(3, 7))
    noise = torch.from_numpy(rng.standard_normal((1, 1, grid, grid)).astype(np.float32))
    size = max(int(math.ceil(2 * radius)) + 1, 3)
    field = F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=True)[0, 0].numpy()
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) - (size - 1) / 2.0
    aspect = rng.uniform(0.6, 1.6)
    envelope = 1.0 - np.sqrt((yy * aspect) ** 2 + (xx / aspect) ** 2) / radius
    local = (envelope + 0.35 * field / (np.abs(field).max() + 1e-6)) > 0
    out = np.zeros(shape, dtype=bool)
    top, left = int(round(center[0] - (size - 1) / 2.0)), int(round(center[1] - (size - 1) / 2.0))
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + size, height), min(left + size, width)
    if y1 > y0 and x1 > x0:
        out[y0:y1, x0:x1] = local[y0 - top : y1 - top, x0 - left : x1 - left]
    return out


def half_plane_cut(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Keep the part of a mask on one side of a random line through its bounding box.

    Args:
        mask: H x W boolean mask (non-empty for a useful result).
        rng: the random generator.

    Returns:
        The cut H x W boolean mask.
    """
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return mask.copy()
    py, px = rng.uniform(ys.min(), ys.max() + 1), rng.uniform(xs.min(), xs.max() + 1)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0 : mask.shape[0], 0 : mask.shape[1]]
    side = (yy - py) * math.sin(angle) + (xx - px) * math.cos(angle) > 0
    return mask & side


class MaskPerturber:
    """Draws perturbed versions of one ground-truth region.

    Magnitudes scale with the region's equivalent radius r = sqrt(area / pi), so small and large
    regions get the same spread of Dice values.

    Args:
        rng: the random generator (seed it for reproducible data).
        jitter_prob: probability of adding a 1-pixel erosion / dilation on top of a candidate, so
            that perturbed boundaries are not always exact copies of the ground truth's.
    """

    def __init__(self, rng: np.random.Generator, jitter_prob: float = 0.3):
        self.rng = rng
        self.jitter_prob = jitter_prob

    def candidate(self, kind: str, gt: np.ndarray, others: list[np.ndarray]) -> np.ndarray:
        """One perturbed mask of the given kind.

        Args:
            kind: one of `PERTURBATION_KINDS` ("merge" needs `others`).
            gt: the H x W boolean ground truth (non-empty).
            others: the other regions of the same image.

        Returns:
            An H x W boolean mask.
        """
        rng, shape = self.rng, gt.shape
        r_eq = max(math.sqrt(gt.sum() / math.pi), 1.0)
        ys, xs = np.nonzero(gt)
        cy, cx = ys.mean(), xs.mean()
        if kind == "gt":
            return gt.copy()
        if kind == "empty":
            return np.zeros(shape, dtype=bool)
        if kind == "erode":
            out = erode(gt, int(rng.integers(1, max(int(r_eq), 1) + 1)))
        elif kind == "dilate":
            out = dilate(gt, int(rng.integers(1, max(int(2.5 * r_eq), 1) + 1)))
        elif kind == "shift":
            distance, angle = rng.uniform(0.05, 2.5) * r_eq, rng.uniform(0, 2 * math.pi)
            out = shift(gt, int(round(distance * math.sin(angle))), int(round(distance * math.cos(angle))))
        elif kind == "merge":
            if not others:
                raise ValueError("'merge' needs other regions of the same image")
            chosen = rng.choice(len(others), size=int(rng.integers(1, len(others) + 1)), replace=False)
            out = gt.copy()
            for k in chosen:
                out |= others[int(k)]
        elif kind == "blob":
            radius = rng.uniform(0.4, 2.0) * r_eq
            if rng.random() < 0.5:  # near the region: partial overlaps give low but non-zero Dice
                offset, angle = rng.uniform(0, 1.5) * r_eq, rng.uniform(0, 2 * math.pi)
                center = (cy + offset * math.sin(angle), cx + offset * math.cos(angle))
            else:
                center = (rng.uniform(0, shape[0]), rng.uniform(0, shape[1]))
            out = random_blob(shape, center, radius, rng)
        elif kind == "blob_add":
            k = int(rng.integers(len(ys)))
            out = gt | random_blob(shape, (ys[k], xs[k]), rng.uniform(0.3, 1.5) * r_eq, rng)
        elif kind == "blob_cut":
            k = int(rng.integers(len(ys)))
            out = gt & ~random_blob(shape, (ys[k], xs[k]), rng.uniform(0.3, 1.2) * r_eq, rng)
        elif kind == "cut":
            out = half_plane_cut(gt, rng)
        else:
            raise ValueError(f"unknown perturbation kind {kind!r}; valid kinds: {', '.join(PERTURBATION_KINDS)}")
        if rng.random() < self.jitter_prob:
            out = dilate(out, 1) if rng.random() < 0.5 else erode(out, 1)
        return out


def balanced_selection(
    dice_values: np.ndarray, count: int, num_bins: int, rng: np.random.Generator, start_bin: int = 0
) -> list[int]:
    """Pick `count` candidates whose Dice values visit equal-width bins of [0, 1] in turn.

    Target bins are start_bin, start_bin + 1, ... (mod num_bins); for each, an unused candidate in
    that bin is drawn at random, or, when the bin is empty, the unused candidate nearest its centre.

    Args:
        dice_values: the candidates' Dice values.
        count: how many to pick (at most len(dice_values)).
        num_bins: number of equal-width Dice bins.
        rng: the random generator.
        start_bin: the first target bin (vary it between regions so all bins fill evenly).

    Returns:
        Indices into `dice_values`, without repeats.
    """
    dice_values = np.asarray(dice_values, dtype=np.float64)
    bins = np.minimum((dice_values * num_bins).astype(int), num_bins - 1)
    unused = np.ones(len(dice_values), dtype=bool)
    picked = []
    for j in range(min(count, len(dice_values))):
        target = (start_bin + j) % num_bins
        in_bin = np.flatnonzero(unused & (bins == target))
        if len(in_bin):
            k = int(rng.choice(in_bin))
        else:
            free = np.flatnonzero(unused)
            centre = (target + 0.5) / num_bins
            k = int(free[np.argmin(np.abs(dice_values[free] - centre))])
        unused[k] = False
        picked.append(k)
    return picked


def sample_perturbations(
    gt: np.ndarray,
    others: list[np.ndarray],
    count: int,
    rng: np.random.Generator,
    num_bins: int = 10,
    oversample: int = 4,
    start_bin: int = 0,
    kinds: tuple[str, ...] = PERTURBATION_KINDS,
) -> list[tuple[str, np.ndarray, float]]:
    """Perturbed masks of one region with Dice values spread evenly over [0, 1].

    Args:
        gt: the H x W boolean ground truth; an empty one yields no samples.
        others: the other regions of the same image (for "merge"; skipped when there are none).
        count: how many perturbed masks to return.
        rng: the random generator.
        num_bins: equal-width Dice bins to balance over.
        oversample: candidates drawn per returned mask.
        start_bin: first target bin (see `balanced_selection`).
        kinds: the perturbation kinds to draw from.

    Returns:
        A list of (kind, mask, dice) triples.
    """
    gt = np.asarray(gt, dtype=bool)
    if count <= 0 or not gt.any():
        return []
    usable = [k for k in kinds if k != "merge" or others]
    perturber = MaskPerturber(rng)
    candidates = []
    for _ in range(count * oversample):
        kind = usable[int(rng.integers(len(usable)))]
        mask = perturber.candidate(kind, gt, others)
        candidates.append((kind, mask, dice(mask, gt)))
    picked = balanced_selection(np.array([c[2] for c in candidates]), count, num_bins, rng, start_bin=start_bin)
    return [candidates[k] for k in picked]
