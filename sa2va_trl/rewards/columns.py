"""Reading the keyword arguments TRL passes to a reward: completions and per-row columns.

TRL calls `fn(prompts=..., completions=..., completion_ids=..., **columns)` where every
column is a list with one value per completion (each prompt's row repeated G times), plus
`trainer_state`, `log_extra` and `log_metric`. These helpers check the lengths and types once,
so every reward reports a bad input the same way: reward name, row index, field.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .errors import RewardInputError


def batch_length(completions: Any, *, reward: str, columns: Mapping[str, Any] | None = None, column: str | None = None) -> int:
    """Number of completions in the call (the length every column and the output must have).

    TRL always passes `completions`; a direct call to a mask reward may omit it, and then the
    length of `columns[column]` is used.
    """
    if completions is None and columns is not None and column is not None and columns.get(column) is not None:
        completions = columns[column]
    if completions is None:
        raise RewardInputError("was called without `completions`", reward=reward, field="completions")
    if isinstance(completions, (str, bytes)) or not hasattr(completions, "__len__"):
        raise RewardInputError(
            f"`completions` must be a list with one completion per sample, got {type(completions).__name__}",
            reward=reward,
            field="completions",
        )
    return len(completions)


def get_column(columns: Mapping[str, Any], name: str, n: int, *, reward: str, required: bool = True) -> list | None:
    """Return column `name` as a list of length `n`.

    Args:
        columns: the keyword arguments the reward received.
        name: the column to read.
        n: the batch length (number of completions).
        reward: the reward's name, for the error message.
        required: raise if the column is absent (otherwise return None).

    Returns:
        A list with one value per completion, or None when the column is absent and not required.
    """
    if name not in columns or columns[name] is None:
        if not required:
            return None
        known = sorted(k for k in columns if k not in ("trainer_state", "log_extra", "log_metric"))
        raise RewardInputError(
            f"needs the column {name!r} (one value per completion), but it was not passed; "
            f"columns received: {known}",
            reward=reward,
            field=name,
        )
    value = columns[name]
    if isinstance(value, (str, bytes, Mapping)) or not hasattr(value, "__len__"):
        raise RewardInputError(
            f"expected a list with one value per completion, got {type(value).__name__}", reward=reward, field=name
        )
    if len(value) != n:
        raise RewardInputError(
            f"has {len(value)} values but there are {n} completions (a column needs one value per completion)",
            reward=reward,
            field=name,
        )
    if isinstance(value, np.ndarray) or hasattr(value, "unbind"):  # a stacked array / tensor: split the rows
        return [value[i] for i in range(n)]
    return list(value)


def completion_text(completion: Any, *, row: int, reward: str) -> str:
    """The text of one completion: a str, or a chat message list (the assistant turns' content).

    Args:
        completion: `completions[row]`, either a plain string (standard format) or a list of
            `{"role": ..., "content": ...}` messages (conversational format); content may itself be
            a list of `{"type": "text", "text": ...}` parts.
        row: the row index, for the error message.
        reward: the reward's name, for the error message.

    Returns:
        The completion's text (assistant turns joined with a space).

    Example:
        >>> completion_text([{"role": "assistant", "content": "a red square"}], row=0, reward="demo")
        'a red square'
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Mapping):
        completion = [completion]
    if isinstance(completion, Sequence) and all(isinstance(m, Mapping) for m in completion):
        turns = [m for m in completion if m.get("role", "assistant") == "assistant"]
        return " ".join(_content_text(m.get("content"), row=row, reward=reward) for m in turns)
    raise RewardInputError(
        f"a completion must be a str or a list of chat messages, got {type(completion).__name__}",
        reward=reward,
        row=row,
        field="completions",
    )


def _content_text(content: Any, *, row: int, reward: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, Mapping) and part.get("type", "text") == "text":
                parts.append(str(part.get("text", "")))
        return " ".join(parts)
    raise RewardInputError(
        f"a message's content must be a str or a list of parts, got {type(content).__name__}",
        reward=reward,
        row=row,
        field="completions",
    )


def reference_texts(value: Any, *, row: int, field: str, reward: str) -> list[str] | None:
    """One row's reference caption(s) as a non-empty list of non-empty strings, or None if absent.

    Args:
        value: a str, a list/tuple of str, or None (no reference: the reward does not apply).
        row: the row index, for the error message.
        field: the column name, for the error message.
        reward: the reward's name, for the error message.

    Returns:
        The list of references, or None when `value` is None.
    """
    if value is None:
        return None
    refs = [value] if isinstance(value, str) else value
    if not isinstance(refs, (list, tuple)) or not all(isinstance(r, str) for r in refs):
        raise RewardInputError(
            f"a reference caption must be a str or a list of str, got {type(value).__name__}",
            reward=reward,
            row=row,
            field=field,
        )
    if not refs or not any(r.strip() for r in refs):
        raise RewardInputError(
            "the reference caption is empty; use None for rows without a reference", reward=reward, row=row, field=field
        )
    return [r for r in refs if r.strip()]


# The `task` column (optional): which loop a row belongs to. When it is absent every reward
# decides from the other columns alone (e.g. `pred_mask` present -> loop 2).
TASK_COLUMN = "task"
TASK_MASK_TO_CAPTION = "mask_to_caption"  # loop 1: region -> caption (-> mask')
TASK_CAPTION_TO_MASK = "caption_to_mask"  # loop 2: caption -> mask (-> caption')


def task_mask(columns: Mapping[str, Any], n: int, tasks: Sequence[str] | None, *, reward: str) -> list[bool]:
    """Which rows a reward restricted to `tasks` applies to.

    Args:
        columns: the reward's keyword arguments.
        n: the batch length.
        tasks: the task names the reward applies to; None means every task.
        reward: the reward's name, for the error message.

    Returns:
        One bool per row: True when there is no `task` column, `tasks` is None, or the row's
        task is one of `tasks`.
    """
    values = get_column(columns, TASK_COLUMN, n, reward=reward, required=False)
    if values is None or tasks is None:
        return [True] * n
    return [v is None or v in tasks for v in values]
