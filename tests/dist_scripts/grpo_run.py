"""A short GRPO run of recipes/demo.yaml through `sa2va_trl.grpo.main`, launched under DeepSpeed (or run
in-process as the single-process reference). Launched by tests/test_trainer_distributed.py:

    DS_ACCELERATOR=cpu accelerate launch --config_file accelerate_configs/cpu_zero3_partitioned.yaml \
        tests/dist_scripts/grpo_run.py OUT [extra recipe flags]

Every run samples with `per_sample_seeds`, so a sample does not depend on the process that draws it
(`EVAL_FLAGS` add an evaluation inside training). After `main` returns (model saved, evaluation done) each rank
writes OUT/report_rank{r}.json: world size, ZeRO stage, its log history, the loops of each training forward,
a check of the reverse (EMA) model (`check_reverse_model`), and for every parameter its full
size, the size of this rank's partition and how many elements are materialised now (ZeRO-3: only the
partition should exist between steps), plus the sum of all (gathered) weights. Rank 0 also writes
OUT/gathered.pt, the full weights gathered from the ranks' partitions, to compare with the saved model.
"""

from __future__ import annotations

import json
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from sa2va_trl.compat import maybe_apply_cpu_deepspeed_fix  # noqa: E402

maybe_apply_cpu_deepspeed_fix()  # before anything builds the accelerate state

STEPS = 3
# Seed 13: at steps 1 and 3 one process holds rows of a single loop while the other holds both loops (each
# report lists the loops of every training forward), the case where ranks would call different modules; and
# step 1 already has non-zero advantages (grad norm 0.81, loss 0.017 in one process).
SEED = 13
RECIPE_FLAGS = [
    "recipes/demo.yaml", "--max_steps", str(STEPS), "--seed", str(SEED), "--per_sample_seeds", "true",
    "--report_to", "none", "--disable_tqdm", "true", "--save_strategy", "no", "--sample_overlay_steps", "0",
    "--text_hidden_fcs_learning_rate", "1e-4",  # the projection's own optimizer group must survive DeepSpeed
]  # fmt: skip
# Evaluation inside training, at the last step (and, through `do_eval`, once more after saving).
EVAL_FLAGS = ["--eval_strategy", "steps", "--eval_steps", str(STEPS)]


# (step, loops of the samples) of every training forward of this process
FORWARD_LOOPS: list[tuple[int, list[str]]] = []
# Every no-grad log-prob call (TRL's old / reference log-probs) of this process: the loops of each chunk of its rows
NO_GRAD_CHUNKS: list[list[list[str]]] = []


def _record_forward_loops() -> None:
    from sa2va_trl.trainer import Sa2VAGRPOTrainer

    original = Sa2VAGRPOTrainer._get_per_token_logps_and_entropies
    if getattr(original, "_recording", False):
        return

    def recording(self, *args, **kwargs):
        if torch.is_grad_enabled() and self._active_samples is not None:
            tasks = {self._generation.tasks[int(p)] for p in self._active_samples.tolist()}
            FORWARD_LOOPS.append((self.state.global_step + 1, sorted(tasks)))
        elif not torch.is_grad_enabled():
            rows, size = int(args[1].shape[0]), kwargs.get("batch_size") or int(args[1].shape[0])
            tasks = self._generation.tasks
            NO_GRAD_CHUNKS.append([sorted(set(tasks[s:s + size])) for s in range(0, rows, size)])
        return original(self, *args, **kwargs)

    recording._recording = True
    Sa2VAGRPOTrainer._get_per_token_logps_and_entropies = recording


def run(output_dir: str, *extra: str):
    """`python -m sa2va_trl.grpo recipes/demo.yaml` with the flags above (in this process)."""
    from sa2va_trl.grpo import main, parse_args

    _record_forward_loops()
    FORWARD_LOOPS.clear()
    NO_GRAD_CHUNKS.clear()
    return main(*parse_args([*RECIPE_FLAGS, "--output_dir", output_dir, *extra]))


def _full(param: torch.Tensor) -> torch.Tensor:
    """The whole tensor (gathered from every rank's partition under ZeRO-3; collective there)."""
    if not hasattr(param, "ds_id"):
        return param.detach().cpu().clone()
    import deepspeed

    with deepspeed.zero.GatheredParameters([param]):
        return param.detach().cpu().clone()


def check_reverse_model(trainer) -> dict:
    """Inside `trainer.reverse_model()` (collective under ZeRO-3): does every trainable parameter hold the EMA
    (this rank's slice of the gathered tensor equals the EMA shadow), and can this rank call the reverse model a
    number of times the other rank does not match (rank r captions r + 1 rows)? After it: are the live weights
    back bit for bit?"""
    ema, rank = trainer.ema, trainer.accelerator.process_index
    rows = trainer._eval_rows if trainer._eval_rows is not None else trainer.train_dataset
    live = {name: slot.local().detach().clone() for name, slot in ema._slots.items()}
    with trainer.reverse_model():
        is_ema = all(
            torch.equal(slot.param.data.reshape(-1).narrow(0, slot.offset, slot.length), ema.shadow[name].reshape(-1))
            for name, slot in ema._slots.items()
        )
        count = rank + 1 if trainer.accelerator.num_processes > 1 else 2  # one process: what rank 1 does
        captions = [trainer.reverse_policy.caption([rows[i]["img"]], [rows[i]["region_mask"]])[0] for i in range(count)]
    restored = all(torch.equal(slot.local(), live[name]) for name, slot in ema._slots.items())
    differs = any(not torch.equal(live[name], ema.shadow[name].view_as(live[name])) for name in live)
    return {"reverse_is_ema": is_ema, "live_restored": restored, "ema_differs_from_live": differs,
            "reverse_captions": captions}


def report(trainer, output_dir: str) -> dict:
    model = trainer.accelerator.unwrap_model(trainer.model)
    rank, world = trainer.accelerator.process_index, trainer.accelerator.num_processes
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    params = {}
    for name, p in model.named_parameters():
        zero3 = hasattr(p, "ds_id")
        params[name] = {
            "numel": int(p.ds_numel) if zero3 else p.numel(),
            "local": p.ds_tensor.numel() if zero3 else p.numel(),
            "materialised": p.data.numel(),
            "persistent": bool(getattr(p, "ds_persist", False)),
        }
    gathered = {name: _full(p) for name, p in model.named_parameters()}  # every rank: collective under ZeRO-3
    reverse = check_reverse_model(trainer)
    result = {
        "rank": rank,
        "world": world,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "zero_stage": plugin.zero_stage if plugin is not None else None,
        "zero3": trainer.zero3,
        "log_history": trainer.state.log_history,
        "forward_loops": FORWARD_LOOPS,
        "no_grad_logprob_chunks": NO_GRAD_CHUNKS,
        "params": params,
        "weight_sum": sum(float(t.double().sum()) for t in gathered.values()),
        "param_group_lrs": sorted({float(g["lr"]) for g in trainer.optimizer.param_groups}),
        **reverse,
    }
    with open(os.path.join(output_dir, f"report_rank{rank}.json"), "w") as f:
        json.dump(result, f)
    if rank == 0:
        torch.save(gathered, os.path.join(output_dir, "gathered.pt"))
    return result


if __name__ == "__main__":
    out = sys.argv[1]
    trainer = run(out, "--use_cpu", "false", *sys.argv[2:])
    report(trainer, out)
