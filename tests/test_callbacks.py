"""SampleOverlayCallback: overlays rendered correctly and written to TensorBoard."""

from __future__ import annotations

import types

import numpy as np
import pytest
from PIL import Image

from sa2va_trl.callbacks import PREDICTION_COLOUR, REGION_COLOUR, SampleOverlayCallback, render_overlay


def square(size=16, lo=4, hi=12):
    mask = np.zeros((size, size), dtype=bool)
    mask[lo:hi, lo:hi] = True
    return mask


def test_overlay_outlines_the_region_tints_the_prediction_and_adds_text():
    image = Image.new("RGB", (16, 16), (100, 100, 100))
    plain = render_overlay(image, scale=1)
    np.testing.assert_array_equal(plain, np.full((16, 16, 3), 100, dtype=np.uint8))
    out = render_overlay(image, region_mask=square(), pred_mask=square(lo=6, hi=10), lines=["ref", "out"], scale=2)
    assert out.shape[1] == 32 and out.shape[0] > 32  # upscaled, plus a text strip
    assert tuple(out[8, 8]) == REGION_COLOUR  # (4, 4) is on the region's outline
    tinted = tuple(100 // 2 + c // 2 for c in PREDICTION_COLOUR)
    assert tuple(out[16, 16]) == tinted  # (8, 8) inside the prediction
    assert tuple(out[0, 0]) == (100, 100, 100)


def test_overlay_accepts_rle_masks_and_ignores_masks_of_another_size():
    from sa2va_trl.rewards.masks import mask_to_rle

    image = np.zeros((16, 16, 3), dtype=np.uint8)
    out = render_overlay(image, region_mask=mask_to_rle(square()), pred_mask=np.ones((8, 8), bool), scale=1)
    assert tuple(out[4, 4]) == REGION_COLOUR and tuple(out[8, 8]) == (0, 0, 0)


def test_callback_writes_images_to_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    samples = [{"task": "caption_to_mask", "img": Image.new("RGB", (16, 16)), "region_mask": square(),
                "pred_mask": square(lo=2, hi=8), "caption": "a red square", "completion": "Sure, it is", "reward": 0.5}]
    callback = SampleOverlayCallback(lambda n: samples[:n], every_n_steps=5, num_samples=2)
    writer = SummaryWriter(str(tmp_path))
    callback._tensorboard = TensorBoardCallback(tb_writer=writer)
    args = types.SimpleNamespace(report_to=["tensorboard"])
    for step in (3, 5, 5):  # 3: not a multiple; the second 5: already logged at that step
        state = types.SimpleNamespace(global_step=step, is_world_process_zero=True)
        callback.on_log(args, state, None, logs={})
    writer.close()
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0}).Reload()
    assert events.Tags()["images"] == ["samples/0"]
    assert [e.step for e in events.Images("samples/0")] == [5]


def test_callback_validates_its_settings():
    with pytest.raises(ValueError, match="must be positive"):
        SampleOverlayCallback(lambda n: [], every_n_steps=0)


@pytest.mark.parametrize("module", ["sa2va_trl.callbacks", "sa2va_trl.trainer"])
def test_docstring_examples_run(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
