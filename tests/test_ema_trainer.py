"""EMACallback driven by a real transformers Trainer (single process, CPU): updates per optimizer
step, checkpoints, exact resume, logging and the loadable EMA model."""

import os
import sys

import pytest
import torch
from transformers import Trainer, TrainerCallback

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "dist_scripts"))
from ema_zero import TinyRegressor, make_dataset, make_model, training_args  # noqa: E402

from sa2va_trl.ema import EMACallback, consolidate_ema_state  # noqa: E402


class ParamRecorder(TrainerCallback):
    """Records the trainable parameters at train begin and after every optimizer step."""

    def __init__(self):
        self.path = []

    def _record(self, model):
        self.path.append({n: p.detach().double().clone() for n, p in model.named_parameters() if p.requires_grad})

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._record(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._record(model)


def run(output_dir, steps, callbacks, save_steps=2, resume=None, **kw):
    args = training_args(str(output_dir), steps, per_device_batch=4, save_steps=save_steps,
                         resume_from_checkpoint=resume, **kw)
    trainer = Trainer(model=make_model(), args=args, train_dataset=make_dataset(), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    return trainer


def test_one_update_per_optimizer_step_matching_the_hand_computed_ema(tmp_path):
    recorder = ParamRecorder()
    ema = EMACallback(decay=0.8, warmup="ratio", update_after_step=1)
    run(tmp_path, steps=5, callbacks=[recorder, ema], save_steps=100, gradient_accumulation_steps=3)
    assert len(recorder.path) == 1 + 5  # 5 optimizer steps (15 micro-batches), one update each
    assert ema.step == 5 and ema.num_updates == 4
    shadow = dict(recorder.path[0])
    for t in range(1, 6):
        d = ema.decay_at(t)
        shadow = {n: d * shadow[n] + (1 - d) * p for n, p in recorder.path[t].items()}
    assert set(ema.shadow) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}  # frozen_in absent
    for name, value in shadow.items():
        torch.testing.assert_close(ema.shadow[name], value.float(), rtol=1e-6, atol=1e-7)
    # the parameters really moved, so the test can tell the EMA from a copy of either end
    assert not torch.allclose(recorder.path[0]["fc2.weight"], recorder.path[-1]["fc2.weight"])
    assert not torch.allclose(ema.shadow["fc2.weight"].double(), recorder.path[-1]["fc2.weight"])


def test_resumed_run_continues_with_the_identical_ema(tmp_path):
    full = EMACallback(decay=0.9, warmup="ratio")
    run(tmp_path / "full", steps=6, callbacks=[full])

    # Stop early at step 4, then resume from output_dir/checkpoint-4 up to step 6.
    run(tmp_path / "split", steps=4, callbacks=[EMACallback(decay=0.9, warmup="ratio")])
    resumed = EMACallback(decay=0.9, warmup="ratio")
    run(tmp_path / "split", steps=6, callbacks=[resumed], resume=True)
    assert resumed.step == 6
    for name, value in full.shadow.items():
        torch.testing.assert_close(resumed.shadow[name], value, rtol=0, atol=0)
    for step in (2, 4, 6):
        a = consolidate_ema_state(str(tmp_path / "full" / f"checkpoint-{step}"))
        b = consolidate_ema_state(str(tmp_path / "split" / f"checkpoint-{step}"))
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=0, atol=0)


def test_resume_from_a_checkpoint_path_outside_output_dir(tmp_path):
    run(tmp_path / "first", steps=4, callbacks=[EMACallback(decay=0.9)])
    reference = consolidate_ema_state(str(tmp_path / "first" / "checkpoint-4"))
    resumed = EMACallback(decay=0.9)
    run(tmp_path / "second", steps=4, callbacks=[resumed], resume=str(tmp_path / "first" / "checkpoint-2"))
    for name, value in reference.items():
        torch.testing.assert_close(resumed.shadow[name], value, rtol=0, atol=0)


def test_resume_without_ema_state_fails_clearly_unless_allowed(tmp_path):
    run(tmp_path, steps=2, callbacks=[])  # a checkpoint written without the EMA
    with pytest.raises(RuntimeError, match="no EMA state was found"):
        run(tmp_path, steps=3, callbacks=[EMACallback()], resume=True)
    lenient = EMACallback(strict_resume=False)
    trainer = run(tmp_path, steps=3, callbacks=[lenient], resume=True)
    assert lenient.step == 3 and lenient.num_updates == 1
    assert trainer.state.global_step == 3


def test_decay_is_logged(tmp_path):
    ema = EMACallback(decay=0.9, warmup="ratio")
    args = training_args(str(tmp_path), 3, per_device_batch=4, save_steps=100)
    trainer = Trainer(model=make_model(), args=args, train_dataset=make_dataset())
    ema.add_to(trainer)
    assert trainer.callback_handler.callbacks.index(ema) == 1  # right after DefaultFlowCallback
    trainer.train()
    logged = [entry["ema/decay"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged == pytest.approx([2 / 11, 3 / 12, 4 / 13])


def test_checkpoint_holds_a_loadable_ema_model(tmp_path):
    ema = EMACallback(decay=0.5, save_ema_model=True)
    trainer = run(tmp_path, steps=2, callbacks=[ema], save_steps=2)
    loaded = TinyRegressor.from_pretrained(str(tmp_path / "checkpoint-2" / "ema_model"))
    for name, param in loaded.named_parameters():
        if name in ema.shadow:
            torch.testing.assert_close(param, ema.shadow[name], rtol=0, atol=0)
        else:  # frozen: as in the trained model
            assert torch.equal(param, dict(trainer.model.named_parameters())[name]), name
    live = trainer.model.fc2.weight
    assert not torch.equal(live, ema.shadow["fc2.weight"])  # the live weights were restored


def test_ema_loaded_before_train_is_kept_and_continues(tmp_path):
    """A new run (global_step 0) that starts from an earlier run's EMA keeps it and its step count."""
    first = EMACallback(decay=0.9, warmup="ratio")
    run(tmp_path / "first", steps=2, callbacks=[first], save_steps=2)
    recorder = ParamRecorder()
    carried = EMACallback(decay=0.9, warmup="ratio")
    model = make_model()
    carried.load_from_checkpoint(str(tmp_path / "first" / "checkpoint-2"), model)
    args = training_args(str(tmp_path / "second"), 2, per_device_batch=4, save_steps=100)
    Trainer(model=model, args=args, train_dataset=make_dataset(), callbacks=[recorder, carried]).train()
    assert carried.step == 4 and carried.num_updates == 4
    shadow = {n: t.double() for n, t in first.shadow.items()}
    for t, params in zip((3, 4), recorder.path[1:]):
        d = carried.decay_at(t)  # the warm-up continues from the loaded step
        shadow = {n: d * shadow[n] + (1 - d) * p for n, p in params.items()}
    for name, value in shadow.items():
        torch.testing.assert_close(carried.shadow[name], value.float(), rtol=1e-6, atol=1e-7)
