"""How much IoU a model could still gain, and what kind of errors it makes.

Two figures behind the README's "loop-2 IoU does not move":

- the ceiling of the mask path itself: SAM2's decoder answers with a low-resolution logit map (32 x 32 for the
  128 px tiny model) that is bilinearly upsampled and thresholded at 0. For every ground-truth mask we fit the
  best such map by gradient descent; the mean IoU of those fits bounds what any decoder weights can reach.
- the per-region IoU of a model's predictions (`python -m sa2va_trl.evaluate ... --predictions FILE`), bucketed:
  IoU below 0.5 is a wrong or missing object, a policy-gradient signal a caption can carry; above 0.8 is a
  boundary error, which a cycle METEOR reward cannot see.

    python benchmarks/mask_iou_headroom.py --data DIR --split test --predictions warm=warm.pred.jsonl
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from paired_predictions import load_predictions
from sa2va_trl.data.loaders import load_rows
from sa2va_trl.data.schema import decode_region_mask
from sa2va_trl.rewards.masks import batch_iou

IOU_BUCKETS = ((0.0, 0.5), (0.5, 0.8), (0.8, 0.9), (0.9, 0.95), (0.95, 1.0001))


def upsampled_mask_ceiling(masks: torch.Tensor, low_res: int, steps: int = 600, sharpness: float = 5.0) -> torch.Tensor:
    """Per-mask IoU of the best `low_res` x `low_res` logit map, bilinearly upsampled to the masks' size.

    masks: (N, H, W) bool. Fits the maps with Adam on a BCE of the (sharpened) upsampled logits; returns (N,) IoU
    of `upsampled > 0` against the masks. A lower bound on the true optimum, tight in practice (it plateaus).
    """
    target = masks.float()
    size = tuple(masks.shape[-2:])
    logits = F.interpolate(target[:, None] * 2 - 1, size=(low_res, low_res), mode="area")[:, 0].mul(10)
    logits.requires_grad_(True)
    optimizer = torch.optim.Adam([logits], lr=0.1)
    for _ in tqdm(range(steps), desc="fitting low-res maps", leave=False):
        up = F.interpolate(logits[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        loss = F.binary_cross_entropy_with_logits(up * sharpness, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        pred = F.interpolate(logits[:, None], size=size, mode="bilinear", align_corners=False)[:, 0] > 0
    return torch.tensor(batch_iou(list(pred.numpy()), list(masks.numpy())))


def iou_buckets(ious: list[float]) -> dict[str, int]:
    """Count of regions per IoU bucket (keys like '0.80-0.90')."""
    out = {}
    for low, high in IOU_BUCKETS:
        out[f"{low:.2f}-{min(high, 1.0):.2f}"] = sum(1 for v in ious if low <= v < high)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="a dataset directory (e.g. from sa2va_trl.data.synthetic)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--max-regions", type=int, default=600)
    parser.add_argument("--low-res", type=int, default=32, help="the decoder's output side (image side / 4 in SAM2)")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--predictions", nargs="*", default=[], metavar="LABEL=FILE",
                        help="evaluate --predictions files to bucket, each under its label")
    parser.add_argument("--output", help="write the figures as JSON here")
    args = parser.parse_args(argv)

    rows = load_rows(args.data, split=args.split)
    rows = rows.select(range(min(args.max_regions, len(rows))))
    masks = torch.from_numpy(np.stack([decode_region_mask(r) for r in rows]).astype(bool))
    ceiling = upsampled_mask_ceiling(masks, args.low_res, steps=args.steps)
    result: dict = {"data": args.data, "split": args.split, "regions": len(rows), "low_res": args.low_res,
                    "ceiling_mean_iou": float(ceiling.mean()), "ceiling_min_iou": float(ceiling.min())}
    print(f"{len(rows)} regions: best {args.low_res}x{args.low_res} map upsampled to {tuple(masks.shape[-2:])}: "
          f"mean IoU {result['ceiling_mean_iou']:.4f}, min {result['ceiling_min_iou']:.4f}")
    for spec in args.predictions:
        label, _, path = spec.rpartition("=")
        label = label or path
        ious = [d["iou"] for d in load_predictions(path).values() if d.get("iou") is not None]
        buckets = iou_buckets(ious)
        result[label] = {"file": path, "regions": len(ious), "mean_iou": float(np.mean(ious)) if ious else None,
                         "min_iou": min(ious) if ious else None, "buckets": buckets}
        print(f"{label}: {len(ious)} regions, mean IoU {result[label]['mean_iou']:.4f}, "
              f"min {result[label]['min_iou']:.4f}, by IoU {buckets}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
