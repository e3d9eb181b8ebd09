"""Does the policy gradient teach the tiny Sa2VA anything that transfers to held-out images?

A probe outside TRL and the trainer: plain REINFORCE with group advantages on loop 1 (region -> caption),
the same adapter calls the trainer uses (`sample`, `completion_logprobs`), the same trainable parts as the
demo (LLM, `mlp1`, `text_hidden_fcs`), and a known-correct reward: 1 when the sampled caption names the
region's position. Fresh synthetic images every step; greedy position accuracy on test-split regions before
and after. Three weightings of the samples, from the same start:

- `signed`: GRPO's (r - group mean) / group std;
- `positive`: the same with negative advantages set to 0 (`negative_advantage_weight: 0` in the trainer);
- `correct`: weight 1 on every correct sample (rejection-sampling fine-tuning);
- `likelihood`: (r - group mean) / group mean, the gradient of log P(right) per region instead of P(right): a
  region the model rarely gets right weighs more, as in supervised log-loss (`advantage_mode: likelihood`).

`--temperature` sets the sampling temperature of training (and of `--spread`); evaluation is greedy.

`--spread` also samples 8 captions per test region, before and after each run, and counts regions whose
samples are all right, all wrong, or mixed: mixed regions are where on-policy sampling can find a better
answer, and a run that turns mixed regions into all-wrong ones has made the model surer of wrong answers.

    python benchmarks/policy_gradient_probe.py --model outputs/warm800 --steps 150   # ~2 min per variant, 1 thread

`position_oracle` is also a reward for the trainer (`PYTHONPATH=.` from the repository root):

    python -m sa2va_trl.grpo recipes/demo.yaml --loops mask_to_caption \\
        --mask_to_caption_rewards benchmarks.policy_gradient_probe:position_oracle --mask_to_caption_reward_weights 1
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
from PIL import Image

from sa2va_trl.data.synthetic import generate_scene, parse_caption, scene_rng

TRAIN_OFFSET = 1_000_000  # train-split scene indices far from any the demo or the SFT recipe draw
VARIANTS = ("signed", "positive", "correct", "likelihood")


def _position(text: str | None):
    attributes = parse_caption(text or "")
    return None if attributes is None else attributes.position


def position_oracle(prompts=None, completions=None, caption=None, **kwargs) -> list[float]:
    """1.0 when a completion names the reference caption's position, else 0.0 (TRL's reward convention)."""
    return [float(_position(c) is not None and _position(c) == _position(r)) for c, r in zip(completions, caption)]


def regions(split: str, first_scene: int, count: int):
    """`count` (image, mask, position) triples from consecutive scenes; returns them and the next scene index."""
    out, index = [], first_scene
    while len(out) < count:
        scene = generate_scene(scene_rng(0, split, index))
        index += 1
        image = Image.fromarray(scene.image)
        out.extend((image, mask, attrs.position) for mask, attrs in zip(scene.masks, scene.attributes))
    return out[:count], index


def greedy_accuracy(policy, test) -> float:
    policy.model.eval()
    right = 0
    with torch.no_grad():
        for start in range(0, len(test), 50):
            chunk = test[start:start + 50]
            captions = policy.caption([c[0] for c in chunk], [c[1] for c in chunk], max_new_tokens=12)
            right += sum(_position(text) == c[2] for text, c in zip(captions, chunk))
    return right / len(test)


def sample_spread(policy, test, G: int, temperature: float = 1.0) -> dict:
    """Regions whose G sampled captions name the right position always, never, or sometimes."""
    counts = {"all_right": 0, "all_wrong": 0, "mixed": 0}
    policy.model.eval()
    with torch.no_grad():
        for start in range(0, len(test), 16):
            chunk = test[start:start + 16]
            rollout = policy.sample(policy.caption_prompts([c[0] for c in chunk], [c[1] for c in chunk]), G, 12,
                                    temperature=temperature)
            for i, c in enumerate(chunk):
                right = [_position(t) == c[2] for t in rollout.completions[i * G:(i + 1) * G]]
                counts["all_right" if all(right) else "all_wrong" if not any(right) else "mixed"] += 1
    return counts


def sample_weights(rewards: torch.Tensor, G: int, variant: str) -> torch.Tensor:
    if variant == "correct":
        return rewards
    if variant == "likelihood":
        from sa2va_trl.trainer import likelihood_advantages

        return likelihood_advantages(rewards, G)
    grouped = rewards.view(-1, G)
    advantages = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).view(-1)
    return advantages.clamp(min=0) if variant == "positive" else advantages


def train(model_path: str, variant: str, steps: int, prompts: int, G: int, lr: float, test, seed: int,
          spread: bool = False, temperature: float = 1.0, eval_every: int = 0) -> dict:
    from sa2va_trl.config import Sa2VAScriptArguments
    from sa2va_trl.grpo import set_trainable_parts
    from sa2va_trl.models import Sa2VAPolicy

    torch.manual_seed(seed)
    policy = Sa2VAPolicy.from_pretrained(model_path)
    # the demo recipe's parts: LLM, mlp1, text_hidden_fcs; the SAM2 decoder and both encoders frozen
    set_trainable_parts(policy.model, Sa2VAScriptArguments(train_mask_decoder=False), use_peft=False)
    params = [p for p in policy.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    before = greedy_accuracy(policy, test)
    next_scene, rewards_seen, start, curve = TRAIN_OFFSET, [], time.perf_counter(), []
    for step in range(1, steps + 1):
        batch, next_scene = regions("train", next_scene, prompts)
        policy.model.eval()
        with torch.no_grad():
            rollout = policy.sample(policy.caption_prompts([b[0] for b in batch], [b[1] for b in batch]), G, 12,
                                    temperature=temperature)
        rewards = torch.tensor([float(_position(text) == batch[i // G][2]) for i, text in enumerate(rollout.completions)])
        weights = sample_weights(rewards, G, variant)
        policy.model.train()
        logprobs = policy.completion_logprobs(rollout.batch, rollout.completion_ids, rollout.completion_mask,
                                              temperature=temperature).logprobs
        mask = rollout.completion_mask.float()
        loss = -(weights[:, None] * logprobs * mask).sum() / mask.sum()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        rewards_seen.append(rewards.mean().item())
        if eval_every and step % eval_every == 0 and step < steps:
            curve.append([step, greedy_accuracy(policy, test)])
            print(f"  {variant} step {step}: greedy position {curve[-1][1]:.3f}", flush=True)
    tenth = max(1, steps // 10)
    return {"variant": variant, "greedy_position_before": before, "greedy_position_after": greedy_accuracy(policy, test),
            "train_reward_first_tenth": float(np.mean(rewards_seen[:tenth])),
            "train_reward_last_tenth": float(np.mean(rewards_seen[-tenth:])),
            "seconds": time.perf_counter() - start, **({"greedy_position_curve": curve} if curve else {}),
            **({"spread_after": sample_spread(policy, test, 8, temperature)} if spread else {})}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a native Sa2VA checkpoint (e.g. a short SFT run)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--prompts", type=int, default=16, help="regions per step")
    parser.add_argument("--num-generations", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--test-regions", type=int, default=400)
    parser.add_argument("--spread", action="store_true", help="also count all-right / all-wrong / mixed test regions")
    parser.add_argument("--eval-every", type=int, default=0, help="greedy position on the test regions every N steps")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of training")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "policy_gradient_probe.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    test, _ = regions("test", 0, args.test_regions)
    result = {"model": args.model, "settings": {k: v for k, v in vars(args).items() if k not in ("out", "model")},
              "runs": []}
    if args.spread:
        from sa2va_trl.models import Sa2VAPolicy

        result["spread"] = sample_spread(Sa2VAPolicy.from_pretrained(args.model), test, 8, args.temperature)
        print("sampled positions over 8 draws per test region:", result["spread"], flush=True)
    for variant in args.variants.split(","):
        run = train(args.model, variant, args.steps, args.prompts, args.num_generations, args.lr, test, args.seed,
                    spread=args.spread, temperature=args.temperature, eval_every=args.eval_every)
        result["runs"].append(run)
        print(f"{variant:>8}: greedy position {run['greedy_position_before']:.3f} -> {run['greedy_position_after']:.3f}; "
              f"train reward {run['train_reward_first_tenth']:.3f} -> {run['train_reward_last_tenth']:.3f} "
              f"({run['seconds']:.0f} s){'; spread after: ' + str(run['spread_after']) if args.spread else ''}", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
