"""Published config.json (model_type "sa2va_chat") -> native Sa2VAConfig."""

import copy

import pytest

from sa2va_trl.convert import UnsupportedCheckpointError, native_config_from_published, published_config_dict
from sa2va_trl.convert.config import INFERENCE_TILING, hiera_large_sam2_config
from sa2va_trl.models import tiny_sa2va_config


@pytest.fixture(scope="module")
def tiny():
    return tiny_sa2va_config()


@pytest.fixture
def published(tiny):
    return copy.deepcopy(published_config_dict(tiny))


def test_fields_map_onto_the_native_config(tiny, published):
    published["vision_config"].update(qkv_bias=True, qk_normalization=False, norm_type="layer_norm", initializer_factor=0.25)
    published["llm_config"]["rope_theta"] = 1000000.0
    published["downsample_ratio"] = 0.5
    config = native_config_from_published(published, sam2_config=tiny.sam2_config.to_dict(), img_context_token_id=7, seg_token_id=9)
    vision = config.vision_config
    assert vision.attention_bias is True and vision.use_qk_norm is False and vision.norm_type == "layer_norm"
    assert vision.layer_scale_init_value == 0.25
    assert vision.hidden_size == tiny.vision_config.hidden_size and vision.image_size == [128, 128]
    assert config.llm_config.model_type == "qwen2" and config.llm_config.hidden_size == tiny.llm_config.hidden_size
    assert config.llm_config.rope_parameters["rope_theta"] == 1000000.0  # a 4.x rope_theta survives
    assert config.template == "qwen_chat" and config.downsample_ratio == 0.5
    assert (config.img_context_token_id, config.seg_token_id) == (7, 9)
    assert config.num_image_token == tiny.num_image_token


def test_force_image_size_overrides_the_vision_image_size(tiny, published):
    published["vision_config"]["image_size"] = 224
    published["force_image_size"] = 128
    config = native_config_from_published(published, sam2_config=tiny.sam2_config.to_dict())
    assert config.image_size == 128


def test_absent_vision_fields_take_the_published_defaults_not_transformers(tiny, published):
    for name in ("qkv_bias", "qk_normalization", "norm_type"):
        del published["vision_config"][name]
    config = native_config_from_published(published, sam2_config=tiny.sam2_config.to_dict())
    # InternVisionConfig defaults (the InternViT-6B values): no qkv bias, qk norm, RMSNorm.
    assert config.vision_config.attention_bias is False
    assert config.vision_config.use_qk_norm is True and config.vision_config.norm_type == "rms_norm"


def test_tiling_follows_published_inference_unless_config_is_asked(tiny, published):
    published.update(dynamic_image_size=False, use_thumbnail=False, max_dynamic_patch=6)
    inference = native_config_from_published(published, sam2_config=tiny.sam2_config.to_dict())
    assert {key: getattr(inference, key) for key in INFERENCE_TILING} == INFERENCE_TILING
    from_config = native_config_from_published(published, sam2_config=tiny.sam2_config.to_dict(), tiling="config")
    assert from_config.dynamic_image_size is False and from_config.use_thumbnail is False and from_config.max_dynamic_patch == 6


def test_template_dash_spelling_and_tie_word_embeddings(tiny, published):
    published["template"] = "qwen-chat"
    published["llm_config"]["tie_word_embeddings"] = True
    config = native_config_from_published(published, sam2_config=tiny.sam2_config.to_dict())
    assert config.template == "qwen_chat" and config.llm_config.tie_word_embeddings is True


def test_default_sam2_is_the_published_hiera_large(published):
    config = native_config_from_published(published)
    backbone = config.sam2_config.vision_config.backbone_config
    assert backbone.embed_dim_per_stage == [144, 288, 576, 1152] and backbone.blocks_per_stage == [2, 6, 36, 4]
    assert backbone.global_attention_blocks == [23, 33, 43] and backbone.window_size_per_stage == [8, 4, 16, 8]
    assert config.sam2_image_size == 1024 and config.sam_prompt_dim == 256
    assert hiera_large_sam2_config()["prompt_encoder_config"]["mask_input_channels"] == 16


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"ps_version": "v1"}, ValueError, "ps_version"),
        ({"select_layer": -2}, ValueError, "select_layer"),
        ({"template": "vicuna"}, ValueError, "template 'vicuna'"),
        ({"template": None}, ValueError, "template"),
    ],
)
def test_fields_the_native_backend_cannot_reproduce_are_refused_by_name(tiny, published, change, error, match):
    published.update(change)
    with pytest.raises(error, match=match):
        native_config_from_published(published, sam2_config=tiny.sam2_config.to_dict())


def test_missing_and_unsupported_parts_are_named(tiny, published):
    sam2 = tiny.sam2_config.to_dict()
    without_vision = {k: v for k, v in published.items() if k != "vision_config"}
    with pytest.raises(KeyError, match="vision_config"):
        native_config_from_published(without_vision, sam2_config=sam2)
    internlm = copy.deepcopy(published)
    internlm["llm_config"]["architectures"] = ["InternLM2ForCausalLM"]
    with pytest.raises(UnsupportedCheckpointError, match="InternLM2ForCausalLM"):
        native_config_from_published(internlm, sam2_config=sam2)
    qwen_vl = copy.deepcopy(published)
    qwen_vl["vision_config"]["architectures"] = ["Qwen2_5_VisionTransformerPretrainedModel"]
    with pytest.raises(UnsupportedCheckpointError, match="Qwen2_5_VisionTransformerPretrainedModel"):
        native_config_from_published(qwen_vl, sam2_config=sam2)


# A transformers 4.x `Qwen2Config.to_dict()` as saved inside a published llm_config (Sa2VA-1B sizes):
# generation fields, label maps, training-time use_cache False and a flash-attention request.
QWEN2_4X_DUMP = {
    "_name_or_path": "Qwen/Qwen2.5-0.5B-Instruct", "add_cross_attention": False, "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0, "bad_words_ids": None, "bos_token_id": 151643, "chunk_size_feed_forward": 0,
    "do_sample": False, "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 896,
    "id2label": {"0": "LABEL_0", "1": "LABEL_1"}, "label2id": {"LABEL_0": 0, "LABEL_1": 1}, "initializer_range": 0.02,
    "intermediate_size": 4864, "is_decoder": False, "length_penalty": 1.0, "max_length": 20,
    "max_position_embeddings": 32768, "max_window_layers": 21, "model_type": "qwen2", "num_attention_heads": 14,
    "num_beams": 1, "num_hidden_layers": 24, "num_key_value_heads": 2, "pad_token_id": None, "pruned_heads": {},
    "repetition_penalty": 1.0, "return_dict": True, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0,
    "sliding_window": 32768, "temperature": 1.0, "tie_word_embeddings": False, "top_k": 50, "top_p": 1.0,
    "torch_dtype": "bfloat16", "transformers_version": "4.37.2", "use_bfloat16": True, "use_cache": False,
    "use_sliding_window": False, "vocab_size": 151674, "_attn_implementation_autoset": True,
    "attn_implementation": "flash_attention_2",
}  # fmt: skip


def test_a_transformers_4x_llm_config_dump_reads_with_rope_and_cache(published):
    published["llm_config"] = dict(QWEN2_4X_DUMP)
    config = native_config_from_published(published)
    llm = config.llm_config
    assert type(llm).__name__ == "Qwen2Config" and llm.num_key_value_heads == 2 and llm.vocab_size == 151674
    assert llm.rope_parameters["rope_theta"] == 1000000.0 and llm.tie_word_embeddings is False
    assert llm.eos_token_id == 151645 and llm.use_sliding_window is False
    assert llm.use_cache is True  # sampling needs the KV cache
