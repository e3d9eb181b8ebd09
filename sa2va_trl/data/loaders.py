"""Loaders: real region datasets -> ``datasets.Dataset`` in the row schema (data/schema.py).

One entry point, :func:`load_rows`, dispatching on ``format``:

``"gar"``
    Grasp-Any-Region arrow files (``datasets.load_from_disk``): ``image`` ({bytes, path}),
    ``mask_rle`` (one COCO RLE dict or a list of them; ``counts`` str, bytes or an uncompressed
    list), ``conversations`` ([{"from": "human"|"gpt", "value"}]), ``catagory`` (sic; str, or one
    str per region) -> ``category``.
    **Pairing rule**: a record with N masks and N gpt turns gives N rows, mask k with the k-th gpt
    turn as its caption; N masks and no gpt turn give N rows with caption None; any other count is
    a ``DataError`` on ``conversations`` (skipped with ``skip_bad_rows``), since we cannot tell which
    text describes which region.
``"sa2va_json"``
    The Sa2VA fine-tune JSON: ``[{"image": path, "mask": [[polygon, ...], ...], "text": [str, ...]}]``:
    one list of flat polygons (or one COCO RLE dict) per region, ``text[k]`` the caption of region k
    (same pairing rule).
``"annotations_json"``
    Seed 002's ``annotations.json``: ``[{"image": file name, "mask": [polygon, ...]}]``; the polygons
    form one region; no caption.
``"hf"``
    Any ``datasets`` dataset (a Hub id for ``load_dataset`` or a ``save_to_disk`` directory) whose
    columns ``column_map`` maps from our names (``img``, ``region_mask``, ``caption``, ``category``)
    to theirs. A mask cell may be an RLE dict, a list of RLE dicts (several regions), a list of
    polygons (one region), or an array / nested list / PIL mask image.
``"auto"`` (default)
    A ``save_to_disk`` directory with ``mask_rle`` and ``conversations`` columns -> gar, other saved
    datasets -> hf; a ``.json`` file whose records have ``text`` -> sa2va_json, else annotations_json;
    a directory holding ``annotations.json`` -> annotations_json; anything else -> hf (Hub id).

Image paths in JSON formats resolve against ``image_root``; by default the JSON file's directory,
then its ``images/`` sub-directory. ``source_id`` is ``"{source name}:{record index}"`` (rows of
one record share it: they are regions of one image), ``region_index`` the region's index in it.

Bad input (undecodable image, an RLE whose size differs from the image, a polygon with fewer than
3 points, an empty mask, a missing caption under ``require_caption``, misaligned captions) raises a
:class:`~sa2va_trl.data.schema.DataError` naming the record index and the field; with
``skip_bad_rows=True`` the region (mask errors) or the record (image / caption errors) is skipped,
counted per field in :class:`LoadStats`, and a summary is logged at WARNING level.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

import datasets
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .schema import (
    CAPTION, CATEGORY, IMG, REGION_INDEX, REGION_MASK, RESERVED_IMAGE_COLUMNS, SOURCE_ID, DataError,
    encode_mask, normalize_rle, polygons_to_rle, row_features,
)

logger = logging.getLogger(__name__)

FORMATS = ("auto", "gar", "sa2va_json", "annotations_json", "hf")
MASK_FORMATS = ("auto", "rle", "polygons", "array")
_MAPPABLE = (IMG, REGION_MASK, CAPTION, CATEGORY)
_ERROR = "_load_error"
_ERROR_FIELD = "_load_error_field"
_MAX_LOGGED_ERRORS = 20


@dataclass
class LoadStats:
    """What a load read, produced and skipped.

    Attributes:
        source: the source as given.
        format: the resolved format.
        records: source records read (images / JSON entries / arrow rows).
        rows: schema rows produced (one per region).
        skipped: number of skips per source field (a skip drops one region or one record).
        errors: the first error messages, for the log.
    """

    source: str
    format: str
    records: int = 0
    rows: int = 0
    skipped: Counter = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)

    @property
    def num_skipped(self) -> int:
        """Total number of skips."""
        return sum(self.skipped.values())

    def add_error(self, err: DataError) -> None:
        """Count one skipped item."""
        self.skipped[err.field or "?"] += 1
        if len(self.errors) < _MAX_LOGGED_ERRORS:
            self.errors.append(str(err))

    def log_summary(self) -> None:
        """Log the skips (WARNING) or the clean load (INFO)."""
        if self.num_skipped:
            logger.warning("%s (%s): skipped %d bad item(s) by field %s; kept %d rows from %d records. First: %s",
                           self.source, self.format, self.num_skipped, dict(self.skipped), self.rows,
                           self.records, " | ".join(self.errors[:5]))
        else:
            logger.info("%s (%s): %d rows from %d records", self.source, self.format, self.rows, self.records)


@dataclass(frozen=True)
class _Options:
    """Options shared by every record conversion."""

    source_name: str
    skip_bad_rows: bool
    require_caption: bool
    verify_images: bool
    image_root: str | None
    mask_format: str = "auto"
    image_field: str = "image"
    mask_field: str = "mask"
    caption_field: str = "text"


# ----------------------------------------------------------------------------- entry points

def load_rows(source: str, format: str = "auto", split: str | None = None,
              column_map: Mapping[str, str] | None = None, skip_bad_rows: bool = False,
              require_caption: bool = False, max_rows: int | None = None, *, image_root: str | None = None,
              mask_format: str = "auto", verify_images: bool = True,
              num_proc: int | None = None) -> datasets.Dataset:
    """Load region rows from any supported source into the row schema.

    Args:
        source: a ``save_to_disk`` directory, a JSON file, a directory with ``annotations.json``,
            or a Hub dataset id.
        format: one of :data:`FORMATS` (see the module docstring).
        split: the split of a ``DatasetDict`` / Hub dataset (default: "train" when there are
            several; a single-split source needs none). JSON files are one split: None or "train"
            (TRL's default name) read them, any other split is a ValueError.
        column_map: ``{our name: their column}`` for ``hf`` sources (keys among ``img``,
            ``region_mask``, ``caption``, ``category``).
        skip_bad_rows: skip bad regions / records (counted and logged) instead of raising.
        require_caption: a region without a caption is bad input (field: the caption field).
        max_rows: stop after this many schema rows (records are read in order).
        image_root: directory that relative image paths resolve against (default: the JSON file's
            directory, then its ``images/``; the dataset directory for arrow sources).
        mask_format: for ``hf`` sources: "auto", "rle", "polygons" or "array".
        verify_images: fully decode every image once (catches truncated files); False only reads
            the header (size).
        num_proc: processes for arrow sources (``Dataset.map``).

    Returns:
        ``datasets.Dataset`` with the schema columns (plus ``category`` when the source has one).

    Raises:
        DataError: bad input (unless ``skip_bad_rows``); ValueError: unknown format, split or
            column names; FileNotFoundError: a missing source.
    """
    dataset, _ = load_rows_with_stats(source, format=format, split=split, column_map=column_map,
                                      skip_bad_rows=skip_bad_rows, require_caption=require_caption,
                                      max_rows=max_rows, image_root=image_root, mask_format=mask_format,
                                      verify_images=verify_images, num_proc=num_proc)
    return dataset


def load_rows_with_stats(source: str, format: str = "auto", split: str | None = None,
                         column_map: Mapping[str, str] | None = None, skip_bad_rows: bool = False,
                         require_caption: bool = False, max_rows: int | None = None, *,
                         image_root: str | None = None, mask_format: str = "auto", verify_images: bool = True,
                         num_proc: int | None = None) -> tuple[datasets.Dataset, LoadStats]:
    """:func:`load_rows`, also returning the :class:`LoadStats` (records read, rows, skips by field).

    Args and Raises: as :func:`load_rows`.

    Returns:
        ``(dataset, stats)``.
    """
    source = os.fspath(source)
    if format not in FORMATS:
        raise ValueError(f"unknown data format {format!r}; expected one of {FORMATS}")
    if mask_format not in MASK_FORMATS:
        raise ValueError(f"unknown mask_format {mask_format!r}; expected one of {MASK_FORMATS}")
    if max_rows is not None and max_rows < 0:
        raise ValueError(f"max_rows must be >= 0, got {max_rows}")
    records = None
    if format == "auto" and os.path.isfile(source) and source.endswith(".json"):
        records = _read_json_records(source)  # parsed once, used for detection and loading
        format = _json_format(records)
    elif format == "auto":
        format = detect_format(source)
    if column_map and format != "hf":
        raise ValueError(f"column_map applies to format 'hf' only (this source is {format!r})")
    stats = LoadStats(source=source, format=format)
    if format in ("sa2va_json", "annotations_json"):
        json_path = _annotations_path(source)
        if split not in (None, "train"):  # "train" is TRL's default train split name: accept it
            raise ValueError(f"{json_path}: a JSON source is a single split, it has no split {split!r}; point to a "
                             "separate file for evaluation, or hold out a fraction of the rows")
        options = _Options(source_name=os.path.basename(json_path), skip_bad_rows=skip_bad_rows,
                           require_caption=require_caption, verify_images=verify_images,
                           image_root=image_root, image_field="image", mask_field="mask",
                           caption_field="text")
        dataset = _load_json(json_path, format, options, max_rows, stats, records)
    else:
        arrow, split = _open_arrow(source, split)
        name = os.path.basename(os.path.normpath(source)) + (f"/{split}" if split else "")
        if image_root is None and os.path.isdir(source):  # relative image paths: next to the arrow files
            image_root = source
        options = _Options(source_name=name, skip_bad_rows=skip_bad_rows, require_caption=require_caption,
                           verify_images=verify_images, image_root=image_root, mask_format=mask_format)
        if format == "gar":
            dataset = _load_arrow(arrow, _gar_record_rows, options, max_rows, num_proc, stats,
                                  with_category="catagory" in arrow.column_names, image_column="image")
        else:
            mapping = _resolve_column_map(arrow.column_names, column_map)
            options = replace(options, image_field=mapping[IMG], mask_field=mapping[REGION_MASK],
                              caption_field=mapping.get(CAPTION) or CAPTION)
            arrow = arrow.select_columns(sorted(set(mapping.values())))
            arrow = arrow.rename_columns({theirs: f"_src_{ours}" for ours, theirs in mapping.items()})
            dataset = _load_arrow(arrow, _mapped_record_rows, options, max_rows, num_proc, stats,
                                  with_category=CATEGORY in mapping, image_column=f"_src_{IMG}")
    stats.rows = len(dataset)
    stats.log_summary()
    return dataset, stats


def detect_format(source: str) -> str:
    """Guess the format of ``source`` (see the module docstring for the rules).

    Args:
        source: path or Hub id.

    Returns:
        One of "gar", "sa2va_json", "annotations_json", "hf".
    """
    if os.path.isdir(source):
        if _is_saved_dataset(source):
            columns = _saved_columns(source)
            return "gar" if {"mask_rle", "conversations"} <= columns else "hf"
        if os.path.isfile(os.path.join(source, "annotations.json")):
            return "annotations_json"
        return "hf"
    if os.path.isfile(source) and source.endswith(".json"):
        return _json_format(_read_json_records(source))
    if os.path.exists(source):
        raise ValueError(f"cannot tell the format of {source!r}; pass format= one of {FORMATS[1:]}")
    return "hf"


# ----------------------------------------------------------------------------- one record -> rows

def _record_rows(index: int, image: Any, masks: Sequence[Any], mask_kind: str, captions: Sequence[Any] | None,
                 categories: Any, options: _Options, caption_field: str, category_field: str,
                 errors: list[DataError]) -> list[dict]:
    """The schema rows of one source record (one per region), shared by every format.

    Record-level problems raise; region-level ones (a bad mask) are appended to ``errors`` when
    skipping, so the record's other regions survive.
    """
    stored_image, (width, height) = _read_image(image, index, options)
    n = len(masks)
    if n == 0:
        raise DataError("no region mask in this record", row=index, field=options.mask_field)
    if captions is None or len(captions) == 0:
        captions = [None] * n
    elif len(captions) != n:
        raise DataError(f"{n} masks but {len(captions)} captions: cannot tell which caption describes which "
                        "region (the rule pairs N masks with N captions)", row=index, field=caption_field)
    if isinstance(categories, (list, tuple)):
        if len(categories) != n:
            raise DataError(f"{n} masks but {len(categories)} categories", row=index, field=category_field)
    else:
        categories = [categories] * n
    rows = []
    for k, (mask, caption, category) in enumerate(zip(masks, captions, categories)):
        try:
            if caption is not None and not isinstance(caption, str):
                raise DataError(f"region {k}: caption must be a string, got {type(caption).__name__}",
                                row=index, field=caption_field)
            caption = caption.strip() if caption is not None else None
            if options.require_caption and not caption:
                raise DataError(f"region {k} has no caption and require_caption is set", row=index,
                                field=caption_field)
            rle = _region_rle(mask, mask_kind, height, width, index, k, options)
        except DataError as err:
            if not options.skip_bad_rows:
                raise
            errors.append(err)
            continue
        row = {IMG: stored_image, REGION_MASK: rle, CAPTION: caption or None,
               SOURCE_ID: f"{options.source_name}:{index}", REGION_INDEX: k}
        row[CATEGORY] = None if category is None else str(category)
        rows.append(row)
    return rows


def _region_rle(mask: Any, kind: str, height: int, width: int, index: int, k: int, options: _Options) -> dict:
    """One region's canonical RLE, checked against the image size and for emptiness."""
    field_name = options.mask_field
    if kind == "auto":
        kind = _guess_mask_kind(mask, height, width)
    elif kind == "rle_or_polygons":  # JSON regions: polygons, or an RLE dict in some exports
        kind = "rle" if isinstance(mask, Mapping) else "polygons"
    if kind == "rle":
        rle = normalize_rle(mask, row=index, field=field_name)
        if rle["size"] != [height, width]:
            raise DataError(f"region {k}: RLE size {rle['size']} differs from the image size {[height, width]} "
                            "(H, W)", row=index, field=field_name)
    elif kind == "polygons":
        try:
            rle = polygons_to_rle(mask, height, width, row=index, field=field_name)
        except DataError as err:
            raise DataError(f"region {k}: {err.reason}", row=index, field=field_name) from None
    else:
        from ..rewards.masks import as_mask  # the project's one mask converter

        if isinstance(mask, Image.Image) and mask.mode == "L":
            values = np.unique(np.asarray(mask))
            if set(values.tolist()) <= {0, 255}:  # the usual 0/255 mask PNG
                mask = np.asarray(mask) // 255
        try:
            array = as_mask(mask, row=index, field=field_name)
        except ValueError as err:  # as_mask's errors already carry row and field: keep the reason only
            raise DataError(f"region {k}: {getattr(err, 'message', err)}", row=index, field=field_name) from None
        if array.shape != (height, width):
            raise DataError(f"region {k}: mask shape {list(array.shape)} differs from the image size "
                            f"{[height, width]} (H, W)", row=index, field=field_name)
        rle = encode_mask(array)
    from pycocotools import mask as coco_mask

    if coco_mask.area({"size": rle["size"], "counts": rle["counts"].encode("ascii")}) == 0:
        raise DataError(f"region {k}: the mask is empty", row=index, field=field_name)
    return rle


def _guess_mask_kind(mask: Any, height: int, width: int) -> str:
    if isinstance(mask, Mapping):
        return "rle"
    if isinstance(mask, (list, tuple)) and mask and all(isinstance(p, (list, tuple)) for p in mask):
        # An H x W nested grid of 0/1 versus a list of flat polygons.
        if len(mask) == height and all(len(p) == width for p in mask):
            return "array"
        return "polygons"
    return "array"


def _read_image(image: Any, index: int, options: _Options) -> tuple[Any, tuple[int, int]]:
    """Open (and optionally fully decode) an image; returns what the ``img`` column stores and (W, H)."""
    field_name = options.image_field
    if isinstance(image, Image.Image):
        return image, image.size
    if isinstance(image, str):
        image = {"bytes": None, "path": image}
    if not isinstance(image, Mapping) or not (image.get("bytes") or image.get("path")):
        raise DataError(f"expected image bytes or a path, got {type(image).__name__}", row=index, field=field_name)
    data, path = image.get("bytes"), image.get("path")
    if data:
        stored, opener = {"bytes": data, "path": path}, (lambda: io.BytesIO(data))
    else:
        resolved = _resolve_image_path(path, options.image_root)
        if resolved is None:
            raise DataError(f"image file {path!r} not found (image_root={options.image_root!r})", row=index,
                            field=field_name)
        stored, opener = {"bytes": None, "path": resolved}, (lambda: resolved)
    try:
        with Image.open(opener()) as pil:
            size = pil.size
            if options.verify_images:
                pil.load()
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise DataError(f"cannot decode the image ({type(err).__name__}: {err})", row=index,
                        field=field_name) from None
    return stored, size


def _resolve_image_path(path: str, image_root: str | None) -> str | None:
    candidates = [path] if os.path.isabs(path) else []
    if image_root is not None and not os.path.isabs(path):
        candidates.append(os.path.join(image_root, path))
    for candidate in candidates:
        if os.path.isfile(candidate):
            return os.path.abspath(candidate)
    return None


# ----------------------------------------------------------------------------- per-format records

def _gar_record_rows(record: Mapping[str, Any], index: int, options: _Options,
                     errors: list[DataError]) -> list[dict]:
    masks = record.get("mask_rle")
    if masks is None:
        raise DataError("missing", row=index, field="mask_rle")
    if isinstance(masks, Mapping):
        masks = [masks]
    conversations = record.get("conversations") or []
    if not isinstance(conversations, list):
        raise DataError(f"expected a list of turns, got {type(conversations).__name__}", row=index,
                        field="conversations")
    captions = []
    for turn in conversations:
        if not isinstance(turn, Mapping) or "from" not in turn or "value" not in turn:
            raise DataError(f"a turn must be {{'from', 'value'}}, got {turn!r:.80}", row=index, field="conversations")
        if turn["from"] == "gpt":
            captions.append(turn["value"])
    gar_options = replace(options, image_field="image", mask_field="mask_rle")
    return _record_rows(index, record.get("image"), list(masks), "rle", captions, record.get("catagory"),
                        gar_options, caption_field="conversations", category_field="catagory", errors=errors)


def _mapped_record_rows(record: Mapping[str, Any], index: int, options: _Options,
                        errors: list[DataError]) -> list[dict]:
    mask = record.get(f"_src_{REGION_MASK}")
    if mask is None:
        raise DataError("missing mask", row=index, field=options.mask_field)
    caption = record.get(f"_src_{CAPTION}")
    kind = options.mask_format
    several = isinstance(mask, (list, tuple)) and bool(mask) and all(isinstance(m, Mapping) for m in mask)
    if several:  # a list of RLE dicts: several regions
        masks, kind = list(mask), "rle"
        captions = caption if isinstance(caption, (list, tuple)) else ([caption] if caption is not None else None)
    else:
        masks = [mask]
        if isinstance(caption, (list, tuple)):
            raise DataError(f"one mask but a list of {len(caption)} captions; map a single-string caption column",
                            row=index, field=options.caption_field)
        captions = None if caption is None else [caption]
    return _record_rows(index, record.get(f"_src_{IMG}"), masks, kind, captions, record.get(f"_src_{CATEGORY}"),
                        options, caption_field=options.caption_field, category_field=CATEGORY, errors=errors)


def _json_record_rows(format: str) -> Callable:
    def convert(record: Any, index: int, options: _Options, errors: list[DataError]) -> list[dict]:
        if not isinstance(record, Mapping):
            raise DataError(f"expected a JSON object, got {type(record).__name__}", row=index, field="record")
        for key in ("image", "mask"):
            if key not in record:
                raise DataError("missing", row=index, field=key)
        masks = record["mask"]
        if not isinstance(masks, list):
            raise DataError(f"expected a list, got {type(masks).__name__}", row=index, field="mask")
        if format == "annotations_json":
            masks, captions = [masks], None  # all the polygons form one region
        else:
            captions = record.get("text")
            if isinstance(captions, str):
                captions = [captions]
            if captions is not None and not isinstance(captions, list):
                raise DataError(f"expected a list of strings, got {type(captions).__name__}", row=index,
                                field="text")
        return _record_rows(index, record["image"], masks, "rle_or_polygons", captions, None, options,
                            caption_field="text", category_field="category", errors=errors)

    return convert


# ----------------------------------------------------------------------------- engines

def _json_format(records: list) -> str:
    first = records[0] if records else {}
    return "sa2va_json" if isinstance(first, Mapping) and "text" in first else "annotations_json"


def _load_json(path: str, format: str, options: _Options, max_rows: int | None, stats: LoadStats,
               records: list | None = None) -> datasets.Dataset:
    records = records if records is not None else _read_json_records(path)
    root = options.image_root
    if root is None:  # seed 002 layout: images/ next to annotations.json
        base = os.path.dirname(os.path.abspath(path))
        first = next((r.get("image") for r in records if isinstance(r, Mapping) and isinstance(r.get("image"), str)),
                     None)
        nested = os.path.join(base, "images")
        root = nested if first and not os.path.isfile(os.path.join(base, first)) and os.path.isdir(nested) else base
    options = replace(options, image_root=root)
    convert = _json_record_rows(format)
    rows: list[dict] = []
    for index, record in enumerate(tqdm(records, desc=f"loading {os.path.basename(path)}", unit="rec",
                                        disable=len(records) < 1000)):
        if max_rows is not None and len(rows) >= max_rows:
            break
        stats.records += 1
        errors: list[DataError] = []
        try:
            rows.extend(convert(record, index, options, errors))
        except DataError as err:
            if not options.skip_bad_rows:
                raise
            errors.append(err)
        for err in errors:
            stats.add_error(err)
    if max_rows is not None:
        rows = rows[:max_rows]
    if not rows:
        return _empty_rows(with_category=False)
    return datasets.Dataset.from_list(rows, features=row_features(with_category=True)).remove_columns(CATEGORY)


def _empty_rows(with_category: bool) -> datasets.Dataset:
    """A zero-row dataset with the schema's columns (``from_list([])`` cannot carry features)."""
    features = row_features(with_category=with_category)
    return datasets.Dataset.from_dict({name: [] for name in features}, features=features)


def _batch_rows(batch: Mapping[str, list], indices: list[int], convert: Callable, options: _Options,
                with_category: bool, index_offset: int = 0) -> dict[str, list]:
    """``Dataset.map`` body: records -> schema rows, plus one marker row per skipped item."""
    columns = [IMG, REGION_MASK, CAPTION, SOURCE_ID, REGION_INDEX] + ([CATEGORY] if with_category else [])
    out: dict[str, list] = {name: [] for name in columns + [_ERROR, _ERROR_FIELD]}
    keys = list(batch)
    for i, index in enumerate(indices):
        index += index_offset  # the record's index in the whole source, also inside a selection
        record = {key: batch[key][i] for key in keys}
        errors: list[DataError] = []
        try:
            rows = convert(record, index, options, errors)
        except DataError as err:
            if not options.skip_bad_rows:
                raise
            rows, errors = [], errors + [err]
        for row in rows:
            for name in columns:
                out[name].append(row.get(name))
            out[_ERROR].append(None)
            out[_ERROR_FIELD].append(None)
        for err in errors:  # markers survive caching and num_proc; counted and dropped afterwards
            for name in columns:
                out[name].append(None)
            out[_ERROR].append(str(err))
            out[_ERROR_FIELD].append(err.field or "?")
    return out


def _load_arrow(arrow: datasets.Dataset, convert: Callable, options: _Options, max_rows: int | None,
                num_proc: int | None, stats: LoadStats, with_category: bool, image_column: str) -> datasets.Dataset:
    if max_rows == 0 or len(arrow) == 0:  # map would not run and drop the output columns
        return _empty_rows(with_category)
    arrow = _undecoded_images(arrow, image_column)
    features = row_features(with_category=with_category)
    features[_ERROR] = datasets.Value("string")
    features[_ERROR_FIELD] = datasets.Value("string")

    def convert_range(start: int, stop: int) -> datasets.Dataset:
        part = arrow if (start, stop) == (0, len(arrow)) else arrow.select(range(start, stop))
        fn_kwargs = dict(convert=convert, options=options, with_category=with_category, index_offset=start)
        return part.map(_batch_rows, batched=True, batch_size=64, with_indices=True, fn_kwargs=fn_kwargs,
                        remove_columns=part.column_names, features=features,
                        num_proc=num_proc if num_proc and num_proc > 1 else None,
                        desc=f"loading {options.source_name}")

    if max_rows is None:
        converted = convert_range(0, len(arrow))
        stats.records = len(arrow)
    else:  # read records in order until enough rows survive
        parts, kept, start = [], 0, 0
        while kept < max_rows and start < len(arrow):
            stop = min(len(arrow), start + max(max_rows - kept, 16))
            part = convert_range(start, stop)
            parts.append(part)
            kept += sum(1 for e in part[_ERROR] if e is None)
            stats.records += stop - start
            start = stop
        converted = datasets.concatenate_datasets(parts)
    error_column = converted[_ERROR]
    field_column = converted[_ERROR_FIELD]
    bad = [i for i, message in enumerate(error_column) if message is not None]
    for i in bad:
        err = DataError(error_column[i], field=field_column[i])
        stats.skipped[err.field] += 1
        if len(stats.errors) < _MAX_LOGGED_ERRORS:
            stats.errors.append(error_column[i])
    if bad:
        keep = np.ones(len(converted), dtype=bool)
        keep[bad] = False
        converted = converted.select(np.flatnonzero(keep))
    if max_rows is not None and len(converted) > max_rows:
        converted = converted.select(range(max_rows))
    return converted.remove_columns([_ERROR, _ERROR_FIELD])


def _undecoded_images(arrow: datasets.Dataset, column: str) -> datasets.Dataset:
    """The image column as raw ``{bytes, path}``: no PIL decode inside ``map``, bytes passed through."""
    feature = arrow.features.get(column)
    if isinstance(feature, datasets.Image) and feature.decode:
        arrow = arrow.cast_column(column, datasets.Image(decode=False))
    return arrow


# ----------------------------------------------------------------------------- sources

def _open_arrow(source: str, split: str | None) -> tuple[datasets.Dataset, str | None]:
    """The dataset of ``split`` and the split's name (None for a bare saved ``Dataset``)."""
    if os.path.isdir(source) and _is_saved_dataset(source):
        loaded = datasets.load_from_disk(source)
    elif os.path.exists(source) and not os.path.isdir(source):
        raise ValueError(f"{source!r} is a file; arrow formats need a save_to_disk directory or a Hub id")
    else:
        try:
            loaded = datasets.load_dataset(source, split=split)
        except Exception as err:  # missing path, unknown Hub id, no network, bad split...
            if isinstance(err, ValueError) and "split" in str(err).lower():  # same error type as saved datasets
                raise ValueError(f"split {split!r} not in {source!r} ({err})") from err
            raise FileNotFoundError(f"cannot load dataset {source!r} ({type(err).__name__}: {err}). A local path "
                                    "must exist; a Hub id needs the network or a warm HF cache "
                                    "(HF_HUB_OFFLINE=1 reads only the cache).") from err
        if isinstance(loaded, datasets.DatasetDict):  # split=None on a Hub dataset
            split = "train" if "train" in loaded or len(loaded) != 1 else next(iter(loaded))
        else:
            return loaded, split
    if isinstance(loaded, datasets.DatasetDict):
        if split is None:
            split = next(iter(loaded)) if len(loaded) == 1 else "train"
        if split not in loaded:
            raise ValueError(f"split {split!r} not in {source!r}; available: {sorted(loaded)}")
        return loaded[split], split
    return loaded, None


def _resolve_column_map(columns: Sequence[str], column_map: Mapping[str, str] | None) -> dict[str, str]:
    """``{our name: their column}``, with defaults for the names the source already uses."""
    column_map = dict(column_map or {})
    unknown = set(column_map) - set(_MAPPABLE)
    if unknown:
        raise ValueError(f"column_map keys must be among {_MAPPABLE} (our names), got {sorted(unknown)}")
    mapping = {}
    defaults = {IMG: (IMG, "image", "images"), REGION_MASK: (REGION_MASK, "mask", "segmentation"),
                CAPTION: (CAPTION, "text", "sentence"), CATEGORY: (CATEGORY, "category", "label")}
    for ours in _MAPPABLE:
        if ours in column_map:
            if column_map[ours] not in columns:
                raise ValueError(f"column_map[{ours!r}] = {column_map[ours]!r} is not a column; "
                                 f"columns: {list(columns)}")
            mapping[ours] = column_map[ours]
        else:
            found = next((c for c in defaults[ours] if c in columns), None)
            if found is not None:
                mapping[ours] = found
    for needed in (IMG, REGION_MASK):
        if needed not in mapping:
            raise ValueError(f"no column for {needed!r}: set column_map={{{needed!r}: '<column>'}}; "
                             f"columns: {list(columns)}")
    return mapping


def _annotations_path(source: str) -> str:
    if os.path.isdir(source):
        path = os.path.join(source, "annotations.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no annotations.json in {source!r}")
        return path
    if not os.path.isfile(source):
        raise FileNotFoundError(f"no such file: {source!r}")
    return source


def _read_json_records(path: str) -> list:
    try:
        with open(path, encoding="utf-8") as handle:
            records = json.load(handle)
    except json.JSONDecodeError as err:
        raise DataError(f"not valid JSON ({err})", field=os.path.basename(path)) from None
    if isinstance(records, Mapping):  # {"annotations": [...]} style wrappers
        lists = [v for v in records.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError("expected a JSON list of records", field=os.path.basename(path))
        records = lists[0]
    if not isinstance(records, list):
        raise DataError(f"expected a JSON list of records, got {type(records).__name__}", field=os.path.basename(path))
    return records


def _is_saved_dataset(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, name)) for name in ("dataset_dict.json", "state.json"))


def _saved_columns(path: str) -> set[str]:
    if os.path.isfile(os.path.join(path, "dataset_dict.json")):
        with open(os.path.join(path, "dataset_dict.json")) as handle:
            splits = json.load(handle).get("splits", [])
        if not splits:
            return set()
        path = os.path.join(path, splits[0])
    info_path = os.path.join(path, "dataset_info.json")
    if not os.path.isfile(info_path):
        return set()
    with open(info_path) as handle:
        return set((json.load(handle).get("features") or {}).keys())


def check_no_reserved_columns(dataset: datasets.Dataset) -> None:
    """Raise if a dataset still has a column TRL would treat as its own image input.

    Args:
        dataset: the dataset about to reach the trainer.

    Raises:
        ValueError: naming the column.
    """
    clash = [c for c in dataset.column_names if c in RESERVED_IMAGE_COLUMNS]
    if clash:
        raise ValueError(f"columns {clash} would switch TRL to its own multimodal path; the schema's image column "
                         f"is {IMG!r}")
