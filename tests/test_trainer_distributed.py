"""Two processes on the CPU under real DeepSpeed, against one process with the same global batch.

Runs of recipes/demo.yaml (3 steps, seed 13, 12 rows per process, `per_sample_seeds` so that every sample is
drawn the same whichever process draws it), each launched once per test module (on 2 cores: 20-30 s per launch
when idle, about twice that when other jobs share them):

- ZeRO-3 with every parameter partitioned (accelerate_configs/cpu_zero3_partitioned.yaml), through
  tests/dist_scripts/grpo_run.py, which reports each rank's view after training; it evaluates inside training and
  saves a checkpoint at step 2, from which a second launch resumes;
- the documented command with accelerate_configs/cpu_zero3.yaml (`-m sa2va_trl.grpo recipes/demo.yaml`);
- ZeRO-3 with LoRA and activation checkpointing (recipes/cycle.yaml's settings), against its own reference;
- ZeRO-2 (accelerate_configs/cpu_zero2.yaml), through the same script;
- DDP over gloo (`torchrun --nproc_per_node 2`), through the same script;
- the reference: the same recipe in this process, 24 rows per step.

Every run gives `text_hidden_fcs` its own learning rate (10x), so the comparisons also check that its optimizer
group survives DeepSpeed.

The DDP helper test at the end spawns its own two gloo processes (the redirect the whole DDP run relies on).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "dist_scripts" / "grpo_run.py"
sys.path.insert(0, str(SCRIPT.parent))

import grpo_run  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

# 2 processes x 12 rows (demo.yaml) = the reference's 24.
GLOBAL_BATCH = 24
# Agreement with the single-process run, steps 1-3. Measured (2 CPU processes, seed 13), ZeRO-3 and ZeRO-2 alike:
# |loss difference| <= 9.3e-9 (step 1: 0.017361784 vs 0.017361775, relative 5.4e-7), relative grad-norm
# difference <= 7.5e-7 (ZeRO-3) / 5.3e-7 (ZeRO-2); rewards, KL and completion lengths equal exactly. The rollouts
# are identical, so only the float32 summation order differs (gradient reduction, batch shapes).
LOSS_ATOL = 1e-6
GRAD_NORM_RTOL = 1e-5
GRAD_NORM_ATOL = 1e-8  # a step whose advantages are all 0 has only the KL gradient, ~1e-5
# Weights after the 3 steps (Adam, lr 1e-5, moves them by up to 3.0e-5): max |difference| from the single-process
# run measured 9.4e-7 (ZeRO-3) and 5.2e-8 (ZeRO-2); the two ZeRO-3 runs are bit-identical.
WEIGHT_ATOL = 5e-6
# The ZeRO-3 run also writes checkpoint-2 (model, EMA slices, optimizer partitions, RNG states) for the resume test.
CHECKPOINT_AT_2 = ["--save_strategy", "steps", "--save_steps", "2", "--save_total_limit", "2"]  # demo.yaml keeps 1
EXACT_KEYS = ("reward", "reward_std", "completions/mean_length", "rewards/mask_to_caption/cycle_iou/mean",
              "rewards/caption_to_mask/cycle_meteor/mean", "rewards/caption_to_mask/mask_iou/mean")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config: str, *command: str) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file accelerate_configs/CONFIG COMMAND`, 2 processes on the CPU."""
    full = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(free_port()),
            "--config_file", str(ROOT / "accelerate_configs" / config), *command]
    return _run(config, full)


def torchrun(*command: str) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 COMMAND`: plain DDP over gloo (accelerate sees MULTI_CPU). accelerate's own
    `--cpu` multi-process launch starts independent single processes on these machines."""
    full = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(free_port()), *command]
    return _run("torchrun", full)


def _run(name: str, full: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    # 600 s: the first DeepSpeed start on a fresh machine compiles a C++ op (~2 min on 2 busy cores); a run
    # takes ~1 min. A deadlock (ranks calling different collectives) ends here.
    result = subprocess.run(full, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        pytest.fail(f"{name} run failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


def reports(output_dir: Path) -> list[dict]:
    return [json.loads((output_dir / f"report_rank{r}.json").read_text()) for r in (0, 1)]


def train_logs(log_history: list[dict]) -> list[dict]:
    return [entry for entry in log_history if "loss" in entry and "train_runtime" not in entry]


def assert_steps_match(log_history: list[dict], reference: dict) -> None:
    steps, expected = train_logs(log_history), train_logs(reference["log_history"])
    assert [e["step"] for e in steps] == [e["step"] for e in expected] == [1, 2, 3]
    for got, want in zip(steps, expected):
        for key in EXACT_KEYS:
            assert got.get(key) == want.get(key), (got["step"], key)  # the same samples, scored the same
        assert abs(got["loss"] - want["loss"]) <= LOSS_ATOL, (got["step"], got["loss"], want["loss"])
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=GRAD_NORM_RTOL, abs=GRAD_NORM_ATOL), got["step"]
    assert steps[0]["grad_norm"] > 0.1  # a real update at step 1


def assert_weights_match(output_dir: Path, reference: dict) -> None:
    got, want = torch.load(output_dir / "gathered.pt"), torch.load(Path(reference["output_dir"]) / "gathered.pt")
    assert got.keys() == want.keys()
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=WEIGHT_ATOL)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    trainer = grpo_run.run(str(out), "--per_device_train_batch_size", str(GLOBAL_BATCH), "--use_cpu", "true")
    assert trainer.accelerator.num_processes == 1
    return {**grpo_run.report(trainer, str(out)), "output_dir": str(out)}


@pytest.fixture(scope="module")
def zero3_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero3")
    launch("cpu_zero3_partitioned.yaml", str(SCRIPT), str(out), *grpo_run.EVAL_FLAGS, *CHECKPOINT_AT_2)
    return out


@pytest.fixture(scope="module")
def zero2_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero2")
    launch("cpu_zero2.yaml", str(SCRIPT), str(out))
    return out


# --- ZeRO-3 ---------------------------------------------------------------------------------------------------------


def test_zero3_run_keeps_only_each_ranks_shard_of_every_parameter(zero3_dir):
    r0, r1 = reports(zero3_dir)
    for r in (r0, r1):
        assert r["world"] == 2 and r["distributed_type"] == "DistributedType.DEEPSPEED"
        assert r["zero_stage"] == 3 and r["zero3"]
        for name, p in r["params"].items():
            assert p["local"] == -(-p["numel"] // 2), name  # ceil(numel / 2): this rank's partition
            assert p["materialised"] == 0 and not p["persistent"], name  # nothing else is held between steps
    total = sum(p["numel"] for p in r0["params"].values())
    assert total > 900_000 and sum(p["local"] for p in r0["params"].values()) < 0.51 * total
    assert r0["weight_sum"] == r1["weight_sum"]  # both ranks gather the same model


def test_zero3_steps_match_a_single_process_run_with_the_same_global_batch(zero3_dir, reference):
    r0, r1 = reports(zero3_dir)
    # The case the training forward must handle: a step where one rank lacks a loop the other rank has.
    assert any(a[0] == b[0] and a[1] != b[1] for a, b in zip(r0["forward_loops"], r1["forward_loops"]))
    assert len(r0["forward_loops"]) == len(r1["forward_loops"]) == grpo_run.STEPS
    assert r0["param_group_lrs"] == reference["param_group_lrs"] == [1e-5, 1e-4]  # the projection's own group
    assert any(entry.get("learning_rate/text_hidden_fcs") == 1e-4 for entry in r0["log_history"])  # and its log
    assert_steps_match(r0["log_history"], reference)
    assert_weights_match(zero3_dir, reference)


def test_zero3_reverse_model_swaps_the_ema_slices_in_then_gathers(zero3_dir, reference):
    """`reverse_model()`: each rank's slice of the gathered weights is its EMA shadow, rank r makes r + 1 reverse
    calls inside (no collective), the live slices come back exactly; the EMA model captions like the
    single-process run's."""
    r0, r1 = reports(zero3_dir)
    for r in (r0, r1):
        assert r["reverse_is_ema"] and r["live_restored"] and r["ema_differs_from_live"]
    assert len(r0["reverse_captions"]) == 1 and len(r1["reverse_captions"]) == 2
    assert r1["reverse_captions"] == reference["reverse_captions"]
    assert r0["reverse_captions"] == reference["reverse_captions"][:1]


def test_zero3_evaluation_inside_training_gives_every_rank_the_same_metrics(zero3_dir):
    r0, r1 = reports(zero3_dir)
    evals = [[e for e in r["log_history"] if "eval_mean_iou" in e] for r in (r0, r1)]
    assert [e["step"] for e in evals[0]] == [3, 3]  # inside training at step 3, then main()'s final evaluate()
    assert evals[0] == evals[1]
    for key in ("eval_mean_iou", "eval_meteor", "eval_exact_match"):
        assert 0.0 < evals[0][0][key] <= 1.0


def test_zero3_saves_a_full_model_that_from_pretrained_loads(zero3_dir):
    """`zero3_save_16bit_model` / `stage3_gather_16bit_weights_on_model_save`: rank 0 writes the gathered model."""
    from sa2va_trl.models.adapter import Sa2VAPolicy
    from sa2va_trl.models.modeling_sa2va import Sa2VAModel

    gathered = torch.load(zero3_dir / "gathered.pt")
    loaded = Sa2VAPolicy.from_pretrained(str(zero3_dir))  # model.safetensors + tokenizer
    params = dict(loaded.model.named_parameters())
    assert params.keys() == gathered.keys()
    for name, value in gathered.items():
        torch.testing.assert_close(params[name], value, rtol=0, atol=0)
    ema = dict(Sa2VAModel.from_pretrained(str(zero3_dir / "ema_model")).named_parameters())  # from the EMA shards
    assert ema.keys() == gathered.keys()
    moved = [n for n in ema if not torch.equal(ema[n], gathered[n])]
    assert moved and all(n.startswith(("language_model", "mlp1", "text_hidden_fcs", "grounding_encoder.mask_decoder"))
                         for n in moved)  # the EMA lags the trained parts only


def test_zero3_documented_command_completes_and_equals_the_partitioned_run(tmp_path, zero3_dir, reference):
    """`accelerate launch --config_file accelerate_configs/cpu_zero3.yaml -m sa2va_trl.grpo recipes/demo.yaml
    --max_steps 3`: the default persistence threshold keeps the tiny model's tensors whole on each rank."""
    out = tmp_path / "run"
    launch("cpu_zero3.yaml", "-m", "sa2va_trl.grpo", "recipes/demo.yaml", "--max_steps", "3", "--output_dir", str(out),
           "--report_to", "none", "--per_sample_seeds", "true", "--seed", str(grpo_run.SEED), "--save_strategy", "no",
           "--text_hidden_fcs_learning_rate", "1e-4")
    state = json.loads((out / "trainer_state.json").read_text())
    assert_steps_match(state["log_history"], reference)  # two processes, 12 rows each
    from sa2va_trl.models.adapter import Sa2VAPolicy

    loaded = Sa2VAPolicy.from_pretrained(str(out))
    gathered = torch.load(zero3_dir / "gathered.pt")  # the same 3 steps, every parameter partitioned
    for name, param in loaded.model.named_parameters():
        torch.testing.assert_close(param, gathered[name], rtol=0, atol=0)  # measured: bit-identical


def test_zero3_run_resumed_from_its_checkpoint_ends_identical_with_its_ema(tmp_path, zero3_dir):
    """Interrupted after step 2 and relaunched with `--resume_from_checkpoint`: step 3 is the same step, and the
    weights and the EMA end bit for bit where the uninterrupted run's did."""
    from sa2va_trl.models.modeling_sa2va import Sa2VAModel

    checkpoint = zero3_dir / "checkpoint-2"
    assert (checkpoint / "trainer_state.json").is_file()
    out = tmp_path / "resumed"
    launch("cpu_zero3_partitioned.yaml", str(SCRIPT), str(out), *grpo_run.EVAL_FLAGS, *CHECKPOINT_AT_2,
           "--resume_from_checkpoint", str(checkpoint))
    resumed, uninterrupted = reports(out)[0], reports(zero3_dir)[0]
    steps = train_logs(resumed["log_history"])
    assert [e["step"] for e in steps] == [1, 2, 3]  # steps 1-2 come from the checkpoint's log history
    assert {step for step, _ in resumed["forward_loops"]} == {3}  # this launch trained step 3 only
    want = train_logs(uninterrupted["log_history"])[2]
    for key in (*EXACT_KEYS, "loss", "grad_norm", "kl"):
        assert steps[2][key] == want[key], key
    got, ref = torch.load(out / "gathered.pt"), torch.load(zero3_dir / "gathered.pt")
    for name, value in ref.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=0)
    ema = dict(Sa2VAModel.from_pretrained(str(out / "ema_model")).named_parameters())
    for name, value in Sa2VAModel.from_pretrained(str(zero3_dir / "ema_model")).named_parameters():
        torch.testing.assert_close(ema[name], value, rtol=0, atol=0)
    assert resumed["reverse_is_ema"] and resumed["live_restored"]


# --- two micro-batches per generation: chunked old / reference log-probs, gradient accumulation -------------------

TWO_MICRO_BATCHES = ["--steps_per_generation", "2", "--gradient_accumulation_steps", "2"]


@pytest.fixture(scope="module")
def accumulation_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("single_accumulation")
    trainer = grpo_run.run(str(out), "--per_device_train_batch_size", str(GLOBAL_BATCH), "--use_cpu", "true",
                           *TWO_MICRO_BATCHES)
    return {**grpo_run.report(trainer, str(out)), "output_dir": str(out)}


@pytest.fixture(scope="module")
def zero3_accumulation_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero3_accumulation")
    launch("cpu_zero3_partitioned.yaml", str(SCRIPT), str(out), *TWO_MICRO_BATCHES)
    return out


def assert_chunked_with_a_one_loop_chunk(r0: dict, r1: dict) -> None:
    """TRL asked for each rank's reference log-probs (24 rows) in chunks of 12 (which the trainer honours:
    tests/test_trainer.py), and some chunk lacked a loop, so that rank ran the loop's placeholder in step."""
    assert any(len(call) > 1 for call in r0["no_grad_logprob_chunks"])
    chunks = [chunk for call in r0["no_grad_logprob_chunks"] + r1["no_grad_logprob_chunks"] for chunk in call]
    assert any(len(loops) == 1 for loops in chunks)


def test_zero2_accumulating_two_micro_batches_trains_like_a_single_process_run(tmp_path, accumulation_reference):
    launch("cpu_zero2.yaml", str(SCRIPT), str(tmp_path), *TWO_MICRO_BATCHES)
    r0, r1 = reports(tmp_path)
    assert r0["zero_stage"] == 2
    assert_chunked_with_a_one_loop_chunk(r0, r1)
    assert_steps_match(r0["log_history"], accumulation_reference)
    assert_weights_match(tmp_path, accumulation_reference)


def test_zero3_accumulating_two_micro_batches_scores_the_same_samples(zero3_accumulation_dir, accumulation_reference):
    r0, r1 = reports(zero3_accumulation_dir)
    assert r0["zero3"]
    assert_chunked_with_a_one_loop_chunk(r0, r1)  # and no rank hung in a chunk's collective gathers
    steps, expected = train_logs(r0["log_history"]), train_logs(accumulation_reference["log_history"])
    assert [e["step"] for e in steps] == [e["step"] for e in expected] == [1, 2, 3]
    # Step 1 starts from the same weights: the same samples, rewards and loss (later steps follow the update below).
    assert all(steps[0].get(key) == expected[0].get(key) for key in EXACT_KEYS)
    assert abs(steps[0]["loss"] - expected[0]["loss"]) <= LOSS_ATOL


@pytest.mark.xfail(strict=True, reason="open: under ZeRO-3 with gradient accumulation the update differs from the "
                   "single-process run (step-1 grad norm 0.328 vs 0.476; DDP and ZeRO-2 match); not caused by the "
                   "chunking (the same figures before it)")
def test_zero3_accumulating_two_micro_batches_trains_like_a_single_process_run(zero3_accumulation_dir,
                                                                               accumulation_reference):
    assert_steps_match(reports(zero3_accumulation_dir)[0]["log_history"], accumulation_reference)
    assert_weights_match(zero3_accumulation_dir, accumulation_reference)


# --- ZeRO-3 with LoRA and activation checkpointing (recipes/cycle.yaml's settings) ------------------------------------

# TRL forces reentrant checkpointing for PEFT + ZeRO-3; with it the first step holding both loops fails DeepSpeed's
# "each parameter reduced once per bucket" assertion (the language model runs once per loop). The trainer turns it
# back to non-reentrant (`Sa2VAGRPOTrainer._use_non_reentrant_checkpointing`).
LORA_CHECKPOINTING = ["--use_peft", "true", "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0",
                      "--activation_checkpointing", "true"]


@pytest.fixture(scope="module")
def lora_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("single_lora")
    trainer = grpo_run.run(str(out), "--per_device_train_batch_size", str(GLOBAL_BATCH), "--use_cpu", "true",
                           *LORA_CHECKPOINTING)
    return {**grpo_run.report(trainer, str(out)), "output_dir": str(out)}


def test_zero3_lora_with_activation_checkpointing_trains_like_a_single_process_run(tmp_path, lora_reference):
    launch("cpu_zero3_partitioned.yaml", str(SCRIPT), str(tmp_path), *LORA_CHECKPOINTING)
    r0, r1 = reports(tmp_path)
    assert r0["zero3"] and r0["weight_sum"] == r1["weight_sum"]
    assert any(len(loops) == 2 for _, loops in r0["forward_loops"])  # a forward with both loops: the failing case
    assert_steps_match(r0["log_history"], lora_reference)
    assert_weights_match(tmp_path, lora_reference)
    lora_b = [name for name in r0["params"] if ".lora_B." in name]
    gathered = torch.load(tmp_path / "gathered.pt")
    assert lora_b and any(gathered[name].abs().sum() > 0 for name in lora_b)  # the adapters trained


# --- ZeRO-2 ---------------------------------------------------------------------------------------------------------


def test_zero2_ranks_train_identical_weights_matching_a_single_process_run(zero2_dir, reference):
    r0, r1 = reports(zero2_dir)
    assert r0["world"] == 2 and r0["zero_stage"] == 2 and not r0["zero3"]
    assert r0["weight_sum"] == r1["weight_sum"]  # gradients were synchronised: same weights on both ranks
    assert r0["param_group_lrs"] == reference["param_group_lrs"] == [1e-5, 1e-4]  # the projection's own group
    assert any(entry.get("learning_rate/text_hidden_fcs") == 1e-4 for entry in r0["log_history"])  # and its log
    assert_steps_match(r0["log_history"], reference)
    assert_weights_match(zero2_dir, reference)


# --- DDP ------------------------------------------------------------------------------------------------------------


def test_ddp_run_trains_identical_ranks_matching_a_single_process_run(tmp_path, reference):
    torchrun(str(SCRIPT), str(tmp_path), "--use_cpu", "true")
    r0, r1 = reports(tmp_path)
    assert r0["world"] == 2 and r0["distributed_type"] == "DistributedType.MULTI_CPU" and r0["zero_stage"] is None
    assert r0["weight_sum"] == r1["weight_sum"]  # DDP averaged the gradients: the same weights on both ranks
    assert r0["param_group_lrs"] == reference["param_group_lrs"] == [1e-5, 1e-4]
    assert_steps_match(r0["log_history"], reference)
    assert_weights_match(tmp_path, reference)
    assert r0["reverse_is_ema"] and r0["live_restored"]


# The training forward must run as the wrapper's forward:


def _ddp_worker(rank: int, init_file: str, redirect: bool, results):
    import torch
    import torch.distributed as dist

    from sa2va_trl.trainer import forward_through_wrapper

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)
    inner = torch.nn.Linear(3, 1)
    model = torch.nn.parallel.DistributedDataParallel(inner, find_unused_parameters=True)  # as the trainer sets it

    def compute():  # what the adapter does: call the wrapped module's parts directly, rank-dependent data
        return (inner.weight * (rank + 1)).sum()

    loss = forward_through_wrapper(model, compute) if redirect else compute()
    loss.backward()
    results[rank] = inner.weight.grad.clone()
    dist.destroy_process_group()


@pytest.mark.parametrize("redirect", [True, False])
def test_forward_through_wrapper_makes_ddp_average_the_gradients(tmp_path, redirect):
    import torch.multiprocessing as mp

    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), redirect, results), nprocs=2, join=True)
    grads = [results[0], results[1]]
    if redirect:  # the mean of the ranks' gradients (1 and 2) on both ranks
        for grad in grads:
            torch.testing.assert_close(grad, torch.full((1, 3), 1.5))
    else:  # the trap this helper exists for: calling submodules directly skips DDP's all-reduce
        assert not torch.equal(grads[0], grads[1])
