"""Sa2VAModel: the native Sa2VA backend, composed of real transformers modules.

Modules keep the published `Sa2VAChatModel`'s names so published weights can be mapped on:

- `vision_model`: `InternVLVisionModel` (InternViT); its CLS token is dropped;
- `mlp1`: LayerNorm(4d) -> Linear -> GELU -> Linear after a 0.5 pixel shuffle (indices 0, 1, 3);
- `language_model`: any causal LM built with `AutoModelForCausalLM.from_config` (Qwen2 default);
- `grounding_encoder`: transformers `Sam2Model` (HieraDet image encoder, prompt encoder, mask
  decoder);
- `text_hidden_fcs`: Linear(H, H) -> ReLU -> Linear(H, D_sam) -> Dropout(0).

The model computes; prompt building, sampling and batching policy live in `adapter.py`.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, GenerationConfig, InternVLVisionModel, PreTrainedModel, Sam2Model

from .configuration_sa2va import (
    CHAT_TEMPLATES,
    IMG_CONTEXT_TOKEN,
    IMG_END_TOKEN,
    IMG_START_TOKEN,
    SEG_TOKEN,
    VP_END_TOKEN,
    VP_START_TOKEN,
    Sa2VAConfig,
)


def pixel_shuffle(features: torch.Tensor, scale_factor: float = 0.5) -> torch.Tensor:
    """InternVL's pixel shuffle (ps_version v2): (n, w, h, c) -> (n, w*s, h*s, c/s^2).

    With s = 0.5 each 2 x 2 block of patches becomes one token with 4x the channels.
    """
    n, w, h, c = features.shape
    features = features.reshape(n, w, int(h * scale_factor), int(c / scale_factor))
    features = features.permute(0, 2, 1, 3).contiguous()
    features = features.reshape(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor)))
    return features.permute(0, 2, 1, 3).contiguous()


class Sa2VAPreTrainedModel(PreTrainedModel):
    """Base class: config class, weight init of the Sa2VA-specific layers, capability flags."""

    config_class = Sa2VAConfig
    config: Sa2VAConfig
    base_model_prefix = "sa2va"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    _no_split_modules = ["InternVLVisionLayer", "Qwen2DecoderLayer", "Sam2MultiScaleBlock", "Sam2TwoWayAttentionBlock"]

    @torch.no_grad()
    def _init_weights(self, module):
        std = getattr(self.config.llm_config, "initializer_range", 0.02)
        if isinstance(module, nn.Linear):
            module.weight.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()


class Sa2VAModel(Sa2VAPreTrainedModel):
    """Sa2VA: InternVL vision tower + projector + causal LM, with `[SEG]` -> SAM2 masks.

    Args:
        config: a `Sa2VAConfig`.
    """

    IMG_START_TOKEN = IMG_START_TOKEN
    IMG_END_TOKEN = IMG_END_TOKEN
    IMG_CONTEXT_TOKEN = IMG_CONTEXT_TOKEN
    VP_START_TOKEN = VP_START_TOKEN
    VP_END_TOKEN = VP_END_TOKEN
    SEG_TOKEN = SEG_TOKEN

    def __init__(self, config: Sa2VAConfig):
        super().__init__(config)
        vit_hidden = config.vision_config.hidden_size
        llm_hidden = config.llm_config.hidden_size
        shuffled = vit_hidden * int(round(1 / config.downsample_ratio)) ** 2

        self.vision_model = InternVLVisionModel(config.vision_config)
        self.mlp1 = nn.Sequential(
            nn.LayerNorm(shuffled),
            nn.Linear(shuffled, llm_hidden),
            nn.GELU(),
            nn.Linear(llm_hidden, llm_hidden),
        )
        self.language_model = AutoModelForCausalLM.from_config(config.llm_config)
        self.grounding_encoder = Sam2Model(config.sam2_config)
        self.text_hidden_fcs = nn.Sequential(
            nn.Linear(llm_hidden, llm_hidden),
            nn.ReLU(inplace=True),
            nn.Linear(llm_hidden, config.sam_prompt_dim),
            nn.Dropout(0.0),
        )
        self.template = CHAT_TEMPLATES[config.template]
        self.post_init()
        self.generation_config = self._default_generation_config()

    # --- published surface ----------------------------------------------------------------
    @property
    def num_image_token(self) -> int:
        """Vision tokens per tile."""
        return self.config.num_image_token

    @property
    def img_context_token_id(self) -> int | None:
        return self.config.img_context_token_id

    @property
    def seg_token_idx(self) -> int | None:
        return self.config.seg_token_id

    def _default_generation_config(self) -> GenerationConfig:
        llm = self.config.llm_config
        return GenerationConfig(
            bos_token_id=llm.bos_token_id,
            eos_token_id=llm.eos_token_id,
            pad_token_id=llm.pad_token_id,
        )

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    # --- vision ---------------------------------------------------------------------------
    def extract_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Vision tokens of tiles: ViT (CLS dropped) -> pixel shuffle -> `mlp1`.

        Args:
            pixel_values: (n, 3, S, S) normalised tiles.

        Returns:
            (n, num_image_token, H_llm) embeddings in the LM's input space.
        """
        return self.project_vision_features(self.vision_tower_features(pixel_values))

    def vision_tower_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The vision tower's last hidden state without the CLS token: (n, patches, d)."""
        pixel_values = pixel_values.to(dtype=self.vision_model.dtype)
        return self.vision_model(pixel_values=pixel_values).last_hidden_state[:, 1:, :]

    def project_vision_features(self, vit: torch.Tensor) -> torch.Tensor:
        """Pixel shuffle + `mlp1`: (n, patches, d) -> (n, patches * ratio^2, H_llm)."""
        side = int(round(vit.shape[1] ** 0.5))
        vit = vit.reshape(vit.shape[0], side, side, -1)
        vit = pixel_shuffle(vit, self.config.downsample_ratio)
        vit = vit.reshape(vit.shape[0], -1, vit.shape[-1])
        return self.mlp1(vit.to(self.mlp1[1].weight.dtype))

    def build_inputs_embeds(
        self,
        input_ids: torch.Tensor,
        vit_embeds: torch.Tensor,
        image_index: torch.Tensor,
        region_grids: torch.Tensor | None = None,
        tile_offsets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """LM input embeddings with the `<IMG_CONTEXT>` slots filled by vision tokens.

        Each row's slots take, in order, all tokens of its image's tiles, then the tokens its
        region grid selects (row-major) from the image's last tile (the whole image: the single
        tile or the thumbnail), as in the published model's `<vp>` handling.

        Args:
            input_ids: (B, L) token ids.
            vit_embeds: (T, N, H) vision tokens of the tiles (`extract_feature`).
            image_index: (B,) which image each row shows.
            region_grids: (B, g, g) bool region cells (None or all False: no region).
            tile_offsets: (U + 1,) image u owns tiles tile_offsets[u] : tile_offsets[u + 1]
                (default: one tile per image).

        Returns:
            (B, L, H) input embeddings (differentiable w.r.t. `vit_embeds`).

        Raises:
            ValueError: a row's `<IMG_CONTEXT>` count differs from its image + region tokens.
        """
        context_id = self.config.img_context_token_id
        if context_id is None:
            raise ValueError("config.img_context_token_id is not set; build the model with its tokenizer")
        embeds = self.get_input_embeddings()(input_ids)
        slots = input_ids == context_id
        num_tiles, per_tile, _ = vit_embeds.shape
        device = input_ids.device
        if tile_offsets is None:
            tile_offsets = torch.arange(num_tiles + 1)
        offsets = [int(v) for v in tile_offsets.tolist()]
        image_index = image_index.tolist()
        gather = []
        for row in range(input_ids.shape[0]):
            image = int(image_index[row])
            if not 0 <= image < len(offsets) - 1:
                raise ValueError(f"row {row}: image_index {image} out of range for {len(offsets) - 1} images")
            first, end = offsets[image] * per_tile, offsets[image + 1] * per_tile
            parts = [torch.arange(first, end, device=device)]
            if region_grids is not None:
                parts.append(end - per_tile + region_grids[row].reshape(-1).nonzero().reshape(-1).to(device))
            indices = torch.cat(parts)
            if int(slots[row].sum()) != indices.numel():
                raise ValueError(
                    f"row {row}, field 'input_ids': {int(slots[row].sum())} {IMG_CONTEXT_TOKEN} tokens but the image "
                    f"and region give {indices.numel()} vision tokens"
                )
            gather.append(indices)
        visual = vit_embeds.reshape(num_tiles * per_tile, -1)[torch.cat(gather)].to(embeds.dtype)
        return embeds.masked_scatter(slots.unsqueeze(-1), visual)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        image_index: torch.Tensor,
        region_grids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        tile_offsets: torch.Tensor | None = None,
        **kwargs,
    ):
        """Language-model forward over prompts with images (SFT / scoring).

        Args:
            input_ids, attention_mask: (B, L).
            pixel_values: (T, 3, S, S) tiles of the unique images.
            image_index: (B,) image of each row.
            region_grids: (B, g, g) bool region cells, or None.
            tile_offsets: (U + 1,) tile ranges per image (default: one tile per image).
            position_ids: (B, L); default: running count of attended tokens (left padding).
            labels: optional LM labels (-100 = ignored), passed to the language model.
            **kwargs: passed to the language model (e.g. output_hidden_states).

        Returns:
            The language model's `CausalLMOutputWithPast`.
        """
        vit_embeds = self.extract_feature(pixel_values)
        inputs_embeds = self.build_inputs_embeds(input_ids, vit_embeds, image_index, region_grids, tile_offsets)
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            labels=labels,
            **kwargs,
        )

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_index: torch.Tensor | None = None,
        region_grids: torch.Tensor | None = None,
        tile_offsets: torch.Tensor | None = None,
        **generate_kwargs,
    ):
        """Generate from prompts with images, like the published model: vision tokens are put
        into the prompt embeddings and `language_model.generate(inputs_embeds=...)` runs, so the
        returned sequences hold only the new tokens.

        Args:
            pixel_values: (T, 3, S, S) tiles.
            input_ids, attention_mask: (B, L) left-padded prompts with expanded `<IMG_CONTEXT>`.
            image_index: (B,) image of each row (default: row i shows image i).
            region_grids: (B, g, g) bool region cells, or None.
            tile_offsets: (U + 1,) tile ranges per image (default: one tile per image).
            **generate_kwargs: passed to `language_model.generate` (generation_config, do_sample,
                temperature, max_new_tokens, output_scores, return_dict_in_generate, ...).

        Returns:
            What `language_model.generate` returns.
        """
        if image_index is None:
            image_index = torch.arange(input_ids.shape[0], device=input_ids.device)
        vit_embeds = self.extract_feature(pixel_values)
        inputs_embeds = self.build_inputs_embeds(input_ids, vit_embeds, image_index, region_grids, tile_offsets)
        generate_kwargs.setdefault("generation_config", self.generation_config)
        return self.language_model.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **generate_kwargs)

    # --- SAM2 -----------------------------------------------------------------------------
    def get_sam2_features(self, sam_pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """SAM2 image features (finest to coarsest level), `no_memory_embedding` added.

        Unlike `Sam2Model.get_image_embeddings` this keeps gradients when the encoder trains.

        Args:
            sam_pixel_values: (U, 3, S_sam, S_sam).

        Returns:
            Per-level (U, C_l, h_l, w_l) tensors; the last is the decoder's image embedding,
            the others its high-resolution features (already projected by conv_s0 / conv_s1).
        """
        sam = self.grounding_encoder
        sam_pixel_values = sam_pixel_values.to(dtype=sam.dtype)
        maps = list(sam.get_image_features(sam_pixel_values, return_dict=True).fpn_hidden_states)
        maps[-1] = maps[-1] + sam.no_memory_embedding
        count = sam_pixel_values.shape[0]
        return [
            level.permute(1, 2, 0).reshape(count, -1, *size)
            for level, size in zip(maps, sam.backbone_feature_sizes)
        ]

    def decode_sam2_masks(
        self,
        sam_features: list[torch.Tensor],
        image_index: torch.Tensor,
        prompt_embeddings: torch.Tensor,
        multimask_output: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """SAM2 mask decoder with a language prompt embedding per row.

        The sparse prompt is what the published model feeds: the prompt encoder's "no point"
        tokens (a label -1 point plus its padding point) followed by the row's language
        embedding; the dense prompt is `no_mask_embed`. No object-score gate is applied (the
        published language-prompt path has it disabled too, and it would cut gradients);
        `object_score_logits` is returned for callers who want it.

        Args:
            sam_features: `get_sam2_features` output for the unique images.
            image_index: (N,) image of each row.
            prompt_embeddings: (N, D_sam) language embeddings (`text_hidden_fcs` output).
            multimask_output: 3 masks and keep the best by predicted IoU (default: config).

        Returns:
            low_res_logits (N, h, w), iou_scores (N,), object_score_logits (N,).
        """
        sam = self.grounding_encoder
        multimask = self.config.multimask_output if multimask_output is None else multimask_output
        count = prompt_embeddings.shape[0]
        device = prompt_embeddings.device
        image_index = image_index.to(device)
        image_embeddings = sam_features[-1][image_index]
        high_res = [level[image_index] for level in sam_features[:-1]]
        positional = sam.get_image_wide_positional_embeddings().repeat(count, 1, 1, 1)
        points = torch.zeros(count, 1, 1, 2, device=device, dtype=image_embeddings.dtype)
        labels = -torch.ones(count, 1, 1, device=device, dtype=torch.int32)
        sparse, dense = sam.prompt_encoder(input_points=points, input_labels=labels, input_boxes=None, input_masks=None)
        sparse = torch.cat([sparse, prompt_embeddings.to(sparse.dtype)[:, None, None, :]], dim=2)
        masks, iou, _, object_scores = sam.mask_decoder(
            image_embeddings=image_embeddings,
            image_positional_embeddings=positional,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
            high_resolution_features=high_res,
        )
        masks, iou = masks[:, 0], iou[:, 0]  # one prompt per row
        best = iou.argmax(dim=-1)
        rows = torch.arange(count, device=device)
        return masks[rows, best], iou[rows, best], object_scores.reshape(count)


AutoModel.register(Sa2VAConfig, Sa2VAModel)
