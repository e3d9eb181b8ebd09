"""Per-module learning rates: one part of the model trains at its own rate inside the Trainer's optimizer.

Why: loop 2's policy gradient reaches the LLM through the `[SEG]` state as well as `text_hidden_fcs`. On the tiny
world, loop 2 at lr 1e-4 with the LLM trainable lowered caption exact match (0.614 -> 0.584) and IoU, while the same
loop with only `text_hidden_fcs` trainable raised IoU (0.899 -> 0.910) and left captions untouched. A fast
projection next to a slow LLM lets both loops learn in one run (docs/tiny_world_experiments.md). The same
mechanism as LLaVA-style `mm_projector_lr`.

`split_param_groups` rewrites an optimizer's groups before its first step, so it composes with whatever built them
(the Trainer's weight-decay groups, DeepSpeed's `create_optimizer` path) and with the scheduler created after it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def module_parameter_ids(model: torch.nn.Module, module_name: str) -> set[int]:
    """`id`s of the trainable parameters whose dotted name has `module_name` as one of its parts.

    Matching a part (not a prefix) finds the module under any wrapper: `text_hidden_fcs.0.weight`,
    `base_model.model.text_hidden_fcs.modules_to_save.default.0.weight` (peft), `module.text_hidden_fcs...` (DDP).
    """
    return {id(p) for name, p in model.named_parameters() if p.requires_grad and module_name in name.split(".")}


def split_param_groups(optimizer: torch.optim.Optimizer, parameter_ids: Iterable[int], learning_rate: float,
                       tag: str) -> int:
    """Move the given parameters of every group into a copy of that group with its own learning rate.

    Args:
        optimizer: an optimizer that has not stepped yet (its state is empty).
        parameter_ids: `id`s of the parameters to move.
        learning_rate: their learning rate (the scheduler scales it like every other group's).
        tag: stored as the new groups' `"name"`, for logs and tests.

    Returns:
        How many parameters were moved.
    """
    if optimizer.state:
        raise RuntimeError("split_param_groups: the optimizer has already stepped; split its groups before training.")
    wanted = set(parameter_ids)
    new_groups, moved = [], 0
    for group in optimizer.param_groups:
        chosen = [p for p in group["params"] if id(p) in wanted]
        if not chosen:
            continue
        group["params"] = [p for p in group["params"] if id(p) not in wanted]
        new_groups.append({**group, "params": chosen, "lr": learning_rate, "name": tag})
        moved += len(chosen)
    optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
    for group in new_groups:
        optimizer.param_groups.append(group)
    return moved
