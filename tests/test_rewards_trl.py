"""The reward convention holds outside our trainer: a stock `trl.GRPOTrainer` trains with registry rewards."""

import math

import pytest
import torch

datasets = pytest.importorskip("datasets")
trl = pytest.importorskip("trl")

from sa2va_trl.rewards import build_rewards  # noqa: E402

WORDS = "a the red green blue small large square circle triangle in top bottom left right center of image".split()


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    from tokenizers import decoders

    tok.decoder = decoders.WordPiece(prefix="##")  # joins word tokens with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", padding_side="left"
    )


def _tiny_lm(tokenizer):
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None
    )
    return model


def test_stock_grpo_trainer_trains_with_registry_rewards(tmp_path):
    tokenizer = _tiny_tokenizer()
    model = _tiny_lm(tokenizer)
    rows = {
        "prompt": ["a red square in the", "a blue circle in the", "a green triangle in the", "a small square of"],
        # one reference, two references, none (the reward returns None there), one
        "caption": [["a red square in the top left"], ["a blue circle", "a blue circle in the center"], None,
                    ["a small square of the image"]],
    }
    dataset = datasets.Dataset.from_dict(rows)
    reward_funcs, reward_weights = build_rewards(["caption_meteor"])
    config = trl.GRPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=6,
        max_steps=2,
        learning_rate=5e-2,
        logging_steps=1,
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        report_to=[],
        save_strategy="no",
        reward_weights=reward_weights,
        temperature=1.0,
        seed=0,
    )
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    trainer = trl.GRPOTrainer(
        model=model, reward_funcs=reward_funcs, args=config, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.train()
    changed = [k for k, v in trainer.model.named_parameters() if not torch.equal(v.detach(), before[k])]
    assert changed, "no parameter changed after 2 GRPO steps"
    logged = [entry for entry in trainer.state.log_history if "rewards/caption_meteor/mean" in entry]
    assert len(logged) == 2
    for entry in logged:
        value = entry["rewards/caption_meteor/mean"]
        assert math.isfinite(value) and 0.0 <= value < 1.0
