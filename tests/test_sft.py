"""Tests of the supervised warm start: losses, recipe parsing, SFT steps, saving, SAM2 stage."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sa2va_trl import sft
from sa2va_trl.sam2_pretrain import (
    SceneStream,
    interior_point,
    point_prompt_embeddings,
    pretrain_prompt_following,
    hard_negative_weights,
    prompt_following_loss,
    reset_sam2_parameters,
    tie_positional_embeddings,
)
from sa2va_trl.sft_losses import SFTLoss, dice_loss, mask_bce_loss, token_cross_entropy


# ----------------------------------------------------------------------------- losses

def test_dice_matches_hand_computation():
    logits = torch.tensor([[[0.0, 0.0], [0.0, 0.0]]])  # p = 0.5 everywhere
    target = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    expected = 1 - (2 * 0.5 + 1) / (2.0 + 1.0 + 1)  # inter 0.5, |p| 2, |t| 1, eps 1
    assert float(dice_loss(logits, target)) == pytest.approx(expected)


def test_bce_resizes_low_res_logits_to_target():
    logits = torch.full((2, 4, 4), 3.0)
    target = torch.ones(2, 8, 8)
    assert float(mask_bce_loss(logits, target)) == pytest.approx(math.log1p(math.exp(-3.0)), rel=1e-5)


def test_token_cross_entropy_ignores_padding():
    logprobs = torch.tensor([[-1.0, -3.0, -100.0]])
    mask = torch.tensor([[1, 1, 0]])
    assert float(token_cross_entropy(logprobs, mask)) == pytest.approx(2.0)


def test_sft_loss_uses_published_weights():
    logprobs, mask = torch.tensor([[-2.0]]), torch.ones(1, 1)
    logits, target = torch.randn(3, 4, 4), (torch.rand(3, 4, 4) > 0.5).float()
    total, parts = SFTLoss()(logprobs, mask, logits, target)
    expected = 2.0 + 2.0 * float(mask_bce_loss(logits, target)) + 0.5 * float(dice_loss(logits, target))
    assert float(total) == pytest.approx(expected, rel=1e-6)
    assert set(parts) == {"text_ce", "bce", "dice"}


def test_sft_loss_refuses_empty_input():
    with pytest.raises(ValueError, match="nothing to train"):
        SFTLoss()(None, None, None, None)


# ----------------------------------------------------------------------------- recipe parsing

def test_positional_recipe_with_cli_override(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("max_steps: 7\nlearning_rate: 0.01\nfinetune: lora\n")
    config = sft.parse_args([str(recipe), "--max_steps", "3"])
    assert (config.max_steps, config.learning_rate, config.finetune) == (3, 0.01, "lora")


def test_unknown_recipe_key_raises(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("max_stepz: 7\n")
    with pytest.raises(ValueError, match="max_stepz"):
        sft.parse_args([str(recipe)])


def test_bad_settings_name_the_field():
    with pytest.raises(ValueError, match="finetune"):
        sft.SFTConfig(finetune="half")
    with pytest.raises(ValueError, match="tasks"):
        sft.SFTConfig(tasks="caption,dance")
    with pytest.raises(ValueError, match=r"\[SEG\]"):
        sft.SFTConfig(seg_answer="Sure.")


def test_shipped_recipes_parse():
    demo = sft.parse_args(["recipes/demo_sft.yaml"])
    assert demo.model_name_or_path == sft.BUILTIN_TINY and demo.finetune == "full"
    gpu = sft.parse_args(["recipes/sft.yaml"])
    assert (gpu.finetune, gpu.lora_r, gpu.lora_alpha) == ("lora", 128, 256)
    assert not gpu.train_vision_model and gpu.train_mlp1 and gpu.train_text_hidden_fcs and gpu.train_mask_decoder
    lagging = sft.parse_args(["recipes/demo_sft_lagging_grounding.yaml"])
    assert lagging.model_name_or_path == "outputs/sft_300" and lagging.sam2_pretrain_steps == 0
    assert not (lagging.train_text_hidden_fcs or lagging.train_mask_decoder) and lagging.task_list == ["caption", "segmentation"]


# ----------------------------------------------------------------------------- SFT steps

@pytest.fixture(scope="module")
def tiny():
    from sa2va_trl.models.tiny import build_tiny_model

    return build_tiny_model(seed=0)


def _fresh_tiny():
    from sa2va_trl.models.tiny import build_tiny_model

    return build_tiny_model(seed=0)


def _params(model, prefix):
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith(prefix)}


def test_sft_steps_decrease_loss_train_only_the_chosen_parts(tmp_path):
    from sa2va_trl.models.adapter import Sa2VAPolicy

    model, tokenizer = _fresh_tiny()
    config = sft.SFTConfig(output_dir=str(tmp_path), multimask_output=False, batch_size=2, learning_rate=3e-3,
                           point_distillation_weight=1.0, point_replay_weight=0.5, negative_weight=3.0,
                           multi_shape_fraction=1.0, report_to="none")
    model.config.multimask_output = False
    before_vision = _params(model, "vision_model.")
    before_llm = _params(model, "language_model.")
    before_decoder = _params(model, "grounding_encoder.mask_decoder.")
    before_sam_encoder = _params(model, "grounding_encoder.vision_encoder.")
    model, trainable = sft.configure_trainable(model, config)
    assert not any(n.startswith("vision_model.") for n in trainable)
    policy = Sa2VAPolicy(model, tokenizer)
    step = sft.SFTStep(policy, config, np.random.default_rng(0))
    examples = sft.SyntheticExamples(config).batch(2)  # one fixed batch
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate)
    model.train()
    losses = []
    for _ in range(6):
        step.rng = np.random.default_rng(0)  # same caption picks every step: a truly fixed batch
        loss, stats = step(examples)
        assert math.isfinite(float(loss.detach()))
        assert {"text_ce", "bce", "dice", "point_distill", "point_replay_iou", "seg_iou"} <= set(stats)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0] * 0.9, losses
    changed = lambda before: any(not torch.equal(p, dict(model.named_parameters())[n]) for n, p in before.items())  # noqa: E731
    assert changed(before_llm) and changed(before_decoder)
    assert not changed(before_vision) and not changed(before_sam_encoder)
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.startswith("grounding_encoder.prompt_encoder"))


def test_lora_trains_adapters_and_heads_and_saves_merged(tmp_path):
    model, tokenizer = _fresh_tiny()
    config = sft.SFTConfig(output_dir=str(tmp_path), finetune="lora", lora_r=4, lora_alpha=8, report_to="none")
    wrapped, trainable = sft.configure_trainable(model, config)
    assert any("lora_" in n for n in trainable)
    assert not any(n.startswith("base_model.model.language_model") and "lora_" not in n for n in trainable)
    assert not any("grounding_encoder" in n and "lora_" in n for n in trainable)  # LoRA stays in the LLM
    assert any("text_hidden_fcs" in n for n in trainable) and any("mlp1" in n for n in trainable)
    assert any("mask_decoder" in n for n in trainable)
    sft.save_model(wrapped, tokenizer, str(tmp_path / "out"))
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "out" / "model.safetensors")).keys()
    assert not any("lora_" in k for k in keys)
    assert "text_hidden_fcs.0.weight" in keys


def test_train_saves_a_loadable_checkpoint(tmp_path):
    from sa2va_trl.models.adapter import Sa2VAPolicy

    config = sft.SFTConfig(output_dir=str(tmp_path / "run"), max_steps=2, batch_size=1, logging_steps=1,
                           sam2_pretrain_steps=1, sam2_pretrain_batch_size=1, multimask_output=False,
                           sam2_reset_parameters=True,
                           train_vision_model=True, train_sam2_image_encoder=True, report_to="none")
    summary = sft.train(config)
    assert summary["sft_steps"] == 2 and len(summary["history"]) == 2
    policy = Sa2VAPolicy.from_pretrained(str(tmp_path / "run"))
    assert policy.core.config.multimask_output is False
    sam2 = policy.core.grounding_encoder
    torch.testing.assert_close(sam2.prompt_encoder.shared_embedding.positional_embedding,
                               sam2.shared_image_embedding.positional_embedding)
    image = np.zeros((128, 128, 3), dtype=np.uint8)
    assert policy.segment([image], ["a small red circle in the center"])[0].shape == (128, 128)


# ----------------------------------------------------------------------------- SAM2 stage

def test_tie_positional_embeddings_makes_point_and_image_encodings_agree():
    model, _ = _fresh_tiny()
    sam2 = model.grounding_encoder
    assert tie_positional_embeddings(sam2) is True
    assert tie_positional_embeddings(sam2) is False
    # A point at the centre of image-embedding cell (r, c) now encodes exactly as that cell.
    size = sam2.prompt_encoder.image_embedding_size[0]
    cell = sam2.config.prompt_encoder_config.image_size / size
    image_pe = sam2.get_image_wide_positional_embeddings()[0]  # (D, h, w)
    r, c = 2, 5
    point = torch.tensor([[(c + 0.5) * cell - 0.5, (r + 0.5) * cell - 0.5]])  # the encoder adds 0.5
    label_embed = sam2.prompt_encoder.point_embed.weight[1]
    torch.testing.assert_close(point_prompt_embeddings(sam2, point)[0] - label_embed, image_pe[:, r, c])


def test_reset_gives_the_prompt_a_real_influence_on_the_mask():
    """N(0, 0.02) init leaves the decoder's logits (and the prompt's effect on them) near zero;
    PyTorch's default init makes two different prompts give clearly different masks."""
    model, _ = _fresh_tiny()
    model.config.multimask_output = False
    sam2 = model.grounding_encoder
    pixels = torch.randn(1, 3, 128, 128)

    def prompt_effect():
        with torch.no_grad():
            features = model.get_sam2_features(pixels)
            points = torch.tensor([[10.0, 10.0], [110.0, 110.0]])
            logits, _, _ = model.decode_sam2_masks(features, torch.tensor([0, 0]),
                                                   point_prompt_embeddings(sam2, points))
        return float((logits[0] - logits[1]).abs().mean())

    before = prompt_effect()
    assert reset_sam2_parameters(sam2) > 10
    tie_positional_embeddings(sam2)
    after = prompt_effect()
    assert before < 1e-3 and after > 100 * before, (before, after)


def test_hard_negative_weights():
    others = [np.array([[True, False]]), np.array([[False, False]])]
    weights = hard_negative_weights(others, 3.0)
    torch.testing.assert_close(weights, torch.tensor([[[3.0, 1.0]], [[1.0, 1.0]]]))
    assert hard_negative_weights(others, 1.0) is None
    # The weighted BCE charges a false positive on another object three times as much.
    logits = torch.full((1, 1, 2), 2.0)
    target = torch.zeros(1, 1, 2)
    plain = mask_bce_loss(logits, target)
    torch.testing.assert_close(mask_bce_loss(logits, target, weights[:1]), plain * 2.0)


def test_interior_point_lies_in_the_mask():
    ring = np.zeros((20, 20), dtype=bool)
    ring[2:18, 2:18] = True
    ring[6:14, 6:14] = False
    x, y = interior_point(ring)
    assert ring[int(y), int(x)]


def test_scene_stream_hard_negatives():
    stream = SceneStream(seed=0, multi_shape_fraction=1.0)
    assert all(len(stream.next_scene().masks) >= 2 for _ in range(10))


def test_prompt_following_trains_sam2_only_and_restores_flags():
    model, _ = _fresh_tiny()
    model.config.multimask_output = False
    for p in model.text_hidden_fcs.parameters():
        p.requires_grad_(False)
    llm_before = _params(model, "language_model.")
    decoder_before = _params(model, "grounding_encoder.mask_decoder.")
    stats = pretrain_prompt_following(model, SceneStream(seed=0), steps=2, batch_size=2, log_every=1, progress=False)
    assert stats["steps"] == 2 and math.isfinite(stats["final_loss"])
    params = dict(model.named_parameters())
    assert all(torch.equal(p, params[n]) for n, p in llm_before.items())
    assert any(not torch.equal(p, params[n]) for n, p in decoder_before.items())
    assert not any(p.requires_grad for p in model.text_hidden_fcs.parameters())
    loss, parts = prompt_following_loss(model, SceneStream(seed=1).batch(2), np.random.default_rng(0))
    assert loss.requires_grad and 0.0 <= parts["iou"] <= 1.0


@pytest.mark.slow
def test_prompt_following_stage_learns_to_follow_points():
    """After a short stage, a point on one shape of a multi-shape image selects that shape:
    IoU with the target beats IoU with the union of all shapes (segment-everything)."""
    model, _ = _fresh_tiny()
    model.config.multimask_output = False
    pretrain_prompt_following(model, SceneStream(seed=0, multi_shape_fraction=1.0), steps=500, batch_size=8,
                              learning_rate=1e-3, negative_weight=3.0, reset_parameters=True, progress=False)
    from sa2va_trl.models.image_processing import load_rgb_image, sam_pixel_values

    model.eval()
    stream = SceneStream(seed=99, multi_shape_fraction=1.0)
    target_ious, union_ious = [], []
    with torch.no_grad():
        for scene in stream.batch(16):
            pixels = sam_pixel_values(load_rgb_image(scene.image), 128)[None]
            features = model.get_sam2_features(pixels)
            union = np.any(scene.masks, axis=0)
            for mask in scene.masks:
                embedding = point_prompt_embeddings(model.grounding_encoder, torch.tensor([interior_point(mask)]))
                low, _, _ = model.decode_sam2_masks(features, torch.tensor([0]), embedding)
                pred = torch.nn.functional.interpolate(low[:, None], size=mask.shape, mode="bilinear")[0, 0].numpy() > 0
                target_ious.append((pred & mask).sum() / max(1, (pred | mask).sum()))
                union_ious.append((pred & union).sum() / max(1, (pred | union).sum()))
    assert np.mean(target_ious) > 0.6 and np.mean(target_ious) > np.mean(union_ious), (
        np.mean(target_ious), np.mean(union_ious))


def test_lr_schedule_follows_steps_or_wall_time():
    assert sft._lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert sft._lr_factor(10, 100, 10) == pytest.approx(1.0)
    assert sft._lr_factor(100, 100, 10) == pytest.approx(0.1)
    # Half the steps but all of the time budget: fully decayed.
    assert sft._lr_factor(55, 100, 10, time_progress=1.0) == pytest.approx(0.1)


def test_tiny_warm_start_path_points_into_the_package(monkeypatch, tmp_path):
    monkeypatch.setattr(sft, "TINY_WARM_DIR", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="recipes/demo_sft.yaml"):
        sft.tiny_warm_start_path()
    (tmp_path / "missing").mkdir()
    (tmp_path / "missing" / "model.safetensors").write_bytes(b"")
    assert sft.tiny_warm_start_path() == str(tmp_path / "missing")
