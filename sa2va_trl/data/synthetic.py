"""The synthetic shapes world: seeded images of 1-3 shapes with exact masks and templated captions.

Each image (default 128 x 128, black background) holds 1 to ``max_shapes`` non-overlapping shapes,
each in a different one of five position cells, so a caption's position names its shape uniquely::

    shape    circle | square | triangle
    colour   red | green | blue | yellow
    size     small | large
    position top left | top right | bottom left | bottom right | center

Captions come from a small grammar: the canonical "a small red circle in the top left" and
paraphrases ("the small red circle at the top left", "small red circle, top left", ...), with
synonyms ("little"/"big", "upper left", "middle", ...). :func:`parse_caption` maps any of them
(and, leniently, a model's free text) back to the attributes, which is what the evaluation's exact
match and per-attribute accuracy use.

Masks are exact: a shape's pixels are painted from its own mask, so the mask is precisely what was
drawn. Shapes never touch, and each covers at least one cell of the 8 x 8 token grid (nearest resize),
so a tiny model always gets region tokens for it. Every image is a pure function of ``(seed, split, index)``: the same seed gives the same data,
and adding training images never changes the test split.

Write the world to disk in the Grasp-Any-Region arrow layout (so ``load_rows`` reads it like real
data)::

    python -m sa2va_trl.data.synthetic --out data/shapes --n 20000 --seed 0 --size 128

For tests use :func:`generate_scene` / :func:`shapes_dataset` (in memory, no files).
"""

from __future__ import annotations

import argparse
import io
import itertools
import logging
import re
import string
import zlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import datasets
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .schema import CATEGORY, CAPTION, IMG, REGION_INDEX, REGION_MASK, SOURCE_ID, encode_mask, row_features

logger = logging.getLogger(__name__)

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (230, 30, 30), "green": (30, 200, 30), "blue": (40, 70, 235), "yellow": (240, 220, 20)}
SIZES = ("small", "large")
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "center")
SPLITS = ("train", "validation", "test")

# Cell centres as fractions of the image side (x, y).
_CELL_CENTRES = {"top left": (0.25, 0.25), "top right": (0.75, 0.25), "bottom left": (0.25, 0.75),
                 "bottom right": (0.75, 0.75), "center": (0.5, 0.5)}
# Shape "radius" as a fraction of the side (a large shape spans 23% of the side, a cell 25%).
_RADIUS = {"small": 0.065, "large": 0.115}
_SQUARE_HALF_SIDE = 0.85  # times the radius: a square about as large as the circle
_JITTER = 0.04  # max centre offset (fraction of the side): the shape stays well inside its cell
#: Regions must cover at least MIN_GRID_CELLS cells of a TOKEN_GRID x TOKEN_GRID nearest-resized grid
#: (the tiny model's 8 x 8 image tokens), so every region yields region tokens.
TOKEN_GRID = 8
MIN_GRID_CELLS = 1

# Words the generator may use for each value; the first is canonical.
_SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
_POSITION_WORDS = {
    "top left": ("top left", "upper left", "top-left"),
    "top right": ("top right", "upper right", "top-right"),
    "bottom left": ("bottom left", "lower left", "bottom-left"),
    "bottom right": ("bottom right", "lower right", "bottom-right"),
    "center": ("center", "middle", "centre"),
}
#: Caption templates; the first is canonical.
TEMPLATES = (
    "a {size} {colour} {shape} in the {position}",
    "the {size} {colour} {shape} at the {position}",
    "{size} {colour} {shape}, {position}",
    "the {size} {colour} {shape} located in the {position}",
    "in the {position}, a {size} {colour} {shape}",
    "a {colour} {shape}, {size}, in the {position}",
    "the {shape} in the {position} is {size} and {colour}",
)
_SPLIT_CODES = {name: code for code, name in enumerate(SPLITS)}


@dataclass(frozen=True)
class ShapeAttributes:
    """The four attributes of one shape; a parsed caption may leave some as None (not found)."""

    shape: str | None
    colour: str | None
    size: str | None
    position: str | None

    FIELDS = ("shape", "colour", "size", "position")

    def is_complete(self) -> bool:
        """True when every attribute is known."""
        return None not in (self.shape, self.colour, self.size, self.position)

    def canonical_caption(self) -> str:
        """The canonical caption, e.g. "a small red circle in the top left"."""
        if not self.is_complete():
            raise ValueError(f"cannot caption incomplete attributes {self}")
        return TEMPLATES[0].format(size=self.size, colour=self.colour, shape=self.shape, position=self.position)

    def canonical_spans(self) -> dict[str, tuple[int, int]]:
        """Where each attribute's words sit in :meth:`canonical_caption`, as (start, end) character spans.

        Example:
            >>> ShapeAttributes("circle", "red", "small", "top left").canonical_spans()["position"]
            (26, 34)
        """
        self.canonical_caption()  # raises on incomplete attributes
        spans, cursor = {}, 0
        for literal, name, _, _ in string.Formatter().parse(TEMPLATES[0]):
            cursor += len(literal)
            if name:
                value = getattr(self, name)
                spans[name] = (cursor, cursor + len(value))
                cursor += len(value)
        return spans


@dataclass
class Scene:
    """One generated image with its regions (parallel lists, one entry per shape).

    Attributes:
        image: H x W x 3 uint8.
        masks: H x W bool arrays, pairwise disjoint.
        attributes: the generating attributes.
        captions: one caption per shape (a paraphrase unless ``canonical_only``).
    """

    image: np.ndarray
    masks: list[np.ndarray]
    attributes: list[ShapeAttributes]
    captions: list[str]


# ----------------------------------------------------------------------------- captions

def caption_variants(attributes: ShapeAttributes) -> list[str]:
    """Every caption the grammar can produce for one shape (all templates x all synonyms).

    Args:
        attributes: complete attributes.

    Returns:
        The captions, canonical first.
    """
    variants = []
    for template in TEMPLATES:
        for size_word in _SIZE_WORDS[attributes.size]:
            for position_word in _POSITION_WORDS[attributes.position]:
                variants.append(template.format(size=size_word, colour=attributes.colour,
                                                shape=attributes.shape, position=position_word))
    return variants


def random_caption(attributes: ShapeAttributes, rng: np.random.Generator) -> str:
    """A random paraphrase: template and synonyms drawn uniformly.

    Args:
        attributes: complete attributes.
        rng: the random generator.

    Returns:
        The caption.
    """
    template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
    sizes = _SIZE_WORDS[attributes.size]
    positions = _POSITION_WORDS[attributes.position]
    return template.format(size=sizes[int(rng.integers(len(sizes)))], colour=attributes.colour,
                           shape=attributes.shape, position=positions[int(rng.integers(len(positions)))])


def all_attributes() -> list[ShapeAttributes]:
    """All 120 attribute combinations."""
    return [ShapeAttributes(*combo) for combo in itertools.product(SHAPES, COLOURS, SIZES, POSITIONS)]


def caption_corpus() -> list[str]:
    """Every caption the grammar can produce (for building a tiny word-level tokenizer).

    Returns:
        Sorted unique captions; together they contain every word and punctuation mark used.
    """
    return sorted({c for attrs in all_attributes() for c in caption_variants(attrs)})


def caption_vocabulary() -> list[str]:
    """The sorted set of words and punctuation marks of :func:`caption_corpus` (split on spaces,
    with "," and "-" as separate tokens)."""
    words = set()
    for caption in caption_corpus():
        words.update(re.findall(r"[a-z]+|[,\-]", caption))
    return sorted(words)


_WORD_TO_SHAPE = {s: s for s in SHAPES}
_WORD_TO_COLOUR = {c: c for c in COLOURS}
_WORD_TO_SIZE = {word: size for size, words in _SIZE_WORDS.items() for word in words}
_VERTICAL = {"top": "top", "upper": "top", "bottom": "bottom", "lower": "bottom"}
_HORIZONTAL = {"left": "left", "right": "right"}
_CENTRE = {"center", "centre", "middle"}


def parse_caption(text: str) -> ShapeAttributes:
    """Map a caption back to its attributes.

    Lenient: reads the attribute words wherever they are, so it also scores a model's free text.
    An attribute that is missing, or named with two conflicting values, is None.

    Args:
        text: any caption.

    Returns:
        The parsed attributes.

    Example:
        >>> parse_caption("small red circle, upper-left")
        ShapeAttributes(shape='circle', colour='red', size='small', position='top left')
    """
    words = re.findall(r"[a-z]+", text.lower())

    def single(table: dict) -> str | None:
        found = {table[w] for w in words if w in table}
        return found.pop() if len(found) == 1 else None

    vertical, horizontal = single(_VERTICAL), single(_HORIZONTAL)
    has_centre = any(w in _CENTRE for w in words)
    has_vertical = any(w in _VERTICAL for w in words)
    has_horizontal = any(w in _HORIZONTAL for w in words)
    if has_centre and not (has_vertical or has_horizontal):
        position = "center"
    elif vertical and horizontal and not has_centre:
        position = f"{vertical} {horizontal}"
    else:
        position = None
    return ShapeAttributes(shape=single(_WORD_TO_SHAPE), colour=single(_WORD_TO_COLOUR),
                           size=single(_WORD_TO_SIZE), position=position)


def canonicalize_caption(text: str) -> str | None:
    """The canonical caption of any grammar caption, or None when an attribute is unreadable."""
    attributes = parse_caption(text)
    return attributes.canonical_caption() if attributes.is_complete() else None


# ----------------------------------------------------------------------------- drawing

def shape_mask(shape: str, centre: tuple[float, float], radius: float, image_size: int) -> np.ndarray:
    """The exact pixel mask of one shape (pixel centres tested against the analytic shape).

    Args:
        shape: "circle", "square" or "triangle" (apex up, base 2r wide, height 2r).
        centre: (x, y) in pixels.
        radius: the shape's radius in pixels.
        image_size: the image side.

    Returns:
        image_size x image_size bool array.
    """
    ys, xs = np.mgrid[0:image_size, 0:image_size].astype(np.float64) + 0.5
    cx, cy = centre
    if shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= radius ** 2
    if shape == "square":
        half = radius * _SQUARE_HALF_SIDE
        return (np.abs(xs - cx) <= half) & (np.abs(ys - cy) <= half)
    if shape == "triangle":
        top = cy - radius
        return (ys <= cy + radius) & (np.abs(xs - cx) <= (ys - top) / 2.0)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _dilate(mask: np.ndarray) -> np.ndarray:
    """The mask grown by one pixel (4-neighbourhood): keeps a background gap between shapes."""
    grown = mask.copy()
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    grown[:, 1:] |= mask[:, :-1]
    grown[:, :-1] |= mask[:, 1:]
    return grown


def grid_cells(mask: np.ndarray, grid: int) -> int:
    """Cells a mask covers on a ``grid`` x ``grid`` token grid after a nearest resize (pixel
    ``floor(i * H / grid)`` per cell, as ``torch.nn.functional.interpolate(mode="nearest")``): the
    number of region tokens a Sa2VA-style model would select for it."""
    height, width = mask.shape
    rows = np.arange(grid) * height // grid
    cols = np.arange(grid) * width // grid
    return int(mask[np.ix_(rows, cols)].sum())


def _place_shape(attrs: ShapeAttributes, rng: np.random.Generator, image_size: int, occupied: np.ndarray,
                 token_grid: int, min_grid_cells: int, attempts: int = 64) -> np.ndarray:
    """Draw a jittered shape in its cell that neither touches nor overlaps ``occupied`` and covers at
    least ``min_grid_cells`` cells of the token grid (a small shape can fall between the sampled
    pixels of a coarse grid and give a model zero region tokens).

    Rejection sampling over the jitter, then a deterministic scan of jitter offsets; the un-jittered
    cell centre is the last resort (there two large shapes in neighbouring cells keep a gap of
    0.02 x side).
    """
    fx, fy = _CELL_CENTRES[attrs.position]
    radius = _RADIUS[attrs.size] * image_size

    def draw(jx: float, jy: float) -> np.ndarray:
        return shape_mask(attrs.shape, ((fx + jx) * image_size, (fy + jy) * image_size), radius, image_size)

    def fits(mask: np.ndarray) -> bool:
        return not (mask & occupied).any() and (min_grid_cells <= 0 or grid_cells(mask, token_grid) >= min_grid_cells)

    for _ in range(attempts):
        mask = draw(*rng.uniform(-_JITTER, _JITTER, size=2))
        if fits(mask):
            return mask
    offsets = np.linspace(-_JITTER, _JITTER, 9)
    for jx, jy in itertools.product(offsets, offsets):
        mask = draw(jx, jy)
        if fits(mask):
            return mask
    logger.warning("could not place a %s %s with %d grid cells; using the cell centre", attrs.size, attrs.shape,
                   min_grid_cells)
    return draw(0.0, 0.0)


def generate_scene(rng: np.random.Generator | int, image_size: int = 128, max_shapes: int = 3,
                   canonical_only: bool = False, token_grid: int = TOKEN_GRID,
                   min_grid_cells: int = MIN_GRID_CELLS) -> Scene:
    """Generate one image with 1..max_shapes shapes, exact masks and captions.

    Args:
        rng: a numpy Generator or an int seed.
        image_size: the image side in pixels (at least 32).
        max_shapes: at most this many shapes (1-5; one per position cell).
        canonical_only: use the canonical caption instead of a random paraphrase.
        token_grid: side of the token grid regions are checked on (default 8: the tiny model's
            8 x 8 image tokens).
        min_grid_cells: every region covers at least this many cells of that grid (0: no check).

    Returns:
        The scene.
    """
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32, got {image_size}")
    if not 1 <= max_shapes <= len(POSITIONS):
        raise ValueError(f"max_shapes must be in 1..{len(POSITIONS)}, got {max_shapes}")
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    n_shapes = int(rng.integers(1, max_shapes + 1))
    positions = [POSITIONS[i] for i in rng.choice(len(POSITIONS), size=n_shapes, replace=False)]
    image = np.zeros((image_size, image_size, 3), dtype=np.uint8)
    occupied = np.zeros((image_size, image_size), dtype=bool)
    masks, attributes, captions = [], [], []
    for position in positions:
        attrs = ShapeAttributes(shape=SHAPES[int(rng.integers(len(SHAPES)))],
                                colour=list(COLOURS)[int(rng.integers(len(COLOURS)))],
                                size=SIZES[int(rng.integers(len(SIZES)))], position=position)
        mask = _place_shape(attrs, rng, image_size, occupied, token_grid, min_grid_cells)
        occupied |= _dilate(mask)
        image[mask] = COLOURS[attrs.colour]
        masks.append(mask)
        attributes.append(attrs)
        captions.append(attrs.canonical_caption() if canonical_only else random_caption(attrs, rng))
    return Scene(image=image, masks=masks, attributes=attributes, captions=captions)


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of image ``index`` of ``split``: independent of how many images are made."""
    if split not in _SPLIT_CODES:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return np.random.default_rng([int(seed), _SPLIT_CODES[split], int(index)])


def iter_scenes(n: int, seed: int = 0, split: str = "train", image_size: int = 128, max_shapes: int = 3,
                canonical_only: bool = False, **scene_kwargs) -> Iterator[Scene]:
    """Yield the first ``n`` scenes of a split (deterministic for ``seed``); ``scene_kwargs`` go to
    :func:`generate_scene`."""
    for index in range(n):
        yield generate_scene(scene_rng(seed, split, index), image_size=image_size, max_shapes=max_shapes,
                             canonical_only=canonical_only, **scene_kwargs)


def _png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


# ----------------------------------------------------------------------------- datasets

def shapes_dataset(n: int, seed: int = 0, split: str = "train", image_size: int = 128, max_shapes: int = 3,
                   canonical_only: bool = False) -> datasets.Dataset:
    """A schema dataset (one row per shape) built in memory: the fast path for tests.

    Args:
        n: number of images.
        seed: the world seed.
        split: "train", "validation" or "test" (each split has its own images).
        image_size: image side in pixels.
        max_shapes: at most this many shapes per image.
        canonical_only: canonical captions only.

    Returns:
        ``datasets.Dataset`` with the row-schema columns plus ``category`` (the shape name);
        ``source_id`` is ``"shapes/{split}/{index}"``.
    """
    rows = []
    for index, scene in enumerate(iter_scenes(n, seed, split, image_size, max_shapes, canonical_only)):
        png = _png_bytes(scene.image)
        for k, (mask, attrs, caption) in enumerate(zip(scene.masks, scene.attributes, scene.captions)):
            rows.append({IMG: {"bytes": png, "path": None}, REGION_MASK: encode_mask(mask), CAPTION: caption,
                         SOURCE_ID: f"shapes/{split}/{index}", REGION_INDEX: k, CATEGORY: attrs.shape})
    return datasets.Dataset.from_list(rows, features=row_features(with_category=True))


def gar_features() -> datasets.Features:
    """Features of the Grasp-Any-Region arrow layout this module writes."""
    rle = {"size": datasets.List(datasets.Value("int64")), "counts": datasets.Value("string")}
    turn = {"from": datasets.Value("string"), "value": datasets.Value("string")}
    return datasets.Features({
        "image": datasets.Image(),
        "mask_rle": datasets.List(rle),
        "conversations": datasets.List(turn),
        "catagory": datasets.List(datasets.Value("string")),  # sic: the GAR field name
    })


def scene_to_gar_record(scene: Scene, path: str) -> dict:
    """One Grasp-Any-Region record: the image, one RLE per region and one human/gpt turn pair per
    region (the gpt turn is the region's caption), shape names in ``catagory``."""
    conversations = []
    for k, caption in enumerate(scene.captions):
        prefix = "<image>\n" if k == 0 else ""
        conversations.append({"from": "human",
                              "value": f"{prefix}Please give me a short description of region{k + 1}."})
        conversations.append({"from": "gpt", "value": caption})
    return {"image": {"bytes": _png_bytes(scene.image), "path": path},
            "mask_rle": [encode_mask(mask) for mask in scene.masks],
            "conversations": conversations,
            "catagory": [attrs.shape for attrs in scene.attributes]}


def build_shapes_world(split_sizes: dict[str, int], seed: int = 0, image_size: int = 128, max_shapes: int = 3,
                       canonical_only: bool = False, progress: bool = True) -> datasets.DatasetDict:
    """Build the shapes world as a ``DatasetDict`` in the Grasp-Any-Region layout.

    Args:
        split_sizes: images per split, e.g. ``{"train": 1000, "validation": 256, "test": 256}``.
        seed: the world seed.
        image_size: image side in pixels.
        max_shapes: at most this many shapes per image.
        canonical_only: canonical captions only.
        progress: show a tqdm bar.

    Returns:
        One GAR-layout ``Dataset`` per split (one record per image).
    """
    unknown = set(split_sizes) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown splits {sorted(unknown)}; expected some of {SPLITS}")
    total = sum(split_sizes.values())
    bar = tqdm(total=total, desc="shapes world", unit="img", disable=not progress)
    splits = {}
    for split, n in split_sizes.items():
        if n < 0:
            raise ValueError(f"split {split!r}: size must be >= 0, got {n}")
        records = []
        for index, scene in enumerate(iter_scenes(n, seed, split, image_size, max_shapes, canonical_only)):
            records.append(scene_to_gar_record(scene, f"{split}/{index:06d}.png"))
            bar.update(1)
        features = gar_features()
        # from_list cannot infer columns from no records: an empty split gets the columns explicitly
        splits[split] = (datasets.Dataset.from_list(records, features=features) if records
                         else datasets.Dataset.from_dict({name: [] for name in features}, features=features))
    bar.close()
    return datasets.DatasetDict(splits)


def write_shapes_world(out_dir: str, n_train: int, n_validation: int = 256, n_test: int = 256, seed: int = 0,
                       image_size: int = 128, max_shapes: int = 3, canonical_only: bool = False,
                       progress: bool = True) -> datasets.DatasetDict:
    """Build the shapes world and ``save_to_disk`` it to ``out_dir`` (read it with ``load_rows``).

    Args:
        out_dir: the output directory.
        n_train: training images.
        n_validation: validation images.
        n_test: test images.
        seed: the world seed.
        image_size: image side in pixels.
        max_shapes: at most this many shapes per image.
        canonical_only: canonical captions only.
        progress: show a tqdm bar.

    Returns:
        The written ``DatasetDict``.
    """
    world = build_shapes_world({"train": n_train, "validation": n_validation, "test": n_test}, seed=seed,
                               image_size=image_size, max_shapes=max_shapes, canonical_only=canonical_only,
                               progress=progress)
    world.save_to_disk(out_dir)
    logger.info("wrote the shapes world to %s: %s", out_dir, {k: len(v) for k, v in world.items()})
    return world


def world_fingerprint(world: datasets.DatasetDict) -> int:
    """A cheap content checksum (adler32 over every image and mask) to compare two builds."""
    checksum = 1
    for split in sorted(world):
        for record in world[split].cast_column("image", datasets.Image(decode=False)):
            checksum = zlib.adler32(record["image"]["bytes"], checksum)
            for rle in record["mask_rle"]:
                checksum = zlib.adler32(rle["counts"].encode(), checksum)
    return checksum


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m sa2va_trl.data.synthetic --out DIR --n N [--seed S --size 128]``."""
    parser = argparse.ArgumentParser(prog="python -m sa2va_trl.data.synthetic", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output directory (DatasetDict.save_to_disk layout)")
    parser.add_argument("--n", type=int, required=True, help="number of training images")
    parser.add_argument("--n-validation", type=int, default=256, help="validation images (default 256)")
    parser.add_argument("--n-test", type=int, default=256, help="test images (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="world seed (default 0)")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    parser.add_argument("--max-shapes", type=int, default=3, help="at most this many shapes per image (1-5)")
    parser.add_argument("--canonical-only", action="store_true", help="canonical captions, no paraphrases")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    world = write_shapes_world(args.out, args.n, args.n_validation, args.n_test, seed=args.seed,
                               image_size=args.size, max_shapes=args.max_shapes,
                               canonical_only=args.canonical_only)
    regions = {k: sum(len(m) for m in v["mask_rle"]) for k, v in world.items()}
    print(f"wrote {args.out}: images {({k: len(v) for k, v in world.items()})}, regions {regions}")


if __name__ == "__main__":
    main()
