"""`checked_reward`: wrap any TRL reward function so that its failures name the reward and the row.

TRL turns a reward's None into NaN and then ignores NaN, so a reward that *returns* NaN by
accident is silently excluded, and an exception deep inside a batch says nothing about which
reward or which sample caused it. The wrapper validates every output (length, type, NaN, inf)
and re-raises exceptions as `RewardError`s carrying the reward's name and, where it can find
it, the row.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

from .errors import RewardError, RewardFailedError, RewardOutputError

__all__ = ["checked_reward", "CheckedReward", "AsyncCheckedReward", "validate_rewards", "reward_name"]

# Keyword arguments TRL adds that are not per-row columns.
_TRL_EXTRAS = ("trainer_state", "log_extra", "log_metric", "environments")


def reward_name(fn: Callable) -> str:
    """The name TRL logs a reward under (`rewards/<name>/mean`): `__name__`, else the class name."""
    while hasattr(fn, "func") and hasattr(fn, "args") and hasattr(fn, "keywords"):  # functools.partial
        fn = fn.func
    return getattr(fn, "__name__", type(fn).__name__)


def validate_rewards(values: Any, n: int | None, name: str) -> list[float | None]:
    """Check a reward's output and return it as a list of Python floats / None.

    Args:
        values: what the reward returned.
        n: the expected length (number of completions), or None to skip the length check.
        name: the reward's name, for the error message.

    Returns:
        `list[float | None]` of length `n`.

    Raises:
        RewardOutputError: not a sequence, wrong length, or an entry that is not a finite real
            number or None (NaN included: return None for rows the reward does not apply to).

    Example:
        >>> validate_rewards([1, None, 0.5], 3, "demo")
        [1.0, None, 0.5]
    """
    if hasattr(values, "detach"):  # torch tensor
        values = values.detach().cpu().tolist()
    elif hasattr(values, "tolist") and hasattr(values, "ndim"):  # numpy array
        values = values.tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise RewardOutputError(
            f"must return a list with one reward per completion, got {type(values).__name__}", reward=name
        )
    if n is not None and len(values) != n:
        raise RewardOutputError(f"returned {len(values)} rewards for {n} completions", reward=name)
    out: list[float | None] = []
    for i, v in enumerate(values):
        if v is None:
            out.append(None)
            continue
        if hasattr(v, "item") and getattr(v, "ndim", 0) == 0:  # 0-d tensor / numpy scalar
            v = v.item()
        if not isinstance(v, numbers.Real):
            raise RewardOutputError(f"returned a {type(v).__name__} ({v!r}); expected a float or None", reward=name, row=i)
        v = float(v)
        if math.isnan(v):
            raise RewardOutputError(
                "returned NaN; return None for rows the reward does not apply to (NaN would be silently dropped)",
                reward=name,
                row=i,
            )
        if math.isinf(v):
            raise RewardOutputError(f"returned {v}; rewards must be finite", reward=name, row=i)
        out.append(v)
    return out


class CheckedReward:
    """A reward function wrapped with output validation and error reporting (see `checked_reward`).

    Args:
        reward: the wrapped reward function (TRL convention).
        name: the logged name; defaults to the wrapped reward's `__name__`.
        locate_rows: on an unexpected exception, re-run the reward one row at a time to find the
            first row that fails (log callbacks are disabled during the re-runs).

    Returns:
        Calling it returns the wrapped reward's output as `list[float | None]`.
    """

    def __init__(self, reward: Callable, name: str | None = None, locate_rows: bool = True):
        if not callable(reward):
            raise TypeError(f"reward must be callable, got {type(reward).__name__}")
        self.reward = reward
        self.__name__ = name or reward_name(reward)
        self.locate_rows = locate_rows

    def _expected_length(self, prompts, completions) -> int | None:
        for seq in (completions, prompts):
            if seq is not None and hasattr(seq, "__len__"):
                return len(seq)
        return None

    def _failed(self, exc: Exception, n: int | None, args: dict) -> RewardError:
        if isinstance(exc, RewardError):
            return exc.with_reward(self.__name__)
        row = self._locate(n, args) if self.locate_rows and n else None
        detail = "" if row is not None or not self.locate_rows or not n else " (it did not fail on any single row alone)"
        err = RewardFailedError(f"raised {type(exc).__name__}: {exc}{detail}", reward=self.__name__, row=row)
        return err

    def _row_args(self, i: int, n: int, args: dict) -> dict:
        row = {}
        for key, value in args.items():
            if key in ("log_extra", "log_metric"):
                row[key] = _ignore
            elif key not in _TRL_EXTRAS and _is_per_row(value, n):
                row[key] = value[i : i + 1]  # lists, tuples, stacked arrays and tensors alike
            else:
                row[key] = value
        return row

    def _locate(self, n: int, args: dict) -> int | None:
        for i in range(n):
            try:
                self.reward(**self._row_args(i, n, args))
            except Exception:
                return i
        return None

    def __call__(self, prompts=None, completions=None, completion_ids=None, **kwargs) -> list[float | None]:
        args = dict(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)
        n = self._expected_length(prompts, completions)
        try:
            values = self.reward(**args)
        except Exception as e:
            raise self._failed(e, n, args) from e
        return validate_rewards(values, n, self.__name__)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.reward!r}, name={self.__name__!r})"


class AsyncCheckedReward(CheckedReward):
    """`CheckedReward` for an `async` reward function (TRL awaits these concurrently)."""

    async def _locate_async(self, n: int, args: dict) -> int | None:
        for i in range(n):
            try:
                await self.reward(**self._row_args(i, n, args))
            except Exception:
                return i
        return None

    async def __call__(self, prompts=None, completions=None, completion_ids=None, **kwargs) -> list[float | None]:
        args = dict(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)
        n = self._expected_length(prompts, completions)
        try:
            values = await self.reward(**args)
        except Exception as e:
            if isinstance(e, RewardError):
                raise e.with_reward(self.__name__) from None
            row = await self._locate_async(n, args) if self.locate_rows and n else None
            raise RewardFailedError(f"raised {type(e).__name__}: {e}", reward=self.__name__, row=row) from e
        return validate_rewards(values, n, self.__name__)


def _is_per_row(value: Any, n: int) -> bool:
    if isinstance(value, (list, tuple)):
        return len(value) == n
    shape = getattr(value, "shape", None)  # numpy array / torch tensor stacked over the batch
    return shape is not None and len(shape) > 0 and shape[0] == n


def _ignore(*args, **kwargs) -> None:
    return None


def _is_async(fn: Callable) -> bool:
    while hasattr(fn, "func") and hasattr(fn, "keywords"):
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


def checked_reward(reward: Callable, name: str | None = None, locate_rows: bool = True) -> CheckedReward:
    """Wrap a reward so that bad outputs and exceptions raise errors naming the reward and the row.

    Wrapping twice is a no-op (the existing wrapper is returned, renamed if `name` is given).

    Args:
        reward: any TRL reward function, sync or async.
        name: the logged name (`rewards/<name>/mean`); defaults to the reward's `__name__`.
        locate_rows: on an unexpected exception, re-run row by row to name the failing row.

    Returns:
        A picklable callable with the same `__name__` and call convention.

    Example:
        >>> def half(prompts, completions, completion_ids, **kwargs):
        ...     return [0.5 if c else float("nan") for c in completions]
        >>> checked = checked_reward(half)
        >>> checked(prompts=["p", "p"], completions=["a", "b"], completion_ids=[[1], [2]])
        [0.5, 0.5]
        >>> checked(prompts=["p", "p"], completions=["a", ""], completion_ids=[[1], []])
        Traceback (most recent call last):
        ...
        sa2va_trl.rewards.errors.RewardOutputError: reward 'half', row 1: returned NaN; return None for rows the reward does not apply to (NaN would be silently dropped)
    """
    if isinstance(reward, CheckedReward):
        if name is not None and name != reward.__name__:
            return type(reward)(reward.reward, name=name, locate_rows=locate_rows)
        return reward
    cls = AsyncCheckedReward if _is_async(reward) else CheckedReward
    return cls(reward, name=name, locate_rows=locate_rows)
