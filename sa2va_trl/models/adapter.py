"""The Sa2VA policy adapter: the only object the trainer and the cycle rewards talk to.

`Sa2VAPolicy(model, tokenizer)` wraps one Sa2VA model and offers, in tensors the trainer can
use directly:

- prompt building for the two tasks (`caption_prompts`, `segmentation_prompts`) into a
  left-padded `PromptBatch` that stores each unique image once (`image_index` maps prompts to
  images, so repeating a prompt G times never copies pixels);
- `sample`: G completions per prompt in one `generate` call, with sampling log-probs and the
  `[SEG]` hidden states;
- `completion_logprobs`: the differentiable training forward (per-token log-probs, entropies,
  `[SEG]` hidden states) that equals the sampling log-probs for the same weights;
- `seg_embeddings` + `decode_masks`: `[SEG]` state -> SAM2 prompt embedding -> masks at each
  image's resolution, with low-res logits kept for losses and gradients;
- greedy conveniences `caption` and `segment` for the reverse (EMA) model of the cycle rewards.

Frozen encoders (vision tower, SAM2 image encoder) are run once per unique image: their outputs
are cached on the policy by image content (`PromptBatch.image_keys`) and reused by `sample`,
`completion_logprobs` and `decode_masks` on any batch showing the image (the trainer's rollout,
its copies and the reverse model's prompts) until `clear_feature_cache()`. Counters (`policy.counters`)
record how many images went through the vision tower and the SAM2 image encoder, and how many
completions had no `[SEG]`, so tests and benchmarks can check the "once per unique image"
promises.

Log-prob semantics (TRL's `_get_token_logprobs`): the log-prob of a sampled token is the
log_softmax of the step's logits divided by the temperature, gathered at the sampled id. Top-k
and top-p truncation are NOT folded in: the returned log-probs are those of the tempered full
distribution, which is exactly what the training forward (`completion_logprobs`) recomputes and
what TRL's loss compares against. With top-k / top-p active the tokens are still drawn from the
truncated distribution; the log-probs then describe the untruncated one (as in TRL).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .configuration_sa2va import (
    IMAGE_PLACEHOLDER,
    IMG_CONTEXT_TOKEN,
    IMG_END_TOKEN,
    IMG_START_TOKEN,
    SEG_TOKEN,
    VP_END_TOKEN,
    VP_START_TOKEN,
)
from .image_processing import (
    Sa2VAInputError,
    load_rgb_image,
    mask_to_token_grid,
    sam_pixel_values,
    to_bool_mask,
    vision_tiles,
)
from .modeling_sa2va import Sa2VAModel

TASK_CAPTION = "caption"
TASK_SEGMENTATION = "segmentation"
TASKS = (TASK_CAPTION, TASK_SEGMENTATION)

# Prompt texts of the published model (official evaluation / training templates).
CAPTION_QUESTION = "Please give me a short description of the region in the picture marked by region1."
SEGMENTATION_QUESTION = "Please segment {text} in this image."
REGION_PREFIX = "\nThere are 1 part regions in the picture: region1"


@dataclass
class PromptBatch:
    """A left-padded batch of Sa2VA prompts whose images are stored once each.

    Attributes:
        input_ids: (B, L) long, left-padded with the tokenizer's pad id; image placeholders are
            already expanded to `<IMG_CONTEXT>` tokens (image tokens, then region tokens).
        attention_mask: (B, L) long, 0 on the left padding.
        pixel_values: (T, 3, S, S) float, the vision tiles of the unique images (ImageNet
            mean/std): one per image, or with dynamic tiling `tiles_per_image[u]` for image u
            (grid tiles, then the whole-image thumbnail).
        sam_pixel_values: (U, 3, S_sam, S_sam) float, each unique image resized for SAM2.
        image_sizes: U pairs (H, W): the original size of each unique image (masks come back
            at this size).
        image_index: (B,) long, which unique image each prompt shows.
        region_grids: (B, g, g) bool, the region mask of each prompt on the vision token grid
            (all False for segmentation prompts). Its True cells, in row-major order, are the
            vision tokens copied into the `<vp>` region.
        tasks: B task names ("caption" or "segmentation").
        questions: B user questions without the image tokens (for logging and the rewards'
            `prompts`).
        row_indices: B dataset row indices, used in error messages.
        tiles_per_image: U tile counts (None: one tile per image).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor
    sam_pixel_values: torch.Tensor
    image_sizes: list[tuple[int, int]]
    image_index: torch.Tensor
    region_grids: torch.Tensor
    tasks: list[str]
    questions: list[str]
    row_indices: list[int]
    tiles_per_image: list[int] | None = None
    # U content keys (blake2b of the pixels and size), one per unique image: the policy's
    # frozen-encoder cache is keyed by them, so every batch showing an image (the policy's
    # rollout, its select / repeat copies, the reverse model's prompts) shares its features.
    image_keys: list[bytes] | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_images(self) -> int:
        """Number of unique images held by the batch."""
        return len(self.image_sizes)

    @property
    def tile_offsets(self) -> list[int]:
        """U + 1 offsets: image u owns `pixel_values[tile_offsets[u]:tile_offsets[u + 1]]`."""
        counts = self.tiles_per_image if self.tiles_per_image is not None else [1] * self.num_images
        offsets = [0]
        for count in counts:
            offsets.append(offsets[-1] + int(count))
        return offsets

    def repeat(self, num_generations: int) -> "PromptBatch":
        """Each prompt `num_generations` times, contiguous (TRL's order); images are shared.

        Args:
            num_generations: G, how many copies of each prompt.

        Returns:
            A PromptBatch of B * G prompts with the same `pixel_values` tensors.
        """
        return self.select(torch.arange(len(self)).repeat_interleave(num_generations).tolist())

    def select(self, indices: Sequence[int]) -> "PromptBatch":
        """The prompts at `indices` (in that order); images are shared, never copied.

        Args:
            indices: prompt positions to keep (repeats allowed).

        Returns:
            A new PromptBatch (same images and image keys).
        """
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return dataclasses.replace(
            self,
            input_ids=self.input_ids[idx],
            attention_mask=self.attention_mask[idx],
            image_index=self.image_index[idx],
            region_grids=self.region_grids[idx],
            tasks=[self.tasks[i] for i in idx.tolist()],
            questions=[self.questions[i] for i in idx.tolist()],
            row_indices=[self.row_indices[i] for i in idx.tolist()],
        )

    def to(self, device: torch.device | str) -> "PromptBatch":
        """A copy with every tensor on `device` (this batch itself when already there)."""
        if self.input_ids.device == torch.device(device):
            return self
        return dataclasses.replace(
            self,
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            pixel_values=self.pixel_values.to(device),
            sam_pixel_values=self.sam_pixel_values.to(device),
            image_index=self.image_index.to(device),
            region_grids=self.region_grids.to(device),
        )


@dataclass
class Rollout:
    """G sampled completions per prompt (contiguous), from one `Sa2VAPolicy.sample` call.

    Attributes:
        batch: the prompts repeated G times (B * G rows, images shared with the input batch).
        completion_ids: (B*G, T) long, right-padded with the pad id after the first eos.
        completion_mask: (B*G, T) long, 1 up to and including the first eos token.
        logprobs: (B*G, T) float32 sampling log-probs (0 where the mask is 0).
        seg_hidden: (B*G, H) last-layer hidden state at the first `[SEG]` input position
            (zeros where there is no `[SEG]`).
        has_seg: (B*G,) bool, whether the completion holds a `[SEG]` token (before eos).
        is_truncated: (B*G,) bool, no eos within `max_new_tokens`.
        completions: B*G decoded texts (special tokens skipped, TRL's convention).
        num_generations: G.
    """

    batch: PromptBatch
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    logprobs: torch.Tensor
    seg_hidden: torch.Tensor
    has_seg: torch.Tensor
    is_truncated: torch.Tensor
    completions: list[str]
    num_generations: int


@dataclass
class LogprobOutput:
    """The training forward's outputs for (prompt, completion) pairs.

    Attributes:
        logprobs: (N, T) float32 per-token log-probs of the completion ids (temperature applied).
        entropies: (N, T) float32 entropies of the tempered distributions, or None.
        seg_hidden: (N, H) last-layer hidden state at the first `[SEG]` input position (zeros
            where none), or None; differentiable.
        has_seg: (N,) bool, or None when `with_seg_hidden=False`.
    """

    logprobs: torch.Tensor
    entropies: torch.Tensor | None = None
    seg_hidden: torch.Tensor | None = None
    has_seg: torch.Tensor | None = None


@dataclass
class MaskOutput:
    """Masks decoded from `[SEG]` prompt embeddings, one per prompt of the batch.

    Attributes:
        masks: N bool tensors, each (H_i, W_i) at its image's original size (logit > threshold);
            all False where the sample had no `[SEG]`.
        mask_logits: N float tensors (H_i, W_i): the low-res logits upsampled (bilinear) to the
            image size; differentiable; filled with -inf-like values where no `[SEG]`.
        low_res_logits: (N, h, w) the mask decoder's chosen low-res logits (differentiable; use
            these for BCE / Dice losses against resized targets).
        iou_scores: (N,) the decoder's predicted IoU of each chosen mask.
        object_score_logits: (N,) the decoder's object-presence logit.
        has_seg: (N,) bool.
        num_without_seg: how many samples had no `[SEG]` (their masks are empty).
    """

    masks: list[torch.Tensor]
    mask_logits: list[torch.Tensor]
    low_res_logits: torch.Tensor
    iou_scores: torch.Tensor
    object_score_logits: torch.Tensor
    has_seg: torch.Tensor
    num_without_seg: int

    def numpy_masks(self) -> list[np.ndarray]:
        """The masks as H x W numpy bool arrays (what the rewards take)."""
        return [m.detach().cpu().numpy().astype(bool) for m in self.masks]


@dataclass
class CaptionScore:
    """Teacher-forced log-probs of one caption (`Sa2VAPolicy.caption_logprobs`).

    Attributes:
        token_ids: the caption's token ids followed by the eos id.
        logprobs: one log-prob per token (the eos last).
        spans: (start, end) character span of each token in the caption, the eos as (len, len);
            None for a tokenizer without offsets (a slow tokenizer).
    """

    token_ids: list[int]
    logprobs: list[float]
    spans: list[tuple[int, int]] | None

    @property
    def total(self) -> float:
        """log p(caption + eos)."""
        return float(sum(self.logprobs))

    def span_logprob(self, start: int, end: int) -> float:
        """The summed log-prob of the tokens overlapping characters [start, end) (given the tokens before)."""
        if self.spans is None:
            raise ValueError("this tokenizer gives no character offsets; only the total log-prob is available")
        return float(sum(lp for (a, b), lp in zip(self.spans, self.logprobs) if a < end and b > start))


def right_pad(token_lists: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, T) long ids right-padded with `pad_id`, and their (N, T) long mask (1 on real tokens): the layout
    `Sa2VAPolicy.completion_logprobs` takes."""
    width = max(len(tokens) for tokens in token_lists)
    ids = torch.full((len(token_lists), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, tokens in enumerate(token_lists):
        ids[row, : len(tokens)] = torch.tensor(list(tokens), dtype=torch.long)
        mask[row, : len(tokens)] = 1
    return ids, mask


def _get_token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """log_softmax of each step's logits gathered at the chosen ids, in float32.

    Args:
        logits: (N, T, V) step logits, already divided by the temperature.
        token_ids: (N, T) chosen ids.

    Returns:
        (N, T) float32 log-probs.
    """
    logits = logits.float()
    chosen = logits.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)
    return chosen - torch.logsumexp(logits, dim=-1)


class _SampledLogprobRecorder(LogitsProcessor):
    """Streams each sampled token's log-prob out of `generate` without keeping all step logits.

    Custom logits processors run before the temperature / top-k / top-p warpers, so `scores`
    here are the model's logits. The log-softmax of one step (divided by the temperature) is
    held until the next call, whose `input_ids` end with the token sampled from it; memory is
    one (N, V) step instead of T of them (which for a 150k vocabulary would dwarf the model).
    """

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.pending: torch.Tensor | None = None
        self.logprobs: list[torch.Tensor] = []

    def _take(self, tokens: torch.Tensor) -> None:
        self.logprobs.append(self.pending.gather(-1, tokens.unsqueeze(-1)).squeeze(-1))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.pending is not None:
            self._take(input_ids[:, -1])
        self.pending = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def finish(self, completion_ids: torch.Tensor) -> torch.Tensor:
        """(N, T) log-probs of the completion ids (the last step's token is taken here)."""
        if self.pending is not None:
            self._take(completion_ids[:, len(self.logprobs)])
            self.pending = None
        return torch.stack(self.logprobs, dim=1)


class _PerRowSampler(LogitsProcessor):
    """Draws each row's next token with the row's own `torch.Generator` (Gumbel-max), then pins `generate` to it.

    The tempered, top-k / top-p filtered logits are built with transformers' own warpers, a Gumbel(0, 1) draw
    from the row's generator is added to each of them and the arg-max is the sample (an exact draw from that
    distribution). The returned scores are 0 at the drawn token and -inf elsewhere, so `generate`'s own warpers and
    multinomial draw can only pick it. A row's tokens then depend on its generator and its logits only: not on the
    other rows of the batch, the global RNG, or the process the row runs on. It must come after
    `_SampledLogprobRecorder`, which reads the model's scores.
    """

    def __init__(self, generators: Sequence[torch.Generator], temperature: float, top_k: int, top_p: float):
        self.generators = list(generators)
        self.warpers = [TemperatureLogitsWarper(temperature)]
        if top_k and top_k > 0:
            self.warpers.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
        if top_p is not None and top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[0] != len(self.generators):
            raise ValueError(f"{len(self.generators)} generators for a batch of {scores.shape[0]} rows")
        warped = scores.float()
        for warper in self.warpers:
            warped = warper(input_ids, warped)
        noise = torch.stack([
            torch.empty(scores.shape[-1], device=scores.device).exponential_(generator=generator)
            for generator in self.generators
        ])
        # -log(Exp(1)) is Gumbel(0, 1); an exact 0 draw (possible in float32) would give +inf on any token
        chosen = (warped - noise.clamp(min=torch.finfo(noise.dtype).tiny).log()).argmax(dim=-1)
        pinned = torch.full_like(scores, float("-inf"))
        return pinned.scatter(-1, chosen.unsqueeze(-1), 0.0)


def _entropies(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last axis, float32: (N, T, V) -> (N, T)."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return -(log_probs.exp() * log_probs).sum(-1)


def _first_position(hits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of a (N, T) bool tensor: (any hit, index of the first hit or 0)."""
    found = hits.any(dim=1)
    first = torch.where(found, hits.float().argmax(dim=1), torch.zeros_like(found, dtype=torch.long))
    return found, first


@contextlib.contextmanager
def _activation_checkpointing_off(module: torch.nn.Module):
    """Turn gradient checkpointing off inside (generation needs its KV cache), restore after."""
    switched = [m for m in module.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for m in switched:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m in switched:
            m.gradient_checkpointing = True


def _unwrap(model):
    """The Sa2VA model under a PEFT wrapper (LoRA layers stay in place and still run)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class Sa2VAPolicy:
    """Adapter around one Sa2VA model: prompts, sampling, training log-probs and masks.

    Args:
        model: a `Sa2VAModel` (native backend), possibly wrapped by PEFT, or a model exposing
            the same surface (`extract_feature`, `build_inputs_embeds`, `language_model`,
            `text_hidden_fcs`, `get_sam2_features`, `decode_sam2_masks`, `template`, `config`
            with `num_image_token`, `token_grid_size`, `image_size`, `sam2_image_size`,
            `min_region_cells`, `img_context_token_id`, `seg_token_id`).
        tokenizer: its tokenizer (holds `<img>`, `</img>`, `<IMG_CONTEXT>`, `<vp>`, `</vp>`,
            `[SEG]` and a chat-end eos token).

    Raises:
        ValueError: the tokenizer lacks a Sa2VA special token or a pad token.
    """

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self.core = _unwrap(model)
        config = self.core.config
        vocab = tokenizer.get_vocab()
        required = (IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN, VP_START_TOKEN, VP_END_TOKEN, SEG_TOKEN)
        missing = [token for token in required if token not in vocab]
        if missing:
            raise ValueError(f"the tokenizer lacks the Sa2VA special tokens {missing}; add them and resize the embeddings")
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token (e.g. '<|endoftext|>')")
        self.img_context_token_id = vocab[IMG_CONTEXT_TOKEN]
        self.seg_token_id = vocab[SEG_TOKEN]
        if config.img_context_token_id not in (None, self.img_context_token_id) or config.seg_token_id not in (
            None,
            self.seg_token_id,
        ):
            raise ValueError(
                f"model config token ids (IMG_CONTEXT {config.img_context_token_id}, [SEG] {config.seg_token_id}) differ "
                f"from the tokenizer's ({self.img_context_token_id}, {self.seg_token_id})"
            )
        config.img_context_token_id = self.img_context_token_id
        config.seg_token_id = self.seg_token_id
        self.pad_token_id = tokenizer.pad_token_id
        self.eos_token_ids = self._collect_eos_ids()
        self.counters: dict[str, int] = {}
        self.reset_counters()
        # Frozen-encoder outputs per (encoder, model, device, image content), shared by every batch; see `_encode`.
        self._feature_cache: dict[tuple, tuple[bool, list[torch.Tensor]]] = {}
        self.feature_cache_size = 512  # entries (one per encoder and image)
        self._cache_trainable_encoders = False  # inside `shared_encoder_features`
        # transformers' `generate` keeps all processes stepping together under DeepSpeed ZeRO-3 (an all-reduce per
        # token, `synced_gpus`), which deadlocks when ranks make different numbers of `sample` calls. A caller that
        # has gathered the whole model first (the trainer's rollouts, reverse model and evaluation) sets False;
        # None leaves transformers' default.
        self.synced_gpus: bool | None = None
        vision, sam_encoder = self.core.vision_model, self.core.grounding_encoder.vision_encoder
        self._hooks = [
            vision.register_forward_pre_hook(self._count_hook("vision", vision), with_kwargs=True),
            sam_encoder.register_forward_pre_hook(self._count_hook("sam_encoder", sam_encoder), with_kwargs=True),
        ]

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, device: str | torch.device | None = None, **kwargs):
        """Load a saved native Sa2VA model and its tokenizer (same directory) into a policy.

        Args:
            path: a directory written by `model.save_pretrained` + `tokenizer.save_pretrained`.
            dtype: optional torch dtype for the weights.
            device: optional device to move the model to.
            **kwargs: passed to `AutoModel.from_pretrained`.

        Returns:
            A Sa2VAPolicy around the model in eval mode.
        """
        from transformers import AutoModel, AutoTokenizer

        from . import modeling_sa2va  # noqa: F401  (registers the native backend with AutoModel)

        if dtype is not None:
            kwargs["dtype"] = dtype
        model = AutoModel.from_pretrained(path, **kwargs)
        if device is not None:
            model = model.to(device)
        return cls(model.eval(), AutoTokenizer.from_pretrained(path))

    # --- bookkeeping ------------------------------------------------------------------------
    def reset_counters(self) -> None:
        """Zero the counters: vision_calls / vision_images (vision tower; images = tiles), sam_encoder_calls /
        sam_encoder_images (SAM2 image encoder), completions, completions_without_seg (among
        segmentation prompts), masks_without_seg (rows decode_masks left empty)."""
        for key in ("vision_calls", "vision_images", "sam_encoder_calls", "sam_encoder_images", "completions",
                    "completions_without_seg", "masks_without_seg"):
            self.counters[key] = 0

    def remove_hooks(self) -> None:
        """Detach the counting hooks from the model (counters stop updating)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def _count_hook(self, name: str, owner: torch.nn.Module):
        def hook(module, args, kwargs):
            if module is not owner:  # a deep copy of the model (e.g. an EMA twin) carries the hook too
                return
            pixels = args[0] if args else kwargs.get("pixel_values")
            self.counters[f"{name}_calls"] += 1
            self.counters[f"{name}_images"] += int(pixels.shape[0])

        return hook

    def _collect_eos_ids(self) -> list[int]:
        ids: list[int] = []
        configured = self.core.generation_config.eos_token_id if getattr(self.core, "generation_config", None) else None
        for value in (configured, self.tokenizer.eos_token_id):
            for token_id in (value if isinstance(value, (list, tuple)) else [value]):
                if token_id is not None and token_id not in ids:
                    ids.append(int(token_id))
        vocab = self.tokenizer.get_vocab()
        for word in self.core.template.get("STOP_WORDS", []):
            if word in vocab and vocab[word] not in ids:
                ids.append(vocab[word])
        if not ids:
            raise ValueError("no eos token: set tokenizer.eos_token to the chat end token (e.g. '<|im_end|>')")
        return ids

    @property
    def device(self) -> torch.device:
        return next(self.core.parameters()).device

    # --- prompts -------------------------------------------------------------------------
    def _image_text(self, tiles: int) -> str:
        return IMG_START_TOKEN + IMG_CONTEXT_TOKEN * (self.core.config.num_image_token * tiles) + IMG_END_TOKEN

    def _chat(self, user_text: str) -> str:
        return self.core.template["INSTRUCTION"].format(input=user_text, round=1)

    def caption_prompts(self, images, region_masks, row_indices=None) -> PromptBatch:
        """Region-captioning prompts (`<vp>` region tokens), one per (image, mask) pair.

        The user turn is `<img>` + `<IMG_CONTEXT>` x (N per tile) + `</img>` + "\\nThere are 1 part regions
        in the picture: region1<vp>" + `<IMG_CONTEXT>` x (region cells) + "</vp>.\\n" + the
        question, where the region cells are the mask resized (nearest) to the token grid.

        Args:
            images: PIL images or H x W x C uint8 arrays (grayscale / RGBA are converted).
            region_masks: H x W masks (bool / 0-1 arrays, tensors, nested lists or COCO RLE
                dicts), each the size of its image.
            row_indices: dataset row indices for error messages (default 0..B-1).

        Returns:
            A left-padded PromptBatch; identical images are stored once.

        Raises:
            Sa2VAInputError: a missing image, a mask of the wrong size, an empty mask, or a
                region under `config.min_region_cells` cells on the token grid (naming the row
                and the field).
        """
        images, rows = self._check_lengths(images, region_masks, row_indices, "region_masks")
        config = self.core.config
        entries = []
        for position, (image, mask) in enumerate(zip(images, region_masks)):
            row = rows[position]
            rgb = load_rgb_image(image, row, "img")
            array = to_bool_mask(mask, row, "region_mask")
            if array.shape != (rgb.height, rgb.width):
                raise Sa2VAInputError(
                    row, "region_mask", f"mask is {array.shape[0]}x{array.shape[1]} but the image is {rgb.height}x{rgb.width}"
                )
            if not array.any():
                raise Sa2VAInputError(row, "region_mask", "the mask is empty")
            grid = mask_to_token_grid(array, config.token_grid_size)
            cells = int(grid.sum())
            if cells < config.min_region_cells:
                raise Sa2VAInputError(
                    row, "region_mask",
                    f"the region covers {cells} cell(s) of the {config.token_grid_size}x{config.token_grid_size} token "
                    f"grid, fewer than min_region_cells={config.min_region_cells}",
                )
            user = (
                IMAGE_PLACEHOLDER + REGION_PREFIX + VP_START_TOKEN + IMG_CONTEXT_TOKEN * cells + VP_END_TOKEN
                + ".\n" + CAPTION_QUESTION
            )
            entries.append((rgb, grid, user, TASK_CAPTION, CAPTION_QUESTION, row))
        return self._collate(entries)

    def captionable(self, images, region_masks) -> list[bool]:
        """Which masks `caption_prompts` accepts: non-empty, image-sized, and covering at least
        `config.min_region_cells` cells of the token grid. Loop 2's cycle reward asks this first,
        so a tiny predicted mask scores as uncaptionable instead of stopping the run.

        Args:
            images: PIL images or arrays, one per mask.
            region_masks: masks in any form `to_bool_mask` reads.

        Returns:
            One bool per mask.
        """
        config = self.core.config
        verdicts = []
        for position, (image, mask) in enumerate(zip(images, region_masks)):
            try:
                array = to_bool_mask(mask, position, "region_mask")
            except Sa2VAInputError:
                verdicts.append(False)
                continue
            height, width = (image.height, image.width) if hasattr(image, "height") else np.asarray(image).shape[:2]
            cells = int(mask_to_token_grid(array, config.token_grid_size).sum()) if array.shape == (height, width) else 0
            verdicts.append(cells >= max(1, config.min_region_cells))
        return verdicts

    def segmentation_prompts(self, images, texts, row_indices=None) -> PromptBatch:
        """Referring-segmentation prompts: `<image>` expanded, then "Please segment {text} in
        this image.".

        Args:
            images: PIL images or arrays, one per text.
            texts: the referring expressions (non-empty strings).
            row_indices: dataset row indices for error messages.

        Returns:
            A left-padded PromptBatch.

        Raises:
            Sa2VAInputError: a missing image or an empty / non-string text.
        """
        images, rows = self._check_lengths(images, texts, row_indices, "texts")
        grid_size = self.core.config.token_grid_size
        entries = []
        for position, (image, text) in enumerate(zip(images, texts)):
            row = rows[position]
            rgb = load_rgb_image(image, row, "img")
            if not isinstance(text, str) or not text.strip():
                raise Sa2VAInputError(row, "text", f"expected a non-empty referring text, got {text!r}")
            question = SEGMENTATION_QUESTION.format(text=text.strip())
            grid = torch.zeros(grid_size, grid_size, dtype=torch.bool)
            entries.append((rgb, grid, IMAGE_PLACEHOLDER + "\n" + question, TASK_SEGMENTATION, question, row))
        return self._collate(entries)

    @staticmethod
    def _check_lengths(images, others, row_indices, name):
        images = list(images) if not isinstance(images, list) else images
        if len(images) != len(others):
            raise ValueError(f"got {len(images)} images but {len(others)} {name}")
        if len(images) == 0:
            raise ValueError("no prompts: got an empty list of images")
        rows = list(range(len(images))) if row_indices is None else [int(r) for r in row_indices]
        if len(rows) != len(images):
            raise ValueError(f"got {len(rows)} row_indices for {len(images)} prompts")
        return images, rows

    def _collate(self, entries) -> PromptBatch:
        config = self.core.config
        unique: dict[bytes, int] = {}
        tiles, sam_tiles, sizes, image_index, keys = [], [], [], [], []
        for rgb, *_ in entries:
            key = hashlib.blake2b(rgb.tobytes() + repr(rgb.size).encode(), digest_size=16).digest()
            if key not in unique:
                unique[key] = len(tiles)
                tiles.append(
                    vision_tiles(
                        rgb, config.image_size, getattr(config, "dynamic_image_size", False),
                        getattr(config, "min_dynamic_patch", 1), getattr(config, "max_dynamic_patch", 1),
                        getattr(config, "use_thumbnail", True),
                    )
                )
                sam_tiles.append(sam_pixel_values(rgb, config.sam2_image_size))
                sizes.append((rgb.height, rgb.width))
                keys.append(key)
            image_index.append(unique[key])
        # `<image>` (first occurrence: the prompt's start) -> this image's tile tokens.
        users = [
            user.replace(IMAGE_PLACEHOLDER, self._image_text(tiles[image_index[position]].shape[0]), 1)
            for position, (_, _, user, *_) in enumerate(entries)
        ]
        encoded = [self.tokenizer(self._chat(user), add_special_tokens=False)["input_ids"] for user in users]
        length = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(entries), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(entries), length), dtype=torch.long)
        for position, ids in enumerate(encoded):
            input_ids[position, length - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention_mask[position, length - len(ids):] = 1
        return PromptBatch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=torch.cat(tiles),
            sam_pixel_values=torch.stack(sam_tiles),
            image_sizes=sizes,
            image_index=torch.tensor(image_index, dtype=torch.long),
            region_grids=torch.stack([grid for _, grid, *_ in entries]),
            tasks=[task for _, _, _, task, _, _ in entries],
            questions=[question for *_, question, _ in entries],
            row_indices=[row for *_, row in entries],
            tiles_per_image=[t.shape[0] for t in tiles],
            image_keys=keys,
        )

    # --- model pieces ------------------------------------------------------------------------
    def _on_device(self, batch: PromptBatch) -> PromptBatch:
        return batch if batch.input_ids.device == self.device else batch.to(self.device)

    def clear_feature_cache(self) -> None:
        """Drop the cached frozen-encoder features (the trainer calls it at each rollout)."""
        self._feature_cache.clear()

    @contextlib.contextmanager
    def preserved_feature_cache(self):
        """Context manager: on exit the feature cache holds exactly what it held on entry.

        For side computations (the trainer's evaluation between a rollout and its training forwards): their
        images neither stay cached nor evict the current generation's features.
        """
        saved = dict(self._feature_cache)
        try:
            yield
        finally:
            self._feature_cache.clear()
            self._feature_cache.update(saved)

    @contextlib.contextmanager
    def shared_encoder_features(self):
        """Context manager for inference with fixed weights: every encoder's features are cached per image, a
        trainable encoder's too, so the calls inside that show one image (captioning, segmenting and scoring an
        evaluation batch) encode it once. Inside, no gradient is recorded and the weights must not change; on exit
        the cache holds exactly what it held on entry (no trainable encoder's features outlive the block)."""
        previous = self._cache_trainable_encoders
        self._cache_trainable_encoders = True
        try:
            with torch.no_grad(), self.preserved_feature_cache():
                yield
        finally:
            self._cache_trainable_encoders = previous

    def _encode(self, batch: PromptBatch, name: str, encoder: torch.nn.Module, compute, pixels: torch.Tensor,
                offsets: list[int]):
        """Encoder features for the images `batch` uses, each row's image index into them, and
        the tile offsets of those images (image u owns features offsets[u]:offsets[u + 1]).

        A frozen encoder (no trainable parameter) runs only on the batch's images missing from
        the policy's cache (keyed by encoder, model and image content), so every batch showing an
        image shares one pass; its output does not depend on the EMA swap, which moves trainable
        weights only. A trainable one runs on the images the rows use (a `select`ed micro-batch
        encodes only its own images).
        """
        frozen = self._cache_trainable_encoders or not any(p.requires_grad for p in encoder.parameters())
        if frozen and batch.image_keys is not None:
            keys = [(name, id(self.core), pixels.device, key) for key in batch.image_keys]
            missing = [u for u, key in enumerate(keys) if key not in self._feature_cache]
            found = {u: self._feature_cache[keys[u]] for u in range(len(keys)) if u not in missing}
            if missing:
                tiles = torch.cat([torch.arange(offsets[u], offsets[u + 1]) for u in missing]).to(pixels.device)
                value = compute(pixels if len(missing) == len(keys) else pixels[tiles])
                is_tensor = isinstance(value, torch.Tensor)
                levels = [value] if is_tensor else list(value)
                start = 0
                for u in missing:
                    stop = start + offsets[u + 1] - offsets[u]
                    found[u] = (is_tensor, [level[start:stop].detach() for level in levels])
                    start = stop
                for u in missing:
                    self._feature_cache[keys[u]] = found[u]
                # One generation batch at most is expected between clears; the bound only guards
                # callers that never clear (oldest entries go first).
                while len(self._feature_cache) > self.feature_cache_size:
                    self._feature_cache.pop(next(iter(self._feature_cache)))
            per_image = [found[u][1] for u in range(len(keys))]
            levels = [
                torch.cat([parts[level] for parts in per_image]) if len(per_image) > 1 else per_image[0][level]
                for level in range(len(per_image[0]))
            ]
            return (levels[0] if found[0][0] else levels), batch.image_index, offsets
        used, index = batch.image_index.unique(return_inverse=True)
        if used.numel() == len(offsets) - 1:
            return compute(pixels), batch.image_index, offsets
        used = used.tolist()
        tiles = torch.cat([torch.arange(offsets[u], offsets[u + 1]) for u in used]).to(pixels.device)
        kept = [0]
        for u in used:
            kept.append(kept[-1] + offsets[u + 1] - offsets[u])
        return compute(pixels[tiles]), index, kept

    def _sam2_stages(self):
        """(encoder stage, rest) of `get_sam2_features`: the encoder stage is what `_encode` caches.

        The native `get_sam2_features` also applies the mask decoder's `conv_s0` / `conv_s1` and
        `no_memory_embedding`, which train with the mask decoder (and differ under the EMA swap);
        they run after the cache, with the same ops, so cached features stay exact and those
        layers keep their gradients. Other backends' `get_sam2_features` is the encoder only.
        """
        core = self.core
        sam = getattr(core, "grounding_encoder", None)
        if not (isinstance(core, Sa2VAModel) and type(core).get_sam2_features is Sa2VAModel.get_sam2_features):
            return core.get_sam2_features, lambda features: features

        def encode(sam_pixel_values):
            return list(sam.vision_encoder(sam_pixel_values.to(dtype=sam.dtype), return_dict=True).fpn_hidden_states)

        def finish(levels):
            # Sam2Model.get_image_features + Sa2VAModel.get_sam2_features after the encoder, op for op.
            maps = list(levels)
            count = maps[0].shape[0]
            maps[0] = sam.mask_decoder.conv_s0(maps[0])
            maps[1] = sam.mask_decoder.conv_s1(maps[1])
            maps = [level.flatten(2).permute(2, 0, 1) for level in maps]
            maps[-1] = maps[-1] + sam.no_memory_embedding
            sizes = sam.backbone_feature_sizes
            return [level.permute(1, 2, 0).reshape(count, -1, *size) for level, size in zip(maps, sizes)]

        return encode, finish

    def _prompt_embeds(self, batch: PromptBatch) -> torch.Tensor:
        core = self.core
        offsets = batch.tile_offsets
        if hasattr(core, "vision_tower_features"):
            tower, index, offsets = self._encode(
                batch, "vision", core.vision_model, core.vision_tower_features, batch.pixel_values, offsets
            )
            vit = core.project_vision_features(tower)
        else:
            vit, index, offsets = self._encode(batch, "vision_tokens", core, core.extract_feature, batch.pixel_values, offsets)
        tile_offsets = torch.tensor(offsets, dtype=torch.long)
        return core.build_inputs_embeds(batch.input_ids, vit, index, batch.region_grids, tile_offsets)

    def _decoder(self):
        language_model = self.core.language_model
        decoder = language_model.get_decoder() if hasattr(language_model, "get_decoder") else None
        return decoder if decoder is not None else language_model.base_model

    def _score(
        self,
        prompt_embeds: torch.Tensor,
        prompt_mask: torch.Tensor,
        completion_ids: torch.Tensor,
        completion_mask: torch.Tensor,
        temperature: float,
        with_entropy: bool,
        with_seg_hidden: bool,
    ) -> LogprobOutput:
        """One LM forward over [prompt embeddings | completion tokens]."""
        language_model = self.core.language_model
        completion_embeds = language_model.get_input_embeddings()(completion_ids).to(prompt_embeds.dtype)
        inputs_embeds = torch.cat([prompt_embeds, completion_embeds], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask.to(prompt_mask.dtype)], dim=1)
        # Same positions as generate: running count of attended tokens (left padding -> 0).
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        steps = completion_ids.shape[1]
        output = language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            logits_to_keep=steps + 1,
            output_hidden_states=with_seg_hidden,
            use_cache=False,
        )
        logits = output.logits[:, :-1].float() / temperature  # logits at t predict token t + 1
        result = LogprobOutput(logprobs=_get_token_logprobs(logits, completion_ids) * completion_mask)
        if with_entropy:
            result.entropies = _entropies(logits) * completion_mask
        if with_seg_hidden:
            hidden = output.hidden_states[-1][:, prompt_embeds.shape[1]:]
            has_seg, first = _first_position((completion_ids == self.seg_token_id) & completion_mask.bool())
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            result.seg_hidden = hidden[rows, first] * has_seg.unsqueeze(-1).to(hidden.dtype)
            result.has_seg = has_seg
        return result

    # --- sampling and training forward ---------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        batch: PromptBatch,
        num_generations: int = 1,
        max_new_tokens: int = 32,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        do_sample: bool = True,
        generators: Sequence[torch.Generator] | None = None,
    ) -> Rollout:
        """G completions per prompt in one `generate` call; vision features once per image.

        The prompts' embeddings are built once (one vision-tower pass over the unique images;
        none for images a frozen tower has already encoded), repeated G times and
        passed to `language_model.generate(inputs_embeds=...)`. Log-probs come from the step
        logits divided by `temperature` (see the module docstring for top-k / top-p). The `[SEG]`
        hidden state is the last-layer state of the step whose input is the first `[SEG]`; when
        `[SEG]` is the very last token one extra forward computes it.

        Args:
            batch: the prompts (B rows).
            num_generations: G, samples per prompt (contiguous in the output).
            max_new_tokens: generation budget.
            temperature, top_p, top_k: sampling parameters (top_k=0 disables top-k).
            do_sample: False for greedy decoding (log-probs still use `temperature`).
            generators: optional, one `torch.Generator` per output row (B * G, in output order, on the
                model's device): each row's tokens are drawn with its own generator (same distribution), so a
                row's sample no longer depends on the rest of the batch or on the global RNG. Sampling only.

        Returns:
            A Rollout of B * G completions.
        """
        if num_generations < 1:
            raise ValueError(f"num_generations must be >= 1, got {num_generations}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if generators is not None and len(generators) != len(batch) * num_generations:
            raise ValueError(f"got {len(generators)} generators for {len(batch) * num_generations} samples")
        batch = self._on_device(batch)
        prompt_embeds = self._prompt_embeds(batch).repeat_interleave(num_generations, dim=0)
        prompt_mask = batch.attention_mask.repeat_interleave(num_generations, dim=0)
        generation_config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature if do_sample else None,
            top_p=top_p if do_sample else None,
            top_k=top_k if do_sample else None,
            eos_token_id=self.eos_token_ids,
            pad_token_id=self.pad_token_id,
            bos_token_id=None,
            return_dict_in_generate=True,
            use_cache=True,
        )
        captured: list[torch.Tensor] = []

        def capture_last_state(module, args, output):
            state = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
            captured.append(state[:, -1])

        language_model = self.core.language_model
        recorder = _SampledLogprobRecorder(temperature)
        processors = [recorder]
        if generators is not None and do_sample:
            processors.append(_PerRowSampler(generators, temperature, top_k, top_p))
        hook = self._decoder().register_forward_hook(capture_last_state)
        try:
            with _activation_checkpointing_off(language_model):
                output = language_model.generate(
                    inputs_embeds=prompt_embeds,
                    attention_mask=prompt_mask,
                    generation_config=generation_config,
                    logits_processor=LogitsProcessorList(processors),
                    **({} if self.synced_gpus is None else {"synced_gpus": self.synced_gpus}),
                )
        finally:
            hook.remove()
        completion_ids = output.sequences  # generate from inputs_embeds returns the new tokens only
        steps = completion_ids.shape[1]
        step_logprobs = recorder.finish(completion_ids)
        is_eos = torch.isin(completion_ids, torch.tensor(self.eos_token_ids, device=completion_ids.device))
        has_eos, first_eos = _first_position(is_eos)
        positions = torch.arange(steps, device=completion_ids.device)
        end = torch.where(has_eos, first_eos, torch.full_like(first_eos, steps - 1))
        completion_mask = (positions.unsqueeze(0) <= end.unsqueeze(1)).long()
        completion_ids = completion_ids.masked_fill(completion_mask == 0, self.pad_token_id)
        logprobs = step_logprobs * completion_mask

        # captured[t] is the state of the step whose input is completion token t - 1 (one
        # decoder call per step); a [SEG] sampled at the last step has no state yet.
        has_seg, first_seg = _first_position((completion_ids == self.seg_token_id) & completion_mask.bool())
        rows = torch.arange(completion_ids.shape[0], device=completion_ids.device)
        if len(captured) == steps:
            states = torch.stack(captured[1:] + [torch.zeros_like(captured[0])], dim=1)
            seg_hidden = states[rows, first_seg] * has_seg.unsqueeze(-1).to(states.dtype)
            last = (has_seg & (first_seg == steps - 1)).nonzero().reshape(-1)
        else:  # an unexpected generate loop (e.g. chunked prefill): recompute every [SEG] state
            seg_hidden = torch.zeros(len(rows), prompt_embeds.shape[-1], dtype=prompt_embeds.dtype, device=rows.device)
            last = has_seg.nonzero().reshape(-1)
        if last.numel():
            extra = self._score(
                prompt_embeds[last], prompt_mask[last], completion_ids[last], completion_mask[last],
                temperature=1.0, with_entropy=False, with_seg_hidden=True,
            )
            seg_hidden[last] = extra.seg_hidden.to(seg_hidden.dtype)

        repeated = batch.repeat(num_generations)
        segmentation_rows = torch.tensor([task == TASK_SEGMENTATION for task in repeated.tasks], device=has_seg.device)
        self.counters["completions"] += int(completion_ids.shape[0])
        self.counters["completions_without_seg"] += int((segmentation_rows & ~has_seg).sum())
        texts = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        return Rollout(
            batch=repeated,
            completion_ids=completion_ids,
            completion_mask=completion_mask,
            logprobs=logprobs,
            seg_hidden=seg_hidden,
            has_seg=has_seg,
            is_truncated=~has_eos,
            completions=texts,
            num_generations=num_generations,
        )

    def completion_logprobs(
        self,
        batch: PromptBatch,
        completion_ids: torch.Tensor,
        completion_mask: torch.Tensor,
        temperature: float = 1.0,
        with_entropy: bool = False,
        with_seg_hidden: bool = False,
    ) -> LogprobOutput:
        """The differentiable training forward over (prompt, completion) pairs.

        Vision features are computed once per unique image of `batch` (G copies of a prompt
        share them; a frozen vision tower's output is reused from `sample`),
        the prompt and completion go through the LM in one forward, and the logits are divided
        by `temperature` before the log-softmax, as in `sample`.

        Args:
            batch: the prompts, one row per completion (e.g. `rollout.batch`).
            completion_ids: (N, T) completion token ids, right-padded.
            completion_mask: (N, T) 1 on real completion tokens.
            temperature: the sampling temperature.
            with_entropy: also return per-token entropies.
            with_seg_hidden: also return the `[SEG]` hidden states (differentiable).

        Returns:
            A LogprobOutput (log-probs and entropies are 0 where the mask is 0).
        """
        if completion_ids.shape != completion_mask.shape or completion_ids.shape[0] != len(batch):
            raise ValueError(
                f"completion_ids {tuple(completion_ids.shape)} and completion_mask {tuple(completion_mask.shape)} "
                f"must both be ({len(batch)}, T) for a batch of {len(batch)} prompts"
            )
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        batch = self._on_device(batch)
        device = batch.input_ids.device
        return self._score(
            self._prompt_embeds(batch), batch.attention_mask, completion_ids.to(device), completion_mask.to(device),
            temperature, with_entropy, with_seg_hidden,
        )

    # --- masks ---------------------------------------------------------------------------
    def seg_embeddings(self, seg_hidden: torch.Tensor) -> torch.Tensor:
        """`text_hidden_fcs` of `[SEG]` hidden states: (N, H) -> (N, D_sam).

        This is the mean of the stochastic mask action when the trainer samples around it.
        """
        fcs = self.core.text_hidden_fcs
        return fcs(seg_hidden.to(next(fcs.parameters()).dtype))

    def decode_masks(self, batch: PromptBatch, prompt_embeddings: torch.Tensor, has_seg=None) -> MaskOutput:
        """Masks from SAM2 prompt embeddings, SAM2 image features once per unique image.

        The embedding is appended to the SAM2 decoder's sparse prompts (no points or boxes);
        with `config.multimask_output` the best of 3 masks by predicted IoU is kept. Low-res
        logits are upsampled (bilinear) to each image's size and thresholded at
        `config.mask_threshold` (0 logit). When the SAM2 image encoder is frozen its features
        are cached on the policy per image (shared by every batch showing the image).

        Args:
            batch: the prompts, one row per embedding (e.g. `rollout.batch`).
            prompt_embeddings: (N, D_sam) embeddings (`seg_embeddings` or a sample around it).
            has_seg: (N,) bool; rows without `[SEG]` give an empty mask and constant -1e4
                logits without gradient (default: all True).

        Returns:
            A MaskOutput.
        """
        if prompt_embeddings.ndim != 2 or prompt_embeddings.shape[0] != len(batch):
            raise ValueError(f"prompt_embeddings must be ({len(batch)}, D), got {tuple(prompt_embeddings.shape)}")
        batch = self._on_device(batch)
        device = prompt_embeddings.device
        has_seg = (
            torch.ones(len(batch), dtype=torch.bool, device=device) if has_seg is None
            else torch.as_tensor(has_seg, dtype=torch.bool, device=device)
        )
        encoder = self.core.grounding_encoder.vision_encoder
        compute, finish = self._sam2_stages()
        features, index, _ = self._encode(
            batch, "sam2", encoder, compute, batch.sam_pixel_values, list(range(batch.num_images + 1))
        )
        features = finish(features)
        low_res, iou, object_scores = self.core.decode_sam2_masks(features, index, prompt_embeddings)
        low_res = torch.where(has_seg[:, None, None], low_res, torch.full_like(low_res, -1e4))
        mask_logits: list[torch.Tensor | None] = [None] * len(batch)
        for image in batch.image_index.unique().tolist():
            rows = (batch.image_index == image).nonzero().reshape(-1).to(device)
            upsampled = F.interpolate(
                low_res[rows].unsqueeze(1), size=batch.image_sizes[image], mode="bilinear", align_corners=False
            )
            for position, row in enumerate(rows.tolist()):
                mask_logits[row] = upsampled[position, 0]
        threshold = self.core.config.mask_threshold
        masks = [(logit > threshold) & has_seg[row] for row, logit in enumerate(mask_logits)]
        without = int((~has_seg).sum())
        self.counters["masks_without_seg"] += without
        return MaskOutput(
            masks=masks,
            mask_logits=mask_logits,
            low_res_logits=low_res,
            iou_scores=iou,
            object_score_logits=object_scores,
            has_seg=has_seg,
            num_without_seg=without,
        )

    # --- greedy conveniences (reverse model of the cycle rewards) -------------------------
    @torch.no_grad()
    def caption(self, images, region_masks, max_new_tokens: int = 32) -> list[str]:
        """Greedy region captions, batched (one generate call).

        Args:
            images: PIL images or arrays.
            region_masks: one H x W mask per image.
            max_new_tokens: generation budget.

        Returns:
            One caption per (image, mask), special tokens removed.
        """
        rollout = self.sample(self.caption_prompts(images, region_masks), 1, max_new_tokens, do_sample=False)
        return [text.strip() for text in rollout.completions]

    @torch.no_grad()
    def segment(self, images, texts, max_new_tokens: int = 16) -> list[np.ndarray]:
        """Greedy referring segmentation, batched: one H x W bool mask per text.

        A reply without `[SEG]` gives an all-False mask (counted in `counters`).

        Args:
            images: PIL images or arrays.
            texts: one referring expression per image.
            max_new_tokens: generation budget.

        Returns:
            H x W numpy bool masks at each image's size.
        """
        rollout = self.sample(self.segmentation_prompts(images, texts), 1, max_new_tokens, do_sample=False)
        masks = self.decode_masks(rollout.batch, self.seg_embeddings(rollout.seg_hidden), rollout.has_seg)
        return masks.numpy_masks()

    @torch.no_grad()
    def caption_logprobs(self, images, region_masks, captions: Sequence[str]) -> list[CaptionScore]:
        """Teacher-forced log-probs of given captions (each followed by the eos token), at temperature 1.

        The likelihood side of evaluation: how much probability the policy gives a reference caption,
        token by token, which moves long before the greedy caption changes.

        Args:
            images: PIL images or arrays.
            region_masks: one H x W mask per image.
            captions: one caption per (image, mask); scored exactly as given (no chat formatting).

        Returns:
            One CaptionScore per caption.
        """
        if len(captions) != len(region_masks):
            raise ValueError(f"{len(captions)} captions for {len(region_masks)} region masks")
        batch = self.caption_prompts(images, region_masks)
        eos = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else self.eos_token_ids[0]
        token_ids, spans = [], []
        for text in captions:
            if self.tokenizer.is_fast:
                encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
                spans.append([tuple(span) for span in encoded["offset_mapping"]] + [(len(text), len(text))])
            else:  # slow tokenizers give no character offsets
                encoded = self.tokenizer(text, add_special_tokens=False)
                spans.append(None)
            token_ids.append(list(encoded["input_ids"]) + [eos])
        ids, mask = right_pad(token_ids, self.pad_token_id)
        logprobs = self.completion_logprobs(batch, ids, mask).logprobs.float().cpu()
        return [CaptionScore(token_ids=row_ids, logprobs=logprobs[row, :len(row_ids)].tolist(), spans=spans[row])
                for row, row_ids in enumerate(token_ids)]
