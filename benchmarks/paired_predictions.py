"""Compare two models region by region: which captions one fixes and the other breaks (exact McNemar test).

Both files are `python -m sa2va_trl.evaluate --predictions FILE` outputs on the same data. On the shapes world it
reports caption exact match and each attribute as (fixed, broken, p) against the baseline, and for IoU how many
regions went up and down (sign test) and the mean change on multi-shape images.

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


def _paired(base: list[bool], new: list[bool]) -> dict:
    fixed = sum(1 for b, m in zip(base, new) if m and not b)
    broken = sum(1 for b, m in zip(base, new) if b and not m)
    n = max(1, len(new))
    return {"rate": sum(new) / n, "baseline_rate": sum(base) / n, "fixed": fixed, "broken": broken,
            "p": exact_binomial_p(fixed, broken)}


def compare(baseline: dict[tuple, dict], model: dict[tuple, dict]) -> dict:
    """Paired caption and IoU comparison over the regions both files scored."""
    out: dict = {}
    keys = sorted(k for k in set(baseline) & set(model) if baseline[k].get("pred_caption") is not None
                  and model[k].get("pred_caption") is not None)
    if keys:
        refs = [_attributes(baseline[k]["caption"]) for k in keys]
        base = [_attributes(baseline[k]["pred_caption"]) for k in keys]
        new = [_attributes(model[k]["pred_caption"]) for k in keys]
        out["exact_match"] = _paired([b == r for b, r in zip(base, refs)], [m == r for m, r in zip(new, refs)])
        if all(r is not None for r in refs):  # the shapes world: per attribute
            for name in ATTRIBUTES:
                out[name] = _paired([(b or {}).get(name) == r[name] for b, r in zip(base, refs)],
                                    [(m or {}).get(name) == r[name] for m, r in zip(new, refs)])
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
    return out


def format_comparison(name: str, result: dict) -> str:
    parts = [name]
    for key in ("exact_match", *ATTRIBUTES):
        if key in result:
            r = result[key]
            parts.append(f"{key} {r['rate']:.3f} vs {r['baseline_rate']:.3f} (+{r['fixed']}/-{r['broken']} p={r['p']:.3g})")
    if "iou" in result:
        r = result["iou"]
        parts.append(f"IoU {r['mean']:.4f} vs {r['baseline_mean']:.4f} (up {r['up']} down {r['down']} p={r['p']:.3g}; "
                     f"multi-shape {r['multi_shape_mean_change']:+.4f})")
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
