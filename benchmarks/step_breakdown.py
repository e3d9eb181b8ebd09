"""Where one cycle-GRPO step of the tiny Sa2VA model spends its time, for G = 2, 4, 8.

    python benchmarks/step_breakdown.py [--generations 2 4 8] [--prompts 3] [--warmup 2] [--steps 5]
                                        [--max-completion-length 12] [--beta 0.04] [--threads 1]
                                        [--split-other] [--profile /tmp/step]
                                        [--output benchmarks/results/step_breakdown.json]

A real `Sa2VAGRPOTrainer` (settings of recipes/demo.yaml: both loops, cycle_iou + caption_meteor on loop 1,
cycle_meteor + mask_iou on loop 2, mask action, EMA 0.99 as reverse model and KL reference with beta 0.04) trains
`warmup + steps` optimizer steps on the shapes world. Methods of the live objects are wrapped (`_timing.Timer`,
exclusive times, behaviour unchanged):

| part              | what is timed                                                                         |
|-------------------|---------------------------------------------------------------------------------------|
| generation        | `Sa2VAPolicy.sample` called by the trainer (policy rollouts of both loops)            |
| reverse_pass      | `EMAReversePolicy.caption` / `.segment` (EMA swap + greedy reverse model, everything) |
| sam2_decode       | `Sa2VAPolicy.decode_masks` of the loop-2 rollouts                                     |
| logprob_forward   | `Sa2VAPolicy.completion_logprobs` with grad (the training forward)                    |
| reference_forward | `Sa2VAPolicy.completion_logprobs` without grad (KL reference, EMA weights)            |
| backward          | `trainer.accelerator.backward` (the loss's backward)                                  |
| optimizer         | `accelerator.clip_grad_norm_` + `optimizer.step`                                      |
| rewards           | `trainer._calculate_rewards` minus the reverse pass inside it                         |
| prompt_building   | `Sa2VAPolicy.caption_prompts` / `.segmentation_prompts` called by the trainer         |
| ema_update        | `EMACallback.on_step_end`                                                             |
| ema_swap          | `EMACallback.store` / `.copy_to` / `.restore` outside the reverse pass (KL reference)  |
| other             | step total (between consecutive `on_step_end`s) minus all of the above                |

Bookkeeping = rewards + prompt_building + ema_update + ema_swap + other (everything but model forward, backward,
generation and the optimizer). Medians over the measured steps; fractions are per step, then the median.
The policy's counters give vision-tower and SAM2-encoder images per unique image of the step, split by part.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import Timer, environment, format_table, median, write_results  # noqa: E402
from transformers import PrinterCallback, TrainerCallback  # noqa: E402

PARTS = ("generation", "reverse_pass", "sam2_decode", "logprob_forward", "reference_forward", "backward",
         "optimizer", "rewards", "prompt_building", "ema_update", "ema_swap", "other")
MODEL_PARTS = ("generation", "reverse_pass", "sam2_decode", "logprob_forward", "reference_forward", "backward",
               "optimizer")
BOOKKEEPING_PARTS = ("rewards", "prompt_building", "ema_update", "ema_swap", "other")
TARGETS = {"bookkeeping": 0.10, "ema_update": 0.02, "rewards": 0.05}


def build_trainer(generations: int, prompts: int, max_completion_length: int, beta: float, output_dir: str,
                  max_steps: int, images: int = 16, seed: int = 0, image_size: int = 128):
    """The demo recipe's trainer on the tiny model (in memory, nothing written but the output dir).

    `image_size` is both the shapes world's image side and the model's vision / SAM2 input side."""
    from sa2va_trl.config import CAPTION_TO_MASK, MASK_TO_CAPTION, Sa2VAGRPOConfig, Sa2VAScriptArguments
    from sa2va_trl.data.synthetic import shapes_dataset
    from sa2va_trl.grpo import set_trainable_parts
    from sa2va_trl.models.tiny import build_tiny_model
    from sa2va_trl.rewards.registry import get_reward
    from sa2va_trl.trainer import Sa2VAGRPOTrainer

    model, tokenizer = build_tiny_model(seed=seed, image_size=image_size, sam2_image_size=image_size)
    set_trainable_parts(model, Sa2VAScriptArguments(), use_peft=False)  # as the entry point: frozen encoders
    model.train()
    args = Sa2VAGRPOConfig(
        output_dir=output_dir, use_cpu=True, bf16=False, report_to=[], save_strategy="no", disable_tqdm=True,
        logging_steps=1, seed=seed, max_steps=max_steps,
        per_device_train_batch_size=prompts * generations, num_generations=generations,
        max_completion_length=max_completion_length, temperature=1.0, learning_rate=1e-4,
        lr_scheduler_type="constant", max_grad_norm=1.0, beta=beta, ema_decay=0.99,
        mask_to_caption_rewards=["cycle_iou", "caption_meteor"], mask_to_caption_reward_weights=[1.0, 0.5],
        caption_to_mask_rewards=["cycle_meteor", "mask_iou"], caption_to_mask_reward_weights=[1.0, 0.5],
        mask_action=True, mask_action_sigma=0.1,
    )
    rewards = {
        MASK_TO_CAPTION: [get_reward("cycle_iou"), get_reward("caption_meteor")],
        CAPTION_TO_MASK: [get_reward("cycle_meteor"), get_reward("mask_iou")],
    }
    dataset = shapes_dataset(images, seed=seed, image_size=image_size)
    trainer = Sa2VAGRPOTrainer(model=model, reward_funcs=rewards, args=args, train_dataset=dataset,
                               processing_class=tokenizer)
    trainer.remove_callback(PrinterCallback)  # no per-step log lines on stdout (a run shows a progress bar instead)
    return trainer


# With --split-other: pieces of "other" timed as their own parts (exclusive of the parts above), to explain it.
OTHER_PIECES = (
    ("get_batch_samples", "other:data_loading"),
    ("_generate_and_score_completions", "other:trl_generate_and_score"),
    ("_generate", "other:trl_generate"),
    ("rollout_func", "other:our_rollout"),
    ("_reshape_advantages", "other:our_advantages_metrics"),
    ("_record_recent_samples", "other:our_recent_samples"),
    ("compute_loss", "other:trl_loss"),
    ("_get_per_token_logps_and_entropies", "other:our_logps_dispatch"),
    ("floating_point_ops", "other:flops_count"),
    ("_maybe_log_save_evaluate", "other:log"),
)


def instrument(trainer, split_other: bool = False) -> Timer:
    """Wrap the live trainer's, policy's, reverse model's and EMA's methods; returns the Timer."""
    policy = trainer.policy
    timer = Timer(probe=lambda: policy.counters)
    timer.wrap(policy, "sample", "generation")
    timer.wrap(policy, "decode_masks", "sam2_decode")
    timer.wrap(policy, "completion_logprobs",
               lambda: "logprob_forward" if torch.is_grad_enabled() else "reference_forward")
    timer.wrap(policy, "caption_prompts", "prompt_building")
    timer.wrap(policy, "segmentation_prompts", "prompt_building")
    timer.wrap(trainer.reverse_policy, "caption", "reverse_pass", opaque=True)
    timer.wrap(trainer.reverse_policy, "segment", "reverse_pass", opaque=True)
    timer.wrap(trainer, "_calculate_rewards", "rewards")
    timer.wrap(trainer.accelerator, "backward", "backward")
    timer.wrap(trainer.accelerator, "clip_grad_norm_", "optimizer")
    timer.wrap(trainer.ema, "on_step_end", "ema_update", opaque=True)
    for name in ("store", "copy_to", "restore"):
        timer.wrap(trainer.ema, name, "ema_swap")
    if split_other:
        for name, part in OTHER_PIECES:
            timer.wrap(trainer, name, part)
    return timer


class StepRecorder(TrainerCallback):
    """Last callback: closes each step at `on_step_end` (step total, parts, counters, unique images)."""

    def __init__(self, trainer, timer: Timer):
        self.trainer, self.timer = trainer, timer
        self.steps: list[dict] = []
        self._last: float | None = None
        self._unique_images = 0
        original = trainer._generate_and_score_completions

        def record_images(inputs):
            keys = {hashlib.blake2b(row["img"].tobytes(), digest_size=16).digest() for row in inputs}
            self._unique_images += len(keys)
            return original(inputs)

        trainer._generate_and_score_completions = record_images

    def on_train_begin(self, args, state, control, **kwargs):
        self.timer.wrap(self.trainer.optimizer, "step", "optimizer")
        self.timer.take()
        self._last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        totals, calls, counts = self.timer.take()
        self.steps.append({"total": now - self._last, "parts": totals, "calls": calls, "counts": counts,
                           "unique_images": self._unique_images})
        self._unique_images = 0
        self._last = now


def run_one(generations: int, prompts: int, warmup: int, steps: int, max_completion_length: int, beta: float,
            image_size: int = 128, profile: str | None = None, split_other: bool = False) -> dict:
    """Train warmup + steps steps at this G; return the per-step records and their medians."""
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = build_trainer(generations, prompts, max_completion_length, beta, output_dir, warmup + steps,
                                image_size=image_size)
        timer = instrument(trainer, split_other)
        recorder = StepRecorder(trainer, timer)
        trainer.add_callback(recorder)
        if profile:  # cProfile the whole run (warm-up included) into `{profile}.G{generations}.prof`
            import cProfile

            profiler = cProfile.Profile()
            profiler.runcall(trainer.train)
            profiler.dump_stats(f"{profile}.G{generations}.prof")
        else:
            trainer.train()
        timer.restore()
    measured = recorder.steps[warmup:]
    return summarise(measured, generations, prompts)


def summarise(measured: list[dict], generations: int, prompts: int) -> dict:
    fractions = {part: [] for part in (*PARTS, "bookkeeping")}
    seconds = {part: [] for part in (*PARTS, "bookkeeping")}
    extra = sorted({p for step in measured for p in step["parts"] if p not in PARTS})
    fractions.update({p: [] for p in extra})
    seconds.update({p: [] for p in extra})
    for step in measured:
        parts = dict(step["parts"])
        parts["other"] = step["total"] - sum(v for k, v in parts.items())
        step["parts"]["other"] = parts["other"]
        parts["bookkeeping"] = sum(v for p, v in parts.items() if p in BOOKKEEPING_PARTS or p.startswith("other:"))
        for part in fractions:
            seconds[part].append(parts.get(part, 0.0))
            fractions[part].append(parts.get(part, 0.0) / step["total"])
    per_image = {}
    for encoder in ("vision_images", "sam_encoder_images"):
        by_part = {}
        for part in PARTS:
            values = [step["counts"].get(part, {}).get(encoder, 0) / max(1, step["unique_images"]) for step in measured]
            if any(values):
                by_part[part] = median(values)
        total = [sum(c.get(encoder, 0) for c in step["counts"].values()) / max(1, step["unique_images"])
                 for step in measured]
        per_image[encoder] = {"total": median(total), "by_part": by_part}
    return {
        "num_generations": generations,
        "prompts": prompts,
        "sequences_per_step": generations * prompts,
        "steps_measured": len(measured),
        "step_seconds_median": median(s["total"] for s in measured),
        "median_seconds": {p: median(v) for p, v in seconds.items()},
        "median_fraction": {p: median(v) for p, v in fractions.items()},
        "encoder_images_per_unique_image": per_image,
        "unique_images_per_step": median(s["unique_images"] for s in measured),
        "steps": measured,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generations", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--prompts", type=int, default=3, help="prompts (rows) per step; batch = prompts x G")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--max-completion-length", type=int, default=12)
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--split-other", action="store_true",
                        help="time pieces of 'other' (TRL's loss, logging, data loading, ...) as parts of their own")
    parser.add_argument("--profile", help="also cProfile each run into PROFILE.G<g>.prof (inflates Python-heavy parts)")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "step_breakdown.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()

    results = [run_one(g, args.prompts, args.warmup, args.steps, args.max_completion_length, args.beta,
                       profile=args.profile, split_other=args.split_other) for g in args.generations]
    headers = ["part"] + [f"G={r['num_generations']} s" for r in results] + [f"G={r['num_generations']} %"
                                                                          for r in results]
    rows = []
    extra = sorted({p for r in results for p in r["median_fraction"] if p.startswith("other:")})
    for part in (*PARTS, *extra, "bookkeeping"):
        rows.append([part] + [r["median_seconds"].get(part, 0.0) for r in results]
                    + [100 * r["median_fraction"].get(part, 0.0) for r in results])
    rows.append(["step total"] + [r["step_seconds_median"] for r in results] + [100.0 for _ in results])
    print(format_table(headers, rows))
    print()
    checks = []
    for r in results:
        f = r["median_fraction"]
        checks.append({
            "num_generations": r["num_generations"],
            "bookkeeping<=10%": f["bookkeeping"] <= TARGETS["bookkeeping"],
            "ema_update<=2%": f["ema_update"] <= TARGETS["ema_update"],
            "rewards<=5%": f["rewards"] <= TARGETS["rewards"],
            "vision_per_unique_image": r["encoder_images_per_unique_image"]["vision_images"]["total"],
            "sam2_per_unique_image": r["encoder_images_per_unique_image"]["sam_encoder_images"]["total"],
        })
    print(format_table(list(checks[0]), [list(c.values()) for c in checks]))
    print()
    enc_rows = []
    for r in results:
        for encoder, info in r["encoder_images_per_unique_image"].items():
            enc_rows.append([r["num_generations"], encoder, info["total"],
                             ", ".join(f"{k} {v:.2g}" for k, v in info["by_part"].items())])
    print(format_table(["G", "encoder", "images / unique image", "by part"], enc_rows))
    output = {"command": "python benchmarks/" + Path(__file__).name + " " + " ".join(argv or sys.argv[1:]),
              "settings": vars(args), "environment": environment(), "targets": TARGETS, "checks": checks,
              "results": results}
    return write_results(output, args.output)


if __name__ == "__main__":
    main()
