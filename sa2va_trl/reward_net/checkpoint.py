"""Loading a reward network: saved with `save_pretrained` (safetensors), or a seed-style `.pth`.

The seed saved `{"model_state_dict": state_dict, ...}` with `torch.save`. Such files are read with
`torch.load(weights_only=True)`: tensors and plain containers only. A file that would need
arbitrary objects unpickled (a whole pickled model, a custom class) is refused with
`UnsafeCheckpointError`, because unpickling runs code from the file.

The seed's parameter names are not known; its tensors are matched to ours by order and shape
(the architecture is the same, and `state_dict` order is the modules' definition order).

Example:
    >>> import tempfile, os, torch
    >>> from sa2va_trl.reward_net import LightweightRewardNetwork, RewardNetConfig
    >>> net = LightweightRewardNetwork(RewardNetConfig())
    >>> path = os.path.join(tempfile.mkdtemp(), "best_reward_net.pth")
    >>> torch.save({"model_state_dict": net.state_dict(), "epoch": 9}, path)
    >>> loaded = load_reward_net(path)
    >>> torch.equal(loaded.head[2].bias, net.head[2].bias)
    True
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping

import torch

from .model import LightweightRewardNetwork, RewardNetConfig

SEED_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
_STATE_DICT_KEYS = ("model_state_dict", "state_dict", "model")


class UnsafeCheckpointError(ValueError):
    """The checkpoint needs arbitrary Python objects unpickled, which `weights_only=True` refuses."""


class CheckpointLayoutError(ValueError):
    """The checkpoint's tensors do not fit the reward network."""


def _extract_state_dict(obj, path: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in _STATE_DICT_KEYS:
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointLayoutError(
            f"{path}: expected a state dict of tensors, or a dict holding one under one of {_STATE_DICT_KEYS}; "
            f"got {type(obj).__name__}" + (f" with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, Mapping) else "")
        )
    return dict(obj)


def _match_by_order(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], path: str) -> dict[str, torch.Tensor]:
    """Rename `source` tensors to `target`'s names by position, checking every shape."""
    if source.keys() == target.keys():
        pairs = [(key, source[key], key) for key in target]
    else:
        src_items, tgt_keys = list(source.items()), list(target)
        if len(src_items) != len(tgt_keys):
            # A checkpoint saved without BatchNorm's num_batches_tracked counters: match the rest.
            tgt_keys = [k for k in tgt_keys if not k.endswith("num_batches_tracked")]
            src_items = [(k, v) for k, v in src_items if not k.endswith("num_batches_tracked")]
        if len(src_items) != len(tgt_keys):
            raise CheckpointLayoutError(
                f"{path}: {len(source)} tensors, but LightweightRewardNetwork has {len(target)}; "
                "is this a reward-network checkpoint with the default architecture?"
            )
        pairs = [(src_key, tensor, tgt_key) for (src_key, tensor), tgt_key in zip(src_items, tgt_keys)]
    renamed = {}
    for src_key, tensor, tgt_key in pairs:
        if tuple(tensor.shape) != tuple(target[tgt_key].shape):
            raise CheckpointLayoutError(
                f"{path}: tensor {src_key!r} has shape {tuple(tensor.shape)}, but the matching parameter "
                f"{tgt_key!r} has shape {tuple(target[tgt_key].shape)}"
            )
        renamed[tgt_key] = tensor
    return renamed


def load_seed_checkpoint(path: str, config: RewardNetConfig | None = None) -> LightweightRewardNetwork:
    """Load a `.pth` checkpoint in the seed's layout (`{"model_state_dict": ...}` or a bare state dict).

    Args:
        path: the file.
        config: the network config (architecture and preprocessing); the default config if None.
            The seed's files carry no input size or normalisation: pass the ones it was trained with.

    Returns:
        The network in eval mode.

    Raises:
        UnsafeCheckpointError: loading would unpickle arbitrary objects.
        CheckpointLayoutError: the tensors do not fit the architecture.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"{path}: refusing to load; it holds Python objects other than tensors and plain containers, "
            "and unpickling them could run arbitrary code. Re-save it as "
            "torch.save({'model_state_dict': model.state_dict()}, path) or with save_pretrained. "
            f"(torch: {str(err).splitlines()[0]})"
        ) from err
    model = LightweightRewardNetwork(config or RewardNetConfig())
    state_dict = _match_by_order(_extract_state_dict(obj, path), model.state_dict(), path)
    # strict=False only for num_batches_tracked counters a checkpoint may lack (they stay 0).
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if unexpected or any(not k.endswith("num_batches_tracked") for k in missing):
        raise CheckpointLayoutError(f"{path}: missing tensors {missing}, unexpected tensors {unexpected}")
    return model.eval()


def load_reward_net(name_or_path: str, **kwargs) -> LightweightRewardNetwork:
    """Load a reward network from a `save_pretrained` directory, a Hub id, or a seed `.pth` file.

    Args:
        name_or_path: a directory or Hub id (read with `from_pretrained`), or a file ending in one of
            `SEED_CHECKPOINT_SUFFIXES` (read with `load_seed_checkpoint`).
        **kwargs: passed to `from_pretrained` (e.g. `revision`, `token`) or, for a `.pth` file,
            `config=`.

    Returns:
        The network in eval mode.
    """
    name_or_path = os.fspath(name_or_path)
    if os.path.isfile(name_or_path) and name_or_path.endswith(SEED_CHECKPOINT_SUFFIXES):
        return load_seed_checkpoint(name_or_path, **kwargs)
    try:
        model = LightweightRewardNetwork.from_pretrained(name_or_path, **kwargs)
    except OSError as err:
        raise OSError(
            f"could not load a reward network from {name_or_path!r}: give a directory written by "
            "save_pretrained / the reward_net trainer, a Hub id (needs network access; offline, "
            f"download it first), or a .pth file. ({err})"
        ) from err
    return model.eval()
