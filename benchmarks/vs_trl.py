"""Our overhead against stock TRL: one `Sa2VAGRPOTrainer` step vs one `trl.GRPOTrainer` step, same LM backbone.

    python benchmarks/vs_trl.py [--generations 4] [--prompts 3] [--max-completion-length 12] [--warmup 2]
                                [--steps 8] [--threads 1] [--output benchmarks/results/vs_trl.json]

- Ours: `Sa2VAGRPOTrainer` on the tiny Sa2VA model, loop 1 (mask -> caption) only, a trivial text reward (no
  reverse pass), beta 0 (no reference forward), frozen vision / SAM2 encoders as in the entry point; the EMA
  callback still updates every step (it is part of our trainer).
- Stock: `trl.GRPOTrainer` on the `language_model` (a Qwen2ForCausalLM) of an identically seeded tiny model, the
  same reward, G, learning rate and `max_completion_length`, beta 0, activation checkpointing off (as ours), plain
  prompts of token ids of exactly our prompts' lengths (row by row: the same rows in the same order, our prompts
  count their image and region tokens).
- Equal completion lengths: both models' `generate` is called with `min_new_tokens = max_completion_length`, so
  every completion has exactly that many tokens on both sides.

The two trainers run in one process, each in its own thread, handing a baton over at every `on_step_end`: step
i of ours, step i of TRL, step i + 1 of ours, ... A step's time is from getting the baton to its `on_step_end`
(generation, rewards, forward, backward, optimizer, callbacks, the next batch). Ratio = ours / TRL per pair,
reported as the median over the measured pairs (and the ratio of the medians). Our step is also split into parts
(`_timing.Timer`, as in step_breakdown.py) to show where the difference goes.
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import Timer, environment, format_table, median, write_results  # noqa: E402
from transformers import PrinterCallback, TrainerCallback  # noqa: E402

TARGET_RATIO = 1.15
OUR_PARTS = ("generation", "logprob_forward", "backward", "optimizer", "rewards", "prompt_building", "ema_update",
             "other")


def trivial_reward(completions, **kwargs):
    """Length of each completion's text / 100: cheap, and different across samples."""
    return [len(c) / 100 for c in completions]


def force_length(language_model, length: int) -> None:
    """Make this model's `generate` emit exactly `length` new tokens (min_new_tokens = max_new_tokens)."""
    original = language_model.generate

    @functools.wraps(original)
    def generate(*args, **kwargs):
        kwargs["min_new_tokens"] = length
        return original(*args, **kwargs)

    language_model.generate = generate


def common_args(generations: int, prompts: int, max_completion_length: int, steps: int, output_dir: str) -> dict:
    return dict(output_dir=output_dir, use_cpu=True, bf16=False, report_to=[], save_strategy="no",
                disable_tqdm=True, logging_steps=1, seed=0, max_steps=steps, learning_rate=1e-4,
                lr_scheduler_type="constant", max_grad_norm=1.0, per_device_train_batch_size=prompts * generations,
                num_generations=generations, max_completion_length=max_completion_length, temperature=1.0, beta=0.0,
                activation_checkpointing=False, gradient_checkpointing=False)


def build_ours(generations, prompts, max_completion_length, steps, output_dir, rows):
    from sa2va_trl.config import MASK_TO_CAPTION, Sa2VAGRPOConfig, Sa2VAScriptArguments
    from sa2va_trl.grpo import set_trainable_parts
    from sa2va_trl.models.tiny import build_tiny_model
    from sa2va_trl.trainer import Sa2VAGRPOTrainer, expand_loops

    model, tokenizer = build_tiny_model(seed=0)
    set_trainable_parts(model, Sa2VAScriptArguments(), use_peft=False)
    model.train()
    args = Sa2VAGRPOConfig(**common_args(generations, prompts, max_completion_length, steps, output_dir),
                           loops=[MASK_TO_CAPTION], mask_to_caption_rewards=["caption_meteor"])
    dataset = expand_loops(rows, [MASK_TO_CAPTION])
    trainer = Sa2VAGRPOTrainer(model=model, reward_funcs={MASK_TO_CAPTION: [trivial_reward]}, args=args,
                               train_dataset=dataset, processing_class=tokenizer)
    trainer.remove_callback(PrinterCallback)
    force_length(model.language_model, max_completion_length)
    return trainer, dataset


def prompt_lengths(trainer, dataset) -> list[int]:
    """Token length of our prompt for each expanded row (image + region tokens included)."""
    lengths = []
    for start in range(0, len(dataset), 16):
        rows = dataset.select(range(start, min(start + 16, len(dataset))))
        for row in rows:
            batch = trainer.policy.caption_prompts([row["img"]], [row["region_mask"]])
            lengths.append(int(batch.attention_mask.sum()))
    return lengths


def build_stock(generations, prompts, max_completion_length, steps, output_dir, lengths):
    import datasets
    from trl import GRPOConfig, GRPOTrainer

    from sa2va_trl.models.tiny import build_tiny_model

    model, tokenizer = build_tiny_model(seed=0)
    language_model = model.language_model
    language_model.train()
    language_model.generation_config.eos_token_id = tokenizer.eos_token_id
    language_model.generation_config.pad_token_id = tokenizer.pad_token_id
    word = " a"
    texts = [word * n for n in lengths]
    got = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    if got != lengths:
        raise RuntimeError(f"plain prompts do not tokenize to our lengths: {got[:5]} vs {lengths[:5]}")
    # TRL's sampler shuffles with the same seed as ours: same order of rows, hence same lengths per step.
    dataset = datasets.Dataset.from_dict({"prompt": texts})
    args = GRPOConfig(**common_args(generations, prompts, max_completion_length, steps, output_dir))
    trainer = GRPOTrainer(model=language_model, reward_funcs=[trivial_reward], args=args, train_dataset=dataset,
                          processing_class=tokenizer)
    trainer.remove_callback(PrinterCallback)
    force_length(language_model, max_completion_length)
    return trainer


class Baton(TrainerCallback):
    """Alternates two trainers step by step; records each step's time from getting the baton to `on_step_end`."""

    def __init__(self, mine: threading.Semaphore, other: threading.Semaphore, threads: int, on_step=None):
        self.mine, self.other, self.threads, self.on_step = mine, other, threads, on_step
        self.times: list[float] = []
        self.prompt_tokens: list[int] = []
        self._start = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        torch.set_num_threads(self.threads)  # per thread (OpenMP settings are thread-local)
        self.mine.acquire()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)
        if self.on_step is not None:
            self.on_step()
        self.other.release()
        self.mine.acquire()
        self._start = time.perf_counter()

    def on_train_end(self, args, state, control, **kwargs):
        self.other.release()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--max-completion-length", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "vs_trl.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers

    from sa2va_trl.data.synthetic import shapes_dataset

    transformers.logging.set_verbosity_error()
    total = args.warmup + args.steps
    rows = shapes_dataset(args.images, seed=0)
    with tempfile.TemporaryDirectory() as ours_dir, tempfile.TemporaryDirectory() as stock_dir:
        ours, dataset = build_ours(args.generations, args.prompts, args.max_completion_length, total, ours_dir, rows)
        lengths = prompt_lengths(ours, dataset)
        stock = build_stock(args.generations, args.prompts, args.max_completion_length, total, stock_dir, lengths)

        timer = Timer()
        policy = ours.policy
        timer.wrap(policy, "sample", "generation")
        timer.wrap(policy, "completion_logprobs", "logprob_forward")
        timer.wrap(policy, "caption_prompts", "prompt_building")
        timer.wrap(ours, "_calculate_rewards", "rewards")
        timer.wrap(ours.accelerator, "backward", "backward")
        timer.wrap(ours.accelerator, "clip_grad_norm_", "optimizer")
        timer.wrap(ours.ema, "on_step_end", "ema_update", opaque=True)
        our_parts: list[dict] = []

        turn_ours, turn_stock = threading.Semaphore(0), threading.Semaphore(0)
        baton_ours = Baton(turn_ours, turn_stock, args.threads, on_step=lambda: our_parts.append(timer.take()[0]))
        baton_stock = Baton(turn_stock, turn_ours, args.threads)
        ours.add_callback(baton_ours)
        stock.add_callback(baton_stock)
        errors: list[BaseException] = []

        def run(trainer):
            try:
                trainer.train()
            except BaseException as e:  # noqa: BLE001 - reported by the main thread
                errors.append(e)
                (turn_stock if trainer is ours else turn_ours).release()

        threads = [threading.Thread(target=run, args=(t,)) for t in (ours, stock)]
        for thread in threads:
            thread.start()
        turn_ours.release()  # ours goes first
        for thread in threads:
            thread.join()
        timer.restore()
        if errors:
            raise errors[0]
        # fairness checks from each trainer's own log: completion lengths and total tokens seen
        fairness = {}
        for name, trainer in (("ours", ours), ("stock", stock)):
            history = [entry for entry in trainer.state.log_history if "completions/mean_length" in entry]
            fairness[f"{name}_completion_length_mean"] = median(e["completions/mean_length"] for e in history)
            fairness[f"{name}_num_tokens"] = trainer.state.num_input_tokens_seen

    ours_times = baton_ours.times[args.warmup:]
    stock_times = baton_stock.times[args.warmup:]
    ratios = [a / b for a, b in zip(ours_times, stock_times)]
    parts = our_parts[args.warmup:]
    for step, seconds in zip(parts, ours_times):
        step["other"] = seconds - sum(step.values())
    part_fraction = {p: median(step.get(p, 0.0) / s for step, s in zip(parts, ours_times)) for p in OUR_PARTS}
    part_seconds = {p: median(step.get(p, 0.0) for step in parts) for p in OUR_PARTS}
    result = {
        "num_generations": args.generations,
        "prompts": args.prompts,
        "max_completion_length": args.max_completion_length,
        "prompt_length_median": median(lengths),
        "ours_seconds": ours_times,
        "stock_seconds": stock_times,
        "ratios": ratios,
        "median_ratio": median(ratios),
        "ratio_of_medians": median(ours_times) / median(stock_times),
        "ours_median_seconds": median(ours_times),
        "stock_median_seconds": median(stock_times),
        "ours_part_seconds_median": part_seconds,
        "ours_part_fraction_median": part_fraction,
        "fairness": fairness,
        "target_ratio": TARGET_RATIO,
        "target_met": median(ratios) <= TARGET_RATIO,
    }
    print(format_table(
        ["G", "prompts", "prompt tokens", "completion tokens", "ours s (median)", "TRL s (median)", "median ratio",
         "ratio of medians", "target <= 1.15"],
        [[args.generations, args.prompts, result["prompt_length_median"], args.max_completion_length,
          result["ours_median_seconds"], result["stock_median_seconds"], result["median_ratio"],
          result["ratio_of_medians"], result["target_met"]]],
    ))
    print("fairness:", fairness)
    print()
    print(format_table(["our part", "s (median)", "% of our step (median)"],
                       [[p, part_seconds[p], 100 * part_fraction[p]] for p in OUR_PARTS]))
    output = {"command": "python benchmarks/" + Path(__file__).name + " " + " ".join(argv or sys.argv[1:]),
              "settings": vars(args), "environment": environment(), "result": result}
    return write_results(output, args.output)


if __name__ == "__main__":
    main()
