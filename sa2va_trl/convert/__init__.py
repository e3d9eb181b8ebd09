"""Convert published Sa2VA checkpoints (ByteDance/Sa2VA-*, remote-code layout) to the native backend.

    python -m sa2va_trl.convert SRC_DIR DST_DIR [--dtype keep|float32|bfloat16|float16]

See README.md in this folder for what is mapped, what is dropped and what is verified.
"""

from .config import hiera_large_sam2_config, native_config_from_published
from .converter import (
    Conversion,
    ConversionError,
    ConversionReport,
    check_against_native,
    convert_checkpoint,
    convert_state_dict,
    load_published_state_dict,
)
from .keymap import UnsupportedCheckpointError, split_fused_qkv
from .published_layout import published_config_dict, published_layout_state_dict

__all__ = [
    "Conversion",
    "ConversionError",
    "ConversionReport",
    "UnsupportedCheckpointError",
    "check_against_native",
    "convert_checkpoint",
    "convert_state_dict",
    "hiera_large_sam2_config",
    "load_published_state_dict",
    "native_config_from_published",
    "published_config_dict",
    "published_layout_state_dict",
    "split_fused_qkv",
]
