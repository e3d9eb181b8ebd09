"""Image and mask preprocessing for Sa2VA: vision tiles, SAM2 input, masks on the token grid.

Vision tiles: either one tile (the whole image resized, aspect ratio not kept) or InternVL's
dynamic tiling (`dynamic_tiles`: the image resized to the grid of tiles whose aspect ratio is
closest to the image's, cut into tiles, plus a whole-image thumbnail when there are several),
each normalised with ImageNet mean/std. Region tokens always come from the last tile, which is
the whole image (the single tile or the thumbnail), so a mask maps onto it directly. SAM2 gets
its own square resize to its input size with the same mean/std (as the published model does).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Sa2VAInputError(ValueError):
    """Bad input for a Sa2VA prompt, naming the row and the field.

    Attributes:
        row: the dataset row index (or batch position) of the bad input.
        field: the input field ("img", "region_mask", "text", ...).
    """

    def __init__(self, row: int, field: str, message: str):
        self.row = row
        self.field = field
        super().__init__(f"row {row}, field '{field}': {message}")


def load_rgb_image(image, row: int = 0, field: str = "img") -> Image.Image:
    """Any supported image as an RGB PIL image (grayscale, palette and RGBA are converted).

    Args:
        image: a PIL image, an H x W (grayscale) or H x W x C (C in 1, 3, 4) uint8 array or
            tensor.
        row, field: used in the error message.

    Returns:
        An RGB PIL image.

    Raises:
        Sa2VAInputError: None, an unsupported type, or an array of an unsupported shape.
    """
    if image is None:
        raise Sa2VAInputError(row, field, "this task needs an image, got None")
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        array = image
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
            raise Sa2VAInputError(row, field, f"expected an H x W or H x W x 3/4 array, got shape {image.shape}")
        if array.size == 0:
            raise Sa2VAInputError(row, field, f"empty image of shape {image.shape}")
        if array.dtype != np.uint8:
            if np.issubdtype(array.dtype, np.floating) and array.max(initial=0) <= 1.0:
                array = array * 255.0
            array = np.clip(array, 0, 255).astype(np.uint8)
        return Image.fromarray(array).convert("RGB")
    raise Sa2VAInputError(row, field, f"expected a PIL image or an array, got {type(image).__name__}")


def _normalise(image: Image.Image, size: int) -> torch.Tensor:
    resized = image.resize((size, size), resample=Image.BICUBIC)
    array = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (array - mean) / std


def vision_pixel_values(image: Image.Image, tile_size: int) -> torch.Tensor:
    """One vision tile: (3, tile_size, tile_size) float32, bicubic resize, ImageNet mean/std."""
    return _normalise(image, tile_size)


def _closest_grid(width: int, height: int, tile_size: int, min_tiles: int, max_tiles: int) -> tuple[int, int]:
    """The (columns, rows) grid whose aspect ratio is closest to the image's (InternVL's rule).

    Candidates are all grids with min_tiles <= columns * rows <= max_tiles, by increasing tile
    count; on an aspect-ratio tie the larger grid wins when the image has more than half its
    pixel area.
    """
    grids = sorted(
        {(c, r) for n in range(min_tiles, max_tiles + 1) for c in range(1, n + 1) for r in range(1, n + 1)
         if min_tiles <= c * r <= max_tiles},
        key=lambda grid: grid[0] * grid[1],
    )
    aspect = width / height
    best, best_diff = (1, 1), float("inf")
    for columns, rows in grids:
        diff = abs(aspect - columns / rows)
        if diff < best_diff:
            best, best_diff = (columns, rows), diff
        elif diff == best_diff and width * height > 0.5 * tile_size * tile_size * columns * rows:
            best = (columns, rows)
    return best


def dynamic_tiles(
    image: Image.Image, tile_size: int, min_tiles: int = 1, max_tiles: int = 12, use_thumbnail: bool = True
) -> list[Image.Image]:
    """InternVL dynamic tiling: grid tiles (row-major) plus a thumbnail when there are several.

    Args:
        image: an RGB image.
        tile_size: pixels per tile side.
        min_tiles, max_tiles: bounds on the grid's tile count.
        use_thumbnail: append the whole image resized to one tile when the grid has > 1 tile.

    Returns:
        The tiles as tile_size x tile_size PIL images (the last one shows the whole image
        whenever there is more than one tile and use_thumbnail is set).
    """
    columns, rows = _closest_grid(image.width, image.height, tile_size, min_tiles, max_tiles)
    resized = image.resize((tile_size * columns, tile_size * rows), resample=Image.BICUBIC)
    tiles = [
        resized.crop((c * tile_size, r * tile_size, (c + 1) * tile_size, (r + 1) * tile_size))
        for r in range(rows) for c in range(columns)
    ]
    if use_thumbnail and len(tiles) > 1:
        tiles.append(image.resize((tile_size, tile_size), resample=Image.BICUBIC))
    return tiles


def vision_tiles(image: Image.Image, tile_size: int, dynamic: bool = False, min_tiles: int = 1,
                 max_tiles: int = 12, use_thumbnail: bool = True) -> torch.Tensor:
    """All vision tiles of an image, normalised: (tiles, 3, tile_size, tile_size).

    Args:
        image: an RGB image.
        tile_size: pixels per tile side.
        dynamic: InternVL dynamic tiling (`dynamic_tiles`); False gives one whole-image tile.
        min_tiles, max_tiles, use_thumbnail: dynamic tiling bounds (ignored without `dynamic`).

    Returns:
        Float32 tensor of the tiles; the last tile always shows the whole image when
        `use_thumbnail` is set or there is a single tile.
    """
    if not dynamic:
        return vision_pixel_values(image, tile_size)[None]
    tiles = dynamic_tiles(image, tile_size, min_tiles, max_tiles, use_thumbnail)
    return torch.stack([vision_pixel_values(tile, tile_size) for tile in tiles])


def sam_pixel_values(image: Image.Image, sam_size: int) -> torch.Tensor:
    """SAM2 input: (3, sam_size, sam_size) float32, square resize, ImageNet mean/std."""
    return _normalise(image, sam_size)


def to_bool_mask(mask, row: int = 0, field: str = "region_mask") -> np.ndarray:
    """Any supported mask as an H x W numpy bool array.

    Args:
        mask: anything `sa2va_trl.rewards.masks.as_mask` reads (bool / 0-1 array or tensor,
            nested lists, PIL image, COCO RLE dict); a leading singleton axis is dropped.
        row, field: used in the error message.

    Returns:
        H x W bool array.

    Raises:
        Sa2VAInputError: None, an undecodable RLE, non-binary values, or not two-dimensional.
    """
    # One converter for the whole package (rewards.masks.as_mask); only the error type differs here.
    from ..rewards.masks import as_mask
    from ..rewards.errors import MaskFormatError

    if isinstance(mask, torch.Tensor) and mask.ndim == 3 and mask.shape[0] == 1:
        mask = mask[0]
    elif isinstance(mask, np.ndarray) and mask.ndim == 3 and mask.shape[0] == 1:
        mask = mask[0]
    try:
        return as_mask(mask, row=row, field=field)
    except MaskFormatError as error:
        raise Sa2VAInputError(row, field, error.message) from error


def mask_to_token_grid(mask: np.ndarray, grid_size: int) -> torch.Tensor:
    """A mask on the vision token grid: nearest resize (as the published model) -> (g, g) bool.

    Args:
        mask: H x W bool array.
        grid_size: g, tokens per side after pixel shuffle.

    Returns:
        (g, g) bool tensor; cell (i, j) is True when the nearest source pixel is True.
    """
    source = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    return F.interpolate(source, size=(grid_size, grid_size), mode="nearest")[0, 0] > 0.5
