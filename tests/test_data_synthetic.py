"""The synthetic shapes world: determinism, exact masks, unambiguous positions, the caption grammar
and its parser, splits, and the round trip through the Grasp-Any-Region loader."""

import os
import subprocess
import sys

import numpy as np
import pytest

from sa2va_trl.data import decode_region_mask, load_rows, load_rows_with_stats
from sa2va_trl.data.synthetic import (
    COLOURS, POSITIONS, SIZES, TEMPLATES, ShapeAttributes, all_attributes, build_shapes_world, caption_corpus,
    caption_variants, caption_vocabulary, canonicalize_caption, generate_scene, grid_cells, iter_scenes, main,
    parse_caption, scene_rng, shape_mask, shapes_dataset, world_fingerprint,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_same_seed_same_world_other_seed_differs():
    sizes = {"train": 6, "validation": 2, "test": 2}
    first = build_shapes_world(sizes, seed=3, progress=False)
    second = build_shapes_world(sizes, seed=3, progress=False)
    other = build_shapes_world(sizes, seed=4, progress=False)
    assert world_fingerprint(first) == world_fingerprint(second)
    assert first["train"]["conversations"] == second["train"]["conversations"]
    assert world_fingerprint(first) != world_fingerprint(other)


def test_test_split_does_not_depend_on_train_size():
    small = build_shapes_world({"train": 2, "test": 3}, seed=0, progress=False)
    large = build_shapes_world({"train": 9, "test": 3}, seed=0, progress=False)
    assert small["test"]["conversations"] == large["test"]["conversations"]
    assert small["train"]["conversations"] != small["test"]["conversations"][:2]


def test_masks_are_exact_disjoint_and_match_the_drawn_pixels():
    for scene in iter_scenes(40, seed=1):
        drawn = scene.image.any(axis=2)
        union = np.zeros_like(drawn)
        for mask, attrs in zip(scene.masks, scene.attributes):
            assert not (mask & union).any(), "shapes overlap"
            union |= mask
            colour_pixels = (scene.image == np.array(COLOURS[attrs.colour], np.uint8)).all(axis=2)
            # The painted pixels of this colour inside the mask are exactly the mask.
            assert (colour_pixels & mask).sum() == mask.sum()
        np.testing.assert_array_equal(union, drawn)  # nothing drawn outside the masks
        assert 1 <= len(scene.masks) <= 3


@pytest.mark.parametrize("shape, expected_area", [("circle", np.pi * 20**2), ("square", (2 * 20 * 0.85) ** 2),
                                                  ("triangle", 2 * 20**2)])
def test_shape_pixel_counts_match_their_analytic_area(shape, expected_area):
    mask = shape_mask(shape, (64.0, 64.0), 20.0, 128)
    assert abs(mask.sum() - expected_area) / expected_area < 0.05


def test_size_classes_are_separable_by_area():
    areas = {"small": [], "large": []}
    for scene in iter_scenes(60, seed=2):
        for mask, attrs in zip(scene.masks, scene.attributes):
            areas[attrs.size].append(mask.sum())
    assert max(areas["small"]) < min(areas["large"])


def test_each_shape_lies_in_its_position_cell():
    size = 128
    for scene in iter_scenes(60, seed=5, image_size=size):
        positions = [a.position for a in scene.attributes]
        assert len(set(positions)) == len(positions)  # at most one shape per cell
        for mask, attrs in zip(scene.masks, scene.attributes):
            ys, xs = np.nonzero(mask)
            cx, cy = xs.mean() / size, ys.mean() / size
            if attrs.position == "center":
                assert abs(cx - 0.5) < 0.1 and abs(cy - 0.5) < 0.1
            else:
                vertical, horizontal = attrs.position.split()
                assert (cy < 0.4) if vertical == "top" else (cy > 0.6)
                assert (cx < 0.4) if horizontal == "left" else (cx > 0.6)


def test_every_region_gives_region_tokens_on_the_token_grid():
    # Without the check about 8% of small shapes fall between the sampled pixels of the tiny model's
    # 8 x 8 grid and would give zero region tokens (the adapter rejects such regions).
    for scene in iter_scenes(150, seed=9):
        assert all(grid_cells(mask, 8) >= 1 for mask in scene.masks)
    for scene in iter_scenes(60, seed=9, token_grid=16, min_grid_cells=3):
        assert all(grid_cells(mask, 16) >= 3 for mask in scene.masks)


def test_grid_cells_samples_like_a_nearest_resize():
    mask = np.zeros((8, 8), bool)
    mask[0, 0] = mask[4, 5] = mask[5, 5] = True  # cells sample pixels 0, 2, 4, 6 in each axis
    assert grid_cells(mask, 4) == 1 + 0 + 0  # (0, 0) sampled; (4, 5) and (5, 5) are not on odd columns
    mask[4, 4] = True
    assert grid_cells(mask, 4) == 2


def test_every_paraphrase_parses_back_to_its_attributes():
    for attrs in all_attributes():
        variants = caption_variants(attrs)
        assert variants[0] == attrs.canonical_caption()
        assert len(variants) >= len(TEMPLATES)
        for caption in variants:
            assert parse_caption(caption) == attrs, caption
            assert canonicalize_caption(caption) == attrs.canonical_caption()


def test_generated_captions_parse_back_to_generating_attributes():
    for scene in iter_scenes(50, seed=7):
        for caption, attrs in zip(scene.captions, scene.attributes):
            assert parse_caption(caption) == attrs


def test_canonical_examples_and_lenient_parsing():
    assert ShapeAttributes("circle", "red", "small", "top left").canonical_caption() == "a small red circle in the top left"
    assert parse_caption("the small red circle at the top left") == ShapeAttributes("circle", "red", "small", "top left")
    assert parse_caption("Small red circle, top left.") == ShapeAttributes("circle", "red", "small", "top left")
    assert parse_caption("A BIG yellow triangle in the middle").position == "center"
    partial = parse_caption("a red circle or a blue square at the top center")
    assert (partial.shape, partial.colour, partial.size, partial.position) == (None, None, None, None)
    assert canonicalize_caption("blue square") is None
    assert parse_caption("").is_complete() is False


def test_caption_corpus_covers_the_grammar():
    corpus = caption_corpus()
    assert "a small red circle in the top left" in corpus
    assert "small red circle, top left" in corpus
    assert len(corpus) == len(set(corpus))
    vocabulary = set(caption_vocabulary())
    for word in ("circle", "square", "triangle", *COLOURS, *SIZES, "little", "big", "upper", "lower", "middle"):
        assert word in vocabulary
    for position in POSITIONS:
        assert set(position.split()) <= vocabulary


def test_in_memory_dataset_has_the_row_schema():
    rows = shapes_dataset(5, seed=0, split="validation", image_size=64)
    assert rows.column_names == ["img", "region_mask", "caption", "source_id", "region_index", "category"]
    scenes = list(iter_scenes(5, seed=0, split="validation", image_size=64))
    assert len(rows) == sum(len(s.masks) for s in scenes)
    first = scenes[0]
    np.testing.assert_array_equal(decode_region_mask(rows[0]), first.masks[0])
    np.testing.assert_array_equal(np.asarray(rows[0]["img"]), first.image)
    assert rows[0]["source_id"] == "shapes/validation/0"
    assert rows[0]["category"] == first.attributes[0].shape


def test_generate_scene_arguments():
    scene = generate_scene(np.random.default_rng(0), image_size=200, max_shapes=5)
    assert scene.image.shape == (200, 200, 3)
    with pytest.raises(ValueError, match="image_size"):
        generate_scene(0, image_size=16)
    with pytest.raises(ValueError, match="max_shapes"):
        generate_scene(0, max_shapes=6)
    with pytest.raises(ValueError, match="unknown split"):
        scene_rng(0, "dev", 0)
    canonical = generate_scene(1, canonical_only=True)
    assert all(c == a.canonical_caption() for c, a in zip(canonical.captions, canonical.attributes))


def test_cli_writes_splits_that_the_gar_loader_reads(tmp_path):
    out = tmp_path / "world"
    main(["--out", str(out), "--n", "7", "--n-validation", "3", "--n-test", "4", "--seed", "11", "--size", "64"])
    expected = {split: sum(len(s.masks) for s in iter_scenes(n, 11, split, 64))
                for split, n in [("train", 7), ("validation", 3), ("test", 4)]}
    for split, n_rows in expected.items():
        rows, stats = load_rows_with_stats(str(out), split=split)
        assert stats.format == "gar" and stats.records == {"train": 7, "validation": 3, "test": 4}[split]
        assert len(rows) == n_rows and stats.num_skipped == 0
    rows = load_rows(str(out), split="test", require_caption=True)
    scenes = list(iter_scenes(4, 11, "test", 64))
    assert rows["caption"] == [c for s in scenes for c in s.captions]
    assert rows["category"] == [a.shape for s in scenes for a in s.attributes]
    assert rows[0]["img"].size == (64, 64)


def test_python_dash_m_entry_point(tmp_path):
    out = tmp_path / "cli"
    result = subprocess.run([sys.executable, "-m", "sa2va_trl.data.synthetic", "--out", str(out), "--n", "2",
                             "--n-validation", "1", "--n-test", "1"], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout
    assert "RuntimeWarning" not in result.stderr
    assert (out / "dataset_dict.json").is_file()


def test_an_empty_split_is_written_with_its_columns():
    """`--n 0` (e.g. a test-only world for evaluation) gives an empty train split, not a crash."""
    world = build_shapes_world({"train": 0, "test": 2}, progress=False)
    assert len(world["train"]) == 0 and world["train"].features == world["test"].features
    assert len(world["test"]) == 2
