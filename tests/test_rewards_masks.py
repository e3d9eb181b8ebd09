"""as_mask (the one converter), IoU / Dice scores and the mask_iou / mask_dice rewards."""

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from sa2va_trl.rewards.masks import DECODED_RLE_CACHE, DecodedRLECache
from sa2va_trl.rewards import (
    MaskDice,
    MaskFormatError,
    MaskIoU,
    RewardInputError,
    as_mask,
    batch_dice,
    batch_iou,
    dice,
    get_reward,
    iou,
    mask_to_rle,
)

A = [[1, 1, 0, 0],
     [1, 1, 0, 0],
     [0, 0, 0, 0]]  # 4 pixels
B = [[0, 1, 1, 0],
     [0, 1, 1, 0],
     [0, 1, 1, 0]]  # 6 pixels, 2 shared with A
# IoU = 2 / (4 + 6 - 2) = 0.25; Dice = 2 * 2 / (4 + 6) = 0.4


def _call(reward, pred, target):
    n = len(pred)
    return reward(prompts=["p"] * n, completions=["c"] * n, completion_ids=[[0]] * n, pred_mask=pred, region_mask=target)


# --- as_mask ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        np.array(A, dtype=bool),
        np.array(A, dtype=np.uint8),
        np.array(A, dtype=np.float32),
        np.array(A, dtype=np.int64),
        torch.tensor(A, dtype=torch.bool),
        torch.tensor(A, dtype=torch.float32),
        torch.tensor(A, dtype=torch.bfloat16),
        torch.tensor(A, dtype=torch.uint8),
        A,
        Image.fromarray(np.array(A, dtype=np.uint8)),  # mode "L" with 0/1 values
        Image.fromarray(np.array(A, dtype=bool)),  # mode "1"
    ],
    ids=["np-bool", "np-uint8", "np-float", "np-int", "torch-bool", "torch-float", "torch-bf16", "torch-uint8",
         "list", "pil-L", "pil-1"],
)
def test_as_mask_reads_every_supported_array_form(value):
    m = as_mask(value)
    assert m.dtype == bool and m.shape == (3, 4)
    np.testing.assert_array_equal(m, np.array(A, dtype=bool))


def test_as_mask_reads_coco_rle_compressed_and_uncompressed():
    ref = np.array(B, dtype=bool)
    rle = mask_to_rle(ref)
    assert rle["size"] == [3, 4] and isinstance(rle["counts"], str)
    np.testing.assert_array_equal(as_mask(rle), ref)
    np.testing.assert_array_equal(as_mask({"size": [3, 4], "counts": rle["counts"].encode()}), ref)
    # uncompressed, column-major runs: column 0 is 3 zeros, columns 1-2 are 6 ones, column 3 is 3 zeros
    np.testing.assert_array_equal(as_mask({"size": [3, 4], "counts": [3, 6, 3]}), ref)


def test_as_mask_returns_bool_input_without_copy():
    m = np.zeros((4, 5), dtype=bool)
    assert as_mask(m) is m


@pytest.mark.parametrize(
    "value, fragment",
    [
        (None, "got None"),
        (np.zeros((1, 3, 4), bool), "expected an H x W mask, got shape (1, 3, 4)"),
        (np.zeros((0, 4), bool), "empty shape"),
        (np.array([[0, 0.7]]), "values other than 0 and 1"),
        (np.array([[0, 255]], np.uint8), "divide 0/255 masks by 255"),
        (torch.tensor([[0.2, 1.0]]), "values other than 0 and 1"),
        ([[1, 0], [1]], "not a rectangular"),
        ("mask", "got str"),
        ({"size": [3, 4]}, "needs 'size' [H, W]"),
        ({"size": [3, 4], "counts": [3, 6]}, "sum to 9, expected H * W = 12"),
        ({"size": [3, 4], "counts": 12}, "'counts' must be a str"),
        (np.array([["a", "b"]]), "dtype <U1"),
    ],
)
def test_as_mask_errors_name_row_and_field(value, fragment):
    with pytest.raises(MaskFormatError) as info:
        as_mask(value, row=7, field="region_mask")
    message = str(info.value)
    assert message.startswith("row 7, field 'region_mask': ")
    assert fragment in message
    assert info.value.row == 7 and info.value.field == "region_mask"
    assert isinstance(info.value, ValueError)


def test_mask_to_rle_round_trip_on_a_large_random_mask():
    rng = np.random.default_rng(0)
    m = rng.random((97, 131)) < 0.3
    np.testing.assert_array_equal(as_mask(mask_to_rle(m)), m)


# --- scores -------------------------------------------------------------------------------------


def test_iou_and_dice_match_hand_computed_values():
    assert iou(A, B) == pytest.approx(0.25)
    assert dice(A, B) == pytest.approx(0.4)
    assert iou(A, A) == 1.0 and dice(A, A) == 1.0
    zeros = np.zeros((3, 4), bool)
    assert iou(A, zeros) == 0.0 and dice(zeros, B) == 0.0
    # both empty: the region is empty and nothing was predicted -> perfect (documented)
    assert iou(zeros, zeros) == 1.0 and dice(zeros, zeros) == 1.0


def test_batch_scores_on_stacked_torch_and_numpy():
    preds = torch.tensor([A, B, A], dtype=torch.bool)
    targets = np.array([B, B, np.zeros((3, 4))], dtype=bool)
    assert batch_iou(preds, targets) == pytest.approx([0.25, 1.0, 0.0])
    assert batch_dice(preds, targets) == pytest.approx([0.4, 1.0, 0.0])


def test_batch_scores_reject_different_sizes_naming_the_row():
    with pytest.raises(RewardInputError, match=r"row 1, field 'pred': pred is 2 x 2 but target is 3 x 4"):
        batch_iou([A, [[1, 0], [0, 1]]], [B, B])


# --- rewards ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["numpy", "torch", "rle", "list"])
def test_mask_iou_and_dice_rewards_batched(kind):
    def make(m):
        arr = np.array(m, dtype=bool)
        return {"numpy": arr, "torch": torch.from_numpy(arr), "rle": mask_to_rle(arr), "list": m}[kind]

    empty = [[0] * 4] * 3
    pred = [make(A), make(B), None, make(empty), make(A)]
    target = [make(B), make(B), make(B), make(empty), None]
    assert _call(get_reward("mask_iou"), pred, target) == pytest.approx([0.25, 1.0, None, 1.0, None])
    assert _call(get_reward("mask_dice"), pred, target) == pytest.approx([0.4, 1.0, None, 1.0, None])


def test_fortran_ordered_masks_score_the_same():
    rng = np.random.default_rng(1)
    p, t = rng.random((37, 53)) < 0.4, rng.random((37, 53)) < 0.6
    expected = iou(p, t)
    assert iou(np.asfortranarray(p), t) == expected == iou(p, np.asfortranarray(t))
    assert _call(MaskIoU(), [np.asfortranarray(p)], [mask_to_rle(t)]) == [expected]


def test_mask_reward_accepts_a_stacked_tensor_column():
    pred = torch.tensor([A, B], dtype=torch.bool)
    assert _call(MaskIoU(), pred, [B, B]) == pytest.approx([0.25, 1.0])


def test_mask_reward_rejects_masks_of_different_sizes_naming_the_row():
    reward = get_reward("mask_iou")
    with pytest.raises(RewardInputError) as info:
        _call(reward, [A, np.zeros((6, 8), bool)], [B, B])
    assert info.value.row == 1 and info.value.field == "pred_mask" and info.value.reward == "mask_iou"
    assert "pred_mask is 6 x 8 but region_mask is 3 x 4" in str(info.value)


def test_mask_reward_reports_bad_mask_and_missing_column():
    with pytest.raises(MaskFormatError, match=r"reward 'mask_dice', row 1, field 'region_mask'"):
        _call(get_reward("mask_dice"), [A, A], [B, np.full((3, 4), 0.5)])
    reward = get_reward("mask_iou")
    with pytest.raises(RewardInputError, match=r"needs the column 'pred_mask'.*columns received: \['region_mask'\]"):
        reward(prompts=["p"], completions=["c"], completion_ids=[[0]], region_mask=[B])
    with pytest.raises(RewardInputError, match=r"has 1 values but there are 2 completions"):
        reward(prompts=["p"] * 2, completions=["c"] * 2, completion_ids=[[0]] * 2, region_mask=[B], pred_mask=[A, A])


def test_mask_reward_ignores_trl_extras_and_unknown_columns():
    out = MaskDice()(prompts=["p"], completions=["c"], completion_ids=[[0]], region_mask=[B], pred_mask=[A],
                     trainer_state=object(), log_extra=print, log_metric=print, source_id=["x"], task=["caption_to_mask"])
    assert out == pytest.approx([0.4])


def test_mask_rewards_have_stable_names_and_pickle():
    for cls, name in [(MaskIoU, "mask_iou"), (MaskDice, "mask_dice")]:
        reward = cls(pred_column="pred", target_column="gt")
        assert reward.__name__ == name
        clone = pickle.loads(pickle.dumps(reward))
        assert clone.__name__ == name and clone.pred_column == "pred" and clone.target_column == "gt"
        assert clone(prompts=["p"], completions=["c"], completion_ids=[[0]], pred=[A], gt=[B]) == pytest.approx(
            [0.25 if name == "mask_iou" else 0.4]
        )
    checked = get_reward("mask_iou")
    assert pickle.loads(pickle.dumps(checked)).__name__ == "mask_iou"


def test_decoded_rle_masks_are_shared_across_reward_calls():
    DECODED_RLE_CACHE.clear()
    rle = mask_to_rle(np.array(B, dtype=bool))
    # G = 3 copies of one row (distinct dicts, as TRL delivers them) decode once ...
    assert _call(MaskIoU(), [A, A, B], [dict(rle), dict(rle), dict(rle)]) == pytest.approx([0.25, 0.25, 1.0])
    assert (DECODED_RLE_CACHE.misses, DECODED_RLE_CACHE.hits, len(DECODED_RLE_CACHE)) == (1, 0, 1)
    # ... and the next reward of the same step reuses the decode
    assert _call(MaskDice(), [A], [dict(rle)]) == pytest.approx([0.4])
    assert (DECODED_RLE_CACHE.misses, DECODED_RLE_CACHE.hits) == (1, 1)


def test_decoded_rle_cache_is_bounded_read_only_and_can_be_disabled():
    cache = DecodedRLECache(max_bytes=2 * 12)  # room for two 3 x 4 masks
    masks = [np.zeros((3, 4), bool) for _ in range(3)]
    for i, m in enumerate(masks):
        cache.put(("k", i), m)
    assert cache.get(("k", 0)) is None and cache.get(("k", 2)) is masks[2]  # least recently used evicted
    assert len(cache) == 2 and cache.nbytes == 24
    with pytest.raises(ValueError):
        masks[2][0, 0] = True  # cached masks are read-only: a caller cannot corrupt later rewards
    off = DecodedRLECache(max_bytes=0)
    off.put(("k", 0), np.zeros((3, 4), bool))
    assert len(off) == 0
