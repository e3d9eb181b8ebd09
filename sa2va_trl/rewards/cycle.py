"""Cycle-consistency rewards: score the policy's output by running the reverse model back.

- `cycle_iou` (loop 1, mask -> caption -> mask'): the reverse model segments each generated
  caption; reward = IoU(mask', region_mask).
- `cycle_meteor` (loop 2, caption -> mask -> caption'): the reverse model captions each
  predicted mask (greedy); reward = METEOR(caption', caption).

The reverse model is an explicit handle, never a global: bound at construction
(`get_reward("cycle_iou", reverse_policy=policy)`) or passed per call as the `reverse_policy`
keyword (the Sa2VA trainer passes its EMA model that way; a per-call handle wins over a bound
one). It is any object with the two batched methods of `sa2va_trl.models.adapter.Sa2VAPolicy`:

    segment(images, texts) -> list[np.ndarray]          # H x W bool, one per text
    caption(images, region_masks) -> list[str]          # one per mask

Each reward calls its method ONCE per call with the distinct (image, input) pairs of the batch
(G samples of a prompt often repeat the same caption or mask), under `torch.no_grad()`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from .columns import (
    TASK_CAPTION_TO_MASK,
    TASK_MASK_TO_CAPTION,
    batch_length,
    completion_text,
    get_column,
    reference_texts,
    task_mask,
)
from .errors import RewardInputError
from .masks import MaskCache, _intersection, as_mask
from .meteor import MeteorScorer
from .registry import register_reward

__all__ = ["CycleIoU", "CycleMeteor", "resolve_reverse_policy"]


def resolve_reverse_policy(bound: Any, passed: Any, method: str, *, reward: str) -> Any:
    """Pick the reverse model: the per-call `reverse_policy` if given, else the bound one.

    Args:
        bound: the handle given at construction (or None).
        passed: the `reverse_policy` keyword of the call: an object, a per-row list of the same
            object (as a dataset-style column), or None.
        method: the method the reward needs (`"segment"` or `"caption"`).
        reward: the reward's name, for the error message.

    Returns:
        The handle to call.
    """
    if isinstance(passed, (list, tuple)):
        distinct = {id(p): p for p in passed if p is not None}
        if len(distinct) > 1:
            raise RewardInputError(
                "the reverse_policy column holds different objects; pass one reverse model per call",
                reward=reward,
                field="reverse_policy",
            )
        passed = next(iter(distinct.values()), None)
    policy = passed if passed is not None else bound
    if policy is None:
        raise RewardInputError(
            f"needs the reverse model: bind it with get_reward({reward!r}, reverse_policy=policy) "
            "or pass reverse_policy=policy per call (the Sa2VA trainer does)",
            reward=reward,
            field="reverse_policy",
        )
    if not callable(getattr(policy, method, None)):
        raise RewardInputError(
            f"the reverse model ({type(policy).__name__}) has no `{method}` method; expected a Sa2VAPolicy-like object",
            reward=reward,
            field="reverse_policy",
        )
    return policy


def _image_key(img: Any, memo: dict[int, Any]) -> Any:
    """A content key for an image, so G copies of a row's image (distinct objects) dedupe."""
    key = memo.get(id(img))
    if key is None:
        if hasattr(img, "tobytes") and hasattr(img, "mode") and hasattr(img, "size"):  # PIL
            key = ("pil", img.mode, img.size, hashlib.blake2b(img.tobytes(), digest_size=16).digest())
        elif isinstance(img, np.ndarray):
            data = np.ascontiguousarray(img)
            key = ("np", data.shape, data.dtype.str, hashlib.blake2b(data.tobytes(), digest_size=16).digest())
        else:
            key = ("id", id(img))
        memo[id(img)] = key
    return key


def _mask_key(mask: np.ndarray) -> tuple:
    return (mask.shape, hashlib.blake2b(np.packbits(mask).tobytes(), digest_size=16).digest())


def _no_grad():
    import torch

    return torch.no_grad()


class _Dedupe:
    """Collects (key, payload) items, keeping the first payload of each key; maps rows to unique slots."""

    def __init__(self):
        self.slots: dict[Any, int] = {}
        self.payloads: list[tuple] = []

    def add(self, key: Any, payload: tuple) -> int:
        slot = self.slots.get(key)
        if slot is None:
            slot = self.slots[key] = len(self.payloads)
            self.payloads.append(payload)
        return slot


def _check_outputs(outputs: Any, expected: int, method: str, *, reward: str) -> list:
    if not isinstance(outputs, Sequence) and not hasattr(outputs, "__len__"):
        raise RewardInputError(
            f"reverse_policy.{method} returned a {type(outputs).__name__}, expected a list", reward=reward, field="reverse_policy"
        )
    if len(outputs) != expected:
        raise RewardInputError(
            f"reverse_policy.{method} returned {len(outputs)} results for {expected} inputs",
            reward=reward,
            field="reverse_policy",
        )
    return list(outputs)


def _keep_captionable(policy: Any, unique: _Dedupe, slot_of: dict[int, int], *, reward: str) -> tuple[_Dedupe, set[int]]:
    """Ask the reverse model's optional `captionable` hook which masks it accepts.

    Returns the accepted (image, mask) pairs and the rows whose pair was rejected; `slot_of`
    (row -> slot) is updated in place to index the accepted pairs.
    """
    captionable = getattr(policy, "captionable", None)
    if not callable(captionable) or not unique.payloads:
        return unique, set()
    with _no_grad():
        ok = captionable([p[0] for p in unique.payloads], [p[1] for p in unique.payloads])
    ok = _check_outputs(ok, len(unique.payloads), "captionable", reward=reward)
    if all(ok):
        return unique, set()
    kept, new_slot = _Dedupe(), {}
    for slot, payload in enumerate(unique.payloads):
        if ok[slot]:
            new_slot[slot] = kept.add(slot, payload)
    rejected = set()
    for row in list(slot_of):
        if slot_of[row] in new_slot:
            slot_of[row] = new_slot[slot_of[row]]
        else:
            rejected.add(row)
            del slot_of[row]
    return kept, rejected


@register_reward("cycle_iou")
class CycleIoU:
    """Loop 1 cycle reward: segment each generated caption with the reverse model, IoU with the input region.

    Applies to rows with a `region_mask` that are loop-1 rows: `task == "mask_to_caption"` when
    a `task` column exists, otherwise rows without a `pred_mask` (loop-2 rows carry one). None
    elsewhere. The reverse model's mask must have the region's H x W. Both masks empty gives 1.0.
    An empty caption (nothing but whitespace: there is nothing to segment) scores
    `empty_caption_reward` (default 0.0) without reaching the reverse model.

    Args:
        reverse_policy: the reverse model (`segment(images, texts)`), or None to take it per call.
        image_column: the column with the images (PIL or H x W x 3 arrays).
        target_column: the column with the input region masks.
        tasks: the task names it applies to when a `task` column exists.
        empty_caption_reward: the reward of an empty generated caption.

    Returns:
        Calling it returns one IoU in [0, 1] (or None) per completion.

    Example:
        >>> class Boxes:  # a stand-in reverse model: "left" -> left half, anything else -> right half
        ...     def segment(self, images, texts):
        ...         out = []
        ...         for t in texts:
        ...             m = np.zeros((2, 2), bool); m[:, 0 if "left" in t else 1] = True; out.append(m)
        ...         return out
        >>> reward = CycleIoU(reverse_policy=Boxes())
        >>> left = [[1, 0], [1, 0]]
        >>> reward(prompts=["p"] * 3, completion_ids=[[]] * 3, completions=["the left bar", "a right bar", "x"],
        ...        img=[np.zeros((2, 2, 3), np.uint8)] * 3, region_mask=[left, left, None])
        [1.0, 0.0, None]
    """

    __name__ = "cycle_iou"

    def __init__(
        self,
        reverse_policy: Any = None,
        image_column: str = "img",
        target_column: str = "region_mask",
        tasks: Sequence[str] | None = (TASK_MASK_TO_CAPTION,),
        empty_caption_reward: float = 0.0,
    ):
        self.reverse_policy = reverse_policy
        self.image_column = image_column
        self.target_column = target_column
        self.tasks = tuple(tasks) if tasks is not None else None
        self.empty_caption_reward = float(empty_caption_reward)

    def __call__(self, prompts=None, completions=None, completion_ids=None, **columns) -> list[float | None]:
        name = self.__name__
        n = batch_length(completions, reward=name)
        targets = get_column(columns, self.target_column, n, reward=name)
        applies = task_mask(columns, n, self.tasks, reward=name)
        if "task" not in columns:  # no task column: loop-2 rows are the ones with a predicted mask
            preds = get_column(columns, "pred_mask", n, reward=name, required=False)
            if preds is not None:
                applies = [a and p is None for a, p in zip(applies, preds)]
        rows = [i for i in range(n) if applies[i] and targets[i] is not None]
        out: list[float | None] = [None] * n
        if not rows:
            return out
        policy = resolve_reverse_policy(self.reverse_policy, columns.get("reverse_policy"), "segment", reward=name)
        images = get_column(columns, self.image_column, n, reward=name)
        memo: dict[int, Any] = {}
        unique = _Dedupe()
        slot_of = {}
        for i in rows:
            if images[i] is None:
                raise RewardInputError("the row has a region but no image", reward=name, row=i, field=self.image_column)
            text = completion_text(completions[i], row=i, reward=name).strip()
            if not text:
                out[i] = self.empty_caption_reward  # nothing to segment (the adapter rejects empty text)
                continue
            slot_of[i] = unique.add((_image_key(images[i], memo), text), (images[i], text))
        rows = [i for i in rows if i in slot_of]
        if not rows:
            return out
        with _no_grad():
            masks = policy.segment([p[0] for p in unique.payloads], [p[1] for p in unique.payloads])
        masks = _check_outputs(masks, len(unique.payloads), "segment", reward=name)
        converted: dict[int, tuple[np.ndarray, int]] = {}
        cache = MaskCache(self.target_column)
        for i in rows:
            slot = slot_of[i]
            if slot not in converted:
                m = as_mask(masks[slot], row=i, field="reverse_policy.segment")
                converted[slot] = (m, int(np.count_nonzero(m)))
            pred, pred_area = converted[slot]
            target, target_area = cache.get(targets[i], i)
            if pred.shape != target.shape:
                raise RewardInputError(
                    f"the reverse model returned a {pred.shape[0]} x {pred.shape[1]} mask for a "
                    f"{target.shape[0]} x {target.shape[1]} region; segment() must return masks at the image's size",
                    reward=name,
                    row=i,
                    field="reverse_policy",
                )
            inter = _intersection(pred, target)
            union = pred_area + target_area - inter
            out[i] = 1.0 if union == 0 else inter / union
        return out

    def __repr__(self) -> str:
        bound = "bound" if self.reverse_policy is not None else "per call"
        return f"CycleIoU(reverse_policy={bound}, image_column={self.image_column!r}, tasks={self.tasks!r})"


@register_reward("cycle_meteor")
class CycleMeteor:
    """Loop 2 cycle reward: caption each predicted mask with the reverse model (greedy), METEOR against the input caption.

    Applies to rows with both a `pred_mask` (the trainer passes it in loop 2) and a reference
    `caption`, and, when a `task` column exists, `task == "caption_to_mask"`. None elsewhere.

    A predicted mask the reverse model cannot caption scores `uncaptionable_reward` (default 0.0:
    the cycle failed) without being sent to it: an empty mask (e.g. an answer without `[SEG]`),
    and, when the reverse model has a `captionable(images, region_masks) -> list[bool]` method,
    any mask it rejects (e.g. a region below the adapter's minimum token-grid cells).

    Logged: the reverse captions as the completions-table column `cycle_meteor/caption`, and the
    fraction of applicable rows that were uncaptionable as the metric `cycle_meteor/uncaptionable`.

    Args:
        reverse_policy: the reverse model (`caption(images, region_masks)`), or None to take it per call.
        image_column: the column with the images.
        pred_column: the column with the predicted masks.
        reference_column: the column with the reference caption(s).
        tasks: the task names it applies to when a `task` column exists.
        uncaptionable_reward: the reward of a row whose predicted mask cannot be captioned.
        alpha, beta, gamma: METEOR's parameters.
        wordnet_dir: NLTK data directory for WordNet (see `load_wordnet`).

    Returns:
        Calling it returns one METEOR in [0, 1) (or None) per completion.

    Example:
        >>> class Namer:  # a stand-in reverse model: names the column the mask covers
        ...     def caption(self, images, region_masks):
        ...         return ["a dog on the left" if m[0, 0] else "a cat on the right" for m in region_masks]
        >>> reward = CycleMeteor(reverse_policy=Namer())
        >>> left, right = [[1, 0], [1, 0]], [[0, 1], [0, 1]]
        >>> scores = reward(prompts=["p"] * 3, completion_ids=[[]] * 3, completions=["Sure."] * 3,
        ...                 img=[np.zeros((2, 2, 3), np.uint8)] * 3, caption=["a dog on the left"] * 3,
        ...                 pred_mask=[left, right, None])
        >>> [None if s is None else round(s, 4) for s in scores]
        [0.996, 0.5111, None]
    """

    __name__ = "cycle_meteor"

    def __init__(
        self,
        reverse_policy: Any = None,
        image_column: str = "img",
        pred_column: str = "pred_mask",
        reference_column: str = "caption",
        tasks: Sequence[str] | None = (TASK_CAPTION_TO_MASK,),
        uncaptionable_reward: float = 0.0,
        alpha: float = 0.9,
        beta: float = 3.0,
        gamma: float = 0.5,
        wordnet_dir: str | None = None,
    ):
        self.reverse_policy = reverse_policy
        self.image_column = image_column
        self.pred_column = pred_column
        self.reference_column = reference_column
        self.tasks = tuple(tasks) if tasks is not None else None
        self.uncaptionable_reward = float(uncaptionable_reward)
        self.scorer = MeteorScorer(alpha=alpha, beta=beta, gamma=gamma, wordnet_dir=wordnet_dir)

    def __call__(self, prompts=None, completions=None, completion_ids=None, **columns) -> list[float | None]:
        name = self.__name__
        n = batch_length(completions, reward=name, columns=columns, column=self.pred_column)
        preds = get_column(columns, self.pred_column, n, reward=name, required=False) or [None] * n
        refs_column = get_column(columns, self.reference_column, n, reward=name)
        applies = task_mask(columns, n, self.tasks, reward=name)
        rows, refs = [], {}
        for i in range(n):
            if not applies[i] or preds[i] is None:
                continue
            r = reference_texts(refs_column[i], row=i, field=self.reference_column, reward=name)
            if r is not None:
                rows.append(i)
                refs[i] = r
        out: list[float | None] = [None] * n
        if not rows:
            return out
        policy = resolve_reverse_policy(self.reverse_policy, columns.get("reverse_policy"), "caption", reward=name)
        images = get_column(columns, self.image_column, n, reward=name)
        memo: dict[int, Any] = {}
        unique = _Dedupe()
        slot_of = {}
        uncaptionable = set()
        for i in rows:
            if images[i] is None:
                raise RewardInputError("the row has a predicted mask but no image", reward=name, row=i, field=self.image_column)
            mask = as_mask(preds[i], row=i, field=self.pred_column)
            if not mask.any():
                uncaptionable.add(i)  # nothing to describe: the reverse model would reject it
                continue
            slot_of[i] = unique.add((_image_key(images[i], memo), _mask_key(mask)), (images[i], mask))
        unique, rejected = _keep_captionable(policy, unique, slot_of, reward=name)
        uncaptionable |= rejected
        captions: list = []
        if unique.payloads:
            with _no_grad():
                captions = policy.caption([p[0] for p in unique.payloads], [p[1] for p in unique.payloads])
            captions = _check_outputs(captions, len(unique.payloads), "caption", reward=name)
        for i in uncaptionable:
            out[i] = self.uncaptionable_reward
        log_metric = columns.get("log_metric")
        if callable(log_metric):
            log_metric(f"{name}/uncaptionable", len(uncaptionable) / len(rows))
        rows = [i for i in rows if i not in uncaptionable]
        for i in rows:
            if not isinstance(captions[slot_of[i]], str):
                raise RewardInputError(
                    f"reverse_policy.caption returned a {type(captions[slot_of[i]]).__name__}, expected str",
                    reward=name,
                    row=i,
                    field="reverse_policy",
                )
        scores = self.scorer.score_batch(
            [(captions[slot_of[i]], refs[i]) for i in rows], reward=name, field=self.reference_column, rows=rows
        )
        for i, s in zip(rows, scores):
            out[i] = s
        log_extra = columns.get("log_extra")
        if callable(log_extra):
            reverse = [None] * n
            for i in rows:
                reverse[i] = captions[slot_of[i]]
            log_extra(f"{name}/caption", reverse)
        return out

    def __repr__(self) -> str:
        bound = "bound" if self.reverse_policy is not None else "per call"
        return f"CycleMeteor(reverse_policy={bound}, image_column={self.image_column!r}, tasks={self.tasks!r})"
