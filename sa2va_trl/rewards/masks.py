"""Masks: THE converter (`as_mask`), overlap scores, and the `mask_iou` / `mask_dice` rewards.

Every part of sa2va-trl that reads a mask (rewards, the adapter, the data loaders) goes through
`as_mask`, so a mask is read the same way everywhere and a bad one is reported with its row and
field. Accepted: numpy or torch arrays (bool, or numbers that are all 0 or 1), nested lists,
PIL images (mode "1", "L", "P"), and COCO RLE dicts `{"size": [H, W], "counts": str | bytes | list}`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .columns import batch_length, get_column
from .errors import MaskFormatError, RewardInputError
from .registry import register_reward

__all__ = [
    "as_mask", "mask_to_rle", "iou", "dice", "batch_iou", "batch_dice", "MaskIoU", "MaskDice", "DECODED_RLE_CACHE",
    "as_mask_cached",
]


def as_mask(value: Any, row: int | None = None, field: str | None = None) -> np.ndarray:
    """Convert one mask to an H x W numpy bool array.

    Args:
        value: a numpy / torch array (bool, or numeric with only 0 and 1), a nested list, a PIL
            image, or a COCO RLE dict (compressed `counts` str/bytes, or uncompressed list).
        row: the row index, named in the error if `value` is not a mask.
        field: the column name, named in the error if `value` is not a mask.

    Returns:
        A 2-D `np.ndarray` of dtype bool (a view of `value` when it already is one).

    Raises:
        MaskFormatError: `value` is None, not 2-D, empty, non-binary, or an invalid RLE.

    Example:
        >>> as_mask([[0, 1], [1, 1]]).sum()
        np.int64(3)
        >>> as_mask({"size": [2, 2], "counts": [1, 3]}).tolist()  # column-major RLE
        [[False, True], [True, True]]
    """
    if value is None:
        raise MaskFormatError("expected a mask, got None", row=row, field=field)
    if isinstance(value, Mapping):
        return _decode_rle(value, row=row, field=field)
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch.Tensor, without importing torch
        value = _torch_to_bool_numpy(value, row=row, field=field)
    elif hasattr(value, "mode") and hasattr(value, "getbands"):  # PIL.Image
        value = np.asarray(value)
    elif not isinstance(value, np.ndarray):
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise MaskFormatError(
                f"expected a mask (array, tensor, nested list or COCO RLE dict), got {type(value).__name__}",
                row=row,
                field=field,
            )
        try:
            value = np.asarray(value)
        except ValueError as e:  # ragged nested lists
            raise MaskFormatError(f"nested list is not a rectangular H x W grid ({e})", row=row, field=field) from None
    return _check_binary_2d(value, row=row, field=field)


def _torch_to_bool_numpy(t: Any, *, row: int | None, field: str | None) -> np.ndarray:
    import torch

    t = t.detach()
    if t.dtype != torch.bool:
        if t.is_floating_point() or t.is_complex() or t.dtype.is_signed or t.dtype == torch.uint8:
            if not bool(((t == 0) | (t == 1)).all()):
                raise MaskFormatError(_non_binary_message(t.dtype), row=row, field=field)
        t = t != 0
    return t.cpu().numpy()


def _check_binary_2d(a: np.ndarray, *, row: int | None, field: str | None) -> np.ndarray:
    if a.ndim != 2:
        raise MaskFormatError(f"expected an H x W mask, got shape {tuple(a.shape)}", row=row, field=field)
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise MaskFormatError(f"mask has an empty shape {tuple(a.shape)}", row=row, field=field)
    if a.dtype == bool:
        return a
    if a.dtype.kind not in "biuf":
        raise MaskFormatError(f"mask values must be bool or numbers, got dtype {a.dtype}", row=row, field=field)
    if not ((a == 0) | (a == 1)).all():
        raise MaskFormatError(_non_binary_message(a.dtype), row=row, field=field)
    return a != 0


def _non_binary_message(dtype: Any) -> str:
    return (
        f"mask of dtype {dtype} holds values other than 0 and 1; "
        "threshold probabilities or logits first (e.g. `probs > 0.5`), and divide 0/255 masks by 255"
    )


def _decode_rle(rle: Mapping, *, row: int | None, field: str | None) -> np.ndarray:
    from pycocotools import mask as mask_utils

    size, counts = rle.get("size"), rle.get("counts")
    if (
        not isinstance(size, Sequence)
        or len(size) != 2
        or not all(isinstance(s, (int, np.integer)) and s > 0 for s in size)
        or counts is None
    ):
        raise MaskFormatError(
            f"a COCO RLE dict needs 'size' [H, W] (positive ints) and 'counts', got keys {sorted(rle)}",
            row=row,
            field=field,
        )
    h, w = int(size[0]), int(size[1])
    if isinstance(counts, (list, tuple)):  # uncompressed RLE: run lengths, column-major
        if sum(counts) != h * w:
            raise MaskFormatError(
                f"uncompressed RLE counts sum to {sum(counts)}, expected H * W = {h * w}", row=row, field=field
            )
        encoded = mask_utils.frPyObjects({"size": [h, w], "counts": list(counts)}, h, w)
    elif isinstance(counts, (str, bytes)):
        encoded = {"size": [h, w], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    else:
        raise MaskFormatError(f"RLE 'counts' must be a str, bytes or list, got {type(counts).__name__}", row=row, field=field)
    try:
        decoded = mask_utils.decode(encoded)
    except Exception as e:  # pycocotools raises bare exceptions on corrupt strings
        raise MaskFormatError(f"could not decode the COCO RLE ({e})", row=row, field=field) from None
    if decoded.shape != (h, w):
        raise MaskFormatError(f"RLE decodes to shape {decoded.shape}, but 'size' says {(h, w)}", row=row, field=field)
    # pycocotools decodes column-major; scoring a C-ordered prediction against a Fortran-ordered
    # reference is ~60x slower per pixel, so pay the reordering once here (cached per RLE).
    return np.ascontiguousarray(decoded.view(bool))


def mask_to_rle(mask: Any) -> dict:
    """Encode a mask as a compressed COCO RLE dict `{"size": [H, W], "counts": str}` (the row schema's format).

    Args:
        mask: anything `as_mask` accepts.

    Returns:
        A JSON- and Arrow-friendly dict; `as_mask(mask_to_rle(m))` equals `as_mask(m)`.

    Example:
        >>> rle = mask_to_rle([[0, 1], [1, 1]])
        >>> rle["size"], as_mask(rle).tolist()
        ([2, 2], [[False, True], [True, True]])
    """
    from pycocotools import mask as mask_utils

    m = as_mask(mask)
    encoded = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    return {"size": [int(m.shape[0]), int(m.shape[1])], "counts": encoded["counts"].decode("ascii")}


# --- overlap scores ---------------------------------------------------------------------------


def _c_order(mask: np.ndarray) -> np.ndarray:
    return mask if mask.flags.c_contiguous else np.ascontiguousarray(mask)


def _intersection(pred: np.ndarray, target: np.ndarray) -> int:
    # Per-pair count_nonzero beats stacking the batch: np.count_nonzero(axis=...) on an
    # (N, H, W) stack measured ~6x slower per pair at 1024 x 1024 (benchmarks/rewards.py).
    # Both operands in C order: mixing C and Fortran order makes `&` ~60x slower.
    return int(np.count_nonzero(_c_order(pred) & _c_order(target)))


def _counts(pred: np.ndarray, target: np.ndarray) -> tuple[int, int, int]:
    return _intersection(pred, target), int(np.count_nonzero(pred)), int(np.count_nonzero(target))


def _iou_from_counts(inter: int, a: int, b: int) -> float:
    union = a + b - inter
    return 1.0 if union == 0 else inter / union


def _dice_from_counts(inter: int, a: int, b: int) -> float:
    return 1.0 if a + b == 0 else 2.0 * inter / (a + b)


def _checked_pair(pred: Any, target: Any, row: int | None, pred_field: str, target_field: str):
    p = as_mask(pred, row=row, field=pred_field)
    t = as_mask(target, row=row, field=target_field)
    if p.shape != t.shape:
        raise RewardInputError(
            f"{pred_field} is {p.shape[0]} x {p.shape[1]} but {target_field} is {t.shape[0]} x {t.shape[1]}; "
            "masks must be at the image's resolution",
            row=row,
            field=pred_field,
        )
    return p, t


def iou(pred: Any, target: Any) -> float:
    """Intersection over union of two masks; 1.0 when both are empty (nothing to find, nothing found).

    Args:
        pred: a mask (anything `as_mask` accepts).
        target: a mask of the same H x W.

    Returns:
        |pred & target| / |pred | target| in [0, 1].

    Example:
        >>> iou([[1, 1, 0, 0]], [[0, 1, 1, 0]])
        0.3333333333333333
    """
    return _iou_from_counts(*_counts(*_checked_pair(pred, target, None, "pred", "target")))


def dice(pred: Any, target: Any) -> float:
    """Dice coefficient (F1) of two masks; 1.0 when both are empty.

    Args:
        pred: a mask (anything `as_mask` accepts).
        target: a mask of the same H x W.

    Returns:
        2 |pred & target| / (|pred| + |target|) in [0, 1].

    Example:
        >>> dice([[1, 1, 0, 0]], [[0, 1, 1, 0]])
        0.5
    """
    return _dice_from_counts(*_counts(*_checked_pair(pred, target, None, "pred", "target")))


def _batch_scores(preds, targets, score, pred_field: str, target_field: str) -> list[float]:
    if len(preds) != len(targets):
        raise ValueError(f"got {len(preds)} {pred_field} masks but {len(targets)} {target_field} masks")
    out = []
    for i, (p, t) in enumerate(zip(preds, targets)):
        out.append(score(*_counts(*_checked_pair(p, t, i, pred_field, target_field))))
    return out


def batch_iou(preds: Sequence[Any], targets: Sequence[Any]) -> list[float]:
    """IoU of each pair of masks (a stacked (N, H, W) array or tensor also works).

    Example:
        >>> batch_iou([[[1, 0]], [[0, 0]]], [[[1, 1]], [[0, 0]]])
        [0.5, 1.0]
    """
    return _batch_scores(preds, targets, _iou_from_counts, "pred", "target")


def batch_dice(preds: Sequence[Any], targets: Sequence[Any]) -> list[float]:
    """Dice of each pair of masks (a stacked (N, H, W) array or tensor also works).

    Example:
        >>> batch_dice([[[1, 0]], [[0, 0]]], [[[1, 1]], [[0, 0]]])
        [0.6666666666666666, 1.0]
    """
    return _batch_scores(preds, targets, _dice_from_counts, "pred", "target")


class DecodedRLECache:
    """A process-wide LRU of decoded COCO RLE masks, bounded in bytes, shared by the mask rewards.

    TRL calls each reward separately, so `mask_iou`, `mask_dice` and `cycle_iou` in one recipe
    would each decode the same `region_mask` RLE every step (~7 ms at 1024 x 1024: pycocotools'
    column-major decode plus the reordering); rows also come back every epoch. Cached masks are
    read-only. Size: `$SA2VA_TRL_MASK_CACHE_MB` (default 256; 0 disables).
    """

    def __init__(self, max_bytes: int | None = None):
        if max_bytes is None:
            import os

            max_bytes = int(float(os.environ.get("SA2VA_TRL_MASK_CACHE_MB", "256")) * 2**20)
        self.max_bytes = max_bytes
        self._items: "OrderedDict[Any, np.ndarray]" = OrderedDict()
        self._lock = threading.Lock()  # TRL runs async rewards on another thread
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: Any) -> np.ndarray | None:
        """The cached mask for `key` (marked most recently used), or None."""
        with self._lock:
            mask = self._items.get(key)
            if mask is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return mask

    def put(self, key: Any, mask: np.ndarray) -> None:
        """Store `mask` (made read-only), evicting the least recently used beyond the byte budget."""
        if mask.nbytes > self.max_bytes:
            return
        with self._lock:
            if key in self._items:
                return
            mask.flags.writeable = False
            self._items[key] = mask
            self._bytes += mask.nbytes
            while self._bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self._bytes -= old.nbytes

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0
            self.hits = self.misses = 0


#: The cache the mask rewards share (see `DecodedRLECache`).
DECODED_RLE_CACHE = DecodedRLECache()


def _rle_key(value: Any) -> Any:
    if isinstance(value, Mapping):
        counts = value.get("counts")
        if isinstance(counts, (str, bytes)):
            return ("rle", tuple(value.get("size", ())), counts)
    return None


def as_mask_cached(value: Any, row: int | None = None, field: str | None = None) -> np.ndarray:
    """`as_mask`, in C order, with compressed COCO RLE decodes shared through `DECODED_RLE_CACHE`.

    Code that decodes a row's `region_mask` anyway (e.g. prompt building) can call this so the
    rewards of the same step find the mask already decoded. RLE results are read-only.

    Example:
        >>> rle = mask_to_rle([[0, 1], [1, 1]])
        >>> as_mask_cached(rle) is as_mask_cached(dict(rle))
        True
    """
    key = _rle_key(value)
    mask = DECODED_RLE_CACHE.get(key) if key is not None else None
    if mask is None:
        mask = _c_order(as_mask(value, row=row, field=field))
        if key is not None:
            DECODED_RLE_CACHE.put(key, mask)
    return mask


class MaskCache:
    """Converts a column's masks once per call: a row repeated G times (same RLE, same object) decodes once.

    RLE masks also go through the process-wide `DECODED_RLE_CACHE`, so other rewards and later
    steps reuse the decode.
    """

    def __init__(self, field: str):
        self.field = field
        self._by_key: dict[Any, tuple[np.ndarray, int]] = {}

    def _key(self, value: Any) -> Any:
        return _rle_key(value) or ("id", id(value))

    def get(self, value: Any, row: int) -> tuple[np.ndarray, int]:
        """Return (mask, pixel count) for `value`, converting it on first sight."""
        key = self._key(value)
        hit = self._by_key.get(key)
        if hit is None:
            mask = as_mask_cached(value, row=row, field=self.field)
            hit = (mask, int(np.count_nonzero(mask)))
            self._by_key[key] = hit
        return hit


class _MaskOverlapReward:
    """Shared body of `mask_iou` and `mask_dice`: score `pred_mask[i]` against `region_mask[i]`."""

    __name__ = "mask_overlap"

    def __init__(self, pred_column: str = "pred_mask", target_column: str = "region_mask"):
        self.pred_column = pred_column
        self.target_column = target_column

    def _score(self, inter: int, a: int, b: int) -> float:
        raise NotImplementedError

    def __call__(self, prompts=None, completions=None, completion_ids=None, **columns) -> list[float | None]:
        name = self.__name__
        n = batch_length(completions, reward=name, columns=columns, column=self.pred_column)
        preds = get_column(columns, self.pred_column, n, reward=name)
        targets = get_column(columns, self.target_column, n, reward=name)
        cache = MaskCache(self.target_column)
        out: list[float | None] = []
        for i in range(n):
            if preds[i] is None or targets[i] is None:
                out.append(None)  # loop-1 rows carry no predicted mask; rows without a region have no target
                continue
            p = as_mask(preds[i], row=i, field=self.pred_column)
            t, t_area = cache.get(targets[i], i)
            if p.shape != t.shape:
                raise RewardInputError(
                    f"{self.pred_column} is {p.shape[0]} x {p.shape[1]} but {self.target_column} is "
                    f"{t.shape[0]} x {t.shape[1]}; masks must be at the image's resolution",
                    reward=name,
                    row=i,
                    field=self.pred_column,
                )
            out.append(self._score(_intersection(p, t), int(np.count_nonzero(p)), t_area))
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(pred_column={self.pred_column!r}, target_column={self.target_column!r})"


@register_reward("mask_iou")
class MaskIoU(_MaskOverlapReward):
    """IoU of the policy's predicted mask (`pred_mask`) against the row's region (`region_mask`).

    Applies to rows where both are present (loop 2); None elsewhere. Both masks empty gives 1.0
    (the region is empty and the policy predicted nothing: a perfect answer). Masks of different
    sizes raise `RewardInputError` naming the row.

    Args:
        pred_column: column holding the predicted masks (default `pred_mask`, passed by the trainer).
        target_column: column holding the reference masks (default `region_mask`).

    Returns:
        Calling it returns one float in [0, 1] (or None) per completion.

    Example:
        >>> reward = MaskIoU()
        >>> reward(prompts=["p", "p"], completions=["", ""], completion_ids=[[], []],
        ...        region_mask=[[[1, 1, 0, 0]], [[1, 1, 0, 0]]], pred_mask=[[[0, 1, 1, 0]], None])
        [0.3333333333333333, None]
    """

    __name__ = "mask_iou"

    def _score(self, inter: int, a: int, b: int) -> float:
        return _iou_from_counts(inter, a, b)


@register_reward("mask_dice")
class MaskDice(_MaskOverlapReward):
    """Dice of the policy's predicted mask (`pred_mask`) against the row's region (`region_mask`).

    Same rows, columns and conventions as `MaskIoU` (both empty: 1.0).

    Args:
        pred_column: column holding the predicted masks (default `pred_mask`).
        target_column: column holding the reference masks (default `region_mask`).

    Returns:
        Calling it returns one float in [0, 1] (or None) per completion.

    Example:
        >>> MaskDice()(prompts=["p"], completions=[""], completion_ids=[[]],
        ...            region_mask=[[[1, 1, 0, 0]]], pred_mask=[[[0, 1, 1, 0]]])
        [0.5]
    """

    __name__ = "mask_dice"

    def _score(self, inter: int, a: int, b: int) -> float:
        return _dice_from_counts(inter, a, b)
