"""The Hub push of a demo run, exercised up to the huggingface_hub client without network (`hub_recorder`): what the
commits hold (weights, EMA files, model card, a complete last-checkpoint), the card's content, a round trip through
`from_pretrained` of the pushed folder, and a fake token that must reach the client and nothing else."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(__file__))
from hub_recorder import HubRecorder  # noqa: E402

from sa2va_trl.checkpointing import COMPLETE_MARKER, checkpoint_problem, resolve_resume_checkpoint  # noqa: E402
from sa2va_trl.data.schema import decode_region_mask  # noqa: E402
from sa2va_trl.data.synthetic import shapes_dataset  # noqa: E402
from sa2va_trl.grpo import main, parse_args  # noqa: E402
from sa2va_trl.models import Sa2VAPolicy  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "recipes" / "demo.yaml")
FAKE_TOKEN = "hf_FAKEtokenThatMustNotLeak0123456789"
REPO = "someone/sa2va-tiny-demo"


@pytest.mark.slow
def test_push_records_weights_ema_card_and_a_resumable_checkpoint_and_round_trips(tmp_path, monkeypatch, capfd, caplog):
    hub = HubRecorder().install(monkeypatch)
    out = tmp_path / "run"
    caplog.set_level(logging.DEBUG)
    trainer = main(*parse_args([
        DEMO, "--max_steps", "2", "--synthetic_images", "4", "--save_steps", "1", "--output_dir", str(out),
        "--report_to", "none", "--sample_overlay_steps", "0", "--disable_tqdm", "true", "--log_level", "debug",
        "--do_eval", "true", "--ema_save_model", "true",
        "--push_to_hub", "true", "--hub_model_id", REPO, "--hub_strategy", "checkpoint", "--hub_token", FAKE_TOKEN,
    ]))
    assert trainer.state.global_step == 2

    # --- the calls at the client boundary ---
    assert hub.repos == [{"repo_id": REPO, "token": FAKE_TOKEN, "private": None, "exist_ok": True}]
    assert [c.message for c in hub.commits] == [
        "Training in progress, step 1", "Training in progress, step 1, checkpoint",
        "Training in progress, step 2", "Training in progress, step 2, checkpoint", "End of training"]
    assert all(c.repo_id == REPO and c.token == FAKE_TOKEN for c in hub.commits)  # authenticated by the client
    for step in (1, 2):
        checkpoint = hub.commits[2 * step - 1]
        assert {"last-checkpoint/model.safetensors", "last-checkpoint/optimizer.pt", "last-checkpoint/rng_state.pth",
                "last-checkpoint/trainer_state.json", "last-checkpoint/ema_config.json",
                "last-checkpoint/ema_state.safetensors", "last-checkpoint/ema_model/model.safetensors",
                "last-checkpoint/ema_model/tokenizer.json", f"last-checkpoint/{COMPLETE_MARKER}"} <= checkpoint.paths()
        assert json.loads(checkpoint.files["last-checkpoint/ema_config.json"])["step"] == step
        top = hub.commits[2 * step - 2]
        assert {"model.safetensors", "config.json", "tokenizer.json", "README.md", "ema_model/model.safetensors"} \
            <= top.paths()
        assert top.files["ema_model/model.safetensors"] == checkpoint.files["last-checkpoint/ema_model/model.safetensors"]
    final = hub.commits[-1]
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "ema_model/config.json", "ema_model/model.safetensors", "ema_model/tokenizer.json"} <= final.paths()
    assert not any(p.startswith("checkpoint-") for c in hub.commits for p in c.paths())

    # --- the model card ---
    card_text = final.files["README.md"].decode()
    card = ModelCard(card_text)  # the YAML metadata parses
    assert "sa2va-trl" in card.data.tags and card.data.library_name == "transformers"
    assert card.data.base_model is None  # a builtin name is no Hub id: the Hub would reject it as metadata
    assert "**Base model:** `builtin:tiny-warm`" in card_text
    assert "| mask_to_caption | `cycle_iou` (1), `caption_meteor` (0.5) | 1 |" in card_text
    assert "| caption_to_mask | `cycle_meteor` (1), `mask_iou` (0.5) | 1 |" in card_text
    assert "decay 0.99, no warm-up" in card_text and "KL reference (beta 0.04)" in card_text
    sigma = trainer.args.mask_action_sigma
    assert "| num_generations (G) | 4 |" in card_text and f"| mask_action | True (sigma {sigma:g}) |" in card_text
    eval_entry = next(e for e in reversed(trainer.state.log_history) if "eval_mean_iou" in e)
    assert "## Evaluation" in card_text
    assert f"| mean_iou | {eval_entry['eval_mean_iou']:.4f} |" in card_text
    assert f"| meteor | {eval_entry['eval_meteor']:.4f} |" in card_text
    assert f'snapshot_download("{REPO}")' in card_text and "`last-checkpoint/`" in card_text

    # --- round trip: the repository as pushed loads and runs ---
    repo = hub.materialize(tmp_path / "hub")
    policy = Sa2VAPolicy.from_pretrained(str(repo))
    ema_policy = Sa2VAPolicy.from_pretrained(str(repo / "ema_model"))
    live = {n: p.detach() for n, p in trainer.model.named_parameters()}
    for name, param in policy.model.named_parameters():
        torch.testing.assert_close(param, live[name], rtol=0, atol=0)
    for name, shadow in trainer.ema.shadow.items():
        torch.testing.assert_close(dict(ema_policy.model.named_parameters())[name], shadow, rtol=0, atol=0)
    assert any(not torch.equal(trainer.ema.shadow[n], live[n]) for n in trainer.ema.shadow)
    row = shapes_dataset(1, seed=5, split="validation")[0]
    image, region = row["img"], decode_region_mask(row["region_mask"])
    for loaded in (policy, ema_policy):
        (mask,) = loaded.segment([image], [row["caption"]])
        assert mask.shape == np.asarray(region).shape and mask.dtype == bool
        (caption,) = loaded.caption([image], [region])
        assert isinstance(caption, str)
    assert checkpoint_problem(str(repo / "last-checkpoint")) is None  # the pushed checkpoint resumes
    assert resolve_resume_checkpoint(str(repo / "last-checkpoint"), str(repo)) == str(repo / "last-checkpoint")
    state = load_file(str(repo / "last-checkpoint" / "ema_state.safetensors"))
    for name, shadow in trainer.ema.shadow.items():
        torch.testing.assert_close(state[name], shadow, rtol=0, atol=0)

    # --- the token reached the client's arguments and nothing else ---
    captured = capfd.readouterr()
    assert "someone/sa2va-tiny-demo" in captured.out + captured.err + caplog.text  # the logs were captured
    for where, text in (("stdout", captured.out), ("stderr", captured.err), ("log records", caplog.text)):
        assert FAKE_TOKEN not in text, f"the token appears in {where}"
    for path, content in hub.all_bytes():
        assert FAKE_TOKEN.encode() not in content, f"the token is in the pushed file {path}"
    for file in out.rglob("*"):
        if file.is_file():
            assert FAKE_TOKEN.encode() not in file.read_bytes(), f"the token is in {file}"
