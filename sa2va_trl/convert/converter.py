"""Convert a published Sa2VA checkpoint (directory) into a native `Sa2VAModel` directory.

Steps: read config.json -> native `Sa2VAConfig`; read the weights (single or sharded
safetensors, or .bin); rename / split them family by family (`keymap`); check the result
against the native model's own parameter names and shapes (built on the meta device, so a
full-size check costs no memory); cast if asked; write config, safetensors shards (with an
index when sharded), tokenizer and a `conversion_report.json`.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..models.configuration_sa2va import IMG_CONTEXT_TOKEN, SEG_TOKEN, Sa2VAConfig
from ..models.modeling_sa2va import Sa2VAModel
from .config import native_config_from_published
from .keymap import (
    LLM_PREFIX,
    NATIVE_SAM2_PREFIX,
    PROJECTOR_PREFIX,
    SAM2_PREFIX,
    SEG_HEAD_PREFIX,
    VISION_PREFIX,
    FamilyResult,
    convert_llm,
    convert_sam2,
    convert_sequential,
    convert_vision,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
REPORT_FILE = "conversion_report.json"
NO_NATIVE_KEY = " (converted, but the native model has no such key)"


class ConversionError(ValueError):
    """The checkpoint does not convert completely; `report` says which keys are at fault."""

    def __init__(self, message: str, report: "ConversionReport"):
        super().__init__(message)
        self.report = report


def _module_of(key: str) -> str:
    """A dropped key's group for the summary: a SAM2 module, or the key with layer numbers as N."""
    if key.startswith(SAM2_PREFIX):
        return SAM2_PREFIX + key[len(SAM2_PREFIX) :].split(".")[0]
    return re.sub(r"\.\d+\.", ".N.", key)


@dataclass
class ConversionReport:
    """What happened to every published key, and what the native model still lacks.

    `unmapped` (published keys no rule knows), `missing` (native keys nothing filled) and
    `shape_mismatches` must all be empty for a conversion to count as complete; `dropped`
    lists keys left out on purpose, each with its reason.
    """

    num_published: int = 0
    num_converted: int = 0
    dropped: dict[str, str] = field(default_factory=dict)
    unmapped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    shape_mismatches: dict[str, tuple[list[int], list[int]]] = field(default_factory=dict)
    tied: dict[str, str] = field(default_factory=dict)
    dtypes: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.unmapped or self.missing or self.shape_mismatches)

    def problems(self) -> list[str]:
        lines = [f"unmapped published key: {key}" for key in self.unmapped]
        lines += [f"native key not filled: {key}" for key in self.missing]
        lines += [
            f"shape mismatch: {key} converted {got} but the native model has {want}"
            for key, (got, want) in self.shape_mismatches.items()
        ]
        return lines

    def summary(self) -> str:
        """A human-readable report: counts, dropped keys grouped by reason, problems."""
        lines = [
            f"published keys: {self.num_published}; converted native keys: {self.num_converted}; "
            f"dropped: {len(self.dropped)}; unmapped: {len(self.unmapped)}; missing: {len(self.missing)}; "
            f"shape mismatches: {len(self.shape_mismatches)}",
            f"stored dtypes: {dict(self.dtypes)}",
        ]
        by_reason = Counter(self.dropped.values())
        for reason, count in sorted(by_reason.items()):
            modules = sorted({_module_of(key) for key, r in self.dropped.items() if r == reason})
            lines.append(f"dropped {count} keys ({reason}): {', '.join(modules[:10])}{' ...' if len(modules) > 10 else ''}")
        for target, source in self.tied.items():
            lines.append(f"tied: {target} = {source}")
        lines += self.notes
        lines += self.problems()
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"ok": self.ok}


@dataclass
class Conversion:
    """A converted state dict (native names) and its report."""

    state_dict: dict[str, torch.Tensor]
    report: ConversionReport


def _split_families(published: dict[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    prefixes = (VISION_PREFIX, PROJECTOR_PREFIX, LLM_PREFIX, SEG_HEAD_PREFIX, SAM2_PREFIX)
    families: dict[str, dict[str, torch.Tensor]] = {prefix: {} for prefix in prefixes}
    unknown = []
    for key, tensor in published.items():
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        if prefix is None:
            unknown.append(key)
        else:
            families[prefix][key[len(prefix) :]] = tensor
    return families, unknown


def convert_state_dict(published: dict[str, torch.Tensor], config: Sa2VAConfig, architecture: str = "Qwen2ForCausalLM") -> Conversion:
    """Rename / split a published state dict into native names (no checks against a model yet).

    Args:
        published: {published key: tensor}.
        config: the native config (`native_config_from_published`); its vision hidden size
            splits the fused qkv.
        architecture: `llm_config.architectures[0]` of the published config.

    Returns:
        A `Conversion`; its report lists dropped and unmapped keys (missing keys and shapes are
        filled in by `check_against_native`).
    """
    families, unknown = _split_families(published)
    results: list[tuple[str, str, FamilyResult]] = [
        (VISION_PREFIX, VISION_PREFIX, convert_vision(families[VISION_PREFIX], config)),
        (PROJECTOR_PREFIX, PROJECTOR_PREFIX, convert_sequential(families[PROJECTOR_PREFIX], (0, 1, 3))),
        (LLM_PREFIX, LLM_PREFIX, convert_llm(families[LLM_PREFIX], architecture)),
        (SEG_HEAD_PREFIX, SEG_HEAD_PREFIX, convert_sequential(families[SEG_HEAD_PREFIX], (0, 2))),
        (SAM2_PREFIX, NATIVE_SAM2_PREFIX, convert_sam2(families[SAM2_PREFIX])),
    ]
    report = ConversionReport(num_published=len(published), unmapped=sorted(unknown))
    report.dtypes = dict(Counter(str(t.dtype).replace("torch.", "") for t in published.values()))
    state_dict: dict[str, torch.Tensor] = {}
    for source_prefix, native_prefix, result in results:
        state_dict.update({native_prefix + key: tensor for key, tensor in result.mapped.items()})
        report.dropped.update({source_prefix + key: reason for key, reason in result.dropped.items()})
        report.unmapped += [source_prefix + key for key in result.unmapped]
    report.num_converted = len(state_dict)
    return Conversion(state_dict, report)


def native_parameter_shapes(config: Sa2VAConfig) -> tuple[dict[str, torch.Size], dict[str, str]]:
    """The native model's state-dict shapes and its tied keys (target -> source), on the meta device."""
    with torch.device("meta"):
        model = Sa2VAModel(config)
    shapes = {key: value.shape for key, value in model.state_dict().items()}
    tied = {str(k): str(v) for k, v in (getattr(model, "all_tied_weights_keys", None) or {}).items()}
    return shapes, tied


def check_against_native(conversion: Conversion, config: Sa2VAConfig) -> ConversionReport:
    """Fill the report's `missing`, `shape_mismatches` and `unmapped` (converted keys the native
    model has no place for) by comparing with the native model's own names and shapes.

    A tied target (e.g. `language_model.lm_head.weight` when the LLM ties its embeddings) that
    the checkpoint does not carry is filled from its source and listed under `tied`.
    """
    report = conversion.report
    shapes, tied = native_parameter_shapes(config)
    state_dict = conversion.state_dict
    for target, source in tied.items():
        if target not in state_dict and source in state_dict:
            state_dict[target] = state_dict[source]
            report.tied[target] = source
    report.missing = sorted(key for key in shapes if key not in state_dict)
    # Idempotent: a second check replaces, not repeats, the previous check's entries.
    report.unmapped = [key for key in report.unmapped if not key.endswith(NO_NATIVE_KEY)]
    report.unmapped += sorted(f"{key}{NO_NATIVE_KEY}" for key in state_dict if key not in shapes)
    report.shape_mismatches = {
        key: (list(tensor.shape), list(shapes[key]))
        for key, tensor in state_dict.items()
        if key in shapes and tensor.shape != shapes[key]
    }
    report.num_converted = len(state_dict)
    return report


# --- reading and writing checkpoints ---------------------------------------------------------


def read_published_config(src: str | Path) -> dict[str, Any]:
    path = Path(src) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: SRC must be a published Sa2VA checkpoint directory")
    config = json.loads(path.read_text())
    model_type = config.get("model_type")
    if model_type != "sa2va_chat":
        raise ValueError(f"{path}: model_type {model_type!r}, expected 'sa2va_chat' (a published Sa2VA checkpoint)")
    return config


def _weight_files(src: Path) -> list[Path]:
    """The checkpoint's weight files: a sharded index's shards, or the single file."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = src / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not weight_map:
                raise ValueError(f"{index} has no 'weight_map'")
            files = [src / name for name in dict.fromkeys(weight_map.values())]
            absent = [str(f) for f in files if not f.is_file()]
            if absent:
                raise FileNotFoundError(f"{index} names shard(s) that are absent: {absent}")
            return files
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (src / name).is_file():
            return [src / name]
    raise FileNotFoundError(f"{src}: no model.safetensors(.index.json) or pytorch_model.bin(.index.json)")


def load_published_state_dict(src: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory (sharded or not), in their stored dtype, on the CPU."""
    state_dict: dict[str, torch.Tensor] = {}
    for path in _weight_files(Path(src)):
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                part = {key: handle.get_tensor(key) for key in handle.keys()}
        else:
            part = torch.load(path, map_location="cpu", weights_only=True)
        duplicated = sorted(set(part) & set(state_dict))
        if duplicated:
            raise ValueError(f"{path.name}: keys also stored in another shard: {duplicated[:5]}")
        state_dict.update(part)
    return state_dict


def _cast(state_dict: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    if dtype is None:
        return state_dict
    return {key: t.to(dtype) if t.is_floating_point() else t for key, t in state_dict.items()}


def save_native_weights(state_dict: dict[str, torch.Tensor], dst: Path, max_shard_size: str | int = "5GB") -> list[str]:
    """Write safetensors shards (+ `model.safetensors.index.json` when more than one)."""
    from huggingface_hub import split_torch_state_dict_into_shards

    # safetensors refuses tensors that share storage: tied copies are written once per key.
    seen: set[int] = set()
    unique = {}
    for key, tensor in state_dict.items():
        pointer = tensor.data_ptr()
        unique[key] = tensor.clone() if pointer in seen else tensor.contiguous()
        seen.add(pointer)
    split = split_torch_state_dict_into_shards(unique, max_shard_size=max_shard_size)
    for filename, keys in split.filename_to_tensors.items():
        save_file({key: unique[key] for key in keys}, str(dst / filename), metadata={"format": "pt"})
    if split.is_sharded:
        total = sum(t.numel() * t.element_size() for t in unique.values())
        index = {"metadata": {"total_size": total}, "weight_map": split.tensor_to_filename}
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    return sorted(split.filename_to_tensors)


def _token_ids(tokenizer) -> tuple[int, int]:
    vocab = tokenizer.get_vocab()
    absent = [token for token in (IMG_CONTEXT_TOKEN, SEG_TOKEN) if token not in vocab]
    if absent:
        raise ValueError(f"the checkpoint's tokenizer lacks the Sa2VA token(s) {absent}")
    return vocab[IMG_CONTEXT_TOKEN], vocab[SEG_TOKEN]


def convert_checkpoint(
    src: str | Path,
    dst: str | Path | None,
    dtype: str = "keep",
    sam2_config: dict[str, Any] | None = None,
    tiling: str = "inference",
    tokenizer: bool = True,
    max_shard_size: str | int = "5GB",
) -> tuple[Conversion, Sa2VAConfig]:
    """Convert the published checkpoint in `src`; write the native one to `dst` when complete.

    Args:
        src: published checkpoint directory (config.json, weights, tokenizer files).
        dst: output directory (None: check only, write nothing).
        dtype: "keep" (stored dtypes, bf16 for the published models) or a name in `DTYPES`.
        sam2_config: `Sam2Config` dict (default: the published Hiera-L).
        tiling: "inference" or "config", see `native_config_from_published`.
        tokenizer: load the tokenizer in `src` (token ids; copied to `dst`).
        max_shard_size: largest output shard.

    Returns:
        (conversion, native config).

    Raises:
        ConversionError: unmapped, missing or mis-shaped keys (nothing is written).
    """
    src = Path(src)
    published_config = read_published_config(src)
    if dtype != "keep" and dtype not in DTYPES:
        raise ValueError(f"dtype must be 'keep' or one of {sorted(DTYPES)}, got {dtype!r}")
    loaded_tokenizer, token_ids = None, (None, None)
    if tokenizer:
        from transformers import AutoTokenizer

        try:
            # trust_remote_code=False: config.json's auto_map names the published remote code,
            # and without it transformers would stop and ask on stdin whether to run it.
            loaded_tokenizer = AutoTokenizer.from_pretrained(str(src), trust_remote_code=False)
        except Exception as error:  # noqa: BLE001 - any failure means the same fix
            raise ValueError(
                f"cannot load the tokenizer in {src} ({error}); pass tokenizer=False / --no-tokenizer to skip it"
            ) from error
        token_ids = _token_ids(loaded_tokenizer)
    config = native_config_from_published(
        published_config, sam2_config=sam2_config, img_context_token_id=token_ids[0], seg_token_id=token_ids[1], tiling=tiling
    )
    published = load_published_state_dict(src)
    architecture = published_config["llm_config"]["architectures"][0]
    conversion = convert_state_dict(published, config, architecture)
    report = check_against_native(conversion, config)
    if not tokenizer:
        report.notes.append("no tokenizer: img_context_token_id and seg_token_id are unset; set them before use")
    if not report.ok:
        raise ConversionError("conversion incomplete:\n" + "\n".join(report.problems()), report)
    if dtype != "keep":
        conversion.state_dict = _cast(conversion.state_dict, DTYPES[dtype])
        config.dtype = dtype
    else:
        stored = Counter(t.dtype for t in conversion.state_dict.values() if t.is_floating_point()).most_common(1)
        config.dtype = str(stored[0][0]).replace("torch.", "") if stored else "float32"
    if dst is not None:
        dst = Path(dst)
        dst.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(dst)
        weights = {key: t for key, t in conversion.state_dict.items() if key not in report.tied}
        files = save_native_weights(weights, dst, max_shard_size)
        report.notes.append(f"wrote {len(files)} weight file(s) to {dst}")
        if loaded_tokenizer is not None:
            loaded_tokenizer.save_pretrained(dst)
        (dst / REPORT_FILE).write_text(json.dumps(report.to_json(), indent=2, sort_keys=True))
    return conversion, config
