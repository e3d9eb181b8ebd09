"""LightweightRewardNetwork: a 140,193-parameter CNN that predicts the Dice of a mask on its image.

Input: image (3 channels, normalised) + mask (1 channel, 0/1) = 4 channels at `config.input_size`.
Three blocks of conv (bias) + BatchNorm + ReLU + 2x2 max-pool (stride 2) with 32 / 64 / 128
channels and kernel sizes 7 / 5 / 3, global average pooling, FC 128 -> 64 -> 1, sigmoid.

It is a transformers `PreTrainedModel`, so `save_pretrained` / `from_pretrained` / `push_to_hub`
write and read `config.json` + `model.safetensors`, and the transformers `Trainer` trains it
directly (its forward returns the MSE loss when given `labels`). The config records the input size
and the image normalisation, so a saved network carries its own preprocessing.

Example:
    >>> import numpy as np
    >>> from sa2va_trl.reward_net import LightweightRewardNetwork, RewardNetConfig
    >>> net = LightweightRewardNetwork(RewardNetConfig(input_size=32))
    >>> net.num_parameters()
    140193
    >>> image = np.zeros((40, 50, 3), dtype=np.uint8)
    >>> mask = np.zeros((40, 50), dtype=bool)
    >>> net.score([image], [mask]).shape
    torch.Size([1])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .preprocessing import IMAGENET_MEAN, IMAGENET_STD, prepare_inputs

MODEL_TYPE = "sa2va_trl_reward_net"


class RewardNetConfig(PretrainedConfig):
    """Configuration of `LightweightRewardNetwork` (architecture and preprocessing).

    The defaults are the seed's architecture (140,193 parameters).

    Args:
        in_channels: image channels + 1 mask channel (4 for RGB).
        block_channels: output channels of the three conv blocks.
        kernel_sizes: conv kernel size of each block ("same" padding, stride 1; the pool halves).
        hidden_size: width of the hidden FC layer (128 -> hidden_size -> 1).
        input_size: side of the square the image and mask are resized to before the network.
        image_mean: per-channel mean subtracted from the image scaled to [0, 1].
        image_std: per-channel std the image is divided by after the mean.
    """

    model_type = MODEL_TYPE

    def __init__(
        self,
        in_channels: int = 4,
        block_channels: Sequence[int] = (32, 64, 128),
        kernel_sizes: Sequence[int] = (7, 5, 3),
        hidden_size: int = 64,
        input_size: int = 128,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
        **kwargs,
    ):
        block_channels = [int(c) for c in block_channels]
        kernel_sizes = [int(k) for k in kernel_sizes]
        if len(block_channels) != len(kernel_sizes):
            raise ValueError(
                f"block_channels ({block_channels}) and kernel_sizes ({kernel_sizes}) must have the same length"
            )
        if any(k % 2 == 0 for k in kernel_sizes):
            raise ValueError(f"kernel_sizes must be odd for 'same' padding, got {kernel_sizes}")
        if len(image_mean) != in_channels - 1 or len(image_std) != in_channels - 1:
            raise ValueError(
                f"image_mean and image_std need {in_channels - 1} values (in_channels - 1), "
                f"got {len(image_mean)} and {len(image_std)}"
            )
        min_size = 2 ** len(block_channels)
        if int(input_size) < min_size:
            raise ValueError(f"input_size must be >= {min_size} (one pixel after the pools), got {input_size}")
        self.in_channels = int(in_channels)
        self.block_channels = block_channels
        self.kernel_sizes = kernel_sizes
        self.hidden_size = int(hidden_size)
        self.input_size = int(input_size)
        self.image_mean = [float(v) for v in image_mean]
        self.image_std = [float(v) for v in image_std]
        super().__init__(**kwargs)


@dataclass
class RewardNetOutput(ModelOutput):
    """Output of `LightweightRewardNetwork.forward`.

    Args:
        loss: MSE between `scores` and `labels` (only when labels are given).
        scores: predicted Dice in [0, 1], shape (B,).
        logits: the pre-sigmoid values, shape (B,).
    """

    loss: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    logits: torch.Tensor | None = None


class ConvBlock(nn.Sequential):
    """Conv (with bias, 'same' padding) -> BatchNorm -> ReLU -> 2x2 max-pool with stride 2."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=True),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2, stride=2),
        )


class LightweightRewardNetwork(PreTrainedModel):
    """Predicts the Dice of a mask against the (unseen) ground truth from (image, mask).

    Use `score(images, masks)` for raw PIL / numpy inputs; `forward(pixel_values, labels=None)`
    takes the already-prepared (B, 4, S, S) tensor (see `preprocessing.prepare_inputs`).
    """

    config_class = RewardNetConfig
    base_model_prefix = "reward_net"
    main_input_name = "pixel_values"

    def __init__(self, config: RewardNetConfig):
        super().__init__(config)
        blocks, in_channels = [], config.in_channels
        for out_channels, kernel_size in zip(config.block_channels, config.kernel_sizes):
            blocks.append(ConvBlock(in_channels, out_channels, kernel_size))
            in_channels = out_channels
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.Linear(in_channels, config.hidden_size),
            nn.ReLU(inplace=True),
            nn.Linear(config.hidden_size, 1),
        )
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # He init for the convs (followed by BatchNorm + ReLU) and the hidden FC; the output layer starts
        # small so every score starts near 0.5: a He-initialised 64 -> 1 layer saturates the sigmoid,
        # and saturated scores give no gradient and constant predictions.
        if isinstance(module, nn.Conv2d):
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            if module.out_features == 1:
                init.normal_(module.weight, mean=0.0, std=0.01)
            else:
                init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            init.zeros_(module.num_batches_tracked)

    def forward(
        self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **kwargs
    ) -> RewardNetOutput:
        """Score prepared inputs.

        Args:
            pixel_values: (B, in_channels, H, W) float tensor: normalised image channels then the 0/1 mask.
            labels: optional (B,) true Dice values; when given, `loss` is their MSE to the scores.

        Returns:
            RewardNetOutput with `scores` (B,) in [0, 1], `logits` (B,) and `loss` when labels are given.
        """
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.config.in_channels:
            raise ValueError(
                f"pixel_values must be (B, {self.config.in_channels}, H, W), got {tuple(pixel_values.shape)}"
            )
        features = self.features(pixel_values).mean(dim=(2, 3))  # global average pooling
        logits = self.head(features).squeeze(-1)
        scores = torch.sigmoid(logits)
        loss = None
        if labels is not None:
            loss = F.mse_loss(scores.float(), labels.to(scores.device, torch.float32).reshape(-1))
        return RewardNetOutput(loss=loss, scores=scores, logits=logits)

    @torch.no_grad()
    def score(self, images: Sequence, masks: Sequence, batch_size: int = 64) -> torch.Tensor:
        """Predict the Dice of each mask on its image (eval mode, no gradients).

        Args:
            images: PIL images or H x W x 3 (or H x W) uint8 arrays.
            masks: one mask per image, the same H x W as its image (bool / 0-1 arrays, tensors,
                nested lists or COCO RLE dicts). A mask whose size differs from its image is
                rejected with `MaskSizeError` naming its index: resizing would hide a
                misaligned (e.g. transposed or low-resolution) mask.
            batch_size: how many samples go through the network at once.

        Returns:
            A float32 CPU tensor of shape (B,) with scores in [0, 1].
        """
        if len(images) != len(masks):
            raise ValueError(f"got {len(images)} images but {len(masks)} masks")
        was_training = self.training
        self.eval()
        try:
            device = next(self.parameters()).device
            dtype = next(self.parameters()).dtype
            scores = []
            for start in range(0, len(images), batch_size):
                pixel_values = prepare_inputs(
                    images[start : start + batch_size],
                    masks[start : start + batch_size],
                    input_size=self.config.input_size,
                    image_mean=self.config.image_mean,
                    image_std=self.config.image_std,
                    index_offset=start,
                )
                scores.append(self(pixel_values.to(device, dtype)).scores.float().cpu())
            return torch.cat(scores) if scores else torch.zeros(0)
        finally:
            self.train(was_training)


AutoConfig.register(MODEL_TYPE, RewardNetConfig, exist_ok=True)
AutoModel.register(RewardNetConfig, LightweightRewardNetwork, exist_ok=True)
