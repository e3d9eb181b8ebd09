"""The registry's `reward_net` reward (sa2va_trl/rewards/learned.py)."""

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from sa2va_trl.data.schema import encode_mask
from sa2va_trl.reward_net import LightweightRewardNetwork, RewardNetConfig
from sa2va_trl.rewards.errors import RewardError, RewardInputError
from sa2va_trl.rewards.learned import RewardNetReward
from sa2va_trl.rewards.registry import build_rewards, get_reward, list_rewards


@pytest.fixture
def saved_net(tmp_path):
    net = LightweightRewardNetwork(RewardNetConfig(input_size=32))
    with torch.no_grad():  # make it input-dependent in an easy-to-see way
        net.head[2].bias.fill_(0.3)
    net.save_pretrained(tmp_path)
    return net.eval(), str(tmp_path)


def _batch(n=4, h=30, w=40):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for _ in range(n)]
    masks = []
    for k in range(n):
        mask = np.zeros((h, w), dtype=bool)
        mask[k : k + 10, 5 : 5 + 5 * (k + 1)] = True
        masks.append(mask)
    return images, masks


def _call(reward, images, preds, **extra):
    n = len(images)
    return reward(prompts=["p"] * n, completions=["Sure, it is the shape."] * n, completion_ids=[[1, 2]] * n,
                  img=images, pred_mask=preds, **extra)


def test_registered_and_a_plain_callable(saved_net):
    _, path = saved_net
    assert "reward_net" in list_rewards()
    reward = get_reward("reward_net", model_name_or_path=path)
    assert reward.__name__ == "reward_net"
    assert not isinstance(reward, torch.nn.Module)  # TRL would treat a Module as a text classifier
    funcs, weights = build_rewards([{"name": "reward_net", "weight": 0.5, "options": {"model_name_or_path": path}}])
    assert funcs[0].__name__ == "reward_net" and weights == [0.5]


def test_scores_equal_the_networks_and_none_where_no_mask(saved_net):
    net, path = saved_net
    images, masks = _batch()
    reward = RewardNetReward(path, batch_size=3)
    preds = [masks[0], None, encode_mask(masks[2]), torch.from_numpy(masks[3])]
    out = _call(reward, images, preds, trainer_state=None, log_extra=lambda *a: None, log_metric=lambda *a: None,
                region_mask=[encode_mask(m) for m in masks], caption=["a"] * 4)
    assert out[1] is None and all(isinstance(v, float) for i, v in enumerate(out) if i != 1)
    expected = net.score([images[0], images[2], images[3]], [masks[0], masks[2], masks[3]])
    np.testing.assert_allclose([out[0], out[2], out[3]], expected.numpy(), rtol=1e-5, atol=1e-6)
    assert out[0] != out[3]


def test_loop1_batch_without_pred_mask_column_gives_all_none(saved_net):
    _, path = saved_net
    images, _ = _batch(3)
    reward = RewardNetReward(path)
    assert reward(prompts=["p"] * 3, completions=["c"] * 3, completion_ids=[[1]] * 3, img=images) == [None] * 3
    assert _call(reward, images, [None] * 3) == [None] * 3
    assert reward._network is None  # nothing to score: the network was not even loaded


def test_pickle_round_trip_reloads_from_the_path(saved_net):
    _, path = saved_net
    images, masks = _batch(2)
    reward = RewardNetReward(path)
    before = _call(reward, images, masks)
    copy = pickle.loads(pickle.dumps(reward))
    assert copy._network is None and copy.__name__ == "reward_net"
    assert _call(copy, images, masks) == pytest.approx(before)


def test_in_memory_network_and_seed_pth(tmp_path, saved_net):
    net, _ = saved_net
    images, masks = _batch(2)
    direct = _call(RewardNetReward(net), images, masks)
    path = tmp_path / "best_reward_net.pth"
    torch.save({"model_state_dict": net.state_dict()}, path)
    # a .pth carries no config: the default input size (128) gives different (but valid) scores
    from_pth = _call(RewardNetReward(str(path)), images, masks)
    assert all(0.0 <= v <= 1.0 for v in direct + from_pth)


def test_mask_size_mismatch_names_row_and_field(saved_net):
    _, path = saved_net
    images, masks = _batch(3)
    preds = [masks[0], masks[1], masks[2][:, :-1]]
    with pytest.raises(RewardInputError, match=r"row 2, field 'pred_mask'") as info:
        _call(RewardNetReward(path), images, preds)
    assert isinstance(info.value, ValueError)


def test_missing_image_column_and_bad_options(saved_net):
    _, path = saved_net
    _, masks = _batch(2)
    with pytest.raises(RewardInputError, match="'img'"):
        RewardNetReward(path)(prompts=["p"] * 2, completions=["c"] * 2, completion_ids=[[1]] * 2, pred_mask=masks)
    with pytest.raises(RewardError, match="model_name_or_path"):
        get_reward("reward_net")


def test_all_zero_predicted_mask_scores_finite(saved_net):
    _, path = saved_net
    images, masks = _batch(2)
    out = _call(RewardNetReward(path), images, [np.zeros_like(masks[0]), np.zeros_like(masks[1])])
    assert all(np.isfinite(out))
