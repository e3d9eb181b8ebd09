"""Compare two models region by region: which captions one fixes and the other breaks (exact McNemar test).

Both files are `python -m sa2va_trl.evaluate --predictions FILE` outputs on the same data. On the shapes world it
reports caption exact match and each attribute as (fixed, broken, p) against the baseline, and for IoU how many
regions went up and down (sign test) and the mean change on multi-shape images. When both files hold the
`caption_likelihood` task's log-probs, it also reports the mean change in the probability of the reference caption
(and of each attribute's words). Regions of one image are not independent (they share its errors), so exact match,
attributes and probabilities are also tested with images as the unit: each image's mean change is one observation
(z = mean / standard error, normal two-sided p).

    python benchmarks/paired_predictions.py warm.pred.jsonl run_seed0.pred.jsonl run_seed1.pred.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict

from sa2va_trl.data.synthetic import parse_caption

ATTRIBUTES = ("shape", "colour", "size", "position")


def exact_binomial_p(fixed: int, broken: int) -> float:
    """Two-sided exact McNemar / sign-test p-value of `fixed` against `broken` discordant pairs."""
    n, k = fixed + broken, min(fixed, broken)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def load_predictions(path: str) -> dict[tuple, dict]:
    """`{(source_id, region_index): prediction line}`."""
    with open(path) as f:
        return {(d["source_id"], d["region_index"]): d for d in map(json.loads, f) if d}


def _attributes(text: str | None) -> dict | None:
    parsed = parse_caption(text or "")
    return None if parsed is None else asdict(parsed)


def _paired(base: list[bool], new: list[bool], images: list[str]) -> dict:
    fixed = sum(1 for b, m in zip(base, new) if m and not b)
    broken = sum(1 for b, m in zip(base, new) if b and not m)
    n = max(1, len(new))
    clustered = _clustered_change([(image, float(b), float(m)) for image, b, m in zip(images, base, new)])
    return {"rate": sum(new) / n, "baseline_rate": sum(base) / n, "fixed": fixed, "broken": broken,
            "p": exact_binomial_p(fixed, broken), "image_z": clustered["z"], "image_p": clustered["p"]}


def compare(baseline: dict[tuple, dict], model: dict[tuple, dict]) -> dict:
    """Paired caption and IoU comparison over the regions both files scored."""
    out: dict = {}
    keys = sorted(k for k in set(baseline) & set(model) if baseline[k].get("pred_caption") is not None
                  and model[k].get("pred_caption") is not None)
    if keys:
        refs = [_attributes(baseline[k]["caption"]) for k in keys]
        base = [_attributes(baseline[k]["pred_caption"]) for k in keys]
        new = [_attributes(model[k]["pred_caption"]) for k in keys]
        images = [k[0] for k in keys]
        out["exact_match"] = _paired([b == r for b, r in zip(base, refs)], [m == r for m, r in zip(new, refs)], images)
        if all(r is not None for r in refs):  # the shapes world: per attribute
            for name in ATTRIBUTES:
                out[name] = _paired([(b or {}).get(name) == r[name] for b, r in zip(base, refs)],
                                    [(m or {}).get(name) == r[name] for m, r in zip(new, refs)], images)
    scored = sorted(k for k in set(baseline) & set(model)
                    if baseline[k].get("iou") is not None and model[k].get("iou") is not None)
    if scored:
        diffs = [model[k]["iou"] - baseline[k]["iou"] for k in scored]
        up, down = sum(d > 1e-6 for d in diffs), sum(d < -1e-6 for d in diffs)
        multi = [d for k, d in zip(scored, diffs) if model[k]["num_regions"] > 1]
        out["iou"] = {"mean": sum(model[k]["iou"] for k in scored) / len(scored),
                      "baseline_mean": sum(baseline[k]["iou"] for k in scored) / len(scored),
                      "up": up, "down": down, "p": exact_binomial_p(up, down),
                      "multi_shape_mean_change": sum(multi) / len(multi) if multi else 0.0}
    likely = sorted(k for k in set(baseline) & set(model)
                    if "caption_logprob" in baseline[k] and "caption_logprob" in model[k])
    if likely:
        out["caption_prob"] = _paired_probability(
            [(k[0], baseline[k]["caption_logprob"], model[k]["caption_logprob"]) for k in likely])
        names = [n for n in ATTRIBUTES if all(n in (baseline[k].get("attribute_logprobs") or {})
                                              and n in (model[k].get("attribute_logprobs") or {}) for k in likely)]
        for name in names:
            out[f"p_{name}"] = _paired_probability(
                [(k[0], baseline[k]["attribute_logprobs"][name], model[k]["attribute_logprobs"][name]) for k in likely])
    return out


def _paired_probability(rows: list[tuple[str, float, float]]) -> dict:
    """Mean probability before / after and an image-clustered paired z-test of the change.

    Args:
        rows: (image id, baseline log-prob, model log-prob) per region.
    """
    return _clustered_change([(image, math.exp(before), math.exp(after)) for image, before, after in rows])


def _clustered_change(rows: list[tuple[str, float, float]]) -> dict:
    """Mean value before / after and a paired z-test of the change with images as the unit: regions of one image
    share its errors, so each image's mean change is one observation (z = mean / standard error, normal p).

    Args:
        rows: (image id, baseline value, model value) per region.
    """
    by_image: dict[str, list[float]] = {}
    for image, before, after in rows:
        by_image.setdefault(image, []).append(after - before)
    means = [sum(d) / len(d) for d in by_image.values()]
    n = len(means)
    mean = sum(means) / n
    var = sum((m - mean) ** 2 for m in means) / (n - 1) if n > 1 else 0.0
    z = mean / math.sqrt(var / n) if var > 0 else (0.0 if mean == 0 else math.copysign(math.inf, mean))
    return {"mean": sum(r[2] for r in rows) / len(rows), "baseline_mean": sum(r[1] for r in rows) / len(rows),
            "images": n, "z": z, "p": math.erfc(abs(z) / math.sqrt(2))}


def format_comparison(name: str, result: dict) -> str:
    parts = [name]
    for key in ("exact_match", *ATTRIBUTES):
        if key in result:
            r = result[key]
            parts.append(f"{key} {r['rate']:.3f} vs {r['baseline_rate']:.3f} (+{r['fixed']}/-{r['broken']} "
                         f"p={r['p']:.3g}; over images z={r['image_z']:+.1f} p={r['image_p']:.2g})")
    if "iou" in result:
        r = result["iou"]
        parts.append(f"IoU {r['mean']:.4f} vs {r['baseline_mean']:.4f} (up {r['up']} down {r['down']} p={r['p']:.3g}; "
                     f"multi-shape {r['multi_shape_mean_change']:+.4f})")
    for key in ("caption_prob", *(f"p_{a}" for a in ATTRIBUTES)):
        if key in result:
            r = result[key]
            change = r["mean"] - r["baseline_mean"]
            parts.append(f"{key} {r['mean']:.4f} vs {r['baseline_mean']:.4f} "
                         f"({change:+.4f}, z={r['z']:+.1f} p={r['p']:.2g}, {r['images']} images)")
    return " | ".join(parts)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("baseline", help="predictions of the reference model (e.g. the warm start)")
    parser.add_argument("models", nargs="+", help="predictions of the models to compare with it")
    args = parser.parse_args(argv)
    baseline = load_predictions(args.baseline)
    results = {}
    for path in args.models:
        results[path] = compare(baseline, load_predictions(path))
        print(format_comparison(path, results[path]))
    return results


if __name__ == "__main__":
    main()
