"""checked_reward: bad outputs and exceptions raise errors naming the reward and the row; NaN is never silently 0."""

import asyncio
import math
import pickle

import numpy as np
import pytest
import torch

from sa2va_trl.rewards import (
    RewardError,
    RewardFailedError,
    RewardInputError,
    RewardOutputError,
    checked_reward,
    get_reward,
    validate_rewards,
)
from sa2va_trl.rewards.checks import AsyncCheckedReward, CheckedReward


def returns(values):
    def fixed(prompts, completions, completion_ids, **kwargs):
        return values

    return fixed


def fails_on_word(prompts, completions, completion_ids, **kwargs):
    kwargs["log_metric"]("calls", 1.0)
    return [1.0 / (c != "boom") for c in completions]  # ZeroDivisionError on the "boom" row


def _call(fn, completions, **columns):
    n = len(completions)
    return fn(prompts=["p"] * n, completions=completions, completion_ids=[[0]] * n, **columns)


def test_valid_outputs_become_python_floats_and_none():
    out = _call(checked_reward(returns([1, np.float32(0.5), None, torch.tensor(0.25), True])), list("abcde"))
    assert out == [1.0, 0.5, None, 0.25, 1.0] and all(type(v) is float for v in out if v is not None)
    assert _call(checked_reward(returns(np.array([0.5, 1.0]))), ["a", "b"]) == [0.5, 1.0]
    assert _call(checked_reward(returns(torch.tensor([0.5, 1.0]))), ["a", "b"]) == [0.5, 1.0]


@pytest.mark.parametrize(
    "values, row, fragment",
    [
        ([0.5, float("nan")], 1, "returned NaN; return None for rows the reward does not apply to"),
        ([float("inf"), 0.0], 0, "returned inf; rewards must be finite"),
        ([0.5, "0.5"], 1, "returned a str ('0.5'); expected a float or None"),
        (np.array([0.0, np.nan]), 1, "returned NaN"),
        ([0.5], None, "returned 1 rewards for 2 completions"),
        (0.5, None, "must return a list with one reward per completion, got float"),
    ],
)
def test_bad_outputs_name_the_reward_and_row(values, row, fragment):
    fn = returns(values)
    fn.__name__ = "my_reward"
    with pytest.raises(RewardOutputError) as info:
        _call(checked_reward(fn), ["a", "b"])
    assert info.value.reward == "my_reward" and info.value.row == row
    assert fragment in str(info.value) and str(info.value).startswith("reward 'my_reward'")


def test_exception_names_the_reward_and_the_failing_row_and_chains_the_cause():
    logged = []
    fn = checked_reward(fails_on_word)
    with pytest.raises(RewardFailedError) as info:
        _call(fn, ["ok", "fine", "boom", "ok"], log_metric=lambda name, v: logged.append(name))
    err = info.value
    assert err.reward == "fails_on_word" and err.row == 2
    assert str(err) == "reward 'fails_on_word', row 2: raised ZeroDivisionError: float division by zero"
    assert isinstance(err.__cause__, ZeroDivisionError)
    assert logged == ["calls"]  # the row-by-row search does not log again


def test_failing_row_is_found_in_stacked_tensor_columns_too():
    def bad_scores(prompts, completions, completion_ids, scores, **kwargs):
        assert len(scores) == len(completions)
        if bool((scores < 0).any()):
            raise ValueError("negative score")
        return scores.tolist()

    with pytest.raises(RewardFailedError, match=r"row 1: raised ValueError: negative score"):
        _call(checked_reward(bad_scores), ["a", "b", "c"], scores=torch.tensor([0.5, -1.0, 0.25]))


def test_batch_only_failure_says_no_single_row_failed():
    def needs_pairs(prompts, completions, completion_ids, **kwargs):
        if len(completions) > 2:
            raise RuntimeError("big batch")
        return [0.0] * len(completions)

    with pytest.raises(RewardFailedError, match="raised RuntimeError: big batch \\(it did not fail on any single row alone\\)"):
        _call(checked_reward(needs_pairs), ["a", "b", "c"])


def test_input_errors_keep_their_row_and_gain_the_reward_name():
    def strict(prompts, completions, completion_ids, **kwargs):
        raise RewardInputError("bad value", row=1, field="caption")

    with pytest.raises(RewardInputError) as info:
        _call(checked_reward(strict, name="strict_one"), ["a", "b"])
    assert str(info.value) == "reward 'strict_one', row 1, field 'caption': bad value"


def test_registry_rewards_are_checked():
    reward = get_reward("mask_iou")
    with pytest.raises(RewardError) as info:
        _call(reward, ["a"], pred_mask=[[[1, 0]]], region_mask=[[[1, 0, 0]]])
    assert info.value.reward == "mask_iou" and info.value.row == 0


def test_wrapping_is_idempotent_renamable_and_picklable():
    fn = checked_reward(fails_on_word)
    assert checked_reward(fn) is fn
    renamed = checked_reward(fn, name="other")
    assert renamed.__name__ == "other" and renamed.reward is fails_on_word
    clone = pickle.loads(pickle.dumps(renamed))
    assert clone.__name__ == "other" and _call(clone, ["ok"], log_metric=lambda *a: None) == [1.0]


def test_async_rewards_stay_async_and_are_checked():
    async def slow(prompts, completions, completion_ids, **kwargs):
        return [math.nan if c == "x" else 1.0 for c in completions]

    fn = checked_reward(slow)
    assert isinstance(fn, AsyncCheckedReward)
    assert asyncio.run(_call(fn, ["a"])) == [1.0]
    with pytest.raises(RewardOutputError, match="reward 'slow', row 1: returned NaN"):
        asyncio.run(_call(fn, ["a", "x"]))


def test_validate_rewards_directly():
    assert validate_rewards((0, None), 2, "demo") == [0.0, None]
    assert validate_rewards([0.5], None, "demo") == [0.5]
    assert isinstance(checked_reward(returns([])), CheckedReward)
