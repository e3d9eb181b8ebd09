"""Model-free parts of the trainer module: loop expansion and loop-bound rewards."""

from __future__ import annotations

import pickle

import datasets
import pytest

from sa2va_trl.config import CAPTION_TO_MASK, MASK_TO_CAPTION
from sa2va_trl.rewards.errors import RewardError
from sa2va_trl.trainer import LoopReward, bind_rewards_to_loops, expand_loops


def rows(captions):
    n = len(captions)
    return datasets.Dataset.from_dict({
        "img": [None] * n, "region_mask": [None] * n, "caption": captions,
        "source_id": [f"s{i}" for i in range(n)], "region_index": list(range(n)),
    })


def test_expand_loops_makes_one_row_per_applicable_loop():
    out = expand_loops(rows(["a red circle", None, "  "]))
    assert out["task"] == [MASK_TO_CAPTION, CAPTION_TO_MASK, MASK_TO_CAPTION, MASK_TO_CAPTION]
    assert out["source_id"] == ["s0", "s0", "s1", "s2"]
    assert out["row_id"] == [0, 1, 2, 3]
    assert out["prompt"][1] == "[caption_to_mask] s0#0"


def test_expand_loops_skips_regions_that_do_not_fit_for_loop_one_only():
    out = expand_loops(rows(["a", "b"]), region_fits=lambda mask: False)
    assert out["task"] == [CAPTION_TO_MASK, CAPTION_TO_MASK]
    with pytest.raises(ValueError, match="caption_to_mask loop needs rows with a caption"):
        expand_loops(rows([None]), loops=[CAPTION_TO_MASK])


def _scores(prompts, completions, completion_ids, caption, **kwargs):
    return [float(len(c)) for c in caption]


def _fails_on_b(prompts, completions, completion_ids, caption, **kwargs):
    return [1.0 / 0.0 if c == "bb" else 0.0 for c in caption]


def test_loop_reward_scores_only_its_loop_and_logs_aligned_extras():
    logged = {}
    reward = LoopReward(_scores, CAPTION_TO_MASK)
    assert reward.__name__ == "caption_to_mask/_scores"
    out = reward(
        prompts=["p"] * 3, completions=["x", "y", "z"], completion_ids=[[1], [2], [3]],
        caption=["a", "bb", "ccc"], task=[MASK_TO_CAPTION, CAPTION_TO_MASK, CAPTION_TO_MASK],
        log_extra=lambda column, values: logged.setdefault(column, values), trainer_state=None,
    )
    assert out == [None, 2.0, 3.0]
    assert pickle.loads(pickle.dumps(reward)).__name__ == reward.__name__


def test_loop_reward_error_names_the_batch_row_and_the_reward():
    reward = LoopReward(_fails_on_b, CAPTION_TO_MASK)
    with pytest.raises(RewardError) as info:
        reward(prompts=["p"] * 3, completions=["x"] * 3, completion_ids=[[1]] * 3, caption=["a", "zz", "bb"],
               task=[MASK_TO_CAPTION, CAPTION_TO_MASK, CAPTION_TO_MASK])
    assert info.value.row == 2 and info.value.reward == "caption_to_mask/_fails_on_b"


def test_bind_rewards_to_loops_orders_by_loop_and_refuses_unknown_loops():
    funcs = bind_rewards_to_loops({CAPTION_TO_MASK: [_scores], MASK_TO_CAPTION: [_scores, _fails_on_b]})
    assert [f.__name__ for f in funcs] == [
        "mask_to_caption/_scores", "mask_to_caption/_fails_on_b", "caption_to_mask/_scores"
    ]
    with pytest.raises(ValueError, match="unknown loops"):
        bind_rewards_to_loops({"loop3": [_scores]})
