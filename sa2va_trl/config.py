"""Recipe dataclasses: `Sa2VAGRPOConfig` (the trainer's settings) and `Sa2VAScriptArguments` (data, model backend).

Both are read by `TrlParser` from a YAML recipe plus CLI overrides (see `sa2va_trl.grpo`). Every field carries a
help string; `__post_init__` refuses inconsistent settings with an error that says how to fix them.

Two loops share every batch (see docs/architecture.md):

- ``mask_to_caption`` (loop 1): region mask -> G sampled captions -> the reverse (EMA) model segments each -> IoU.
- ``caption_to_mask`` (loop 2): caption -> G sampled answers with ``[SEG]`` -> masks -> the reverse model captions
  each mask -> METEOR.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from trl import GRPOConfig, ScriptArguments

from sa2va_trl.data.loaders import FORMATS as DATA_FORMATS
from sa2va_trl.rewards.registry import list_rewards

MASK_TO_CAPTION = "mask_to_caption"
CAPTION_TO_MASK = "caption_to_mask"
LOOPS = (MASK_TO_CAPTION, CAPTION_TO_MASK)
ADVANTAGE_MODES = ("group", "rank", "likelihood")
MODEL_BACKENDS = ("native", "remote")


def _reward_names_help(loop: str, default: list[str]) -> str:
    """Help text listing the registered rewards, built from the registry so it never goes stale."""
    names = ", ".join(sorted(list_rewards()))
    return (
        f"Reward functions scored on the {loop} rows (registered names: {names}; or `package.module:function` for a "
        f"user reward). Rows of the other loop get None from these rewards. Default: {default}."
    )


def _check_reward_names(field_name: str, names: list[str]) -> None:
    known = set(list_rewards())
    for name in names:
        if ":" in name:  # `package.module:function`, resolved when the rewards are built
            continue
        if name not in known:
            raise ValueError(
                f"`{field_name}` names an unknown reward {name!r}. Registered rewards: {sorted(known)}; a user reward "
                "can be given as `package.module:function`."
            )


@dataclass
class Sa2VAGRPOConfig(GRPOConfig):
    """`GRPOConfig` plus the settings of the two Sa2VA cycle loops.

    TRL's fields keep their meaning (`num_generations`, `beta`, `loss_type`, `scale_rewards`, `num_iterations`,
    ...). Differences: `beta` is the KL coefficient to the EMA model (not to a model reloaded from disk), the loop
    weights scale each loop's advantages after group normalisation, and `reward_weights` is filled from the
    per-loop weights (set those instead).
    """

    # Loops
    loops: list[str] = field(
        default_factory=lambda: list(LOOPS),
        metadata={"help": f"Which loops run. Any non-empty subset of {list(LOOPS)}.", "choices": list(LOOPS)},
    )
    mask_to_caption_weight: float = field(
        default=1.0,
        metadata={
            "help": "Weight of loop 1 (mask -> caption -> mask'). It multiplies the loop's advantages after group "
            "normalisation (scaling rewards instead would cancel out in the normalisation)."
        },
    )
    caption_to_mask_weight: float = field(
        default=1.0,
        metadata={"help": "Weight of loop 2 (caption -> mask -> caption'); multiplies the loop's advantages."},
    )

    # Rewards per loop
    mask_to_caption_rewards: list[str] = field(
        default_factory=lambda: ["cycle_iou"],
        metadata={"help": _reward_names_help(MASK_TO_CAPTION, ["cycle_iou"])},
    )
    mask_to_caption_reward_weights: list[float] | None = field(
        default=None,
        metadata={"help": "Weights of `mask_to_caption_rewards` (same length); all 1.0 when unset."},
    )
    caption_to_mask_rewards: list[str] = field(
        default_factory=lambda: ["cycle_meteor"],
        metadata={"help": _reward_names_help(CAPTION_TO_MASK, ["cycle_meteor"])},
    )
    caption_to_mask_reward_weights: list[float] | None = field(
        default=None,
        metadata={"help": "Weights of `caption_to_mask_rewards` (same length); all 1.0 when unset."},
    )

    reward_options: dict | str | None = field(
        default=None,
        metadata={
            "help": "Options of the reward factories, by reward name, e.g. `{reward_net: {model_name_or_path: DIR}}` in "
            "YAML or `'{\"reward_net\": {\"model_name_or_path\": \"DIR\"}}'` on the command line. A reward shared by "
            "both loops gets the same options in both."
        },
    )

    # EMA: the cycle partner and the KL reference
    ema_decay: float = field(
        default=0.999,
        metadata={
            "help": "Decay of the EMA of the trainable weights: ema = decay * ema + (1 - decay) * policy after each "
            "optimizer step, in [0, 1). The EMA model is the reverse model of both loops and the KL reference (with "
            "beta > 0); 0.0 follows the policy."
        },
    )
    ema_warmup_steps: int = field(
        default=0,
        metadata={"help": "Optimizer steps during which the EMA decay ramps up linearly from 0 to `ema_decay` (0: none)."},
    )
    ema_save_model: bool = field(
        default=False,
        metadata={
            "help": "Also write the EMA as a loadable model (`ema_model/`: weights, or LoRA adapters, and the "
            "tokenizer) into every checkpoint, and push it with each checkpoint push. The exact-resume EMA state is "
            "in every checkpoint either way, and the final `output_dir/ema_model/` is always written."
        },
    )
    beta: float = field(
        default=0.04,
        metadata={"help": "KL coefficient to the EMA reference model (TRL's `beta`); 0.0 disables the KL term."},
    )

    # Advantages
    advantage_mode: str = field(
        default="group",
        metadata={
            "help": "`group`: TRL's advantages ((r - group mean) / group std, see `scale_rewards`). `rank`: each "
            "reward is replaced by its rank inside its group, centred and scaled to [-1, 1] (ties share a rank), "
            "which is robust to reward scale and outliers (seed 003 compared both). `likelihood`: (r - group mean) / "
            "group mean, the gradient of log E[r] per prompt (rewards >= 0): prompts the model rarely gets right weigh "
            "more, as in supervised log-loss.",
            "choices": list(ADVANTAGE_MODES),
        },
    )
    negative_advantage_weight: float = field(
        default=1.0,
        metadata={
            "help": "Multiplies the negative advantages (after `advantage_mode` and before the loop weights). 1.0 is "
            "GRPO; 0.0 learns only from the samples that beat their group (rejection-sampling fine-tuning with a "
            "group baseline). On the tiny shapes world with a position oracle, signed advantages lowered held-out "
            "position accuracy (0.52 -> 0.48) where learning from the better samples alone raised it (-> 0.54; "
            "`benchmarks/policy_gradient_probe.py`)."
        },
    )

    # Optimizer
    text_hidden_fcs_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Peak learning rate of `text_hidden_fcs` (its own optimizer group; the scheduler shapes it like "
            "`learning_rate`). Unset: `learning_rate`. A fast projection beside a slow LLM lets loop 2 fix which "
            "object `[SEG]` points at without moving the captions (measured: docs/tiny_world_experiments.md)."
        },
    )

    # Stochastic mask action (loop 2)
    mask_action: bool = field(
        default=True,
        metadata={
            "help": "Loop 2 samples the SAM2 prompt embedding e ~ N(mu, sigma^2 I) around mu = text_hidden_fcs([SEG] "
            "state), decodes the mask from e, and adds the Gaussian log-density of e (divided by the dimension D, so "
            "the action weighs like one token in ratios and KL) to the log-prob of the [SEG] token. The [SEG] state "
            "and text_hidden_fcs then get policy gradient even when all G texts are identical. Default on: on the "
            "tiny model, groups of identical [SEG] states had IoU-reward std 0 in 36/36 groups without it and > 0 "
            "in 36/36 with it (sigma 0.1), mean IoU unchanged; not yet measured on a warm-started model."
        },
    )
    mask_action_sigma: float = field(
        default=0.1,
        metadata={
            "help": "Standard deviation of the mask action, in the units of the SAM2 prompt embedding (the log shows "
            "`mask_action/mu_rms`, the scale of mu, to compare with). Keep the per-step change of mu (set by the "
            "learning rate) well below sigma."
        },
    )

    mask_action_sigma_relative: bool = field(
        default=False,
        metadata={
            "help": "Scale the mask action's standard deviation by each sample's rms(mu): s = mask_action_sigma * "
            "rms(mu). With a fixed sigma the policy can gain reward by growing |mu| until the noise stops mattering, "
            "which sharpens the sampled masks without improving the greedy one."
        },
    )
    mask_pixel_action: bool = field(
        default=False,
        metadata={
            "help": "Loop 2 samples every pixel of the mask from Bernoulli(sigmoid(logit / mask_pixel_temperature)) "
            "of the SAM2 decoder's logits (upsampled to the image), and adds the mean per-pixel log-probability to "
            "the log-prob of the [SEG] token. This is the only way the mask decoder itself gets policy gradient (the "
            "prompt action reaches text_hidden_fcs and the LLM only). The greedy mask is its mode. See "
            "`sa2va_trl.mask_actions`."
        },
    )
    mask_pixel_temperature: float = field(
        default=1.0,
        metadata={"help": "Temperature of the pixel action: above 1 flips more boundary pixels (more exploration)."},
    )
    mask_pixel_temperature_relative: bool = field(
        default=False,
        metadata={
            "help": "Scale the pixel action's temperature by each mask's mean |logit| (then `mask_pixel_temperature` "
            "is in those units, e.g. 0.1). With a fixed temperature the decoder can gain reward by scaling its logits "
            "up, so fewer pixels flip, without a better greedy mask (measured: flips halved, held-out IoU fell)."
        },
    )

    # Sampling
    per_sample_seeds: bool = field(
        default=False,
        metadata={
            "help": "Draw each sample's tokens and mask action from its own random generator, seeded from (`seed`, "
            "the step, the sample's position in the global generation batch), instead of the process's global RNG. "
            "A sample then depends only on the weights and its row, not on how the generation batch is split over "
            "processes or batched: a multi-process (DDP / ZeRO-2 / ZeRO-3) run samples what a single-process run "
            "with the same global batch samples, and a resumed run what the uninterrupted run sampled. Costs one "
            "random number per vocabulary entry per sample and token."
        },
    )

    # Logging
    sample_overlay_steps: int = field(
        default=0,
        metadata={
            "help": "Every this many steps, log a few rollouts as images (region, predicted mask, texts) to the "
            "enabled TensorBoard / W&B / trackio (`sa2va_trl.callbacks.SampleOverlayCallback`); 0 disables it."
        },
    )

    # Overrides of TRL defaults that do not suit this model
    activation_checkpointing: bool | None = field(
        default=False,
        metadata={"help": "Activation (gradient) checkpointing; off by default (the adapter's forward is small).",
                  "nargs": "?", "const": True},
    )
    max_completion_length: int | None = field(
        default=64,
        metadata={"help": "Maximum number of tokens of a sampled caption or segmentation answer."},
    )

    def __post_init__(self):
        super().__post_init__()
        self._check_loops()
        self._check_rewards()
        self._check_ema_and_actions()
        self._check_unsupported()

    def _check_loops(self) -> None:
        if isinstance(self.loops, str):
            self.loops = [name.strip() for name in self.loops.split(",") if name.strip()]
        if not self.loops:
            raise ValueError(f"`loops` is empty: choose one or both of {list(LOOPS)}.")
        for loop in self.loops:
            if loop not in LOOPS:
                raise ValueError(f"`loops` has unknown loop {loop!r}; choose from {list(LOOPS)}.")
        for name in ("mask_to_caption_weight", "caption_to_mask_weight"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"`{name}` must be a finite number >= 0, got {value}.")
        if self.advantage_mode not in ADVANTAGE_MODES:
            raise ValueError(f"`advantage_mode` must be one of {list(ADVANTAGE_MODES)}, got {self.advantage_mode!r}.")
        if not (math.isfinite(self.negative_advantage_weight) and 0.0 <= self.negative_advantage_weight <= 1.0):
            raise ValueError(f"`negative_advantage_weight` must lie in [0, 1] (1 is GRPO), got {self.negative_advantage_weight}.")

    def _check_rewards(self) -> None:
        if isinstance(self.reward_options, str):
            try:
                self.reward_options = json.loads(self.reward_options)
            except json.JSONDecodeError as error:
                raise ValueError(f"`reward_options` is not valid JSON ({error}): {self.reward_options!r}") from None
        options = self.reward_options or {}
        if not isinstance(options, dict) or not all(isinstance(v, dict) for v in options.values()):
            raise ValueError("`reward_options` maps reward names to option mappings, e.g. "
                             f"{{'reward_net': {{'model_name_or_path': 'DIR'}}}}; got {self.reward_options!r}.")
        named = {name for loop in LOOPS for name in self.loop_rewards(loop)[0]}
        unused = sorted(set(options) - named)
        if unused:
            raise ValueError(f"`reward_options` names {unused}, which neither loop's rewards name (they are "
                             f"{sorted(named)}): fix the name or drop the entry.")
        for loop in self.loops:
            names, weights = self.loop_rewards(loop)
            if not names:
                raise ValueError(
                    f"Loop {loop!r} runs but `{loop}_rewards` is empty: name at least one reward, or drop the loop "
                    "from `loops`."
                )
            _check_reward_names(f"{loop}_rewards", names)
            if len(weights) != len(names):
                raise ValueError(
                    f"`{loop}_reward_weights` has {len(weights)} values for {len(names)} rewards {names}: give one "
                    "weight per reward."
                )
        if self.reward_weights is not None and self.reward_weights != self.flat_reward_weights():
            raise ValueError(
                "Set the per-loop `mask_to_caption_reward_weights` / `caption_to_mask_reward_weights`, not TRL's "
                "`reward_weights` (it is filled from them)."
            )

    def _check_ema_and_actions(self) -> None:
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"`ema_decay` must lie in [0, 1), got {self.ema_decay} (seed default: 0.999).")
        if self.ema_warmup_steps < 0:
            raise ValueError(f"`ema_warmup_steps` must be >= 0, got {self.ema_warmup_steps}.")
        if self.sample_overlay_steps < 0:
            raise ValueError(f"`sample_overlay_steps` must be >= 0 (0 disables), got {self.sample_overlay_steps}.")
        if self.beta < 0:
            raise ValueError(f"`beta` must be >= 0, got {self.beta}.")
        lr = self.text_hidden_fcs_learning_rate
        if lr is not None and not (lr >= 0 and math.isfinite(lr)):
            raise ValueError(f"`text_hidden_fcs_learning_rate` must be a finite number >= 0, got {lr}.")
        if self.mask_action and not (self.mask_action_sigma > 0 and math.isfinite(self.mask_action_sigma)):
            raise ValueError(
                f"`mask_action_sigma` must be > 0 with `mask_action` on, got {self.mask_action_sigma}; or set "
                "`mask_action: false`."
            )
        if self.mask_pixel_action and not (self.mask_pixel_temperature > 0 and math.isfinite(self.mask_pixel_temperature)):
            raise ValueError(f"`mask_pixel_temperature` must be > 0, got {self.mask_pixel_temperature}.")

    @property
    def any_mask_action(self) -> bool:
        """Whether loop 2's masks are sampled (prompt or pixel action), i.e. carry a log-probability."""
        return bool(self.mask_action or self.mask_pixel_action)

    def _check_unsupported(self) -> None:
        if self.sync_ref_model:
            raise ValueError(
                "`sync_ref_model` is not used here: the EMA model is the KL reference (see `ema_decay`). Remove "
                "`sync_ref_model` from the recipe."
            )
        if self.use_vllm:
            raise ValueError("vLLM cannot run Sa2VA models: set `use_vllm: false` (sampling runs through the adapter).")

    def __getstate__(self):
        """Pickles of the config carry no Hub token. transformers writes `torch.save(args)` as `training_args.bin`
        into every checkpoint and `output_dir`, and pushes both to the Hub, so the token given as `hub_token` would
        otherwise be uploaded with them (a copy made with `copy.deepcopy` has no token either: it falls back to
        `HF_TOKEN` / the saved login, the recommended way to authenticate)."""
        state = self.__dict__.copy()
        if state.get("hub_token") is not None:
            state["hub_token"] = None
        return state

    def loop_rewards(self, loop: str) -> tuple[list[str], list[float]]:
        """(reward names, weights) of one loop, weights defaulting to 1.0."""
        names = list(getattr(self, f"{loop}_rewards") or [])
        weights = getattr(self, f"{loop}_reward_weights")
        weights = [1.0] * len(names) if weights is None else [float(w) for w in weights]
        return names, weights

    def flat_reward_weights(self) -> list[float]:
        """TRL's `reward_weights`: the active loops' weights, in `LOOPS` order then reward order."""
        return [w for loop in LOOPS if loop in self.loops for w in self.loop_rewards(loop)[1]]

    def loop_weight(self, loop: str) -> float:
        return float(getattr(self, f"{loop}_weight"))


@dataclass
class Sa2VAScriptArguments(ScriptArguments):
    """Data source and model backend. TRL's `dataset_name` is the dataset path (or Hub id) here."""

    dataset_format: str = field(
        default="synthetic",
        metadata={
            "help": "Format of `dataset_name`: `synthetic` (the shapes world built in memory; `dataset_name` unused), "
            "or a format of `sa2va_trl.data.load_rows`: `auto`, `gar` (Grasp-Any-Region arrow), `sa2va_json`, "
            "`annotations_json`, `hf` (any dataset mapped with `dataset_column_map`).",
            "choices": ["synthetic", *DATA_FORMATS],
        },
    )
    dataset_column_map: dict[str, str] | None = field(
        default=None,
        metadata={"help": "`{our column: their column}` for `hf` sources (keys among img, region_mask, caption)."},
    )
    synthetic_images: int = field(
        default=64,
        metadata={"help": "Training images of the synthetic shapes world (1-3 regions each); evaluation gets 1/4."},
    )
    max_train_rows: int | None = field(
        default=None, metadata={"help": "Keep at most this many training rows (before loop expansion)."}
    )
    max_eval_rows: int | None = field(default=None, metadata={"help": "Keep at most this many evaluation rows."})
    eval_fraction: float = field(
        default=0.0,
        metadata={"help": "When the source has no `dataset_test_split`, hold out this fraction of rows for evaluation."},
    )
    skip_bad_rows: bool = field(
        default=False,
        metadata={
            "help": "Drop rows that fail validation while loading (each is logged with its source and index). When "
            "false a bad row stops the run with an error that names it."
        },
    )
    model_backend: str = field(
        default="native",
        metadata={
            "help": "`native`: the transformers-built Sa2VA of this package (`builtin:tiny`, `builtin:tiny-warm`, a "
            "checkpoint converted with `python -m sa2va_trl.convert SRC DST`, or a directory this package saved), "
            "driven by `Sa2VAPolicy`. `remote`: a published InternVL-based trust_remote_code checkpoint "
            "(`ByteDance/Sa2VA-1B` / `-4B` / `-InternVL3-*`, a local directory or Hub id) driven as it is by "
            "`RemoteSa2VAPolicy`; needs `trust_remote_code: true`, and its code imports torchvision and timm. The "
            "`train_*` parts map to each backend's module names (`sa2va_trl.grpo.PART_MODULES`).",
            "choices": list(MODEL_BACKENDS),
        },
    )
    min_region_cells: int | None = field(
        default=None,
        metadata={
            "help": "Smallest region, in cells of the model's token grid (16 x 16 for the published models), shown as a "
            "visual prompt; smaller regions skip loop 1 (logged). Unset: the backend's own value (native: the model "
            "config's; remote: 4, as the published training data)."
        },
    )
    max_dynamic_patch: int | None = field(
        default=None,
        metadata={
            "help": "Most InternVL tiles per image (plus a thumbnail when there are several); each tile costs 256 tokens "
            "on the published models. Unset: the backend's own value (native: the model config's; remote: 12, as the "
            "published inference)."
        },
    )
    train_mlp1: bool = field(default=True, metadata={"help": "Train the vision-language projector `mlp1` (with LoRA: LoRA adapters on its linear layers)."})
    train_text_hidden_fcs: bool = field(
        default=True, metadata={"help": "Train `text_hidden_fcs` ([SEG] state -> SAM2 prompt embedding)."}
    )
    train_mask_decoder: bool = field(
        default=True,
        metadata={"help": "Train the SAM2 mask decoder (its only policy gradient comes from `mask_pixel_action`)."},
    )
    train_language_model: bool = field(
        default=True,
        metadata={
            "help": "Without LoRA (`use_peft: false`): train the full language model. With LoRA only the adapters "
            "train. The vision encoder and SAM2 image encoder always stay frozen."
        },
    )

    save_merged_model: bool = field(
        default=False,
        metadata={
            "help": "With LoRA (`use_peft: true`): at the end also write the policy and the EMA model with the "
            "adapters merged into the base weights, as standalone models `merged_model/` and `ema_merged_model/` "
            "(pushed with the rest). Any saved adapter folder can be merged later: `python -m sa2va_trl.merge`."
        },
    )

    def __post_init__(self):
        if self.model_backend not in MODEL_BACKENDS:
            raise ValueError(f"`model_backend` must be one of {list(MODEL_BACKENDS)}, got {self.model_backend!r}.")
        for name in ("min_region_cells", "max_dynamic_patch"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"`{name}` must be >= 1 or unset (the backend's own value), got {value}.")
        formats = ["synthetic", *DATA_FORMATS]
        if self.dataset_format not in formats:
            raise ValueError(f"`dataset_format` must be one of {formats}, got {self.dataset_format!r}.")
        if self.dataset_format != "synthetic" and not self.dataset_name:
            raise ValueError(f"`dataset_format: {self.dataset_format}` needs `dataset_name` (a path or Hub id).")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"`eval_fraction` must lie in [0, 1), got {self.eval_fraction}.")
        for name in ("max_train_rows", "max_eval_rows"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"`{name}` must be a positive number of rows or unset, got {value}.")
