"""`python -m sa2va_trl.convert SRC DST` on a tiny checkpoint in the published layout.

The checkpoint is what a published one looks like on disk: config.json (model_type
"sa2va_chat"), bf16 tensors in sharded safetensors with model.safetensors.index.json, and a
tokenizer holding the Sa2VA tokens. The converted directory must load through the policy
adapter and sample and segment.
"""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sa2va_trl.convert import (
    ConversionError,
    convert_checkpoint,
    load_published_state_dict,
    published_config_dict,
    published_layout_state_dict,
)
from sa2va_trl.convert.__main__ import main
from sa2va_trl.convert.converter import REPORT_FILE
from sa2va_trl.models import Sa2VAPolicy, build_tiny_tokenizer, tiny_sa2va_config


def _write_published_checkpoint(path, config, state_dict, shards=3):
    """config.json + `shards` bf16 safetensors files + index + tokenizer, as published."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(published_config_dict(config)))
    keys = sorted(state_dict)
    weight_map = {}
    for shard in range(shards):
        name = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        part = {key: state_dict[key].contiguous() for key in keys[shard::shards]}
        save_file(part, str(path / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    build_tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny():
    config = tiny_sa2va_config()
    config.vision_config.attention_bias = True
    return config


@pytest.fixture(scope="module")
def sam2_json(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("sam2") / "sam2.json"
    path.write_text(json.dumps(tiny.sam2_config.to_dict()))
    return path


@pytest.fixture(scope="module")
def published(tiny):
    return published_layout_state_dict(tiny, dtype=torch.bfloat16, seed=5)


@pytest.fixture(scope="module")
def source(tiny, published, tmp_path_factory):
    return _write_published_checkpoint(tmp_path_factory.mktemp("published"), tiny, published)


def test_sharded_checkpoint_reads_back_every_tensor(source, published):
    loaded = load_published_state_dict(source)
    assert set(loaded) == set(published)
    assert all(loaded[key].dtype == torch.bfloat16 and torch.equal(loaded[key], published[key]) for key in published)


def test_pytorch_bin_checkpoints_are_read_too(published, tmp_path):
    subset = {key: published[key] for key in list(published)[:5]}
    torch.save(subset, tmp_path / "pytorch_model.bin")
    loaded = load_published_state_dict(tmp_path)
    assert set(loaded) == set(subset) and all(torch.equal(loaded[k], subset[k]) for k in subset)


def test_cli_converts_and_the_policy_samples_and_segments(source, sam2_json, published, tmp_path, capsys):
    target = tmp_path / "native"
    assert main([str(source), str(target), "--sam2-config", str(sam2_json), "--dtype", "float32"]) == 0
    printed = capsys.readouterr().out
    assert "unmapped: 0; missing: 0; shape mismatches: 0" in printed and "memory_attention" in printed
    report = json.loads((target / REPORT_FILE).read_text())
    assert report["ok"] and len(report["dropped"]) == 157

    policy = Sa2VAPolicy.from_pretrained(target)
    model = policy.model
    assert model.dtype == torch.float32
    # Values survive exactly (bf16 -> fp32 is exact); the fused qkv lands split.
    qkv = published["vision_model.encoder.layers.0.attn.qkv.weight"].float()
    c = qkv.shape[1]
    torch.testing.assert_close(model.vision_model.encoder.layer[0].attention.v_proj.weight, qkv[2 * c :], rtol=0, atol=0)
    torch.testing.assert_close(model.mlp1[1].weight, published["mlp1.1.weight"].float(), rtol=0, atol=0)

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (96, 112, 3), dtype=np.uint8), rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)]
    masks = [np.zeros(image.shape[:2], bool) for image in images]
    masks[0][20:60, 30:80] = True
    masks[1][:, :32] = True
    torch.manual_seed(0)
    rollout = policy.sample(policy.caption_prompts(images, masks), num_generations=2, max_new_tokens=4)
    assert rollout.completion_ids.shape[0] == 4 and torch.isfinite(rollout.logprobs).all()
    batch = policy.segmentation_prompts(images, ["the left part", "a stripe"])
    rollout = policy.sample(batch, num_generations=2, max_new_tokens=4)
    embeddings = policy.seg_embeddings(rollout.seg_hidden)
    out = policy.decode_masks(rollout.batch, embeddings, has_seg=torch.ones(4, dtype=torch.bool))
    assert [tuple(m.shape) for m in out.masks] == [image.shape[:2] for image in images for _ in range(2)]
    assert all(torch.isfinite(logits).all() for logits in out.mask_logits)


def test_keep_dtype_writes_bf16_and_records_it(source, sam2_json, tmp_path):
    target = tmp_path / "native_bf16"
    conversion, config = convert_checkpoint(source, target, sam2_config=json.loads(sam2_json.read_text()), max_shard_size="200KB")
    assert str(config.dtype).endswith("bfloat16")
    assert json.loads((target / "config.json").read_text())["dtype"] == "bfloat16"
    index = json.loads((target / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1  # written sharded, as asked
    with safe_open(str(target / files[0]), framework="pt") as handle:
        assert {handle.get_tensor(key).dtype for key in handle.keys()} == {torch.bfloat16}


def test_unmapped_key_fails_with_exit_1_and_writes_nothing(tiny, published, sam2_json, tmp_path, capsys):
    extra = dict(published, **{"grounding_encoder.sam2_model.new_video_head.weight": torch.zeros(2, dtype=torch.bfloat16)})
    source = _write_published_checkpoint(tmp_path / "extra", tiny, extra, shards=1)
    target = tmp_path / "never"
    assert main([str(source), str(target), "--sam2-config", str(sam2_json)]) == 1
    assert "unmapped published key: grounding_encoder.sam2_model.new_video_head.weight" in capsys.readouterr().out
    assert not target.exists()
    with pytest.raises(ConversionError) as caught:
        convert_checkpoint(source, None, sam2_config=json.loads(sam2_json.read_text()))
    assert caught.value.report.unmapped == ["grounding_encoder.sam2_model.new_video_head.weight"]


def test_missing_weights_and_unsupported_llm_give_nonzero_exit(tiny, published, sam2_json, tmp_path, capsys):
    without_head = {key: value for key, value in published.items() if not key.startswith("text_hidden_fcs.")}
    source = _write_published_checkpoint(tmp_path / "partial", tiny, without_head, shards=1)
    assert main([str(source), "--check-only", "--sam2-config", str(sam2_json)]) == 1
    assert "native key not filled: text_hidden_fcs.0.weight" in capsys.readouterr().out
    config = json.loads((source / "config.json").read_text())
    config["llm_config"]["architectures"] = ["InternLM2ForCausalLM"]
    (source / "config.json").write_text(json.dumps(config))
    assert main([str(source), "--check-only", "--sam2-config", str(sam2_json)]) == 2
    assert "InternLM2ForCausalLM" in capsys.readouterr().err


def test_tied_lm_head_is_filled_from_the_embeddings(sam2_json, tmp_path):
    config = tiny_sa2va_config()
    config.llm_config.tie_word_embeddings = True
    published = published_layout_state_dict(config, seed=2)
    assert "language_model.lm_head.weight" not in published
    source = _write_published_checkpoint(tmp_path / "tied", config, published, shards=1)
    conversion, _ = convert_checkpoint(source, tmp_path / "tied_native", sam2_config=json.loads(sam2_json.read_text()))
    assert conversion.report.tied == {"language_model.lm_head.weight": "language_model.model.embed_tokens.weight"}
    policy = Sa2VAPolicy.from_pretrained(tmp_path / "tied_native")
    torch.testing.assert_close(policy.model.language_model.lm_head.weight, published["language_model.model.embed_tokens.weight"])


def test_bad_sources_are_named(tmp_path, capsys):
    assert main([str(tmp_path / "nowhere"), "--check-only"]) == 2
    assert "config.json" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "internvl_chat"}))
    assert main([str(tmp_path), "--check-only"]) == 2
    assert "sa2va_chat" in capsys.readouterr().err
    assert main([str(tmp_path)]) == 2  # neither DST nor --check-only


def test_tokenizer_loading_never_runs_or_asks_about_remote_code(source, sam2_json, monkeypatch):
    # config.json's auto_map names the published remote code: with trust_remote_code unset,
    # transformers asks on stdin whether to run it, which would stall a batch job.
    from transformers import AutoTokenizer

    calls = []
    original = AutoTokenizer.from_pretrained

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", recording)
    conversion, config = convert_checkpoint(source, None, sam2_config=json.loads(sam2_json.read_text()))
    assert calls and all(call.get("trust_remote_code") is False for call in calls)
    assert conversion.report.ok and config.seg_token_id == build_tiny_tokenizer().convert_tokens_to_ids("[SEG]")
