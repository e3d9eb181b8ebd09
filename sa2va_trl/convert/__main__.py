"""`python -m sa2va_trl.convert SRC DST`: published Sa2VA checkpoint -> native Sa2VA directory.

Prints the conversion report (counts, dropped keys with their reasons, problems). Exits 0 when
every published key was mapped or deliberately dropped and every native key was filled with the
right shape; exits 1 (writing nothing) otherwise, and 2 on unreadable or unsupported input.

    python -m sa2va_trl.convert /ckpt/Sa2VA-1B /ckpt/Sa2VA-1B-native --dtype bfloat16
    python -m sa2va_trl.convert /ckpt/Sa2VA-1B --check-only
"""

from __future__ import annotations

import argparse
import json
import sys

from .converter import DTYPES, ConversionError, convert_checkpoint
from .keymap import UnsupportedCheckpointError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sa2va_trl.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="published checkpoint directory (config.json, *.safetensors, tokenizer)")
    parser.add_argument("dst", nargs="?", help="output directory for the native model (omit with --check-only)")
    parser.add_argument("--dtype", default="keep", choices=["keep", *sorted(DTYPES)], help="keep the stored dtype or cast")
    parser.add_argument("--tiling", default="inference", choices=["inference", "config"], help="tile settings source")
    parser.add_argument("--sam2-config", help="JSON file with a Sam2Config dict (default: the published Hiera-L)")
    parser.add_argument("--no-tokenizer", action="store_true", help="do not load / copy the tokenizer")
    parser.add_argument("--max-shard-size", default="5GB", help="largest output shard, e.g. 2GB")
    parser.add_argument("--check-only", action="store_true", help="convert in memory and report; write nothing")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.dst is None and not args.check_only:
        print("error: give DST or --check-only", file=sys.stderr)
        return 2
    sam2_config = None
    if args.sam2_config:
        with open(args.sam2_config) as handle:
            sam2_config = json.load(handle)
    try:
        conversion, _ = convert_checkpoint(
            args.src,
            None if args.check_only else args.dst,
            dtype=args.dtype,
            sam2_config=sam2_config,
            tiling=args.tiling,
            tokenizer=not args.no_tokenizer,
            max_shard_size=args.max_shard_size,
        )
    except ConversionError as error:
        print(error.report.summary())
        print("conversion FAILED: nothing written", file=sys.stderr)
        return 1
    except (FileNotFoundError, KeyError, ValueError, UnsupportedCheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(conversion.report.summary())
    print("conversion complete")
    return 0


if __name__ == "__main__":
    sys.exit(main())
