"""With the published code (SA2VA_OFFICIAL_CODE): our published-layout writer names and shapes
every tensor exactly as the published modules do, and the converted InternViT computes the same.

SA2VA_OFFICIAL_CODE points at a local copy of the published HF model code (the `*.py` of a
`ByteDance/Sa2VA-*` repository, or `projects/sa2va/hf/models/` of github bytedance/Sa2VA).
The published InternViT module imports timm and einops; where they are absent, stand-ins that
only provide the imported names sit in `sys.modules` while it is imported (neither is called
with the settings used here).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest
import torch

from sa2va_trl.convert import check_against_native, convert_state_dict, published_config_dict, published_layout_state_dict
from sa2va_trl.convert.config import hiera_large_sam2_config, vision_config_from_published
from sa2va_trl.convert.keymap import convert_vision
from sa2va_trl.models import Sa2VAConfig, tiny_sa2va_config

OFFICIAL_ENV = "SA2VA_OFFICIAL_CODE"
CODE = os.environ.get(OFFICIAL_ENV)
pytestmark = [
    pytest.mark.official,
    pytest.mark.skipif(not CODE, reason=f"{OFFICIAL_ENV} is not set (see the module docstring)"),
]
PACKAGE = "_sa2va_official_for_convert_tests"


@contextlib.contextmanager
def _stand_ins():
    """Temporary timm / einops modules when the real ones are not importable."""
    added = {}
    if importlib.util.find_spec("timm") is None:
        layers = types.ModuleType("timm.models.layers")
        layers.DropPath = torch.nn.Identity  # only built when drop_path_rate > 0
        added.update({"timm": types.ModuleType("timm"), "timm.models": types.ModuleType("timm.models"), "timm.models.layers": layers})
    if importlib.util.find_spec("einops") is None:
        einops = types.ModuleType("einops")
        einops.rearrange = None  # used by the flash-attention path only
        added["einops"] = einops
    sys.modules.update(added)
    try:
        yield
    finally:
        for name in added:
            sys.modules.pop(name, None)


def _official(module: str):
    """Import `module` from the published code directory as part of a private package."""
    if PACKAGE not in sys.modules:
        package = types.ModuleType(PACKAGE)
        package.__path__ = [str(Path(CODE))]
        sys.modules[PACKAGE] = package
    with _stand_ins():
        return importlib.import_module(f"{PACKAGE}.{module}")


@pytest.fixture(scope="module")
def published_sam2_shapes():
    sam2 = _official("sam2")
    model = sam2.SAM2()  # the hard-coded SAM2 Hiera-L with its video-memory modules
    return {"grounding_encoder." + key: tuple(value.shape) for key, value in model.state_dict().items()}


def test_sam2_layout_equals_the_published_module_tree(published_sam2_shapes):
    config = tiny_sa2va_config()
    full = Sa2VAConfig(**{**config.to_dict(), "sam2_config": hiera_large_sam2_config()})
    ours = {
        key: tuple(value.shape)
        for key, value in published_layout_state_dict(full, device="meta").items()
        if key.startswith("grounding_encoder.")
    }
    assert sorted(set(ours) ^ set(published_sam2_shapes)) == []
    assert {key: shape for key, shape in ours.items() if published_sam2_shapes[key] != shape} == {}


def test_published_sam2_checkpoint_converts_completely(published_sam2_shapes):
    config = tiny_sa2va_config()
    full = Sa2VAConfig(**{**config.to_dict(), "sam2_config": hiera_large_sam2_config()})
    layout = published_layout_state_dict(full, device="meta")
    published = {key: layout[key] for key in layout if not key.startswith("grounding_encoder.")}
    published.update({key: torch.empty(shape, device="meta") for key, shape in published_sam2_shapes.items()})
    report = check_against_native(convert_state_dict(published, full), full)
    assert report.ok, report.problems()


@pytest.mark.parametrize("qk_norm, norm_type, bias", [(False, "layer_norm", True), (True, "rms_norm", False)])
def test_converted_internvit_equals_the_published_one(qk_norm, norm_type, bias):
    from transformers import InternVLVisionConfig, InternVLVisionModel

    configuration = _official("configuration_intern_vit")
    modeling = _official("modeling_intern_vit")
    fields = dict(published_config_dict(tiny_sa2va_config())["vision_config"])
    fields.update(qk_normalization=qk_norm, norm_type=norm_type, qkv_bias=bias, use_flash_attn=False)
    reference = modeling.InternVisionModel(configuration.InternVisionConfig(**fields)).eval()
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    official_layout = {key: tuple(value.shape) for key, value in reference.state_dict().items()}
    native_config = InternVLVisionConfig(**vision_config_from_published(fields, None))
    expected_layout = published_layout_state_dict(
        Sa2VAConfig(**{**tiny_sa2va_config().to_dict(), "vision_config": native_config.to_dict()}), device="meta"
    )
    prefix = "vision_model."
    assert official_layout == {k[len(prefix) :]: tuple(v.shape) for k, v in expected_layout.items() if k.startswith(prefix)}
    holder = types.SimpleNamespace(vision_config=native_config)
    result = convert_vision(reference.state_dict(), holder)
    assert result.unmapped == []
    native = InternVLVisionModel(native_config).eval()
    native.load_state_dict(result.mapped, strict=True)
    pixels = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        expected = reference(pixel_values=pixels).last_hidden_state
        got = native(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
