"""How well predicted scores track the true Dice: MSE, MAE, Pearson, Spearman, the Dice distribution.

Example:
    >>> import numpy as np
    >>> m = regression_metrics(np.array([0.1, 0.5, 0.9]), np.array([0.0, 0.5, 1.0]))
    >>> round(m["pearson"], 3), m["spearman"], m["count"]
    (1.0, 1.0, 3)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (as Spearman's rho needs)."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    ranks = np.empty(len(values), dtype=np.float64)
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2.0 + 1.0
        start = end + 1
    return ranks


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation; NaN when either side is constant or there are fewer than 2 values.

    Args:
        x: first sample.
        y: second sample, same length.

    Returns:
        The correlation coefficient.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 2:
        return float("nan")
    xc, yc = x - x.mean(), y - y.mean()
    denominator = np.sqrt((xc**2).sum() * (yc**2).sum())
    return float((xc * yc).sum() / denominator) if denominator > 0 else float("nan")


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (Pearson of the tie-averaged ranks).

    Args:
        x: first sample.
        y: second sample, same length.

    Returns:
        The rank correlation coefficient (NaN when undefined).
    """
    return pearson(_ranks(np.asarray(x, dtype=np.float64)), _ranks(np.asarray(y, dtype=np.float64)))


def regression_metrics(scores: np.ndarray, dice: np.ndarray) -> dict[str, float]:
    """MSE, MAE, Pearson and Spearman of predicted scores against true Dice.

    Args:
        scores: predicted Dice values.
        dice: true Dice values, same length.

    Returns:
        {"mse", "mae", "pearson", "spearman", "count"}.
    """
    scores, dice = np.asarray(scores, dtype=np.float64).reshape(-1), np.asarray(dice, dtype=np.float64).reshape(-1)
    if scores.shape != dice.shape:
        raise ValueError(f"scores ({scores.shape}) and dice ({dice.shape}) differ in length")
    error = scores - dice
    return {
        "mse": float((error**2).mean()) if len(error) else float("nan"),
        "mae": float(np.abs(error).mean()) if len(error) else float("nan"),
        "pearson": pearson(scores, dice),
        "spearman": spearman(scores, dice),
        "count": int(len(dice)),
    }


def dice_distribution(dice: np.ndarray, num_bins: int = 10, quantiles: Sequence[float] = QUANTILES) -> dict:
    """The distribution of true Dice values: equal-width histogram over [0, 1], quantiles, mean.

    Args:
        dice: true Dice values.
        num_bins: histogram bins.
        quantiles: which quantiles to report.

    Returns:
        {"bin_edges", "counts", "quantiles": {"q0.5": ...}, "mean", "std"}.
    """
    dice = np.asarray(dice, dtype=np.float64)
    counts, edges = np.histogram(dice, bins=num_bins, range=(0.0, 1.0))
    return {
        "bin_edges": [round(float(e), 6) for e in edges],
        "counts": [int(c) for c in counts],
        "quantiles": {f"q{q:g}": float(np.quantile(dice, q)) if len(dice) else float("nan") for q in quantiles},
        "mean": float(dice.mean()) if len(dice) else float("nan"),
        "std": float(dice.std()) if len(dice) else float("nan"),
    }


def evaluation_report(
    scores: np.ndarray,
    dice: np.ndarray,
    kinds: Sequence[str] | None = None,
    num_bins: int = 10,
    expected_dice: np.ndarray | None = None,
) -> dict:
    """Everything the held-out evaluation reports.

    Args:
        scores: predicted Dice values.
        dice: true Dice values.
        kinds: optional per-sample kind (perturbation / "policy"), for a per-kind breakdown.
        num_bins: histogram bins of the true-Dice distribution.
        expected_dice: optional per-sample Dice a network that sees only (image, mask) can know
            (the data's `expected_dice` column); its MSE against `dice` is the error no such
            network can avoid, reported as `ambiguity_floor`.

    Returns:
        {"overall": regression_metrics, "by_kind": {kind: regression_metrics}, "dice_distribution": ...}
        and, with `expected_dice`, "ambiguity_floor": {"overall": mse, "by_kind": {kind: mse}}.
    """
    scores, dice = np.asarray(scores, dtype=np.float64), np.asarray(dice, dtype=np.float64)
    report = {"overall": regression_metrics(scores, dice), "by_kind": {}}
    floor = None
    if expected_dice is not None:
        expected_dice = np.asarray(expected_dice, dtype=np.float64).reshape(-1)
        if expected_dice.shape != dice.shape:
            raise ValueError(f"expected_dice ({expected_dice.shape}) and dice ({dice.shape}) differ in length")
        squared = (expected_dice - dice) ** 2
        floor = {"overall": float(squared.mean()) if len(squared) else float("nan"), "by_kind": {}}
    if kinds is not None:
        kinds = np.asarray(list(kinds))
        for kind in sorted(set(kinds.tolist())):
            chosen = kinds == kind
            report["by_kind"][kind] = regression_metrics(scores[chosen], dice[chosen])
            if floor is not None:
                floor["by_kind"][kind] = float(squared[chosen].mean())
    report["dice_distribution"] = dice_distribution(dice, num_bins=num_bins)
    if floor is not None:
        report["ambiguity_floor"] = floor
    return report


def format_report(report: dict) -> str:
    """Render `evaluation_report` output as plain-text tables.

    Args:
        report: the dict `evaluation_report` returns.

    Returns:
        A multi-line string.
    """
    floor = report.get("ambiguity_floor")
    header = f"{'subset':<12} {'count':>6} {'mse':>8} {'mae':>8} {'pearson':>8} {'spearman':>8}"
    lines = [header + (f" {'mse floor':>10}" if floor else "")]
    rows = [("overall", report["overall"])] + list(report.get("by_kind", {}).items())
    for name, m in rows:
        line = f"{name:<12} {m['count']:>6d} {m['mse']:>8.4f} {m['mae']:>8.4f} {m['pearson']:>8.4f} {m['spearman']:>8.4f}"
        if floor:
            value = floor["overall"] if name == "overall" else floor["by_kind"].get(name, float("nan"))
            line += f" {value:>10.4f}"
        lines.append(line)
    if floor:
        lines.append("mse floor: the MSE of the best prediction possible without knowing which region was meant "
                     "(merges: the mean Dice over the regions they cover)")
    dist = report["dice_distribution"]
    lines.append("")
    lines.append("true Dice histogram (held-out)")
    edges, counts = dist["bin_edges"], dist["counts"]
    total = max(sum(counts), 1)
    for lo, hi, count in zip(edges[:-1], edges[1:], counts):
        lines.append(f"  [{lo:.1f}, {hi:.1f}{']' if hi >= 1.0 else ')'} {count:>6d} {'#' * round(40 * count / total)}")
    quantiles = "  ".join(f"{k}={v:.3f}" for k, v in dist["quantiles"].items())
    lines.append(f"  quantiles: {quantiles}   mean={dist['mean']:.3f} std={dist['std']:.3f}")
    return "\n".join(lines)
