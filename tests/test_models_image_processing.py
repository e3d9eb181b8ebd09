"""Image / mask preprocessing: conversions, normalisation, the token grid, errors naming row and field."""

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from sa2va_trl.models.image_processing import (
    IMAGENET_MEAN,
    Sa2VAInputError,
    load_rgb_image,
    mask_to_token_grid,
    sam_pixel_values,
    to_bool_mask,
    vision_pixel_values,
)


@pytest.mark.parametrize(
    "image",
    [
        np.full((6, 5), 7, np.uint8),
        np.full((6, 5, 1), 7, np.uint8),
        np.full((6, 5, 4), 7, np.uint8),
        Image.new("L", (5, 6), 7),
        Image.new("RGBA", (5, 6), (7, 7, 7, 0)),
        Image.new("P", (5, 6)),
        torch.full((6, 5, 3), 7, dtype=torch.uint8),
    ],
)
def test_images_are_converted_to_rgb(image):
    rgb = load_rgb_image(image)
    assert rgb.mode == "RGB" and rgb.size == (5, 6)


def test_float_images_in_0_1_are_scaled():
    rgb = load_rgb_image(np.full((2, 2, 3), 0.5, np.float32))
    assert np.asarray(rgb)[0, 0, 0] == 127


@pytest.mark.parametrize("bad", [None, "a path", np.zeros((4, 4, 2), np.uint8), np.zeros((0, 3, 3), np.uint8)])
def test_bad_images_name_row_and_field(bad):
    with pytest.raises(Sa2VAInputError, match=r"row 3, field 'img'") as info:
        load_rgb_image(bad, row=3)
    assert info.value.row == 3 and info.value.field == "img"
    assert isinstance(info.value, ValueError)


def test_pixel_values_normalised_with_imagenet_stats():
    mean_colour = tuple(int(round(255 * m)) for m in IMAGENET_MEAN)
    image = Image.new("RGB", (40, 30), mean_colour)
    tile = vision_pixel_values(image, 16)
    assert tile.shape == (3, 16, 16) and tile.dtype == torch.float32
    assert tile.abs().max() < 0.01
    assert sam_pixel_values(image, 32).shape == (3, 32, 32)
    white = vision_pixel_values(Image.new("RGB", (8, 8), (255, 255, 255)), 8)
    torch.testing.assert_close(white[0, 0, 0], torch.tensor((1 - 0.485) / 0.229))


def test_masks_from_every_format():
    array = np.zeros((6, 5), bool)
    array[1:3, 2:5] = True
    rle = mask_utils.encode(np.asfortranarray(array.astype(np.uint8)))
    rle_str = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    for mask in (array, array.astype(np.uint8), torch.from_numpy(array), array.tolist(), rle_str, array[None]):
        np.testing.assert_array_equal(to_bool_mask(mask), array)


@pytest.mark.parametrize("bad", [None, np.zeros((2, 3, 4)), {"size": [4, 4], "counts": "@@@!"}])
def test_bad_masks_name_row_and_field(bad):
    with pytest.raises(Sa2VAInputError, match=r"row 2, field 'region_mask'"):
        to_bool_mask(bad, row=2)


def test_token_grid_hand_computed():
    mask = np.zeros((16, 16), bool)
    mask[:4, :4] = True  # top-left quarter of a quarter: 2 x 2 cells of an 8 x 8 grid
    grid = mask_to_token_grid(mask, 8)
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[:2, :2] = True
    torch.testing.assert_close(grid, expected)


def test_token_grid_nearest_uses_floor_of_scaled_index():
    # 10 -> 8 nearest: cell i reads source row floor(i * 10 / 8) = 0, 1, 2, 3, 5, 6, 7, 8
    mask = np.zeros((10, 10), bool)
    mask[4, :] = True  # row 4 is never sampled
    assert not mask_to_token_grid(mask, 8).any()
    mask[5, :] = True
    grid = mask_to_token_grid(mask, 8)
    assert grid[4].all() and int(grid.sum()) == 8


# --- dynamic tiling (InternVL) ------------------------------------------------------------------

from sa2va_trl.models.image_processing import _closest_grid, dynamic_tiles, vision_tiles  # noqa: E402


@pytest.mark.parametrize(
    "width, height, expected",
    [
        (256, 128, (2, 1)),  # 2:1 -> two columns
        (128, 384, (1, 3)),  # 1:3 -> three rows
        (256, 256, (2, 2)),  # square tie: 2 x 2 wins (area 65536 > 0.5 * 128^2 * 4), 3 x 3 does not (> 73728 fails)
        (100, 100, (1, 1)),  # small square: area 10000 < 0.5 * 128^2 * 4, stays 1 x 1
    ],
)
def test_closest_grid_hand_computed(width, height, expected):
    assert _closest_grid(width, height, 128, 1, 12) == expected


def test_dynamic_tiles_crop_row_major_and_append_thumbnail():
    array = np.zeros((128, 256, 3), np.uint8)
    array[:, 128:] = 255  # right half white
    image = Image.fromarray(array)
    tiles = dynamic_tiles(image, 128, 1, 12, use_thumbnail=True)
    assert len(tiles) == 3 and all(tile.size == (128, 128) for tile in tiles)
    assert np.asarray(tiles[0]).max() == 0 and np.asarray(tiles[1]).min() == 255
    thumbnail = np.asarray(tiles[2])
    assert thumbnail[:, :60].max() == 0 and thumbnail[:, 68:].min() == 255  # the whole image, squeezed
    assert len(dynamic_tiles(image, 128, 1, 12, use_thumbnail=False)) == 2
    assert len(dynamic_tiles(Image.new("RGB", (100, 100)), 128)) == 1  # one tile: no thumbnail


def test_vision_tiles_single_and_dynamic():
    image = Image.new("RGB", (256, 128), (10, 20, 30))
    assert vision_tiles(image, 64).shape == (1, 3, 64, 64)
    assert vision_tiles(image, 64, dynamic=True, max_tiles=2).shape == (3, 3, 64, 64)
