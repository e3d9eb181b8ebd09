"""Evaluation metrics: referring segmentation and region captioning, as pure functions.

Shared by ``python -m sa2va_trl.evaluate`` and the trainer's evaluation. Inputs are plain
Python / numpy values (masks in any form ``sa2va_trl.rewards.masks.as_mask`` reads), outputs are
JSON-ready dicts of floats and ints.

Segmentation (:func:`segmentation_metrics`)
    per-sample IoU = |P & G| / |P | G| (1.0 when both are empty); ``mean_iou`` = mean over samples;
    ``cumulative_iou`` = sum |P & G| / sum |P | G| over samples (large regions weigh more);
    ``precision@0.5`` = fraction of samples with IoU strictly above 0.5; and all three by the number
    of regions in the sample's image, because one-region images are easy (segmenting "the only
    shape" needs no understanding of the text) and inflate the mean.
Captioning (:func:`caption_metrics`)
    METEOR of each prediction against its reference(s) (NLTK's, via ``sa2va_trl.rewards.meteor``).
Synthetic shapes world (:func:`attribute_metrics`)
    parsed with the world's grammar parser: exact match (all four attributes right) and accuracy per
    attribute (shape, colour, size, position). METEOR saturates on templated captions; these do not.
Caption likelihood (:func:`caption_likelihood_metrics`)
    the teacher-forced probability of the reference caption: NLL per token, the mean probability of
    the whole caption and, on the shapes world, of each attribute's words. Moves before greedy does.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Callable, Sequence

import numpy as np

IOU_THRESHOLD = 0.5
ATTRIBUTES = ("shape", "colour", "size", "position")


def _as_mask(value: Any, row: int, field: str) -> np.ndarray:
    from .rewards.masks import as_mask  # the project's one mask converter

    return as_mask(value, row=row, field=field)


def mask_iou(pred: np.ndarray, target: np.ndarray) -> float:
    """Intersection over union of two boolean masks of the same shape (1.0 when both are empty).

    Args:
        pred: H x W bool array.
        target: H x W bool array.

    Returns:
        IoU in [0, 1].

    Example:
        >>> import numpy as np
        >>> mask_iou(np.array([[1, 1, 0]], bool), np.array([[0, 1, 1]], bool))
        0.3333333333333333
    """
    inter, union = _inter_union(np.asarray(pred, bool), np.asarray(target, bool))
    return 1.0 if union == 0 else inter / union


def _inter_union(pred: np.ndarray, target: np.ndarray) -> tuple[int, int]:
    return int(np.logical_and(pred, target).sum()), int(np.logical_or(pred, target).sum())


def _summary(inters: Sequence[int], unions: Sequence[int]) -> dict:
    ious = [1.0 if u == 0 else i / u for i, u in zip(inters, unions)]
    total_union = sum(unions)
    return {
        "count": len(ious),
        "mean_iou": float(np.mean(ious)) if ious else float("nan"),
        "cumulative_iou": (sum(inters) / total_union) if total_union else float("nan"),
        f"precision@{IOU_THRESHOLD}": float(np.mean([v > IOU_THRESHOLD for v in ious])) if ious else float("nan"),
    }


def segmentation_metrics(pred_masks: Sequence[Any], gt_masks: Sequence[Any],
                         n_regions: Sequence[int] | None = None) -> dict:
    """Referring-segmentation scores over a set of samples.

    Args:
        pred_masks: one predicted mask per sample (H x W; None = no mask predicted, scored as empty).
        gt_masks: the ground-truth masks, same sizes.
        n_regions: number of annotated regions in each sample's image (for the breakdown).

    Returns:
        ``{"count", "mean_iou", "cumulative_iou", "precision@0.5", "empty_predictions",
        "by_num_regions": {"1": {"count", "mean_iou", "cumulative_iou", "precision@0.5"}, ...},
        "ious": [per-sample IoU]}``.

    Raises:
        ValueError: lengths differ, or a prediction's shape differs from its ground truth (names the index).

    Example:
        >>> import numpy as np
        >>> gt = [np.array([[1, 1]], bool), np.array([[1, 0]], bool)]
        >>> pred = [np.array([[1, 0]], bool), None]
        >>> m = segmentation_metrics(pred, gt, n_regions=[1, 2])
        >>> m["mean_iou"], m["cumulative_iou"], m["precision@0.5"], m["empty_predictions"]
        (0.25, 0.3333333333333333, 0.0, 1)
    """
    if len(pred_masks) != len(gt_masks):
        raise ValueError(f"{len(pred_masks)} predictions for {len(gt_masks)} ground-truth masks")
    if n_regions is not None and len(n_regions) != len(gt_masks):
        raise ValueError(f"n_regions has {len(n_regions)} entries for {len(gt_masks)} samples")
    inters, unions, empty = [], [], 0
    for index, (pred, gt) in enumerate(zip(pred_masks, gt_masks)):
        target = _as_mask(gt, index, "gt_masks")
        if pred is None:
            prediction = np.zeros_like(target)
        else:
            prediction = _as_mask(pred, index, "pred_masks")
        if prediction.shape != target.shape:
            raise ValueError(f"row {index}, field 'pred_masks': shape {prediction.shape} differs from the "
                             f"ground truth's {target.shape}")
        empty += int(not prediction.any())
        inter, union = _inter_union(prediction, target)
        inters.append(inter)
        unions.append(union)
    result = _summary(inters, unions)
    result["empty_predictions"] = empty
    groups: dict[int, list[int]] = defaultdict(list)
    for index, n in enumerate(n_regions if n_regions is not None else []):
        groups[int(n)].append(index)
    result["by_num_regions"] = {str(n): _summary([inters[i] for i in idx], [unions[i] for i in idx])
                                for n, idx in sorted(groups.items())}
    result["ious"] = [1.0 if u == 0 else i / u for i, u in zip(inters, unions)]
    return result


def _references_list(reference: Any, index: int) -> list[str]:
    refs = [reference] if isinstance(reference, str) else list(reference or [])
    if not refs or not all(isinstance(r, str) for r in refs):
        raise ValueError(f"row {index}, field 'references': expected a caption or a list of captions, "
                         f"got {reference!r:.80}")
    return refs


def default_meteor() -> Callable[[str, list[str]], float]:
    """The project's METEOR, ``fn(hypothesis, references) -> float`` (``sa2va_trl.rewards.meteor``).

    Raises:
        ImportError: the rewards' METEOR module is not available.
    """
    import importlib

    # import_module, not `from .rewards import meteor`: the package may re-export the function under that name.
    fn = getattr(importlib.import_module("sa2va_trl.rewards.meteor"), "meteor", None)
    if not callable(fn):
        raise ImportError("sa2va_trl.rewards.meteor has no meteor(hypothesis, references) function")
    return fn


def caption_metrics(predictions: Sequence[str], references: Sequence[str | Sequence[str]],
                    meteor: Callable[[str, list[str]], float] | None = None) -> dict:
    """Region-captioning scores: METEOR against the reference caption(s).

    Args:
        predictions: one predicted caption per sample.
        references: per sample, the reference caption or a list of them.
        meteor: ``fn(hypothesis, references) -> float``; default :func:`default_meteor`.

    Returns:
        ``{"count", "meteor", "empty_predictions", "meteors": [per sample]}``.

    Example:
        >>> overlap = lambda hyp, refs: float(hyp in refs)
        >>> caption_metrics(["a cat", ""], ["a cat", ["a dog", "dog"]], meteor=overlap)["meteor"]
        0.5
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    meteor = meteor or default_meteor()
    scores = []
    empty = 0
    for index, (prediction, reference) in enumerate(zip(predictions, references)):
        refs = _references_list(reference, index)
        text = (prediction or "").strip()
        empty += int(not text)
        scores.append(float(meteor(text, refs)) if text else 0.0)
    return {"count": len(scores), "meteor": float(np.mean(scores)) if scores else float("nan"),
            "empty_predictions": empty, "meteors": scores}


def attribute_metrics(predictions: Sequence[str], references: Sequence[str],
                      parse: Callable[[str], Any] | None = None) -> dict:
    """Shapes-world captioning: exact match and per-attribute accuracy of parsed captions.

    Args:
        predictions: predicted captions.
        references: reference captions (each must parse to complete attributes).
        parse: caption -> object with ``shape``, ``colour``, ``size``, ``position`` (None = not
            read); default ``sa2va_trl.data.synthetic.parse_caption``.

    Returns:
        ``{"count", "exact_match", "accuracy": {attribute: fraction}, "unparsed_predictions"}``;
        a prediction attribute that is missing or ambiguous counts as wrong.

    Raises:
        ValueError: a reference does not parse completely (names the row).

    Example:
        >>> m = attribute_metrics(["a small red circle in the center", "big blue square"],
        ...                       ["the small red circle at the middle", "a large blue square in the top left"])
        >>> m["exact_match"], m["accuracy"]["position"], m["accuracy"]["size"]
        (0.5, 0.5, 1.0)
    """
    if parse is None:
        from .data.synthetic import parse_caption as parse
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    correct = {name: 0 for name in ATTRIBUTES}
    exact = unparsed = 0
    for index, (prediction, reference) in enumerate(zip(predictions, references)):
        truth = parse(reference)
        if any(getattr(truth, name) is None for name in ATTRIBUTES):
            raise ValueError(f"row {index}, field 'references': {reference!r} is not a shapes-world caption")
        guess = parse(prediction or "")
        hits = [getattr(guess, name) == getattr(truth, name) for name in ATTRIBUTES]
        for name, hit in zip(ATTRIBUTES, hits):
            correct[name] += int(hit)
        exact += int(all(hits))
        unparsed += int(any(getattr(guess, name) is None for name in ATTRIBUTES))
    n = len(references)
    return {"count": n, "exact_match": exact / n if n else float("nan"),
            "accuracy": {name: correct[name] / n if n else float("nan") for name in ATTRIBUTES},
            "unparsed_predictions": unparsed}


def caption_likelihood_metrics(total_logprobs: Sequence[float], token_counts: Sequence[int],
                               attribute_logprobs: Sequence[dict] | None = None) -> dict:
    """How much probability a policy gives the reference captions (teacher-forced, temperature 1).

    Greedy metrics change only when a word's probability crosses its rival's; these move with every
    update, so they show a policy drifting towards (or away from) the references before exact match does.

    Args:
        total_logprobs: per row, log p(reference caption + eos).
        token_counts: per row, the tokens scored (eos included).
        attribute_logprobs: per row, ``{attribute: log p(its words | the words before)}`` (shapes world).

    Returns:
        ``{"count", "nll_per_token", "caption_prob", "attribute_prob"}``: the corpus NLL per token, the mean
        probability of the whole caption (the chance that one sample at T = 1 is exactly the reference)
        and, per attribute, the mean probability of its words (None without attributes).

    Example:
        >>> m = caption_likelihood_metrics([math.log(0.5), math.log(0.25)], [2, 2],
        ...                                [{"shape": math.log(0.5)}, {"shape": math.log(1.0)}])
        >>> round(m["caption_prob"], 3), round(m["attribute_prob"]["shape"], 3), round(m["nll_per_token"], 3)
        (0.375, 0.75, 0.52)
    """
    if len(total_logprobs) != len(token_counts):
        raise ValueError(f"{len(total_logprobs)} log-probs for {len(token_counts)} token counts")
    for index, value in enumerate(total_logprobs):
        if not math.isfinite(value):
            raise ValueError(f"row {index}, field 'caption_logprob': {value} is not finite")
    n, tokens = len(total_logprobs), sum(token_counts)
    result = {"count": n,
              "nll_per_token": -float(sum(total_logprobs)) / tokens if tokens else float("nan"),
              "caption_prob": float(np.mean(np.exp(total_logprobs))) if n else float("nan"),
              "attribute_prob": None}
    if attribute_logprobs is not None:
        names = sorted({name for row in attribute_logprobs for name in row}, key=_attribute_order)
        result["attribute_prob"] = {name: float(np.mean([math.exp(row[name]) for row in attribute_logprobs]))
                                    for name in names}
    return result


def _attribute_order(name: str) -> tuple[int, str]:
    return (ATTRIBUTES.index(name) if name in ATTRIBUTES else len(ATTRIBUTES), name)


def is_shapes_world(references: Sequence[str], parse: Callable[[str], Any] | None = None) -> bool:
    """True when every reference parses to complete shapes-world attributes (and there is at least one)."""
    if parse is None:
        from .data.synthetic import parse_caption as parse
    if not references:
        return False
    for reference in references:
        attrs = parse(reference)
        if any(getattr(attrs, name) is None for name in ATTRIBUTES):
            return False
    return True


def format_table(results: dict) -> str:
    """A plain-text table of an evaluation result dict (the ``segmentation``, ``captioning``,
    ``attributes`` and ``caption_likelihood`` sections that are present).

    Args:
        results: as written by ``sa2va_trl.evaluate``.

    Returns:
        The table, one metric per line.
    """
    lines = [f"{'metric':<40} {'value':>10} {'n':>7}", "-" * 59]

    def add(name: str, value: Any, count: Any = "") -> None:
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"{name:<40} {shown:>10} {count!s:>7}")

    seg = results.get("segmentation")
    if seg:
        for key in ("mean_iou", "cumulative_iou", f"precision@{IOU_THRESHOLD}"):
            add(f"segmentation/{key}", seg[key], seg["count"])
        add("segmentation/empty_predictions", seg["empty_predictions"], seg["count"])
        for n, group in seg.get("by_num_regions", {}).items():
            add(f"segmentation/mean_iou [{n} region(s)]", group["mean_iou"], group["count"])
    cap = results.get("captioning")
    if cap:
        if cap.get("meteor") is not None:
            add("captioning/meteor", cap["meteor"], cap["count"])
        add("captioning/empty_predictions", cap["empty_predictions"], cap["count"])
    attrs = results.get("attributes")
    if attrs:
        add("captioning/exact_match", attrs["exact_match"], attrs["count"])
        for name, value in attrs["accuracy"].items():
            add(f"captioning/accuracy/{name}", value, attrs["count"])
    likelihood = results.get("caption_likelihood")
    if likelihood:
        add("caption_likelihood/nll_per_token", likelihood["nll_per_token"], likelihood["count"])
        add("caption_likelihood/caption_prob", likelihood["caption_prob"], likelihood["count"])
        for name, value in (likelihood.get("attribute_prob") or {}).items():
            add(f"caption_likelihood/p_{name}", value, likelihood["count"])
    return "\n".join(lines)
