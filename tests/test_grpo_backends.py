"""The entry point's model backends without the published code: which parameters each `train_*` switch trains in
each backend's module tree, LoRA targets, the adapter chosen per backend / model, and the model-source checks.

The published `Sa2VAChatModel`'s module tree is mirrored by `published_layout()` (its real dotted names, tiny layers,
no forward); the official tests (tests/test_trainer_remote.py) train the real published code.
"""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM
from trl import ModelConfig

from sa2va_trl.config import Sa2VAScriptArguments
from sa2va_trl.grpo import (
    PART_MODULES,
    build_peft_config,
    check_model_source,
    policy_class,
    policy_factory,
    set_trainable_parts,
)
from sa2va_trl.models import RemoteSa2VAPolicy, Sa2VAPolicy, build_tiny_model, is_published_sa2va, policy_class_for


def _tree(leaves: dict[str, nn.Module | nn.Parameter]) -> nn.Module:
    """A module tree with the given dotted names (parents are plain nn.Modules)."""
    root = nn.Module()
    for path, leaf in leaves.items():
        *parents, name = path.split(".")
        node = root
        for part in parents:
            if not hasattr(node, part):
                node.add_module(part, nn.Module())
            node = getattr(node, part)
        if isinstance(leaf, nn.Parameter):
            node.register_parameter(name, leaf)
        else:
            node.add_module(name, leaf)
    return root


def published_layout() -> nn.Module:
    """The published Sa2VAChatModel's module names: InternViT, mlp1, a Qwen2 LLM, text_hidden_fcs and the
    facebookresearch SAM2 under grounding_encoder.sam2_model (whose mask decoder and memory attention also have
    `q_proj` / `k_proj` / `v_proj` layers, as in the published code)."""
    sam = "grounding_encoder.sam2_model."
    model = _tree({
        "vision_model.embeddings.patch_embedding": nn.Conv2d(3, 8, 2),
        "vision_model.encoder.layers.0.attn.qkv": nn.Linear(8, 24),
        "vision_model.encoder.layers.0.mlp.fc1": nn.Linear(8, 16),
        "mlp1": nn.Sequential(nn.LayerNorm(32), nn.Linear(32, 16), nn.GELU(), nn.Linear(16, 16)),
        "text_hidden_fcs": nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8), nn.Dropout(0.0)),
        sam + "image_encoder.trunk.blocks.0.attn.qkv": nn.Linear(8, 24),
        sam + "image_encoder.neck.convs.0.conv": nn.Conv2d(8, 8, 1),
        sam + "sam_prompt_encoder.no_mask_embed": nn.Embedding(1, 8),
        sam + "sam_mask_decoder.transformer.layers.0.self_attn.q_proj": nn.Linear(8, 8),
        sam + "sam_mask_decoder.transformer.layers.0.self_attn.k_proj": nn.Linear(8, 8),
        sam + "sam_mask_decoder.transformer.layers.0.self_attn.v_proj": nn.Linear(8, 8),
        sam + "sam_mask_decoder.conv_s0": nn.Conv2d(8, 8, 1),
        sam + "sam_mask_decoder.iou_token": nn.Embedding(1, 8),
        sam + "memory_attention.layers.0.self_attn.q_proj": nn.Linear(8, 8),
        sam + "memory_encoder.out_proj": nn.Conv2d(8, 8, 1),
        sam + "obj_ptr_proj": nn.Linear(8, 8),
        sam + "no_mem_embed": nn.Parameter(torch.zeros(1, 1, 8)),
    })
    model.language_model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, tie_word_embeddings=False,
    ))
    return model


# Which modules each backend trains with every switch on and no LoRA; everything else stays frozen.
TRAINED = {
    "native": ("language_model.", "mlp1.", "text_hidden_fcs.", "grounding_encoder.mask_decoder."),
    "remote": ("language_model.", "mlp1.", "text_hidden_fcs.", "grounding_encoder.sam2_model.sam_mask_decoder."),
}


def _model(backend):
    return build_tiny_model(seed=0)[0] if backend == "native" else published_layout()


@pytest.mark.parametrize("backend", ["native", "remote"])
def test_the_train_switches_map_to_each_backends_module_names(backend):
    model = _model(backend)
    set_trainable_parts(model, Sa2VAScriptArguments(model_backend=backend), use_peft=False)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    expected = {name for name, _ in model.named_parameters() if name.startswith(TRAINED[backend])}
    assert trainable == expected
    for prefix in TRAINED[backend]:  # every part has parameters, so the equality above checks each of them
        assert any(name.startswith(prefix) for name in trainable), prefix
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert any(name.startswith("vision_model.") for name in frozen)
    sam_encoder = "grounding_encoder.vision_encoder." if backend == "native" else "grounding_encoder.sam2_model.image_encoder."
    assert any(name.startswith(sam_encoder) for name in frozen)
    assert not any(name.startswith(("vision_model.", sam_encoder)) for name in trainable)


def test_switches_off_and_lora_leave_those_parts_frozen():
    model = published_layout()
    script = Sa2VAScriptArguments(model_backend="remote", train_mask_decoder=False, train_mlp1=False)
    set_trainable_parts(model, script, use_peft=True)  # LoRA: the language model's base weights stay frozen
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {name for name, _ in model.named_parameters() if name.startswith("text_hidden_fcs.")}


@pytest.mark.parametrize("backend, wrong", [("native", "remote"), ("remote", "native")])
def test_a_backend_that_does_not_match_the_model_is_refused_naming_the_part(backend, wrong):
    missing = PART_MODULES[wrong]["train_mask_decoder"]
    with pytest.raises(ValueError, match=rf"`train_mask_decoder` is on but the model has no '{missing}' module.*"
                                         rf"model_backend: {wrong}"):
        set_trainable_parts(_model(backend), Sa2VAScriptArguments(model_backend=wrong), use_peft=False)


def test_remote_lora_adapts_the_language_model_and_mlp1_and_saves_the_other_parts_in_full():
    from peft import get_peft_model

    model = published_layout()
    script = Sa2VAScriptArguments(model_backend="remote")
    model_args = ModelConfig(use_peft=True, lora_r=4, lora_alpha=8)
    config = build_peft_config(model_args, script)
    assert config.modules_to_save == ["text_hidden_fcs", "grounding_encoder.sam2_model.sam_mask_decoder"]
    set_trainable_parts(model, script, use_peft=True)
    peft_model = get_peft_model(model, config)
    lora = {name.split(".lora_A")[0] for name, _ in peft_model.named_parameters() if ".lora_A." in name}
    assert any(".language_model.model.layers.0.self_attn.q_proj" in name for name in lora)
    assert any(".language_model.model.layers.0.mlp.down_proj" in name for name in lora)
    assert {name.split("model.model.", 1)[1] for name in lora if ".mlp1." in name} == {"mlp1.1", "mlp1.3"}
    # The SAM2 decoder's and memory attention's q/k/v projections keep their weights: no LoRA outside the LLM / mlp1.
    assert all(".language_model." in name or ".mlp1." in name for name in lora)
    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    full = {name for name in trainable if "lora_" not in name}
    assert full and all(".modules_to_save.default." in name for name in full)
    assert any(".sam2_model.sam_mask_decoder.modules_to_save.default.conv_s0." in name for name in full)
    assert any(".text_hidden_fcs.modules_to_save.default." in name for name in full)
    assert not any(".vision_model." in name or ".image_encoder." in name for name in trainable)


def test_the_adapter_follows_the_backend_and_the_model_layout():
    native = build_tiny_model(seed=0)[0]
    assert is_published_sa2va(published_layout()) and not is_published_sa2va(native)
    assert policy_class_for(published_layout()) is RemoteSa2VAPolicy and policy_class_for(native) is Sa2VAPolicy
    assert policy_class("remote") is RemoteSa2VAPolicy and policy_class("native") is Sa2VAPolicy
    with pytest.raises(ValueError, match="must be one of"):
        policy_class("hub")


def test_prompt_settings_reach_either_adapter():
    remote = policy_factory(Sa2VAScriptArguments(model_backend="remote", min_region_cells=1, max_dynamic_patch=4))
    assert remote.func is RemoteSa2VAPolicy and remote.keywords == {"min_region_cells": 1, "max_dynamic_patch": 4}
    assert policy_factory(Sa2VAScriptArguments(model_backend="remote")).keywords == {}  # the published defaults
    model, tokenizer = build_tiny_model(seed=0)
    policy = policy_factory(Sa2VAScriptArguments(min_region_cells=3))(model, tokenizer)
    assert isinstance(policy, Sa2VAPolicy) and model.config.min_region_cells == 3  # saved with the model
    with pytest.raises(ValueError, match="`min_region_cells` must be >= 1"):
        Sa2VAScriptArguments(min_region_cells=0)


def test_remote_model_sources_are_checked_before_loading():
    def model(**kwargs):
        return types.SimpleNamespace(**{"model_name_or_path": "/ckpt/Sa2VA-4B", "model_revision": "main", **kwargs})

    trusted, untrusted = (types.SimpleNamespace(trust_remote_code=value) for value in (True, False))
    check_model_source(model(), trusted, "remote")
    check_model_source(model(model_name_or_path="builtin:tiny"), untrusted, "native")
    with pytest.raises(ValueError, match="set `trust_remote_code: true`"):
        check_model_source(model(), untrusted, "remote")
    with pytest.raises(ValueError, match="builtin models are native"):
        check_model_source(model(model_name_or_path="builtin:tiny-warm"), trusted, "remote")
    with pytest.raises(ValueError, match="`model_revision: v2` is not supported"):
        check_model_source(model(model_revision="v2"), trusted, "remote")
    with pytest.raises(ValueError, match="must be one of"):
        check_model_source(model(), trusted, "hub")
