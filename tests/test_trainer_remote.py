"""`Sa2VAGRPOTrainer` on the published remote-code model (`model_backend: remote`), with the published code.

`@pytest.mark.official`: these run when SA2VA_OFFICIAL_CODE points at a local copy of the published HF model code
(see tests/published_sa2va.py) and skip with that reason otherwise. Each trains a tiny random published
`Sa2VAChatModel` for 2 GRPO steps of both cycle loops on the CPU, with the cycle rewards (the EMA as reverse model)
and the KL to the EMA; they take one to two minutes each on 2 busy cores, so they are `slow` too:

    SA2VA_OFFICIAL_CODE=/path/to/sa2va/hf/models python -m pytest -m official tests/test_trainer_remote.py

The part mapping, LoRA targets and backend checks without the published code are in tests/test_grpo_backends.py.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import sys
from pathlib import Path

import pytest
import torch

from sa2va_trl import grpo
from sa2va_trl.config import CAPTION_TO_MASK, MASK_TO_CAPTION, Sa2VAGRPOConfig, Sa2VAScriptArguments
from sa2va_trl.data.synthetic import shapes_dataset
from sa2va_trl.models import RemoteSa2VAPolicy, build_tiny_tokenizer
from sa2va_trl.rewards.registry import get_reward
from sa2va_trl.trainer import Sa2VAGRPOTrainer

sys.path.insert(0, os.path.dirname(__file__))
from published_sa2va import (  # noqa: E402
    build_tiny_published,
    favour_seg_and_eos,
    load_tiny_published_checkpoint,
    official,
    use_tiny_published_loaders,
    write_published_checkpoint,
)

pytestmark = [official, pytest.mark.slow]

G = 2
# The published module tree: what trains (all switches on, no LoRA) and what must stay bit for bit.
TRAINED = ("language_model.", "mlp1.", "text_hidden_fcs.")
MASK_DECODER = "grounding_encoder.sam2_model.sam_mask_decoder."
FROZEN = ("vision_model.", "grounding_encoder.sam2_model.image_encoder.")
LOOP_REWARDS = {
    MASK_TO_CAPTION: ["cycle_iou"],  # the EMA segments each sampled caption
    CAPTION_TO_MASK: ["cycle_meteor", "mask_iou"],  # the EMA captions each mask decoded from [SEG]
}


def _logged_values(trainer) -> dict[str, list]:
    values: dict[str, list] = {}
    for entry in trainer.state.log_history:
        for key, value in entry.items():
            values.setdefault(key, []).append(value)
    return values


def _count_ema_swaps(trainer) -> list[int]:
    """Count the EMA swaps (reverse-model calls of the cycle rewards, KL reference log-probs)."""
    calls = [0]
    swapped_in = trainer.ema.swapped_in

    @contextlib.contextmanager
    def counting(*args, **kwargs):
        calls[0] += 1
        with swapped_in(*args, **kwargs):
            yield

    trainer.ema.swapped_in = counting
    return calls


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def test_official_two_grpo_steps_of_both_loops_train_the_published_model(tmp_path, tokenizer):
    model = build_tiny_published(tokenizer)[0].train()
    grpo.set_trainable_parts(model, Sa2VAScriptArguments(model_backend="remote"), use_peft=False)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    args = Sa2VAGRPOConfig(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, per_device_train_batch_size=2 * G, num_generations=G,
        max_steps=2, logging_steps=1, max_completion_length=8, learning_rate=1e-3, report_to=[], save_strategy="no",
        disable_tqdm=True, beta=0.04, ema_decay=0.5, mask_pixel_action=True,  # both mask actions: prompt and pixel
    )
    rewards = {loop: [get_reward(name) for name in names] for loop, names in LOOP_REWARDS.items()}
    trainer = Sa2VAGRPOTrainer(
        model=model, reward_funcs=rewards, args=args, train_dataset=shapes_dataset(4, seed=0),
        processing_class=tokenizer,
        # The shapes regions cover 1 cell of the tiny 4 x 4 token grid (the published minimum is 4).
        policy_cls=functools.partial(RemoteSa2VAPolicy, min_region_cells=1),
    )
    assert isinstance(trainer.policy, RemoteSa2VAPolicy)
    swaps = _count_ema_swaps(trainer)
    trainer.train()
    assert trainer.state.global_step == 2

    # Trained parts moved (the mask decoder through the pixel action's log-probability); the vision encoder and
    # SAM2's image encoder did not, and the EMA does not track them.
    params = dict(trainer.model.named_parameters())
    changed = {name for name, p in params.items() if not torch.equal(before[name], p.detach())}
    for prefix in (*TRAINED, MASK_DECODER):
        assert any(name.startswith(prefix) for name in changed), prefix
    frozen = [name for name in params if name.startswith(FROZEN)]
    assert frozen and not any(name in changed or params[name].requires_grad for name in frozen)
    assert not any(name.startswith(FROZEN) for name in trainer.ema.shadow)
    assert any(name.startswith(MASK_DECODER) for name in trainer.ema.shadow)

    # The EMA: updated once per step, between the start and the live weights (decay 0.5); swapped in for the
    # reverse model and the KL reference.
    assert trainer.ema.num_updates == 2
    name = next(n for n in sorted(changed) if n.startswith("language_model.") and n in trainer.ema.shadow)
    shadow = trainer.ema.shadow[name]
    assert not torch.equal(shadow, before[name].float()) and not torch.equal(shadow, params[name].detach().float())
    assert swaps[0] >= 2

    # Both loops ran and were scored by their own rewards.
    logged = _logged_values(trainer)
    for loop, names in LOOP_REWARDS.items():
        for reward in names:
            assert any(v is not None for v in logged.get(f"rewards/{loop}/{reward}/mean", [])), (loop, reward)
        assert logged.get(f"loops/{loop}/reward_mean"), loop
    for metric in ("kl", "ema/decay", f"loops/{CAPTION_TO_MASK}/frac_no_seg", "mask_action/mu_rms",
                   "mask_action/pixel_flip_frac"):
        assert metric in logged, metric


def test_official_cycle_recipe_trains_a_published_checkpoint_with_lora_through_the_entry_point(
    tmp_path, tokenizer, monkeypatch
):
    from peft import PeftModel

    published, _, code_dir = build_tiny_published(tokenizer)
    checkpoint = write_published_checkpoint(published, code_dir, tmp_path / "published", tokenizer=tokenizer)
    use_tiny_published_loaders(monkeypatch)
    out = tmp_path / "run"
    recipe = str(Path(__file__).resolve().parents[1] / "recipes" / "cycle.yaml")
    # cycle.yaml as it is (LoRA, the loops and rewards, the EMA and KL, activation checkpointing, evaluation), on
    # the tiny checkpoint, the shapes world and the CPU: a smaller batch, LoRA rank and step count.
    parsed = grpo.parse_args([
        recipe, "--model_backend", "remote", "--trust_remote_code", "true", "--model_name_or_path", str(checkpoint),
        "--dataset_format", "synthetic", "--synthetic_images", "4", "--min_region_cells", "1",
        "--dtype", "float32", "--bf16", "false", "--use_cpu", "true", "--lora_r", "8", "--lora_alpha", "16",
        "--num_generations", str(G), "--per_device_train_batch_size", str(2 * G), "--gradient_accumulation_steps",
        "1", "--steps_per_generation", "1", "--max_completion_length", "8", "--learning_rate", "1e-3",
        "--max_steps", "2", "--logging_steps", "1", "--output_dir", str(out), "--report_to", "none",
        "--log_completions", "false", "--disable_tqdm", "true",
    ])
    script, training, model_args = parsed
    assert script.model_backend == "remote" and model_args.use_peft and training.activation_checkpointing
    trainer = grpo.main(*parsed)
    assert trainer.state.global_step == 2 and isinstance(trainer.policy, RemoteSa2VAPolicy)

    # LoRA on the language model and mlp1, text_hidden_fcs and the SAM2 mask decoder as full copies; nothing else.
    trainable = {name for name, p in trainer.model.named_parameters() if p.requires_grad}
    lora = {name for name in trainable if ".lora_" in name}
    assert any(".language_model." in name for name in lora) and any(".mlp1.1.lora_" in name for name in lora)
    assert all(".language_model." in name or ".mlp1." in name for name in lora)
    full = trainable - lora
    assert any(".text_hidden_fcs.modules_to_save." in name for name in full)
    assert any(".sam2_model.sam_mask_decoder.modules_to_save." in name for name in full)
    assert all(".modules_to_save." in name for name in full)
    base = {name.replace("base_model.model.", "", 1).replace(".base_layer", ""): p
            for name, p in trainer.model.named_parameters() if not p.requires_grad}
    saved = published.state_dict()
    for name, p in base.items():  # frozen weights (vision, SAM2 encoder, the LLM's base) are the checkpoint's
        if name in saved and name.startswith((*FROZEN, "language_model.model.")):
            assert torch.equal(p.detach(), saved[name]), name
    lora_b = [p for name, p in trainer.model.named_parameters() if ".language_model." in name and ".lora_B." in name]
    assert any(p.detach().abs().sum() > 0 for p in lora_b)  # the adapters moved off their zero start

    logged = _logged_values(trainer)
    for loop in (MASK_TO_CAPTION, CAPTION_TO_MASK):
        assert logged.get(f"loops/{loop}/reward_mean"), loop
    assert "kl" in logged and "eval_mean_iou" in logged  # evaluation through the remote adapter ran too

    # The output: the LoRA adapter of the published model (and the EMA's), loadable onto the published checkpoint.
    assert (out / "adapter_config.json").is_file() and (out / "ema_model" / "adapter_config.json").is_file()
    reloaded = PeftModel.from_pretrained(load_tiny_published_checkpoint(checkpoint), out)
    ours = {n: p for n, p in trainer.model.named_parameters() if n in trainable}
    theirs = dict(reloaded.named_parameters())
    for name, p in ours.items():
        torch.testing.assert_close(theirs[name], p.detach(), rtol=0, atol=0, msg=name)

    # save_merged_model (cycle.yaml's setting): merged_model/ is the published checkpoint with the live adapters
    # merged in, ema_merged_model/ with the EMA's; both load with the checkpoint's own code.
    merged = load_tiny_published_checkpoint(out / "merged_model").state_dict()
    expected = copy.deepcopy(trainer.accelerator.unwrap_model(trainer.model)).merge_and_unload().state_dict()
    ema_merged = load_tiny_published_checkpoint(out / "ema_merged_model").state_dict()
    shared = merged.keys() & expected.keys()
    assert len(shared) == len(merged)  # every merged weight has its counterpart (the LM-head bias is not saved)
    for name in shared:
        torch.testing.assert_close(merged[name], expected[name], rtol=0, atol=1e-6, msg=name)
    moved = [name for name in shared if name.startswith("language_model.") and not torch.equal(merged[name], saved[name])]
    assert moved  # the adapters changed the language model's weights
    assert any(not torch.equal(ema_merged[name], merged[name]) for name in moved)  # the EMA's merge is its own
