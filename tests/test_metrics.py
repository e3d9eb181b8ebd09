"""Evaluation metrics on hand-made inputs with hand-computed values."""

import math

import numpy as np
import pytest

from sa2va_trl.data.schema import encode_mask
from sa2va_trl.metrics import (
    attribute_metrics, caption_likelihood_metrics, caption_metrics, format_table, is_shapes_world, mask_iou,
    segmentation_metrics,
)


def _mask(cells, shape=(4, 4)):
    mask = np.zeros(shape, bool)
    for y, x in cells:
        mask[y, x] = True
    return mask


def test_mask_iou_hand_values():
    a = _mask([(0, 0), (0, 1), (0, 2)])
    b = _mask([(0, 1), (0, 2), (0, 3), (1, 3)])
    assert mask_iou(a, b) == pytest.approx(2 / 5)
    assert mask_iou(a, a) == 1.0
    assert mask_iou(a, _mask([(3, 3)])) == 0.0
    assert mask_iou(_mask([]), _mask([])) == 1.0  # both empty: a perfect "nothing"


def test_segmentation_metrics_hand_computed():
    # sample 0: 1-region image, I=4 U=4 -> 1.0
    # sample 1: 2-region image, I=1 U=4 -> 0.25
    # sample 2: 2-region image, I=3 U=5 -> 0.6
    # sample 3: 3-region image, no prediction -> I=0 U=2 -> 0.0
    gt = [_mask([(0, 0), (0, 1), (1, 0), (1, 1)]), _mask([(2, 2), (2, 3)]), _mask([(0, 0), (0, 1), (0, 2), (0, 3)]),
          _mask([(3, 0), (3, 1)])]
    pred = [gt[0].copy(), _mask([(2, 2), (1, 1), (1, 2)]), _mask([(0, 1), (0, 2), (0, 3), (1, 3)]), None]
    result = segmentation_metrics(pred, gt, n_regions=[1, 2, 2, 3])
    assert result["count"] == 4
    assert result["mean_iou"] == pytest.approx((1.0 + 0.25 + 0.6 + 0.0) / 4)
    assert result["cumulative_iou"] == pytest.approx((4 + 1 + 3 + 0) / (4 + 4 + 5 + 2))
    assert result["precision@0.5"] == pytest.approx(2 / 4)
    assert result["empty_predictions"] == 1
    assert result["ious"] == pytest.approx([1.0, 0.25, 0.6, 0.0])
    by_n = result["by_num_regions"]
    assert set(by_n) == {"1", "2", "3"}
    assert by_n["1"] == {"count": 1, "mean_iou": 1.0, "cumulative_iou": 1.0, "precision@0.5": 1.0}
    assert by_n["2"]["mean_iou"] == pytest.approx(0.425)
    assert by_n["2"]["cumulative_iou"] == pytest.approx(4 / 9)
    assert by_n["2"]["precision@0.5"] == pytest.approx(0.5)
    assert by_n["3"]["mean_iou"] == 0.0


def test_precision_threshold_is_strict():
    gt = [_mask([(0, 0), (0, 1)])]
    assert segmentation_metrics([_mask([(0, 0)])], gt)["precision@0.5"] == 0.0  # IoU exactly 0.5


def test_segmentation_accepts_rle_and_rejects_wrong_shapes():
    gt = _mask([(1, 1), (1, 2)])
    result = segmentation_metrics([encode_mask(gt)], [encode_mask(gt)])
    assert result["mean_iou"] == 1.0 and result["by_num_regions"] == {}
    with pytest.raises(ValueError, match="row 0, field 'pred_masks'.*differs"):
        segmentation_metrics([np.zeros((3, 3), bool)], [gt])
    with pytest.raises(ValueError, match="2 predictions for 1"):
        segmentation_metrics([gt, gt], [gt])
    with pytest.raises(ValueError, match="n_regions"):
        segmentation_metrics([gt], [gt], n_regions=[1, 2])


def test_caption_metrics_with_a_given_scorer():
    calls = []

    def scorer(hypothesis, references):
        calls.append((hypothesis, references))
        return max(len(set(hypothesis.split()) & set(r.split())) / len(r.split()) for r in references)

    result = caption_metrics(["a red dog", "", "cat"], ["a red cat", ["the dog", "a cat"], "cat"], meteor=scorer)
    # 2/3, empty -> 0 (scorer not called), max(0/2, 1/2) ... third: "cat" vs "cat" -> 1
    assert result["meteors"] == pytest.approx([2 / 3, 0.0, 1.0])
    assert result["meteor"] == pytest.approx((2 / 3 + 1.0) / 3)
    assert result["empty_predictions"] == 1
    assert calls[1] == ("cat", ["cat"])
    with pytest.raises(ValueError, match="row 0, field 'references'"):
        caption_metrics(["x"], [[]], meteor=scorer)


def test_caption_metrics_with_project_meteor():
    try:
        result = caption_metrics(["the puppy is running on the grass"], ["a dog runs on grass"])
    except LookupError as err:  # WordNet not installed on this machine (WordNetUnavailableError)
        pytest.skip(f"METEOR unavailable: {err}")
    # Value checked in shared notes (NLTK 3.10, WordNet 3.0).
    assert result["meteor"] == pytest.approx(0.4914529914529914, abs=1e-6)


def test_attribute_metrics_hand_computed():
    references = ["a small red circle in the top left", "the large blue square at the center",
                  "little green triangle, bottom right", "a big yellow circle in the upper right"]
    predictions = ["small red circle, top-left",  # all four right
                   "a large blue circle in the middle",  # shape wrong
                   "a small green triangle in the bottom left",  # position wrong
                   "nothing useful"]  # nothing read
    result = attribute_metrics(predictions, references)
    assert result["count"] == 4
    assert result["exact_match"] == pytest.approx(1 / 4)
    assert result["accuracy"] == pytest.approx({"shape": 2 / 4, "colour": 3 / 4, "size": 3 / 4, "position": 2 / 4})
    assert result["unparsed_predictions"] == 1
    with pytest.raises(ValueError, match="row 1, field 'references'"):
        attribute_metrics(["x", "y"], [references[0], "a photo of a dog"])


def test_is_shapes_world():
    assert is_shapes_world(["a small red circle in the top left", "big blue square, middle"])
    assert not is_shapes_world(["a small red circle in the top left", "a dog on grass"])
    assert not is_shapes_world([])


def test_format_table_lists_the_sections():
    seg = segmentation_metrics([_mask([(0, 0)])], [_mask([(0, 0)])], n_regions=[1])
    table = format_table({"segmentation": seg, "captioning": {"count": 1, "meteor": 0.5, "empty_predictions": 0},
                          "attributes": attribute_metrics(["a small red circle in the center"],
                                                          ["a small red circle in the center"])})
    assert "segmentation/mean_iou" in table and "1.0000" in table
    assert "segmentation/mean_iou [1 region(s)]" in table
    assert "captioning/meteor" in table and "0.5000" in table
    assert "captioning/accuracy/position" in table
    empty = segmentation_metrics([], [])
    assert math.isnan(empty["mean_iou"])


def test_docstring_examples_run():
    import doctest

    import sa2va_trl.metrics

    result = doctest.testmod(sa2va_trl.metrics)
    assert result.attempted >= 4 and result.failed == 0


def test_caption_likelihood_metrics_by_hand_and_bad_input():
    m = caption_likelihood_metrics([math.log(0.8), math.log(0.2)], [4, 6],
                                   [{"position": math.log(0.9), "shape": math.log(0.5)},
                                    {"position": math.log(0.3), "shape": math.log(1.0)}])
    assert m["count"] == 2 and m["caption_prob"] == pytest.approx(0.5)
    assert m["nll_per_token"] == pytest.approx(-(math.log(0.8) + math.log(0.2)) / 10)
    assert list(m["attribute_prob"]) == ["shape", "position"]  # the evaluation's attribute order
    assert m["attribute_prob"]["position"] == pytest.approx(0.6)
    assert caption_likelihood_metrics([math.log(0.5)], [2])["attribute_prob"] is None
    with pytest.raises(ValueError, match="row 1, field 'caption_logprob'"):
        caption_likelihood_metrics([0.0, float("nan")], [1, 1])
    with pytest.raises(ValueError, match="2 log-probs for 1 token counts"):
        caption_likelihood_metrics([0.0, 0.0], [1])
