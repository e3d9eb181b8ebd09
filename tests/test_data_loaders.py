"""Loaders: every supported format, written by the tests themselves, including multi-region rows and
bad input (error naming row and field, or skipped + counted + logged with skip_bad_rows)."""

import io
import json
import logging

import datasets
import numpy as np
import pytest
from PIL import Image

from sa2va_trl.data import DataError, decode_region_mask, detect_format, encode_mask, load_rows, load_rows_with_stats
from sa2va_trl.data.loaders import check_no_reserved_columns

H, W = 12, 16


def _png(h=H, w=W, colour=(200, 10, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _box(y0, y1, x0, x1, h=H, w=W):
    mask = np.zeros((h, w), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def _turns(*captions):
    turns = []
    for k, caption in enumerate(captions):
        turns += [{"from": "human", "value": f"<image>\nDescribe region{k + 1}."}, {"from": "gpt", "value": caption}]
    return turns


def _save(tmp_path, records, name="gar", split=None, image_feature=True):
    dataset = datasets.Dataset.from_list(records)
    if image_feature and "image" in dataset.column_names and not isinstance(dataset.features["image"], datasets.Image):
        dataset = dataset.cast_column("image", datasets.Image())
    path = tmp_path / name
    (datasets.DatasetDict({split: dataset}) if split else dataset).save_to_disk(str(path))
    return str(path)


def _gar_record(masks, captions, category="thing", image=None):
    return {"image": {"bytes": image or _png(), "path": None}, "mask_rle": [encode_mask(m) for m in masks],
            "conversations": _turns(*captions), "catagory": category}


# ----------------------------------------------------------------------------- Grasp-Any-Region arrow

def test_gar_multi_region_rows_pair_masks_with_gpt_turns(tmp_path):
    small, large = _box(0, 2, 0, 2), _box(4, 10, 4, 12)
    path = _save(tmp_path, [_gar_record([large], ["only region"]), _gar_record([small, large], ["small one", "big one"])],
                 split="train")
    assert detect_format(path) == "gar"
    rows = load_rows(path)
    assert rows.column_names == ["img", "region_mask", "caption", "source_id", "region_index", "category"]
    check_no_reserved_columns(rows)
    assert len(rows) == 3
    assert rows["caption"] == ["only region", "small one", "big one"]
    assert rows["region_index"] == [0, 0, 1]
    assert rows["source_id"] == ["gar/train:0", "gar/train:1", "gar/train:1"]
    assert rows["category"] == ["thing"] * 3
    # Mask k goes with gpt turn k: areas 4 and 48.
    assert [decode_region_mask(r).sum() for r in rows["region_mask"]] == [48, 4, 48]
    assert rows[1]["img"].size == (W, H)


@pytest.mark.parametrize("form", ["single_dict", "bytes_counts", "uncompressed_counts"])
def test_gar_mask_rle_forms(tmp_path, form):
    mask = _box(2, 5, 3, 9)
    rle = encode_mask(mask)
    if form == "single_dict":
        mask_rle = rle  # one dict, not a list
    elif form == "bytes_counts":
        mask_rle = [{"size": rle["size"], "counts": rle["counts"].encode()}]
    else:
        # column-major runs: 3 columns empty (3 * 12), then per column 2 bg, 3 fg, 7 bg ...
        runs = [3 * H + 2]
        for _ in range(5):
            runs += [3, 9]
        runs += [3, 7 + (W - 9) * H]
        mask_rle = [{"size": [H, W], "counts": runs}]
    path = _save(tmp_path, [{"image": {"bytes": _png(), "path": None}, "mask_rle": mask_rle,
                             "conversations": _turns("a box")}])
    rows = load_rows(path, format="gar")
    assert len(rows) == 1
    np.testing.assert_array_equal(decode_region_mask(rows[0]), mask)
    assert isinstance(rows[0]["region_mask"]["counts"], str)


def test_gar_without_gpt_turns_gives_no_caption_and_require_caption_rejects(tmp_path):
    record = {"image": {"bytes": _png(), "path": None}, "mask_rle": [encode_mask(_box(0, 3, 0, 3))],
              "conversations": [{"from": "human", "value": "<image>\nhello"}]}
    path = _save(tmp_path, [record, record])
    rows = load_rows(path)
    assert rows["caption"] == [None, None]
    with pytest.raises(DataError, match=r"row 0, field 'conversations'.*no caption") as info:
        load_rows(path, require_caption=True)
    assert info.value.row == 0 and info.value.field == "conversations"
    rows, stats = load_rows_with_stats(path, require_caption=True, skip_bad_rows=True)
    assert len(rows) == 0 and dict(stats.skipped) == {"conversations": 2}


def test_gar_bad_records_raise_naming_row_and_field(tmp_path):
    good = _gar_record([_box(0, 3, 0, 3)], ["fine"])
    corrupt = _gar_record([_box(0, 3, 0, 3)], ["broken image"], image=b"\x89PNG not really an image")
    wrong_size = _gar_record([_box(0, 3, 0, 3, h=H + 1)], ["mask too tall"])
    misaligned = _gar_record([_box(0, 3, 0, 3), _box(5, 8, 5, 8)], ["one caption for two masks"])
    cases = [(corrupt, "image", "cannot decode"), (wrong_size, "mask_rle", "differs from the image size"),
             (misaligned, "conversations", "2 masks but 1 captions")]
    for k, (bad, field, message) in enumerate(cases):
        path = _save(tmp_path, [good, good, bad], name=f"bad{k}")
        with pytest.raises(DataError, match=message) as info:
            load_rows(path)
        assert (info.value.row, info.value.field) == (2, field)


def test_gar_skip_bad_rows_counts_and_logs(tmp_path, caplog):
    good = _gar_record([_box(0, 3, 0, 3)], ["fine"])
    records = [good, _gar_record([_box(0, 3, 0, 3)], ["x"], image=b"garbage"),
               _gar_record([_box(0, 3, 0, 3, h=H + 1), _box(5, 8, 5, 8)], ["bad size", "kept region"]), good,
               _gar_record([_box(0, 3, 0, 3), _box(5, 8, 5, 8)], ["misaligned"])]
    path = _save(tmp_path, records)
    with caplog.at_level(logging.WARNING, logger="sa2va_trl.data.loaders"):
        rows, stats = load_rows_with_stats(path, skip_bad_rows=True)
    # Region-level errors drop only the region: record 2 keeps its second region.
    assert rows["caption"] == ["fine", "kept region", "fine"]
    assert rows["source_id"] == ["gar:0", "gar:2", "gar:3"]
    assert rows["region_index"] == [0, 1, 0]
    assert stats.records == 5 and stats.rows == 3
    assert dict(stats.skipped) == {"image": 1, "mask_rle": 1, "conversations": 1}
    assert any(e.startswith("row 1, field 'image'") for e in stats.errors)
    assert "skipped 3 bad item(s)" in caplog.text


def test_gar_max_rows_keeps_record_indices_in_errors_and_source_ids(tmp_path):
    good = _gar_record([_box(0, 3, 0, 3), _box(5, 8, 5, 8)], ["a", "b"])
    records = [good] * 30 + [_gar_record([_box(0, 3, 0, 3)], ["x"], image=b"garbage")] + [good] * 3
    path = _save(tmp_path, records)
    rows = load_rows(path, max_rows=5)
    assert len(rows) == 5 and rows["source_id"][-1] == "gar:2"
    assert len(load_rows(path, max_rows=0)) == 0
    _, stats = load_rows_with_stats(path, max_rows=66, skip_bad_rows=True)
    assert stats.rows == 66 and stats.skipped["image"] == 1
    assert stats.errors[0].startswith("row 30, field 'image'")  # index in the whole source


def test_gar_image_paths_resolve_next_to_the_arrow_files(tmp_path):
    path = _save(tmp_path, [{"image": {"bytes": None, "path": "pics/x.png"}, "mask_rle": [encode_mask(_box(0, 3, 0, 3))],
                             "conversations": _turns("by path")}], image_feature=False)  # a plain struct column
    (tmp_path / "gar" / "pics").mkdir()
    (tmp_path / "gar" / "pics" / "x.png").write_bytes(_png())
    rows = load_rows(path)
    assert rows[0]["img"].size == (W, H) and rows["caption"] == ["by path"]
    with pytest.raises(DataError, match=r"row 0, field 'image'.*not found"):
        load_rows(path, image_root=str(tmp_path / "elsewhere"))


def test_gar_with_two_processes_keeps_errors_and_counts(tmp_path):
    good = _gar_record([_box(0, 3, 0, 3)], ["fine"])
    records = [good] * 5 + [_gar_record([_box(0, 3, 0, 3)], ["x"], image=b"garbage")] + [good] * 4
    path = _save(tmp_path, records)
    rows, stats = load_rows_with_stats(path, skip_bad_rows=True, num_proc=2)
    assert len(rows) == 9 and dict(stats.skipped) == {"image": 1}
    assert stats.errors[0].startswith("row 5, field 'image'")
    with pytest.raises(DataError, match=r"row 5, field 'image'"):
        load_rows(path, num_proc=2)


# ----------------------------------------------------------------------------- Sa2VA fine-tune JSON

def _write_images(root, names, h=H, w=W):
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        (root / name).write_bytes(_png(h, w))


def test_sa2va_json_multi_region_polygons_and_text(tmp_path):
    _write_images(tmp_path / "imgs", ["a.png", "b.png"])
    records = [
        {"image": "a.png", "mask": [[[0, 0, 4, 0, 4, 4, 0, 4]], [[6, 6, 10, 6, 10, 10, 6, 10], [12, 0, 15, 0, 15, 3]]],
         "text": ["left square", "two pieces"]},
        {"image": "b.png", "mask": [[[2, 2, 6, 2, 6, 6, 2, 6]], encode_mask(_box(0, 1, 0, 3))],
         "text": ["middle", "an RLE region"]},
    ]
    json_path = tmp_path / "train.json"
    json_path.write_text(json.dumps(records))
    assert detect_format(str(json_path)) == "sa2va_json"
    rows = load_rows(str(json_path), image_root=str(tmp_path / "imgs"))
    assert rows["caption"] == ["left square", "two pieces", "middle", "an RLE region"]
    assert rows["source_id"] == ["train.json:0", "train.json:0", "train.json:1", "train.json:1"]
    assert rows["region_index"] == [0, 1, 0, 1]
    areas = [int(decode_region_mask(r).sum()) for r in rows["region_mask"]]
    assert areas[0] == 16 and areas[2] == 16 and areas[3] == 3
    assert areas[1] > 16  # union of a 4 x 4 square and a triangle
    assert rows[0]["img"].size == (W, H)
    two = load_rows(str(json_path), image_root=str(tmp_path / "imgs"), max_rows=2)
    assert two["caption"] == ["left square", "two pieces"]
    assert len(load_rows(str(json_path), image_root=str(tmp_path / "imgs"), max_rows=0)) == 0


def test_sa2va_json_bad_polygon_and_missing_image(tmp_path, caplog):
    _write_images(tmp_path / "imgs", ["a.png"])
    records = [
        {"image": "a.png", "mask": [[[0, 0, 4, 0, 4, 4]]], "text": ["ok"]},
        {"image": "a.png", "mask": [[[0, 0, 4, 0]], [[0, 0, 4, 0, 4, 4]]], "text": ["two points", "fine"]},
        {"image": "missing.png", "mask": [[[0, 0, 4, 0, 4, 4]]], "text": ["gone"]},
    ]
    json_path = tmp_path / "data.json"
    json_path.write_text(json.dumps(records))
    with pytest.raises(DataError, match="fewer than 3|at least 3") as info:
        load_rows(str(json_path), format="sa2va_json", image_root=str(tmp_path / "imgs"))
    assert (info.value.row, info.value.field) == (1, "mask")
    with caplog.at_level(logging.WARNING):
        rows, stats = load_rows_with_stats(str(json_path), image_root=str(tmp_path / "imgs"), skip_bad_rows=True)
    assert rows["caption"] == ["ok", "fine"]
    assert dict(stats.skipped) == {"mask": 1, "image": 1}
    assert any("row 2, field 'image'" in e and "not found" in e for e in stats.errors)


def test_json_sources_are_one_split(tmp_path):
    _write_images(tmp_path, ["a.png"])
    json_path = tmp_path / "d.json"
    json_path.write_text(json.dumps([{"image": "a.png", "mask": [[[0, 0, 4, 0, 4, 4]]], "text": ["t"]}]))
    assert len(load_rows(str(json_path), split="train")) == 1  # TRL's default train split name
    with pytest.raises(ValueError, match="single split, it has no split 'test'"):
        load_rows(str(json_path), split="test")


def test_sa2va_json_missing_caption_when_required(tmp_path):
    _write_images(tmp_path, ["a.png"])
    records = [{"image": "a.png", "mask": [[[0, 0, 4, 0, 4, 4]], [[5, 5, 9, 5, 9, 9]]], "text": ["has one", ""]}]
    json_path = tmp_path / "d.json"
    json_path.write_text(json.dumps(records))
    assert load_rows(str(json_path))["caption"] == ["has one", None]
    with pytest.raises(DataError, match=r"row 0, field 'text'.*region 1 has no caption"):
        load_rows(str(json_path), require_caption=True)


# ----------------------------------------------------------------------------- seed 002 annotations.json

def test_seed_annotations_json_polygons_form_one_region(tmp_path):
    _write_images(tmp_path / "images", ["v1.png", "v2.png"])
    annotations = [{"image": "v1.png", "mask": [[0, 0, 4, 0, 4, 4, 0, 4], [6, 6, 9, 6, 9, 9, 6, 9]]},
                   {"image": "v2.png", "mask": [[2, 2, 6, 2, 6, 6, 2, 6]]}]
    (tmp_path / "annotations.json").write_text(json.dumps(annotations))
    assert detect_format(str(tmp_path)) == "annotations_json"
    rows = load_rows(str(tmp_path))  # images/ next to annotations.json is found by default
    assert len(rows) == 2
    assert rows["caption"] == [None, None]
    assert [int(decode_region_mask(r).sum()) for r in rows["region_mask"]] == [25, 16]
    assert rows["source_id"] == ["annotations.json:0", "annotations.json:1"]


def test_seed_annotations_json_truncated_image_is_reported(tmp_path):
    (tmp_path / "images").mkdir()
    noise = np.random.default_rng(0).integers(0, 255, (H, W, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    data = buffer.getvalue()
    (tmp_path / "images" / "t.png").write_bytes(data[: len(data) // 2])  # header intact, pixel data cut
    (tmp_path / "annotations.json").write_text(json.dumps([{"image": "t.png", "mask": [[0, 0, 4, 0, 4, 4]]}]))
    with pytest.raises(DataError, match=r"row 0, field 'image'.*cannot decode"):
        load_rows(str(tmp_path))


# ----------------------------------------------------------------------------- column-mapped datasets

def test_hf_dataset_with_column_map(tmp_path):
    masks = [_box(0, 4, 0, 4), _box(2, 6, 2, 10)]
    records = [
        {"picture": {"bytes": _png(), "path": None}, "seg": encode_mask(masks[0]), "sentence": "first", "label": "cat"},
        {"picture": {"bytes": _png(), "path": None}, "seg": encode_mask(masks[1]), "sentence": "second", "label": "dog"},
    ]
    dataset = datasets.Dataset.from_list(records).cast_column("picture", datasets.Image())
    path = tmp_path / "mapped"
    dataset.save_to_disk(str(path))
    assert detect_format(str(path)) == "hf"
    column_map = {"img": "picture", "region_mask": "seg", "caption": "sentence", "category": "label"}
    rows = load_rows(str(path), column_map=column_map)
    assert rows["caption"] == ["first", "second"]
    assert rows["category"] == ["cat", "dog"]
    np.testing.assert_array_equal(decode_region_mask(rows[1]), masks[1])
    with pytest.raises(ValueError, match="not a column"):
        load_rows(str(path), column_map={"img": "nope", "region_mask": "seg"})
    with pytest.raises(ValueError, match="no column for 'region_mask'"):
        load_rows(str(path), column_map={"img": "picture"})


def test_hf_dataset_with_array_and_mask_image_columns(tmp_path):
    mask = _box(1, 5, 2, 7)
    array_records = [{"image": {"bytes": _png(), "path": None}, "mask": mask.astype(np.uint8).tolist(), "caption": "arr"}]
    path = tmp_path / "arrays"
    datasets.Dataset.from_list(array_records).cast_column("image", datasets.Image()).save_to_disk(str(path))
    rows = load_rows(str(path), format="hf")  # default names: image -> img, mask, caption
    np.testing.assert_array_equal(decode_region_mask(rows[0]), mask)
    for values, name in [((0, 255), "png255"), ((0, 7), "png7")]:
        buffer = io.BytesIO()
        Image.fromarray(np.where(mask, values[1], values[0]).astype(np.uint8)).save(buffer, format="PNG")
        records = [{"image": {"bytes": _png(), "path": None}, "mask": {"bytes": buffer.getvalue(), "path": None}}]
        ds = datasets.Dataset.from_list(records).cast_column("image", datasets.Image())
        ds.cast_column("mask", datasets.Image()).save_to_disk(str(tmp_path / name))
    rows = load_rows(str(tmp_path / "png255"))  # a 0/255 mask PNG is read as a mask
    np.testing.assert_array_equal(decode_region_mask(rows[0]), mask)
    with pytest.raises(DataError, match="row 0, field 'mask'.*other than 0 and 1"):
        load_rows(str(tmp_path / "png7"))


def test_load_dataset_path_for_data_files(tmp_path):
    # A folder of parquet files goes through datasets.load_dataset, the same path a Hub id takes.
    mask = _box(3, 9, 1, 6)
    records = [{"image": {"bytes": _png(), "path": None}, "mask": encode_mask(mask), "caption": "parquet row"}]
    (tmp_path / "pq").mkdir()
    datasets.Dataset.from_list(records).to_parquet(str(tmp_path / "pq" / "train-00000.parquet"))
    assert detect_format(str(tmp_path / "pq")) == "hf"
    rows, stats = load_rows_with_stats(str(tmp_path / "pq"))
    assert stats.format == "hf" and rows["caption"] == ["parquet row"]
    assert rows["source_id"] == ["pq/train:0"]
    np.testing.assert_array_equal(decode_region_mask(rows[0]), mask)
    with pytest.raises(ValueError, match="split 'test' not in"):
        load_rows(str(tmp_path / "pq"), split="test")
    with pytest.raises(FileNotFoundError, match="cannot load dataset"):
        load_rows(str(tmp_path / "no_such_dir_or_hub_id"))


def test_unknown_format_and_split(tmp_path):
    path = _save(tmp_path, [_gar_record([_box(0, 3, 0, 3)], ["a"])], split="train")
    with pytest.raises(ValueError, match="unknown data format"):
        load_rows(path, format="coco")
    with pytest.raises(ValueError, match="split 'test' not in"):
        load_rows(path, split="test")
