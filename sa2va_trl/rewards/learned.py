"""The `reward_net` reward: a trained `LightweightRewardNetwork` scores (image, predicted mask) pairs.

It reads the `img` and `pred_mask` columns (the trainer passes `pred_mask` in loop 2); rows without
a predicted mask (loop 1) get None. It is a plain callable class with a fixed `__name__`, not an
`nn.Module`: TRL treats modules in `reward_funcs` as text classifiers.

Recipe:
    rewards:
      - name: reward_net
        weight: 0.5
        options: {model_name_or_path: outputs/demo_reward_net}   # a directory, a Hub id or a .pth
"""

from __future__ import annotations

import torch

from ..data.schema import DataError
from .columns import batch_length, get_column
from .errors import RewardInputError
from .registry import register_reward

__all__ = ["RewardNetReward"]


@register_reward("reward_net")
class RewardNetReward:
    """Score each predicted mask on its image with a trained reward network (predicted Dice, [0, 1]).

    The network loads on first use (so building the reward list stays cheap, and a pickled copy
    reloads it from `model_name_or_path`). Each image is resized and normalised as the network's
    config says; a predicted mask must have its image's height and width (a mismatch raises
    `RewardInputError` naming the row and field).

    Args:
        model_name_or_path: a directory written by `save_pretrained` / `python -m sa2va_trl.reward_net`,
            a Hub id, a seed-style `.pth`, or an already loaded `LightweightRewardNetwork`.
        device: where the network runs; None picks the current CUDA device when there is one, else the CPU.
        batch_size: samples per forward pass.
        image_column: the column holding the images.
        pred_column: the column holding the predicted masks.
        revision: Hub revision (Hub ids only).

    Returns:
        Calling it returns one float (or None where `pred_mask` is None) per completion.

    Example:
        >>> import numpy as np
        >>> from sa2va_trl.reward_net import LightweightRewardNetwork, RewardNetConfig
        >>> reward = RewardNetReward(LightweightRewardNetwork(RewardNetConfig(input_size=32)))
        >>> image, mask = np.zeros((40, 40, 3), np.uint8), np.ones((40, 40), bool)
        >>> scores = reward(prompts=["p", "p"], completions=["", ""], completion_ids=[[], []],
        ...                 img=[image, image], pred_mask=[mask, None])
        >>> reward.__name__, 0.0 <= scores[0] <= 1.0, scores[1]
        ('reward_net', True, None)
    """

    __name__ = "reward_net"

    def __init__(
        self,
        model_name_or_path=None,
        device: str | None = None,
        batch_size: int = 64,
        image_column: str = "img",
        pred_column: str = "pred_mask",
        revision: str | None = None,
    ):
        if model_name_or_path is None:
            raise RewardInputError(
                "needs `model_name_or_path`: a trained reward network directory, Hub id or .pth file",
                reward=self.__name__,
                field="options",
            )
        if batch_size < 1:
            raise RewardInputError(f"batch_size must be >= 1, got {batch_size}", reward=self.__name__, field="options")
        self.model_name_or_path = model_name_or_path
        self.device = device
        self.batch_size = batch_size
        self.image_column = image_column
        self.pred_column = pred_column
        self.revision = revision
        self._network = None if isinstance(model_name_or_path, str) else model_name_or_path

    @property
    def network(self):
        """The reward network (loaded on first access), in eval mode on `device`."""
        if self._network is None:
            from ..reward_net.checkpoint import load_reward_net

            kwargs = {"revision": self.revision} if self.revision else {}
            self._network = load_reward_net(self.model_name_or_path, **kwargs)
        target = self._target_device()
        if next(self._network.parameters()).device != target:
            self._network.to(target)
        return self._network.eval()

    def _target_device(self) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if isinstance(self.model_name_or_path, str):
            state["_network"] = None  # reload from the path in the new process
        return state

    def __call__(self, prompts=None, completions=None, completion_ids=None, **columns) -> list[float | None]:
        from ..reward_net.preprocessing import prepare_inputs

        name = self.__name__
        n = batch_length(completions, reward=name, columns=columns, column=self.pred_column)
        preds = get_column(columns, self.pred_column, n, reward=name, required=False)
        if preds is None:  # loop-1-only batch: the trainer passes no predicted masks
            return [None] * n
        images = get_column(columns, self.image_column, n, reward=name)
        rows = [i for i in range(n) if preds[i] is not None]
        out: list[float | None] = [None] * n
        if not rows:
            return out
        network = self.network
        config = network.config
        inputs = []
        for i in rows:
            if images[i] is None:
                raise RewardInputError("the row has a predicted mask but no image", reward=name, row=i,
                                       field=self.image_column)
            try:
                inputs.append(
                    prepare_inputs([images[i]], [preds[i]], config.input_size, config.image_mean, config.image_std,
                                   index_offset=i, image_field=self.image_column, mask_field=self.pred_column)
                )
            except DataError as err:
                raise RewardInputError(err.reason, reward=name, row=err.row, field=err.field) from err
        pixel_values = torch.cat(inputs)
        device, dtype = next(network.parameters()).device, next(network.parameters()).dtype
        scores = []
        with torch.no_grad():
            for start in range(0, len(rows), self.batch_size):
                batch = pixel_values[start : start + self.batch_size].to(device, dtype)
                scores.append(network(batch).scores.float().cpu())
        for i, value in zip(rows, torch.cat(scores).tolist()):
            out[i] = float(value)
        return out

    def __repr__(self) -> str:
        source = self.model_name_or_path if isinstance(self.model_name_or_path, str) else "<in-memory network>"
        return f"RewardNetReward(model_name_or_path={source!r}, batch_size={self.batch_size})"
