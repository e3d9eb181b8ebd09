"""The remote-code backend: the policy adapter over a published `Sa2VAChatModel`.

`RemoteSa2VAPolicy(model, tokenizer)` drives a model loaded with `trust_remote_code=True`
(the InternVL-based `ByteDance/Sa2VA-*` and `Sa2VA-InternVL3-*` checkpoints) through exactly
the public surface of `Sa2VAPolicy` (same methods, same dataclasses), so the trainer and the
rewards cannot tell the backends apart.

How: `Sa2VAPolicy` works on any model exposing the native surface (its class docstring lists
it). `RemoteModelView` is that surface built from the published model's own submodules
(`vision_model`, `pixel_shuffle`, `mlp1`, `language_model`, `text_hidden_fcs`,
`grounding_encoder.sam2_model`), so every number comes from the published weights and code,
while the control flow is ours. That is how the published model's traps are avoided:

- its `predict_forward` is never called: its stop-word criterion decodes only the first
  sequence of the batch (wrong for G > 1 samples), it decodes greedily and it calls `.cuda()`.
  We call `language_model.generate(inputs_embeds=...)` ourselves with the eos ids of the
  tokenizer, the generation config and the template's stop words; its output holds the new
  tokens only (no prompt), which `Sa2VAPolicy.sample` expects;
- its `forward` / `_llm_forward` is never called either (it increments `_count`, which its
  `__init__` never sets); the training forward runs the language model on our embeddings.
  `_count` is still set to 0 when missing, so code that calls `model(..., mode='loss')` works;
- its SAM2 path (`init_state` / `add_language_embd` / `propagate_in_video`) hard-codes CUDA and
  a CUDA-only bf16 autocast. We run the same modules directly: image encoder ->
  `conv_s0` / `conv_s1` on the two high-resolution levels -> `no_mem_embed` added to the last
  level (the published first-frame path) -> `_forward_sam_heads(language_embd=...)` with the
  model's own multimask rule; a CPU / GPU autocast to the SAM2 dtype when it is not float32.
  Masks are resized as the published inference does: 256 x 256 logits -> SAM2 input size
  (bilinear) -> image size (bilinear), threshold at logit 0 (sigmoid 0.5);
- region-token counts are validated here (the published forward warns and pads or truncates).

Known differences from `predict_forward`, on purpose: images are normalised in float32 and
cast to the model's dtype (the published code normalises the SAM2 input in bfloat16); the
prompt is the adapter's (`caption_prompts` / `segmentation_prompts`), in the chat template
named by `config.template`.

`load_published_sa2va(path)` loads a published checkpoint directory with `trust_remote_code`
and works around its loading trap under transformers >= 5.5.1 (its `__init__` never calls
`post_init()`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .adapter import MaskOutput, PromptBatch, Sa2VAPolicy, _unwrap
from .configuration_sa2va import CHAT_TEMPLATES, IMG_CONTEXT_TOKEN

# The tiling the published inference (`preparing_for_generation`) sets in code, whatever
# config.json says: InternVL dynamic tiles, 1 to 12 plus a thumbnail.
PUBLISHED_TILING = {"dynamic_image_size": True, "min_dynamic_patch": 1, "max_dynamic_patch": 12, "use_thumbnail": True}
# The published training data drops regions under 4 cells of the 16 x 16 token grid.
PUBLISHED_MIN_REGION_CELLS = 4


def resolve_template(config, model=None) -> dict[str, Any]:
    """The chat template of a published Sa2VA model, read from its config.

    The published model keeps `config.template` (an xtuner template name such as "qwen_chat",
    "internlm2_chat", "phi3_chat"; a "-" is read as "_", as the published code does) and, once
    built, `model.template`: that name's entry of its own `PROMPT_TEMPLATE` table. The model's
    own entry wins when present (it is what the checkpoint was trained with); otherwise the
    name is looked up in `CHAT_TEMPLATES`.

    Args:
        config: the model config (anything with a `template` attribute).
        model: the built model, or None.

    Returns:
        A dict with at least "INSTRUCTION" (holding "{input}") and, usually, "STOP_WORDS".

    Raises:
        ValueError: no usable template: the name is missing or unknown and the model has none.
    """
    own = getattr(model, "template", None) if model is not None else None
    if isinstance(own, dict) and "{input}" in str(own.get("INSTRUCTION", "")):
        return dict(own)
    name = getattr(config, "template", None)
    key = name.replace("-", "_") if isinstance(name, str) else None
    if key not in CHAT_TEMPLATES:
        raise ValueError(
            f"config.template is {name!r}; a published Sa2VA config names one of {sorted(CHAT_TEMPLATES)} "
            "(or build the model so that model.template holds its template dict)"
        )
    return dict(CHAT_TEMPLATES[key])


@dataclass
class RemoteConfigView:
    """The sizes and settings `Sa2VAPolicy` reads from `model.config`, derived from a published model.

    Attributes:
        image_size: vision tile size (`force_image_size` or the ViT's `image_size`; 448).
        patch_size: ViT patch (14).
        downsample_ratio: pixel-shuffle ratio (0.5).
        num_image_token: vision tokens per tile (`model.num_image_token`; 256).
        token_grid_size: tokens per tile side (16).
        sam2_image_size: SAM2 input size (`sam2_model.image_size`; 1024).
        min_region_cells: smallest region in token-grid cells (published data: 4).
        dynamic_image_size, min_dynamic_patch, max_dynamic_patch, use_thumbnail: tiling (the
            published inference: dynamic, 1..12, thumbnail).
        mask_threshold: logit threshold of the boolean masks (0 = sigmoid 0.5, as published).
        img_context_token_id, seg_token_id: set by the policy from the tokenizer.
        template: the template name from the config.
    """

    image_size: int
    patch_size: int
    downsample_ratio: float
    num_image_token: int
    token_grid_size: int
    sam2_image_size: int
    min_region_cells: int = PUBLISHED_MIN_REGION_CELLS
    dynamic_image_size: bool = True
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 12
    use_thumbnail: bool = True
    mask_threshold: float = 0.0
    img_context_token_id: int | None = None
    seg_token_id: int | None = None
    template: str | None = None


def _as_int(value) -> int:
    return int(value[0] if isinstance(value, (list, tuple)) else value)


class RemoteModelView:
    """The native model surface (see `Sa2VAPolicy`) over a published `Sa2VAChatModel`.

    Holds no weights of its own: every attribute is the published model's module, and every
    computation calls the published modules in the order the published code does.

    Args:
        model: the published model (possibly PEFT-wrapped: LoRA layers stay in place).
        min_region_cells, dynamic_image_size, min_dynamic_patch, max_dynamic_patch,
            use_thumbnail: prompt settings (defaults: the published inference).

    Raises:
        ValueError: the model lacks a submodule the backend needs.
    """

    def __init__(
        self,
        model,
        min_region_cells: int = PUBLISHED_MIN_REGION_CELLS,
        dynamic_image_size: bool = PUBLISHED_TILING["dynamic_image_size"],
        min_dynamic_patch: int = PUBLISHED_TILING["min_dynamic_patch"],
        max_dynamic_patch: int = PUBLISHED_TILING["max_dynamic_patch"],
        use_thumbnail: bool = PUBLISHED_TILING["use_thumbnail"],
    ):
        core = _unwrap(model)
        missing = [
            name for name in ("vision_model", "mlp1", "language_model", "text_hidden_fcs", "grounding_encoder")
            if not hasattr(core, name)
        ]
        if missing or not hasattr(core.grounding_encoder, "sam2_model"):
            raise ValueError(
                f"not a published InternVL-based Sa2VA model: missing {missing or ['grounding_encoder.sam2_model']} "
                "(the Qwen-VL based Sa2VA checkpoints are not supported by this backend)"
            )
        _check_language_model(core.language_model)
        self.model = core
        self.sam2 = core.grounding_encoder.sam2_model
        config = core.config
        vision = config.vision_config
        image_size = _as_int(getattr(config, "force_image_size", None) or vision.image_size)
        patch_size = _as_int(vision.patch_size)
        ratio = float(config.downsample_ratio)
        grid = int(image_size // patch_size * ratio)
        self.config = RemoteConfigView(
            image_size=image_size,
            patch_size=patch_size,
            downsample_ratio=ratio,
            num_image_token=int(getattr(core, "num_image_token", grid * grid)),
            token_grid_size=grid,
            sam2_image_size=int(self.sam2.image_size),
            min_region_cells=min_region_cells,
            dynamic_image_size=dynamic_image_size,
            min_dynamic_patch=min_dynamic_patch,
            max_dynamic_patch=max_dynamic_patch,
            use_thumbnail=use_thumbnail,
            template=getattr(config, "template", None),
        )
        if self.config.num_image_token != grid * grid:
            raise ValueError(f"model.num_image_token {self.config.num_image_token} is not the {grid} x {grid} token grid")
        self.template = resolve_template(config, core)
        self.select_layer = int(getattr(config, "select_layer", -1))
        # The counting hooks of Sa2VAPolicy sit on these two encoders.
        self.grounding_encoder = _SamEncoderHandle(self.sam2.image_encoder)

    # --- plain delegation ------------------------------------------------------------------
    @property
    def vision_model(self):
        return self.model.vision_model

    @property
    def language_model(self):
        return self.model.language_model

    @property
    def text_hidden_fcs(self):
        return self.model.text_hidden_fcs

    @property
    def generation_config(self):
        return getattr(self.model, "generation_config", None)

    def parameters(self, recurse: bool = True):
        return self.model.parameters(recurse)

    # --- vision tokens ------------------------------------------------------------------------
    def vision_tower_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The ViT's patch tokens (class token dropped), the first half of `extract_feature`.

        Split from the projector so that a frozen tower runs once per image per step while a
        trainable `mlp1` still gets gradients.
        """
        vision = self.model.vision_model
        pixel_values = pixel_values.to(next(vision.parameters()).dtype)
        if self.select_layer == -1:
            tokens = vision(pixel_values=pixel_values, output_hidden_states=False, return_dict=True).last_hidden_state
        else:
            tokens = vision(pixel_values=pixel_values, output_hidden_states=True, return_dict=True).hidden_states[
                self.select_layer
            ]
        return tokens[:, 1:, :]

    def project_vision_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """Pixel shuffle (the model's own, honouring `ps_version`) then `mlp1`: (T, P, C) -> (T, N, H)."""
        side = int(round(tokens.shape[1] ** 0.5))
        grid = tokens.reshape(tokens.shape[0], side, side, -1)
        shuffled = self.model.pixel_shuffle(grid, scale_factor=self.config.downsample_ratio)
        return self.model.mlp1(shuffled.reshape(shuffled.shape[0], -1, shuffled.shape[-1]))

    def extract_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Vision tokens of tiles, as the published `extract_feature`."""
        return self.project_vision_features(self.vision_tower_features(pixel_values))

    def build_inputs_embeds(
        self,
        input_ids: torch.Tensor,
        vit_embeds: torch.Tensor,
        image_index: torch.Tensor,
        region_grids: torch.Tensor | None = None,
        tile_offsets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """LM input embeddings with each row's `<IMG_CONTEXT>` slots filled, published order.

        A row's slots take all tokens of its image's tiles, then the region cells (row-major)
        of the image's last tile (the thumbnail, the tile the published `vp_overall_mask`
        marks). Unlike the published forward, a count mismatch is an error.

        Args:
            input_ids: (B, L).
            vit_embeds: (T, N, H) tokens of all tiles.
            image_index: (B,) image of each row.
            region_grids: (B, g, g) bool or None.
            tile_offsets: (U + 1,) tile ranges of the images (default: one tile each).

        Returns:
            (B, L, H) embeddings, differentiable w.r.t. `vit_embeds`.

        Raises:
            ValueError: a row's slot count differs from its image + region token count.
        """
        context_id = self.config.img_context_token_id
        if context_id is None:
            raise ValueError(f"the {IMG_CONTEXT_TOKEN} token id is not set (RemoteSa2VAPolicy sets it from the tokenizer)")
        embeds = self.model.language_model.get_input_embeddings()(input_ids)
        tiles, per_tile, width = vit_embeds.shape
        offsets = list(range(tiles + 1)) if tile_offsets is None else [int(v) for v in tile_offsets.tolist()]
        flat = vit_embeds.reshape(tiles * per_tile, width)
        slots = input_ids == context_id
        picks = []
        for row, image in enumerate(image_index.tolist()):
            start, stop = offsets[image] * per_tile, offsets[image + 1] * per_tile
            rows = [torch.arange(start, stop)]
            if region_grids is not None:
                rows.append(stop - per_tile + torch.nonzero(region_grids[row].reshape(-1).cpu()).reshape(-1))
            rows = torch.cat(rows)
            found = int(slots[row].sum())
            if found != rows.numel():
                raise ValueError(
                    f"row {row}, field 'input_ids': {found} {IMG_CONTEXT_TOKEN} tokens but its image and region "
                    f"give {rows.numel()} vision tokens"
                )
            picks.append(rows)
        visual = flat[torch.cat(picks).to(flat.device)].to(embeds.dtype)
        return embeds.masked_scatter(slots.unsqueeze(-1), visual)

    # --- SAM2 ----------------------------------------------------------------------------------
    def get_sam2_features(self, sam_pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """The SAM2 image encoder's FPN levels used by the mask head (NCHW, high-res first).

        Only the image encoder runs here (it is the part cached when frozen); the mask
        decoder's `conv_s0` / `conv_s1` and `no_mem_embed` are applied in `decode_sam2_masks`,
        so they keep their gradients when trained.
        """
        encoder = self.sam2.image_encoder
        pixels = sam_pixel_values.to(next(encoder.parameters()).dtype)
        with self._sam_autocast():
            levels = encoder(pixels)["backbone_fpn"]
        return list(levels[-self.sam2.num_feature_levels:])

    def decode_sam2_masks(
        self, features: list[torch.Tensor], image_index: torch.Tensor, prompt_embeddings: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The published first-frame SAM2 step for one language embedding per row.

        Args:
            features: `get_sam2_features` of the unique images.
            image_index: (N,) image of each row.
            prompt_embeddings: (N, D) `text_hidden_fcs` outputs (or samples around them).

        Returns:
            (low_res_logits (N, h, w) float32 of the chosen mask, predicted IoU (N,), object
            score logits (N,)).
        """
        sam2 = self.sam2
        index = image_index.to(features[0].device)
        levels = [level[index] for level in features]
        if sam2.use_high_res_features_in_sam:  # what `forward_image` does after the encoder
            levels[0] = sam2.sam_mask_decoder.conv_s0(levels[0])
            levels[1] = sam2.sam_mask_decoder.conv_s1(levels[1])
        high_res = levels[:-1] if len(levels) > 1 else None
        # First (conditioning) frame with directly_add_no_mem_embed: no memory attention.
        image_embedding = levels[-1] + sam2.no_mem_embed.reshape(1, -1, 1, 1)
        multimask = sam2._use_multimask(True, None)
        language = prompt_embeddings.to(image_embedding.dtype).unsqueeze(1)
        with self._sam_autocast():
            _, _, ious, low_res, _, _, object_scores = sam2._forward_sam_heads(
                backbone_features=image_embedding,
                high_res_features=high_res,
                multimask_output=multimask,
                language_embd=language,
            )
        best_iou = ious.max(dim=-1).values if multimask else ious[:, 0]
        return low_res[:, 0].float(), best_iou.float(), object_scores.reshape(-1).float()

    def _sam_autocast(self):
        """An autocast to the SAM2 dtype on its own device (the published one is CUDA-only)."""
        parameter = next(self.sam2.parameters())
        if parameter.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=parameter.device.type, dtype=parameter.dtype)


def _check_language_model(language_model) -> None:
    """Refuse an LLM the adapter's training forward cannot call (it passes `logits_to_keep`).

    The published InternLM2 / Phi3 LLM classes (Sa2VA-8B / 26B and the Phi3 variants) are remote
    code written for transformers 4.x: their `forward` takes neither `logits_to_keep` nor extra
    keyword arguments. Qwen2 / Qwen3 / Llama LLMs are transformers' own classes and qualify.
    """
    base = _unwrap(language_model)
    if _forward_takes_logits_to_keep(type(base)):
        return
    raise ValueError(
        f"the language model {type(base).__name__} is the checkpoint's own remote code and its forward takes no "
        "`logits_to_keep`; this backend supports published checkpoints whose LLM is a transformers class "
        "(Qwen2: Sa2VA-1B / 4B / InternVL3-*). Sa2VA-8B / 26B (InternLM2) are not supported under transformers 5.x."
    )


def _forward_takes_logits_to_keep(model_class) -> bool:
    parameters = inspect.signature(model_class.forward).parameters
    return "logits_to_keep" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


class _SamEncoderHandle:
    """`grounding_encoder.vision_encoder`, the name `Sa2VAPolicy` hooks and checks for freezing."""

    def __init__(self, encoder: torch.nn.Module):
        self.vision_encoder = encoder


class RemoteSa2VAPolicy(Sa2VAPolicy):
    """`Sa2VAPolicy` over a published remote-code Sa2VA model (same methods, same outputs).

    Args:
        model: a published `Sa2VAChatModel` (`load_published_sa2va` or
            `AutoModel.from_pretrained(..., trust_remote_code=True)`), possibly PEFT-wrapped.
        tokenizer: its tokenizer (with the Sa2VA special tokens and a pad token).
        min_region_cells: smallest region accepted by `caption_prompts` (published data: 4).
        dynamic_image_size, min_dynamic_patch, max_dynamic_patch, use_thumbnail: vision tiling
            (defaults: the published inference, dynamic 1..12 tiles plus a thumbnail).

    Attributes:
        model: the published model as given (for optimizers, saving, PEFT).
        view: the `RemoteModelView` the adapter runs on (`self.core`).

    Raises:
        ValueError: not an InternVL-based Sa2VA model, no usable template, or a tokenizer
            without the Sa2VA special tokens / a pad token.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        min_region_cells: int = PUBLISHED_MIN_REGION_CELLS,
        dynamic_image_size: bool = PUBLISHED_TILING["dynamic_image_size"],
        min_dynamic_patch: int = PUBLISHED_TILING["min_dynamic_patch"],
        max_dynamic_patch: int = PUBLISHED_TILING["max_dynamic_patch"],
        use_thumbnail: bool = PUBLISHED_TILING["use_thumbnail"],
    ):
        view = RemoteModelView(
            model, min_region_cells, dynamic_image_size, min_dynamic_patch, max_dynamic_patch, use_thumbnail
        )
        super().__init__(view, tokenizer)
        self.model = model
        self.view = view
        core = view.model
        # The published model's own generate / forward read these; set them so they work too.
        core.img_context_token_id = self.img_context_token_id
        core.seg_token_idx = self.seg_token_id
        if not hasattr(core, "_count"):
            core._count = 0
        self._bos_prefix = _default_bos_prefix(tokenizer)

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, device=None, **kwargs):
        """Load a published checkpoint directory (model + tokenizer) into a remote policy.

        Args:
            path: a local directory with the published config, code, weights and tokenizer.
            dtype: optional weight dtype (e.g. torch.bfloat16).
            device: optional device to move the model to.
            **kwargs: passed to `RemoteSa2VAPolicy` (prompt settings).

        Returns:
            A RemoteSa2VAPolicy around the model in eval mode.
        """
        from transformers import AutoTokenizer

        model = load_published_sa2va(path, dtype=dtype, device=device)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return cls(model, tokenizer, **kwargs)

    def _chat(self, user_text: str) -> str:
        # The published code tokenises with `tokenizer.encode` (special tokens on): a tokenizer
        # that adds a BOS (InternLM2's) gets it; ours encodes without, so it is written here.
        return self._bos_prefix + super()._chat(user_text)

    def decode_masks(self, batch: PromptBatch, prompt_embeddings: torch.Tensor, has_seg=None) -> MaskOutput:
        """Masks from SAM2 prompt embeddings, resized as the published inference resizes them.

        Same contract as `Sa2VAPolicy.decode_masks`; only the resize differs: the published
        model upsamples the 256 x 256 logits to the SAM2 input size, then to the image size
        (two bilinear steps), and so does this backend.
        """
        output = super().decode_masks(batch, prompt_embeddings, has_seg)
        side = self.view.config.sam2_image_size
        threshold = self.view.config.mask_threshold
        staged = F.interpolate(output.low_res_logits.unsqueeze(1), size=(side, side), mode="bilinear", align_corners=False)
        for row, image in enumerate(batch.image_index.tolist()):
            logits = F.interpolate(staged[row : row + 1], size=tuple(batch.image_sizes[image]), mode="bilinear",
                                   align_corners=False)[0, 0]
            output.mask_logits[row] = logits
            output.masks[row] = (logits > threshold) & output.has_seg[row]
        return output


def _default_bos_prefix(tokenizer) -> str:
    """The BOS text `tokenizer.encode` adds by default ("" for Qwen2 tokenizers, "<s>" for InternLM2)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    default = tokenizer("a")["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and len(default) > len(plain) and default[0] == bos:
        return tokenizer.bos_token
    return ""


def ensure_post_init(model_class) -> type:
    """Make a remote-code model class call `post_init()` at the end of `__init__` (idempotent).

    The published `Sa2VAChatModel.__init__` never calls it; transformers >= 5.5.1 needs the
    attributes it sets (`all_tied_weights_keys`) to load weights. Calling it twice is harmless
    on older versions, so the patch is applied whenever the class lacks its own call.

    Args:
        model_class: the class (patched in place).

    Returns:
        The same class.
    """
    if getattr(model_class, "_sa2va_trl_post_init", False):
        return model_class
    original = model_class.__init__

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if not hasattr(self, "all_tied_weights_keys") and hasattr(self, "post_init"):
            self.post_init()

    model_class.__init__ = __init__
    model_class._sa2va_trl_post_init = True
    return model_class


def load_published_sa2va(path, dtype: torch.dtype | None = None, device=None, **kwargs):
    """Load a published Sa2VA checkpoint (`trust_remote_code`) on any device, in eval mode.

    Resolves the model class from the checkpoint's `auto_map`, applies `ensure_post_init`
    (needed from transformers 5.5.1 on) and loads with the class's `from_pretrained`. The
    published code imports torchvision (and timm for InternViT); both must be importable.

    Args:
        path: a local directory holding config.json, the modeling code and the weights.
        dtype: optional weight dtype.
        device: optional device (the model is moved after loading; no CUDA is assumed).
        **kwargs: passed to `from_pretrained`.

    Returns:
        The published model in eval mode. Its class is registered for `AutoModel`, so its
        `save_pretrained` writes the modeling code and `auto_map` too (as after `AutoModel`).

    Raises:
        ValueError: the config has no `auto_map` entry for AutoModel (not a remote-code checkpoint).
    """
    from transformers import AutoConfig
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    config = AutoConfig.from_pretrained(path, trust_remote_code=True)
    reference = (getattr(config, "auto_map", None) or {}).get("AutoModel")
    if reference is None:
        raise ValueError(f"{path}: config.json has no auto_map['AutoModel']; is this a published Sa2VA checkpoint?")
    model_class = ensure_post_init(get_class_from_dynamic_module(reference, path))
    # As `AutoModel.from_pretrained` does: `save_pretrained` then copies the modeling code next to the
    # weights and writes `auto_map`, so a trained model's directory loads the same way.
    model_class.register_for_auto_class("AutoModel")
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = model_class.from_pretrained(path, config=config, **kwargs)
    if device is not None:
        model = model.to(device)
    return model.eval()


def is_published_sa2va(model) -> bool:
    """Whether `model` (possibly PEFT-wrapped) has the published InternVL-based Sa2VA layout.

    The published `Sa2VAChatModel` keeps SAM2 as `grounding_encoder.sam2_model` (facebookresearch
    names); the native `Sa2VAModel` has a transformers `Sam2Model` as `grounding_encoder`.
    """
    core = _unwrap(model)
    return all(hasattr(core, name) for name in ("vision_model", "mlp1", "language_model", "text_hidden_fcs")) and (
        hasattr(getattr(core, "grounding_encoder", None), "sam2_model")
    )


def policy_class_for(model) -> type[Sa2VAPolicy]:
    """The adapter class for a model: `RemoteSa2VAPolicy` for a published one, else `Sa2VAPolicy`.

    Example:
        >>> from sa2va_trl.models import build_tiny_model
        >>> policy_class_for(build_tiny_model(seed=0)[0]).__name__
        'Sa2VAPolicy'
    """
    return RemoteSa2VAPolicy if is_published_sa2va(model) else Sa2VAPolicy
