"""Published Sa2VA key names -> native Sa2VAModel: completeness, exact splits, reported leftovers."""

import math

import pytest
import torch
import torch.nn.functional as F

from sa2va_trl.convert import (
    UnsupportedCheckpointError,
    check_against_native,
    convert_state_dict,
    hiera_large_sam2_config,
    published_layout_state_dict,
    split_fused_qkv,
)
from sa2va_trl.convert.keymap import ROPE_BUFFER, VIDEO_ONLY, convert_sam2
from sa2va_trl.models import Sa2VAConfig, Sa2VAModel, tiny_sa2va_config

SAM = "grounding_encoder.sam2_model."


@pytest.fixture(scope="module")
def config():
    config = tiny_sa2va_config()
    config.vision_config.attention_bias = True  # InternViT-300M (Sa2VA-1B/4B/8B) has a qkv bias
    return config


@pytest.fixture(scope="module")
def published(config):
    return published_layout_state_dict(config, seed=3)


@pytest.fixture(scope="module")
def converted_model(config, published):
    conversion = convert_state_dict(published, config)
    report = check_against_native(conversion, config)
    assert report.ok, report.summary()
    model = Sa2VAModel(config).eval()
    model.load_state_dict(conversion.state_dict, strict=True)
    return model


def test_tiny_published_layout_converts_with_nothing_unmapped_or_missing(config, published):
    conversion = convert_state_dict(published, config)
    report = check_against_native(conversion, config)
    assert report.unmapped == [] and report.missing == [] and report.shape_mismatches == {}
    # Every published key is either converted or dropped with a reason; only SAM2 memory is dropped.
    modules = {key[len(SAM) :].split(".")[0] for key in report.dropped}
    assert modules == {
        "maskmem_tpos_enc", "no_mem_pos_enc", "no_obj_ptr", "mask_downsample",
        "memory_attention", "memory_encoder", "obj_ptr_proj",
    }  # fmt: skip
    assert set(report.dropped.values()) == {VIDEO_ONLY}
    # strict=True: no missing and no unexpected keys.
    result = Sa2VAModel(config).load_state_dict(conversion.state_dict, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_published_layout_carries_the_published_names(config, published):
    c = config.vision_config.hidden_size
    assert published["vision_model.encoder.layers.0.attn.qkv.weight"].shape == (3 * c, c)
    assert published["vision_model.embeddings.class_embedding"].shape == (1, 1, c)
    for key in ("mlp1.0.weight", "mlp1.1.weight", "mlp1.3.weight", "text_hidden_fcs.0.weight", "text_hidden_fcs.2.weight"):
        assert key in published
    assert "language_model.lm_head.weight" in published and "language_model.model.norm.weight" in published
    assert SAM + "image_encoder.trunk.blocks.0.attn.qkv.weight" in published
    assert SAM + "memory_encoder.fuser.layers.1.g_weight" in published
    assert not any(key.startswith(("vision_model.encoder.layer.", "grounding_encoder.vision_encoder")) for key in published)


def _internvit_by_hand(published: dict, vision, pixels: torch.Tensor) -> torch.Tensor:
    """InternViT written out from the *published* tensors, with the fused qkv used as stored."""
    p, c, heads = vision.patch_size[0], vision.hidden_size, vision.num_attention_heads
    prefix = "vision_model."
    weight, bias = published[prefix + "embeddings.patch_embedding.weight"], published[prefix + "embeddings.patch_embedding.bias"]
    patches = F.conv2d(pixels, weight, bias, stride=p)
    x = patches.flatten(2).transpose(1, 2)
    cls = published[prefix + "embeddings.class_embedding"].expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1) + published[prefix + "embeddings.position_embedding"]
    batch, tokens, _ = x.shape
    for i in range(vision.num_hidden_layers):
        layer = {k.split(f"layers.{i}.", 1)[1]: v for k, v in published.items() if f"encoder.layers.{i}." in k}
        h = F.layer_norm(x, (c,), layer["norm1.weight"], layer["norm1.bias"], eps=vision.layer_norm_eps)
        qkv = F.linear(h, layer["attn.qkv.weight"], layer.get("attn.qkv.bias"))
        q, k, v = qkv.reshape(batch, tokens, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(c // heads), dim=-1)
        attended = (weights @ v).transpose(1, 2).reshape(batch, tokens, c)
        x = x + layer["ls1"] * F.linear(attended, layer["attn.proj.weight"], layer["attn.proj.bias"])
        h = F.layer_norm(x, (c,), layer["norm2.weight"], layer["norm2.bias"], eps=vision.layer_norm_eps)
        hidden = F.gelu(F.linear(h, layer["mlp.fc1.weight"], layer["mlp.fc1.bias"]))
        mlp = F.linear(hidden, layer["mlp.fc2.weight"], layer["mlp.fc2.bias"])
        x = x + layer["ls2"] * mlp
    return x


def test_vision_tower_equals_hand_computed_internvit_from_fused_qkv(config, published, converted_model):
    pixels = torch.randn(2, 3, config.image_size, config.image_size, generator=torch.Generator().manual_seed(0))
    expected = _internvit_by_hand(published, config.vision_config, pixels)
    with torch.no_grad():
        native = converted_model.vision_model(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(native, expected, atol=2e-5, rtol=1e-4)
    # The check can fail: the same weights with key and value rows swapped give another output.
    attention = converted_model.vision_model.encoder.layer[0].attention
    k, v = attention.k_proj.weight.detach().clone(), attention.v_proj.weight.detach().clone()
    try:
        with torch.no_grad():
            attention.k_proj.weight.copy_(v)
            attention.v_proj.weight.copy_(k)
            swapped = converted_model.vision_model(pixel_values=pixels).last_hidden_state
        assert (swapped - expected).abs().max() > 1e-2
    finally:
        with torch.no_grad():
            attention.k_proj.weight.copy_(k)
            attention.v_proj.weight.copy_(v)


def test_split_fused_qkv_rows_and_shape_error():
    fused = torch.arange(12.0).reshape(6, 2)
    q, k, v = split_fused_qkv(fused, 2, "x.qkv.weight")
    assert q.tolist() == [[0, 1], [2, 3]] and k.tolist() == [[4, 5], [6, 7]] and v.tolist() == [[8, 9], [10, 11]]
    with pytest.raises(ValueError, match="x.qkv.weight"):
        split_fused_qkv(fused, 3, "x.qkv.weight")


def test_projector_llm_and_seg_head_pass_through_unchanged(published, converted_model):
    state = converted_model.state_dict()
    for key in ("mlp1.0.weight", "mlp1.3.bias", "text_hidden_fcs.2.weight", "language_model.model.layers.1.self_attn.k_proj.bias"):
        torch.testing.assert_close(state[key], published[key], rtol=0, atol=0)


def test_sam2_point_embeddings_stack_in_label_order_and_fourier_matrix_is_shared(published):
    sam = {key[len(SAM) :]: value for key, value in published.items() if key.startswith(SAM)}
    result = convert_sam2(sam)
    table = result.mapped["prompt_encoder.point_embed.weight"]
    for label in range(4):
        torch.testing.assert_close(table[label], sam[f"sam_prompt_encoder.point_embeddings.{label}.weight"][0], rtol=0, atol=0)
    gaussian = sam["sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"]
    torch.testing.assert_close(result.mapped["shared_image_embedding.positional_embedding"], gaussian, rtol=0, atol=0)
    torch.testing.assert_close(result.mapped["prompt_encoder.shared_embedding.positional_embedding"], gaussian, rtol=0, atol=0)


def test_sam2_three_layer_heads_are_renumbered(published):
    sam = {key[len(SAM) :]: value for key, value in published.items() if key.startswith(SAM)}
    mapped = convert_sam2(sam).mapped
    head = "sam_mask_decoder.iou_prediction_head.layers."
    assert mapped["mask_decoder.iou_prediction_head.proj_in.weight"] is sam[head + "0.weight"]
    assert mapped["mask_decoder.iou_prediction_head.layers.0.weight"] is sam[head + "1.weight"]
    assert mapped["mask_decoder.iou_prediction_head.proj_out.weight"] is sam[head + "2.weight"]
    assert mapped["mask_decoder.transformer.layers.1.cross_attn_image_to_token.o_proj.bias"] is sam[
        "sam_mask_decoder.transformer.layers.1.cross_attn_image_to_token.out_proj.bias"
    ]
    # FPN level order is kept: convs.0 reads the widest (last) Hiera stage.
    assert mapped["vision_encoder.neck.convs.0.weight"] is sam["image_encoder.neck.convs.0.conv.weight"]


def test_converted_sam2_produces_masks(config, converted_model):
    sam_pixels = torch.randn(2, 3, config.sam2_image_size, config.sam2_image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        features = converted_model.get_sam2_features(sam_pixels)
        prompts = torch.randn(3, config.sam_prompt_dim, generator=torch.Generator().manual_seed(2))
        logits, iou, objects = converted_model.decode_sam2_masks(features, torch.tensor([0, 1, 1]), prompts)
    assert logits.shape == (3, config.sam2_image_size // 4, config.sam2_image_size // 4)
    assert torch.isfinite(logits).all() and iou.shape == (3,) and objects.shape == (3,)
    assert not torch.allclose(logits[1], logits[2])  # the prompt embedding matters


def test_unknown_keys_are_reported_never_dropped(config, published):
    extra = dict(published)
    extra["grounding_encoder.sam2_model.some_new_head.weight"] = torch.zeros(1)
    extra["vision_model.encoder.layers.0.attn.rel_pos"] = torch.zeros(1)
    extra["reward_head.weight"] = torch.zeros(1)
    conversion = convert_state_dict(extra, config)
    report = check_against_native(conversion, config)
    assert not report.ok
    first = list(report.unmapped)
    assert check_against_native(conversion, config).unmapped == first  # checking twice adds nothing
    expected = {"grounding_encoder.sam2_model.some_new_head.weight", "vision_model.encoder.layers.0.attn.rel_pos", "reward_head.weight"}
    assert expected <= set(report.unmapped)
    assert "reward_head.weight" in report.summary()


def test_missing_and_misshaped_keys_are_reported_by_native_name(config, published):
    broken = dict(published)
    del broken["vision_model.encoder.layers.1.attn.qkv.bias"]
    broken["text_hidden_fcs.2.weight"] = torch.zeros(5, 5)
    report = check_against_native(convert_state_dict(broken, config), config)
    assert {f"vision_model.encoder.layer.1.attention.{p}_proj.bias" for p in "qkv"} <= set(report.missing)
    assert report.shape_mismatches["text_hidden_fcs.2.weight"][0] == [5, 5]
    assert "text_hidden_fcs.2.weight" in "\n".join(report.problems())


def test_rope_buffers_are_dropped_with_a_reason(config, published):
    with_buffer = dict(published, **{"language_model.model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(16)})
    report = check_against_native(convert_state_dict(with_buffer, config), config)
    assert report.ok and report.dropped["language_model.model.layers.0.self_attn.rotary_emb.inv_freq"] == ROPE_BUFFER


def test_unsupported_llm_is_refused_by_name(config, published):
    with pytest.raises(UnsupportedCheckpointError, match="InternLM2ForCausalLM"):
        convert_state_dict(published, config, architecture="InternLM2ForCausalLM")


def _published_like_1b_config() -> Sa2VAConfig:
    """Sizes of Sa2VA-1B (InternViT-300M, Qwen2.5-0.5B, SAM2 Hiera-L), for a meta-device check."""
    return Sa2VAConfig(
        vision_config=dict(
            hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
            image_size=448, patch_size=14, attention_bias=True, norm_type="layer_norm",
        ),
        llm_config=dict(
            model_type="qwen2", vocab_size=151674, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
            num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=False,
        ),
        sam2_config=hiera_large_sam2_config(),
    )  # fmt: skip


def test_full_size_layout_matches_published_facts_and_native_shapes():
    config = _published_like_1b_config()
    published = published_layout_state_dict(config, device="meta")
    sam = {key[len(SAM) :]: tuple(value.shape) for key, value in published.items() if key.startswith(SAM)}
    # Facts read off the published SAM2 module tree (SAM2.0 Hiera-L with memory): 900 tensors.
    assert len(sam) == 900
    assert sam["image_encoder.trunk.pos_embed"] == (1, 144, 7, 7)
    assert sam["image_encoder.trunk.pos_embed_window"] == (1, 144, 8, 8)
    assert sam["image_encoder.trunk.blocks.2.attn.qkv.weight"] == (864, 144)
    assert sam["image_encoder.trunk.blocks.44.proj.weight"] == (1152, 576)
    assert sam["image_encoder.neck.convs.0.conv.weight"] == (256, 1152, 1, 1)
    assert sam["sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] == (2, 128)
    assert sam["sam_prompt_encoder.mask_downscaling.3.weight"] == (16, 4, 2, 2)
    assert sam["sam_mask_decoder.output_upscaling.0.weight"] == (256, 64, 2, 2)
    assert sam["sam_mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight"] == (128, 256)
    assert sam["maskmem_tpos_enc"] == (7, 1, 1, 64)
    assert sam["memory_attention.layers.3.cross_attn_image.k_proj.weight"] == (256, 64)
    assert sam["memory_encoder.fuser.layers.0.g_weight"] == (256,)
    assert "image_encoder.trunk.blocks.47.mlp.layers.1.weight" in sam and "image_encoder.trunk.blocks.48.norm1.weight" not in sam
    assert published["vision_model.encoder.layers.23.attn.qkv.weight"].shape == (3072, 1024)
    assert published["vision_model.embeddings.position_embedding"].shape == (1, 1025, 1024)
    assert published["mlp1.1.weight"].shape == (896, 4096)
    report = check_against_native(convert_state_dict(published, config), config)
    assert report.ok, report.summary()
    assert len(report.dropped) == 157
