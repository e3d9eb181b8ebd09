"""Published Sa2VA `config.json` (model_type "sa2va_chat") -> native `Sa2VAConfig`.

The published config holds the InternViT config (`vision_config`, InternVisionConfig field
names), the LLM config (`llm_config`, whose `architectures[0]` picks the LLM class) and the
Sa2VA fields (`template`, `downsample_ratio`, `force_image_size`, `ps_version`, `select_layer`,
`dynamic_image_size`, `use_thumbnail`, `min/max_dynamic_patch`). It holds no SAM2 config: the
published code builds SAM2 Hiera-L with constants, reproduced by `hiera_large_sam2_config()`.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PreTrainedConfig

from ..models.configuration_sa2va import CHAT_TEMPLATES, Sa2VAConfig
from .keymap import PASS_THROUGH_LLMS, UnsupportedCheckpointError

# InternVisionConfig defaults in the published code (used when a field is absent from the JSON;
# they are the InternViT-6B values, so an absent field must not fall back to transformers').
INTERN_VIT_DEFAULTS: dict[str, Any] = {
    "num_channels": 3,
    "patch_size": 14,
    "image_size": 224,
    "qkv_bias": False,
    "hidden_size": 3200,
    "num_attention_heads": 25,
    "intermediate_size": 12800,
    "qk_normalization": True,
    "num_hidden_layers": 48,
    "hidden_act": "gelu",
    "norm_type": "rms_norm",
    "layer_norm_eps": 1e-6,
    "dropout": 0.0,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "initializer_factor": 0.1,
}

# The tiling the published `preparing_for_generation` / `predict_forward` use, set in code and
# independent of config.json (which may say otherwise).
INFERENCE_TILING = {"dynamic_image_size": True, "use_thumbnail": True, "min_dynamic_patch": 1, "max_dynamic_patch": 12}

# Bookkeeping keys of a saved 4.x config that mean nothing to the native LLM config.
_LLM_KEYS_DROPPED = (
    "_name_or_path",
    "auto_map",
    "use_bfloat16",
    "_attn_implementation",
    "_attn_implementation_autoset",
    "attn_implementation",
    "transformers_version",
)


def hiera_large_sam2_config(image_size: int = 1024) -> dict[str, Any]:
    """The SAM2 (2.0) Hiera-L config of the published model, as a `Sam2Config` dict.

    Facts from the published builder: trunk embed_dim 144, 2 heads doubling per stage,
    stages [2, 6, 36, 4], global attention blocks [23, 33, 43], window_spec [8, 4, 16, 8],
    window position-embedding background 7 x 7; FPN d_model 256 over channels
    [1152, 576, 288, 144], top-down levels [2, 3]; 1024 px input; prompt encoder and mask
    decoder at SAM2's defaults (width 256, mask_in_chans 16, 2 two-way layers, 8 heads).
    """
    stride = image_size // 4  # patch-embedding stride 4
    return {
        "vision_config": {
            "model_type": "sam2_vision_model",
            "backbone_config": {
                "model_type": "sam2_hiera_det_model",
                "image_size": [image_size, image_size],
                "hidden_size": 144,
                "embed_dim_per_stage": [144, 288, 576, 1152],
                "num_attention_heads_per_stage": [2, 4, 8, 16],
                "blocks_per_stage": [2, 6, 36, 4],
                "global_attention_blocks": [23, 33, 43],
                "window_size_per_stage": [8, 4, 16, 8],
                "window_positional_embedding_background_size": [7, 7],
            },
            "backbone_channel_list": [1152, 576, 288, 144],
            "backbone_feature_sizes": [[stride, stride], [stride // 2, stride // 2], [stride // 4, stride // 4]],
            "fpn_hidden_size": 256,
        },
        "prompt_encoder_config": {"hidden_size": 256, "image_size": image_size, "patch_size": 16, "mask_input_channels": 16},
        "mask_decoder_config": {
            "hidden_size": 256,
            "mlp_dim": 2048,
            "num_hidden_layers": 2,
            "num_attention_heads": 8,
            "iou_head_hidden_dim": 256,
        },
    }


def _field(config: dict[str, Any], name: str, where: str = "config.json"):
    if name not in config:
        raise KeyError(f"{where} has no field {name!r}")
    return config[name]


def vision_config_from_published(vision: dict[str, Any], force_image_size: int | None) -> dict[str, Any]:
    """InternVisionConfig fields -> `InternVLVisionConfig` kwargs (qkv_bias -> attention_bias,
    qk_normalization -> use_qk_norm, initializer_factor -> layer_scale_init_value)."""
    architectures = vision.get("architectures") or ["InternVisionModel"]
    if architectures[0] != "InternVisionModel":
        raise UnsupportedCheckpointError(
            f"vision_config.architectures[0] = {architectures[0]!r}: only InternViT (InternVisionModel) checkpoints "
            "can be converted (the Qwen-VL based Sa2VA models have another vision tower)"
        )
    get = {key: vision.get(key, default) for key, default in INTERN_VIT_DEFAULTS.items()}
    image_size = force_image_size or get["image_size"]
    if get["norm_type"] not in ("layer_norm", "rms_norm"):
        raise ValueError(f"vision_config.norm_type {get['norm_type']!r} is neither 'layer_norm' nor 'rms_norm'")
    return {
        "hidden_size": get["hidden_size"],
        "num_hidden_layers": get["num_hidden_layers"],
        "num_attention_heads": get["num_attention_heads"],
        "intermediate_size": get["intermediate_size"],
        "hidden_act": get["hidden_act"],
        "attention_bias": bool(get["qkv_bias"]),
        "use_qk_norm": bool(get["qk_normalization"]),
        "norm_type": get["norm_type"],
        "layer_norm_eps": get["layer_norm_eps"],
        "image_size": [image_size, image_size],
        "patch_size": [get["patch_size"], get["patch_size"]],
        "num_channels": get["num_channels"],
        "attention_dropout": get["attention_dropout"],
        "projection_dropout": get["dropout"],
        "hidden_dropout_prob": get["dropout"],
        "initializer_range": get["initializer_range"],
        "layer_scale_init_value": get["initializer_factor"],
        # InternViT has no final norm and no pooling; use_mean_pooling=True makes the native
        # tower's final norm an identity, which is what the published tower does.
        "use_mean_pooling": True,
        "use_absolute_position_embeddings": True,
    }


def llm_config_from_published(llm: dict[str, Any]) -> PreTrainedConfig:
    """The published `llm_config` dict -> a transformers config of the same architecture."""
    architectures = _field(llm, "architectures", "llm_config")
    if not architectures or architectures[0] not in PASS_THROUGH_LLMS:
        raise UnsupportedCheckpointError(
            f"llm_config.architectures = {architectures!r}: only {list(PASS_THROUGH_LLMS)} checkpoints can be converted"
        )
    fields = {key: value for key, value in llm.items() if key not in _LLM_KEYS_DROPPED}
    # Published InternVL / Sa2VA llm_configs were saved from training with use_cache False;
    # sampling needs the KV cache (transformers' own InternVL conversion forces it on too).
    fields["use_cache"] = True
    model_type = fields.pop("model_type", "qwen2")
    return AutoConfig.for_model(model_type, **fields)


def native_config_from_published(
    published: dict[str, Any],
    sam2_config: dict[str, Any] | None = None,
    img_context_token_id: int | None = None,
    seg_token_id: int | None = None,
    min_region_cells: int = 4,
    tiling: str = "inference",
) -> Sa2VAConfig:
    """Build the native `Sa2VAConfig` for a published checkpoint's `config.json`.

    Args:
        published: the parsed `config.json` (model_type "sa2va_chat").
        sam2_config: a `Sam2Config` dict (default: the published Hiera-L, `hiera_large_sam2_config`).
        img_context_token_id, seg_token_id: token ids from the checkpoint's tokenizer.
        min_region_cells: smallest region in token-grid cells (the published data uses 4).
        tiling: "inference" (default) uses the tiling the published `predict_forward` hard-codes
            whatever config.json says (dynamic tiles, 1..12, plus a thumbnail); "config" takes
            `dynamic_image_size`, `use_thumbnail` and `min/max_dynamic_patch` from config.json.

    Raises:
        KeyError: a required field is missing (named).
        ValueError: a field has a value the native backend cannot reproduce (named), e.g.
            `ps_version` other than "v2" or `select_layer` other than -1.
        UnsupportedCheckpointError: a non-InternViT vision tower or an unsupported LLM.
    """
    ps_version = published.get("ps_version", "v1")
    if ps_version != "v2":
        raise ValueError(f"config.json ps_version = {ps_version!r}: the native pixel shuffle is InternVL's 'v2'")
    select_layer = published.get("select_layer", -1)
    if select_layer != -1:
        raise ValueError(f"config.json select_layer = {select_layer}: the native backend uses the last ViT layer (-1)")
    template = str(_field(published, "template")).replace("-", "_")  # the published code does the same
    if template not in CHAT_TEMPLATES:
        raise ValueError(f"config.json template {template!r} is not one of {sorted(CHAT_TEMPLATES)}")
    if tiling == "inference":
        tiles = dict(INFERENCE_TILING)
    elif tiling == "config":
        tiles = {
            "dynamic_image_size": bool(published.get("dynamic_image_size", False)),
            "use_thumbnail": bool(published.get("use_thumbnail", False)),
            "min_dynamic_patch": int(published.get("min_dynamic_patch", 1)),
            "max_dynamic_patch": int(published.get("max_dynamic_patch", 6)),
        }
    else:
        raise ValueError(f"tiling must be 'inference' or 'config', got {tiling!r}")
    vision = vision_config_from_published(_field(published, "vision_config"), published.get("force_image_size"))
    llm = llm_config_from_published(_field(published, "llm_config"))
    return Sa2VAConfig(
        vision_config=vision,
        llm_config=llm,
        sam2_config=sam2_config if sam2_config is not None else hiera_large_sam2_config(),
        downsample_ratio=float(published.get("downsample_ratio", 0.5)),
        template=template,
        min_region_cells=min_region_cells,
        **tiles,
        img_context_token_id=img_context_token_id,
        seg_token_id=seg_token_id,
    )
