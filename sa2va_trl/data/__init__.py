"""Data: the row schema, loaders for real region datasets, and the synthetic shapes world.

    from sa2va_trl.data import load_rows, decode_region_mask
    rows = load_rows("data/shapes", split="train")          # any supported format
    mask = decode_region_mask(rows[0])                        # H x W bool

The shapes world (``sa2va_trl.data.synthetic``) is imported lazily so that
``python -m sa2va_trl.data.synthetic`` runs without a double import.
"""

from .loaders import FORMATS, LoadStats, check_no_reserved_columns, detect_format, load_rows, load_rows_with_stats
from .schema import (
    CAPTION, CATEGORY, IMG, REGION_INDEX, REGION_MASK, REQUIRED_COLUMNS, SOURCE_ID, DataError, decode_region_mask,
    encode_mask, normalize_rle, polygons_to_rle, row_features, validate_row,
)

_SYNTHETIC_NAMES = ("ShapeAttributes", "Scene", "generate_scene", "iter_scenes", "grid_cells", "shapes_dataset",
                    "write_shapes_world",
                    "build_shapes_world", "parse_caption", "canonicalize_caption", "caption_corpus",
                    "caption_vocabulary", "caption_variants")

__all__ = [
    "FORMATS", "LoadStats", "check_no_reserved_columns", "detect_format", "load_rows", "load_rows_with_stats",
    "CAPTION", "CATEGORY", "IMG", "REGION_INDEX", "REGION_MASK", "REQUIRED_COLUMNS", "SOURCE_ID", "DataError",
    "decode_region_mask", "encode_mask", "normalize_rle", "polygons_to_rle", "row_features", "validate_row",
    *_SYNTHETIC_NAMES,
]


def __getattr__(name: str):
    if name in _SYNTHETIC_NAMES:
        from . import synthetic

        return getattr(synthetic, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
