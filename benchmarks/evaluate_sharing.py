"""Evaluation with the three tasks of a batch sharing each image's encoder pass, against one pass per call.

    python benchmarks/evaluate_sharing.py [--images 128] [--batch-size 8] [--repeats 3] [--threads 1]
                                          [--model builtin:tiny-warm] [--output benchmarks/results/evaluate_sharing.json]

`python -m sa2va_trl.evaluate --tasks segmentation,captioning,caption_likelihood` captions, segments and scores every
row; each call runs the vision tower on its images. A loaded checkpoint has trainable parameters, so the
frozen-encoder cache does not apply, and `Sa2VAPolicy.shared_encoder_features` (what `evaluate_policy` now uses per
batch) shares the pass between the calls of a batch. This times `evaluate_policy` on the same synthetic test rows
both ways, alternating, in one run (median of the repeats), and counts vision-tower images (tiles).

The tiny model's vision tower is a small part of its evaluation (greedy decoding dominates); with a 300M-parameter
InternViT and up to 12 tiles per image the share is larger. The figures are for this machine and this model only.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import write_results  # noqa: E402

from sa2va_trl.data.synthetic import shapes_dataset  # noqa: E402
from sa2va_trl.evaluate import evaluate_policy, load_policy  # noqa: E402

TASKS = ("segmentation", "captioning", "caption_likelihood")


def _run(policy, rows, batch_size: int, shared: bool) -> tuple[float, int, dict]:
    policy.reset_counters()
    policy.clear_feature_cache()
    if not shared:
        policy.shared_encoder_features = contextlib.nullcontext  # the per-call encoding of before
    try:
        start = time.perf_counter()
        result = evaluate_policy(policy, rows, batch_size=batch_size, tasks=TASKS, progress=False)
        seconds = time.perf_counter() - start
    finally:
        policy.__dict__.pop("shared_encoder_features", None)
    return seconds, policy.counters["vision_images"], result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=128, help="synthetic test images (1-3 regions each)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", default="builtin:tiny-warm")
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    policy = load_policy(args.model)
    rows = shapes_dataset(args.images, seed=0, split="test")
    times = {True: [], False: []}
    passes, predictions = {}, {}
    for _ in range(args.repeats):
        for shared in (True, False):  # alternating, so drift of the machine hits both
            seconds, images, result = _run(policy, rows, args.batch_size, shared)
            times[shared].append(seconds)
            passes[shared] = images
            predictions[shared] = result["predictions"]
    figures = {
        "rows": len(rows), "batch_size": args.batch_size, "threads": args.threads, "model": args.model,
        "shared_seconds": statistics.median(times[True]), "per_call_seconds": statistics.median(times[False]),
        "shared_vision_images": passes[True], "per_call_vision_images": passes[False],
        "identical_predictions": predictions[True] == predictions[False],
    }
    figures["speedup"] = figures["per_call_seconds"] / figures["shared_seconds"]
    print(f"{len(rows)} rows, batch {args.batch_size}, tasks {', '.join(TASKS)}")
    print(f"  shared encoder pass: {figures['shared_seconds']:.2f} s, {passes[True]} vision-tower images")
    print(f"  one pass per call:   {figures['per_call_seconds']:.2f} s, {passes[False]} vision-tower images")
    print(f"  speed-up {figures['speedup']:.2f}x; identical predictions: {figures['identical_predictions']}")
    if args.output:
        write_results(figures, args.output)
    return figures


if __name__ == "__main__":
    main()
