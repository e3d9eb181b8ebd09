"""The entry point: recipe parsing (positional YAML, --config, CLI overrides), config validation, an end-to-end run."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sa2va_trl.config import Sa2VAGRPOConfig, Sa2VAScriptArguments
from sa2va_trl.grpo import main, parse_args, rewrite_positional_recipe
from sa2va_trl.rewards.registry import list_rewards

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "recipes" / "demo.yaml")
CYCLE = str(ROOT / "recipes" / "cycle.yaml")


def test_positional_recipe_with_cli_overrides(tmp_path):
    script, training, model = parse_args([DEMO, "--max_steps", "3", "--loops", "mask_to_caption",
                                          "--output_dir", str(tmp_path)])
    assert training.max_steps == 3  # the CLI wins over the recipe's 100
    assert training.loops == ["mask_to_caption"]
    assert training.num_generations == 4 and training.ema_decay == 0.99  # from the recipe
    assert training.caption_to_mask_rewards == ["cycle_meteor", "mask_iou"]
    assert model.model_name_or_path == "builtin:tiny-warm" and script.dataset_format == "synthetic"
    assert training.output_dir == str(tmp_path)


def test_config_flag_forms_parse_the_same(tmp_path):
    forms = ([DEMO], ["--config", DEMO], [f"--config={DEMO}"])
    parsed = [parse_args([*form, "--output_dir", str(tmp_path)]) for form in forms]
    for other in parsed[1:]:
        assert other[1].to_dict() == parsed[0][1].to_dict()
        assert dataclasses.asdict(other[0]) == dataclasses.asdict(parsed[0][0])
    with pytest.raises(SystemExit):
        rewrite_positional_recipe([DEMO, "--config", DEMO])


def test_cycle_recipe_parses_with_either_backend(tmp_path):
    script, training, model = parse_args([CYCLE, "--bf16", "false", "--output_dir", str(tmp_path)])
    assert script.model_backend == "native"  # a checkpoint converted by `python -m sa2va_trl.convert`
    assert model.use_peft and model.lora_r == 128 and training.num_generations == 8
    assert training.metric_for_best_model == "eval_mean_iou" and script.dataset_format == "gar"
    assert not training.trust_remote_code  # TRL's GRPOConfig field
    script, training, model = parse_args([CYCLE, "--model_backend", "remote", "--trust_remote_code", "true",
                                   "--model_name_or_path", "/ckpt/ByteDance-Sa2VA-4B", "--bf16", "false",
                                   "--output_dir", str(tmp_path)])
    assert script.model_backend == "remote" and training.trust_remote_code


def test_remote_backend_without_trust_remote_code_stops_before_loading_data(tmp_path):
    # cycle.yaml's data is a Hub dataset (no network here): reaching the data would fail differently.
    parsed = parse_args([CYCLE, "--model_backend", "remote", "--bf16", "false", "--output_dir", str(tmp_path),
                         "--report_to", "none"])
    with pytest.raises(ValueError, match="runs the checkpoint's own Python code.*`trust_remote_code: true`"):
        main(*parsed)


def args(tmp_path, **kwargs):
    return Sa2VAGRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mask_to_caption_rewards": ["cycle_iuo"]}, r"unknown reward 'cycle_iuo'. Registered rewards: \["),
        ({"caption_to_mask_reward_weights": [1.0, 2.0]}, "has 2 values for 1 rewards"),
        ({"loops": ["mask_to_caption", "loop3"]}, "unknown loop 'loop3'"),
        ({"loops": []}, "`loops` is empty"),
        ({"ema_decay": 1.0}, r"must lie in \[0, 1\)"),
        ({"mask_action_sigma": 0.0}, "mask_action_sigma` must be > 0"),
        ({"advantage_mode": "median"}, "advantage_mode` must be one of"),
        ({"caption_to_mask_weight": -1.0}, "finite number >= 0"),
        ({"reward_weights": [1.0]}, "not TRL's `reward_weights`"),
        ({"beta": 0.1, "sync_ref_model": True}, "EMA model is the KL reference"),
        ({"reward_options": {"reward_nett": {"model_name_or_path": "x"}}}, r"names \['reward_nett'\], which neither"),
        ({"reward_options": "{not json"}, "`reward_options` is not valid JSON"),
        ({"reward_options": {"cycle_iou": 3}}, "maps reward names to option mappings"),
    ],
)
def test_config_errors_say_what_to_fix(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        args(tmp_path, **kwargs)


def test_script_arguments_validation():
    with pytest.raises(ValueError, match="needs `dataset_name`"):
        Sa2VAScriptArguments(dataset_format="gar")
    with pytest.raises(ValueError, match="`dataset_format` must be one of"):
        Sa2VAScriptArguments(dataset_format="coco")
    with pytest.raises(ValueError, match="`model_backend` must be one of"):
        Sa2VAScriptArguments(model_backend="hub")
    assert Sa2VAScriptArguments(model_backend="remote").model_backend == "remote"


def test_reward_help_is_built_from_the_registry():
    help_text = {f.name: f.metadata["help"] for f in dataclasses.fields(Sa2VAGRPOConfig)}["mask_to_caption_rewards"]
    for name in list_rewards():
        assert name in help_text


def test_loop_weights_map_to_trl_reward_weights_in_loop_order(tmp_path):
    config = args(tmp_path, loops=["caption_to_mask", "mask_to_caption"],
                  mask_to_caption_rewards=["cycle_iou", "caption_meteor"], mask_to_caption_reward_weights=[1.0, 0.5],
                  caption_to_mask_rewards=["cycle_meteor"])
    assert config.flat_reward_weights() == [1.0, 0.5, 1.0]


def test_main_runs_the_demo_recipe_end_to_end(tmp_path):
    out = tmp_path / "run"
    trainer = main(*parse_args([DEMO, "--max_steps", "2", "--synthetic_images", "4", "--output_dir", str(out),
                                "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true"]))
    assert trainer.state.global_step == 2
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert (out / "ema_model").is_dir()
    logged = {k for entry in trainer.state.log_history for k in entry}
    assert {"loops/mask_to_caption/reward_mean", "loops/caption_to_mask/frac_reward_zero_std", "kl"} <= logged


def test_reward_net_scores_loop_2_through_the_entry_point(tmp_path):
    # The recipe names the trained network in `reward_options`; from the command line it is a JSON string.
    from sa2va_trl.reward_net import LightweightRewardNetwork, RewardNetConfig

    net_dir = tmp_path / "net"
    LightweightRewardNetwork(RewardNetConfig(input_size=32)).save_pretrained(net_dir)
    options = '{"reward_net": {"model_name_or_path": "%s"}}' % net_dir
    trainer = main(*parse_args([DEMO, "--max_steps", "2", "--synthetic_images", "4", "--output_dir", str(tmp_path / "run"),
                                "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true",
                                "--caption_to_mask_rewards", "cycle_meteor", "reward_net", "--reward_options", options]))
    assert trainer.args.reward_options == {"reward_net": {"model_name_or_path": str(net_dir)}}
    scores = [float(entry["rewards/caption_to_mask/reward_net/mean"]) for entry in trainer.state.log_history
              if "rewards/caption_to_mask/reward_net/mean" in entry]
    assert len(scores) == 2 and all(0.0 < score < 1.0 for score in scores)  # a sigmoid on every loop-2 mask


@pytest.mark.slow
def test_accelerate_launch_runs_the_module(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu",
               "-m", "sa2va_trl.grpo", DEMO, "--max_steps", "1", "--synthetic_images", "4",
               "--output_dir", str(tmp_path / "run"), "--report_to", "none", "--save_strategy", "no"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "model.safetensors").exists()


def test_a_trained_mask_decoder_without_the_pixel_action_is_warned_about(tmp_path, caplog):
    from sa2va_trl.grpo import warn_untrained_mask_decoder

    def parsed(*extra):
        return parse_args(["recipes/demo.yaml", "--output_dir", str(tmp_path), *extra])

    script_args, training_args, _ = parsed("--mask_pixel_action", "false", "--train_mask_decoder", "true")
    with caplog.at_level("WARNING", logger="sa2va_trl.grpo"):
        assert warn_untrained_mask_decoder(script_args, training_args)
    assert "mask_pixel_action" in caplog.text
    script_args, training_args, _ = parsed("--mask_pixel_action", "true", "--train_mask_decoder", "true")
    assert not warn_untrained_mask_decoder(script_args, training_args)
    script_args, training_args, _ = parsed("--mask_pixel_action", "false", "--train_mask_decoder", "false")
    assert not warn_untrained_mask_decoder(script_args, training_args)


def test_grounding_recipe_differs_from_the_demo_only_where_documented(tmp_path):
    """recipes/demo_grounding.yaml is the demo with a fast [SEG] projection, more prompts, a narrower action."""
    _, demo, _ = parse_args([DEMO, "--output_dir", str(tmp_path)])
    _, grounding, model = parse_args([str(ROOT / "recipes" / "demo_grounding.yaml"), "--output_dir", str(tmp_path)])
    assert model.model_name_or_path == "outputs/sft_lagging_grounding"
    assert grounding.text_hidden_fcs_learning_rate == 3e-4 and grounding.learning_rate == 1e-5
    assert demo.text_hidden_fcs_learning_rate is None
    assert grounding.per_device_train_batch_size == 4 * demo.per_device_train_batch_size
    assert (grounding.loops, grounding.beta, grounding.ema_decay) == (demo.loops, demo.beta, demo.ema_decay)
    assert grounding.mask_action_sigma == 0.3 and grounding.max_steps == 1000 and grounding.save_steps == 500
