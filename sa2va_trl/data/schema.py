"""The row schema shared by the loaders, the trainer, the rewards and the evaluation.

One row is one region of one image (see docs/architecture.md, "The row schema"):

=================  ==========================================  ==========================================
column             type                                        meaning
=================  ==========================================  ==========================================
``img``            ``datasets.Image()`` (PIL on access)        the image (never ``image``/``images``:
                                                               TRL switches to its own multimodal path)
``region_mask``    COCO RLE ``{"size": [H, W], "counts": str}``  the region, same H x W as the image
``caption``        ``str`` or ``None``                         the region's reference caption
``source_id``      ``str``                                     the source image: rows sharing it are
                                                               regions of the same image
``region_index``   ``int``                                     index of the region in its source image
``category``       ``str`` or ``None`` (optional column)       a class name where the source gives one
=================  ==========================================  ==========================================

Masks are stored as compressed COCO RLE with a ``str`` ``counts`` (Arrow-friendly, compact);
:func:`encode_mask` and :func:`decode_region_mask` convert to and from H x W bool arrays, and
:func:`normalize_rle` / :func:`polygons_to_rle` turn the RLE and polygon forms found in the wild
into that canonical form. All the run-length and polygon work is done by pycocotools.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import datasets
import numpy as np
from pycocotools import mask as coco_mask

IMG = "img"
REGION_MASK = "region_mask"
CAPTION = "caption"
SOURCE_ID = "source_id"
REGION_INDEX = "region_index"
CATEGORY = "category"

#: The columns every row has, in order.
REQUIRED_COLUMNS = (IMG, REGION_MASK, CAPTION, SOURCE_ID, REGION_INDEX)
#: Optional columns a loader may add.
OPTIONAL_COLUMNS = (CATEGORY,)
#: Column names that must never reach TRL (they switch on its built-in multimodal path).
RESERVED_IMAGE_COLUMNS = ("image", "images")


class DataError(ValueError):
    """Bad input data, with the row index and the field that was wrong.

    Args:
        message: what was wrong and, where possible, how to fix it.
        row: index of the offending record in its source (None when not row-specific).
        field: the source field (column or JSON key) that was wrong.
    """

    def __init__(self, message: str, *, row: int | None = None, field: str | None = None):
        self.row = row
        self.field = field
        self.reason = message
        where = []
        if row is not None:
            where.append(f"row {row}")
        if field is not None:
            where.append(f"field {field!r}")
        prefix = f"{', '.join(where)}: " if where else ""
        super().__init__(prefix + message)

    def __reduce__(self):  # keep row and field across processes (Dataset.map with num_proc)
        return (_rebuild_data_error, (type(self), self.reason, self.row, self.field))


def _rebuild_data_error(cls, message, row, field):
    return cls(message, row=row, field=field)


def row_features(with_category: bool = False) -> datasets.Features:
    """The ``datasets.Features`` of a schema dataset.

    Args:
        with_category: add the optional ``category`` column.

    Returns:
        Features with the columns in :data:`REQUIRED_COLUMNS` order (then ``category``).
    """
    features = {
        IMG: datasets.Image(),
        REGION_MASK: {"size": datasets.List(datasets.Value("int64")), "counts": datasets.Value("string")},
        CAPTION: datasets.Value("string"),
        SOURCE_ID: datasets.Value("string"),
        REGION_INDEX: datasets.Value("int64"),
    }
    if with_category:
        features[CATEGORY] = datasets.Value("string")
    return datasets.Features(features)


def encode_mask(mask: np.ndarray) -> dict:
    """Encode an H x W mask as a compressed COCO RLE with ``str`` counts.

    Args:
        mask: H x W array; nonzero / True pixels belong to the region.

    Returns:
        ``{"size": [H, W], "counts": str}``.

    Example:
        >>> import numpy as np
        >>> rle = encode_mask(np.eye(3, dtype=bool))
        >>> rle["size"], int(decode_region_mask(rle).sum())
        ([3, 3], 3)
    """
    array = np.asarray(mask)
    if array.ndim != 2:
        raise ValueError(f"encode_mask expects an H x W mask, got shape {array.shape}")
    rle = coco_mask.encode(np.asfortranarray(array != 0, dtype=np.uint8))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def decode_region_mask(row_or_rle: Mapping[str, Any]) -> np.ndarray:
    """Decode a row's ``region_mask`` (or an RLE dict itself) to an H x W bool array.

    Args:
        row_or_rle: a schema row (a mapping with a ``region_mask`` key) or a COCO RLE dict
            (``counts`` str, bytes or an uncompressed list of run lengths).

    Returns:
        H x W ``numpy.bool_`` array.
    """
    rle = row_or_rle[REGION_MASK] if REGION_MASK in row_or_rle else row_or_rle
    compressed = _to_coco_rle(rle)
    return coco_mask.decode(compressed).astype(bool)


def normalize_rle(rle: Any, *, row: int | None = None, field: str = "mask") -> dict:
    """Check a COCO RLE in any of its forms and return the canonical compressed form.

    Accepted: ``{"size": [H, W], "counts": str | bytes | list[int]}``; a list of counts is the
    uncompressed (column-major run lengths) form and must sum to H * W.

    Args:
        rle: the RLE object.
        row: record index, for the error message.
        field: source field name, for the error message.

    Returns:
        ``{"size": [H, W], "counts": str}``.

    Raises:
        DataError: naming ``row`` and ``field`` when the RLE is malformed.
    """
    if not isinstance(rle, Mapping) or "size" not in rle or "counts" not in rle:
        raise DataError(f"expected a COCO RLE dict with 'size' and 'counts', got {_describe(rle)}",
                        row=row, field=field)
    try:
        compressed = _to_coco_rle(rle)
        coco_mask.area(compressed)  # walks the runs: cheap validity check
        decoded_size = coco_mask.decode(compressed).shape
    except Exception as err:  # pycocotools raises ValueError, TypeError and bare Exception
        raise DataError(f"invalid COCO RLE ({err})", row=row, field=field) from None
    height, width = (int(v) for v in compressed["size"])
    if tuple(decoded_size) != (height, width):
        raise DataError(f"RLE decodes to {decoded_size}, not its size {[height, width]}", row=row, field=field)
    counts = compressed["counts"]
    return {"size": [height, width], "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


def polygons_to_rle(polygons: Sequence[Sequence[float]], height: int, width: int, *,
                    row: int | None = None, field: str = "mask") -> dict:
    """Rasterise one region given as flat polygons ``[x1, y1, x2, y2, ...]`` (their union).

    Args:
        polygons: one or more polygons, each a flat list of at least 3 (x, y) points.
        height: image height.
        width: image width.
        row: record index, for the error message.
        field: source field name, for the error message.

    Returns:
        ``{"size": [height, width], "counts": str}``.

    Raises:
        DataError: a polygon with fewer than 3 points, an odd number of coordinates or a
            non-finite coordinate; no polygon at all.
    """
    if not isinstance(polygons, (list, tuple)) or len(polygons) == 0:
        raise DataError(f"expected a non-empty list of polygons, got {_describe(polygons)}", row=row, field=field)
    cleaned = []
    for k, polygon in enumerate(polygons):
        if not isinstance(polygon, (list, tuple, np.ndarray)):
            raise DataError(f"polygon {k} is {_describe(polygon)}, not a flat list of coordinates",
                            row=row, field=field)
        try:
            coords = [float(v) for v in polygon]
        except (TypeError, ValueError):
            raise DataError(f"polygon {k} has non-numeric coordinates", row=row, field=field) from None
        if len(coords) % 2 != 0:
            raise DataError(f"polygon {k} has an odd number of coordinates ({len(coords)})", row=row, field=field)
        if len(coords) < 6:
            raise DataError(f"polygon {k} has {len(coords) // 2} points; a polygon needs at least 3",
                            row=row, field=field)
        if not all(math.isfinite(v) for v in coords):
            raise DataError(f"polygon {k} has a non-finite coordinate", row=row, field=field)
        cleaned.append(coords)
    merged = coco_mask.merge(coco_mask.frPyObjects(cleaned, int(height), int(width)))
    counts = merged["counts"]
    return {"size": [int(height), int(width)],
            "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


def validate_row(row: Mapping[str, Any], index: int | None = None) -> None:
    """Check one schema row: columns present, mask decodable and of the image's size.

    Args:
        row: a schema row (``img`` decoded to PIL, or a ``{"bytes", "path"}`` dict).
        index: the row's index, for error messages.

    Raises:
        DataError: naming the index and the column that is wrong.
    """
    for column in REQUIRED_COLUMNS:
        if column not in row:
            raise DataError("missing column", row=index, field=column)
    rle = normalize_rle(row[REGION_MASK], row=index, field=REGION_MASK)
    image = row[IMG]
    size = getattr(image, "size", None)
    if size is not None and [size[1], size[0]] != rle["size"]:
        raise DataError(f"mask size {rle['size']} differs from the image's {[size[1], size[0]]} (H, W)",
                        row=index, field=REGION_MASK)
    caption = row[CAPTION]
    if caption is not None and not isinstance(caption, str):
        raise DataError(f"expected str or None, got {_describe(caption)}", row=index, field=CAPTION)


def _to_coco_rle(rle: Mapping[str, Any]) -> dict:
    """The dict pycocotools' decode/area accept: bytes counts, uncompressed lists compressed."""
    height, width = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, str):
        return {"size": [height, width], "counts": counts.encode("ascii")}
    if isinstance(counts, bytes):
        return {"size": [height, width], "counts": counts}
    if isinstance(counts, (list, tuple, np.ndarray)):
        runs = [int(c) for c in counts]
        if any(c < 0 for c in runs) or sum(runs) != height * width:
            raise ValueError(f"uncompressed counts sum to {sum(runs)}, not H * W = {height * width}")
        return coco_mask.frPyObjects({"size": [height, width], "counts": runs}, height, width)
    raise TypeError(f"counts must be str, bytes or a list of ints, got {type(counts).__name__}")


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"
