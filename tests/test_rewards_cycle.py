"""Cycle rewards: the reverse model is called once per batch, under no_grad, through an explicit handle."""

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from sa2va_trl.rewards import (
    CycleIoU,
    CycleMeteor,
    RewardInputError,
    get_reward,
    iou,
    mask_to_rle,
    meteor,
)

H, W = 4, 6
LEFT = np.zeros((H, W), bool)
LEFT[:, :3] = True
RIGHT = ~LEFT
TOP_LEFT = np.zeros((H, W), bool)
TOP_LEFT[:2, :3] = True


class FakeReverse:
    """A deterministic stand-in for Sa2VAPolicy's `segment` / `caption`, recording every call.

    segment: a text mentioning "left" -> LEFT, "right" -> RIGHT, else an empty mask.
    caption: a mask covering pixel (0, 0) -> "a dog on the left", else "a cat on the right".
    """

    def __init__(self, size=(H, W)):
        self.size = size
        self.segment_calls = []
        self.caption_calls = []

    def segment(self, images, texts):
        assert not torch.is_grad_enabled(), "the reverse model must run under no_grad"
        self.segment_calls.append(list(texts))
        out = []
        for text in texts:
            if "left" in text:
                m = LEFT
            elif "right" in text:
                m = RIGHT
            else:
                m = np.zeros((H, W), bool)
            out.append(m if self.size == (H, W) else np.zeros(self.size, bool))
        return out

    def caption(self, images, region_masks):
        assert not torch.is_grad_enabled(), "the reverse model must run under no_grad"
        self.caption_calls.append([np.asarray(m).copy() for m in region_masks])
        return ["a dog on the left" if m[0, 0] else "a cat on the right" for m in region_masks]


def image(seed=0):
    return Image.fromarray(np.full((H, W, 3), seed, np.uint8))


def call(reward, completions, **columns):
    n = len(completions)
    return reward(prompts=["p"] * n, completions=completions, completion_ids=[[0]] * n, **columns)


# --- cycle_iou ----------------------------------------------------------------------------------


def test_cycle_iou_scores_each_caption_by_segmenting_it_back():
    reverse = FakeReverse()
    reward = get_reward("cycle_iou", reverse_policy=reverse)
    completions = ["the left half", "the right half", "something", [{"role": "assistant", "content": "left side"}]]
    out = call(reward, completions, img=[image()] * 4, region_mask=[LEFT, LEFT, LEFT, mask_to_rle(TOP_LEFT)])
    # LEFT vs LEFT = 1; RIGHT vs LEFT = 0; empty vs LEFT = 0; LEFT vs TOP_LEFT = 6 / 12
    assert out == pytest.approx([1.0, 0.0, 0.0, 0.5])
    assert reverse.segment_calls == [["the left half", "the right half", "something", "left side"]]


def test_cycle_iou_dedupes_identical_image_and_caption_pairs_into_one_call():
    reverse = FakeReverse()
    reward = CycleIoU(reverse_policy=reverse)
    # Two prompts x G=3; each row's image is a distinct but identical PIL object, as TRL delivers them.
    completions = ["a left bar", "a left bar", "a right bar", "a left bar", "a left bar", "a left bar"]
    images = [image(0), image(0), image(0), image(9), image(9), image(9)]
    out = call(reward, completions, img=images, region_mask=[LEFT] * 6)
    assert out == pytest.approx([1.0, 1.0, 0.0, 1.0, 1.0, 1.0])
    assert len(reverse.segment_calls) == 1
    assert sorted(reverse.segment_calls[0]) == ["a left bar", "a left bar", "a right bar"]  # (img0, left) once, (img9, left) once


def test_cycle_iou_applies_to_loop1_rows_only():
    reverse = FakeReverse()
    reward = get_reward("cycle_iou", reverse_policy=reverse)
    # with a task column: only mask_to_caption rows
    out = call(reward, ["left", "left", "left"], img=[image()] * 3, region_mask=[LEFT, LEFT, None],
               task=["mask_to_caption", "caption_to_mask", "mask_to_caption"])
    assert out == [1.0, None, None]
    # without a task column: rows carrying a predicted mask are loop 2
    out = call(reward, ["left", "left"], img=[image()] * 2, region_mask=[LEFT, LEFT], pred_mask=[None, RIGHT])
    assert out == [1.0, None]
    # nothing applicable: the reverse model is not called (and need not exist)
    reverse.segment_calls.clear()
    assert call(CycleIoU(), ["a"], img=[image()], region_mask=[None]) == [None]
    assert reverse.segment_calls == []


def test_reverse_policy_per_call_wins_and_may_be_a_column():
    bound, per_call = FakeReverse(), FakeReverse()
    reward = CycleIoU(reverse_policy=bound)
    call(reward, ["left"], img=[image()], region_mask=[LEFT], reverse_policy=per_call)
    assert per_call.segment_calls and not bound.segment_calls
    column = FakeReverse()
    assert call(CycleIoU(), ["left", "right"], img=[image()] * 2, region_mask=[LEFT] * 2,
                reverse_policy=[column, column]) == [1.0, 0.0]
    with pytest.raises(RewardInputError, match="holds different objects"):
        call(CycleIoU(), ["left", "right"], img=[image()] * 2, region_mask=[LEFT] * 2,
             reverse_policy=[FakeReverse(), FakeReverse()])


def test_missing_or_wrong_reverse_policy_says_how_to_pass_it():
    with pytest.raises(RewardInputError) as info:
        call(get_reward("cycle_iou"), ["left"], img=[image()], region_mask=[LEFT])
    assert info.value.reward == "cycle_iou" and info.value.field == "reverse_policy"
    assert "get_reward('cycle_iou', reverse_policy=policy)" in str(info.value)
    with pytest.raises(RewardInputError, match="has no `segment` method"):
        call(CycleIoU(reverse_policy=object()), ["left"], img=[image()], region_mask=[LEFT])


def test_reverse_mask_of_the_wrong_size_names_the_row():
    reward = get_reward("cycle_iou", reverse_policy=FakeReverse(size=(8, 8)))
    with pytest.raises(RewardInputError) as info:
        call(reward, ["a", "left"], img=[image()] * 2, region_mask=[None, LEFT])
    assert info.value.row == 1 and "returned a 8 x 8 mask for a 4 x 6 region" in str(info.value)


def test_reverse_policy_returning_the_wrong_count_is_reported():
    class Short(FakeReverse):
        def segment(self, images, texts):
            return super().segment(images, texts)[:-1]

    with pytest.raises(RewardInputError, match="reverse_policy.segment returned 1 results for 2 inputs"):
        call(CycleIoU(reverse_policy=Short()), ["left", "right"], img=[image()] * 2, region_mask=[LEFT] * 2)


def test_missing_image_names_row_and_field():
    with pytest.raises(RewardInputError, match=r"row 1, field 'img': the row has a region but no image"):
        call(CycleIoU(reverse_policy=FakeReverse()), ["l", "l"], img=[image(), None], region_mask=[LEFT] * 2)


# --- cycle_meteor -------------------------------------------------------------------------------


def test_cycle_meteor_captions_each_predicted_mask_and_scores_against_the_caption():
    reverse = FakeReverse()
    logged = {}
    reward = get_reward("cycle_meteor", reverse_policy=reverse)
    out = call(reward, ["Sure, [SEG]."] * 4, img=[image()] * 4,
               caption=["a dog on the left", "a dog on the left", ["a cat", "a cat on the right"], None],
               pred_mask=[LEFT, RIGHT, torch.from_numpy(RIGHT), LEFT],
               log_extra=lambda column, values: logged.__setitem__(column, values))
    assert out[0] == meteor("a dog on the left", "a dog on the left")
    assert out[1] == meteor("a cat on the right", "a dog on the left")
    assert out[2] == meteor("a cat on the right", ["a cat", "a cat on the right"])
    assert out[3] is None
    # one call; RIGHT appears twice on the same image (numpy and torch) and is captioned once
    assert len(reverse.caption_calls) == 1 and len(reverse.caption_calls[0]) == 2
    assert logged == {"cycle_meteor/caption": ["a dog on the left", "a cat on the right", "a cat on the right", None]}


def test_cycle_meteor_applies_to_loop2_rows_only():
    reverse = FakeReverse()
    reward = CycleMeteor(reverse_policy=reverse)
    out = call(reward, ["s"] * 3, img=[image()] * 3, caption=["a dog on the left"] * 3,
               pred_mask=[LEFT, LEFT, None], task=["caption_to_mask", "mask_to_caption", "caption_to_mask"])
    assert out[0] > 0.99 and out[1:] == [None, None]
    # loop-1-only batch (no pred_mask column at all): not applicable, no reverse call
    assert call(CycleMeteor(), ["s"], img=[image()], caption=["a dog"]) == [None]


def test_cycle_meteor_bad_mask_and_bad_caption_output_name_the_row():
    reward = CycleMeteor(reverse_policy=FakeReverse())
    with pytest.raises(RewardInputError, match=r"row 1, field 'pred_mask'"):
        call(reward, ["s", "s"], img=[image()] * 2, caption=["a"] * 2, pred_mask=[LEFT, np.full((H, W), 0.5)])

    class NotText(FakeReverse):
        def caption(self, images, region_masks):
            return [None for _ in region_masks]

    with pytest.raises(RewardInputError, match=r"row 0, field 'reverse_policy': reverse_policy.caption returned a NoneType"):
        call(CycleMeteor(reverse_policy=NotText()), ["s"], img=[image()], caption=["a"], pred_mask=[LEFT])


def test_cycle_rewards_pickle_with_their_names():
    for cls, name in [(CycleIoU, "cycle_iou"), (CycleMeteor, "cycle_meteor")]:
        reward = cls(image_column="picture")
        clone = pickle.loads(pickle.dumps(reward))
        assert clone.__name__ == name and clone.image_column == "picture" and clone.reverse_policy is None
    bound = pickle.loads(pickle.dumps(get_reward("cycle_iou", reverse_policy=FakeReverse())))
    assert bound.__name__ == "cycle_iou"
    assert call(bound, ["left"], img=[image()], region_mask=[LEFT]) == [1.0]


# --- with the real tiny Sa2VA policy ------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_policy():
    try:
        from sa2va_trl.models.adapter import Sa2VAPolicy
        from sa2va_trl.models.tiny import build_tiny_model
    except ImportError as e:
        pytest.skip(f"the tiny Sa2VA policy is not available yet ({e})")
    model, tokenizer = build_tiny_model(seed=0)
    try:
        return Sa2VAPolicy(model, tokenizer)
    except NotImplementedError:
        pytest.skip("Sa2VAPolicy is not implemented yet")


def test_cycle_rewards_with_the_tiny_policy(tiny_policy):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)
    region = np.zeros((128, 128), bool)
    region[16:80, 24:96] = True
    other = np.zeros((128, 128), bool)
    other[64:128, 0:64] = True

    cycle_iou = get_reward("cycle_iou", reverse_policy=tiny_policy)
    captions = ["a red square", "a red square", "a blue circle"]
    out = call(cycle_iou, captions + [""], img=[Image.fromarray(img)] * 4, region_mask=[mask_to_rle(region)] * 4)
    expected = [iou(m, region) for m in tiny_policy.segment([img] * 3, captions)]
    assert out == pytest.approx(expected + [0.0])  # an empty caption never reaches the adapter (it rejects it)
    assert all(0.0 <= v <= 1.0 for v in out)

    cycle_meteor = get_reward("cycle_meteor", reverse_policy=tiny_policy)
    out = call(cycle_meteor, ["Sure, [SEG]."] * 4, img=[img] * 4, caption=["a small green triangle"] * 4,
               pred_mask=[region, other, None, np.zeros_like(region)])
    reverse_captions = tiny_policy.caption([img, img], [region, other])
    assert out[:2] == pytest.approx([meteor(c, "a small green triangle") for c in reverse_captions])
    assert out[2:] == [None, 0.0]  # an empty predicted mask never reaches the adapter either


def test_loop1_and_loop2_rows_share_a_batch():
    """Every built-in reward on one mixed batch: each scores its own rows and returns None for the others."""
    from sa2va_trl.rewards import build_rewards

    funcs, _ = build_rewards(["mask_iou", "mask_dice", "caption_meteor", "cycle_iou", "cycle_meteor"],
                             shared_options={"reverse_policy": FakeReverse()})
    columns = dict(
        prompts=["p"] * 4,
        completion_ids=[[0]] * 4,
        completions=["a dog on the left", "a dog on the left", "Sure, [SEG].", "Sure, [SEG]."],
        task=["mask_to_caption", "mask_to_caption", "caption_to_mask", "caption_to_mask"],
        img=[image()] * 4,
        region_mask=[mask_to_rle(LEFT)] * 4,
        caption=["a dog on the left", None, "a dog on the left", "a dog on the left"],
        pred_mask=[None, None, LEFT, RIGHT],
        trainer_state=None,
        log_extra=lambda *a: None,
        log_metric=lambda *a: None,
    )
    table = {f.__name__: f(**columns) for f in funcs}
    same = meteor("a dog on the left", "a dog on the left")
    assert table["mask_iou"] == [None, None, 1.0, 0.0]
    assert table["mask_dice"] == [None, None, 1.0, 0.0]
    assert table["caption_meteor"] == [same, None, None, None]  # row 1 has no reference caption
    assert table["cycle_iou"] == [1.0, 1.0, None, None]
    assert table["cycle_meteor"] == [None, None, same, meteor("a cat on the right", "a dog on the left")]


def test_cycle_meteor_scores_uncaptionable_masks_without_sending_them():
    class Picky(FakeReverse):
        """Rejects regions smaller than 6 pixels, as the adapter rejects regions under min_region_cells."""

        def captionable(self, images, region_masks):
            return [int(np.asarray(m).sum()) >= 6 for m in region_masks]

    reverse = Picky()
    metrics = {}
    reward = CycleMeteor(reverse_policy=reverse, uncaptionable_reward=-0.5)
    tiny = np.zeros((H, W), bool)
    tiny[0, 0] = True
    out = call(reward, ["s"] * 4, img=[image()] * 4, caption=["a dog on the left"] * 4,
               pred_mask=[np.zeros((H, W), bool), tiny, LEFT, None],
               log_metric=lambda name, value: metrics.__setitem__(name, value))
    assert out[:2] == [-0.5, -0.5] and out[2] > 0.99 and out[3] is None
    assert len(reverse.caption_calls) == 1 and len(reverse.caption_calls[0]) == 1  # only LEFT was captioned
    assert np.array_equal(reverse.caption_calls[0][0], LEFT)
    assert metrics == {"cycle_meteor/uncaptionable": pytest.approx(2 / 3)}
    # every mask empty: the reverse model is never called; the default reward is 0.0
    plain = FakeReverse()
    assert call(CycleMeteor(reverse_policy=plain), ["s"], img=[image()], caption=["a dog"],
                pred_mask=[np.zeros((H, W), bool)]) == [0.0]
    assert plain.caption_calls == []


def test_cycle_iou_scores_empty_captions_without_segmenting_them():
    reverse = FakeReverse()
    reward = CycleIoU(reverse_policy=reverse, empty_caption_reward=-1.0)
    out = call(reward, ["  ", "the left one", ""], img=[image()] * 3, region_mask=[LEFT] * 3)
    assert out == [-1.0, 1.0, -1.0]
    assert reverse.segment_calls == [["the left one"]]
    only_empty = FakeReverse()
    assert call(CycleIoU(reverse_policy=only_empty), [""], img=[image()], region_mask=[LEFT]) == [0.0]
    assert only_empty.segment_calls == []
