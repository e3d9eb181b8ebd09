"""`python -m sa2va_trl.reward_net RECIPE.yaml`: parsing, recipes, a miniature end-to-end run."""

import json
import math
import os
import subprocess
import sys

import datasets
import numpy as np
import pytest
import yaml

from sa2va_trl.reward_net import load_reward_net
from sa2va_trl.reward_net.train import EVAL_FILENAME, main, parse_args

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MINI_RECIPE = {
    "synthetic_images": 6,
    "synthetic_image_size": 64,
    "samples_per_region": 4,
    "eval_fraction": 0.34,
    "input_size": 32,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 16,
    "max_steps": 3,
    "eval_strategy": "no",
    "save_strategy": "steps",
    "save_steps": 2,
    "logging_steps": 1,
    "report_to": "none",
    "use_cpu": True,
    "disable_tqdm": True,
}


def _write_recipe(tmp_path, **overrides):
    recipe = {**MINI_RECIPE, "output_dir": str(tmp_path / "out"), **overrides}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_positional_recipe_with_overrides(tmp_path):
    recipe = _write_recipe(tmp_path)
    script_args, training_args = parse_args([recipe, "--learning_rate", "0.01", "--samples_per_region", "7"])
    assert training_args.learning_rate == 0.01 and script_args.samples_per_region == 7
    assert script_args.input_size == 32 and training_args.max_steps == 3
    same, _ = parse_args(["--config", recipe])
    assert same.input_size == 32
    assert same.train_label == "dice" and same.dihedral is False  # the defaults: no change unless asked
    chosen, _ = parse_args([recipe, "--train_label", "expected_dice", "--dihedral", "true"])
    assert chosen.train_label == "expected_dice" and chosen.dihedral is True


def test_seed_defaults():
    script_args, training_args = parse_args(["--output_dir", "unused"])
    assert training_args.learning_rate == 1e-3 and training_args.per_device_train_batch_size == 4
    assert training_args.num_train_epochs == 10 and training_args.weight_decay == 0.0
    assert training_args.lr_scheduler_type == "constant"
    assert script_args.policy is None


def test_bad_recipes_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="usage"):
        parse_args([str(tmp_path / "missing.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("input_sise: 64\n")
    with pytest.raises(ValueError, match="input_sise"):
        parse_args([str(bad)])
    with pytest.raises(SystemExit):  # argparse: "invalid choice: 'iou' (choose from 'dice', 'expected_dice')"
        parse_args(["--output_dir", "unused", "--train_label", "iou"])


@pytest.mark.parametrize("name", ["demo_reward_net.yaml", "reward_net.yaml"])
def test_shipped_recipes_parse(name):
    script_args, training_args = parse_args([os.path.join(REPO, "recipes", name)])
    assert training_args.output_dir and script_args.input_size >= 8
    assert training_args.push_to_hub is False  # a push happens only when asked


def test_miniature_run_end_to_end(tmp_path, capsys):
    report = main([_write_recipe(tmp_path)])
    out = tmp_path / "out"
    printed = capsys.readouterr().out
    assert "pearson" in printed and "true Dice histogram" in printed

    with open(out / EVAL_FILENAME) as f:
        written = json.load(f)
    assert set(written) >= {"overall", "by_kind", "dice_distribution", "num_train_samples", "num_heldout_samples",
                            "ambiguity_floor"}
    assert set(written["ambiguity_floor"]["by_kind"]) == set(written["by_kind"])
    overall = written["overall"]
    assert set(overall) == {"mse", "mae", "pearson", "spearman", "count"}
    assert overall["count"] == written["num_heldout_samples"] > 0
    assert all(math.isfinite(overall[k]) for k in ("mse", "mae", "pearson", "spearman"))
    assert sum(written["dice_distribution"]["counts"]) == overall["count"]
    assert written["overall"] == pytest.approx(report["overall"])

    # the saved model loads and reproduces the held-out predictions' scale
    net = load_reward_net(str(out))
    assert net.config.input_size == 32 and net.num_parameters() == 140_193
    data = datasets.load_from_disk(str(out / "reward_data"))
    assert len(data) == written["num_train_samples"] + written["num_heldout_samples"]
    scores = net.score([data[0]["img"]], [data[0]["mask"]])
    assert np.isfinite(scores.numpy()).all()
    assert os.path.isdir(out / "checkpoint-2")  # save_strategy steps, save_steps 2

    # eval_only: the saved data and the saved model, no training; same split, same numbers
    again = main([_write_recipe(tmp_path, data_path=str(out / "reward_data"), init_from=str(out), eval_only=True,
                                output_dir=str(tmp_path / "out2"))])
    assert again["num_heldout_samples"] == written["num_heldout_samples"]
    assert again["overall"]["mse"] == pytest.approx(overall["mse"], rel=1e-5)
    assert not os.path.exists(tmp_path / "out2" / "model.safetensors")
    with pytest.raises(ValueError, match="init_from"):
        main([_write_recipe(tmp_path, eval_only=True)])


@pytest.mark.slow
def test_cli_with_tiny_policy_masks(tmp_path):
    """The module entry point in a subprocess, with a random tiny Sa2VA policy's masks in the data."""
    recipe = _write_recipe(tmp_path, synthetic_images=4, policy="tiny", policy_batch_size=4, max_steps=1,
                           save_strategy="no")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-m", "sa2va_trl.reward_net", recipe], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    data = datasets.load_from_disk(str(tmp_path / "out" / "reward_data"))
    kinds = np.array(data["kind"])
    assert (kinds == "policy").sum() == len(set(data["source_row"]))  # one policy mask per captioned region
    with open(tmp_path / "out" / EVAL_FILENAME) as f:
        assert math.isfinite(json.load(f)["overall"]["mse"])


def test_batchnorm_recalibration_matches_batch_statistics():
    import torch

    from sa2va_trl.reward_net import LightweightRewardNetwork, RewardNetConfig
    from sa2va_trl.reward_net.train import recalibrate_batchnorm

    net = LightweightRewardNetwork(RewardNetConfig(input_size=16))
    for m in net.modules():  # stale statistics, as after fast-moving weights
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.fill_(3.0)
            m.running_var.fill_(9.0)
    x = torch.randn(48, 4, 16, 16)
    dataset = [{"pixel_values": v} for v in x]
    net.eval()
    with torch.no_grad():
        stale = net(x).scores
        batch_stats = net.train()(x).scores
    net.eval()
    assert recalibrate_batchnorm(net, dataset, num_samples=1000, batch_size=64) == 48
    assert not net.training and all(
        m.momentum == 0.1 for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)
    )
    with torch.no_grad():
        calibrated = net(x).scores
    torch.testing.assert_close(calibrated, batch_stats, atol=2e-3, rtol=0)
    assert (stale - batch_stats).abs().max() > 1e-2  # the check above can fail


def test_channels_last_training_saves_the_same_network(tmp_path):
    import torch

    from sa2va_trl.reward_net import LightweightRewardNetwork, RewardNetConfig

    torch.manual_seed(0)
    net = LightweightRewardNetwork(RewardNetConfig(input_size=16))
    x = torch.randn(6, 4, 16, 16)
    reference = net.eval()(x).scores
    fast = net.to(memory_format=torch.channels_last)
    assert fast.features[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fast(x).scores, reference, atol=1e-5, rtol=0)
    fast.save_pretrained(tmp_path / "net")
    loaded = load_reward_net(str(tmp_path / "net")).eval()
    assert loaded.features[0][0].weight.is_contiguous()  # stored in the ordinary layout
    torch.testing.assert_close(loaded(x).scores, reference, atol=1e-5, rtol=0)
