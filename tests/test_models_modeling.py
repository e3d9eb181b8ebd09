"""The native Sa2VA backend: config, modules, save/load round trip, Auto registration."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

from sa2va_trl.models import MODEL_TYPE, Sa2VAConfig, Sa2VAModel, build_tiny_model, tiny_sa2va_config
from sa2va_trl.models.modeling_sa2va import pixel_shuffle


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_model(seed=0)


def _inputs(model, tokenizer, grids=None):
    """Two left-padded rows over two images, the first with 3 region tokens."""
    config = model.config
    n = config.num_image_token
    image = "<img>" + "<IMG_CONTEXT>" * n + "</img>"
    texts = [image + "\nregion1<vp>" + "<IMG_CONTEXT>" * 3 + "</vp> hello", image + " hi"]
    ids = [tokenizer(t)["input_ids"] for t in texts]
    length = max(map(len, ids))
    input_ids = torch.full((2, length), tokenizer.pad_token_id)
    attention_mask = torch.zeros(2, length, dtype=torch.long)
    for row, row_ids in enumerate(ids):
        input_ids[row, length - len(row_ids):] = torch.tensor(row_ids)
        attention_mask[row, length - len(row_ids):] = 1
    g = config.token_grid_size
    region_grids = torch.zeros(2, g, g, dtype=torch.bool)
    region_grids[0, 0, :3] = True
    generator = torch.Generator().manual_seed(1)
    pixel_values = torch.randn(2, 3, config.image_size, config.image_size, generator=generator)
    return dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=pixel_values,
        image_index=torch.tensor([1, 0]),
        region_grids=region_grids,
    )


def test_model_type_is_namespaced_and_registered():
    assert MODEL_TYPE == "sa2va_trl_native"
    assert MODEL_TYPE not in CONFIG_MAPPING_NAMES  # transformers itself never owns it
    assert AutoConfig.for_model(MODEL_TYPE).__class__ is Sa2VAConfig


def test_tiny_config_sizes_come_from_the_config(tiny):
    model, tokenizer = tiny
    config = model.config
    assert (config.image_size, config.patch_size, config.token_grid_size, config.num_image_token) == (128, 8, 8, 64)
    assert config.sam2_image_size == 128 and config.sam_prompt_dim == 32
    assert config.llm_config.vocab_size == len(tokenizer)
    assert config.min_region_cells == 1
    assert sum(p.numel() for p in model.parameters()) < 3_000_000
    bigger = tiny_sa2va_config(tokenizer, image_size=224, sam2_image_size=256)
    assert bigger.num_image_token == (224 // 8 // 2) ** 2 and bigger.sam2_image_size == 256


def test_default_config_matches_published_sizes():
    config = Sa2VAConfig()
    assert config.image_size == 448 and config.num_image_token == 256 and config.token_grid_size == 16
    assert config.sam2_image_size == 1024 and config.sam_prompt_dim == 256
    assert config.template == "qwen_chat" and config.min_region_cells == 4


def test_config_rejects_unknown_template():
    with pytest.raises(ValueError, match="template"):
        Sa2VAConfig(template="no_such_template")


def test_published_module_names(tiny):
    model, _ = tiny
    names = {name for name, _ in model.named_children()}
    assert {"vision_model", "mlp1", "language_model", "grounding_encoder", "text_hidden_fcs"} <= names
    keys = set(model.state_dict())
    for key in ("mlp1.0.weight", "mlp1.1.weight", "mlp1.3.weight", "text_hidden_fcs.0.weight", "text_hidden_fcs.2.weight"):
        assert key in keys
    assert isinstance(model.mlp1[0], torch.nn.LayerNorm) and model.mlp1[0].normalized_shape == (4 * 64,)
    assert model.text_hidden_fcs[2].out_features == model.config.sam_prompt_dim
    assert model.template["INSTRUCTION"] == "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n"


def test_generation_config_has_chat_end_eos_and_pad(tiny):
    model, tokenizer = tiny
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id


def test_pixel_shuffle_hand_computed():
    # (n, w, h, c) = (1, 4, 4, 1) with x[a, b] = 10 a + b: out[a, b] = x[2a,2b], x[2a,2b+1], x[2a+1,2b], x[2a+1,2b+1]
    x = (10 * torch.arange(4).view(4, 1) + torch.arange(4).view(1, 4)).float().view(1, 4, 4, 1)
    out = pixel_shuffle(x, 0.5)
    assert out.shape == (1, 2, 2, 4)
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([0.0, 1.0, 10.0, 11.0]))
    torch.testing.assert_close(out[0, 1, 0], torch.tensor([20.0, 21.0, 30.0, 31.0]))
    torch.testing.assert_close(out[0, 0, 1], torch.tensor([2.0, 3.0, 12.0, 13.0]))


def test_extract_feature_shape(tiny):
    model, _ = tiny
    with torch.no_grad():
        features = model.extract_feature(torch.randn(3, 3, 128, 128))
    assert features.shape == (3, 64, 128)


def test_build_inputs_embeds_places_image_then_region_tokens(tiny):
    model, tokenizer = tiny
    inputs = _inputs(model, tokenizer)
    vit = torch.randn(2, 64, 128)
    with torch.no_grad():
        embeds = model.build_inputs_embeds(inputs["input_ids"], vit, inputs["image_index"], inputs["region_grids"])
        plain = model.get_input_embeddings()(inputs["input_ids"])
    slots = inputs["input_ids"] == model.config.img_context_token_id
    row0 = embeds[0][slots[0]]
    torch.testing.assert_close(row0[:64], vit[1])  # row 0 shows image 1
    torch.testing.assert_close(row0[64:], vit[1][:3])  # its region: cells (0,0), (0,1), (0,2)
    torch.testing.assert_close(embeds[1][slots[1]], vit[0])
    torch.testing.assert_close(embeds[~slots], plain[~slots])


def test_build_inputs_embeds_rejects_count_mismatch(tiny):
    model, tokenizer = tiny
    inputs = _inputs(model, tokenizer)
    grids = inputs["region_grids"].clone()
    grids[0, 1, 1] = True  # 4 region cells but only 3 slots
    with pytest.raises(ValueError, match=r"row 0, field 'input_ids'"):
        model.build_inputs_embeds(inputs["input_ids"], torch.randn(2, 64, 128), inputs["image_index"], grids)


def test_save_load_round_trip_gives_identical_outputs(tiny, tmp_path):
    model, tokenizer = tiny
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not (tmp_path / "pytorch_model.bin").exists()
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == MODEL_TYPE

    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, Sa2VAConfig) and config.num_image_token == 64
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, Sa2VAModel)
    loaded_tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    text = "<|im_start|>user\n<img><IMG_CONTEXT></img>\nPlease segment a red ☂ circle.<|im_end|>\n[SEG]"
    assert loaded_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded_tokenizer.eos_token == "<|im_end|>" and loaded_tokenizer.chat_template == tokenizer.chat_template

    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0, msg=key)
    inputs = _inputs(model, tokenizer)
    sam_pixels = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        expected = model(**inputs).logits
        got = loaded(**inputs).logits
        prompts = torch.randn(2, 32, generator=torch.Generator().manual_seed(0))
        expected_masks = model.decode_sam2_masks(model.get_sam2_features(sam_pixels), torch.tensor([0, 1]), prompts)
        got_masks = loaded.decode_sam2_masks(loaded.get_sam2_features(sam_pixels), torch.tensor([0, 1]), prompts)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for a, b in zip(got_masks, expected_masks):  # bit-equal weights; allow float reduction-order noise
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_same_seed_same_weights_and_rng_untouched():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    first, _ = build_tiny_model(seed=5)
    after = torch.rand(1)
    second, _ = build_tiny_model(seed=5)
    torch.testing.assert_close(before, after)  # building does not consume the caller's RNG
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
