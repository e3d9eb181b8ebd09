"""Row schema helpers: RLE encode/decode round trips, RLE forms found in the wild, polygons, errors."""

import pickle

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask

from sa2va_trl.data.schema import (
    RESERVED_IMAGE_COLUMNS, DataError, decode_region_mask, encode_mask, normalize_rle, polygons_to_rle, row_features,
    validate_row,
)


def _blob(h=6, w=9):
    mask = np.zeros((h, w), bool)
    mask[1:4, 2:7] = True
    mask[5, 0] = True
    return mask


def test_encode_decode_round_trip_and_str_counts():
    mask = _blob()
    rle = encode_mask(mask)
    assert rle["size"] == [6, 9]
    assert isinstance(rle["counts"], str)
    np.testing.assert_array_equal(decode_region_mask(rle), mask)
    # A row works as well as the bare RLE.
    np.testing.assert_array_equal(decode_region_mask({"region_mask": rle, "caption": None}), mask)
    assert decode_region_mask(rle).dtype == bool


def test_encode_rejects_non_2d():
    with pytest.raises(ValueError, match="H x W"):
        encode_mask(np.zeros((2, 2, 2)))


@pytest.mark.parametrize("form", ["str", "bytes", "uncompressed"])
def test_normalize_rle_accepts_every_counts_form(form):
    mask = _blob()
    compressed = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    if form == "str":
        rle = {"size": [6, 9], "counts": compressed["counts"].decode()}
    elif form == "bytes":
        rle = {"size": [6, 9], "counts": compressed["counts"]}
    else:  # column-major run lengths, starting with a background run
        flat = mask.flatten(order="F")
        runs, current, length = [], False, 0
        for value in flat:
            if value == current:
                length += 1
            else:
                runs.append(length)
                current, length = value, 1
        runs.append(length)
        rle = {"size": [6, 9], "counts": runs}
    canonical = normalize_rle(rle)
    assert isinstance(canonical["counts"], str)
    np.testing.assert_array_equal(decode_region_mask(canonical), mask)


def test_normalize_rle_errors_name_row_and_field():
    with pytest.raises(DataError, match=r"row 7, field 'mask_rle'.*sum") as info:
        normalize_rle({"size": [2, 2], "counts": [1, 1]}, row=7, field="mask_rle")
    assert info.value.row == 7 and info.value.field == "mask_rle"
    with pytest.raises(DataError, match="row 3, field 'm'"):
        normalize_rle({"size": [5, 7], "counts": "garbage!!"}, row=3, field="m")
    with pytest.raises(DataError, match="COCO RLE dict"):
        normalize_rle([1, 2, 3], row=0)


def test_polygons_rasterise_by_pycocotools_convention():
    # A 4 x 4 square with corners (2, 2) and (6, 6) covers pixels 2..5 in both axes.
    mask = decode_region_mask(polygons_to_rle([[2, 2, 6, 2, 6, 6, 2, 6]], 10, 10))
    assert mask.sum() == 16
    assert mask[2:6, 2:6].all()
    # Several polygons form one region (their union).
    union = decode_region_mask(polygons_to_rle([[0, 0, 4, 0, 4, 4, 0, 4], [6, 6, 9, 6, 9, 9, 6, 9]], 10, 10))
    assert union.sum() == 16 + 9


@pytest.mark.parametrize(
    "polygons, message",
    [
        ([[1, 1, 5, 1]], "2 points; a polygon needs at least 3"),  # 4 numbers would be read as a bbox
        ([[1, 1, 5, 1, 5]], "odd number"),
        ([[1, 1, 5, 1, float("nan"), 3]], "non-finite"),
        ([], "non-empty list"),
        ([[1, "a", 2, 2, 3, 3]], "non-numeric"),
    ],
)
def test_bad_polygons_raise_with_row_and_field(polygons, message):
    with pytest.raises(DataError, match=message) as info:
        polygons_to_rle(polygons, 10, 10, row=4, field="mask")
    assert info.value.row == 4 and info.value.field == "mask"
    assert str(info.value).startswith("row 4, field 'mask'")


def test_data_error_is_a_value_error_and_pickles():
    err = DataError("bad", row=2, field="image")
    assert isinstance(err, ValueError)
    copy = pickle.loads(pickle.dumps(err))
    assert str(copy) == str(err)
    assert (copy.row, copy.field, type(copy)) == (2, "image", DataError)


def test_validate_row_checks_size_against_image():
    image = Image.new("RGB", (9, 6))
    row = {"img": image, "region_mask": encode_mask(_blob()), "caption": "x", "source_id": "s", "region_index": 0}
    validate_row(row, 0)
    row["region_mask"] = encode_mask(np.ones((9, 6), bool))
    with pytest.raises(DataError, match="row 5, field 'region_mask'.*differs"):
        validate_row(row, 5)
    with pytest.raises(DataError, match="field 'caption'"):
        validate_row({**row, "region_mask": encode_mask(_blob()), "caption": 3}, 1)


def test_features_never_use_reserved_image_names():
    features = row_features(with_category=True)
    assert list(features) == ["img", "region_mask", "caption", "source_id", "region_index", "category"]
    assert not set(features) & set(RESERVED_IMAGE_COLUMNS)


def test_docstring_examples_run():
    import doctest

    import sa2va_trl.data.schema
    import sa2va_trl.data.synthetic

    for module in (sa2va_trl.data.schema, sa2va_trl.data.synthetic):
        result = doctest.testmod(module)
        assert result.attempted >= 1 and result.failed == 0, module.__name__
