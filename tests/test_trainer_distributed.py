"""Two processes on the CPU under DeepSpeed: ZeRO-2 keeps the ranks' weights identical; ZeRO-3 is refused clearly."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import sys
    from sa2va_trl.compat import maybe_apply_cpu_deepspeed_fix
    maybe_apply_cpu_deepspeed_fix()
    from sa2va_trl.grpo import main, parse_args

    out = sys.argv[1]
    trainer = main(*parse_args([
        "recipes/demo.yaml", "--max_steps", "2", "--synthetic_images", "8", "--per_device_train_batch_size", "8",
        "--output_dir", out, "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true",
        "--learning_rate", "1e-2", "--use_cpu", "false",
    ]))
    model = trainer.accelerator.unwrap_model(trainer.model)
    total = sum(float(p.detach().double().sum()) for p in model.parameters())
    rank, world = trainer.accelerator.process_index, trainer.accelerator.num_processes
    open(f"{out}/paramsum_rank{rank}.txt", "w").write(f"{world} {total!r}")
    """
)


def launch(tmp_path, config: str, port: int) -> subprocess.CompletedProcess:
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "accelerate_configs" / config),
               "--main_process_port", str(port), str(script), str(tmp_path)]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)


@pytest.mark.slow
@pytest.mark.distributed
def test_zero2_two_processes_train_identical_weights(tmp_path):
    result = launch(tmp_path, "cpu_zero2.yaml", 29541)
    assert result.returncode == 0, result.stderr[-4000:]
    sums = [(tmp_path / f"paramsum_rank{r}.txt").read_text().split() for r in (0, 1)]
    assert [s[0] for s in sums] == ["2", "2"]  # really two processes
    assert sums[0][1] == sums[1][1]  # gradients were synchronised: same weights on both ranks


@pytest.mark.slow
@pytest.mark.distributed
def test_zero3_is_refused_with_a_clear_error(tmp_path):
    result = launch(tmp_path, "cpu_zero3.yaml", 29542)
    assert result.returncode != 0
    assert "does not support DeepSpeed ZeRO-3 yet" in result.stderr


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


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("redirect", [True, False])
def test_forward_through_wrapper_makes_ddp_average_the_gradients(tmp_path, redirect):
    import torch
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
