"""Sa2VAGRPOTrainer on the tiny model: both loops, TRL's settings honoured, log-probs consistent, clear errors."""

from __future__ import annotations

import contextlib
import os
import re
import zlib

import numpy as np
import pytest
import torch

from sa2va_trl.config import CAPTION_TO_MASK, MASK_TO_CAPTION, Sa2VAGRPOConfig
from sa2va_trl.data.synthetic import shapes_dataset
from sa2va_trl.models.tiny import build_tiny_model
from sa2va_trl.trainer import (
    SAMPLE_INDEX_KEY,
    EMAReversePolicy,
    Sa2VAGRPOTrainer,
    Sa2VARowError,
    _EMAReference,
    likelihood_advantages,
    rank_advantages,
)

G = 4


def hash_reward(prompts, completions, completion_ids, **kwargs):
    """A deterministic reward that differs between completions, so advantages are non-zero."""
    return [zlib.crc32(str(ids).encode()) % 1000 / 1000 for ids in completion_ids]


def make_trainer(tmp_path, rewards=None, dataset=None, model_and_tokenizer=None, **overrides):
    model, tokenizer = model_and_tokenizer or build_tiny_model(seed=0)
    model.train()
    settings = dict(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=2 * G,
        num_generations=G,
        max_steps=2,
        logging_steps=1,
        max_completion_length=8,
        learning_rate=1e-3,
        report_to=[],
        save_strategy="no",
        beta=0.04,
        disable_tqdm=True,
    )
    settings.update(overrides)
    args = Sa2VAGRPOConfig(**settings)
    rewards = rewards or {MASK_TO_CAPTION: [hash_reward], CAPTION_TO_MASK: [hash_reward]}
    dataset = dataset if dataset is not None else shapes_dataset(4, seed=0)
    return Sa2VAGRPOTrainer(model=model, reward_funcs=rewards, args=args, train_dataset=dataset,
                            processing_class=tokenizer)


def generation_batch(trainer):
    """One local generation batch of rows, as TRL's dataloader yields it (each row G times, contiguous)."""
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    return batch


def test_two_steps_both_loops_change_parameters_and_log_loop_metrics(tmp_path):
    trainer = make_trainer(tmp_path)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    changed = [n for n, p in trainer.model.named_parameters() if p.requires_grad and not torch.equal(before[n], p)]
    assert any(n.startswith("language_model") for n in changed)
    assert trainer.state.global_step == 2
    logged = {k for entry in trainer.state.log_history for k in entry}
    for loop in (MASK_TO_CAPTION, CAPTION_TO_MASK):
        for metric in ("reward_mean", "reward_std", "frac_reward_zero_std", "advantage_std"):
            assert f"loops/{loop}/{metric}" in logged
        assert f"rewards/{loop}/hash_reward/mean" in logged
    for metric in ("kl", "advantages/std", "frac_reward_zero_std", f"loops/{CAPTION_TO_MASK}/frac_no_seg", "ema/decay"):
        assert metric in logged


def test_beta_uses_the_ema_as_reference_without_loading_from_disk(tmp_path):
    trainer = make_trainer(tmp_path, beta=0.1)
    assert isinstance(trainer.ref_model, _EMAReference)
    assert trainer.beta == 0.1 and trainer.args.beta == 0.1
    trainer_without = make_trainer(tmp_path, beta=0.0)
    assert trainer_without.ref_model is None
    trainer_without.train()
    logged = {k for entry in trainer_without.state.log_history for k in entry}
    assert "kl" not in logged


def test_num_iterations_and_gradient_accumulation_reuse_one_generation(tmp_path):
    trainer = make_trainer(tmp_path, num_iterations=2, gradient_accumulation_steps=2, steps_per_generation=2,
                           per_device_train_batch_size=G)
    calls = []
    rollout = trainer._rollout
    trainer.rollout_func = lambda prompts, t: calls.append(len(prompts)) or rollout(prompts, t)
    trainer.train()
    # 2 optimizer steps x 2 micro-batches = 4 micro-steps = steps_per_generation x num_iterations: one generation
    assert calls == [2 * G]
    assert trainer.state.global_step == 2
    logged = [entry for entry in trainer.state.log_history if "clip_ratio/region_mean" in entry]
    assert logged, "the clipped loss ran"


def test_sampling_logprobs_equal_training_logprobs_in_shuffled_order(tmp_path):
    trainer = make_trainer(tmp_path, mask_action=False)
    trainer.ema.attach(trainer.model)
    output = trainer._generate_and_score_completions(generation_batch(trainer))
    sampled = output["sampling_per_token_logps"]
    mask = output["completion_mask"].bool()
    order = torch.randperm(sampled.shape[0])
    input_ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)[order]
    attention = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)[order]
    trainer._active_samples = output[SAMPLE_INDEX_KEY][order]
    logps, entropies, _ = trainer._get_per_token_logps_and_entropies(
        trainer.model, input_ids, attention, output["completion_ids"].shape[1], compute_entropy=True
    )
    trainer._active_samples = None
    torch.testing.assert_close(logps[mask[order]], sampled[order][mask[order]], atol=2e-4, rtol=1e-4)
    assert entropies.shape == logps.shape and (entropies[mask[order]] > 0).all()


def test_old_and_reference_logprobs_come_in_chunks_of_trls_batch_size(tmp_path):
    """TRL passes `batch_size` for the old / reference log-probs of a whole generation batch: the rows then go through
    the model that many at a time (smaller peak), with the same log-probs as one pass, mask action included."""
    trainer = make_trainer(tmp_path, mask_action=True)
    trainer.ema.attach(trainer.model)
    output = trainer._generate_and_score_completions(generation_batch(trainer))
    input_ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
    attention = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
    steps = output["completion_ids"].shape[1]
    calls = []
    original = trainer.policy.completion_logprobs
    trainer.policy.completion_logprobs = lambda batch, *a, **k: calls.append(len(batch)) or original(batch, *a, **k)
    with torch.no_grad():
        whole, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, attention, steps)
        whole_calls, calls[:] = list(calls), []
        chunked, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, attention, steps,
                                                                   batch_size=3)
    assert sum(whole_calls) == sum(calls) == input_ids.shape[0] and max(calls) <= 3 < max(whole_calls)
    mask = output["completion_mask"].bool()
    torch.testing.assert_close(chunked[mask], whole[mask], atol=1e-5, rtol=1e-5)


def test_scale_rewards_none_and_loop_weights_shape_advantages(tmp_path):
    trainer = make_trainer(tmp_path, scale_rewards="none", caption_to_mask_weight=0.5)
    trainer.ema.attach(trainer.model)
    batch = generation_batch(trainer)
    output = trainer._generate_and_score_completions(batch)
    rewards = (trainer._last_rewards_per_func * trainer.reward_weights).nansum(dim=1)
    expected = rewards - rewards.view(-1, G).mean(dim=1).repeat_interleave(G)  # "none": centred, not scaled
    weights = torch.tensor([0.5 if row["task"] == CAPTION_TO_MASK else 1.0 for row in batch])
    torch.testing.assert_close(output["advantages"], expected * weights)


def length_reward(prompts, completions, completion_ids, **kwargs):
    """A second reward on another scale (tens), for the multi-reward aggregation."""
    return [10.0 * len(ids) for ids in completion_ids]


def test_normalize_then_sum_normalizes_each_reward_per_group_before_the_weights(tmp_path):
    """TRL's `multi_objective_aggregation: normalize_then_sum` keeps its meaning with two loops: each reward is
    z-scored within its group (the other loop's rewards are NaN there and left out), weighted, summed, and the
    sums normalised over the batch; then the loop weights."""
    rewards = {MASK_TO_CAPTION: [hash_reward, length_reward], CAPTION_TO_MASK: [hash_reward]}
    trainer = make_trainer(tmp_path, rewards=rewards, multi_objective_aggregation="normalize_then_sum",
                           mask_to_caption_rewards=["cycle_iou", "caption_meteor"],  # 2 names for 2 weights
                           mask_to_caption_reward_weights=[1.0, 0.5], caption_to_mask_weight=0.5)
    trainer.ema.attach(trainer.model)
    batch = generation_batch(trainer)
    output = trainer._generate_and_score_completions(batch)
    per_func = trainer._last_rewards_per_func
    assert per_func.shape[1] == 3 and torch.isnan(per_func).any()
    grouped = per_func.view(-1, G, 3)
    mean = torch.nanmean(grouped, dim=1, keepdim=True)
    std = torch.sqrt(torch.nanmean((grouped - mean) ** 2, dim=1, keepdim=True) * G / (G - 1))
    z = ((grouped - mean) / (std + 1e-4)).view(-1, 3)
    summed = (z * trainer.reward_weights).nansum(dim=1)
    expected = (summed - summed.mean()) / (summed.std() + 1e-4)
    weights = torch.tensor([0.5 if row["task"] == CAPTION_TO_MASK else 1.0 for row in batch])
    torch.testing.assert_close(output["advantages"], expected * weights, rtol=1e-4, atol=1e-5)
    # length_reward alone is ~100x hash_reward's scale; summed first it would decide the sign of most advantages
    assert per_func[:, 1].nan_to_num().abs().max() > 10 * per_func[:, 0].nan_to_num().abs().max()


def test_rank_advantage_mode(tmp_path):
    trainer = make_trainer(tmp_path, advantage_mode="rank")
    trainer.ema.attach(trainer.model)
    output = trainer._generate_and_score_completions(generation_batch(trainer))
    rewards = (trainer._last_rewards_per_func * trainer.reward_weights).nansum(dim=1)
    torch.testing.assert_close(output["advantages"], rank_advantages(rewards, G))
    assert output["advantages"].abs().max() <= 1.0


def test_likelihood_advantage_mode(tmp_path):
    trainer = make_trainer(tmp_path, advantage_mode="likelihood", caption_to_mask_weight=0.5)
    trainer.ema.attach(trainer.model)
    batch = generation_batch(trainer)
    output = trainer._generate_and_score_completions(batch)
    rewards = (trainer._last_rewards_per_func * trainer.reward_weights).nansum(dim=1)
    means = rewards.view(-1, G).mean(dim=1).repeat_interleave(G)
    weights = torch.tensor([0.5 if row["task"] == CAPTION_TO_MASK else 1.0 for row in batch])
    assert (means > 0).all()
    torch.testing.assert_close(output["advantages"], (rewards - means) / means * weights)


def test_likelihood_advantages_by_hand():
    # 1 right in 4 pulls the right answer 3x; 3 right in 4 pull 1/3 each; nothing right: no signal; NaN left out
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, float("nan"), 0.5, 0.5, 1.0])
    expected = torch.tensor([3.0, -1, -1, -1, 1 / 3, 1 / 3, 1 / 3, -1, 0, 0, 0, 0, 0, -0.25, -0.25, 0.5])
    torch.testing.assert_close(likelihood_advantages(rewards, 4), expected)
    with pytest.raises(ValueError, match="sample 2 .* -0.5"):
        likelihood_advantages(torch.tensor([1.0, 0.5, -0.5, 0.0]), 4)


def test_negative_advantage_weight_scales_only_the_negative_advantages(tmp_path):
    trainer = make_trainer(tmp_path, scale_rewards="none", caption_to_mask_weight=0.5, negative_advantage_weight=0.25)
    trainer.ema.attach(trainer.model)
    batch = generation_batch(trainer)
    output = trainer._generate_and_score_completions(batch)
    rewards = (trainer._last_rewards_per_func * trainer.reward_weights).nansum(dim=1)
    centred = rewards - rewards.view(-1, G).mean(dim=1).repeat_interleave(G)
    assert (centred < 0).any() and (centred > 0).any()  # both signs occur, so the test can tell them apart
    weights = torch.tensor([0.5 if row["task"] == CAPTION_TO_MASK else 1.0 for row in batch])
    torch.testing.assert_close(output["advantages"], torch.where(centred < 0, 0.25 * centred, centred) * weights)


def test_relative_mask_action_sigma_scales_each_samples_noise_with_its_mu(tmp_path, monkeypatch):
    import sa2va_trl.trainer as trainer_module

    original, seen = trainer_module.sample_prompt_action, []

    def recording(mu, sigma, generator=None, relative=False):
        seen.append((mu.detach().clone(), relative))
        return original(mu, sigma, generator=generator, relative=relative)

    monkeypatch.setattr(trainer_module, "sample_prompt_action", recording)
    # the warm start answers with [SEG] (the random tiny model does not, and its mu is then 0)
    import transformers

    from sa2va_trl.models.modeling_sa2va import Sa2VAModel
    from sa2va_trl.sft import tiny_warm_start_path

    warm = str(tiny_warm_start_path())
    trainer = make_trainer(tmp_path, loops=[CAPTION_TO_MASK], mask_action_sigma=0.5, mask_action_sigma_relative=True,
                           model_and_tokenizer=(Sa2VAModel.from_pretrained(warm),
                                                transformers.AutoTokenizer.from_pretrained(warm)))
    trainer.ema.attach(trainer.model)
    trainer._generate_and_score_completions(generation_batch(trainer))
    loop = trainer._generation.loops[CAPTION_TO_MASK]
    assert len(seen) == 1 and seen[0][1] is True
    mu = seen[0][0]
    assert loop.has_seg.all()
    torch.testing.assert_close(loop.seg_scale, 0.5 * mu.pow(2).mean(dim=-1).sqrt())
    assert loop.seg_scale.std() > 0  # per sample, not one fixed sigma


def test_rank_advantages_by_hand():
    rewards = torch.tensor([0.1, 0.9, 0.5, 0.5, 1.0, 1.0, 1.0, 1.0, 0.0, float("nan"), 2.0, 1.0])
    expected = [-1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, 1.0, 0.0]
    assert rank_advantages(rewards, 4).tolist() == expected


def test_a_raising_reward_stops_with_an_error_naming_reward_and_row(tmp_path):
    def fragile(prompts, completions, completion_ids, source_id, **kwargs):
        return [1.0 / len(s.split("/")[2].strip("0123456789")) for s in source_id]  # ZeroDivisionError

    trainer = make_trainer(tmp_path, rewards={MASK_TO_CAPTION: [fragile], CAPTION_TO_MASK: [fragile]})
    with pytest.raises(Sa2VARowError) as info:
        trainer.train()
    message = str(info.value)
    assert "/fragile'" in message and "ZeroDivisionError" in message
    assert re.search(r"dataset row \d+ \(task '\w+', source_id 'shapes/train/\d', region_index \d\)", message)


def test_a_corrupt_row_stops_with_an_error_naming_row_and_field(tmp_path):
    from sa2va_trl.data.schema import encode_mask

    dataset = shapes_dataset(2, seed=0)
    small = np.zeros((64, 64), dtype=bool)
    small[10:40, 10:40] = True  # a region mask half the image's size
    dataset = dataset.map(lambda row: {"region_mask": encode_mask(small)}, features=dataset.features)
    trainer = make_trainer(tmp_path, dataset=dataset, loops=[MASK_TO_CAPTION])
    with pytest.raises(Sa2VARowError, match=r"dataset row \d+ .*source_id 'shapes/train/\d'.*region_mask"):
        trainer.train()


def test_mask_action_adds_the_tempered_gaussian_log_density_at_the_seg_token(tmp_path):
    from sa2va_trl.trainer import _LoopRollout

    trainer = make_trainer(tmp_path, mask_action_sigma=0.5)
    policy = trainer.policy
    hidden = torch.randn(2, trainer.model.config.llm_config.hidden_size, requires_grad=True)
    mu = policy.seg_embeddings(hidden).detach()
    action = mu + 0.5 * torch.randn_like(mu)
    loop = _LoopRollout(batch=None, positions=[0, 1], seg_action=action, seg_scale=torch.full((2,), 0.5),
                        has_seg=torch.tensor([True, False]))
    seg = trainer.seg_token_id
    completion_ids = torch.tensor([[5, 6, seg, 7], [5, seg, 6, 7]])
    out = type("Out", (), {"seg_hidden": hidden})()
    logps = trainer._add_mask_action_logdensity(torch.zeros(2, 4), out, loop, [0, 1], completion_ids)
    expected = -0.5 * ((action[0] - mu[0]) / 0.5).pow(2).mean()
    torch.testing.assert_close(logps[0, 2], expected)
    assert logps[0, [0, 1, 3]].abs().sum() == 0 and logps[1].abs().sum() == 0  # row 1 has no recorded [SEG]
    logps.sum().backward()
    fcs = [p.grad for p in trainer.model.text_hidden_fcs.parameters()]
    assert hidden.grad is not None and any(g is not None and g.abs().sum() > 0 for g in fcs)


def test_reverse_policy_scores_degenerate_inputs_lowest_instead_of_failing():
    model, tokenizer = build_tiny_model(seed=0)
    from sa2va_trl.models.adapter import Sa2VAPolicy

    host = type("Host", (), {})()
    host.policy = Sa2VAPolicy(model, tokenizer)
    host.reverse_model = contextlib.nullcontext
    reverse = EMAReversePolicy(host)
    row = shapes_dataset(1, seed=0)[0]
    image = row["img"]
    empty = np.zeros((image.height, image.width), dtype=bool)
    captions = reverse.caption([image, image], [empty, row["region_mask"]])
    assert captions[0] == "" and isinstance(captions[1], str)
    masks = reverse.segment([image, image], ["", "a red circle"])
    assert masks[0].shape == (image.height, image.width) and not masks[0].any()
    assert masks[1].shape == (image.height, image.width)


def test_evaluation_inside_training_picks_the_best_checkpoint(tmp_path):
    from sa2va_trl.ema import EMA_CONFIG_NAME

    model, tokenizer = build_tiny_model(seed=0)
    model.train()
    args = Sa2VAGRPOConfig(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, per_device_train_batch_size=2 * G, num_generations=G,
        max_steps=2, logging_steps=1, max_completion_length=6, learning_rate=1e-3, report_to=[], disable_tqdm=True,
        eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1, load_best_model_at_end=True,
        metric_for_best_model="eval_meteor",
    )
    trainer = Sa2VAGRPOTrainer(model=model, reward_funcs={MASK_TO_CAPTION: [hash_reward], CAPTION_TO_MASK: [hash_reward]},
                               args=args, train_dataset=shapes_dataset(4, seed=0),
                               eval_dataset=shapes_dataset(2, seed=0, split="validation"), processing_class=tokenizer)
    trainer.train()
    evals = [entry for entry in trainer.state.log_history if "eval_mean_iou" in entry]
    assert [entry["step"] for entry in evals] == [1, 2]
    for key in ("eval_meteor", "eval_exact_match", "eval_accuracy/colour", "eval_precision@0.5", "eval_caption_prob",
                "eval_caption_prob/shape"):
        assert 0.0 <= evals[-1][key] <= 1.0
    assert evals[-1]["eval_caption_nll_per_token"] > 1.0  # a random tiny model: about uniform over its vocabulary
    assert trainer.state.best_model_checkpoint is not None
    assert os.path.isfile(os.path.join(trainer.state.best_model_checkpoint, EMA_CONFIG_NAME))  # EMA saved with it
    train_entries = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all("loops/mask_to_caption/reward_mean" in e or "loops/caption_to_mask/reward_mean" in e
               for e in train_entries)


def test_lora_trains_adapters_and_the_chosen_parts_only(tmp_path):
    import types

    from sa2va_trl.grpo import build_peft_config, set_trainable_parts

    model, tokenizer = build_tiny_model(seed=0)
    model.train()
    script = types.SimpleNamespace(train_mlp1=True, train_text_hidden_fcs=True, train_mask_decoder=True,
                                   train_language_model=True)
    model_args = types.SimpleNamespace(use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                                       lora_target_modules=None, lora_modules_to_save=None, use_rslora=False,
                                       use_dora=False)
    set_trainable_parts(model, script, use_peft=True)
    args = Sa2VAGRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, per_device_train_batch_size=2 * G,
                           num_generations=G, max_steps=1, max_completion_length=6, learning_rate=1e-2,
                           report_to=[], save_strategy="no", disable_tqdm=True)
    trainer = Sa2VAGRPOTrainer(model=model, reward_funcs={MASK_TO_CAPTION: [hash_reward], CAPTION_TO_MASK: [hash_reward]},
                               args=args, train_dataset=shapes_dataset(4, seed=0), processing_class=tokenizer,
                               peft_config=build_peft_config(model_args, script))
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert any("language_model" in n and "lora_A" in n for n in trainable)
    assert any("mlp1.1.lora_A" in n for n in trainable)
    assert any("text_hidden_fcs" in n for n in trainable) and any("mask_decoder" in n for n in trainable)
    assert not any("vision_model" in n or "lora" not in n and "language_model" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if n in trainable}
    trainer.train()
    changed = [n for n, p in trainer.model.named_parameters() if n in trainable and not torch.equal(before[n], p)]
    assert any("lora_B" in n and "language_model" in n for n in changed)


def test_reference_logprobs_come_from_the_ema_weights(tmp_path):
    trainer = make_trainer(tmp_path, beta=0.1, mask_action=False)
    trainer.ema.attach(trainer.model)  # shadow = current weights
    batch = generation_batch(trainer)
    output = trainer._generate_and_score_completions(batch)
    mask = output["completion_mask"].bool()
    torch.testing.assert_close(output["ref_per_token_logps"][mask], output["sampling_per_token_logps"][mask],
                               atol=2e-4, rtol=1e-4)
    live = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    name = next(n for n in trainer.ema.shadow if n.startswith("language_model") and "lm_head" in n)
    trainer.ema.shadow[name].mul_(0.0)  # an EMA whose output head is zero: uniform next-token distribution
    output = trainer._generate_and_score_completions(batch)
    vocab = trainer.model.config.llm_config.vocab_size
    ref = output["ref_per_token_logps"][output["completion_mask"].bool()]
    torch.testing.assert_close(ref, torch.full_like(ref, -float(np.log(vocab))), atol=1e-4, rtol=1e-4)
    for n, p in trainer.model.named_parameters():  # the live weights are back, bit for bit
        assert torch.equal(p, live[n]), n


def test_resume_from_a_checkpoint_continues_with_the_saved_ema(tmp_path):
    first = make_trainer(tmp_path, max_steps=2, save_strategy="steps", save_steps=2, ema_decay=0.5)
    first.train()
    saved_shadow = {n: t.clone() for n, t in first.ema.shadow.items()}
    second = make_trainer(tmp_path, max_steps=3, save_strategy="no", ema_decay=0.5,
                          resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    seen = {}
    original = second.ema.update

    def spy(model=None, step=None):
        seen.setdefault("before", {n: t.clone() for n, t in second.ema.shadow.items()})
        return original(model, step)

    second.ema.update = spy
    second.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert second.state.global_step == 3
    for n, t in saved_shadow.items():
        torch.testing.assert_close(seen["before"][n], t)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
def test_trl_loss_types_run_on_the_adapter_logprobs(tmp_path, loss_type):
    trainer = make_trainer(tmp_path, beta=0.0, mask_action=False, loss_type=loss_type)
    trainer.ema.attach(trainer.model)
    output = trainer._generate_and_score_completions(generation_batch(trainer))
    trainer.current_gradient_accumulation_steps = 1
    loss = trainer._compute_loss(trainer.model, output)
    mask = output["completion_mask"].float()
    adv = output["advantages"].unsqueeze(1)
    # ratio 1 at the sampling weights, so the per-token loss is -A; each loss type aggregates it its own way
    expected = {
        "grpo": ((-adv * mask).sum(1) / mask.sum(1).clamp(min=1)).mean(),
        "bnpo": (-adv * mask).sum() / mask.sum(),
        "dr_grpo": (-adv * mask).sum() / (mask.shape[0] * trainer.max_completion_length),
    }[loss_type]
    torch.testing.assert_close(loss.detach(), expected, atol=1e-5, rtol=1e-4)
    loss.backward()
    assert trainer.model.language_model.lm_head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("mask_action,pixel_action", [(False, False), (True, False), (False, True)])
def test_identical_seg_answers_give_distinct_masks_only_with_a_mask_action(tmp_path, mask_action, pixel_action):
    from sa2va_trl.models.adapter import Rollout
    from sa2va_trl.trainer import _LoopRollout

    # a hot pixel action: the random tiny decoder's logits are near 0 only on few pixels
    trainer = make_trainer(tmp_path, mask_action=mask_action, mask_pixel_action=pixel_action, mask_pixel_temperature=50.0)
    row = shapes_dataset(1, seed=0)[0]
    batch = trainer.policy.segmentation_prompts([row["img"]], [row["caption"]]).repeat(8)
    hidden = torch.randn(1, trainer.model.config.llm_config.hidden_size).repeat(8, 1)  # 8 identical [SEG] states
    rollout = Rollout(batch=batch, completion_ids=None, completion_mask=None, logprobs=None, seg_hidden=hidden,
                      has_seg=torch.ones(8, dtype=torch.bool), is_truncated=None, completions=[""] * 8,
                      num_generations=8)
    with torch.no_grad():
        masks = trainer._decode_loop2_masks(rollout, _LoopRollout(batch=batch, positions=list(range(8))))
    distinct = {m.tobytes() for m in masks}
    # without an action the group's masks, hence rewards, are equal
    assert (len(distinct) > 1) == (mask_action or pixel_action)


def test_pixel_action_log_probability_reaches_the_mask_decoder(tmp_path):
    """The prompt action trains text_hidden_fcs only; the pixel action's log-prob is what trains the SAM2 decoder."""
    from sa2va_trl.mask_actions import pixel_action_logprob
    from sa2va_trl.models.adapter import Rollout
    from sa2va_trl.trainer import _LoopRollout

    trainer = make_trainer(tmp_path, mask_action=False, mask_pixel_action=True, mask_pixel_temperature=5.0)
    row = shapes_dataset(1, seed=0)[0]
    batch = trainer.policy.segmentation_prompts([row["img"]], [row["caption"]]).repeat(2)
    hidden = torch.randn(1, trainer.model.config.llm_config.hidden_size).repeat(2, 1)
    rollout = Rollout(batch=batch, completion_ids=None, completion_mask=None, logprobs=None, seg_hidden=hidden,
                      has_seg=torch.tensor([True, False]), is_truncated=None, completions=[""] * 2, num_generations=2)
    loop = _LoopRollout(batch=batch, positions=[0, 1])
    with torch.no_grad():
        masks = trainer._decode_loop2_masks(rollout, loop)
    assert masks[0].shape == np.asarray(row["img"]).shape[:2] and not masks[1].any()  # no [SEG]: empty mask
    assert all(np.array_equal(m, a.numpy()) for m, a in zip(masks, loop.pixel_action))  # rewards see the action

    seg = trainer.seg_token_id
    completion_ids = torch.tensor([[5, seg, 6], [5, 6, 7]])
    hidden_grad = hidden.clone().requires_grad_(True)
    out = type("Out", (), {"seg_hidden": hidden_grad})()
    logps = trainer._add_mask_action_logdensity(torch.zeros(2, 3), out, loop, [0, 1], completion_ids)
    decoded = trainer.policy.decode_masks(batch, trainer.policy.seg_embeddings(hidden).detach())
    expected = pixel_action_logprob(decoded.mask_logits[:1], loop.pixel_action[:1], 5.0)[0]
    torch.testing.assert_close(logps[0, 1], expected)
    assert logps[0, [0, 2]].abs().sum() == 0 and logps[1].abs().sum() == 0
    logps.sum().backward()
    decoder_grads = [p.grad for p in trainer.model.grounding_encoder.mask_decoder.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in decoder_grads)
    assert hidden_grad.grad is not None and hidden_grad.grad.abs().sum() > 0  # and, through mu, the [SEG] state


def test_relative_pixel_temperature_is_kept_per_sample_and_used_by_the_training_forward(tmp_path):
    from sa2va_trl.mask_actions import pixel_action_logprob
    from sa2va_trl.models.adapter import Rollout
    from sa2va_trl.trainer import _LoopRollout

    import transformers

    from sa2va_trl.models.modeling_sa2va import Sa2VAModel
    from sa2va_trl.sft import tiny_warm_start_path

    warm = str(tiny_warm_start_path())  # the random tiny decoder's logits are ~1e-5, below the scale's floor
    trainer = make_trainer(tmp_path, mask_action=False, mask_pixel_action=True, mask_pixel_temperature=0.1,
                           mask_pixel_temperature_relative=True,
                           model_and_tokenizer=(Sa2VAModel.from_pretrained(warm),
                                                transformers.AutoTokenizer.from_pretrained(warm)))
    row = shapes_dataset(1, seed=0)[0]
    batch = trainer.policy.segmentation_prompts([row["img"]], [row["caption"]]).repeat(2)
    hidden = torch.randn(2, trainer.model.config.llm_config.hidden_size)  # two [SEG] states, two logit scales
    rollout = Rollout(batch=batch, completion_ids=None, completion_mask=None, logprobs=None, seg_hidden=hidden,
                      has_seg=torch.ones(2, dtype=torch.bool), is_truncated=None, completions=[""] * 2,
                      num_generations=2)
    loop = _LoopRollout(batch=batch, positions=[0, 1])
    with torch.no_grad():
        trainer._decode_loop2_masks(rollout, loop)
        decoded = trainer.policy.decode_masks(batch, trainer.policy.seg_embeddings(hidden))
    expected = [0.1 * logits.abs().mean().item() for logits in decoded.mask_logits]
    assert loop.pixel_temperature == pytest.approx(expected) and expected[0] != pytest.approx(expected[1])
    seg = trainer.seg_token_id
    out = type("Out", (), {"seg_hidden": hidden})()
    logps = trainer._add_mask_action_logdensity(torch.zeros(2, 2), out, loop, [0, 1], torch.tensor([[seg, 5]] * 2))
    torch.testing.assert_close(logps[:, 0], pixel_action_logprob(decoded.mask_logits, loop.pixel_action, expected))


def test_frozen_encoders_run_once_per_unique_image_per_step(tmp_path):
    """Rollouts, the reverse model (EMA swapped in), the training and reference forwards share one encoding."""
    from sa2va_trl.rewards.registry import get_reward

    rewards = {MASK_TO_CAPTION: [get_reward("cycle_iou")], CAPTION_TO_MASK: [get_reward("cycle_meteor"), hash_reward]}
    trainer = make_trainer(tmp_path, rewards=rewards, max_steps=1)
    trainer.model.vision_model.requires_grad_(False)
    trainer.model.grounding_encoder.vision_encoder.requires_grad_(False)
    trainer.ema.attach(trainer.model)
    unique = set()
    generate = trainer._generate_and_score_completions

    def recording(inputs):
        unique.update(row["img"].tobytes() for row in inputs)
        return generate(inputs)

    trainer._generate_and_score_completions = recording
    trainer.policy.reset_counters()
    trainer.train()
    counters = trainer.policy.counters
    assert unique and counters["vision_images"] == len(unique)
    assert 0 < counters["sam_encoder_images"] <= len(unique)


def test_switching_a_loop_off_ignores_its_recipe_reward_weights(tmp_path):
    """`--loops mask_to_caption` on a recipe that also weights loop 2's rewards trains loop 1 alone."""
    trainer = make_trainer(tmp_path, loops=[MASK_TO_CAPTION], mask_to_caption_reward_weights=[0.7],
                           caption_to_mask_reward_weights=[1.0, 0.5], rewards={MASK_TO_CAPTION: [hash_reward]})
    assert trainer.reward_weights.tolist() == pytest.approx([0.7])


def test_training_forward_scores_each_row_with_its_own_prompt_after_trls_shuffle(tmp_path):
    """In the loss, every row's log-probs (recomputed through the adapter) equal the ones recorded while sampling
    it: TRL's shuffle and split of the generation batch keep completions, prompts and advantages together."""
    from sa2va_trl import trainer as trainer_module

    # learning rate 0: the second micro-batch is scored by the same weights that sampled it (otherwise the
    # difference is the policy's update, which TRL's importance ratio accounts for)
    trainer = make_trainer(tmp_path, loops=[MASK_TO_CAPTION], mask_action=False, steps_per_generation=2,
                           per_device_train_batch_size=G, max_steps=2, dataset=shapes_dataset(6, seed=1),
                           learning_rate=0.0)
    checked = []
    compute_loss = trainer_module.Sa2VAGRPOTrainer._compute_loss

    def spy(self, model, inputs):
        self._active_samples = inputs[SAMPLE_INDEX_KEY]
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        with torch.no_grad():
            logps, _, _ = self._get_per_token_logps_and_entropies(model, ids, mask, inputs["completion_ids"].shape[1])
        self._active_samples = None
        sampled = inputs["sampling_per_token_logps"]
        torch.testing.assert_close(logps * inputs["completion_mask"], sampled * inputs["completion_mask"],
                                   atol=1e-4, rtol=0)
        checked.append(inputs[SAMPLE_INDEX_KEY].tolist())
        return compute_loss(self, model, inputs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer_module.Sa2VAGRPOTrainer, "_compute_loss", spy)
        trainer.train()
    assert len(checked) == 2 and sorted(checked[0] + checked[1]) == list(range(2 * G))  # both halves, all rows
    assert checked[0] + checked[1] != list(range(2 * G))  # and they were shuffled


# --- what ZeRO-3 relies on, checked in one process ------------------------------------------------------------------


def test_per_sample_seeds_make_a_rank_sample_what_one_process_samples(tmp_path, monkeypatch):
    """Rank 1 of 2, holding the second half of the global generation batch, samples exactly those rows of a
    single-process rollout over the whole batch: tokens and mask actions (hence masks)."""
    trainer = make_trainer(tmp_path, per_sample_seeds=True, max_completion_length=10)
    trainer.ema.attach(trainer.model)
    batch = generation_batch(trainer)  # 2 groups of G
    assert batch[0]["row_id"] != batch[G]["row_id"]

    def rollout(inputs):
        trainer._rollout_inputs = inputs
        try:
            return trainer._rollout([row["prompt"] for row in inputs])
        finally:
            trainer._rollout_inputs = None

    torch.manual_seed(1)
    whole = rollout(batch)
    torch.manual_seed(2)  # another global RNG state: it must not matter
    monkeypatch.setattr(type(trainer.accelerator), "process_index", property(lambda self: 1))
    half = rollout(batch[G:])
    assert half["completion_ids"] == whole["completion_ids"][G:]
    for i, mask in enumerate(half["pred_mask"]):
        if mask is not None:
            assert np.array_equal(mask, whole["pred_mask"][G + i])
    monkeypatch.setattr(type(trainer.accelerator), "process_index", property(lambda self: 0))
    other = rollout(batch[G:])  # the same rows at other global positions: other samples
    assert other["completion_ids"] != half["completion_ids"]


def test_deepspeed_micro_batch_without_a_loop_runs_its_modules_with_zero_weight(tmp_path, monkeypatch):
    """Under DeepSpeed with several processes every rank must call the same modules in the same order (ZeRO-3
    gathers per module) and give gradients to the same parameters (gradient buckets). A micro-batch with loop-1
    rows only runs the loop-2 modules (LM forward + text_hidden_fcs) on one of its rows, times 0: the call sequence
    of a micro-batch with both loops, log-probs unchanged bit for bit, gradients unchanged, zero gradients where
    the plain path gives none."""
    trainer = make_trainer(tmp_path)  # mask action on
    trainer.model.vision_model.requires_grad_(False)  # frozen, as the recipes have it
    trainer.ema.attach(trainer.model)
    batch = next(b for b in trainer.get_train_dataloader() if len({row["task"] for row in b}) == 2)
    output = trainer._generate_and_score_completions(batch)
    tasks = trainer._generation.tasks
    loop1 = [i for i, task in enumerate(tasks) if task == MASK_TO_CAPTION]
    assert 0 < len(loop1) < len(tasks)
    model = trainer.model
    calls = []
    hooks = [module.register_forward_hook(lambda m, a, o, name=name: calls.append(name))
             for name, module in (("language_model", model.language_model), ("text_hidden_fcs", model.text_hidden_fcs))]
    input_ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
    attention = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)

    def run(rows, uniform):
        monkeypatch.setattr(Sa2VAGRPOTrainer, "uniform_forward", property(lambda self: uniform))
        model.zero_grad(set_to_none=True)
        calls.clear()
        index = torch.tensor(rows)
        trainer._active_samples = output[SAMPLE_INDEX_KEY][index]
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            model, input_ids[index], attention[index], output["completion_ids"].shape[1], compute_entropy=True
        )
        trainer._active_samples = None
        (logps * output["completion_mask"][index]).sum().backward()
        grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return logps.detach(), list(calls), grads

    both_calls = run(list(range(len(tasks))), uniform=False)[1]
    plain_logps, plain_calls, plain_grads = run(loop1, uniform=False)
    logps, uniform_calls, grads = run(loop1, uniform=True)
    for hook in hooks:
        hook.remove()
    assert both_calls == ["language_model", "language_model", "text_hidden_fcs"]
    assert plain_calls == ["language_model"] and uniform_calls == both_calls
    torch.testing.assert_close(logps, plain_logps, atol=0, rtol=0)
    fcs = [n for n in grads if n.startswith("text_hidden_fcs")]
    assert fcs and all(plain_grads[n] is None and not grads[n].any() for n in fcs)
    for name, grad in plain_grads.items():
        if grad is not None:
            # (the vision-token scatter's backward accumulates in a thread-dependent order: the plain path
            # itself differs from run to run in the last bits)
            torch.testing.assert_close(grads[name], grad, atol=1e-7, rtol=1e-4)


def test_zero3_refuses_rollouts_without_the_generation_gather(tmp_path, monkeypatch):
    monkeypatch.setattr(Sa2VAGRPOTrainer, "zero3", property(lambda self: True))
    with pytest.raises(ValueError, match="ds3_gather_for_generation"):
        make_trainer(tmp_path, ds3_gather_for_generation=False)


def test_evaluation_keeps_the_generation_features_and_runs_inside_one_gather(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, max_completion_length=6)
    trainer.model.vision_model.requires_grad_(False)
    trainer.ema.attach(trainer.model)
    trainer._generate_and_score_completions(generation_batch(trainer))
    cached = set(trainer.policy._feature_cache)
    assert cached
    entered = []
    gather = trainer.full_parameters

    @contextlib.contextmanager
    def recording():
        entered.append(True)
        with gather():
            yield

    monkeypatch.setattr(trainer, "full_parameters", recording)
    metrics = trainer.evaluate(shapes_dataset(2, seed=0, split="validation"))
    assert "eval_mean_iou" in metrics and entered == [True]
    assert set(trainer.policy._feature_cache) == cached


def test_text_hidden_fcs_learning_rate_trains_the_projection_in_its_own_group(tmp_path):
    # learning_rate 0 with its own rate for text_hidden_fcs: only the projection may move (weight decay is 0).
    trainer = make_trainer(tmp_path, learning_rate=0.0, text_hidden_fcs_learning_rate=1e-2, beta=0.0,
                           lr_scheduler_type="constant")
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    groups = [g for g in trainer.optimizer.param_groups if g.get("name") == "text_hidden_fcs"]
    assert groups and all(g["lr"] == 1e-2 for g in groups)
    changed = {n for n, p in trainer.model.named_parameters() if p.requires_grad and not torch.equal(before[n], p)}
    assert changed and all(n.startswith("text_hidden_fcs.") for n in changed), sorted(changed)
    assert {n for n in before if n.startswith("text_hidden_fcs.")} == changed
    logged = [entry["learning_rate/text_hidden_fcs"] for entry in trainer.state.log_history
              if "learning_rate/text_hidden_fcs" in entry]
    assert logged == [pytest.approx(1e-2)] * 2  # one per logged step (logging_steps 1, max_steps 2)


def test_text_hidden_fcs_learning_rate_must_be_a_number():
    with pytest.raises(ValueError, match="text_hidden_fcs_learning_rate"):
        Sa2VAGRPOConfig(output_dir="/tmp/x", use_cpu=True, text_hidden_fcs_learning_rate=float("nan"))
