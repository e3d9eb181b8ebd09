"""How long the rewards take, as a fraction of one tiny-model rollout of the same batch.

    python benchmarks/rewards.py            # 1,024 samples (256 prompts x G=4), masks 1024 x 1024
    python benchmarks/rewards.py --quick    # 128 samples, for a smoke run

Measures, for a batch of N samples:
- `caption_meteor` on N distinct (caption, reference) pairs (cold: first sight of every word,
  WordNet look-ups included; warm: the same call again), WordNet loading reported apart;
- `mask_iou` on N pairs at 1024 x 1024 (predictions as numpy bool arrays, references as the
  row schema's COCO RLE, each reference shared by its G samples as in a GRPO batch): first with
  every RLE to decode, then as the next mask reward of the same step sees it (decodes cached),
  and with references already decoded to numpy arrays;
- the rewards' own overhead in `cycle_iou` / `cycle_meteor` with a zero-cost reverse model
  (dedupe, hashing, IoU, METEOR; the reverse model's own pass is not counted);
- one rollout of the tiny Sa2VA policy (`Sa2VAPolicy.sample`, N region-caption samples at the
  tiny model's 128 px) as the denominator. A real GRPO step also runs the training forward and
  backward, so "fraction of the rollout" is an upper bound on the fraction of the step.

Writes benchmarks/results/rewards.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

SIZES = ["small", "large", "tiny", "big", "little", "huge"]
COLOURS = ["red", "green", "blue", "yellow", "orange", "purple", "white", "black"]
SHAPES = ["square", "circle", "triangle", "box", "ball", "star", "rectangle", "disc"]
PLACES = ["in the top left", "in the top right", "at the bottom left", "near the bottom right", "in the center",
          "next to the tree", "beside a dog", "on the grass", "under the table", "by the window"]
VERBS = ["", "sitting", "lying", "resting", "standing", "placed"]


def captions(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = set()
    while len(out) < n:
        verb = rng.choice(VERBS)
        out.add(" ".join(w for w in ["a", rng.choice(SIZES), rng.choice(COLOURS), rng.choice(SHAPES), verb,
                                     rng.choice(PLACES)] if w))
    return sorted(out)


def blob_masks(n: int, size: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    masks = []
    for _ in range(n):
        cy, cx = rng.uniform(0.2, 0.8, 2) * size
        ry, rx = rng.uniform(0.05, 0.3, 2) * size
        masks.append(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0)
    return masks


def timed(fn, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


class ZeroCostReverse:
    """A reverse model that answers instantly, to time the rewards' own work."""

    def __init__(self, size: int):
        self.mask = np.zeros((size, size), bool)
        self.mask[: size // 2, : size // 2] = True

    def segment(self, images, texts):
        return [self.mask] * len(texts)

    def caption(self, images, region_masks):
        return ["a small red square in the top left"] * len(region_masks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=1024, help="batch size N (prompts x G)")
    parser.add_argument("--num-generations", type=int, default=4, help="G, samples per prompt")
    parser.add_argument("--mask-size", type=int, default=1024, help="H = W of the masks for mask_iou")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="rollout length")
    parser.add_argument("--quick", action="store_true", help="128 samples")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "rewards.json"))
    args = parser.parse_args()
    n = 128 if args.quick else args.samples
    g = args.num_generations
    prompts = n // g

    import torch

    from sa2va_trl.rewards import get_reward, load_wordnet, mask_to_rle
    from sa2va_trl.rewards.masks import DECODED_RLE_CACHE
    from sa2va_trl.rewards.wordnet import _cache

    results: dict = {
        "samples": n,
        "num_generations": g,
        "mask_size": args.mask_size,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_at_start": os.getloadavg()[0],  # other jobs on the machine inflate every time here
    }

    # --- METEOR ---------------------------------------------------------------------------
    _cache.clear()
    results["wordnet_load_s"] = timed(load_wordnet)
    hyps, refs = captions(n, seed=1), captions(n, seed=2)
    random.Random(3).shuffle(refs)
    meteor_reward = get_reward("caption_meteor")
    kwargs = dict(prompts=["p"] * n, completions=hyps, completion_ids=[[0]] * n, caption=refs)
    results["meteor_cold_s"] = timed(lambda: meteor_reward(**kwargs))
    results["meteor_warm_s"] = timed(lambda: meteor_reward(**kwargs), repeat=3)
    print(f"WordNet load (once per process): {results['wordnet_load_s']:.2f} s")
    print(f"caption_meteor, {n} distinct pairs: cold {results['meteor_cold_s']:.3f} s, warm {results['meteor_warm_s']:.3f} s")

    # --- IoU ------------------------------------------------------------------------------
    size = args.mask_size
    preds = blob_masks(min(n, 64), size, seed=4)  # 64 distinct arrays cycled: same work, less memory
    targets = [mask_to_rle(m) for m in blob_masks(prompts, size, seed=5)]
    pred_col = [preds[i % len(preds)] for i in range(n)]
    rle_col = [dict(targets[i // g]) for i in range(n)]  # G copies per prompt, distinct dicts as TRL gives them
    np_col = [blob_masks(1, size, seed=6)[0]] * n
    iou_reward = get_reward("mask_iou")
    base = dict(prompts=["p"] * n, completions=["c"] * n, completion_ids=[[0]] * n, pred_mask=pred_col)
    DECODED_RLE_CACHE.clear()
    results["iou_rle_targets_s"] = timed(lambda: iou_reward(**base, region_mask=rle_col))  # decodes every RLE
    results["iou_rle_targets_cached_s"] = timed(lambda: iou_reward(**base, region_mask=rle_col), repeat=2)
    results["iou_numpy_targets_s"] = timed(lambda: iou_reward(**base, region_mask=np_col), repeat=2)
    DECODED_RLE_CACHE.clear()
    print(f"mask_iou, {n} pairs at {size} x {size}: RLE references {results['iou_rle_targets_s']:.3f} s "
          f"(decoded: {results['iou_rle_targets_cached_s']:.3f} s for the next mask reward of the step), "
          f"numpy references {results['iou_numpy_targets_s']:.3f} s")
    del preds, pred_col, rle_col, np_col, base

    # --- the rollout (denominator) ----------------------------------------------------------
    try:
        from sa2va_trl.models.adapter import Sa2VAPolicy
        from sa2va_trl.models.tiny import build_tiny_model

        model, tokenizer = build_tiny_model(seed=0)
        policy = Sa2VAPolicy(model, tokenizer)
        side = int(getattr(model.config, "image_size", 128))
        rng = np.random.default_rng(7)
        images = [rng.integers(0, 255, (side, side, 3), dtype=np.uint8) for _ in range(prompts)]
        regions = [m for m in blob_masks(prompts, side, seed=8)]
        for m in regions:
            m[side // 4 : side // 2, side // 4 : side // 2] = True  # enough token-grid cells for a region
        batch = policy.caption_prompts(images, regions)
        with torch.no_grad():
            policy.sample(policy.caption_prompts(images[:1], regions[:1]), 1, 2)  # warm-up
            results["rollout_s"] = timed(lambda: policy.sample(batch, g, args.max_new_tokens))
        results["rollout"] = f"Sa2VAPolicy.sample, tiny model, {prompts} prompts x G={g}, {side} px, {args.max_new_tokens} new tokens"
        print(f"rollout ({results['rollout']}): {results['rollout_s']:.2f} s")

        # the cycle rewards' own overhead, with the reverse pass made free (at the tiny model's size)
        fake = ZeroCostReverse(side)
        pil_like = [images[i // g] for i in range(n)]
        region_rles = [mask_to_rle(regions[i // g]) for i in range(n)]
        c_iou = get_reward("cycle_iou", reverse_policy=fake)
        c_met = get_reward("cycle_meteor", reverse_policy=fake)
        kw = dict(prompts=["p"] * n, completion_ids=[[0]] * n, img=pil_like)
        results["cycle_iou_overhead_s"] = timed(lambda: c_iou(**kw, completions=hyps, region_mask=region_rles), repeat=2)
        results["cycle_meteor_overhead_s"] = timed(
            lambda: c_met(**kw, completions=["Sure."] * n, caption=refs, pred_mask=[regions[i // g] for i in range(n)]),
            repeat=2,
        )
        print(f"cycle_iou / cycle_meteor overhead without the reverse pass: {results['cycle_iou_overhead_s']:.3f} s / "
              f"{results['cycle_meteor_overhead_s']:.3f} s")
        for key in ("meteor_cold_s", "meteor_warm_s", "iou_rle_targets_s", "iou_rle_targets_cached_s", "iou_numpy_targets_s",
                    "cycle_iou_overhead_s", "cycle_meteor_overhead_s"):
            results[key[:-2] + "_fraction_of_rollout"] = results[key] / results["rollout_s"]
            print(f"  {key[:-2]:<28} {100 * results[key] / results['rollout_s']:6.2f} % of the rollout")
    except (ImportError, NotImplementedError) as e:
        results["rollout"] = f"unavailable ({e}); absolute times only"
        print(f"tiny policy unavailable ({e}): absolute times only")

    results["load_average_at_end"] = os.getloadavg()[0]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
