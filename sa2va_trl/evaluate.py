"""Score a Sa2VA checkpoint on a split: referring segmentation and region captioning.

    python -m sa2va_trl.evaluate --model outputs/run1 --data data/shapes --split test \\
        --max-samples 512 --batch-size 16 --output results.json

``--data`` is anything ``sa2va_trl.data.load_rows`` reads (a shapes-world / Grasp-Any-Region
directory, a Sa2VA JSON, an annotations.json, a Hub id with ``--format hf``) or a recipe YAML, whose
``dataset_name``, ``dataset_format``, ``dataset_column_map``, ``skip_bad_rows`` and
``dataset_test_split`` (the default ``--split``) are used; ``dataset_format: synthetic`` builds the
shapes world's test split in memory from the recipe's ``seed`` (the trainer evaluates on validation).

For every row (one region of one image) the model, driven only through the policy adapter's greedy
conveniences, (1) segments the reference caption: ``Sa2VAPolicy.segment(images, captions)``, and
(2) captions the region: ``Sa2VAPolicy.caption(images, masks)``. Scores (sa2va_trl/metrics.py):
mean / cumulative IoU, precision@0.5 and IoU by number of regions in the image; METEOR against the
reference; on the shapes world also exact match and accuracy per attribute. ``--tasks ...,caption_likelihood``
adds the teacher-forced probability of each reference caption (``Sa2VAPolicy.caption_logprobs``; per attribute
on the shapes world), which moves before the greedy caption changes. Rows without a caption
are captioned but not scored against text and not segmented. A table is printed; ``--output``
writes the JSON, ``--predictions`` one JSON line per row.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import math
import os
import time
from collections import Counter
from typing import Any, Callable, Sequence

import numpy as np
import yaml
from tqdm.auto import tqdm

from .data.loaders import FORMATS, detect_format, load_rows_with_stats
from .data.schema import CAPTION, IMG, REGION_INDEX, REGION_MASK, SOURCE_ID, decode_region_mask, encode_mask
from .metrics import (
    attribute_metrics, caption_likelihood_metrics, caption_metrics, default_meteor, format_table, is_shapes_world,
    segmentation_metrics,
)

logger = logging.getLogger(__name__)

#: Rows loaded beyond --max-samples so the last image's region count is complete.
_REGION_COUNT_SLACK = 256
TASKS = ("segmentation", "captioning", "caption_likelihood")
DEFAULT_TASKS = ("segmentation", "captioning")


# ----------------------------------------------------------------------------- data

def read_recipe_data(path: str) -> dict:
    """The data settings of a recipe YAML (keys of ``Sa2VAScriptArguments`` / TRL's ScriptArguments).

    Args:
        path: the recipe file.

    Returns:
        ``{"dataset_name", "dataset_format", "dataset_column_map", "skip_bad_rows", "dataset_test_split",
        "seed", "synthetic_images"}`` with defaults for missing keys.
    """
    with open(path, encoding="utf-8") as handle:
        recipe = yaml.safe_load(handle) or {}
    if not isinstance(recipe, dict):
        raise ValueError(f"{path}: a recipe must be a YAML mapping")
    return {
        "dataset_name": recipe.get("dataset_name"),
        "dataset_format": recipe.get("dataset_format", "synthetic"),
        "dataset_column_map": recipe.get("dataset_column_map"),
        "skip_bad_rows": bool(recipe.get("skip_bad_rows", False)),
        "dataset_test_split": recipe.get("dataset_test_split"),
        "seed": int(recipe.get("seed", 42)),
        "synthetic_images": int(recipe.get("synthetic_images", 64)),
    }


def load_eval_rows(data: str, split: str | None = None, max_samples: int | None = None, format: str = "auto",
                   skip_bad_rows: bool = False, column_map: dict | None = None):
    """Load the evaluation rows and each row's number of regions in its image.

    Args:
        data: a data source for ``load_rows`` or a recipe YAML.
        split: the split to score (default: a recipe's ``dataset_test_split``, else "test"; JSON files
            are one split and ignore it).
        max_samples: score the first N rows (None: all).
        format: the data format (``load_rows``), ignored for recipes.
        skip_bad_rows: skip bad rows instead of failing.
        column_map: ``{our column: theirs}`` for ``hf`` sources.

    Returns:
        ``(dataset, n_regions, info)``: the rows, the region count of each row's image (counted over
        everything loaded, which extends past ``max_samples``), and a description for the report.
    """
    limit = None if max_samples is None else max_samples + _REGION_COUNT_SLACK
    info: dict[str, Any] = {"data": data, "split": split or "test"}
    if data.endswith((".yaml", ".yml")) and os.path.isfile(data):
        recipe = read_recipe_data(data)
        info.update(split=split or recipe["dataset_test_split"] or "test", recipe=recipe)
        if recipe["dataset_format"] == "synthetic":
            from .data.synthetic import shapes_dataset

            n_images = max(1, recipe["synthetic_images"] // 4)
            if max_samples is not None:
                n_images = min(n_images, max_samples)
            world_split = info["split"] if info["split"] in ("train", "validation", "test") else "test"
            dataset = shapes_dataset(n_images, seed=recipe["seed"], split=world_split)
            info.update(split=world_split, format="synthetic", skipped={})
            return _finish(dataset, max_samples, info)
        data, format = recipe["dataset_name"], recipe["dataset_format"]
        column_map = recipe["dataset_column_map"] or column_map
        skip_bad_rows = recipe["skip_bad_rows"] or skip_bad_rows
    split = info["split"]
    if format == "auto":
        format = detect_format(data)
    if format in ("sa2va_json", "annotations_json"):
        split = None  # a JSON file is one split: score all of it
        info["split"] = None
    dataset, stats = load_rows_with_stats(data, format=format, split=split, column_map=column_map,
                                          skip_bad_rows=skip_bad_rows, max_rows=limit)
    info.update(format=stats.format, skipped=dict(stats.skipped))
    return _finish(dataset, max_samples, info)


def _finish(dataset, max_samples, info):
    counts = region_counts(dataset[SOURCE_ID])
    if max_samples is not None and len(dataset) > max_samples:
        dataset = dataset.select(range(max_samples))
        counts = counts[:max_samples]
    return dataset, counts, info


def region_counts(source_ids: Sequence[str]) -> list[int]:
    """Each row's number of regions in its image (rows sharing ``source_id`` are one image).

    Args:
        source_ids: the ``source_id`` column.

    Returns:
        One count per row.
    """
    totals = Counter(source_ids)
    return [totals[s] for s in source_ids]


# ----------------------------------------------------------------------------- model

def load_policy(path: str):
    """Load a ``Sa2VAPolicy`` from a checkpoint directory (or ``builtin:tiny``, a random tiny model).

    A directory with ``adapter_config.json`` (a LoRA run) is loaded onto its base model
    (``base_model_name_or_path``) and merged.

    Args:
        path: a native Sa2VA checkpoint directory (model + tokenizer files), a PEFT adapter
            directory, ``builtin:tiny-warm`` (the shipped warm start) or ``builtin:tiny``.

    Returns:
        The policy, in eval mode.
    """
    from .models.adapter import Sa2VAPolicy

    if path == "builtin:tiny":
        from .models.tiny import build_tiny_model

        model, tokenizer = build_tiny_model()
        return Sa2VAPolicy(model, tokenizer)
    if path == "builtin:tiny-warm":
        from .sft import tiny_warm_start_path

        path = str(tiny_warm_start_path())
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--model {path!r}: not a checkpoint directory (a native Sa2VA checkpoint saved by "
                                "this package, a LoRA adapter directory, builtin:tiny-warm or builtin:tiny)")
    adapter_config = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(adapter_config):
        return Sa2VAPolicy.from_pretrained(path)
    # A LoRA run: load the base, apply the adapter and merge (plain weights: faster greedy decoding).
    from peft import PeftModel
    from transformers import AutoTokenizer

    from .models.modeling_sa2va import Sa2VAModel

    with open(adapter_config, encoding="utf-8") as handle:
        base = json.load(handle).get("base_model_name_or_path")
    if not base or not os.path.isdir(base):
        raise FileNotFoundError(f"--model {path!r} is a LoRA adapter whose base model {base!r} is not a local "
                                "directory; save the base next to it or merge the adapter first")
    model = PeftModel.from_pretrained(Sa2VAModel.from_pretrained(base), path).merge_and_unload()
    tokenizer_dir = path if os.path.isfile(os.path.join(path, "tokenizer_config.json")) else base
    return Sa2VAPolicy(model.eval(), AutoTokenizer.from_pretrained(tokenizer_dir))


def _call_rows(fn: Callable, images: list, inputs: list, row_ids: list[int], failures: dict) -> list:
    """One batched adapter call; if it rejects the batch, retry row by row so one bad row costs
    only itself (its output is None and its error is recorded)."""
    try:
        return list(fn(images, inputs))
    except ValueError as batch_error:
        logger.debug("batched call failed (%s); retrying row by row", batch_error)
    outputs = []
    for image, item, row in zip(images, inputs, row_ids):
        try:
            outputs.append(fn([image], [item])[0])
        except ValueError as err:
            failures[row] = str(err)
            outputs.append(None)
    return outputs


# ----------------------------------------------------------------------------- evaluation

def evaluate_policy(policy, dataset, n_regions: Sequence[int] | None = None, batch_size: int = 8,
                    tasks: Sequence[str] = DEFAULT_TASKS, meteor: Callable | None | str = "default",
                    max_new_tokens: int | None = None, progress: bool = True) -> dict:
    """Run the greedy adapter calls over the rows and score them.

    Args:
        policy: an object with ``segment(images, texts)`` and ``caption(images, region_masks)``.
        dataset: schema rows.
        n_regions: regions in each row's image (default: counted from ``source_id``).
        batch_size: rows per adapter call.
        tasks: a subset of ("segmentation", "captioning", "caption_likelihood"); the last scores the
            teacher-forced probability of each reference caption (its canonical form on the shapes
            world, with one probability per attribute) through ``policy.caption_logprobs``.
        meteor: ``fn(hypothesis, references)``; "default" = the project's METEOR (skipped with a warning
            when unavailable); None = no METEOR.
        max_new_tokens: generation budget passed to the adapter calls (None: the adapter's defaults).
        progress: show a progress bar.

    Returns:
        ``{"num_samples", "num_images", "segmentation", "captioning", "attributes", "caption_likelihood",
        "failed_rows", "predictions"}`` (sections of tasks not run, or without captions to score, are None).
    """
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown tasks {sorted(unknown)}; expected some of {TASKS}")
    n = len(dataset)
    counts = list(n_regions) if n_regions is not None else region_counts(dataset[SOURCE_ID])
    references = dataset[CAPTION]
    pred_captions: list[str | None] = [None] * n
    # Masks are kept as RLE (a few bytes each): a large split of full-size masks would not fit in memory.
    pred_masks: list[dict | None] = [None] * n
    gt_masks: list[dict | None] = [None] * n
    failures: dict[int, str] = {}
    likelihood_targets = _likelihood_targets(references) if "caption_likelihood" in tasks else None
    score_fn = _score_captions(policy) if likelihood_targets is not None else None
    likelihoods: dict[int, dict] = {}
    caption_fn, segment_fn = policy.caption, policy.segment
    if max_new_tokens is not None:
        caption_fn = functools.partial(policy.caption, max_new_tokens=max_new_tokens)
        segment_fn = functools.partial(policy.segment, max_new_tokens=max_new_tokens)
    # The calls of one batch share each image's encoder features (one vision-tower pass, not one per task).
    shared_features = getattr(policy, "shared_encoder_features", contextlib.nullcontext)
    bar = tqdm(total=n, desc="evaluating", unit="row", disable=not progress)
    for start in range(0, n, batch_size):
        with shared_features():
            rows = dataset[start:start + batch_size]
            ids = list(range(start, start + len(rows[SOURCE_ID])))
            images = _batch_images(rows[IMG], rows[SOURCE_ID])
            masks = [decode_region_mask(rle) for rle in rows[REGION_MASK]]
            for i, rle in zip(ids, rows[REGION_MASK]):
                gt_masks[i] = rle
            if "captioning" in tasks:
                for i, text in zip(ids, _call_rows(caption_fn, images, masks, ids, failures)):
                    pred_captions[i] = text
            if "segmentation" in tasks:
                keep = [k for k, caption in enumerate(rows[CAPTION]) if caption]
                if keep:
                    outputs = _call_rows(segment_fn, [images[k] for k in keep], [rows[CAPTION][k] for k in keep],
                                         [ids[k] for k in keep], failures)
                    for k, mask in zip(keep, outputs):
                        pred_masks[ids[k]] = None if mask is None else encode_mask(np.asarray(mask, dtype=bool))
            if likelihood_targets is not None:
                keep = [k for k, i in enumerate(ids) if likelihood_targets[i] is not None]
                if keep:
                    pairs = [(masks[k], likelihood_targets[ids[k]]) for k in keep]
                    scores = _call_rows(score_fn, [images[k] for k in keep], pairs,
                                        [ids[k] for k in keep], failures)
                    for k, score in zip(keep, scores):
                        if score is not None:
                            likelihoods[ids[k]] = _likelihood_record(score, likelihood_targets[ids[k]][1])
        bar.update(len(ids))
    bar.close()

    result: dict[str, Any] = {"num_samples": n, "num_images": len(set(dataset[SOURCE_ID])),
                              "segmentation": None, "captioning": None, "attributes": None,
                              "caption_likelihood": None,
                              "failed_rows": {str(k): v for k, v in sorted(failures.items())}}
    scored = [i for i in range(n) if references[i]]
    if "segmentation" in tasks and scored:
        result["segmentation"] = segmentation_metrics([pred_masks[i] for i in scored], [gt_masks[i] for i in scored],
                                                      [counts[i] for i in scored])
    meteors = None
    if "captioning" in tasks and scored:
        hyps, refs = [pred_captions[i] or "" for i in scored], [references[i] for i in scored]
        meteor_fn = _resolve_meteor(meteor)
        if meteor_fn is not None:
            result["captioning"] = caption_metrics(hyps, refs, meteor=meteor_fn)
            meteors = dict(zip(scored, result["captioning"].pop("meteors")))
        else:
            result["captioning"] = {"count": len(scored), "meteor": None,
                                    "empty_predictions": sum(not h.strip() for h in hyps)}
        if is_shapes_world(refs):
            result["attributes"] = attribute_metrics(hyps, refs)
    if likelihoods:
        rows = [likelihoods[i] for i in sorted(likelihoods)]
        with_attributes = all("attribute_logprobs" in row for row in rows)
        result["caption_likelihood"] = caption_likelihood_metrics(
            [row["caption_logprob"] for row in rows], [row["caption_tokens"] for row in rows],
            [row["attribute_logprobs"] for row in rows] if with_attributes else None)
        canonical = any(target is not None and target[1] is not None for target in likelihood_targets)
        result["caption_likelihood"]["scored"] = "canonical caption" if canonical else "reference caption"
    ious = dict(zip(scored, result["segmentation"].pop("ious"))) if result["segmentation"] else {}
    source_ids, region_indices = dataset[SOURCE_ID], dataset[REGION_INDEX]
    result["predictions"] = [
        {"row": i, SOURCE_ID: source_ids[i], REGION_INDEX: region_indices[i], "num_regions": counts[i],
         "caption": references[i], "pred_caption": pred_captions[i], "iou": ious.get(i),
         "meteor": (meteors or {}).get(i), **likelihoods.get(i, {})}
        for i in range(n)
    ]
    return result


def _likelihood_targets(references: Sequence[str]) -> list:
    """Per row, what the likelihood task scores: the canonical caption with its attribute spans on the
    shapes world (the greedy captions are canonical there), else the reference caption as given."""
    if is_shapes_world([r for r in references if r]):
        from .data.synthetic import parse_caption

        targets: list = []
        for reference in references:
            if not reference:
                targets.append(None)
                continue
            attributes = parse_caption(reference)
            targets.append((attributes.canonical_caption(), attributes.canonical_spans()))
        return targets
    return [(reference, None) if reference else None for reference in references]


def _score_captions(policy) -> Callable:
    """`(images, [(mask, (caption, spans))]) -> CaptionScores`, the shape `_call_rows` expects."""
    if not hasattr(policy, "caption_logprobs"):
        raise ValueError(f"{type(policy).__name__} has no caption_logprobs(images, masks, captions): the "
                         "caption_likelihood task needs the policy's token log-probs")

    def score(images, pairs):
        return policy.caption_logprobs(images, [mask for mask, _ in pairs], [target[0] for _, target in pairs])

    return score


def _likelihood_record(score, spans: dict | None) -> dict:
    """A prediction line's likelihood fields: the caption's log-prob and, given attribute spans, each attribute's."""
    record = {"caption_logprob": score.total, "caption_tokens": len(score.logprobs)}
    if spans is not None and score.spans is not None:
        record["attribute_logprobs"] = {name: score.span_logprob(*span) for name, span in spans.items()}
    return record


def _batch_images(images: list, source_ids: list[str]) -> list:
    """RGB PIL images; rows of the same image share one object so the adapter encodes it once."""
    by_source: dict[str, Any] = {}
    out = []
    for image, source in zip(images, source_ids):
        if source not in by_source:
            by_source[source] = image.convert("RGB") if image.mode != "RGB" else image
        out.append(by_source[source])
    return out


def _resolve_meteor(meteor):
    if meteor != "default":
        return meteor
    try:
        return default_meteor()
    except ImportError as err:
        logger.warning("METEOR unavailable (%s); reporting captioning without it", err)
        return None


def _json_ready(value: Any) -> Any:
    """NaN -> None (strict JSON), numpy scalars -> Python."""
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


# ----------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser."""
    parser = argparse.ArgumentParser(prog="python -m sa2va_trl.evaluate",
                                     description="Score a Sa2VA checkpoint on referring segmentation and "
                                                 "region captioning.")
    parser.add_argument("--model", required=True, help="checkpoint directory, builtin:tiny-warm or builtin:tiny")
    parser.add_argument("--data", required=True, help="data directory / file / Hub id, or a recipe YAML")
    parser.add_argument("--split", default=None,
                        help="split to score (default: the recipe's dataset_test_split, else test)")
    parser.add_argument("--format", default="auto", choices=FORMATS, help="data format (default: auto)")
    parser.add_argument("--column-map", type=json.loads, default=None,
                        help='for --format hf: JSON {our column: theirs}, e.g. \'{"region_mask": "segmentation"}\'')
    parser.add_argument("--max-samples", type=int, default=None, help="score the first N rows (regions)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per model call (default: 8)")
    parser.add_argument("--tasks", default="segmentation,captioning",
                        help="comma-separated subset of segmentation,captioning,caption_likelihood "
                             "(teacher-forced probability of the reference caption; not run by default)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="generation budget per answer (default: the adapter's)")
    parser.add_argument("--skip-bad-rows", action="store_true", help="skip bad rows (counted) instead of failing")
    parser.add_argument("--no-meteor", action="store_true", help="do not compute METEOR")
    parser.add_argument("--output", default=None, help="write the metrics JSON here")
    parser.add_argument("--predictions", default=None, help="write one JSON line per row here")
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the evaluation CLI.

    Args:
        argv: command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        The result dict that is written to ``--output``.
    """
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.batch_size < 1:
        raise SystemExit("--batch-size must be >= 1")
    if args.max_samples is not None and args.max_samples < 1:
        raise SystemExit("--max-samples must be >= 1")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    started = time.perf_counter()
    dataset, counts, info = load_eval_rows(args.data, split=args.split, max_samples=args.max_samples,
                                           format=args.format, skip_bad_rows=args.skip_bad_rows,
                                           column_map=args.column_map)
    if len(dataset) == 0:
        raise SystemExit(f"no rows to evaluate in {args.data!r} (split {info['split']!r})")
    policy = load_policy(args.model)
    result = evaluate_policy(policy, dataset, counts, batch_size=args.batch_size, tasks=tasks,
                             meteor=None if args.no_meteor else "default", max_new_tokens=args.max_new_tokens)
    predictions = result.pop("predictions")
    report = {"model": args.model, **info, "tasks": tasks, **result,
              "seconds": round(time.perf_counter() - started, 2)}
    report = _json_ready(report)
    print(format_table(report))
    if report["failed_rows"]:
        print(f"{len(report['failed_rows'])} row(s) failed in the model call; see failed_rows in the JSON")
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
        logger.info("wrote %s", args.output)
    if args.predictions:
        with open(args.predictions, "w", encoding="utf-8") as handle:
            for record in predictions:
                handle.write(json.dumps(_json_ready(record)) + "\n")
    if len(report["failed_rows"]) == len(dataset):  # a broken model, not bad rows: fail loudly
        first = next(iter(report["failed_rows"].values()))
        raise SystemExit(f"every row failed in the model call; first error: {first}")
    return report


if __name__ == "__main__":
    main()
