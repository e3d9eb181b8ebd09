"""Reward-network data: perturbations, Dice coverage, dataset generation, splits, metrics."""

import numpy as np
import pytest
import torch

from sa2va_trl.data.schema import DataError, decode_region_mask, encode_mask
from sa2va_trl.data.synthetic import iter_scenes, shapes_dataset
from sa2va_trl.reward_net import generate_reward_data, split_by_source
from sa2va_trl.reward_net.data import RewardNetTorchDataset, expected_merge_dice
from sa2va_trl.reward_net.metrics import dice_distribution, evaluation_report, format_report, pearson, spearman
from sa2va_trl.reward_net.perturbations import (
    PERTURBATION_KINDS,
    MaskPerturber,
    balanced_selection,
    dice,
    dilate,
    erode,
    sample_perturbations,
    shift,
)
from sa2va_trl.reward_net.preprocessing import prepare_inputs


def _square(size=32, lo=8, hi=24):
    mask = np.zeros((size, size), dtype=bool)
    mask[lo:hi, lo:hi] = True
    return mask


def test_dice_hand_computed():
    a = np.array([[1, 1, 0, 0]], dtype=bool)
    b = np.array([[0, 1, 1, 0]], dtype=bool)
    assert dice(a, b) == pytest.approx(0.5)
    assert dice(a, np.zeros_like(a)) == 0.0
    assert dice(np.zeros_like(a), np.zeros_like(a)) == 1.0


def test_morphology_and_shift():
    gt = _square()
    assert dilate(gt, 1).sum() == 18 * 18  # first step is a 3 x 3 square
    assert erode(gt, 1).sum() == 14 * 14
    assert erode(gt, 8).sum() == 0
    grown = dilate(gt, 2)
    assert grown[gt].all() and grown.sum() > gt.sum()
    assert (erode(grown, 2) >= gt).all()  # closing never loses pixels
    moved = shift(gt, 3, -2)
    assert moved.sum() == gt.sum() and moved[11, 6] and not moved[8, 8]
    assert not shift(gt, 40, 0).any()


@pytest.mark.parametrize("kind", PERTURBATION_KINDS)
def test_every_kind_returns_a_mask_of_the_right_shape(kind):
    gt, other = _square(), np.zeros((32, 32), dtype=bool)
    other[0:5, 0:5] = True
    mask = MaskPerturber(np.random.default_rng(0), jitter_prob=0.0).candidate(kind, gt, [other])
    assert mask.shape == gt.shape and mask.dtype == bool
    if kind == "gt":
        assert dice(mask, gt) == 1.0
    if kind == "empty":
        assert not mask.any()
    if kind == "merge":
        assert mask[gt].all() and mask[other].all()


def test_unknown_kind_lists_the_valid_ones():
    with pytest.raises(ValueError, match="valid kinds"):
        MaskPerturber(np.random.default_rng(0)).candidate("twist", _square(), [])


def test_balanced_selection_visits_bins_in_turn():
    values = np.array([0.05, 0.06, 0.55, 0.56, 0.95, 0.96])
    picked = balanced_selection(values, 3, num_bins=10, rng=np.random.default_rng(0), start_bin=4)
    # bin 4 is empty -> nearest to 0.45 is a 0.55 candidate; bin 5 -> the other 0.5x; bin 6 -> nearest left
    assert len(set(picked)) == 3
    assert sorted(values[picked[:2]].tolist()) == [0.55, 0.56]


def test_perturbations_cover_the_dice_range_evenly():
    values = []
    for index, scene in enumerate(iter_scenes(12, seed=1)):
        for k, gt in enumerate(scene.masks):
            rng = np.random.default_rng([index, k])
            others = [m for j, m in enumerate(scene.masks) if j != k]
            samples = sample_perturbations(gt, others, 10, rng, start_bin=int(rng.integers(10)))
            for kind, mask, value in samples:
                assert value == pytest.approx(dice(mask, gt))
            values += [s[2] for s in samples]
    counts, _ = np.histogram(values, bins=10, range=(0, 1))
    # even coverage: every tenth of [0, 1] holds 5-15% of the samples (the policy band alone would not)
    assert counts.min() >= 0.05 * len(values) and counts.max() <= 0.15 * len(values), counts


def test_empty_ground_truth_gives_no_samples():
    assert sample_perturbations(np.zeros((8, 8), bool), [], 5, np.random.default_rng(0)) == []


def test_generate_reward_data_labels_and_round_trip(tmp_path):
    rows = shapes_dataset(4, seed=3)
    data = generate_reward_data(rows, samples_per_region=5, progress=False, seed=7)
    assert len(data) == 5 * len(rows)
    assert set(data["kind"]) <= set(PERTURBATION_KINDS)
    for sample in data.select(range(0, len(data), 3)):
        gt = decode_region_mask(rows[sample["source_row"]])
        assert sample["source_id"] == rows[sample["source_row"]]["source_id"]
        assert sample["img"].size == (gt.shape[1], gt.shape[0])
        assert sample["dice"] == pytest.approx(dice(decode_region_mask(sample["mask"]), gt), abs=1e-6)
    again = generate_reward_data(rows, samples_per_region=5, progress=False, seed=7)
    assert again["dice"] == data["dice"]  # reproducible
    data.save_to_disk(str(tmp_path / "rd"))
    import datasets

    loaded = datasets.load_from_disk(str(tmp_path / "rd"))
    assert loaded["dice"] == data["dice"] and loaded[0]["mask"] == data[0]["mask"]


class _FakePolicy:
    """Stands in for Sa2VAPolicy.segment: predicts the left half of every image."""

    def __init__(self):
        self.texts = []

    def segment(self, images, texts):
        self.texts += list(texts)
        out = []
        for image in images:
            mask = np.zeros((image.size[1], image.size[0]), dtype=bool)
            mask[:, : image.size[0] // 2] = True
            out.append(mask)
        return out


def test_policy_masks_join_the_data_with_their_dice():
    rows = shapes_dataset(3, seed=0)
    policy = _FakePolicy()
    data = generate_reward_data(rows, samples_per_region=2, policy=policy, policy_batch_size=2, progress=False)
    assert policy.texts == rows["caption"]
    predicted = data.filter(lambda kind: kind == "policy", input_columns="kind")
    assert len(predicted) == len(rows)
    for sample in predicted:
        gt = decode_region_mask(rows[sample["source_row"]])
        half = np.zeros_like(gt)
        half[:, : gt.shape[1] // 2] = True
        assert sample["dice"] == pytest.approx(dice(half, gt), abs=1e-6)


def test_bad_row_mask_names_row_and_field():
    rows = shapes_dataset(2, seed=0).to_list()
    rows[1]["region_mask"] = encode_mask(np.ones((10, 10), dtype=bool))
    with pytest.raises(DataError, match="row 1, field 'region_mask'"):
        generate_reward_data(rows, samples_per_region=2, progress=False)


def test_max_image_side_downscales_images_and_masks():
    rows = shapes_dataset(1, seed=0)
    data = generate_reward_data(rows, samples_per_region=2, max_image_side=64, progress=False)
    assert data[0]["img"].size == (64, 64) and data[0]["mask"]["size"] == [64, 64]


def test_split_by_source_holds_out_whole_images():
    data = generate_reward_data(shapes_dataset(10, seed=0), samples_per_region=2, progress=False)
    train, held = split_by_source(data, 0.3, seed=0)
    assert len(train) + len(held) == len(data)
    assert not set(train["source_id"]) & set(held["source_id"])
    assert len(set(held["source_id"])) == 3
    with pytest.raises(ValueError, match="eval_fraction"):
        split_by_source(data, 1.0)


def test_torch_dataset_items():
    data = generate_reward_data(shapes_dataset(1, seed=0), samples_per_region=3, progress=False)
    item = RewardNetTorchDataset(data, 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))[1]
    assert item["pixel_values"].shape == (4, 32, 32)
    assert item["labels"].item() == pytest.approx(data[1]["dice"])
    torch.manual_seed(0)
    flipped = RewardNetTorchDataset(data, 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), hflip=True)
    views = {tuple(flipped[1]["pixel_values"][3].sum(0).tolist()) for _ in range(12)}
    assert len(views) == 2  # original and mirrored


def test_correlations_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x = rng.random(200)
    y = np.round(x + 0.3 * rng.random(200), 1)  # ties
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)
    assert np.isnan(pearson(np.ones(3), x[:3]))


def test_evaluation_report_and_table():
    dice_true = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
    report = evaluation_report(dice_true + 0.1, dice_true, ["a", "a", "b", "b", "b"])
    assert report["overall"]["mse"] == pytest.approx(0.01)
    assert report["overall"]["pearson"] == pytest.approx(1.0)
    assert report["by_kind"]["a"]["count"] == 2
    assert report["dice_distribution"]["counts"] == [1, 0, 1, 0, 0, 1, 0, 1, 0, 1]
    assert dice_distribution(dice_true)["quantiles"]["q0.5"] == 0.5
    table = format_report(report)
    assert "overall" in table and "quantiles" in table


def test_expected_merge_dice_averages_over_the_covered_regions():
    small, large, far = np.zeros((3, 20, 20), dtype=bool)
    small[0:2, 0:2] = True  # 4 pixels
    large[10:14, 10:14] = True  # 16 pixels
    far[0:3, 15:18] = True  # not covered by the merge
    merged = small | large
    # intended small: 2*4/(20+4); intended large: 2*16/(20+16); `far` is no candidate
    assert expected_merge_dice(merged, small, [large, far]) == pytest.approx((8 / 24 + 32 / 36) / 2)
    assert expected_merge_dice(merged, large, [small, far]) == pytest.approx((8 / 24 + 32 / 36) / 2)
    # a region less than half inside the mask is no candidate; the intended one always is
    assert expected_merge_dice(small, small, [large]) == 1.0
    half_of_large = large.copy()
    half_of_large[12:, :] = False
    assert expected_merge_dice(small | half_of_large, small, [large]) == pytest.approx(dice(small | half_of_large, small))


def test_generated_expected_dice_differs_from_dice_only_for_merges():
    data = generate_reward_data(shapes_dataset(12, seed=1), samples_per_region=10, progress=False)
    kinds = np.array(data["kind"])
    true, expected = np.array(data["dice"]), np.array(data["expected_dice"])
    assert (true[kinds != "merge"] == expected[kinds != "merge"]).all()
    merges = kinds == "merge"
    assert merges.sum() > 5
    assert (np.abs(true[merges] - expected[merges]) > 1e-3).any()  # the ambiguity is real
    assert ((expected >= 0) & (expected <= 1)).all()


def test_torch_dataset_matches_prepare_inputs_and_caches_images():
    data = generate_reward_data(shapes_dataset(3, seed=0, image_size=48), samples_per_region=4, progress=False)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    for size in (48, 32):  # same size (no mask resize) and a downscale
        dataset = RewardNetTorchDataset(data, size, mean, std)
        expected = prepare_inputs(data["img"], data["mask"], size, mean, std)
        got = torch.stack([dataset[i]["pixel_values"] for i in range(len(dataset))])
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        assert len(dataset._cache) == 3  # one entry per source image, not per sample
    uncached = RewardNetTorchDataset(data, 32, mean, std, cache_bytes=0)
    torch.testing.assert_close(uncached[5]["pixel_values"], expected[5], rtol=0, atol=0)
    assert not uncached._cache


def test_torch_dataset_label_column():
    data = generate_reward_data(shapes_dataset(6, seed=2), samples_per_region=8, progress=False)
    merge = data["kind"].index("merge")
    dataset = RewardNetTorchDataset(data, 32, (0.5,) * 3, (0.5,) * 3, label_column="expected_dice")
    assert dataset[merge]["labels"].item() == pytest.approx(data[merge]["expected_dice"])
    old = data.remove_columns("expected_dice")  # data saved before the column existed
    assert RewardNetTorchDataset(old, 32, (0.5,) * 3, (0.5,) * 3, label_column="expected_dice")[merge][
        "labels"
    ].item() == pytest.approx(data[merge]["dice"])
    with pytest.raises(ValueError, match="label column"):
        RewardNetTorchDataset(data, 32, (0.5,) * 3, (0.5,) * 3, label_column="iou")


def test_dihedral_augmentation_gives_the_8_symmetries():
    data = generate_reward_data(shapes_dataset(1, seed=0), samples_per_region=3, progress=False)
    torch.manual_seed(0)
    dataset = RewardNetTorchDataset(data, 32, (0.5,) * 3, (0.5,) * 3, hflip=True, dihedral=True)
    views = {dataset[0]["pixel_values"].numpy().tobytes() for _ in range(200)}
    assert len(views) == 8
    base = RewardNetTorchDataset(data, 32, (0.5,) * 3, (0.5,) * 3)[0]["pixel_values"]
    assert base.numpy().tobytes() in views


def test_evaluation_report_ambiguity_floor():
    dice_true = np.array([0.2, 0.8, 0.5, 1.0])
    expected = np.array([0.5, 0.5, 0.5, 1.0])
    report = evaluation_report(expected, dice_true, ["merge", "merge", "erode", "gt"], expected_dice=expected)
    floor = report["ambiguity_floor"]
    assert floor["overall"] == pytest.approx((0.09 + 0.09) / 4)
    assert floor["by_kind"] == pytest.approx({"merge": 0.09, "erode": 0.0, "gt": 0.0})
    assert report["overall"]["mse"] == pytest.approx(floor["overall"])  # predicting the expectation hits it
    assert "mse floor" in format_report(report)
    assert "ambiguity_floor" not in evaluation_report(expected, dice_true)
