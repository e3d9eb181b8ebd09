"""Tiny Sa2VA configs and a model factory for tests, benchmarks and the CPU demo.

A few million parameters built from the same real transformers modules as the full model:
128 px tiles, patch 8 -> 16 x 16 patches -> pixel shuffle -> 8 x 8 = 64 tokens per image,
a 2-layer InternViT (hidden 64), a 2-layer Qwen2 (hidden 128) over the offline tokenizer's
vocabulary, and SAM2 with a 4-stage HieraDet (dims 16/32/64/128, blocks 1/1/2/1) at 128 px, FPN / mask decoder
width 32, so `text_hidden_fcs` maps 128 -> 32.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from .configuration_sa2va import IMG_CONTEXT_TOKEN, SEG_TOKEN, Sa2VAConfig
from .modeling_sa2va import Sa2VAModel
from .tokenizer import CHAT_END_TOKEN, PAD_TOKEN, build_tiny_tokenizer


def tiny_sa2va_config(
    tokenizer: PreTrainedTokenizerBase | None = None,
    image_size: int = 128,
    sam2_image_size: int = 128,
    min_region_cells: int = 1,
    dynamic_image_size: bool = False,
    max_dynamic_patch: int = 4,
) -> Sa2VAConfig:
    """The tiny Sa2VA config, its token ids taken from `tokenizer` (default: the offline one).

    Args:
        tokenizer: the tokenizer whose special-token ids and vocabulary size to use.
        image_size: vision tile size (multiple of 16: patch 8, then pixel shuffle 0.5).
        sam2_image_size: SAM2 input size (multiple of 32: HieraDet strides 4 x 2 x 2 x 2).
        min_region_cells: smallest region in token-grid cells (the published data uses 4).
        dynamic_image_size: InternVL dynamic tiling (off: one tile per image, the fast default).
        max_dynamic_patch: most grid tiles with dynamic tiling (plus the thumbnail).

    Returns:
        A `Sa2VAConfig`.
    """
    tokenizer = tokenizer if tokenizer is not None else build_tiny_tokenizer()
    if image_size % 16 or sam2_image_size % 32:
        raise ValueError(f"image_size must be a multiple of 16 and sam2_image_size of 32, got {image_size}, {sam2_image_size}")
    eos = tokenizer.convert_tokens_to_ids(CHAT_END_TOKEN)
    pad = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    vision_config = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        image_size=image_size,
        patch_size=8,
    )
    llm_config = dict(
        model_type="qwen2",
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    stage = sam2_image_size // 4  # HieraDet patch stride 4
    sam2_config = dict(
        vision_config=dict(
            model_type="sam2_vision_model",
            backbone_config=dict(
                model_type="sam2_hiera_det_model",
                image_size=[sam2_image_size, sam2_image_size],
                hidden_size=16,
                embed_dim_per_stage=[16, 32, 64, 128],
                blocks_per_stage=[1, 1, 2, 1],
                num_attention_heads_per_stage=[1, 1, 2, 2],
                window_size_per_stage=[8, 4, 4, 2],
                global_attention_blocks=[3],
                window_positional_embedding_background_size=[4, 4],
            ),
            backbone_channel_list=[128, 64, 32, 16],
            backbone_feature_sizes=[[stage, stage], [stage // 2, stage // 2], [stage // 4, stage // 4]],
            fpn_hidden_size=32,
        ),
        prompt_encoder_config=dict(hidden_size=32, image_size=sam2_image_size, patch_size=16, mask_input_channels=4),
        mask_decoder_config=dict(
            hidden_size=32,
            mlp_dim=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            iou_head_hidden_dim=32,
            dynamic_multimask_via_stability=False,
        ),
    )
    return Sa2VAConfig(
        vision_config=vision_config,
        llm_config=llm_config,
        sam2_config=sam2_config,
        template="qwen_chat",
        min_region_cells=min_region_cells,
        dynamic_image_size=dynamic_image_size,
        max_dynamic_patch=max_dynamic_patch,
        img_context_token_id=tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN),
        seg_token_id=tokenizer.convert_tokens_to_ids(SEG_TOKEN),
    )


def build_tiny_model(seed: int = 0, **config_kwargs) -> tuple[Sa2VAModel, PreTrainedTokenizerBase]:
    """A randomly initialised tiny Sa2VA model and its offline tokenizer, in float32, eval mode.

    Args:
        seed: torch seed for the weights (same seed -> same weights).
        **config_kwargs: passed to `tiny_sa2va_config`.

    Returns:
        (model, tokenizer).
    """
    tokenizer = build_tiny_tokenizer()
    config = tiny_sa2va_config(tokenizer, **config_kwargs)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = Sa2VAModel(config)
    finally:
        torch.random.set_rng_state(generator_state)
    return model.eval(), tokenizer
