"""Test helpers for the published Sa2VA HF model code (`SA2VA_OFFICIAL_CODE`), shared by the official tests.

`SA2VA_OFFICIAL_CODE` points at a local copy of the published HF model code (the `*.py` of a
`ByteDance/Sa2VA-*` repo, or `projects/sa2va/hf/models/` of github bytedance/Sa2VA); tests marked
`official` skip with a reason when it is unset. The helpers build a tiny model from that code on the
CPU (random weights; SAM2's Hiera-L image encoder swapped for a 5-block Hiera of the same code,
because the hard-coded Hiera-L takes ~40 s per image on 2 cores).

The published code imports torchvision and timm; where they are not importable (torchvision breaks
transformers in this project's environment) tiny stand-in modules are put in `sys.modules` while the
code is imported, then removed. They only provide the names the imports need; the functions raise if
called (only `predict_forward` / `preparing_for_generation` use them, and neither is used here).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import shutil
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

OFFICIAL_ENV = "SA2VA_OFFICIAL_CODE"
official = pytest.mark.official

# The small SAM2 image encoder that replaces Hiera-L in the tiny model (same code, same neck
# width 256, same 1024 px input and 64 x 64 embedding).
SMALL_HIERA = dict(embed_dim=16, num_heads=1, stages=[1, 1, 2, 1], global_att_blocks=[3],
                   window_pos_embed_bkg_spatial_size=[7, 7], window_spec=[8, 4, 4, 2])


def official_dir() -> Path:
    """The published code directory, or a skip (unset) / failure (no modeling file there)."""
    path = os.environ.get(OFFICIAL_ENV)
    if not path:
        pytest.skip(f"{OFFICIAL_ENV} is unset: point it at a local copy of the published Sa2VA HF model code "
                    "(modeling_sa2va_chat.py, sam2.py, ...) to run the checks against the published code")
    path = Path(path)
    if not (path / "modeling_sa2va_chat.py").is_file():
        pytest.fail(f"{OFFICIAL_ENV}={path} holds no modeling_sa2va_chat.py")
    pytest.importorskip("einops", reason="the published InternViT / InternLM2 code imports einops (pip install einops)")
    return path


def stand_in_modules() -> dict[str, types.ModuleType]:
    """Import-time stand-ins for torchvision / timm (only the names the published imports use)."""

    def unavailable(*args, **kwargs):
        raise RuntimeError("torchvision stand-in of the tests: the published preprocessing is not used here")

    def missing(name):  # not installed, and no stand-in in place already (nested use)
        return name not in sys.modules and importlib.util.find_spec(name) is None

    modules = {}
    if missing("torchvision"):
        root, transforms, functional = (types.ModuleType(n) for n in
                                        ("torchvision", "torchvision.transforms", "torchvision.transforms.functional"))
        for name in ("Compose", "Lambda", "Resize", "ToTensor", "Normalize"):
            setattr(transforms, name, unavailable)
        functional.InterpolationMode = SimpleNamespace(BICUBIC="bicubic", BILINEAR="bilinear", NEAREST="nearest")
        functional.resize = functional.to_pil_image = unavailable
        root.transforms, transforms.functional = transforms, functional
        modules.update({m.__name__: m for m in (root, transforms, functional)})
    if missing("timm"):
        timm, models, layers = (types.ModuleType(n) for n in ("timm", "timm.models", "timm.models.layers"))

        class DropPath(nn.Module):  # only built when drop_path_rate > 0, never in these tests
            def __init__(self, *args, **kwargs):
                raise RuntimeError("timm stand-in of the tests: DropPath is not available")

        layers.DropPath = DropPath
        timm.models, models.layers = models, layers
        modules.update({m.__name__: m for m in (timm, models, layers)})
    return modules


@contextlib.contextmanager
def stand_ins_installed():
    modules = stand_in_modules()
    sys.modules.update(modules)
    try:
        yield
    finally:
        for name in modules:
            sys.modules.pop(name, None)


def official_classes(code_dir: Path):
    """(config class, model class, the code's `sam2` module) imported from a directory of published code."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    with stand_ins_installed():
        config_class = get_class_from_dynamic_module("configuration_sa2va_chat.Sa2VAChatConfig", str(code_dir))
        model_class = get_class_from_dynamic_module("modeling_sa2va_chat.Sa2VAChatModel", str(code_dir))
    sam2_module = sys.modules[model_class.__module__.rsplit(".", 1)[0] + ".sam2"]
    return config_class, model_class, sam2_module


def tiny_published_config(config_class, tokenizer):
    """A tiny Qwen2-based published config: 112 px tiles (4 x 4 token grid), 2-layer ViT and LLM."""
    return config_class(
        vision_config=dict(architectures=["InternVisionModel"], image_size=112, patch_size=14, hidden_size=64,
                           num_attention_heads=4, intermediate_size=128, num_hidden_layers=2, qkv_bias=True,
                           qk_normalization=False, norm_type="layer_norm", use_flash_attn=False),
        llm_config=dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=len(tokenizer),
                        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False),
        template="qwen_chat", force_image_size=112, downsample_ratio=0.5, ps_version="v2", select_layer=-1,
        dynamic_image_size=True, use_thumbnail=True, min_dynamic_patch=1, max_dynamic_patch=4,
        architectures=["Sa2VAChatModel"],
    )


def use_small_image_encoder(patch: pytest.MonkeyPatch, sam2_module) -> None:
    """Make the published `SAM2` build the small Hiera (of its own code) instead of Hiera-L."""

    def small_image_encoder(self):
        trunk = sam2_module.Hiera(**SMALL_HIERA)
        position = sam2_module.PositionEmbeddingSine(num_pos_feats=256, normalize=True, scale=None, temperature=10000)
        neck = sam2_module.FpnNeck(d_model=256, position_encoding=position, backbone_channel_list=[128, 64, 32, 16],
                                   fpn_top_down_levels=[2, 3], fpn_interp_model="nearest")
        return sam2_module.ImageEncoder(scalp=1, trunk=trunk, neck=neck)

    patch.setattr(sam2_module.SAM2, "build_image_encoder", small_image_encoder)


def favour_seg_and_eos(language_model, tokenizer, seg_bias=4.0, eos_bias=4.0):
    """Give the LM head a bias so sampled replies hold [SEG] and end (a real nn.Linear bias)."""
    head = language_model.get_output_embeddings()
    head.bias = nn.Parameter(torch.zeros(head.out_features))
    with torch.no_grad():
        head.bias[tokenizer.convert_tokens_to_ids("[SEG]")] = seg_bias
        head.bias[tokenizer.eos_token_id] = eos_bias


def build_tiny_published(tokenizer, seed: int = 0):
    """(model, sam2 module, code dir): a tiny published Sa2VAChatModel, float32, CPU, random weights, eval mode.

    The LM head gets a bias towards [SEG] and eos (random weights would rarely sample either)."""
    from sa2va_trl.models.remote import ensure_post_init

    code_dir = official_dir()
    config_class, model_class, sam2_module = official_classes(code_dir)
    ensure_post_init(model_class)
    with pytest.MonkeyPatch.context() as patch:
        use_small_image_encoder(patch, sam2_module)
        torch.manual_seed(seed)
        model = model_class(tiny_published_config(config_class, tokenizer)).eval()
    favour_seg_and_eos(model.language_model, tokenizer)
    return model, sam2_module, code_dir


def write_published_checkpoint(model, code_dir: Path, target: Path, tokenizer=None) -> Path:
    """Save `model` as a published checkpoint directory: weights, config with `auto_map`, the code (and tokenizer).

    The LM-head bias `favour_seg_and_eos` adds is saved too, but a freshly built published model has no place
    for it: loading drops it (see `test_official_checkpoint_loads_through_load_published_sa2va`)."""
    model.save_pretrained(target)
    for source in Path(code_dir).glob("*.py"):
        shutil.copy(source, target / source.name)
    config = json.loads((target / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_sa2va_chat.Sa2VAChatConfig",
                          "AutoModel": "modeling_sa2va_chat.Sa2VAChatModel"}
    (target / "config.json").write_text(json.dumps(config))
    if tokenizer is not None:
        tokenizer.save_pretrained(target)
    return target


def use_tiny_published_loaders(patch: pytest.MonkeyPatch) -> None:
    """Route the project's loading of published checkpoints to tiny ones, for a whole entry-point run.

    `load_published_sa2va` (training, merging) gets the stand-ins and the small SAM2 image encoder while the
    checkpoint's code runs, and the training loader gives the LM head its [SEG] / eos bias back (a published model
    has no place for it, so the checkpoint loses it)."""
    from sa2va_trl import grpo
    from sa2va_trl.models import remote

    load_for_training = grpo.load_published_model_and_tokenizer

    def load_tiny_for_training(model_args):
        model, tokenizer = load_for_training(model_args)
        favour_seg_and_eos(model.language_model, tokenizer)
        return model, tokenizer

    patch.setattr(remote, "load_published_sa2va", functools.partial(_with_tiny_code, remote.load_published_sa2va))
    patch.setattr(grpo, "load_published_model_and_tokenizer", load_tiny_for_training)


def _with_tiny_code(load, path, *args, **kwargs):
    """`load(path, ...)` of a tiny checkpoint: its code (a new dynamic module per directory) builds the small SAM2
    image encoder, and the torchvision / timm stand-ins are in place while it is imported."""
    _, _, sam2_module = official_classes(Path(path))
    with stand_ins_installed(), pytest.MonkeyPatch.context() as patch:
        use_small_image_encoder(patch, sam2_module)
        return load(path, *args, **kwargs)


def load_tiny_published_checkpoint(path: Path):
    """`load_published_sa2va(path)` of a tiny checkpoint (see `_with_tiny_code`)."""
    from sa2va_trl.models.remote import load_published_sa2va

    return _with_tiny_code(load_published_sa2va, path)
