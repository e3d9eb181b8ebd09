"""How a cycle-GRPO step of the tiny model grows with G, batch size, image size and caption length.

    python benchmarks/scaling.py [--repeats 3] [--warmup 1] [--steps 3] [--threads 1]
                                 [--output benchmarks/results/scaling.json]
    python benchmarks/scaling.py --quick [--axes generations]   # both ends of each axis, one repeat, one step

Each configuration runs in its own subprocess (`--child`): it builds the demo recipe's trainer
(`step_breakdown.build_trainer`: both loops, cycle rewards, EMA reference, beta 0.04), trains warmup + steps
steps and reports the median step time (between consecutive `on_step_end`s) and the peak memory of training:
`resource.getrusage(RUSAGE_SELF).ru_maxrss` after training minus the same after building the trainer and loading
METEOR's WordNet (the high-water mark of resident memory, which sees torch's allocations, unlike tracemalloc; a
delta of 0 means the training steps never exceeded the set-up's peak). Configurations run round-robin,
`--repeats` times, and the median over repeats is reported; each axis varies one setting from the base (G 4,
2 prompts, 128 px, 12 completion tokens). Completions are forced to their maximum length (min_new_tokens),
so "caption length" is the number of generated tokens. The growth order is the least-squares slope of log(time)
or log(memory delta) against log(x), x = G, prompts, image pixels (side^2: vision tokens grow as side^2) or
completion tokens.
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import environment, format_table, loglog_slope, median, write_results  # noqa: E402

BASE = {"generations": 4, "prompts": 2, "image_size": 128, "completion_tokens": 12}
AXES = {
    "generations": [2, 4, 8],
    "prompts": [1, 2, 4],
    "image_size": [64, 128, 256],
    "completion_tokens": [6, 12, 24],
}
QUICK_AXES = {axis: [values[0], values[-1]] for axis, values in AXES.items()}


def axis_x(axis: str, value: int) -> float:
    return float(value * value) if axis == "image_size" else float(value)


def child(config: dict, warmup: int, steps: int, threads: int) -> dict:
    """Run one configuration in this process; returns step time and memory figures."""
    import torch
    import transformers

    from step_breakdown import build_trainer

    torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()
    from transformers import TrainerCallback

    class Steps(TrainerCallback):
        def __init__(self):
            self.times, self._last = [], None

        def on_train_begin(self, args, state, control, **kwargs):
            self._last = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            self.times.append(now - self._last)
            self._last = now

    with tempfile.TemporaryDirectory() as output_dir:
        trainer = build_trainer(config["generations"], config["prompts"], config["completion_tokens"], 0.04,
                                output_dir, warmup + steps, image_size=config["image_size"])
        language_model = trainer.policy.core.language_model
        original = language_model.generate

        @functools.wraps(original)
        def generate(*args, **kwargs):  # every completion (policy's; reverse model's up to its own budget) full length
            budget = kwargs["generation_config"].max_new_tokens
            kwargs["min_new_tokens"] = min(config["completion_tokens"], budget)
            return original(*args, **kwargs)

        language_model.generate = generate
        recorder = Steps()
        trainer.add_callback(recorder)
        from sa2va_trl.rewards.wordnet import load_wordnet

        load_wordnet()  # METEOR's WordNet (~100 MB of Python objects) loads lazily: keep it out of the delta
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        trainer.train()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"step_seconds": median(recorder.times[warmup:]), "maxrss_mb": after / 1024,
            "maxrss_setup_mb": before / 1024, "maxrss_delta_mb": (after - before) / 1024}


def configurations(axes: dict) -> list[tuple[str, dict]]:
    out = []
    for axis, values in axes.items():
        for value in values:
            out.append((axis, {**BASE, axis: value}))
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="two values per axis, one repeat, 1 step")
    parser.add_argument("--axes", nargs="+", choices=list(AXES), default=list(AXES), help="axes to vary")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "scaling.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child), args.warmup, args.steps, args.threads)))
        return {}
    if args.quick:
        args.repeats, args.warmup, args.steps = 1, 0, 1
    import torch

    torch.set_num_threads(args.threads)  # only so the recorded environment says what the children use
    axes = {axis: values for axis, values in (QUICK_AXES if args.quick else AXES).items() if axis in args.axes}
    configs = configurations(axes)
    runs: dict[str, list[dict]] = {}
    for _ in range(args.repeats):  # round-robin: load drifts hit every configuration alike
        for axis, config in configs:
            key = json.dumps(config, sort_keys=True)
            if key in runs and len(runs[key]) > _:
                continue  # the base configuration appears on every axis: run it once per repeat
            command = [sys.executable, str(Path(__file__).resolve()), "--child", key, "--warmup", str(args.warmup),
                       "--steps", str(args.steps), "--threads", str(args.threads)]
            done = subprocess.run(command, capture_output=True, text=True)
            line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
            if done.returncode != 0 or line is None:
                raise RuntimeError(f"configuration {config} failed:\n{done.stderr[-3000:]}")
            runs.setdefault(key, []).append(json.loads(line[len("RESULT "):]))

    rows, summary = [], {}
    for axis, values in axes.items():
        points = []
        for value in values:
            key = json.dumps({**BASE, axis: value}, sort_keys=True)
            seconds = median(r["step_seconds"] for r in runs[key])
            delta = median(r["maxrss_delta_mb"] for r in runs[key])
            peak = median(r["maxrss_mb"] for r in runs[key])
            points.append({"value": value, "step_seconds": seconds, "maxrss_delta_mb": delta, "maxrss_mb": peak,
                           "repeats": len(runs[key])})
        xs = [axis_x(axis, p["value"]) for p in points]
        time_slope = loglog_slope(xs, [p["step_seconds"] for p in points])
        positive = [(x, p["maxrss_delta_mb"]) for x, p in zip(xs, points) if p["maxrss_delta_mb"] > 0]
        memory_slope = loglog_slope(*map(list, zip(*positive))) if len(positive) >= 2 else float("nan")
        peak_slope = loglog_slope(xs, [p["maxrss_mb"] for p in points])
        summary[axis] = {"points": points, "time_loglog_slope": time_slope, "memory_delta_loglog_slope": memory_slope,
                         "peak_rss_loglog_slope": peak_slope, "x": "pixels (side^2)" if axis == "image_size" else axis}
        for p in points:
            rows.append([axis, p["value"], p["step_seconds"], p["maxrss_delta_mb"], p["maxrss_mb"]])
    print(format_table(["axis", "value", "step s (median)", "peak RSS delta MB", "peak RSS MB"], rows))
    print()
    print(format_table(["axis", "x", "time slope", "RSS-delta slope", "peak-RSS slope"],
                       [[a, s["x"], s["time_loglog_slope"], s["memory_delta_loglog_slope"], s["peak_rss_loglog_slope"]]
                        for a, s in summary.items()]))
    output = {"command": "python benchmarks/" + Path(__file__).name + " " + " ".join(argv or sys.argv[1:]),
              "settings": vars(args), "base": BASE, "environment": environment(),
              "memory_method": "resource.getrusage(RUSAGE_SELF).ru_maxrss in a fresh subprocess per run: after "
                               "training minus after building the trainer and loading WordNet",
              "axes": summary, "runs": runs}
    return write_results(output, args.output)


if __name__ == "__main__":
    main()
