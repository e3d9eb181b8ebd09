"""sa2va_trl.merge and the saved models: LoRA adapters (with the parts trained in full as modules_to_save) merged into
a standalone model that gives the adapted model's outputs; a LoRA run's merged policy and EMA; the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from peft import get_peft_model
from trl import ModelConfig

from sa2va_trl import merge
from sa2va_trl.config import Sa2VAScriptArguments
from sa2va_trl.data.schema import decode_region_mask
from sa2va_trl.data.synthetic import shapes_dataset
from sa2va_trl.grpo import build_peft_config, main, parse_args, set_trainable_parts
from sa2va_trl.models import Sa2VAPolicy
from sa2va_trl.models.tiny import build_tiny_model

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "recipes" / "demo.yaml")


def rows(n=2):
    data = shapes_dataset(n, seed=3, split="validation")
    return [data[i] for i in range(n)]


@torch.no_grad()
def outputs(policy: Sa2VAPolicy, examples) -> dict[str, torch.Tensor]:
    """Log-probs of fixed completions and the mask logits of their [SEG] states, for both prompt kinds."""
    images = [r["img"] for r in examples]
    out = {}
    caption = policy.caption_prompts(images, [decode_region_mask(r["region_mask"]) for r in examples])
    segment = policy.segmentation_prompts(images, [r["caption"] for r in examples])
    for name, batch in (("caption", caption), ("segment", segment)):
        ids = torch.full((len(examples), 6), policy.tokenizer.convert_tokens_to_ids("[SEG]"))
        ids[:, :3] = torch.arange(5, 8)
        mask = torch.ones_like(ids)
        result = policy.completion_logprobs(batch, ids, mask, with_seg_hidden=True)
        out[f"{name}/logprobs"] = result.logprobs
        decoded = policy.decode_masks(batch, policy.seg_embeddings(result.seg_hidden), has_seg=result.has_seg)
        out[f"{name}/mask_logits"] = torch.stack([m.float() for m in decoded.mask_logits])
    return out


def test_merged_lora_model_gives_the_adapted_models_outputs(tmp_path):
    model, tokenizer = build_tiny_model(seed=0)
    script_args = Sa2VAScriptArguments()
    set_trainable_parts(model, script_args, use_peft=True)
    peft_model = get_peft_model(model, build_peft_config(
        ModelConfig(use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0), script_args))
    with torch.no_grad():  # away from the initialisation (lora_B = 0 would merge into the base unchanged)
        generator = torch.Generator().manual_seed(1)
        for _, param in peft_model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    adapters = tmp_path / "adapters"
    peft_model.save_pretrained(adapters)
    tokenizer.save_pretrained(adapters)
    adapted = outputs(Sa2VAPolicy(peft_model.eval(), tokenizer), rows())

    with pytest.raises(ValueError, match="backend must be 'native' or 'remote'"):
        merge.merge_lora(str(adapters), str(tmp_path / "nowhere"), base_model="builtin:tiny", backend="vllm")
    with pytest.raises(ValueError, match="names no base model: pass base_model"):
        merge.merge_lora(str(adapters), str(tmp_path / "nowhere"))  # builtin:tiny is built in memory
    assert merge.main([str(adapters), str(tmp_path / "merged"), "--base-model", "builtin:tiny", "--seed", "0"]) == 0
    merged_policy = Sa2VAPolicy.from_pretrained(str(tmp_path / "merged"))
    assert not any("lora" in n or "modules_to_save" in n for n, _ in merged_policy.model.named_parameters())
    merged = outputs(merged_policy, rows())
    base = outputs(Sa2VAPolicy(build_tiny_model(seed=0)[0], tokenizer), rows())
    for key, value in adapted.items():
        torch.testing.assert_close(merged[key], value, rtol=1e-4, atol=1e-4, msg=key)
        assert (base[key] - value).abs().max() > 1e-2, f"{key}: the adapters changed nothing, the test cannot fail"


@pytest.mark.slow
def test_lora_run_saves_loadable_merged_policy_and_ema(tmp_path):
    out = tmp_path / "run"
    trainer = main(*parse_args([
        DEMO, "--max_steps", "3", "--synthetic_images", "4", "--output_dir", str(out), "--report_to", "none",
        "--save_strategy", "no", "--disable_tqdm", "true", "--sample_overlay_steps", "0",
        "--use_peft", "true", "--lora_r", "4", "--lora_alpha", "8", "--learning_rate", "0.01",
        "--save_merged_model", "true"]))
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json",
                 "ema_model/adapter_model.safetensors", "ema_model/tokenizer.json",
                 "merged_model/model.safetensors", "merged_model/tokenizer.json",
                 "ema_merged_model/model.safetensors", "ema_merged_model/tokenizer.json"):
        assert (out / name).is_file(), name
    examples = rows(1)
    trainer.model.eval()
    live = outputs(Sa2VAPolicy(trainer.accelerator.unwrap_model(trainer.model), trainer.processing_class), examples)
    with torch.no_grad(), trainer.ema.swapped_in():
        ema = outputs(Sa2VAPolicy(trainer.accelerator.unwrap_model(trainer.model), trainer.processing_class), examples)
    merged = outputs(Sa2VAPolicy.from_pretrained(str(out / "merged_model")), examples)
    ema_merged = outputs(Sa2VAPolicy.from_pretrained(str(out / "ema_merged_model")), examples)
    for key in live:
        torch.testing.assert_close(merged[key], live[key], rtol=1e-4, atol=1e-4, msg=key)
        torch.testing.assert_close(ema_merged[key], ema[key], rtol=1e-4, atol=1e-4, msg=key)
    assert any((live[k] - ema[k]).abs().max() > 1e-6 for k in live)  # the EMA is not the policy
    # the adapter folders load too (transformers' peft integration puts the adapters on the base model)
    adapter_policy = Sa2VAPolicy.from_pretrained(str(out))
    for key, value in outputs(adapter_policy, examples).items():
        torch.testing.assert_close(value, live[key], rtol=1e-4, atol=1e-4, msg=f"adapter folder: {key}")
    (mask,) = Sa2VAPolicy.from_pretrained(str(out / "merged_model")).segment([examples[0]["img"]],
                                                                              [examples[0]["caption"]])
    assert mask.dtype == np.bool_
    assert "merged_model" in (out / "README.md").read_text()
