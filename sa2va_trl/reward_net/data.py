"""Training data for the reward network: (image, mask) pairs labelled with their true Dice.

`generate_reward_data` takes schema rows (one region per row, see docs/architecture.md), optionally
runs a Sa2VA policy on each row's caption (`Sa2VAPolicy.segment`) to get the masks the reward will
actually see during RL, and adds perturbed copies of the ground truth (`perturbations.py`) chosen so
their Dice values cover [0, 1] evenly. The result is a `datasets.Dataset` with the columns of
`reward_data_features()` (save it with `save_to_disk`):

    img          datasets.Image   the source image (PNG bytes; shared by all samples of a region)
    mask         COCO RLE dict    the scored mask {"size": [H, W], "counts": str}
    dice         float32          Dice of `mask` against the region's ground truth
    kind         string           "policy" or a perturbation kind (`PERTURBATION_KINDS`)
    source_row   int64            index of the region's row in the input rows
    source_id    string           the source image (rows sharing it are regions of one image)

`split_by_source` holds out whole source images, so no image is seen in both splits, and
`RewardNetTorchDataset` turns the rows into the network's tensors for the transformers Trainer.

Example:
    >>> from sa2va_trl.data.synthetic import shapes_dataset
    >>> data = generate_reward_data(shapes_dataset(2, seed=0), samples_per_region=4, progress=False)
    >>> sorted(data.column_names)
    ['dice', 'img', 'kind', 'mask', 'source_id', 'source_row']
"""

from __future__ import annotations

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
from .preprocessing import prepare_inputs

logger = logging.getLogger(__name__)

POLICY_KIND = "policy"


def reward_data_features() -> datasets.Features:
    """The `datasets.Features` of the reward-network training data (see the module docstring)."""
    return datasets.Features(
        {
            "img": datasets.Image(),
            "mask": {"size": datasets.List(datasets.Value("int64")), "counts": datasets.Value("string")},
            "dice": datasets.Value("float32"),
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
    """Reward data rows -> {"pixel_values": (4, S, S) float32, "labels": dice} for the Trainer.

    Args:
        data: reward data (`img`, `mask`, `dice`).
        input_size: the network's input side.
        image_mean: the image normalisation mean (the network config's).
        image_std: the image normalisation std.
        hflip: flip image and mask left-right with probability 0.5 (the Dice does not change).
    """

    def __init__(
        self,
        data: datasets.Dataset,
        input_size: int,
        image_mean: Sequence[float],
        image_std: Sequence[float],
        hflip: bool = False,
    ):
        self.data = data
        self.input_size = input_size
        self.image_mean = image_mean
        self.image_std = image_std
        self.hflip = hflip

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.data[int(index)]
        pixel_values = prepare_inputs(
            [row["img"]], [row["mask"]], self.input_size, self.image_mean, self.image_std,
            index_offset=int(index), image_field="img",
        )[0]
        if self.hflip and torch.rand(()) < 0.5:
            pixel_values = pixel_values.flip(-1)
        return {"pixel_values": pixel_values, "labels": torch.tensor(row["dice"], dtype=torch.float32)}
