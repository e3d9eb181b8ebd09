"""Random state dicts and config.json files in the *published* Sa2VA layout, for tests.

No published weights can be downloaded here, so the converter is tested on tensors that carry
the published names and shapes. Those are written out below from the facts about the published
code (its module tree: InternViT, the `mlp1` / `text_hidden_fcs` Sequentials, stock Qwen2,
facebookresearch/sam2 with the video-memory modules), with sizes taken from a native config.
Nothing here calls the converter or reads a native model's state dict: a layout derived by
inverting the mapping would only test the mapping against itself.
"""

from __future__ import annotations

from typing import Any

import torch

from ..models.configuration_sa2va import Sa2VAConfig

# Video-memory sizes of the published SAM2 (num_maskmem 7; memory channels 64 at width 256;
# memory-attention FFN 2048 at width 256; 4 memory-attention layers; 2 fuser CXBlocks).
NUM_MASKMEM = 7
MEMORY_ATTENTION_LAYERS = 4
FUSER_LAYERS = 2


class _Writer:
    """Collects (name -> shape) and draws the tensors: norms near 1, everything else N(0, std)."""

    def __init__(self, seed: int, dtype: torch.dtype, device: str | torch.device, std: float):
        self.generator = torch.Generator().manual_seed(seed)
        self.dtype, self.device, self.std = dtype, torch.device(device), std
        self.tensors: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, *shape: int, norm: bool = False):
        if name in self.tensors:
            raise ValueError(f"duplicate published key {name!r}")
        if self.device.type == "meta":
            self.tensors[name] = torch.empty(shape, dtype=self.dtype, device="meta")
            return
        value = torch.randn(shape, generator=self.generator) * self.std
        self.tensors[name] = (value + 1.0 if norm else value).to(self.dtype)

    def linear(self, name: str, out_features: int, in_features: int, bias: bool = True):
        self(f"{name}.weight", out_features, in_features)
        if bias:
            self(f"{name}.bias", out_features)

    def layer_norm(self, name: str, width: int, bias: bool = True):
        self(f"{name}.weight", width, norm=True)
        if bias:
            self(f"{name}.bias", width)

    def conv(self, name: str, out_channels: int, in_channels: int, kernel: int):
        self(f"{name}.weight", out_channels, in_channels, kernel, kernel)
        self(f"{name}.bias", out_channels)


def _internvit(w: _Writer, vision) -> None:
    """InternViT: embeddings + encoder.layers.N.{attn.qkv, attn.proj, mlp.fc1/fc2, norm1/2, ls1/2}."""
    c, p = vision.hidden_size, vision.patch_size[0]
    patches = (vision.image_size[0] // p) ** 2
    w("vision_model.embeddings.class_embedding", 1, 1, c)
    w.conv("vision_model.embeddings.patch_embedding", c, vision.num_channels, p)
    w("vision_model.embeddings.position_embedding", 1, patches + 1, c)
    layer_norm = vision.norm_type == "layer_norm"  # InternRMSNorm has a weight only
    for i in range(vision.num_hidden_layers):
        prefix = f"vision_model.encoder.layers.{i}"
        w.linear(f"{prefix}.attn.qkv", 3 * c, c, bias=vision.attention_bias)
        if vision.use_qk_norm:
            w.layer_norm(f"{prefix}.attn.q_norm", c, bias=False)
            w.layer_norm(f"{prefix}.attn.k_norm", c, bias=False)
        w.linear(f"{prefix}.attn.proj", c, c)
        w.linear(f"{prefix}.mlp.fc1", vision.intermediate_size, c)
        w.linear(f"{prefix}.mlp.fc2", c, vision.intermediate_size)
        w.layer_norm(f"{prefix}.norm1", c, bias=layer_norm)
        w.layer_norm(f"{prefix}.norm2", c, bias=layer_norm)
        w(f"{prefix}.ls1", c)
        w(f"{prefix}.ls2", c)


def _qwen2(w: _Writer, llm) -> None:
    """Stock transformers Qwen2ForCausalLM names (biases on q/k/v only)."""
    h, heads, kv = llm.hidden_size, llm.num_attention_heads, llm.num_key_value_heads
    head_dim = getattr(llm, "head_dim", None) or h // heads
    w("language_model.model.embed_tokens.weight", llm.vocab_size, h)
    for i in range(llm.num_hidden_layers):
        prefix = f"language_model.model.layers.{i}"
        w.linear(f"{prefix}.self_attn.q_proj", heads * head_dim, h)
        w.linear(f"{prefix}.self_attn.k_proj", kv * head_dim, h)
        w.linear(f"{prefix}.self_attn.v_proj", kv * head_dim, h)
        w.linear(f"{prefix}.self_attn.o_proj", h, heads * head_dim, bias=False)
        w.linear(f"{prefix}.mlp.gate_proj", llm.intermediate_size, h, bias=False)
        w.linear(f"{prefix}.mlp.up_proj", llm.intermediate_size, h, bias=False)
        w.linear(f"{prefix}.mlp.down_proj", h, llm.intermediate_size, bias=False)
        w.layer_norm(f"{prefix}.input_layernorm", h, bias=False)
        w.layer_norm(f"{prefix}.post_attention_layernorm", h, bias=False)
    w.layer_norm("language_model.model.norm", h, bias=False)
    if not llm.tie_word_embeddings:
        w("language_model.lm_head.weight", llm.vocab_size, h)


def _mlp(w: _Writer, name: str, sizes: list[int]) -> None:
    """SAM's MLP: `layers.i` = Linear(sizes[i], sizes[i + 1])."""
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        w.linear(f"{name}.layers.{i}", fan_out, fan_in)


def _sam2_image_encoder(w: _Writer, vision, p: str) -> None:
    """Hiera trunk (`blocks.N` with `proj` where the width changes) and the FPN neck."""
    backbone = vision.backbone_config
    dims = backbone.embed_dim_per_stage
    first = backbone.hidden_size
    kernel = backbone.patch_kernel_size[0]
    trunk = f"{p}image_encoder.trunk"
    w(f"{trunk}.pos_embed", 1, first, *backbone.window_positional_embedding_background_size)
    w(f"{trunk}.pos_embed_window", 1, first, backbone.window_size_per_stage[0], backbone.window_size_per_stage[0])
    w.conv(f"{trunk}.patch_embed.proj", first, backbone.num_channels, kernel)
    dim_in, block = first, 0
    for stage, count in enumerate(backbone.blocks_per_stage):
        dim_out = dims[stage]
        for _ in range(count):
            name = f"{trunk}.blocks.{block}"
            w.layer_norm(f"{name}.norm1", dim_in)
            w.linear(f"{name}.attn.qkv", 3 * dim_out, dim_in)
            w.linear(f"{name}.attn.proj", dim_out, dim_out)
            w.layer_norm(f"{name}.norm2", dim_out)
            _mlp(w, f"{name}.mlp", [dim_out, int(dim_out * backbone.mlp_ratio), dim_out])
            if dim_in != dim_out:
                w.linear(f"{name}.proj", dim_out, dim_in)
            dim_in, block = dim_out, block + 1
    for i, channels in enumerate(vision.backbone_channel_list):
        w.conv(f"{p}image_encoder.neck.convs.{i}.conv", vision.fpn_hidden_size, channels, vision.fpn_kernel_size)


def _sam2_prompt_encoder(w: _Writer, prompt, p: str) -> None:
    d, c = prompt.hidden_size, prompt.mask_input_channels
    name = f"{p}sam_prompt_encoder"
    w(f"{name}.pe_layer.positional_encoding_gaussian_matrix", 2, d // 2)
    for i in range(prompt.num_point_embeddings):
        w(f"{name}.point_embeddings.{i}.weight", 1, d)
    w(f"{name}.not_a_point_embed.weight", 1, d)
    w(f"{name}.mask_downscaling.0.weight", c // 4, 1, 2, 2)
    w(f"{name}.mask_downscaling.0.bias", c // 4)
    w.layer_norm(f"{name}.mask_downscaling.1", c // 4)
    w(f"{name}.mask_downscaling.3.weight", c, c // 4, 2, 2)
    w(f"{name}.mask_downscaling.3.bias", c)
    w.layer_norm(f"{name}.mask_downscaling.4", c)
    w.conv(f"{name}.mask_downscaling.6", d, c, 1)
    w(f"{name}.no_mask_embed.weight", 1, d)


def _sam2_mask_decoder(w: _Writer, decoder, p: str) -> None:
    d, inner = decoder.hidden_size, decoder.hidden_size // decoder.attention_downsample_rate
    tokens = decoder.num_multimask_outputs + 1
    name = f"{p}sam_mask_decoder"

    def attention(prefix: str, width: int):
        for proj in ("q_proj", "k_proj", "v_proj"):
            w.linear(f"{prefix}.{proj}", width, d)
        w.linear(f"{prefix}.out_proj", d, width)

    for i in range(decoder.num_hidden_layers):
        layer = f"{name}.transformer.layers.{i}"
        attention(f"{layer}.self_attn", d)
        w.layer_norm(f"{layer}.norm1", d)
        attention(f"{layer}.cross_attn_token_to_image", inner)
        w.layer_norm(f"{layer}.norm2", d)
        _mlp(w, f"{layer}.mlp", [d, decoder.mlp_dim, d])
        w.layer_norm(f"{layer}.norm3", d)
        w.layer_norm(f"{layer}.norm4", d)
        attention(f"{layer}.cross_attn_image_to_token", inner)
    attention(f"{name}.transformer.final_attn_token_to_image", inner)
    w.layer_norm(f"{name}.transformer.norm_final_attn", d)
    w(f"{name}.iou_token.weight", 1, d)
    w(f"{name}.mask_tokens.weight", tokens, d)
    w(f"{name}.obj_score_token.weight", 1, d)
    # ConvTranspose2d weights are (in, out, k, k)
    w(f"{name}.output_upscaling.0.weight", d, d // 4, 2, 2)
    w(f"{name}.output_upscaling.0.bias", d // 4)
    w.layer_norm(f"{name}.output_upscaling.1", d // 4)
    w(f"{name}.output_upscaling.3.weight", d // 4, d // 8, 2, 2)
    w(f"{name}.output_upscaling.3.bias", d // 8)
    w.conv(f"{name}.conv_s0", d // 8, d, 1)
    w.conv(f"{name}.conv_s1", d // 4, d, 1)
    for i in range(tokens):
        _mlp(w, f"{name}.output_hypernetworks_mlps.{i}", [d, d, d, d // 8])
    hidden = decoder.iou_head_hidden_dim
    _mlp(w, f"{name}.iou_prediction_head", [d] + [hidden] * (decoder.iou_head_depth - 1) + [tokens])
    _mlp(w, f"{name}.pred_obj_score_head", [d, d, d, 1])


def _sam2_memory(w: _Writer, d: int, p: str) -> None:
    """The video-memory modules the published checkpoint carries (the native model drops them)."""
    memory = d // 4  # 64 at the published width 256
    ffn = 8 * d  # 2048 at 256
    w(f"{p}maskmem_tpos_enc", NUM_MASKMEM, 1, 1, memory)
    w(f"{p}no_mem_pos_enc", 1, 1, d)
    w(f"{p}no_obj_ptr", 1, d)
    w(f"{p}mask_downsample.weight", 1, 1, 4, 4)
    w(f"{p}mask_downsample.bias", 1)
    for i in range(MEMORY_ATTENTION_LAYERS):
        layer = f"{p}memory_attention.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            w.linear(f"{layer}.self_attn.{proj}", d, d)
        w.linear(f"{layer}.cross_attn_image.q_proj", d, d)
        w.linear(f"{layer}.cross_attn_image.k_proj", d, memory)
        w.linear(f"{layer}.cross_attn_image.v_proj", d, memory)
        w.linear(f"{layer}.cross_attn_image.out_proj", d, d)
        w.linear(f"{layer}.linear1", ffn, d)
        w.linear(f"{layer}.linear2", d, ffn)
        for norm in ("norm1", "norm2", "norm3"):
            w.layer_norm(f"{layer}.{norm}", d)
    w.layer_norm(f"{p}memory_attention.norm", d)
    channels = [1, 4, 16, 64, 256]  # MaskDownSampler: stride 2 per conv, channels x4
    for i, (fan_in, fan_out) in enumerate(zip(channels[:-1], channels[1:])):
        w.conv(f"{p}memory_encoder.mask_downsampler.encoder.{3 * i}", fan_out, fan_in, 3)
        w.layer_norm(f"{p}memory_encoder.mask_downsampler.encoder.{3 * i + 1}", fan_out)
    w.conv(f"{p}memory_encoder.mask_downsampler.encoder.12", d, channels[-1], 1)
    w.conv(f"{p}memory_encoder.pix_feat_proj", d, d, 1)
    for i in range(FUSER_LAYERS):
        layer = f"{p}memory_encoder.fuser.layers.{i}"
        w(f"{layer}.g_weight", d)  # the published code renamed CXBlock's `gamma`
        w(f"{layer}.dwconv.weight", d, 1, 7, 7)
        w(f"{layer}.dwconv.bias", d)
        w.layer_norm(f"{layer}.norm", d)
        w.linear(f"{layer}.pwconv1", 4 * d, d)
        w.linear(f"{layer}.pwconv2", d, 4 * d)
    w.conv(f"{p}memory_encoder.out_proj", memory, d, 1)
    _mlp(w, f"{p}obj_ptr_proj", [d, d, d, d])


def published_layout_state_dict(
    config: Sa2VAConfig,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    device: str | torch.device = "cpu",
    std: float = 0.1,
    memory_modules: bool = True,
) -> dict[str, torch.Tensor]:
    """A random state dict with the published Sa2VA checkpoint's key names and shapes.

    Args:
        config: the native config whose sizes to use (vision, Qwen2 LLM, SAM2).
        dtype: tensor dtype (the published checkpoints store bfloat16).
        seed: seed of the random values.
        device: "meta" gives shapes only (for full-size layouts without the memory).
        std: standard deviation of the values (norm weights are 1 + N(0, std)).
        memory_modules: include SAM2's video-memory modules, as the published checkpoint does.

    Returns:
        {published key: tensor}. `language_model.lm_head.weight` is absent when the LLM ties it
        to the input embeddings.
    """
    if config.llm_config.model_type != "qwen2":
        raise ValueError(f"llm_config.model_type {config.llm_config.model_type!r}: only Qwen2 layouts are written")
    w = _Writer(seed, dtype, device, std)
    llm_hidden = config.llm_config.hidden_size
    vit_hidden = config.vision_config.hidden_size
    shuffled = vit_hidden * int(round(1 / config.downsample_ratio)) ** 2
    _internvit(w, config.vision_config)
    w.layer_norm("mlp1.0", shuffled)
    w.linear("mlp1.1", llm_hidden, shuffled)
    w.linear("mlp1.3", llm_hidden, llm_hidden)
    _qwen2(w, config.llm_config)
    sam2 = config.sam2_config
    prefix = "grounding_encoder.sam2_model."
    w(f"{prefix}no_mem_embed", 1, 1, sam2.prompt_encoder_config.hidden_size)
    _sam2_image_encoder(w, sam2.vision_config, prefix)
    _sam2_prompt_encoder(w, sam2.prompt_encoder_config, prefix)
    _sam2_mask_decoder(w, sam2.mask_decoder_config, prefix)
    if memory_modules:
        _sam2_memory(w, sam2.prompt_encoder_config.hidden_size, prefix)
    w.linear("text_hidden_fcs.0", llm_hidden, llm_hidden)
    w.linear("text_hidden_fcs.2", config.sam_prompt_dim, llm_hidden)
    return w.tensors


def published_config_dict(config: Sa2VAConfig, template: str | None = None) -> dict[str, Any]:
    """A `config.json` dict in the published format (model_type "sa2va_chat") for `config`'s sizes.

    Field names follow the published `Sa2VAChatConfig` / `InternVisionConfig` and a
    transformers 4.x `Qwen2Config` (`rope_theta` at top level, no `rope_parameters`).
    """
    vision, llm = config.vision_config, config.llm_config
    rope = getattr(llm, "rope_parameters", None) or {}
    llm_dict = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": llm.vocab_size,
        "hidden_size": llm.hidden_size,
        "intermediate_size": llm.intermediate_size,
        "num_hidden_layers": llm.num_hidden_layers,
        "num_attention_heads": llm.num_attention_heads,
        "num_key_value_heads": llm.num_key_value_heads,
        "max_position_embeddings": llm.max_position_embeddings,
        "rms_norm_eps": llm.rms_norm_eps,
        "rope_theta": rope.get("rope_theta", 1000000.0),
        "rope_scaling": None,
        "hidden_act": llm.hidden_act,
        "tie_word_embeddings": llm.tie_word_embeddings,
        "bos_token_id": llm.bos_token_id,
        "eos_token_id": llm.eos_token_id,
        "pad_token_id": llm.pad_token_id,
        "torch_dtype": "bfloat16",
        "use_bfloat16": True,
        "_name_or_path": "Qwen/Qwen2.5-0.5B-Instruct",
        "attn_implementation": "flash_attention_2",
    }
    vision_dict = {
        "architectures": ["InternVisionModel"],
        "model_type": "intern_vit_6b",
        "hidden_size": vision.hidden_size,
        "num_hidden_layers": vision.num_hidden_layers,
        "num_attention_heads": vision.num_attention_heads,
        "intermediate_size": vision.intermediate_size,
        "image_size": vision.image_size[0],
        "patch_size": vision.patch_size[0],
        "num_channels": vision.num_channels,
        "qkv_bias": vision.attention_bias,
        "qk_normalization": vision.use_qk_norm,
        "norm_type": vision.norm_type,
        "layer_norm_eps": vision.layer_norm_eps,
        "hidden_act": vision.hidden_act,
        "initializer_factor": vision.layer_scale_init_value,
        "initializer_range": vision.initializer_range,
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "drop_path_rate": 0.0,
        "use_flash_attn": True,
    }
    return {
        "architectures": ["Sa2VAChatModel"],
        "auto_map": {
            "AutoConfig": "configuration_sa2va_chat.Sa2VAChatConfig",
            "AutoModel": "modeling_sa2va_chat.Sa2VAChatModel",
            "AutoModelForCausalLM": "modeling_sa2va_chat.Sa2VAChatModel",
        },
        "model_type": "sa2va_chat",
        "template": template or config.template,
        "downsample_ratio": config.downsample_ratio,
        "force_image_size": vision.image_size[0],
        "dynamic_image_size": True,
        "use_thumbnail": True,
        "ps_version": "v2",
        "select_layer": -1,
        "min_dynamic_patch": 1,
        "max_dynamic_patch": 12,
        "pad2square": False,
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.42.3",
        "vision_config": vision_dict,
        "llm_config": llm_dict,
    }
