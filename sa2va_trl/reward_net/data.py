"""Training data for the reward network: (image, mask) pairs labelled with their true Dice.

`generate_reward_data` takes schema rows (one region per row, see docs/architecture.md), optionally
runs a Sa2VA policy on each row's caption (`Sa2VAPolicy.segment`) to get the masks the reward will
actually see during RL, and adds perturbed copies of the ground truth (`perturbations.py`) chosen so
their Dice values cover [0, 1] evenly. The result is a `datasets.Dataset` with the columns of
`reward_data_features()` (save it with `save_to_disk`):

    img          datasets.Image   the source image (PNG bytes; shared by all samples of a region)
    mask         COCO RLE dict    the scored mask {"size": [H, W], "counts": str}
    dice         float32          Dice of `mask` against the region's ground truth
    expected_dice float32         what a network that sees only (image, mask) can know: for a "merge"
                                  (a union of whole regions, any of which could have been the one
                                  meant) the mean Dice of `mask` against each region it covers; for
                                  every other kind, `dice` (see `expected_merge_dice`)
    kind         string           "policy" or a perturbation kind (`PERTURBATION_KINDS`)
    source_row   int64            index of the region's row in the input rows
    source_id    string           the source image (rows sharing it are regions of one image)

`split_by_source` holds out whole source images, so no image is seen in both splits, and
`RewardNetTorchDataset` turns the rows into the network's tensors for the transformers Trainer.

Example:
    >>> from sa2va_trl.data.synthetic import shapes_dataset
    >>> data = generate_reward_data(shapes_dataset(2, seed=0), samples_per_region=4, progress=False)
    >>> sorted(data.column_names)
    ['dice', 'expected_dice', 'img', 'kind', 'mask', 'source_id', 'source_row']
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..data.schema import CAPTION, IMG, REGION_MASK, SOURCE_ID, DataError, encode_mask
from ..rewards.masks import as_mask
from .perturbations import PERTURBATION_KINDS, dice, sample_perturbations
from .preprocessing import prepare_image, prepare_mask, to_rgb_array

logger = logging.getLogger(__name__)

POLICY_KIND = "policy"


def reward_data_features() -> datasets.Features:
    """The `datasets.Features` of the reward-network training data (see the module docstring)."""
    return datasets.Features(
        {
            "img": datasets.Image(),
            "mask": {"size": datasets.List(datasets.Value("int64")), "counts": datasets.Value("string")},
            "dice": datasets.Value("float32"),
            "expected_dice": datasets.Value("float32"),
            "kind": datasets.Value("string"),
            "source_row": datasets.Value("int64"),
            "source_id": datasets.Value("string"),
        }
    )


def _image_bytes(value: Any, row: int, max_side: int | None) -> tuple[bytes, tuple[int, int]]:
    """PNG/JPEG bytes and (H, W) of a row's image, downscaled so its longer side is <= max_side."""
    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        data = value["bytes"] or open(value["path"], "rb").read()
        image = Image.open(io.BytesIO(data))
        if max_side is None or max(image.size) <= max_side:
            return data, (image.size[1], image.size[0])
        image = image.convert("RGB")
    elif isinstance(value, Image.Image):
        image = value.convert("RGB")
    elif isinstance(value, np.ndarray) and value.ndim == 3 and value.dtype == np.uint8:
        image = Image.fromarray(value[..., :3])
    else:
        raise DataError(f"expected an image (PIL, uint8 array or {{'bytes', 'path'}}), got {type(value).__name__}",
                        row=row, field=IMG)
    if max_side is not None and max(image.size) > max_side:
        scale = max_side / max(image.size)
        image = image.resize((max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale))),
                             Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue(), (image.size[1], image.size[0])


def _open_image(value: Any) -> Any:
    """A `{"bytes", "path"}` dict (undecoded datasets.Image) as a PIL image; anything else unchanged."""
    if isinstance(value, dict):
        return Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"]).convert("RGB")
    return value


def _resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if mask.shape == size:
        return mask
    resized = Image.fromarray(mask.astype(np.uint8) * 255).resize((size[1], size[0]), Image.Resampling.NEAREST)
    return np.asarray(resized) > 127


def expected_merge_dice(mask: np.ndarray, gt: np.ndarray, others: Sequence[np.ndarray]) -> float:
    """The mean Dice of a merged mask against each region it could have been meant for.

    A "merge" is the intended region united with other whole regions of the same image. From the
    image and the mask alone, every region the mask covers could have been the intended one, and
    the candidate draws the same mask for each of them with the same probability (every region of
    an image has the same number of other regions to merge with; the Dice-balanced selection
    that follows tilts this a little). A network that does not know which region was meant can at
    best predict about the mean over those candidates; the spread of the true Dice around it is
    error that no such network can remove.

    Args:
        mask: the merged H x W boolean mask.
        gt: the intended region (always a candidate).
        others: the image's other regions; those with more than half of their pixels inside
            `mask` are candidates too.

    Returns:
        The mean Dice over the candidate regions.

    Example:
        >>> a = np.zeros((8, 8), bool); a[:2, :2] = True      # 4 pixels
        >>> b = np.zeros((8, 8), bool); b[4:, 4:] = True      # 16 pixels
        >>> round(expected_merge_dice(a | b, a, [b]), 4)      # (8/24 + 32/36) / 2
        0.6111
    """
    candidates = [gt] + [r for r in others if r.any() and np.logical_and(mask, r).sum() > 0.5 * r.sum()]
    return float(np.mean([dice(mask, region) for region in candidates]))


def predict_policy_masks(
    policy, rows: datasets.Dataset | Sequence[dict], batch_size: int = 8, progress: bool = True
) -> list[np.ndarray | None]:
    """Run `policy.segment(images, captions)` over the rows that have a caption.

    Args:
        policy: an object with `segment(images, texts) -> list of H x W bool masks` (`Sa2VAPolicy`).
        rows: schema rows (`img`, `caption`).
        batch_size: rows per `segment` call.
        progress: show a progress bar.

    Returns:
        One mask per row, or None for rows without a caption.
    """
    indices = [i for i in range(len(rows)) if rows[i][CAPTION]]
    masks: list[np.ndarray | None] = [None] * len(rows)
    for start in tqdm(range(0, len(indices), batch_size), desc="policy masks", disable=not progress):
        chunk = indices[start : start + batch_size]
        images = [rows[i][IMG] for i in chunk]
        images = [_open_image(im) for im in images]
        predicted = policy.segment(images, [rows[i][CAPTION] for i in chunk])
        if len(predicted) != len(chunk):
            raise DataError(f"policy.segment returned {len(predicted)} masks for {len(chunk)} captions",
                            row=chunk[0], field=CAPTION)
        for i, mask in zip(chunk, predicted):
            masks[i] = as_mask(mask, row=i, field="pred_mask")
    return masks


def generate_reward_data(
    rows: datasets.Dataset | Sequence[dict],
    samples_per_region: int = 12,
    num_bins: int = 10,
    oversample: int = 4,
    kinds: Sequence[str] = PERTURBATION_KINDS,
    policy=None,
    policy_batch_size: int = 8,
    max_image_side: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> datasets.Dataset:
    """Build the reward network's training data from schema rows.

    Args:
        rows: schema rows (`img`, `region_mask`, `source_id`; `caption` when a policy is given), a
            `datasets.Dataset` or a list of dicts.
        samples_per_region: perturbed masks per region (policy masks come on top).
        num_bins: the perturbed masks' Dice values visit this many equal-width bins in turn.
        oversample: candidates drawn per kept perturbed mask (more: closer to even coverage).
        kinds: perturbation kinds to use (see `PERTURBATION_KINDS`).
        policy: optional object with `segment(images, texts)`; its mask for each captioned row is
            added with kind "policy".
        policy_batch_size: rows per `segment` call.
        max_image_side: downscale images (and masks, nearest) so the longer side is at most this;
            keeps the stored data small for large real images. None keeps the original size.
        seed: the random seed (each row gets its own stream, so the data is reproducible).
        progress: show progress bars.

    Returns:
        A `datasets.Dataset` with `reward_data_features()`.

    Raises:
        DataError: a row's mask cannot be read or its size differs from the image's.
    """
    unknown = set(kinds) - set(PERTURBATION_KINDS)
    if unknown:
        raise ValueError(f"unknown perturbation kinds {sorted(unknown)}; valid: {', '.join(PERTURBATION_KINDS)}")
    if isinstance(rows, datasets.Dataset):
        missing = {IMG, REGION_MASK, SOURCE_ID} - set(rows.column_names)
        if missing:
            raise DataError(f"the rows lack the columns {sorted(missing)}", field=sorted(missing)[0])
        rows = rows.cast_column(IMG, datasets.Image(decode=False))  # keep the encoded bytes, decode on demand
    policy_masks = predict_policy_masks(policy, rows, policy_batch_size, progress) if policy is not None else None

    # Regions of the same image (for "merge"), from the mask column only: no image decoding.
    source_ids = [str(s) for s in (rows[SOURCE_ID] if isinstance(rows, datasets.Dataset) else [r[SOURCE_ID] for r in rows])]
    rles = rows[REGION_MASK] if isinstance(rows, datasets.Dataset) else [r[REGION_MASK] for r in rows]
    groups: dict[str, list[int]] = defaultdict(list)
    for i, source in enumerate(source_ids):
        groups[source].append(i)

    columns: dict[str, list] = {name: [] for name in reward_data_features()}
    for i in tqdm(range(len(source_ids)), desc="reward data", unit="region", disable=not progress):
        image_bytes, size = _image_bytes(rows[i][IMG], i, max_image_side)
        gt = as_mask(rles[i], row=i, field=REGION_MASK)
        if max_image_side is None and gt.shape != size:
            raise DataError(f"mask is {gt.shape} but the image is {size} (H, W)", row=i, field=REGION_MASK)
        gt = _resize_mask(gt, size)
        others = [_resize_mask(as_mask(rles[j], row=j, field=REGION_MASK), size) for j in groups[source_ids[i]] if j != i]
        rng = np.random.default_rng([seed, i])
        samples = sample_perturbations(
            gt, others, samples_per_region, rng, num_bins=num_bins, oversample=oversample,
            start_bin=int(rng.integers(num_bins)), kinds=tuple(kinds),
        )
        if policy_masks is not None and policy_masks[i] is not None:
            predicted = _resize_mask(policy_masks[i], size)
            samples.append((POLICY_KIND, predicted, dice(predicted, gt)))
        if not gt.any():
            logger.warning("row %d: empty ground-truth mask, no perturbed samples", i)
        for kind, mask, value in samples:
            columns["img"].append({"bytes": image_bytes, "path": None})
            columns["mask"].append(encode_mask(mask))
            columns["dice"].append(float(value))
            columns["expected_dice"].append(expected_merge_dice(mask, gt, others) if kind == "merge" else float(value))
            columns["kind"].append(kind)
            columns["source_row"].append(i)
            columns["source_id"].append(source_ids[i])
    return datasets.Dataset.from_dict(columns, features=reward_data_features())


def split_by_source(
    data: datasets.Dataset, eval_fraction: float, seed: int = 0
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Hold out a fraction of the source images (all samples of an image land in one split).

    Args:
        data: reward data with a `source_id` column.
        eval_fraction: share of the source images held out, in (0, 1).
        seed: the shuffle seed.

    Returns:
        (train, held_out) datasets.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    sources = sorted(set(data["source_id"]))
    if len(sources) < 2:
        raise ValueError(f"need at least 2 source images to hold some out, got {len(sources)}")
    order = np.random.default_rng(seed).permutation(len(sources))
    n_eval = min(max(1, round(eval_fraction * len(sources))), len(sources) - 1)
    held = {sources[k] for k in order[:n_eval]}
    is_held = [s in held for s in data["source_id"]]
    train_idx = [i for i, h in enumerate(is_held) if not h]
    eval_idx = [i for i, h in enumerate(is_held) if h]
    return data.select(train_idx), data.select(eval_idx)


class RewardNetTorchDataset(torch.utils.data.Dataset):
    """Reward data rows -> {"pixel_values": (4, S, S) float32, "labels": float32} for the Trainer.

    Each source image is decoded, resized and normalised once and kept (up to `cache_bytes`):
    the samples of a region share their image, so an epoch decodes each image once instead of
    once per sample. Masks are decoded per access (COCO RLE, fast).

    Args:
        data: reward data (`img`, `mask` and the label column).
        input_size: the network's input side.
        image_mean: the image normalisation mean (the network config's).
        image_std: the image normalisation std.
        hflip: flip image and mask left-right with probability 0.5 (the Dice does not change).
        dihedral: also flip top-bottom and transpose, each with probability 0.5 (with `hflip`: all
            8 symmetries of the square, none of which changes the Dice).
        label_column: the training target: "dice", or "expected_dice" (merges labelled with the
            mean over the regions they could have been meant for; see `expected_merge_dice`).
            Data without that column falls back to "dice" with a warning.
        cache_bytes: memory budget of the prepared-image cache (0: no cache).
    """

    def __init__(
        self,
        data: datasets.Dataset,
        input_size: int,
        image_mean: Sequence[float],
        image_std: Sequence[float],
        hflip: bool = False,
        dihedral: bool = False,
        label_column: str = "dice",
        cache_bytes: int = 512 * 2**20,
    ):
        if label_column not in data.column_names:
            if label_column != "expected_dice":
                raise ValueError(f"label column {label_column!r} not in the data's columns {data.column_names}")
            logger.warning("the reward data has no 'expected_dice' column (made before it existed): training on 'dice'")
            label_column = "dice"
        self.data = data
        self.input_size = input_size
        self.image_mean = image_mean
        self.image_std = image_std
        self.hflip = hflip
        self.dihedral = dihedral
        self.label_column = label_column
        self._images = data.select_columns(["img"]).cast_column("img", datasets.Image(decode=False))
        self._masks = data["mask"]
        self._labels = np.asarray(data[label_column], dtype=np.float32)
        self._cache: dict[bytes, tuple[np.ndarray, tuple[int, int]]] = {}
        self._cache_left = int(cache_bytes)

    def __len__(self) -> int:
        return len(self.data)

    def _image(self, index: int) -> tuple[np.ndarray, tuple[int, int]]:
        """The prepared (3, S, S) image channels and the original (H, W) of sample `index`'s image."""
        value = self._images[index]["img"]
        key = hashlib.blake2b(value["bytes"], digest_size=16).digest() if value.get("bytes") else value["path"]
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        rgb = to_rgb_array(_open_image(value), index=index, field="img")
        prepared = (prepare_image(rgb, self.input_size, self.image_mean, self.image_std), rgb.shape[:2])
        if prepared[0].nbytes <= self._cache_left:
            self._cache[key] = prepared
            self._cache_left -= prepared[0].nbytes
        return prepared

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        index = int(index)
        image, image_hw = self._image(index)
        mask = prepare_mask(self._masks[index], image_hw, self.input_size, index=index, field="mask")
        pixel_values = torch.from_numpy(np.concatenate([image, mask[None]], axis=0))
        if self.hflip and torch.rand(()) < 0.5:
            pixel_values = pixel_values.flip(-1)
        if self.dihedral:
            if torch.rand(()) < 0.5:
                pixel_values = pixel_values.flip(-2)
            if torch.rand(()) < 0.5:
                pixel_values = pixel_values.transpose(-1, -2)
        return {"pixel_values": pixel_values.contiguous(), "labels": torch.tensor(self._labels[index])}
