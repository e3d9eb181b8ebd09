"""LightweightRewardNetwork: architecture, preprocessing, save/load, seed checkpoints, bad input."""

import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModel

from sa2va_trl.data.schema import encode_mask
from sa2va_trl.reward_net import (
    CheckpointLayoutError,
    LightweightRewardNetwork,
    MaskSizeError,
    RewardNetConfig,
    UnsafeCheckpointError,
    load_reward_net,
    prepare_inputs,
)
from sa2va_trl.rewards.errors import MaskFormatError


def _net(input_size=32):
    return LightweightRewardNetwork(RewardNetConfig(input_size=input_size)).eval()


def _scene(h=40, w=50):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), dtype=bool)
    mask[10:30, 5:25] = True
    return image, mask


def test_parameter_count_is_the_seeds():
    net = LightweightRewardNetwork(RewardNetConfig())
    assert sum(p.numel() for p in net.parameters()) == 140_193
    assert net.num_parameters() == 140_193


def test_architecture_matches_the_issue():
    net = LightweightRewardNetwork(RewardNetConfig())
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(7, 7), (5, 5), (3, 3)]
    assert [c.out_channels for c in convs] == [32, 64, 128]
    assert all(c.bias is not None for c in convs)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) == 3
    pools = [m for m in net.modules() if isinstance(m, torch.nn.MaxPool2d)]
    assert len(pools) == 3 and all(p.stride == 2 for p in pools)
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(128, 64), (64, 1)]


def test_forward_loss_is_mse_of_sigmoid_scores():
    net = _net().train()
    x, labels = torch.randn(5, 4, 32, 32), torch.rand(5)
    out = net(x, labels=labels)
    assert out.scores.shape == (5,)
    torch.testing.assert_close(out.scores, torch.sigmoid(out.logits))
    torch.testing.assert_close(out.loss, ((out.scores - labels) ** 2).mean())
    out.loss.backward()
    assert net.features[0][0].weight.grad is not None


def test_forward_rejects_wrong_channels():
    with pytest.raises(ValueError, match="pixel_values"):
        _net()(torch.randn(2, 3, 32, 32))


@pytest.mark.parametrize("kwargs", [{"kernel_sizes": (7, 4, 3)}, {"input_size": 4}, {"image_mean": (0.5,)}])
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        RewardNetConfig(**kwargs)


def test_prepare_inputs_normalises_and_resizes():
    image = np.full((20, 30, 3), 255, dtype=np.uint8)
    mask = np.zeros((20, 30), dtype=bool)
    mask[:, :15] = True  # left half
    x = prepare_inputs([image], [mask], input_size=16, image_mean=(0.5, 0.5, 0.5), image_std=(0.25, 0.5, 1.0))
    assert x.shape == (1, 4, 16, 16) and x.dtype == torch.float32
    torch.testing.assert_close(x[0, :3, 0, 0], torch.tensor([2.0, 1.0, 0.5]))
    assert set(x[0, 3].unique().tolist()) == {0.0, 1.0}  # nearest: the mask stays 0 / 1
    assert x[0, 3, :, :8].all() and not x[0, 3, :, 8:].any()


def test_score_accepts_pil_numpy_and_rle_alike():
    net = _net()
    image, mask = _scene()
    from_numpy = net.score([image], [mask])
    from_pil = net.score([Image.fromarray(image)], [encode_mask(mask)])
    from_lists = net.score([image], [mask.astype(np.uint8).tolist()])
    assert from_numpy.shape == (1,)
    torch.testing.assert_close(from_numpy, from_pil)
    torch.testing.assert_close(from_numpy, from_lists)
    assert 0.0 <= float(from_numpy) <= 1.0


def test_score_batches_and_restores_training_mode():
    net = _net().train()
    image, mask = _scene()
    together = net.score([image] * 5, [mask, ~mask, mask, ~mask, mask], batch_size=2)
    assert together.shape == (5,) and net.training
    torch.testing.assert_close(together[0], together[2])
    alone = net.score([image], [~mask])
    torch.testing.assert_close(together[1:2], alone)


def test_all_zero_mask_scores_without_nan():
    net = _net()
    image, mask = _scene()
    scores = net.score([image, np.zeros_like(image)], [np.zeros_like(mask), np.zeros_like(mask)])
    assert torch.isfinite(scores).all()


def test_mask_size_mismatch_is_rejected_with_index_and_field():
    net = _net()
    image, mask = _scene(40, 50)
    with pytest.raises(MaskSizeError, match=r"row 1, field 'mask'.*40 x 50") as info:
        net.score([image, image], [mask, mask.T])
    assert isinstance(info.value, ValueError) and info.value.row == 1


def test_non_binary_mask_is_rejected():
    image, mask = _scene()
    with pytest.raises(MaskFormatError, match="row 0"):
        _net().score([image], [mask * 0.7])


def test_save_and_load_pretrained_round_trip(tmp_path):
    net = LightweightRewardNetwork(RewardNetConfig(input_size=48, image_mean=(0.1, 0.2, 0.3)))
    with torch.no_grad():  # non-default BatchNorm statistics must survive the round trip
        net.features[0][1].running_mean.uniform_()
    net.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "config.json").exists()
    loaded = load_reward_net(str(tmp_path))
    assert loaded.config.input_size == 48 and loaded.config.image_mean == [0.1, 0.2, 0.3]
    for (name, a), b in zip(net.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    image, mask = _scene()
    torch.testing.assert_close(net.eval().score([image], [mask]), loaded.score([image], [mask]))
    assert isinstance(AutoModel.from_pretrained(tmp_path), LightweightRewardNetwork)


def _seed_style_state_dict(net):
    """The network's tensors under other names (the seed's own names are unknown)."""
    return {f"layer{i}.tensor": t.clone() for i, t in enumerate(net.state_dict().values())}


def test_seed_pth_checkpoint_loads_with_weights_only(tmp_path):
    net = _net(input_size=64)
    path = tmp_path / "best_reward_net.pth"
    torch.save({"model_state_dict": _seed_style_state_dict(net), "epoch": 9, "loss": 0.0021}, path)
    loaded = load_reward_net(str(path), config=RewardNetConfig(input_size=64))
    for (name, a), b in zip(net.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    assert not loaded.training


def test_seed_pth_without_batchnorm_counters_and_bare_state_dict(tmp_path):
    net = _net()
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "final.pt"
    torch.save(state, path)
    loaded = load_reward_net(str(path))
    torch.testing.assert_close(loaded.head[2].weight, net.head[2].weight)


class _Pickled:  # a custom class: unpickling it would run arbitrary code paths
    def __init__(self):
        self.payload = 1


def test_pickle_with_custom_class_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model_state_dict": _net().state_dict(), "extra": _Pickled()}, path)
    with pytest.raises(UnsafeCheckpointError, match="refusing to load") as info:
        load_reward_net(str(path))
    assert isinstance(info.value, ValueError)
    path2 = tmp_path / "whole_model.pth"
    with open(path2, "wb") as f:
        pickle.dump(_Pickled(), f)
    with pytest.raises(UnsafeCheckpointError):
        load_reward_net(str(path2))


def test_checkpoint_with_wrong_shapes_is_refused(tmp_path):
    other = LightweightRewardNetwork(RewardNetConfig(block_channels=(16, 64, 128)))
    path = tmp_path / "other.pth"
    torch.save({"model_state_dict": other.state_dict()}, path)
    with pytest.raises(CheckpointLayoutError, match="shape"):
        load_reward_net(str(path))


def test_missing_directory_gives_a_clear_error(tmp_path):
    with pytest.raises(OSError, match="could not load a reward network"):
        load_reward_net(os.path.join(tmp_path, "nowhere"))
