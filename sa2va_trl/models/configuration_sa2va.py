"""Sa2VAConfig: the configuration of the native Sa2VA backend (model_type "sa2va_trl_native").

A composite config like transformers' own multimodal ones: an InternVL vision tower config, any
causal-LM config (Qwen2 by default) and a SAM2 config, plus the few Sa2VA fields. Every size the
model uses derives from here (tile size, tokens per tile, token grid, SAM2 input size, SAM2
prompt dim), so a tiny config runs on a laptop CPU and a full one matches the published model.
"""

from __future__ import annotations

from transformers import AutoConfig, InternVLVisionConfig, PreTrainedConfig, Sam2Config
from transformers.configuration_utils import SubConfigSpec

MODEL_TYPE = "sa2va_trl_native"

# Chat templates of the published model (xtuner names), keyed by `config.template`.
# INSTRUCTION wraps one user turn and opens the assistant turn; STOP_WORDS end a reply.
CHAT_TEMPLATES: dict[str, dict[str, object]] = {
    "qwen_chat": {
        "SYSTEM": "<|im_start|>system\n{system}<|im_end|>\n",
        "INSTRUCTION": "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
        "SUFFIX": "<|im_end|>",
        "STOP_WORDS": ["<|im_end|>", "<|endoftext|>"],
    },
    "internlm2_chat": {
        "SYSTEM": "<|im_start|>system\n{system}<|im_end|>\n",
        "INSTRUCTION": "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
        "SUFFIX": "<|im_end|>",
        "STOP_WORDS": ["<|im_end|>"],
    },
    "phi3_chat": {
        "SYSTEM": "<|system|>\n{system}<|end|>\n",
        "INSTRUCTION": "<|user|>\n{input}<|end|>\n<|assistant|>\n",
        "SUFFIX": "<|end|>",
        "STOP_WORDS": ["<|end|>"],
    },
}

# Special tokens of the published model.
IMG_START_TOKEN = "<img>"
IMG_END_TOKEN = "</img>"
IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"
VP_START_TOKEN = "<vp>"
VP_END_TOKEN = "</vp>"
SEG_TOKEN = "[SEG]"
IMAGE_PLACEHOLDER = "<image>"


class Sa2VAConfig(PreTrainedConfig):
    r"""Configuration of the native Sa2VA model.

    Args:
        vision_config: InternVL vision tower config (`InternVLVisionConfig` or dict). Its
            `image_size` is the tile size, `patch_size` the ViT patch.
        llm_config: causal-LM config (any `AutoConfig` model type; default "qwen2").
        sam2_config: SAM2 config (`Sam2Config` or dict). Its vision backbone `image_size` is
            the SAM2 input size, its prompt-encoder `hidden_size` the prompt dim.
        downsample_ratio: pixel-shuffle ratio (0.5: 2 x 2 patches -> one token, channels x 4).
        template: chat-template name, a key of `CHAT_TEMPLATES`.
        min_region_cells: smallest region accepted, in token-grid cells (published data: 4).
        multimask_output: SAM2 decoder predicts 3 masks and the best by predicted IoU is kept
            (True, as the published model); False uses the single-mask output token.
        mask_threshold: logit threshold for the boolean masks (0 = sigmoid 0.5).
        img_context_token_id, seg_token_id: token ids, set from the tokenizer.
        dynamic_image_size: InternVL dynamic tiling (the published model uses it: set True when
            mapping its weights); False (default) gives one whole-image tile per image.
        min_dynamic_patch, max_dynamic_patch: bounds on the tile grid (published: 1, 12).
        use_thumbnail: add a whole-image tile after the grid tiles (region tokens come from it).
    """

    model_type = MODEL_TYPE
    sub_configs_defaults = {
        "vision_config": InternVLVisionConfig,
        "llm_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2"),
        "sam2_config": Sam2Config,
    }

    vision_config: dict | PreTrainedConfig | None = None
    llm_config: dict | PreTrainedConfig | None = None
    sam2_config: dict | PreTrainedConfig | None = None
    downsample_ratio: float = 0.5
    template: str = "qwen_chat"
    min_region_cells: int = 4
    multimask_output: bool = True
    mask_threshold: float = 0.0
    img_context_token_id: int | None = None
    seg_token_id: int | None = None
    tie_word_embeddings: bool = False
    dynamic_image_size: bool = False
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 12
    use_thumbnail: bool = True

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.template not in CHAT_TEMPLATES:
            raise ValueError(f"template {self.template!r} unknown; choose one of {sorted(CHAT_TEMPLATES)}")
        tile, patch = self.vision_config.image_size[0], self.vision_config.patch_size[0]
        if tile % patch:
            raise ValueError(f"vision image_size {tile} is not a multiple of patch_size {patch}")
        side = tile // patch
        if abs(side * self.downsample_ratio - round(side * self.downsample_ratio)) > 1e-6:
            raise ValueError(f"{side} patches per side cannot be pixel-shuffled by {self.downsample_ratio}")
        if not 1 <= self.min_dynamic_patch <= self.max_dynamic_patch:
            raise ValueError(
                f"need 1 <= min_dynamic_patch <= max_dynamic_patch, got {self.min_dynamic_patch}, {self.max_dynamic_patch}"
            )
        if self.min_region_cells < 1:
            raise ValueError(f"min_region_cells must be >= 1, got {self.min_region_cells}")

    # Derived sizes -------------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        """The vision tile size (pixels per side)."""
        return int(self.vision_config.image_size[0])

    @property
    def patch_size(self) -> int:
        return int(self.vision_config.patch_size[0])

    @property
    def token_grid_size(self) -> int:
        """Vision tokens per side of a tile after pixel shuffle (16 for the published model)."""
        return int(round(self.image_size // self.patch_size * self.downsample_ratio))

    @property
    def num_image_token(self) -> int:
        """Vision tokens per tile (256 for the published model)."""
        return self.token_grid_size**2

    @property
    def sam2_image_size(self) -> int:
        """SAM2 input size (1024 for the published model)."""
        size = self.sam2_config.vision_config.backbone_config.image_size
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    @property
    def sam_prompt_dim(self) -> int:
        """Width of SAM2 prompt embeddings (the output of `text_hidden_fcs`)."""
        return int(self.sam2_config.prompt_encoder_config.hidden_size)


AutoConfig.register(MODEL_TYPE, Sa2VAConfig)
