"""Rollout throughput of the tiny Sa2VA policy: batched G samples per prompt vs one at a time.

    python benchmarks/rollout.py [--prompts 4] [--max-new-tokens 16] [--repeats 3] [--threads 1]
                                 [--output benchmarks/results/rollout.json]

For G in 1, 2, 4, 8 it times, in the same run on the same model:
- batched: one `Sa2VAPolicy.sample(batch, num_generations=G)` call over all prompts (one
  generate call, vision features once per image) followed by `decode_masks` for the
  `[SEG]` states (SAM2 features once per image);
- one at a time: the same number of completions, each its own `sample(..., num_generations=1)`
  on a one-prompt batch followed by its own `decode_masks` (what a naive per-sample loop does).

Completions per second = completions / wall time (median of the repeats); the ratio is
batched / one-at-a-time. It also times one GRPO-sized step (sample, training forward with
backward through the log-probs and the mask logits). The numbers go to stdout and to JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sa2va_trl.models import Sa2VAPolicy, build_tiny_model  # noqa: E402


def _images(count: int, size: int = 128):
    """Shape-world-like images: black with one coloured square each, and their texts."""
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    images, texts = [], []
    for index in range(count):
        image = np.zeros((size, size, 3), np.uint8)
        start = 8 + 12 * (index % 6)
        image[start : start + 40, start : start + 40] = colours[index % len(colours)]
        images.append(image)
        texts.append(f"a large square number {index}")
    return images, texts


def _rollout(policy: Sa2VAPolicy, batch, generations: int, max_new_tokens: int) -> int:
    """One rollout: sample, then masks for the [SEG] states. Returns the completion count."""
    rollout = policy.sample(batch, num_generations=generations, max_new_tokens=max_new_tokens)
    with torch.no_grad():
        policy.decode_masks(rollout.batch, policy.seg_embeddings(rollout.seg_hidden), rollout.has_seg)
    return int(rollout.completion_ids.shape[0])


def _time(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _grpo_step_seconds(policy: Sa2VAPolicy, batch, generations: int, max_new_tokens: int, repeats: int) -> float:
    def step():
        rollout = policy.sample(batch, num_generations=generations, max_new_tokens=max_new_tokens)
        out = policy.completion_logprobs(
            rollout.batch, rollout.completion_ids, rollout.completion_mask, with_seg_hidden=True
        )
        masks = policy.decode_masks(rollout.batch, policy.seg_embeddings(out.seg_hidden), rollout.has_seg)
        loss = -(out.logprobs.sum() / rollout.completion_mask.sum()) + masks.low_res_logits.sigmoid().mean()
        loss.backward()
        policy.core.zero_grad(set_to_none=True)

    step()  # warm-up
    return _time(step, repeats)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4, help="distinct prompts (one image each)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per setting (median reported)")
    parser.add_argument("--generations", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads (1 by default: on small shared CPUs extra threads spin and distort the timings)",
    )
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "rollout.json"))
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tokenizer = build_tiny_model(seed=0)
    policy = Sa2VAPolicy(model, tokenizer)
    images, texts = _images(args.prompts)
    batch = policy.segmentation_prompts(images, texts)
    singles = [batch.select([index]) for index in range(len(batch))]
    _rollout(policy, batch, 2, args.max_new_tokens)  # warm-up (allocator, lazy inits)

    results = []
    print(f"tiny Sa2VA, {args.prompts} prompts, {args.max_new_tokens} new tokens, torch threads {torch.get_num_threads()}")
    print(f"{'G':>3} {'batched c/s':>12} {'one-at-a-time c/s':>18} {'ratio':>7}")
    for generations in args.generations:
        policy.reset_counters()
        batched_seconds = _time(lambda: _rollout(policy, batch, generations, args.max_new_tokens), args.repeats)
        vision_images = policy.counters["vision_images"] // args.repeats
        sam_images = policy.counters["sam_encoder_images"] // args.repeats

        def one_at_a_time():
            for single in singles:
                for _ in range(generations):
                    _rollout(policy, single, 1, args.max_new_tokens)

        single_seconds = _time(one_at_a_time, args.repeats)
        completions = args.prompts * generations
        row = {
            "num_generations": generations,
            "completions": completions,
            "batched_seconds": batched_seconds,
            "one_at_a_time_seconds": single_seconds,
            "batched_completions_per_second": completions / batched_seconds,
            "one_at_a_time_completions_per_second": completions / single_seconds,
            "ratio": single_seconds / batched_seconds,
            "vision_images_per_batched_rollout": vision_images,
            "sam_encoder_images_per_batched_rollout": sam_images,
        }
        results.append(row)
        print(
            f"{generations:>3} {row['batched_completions_per_second']:>12.1f} "
            f"{row['one_at_a_time_completions_per_second']:>18.1f} {row['ratio']:>6.2f}x"
        )

    step_seconds = _grpo_step_seconds(policy, batch, 4, args.max_new_tokens, args.repeats)
    print(f"GRPO-sized step ({args.prompts} prompts x G=4: sample + training forward + masks + backward): {step_seconds:.3f} s")
    report = {
        "benchmark": "rollout",
        "model": "tiny Sa2VA (build_tiny_model(seed=0))",
        "parameters": sum(p.numel() for p in model.parameters()),
        "prompts": args.prompts,
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "results": results,
        "grpo_step_seconds_g4": step_seconds,
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {output}")
    return report


if __name__ == "__main__":
    main()
