"""Fails loudly when TRL renames or reshapes a method Sa2VAGRPOTrainer overrides or relies on (written for TRL 1.16)."""

from __future__ import annotations

import inspect

import pytest
from trl import GRPOTrainer

from sa2va_trl.trainer import OVERRIDDEN_TRL_METHODS, Sa2VAGRPOTrainer

# The parameters of TRL's methods our overrides receive, by name.
EXPECTED_PARAMETERS = {
    "_generate_and_score_completions": ["self", "inputs"],
    "_calculate_rewards": ["self", "inputs", "prompts", "completions", "completion_ids_list"],
    "_compute_loss": ["self", "model", "inputs"],
    "_get_per_token_logps_and_entropies": [
        "self", "model", "input_ids", "attention_mask", "logits_to_keep", "batch_size", "compute_entropy",
        "compute_aux_loss",
    ],
}


@pytest.mark.parametrize("name", OVERRIDDEN_TRL_METHODS)
def test_overridden_method_exists_in_trl_with_the_expected_parameters(name):
    assert hasattr(GRPOTrainer, name), f"TRL's GRPOTrainer has no {name!r} any more: update Sa2VAGRPOTrainer"
    assert name in vars(Sa2VAGRPOTrainer), f"{name} is listed as overridden but not defined"
    params = list(inspect.signature(getattr(GRPOTrainer, name)).parameters)
    expected = EXPECTED_PARAMETERS[name]
    assert params[: len(expected)] == expected, f"TRL changed the signature of {name}: {params}"


def test_every_override_is_listed_in_the_docstring():
    for name in OVERRIDDEN_TRL_METHODS:
        assert f"`{name}`" in Sa2VAGRPOTrainer.__doc__


def test_trl_still_calls_the_hooks_the_trainer_relies_on():
    generate = inspect.getsource(GRPOTrainer._generate)
    assert "self.rollout_func(prompts, self)" in generate
    compute_loss = inspect.getsource(GRPOTrainer._compute_loss)
    assert "self._get_per_token_logps_and_entropies(" in compute_loss
    score = inspect.getsource(GRPOTrainer._generate_and_score_completions)
    assert "self._calculate_rewards(" in score
    assert "if self.ref_model is not None:" in score  # the EMA reference stands in for ref_model
    assert "self._generate(prompts)" in score
    prepare = inspect.getsource(GRPOTrainer._prepare_inputs)
    assert "shuffle_sequence_dict" in prepare and "split_tensor_dict" in prepare


def test_trl_helpers_the_zero3_gather_relies_on_still_exist():
    """`Sa2VAGRPOTrainer.full_parameters` removes DeepSpeed's module hooks with TRL's own helpers (as TRL's
    `unwrap_model_for_generation` does) and requires TRL's `ds3_gather_for_generation` setting."""
    from trl import GRPOConfig
    from trl.models.utils import add_hooks, remove_hooks

    assert list(inspect.signature(remove_hooks).parameters) == ["model"]
    assert list(inspect.signature(add_hooks).parameters) == ["model"]
    assert GRPOConfig.__dataclass_fields__["ds3_gather_for_generation"].default is True
