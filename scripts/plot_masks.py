"""Before / after mask overlays: the regions whose IoU a run changed most, segmented by both models.

    python scripts/plot_masks.py --data DIR --before START --after RUN \
        --before-predictions START.pred.jsonl --after-predictions RUN.pred.jsonl --out docs/images/grounding.png

The predictions files (`python -m sa2va_trl.evaluate ... --predictions FILE`, both on DIR's split) pick the regions:
the `--n` largest IoU gains among multi-shape images. Each row shows the image with the ground-truth region
outlined, then the start's and the run's masks for the reference caption (needs matplotlib, in the `dev` extra).
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def load_ious(path: str) -> dict[int, dict]:
    """`{row: prediction line}` of an evaluate predictions file."""
    with open(path) as f:
        return {d["row"]: d for d in map(json.loads, f) if d}


def pick_regions(before: dict[int, dict], after: dict[int, dict], n: int, min_regions: int = 2) -> list[int]:
    """The rows with the largest IoU gain from `before` to `after`, on images with at least `min_regions` regions."""
    gains = [(after[r]["iou"] - before[r]["iou"], r) for r in before
             if r in after and before[r].get("iou") is not None and after[r].get("iou") is not None
             and before[r].get("num_regions", 1) >= min_regions]
    return [r for _, r in sorted(gains, key=lambda g: (-g[0], g[1]))[:n]]


def _overlay(image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    out = image.astype(np.float32)
    out[mask] = 0.45 * out[mask] + 0.55 * np.asarray(colour, np.float32)
    return out.astype(np.uint8)


def main(argv: list[str] | None = None) -> list[int]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--before", required=True, help="the start model (a directory or builtin name)")
    parser.add_argument("--after", required=True, help="the trained model")
    parser.add_argument("--before-predictions", required=True)
    parser.add_argument("--after-predictions", required=True)
    parser.add_argument("--before-label", default="start")
    parser.add_argument("--after-label", default="after GRPO")
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--out", required=True, help="the PNG to write")
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sa2va_trl.data.loaders import load_rows
    from sa2va_trl.data.schema import CAPTION, IMG, decode_region_mask
    from sa2va_trl.evaluate import load_policy
    from sa2va_trl.rewards.masks import iou as mask_iou

    rows = load_rows(args.data, split=args.split)
    picked = pick_regions(load_ious(args.before_predictions), load_ious(args.after_predictions), args.n)
    if not picked:
        raise SystemExit("no multi-shape region is scored in both predictions files")
    models = [(args.before_label, load_policy(args.before)), (args.after_label, load_policy(args.after))]
    fig, axes = plt.subplots(len(picked), 3, figsize=(7.5, 2.6 * len(picked)), squeeze=False)
    for line, r in zip(axes, picked):
        row = rows[r]
        rgb = row[IMG].convert("RGB")
        image = np.asarray(rgb)
        truth = decode_region_mask(row)
        line[0].imshow(image)
        line[0].contour(truth, levels=[0.5], colors="white", linewidths=1.2)
        line[0].set_title(f'"{row[CAPTION]}"', fontsize=7)
        for ax, (label, policy) in zip(line[1:], models):
            mask = policy.segment([rgb], [row[CAPTION]])[0]
            ax.imshow(_overlay(image, mask, (255, 0, 255)))
            ax.contour(truth, levels=[0.5], colors="white", linewidths=0.8)
            ax.set_title(f"{label}: IoU {mask_iou(mask, truth):.2f}", fontsize=8)
        for ax in line:
            ax.axis("off")
    fig.suptitle("magenta: predicted mask; white: the referred region", fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}: rows {picked}")
    return picked


if __name__ == "__main__":
    main()
