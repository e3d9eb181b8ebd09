"""Name and shape rules from the published Sa2VA state dict to the native `Sa2VAModel`.

One function per submodule family. Each takes that family's entries with the family prefix
removed and returns a `FamilyResult`: native entries (prefix removed), keys dropped on purpose
with the reason, and keys no rule knows (an unknown key is never dropped silently).

Published names (facts gathered from the public Sa2VA code, see ../../shared/notes/sa2va.md):

- `vision_model.*`: InternViT (`embeddings.class_embedding`, `embeddings.patch_embedding`,
  `embeddings.position_embedding`, `encoder.layers.N.attn.qkv` fused q/k/v rows in that order,
  `attn.proj`, optional `attn.q_norm` / `attn.k_norm`, `mlp.fc1/fc2`, `norm1/2`, `ls1/ls2`);
  transformers' `InternVLVisionModel` has separate `q_proj` / `k_proj` / `v_proj`.
- `mlp1.{0,1,3}` and `text_hidden_fcs.{0,2}`: the same `nn.Sequential` on both sides.
- `language_model.*`: the stock transformers causal LM of `llm_config.architectures[0]`;
  for Qwen2 the names are transformers' own, so they pass through.
- `grounding_encoder.sam2_model.*`: facebookresearch/sam2 names (Hiera-L trunk, FPN neck,
  prompt encoder, mask decoder, plus the video-memory modules), mapped onto transformers'
  `Sam2Model`; the memory modules have no counterpart there and are dropped with a reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from ..models.configuration_sa2va import Sa2VAConfig

VISION_PREFIX = "vision_model."
PROJECTOR_PREFIX = "mlp1."
LLM_PREFIX = "language_model."
SEG_HEAD_PREFIX = "text_hidden_fcs."
SAM2_PREFIX = "grounding_encoder.sam2_model."
# Native prefix of the SAM2 part (transformers `Sam2Model` sits directly at grounding_encoder).
NATIVE_SAM2_PREFIX = "grounding_encoder."

# LLM architectures whose published names equal transformers' own (checked for Qwen2).
PASS_THROUGH_LLMS = ("Qwen2ForCausalLM",)

VIDEO_ONLY = "SAM2 video-memory module: dropped, not used for images"
ROPE_BUFFER = "RoPE inverse-frequency buffer: dropped, recomputed from the config"


class UnsupportedCheckpointError(ValueError):
    """The checkpoint is of a kind the converter does not handle (named in the message)."""


@dataclass
class FamilyResult:
    """What one family's rules made of its entries (all keys without the family prefix)."""

    mapped: dict[str, torch.Tensor] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    unmapped: list[str] = field(default_factory=list)

    def add(self, key: str, tensor: torch.Tensor, source: str):
        if key in self.mapped:
            raise ValueError(f"two published keys map to {key!r} (the second is {source!r})")
        self.mapped[key] = tensor


def _rename(name: str, rules: list[tuple[str, str]]) -> str | None:
    """The first rule whose pattern matches all of `name`, applied; None when none does."""
    for pattern, replacement in rules:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, replacement, name)
    return None


# --- InternViT -> transformers InternVLVisionModel ------------------------------------------

_VISION_RULES = [
    (r"embeddings\.class_embedding", r"embeddings.cls_token"),
    (r"embeddings\.position_embedding", r"embeddings.position_embeddings"),
    (r"embeddings\.patch_embedding\.(weight|bias)", r"embeddings.patch_embeddings.projection.\1"),
    (r"encoder\.layers\.(\d+)\.attn\.proj\.(weight|bias)", r"encoder.layer.\1.attention.projection_layer.\2"),
    (r"encoder\.layers\.(\d+)\.attn\.(q_norm|k_norm)\.(weight|bias)", r"encoder.layer.\1.attention.\2.\3"),
    (r"encoder\.layers\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"encoder.layer.\1.mlp.\2.\3"),
    (r"encoder\.layers\.(\d+)\.norm1\.(weight|bias)", r"encoder.layer.\1.layernorm_before.\2"),
    (r"encoder\.layers\.(\d+)\.norm2\.(weight|bias)", r"encoder.layer.\1.layernorm_after.\2"),
    (r"encoder\.layers\.(\d+)\.ls1", r"encoder.layer.\1.lambda_1"),
    (r"encoder\.layers\.(\d+)\.ls2", r"encoder.layer.\1.lambda_2"),
]
_QKV = re.compile(r"encoder\.layers\.(\d+)\.attn\.qkv\.(weight|bias)")


def split_fused_qkv(tensor: torch.Tensor, hidden_size: int, key: str) -> tuple[torch.Tensor, ...]:
    """Split an InternViT fused qkv weight (3C, C) or bias (3C,) into q, k, v.

    InternViT reshapes the qkv output as (B, N, 3, heads, head_dim): the first C rows are the
    query (head-major), the next C the key, the last C the value, which is exactly the layout
    of three separate (C, C) projections followed by a (heads, head_dim) split.
    """
    if tensor.shape[0] != 3 * hidden_size:
        raise ValueError(f"{key}: fused qkv has {tensor.shape[0]} rows, expected 3 x hidden_size = {3 * hidden_size}")
    return tuple(part.clone() for part in tensor.split(hidden_size, dim=0))


def convert_vision(entries: dict[str, torch.Tensor], config: Sa2VAConfig) -> FamilyResult:
    """InternViT (`vision_model.*` without the prefix) -> `InternVLVisionModel` names."""
    result = FamilyResult()
    hidden = config.vision_config.hidden_size
    for name, tensor in entries.items():
        qkv = _QKV.fullmatch(name)
        if qkv:
            layer, kind = qkv.groups()
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), split_fused_qkv(tensor, hidden, VISION_PREFIX + name)):
                result.add(f"encoder.layer.{layer}.attention.{proj}.{kind}", part, name)
            continue
        native = _rename(name, _VISION_RULES)
        if native is None:
            result.unmapped.append(name)
        else:
            result.add(native, tensor, name)
    return result


# --- mlp1 and text_hidden_fcs: the same nn.Sequential on both sides -------------------------


def convert_sequential(entries: dict[str, torch.Tensor], indices: tuple[int, ...]) -> FamilyResult:
    """`mlp1` / `text_hidden_fcs`: names pass through when the layer index is one of `indices`."""
    result = FamilyResult()
    allowed = "|".join(str(i) for i in indices)
    for name, tensor in entries.items():
        if re.fullmatch(rf"({allowed})\.(weight|bias)", name):
            result.add(name, tensor, name)
        else:
            result.unmapped.append(name)
    return result


# --- the language model ----------------------------------------------------------------------


def convert_llm(entries: dict[str, torch.Tensor], architecture: str) -> FamilyResult:
    """The causal LM (`language_model.*` without the prefix).

    Only architectures in `PASS_THROUGH_LLMS` are accepted: their published names are
    transformers' own, so every `model.*` / `lm_head.*` key passes through unchanged.
    """
    if architecture not in PASS_THROUGH_LLMS:
        raise UnsupportedCheckpointError(
            f"llm_config.architectures[0] = {architecture!r}: only {list(PASS_THROUGH_LLMS)} checkpoints can be "
            "converted (InternLM2 / Phi3 need fused-weight rules that are not written yet)"
        )
    result = FamilyResult()
    for name, tensor in entries.items():
        if name.endswith("rotary_emb.inv_freq"):
            result.dropped[name] = ROPE_BUFFER
        elif re.fullmatch(r"(model|lm_head)\..+", name):
            result.add(name, tensor, name)
        else:
            result.unmapped.append(name)
    return result


# --- facebookresearch/sam2 -> transformers Sam2Model ----------------------------------------

# Modules of SAM2's video predictor that transformers' image-only Sam2Model does not have.
_SAM2_VIDEO_ONLY = [
    r"memory_attention\..+",
    r"memory_encoder\..+",
    r"obj_ptr_proj\..+",
    r"obj_ptr_tpos_proj\..+",
    r"mask_downsample\..+",
    r"maskmem_tpos_enc",
    r"no_mem_pos_enc",
    r"no_obj_ptr",
    r"no_obj_embed_spatial",
]

_TRUNK = r"image_encoder\.trunk\."
_BACKBONE = r"vision_encoder.backbone."
_DECODER_ATTENTIONS = r"(self_attn|cross_attn_token_to_image|cross_attn_image_to_token)"
_SAM2_RULES = [
    (r"no_mem_embed", r"no_memory_embedding"),
    # Hiera trunk
    (_TRUNK + r"(pos_embed|pos_embed_window)", _BACKBONE + r"\1"),
    (_TRUNK + r"patch_embed\.proj\.(weight|bias)", _BACKBONE + r"patch_embed.projection.\1"),
    (_TRUNK + r"blocks\.(\d+)\.norm(1|2)\.(weight|bias)", _BACKBONE + r"blocks.\1.layer_norm\2.\3"),
    (_TRUNK + r"blocks\.(\d+)\.attn\.(qkv|proj)\.(weight|bias)", _BACKBONE + r"blocks.\1.attn.\2.\3"),
    (_TRUNK + r"blocks\.(\d+)\.mlp\.layers\.0\.(weight|bias)", _BACKBONE + r"blocks.\1.mlp.proj_in.\2"),
    (_TRUNK + r"blocks\.(\d+)\.mlp\.layers\.1\.(weight|bias)", _BACKBONE + r"blocks.\1.mlp.proj_out.\2"),
    (_TRUNK + r"blocks\.(\d+)\.proj\.(weight|bias)", _BACKBONE + r"blocks.\1.proj.\2"),
    # FPN neck (same level order on both sides: convs.0 takes the coarsest, widest stage)
    (r"image_encoder\.neck\.convs\.(\d+)\.conv\.(weight|bias)", r"vision_encoder.neck.convs.\1.\2"),
    # prompt encoder (point_embeddings.N are stacked separately)
    (r"sam_prompt_encoder\.(not_a_point_embed|no_mask_embed)\.weight", r"prompt_encoder.\1.weight"),
    (r"sam_prompt_encoder\.mask_downscaling\.0\.(weight|bias)", r"prompt_encoder.mask_embed.conv1.\1"),
    (r"sam_prompt_encoder\.mask_downscaling\.1\.(weight|bias)", r"prompt_encoder.mask_embed.layer_norm1.\1"),
    (r"sam_prompt_encoder\.mask_downscaling\.3\.(weight|bias)", r"prompt_encoder.mask_embed.conv2.\1"),
    (r"sam_prompt_encoder\.mask_downscaling\.4\.(weight|bias)", r"prompt_encoder.mask_embed.layer_norm2.\1"),
    (r"sam_prompt_encoder\.mask_downscaling\.6\.(weight|bias)", r"prompt_encoder.mask_embed.conv3.\1"),
    # mask decoder: two-way transformer
    (
        r"sam_mask_decoder\.transformer\.layers\.(\d+)\." + _DECODER_ATTENTIONS + r"\.(q_proj|k_proj|v_proj)\.(weight|bias)",
        r"mask_decoder.transformer.layers.\1.\2.\3.\4",
    ),
    (
        r"sam_mask_decoder\.transformer\.layers\.(\d+)\." + _DECODER_ATTENTIONS + r"\.out_proj\.(weight|bias)",
        r"mask_decoder.transformer.layers.\1.\2.o_proj.\3",
    ),
    (
        r"sam_mask_decoder\.transformer\.layers\.(\d+)\.norm([1-4])\.(weight|bias)",
        r"mask_decoder.transformer.layers.\1.layer_norm\2.\3",
    ),
    (
        r"sam_mask_decoder\.transformer\.layers\.(\d+)\.mlp\.layers\.0\.(weight|bias)",
        r"mask_decoder.transformer.layers.\1.mlp.proj_in.\2",
    ),
    (
        r"sam_mask_decoder\.transformer\.layers\.(\d+)\.mlp\.layers\.1\.(weight|bias)",
        r"mask_decoder.transformer.layers.\1.mlp.proj_out.\2",
    ),
    (
        r"sam_mask_decoder\.transformer\.final_attn_token_to_image\.(q_proj|k_proj|v_proj)\.(weight|bias)",
        r"mask_decoder.transformer.final_attn_token_to_image.\1.\2",
    ),
    (
        r"sam_mask_decoder\.transformer\.final_attn_token_to_image\.out_proj\.(weight|bias)",
        r"mask_decoder.transformer.final_attn_token_to_image.o_proj.\1",
    ),
    (r"sam_mask_decoder\.transformer\.norm_final_attn\.(weight|bias)", r"mask_decoder.transformer.layer_norm_final_attn.\1"),
    # mask decoder: tokens, upscaling, high-resolution feature projections
    (r"sam_mask_decoder\.(iou_token|mask_tokens|obj_score_token)\.weight", r"mask_decoder.\1.weight"),
    (r"sam_mask_decoder\.output_upscaling\.0\.(weight|bias)", r"mask_decoder.upscale_conv1.\1"),
    (r"sam_mask_decoder\.output_upscaling\.1\.(weight|bias)", r"mask_decoder.upscale_layer_norm.\1"),
    (r"sam_mask_decoder\.output_upscaling\.3\.(weight|bias)", r"mask_decoder.upscale_conv2.\1"),
    (r"sam_mask_decoder\.(conv_s0|conv_s1)\.(weight|bias)", r"mask_decoder.\1.\2"),
]
# SAM's MLP heads: `layers.0 .. layers.{n-1}` -> `proj_in`, `layers.0 .. layers.{n-3}`, `proj_out`.
_DECODER_MLP = re.compile(
    r"sam_mask_decoder\.(output_hypernetworks_mlps\.\d+|iou_prediction_head|pred_obj_score_head)\.layers\.(\d+)\.(weight|bias)"
)
_POINT_EMBEDDING = re.compile(r"sam_prompt_encoder\.point_embeddings\.(\d+)\.weight")
_PE_MATRIX = "sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"


def convert_sam2(entries: dict[str, torch.Tensor]) -> FamilyResult:
    """facebookresearch/sam2 (`grounding_encoder.sam2_model.*` without the prefix) -> `Sam2Model`.

    Besides renames: the per-label point embeddings (N of shape (1, D)) are stacked into one
    (N, D) embedding table in label order; the prompt encoder's random-Fourier matrix is also the
    model-level `shared_image_embedding` in transformers (one matrix used for both, as in SAM2);
    the video-memory modules are dropped with `VIDEO_ONLY` as the reason.
    """
    result = FamilyResult()
    points: dict[int, torch.Tensor] = {}
    mlp_depth: dict[str, int] = {}
    for name in entries:
        match = _DECODER_MLP.fullmatch(name)
        if match:
            mlp_depth[match.group(1)] = max(mlp_depth.get(match.group(1), 0), int(match.group(2)) + 1)
    for name, tensor in entries.items():
        if any(re.fullmatch(pattern, name) for pattern in _SAM2_VIDEO_ONLY):
            result.dropped[name] = VIDEO_ONLY
            continue
        if name == _PE_MATRIX:
            result.add("prompt_encoder.shared_embedding.positional_embedding", tensor, name)
            result.add("shared_image_embedding.positional_embedding", tensor.clone(), name)
            continue
        point = _POINT_EMBEDDING.fullmatch(name)
        if point:
            points[int(point.group(1))] = tensor
            continue
        mlp = _DECODER_MLP.fullmatch(name)
        if mlp:
            head, index, kind = mlp.group(1), int(mlp.group(2)), mlp.group(3)
            depth = mlp_depth[head]
            layer = "proj_in" if index == 0 else "proj_out" if index == depth - 1 else f"layers.{index - 1}"
            result.add(f"mask_decoder.{head}.{layer}.{kind}", tensor, name)
            continue
        native = _rename(name, _SAM2_RULES)
        if native is None:
            result.unmapped.append(name)
        else:
            result.add(native, tensor, name)
    if points:
        if sorted(points) != list(range(len(points))):
            raise ValueError(f"sam_prompt_encoder.point_embeddings: indices {sorted(points)} are not 0..{len(points) - 1}")
        table = torch.cat([points[i].reshape(1, -1) for i in range(len(points))], dim=0)
        result.add("prompt_encoder.point_embed.weight", table, "sam_prompt_encoder.point_embeddings.*")
    return result
