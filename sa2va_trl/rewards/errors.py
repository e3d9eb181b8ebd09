"""Errors raised by the rewards: each names the reward, the row and the field it is about.

All of them subclass `ValueError`, so code that already guards reward calls with
`except ValueError` keeps working, while the message says exactly what to fix.
"""

from __future__ import annotations


class RewardError(ValueError):
    """Base class of the reward errors.

    Args:
        message: what went wrong and, where possible, how to fix it.
        reward: the reward's name (its `__name__`), when known.
        row: the index of the offending row inside the batch, when known.
        field: the column (keyword argument) at fault, when known.
    """

    def __init__(self, message: str, *, reward: str | None = None, row: int | None = None, field: str | None = None):
        self.message = message
        self.reward = reward
        self.row = row
        self.field = field
        super().__init__(self._render())

    def _render(self) -> str:
        where = []
        if self.reward is not None:
            where.append(f"reward {self.reward!r}")
        if self.row is not None:
            where.append(f"row {self.row}")
        if self.field is not None:
            where.append(f"field {self.field!r}")
        return f"{', '.join(where)}: {self.message}" if where else self.message

    def with_reward(self, reward: str) -> "RewardError":
        """Return the same error with the reward's name filled in (no-op if already set)."""
        if self.reward is None:
            self.reward = reward
            self.args = (self._render(),)
        return self


class RewardInputError(RewardError):
    """A column passed to a reward is missing, has the wrong length, or holds a bad value."""


class MaskFormatError(RewardInputError):
    """A value could not be read as an H x W binary mask (see `sa2va_trl.rewards.masks.as_mask`)."""


class RewardOutputError(RewardError):
    """A reward returned something TRL cannot use: wrong length, NaN, infinity or a non-number."""


class RewardFailedError(RewardError):
    """A reward raised an unexpected exception; the original is chained as `__cause__`."""


class UnknownRewardError(RewardError, KeyError):
    """`get_reward` got a name that is neither registered nor a `package.module:function` path."""

    # KeyError.__str__ would wrap the message in quotes; keep ValueError's plain text.
    __str__ = ValueError.__str__
