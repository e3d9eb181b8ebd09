"""Exponential moving average (EMA) of a model's trainable weights, as a `transformers.TrainerCallback`.

`EMACallback` keeps an fp32 "shadow" copy of every trainable parameter (``requires_grad=True``),
keyed by parameter name, and moves it towards the live weights after every optimizer step. It
works with any `transformers.Trainer` (TRL's trainers included), single process, DDP, DeepSpeed
ZeRO-2 and ZeRO-3, and is saved in every checkpoint so that a resumed run continues with the
identical EMA.

The update rule
---------------
Let ``t`` be the optimizer step just taken (``TrainerState.global_step`` after the step, so the
first update has ``t = 1``), ``p_t`` the parameter after that step, ``u = update_after_step`` and
``k = t - u``. Then

    shadow_0 = p_0                                   (the weights when training starts)
    shadow_t = p_t                                   for t <= u   (track the weights exactly)
    shadow_t = d_k * shadow_{t-1} + (1 - d_k) * p_t  for t > u

computed in fp32 as ``shadow.lerp_(p_t.float(), 1 - d_k)``, where the decay ``d_k`` is

    warmup="none":   d_k = decay
    warmup="ratio":  d_k = min(decay, (1 + k) / (10 + k))
    warmup="linear": d_k = decay * min(1, k / warmup_steps)

The default is ``warmup="none"``: when fine-tuning a published checkpoint the starting weights
are already good, so the EMA should not forget them quickly (a warm-up exists to forget a random
initialisation). With gradient accumulation there is one update per optimizer step, not per
micro-batch (the callback runs in ``on_step_end``).

What is averaged
----------------
Only trainable parameters; frozen ones are neither stored nor touched. Names are normalised
(``module.`` from DDP / DeepSpeed engines, ``_orig_mod.`` from ``torch.compile`` and PEFT's
``base_model.model.`` prefixes are stripped), so a state saved from a wrapped model loads into the
bare one. With LoRA (peft) the trainable parameters are the adapter weights, so the EMA model is
"frozen base + EMA of the adapters" and costs only an fp32 copy of the adapters.

Distributed training
--------------------
* DDP and ZeRO-1/2: every rank holds the full parameters (ZeRO-2 partitions only optimizer state
  and gradients). Each rank updates its own identical shadow; rank 0 saves it.
* ZeRO-3: a parameter's full tensor is not materialised between forwards; each rank owns a
  flat slice ``param.ds_tensor`` of it. The shadow of such a parameter is an fp32 copy of the
  valid (unpadded) part of this rank's slice, and the update reads ``ds_tensor`` only: no
  collective communication. Each rank saves its slice (``ema_state_rank{r}.safetensors``) with
  the metadata needed to reassemble or re-slice it (resuming with a different number of
  processes works). Swapping the EMA in writes the local slices; parameters that DeepSpeed keeps
  gathered between steps ("persistent" small parameters) are re-gathered from their slices, so
  swapping in and out under ZeRO-3 is collective: call it on every rank.
* FSDP, ZeRO-3 with NVMe parameter offload and ZeRO++ hierarchical partitioning (hpZ) are refused
  with an error instead of averaging shards wrongly.

Files written into each ``checkpoint-<step>`` folder
----------------------------------------------------
``ema_config.json`` (step, decay settings, layout; written last, it marks the EMA as complete),
``ema_state.safetensors`` (replicated runs) or ``ema_state_rank{r}.safetensors`` (ZeRO-3), and with
``save_ema_model=True`` an ``ema_model/`` folder that ``from_pretrained`` loads as the EMA model.
Every file is written to a temporary name and renamed, so a crash never leaves half a file.
A plain Trainer calls ``on_save`` after it has pushed the checkpoint to the Hub and deleted old
ones; a Trainer with `sa2va_trl.checkpointing.CheckpointingMixin` (the Sa2VA trainer) has the
files written inside its checkpoint save instead (`save_to_checkpoint`), before the checkpoint's
completion marker, the push and the deletion.

Resuming
--------
When the Trainer resumes (``global_step > 0`` at ``on_train_begin``), the callback loads the EMA of
``args.resume_from_checkpoint`` (when it is a path) or of ``output_dir/checkpoint-<global_step>``;
finding neither raises (``strict_resume=False``: warn and start a new EMA from the resumed weights).
``trainer.train(resume_from_checkpoint=path)`` alone does not tell callbacks the path: put it in
``TrainingArguments.resume_from_checkpoint`` too, as the entry points do. A state loaded by the
user before ``train()`` (`load_from_checkpoint` / `load_state_dict`) is kept, and its step count
(hence the warm-up) continues.

Example:
    >>> import torch
    >>> from sa2va_trl.ema import EMACallback
    >>> model = torch.nn.Linear(2, 1)
    >>> ema = EMACallback(decay=0.9).attach(model)
    >>> with torch.no_grad():
    ...     _ = model.weight.add_(1.0)
    >>> ema.update(model)  # one optimizer step later
    >>> with ema.swapped_in(model):  # the EMA weights, for a forward pass
    ...     swapped = model.weight.clone()
    >>> torch.testing.assert_close(swapped, ema.shadow["weight"])
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
from collections.abc import Iterator, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

__all__ = ["EMACallback", "consolidate_ema_state", "normalize_param_name"]

EMA_CONFIG_NAME = "ema_config.json"
EMA_STATE_NAME = "ema_state.safetensors"
EMA_SHARD_NAME = "ema_state_rank{rank}.safetensors"
EMA_MODEL_DIR = "ema_model"
FORMAT_VERSION = 1
WARMUP_MODES = ("none", "ratio", "linear")

# Prefixes added by wrappers around the user's model; stripped so names do not depend on them.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "base_model.model.")


def normalize_param_name(name: str) -> str:
    """Strip wrapper prefixes (DDP/DeepSpeed ``module.``, ``torch.compile``'s ``_orig_mod.``, PEFT's
    ``base_model.model.``) from the start of a parameter name, repeatedly.

    >>> normalize_param_name("module.base_model.model.lm_head.lora_A.default.weight")
    'lm_head.lora_A.default.weight'
    """
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                stripped = True
    return name


# --------------------------------------------------------------------------------------------
# Where each rank's values of a parameter live
# --------------------------------------------------------------------------------------------


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _is_zero3(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id") and hasattr(param, "ds_tensor")


@dataclasses.dataclass
class _Slot:
    """One tracked parameter and the part of it this rank owns.

    Replicated parameters: the whole tensor (``offset = 0``, ``length = numel``).
    ZeRO-3 parameters: elements ``[offset, offset + length)`` of the flattened full tensor, which
    are the first ``length`` elements of ``param.ds_tensor`` (the rest of it is padding).
    """

    name: str
    param: torch.nn.Parameter
    zero3: bool
    full_shape: tuple[int, ...]
    offset: int
    length: int

    def local(self) -> torch.Tensor:
        """The live values this rank owns (a view: writing to it writes the parameter)."""
        if self.zero3:
            return self.param.ds_tensor.data.narrow(0, 0, self.length)
        return self.param.data


def _fsdp_types() -> tuple[type, ...]:
    types: list[type] = []
    with contextlib.suppress(ImportError):
        from torch.distributed.fsdp import FullyShardedDataParallel

        types.append(FullyShardedDataParallel)
    with contextlib.suppress(ImportError):
        from torch.distributed.fsdp import FSDPModule  # FSDP2 (fully_shard)

        types.append(FSDPModule)
    return tuple(types)


def _check_supported(model: torch.nn.Module) -> None:
    """Refuse sharding schemes whose local shards this module would average wrongly."""
    fsdp_types = _fsdp_types()
    for module in model.modules():
        if isinstance(module, fsdp_types) or type(module).__name__ == "FullyShardedDataParallel":
            raise NotImplementedError(
                f"EMACallback does not support FSDP (the model contains {type(module).__name__}); "
                "use DeepSpeed ZeRO-3 (accelerate_configs/zero3.yaml) or DDP instead."
            )
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - old torch
        DTensor = None
    for name, param in model.named_parameters():
        if DTensor is not None and isinstance(param, DTensor):
            raise NotImplementedError(
                f"EMACallback does not support DTensor parameters (FSDP2 / tensor parallel): {name!r}."
            )


def _make_slot(name: str, param: torch.nn.Parameter, rank: int, world: int) -> _Slot:
    if not _is_zero3(param):
        return _Slot(name, param, False, tuple(param.shape), 0, param.numel())
    ds_tensor = param.ds_tensor
    if ds_tensor is None:
        raise RuntimeError(f"ZeRO-3 parameter {name!r} has no local partition (ds_tensor is None).")
    if getattr(ds_tensor, "final_location", None) is not None and "nvme" in str(ds_tensor.final_location).lower():
        raise NotImplementedError(
            f"EMACallback does not support ZeRO-3 NVMe parameter offload ({name!r}); use CPU offload or none."
        )
    partition = ds_tensor.numel()
    full_numel = int(param.ds_numel)
    aligned = int(getattr(param, "ds_numel_aligned", -(-full_numel // world) * world))
    if partition * world != aligned or getattr(param, "ds_zero_param_process_group", None) is not None:
        # MiCS shards over a sub-group (this rank's slice is not rank * partition); ZeRO++ hpZ
        # gathers from a secondary copy that a swap of the primary slice would not reach.
        raise NotImplementedError(
            f"ZeRO-3 parameter {name!r}: partition {partition} x world {world} != {aligned} elements, "
            "or a ZeRO++ hpZ secondary partition; EMACallback supports plain ZeRO-3 partitioning "
            "over all ranks only (no MiCS, no zero_hpz_partition_size > 1)."
        )
    offset = min(rank * partition, full_numel)
    length = max(0, min(partition, full_numel - offset))
    return _Slot(name, param, True, tuple(param.ds_shape), offset, length)


def _refresh_gathered_zero3(slots: list[_Slot]) -> None:
    """Re-gather ZeRO-3 parameters that are currently materialised after their slices changed.

    DeepSpeed keeps small "persistent" parameters gathered between steps; after writing their
    local slices the gathered copy is stale. Release it and gather again from the slices (the
    same two calls DeepSpeed makes after a checkpoint load). Collective: every rank must call it.
    """
    if not any(s.zero3 for s in slots):
        return
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    stale = [s.param for s in slots if s.zero3 and s.param.ds_status == ZeroParamStatus.AVAILABLE]
    # The list is the same on every rank (DeepSpeed decides persistence by size), so the
    # collective calls below match across ranks.
    if stale:
        stale[0].partition(stale)
        stale[0].all_gather(stale)


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def _atomic_save_tensors(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)


def _atomic_save_json(obj: dict, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


class _StateReader:
    """Reads an EMA state written by `EMACallback.save` (replicated or sharded), tensor by tensor."""

    def __init__(self, directory: str):
        config_path = os.path.join(directory, EMA_CONFIG_NAME)
        if not os.path.isfile(config_path):
            raise FileNotFoundError(
                f"No EMA state in {directory!r} (missing {EMA_CONFIG_NAME}). Was the checkpoint written "
                "with EMACallback attached to the Trainer?"
            )
        with open(config_path) as f:
            self.config = json.load(f)
        if self.config.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{config_path}: unsupported EMA format_version {self.config.get('format_version')!r}.")
        self.directory = directory
        self.sharded = bool(self.config["sharded"])
        self.shapes = {k: tuple(v) for k, v in self.config["shapes"].items()}
        self._layouts: dict[int, dict] = {}

    def names(self) -> list[str]:
        return list(self.shapes)

    def _shard_path(self, rank: int) -> str:
        return os.path.join(self.directory, EMA_SHARD_NAME.format(rank=rank))

    def shard_layout(self, rank: int) -> dict[str, list[int]]:
        """``{name: [offset, length]}`` of the tensors stored by ``rank`` (sharded states only)."""
        if rank not in self._layouts:
            with safe_open(self._shard_path(rank), framework="pt") as f:
                self._layouts[rank] = json.loads(f.metadata()["layout"])
        return self._layouts[rank]

    def read_shard_tensor(self, rank: int, name: str) -> torch.Tensor:
        with safe_open(self._shard_path(rank), framework="pt") as f:
            return f.get_tensor(name)

    def read_full(self, name: str) -> torch.Tensor:
        """The full fp32 tensor of ``name`` (reassembled from the rank shards if sharded)."""
        shape = self.shapes[name]
        if not self.sharded:
            with safe_open(os.path.join(self.directory, EMA_STATE_NAME), framework="pt") as f:
                return f.get_tensor(name).reshape(shape)
        flat = torch.empty(math.prod(shape), dtype=torch.float32)
        filled = 0
        for rank in range(int(self.config["world_size"])):
            offset, length = self.shard_layout(rank).get(name, (0, 0))
            if length:
                flat[offset : offset + length] = self.read_shard_tensor(rank, name).reshape(-1)
                filled += length
        if filled != flat.numel():
            raise ValueError(f"EMA shards in {self.directory!r} cover {filled} of {flat.numel()} elements of {name!r}.")
        return flat.reshape(shape)


def consolidate_ema_state(checkpoint_dir: str) -> dict[str, torch.Tensor]:
    """Load the EMA saved in ``checkpoint_dir`` as full fp32 tensors keyed by normalised name.

    Works on replicated and ZeRO-3 (per-rank shard) states alike, without a process group: use it
    to inspect or export the EMA of a ZeRO-3 run on a machine without GPUs.
    """
    reader = _StateReader(checkpoint_dir)
    return {name: reader.read_full(name) for name in reader.names()}


# --------------------------------------------------------------------------------------------
# The callback
# --------------------------------------------------------------------------------------------


class EMACallback(TrainerCallback):
    """An fp32 EMA of the trainable weights, updated after every optimizer step (see module docs).

    Args:
        decay: the target decay ``d`` in ``shadow = d * shadow + (1 - d) * param`` (0 <= d < 1).
        warmup: ``"none"`` (constant ``decay``), ``"ratio"`` (``min(decay, (1 + k) / (10 + k))``) or
            ``"linear"`` (``decay * min(1, k / warmup_steps)``), with ``k`` the number of steps after
            ``update_after_step``.
        warmup_steps: length of the linear warm-up (``warmup="linear"`` only).
        update_after_step: for the first ``update_after_step`` optimizer steps the shadow equals the
            weights (decay 0); averaging starts after them.
        device: where the shadow lives; ``None`` = next to each parameter, ``"cpu"`` to save
            accelerator memory (each update then copies the weights to the CPU).
        save_ema_model: also write a loadable EMA model (``checkpoint-<step>/ema_model``) with every
            checkpoint, through the model's own ``save_pretrained``.
        strict_resume: when the Trainer resumes from a checkpoint that has no EMA state, raise (True)
            or start a fresh EMA from the resumed weights with a warning (False).

    Use it as ``Trainer(..., callbacks=[ema])`` (or ``ema.add_to(trainer)``, which also makes the
    logged ``ema/decay`` reach the reporting integrations). Outside a Trainer: ``ema.attach(model)``
    then ``ema.update(model)`` after each optimizer step.

    Attributes:
        step: the optimizer step the shadow corresponds to.
        num_updates: how many averaging updates (decay > 0) the shadow has received.
        current_decay: the decay used by the last update (logged as ``ema/decay``).
    """

    def __init__(
        self,
        decay: float = 0.999,
        *,
        warmup: str = "none",
        warmup_steps: int = 0,
        update_after_step: int = 0,
        device: str | torch.device | None = None,
        save_ema_model: bool = False,
        strict_resume: bool = True,
    ):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMACallback: decay must be in [0, 1), got {decay}.")
        if warmup not in WARMUP_MODES:
            raise ValueError(f"EMACallback: warmup must be one of {WARMUP_MODES}, got {warmup!r}.")
        if warmup == "linear" and warmup_steps <= 0:
            raise ValueError("EMACallback: warmup='linear' needs warmup_steps > 0.")
        if warmup_steps < 0 or update_after_step < 0:
            raise ValueError("EMACallback: warmup_steps and update_after_step must be >= 0.")
        self.decay = float(decay)
        self.warmup = warmup
        self.warmup_steps = int(warmup_steps)
        self.update_after_step = int(update_after_step)
        self.device = torch.device(device) if device is not None else None
        self.save_ema_model = save_ema_model
        self.strict_resume = strict_resume

        self.step = 0
        self.num_updates = 0
        self.current_decay = 0.0
        self._model: torch.nn.Module | None = None
        self._slots: dict[str, _Slot] = {}
        self._shadow: dict[str, torch.Tensor] = {}
        self._backup: dict[str, torch.Tensor] | None = None
        # Inside `swapped_in`: the live tensors of the parameters whose storage was swapped with the shadow.
        self._swapped: dict[str, torch.Tensor] | None = None
        # A state the user loaded before train(): the hooks keep it. For a checkpoint, its path,
        # to re-read it once the Trainer has prepared (e.g. ZeRO-3-partitioned) the model.
        self._pinned = False
        self._pinned_checkpoint: str | None = None
        self._last_global_step: int | None = None
        self._saved_checkpoint: tuple[str, int] | None = None  # (folder, step) `save_to_checkpoint` last wrote

    # ---- the maths ------------------------------------------------------------------------

    def decay_at(self, step: int) -> float:
        """The decay used by the update after optimizer step ``step`` (1-based; see module docs)."""
        k = step - self.update_after_step
        if k <= 0:
            return 0.0
        if self.warmup == "ratio":
            return min(self.decay, (1.0 + k) / (10.0 + k))
        if self.warmup == "linear":
            return self.decay * min(1.0, k / self.warmup_steps)
        return self.decay

    # ---- binding to a model ---------------------------------------------------------------

    @property
    def shadow(self) -> dict[str, torch.Tensor]:
        """The fp32 shadow tensors by normalised name (ZeRO-3: this rank's flat slice)."""
        return self._shadow

    @property
    def is_attached(self) -> bool:
        return self._model is not None

    def _collect_slots(self, model: torch.nn.Module) -> dict[str, _Slot]:
        _check_supported(model)
        rank, world = _dist_rank_world()
        slots: dict[str, _Slot] = {}
        for raw_name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            name = normalize_param_name(raw_name)
            if name in slots:
                raise ValueError(f"EMACallback: two trainable parameters normalise to the same name {name!r}.")
            slots[name] = _make_slot(name, param, rank, world)
        if not slots:
            raise ValueError("EMACallback: the model has no trainable parameters (requires_grad=True).")
        return slots

    @torch.no_grad()
    def attach(self, model: torch.nn.Module, *, reset: bool = True) -> EMACallback:
        """Bind to ``model``'s trainable parameters; with ``reset`` the shadow starts at their values.

        With ``reset=False`` an existing shadow is kept (it must cover the same parameter names and
        sizes); the Trainer hooks use that to keep a state loaded before training. Returns self.
        """
        slots = self._collect_slots(model)
        if not reset and self._shadow:
            self._check_compatible(slots, self._shadow)
            self._shadow = {  # onto each parameter's device, in its local shape
                n: t.to(self.device if self.device is not None else slots[n].local().device).view(
                    slots[n].local().shape
                )
                for n, t in self._shadow.items()
            }
        else:
            self._shadow = {n: self._new_shadow(s.local()) for n, s in slots.items()}
            self.step = self.num_updates = 0
            self.current_decay = 0.0
        self._slots = slots
        self._model = model
        return self

    def _new_shadow(self, local: torch.Tensor) -> torch.Tensor:
        device = self.device if self.device is not None else local.device
        return local.detach().to(device=device, dtype=torch.float32, copy=True)

    @staticmethod
    def _check_compatible(slots: Mapping[str, _Slot], shadow: Mapping[str, torch.Tensor]) -> None:
        missing, unexpected = sorted(set(slots) - set(shadow)), sorted(set(shadow) - set(slots))
        if missing or unexpected:
            raise ValueError(
                "EMACallback: EMA state and model trainable parameters differ; "
                f"missing from the EMA: {missing[:10]}, not trainable in the model: {unexpected[:10]}."
            )
        for name, slot in slots.items():
            if shadow[name].numel() != slot.length:
                raise ValueError(
                    f"EMACallback: EMA tensor {name!r} has {shadow[name].numel()} elements, "
                    f"the model's local part has {slot.length}."
                )

    def _slots_for(self, model: torch.nn.Module | None) -> dict[str, _Slot]:
        if model is None or model is self._model:
            if self._model is None:
                raise RuntimeError("EMACallback is not attached to a model: call attach(model) first.")
            return self._slots
        slots = self._collect_slots(model)
        self._check_compatible(slots, self._shadow)
        return slots

    # ---- the update -----------------------------------------------------------------------

    @torch.no_grad()
    def update(self, model: torch.nn.Module | None = None, step: int | None = None) -> None:
        """Move the shadow towards the current weights, once per optimizer step.

        ``step`` is the optimizer step just taken (default: the last one + 1). Under ZeRO-3 this
        reads each rank's local slices only; it never communicates.
        """
        if self._swapped is not None or self._backup is not None:
            # Inside a swap the model holds the EMA weights (and may share the shadow's storage).
            raise RuntimeError("EMACallback.update: the EMA weights are swapped in; update after the swap ends.")
        if self._model is None:
            if model is None:
                raise RuntimeError("EMACallback.update needs a model (or attach(model) first).")
            self.attach(model)
        slots = self._slots_for(model)
        step = self.step + 1 if step is None else int(step)
        decay = self.decay_at(step)
        for name, slot in slots.items():
            shadow = self._shadow[name]
            live = slot.local().to(device=shadow.device, dtype=torch.float32).view_as(shadow)
            if decay == 0.0:
                shadow.copy_(live)
            else:
                shadow.lerp_(live, 1.0 - decay)
        self.step = step
        self.current_decay = decay
        if decay > 0.0:
            self.num_updates += 1

    # ---- swapping the EMA weights in and out -------------------------------------------------

    @torch.no_grad()
    def store(self, model: torch.nn.Module | None = None) -> None:
        """Keep an exact copy of the current (live) trainable weights, for `restore`."""
        self._store_slots(self._slots_for(model))

    def _store_slots(self, slots: Mapping[str, _Slot]) -> None:
        if self._backup is not None or self._swapped is not None:
            # A second store would overwrite the live weights kept by the first one.
            raise RuntimeError("EMACallback.store: weights are already stored (nested swapped_in?); restore() first.")
        self._backup = {n: s.local().detach().clone() for n, s in slots.items()}

    @torch.no_grad()
    def restore(self, model: torch.nn.Module | None = None) -> None:
        """Put back the weights saved by `store`, bit for bit. Collective under ZeRO-3."""
        if self._backup is None:
            raise RuntimeError("EMACallback.restore: nothing stored; call store() first.")
        self._restore_slots(self._slots_for(model))

    def _restore_slots(self, slots: Mapping[str, _Slot]) -> None:
        for name, slot in slots.items():
            slot.local().copy_(self._backup[name])
        self._backup = None
        _refresh_gathered_zero3(list(slots.values()))

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module | None = None) -> None:
        """Write the EMA weights into ``model``'s trainable parameters (cast to their dtype).

        ``model`` may be another instance with the same trainable names (under ZeRO-3 it must be
        partitioned over the same ranks). Collective under ZeRO-3. Writing into the model being
        trained under DeepSpeed mixed precision is undone at the next step (the optimizer keeps
        its own fp32 master weights): use `swapped_in` for a temporary swap.
        """
        self._copy_slots(self._slots_for(model))

    def _copy_slots(self, slots: Mapping[str, _Slot]) -> None:
        for name, slot in slots.items():
            local = slot.local()
            local.copy_(self._shadow[name].view(local.shape))
        _refresh_gathered_zero3(list(slots.values()))

    def _storage_swappable(self, name: str, slot: _Slot) -> bool:
        """Whether the shadow tensor itself can stand in for the parameter's data (fp32, same device and
        shape, not a ZeRO-3 slice): then a swap exchanges tensors instead of copying weights."""
        shadow, data = self._shadow[name], slot.param.data
        return (
            not slot.zero3 and data.dtype == torch.float32 and shadow.device == data.device
            and shadow.shape == data.shape
        )

    @contextlib.contextmanager
    def swapped_in(self, model: torch.nn.Module | None = None) -> Iterator[torch.nn.Module]:
        """Context manager: the EMA weights inside, the exact live weights again on exit.

        Plain fp32 parameters next to their shadow get the shadow tensor as their data inside (no
        copy; the live tensor is put back on exit, so the restore is exact); the others (bf16,
        ZeRO-3 slices, a shadow on another device) are stored, overwritten and copied back.

        >>> # with ema.swapped_in(model): ref_logits = model(**batch).logits
        """
        target = self._model if model is None else model
        slots = self._slots_for(target)
        if self._backup is not None or self._swapped is not None:
            raise RuntimeError("EMACallback.store: weights are already stored (nested swapped_in?); restore() first.")
        swap = {n: s for n, s in slots.items() if self._storage_swappable(n, s)}
        copied = {n: s for n, s in slots.items() if n not in swap}
        self._swapped = {}
        try:
            with torch.no_grad():
                for name, slot in swap.items():
                    self._swapped[name] = slot.param.data
                    slot.param.data = self._shadow[name]
                self._backup = {n: s.local().detach().clone() for n, s in copied.items()}
                self._copy_slots(copied)
            yield target
        finally:
            with torch.no_grad():
                try:
                    if self._backup is not None:
                        self._restore_slots(copied)
                finally:
                    for name, live in self._swapped.items():
                        swap[name].param.data = live
                    self._swapped = None

    average_parameters = swapped_in  # the name torch-ema users know

    # ---- state ------------------------------------------------------------------------------

    def config_dict(self) -> dict:
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "warmup_steps": self.warmup_steps,
            "update_after_step": self.update_after_step,
        }

    def state_dict(self) -> dict:
        """``{"step", "num_updates", "current_decay", "config", "shadow": {name: fp32 tensor}}``.

        Under ZeRO-3 the shadow tensors are this rank's slices (``"layout"`` gives offsets).
        """
        return {
            "step": self.step,
            "num_updates": self.num_updates,
            "current_decay": self.current_decay,
            "config": self.config_dict(),
            "shadow": {n: t.clone() for n, t in self._shadow.items()},
            "layout": {n: [s.offset, s.length] for n, s in self._slots.items() if s.zero3},
        }

    @torch.no_grad()
    def load_state_dict(self, state: Mapping) -> None:
        """Load a `state_dict`; the shadow must match the attached model's trainable parameters.

        Loading before ``train()`` pins the state: the Trainer hooks keep it instead of starting a
        new EMA, and its step counter (hence the warm-up) continues from the loaded one.
        """
        self._load_state_dict(state)
        self._pinned, self._pinned_checkpoint = True, None

    def _load_state_dict(self, state: Mapping) -> None:
        shadow = {normalize_param_name(n): t for n, t in state["shadow"].items()}
        if self._slots:
            self._check_compatible(self._slots, shadow)
        self._warn_on_config_change(state.get("config", {}))
        loaded = {}
        for name, tensor in shadow.items():
            shape = self._slots[name].local().shape if name in self._slots else tensor.shape
            device = self._shadow_device(name, tensor)
            loaded[name] = tensor.detach().to(device=device, dtype=torch.float32, copy=True).reshape(shape)
        self._shadow = loaded
        self.step = int(state["step"])
        self.num_updates = int(state.get("num_updates", 0))
        self.current_decay = float(state.get("current_decay", self.decay_at(self.step)))

    def _shadow_device(self, name: str, tensor: torch.Tensor) -> torch.device:
        if self.device is not None:
            return self.device
        if name in self._slots:
            return self._slots[name].local().device
        return tensor.device

    def _warn_on_config_change(self, saved: Mapping) -> None:
        changed = {k: (saved[k], v) for k, v in self.config_dict().items() if k in saved and saved[k] != v}
        if changed:
            logger.warning("EMACallback: settings differ from the saved EMA state (saved, now): %s", changed)

    # ---- checkpoints --------------------------------------------------------------------------

    def save(self, directory: str) -> None:
        """Write the EMA state into ``directory`` (call it on every rank; see module docs)."""
        if self._model is None:
            raise RuntimeError("EMACallback.save: not attached to a model.")
        rank, world = _dist_rank_world()
        sharded = any(s.zero3 for s in self._slots.values())
        if rank == 0 or sharded:
            os.makedirs(directory, exist_ok=True)
        if sharded:
            # ZeRO-3 slices from every rank; parameters replicated on all ranks from rank 0 only.
            mine = [n for n, s in self._slots.items() if s.zero3 or rank == 0]
            layout = {n: [self._slots[n].offset, self._slots[n].length] for n in mine}
            meta = {"format_version": str(FORMAT_VERSION), "rank": str(rank), "world_size": str(world)}
            meta["layout"] = json.dumps(layout)
            path = os.path.join(directory, EMA_SHARD_NAME.format(rank=rank))
            _atomic_save_tensors({n: self._shadow[n] for n in mine}, path, meta)
            if world > 1:
                torch.distributed.barrier()  # every shard is on disk before rank 0 marks the state complete
        elif rank == 0:
            meta = {"format_version": str(FORMAT_VERSION)}
            _atomic_save_tensors(self._shadow, os.path.join(directory, EMA_STATE_NAME), meta)
        if rank == 0:
            config = {
                "format_version": FORMAT_VERSION,
                "step": self.step,
                "num_updates": self.num_updates,
                "current_decay": self.current_decay,
                "sharded": sharded,
                "world_size": world if sharded else 1,
                "shapes": {n: list(s.full_shape) for n, s in self._slots.items()},
                **self.config_dict(),
            }
            _atomic_save_json(config, os.path.join(directory, EMA_CONFIG_NAME))

    def load_from_checkpoint(self, directory: str, model: torch.nn.Module | None = None) -> None:
        """Restore the EMA saved in ``directory`` (a ``checkpoint-<step>`` folder).

        Attaches to ``model`` first when given. Sharded states are re-sliced when the number of
        processes changed; a replicated state loads under ZeRO-3 and vice versa. Called before
        ``train()``, the loaded state is kept by the Trainer hooks (see `load_state_dict`); a
        Trainer resuming from a checkpoint finds the EMA by itself.
        """
        self._load_from_checkpoint(directory, model)
        self._pinned, self._pinned_checkpoint = True, directory

    @torch.no_grad()
    def _load_from_checkpoint(self, directory: str, model: torch.nn.Module | None = None) -> None:
        if model is not None and model is not self._model:
            self.attach(model)
        if self._model is None:
            raise RuntimeError("EMACallback.load_from_checkpoint: attach(model) first or pass model=.")
        reader = _StateReader(directory)
        missing = sorted(set(self._slots) - set(reader.names()))
        unexpected = sorted(set(reader.names()) - set(self._slots))
        if missing or unexpected:
            raise ValueError(
                f"EMA state in {directory!r} does not match the model's trainable parameters; missing: "
                f"{missing[:10]}, unexpected: {unexpected[:10]}."
            )
        rank, world = _dist_rank_world()
        same_layout = reader.sharded and int(reader.config["world_size"]) == world
        layout = reader.shard_layout(rank) if same_layout else {}
        shadow = {}
        for name, slot in self._slots.items():
            if tuple(reader.shapes[name]) != slot.full_shape:
                raise ValueError(f"EMA tensor {name!r}: saved shape {reader.shapes[name]}, model {slot.full_shape}.")
            if slot.zero3 and layout.get(name) == [slot.offset, slot.length]:
                local = reader.read_shard_tensor(rank, name)
            else:
                full = reader.read_full(name)
                local = full.reshape(-1).narrow(0, slot.offset, slot.length) if slot.zero3 else full
            shadow[name] = local.to(dtype=torch.float32, device=self._shadow_device(name, local)).clone()
        self._warn_on_config_change(reader.config)
        self._shadow = shadow
        self.step = int(reader.config["step"])
        self.num_updates = int(reader.config["num_updates"])
        self.current_decay = float(reader.config["current_decay"])

    @torch.no_grad()
    def save_pretrained(
        self, save_directory: str, model: torch.nn.Module | None = None, processing_class=None, **kwargs
    ) -> None:
        """Save ``model`` with the EMA weights swapped in, loadable by ``from_pretrained``.

        Uses the model's own ``save_pretrained`` (a PeftModel saves the EMA adapters; load them onto
        the base model), or ``model.safetensors`` for a plain ``nn.Module``. Under ZeRO-3 the full
        weights are gathered one parameter at a time onto rank 0 (collective: call on every rank).
        ``processing_class`` (a tokenizer or processor) is saved next to it, so the folder loads on
        its own (e.g. ``Sa2VAPolicy.from_pretrained``). ``kwargs`` go to ``save_pretrained``. The
        live weights are restored exactly afterwards.
        """
        target = self._model if model is None else model
        rank, _ = _dist_rank_world()
        if rank == 0 and processing_class is not None:
            os.makedirs(save_directory, exist_ok=True)
            processing_class.save_pretrained(save_directory)
        with self.swapped_in(target):
            state_dict = _gather_state_dict_zero3(target) if any(_is_zero3(p) for p in target.parameters()) else None
            if rank != 0:
                return
            os.makedirs(save_directory, exist_ok=True)
            if hasattr(target, "save_pretrained"):
                if state_dict is not None:
                    kwargs.setdefault("state_dict", state_dict)
                target.save_pretrained(save_directory, **kwargs)
            else:
                tensors = state_dict if state_dict is not None else target.state_dict()
                _atomic_save_tensors(
                    {k: v.clone() for k, v in tensors.items()},
                    os.path.join(save_directory, "model.safetensors"),
                    {"format": "pt"},
                )

    # ---- Trainer hooks ------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        """Bind to the model: a new EMA from its weights, the checkpoint's EMA on a resumed run, or
        the state the user loaded before ``train()``."""
        if model is None:
            raise RuntimeError("EMACallback.on_train_begin: the Trainer passed no model.")
        self._last_global_step = state.global_step
        if self._pinned:
            self._pinned = False
            if self._pinned_checkpoint is not None:  # re-sliced for the model as prepared now
                self.attach(model)
                self._load_from_checkpoint(self._pinned_checkpoint)
            else:
                self.attach(model, reset=False)
            return
        self.attach(model, reset=True)
        if state.global_step == 0:
            return
        checkpoint = self._find_resume_checkpoint(args, state)
        if checkpoint is not None:
            self._load_from_checkpoint(checkpoint)
            if self.step != state.global_step:
                raise RuntimeError(
                    f"EMACallback: the EMA in {checkpoint!r} is at step {self.step}, the resumed run at "
                    f"step {state.global_step}."
                )
            logger.info("EMACallback: resumed the EMA from %s (step %d).", checkpoint, self.step)
            return
        message = (
            f"EMACallback: the run resumes at step {state.global_step} but no EMA state was found (looked "
            f"for {EMA_CONFIG_NAME} in args.resume_from_checkpoint and output_dir/checkpoint-"
            f"{state.global_step}). Call ema.load_from_checkpoint(path, model) before train(), or pass "
            "strict_resume=False to start a new EMA from the resumed weights."
        )
        if self.strict_resume:
            raise RuntimeError(message)
        logger.warning(message)
        self.step = state.global_step

    @staticmethod
    def _find_resume_checkpoint(args, state) -> str | None:
        candidates = []
        if isinstance(getattr(args, "resume_from_checkpoint", None), str):
            candidates.append(args.resume_from_checkpoint)
        candidates.append(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))
        for candidate in candidates:
            if os.path.isfile(os.path.join(candidate, EMA_CONFIG_NAME)):
                return candidate
        return None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        """One EMA update per optimizer step (the Trainer calls this after ``global_step += 1``)."""
        if state.global_step != self._last_global_step:
            self.update(model)
            self._last_global_step = state.global_step

    def save_to_checkpoint(self, checkpoint_dir: str, model=None, processing_class=None) -> None:
        """Write the EMA state (and, with ``save_ema_model``, the loadable ``ema_model/`` with the processing
        class) into a checkpoint folder. Collective under ZeRO-3: call it on every process.

        `sa2va_trl.checkpointing.CheckpointingMixin` calls it inside the checkpoint save, before the completion
        marker, the Hub push and the deletion of old checkpoints; ``on_save`` then skips the folder.
        """
        self.save(checkpoint_dir)
        if self.save_ema_model:
            self.save_pretrained(os.path.join(checkpoint_dir, EMA_MODEL_DIR), model, processing_class=processing_class)
        self._saved_checkpoint = (os.path.abspath(checkpoint_dir), self.step)

    def on_save(self, args, state, control, model=None, **kwargs):
        """Write the EMA into the ``checkpoint-<step>`` folder the Trainer has just written (unless the trainer
        already had it written through `save_to_checkpoint`)."""
        directory = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if self._saved_checkpoint == (os.path.abspath(directory), self.step):
            return
        self.save_to_checkpoint(directory, model, kwargs.get("processing_class"))

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Add ``ema/decay`` to the logs (and to the entry the Trainer just put in ``log_history``)."""
        if logs is None or not self._shadow:
            return
        logs["ema/decay"] = self.current_decay
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1]["ema/decay"] = self.current_decay

    def add_to(self, trainer) -> EMACallback:
        """Register with ``trainer`` before its reporting callbacks, so they log ``ema/decay`` too."""
        from transformers.trainer_callback import DefaultFlowCallback

        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
        position = next((i + 1 for i, cb in enumerate(callbacks) if isinstance(cb, DefaultFlowCallback)), 0)
        callbacks.insert(position, self)
        return self


def _gather_state_dict_zero3(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full state dict of a ZeRO-3 model on rank 0 (other ranks get {}), one parameter at a time."""
    import deepspeed

    rank, _ = _dist_rank_world()
    gathered: dict[int, torch.Tensor] = {}  # by tensor identity: tied weights appear under two names
    state_dict: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in gathered:
            if _is_zero3(tensor):
                with deepspeed.zero.GatheredParameters([tensor], modifier_rank=None):
                    gathered[id(tensor)] = tensor.detach().cpu().clone() if rank == 0 else None
            else:
                gathered[id(tensor)] = tensor.detach().cpu().clone() if rank == 0 else None
        if rank == 0:
            state_dict[name] = gathered[id(tensor)]
    return state_dict
