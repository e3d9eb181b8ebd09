"""sa2va_trl.checkpointing: complete-or-ignored checkpoints (a crash while saving), push and rotation after the EMA
files, resume resolution, the epoch-seeded sampler, the CLI. A transformers Trainer with the mixin on a tiny
regressor (single process, CPU, a few seconds)."""

from __future__ import annotations

import inspect
import json
import logging
import os
import pickle
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer
from trl import GRPOTrainer

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "dist_scripts"))
sys.path.insert(0, os.path.dirname(__file__))
from ema_zero import make_dataset, make_model, training_args  # noqa: E402
from hub_recorder import HubRecorder  # noqa: E402

from sa2va_trl import checkpointing  # noqa: E402
from sa2va_trl.checkpointing import (  # noqa: E402
    COMPLETE_MARKER,
    CheckpointingMixin,
    EpochSeededRepeatSampler,
    IncompleteCheckpointError,
    checkpoint_problem,
    get_last_complete_checkpoint,
    is_complete_checkpoint,
    resolve_resume_checkpoint,
)
from sa2va_trl.config import Sa2VAGRPOConfig  # noqa: E402
from sa2va_trl.ema import EMACallback  # noqa: E402
from sa2va_trl.trainer import Sa2VAGRPOTrainer  # noqa: E402

FAKE_TOKEN = "hf_FAKEtokenForTests0123456789abcdef"


class MixinTrainer(CheckpointingMixin, Trainer):
    pass


class CrashingEMA(EMACallback):
    """An EMA whose checkpoint write dies at one step (a process killed in the middle of a save)."""

    def __init__(self, crash_at: int, **kwargs):
        super().__init__(**kwargs)
        self.crash_at = crash_at

    def save_to_checkpoint(self, checkpoint_dir, model=None, processing_class=None):
        if self.step == self.crash_at:
            raise KeyboardInterrupt(f"simulated crash while saving step {self.step}")
        super().save_to_checkpoint(checkpoint_dir, model, processing_class)

    def on_save(self, args, state, control, model=None, **kwargs):  # the stock Trainer's path
        if self.step == self.crash_at:
            raise KeyboardInterrupt(f"simulated crash while saving step {self.step}")
        super().on_save(args, state, control, model=model, **kwargs)


def run(output_dir, steps, callbacks, trainer_cls=MixinTrainer, resume=None, save_steps=2, **kw):
    args = training_args(str(output_dir), steps, per_device_batch=4, save_steps=save_steps, **kw)
    trainer = trainer_cls(model=make_model(), args=args, train_dataset=make_dataset(), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def trainable(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def test_every_checkpoint_is_marked_complete_listing_its_files_with_the_ema(tmp_path):
    run(tmp_path, steps=4, callbacks=[EMACallback(decay=0.9, save_ema_model=True)])
    for step in (2, 4):
        folder = tmp_path / f"checkpoint-{step}"
        marker = json.loads((folder / COMPLETE_MARKER).read_text())
        assert marker["global_step"] == step
        listed = set(marker["files"])
        assert {"model.safetensors", "optimizer.pt", "rng_state.pth", "trainer_state.json", "ema_config.json",
                "ema_state.safetensors", "ema_model/model.safetensors", "ema_model/config.json"} <= listed
        on_disk = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} - {COMPLETE_MARKER}
        assert listed == on_disk
        assert marker["files"]["model.safetensors"] == (folder / "model.safetensors").stat().st_size
        assert is_complete_checkpoint(str(folder))


def test_damaged_or_unmarked_checkpoints_are_incomplete_and_say_why(tmp_path):
    run(tmp_path / "run", steps=2, callbacks=[EMACallback(decay=0.9)])
    good = tmp_path / "run" / "checkpoint-2"
    cases = {}
    for name, damage in {
        "truncated": lambda d: (d / "ema_state.safetensors").write_bytes((d / "ema_state.safetensors").read_bytes()[:100]),
        "missing": lambda d: (d / "optimizer.pt").unlink(),
        "unmarked": lambda d: (d / COMPLETE_MARKER).unlink(),
        "garbled": lambda d: (d / COMPLETE_MARKER).write_text("{not json"),
    }.items():
        copy = tmp_path / name / "checkpoint-2"
        shutil.copytree(good, copy)
        damage(copy)
        cases[name] = checkpoint_problem(str(copy))
    assert checkpoint_problem(str(good)) is None
    assert cases["truncated"].startswith("ema_state.safetensors has 100 bytes")
    assert cases["missing"] == "optimizer.pt is missing"
    assert cases["unmarked"].startswith(f"no {COMPLETE_MARKER}")
    assert cases["garbled"].startswith(f"unreadable {COMPLETE_MARKER}")


def test_a_crash_while_saving_leaves_the_previous_checkpoint_and_the_resumed_run_matches(tmp_path, caplog):
    # Control: the stock Trainer deletes checkpoint-2 (save_total_limit 1) before the EMA of checkpoint-4 is written;
    # a crash in between leaves no checkpoint with an EMA to resume from.
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "stock", steps=6, callbacks=[CrashingEMA(4, decay=0.9)], trainer_cls=Trainer, save_total_limit=1)
    assert sorted(os.listdir(tmp_path / "stock")) == ["checkpoint-4"]
    assert not (tmp_path / "stock" / "checkpoint-4" / "ema_config.json").exists()

    out = tmp_path / "mixin"
    with pytest.raises(KeyboardInterrupt):
        run(out, steps=6, callbacks=[CrashingEMA(4, decay=0.9)], save_total_limit=1)
    assert sorted(os.listdir(out)) == ["checkpoint-2", "checkpoint-4"]  # the rotation waited for completion
    assert (out / "checkpoint-4" / "model.safetensors").exists()  # transformers' files were written ...
    assert not is_complete_checkpoint(str(out / "checkpoint-4"))  # ... but the checkpoint never completed
    with caplog.at_level(logging.WARNING, logger="sa2va_trl.checkpointing"):
        assert get_last_complete_checkpoint(str(out)) == str(out / "checkpoint-2")
    assert f"Skipping incomplete checkpoint {out / 'checkpoint-4'}: no {COMPLETE_MARKER}" in caplog.text
    with pytest.raises(IncompleteCheckpointError, match=r"checkpoint-4.*no checkpoint_complete.json.*last complete "
                                                        r"checkpoint there is .*checkpoint-2"):
        resolve_resume_checkpoint(str(out / "checkpoint-4"), str(out))

    ema = EMACallback(decay=0.9)
    resumed = run(out, steps=6, callbacks=[ema], resume=True, save_total_limit=1)
    assert resumed.args.resume_from_checkpoint == str(out / "checkpoint-2")  # told to the callbacks
    assert sorted(os.listdir(out)) == ["checkpoint-6"] and is_complete_checkpoint(str(out / "checkpoint-6"))

    reference_ema = EMACallback(decay=0.9)
    reference = run(tmp_path / "uninterrupted", steps=6, callbacks=[reference_ema])
    for name, value in trainable(reference).items():
        torch.testing.assert_close(trainable(resumed)[name], value, rtol=0, atol=0)
        torch.testing.assert_close(ema.shadow[name], reference_ema.shadow[name], rtol=0, atol=0)
    assert ema.step == reference_ema.step == 6


def test_a_same_step_folder_left_by_an_earlier_run_is_replaced_not_trusted(tmp_path):
    run(tmp_path, steps=2, callbacks=[EMACallback(decay=0.9)])
    stale = tmp_path / "checkpoint-2" / "stale_file.bin"
    stale.write_bytes(b"from an earlier run")
    run(tmp_path, steps=2, callbacks=[EMACallback(decay=0.9)], resume=False)  # starts over, saves step 2 again
    assert not stale.exists() and is_complete_checkpoint(str(tmp_path / "checkpoint-2"))


def test_the_checkpoint_push_carries_the_ema_files_and_the_marker(tmp_path, monkeypatch):
    hub = HubRecorder().install(monkeypatch)
    push = dict(push_to_hub=True, hub_model_id="someone/tiny", hub_strategy="checkpoint", hub_token=FAKE_TOKEN)
    run(tmp_path / "mixin", steps=2, callbacks=[EMACallback(decay=0.9, save_ema_model=True)], **push)
    pushed = [c for c in hub.commits if c.message == "Training in progress, step 2, checkpoint"]
    assert len(pushed) == 1
    folder = tmp_path / "mixin" / "checkpoint-2"
    expected = {f"last-checkpoint/{p.relative_to(folder)}" for p in folder.rglob("*") if p.is_file()}
    assert pushed[0].paths() == expected
    assert {"last-checkpoint/ema_config.json", "last-checkpoint/ema_state.safetensors",
            "last-checkpoint/ema_model/model.safetensors", f"last-checkpoint/{COMPLETE_MARKER}"} <= expected
    top = next(c for c in hub.commits if c.message == "Training in progress, step 2")
    assert "ema_model/model.safetensors" in top.paths()  # the EMA model of the same step at the top level
    assert top.files["ema_model/model.safetensors"] == pushed[0].files["last-checkpoint/ema_model/model.safetensors"]
    assert hub.repos == [{"repo_id": "someone/tiny", "token": FAKE_TOKEN, "private": None, "exist_ok": True}]

    # The stock Trainer pushes the checkpoint before the EMA callback has written its files.
    stock = HubRecorder().install(monkeypatch)
    run(tmp_path / "stock", steps=2, callbacks=[EMACallback(decay=0.9)], trainer_cls=Trainer, **push)
    stock_push = next(c for c in stock.commits if c.message.endswith("checkpoint"))
    assert "last-checkpoint/ema_state.safetensors" not in stock_push.paths()


def test_resolve_resume_checkpoint_values(tmp_path):
    assert resolve_resume_checkpoint(None, str(tmp_path)) is None
    for off in (False, "false", "False", "no"):
        assert resolve_resume_checkpoint(off, str(tmp_path)) is None
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resolve_resume_checkpoint(True, str(tmp_path))
    run(tmp_path, steps=4, callbacks=[EMACallback(decay=0.9)])
    (tmp_path / "checkpoint-4" / COMPLETE_MARKER).unlink()
    for last in (True, "true", "True", "last"):
        assert resolve_resume_checkpoint(last, str(tmp_path)) == str(tmp_path / "checkpoint-2")
    assert resolve_resume_checkpoint(str(tmp_path / "checkpoint-2"), "elsewhere") == str(tmp_path / "checkpoint-2")


def test_cli_checks_and_marks(tmp_path, capsys):
    run(tmp_path, steps=4, callbacks=[EMACallback(decay=0.9)])
    assert checkpointing.main(["check", str(tmp_path)]) == 0
    (tmp_path / "checkpoint-4" / COMPLETE_MARKER).unlink()
    assert checkpointing.main(["check", str(tmp_path)]) == 1
    assert "checkpoint-4: INCOMPLETE: no checkpoint_complete.json" in capsys.readouterr().out
    assert checkpointing.main(["mark", str(tmp_path / "checkpoint-4")]) == 0
    assert is_complete_checkpoint(str(tmp_path / "checkpoint-4"))


def test_epoch_seeded_sampler_orders_depend_on_seed_and_epoch_only():
    def order(epochs, seed=3):
        sampler = EpochSeededRepeatSampler(list(range(12)), mini_repeat_count=2, batch_size=3, repeat_count=2, seed=seed)
        out = []
        for epoch in epochs:
            sampler.set_epoch(epoch)
            out.append(list(sampler))
        return out

    uninterrupted = order([0, 1, 2])
    assert order([2]) == uninterrupted[2:]  # a run resumed in epoch 2 sees the same order
    assert uninterrupted[0] != uninterrupted[1] != uninterrupted[2]
    assert order([1], seed=4) != uninterrupted[1]
    stock = checkpointing._repeat_sampler_class()(list(range(12)), mini_repeat_count=2, batch_size=3, repeat_count=2,
                                                  seed=3)
    assert list(stock) == uninterrupted[0]  # epoch 0: TRL's order


def test_config_pickles_carry_no_hub_token(tmp_path):
    config = Sa2VAGRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, hub_token=FAKE_TOKEN)
    data = pickle.dumps(config)
    assert FAKE_TOKEN.encode() not in data and FAKE_TOKEN not in str(config)
    assert config.hub_token == FAKE_TOKEN  # the live config keeps it for the push
    assert pickle.loads(data).hub_token is None and pickle.loads(data).output_dir == str(tmp_path)


# --- the transformers / TRL methods the mixin overrides or relies on (transformers 5.23, TRL 1.16) ----------------

EXPECTED = {
    "train": (Trainer, ["self", "resume_from_checkpoint", "trial", "ignore_keys_for_eval"]),
    "_save_checkpoint": (Trainer, ["self", "model", "trial"]),
    "_push_from_checkpoint": (Trainer, ["self", "checkpoint_folder"]),
    "_get_train_sampler": (GRPOTrainer, ["self", "dataset"]),
}


@pytest.mark.parametrize("name", checkpointing.OVERRIDDEN_METHODS)
def test_overridden_methods_exist_upstream_with_the_expected_parameters(name):
    owner, expected = EXPECTED[name]
    assert hasattr(owner, name), f"{owner.__name__} has no {name!r} any more: update CheckpointingMixin"
    assert name in vars(CheckpointingMixin)
    params = list(inspect.signature(getattr(owner, name)).parameters)
    assert params[: len(expected)] == expected, f"{owner.__name__}.{name} changed its signature: {params}"
    assert Sa2VAGRPOTrainer.__mro__.index(CheckpointingMixin) < Sa2VAGRPOTrainer.__mro__.index(GRPOTrainer)


def test_transformers_still_does_what_the_mixin_holds_back_and_relies_on():
    save = inspect.getsource(Trainer._save_checkpoint)
    assert "if self.args.push_to_hub:" in save and "self._push_from_checkpoint(output_dir)" in save
    assert "save_total_limit=self.args.save_total_limit" in save
    assert "self._save_rng_state(output_dir)" in save
    run_epoch = inspect.getsource(Trainer._run_epoch)
    assert "set_epoch(epoch)" in run_epoch and "self._load_rng_state(resume_from_checkpoint)" in run_epoch
    assert "_internal_call" in inspect.signature(Trainer.save_model).parameters  # used by sa2va_trl.grpo
    assert "self.create_model_card(" in inspect.getsource(GRPOTrainer._save_checkpoint)


def test_ema_written_once_per_checkpoint(tmp_path, monkeypatch):
    calls = []
    original = EMACallback.save

    def counting_save(self, directory):
        calls.append(os.path.basename(directory))
        original(self, directory)

    monkeypatch.setattr(EMACallback, "save", counting_save)
    run(tmp_path, steps=4, callbacks=[EMACallback(decay=0.9)])
    assert calls == ["checkpoint-2", "checkpoint-4"]  # inside the save; on_save did not write it again
    state = load_file(str(tmp_path / "checkpoint-4" / "ema_state.safetensors"))
    assert set(state) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
