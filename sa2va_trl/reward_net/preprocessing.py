"""Image + mask -> the reward network's 4-channel input tensor.

The image is resized (bilinear) to `input_size` x `input_size`, scaled to [0, 1] and normalised
with the config's mean / std; the mask is resized with nearest-neighbour and kept as 0 / 1.
A mask must have its image's height and width: a mismatch raises `MaskSizeError` (resizing it
silently would hide a transposed or low-resolution mask).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from ..data.schema import DataError
from ..rewards.masks import as_mask

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class RewardNetInputError(DataError):
    """An image or mask given to the reward network cannot be used; names the sample and the field."""


class MaskSizeError(RewardNetInputError):
    """A mask's height and width differ from its image's."""


def to_rgb_array(image, index: int = 0, field: str = "image") -> np.ndarray:
    """Convert a PIL image or a numpy array to an H x W x 3 uint8 array.

    Args:
        image: a PIL image (any mode), an H x W (grey) or H x W x 3 / 4 uint8 array, or a float
            array with values in [0, 1].
        index: the sample's index, for error messages.
        field: the input's name, for error messages.

    Returns:
        An H x W x 3 uint8 array.
    """
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise RewardNetInputError(
            f"must be a PIL image or a numpy array, got {type(image).__name__}", row=index, field=field
        )
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] not in (3, 4):
        raise RewardNetInputError(
            f"must be H x W, H x W x 3 or H x W x 4, got shape {image.shape}", row=index, field=field
        )
    image = image[..., :3]
    if image.dtype == np.uint8:
        return np.ascontiguousarray(image)
    if np.issubdtype(image.dtype, np.floating):
        if image.size and (np.nanmin(image) < 0.0 or np.nanmax(image) > 1.0 or np.isnan(image).any()):
            raise RewardNetInputError(
                "is a float array outside [0, 1] (or with NaN); pass uint8 or scale it", row=index, field=field
            )
        return np.round(image * 255.0).astype(np.uint8)
    raise RewardNetInputError(f"has unsupported dtype {image.dtype}", row=index, field=field)


def prepare_inputs(
    images: Sequence,
    masks: Sequence,
    input_size: int,
    image_mean: Sequence[float] = IMAGENET_MEAN,
    image_std: Sequence[float] = IMAGENET_STD,
    index_offset: int = 0,
    image_field: str = "image",
    mask_field: str = "mask",
) -> torch.Tensor:
    """Build the network input for a batch of (image, mask) pairs.

    Args:
        images: PIL images or numpy arrays (see `to_rgb_array`).
        masks: one H x W mask per image in any form `sa2va_trl.rewards.masks.as_mask` accepts.
        input_size: side of the square both are resized to.
        image_mean: per-channel mean (image scaled to [0, 1]).
        image_std: per-channel std.
        index_offset: added to the sample index in error messages (for chunked batches).
        image_field: the images' name in error messages (e.g. the dataset column).
        mask_field: the masks' name in error messages.

    Returns:
        A float32 tensor (B, 4, input_size, input_size): normalised RGB, then the 0/1 mask.

    Raises:
        MaskSizeError: a mask's H x W differs from its image's.
        RewardNetInputError: an image cannot be read.
    """
    if len(images) != len(masks):
        raise RewardNetInputError(f"got {len(images)} images but {len(masks)} masks", field=mask_field)
    out = np.empty((len(images), 4, input_size, input_size), dtype=np.float32)
    for i, (image, mask) in enumerate(zip(images, masks)):
        index = index_offset + i
        rgb = to_rgb_array(image, index=index, field=image_field)
        out[i, :3] = prepare_image(rgb, input_size, image_mean, image_std)
        out[i, 3] = prepare_mask(mask, rgb.shape[:2], input_size, index=index, field=mask_field)
    return torch.from_numpy(out)


def prepare_image(
    rgb: np.ndarray, input_size: int, image_mean: Sequence[float] = IMAGENET_MEAN,
    image_std: Sequence[float] = IMAGENET_STD,
) -> np.ndarray:
    """The network's image channels: bilinear resize to input_size, scaled to [0, 1], normalised.

    Args:
        rgb: an H x W x 3 uint8 array (see `to_rgb_array`).
        input_size: the side of the square output.
        image_mean: per-channel mean.
        image_std: per-channel std.

    Returns:
        A (3, input_size, input_size) float32 array.
    """
    mean = np.asarray(image_mean, dtype=np.float32)
    std = np.asarray(image_std, dtype=np.float32)
    size = (input_size, input_size)
    resized = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR), dtype=np.float32)
    return ((resized / 255.0 - mean) / std).transpose(2, 0, 1)


def prepare_mask(mask, image_hw: tuple[int, int], input_size: int, index: int = 0, field: str = "mask") -> np.ndarray:
    """The network's mask channel: nearest resize to input_size, values 0 / 1.

    Args:
        mask: an H x W mask in any form `sa2va_trl.rewards.masks.as_mask` accepts.
        image_hw: its image's (H, W); a mask of another size is rejected.
        input_size: the side of the square output.
        index: the sample's index, for error messages.
        field: the mask's name, for error messages.

    Returns:
        An (input_size, input_size) float32 array of 0 / 1.

    Raises:
        MaskSizeError: the mask's H x W differs from `image_hw`.
    """
    binary = as_mask(mask, row=index, field=field)
    if binary.shape != tuple(image_hw):
        raise MaskSizeError(
            f"is {binary.shape[0]} x {binary.shape[1]} but its image is {image_hw[0]} x {image_hw[1]} "
            "(H x W); give the mask at the image's resolution",
            row=index,
            field=field,
        )
    if binary.shape == (input_size, input_size):
        return binary.astype(np.float32)
    mask_image = Image.fromarray(binary.astype(np.uint8) * 255)
    return (np.asarray(mask_image.resize((input_size, input_size), Image.Resampling.NEAREST)) > 127).astype(np.float32)
