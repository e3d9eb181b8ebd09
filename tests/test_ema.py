"""EMACallback without a Trainer: the update rule, the decay schedule, swapping, state and files."""

import copy
import json
import os

import pytest
import torch
from torch import nn

from sa2va_trl.ema import EMACallback, consolidate_ema_state, normalize_param_name


class TwoLayer(nn.Module):
    """Linear(3, 4) -> tanh -> Linear(4, 2), with the first layer's bias frozen."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 2)
        self.a.bias.requires_grad_(False)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


class Wrapper(nn.Module):
    """Stands in for DDP / the DeepSpeed engine: the model under ``module``."""

    def __init__(self, module):
        super().__init__()
        self.module = module


def trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def set_params(model, step):
    """A known, non-linear parameter path: p_t = sin(t * (index + 1) / 7) elementwise."""
    with torch.no_grad():
        for i, p in enumerate(trainable(model).values()):
            base = torch.arange(p.numel(), dtype=torch.float64).reshape(p.shape)
            p.copy_(torch.sin(step * (base + i + 1) / 7.0))


def hand_ema(model, steps, decays):
    """shadow_0 = p_0; shadow_t = d_t * shadow_{t-1} + (1 - d_t) * p_t, in float64."""
    set_params(model, 0)
    shadow = {n: p.detach().double().clone() for n, p in trainable(model).items()}
    for t, d in zip(range(1, steps + 1), decays):
        set_params(model, t)
        for n, p in trainable(model).items():
            shadow[n] = d * shadow[n] + (1 - d) * p.detach().double()
    return shadow


@pytest.mark.parametrize(
    "settings, decays",
    [
        (dict(decay=0.9), [0.9] * 6),
        (dict(decay=0.9, warmup="ratio"), [min(0.9, (1 + k) / (10 + k)) for k in range(1, 7)]),
        (dict(decay=0.9, warmup="linear", warmup_steps=4), [0.9 * min(1, k / 4) for k in range(1, 7)]),
        (dict(decay=0.8, update_after_step=2), [0.0, 0.0, 0.8, 0.8, 0.8, 0.8]),
        (
            dict(decay=0.8, warmup="ratio", update_after_step=2),
            [0, 0] + [min(0.8, (1 + k) / (10 + k)) for k in range(1, 5)],
        ),
    ],
)
def test_update_follows_the_hand_computed_ema(settings, decays):
    model = TwoLayer()
    set_params(model, 0)
    ema = EMACallback(**settings).attach(model)
    for t in range(1, 7):
        set_params(model, t)
        ema.update(model)
        assert ema.step == t
        assert ema.current_decay == pytest.approx(decays[t - 1], abs=1e-15)
    expected = hand_ema(TwoLayer(), 6, decays)
    assert set(ema.shadow) == set(expected) == {"a.weight", "b.weight", "b.bias"}
    for name, value in expected.items():
        torch.testing.assert_close(ema.shadow[name], value.float(), rtol=1e-6, atol=1e-7)
    assert ema.num_updates == sum(d > 0 for d in decays)


def test_decay_schedule_values():
    assert EMACallback(decay=0.999).decay_at(1) == 0.999
    ratio = EMACallback(decay=0.999, warmup="ratio")
    assert ratio.decay_at(1) == pytest.approx(2 / 11)
    assert ratio.decay_at(90) == pytest.approx(91 / 100)
    assert ratio.decay_at(10**6) == 0.999  # capped by decay
    linear = EMACallback(decay=0.99, warmup="linear", warmup_steps=100)
    assert linear.decay_at(25) == pytest.approx(0.99 * 0.25)
    assert linear.decay_at(500) == pytest.approx(0.99)
    delayed = EMACallback(decay=0.99, warmup="linear", warmup_steps=10, update_after_step=5)
    assert [delayed.decay_at(t) for t in (0, 5, 6)] == [0.0, 0.0, pytest.approx(0.099)]


def test_frozen_parameters_are_not_stored_nor_touched():
    model = TwoLayer()
    frozen_before = model.a.bias.detach().clone()
    ema = EMACallback(decay=0.5).attach(model)
    assert "a.bias" not in ema.shadow and "a.bias" not in ema.state_dict()["shadow"]
    with torch.no_grad():
        model.a.bias.add_(3.0)  # a frozen parameter that changes anyway: the EMA ignores it
        model.b.weight.add_(1.0)
    frozen_now = model.a.bias.detach().clone()
    ema.update(model)
    ema.copy_to(model)
    assert torch.equal(model.a.bias, frozen_now)
    assert not torch.equal(frozen_now, frozen_before)


def test_shadow_is_fp32_and_keeps_updates_bf16_would_round_away():
    model = nn.Linear(1, 1, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = EMACallback(decay=0.999).attach(model)
    with torch.no_grad():
        model.weight.fill_(1.0078125)  # the next bf16 number after 1.0
    ema.update(model)
    assert ema.shadow["weight"].dtype == torch.float32
    # 0.001 * 0.0078125 = 7.8125e-6 is far below bf16's resolution at 1.0 (7.8e-3), not fp32's
    torch.testing.assert_close(ema.shadow["weight"], torch.tensor([[1.0 + 7.8125e-6]]), rtol=0, atol=1e-9)


def test_swapped_in_gives_the_ema_model_and_restores_bitwise():
    torch.manual_seed(0)
    model = TwoLayer()
    ema = EMACallback(decay=0.7).attach(model)
    for _ in range(3):
        with torch.no_grad():
            for p in trainable(model).values():
                p.add_(torch.randn_like(p))
        ema.update(model)
    live = {n: p.detach().clone() for n, p in model.named_parameters()}
    ema_model = copy.deepcopy(model)
    ema.copy_to(ema_model)
    x = torch.randn(5, 3)
    with ema.swapped_in(model) as swapped:
        assert swapped is model
        torch.testing.assert_close(model(x), ema_model(x), rtol=0, atol=0)
        assert not torch.equal(model.b.weight, live["b.weight"])
    for name, param in model.named_parameters():
        assert torch.equal(param, live[name]), name
    # also restored when the body raises
    with pytest.raises(KeyError):
        with ema.average_parameters(model):
            raise KeyError("boom")
    for name, param in model.named_parameters():
        assert torch.equal(param, live[name]), name


def test_swap_in_bf16_model_restores_bitwise():
    model = TwoLayer().to(torch.bfloat16)
    ema = EMACallback(decay=0.9).attach(model)
    with torch.no_grad():
        model.b.weight.mul_(1.5)
    ema.update(model)
    live = model.b.weight.detach().clone()
    with ema.swapped_in(model):
        torch.testing.assert_close(model.b.weight, ema.shadow["b.weight"].to(torch.bfloat16), rtol=0, atol=0)
    assert torch.equal(model.b.weight, live)


def test_swap_of_fp32_model_exchanges_storage_without_copies_and_restores_bitwise():
    torch.manual_seed(0)
    model = TwoLayer()
    ema = EMACallback(decay=0.5).attach(model)
    with torch.no_grad():
        for p in trainable(model).values():
            p.add_(torch.randn_like(p))
    ema.update(model)
    params = trainable(model)
    live = {n: p.detach().clone() for n, p in params.items()}
    live_ptrs = {n: p.data_ptr() for n, p in params.items()}
    shadow_ptrs = {n: t.data_ptr() for n, t in ema.shadow.items()}
    shadow = {n: t.clone() for n, t in ema.shadow.items()}
    with ema.swapped_in(model):
        for name, param in params.items():
            assert param.data_ptr() == shadow_ptrs[name], name  # the shadow itself, no new storage
            assert torch.equal(param, shadow[name]), name
        with pytest.raises(RuntimeError, match="swapped in"):
            ema.update(model)  # would average the EMA weights into themselves
        with pytest.raises(RuntimeError, match="already stored"):
            with ema.swapped_in(model):
                pass
    for name, param in params.items():
        assert param.data_ptr() == live_ptrs[name] and torch.equal(param, live[name]), name
        assert ema.shadow[name].data_ptr() == shadow_ptrs[name] and torch.equal(ema.shadow[name], shadow[name])
    with pytest.raises(KeyError):
        with ema.swapped_in(model):
            raise KeyError("boom")
    for name, param in params.items():
        assert param.data_ptr() == live_ptrs[name] and torch.equal(param, live[name]), name
    ema.update(model)  # usable again after the swap


def test_swap_of_mixed_precision_model_copies_only_the_bf16_parameters():
    torch.manual_seed(0)
    model = TwoLayer()
    model.b.to(torch.bfloat16)
    ema = EMACallback(decay=0.5).attach(model)
    with torch.no_grad():
        for p in trainable(model).values():
            p.add_(1.0)
    ema.update(model)
    live = {n: p.detach().clone() for n, p in trainable(model).items()}
    bf16_ptr = model.b.weight.data_ptr()
    with ema.swapped_in(model):
        assert model.a.weight.data_ptr() == ema.shadow["a.weight"].data_ptr()
        assert model.b.weight.data_ptr() == bf16_ptr  # copied into, not swapped
        torch.testing.assert_close(model.b.weight, ema.shadow["b.weight"].to(torch.bfloat16), rtol=0, atol=0)
    for name, param in trainable(model).items():
        assert torch.equal(param, live[name]), name


def test_store_restore_and_errors():
    model = TwoLayer()
    ema = EMACallback().attach(model)
    with pytest.raises(RuntimeError, match="store"):
        ema.restore(model)
    ema.store(model)
    with pytest.raises(RuntimeError, match="already stored"):
        with ema.swapped_in(model):  # nested: would lose the live weights
            pass
    before = model.b.weight.detach().clone()
    with torch.no_grad():
        model.b.weight.zero_()
    ema.restore(model)
    assert torch.equal(model.b.weight, before)


def test_names_are_normalised_across_wrappers():
    assert normalize_param_name("module._orig_mod.module.x.weight") == "x.weight"
    assert normalize_param_name("base_model.model.q.lora_A.default.weight") == "q.lora_A.default.weight"
    assert normalize_param_name("encoder.module.weight") == "encoder.module.weight"  # only leading
    model = TwoLayer()
    wrapped_ema = EMACallback(decay=0.5).attach(Wrapper(model))
    assert set(wrapped_ema.shadow) == {"a.weight", "b.weight", "b.bias"}
    with torch.no_grad():
        model.b.bias.add_(2.0)
    wrapped_ema.update()
    bare = copy.deepcopy(model)
    bare_ema = EMACallback(decay=0.5).attach(bare)
    bare_ema.load_state_dict(wrapped_ema.state_dict())
    bare_ema.copy_to(bare)
    torch.testing.assert_close(bare.b.bias, wrapped_ema.shadow["b.bias"])


def test_state_dict_roundtrip_continues_identically():
    model = TwoLayer()
    ema = EMACallback(decay=0.9, warmup="ratio").attach(model)
    set_params(model, 1)
    ema.update(model)
    state = ema.state_dict()
    other = EMACallback(decay=0.9, warmup="ratio").attach(copy.deepcopy(model))
    other.load_state_dict(state)
    assert (other.step, other.num_updates) == (1, 1)
    set_params(model, 2)
    ema.update(model)
    other.update(model)
    for name in ema.shadow:
        torch.testing.assert_close(other.shadow[name], ema.shadow[name], rtol=0, atol=0)
    assert other.current_decay == ema.current_decay == pytest.approx(3 / 12)


def test_state_dict_of_another_model_is_refused():
    ema = EMACallback().attach(TwoLayer())
    other = EMACallback().attach(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="missing from the EMA"):
        ema.load_state_dict(other.state_dict())


def test_save_and_load_from_checkpoint(tmp_path):
    model = TwoLayer()
    ema = EMACallback(decay=0.8, update_after_step=1).attach(model)
    for t in (1, 2, 3):
        set_params(model, t)
        ema.update(model)
    ema.save(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["ema_config.json", "ema_state.safetensors"]  # no temp files left
    config = json.loads((tmp_path / "ema_config.json").read_text())
    assert config["step"] == 3 and config["decay"] == 0.8 and config["update_after_step"] == 1
    assert config["sharded"] is False and config["shapes"]["a.weight"] == [4, 3]

    restored = EMACallback(decay=0.8, update_after_step=1)
    restored.load_from_checkpoint(str(tmp_path), model=copy.deepcopy(model))
    assert (restored.step, restored.num_updates) == (3, 2)
    full = consolidate_ema_state(str(tmp_path))
    for name in ema.shadow:
        torch.testing.assert_close(restored.shadow[name], ema.shadow[name], rtol=0, atol=0)
        torch.testing.assert_close(full[name], ema.shadow[name], rtol=0, atol=0)


def test_load_from_missing_checkpoint_says_what_is_wrong(tmp_path):
    ema = EMACallback().attach(TwoLayer())
    with pytest.raises(FileNotFoundError, match="ema_config.json"):
        ema.load_from_checkpoint(str(tmp_path))


def test_save_pretrained_of_plain_module(tmp_path):
    from safetensors.torch import load_file

    model = TwoLayer()
    ema = EMACallback(decay=0.5).attach(model)
    with torch.no_grad():
        model.b.weight.add_(1.0)
    ema.update(model)
    live = model.b.weight.detach().clone()
    ema.save_pretrained(str(tmp_path))
    saved = load_file(str(tmp_path / "model.safetensors"))
    torch.testing.assert_close(saved["b.weight"], ema.shadow["b.weight"], rtol=0, atol=0)
    assert torch.equal(saved["a.bias"], model.a.bias)  # frozen weights saved as they are
    assert torch.equal(model.b.weight, live)


def test_settings_are_validated():
    with pytest.raises(ValueError, match="decay"):
        EMACallback(decay=1.0)
    with pytest.raises(ValueError, match="warmup must be one of"):
        EMACallback(warmup="cosine")
    with pytest.raises(ValueError, match="warmup_steps"):
        EMACallback(warmup="linear")
    with pytest.raises(ValueError, match="no trainable parameters"):
        EMACallback().attach(nn.Linear(2, 2).requires_grad_(False))
    with pytest.raises(RuntimeError, match="attach"):
        EMACallback().copy_to()


def test_fsdp_is_refused():
    class FullyShardedDataParallel(nn.Module):  # stands in for torch's FSDP wrapper
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(2, 2)

    with pytest.raises(NotImplementedError, match="FSDP"):
        EMACallback().attach(FullyShardedDataParallel())


def test_lora_ema_is_base_plus_ema_of_adapters(tmp_path):
    peft = pytest.importorskip("peft")

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(4, 4)
            self.out = nn.Linear(4, 2)

        def forward(self, x):
            return self.out(torch.relu(self.q(x)))

    torch.manual_seed(0)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q"], init_lora_weights=False)
    model = peft.get_peft_model(Tiny(), config)
    ema = EMACallback(decay=0.5).attach(model)
    assert set(ema.shadow) == {"q.lora_A.default.weight", "q.lora_B.default.weight"}
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    with torch.no_grad():
        model.base_model.model.q.lora_B.default.weight.add_(1.0)
    ema.update(model)
    with ema.swapped_in(model):
        torch.testing.assert_close(
            model.base_model.model.q.lora_B.default.weight, ema.shadow["q.lora_B.default.weight"], rtol=0, atol=0
        )
        for n, p in model.named_parameters():
            if n in base:
                assert torch.equal(p, base[n]), n

    ema.save_pretrained(str(tmp_path / "ema_adapter"))
    torch.manual_seed(0)
    reloaded = peft.PeftModel.from_pretrained(Tiny(), str(tmp_path / "ema_adapter"))
    torch.testing.assert_close(
        reloaded.base_model.model.q.lora_B.default.weight, ema.shadow["q.lora_B.default.weight"], rtol=0, atol=0
    )


def test_swap_between_forward_and_backward_leaves_gradients_unchanged():
    torch.manual_seed(0)
    model = TwoLayer()
    ema = EMACallback(decay=0.5).attach(model)
    with torch.no_grad():
        model.b.weight.add_(1.0)
    ema.update(model)
    x = torch.randn(4, 3)
    model(x).square().sum().backward()
    expected = {n: p.grad.clone() for n, p in trainable(model).items()}
    model.zero_grad()
    loss = model(x).square().sum()
    with torch.no_grad(), ema.swapped_in(model):  # e.g. the reference forward of the same step
        model(x)
    loss.backward()
    for name, param in trainable(model).items():
        torch.testing.assert_close(param.grad, expected[name], rtol=0, atol=0)


# ---- the ZeRO-3 layout, with stand-in partitioned parameters (no DeepSpeed, no process group) ----


class FakeZero3Param(nn.Parameter):
    """A parameter carrying the attributes DeepSpeed ZeRO-3 gives its parameters: ``ds_tensor`` is
    this rank's flat slice (padded to the same length on every rank), ``data`` is empty."""

    def __new__(cls, full: torch.Tensor, rank: int, world: int):
        param = super().__new__(cls, torch.empty(0), requires_grad=True)
        partition = -(-full.numel() // world)
        flat = torch.zeros(partition * world)
        flat[: full.numel()] = full.reshape(-1)
        param.ds_id, param.ds_shape, param.ds_numel = 0, full.shape, full.numel()
        param.ds_numel_aligned = partition * world
        param.ds_tensor = flat[rank * partition : (rank + 1) * partition].clone()
        return param


def zero3_model(full: torch.Tensor, rank: int, world: int) -> nn.Module:
    model = nn.Module()
    model.w = FakeZero3Param(full, rank, world)
    return model


def test_zero3_slices_are_updated_saved_and_resliced(tmp_path, monkeypatch):
    import sa2va_trl.ema as ema_module

    monkeypatch.setattr(torch.distributed, "barrier", lambda *a, **k: None)
    full0 = torch.arange(15.0).reshape(5, 3)  # 15 elements over 2 ranks: slices of 8 and 7 (+1 padding)
    full1 = full0 * -2
    shadows = []
    for rank in (1, 0):  # rank 0 last: it writes ema_config.json after the shards
        monkeypatch.setattr(ema_module, "_dist_rank_world", lambda rank=rank: (rank, 2))
        model = zero3_model(full0, rank, 2)
        ema = EMACallback(decay=0.75).attach(model)
        assert ema.shadow["w"].shape == (8 - rank,)  # the valid part of the slice, no padding
        model.w.ds_tensor.copy_(zero3_model(full1, rank, 2).w.ds_tensor)  # "the optimizer step"
        ema.update(model)
        shadows.append(ema.shadow["w"].clone())
        ema.save(str(tmp_path))
    expected = 0.75 * full0 + 0.25 * full1
    torch.testing.assert_close(torch.cat([shadows[1], shadows[0]]), expected.reshape(-1))
    shards = ["ema_state_rank0.safetensors", "ema_state_rank1.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["ema_config.json", *shards]
    torch.testing.assert_close(consolidate_ema_state(str(tmp_path))["w"], expected)

    # re-sliced for 3 ranks (slices of 5), and loaded whole into an unpartitioned model
    monkeypatch.setattr(ema_module, "_dist_rank_world", lambda: (1, 3))
    resliced = EMACallback(decay=0.75)
    resliced.load_from_checkpoint(str(tmp_path), zero3_model(full0, 1, 3))
    torch.testing.assert_close(resliced.shadow["w"], expected.reshape(-1)[5:10])
    monkeypatch.setattr(ema_module, "_dist_rank_world", lambda: (0, 1))
    plain = nn.Module()
    plain.w = nn.Parameter(full0.clone())
    whole = EMACallback(decay=0.75)
    whole.load_from_checkpoint(str(tmp_path), plain)
    torch.testing.assert_close(whole.shadow["w"], expected)
    assert whole.step == 1
    whole.copy_to(plain)
    torch.testing.assert_close(plain.w.detach(), expected)


def test_zero3_sub_group_partitions_are_refused(monkeypatch):
    import sa2va_trl.ema as ema_module

    monkeypatch.setattr(ema_module, "_dist_rank_world", lambda: (0, 4))
    model = zero3_model(torch.ones(16), 0, 2)  # sliced for 2 ranks (MiCS-like) in a world of 4
    with pytest.raises(NotImplementedError, match="plain ZeRO-3"):
        EMACallback().attach(model)
    hpz = zero3_model(torch.ones(16), 0, 4)
    hpz.w.ds_zero_param_process_group = object()  # ZeRO++ hpZ secondary partition group
    with pytest.raises(NotImplementedError, match="hpZ"):
        EMACallback().attach(hpz)


def test_checkpoint_loaded_before_train_is_resliced_for_the_prepared_model(tmp_path, monkeypatch):
    """load_from_checkpoint on the unprepared model, then the Trainer partitions it (ZeRO-3 without
    zero3_init): on_train_begin re-reads the checkpoint for the partitioned parameters."""
    from types import SimpleNamespace

    import sa2va_trl.ema as ema_module

    full = torch.arange(15.0).reshape(5, 3)
    plain = nn.Module()
    plain.w = nn.Parameter(full.clone())
    saved = EMACallback(decay=0.5).attach(plain)
    with torch.no_grad():
        plain.w.mul_(3.0)
    saved.update(plain)
    saved.save(str(tmp_path))

    carried = EMACallback(decay=0.5)
    carried.load_from_checkpoint(str(tmp_path), copy.deepcopy(plain))
    monkeypatch.setattr(ema_module, "_dist_rank_world", lambda: (1, 2))
    partitioned = zero3_model(full, 1, 2)
    carried.on_train_begin(SimpleNamespace(output_dir=str(tmp_path)), SimpleNamespace(global_step=0), None,
                           model=partitioned)
    torch.testing.assert_close(carried.shadow["w"], saved.shadow["w"].reshape(-1)[8:])
    assert carried.step == 1
