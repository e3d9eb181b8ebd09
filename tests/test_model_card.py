"""sa2va_trl.model_card: what the card says for a given recipe, its metadata, the evaluation table, LoRA and files."""

from __future__ import annotations

import doctest

import pytest
from huggingface_hub import ModelCard
from peft import LoraConfig

from sa2va_trl import checkpointing, model_card
from sa2va_trl.config import Sa2VAGRPOConfig
from sa2va_trl.model_card import build_model_card, last_eval_metrics


def config(tmp_path, **kwargs):
    return Sa2VAGRPOConfig(output_dir=str(tmp_path / "my-run"), use_cpu=True, bf16=False, **kwargs)


def test_card_states_loops_rewards_weights_ema_and_settings(tmp_path):
    args = config(tmp_path, loops=["mask_to_caption"], mask_to_caption_rewards=["cycle_iou", "caption_meteor"],
                  mask_to_caption_reward_weights=[2.0, 0.25], mask_to_caption_weight=0.5, ema_decay=0.995,
                  ema_warmup_steps=50, beta=0.0, num_generations=6, per_device_train_batch_size=12,
                  learning_rate=3e-6, mask_action=False)
    text = build_model_card(args, base_model="/data/Sa2VA-4B-native", global_step=300, versions={})
    assert text.startswith("---\n") and "# my-run" in text
    assert "| mask_to_caption | `cycle_iou` (2), `caption_meteor` (0.25) | 0.5 |" in text
    assert "| caption_to_mask |" not in text  # the loop did not run
    assert "decay 0.995, linear warm-up over 50 steps" in text and "(no KL term, beta 0)" in text
    assert "| num_generations (G) | 6 |" in text and "| learning_rate | 3e-06 |" in text
    assert "| mask_action | False |" in text and "**Optimizer steps:** 300" in text
    assert "## Evaluation" not in text  # no evaluation ran
    card = ModelCard(text)
    assert card.data.base_model is None  # a local path is no Hub id
    assert "**Base model:** `/data/Sa2VA-4B-native`" in text


def test_hub_ids_go_into_the_metadata_and_the_evaluation_table_is_rendered(tmp_path):
    args = config(tmp_path, push_to_hub=True, hub_model_id="me/sa2va-grpo", hub_strategy="checkpoint")
    scores, step = last_eval_metrics([{"loss": 1.0, "step": 5}, {"eval_mean_iou": 0.5, "step": 10},
                                      {"eval_mean_iou": 0.8123456, "eval_meteor": 0.4, "eval_failed_rows": 2.0,
                                       "eval_runtime": 3.0, "step": 20}, {"loss": 0.5, "step": 21}])
    assert step == 20 and "eval_runtime" not in scores
    text = build_model_card(args, base_model="ByteDance/Sa2VA-4B", dataset_id="me/regions", eval_metrics=scores,
                            eval_step=step, versions={"trl": "1.16.0"})
    card = ModelCard(text)
    assert card.data.base_model == "ByteDance/Sa2VA-4B" and card.data.datasets == ["me/regions"]
    assert "[ByteDance/Sa2VA-4B](https://huggingface.co/ByteDance/Sa2VA-4B)" in text
    assert "on the evaluation rows at step 20" in text
    assert "| mean_iou | 0.8123 |" in text and "| meteor | 0.4000 |" in text and "| failed_rows | 2 |" in text
    assert "# sa2va-grpo" in text and 'snapshot_download("me/sa2va-grpo")' in text
    assert "`last-checkpoint/`: a complete training checkpoint" in text and "- trl: 1.16.0" in text


def test_lora_card_points_at_the_merged_models_when_present(tmp_path):
    lora = LoraConfig(r=16, lora_alpha=32, modules_to_save=["text_hidden_fcs", "mask_decoder"])
    text = build_model_card(config(tmp_path), peft_config=lora, versions={},
                            files=["adapter_config.json", "ema_model", "merged_model", "ema_merged_model"])
    assert "LoRA adapters (r 16, alpha 32), trained in full: `text_hidden_fcs`, `mask_decoder`" in text
    assert 'policy = Sa2VAPolicy.from_pretrained(f"{path}/merged_model")' in text
    assert 'ema_policy = Sa2VAPolicy.from_pretrained(f"{path}/ema_merged_model")' in text
    plain = build_model_card(config(tmp_path), peft_config=lora, versions={}, files=["adapter_config.json"])
    assert "policy = Sa2VAPolicy.from_pretrained(path)" in plain and "ema_policy" not in plain
    remote = build_model_card(config(tmp_path), versions={}, files=["ema_model"], policy_class="RemoteSa2VAPolicy")
    assert "from sa2va_trl.models import RemoteSa2VAPolicy" in remote
    assert 'ema_policy = RemoteSa2VAPolicy.from_pretrained(f"{path}/ema_model")' in remote


@pytest.mark.parametrize("module", [model_card, checkpointing])
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.attempted > 0 and result.failed == 0
