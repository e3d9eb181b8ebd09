"""The loop-2 mask actions: samples follow their distributions and the log-probabilities are the right ones."""

from __future__ import annotations

import pytest
import torch

from sa2va_trl.mask_actions import (
    LOGPROB_FLOOR,
    flip_fraction,
    pixel_action_logprob,
    prompt_action_logprob,
    relative_pixel_temperatures,
    sample_pixel_action,
    sample_prompt_action,
)


def test_pixel_action_samples_each_pixel_with_its_sigmoid_probability():
    logits = torch.tensor([[-2.0, 0.0], [1.0, 3.0]])
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_pixel_action([logits], 1.0, generator=g)[0].float() for _ in range(4000)])
    torch.testing.assert_close(draws.mean(0), torch.sigmoid(logits), atol=0.03, rtol=0)
    hot = torch.stack([sample_pixel_action([logits], 4.0, generator=g)[0].float() for _ in range(4000)])
    torch.testing.assert_close(hot.mean(0), torch.sigmoid(logits / 4.0), atol=0.03, rtol=0)


def test_pixel_action_logprob_is_the_mean_bernoulli_log_probability_and_trains_the_logits():
    logits = torch.tensor([[-2.0, 0.5], [1.0, 3.0]], requires_grad=True)
    action = torch.tensor([[False, True], [False, True]])
    tau = 2.0
    p = torch.sigmoid(logits.detach() / tau)
    expected = torch.where(action, p.log(), (1 - p).log()).mean()
    value = pixel_action_logprob([logits], [action], tau)
    torch.testing.assert_close(value[0], expected)
    value.sum().backward()
    # d/dlogit of the mean log-prob = (action - p) / (tau * n): up where the sample said 1, down where it said 0
    torch.testing.assert_close(logits.grad, (action.float() - p) / (tau * 4))


def test_pixel_action_refuses_mismatched_sizes_and_bad_temperature():
    with pytest.raises(ValueError, match="differ in size"):
        pixel_action_logprob([torch.zeros(4, 4)], [torch.zeros(4, 5, dtype=torch.bool)], 1.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        sample_pixel_action([torch.zeros(2, 2)], 0.0)


def test_confident_logits_give_the_mode_and_the_flip_fraction_counts_departures():
    logits = torch.tensor([[-50.0, 50.0], [50.0, -50.0]])
    sample = sample_pixel_action([logits], 1.0)[0]
    assert torch.equal(sample, logits > 0)
    assert flip_fraction([logits], [sample]) == 0.0
    assert flip_fraction([logits], [~sample]) == 1.0
    assert pixel_action_logprob([logits], [~sample], 1.0)[0] == LOGPROB_FLOOR  # floored, not -50


def test_prompt_action_log_density_is_the_tempered_gaussian():
    mu = torch.randn(3, 8, requires_grad=True)
    action, scale = sample_prompt_action(mu.detach(), 0.5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(scale, torch.full((3,), 0.5))
    value = prompt_action_logprob(action, mu, scale)
    torch.testing.assert_close(value, -0.5 * ((action - mu.detach()) / 0.5).pow(2).mean(-1))
    value.sum().backward()
    torch.testing.assert_close(mu.grad, (action - mu.detach()) / (0.25 * 8))  # the score, divided by D


def test_relative_prompt_action_noise_scales_with_mu_so_a_larger_mu_cannot_drown_it():
    mu = torch.randn(2, 256)
    draws = [sample_prompt_action(k * mu, 0.5, generator=torch.Generator().manual_seed(3), relative=True)
             for k in (1.0, 10.0)]
    for k, (action, scale) in zip((1.0, 10.0), draws):
        torch.testing.assert_close(scale, 0.5 * (k * mu).pow(2).mean(-1).sqrt())
        relative_noise = ((action - k * mu).pow(2).mean(-1).sqrt() / (k * mu).pow(2).mean(-1).sqrt())
        torch.testing.assert_close(relative_noise, torch.full((2,), 0.5), atol=0.06, rtol=0)
    # the same draw, scaled: a 10x larger mu sees 10x the noise, unlike a fixed sigma
    torch.testing.assert_close(draws[1][0], 10.0 * draws[0][0])
    fixed = [sample_prompt_action(k * mu, 0.5, generator=torch.Generator().manual_seed(3))[0] - k * mu for k in (1.0, 10.0)]
    torch.testing.assert_close(fixed[0], fixed[1])


def test_pixel_action_with_one_generator_per_map_is_reproducible_per_map():
    logits = [torch.zeros(8, 8), torch.zeros(8, 8)]
    seeded = lambda s: torch.Generator().manual_seed(s)
    both = sample_pixel_action(logits, 1.0, generator=[seeded(1), seeded(2)])
    alone = sample_pixel_action(logits[1:], 1.0, generator=[seeded(2)])
    assert torch.equal(both[1], alone[0]) and not torch.equal(both[0], both[1])
    with pytest.raises(ValueError, match="1 generators for 2"):
        sample_pixel_action(logits, 1.0, generator=[seeded(1)])


def test_relative_pixel_temperature_makes_the_samples_blind_to_the_logit_scale():
    logits = torch.randn(16, 16) * 3
    temperatures = [relative_pixel_temperatures([k * logits], 0.1)[0] for k in (1.0, 10.0)]
    assert temperatures[0] == pytest.approx(0.1 * logits.abs().mean().item())
    assert temperatures[1] == pytest.approx(10 * temperatures[0])
    # scaling the logits up (the fixed-temperature shortcut to fewer flips) no longer changes what is sampled
    draws = [sample_pixel_action([k * logits], t, generator=torch.Generator().manual_seed(4))[0]
             for k, t in zip((1.0, 10.0), temperatures)]
    assert torch.equal(draws[0], draws[1])
    fixed = [sample_pixel_action([k * logits], 1.0, generator=torch.Generator().manual_seed(4))[0] for k in (1.0, 10.0)]
    assert flip_fraction([10 * logits], [fixed[1]]) < flip_fraction([logits], [fixed[0]])
    # one temperature per map, in sampling and in the log-probability
    maps, masks = [logits, 2 * logits], [draws[0], draws[0]]
    per_map = pixel_action_logprob(maps, masks, [1.0, 2.0])
    torch.testing.assert_close(per_map, pixel_action_logprob(maps[:1], masks[:1], 1.0).repeat(2))
    with pytest.raises(ValueError, match="1 temperatures for 2"):
        sample_pixel_action(maps, [1.0])
