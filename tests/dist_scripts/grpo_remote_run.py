"""A short GRPO run of recipes/cycle.yaml with `model_backend: remote` on a tiny checkpoint of the published Sa2VA
code, through `sa2va_trl.grpo.main`, launched under DDP / DeepSpeed (or run in-process as the single-process
reference). Launched by tests/test_trainer_remote_distributed.py:

    SA2VA_OFFICIAL_CODE=... DS_ACCELERATOR=cpu accelerate launch --config_file accelerate_configs/cpu_zero2.yaml \
        tests/dist_scripts/grpo_remote_run.py CHECKPOINT OUT [extra recipe flags]

CHECKPOINT is a tiny published checkpoint (tests/published_sa2va.py `write_published_checkpoint`); each process
loads it through the project's own loader, with the tests' stand-ins for torchvision / timm and the small SAM2 image
encoder (`use_tiny_published_loaders`). After `main` returns, each rank writes the report of grpo_run.py
(OUT/report_rank{r}.json; rank 0 also OUT/gathered.pt).
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
for path in (REPO, HERE, os.path.dirname(HERE)):
    if path not in sys.path:
        sys.path.insert(0, path)

from sa2va_trl.compat import maybe_apply_cpu_deepspeed_fix  # noqa: E402

maybe_apply_cpu_deepspeed_fix()  # before anything builds the accelerate state

import pytest  # noqa: E402

import grpo_run  # noqa: E402
from published_sa2va import use_tiny_published_loaders  # noqa: E402

STEPS = 3
# Seed 0: every step has loop-2 rows whose answers hold [SEG], so text_hidden_fcs and the mask path get a gradient at
# every step. A step without one would separate the runs for a reason of the optimizers, not of the trainer:
# torch's AdamW skips a parameter whose gradient is None, DeepSpeed's optimizer steps it with zeros (its moments
# decay, its step count grows); measured with seed 13, text_hidden_fcs then moves 0.74 x lr vs 0.64 x lr at step 3.
SEED = 0
G = 2


def recipe_flags(checkpoint: str) -> list[str]:
    """recipes/cycle.yaml as it is (LoRA, both loops, EMA + KL, activation checkpointing, merged saves), on the tiny
    checkpoint, the shapes world and the CPU: smaller batch, LoRA rank and step count. No LoRA dropout: its masks
    are drawn from each process's own random stream, so they would differ from the single-process run's."""
    return [
        os.path.join(REPO, "recipes", "cycle.yaml"), "--model_backend", "remote", "--trust_remote_code", "true",
        "--model_name_or_path", checkpoint, "--dataset_format", "synthetic", "--synthetic_images", "8",
        "--min_region_cells", "1", "--dtype", "float32", "--bf16", "false", "--lora_r", "8", "--lora_alpha", "16",
        "--lora_dropout", "0", "--num_generations", str(G), "--gradient_accumulation_steps", "1", "--steps_per_generation", "1",
        "--max_completion_length", "8", "--learning_rate", "1e-3", "--max_steps", str(STEPS), "--seed", str(SEED),
        "--per_sample_seeds", "true", "--logging_steps", "1", "--report_to", "none", "--log_completions", "false",
        "--disable_tqdm", "true", "--save_strategy", "no", "--eval_strategy", "no", "--save_merged_model", "false",
    ]  # fmt: skip


def run(checkpoint: str, output_dir: str, *extra: str):
    from sa2va_trl.grpo import main, parse_args

    with pytest.MonkeyPatch.context() as patch:
        use_tiny_published_loaders(patch)
        return main(*parse_args([*recipe_flags(checkpoint), "--output_dir", output_dir, *extra]))


if __name__ == "__main__":
    checkpoint, out = sys.argv[1], sys.argv[2]
    trainer = run(checkpoint, out, "--use_cpu", "false", *sys.argv[3:])
    grpo_run.report(trainer, out)
