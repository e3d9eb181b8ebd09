"""The accelerate shim for DeepSpeed on machines without an accelerator (sa2va_trl/compat.py).

The end-to-end check (2 processes under cpu_zero2/cpu_zero3) is tests/test_ema_distributed.py.
"""

import os

import pytest
from accelerate.state import PartialState
from accelerate.utils import DistributedType

from sa2va_trl import compat

REAL_HAS_ACCELERATOR = compat._has_accelerator
LAUNCHED_WITH_DEEPSPEED = {"LOCAL_RANK": "0", "ACCELERATE_USE_DEEPSPEED": "true"}


@pytest.fixture
def env(monkeypatch):
    """A clean environment and an original `_prepare_backend` that is restored afterwards."""
    for key in ("LOCAL_RANK", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE", "DS_ACCELERATOR"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(PartialState, "_prepare_backend", PartialState._prepare_backend)
    monkeypatch.setattr(compat, "_has_accelerator", lambda: False)
    return monkeypatch


def install_fake_original(monkeypatch, result):
    calls = []

    def fake(self, cpu=False, sagemaker_dp=False, backend=None):
        calls.append((cpu, sagemaker_dp, backend))
        return result

    monkeypatch.setattr(PartialState, "_prepare_backend", fake)
    assert compat.patch_accelerate_for_cpu_deepspeed() is True
    return calls


def set_env(monkeypatch, values):
    for key, value in values.items():
        monkeypatch.setenv(key, value)


def test_maps_no_backend_to_gloo_when_launched_with_deepspeed_and_no_accelerator(env):
    set_env(env, LAUNCHED_WITH_DEEPSPEED)
    calls = install_fake_original(env, (None, DistributedType.NO))
    assert PartialState._prepare_backend(object()) == ("gloo", DistributedType.MULTI_CPU)
    assert calls == [(False, False, None)]  # the original ran with the same arguments


@pytest.mark.parametrize(
    "environ, cpu, has_accelerator, original",
    [
        ({"LOCAL_RANK": "0"}, False, False, (None, DistributedType.NO)),  # DeepSpeed not requested
        ({"ACCELERATE_USE_DEEPSPEED": "true"}, False, False, (None, DistributedType.NO)),  # one process
        (LAUNCHED_WITH_DEEPSPEED, True, False, (None, DistributedType.NO)),  # cpu=True asked for
        (LAUNCHED_WITH_DEEPSPEED, False, True, (None, DistributedType.NO)),  # an accelerator exists
        (LAUNCHED_WITH_DEEPSPEED, False, False, ("nccl", DistributedType.MULTI_GPU)),  # already found
        (LAUNCHED_WITH_DEEPSPEED, False, False, ("gloo", DistributedType.MULTI_CPU)),
        ({**LAUNCHED_WITH_DEEPSPEED, "ACCELERATE_USE_DEEPSPEED": "false"}, False, False, (None, DistributedType.NO)),
    ],
)
def test_leaves_every_other_situation_alone(env, environ, cpu, has_accelerator, original):
    set_env(env, environ)
    env.setattr(compat, "_has_accelerator", lambda: has_accelerator)
    install_fake_original(env, original)
    assert PartialState._prepare_backend(object(), cpu=cpu) == original


def test_patch_is_idempotent(env):
    set_env(env, LAUNCHED_WITH_DEEPSPEED)
    install_fake_original(env, (None, DistributedType.NO))
    wrapped = PartialState._prepare_backend
    assert compat.patch_accelerate_for_cpu_deepspeed() is False
    assert PartialState._prepare_backend is wrapped
    assert PartialState._prepare_backend(object()) == ("gloo", DistributedType.MULTI_CPU)


def test_deepspeed_requested_reads_the_launcher_environment():
    assert compat.deepspeed_requested({"ACCELERATE_USE_DEEPSPEED": "true"})
    assert compat.deepspeed_requested({"ACCELERATE_USE_DEEPSPEED": "True"})
    assert compat.deepspeed_requested({"ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"})
    assert not compat.deepspeed_requested({"ACCELERATE_USE_DEEPSPEED": "false", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"})
    assert not compat.deepspeed_requested({})


def test_maybe_apply_only_patches_when_needed(env):
    original = PartialState._prepare_backend
    assert compat.maybe_apply_cpu_deepspeed_fix() is False  # plain single-process run
    assert PartialState._prepare_backend is original
    set_env(env, LAUNCHED_WITH_DEEPSPEED)
    env.setattr(compat, "_has_accelerator", lambda: True)
    assert compat.maybe_apply_cpu_deepspeed_fix() is False  # a GPU machine
    assert PartialState._prepare_backend is original
    env.setattr(compat, "_has_accelerator", lambda: False)
    assert compat.maybe_apply_cpu_deepspeed_fix() is True
    assert PartialState._prepare_backend is not original
    assert os.environ["DS_ACCELERATOR"] == "cpu"


def test_installed_accelerate_still_needs_the_fix_and_the_fix_works(env):
    """Canary on the real `_prepare_backend`: on this CPU machine, launched with DeepSpeed, accelerate
    finds no backend. If this starts failing, accelerate fixed it and the shim can go."""
    set_env(env, LAUNCHED_WITH_DEEPSPEED)
    env.setattr(compat, "_has_accelerator", REAL_HAS_ACCELERATOR)
    if REAL_HAS_ACCELERATOR():
        pytest.skip("needs a machine without an accelerator")
    assert PartialState._prepare_backend(object()) == (None, DistributedType.NO)
    compat.patch_accelerate_for_cpu_deepspeed()
    assert PartialState._prepare_backend(object()) == ("gloo", DistributedType.MULTI_CPU)


def test_accelerate_configs_hold_the_promised_settings():
    from accelerate.commands.config.config_args import load_config_from_file

    configs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "accelerate_configs")

    def load(name):
        return load_config_from_file(os.path.join(configs, name))

    for name in ("multi_gpu.yaml", "zero2.yaml", "zero3.yaml"):
        config = load(name)
        assert (config.num_processes, config.mixed_precision, config.use_cpu) == (8, "bf16", False), name
    assert load("multi_gpu.yaml").distributed_type == DistributedType.MULTI_GPU
    for name, stage in (("zero2.yaml", 2), ("zero3.yaml", 3), ("cpu_zero2.yaml", 2), ("cpu_zero3.yaml", 3)):
        config = load(name)
        assert config.distributed_type == DistributedType.DEEPSPEED, name
        assert config.deepspeed_config["zero_stage"] == stage, name
    for name in ("zero3.yaml", "cpu_zero3.yaml"):
        ds = load(name).deepspeed_config
        assert ds["zero3_init_flag"] is True and ds["zero3_save_16bit_model"] is True, name
    for name in ("cpu_zero2.yaml", "cpu_zero3.yaml"):
        config = load(name)
        # use_cpu: true would switch the DeepSpeed path off; bf16 is not for the CPU runs
        assert (config.num_processes, config.mixed_precision, config.use_cpu) == (2, "no", False), name


def test_cpu_zero3_partitioned_config_partitions_every_parameter():
    import json

    from accelerate.commands.config.config_args import load_config_from_file

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = load_config_from_file(os.path.join(root, "accelerate_configs", "cpu_zero3_partitioned.yaml"))
    assert config.distributed_type == DistributedType.DEEPSPEED
    assert (config.num_processes, config.use_cpu, config.deepspeed_config["zero3_init_flag"]) == (2, False, True)
    with open(os.path.join(root, config.deepspeed_config["deepspeed_config_file"])) as f:  # relative to the root
        zero = json.load(f)["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_param_persistence_threshold"] == 0
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
