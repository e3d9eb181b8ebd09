"""Compatibility shims for the installed stack. Each one is small, idempotent and narrowly gated.

DeepSpeed on machines without an accelerator
--------------------------------------------
``DS_ACCELERATOR=cpu accelerate launch --config_file accelerate_configs/cpu_zero3.yaml ...``
starts DeepSpeed over gloo, but accelerate (checked with 1.15) then reports one process:
``PartialState._prepare_backend`` finds no CUDA and returns backend ``None``, so the state
believes it is not distributed and DeepSpeed's batch-size check fails. The fix makes
``_prepare_backend`` return ``("gloo", DistributedType.MULTI_CPU)`` in exactly that situation
(launched as one of several processes, DeepSpeed requested, no accelerator, not ``cpu=True``);
accelerate then initialises DeepSpeed's process group over gloo and switches the state to
``DistributedType.DEEPSPEED`` with the right number of processes. On a GPU machine nothing changes.

Entry points call `maybe_apply_cpu_deepspeed_fix()` first, before ``TrainingArguments`` or an
``Accelerator`` is built (both create the accelerate state, which is a process-wide singleton).
"""

from __future__ import annotations

import functools
import os

__all__ = [
    "cpu_deepspeed_fix_needed",
    "deepspeed_requested",
    "maybe_apply_cpu_deepspeed_fix",
    "patch_accelerate_for_cpu_deepspeed",
]

_PATCH_MARKER = "_sa2va_trl_cpu_deepspeed_fix"


def deepspeed_requested(environ: os._Environ | dict | None = None) -> bool:
    """True when accelerate was asked for DeepSpeed (``accelerate launch`` with a DeepSpeed config
    sets ``ACCELERATE_USE_DEEPSPEED=true`` and the ``ACCELERATE_DEEPSPEED_*`` plugin variables)."""
    env = os.environ if environ is None else environ
    if "ACCELERATE_USE_DEEPSPEED" in env:  # an explicit setting wins
        return str(env["ACCELERATE_USE_DEEPSPEED"]).lower() == "true"
    return any(key.startswith("ACCELERATE_DEEPSPEED_") for key in env)


def _has_accelerator() -> bool:
    import torch

    if torch.cuda.is_available():
        return True
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6: CUDA, XPU, MPS, HPU, ...
    if accelerator is not None and accelerator.is_available():
        return True
    from accelerate.utils import is_hpu_available, is_mlu_available, is_musa_available, is_npu_available

    return any(check() for check in (is_npu_available, is_mlu_available, is_musa_available, is_hpu_available))


def _launched_distributed(environ=None) -> bool:
    env = os.environ if environ is None else environ
    return int(env.get("LOCAL_RANK", -1)) != -1


def cpu_deepspeed_fix_needed() -> bool:
    """DeepSpeed requested, launched as one of several processes, on a machine without an accelerator."""
    return deepspeed_requested() and _launched_distributed() and not _has_accelerator()


def patch_accelerate_for_cpu_deepspeed() -> bool:
    """Wrap ``accelerate.state.PartialState._prepare_backend`` (see module docs). Idempotent.

    The wrapper changes a result only when the original returned backend ``None`` while launched
    as one of several processes with DeepSpeed requested, not ``cpu=True``, and no accelerator; it
    then returns ``("gloo", DistributedType.MULTI_CPU)``. Returns True if it installed the wrapper
    now, False if it was already installed.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    current = PartialState._prepare_backend
    if getattr(current, _PATCH_MARKER, False):
        return False

    @functools.wraps(current)
    def _prepare_backend(self, cpu: bool = False, sagemaker_dp=False, backend: str | None = None):
        found_backend, distributed_type = current(self, cpu, sagemaker_dp, backend)
        if (
            found_backend is None
            and distributed_type in (None, DistributedType.NO)
            and not cpu
            and _launched_distributed()
            and deepspeed_requested()
            and not _has_accelerator()
        ):
            return "gloo", DistributedType.MULTI_CPU
        return found_backend, distributed_type

    setattr(_prepare_backend, _PATCH_MARKER, True)
    PartialState._prepare_backend = _prepare_backend
    return True


def maybe_apply_cpu_deepspeed_fix() -> bool:
    """Apply `patch_accelerate_for_cpu_deepspeed` if `cpu_deepspeed_fix_needed`; True if active.

    Also defaults ``DS_ACCELERATOR`` to ``cpu`` there, so that DeepSpeed (if not imported yet)
    selects its CPU accelerator without probing for GPUs.
    """
    if not cpu_deepspeed_fix_needed():
        return False
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    patch_accelerate_for_cpu_deepspeed()
    return True
