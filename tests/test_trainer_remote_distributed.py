"""`recipes/cycle.yaml` with `model_backend: remote` (the published model's own code, LoRA) on 2 CPU processes under
real DeepSpeed (and under DDP over gloo), against one process with the same global batch: the path the 8-GPU
recipe takes.

`@pytest.mark.official`: needs SA2VA_OFFICIAL_CODE (tests/published_sa2va.py), and skips with that reason otherwise
(as in CI). Each launch runs tests/dist_scripts/grpo_remote_run.py: 3 steps of both loops on a tiny random published
checkpoint, `per_sample_seeds` so that every sample is drawn the same whichever process draws it.

    SA2VA_OFFICIAL_CODE=/path/to/sa2va/hf/models python -m pytest -m official tests/test_trainer_remote_distributed.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "dist_scripts"))
import grpo_remote_run  # noqa: E402
import grpo_run  # noqa: E402
from published_sa2va import build_tiny_published, official, write_published_checkpoint  # noqa: E402
from test_trainer_distributed import launch, reports, torchrun, train_logs  # noqa: E402

from sa2va_trl.models import build_tiny_tokenizer  # noqa: E402

pytestmark = [official, pytest.mark.slow, pytest.mark.distributed]

SCRIPT = Path(grpo_remote_run.__file__)
PER_DEVICE = 2 * grpo_remote_run.G  # 2 prompts x G per process
# The same samples are scored the same in every run; only the float32 summation order differs.
EXACT_KEYS = ("reward", "reward_std", "completions/mean_length", "rewards/mask_to_caption/cycle_iou/mean",
              "rewards/caption_to_mask/cycle_meteor/mean", "rewards/caption_to_mask/mask_iou/mean")
LOSS_ATOL = 1e-6
GRAD_NORM_RTOL = 1e-4
# LoRA and the full parts after 3 Adam steps at lr 1e-3 (moves them by up to ~3e-3).
WEIGHT_ATOL = 2e-5


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tokenizer = build_tiny_tokenizer()
    model, _, code_dir = build_tiny_published(tokenizer)
    return str(write_published_checkpoint(model, code_dir, tmp_path_factory.mktemp("published"), tokenizer=tokenizer))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, checkpoint):
    out = tmp_path_factory.mktemp("single")
    trainer = grpo_remote_run.run(checkpoint, str(out), "--per_device_train_batch_size", str(2 * PER_DEVICE),
                                  "--use_cpu", "true")
    assert trainer.accelerator.num_processes == 1
    return {**grpo_run.report(trainer, str(out)), "output_dir": str(out)}


def _launch(tmp_path_factory, checkpoint, config, name):
    out = tmp_path_factory.mktemp(name)
    launch(config, str(SCRIPT), checkpoint, str(out), "--per_device_train_batch_size", str(PER_DEVICE))
    return out


@pytest.fixture(scope="module")
def ddp_dir(tmp_path_factory, checkpoint):
    out = tmp_path_factory.mktemp("ddp")
    torchrun(str(SCRIPT), checkpoint, str(out), "--per_device_train_batch_size", str(PER_DEVICE), "--use_cpu", "true")
    return out


@pytest.fixture(scope="module")
def zero2_dir(tmp_path_factory, checkpoint):
    return _launch(tmp_path_factory, checkpoint, "cpu_zero2.yaml", "zero2")


@pytest.fixture(scope="module")
def zero3_dir(tmp_path_factory, checkpoint):
    return _launch(tmp_path_factory, checkpoint, "cpu_zero3_partitioned.yaml", "zero3")


def _assert_matches_reference(output_dir: Path, reference: dict) -> None:
    r0, r1 = reports(output_dir)
    assert r0["world"] == r1["world"] == 2
    assert r0["weight_sum"] == r1["weight_sum"]  # both ranks end with the same weights
    steps, expected = train_logs(r0["log_history"]), train_logs(reference["log_history"])
    assert [e["step"] for e in steps] == [e["step"] for e in expected] == [1, 2, 3]
    for got, want in zip(steps, expected):
        for key in EXACT_KEYS:
            assert got.get(key) == want.get(key), (got["step"], key)
        assert abs(got["loss"] - want["loss"]) <= LOSS_ATOL, (got["step"], got["loss"], want["loss"])
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=GRAD_NORM_RTOL), got["step"]
    assert any(e["grad_norm"] > 0 for e in steps)
    got = torch.load(output_dir / "gathered.pt")
    want = torch.load(Path(reference["output_dir"]) / "gathered.pt")
    assert got.keys() == want.keys()
    lora = [name for name in want if ".lora_B." in name]
    assert lora and any(want[name].abs().sum() > 0 for name in lora)  # the adapters trained
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=WEIGHT_ATOL, msg=name)
    assert r0["reverse_is_ema"] and r0["live_restored"]


def test_remote_backend_under_zero2_matches_a_single_process_run(zero2_dir, reference):
    r0, _ = reports(zero2_dir)
    assert r0["zero_stage"] == 2 and not r0["zero3"]
    _assert_matches_reference(zero2_dir, reference)


def test_remote_backend_under_zero3_matches_a_single_process_run(zero3_dir, reference):
    r0, r1 = reports(zero3_dir)
    assert r0["zero_stage"] == 3 and r0["zero3"]
    # Between steps each rank holds only its partition of every parameter ZeRO-3 partitions.
    partitioned = [p for p in r0["params"].values() if not p["persistent"]]
    assert partitioned and all(p["materialised"] < p["numel"] for p in partitioned)
    _assert_matches_reference(zero3_dir, reference)


def test_remote_backend_under_ddp_matches_a_single_process_run(ddp_dir, reference):
    r0, _ = reports(ddp_dir)
    assert r0["distributed_type"] == "DistributedType.MULTI_CPU" and r0["zero_stage"] is None
    _assert_matches_reference(ddp_dir, reference)
