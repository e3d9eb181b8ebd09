"""A tiny Trainer run with EMACallback, launched under DeepSpeed (or run in-process as the reference).

Launched by tests/test_ema_distributed.py:

    DS_ACCELERATOR=cpu accelerate launch --config_file accelerate_configs/cpu_zero3.yaml \
        tests/dist_scripts/ema_zero.py --output_dir OUT --steps 4 --per_device_batch 2

Each rank writes OUT/report_rank{r}.json: its shadow sizes, which trainable parameters are ZeRO-3
partitioned / persistent, and how many collectives the EMA updates issued (must be 0) next to a
positive control (the collectives a swap-in issues, which re-gathers persistent parameters).
The importable helpers (`TinyRegressor`, `make_dataset`, `train`) also give the single-process
reference with the same data, seeds and global batch.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import torch
from torch import nn

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from sa2va_trl.compat import maybe_apply_cpu_deepspeed_fix  # noqa: E402

maybe_apply_cpu_deepspeed_fix()  # before anything builds the accelerate state

from transformers import PretrainedConfig, PreTrainedModel, Trainer, TrainingArguments  # noqa: E402

from sa2va_trl.ema import EMACallback  # noqa: E402

IN_FEATURES, MID, HIDDEN, OUT = 8, 24, 4200, 3
NUM_ROWS = 64


class TinyConfig(PretrainedConfig):
    model_type = "sa2va_trl_test_tiny_regressor"

    def __init__(self, hidden_size: int = 16, **kwargs):
        # transformers fills DeepSpeed's "auto" sizes from hidden_size (the accelerate configs
        # leave the persistence threshold at DeepSpeed's default, 1e5 elements).
        self.hidden_size = hidden_size
        super().__init__(**kwargs)


class TinyRegressor(PreTrainedModel):
    """frozen Linear(8, 24) -> Linear(24, 32) -> tanh -> Linear(32, 3); MSE loss. No dropout."""

    config_class = TinyConfig

    def __init__(self, config: TinyConfig):
        super().__init__(config)
        self.frozen_in = nn.Linear(IN_FEATURES, MID)
        # fc1.weight (100,800 elements) is above DeepSpeed's persistence threshold (1e5): only the
        # slices exist between steps. The others are "persistent" (kept gathered between steps);
        # fc2.bias (3 elements) is padded to 4 for 2 ranks.
        self.fc1 = nn.Linear(MID, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, OUT)
        self.frozen_in.requires_grad_(False)
        self.post_init()

    def _init_weights(self, module):
        pass  # the seeded nn.Linear initialisation is kept

    def forward(self, x, y=None):
        pred = self.fc2(torch.tanh(self.fc1(self.frozen_in(x))))
        loss = None if y is None else torch.nn.functional.mse_loss(pred, y)
        return {"loss": loss, "logits": pred}


class _Rows(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


def make_model(seed: int = 0) -> TinyRegressor:
    torch.manual_seed(seed)
    return TinyRegressor(TinyConfig())


def make_dataset(seed: int = 1) -> _Rows:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(NUM_ROWS, IN_FEATURES, generator=g)
    w = torch.randn(IN_FEATURES, OUT, generator=g)
    return _Rows(x, torch.sin(x @ w))


def training_args(output_dir: str, steps: int, per_device_batch: int, save_steps: int, **kw) -> TrainingArguments:
    return TrainingArguments(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=per_device_batch,
        learning_rate=0.01,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,  # no clipping: the 1- and 2-process runs must take the same steps
        train_sampling_strategy="sequential",  # step k sees rows [4k, 4k + 4) in both layouts
        save_strategy="steps",
        save_steps=save_steps,
        logging_steps=1,
        report_to=[],
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        disable_tqdm=True,
        **kw,
    )


# ---- counting collectives -------------------------------------------------------------------

_COLLECTIVES = (
    "all_gather", "all_gather_into_tensor", "all_gather_base", "all_gather_coalesced", "allgather_fn",
    "all_gather_object", "_all_gather_base", "all_reduce", "all_reduce_coalesced", "broadcast",
    "reduce_scatter_tensor", "reduce_scatter_fn", "reduce", "all_to_all_single",
)


@contextlib.contextmanager
def count_collectives():
    """Count calls of the gather/reduce/broadcast collectives, at the torch and DeepSpeed layers."""
    counts = {"n": 0}
    owners = [torch.distributed, torch.distributed.distributed_c10d]
    backend = None  # DeepSpeed's TorchBackend holds torch functions captured at start-up
    with contextlib.suppress(ImportError):
        import deepspeed.comm as ds_comm
        import deepspeed.comm.comm as ds_comm_impl

        backend = getattr(ds_comm_impl, "cdb", None)
        owners += [ds_comm, ds_comm_impl] + ([backend] if backend is not None else [])
    saved = []
    for owner in owners:
        for name in _COLLECTIVES + (("all_gather_function",) if owner is backend else ()):
            original = getattr(owner, name, None)
            if not callable(original):
                continue

            def counting(*args, __original=original, **kwargs):
                counts["n"] += 1
                return __original(*args, **kwargs)

            saved.append((owner, name, original))
            setattr(owner, name, counting)
    try:
        yield counts
    finally:
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)


class CountingEMACallback(EMACallback):
    """EMACallback that records the collectives issued inside its update (expected: none)."""

    update_collectives = 0
    num_hook_updates = 0

    def on_step_end(self, args, state, control, model=None, **kwargs):
        with count_collectives() as counts:
            super().on_step_end(args, state, control, model=model, **kwargs)
        self.update_collectives += counts["n"]
        self.num_hook_updates += 1


def train(
    output_dir: str,
    steps: int,
    per_device_batch: int,
    save_steps: int,
    decay: float,
    resume: str | None = None,
    save_ema_model: bool = False,
):
    model = make_model()
    # The resume path goes through args (as the entry points do), which is where EMACallback looks.
    args = training_args(output_dir, steps, per_device_batch, save_steps, resume_from_checkpoint=resume)
    ema = CountingEMACallback(decay=decay, warmup="ratio", save_ema_model=save_ema_model)
    trainer = Trainer(model=model, args=args, train_dataset=make_dataset(), callbacks=[ema])
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    return trainer, ema


def probe_inputs() -> torch.Tensor:
    return make_dataset().x[:4]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--per_device_batch", type=int, default=2)
    parser.add_argument("--save_steps", type=int, default=2)
    parser.add_argument("--decay", type=float, default=0.9)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--save_ema_model", action="store_true", help="also write checkpoint-N/ema_model")
    parser.add_argument(
        "--resume_check",
        action="store_true",
        help="afterwards, in the same process, resume a second Trainer from checkpoint-<save_steps> to "
        "--steps in OUTPUT_DIR/resumed (cheaper than a second launch)",
    )
    cli = parser.parse_args()

    trainer, ema = train(
        cli.output_dir, cli.steps, cli.per_device_batch, cli.save_steps, cli.decay, cli.resume, cli.save_ema_model
    )
    model = trainer.model
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    slots = ema._slots.values()
    before = [s.local().clone() for s in slots]
    with count_collectives() as swap_counts:  # positive control: the swap re-gathers persistent params
        with torch.no_grad(), ema.swapped_in(model):
            swap_logits = model(probe_inputs())["logits"]  # a gathered forward sees the EMA weights
    restored_exactly = all(torch.equal(b, s.local()) for b, s in zip(before, slots))
    report = {
        "rank": rank,
        "world_size": world,
        "distributed_type": str(trainer.accelerator.state.distributed_type),
        "num_processes": trainer.accelerator.num_processes,
        "step": ema.step,
        "num_hook_updates": ema.num_hook_updates,
        "update_collectives": ema.update_collectives,
        "swap_collectives": swap_counts["n"],
        "restored_exactly": restored_exactly,
        "swap_logits": swap_logits.tolist(),
        "shadow_numel": {n: t.numel() for n, t in ema.shadow.items()},
        "full_numel": {n: int(getattr(p, "ds_numel", p.numel())) for n, p in trainable.items()},
        "local_numel": {n: int(p.ds_tensor.numel()) if hasattr(p, "ds_tensor") else p.numel()
                        for n, p in trainable.items()},
        "persistent": {n: bool(getattr(p, "ds_persist", False)) for n, p in trainable.items()},
        "zero3": {n: hasattr(p, "ds_id") for n, p in trainable.items()},
    }
    with open(os.path.join(cli.output_dir, f"report_rank{rank}.json"), "w") as f:
        json.dump(report, f, indent=1)

    if cli.resume_check:
        checkpoint = os.path.join(cli.output_dir, f"checkpoint-{cli.save_steps}")
        resumed_dir = os.path.join(cli.output_dir, "resumed")
        train(resumed_dir, cli.steps, cli.per_device_batch, cli.save_steps, cli.decay, checkpoint)


if __name__ == "__main__":
    main()
