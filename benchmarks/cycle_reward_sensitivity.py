"""Which caption errors does loop 1's reward see? Rewards of sampled captions by the attribute they get wrong.

    python benchmarks/cycle_reward_sensitivity.py --model CHECKPOINT [--images 200] [--num-generations 4]
                                                  [--temperature 1.0] [--output FILE]

Loop 1 (mask -> caption -> mask') rewards a caption by how well the reverse model segments it back onto the region
(`cycle_iou`), plus METEOR against the reference (`caption_meteor`). GRPO can only teach an attribute word if (a)
the groups it samples disagree on that word and (b) the reward separates the samples that got it right from those
that did not. This measures both on the synthetic shapes world, as at the first step of a run (the EMA reverse model
equals the policy): for each region it samples G captions, segments each with the same model, and reports

- the mean cycle IoU and METEOR of the samples by what they got wrong (exact, position wrong, shape only wrong, ...);
- how often a wrong position names another region of the same image (the caption describes the wrong object);
- per attribute, the share of groups that mix right and wrong samples, and the reward gap between a group's exact
  samples and its samples wrong on that attribute alone (recipe weights: cycle IoU 1.0 + METEOR 0.5 unless
  `--meteor-weight` says otherwise), with the cycle IoU's part of it.

On the shapes world a region's position cell names it uniquely, so a caption with the right position but the wrong
shape word segments the right region: its cycle IoU gap is ~0 and only METEOR teaches the shape
(docs/tiny_world_experiments.md, "What loop 1's reward sees").
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import write_results  # noqa: E402

from sa2va_trl.data.schema import decode_region_mask  # noqa: E402
from sa2va_trl.data.synthetic import parse_caption, shapes_dataset  # noqa: E402
from sa2va_trl.evaluate import _batch_images, load_policy  # noqa: E402
from sa2va_trl.metrics import mask_iou  # noqa: E402
from sa2va_trl.rewards.meteor import meteor  # noqa: E402

ATTRIBUTES = ("position", "shape", "colour", "size")


def wrong_attributes(reference, sample) -> list[str]:
    """The attributes a parsed sample names differently from the reference, in `ATTRIBUTES` order."""
    return [a for a in ATTRIBUTES if getattr(reference, a) != getattr(sample, a)]


def error_class(reference, sample) -> str:
    """What a sampled caption got wrong, position first (a wrong position names another region or none)."""
    if sample is None:
        return "unparsed"
    wrong = wrong_attributes(reference, sample)
    if not wrong:
        return "exact"
    if "position" in wrong:
        return "position wrong"
    return " + ".join(wrong) + " wrong, position right"


def attribute_gaps(groups: list[list[tuple]], meteor_weight: float) -> dict:
    """Per attribute: the share of groups whose samples disagree on it (GRPO can only move a word its groups vary
    on), and what the reward pays for it: inside groups holding both, the mean reward of the exact samples minus
    that of the samples wrong on this attribute alone.

    Args:
        groups: per region, the G samples as `(reference attrs, sample attrs or None, cycle_iou, meteor)`.
        meteor_weight: the weight of METEOR next to the cycle IoU's 1.0.
    """
    def mean(samples, w):
        return float(np.mean([iou + w * m for _, _, iou, m in samples]))

    out = {}
    for attribute in ATTRIBUTES:
        mixed, gaps, iou_gaps = 0, [], []
        for group in groups:
            values = {None if s is None else getattr(s, attribute) == getattr(ref, attribute) for ref, s, _, _ in group}
            mixed += len(values) > 1
            wrong = [None if s is None else wrong_attributes(ref, s) for ref, s, _, _ in group]
            exact = [x for x, w in zip(group, wrong) if w == []]
            alone = [x for x, w in zip(group, wrong) if w == [attribute]]
            if exact and alone:
                gaps.append(mean(exact, meteor_weight) - mean(alone, meteor_weight))
                iou_gaps.append(mean(exact, 0.0) - mean(alone, 0.0))
        out[attribute] = {"mixed_groups": mixed / max(1, len(groups)), "compared_groups": len(gaps),
                          "reward_gap": float(np.mean(gaps)) if gaps else None,
                          "cycle_iou_gap": float(np.mean(iou_gaps)) if iou_gaps else None}
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="builtin:tiny-warm")
    parser.add_argument("--images", type=int, default=200, help="synthetic test images (1-3 regions each)")
    parser.add_argument("--num-generations", type=int, default=4, help="G: captions sampled per region")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--meteor-weight", type=float, default=0.5, help="caption_meteor's weight (cycle IoU: 1.0)")
    parser.add_argument("--batch-size", type=int, default=8, help="regions per call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    policy = load_policy(args.model)
    rows = shapes_dataset(args.images, seed=args.seed, split="test")
    g = args.num_generations
    # The positions of the other regions of each row's image: does a wrong position name one of them?
    positions_by_image: dict[str, list] = defaultdict(list)
    for source_id, caption in zip(rows["source_id"], rows["caption"]):
        positions_by_image[source_id].append(parse_caption(caption).position)
    position_wrong, names_another = 0, 0
    groups: list[list[tuple]] = []
    for start in tqdm(range(0, len(rows), args.batch_size), desc="sampling", unit="batch"):
        batch = rows[start:start + args.batch_size]
        images = _batch_images(batch["img"], batch["source_id"])
        regions = [decode_region_mask(rle) for rle in batch["region_mask"]]
        with policy.shared_encoder_features(), torch.no_grad():
            rollout = policy.sample(policy.caption_prompts(images, regions), num_generations=g,
                                    max_new_tokens=args.max_new_tokens, temperature=args.temperature)
            texts = rollout.completions
            masks = policy.segment([images[i // g] for i in range(len(texts))], texts)
        for k, reference_text in enumerate(batch["caption"]):
            reference = parse_caption(reference_text)
            for j in range(g):
                sample = parse_caption(texts[k * g + j])
                if sample is not None and sample.position != reference.position:
                    position_wrong += 1
                    names_another += sample.position in positions_by_image[batch["source_id"][k]]
            groups.append([(reference, parse_caption(texts[k * g + j]),
                            mask_iou(np.asarray(masks[k * g + j], dtype=bool), regions[k]),
                            meteor(texts[k * g + j], reference_text)) for j in range(g)])

    by_class: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for group in groups:
        for reference, sample, iou, m in group:
            by_class[error_class(reference, sample)].append((iou, m))
    total = sum(len(v) for v in by_class.values())
    classes = {name: {"share": len(v) / total, "cycle_iou": float(np.mean([i for i, _ in v])),
                      "meteor": float(np.mean([m for _, m in v]))}
               for name, v in sorted(by_class.items(), key=lambda item: -len(item[1]))}
    figures = {"model": args.model, "regions": len(groups), "num_generations": g, "temperature": args.temperature,
               "meteor_weight": args.meteor_weight, "samples_by_error": classes,
               "position_wrong_names_another_region": names_another / position_wrong if position_wrong else None,
               "attributes": attribute_gaps(groups, args.meteor_weight)}
    print(f"{len(groups)} regions x {g} sampled captions, {args.model}")
    print(f"  {'sample got':36s} {'share':>6s} {'cycle IoU':>9s} {'METEOR':>7s}")
    for name, c in classes.items():
        print(f"  {name:36s} {c['share']:6.3f} {c['cycle_iou']:9.3f} {c['meteor']:7.3f}")
    if position_wrong:
        share = names_another / position_wrong
        print(f"  a wrong position names another region of the image in {share:.1%} of samples")
    print(f"  {'attribute':10s} {'mixed groups':>12s} {'exact - wrong on it alone:':>27s} {'reward':>7s} "
          f"{'cycle IoU':>9s}")
    for attribute, a in figures["attributes"].items():
        fmt = lambda x: "-" if x is None else f"{x:+.3f}"  # noqa: E731
        print(f"  {attribute:10s} {a['mixed_groups']:12.3f} {a['compared_groups']:20d} groups "
              f"{fmt(a['reward_gap']):>7s} {fmt(a['cycle_iou_gap']):>9s}")
    if args.output:
        write_results(figures, args.output)
    return figures


if __name__ == "__main__":
    main()
