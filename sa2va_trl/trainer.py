"""`Sa2VAGRPOTrainer`: TRL's GRPOTrainer driving the two Sa2VA cycle loops through the policy adapter.

One generation batch mixes rows of both loops (the `task` column, see `expand_loops`):

- ``mask_to_caption``: the policy samples G captions of the row's region; the loop's rewards (e.g. `cycle_iou`:
  the reverse model segments each caption, IoU with the region) score them.
- ``caption_to_mask``: the policy samples G answers to "Please segment {caption}"; each `[SEG]` state goes through
  `text_hidden_fcs` (optionally perturbed: the stochastic mask action) and the SAM2 decoder into a mask, passed to
  the rewards as the `pred_mask` column (e.g. `cycle_meteor`: the reverse model captions each mask, METEOR with the
  caption).

The EMA of the trainable weights (`sa2va_trl.ema.EMACallback`) is both the reverse model of the cycle rewards (the
`reverse_policy` column, an `EMAReversePolicy`) and, with `beta > 0`, the KL reference (its log-probs are computed
with the EMA weights swapped in, under no_grad). Group advantages, the clipped loss, loss types, logging and
checkpointing stay TRL's.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
import torch
import transformers
from accelerate.utils import gather_object
from transformers import GenerationConfig, PreTrainedTokenizerBase
from trl import GRPOTrainer

from sa2va_trl.checkpointing import CheckpointingMixin
from sa2va_trl.config import CAPTION_TO_MASK, LOOPS, MASK_TO_CAPTION, Sa2VAGRPOConfig
from sa2va_trl.ema import EMACallback
from sa2va_trl.optim import module_parameter_ids, split_param_groups
from sa2va_trl.mask_actions import (
    flip_fraction,
    pixel_action_logprob,
    prompt_action_logprob,
    relative_pixel_temperatures,
    sample_pixel_action,
    sample_prompt_action,
)
from sa2va_trl.models.adapter import Sa2VAPolicy
from sa2va_trl.models.image_processing import Sa2VAInputError, mask_to_token_grid
from sa2va_trl.models.remote import policy_class_for
from sa2va_trl.rewards.checks import checked_reward, reward_name
from sa2va_trl.rewards.errors import RewardError
from sa2va_trl.rewards.masks import as_mask

logger = logging.getLogger(__name__)

TASK_COLUMN = "task"
ROW_ID_COLUMN = "row_id"
SEG_TOKEN = "[SEG]"
# The only key this trainer adds to TRL's buffered batch: which sample of the current generation each row is. A
# (B,) tensor, so it follows TRL's shuffle and split; everything else is looked up in the generation record.
SAMPLE_INDEX_KEY = "sa2va_sample_index"

# Lowest tempered log-density of a mask action (nats); see `_add_mask_action_logdensity`.

#: TRL 1.16 methods this class overrides; `tests/test_trainer_overrides.py` fails if TRL renames one of them.
OVERRIDDEN_TRL_METHODS = (
    "_generate_and_score_completions",
    "_calculate_rewards",
    "_get_per_token_logps_and_entropies",
    "_compute_loss",
)


class Sa2VARowError(RuntimeError):
    """A reward or a rollout failed on a dataset row; the message names the reward, the row and its source."""


# --- dataset preparation ------------------------------------------------------------------------------------------


def expand_loops(
    rows: datasets.Dataset,
    loops: Sequence[str] = LOOPS,
    region_fits: Callable[[Any], bool] | None = None,
) -> datasets.Dataset:
    """One training row per (schema row, applicable loop), with the `task`, `row_id` and `prompt` columns.

    Loop 1 (``mask_to_caption``) applies to rows whose region the model can show as a visual prompt
    (`region_fits(region_mask)`, default: all); loop 2 (``caption_to_mask``) to rows with a non-empty caption (the
    text it segments). Images are not re-encoded: rows are selected by index.

    Args:
        rows: a dataset in the row schema (`img`, `region_mask`, `caption`, `source_id`, `region_index`).
        loops: the loops that run.
        region_fits: predicate on a row's `region_mask` (e.g. "covers enough cells of the token grid").

    Returns:
        The expanded dataset. `prompt` is a short human-readable tag (TRL requires the column; the adapter builds
        the real prompt from the image and the region or caption).

    Example:
        >>> import datasets
        >>> rows = datasets.Dataset.from_dict({"caption": ["a red circle", None], "source_id": ["a", "b"],
        ...                                    "region_index": [0, 0], "region_mask": [None, None], "img": [None, None]})
        >>> list(expand_loops(rows)["task"])
        ['mask_to_caption', 'caption_to_mask', 'mask_to_caption']
    """
    for loop in loops:
        if loop not in LOOPS:
            raise ValueError(f"Unknown loop {loop!r}; choose from {list(LOOPS)}.")
    captions = rows["caption"] if "caption" in rows.column_names else [None] * len(rows)
    fits = [True] * len(rows)
    if MASK_TO_CAPTION in loops and region_fits is not None:
        fits = []
        for i, mask in enumerate(rows["region_mask"]):
            try:
                fits.append(bool(region_fits(mask)))
            except Exception as e:
                raise ValueError(f"row {i}, field 'region_mask': unreadable region mask ({e})") from e
        if not all(fits):
            logger.warning(
                "%d of %d regions are too small for the model's visual prompt and skip the mask_to_caption loop.",
                fits.count(False), len(fits),
            )
    indices, tasks = [], []
    for i, caption in enumerate(captions):
        if MASK_TO_CAPTION in loops and fits[i]:
            indices.append(i)
            tasks.append(MASK_TO_CAPTION)
        if CAPTION_TO_MASK in loops and isinstance(caption, str) and caption.strip():
            indices.append(i)
            tasks.append(CAPTION_TO_MASK)
    if not indices:
        raise ValueError(
            f"No training rows for loops {list(loops)}: the caption_to_mask loop needs rows with a caption, and the "
            f"dataset has {len(rows)} rows."
        )
    expanded = rows.select(indices)
    sources = expanded["source_id"] if "source_id" in expanded.column_names else [""] * len(expanded)
    regions = expanded["region_index"] if "region_index" in expanded.column_names else [0] * len(expanded)
    prompts = [f"[{t}] {s}#{r}" for t, s, r in zip(tasks, sources, regions)]
    for name in (TASK_COLUMN, ROW_ID_COLUMN, "prompt"):
        if name in expanded.column_names:
            expanded = expanded.remove_columns(name)
    expanded = expanded.add_column(TASK_COLUMN, tasks)
    expanded = expanded.add_column(ROW_ID_COLUMN, list(range(len(expanded))))
    return expanded.add_column("prompt", prompts)


# --- rewards bound to a loop ------------------------------------------------------------------------------------------


class LoopReward:
    """A reward applied to the rows of one loop only (None for the other rows), with errors naming batch rows.

    TRL calls every reward on every row; a batch mixes both loops, so a loop-1 reward (e.g. `cycle_iou`) must not
    score loop-2 rows. This wrapper calls the reward on its loop's rows (every per-row column sliced alike) and
    returns None elsewhere. Its `__name__` is ``"<loop>/<reward>"`` (logged as ``rewards/<loop>/<reward>/mean``).

    Args:
        reward: a TRL reward function (wrapped with `checked_reward` for output validation).
        loop: the loop whose rows it scores, or None for every row.
        name: the reward's name (defaults to its `__name__`).
    """

    def __init__(self, reward: Callable, loop: str | None, name: str | None = None):
        base = name or reward_name(reward)
        self.reward = checked_reward(reward, name=base)
        self.loop = loop
        self.__name__ = base if loop is None else f"{loop}/{base}"

    def __call__(self, prompts=None, completions=None, completion_ids=None, **columns):
        n = len(completions)
        tasks = columns.get(TASK_COLUMN)
        if self.loop is None:
            rows = list(range(n))
        elif tasks is None:
            raise ValueError(
                f"reward {self.__name__!r} needs the `{TASK_COLUMN}` column to find its loop's rows; build the "
                "training set with `sa2va_trl.trainer.expand_loops`."
            )
        else:
            rows = [i for i, task in enumerate(tasks) if task == self.loop]
        out: list[float | None] = [None] * n
        if not rows:
            return out

        def take(values):
            return [values[i] for i in rows]

        def log_extra(column, values, _log=columns.get("log_extra")):
            if _log is not None:  # scatter back to the whole batch so TRL's completion table stays aligned
                full = [None] * n
                for i, v in zip(rows, values):
                    full[i] = v
                _log(column, full)

        sub = {}
        for key, value in columns.items():
            per_row = isinstance(value, (list, tuple)) and len(value) == n
            sub[key] = take(value) if per_row else value
        if "log_extra" in columns:
            sub["log_extra"] = log_extra
        try:
            values = self.reward(prompts=take(prompts), completions=take(completions),
                                 completion_ids=take(completion_ids), **sub)
        except RewardError as e:
            if e.row is not None and 0 <= e.row < len(rows):
                e.row = rows[e.row]  # sub-batch row -> batch row
            e.reward = self.__name__
            e.args = (e._render(),)
            raise
        for i, value in zip(rows, values):
            out[i] = value
        return out

    def __repr__(self) -> str:
        return f"LoopReward({self.reward!r}, loop={self.loop!r})"


def bind_rewards_to_loops(reward_funcs: dict[str, list[Callable]] | list[Callable]) -> list[LoopReward]:
    """`{loop: [reward, ...]}` -> a flat list of `LoopReward` (loop order, then reward order); a plain list of
    rewards applies each to every row."""
    if isinstance(reward_funcs, dict):
        unknown = set(reward_funcs) - set(LOOPS)
        if unknown:
            raise ValueError(f"reward_funcs has unknown loops {sorted(unknown)}; use {list(LOOPS)}.")
        return [LoopReward(fn, loop) for loop in LOOPS for fn in reward_funcs.get(loop, [])]
    if callable(reward_funcs):
        reward_funcs = [reward_funcs]
    return [fn if isinstance(fn, LoopReward) else LoopReward(fn, None) for fn in reward_funcs]


# --- advantages -------------------------------------------------------------------------------------------------------


def likelihood_advantages(rewards: torch.Tensor, num_generations: int, eps: float = 1e-6) -> torch.Tensor:
    """Advantages (r - group mean) / group mean: the policy gradient of log E[r] per prompt instead of E[r].

    For a 0/1 reward this is the gradient of log P(right) (the log-loss of supervised learning, with the model's own
    right answers as targets): a prompt answered right 1 time in 4 pulls 3 times as hard as one answered right 3 times
    in 4, where GRPO's std scaling weighs both alike and lets hard prompts drift to confidently wrong answers. Rewards
    must be >= 0. NaN rewards (unscorable samples) get 0 and are left out of the mean; a group whose mean is <= `eps`
    (nothing right) gets 0 everywhere.

    Args:
        rewards: (N,) rewards, groups of `num_generations` contiguous samples.
        num_generations: G.

    Returns:
        (N,) advantages.

    Raises:
        ValueError: a reward is negative (its group's mean would no longer be a probability-like scale).

    Example:
        >>> likelihood_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0]), 4).tolist()
        [3.0, -1.0, -1.0, -1.0, 0.3333333432674408, 0.3333333432674408, 0.3333333432674408, -1.0]
    """
    groups = rewards.view(-1, num_generations)
    valid = ~torch.isnan(groups)
    if (groups[valid] < 0).any():
        position = int(torch.nonzero(torch.nan_to_num(rewards, nan=0.0) < 0)[0])
        raise ValueError(
            f"advantage_mode 'likelihood' needs rewards >= 0, but sample {position} of the generation batch has "
            f"{rewards[position].item():.4g}; use `group` or `rank`, or shift the reward"
        )
    values = torch.where(valid, groups, torch.zeros_like(groups))
    mean = values.sum(dim=1, keepdim=True) / valid.sum(dim=1, keepdim=True).clamp(min=1)
    out = torch.where(valid & (mean > eps), (values - mean) / mean.clamp(min=eps), torch.zeros_like(groups))
    return out.view(-1)


def rank_advantages(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """Rank-based advantages: each reward's rank inside its group, centred and scaled to [-1, 1].

    Ties share their mean rank; NaN rewards (unscorable samples) get 0 and are left out of the ranking; a group whose
    rewards are all equal gets 0 everywhere.

    Args:
        rewards: (N,) rewards, groups of `num_generations` contiguous samples.
        num_generations: G.

    Returns:
        (N,) advantages.

    Example:
        >>> rank_advantages(torch.tensor([0.1, 0.9, 0.5, 0.5]), 4).tolist()
        [-1.0, 1.0, 0.0, 0.0]
    """
    groups = rewards.view(-1, num_generations)
    out = torch.zeros_like(groups)
    for g in range(groups.shape[0]):
        valid = ~torch.isnan(groups[g])
        values = groups[g][valid]
        k = values.numel()
        if k < 2:
            continue
        # mean rank of ties: rank = (#less) + (#equal - 1) / 2
        less = (values.unsqueeze(0) < values.unsqueeze(1)).sum(dim=1).float()
        equal = (values.unsqueeze(0) == values.unsqueeze(1)).sum(dim=1).float()
        ranks = less + (equal - 1) / 2
        out[g][valid] = (ranks - (k - 1) / 2) / ((k - 1) / 2)
    return out.view(-1)


# --- the reverse (EMA) model handle -----------------------------------------------------------------------------------


class EMAReversePolicy:
    """The reverse model of the cycle rewards: the policy adapter with the EMA weights swapped in for each call.

    It offers the adapter's greedy `caption(images, region_masks)` and `segment(images, texts)`; the trainer passes
    it to the rewards as the `reverse_policy` column. Without an EMA shadow (before training starts) it is the policy.
    Each call runs inside `trainer.reverse_model()`; the trainer holds that context around all reward calls of a
    step (under ZeRO-3 it is collective: the EMA slices swapped in, then the whole model gathered once, so the
    rank-dependent reverse calls issue no collective).

    Degenerate inputs are the policy's own failures, not bad data, so they score lowest instead of stopping the run:
    an empty mask, or a region too small for the token grid, gets the caption ""; an empty text gets an all-False mask.
    """

    def __init__(self, trainer: "Sa2VAGRPOTrainer"):
        self._trainer = trainer

    @property
    def policy(self) -> Sa2VAPolicy:
        return self._trainer.policy

    @torch.no_grad()
    def caption(self, images, region_masks, **kwargs) -> list[str]:
        masks = [np.asarray(as_mask(m), dtype=bool) for m in region_masks]
        keep = [i for i, m in enumerate(masks) if m.any()]
        out = [""] * len(masks)
        with self._trainer.reverse_model():
            for i, text in zip(keep, self._call_skipping_bad(self.policy.caption, images, masks, keep, **kwargs)):
                out[i] = text if text is not None else ""
        return out

    @torch.no_grad()
    def segment(self, images, texts, **kwargs) -> list[np.ndarray]:
        keep = [i for i, t in enumerate(texts) if isinstance(t, str) and t.strip()]
        out = [np.zeros(_image_hw(image), dtype=bool) for image in images]
        with self._trainer.reverse_model():
            for i, mask in zip(keep, self._call_skipping_bad(self.policy.segment, images, texts, keep, **kwargs)):
                if mask is not None:
                    out[i] = mask
        return out

    @staticmethod
    def _call_skipping_bad(method, images, inputs, keep: list[int], **kwargs) -> list:
        """`method` on the kept items; an item the adapter rejects (e.g. a region under its minimum size) is
        dropped and gets the default output. Returns the outputs of the kept items, None for dropped ones."""
        active = list(keep)
        results: dict[int, Any] = {}
        while active:
            try:
                outputs = method([images[i] for i in active], [inputs[i] for i in active], **kwargs)
            except Sa2VAInputError as e:
                if e.row is None or not 0 <= e.row < len(active):
                    raise
                active.pop(e.row)
                continue
            results.update(zip(active, outputs))
            break
        return [results.get(i) for i in keep]

    def __repr__(self) -> str:
        return "EMAReversePolicy()"


def _image_hw(image) -> tuple[int, int]:
    if hasattr(image, "size") and not isinstance(image, np.ndarray):  # PIL: (W, H)
        width, height = image.size
        return height, width
    array = np.asarray(image)
    return int(array.shape[0]), int(array.shape[1])


class _EMAReference:
    """Stands in for TRL's `ref_model`: TRL then asks `_get_per_token_logps_and_entropies` for reference log-probs
    with this object as the model, and the override computes them with the EMA weights swapped in."""

    def __repr__(self) -> str:
        return "EMA reference (the policy with its EMA weights)"


# --- what one generation batch leaves behind ---------------------------------------------------------------------


@dataclass
class _LoopRollout:
    """The samples of one loop in a generation batch: prompts (one row per sample) and mask-action data."""

    batch: Any  # PromptBatch, one row per sample
    positions: list[int]  # sample positions (in the generation batch) of the rows of `batch`
    seg_action: torch.Tensor | None = None  # (n, D) sampled SAM2 prompt embeddings (loop 2, mask action on)
    seg_scale: torch.Tensor | None = None  # (n,) standard deviation used for each sample
    pixel_action: list[torch.Tensor] | None = None  # n sampled (H_i, W_i) bool masks (loop 2, pixel action on)
    pixel_temperature: list[float] | None = None  # the temperature each mask was sampled with
    has_seg: torch.Tensor | None = None  # (n,) bool


@dataclass
class _Generation:
    """Per-sample data of the current generation batch, indexed by sample position (`SAMPLE_INDEX_KEY`)."""

    size: int
    loops: dict[str, _LoopRollout] = field(default_factory=dict)
    tasks: list[str] = field(default_factory=list)
    completions: list[str | None] = field(default_factory=list)  # decoded texts, for logging

    def locate(self, position: int) -> tuple[str, int]:
        task = self.tasks[position]
        return task, self.loops[task].positions.index(position)


# --- the trainer -----------------------------------------------------------------------------------------------------


class Sa2VAGRPOTrainer(CheckpointingMixin, GRPOTrainer):
    """GRPO for Sa2VA: both cycle loops per batch, log-probs through `Sa2VAPolicy`, the EMA as partner and reference.

    Args:
        model: a Sa2VA model: the native backend's `Sa2VAModel`, or a published remote-code `Sa2VAChatModel`
            (`sa2va_trl.models.load_published_sa2va`); either a `PreTrainedModel`.
        reward_funcs: `{loop: [reward, ...]}` (each reward scores its loop's rows; `reward_weights` is then filled
            from the config's per-loop weights), or a plain TRL list (every reward sees every row).
        args: a `Sa2VAGRPOConfig`.
        train_dataset: rows in the schema; expanded per loop with `expand_loops` unless it already has `task`.
        eval_dataset: same, optional.
        processing_class: the model's tokenizer (a tokenizer, not a processor: TRL's processor path does not know
            Sa2VA's image tokens).
        callbacks: extra callbacks. An `EMACallback` among them is used; otherwise one is created from
            `args.ema_decay` / `args.ema_warmup_steps`.
        peft_config: a peft config (LoRA on the language model), applied by TRL.
        policy_cls: the adapter class, or any callable `(model, tokenizer) -> adapter` (e.g. a `functools.partial`
            of `RemoteSa2VAPolicy` with prompt settings). Default: by the model's layout (`policy_class_for`):
            `RemoteSa2VAPolicy` for a published model, `Sa2VAPolicy` otherwise. It gets the model before peft wraps
            it, and the tokenizer.

    TRL 1.16 methods overridden (see `OVERRIDDEN_TRL_METHODS`), each as narrowly as possible:

    - `_generate_and_score_completions`: wraps TRL's; records the rows for the rollout, then adds the sample
      index, per-loop metrics, rank advantages (``advantage_mode: rank``) and the loop weights to TRL's output.
    - `_calculate_rewards`: wraps TRL's; keeps the gathered rewards for the per-loop metrics and turns a failing
      reward into an error naming the dataset row.
    - `_get_per_token_logps_and_entropies`: replaces TRL's fused causal-LM path (which expects a plain causal LM)
      with `Sa2VAPolicy.completion_logprobs`, plus the mask action's log-density at the `[SEG]` token; the
      reference log-probs are computed with the EMA weights.
    - `_compute_loss`: wraps TRL's to tell the log-prob method which samples the micro-batch holds (TRL forwards
      only its fixed VLM keyword arguments).

    Also replaced: transformers' `evaluate` (segmentation / captioning metrics, see its docstring) and TRL's
    `create_model_card` (this package's card, `sa2va_trl.model_card`: loops, rewards, EMA, evaluation table); and
    extended: transformers' `create_optimizer` (`text_hidden_fcs` in groups of its own rate, `sa2va_trl.optim`).
    Checkpoints come from `sa2va_trl.checkpointing.CheckpointingMixin`: complete or ignored on resume (a completion
    marker written last), the EMA files inside before the Hub push, exact data order on resume in any epoch.

    Sampling uses TRL's `rollout_func` hook (set to `self._rollout`). Loop weights scale that loop's advantages.
    Under DDP the training forward runs as the wrapper's forward (`forward_through_wrapper`) so gradients are
    all-reduced. DeepSpeed ZeRO-2 and ZeRO-3 are supported: the training forward calls the same modules on every
    rank (`_get_per_token_logps_and_entropies`, `uniform_forward`), and under ZeRO-3, where every module call
    gathers its parameters (a collective all ranks must join), whatever differs between ranks runs inside one full
    gather (`full_parameters`): sampling and mask decoding (`_rollout`), all reward calls with the reverse model
    (`reverse_model`: EMA slices swapped in, then gathered) and `evaluate`. `per_sample_seeds` makes the samples
    independent of how the batch is split over processes.
    """

    def __init__(
        self,
        model,
        reward_funcs: dict[str, list[Callable]] | list[Callable],
        args: Sa2VAGRPOConfig,
        train_dataset: datasets.Dataset,
        eval_dataset: datasets.Dataset | None = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        callbacks: list | None = None,
        peft_config=None,
        policy_cls: Callable[..., Sa2VAPolicy] | None = None,
    ):
        if not isinstance(args, Sa2VAGRPOConfig):
            raise TypeError(f"args must be a Sa2VAGRPOConfig, got {type(args).__name__}.")
        if not isinstance(processing_class, PreTrainedTokenizerBase):
            raise TypeError(
                "processing_class must be the model's tokenizer (a PreTrainedTokenizerBase), got "
                f"{type(processing_class).__name__}: TRL's processor path would build its own image inputs."
            )
        for name, ds in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
            reserved = {"image", "images", "pixel_values"} & set(getattr(ds, "column_names", None) or [])
            if reserved:
                raise ValueError(
                    f"{name} has column(s) {sorted(reserved)}, which switch on TRL's own multimodal path; the row "
                    "schema names the image `img`."
                )
        # The adapter holds the model object itself; peft (applied by TRL below) injects LoRA layers into it in place.
        self.policy = (policy_cls or policy_class_for(model))(model, processing_class)
        self._set_generation_config(model, processing_class, getattr(self.policy, "eos_token_ids", None))
        self._eval_rows = eval_dataset  # the schema rows `evaluate` scores
        train_dataset = self._with_tasks(train_dataset, args.loops)
        eval_dataset = self._with_tasks(eval_dataset, args.loops) if eval_dataset is not None else None

        if isinstance(reward_funcs, dict):
            reward_funcs = {loop: list(fns) for loop, fns in reward_funcs.items() if loop in args.loops}
            if args.reward_weights is None:
                args.reward_weights = _loop_reward_weights(args, reward_funcs)
        reward_funcs = bind_rewards_to_loops(reward_funcs)

        callbacks = list(callbacks or [])
        self.ema = next((cb for cb in callbacks if isinstance(cb, EMACallback)), None)
        if self.ema is None:
            self.ema = EMACallback(
                decay=args.ema_decay,
                warmup="linear" if args.ema_warmup_steps else "none",
                warmup_steps=args.ema_warmup_steps,
            )
            callbacks.append(self.ema)

        # Under DDP, parts of the model get no gradient in a micro-batch (the SAM2 decoder never does in the training
        # forward; text_hidden_fcs only with loop-2 rows), so DDP must look for unused parameters.
        if args.ddp_find_unused_parameters is None:
            args.ddp_find_unused_parameters = True

        # TRL would load a reference model from `config._name_or_path` (or copy a PEFT adapter) when beta > 0; the
        # EMA is the reference here, so build the parent with beta 0 and restore it after.
        beta = args.beta
        args.beta = 0.0
        user_reentrant = (args.activation_checkpointing_kwargs or {}).get("use_reentrant")
        try:
            super().__init__(
                model=model,
                reward_funcs=reward_funcs,
                args=args,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=processing_class,
                callbacks=callbacks,
                peft_config=peft_config,
            )
        finally:
            args.beta = beta
        self._check_zero3()
        self._use_non_reentrant_checkpointing(user_reentrant)
        self.ema.add_to(self)  # before the reporting callbacks, so `ema/decay` is logged
        self.beta = beta
        self.ref_model = _EMAReference() if beta != 0.0 else None
        self.rollout_func = self._rollout  # TRL's public sampling hook; set here to skip its "experimental" warning

        self.reverse_policy = EMAReversePolicy(self)
        self.seg_token_id = processing_class.convert_tokens_to_ids(SEG_TOKEN)
        self._rollout_inputs: list[dict] | None = None
        self._generation: _Generation | None = None
        self._active_samples: torch.Tensor | None = None
        self._last_rewards_per_func: torch.Tensor | None = None
        self._gathered = False  # inside `full_parameters` (ZeRO-3)
        self._ema_swapped = False  # inside `ema_weights`
        # The loops every rank's training forward runs under DeepSpeed (`uniform_forward`), in `LOOPS` order.
        present = (
            set(self.train_dataset.unique(TASK_COLUMN)) if isinstance(self.train_dataset, datasets.Dataset)
            else set(args.loops)
        )
        self._forward_loops = tuple(loop for loop in LOOPS if loop in present)

    # --- setup helpers ----------------------------------------------------------------------------------------------

    def create_optimizer(self, model=None):
        """The Trainer's optimizer, with `text_hidden_fcs` in groups of its own when `text_hidden_fcs_learning_rate`
        is set (also the optimizer DeepSpeed wraps: its config names no optimizer)."""
        optimizer = super().create_optimizer(model)
        lr = self.args.text_hidden_fcs_learning_rate
        inner = getattr(optimizer, "optimizer", optimizer)
        done = any(group.get("name") == "text_hidden_fcs" for group in inner.param_groups)
        if lr is not None and lr != self.args.learning_rate and not done:
            ids = module_parameter_ids(self.model if model is None else model, "text_hidden_fcs")
            moved = split_param_groups(inner, ids, lr, tag="text_hidden_fcs")
            logger.info("text_hidden_fcs: %d parameter tensors at peak lr %g (the rest at %g)",
                        moved, lr, self.args.learning_rate)
            if not moved:
                logger.warning("text_hidden_fcs_learning_rate is set but no trainable text_hidden_fcs parameter was "
                               "found (train_text_hidden_fcs: false?)")
        return optimizer

    @property
    def zero3(self) -> bool:
        """Whether DeepSpeed ZeRO-3 partitions the model (every submodule call is then a collective)."""
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        return bool(self.is_deepspeed_enabled and plugin is not None and plugin.zero_stage == 3)

    @property
    def uniform_forward(self) -> bool:
        """Whether every process must run the same modules in its training forward: under DeepSpeed with several
        processes. ZeRO-3 gathers each module's parameters as it runs (a collective); ZeRO-1/2 (and 3) reduce the
        gradients in buckets, which must hold the same parameters on every rank."""
        return bool(self.is_deepspeed_enabled and self.accelerator.num_processes > 1)

    def _check_zero3(self) -> None:
        """Under ZeRO-3 each submodule call all-gathers its parameters, a collective every rank must join. Rollouts,
        reverse-model calls and evaluation differ between ranks (generation lengths, loop mix, skipped rows), so
        they run inside `full_parameters` (one gather, hooks removed); the training forward calls the same modules
        on every rank (`_get_per_token_logps_and_entropies`). That needs TRL's generation gather."""
        if self.zero3 and not self.args.ds3_gather_for_generation:
            raise ValueError(
                "`ds3_gather_for_generation: false` is not supported by Sa2VAGRPOTrainer: its rollouts and reverse-"
                "model calls differ between ranks and run under one full gather of the parameters (without it, "
                "ZeRO-3's per-module collectives would deadlock). Remove the setting (default true)."
            )

    def _use_non_reentrant_checkpointing(self, user_reentrant: bool | None) -> None:
        """Undo TRL's `use_reentrant: true` for PEFT + ZeRO-3 + activation checkpointing, unless the user asked for it.

        TRL forces reentrant checkpointing there to dodge DeepSpeed's "recomputed values have different metadata"
        error on partitioned frozen weights (deepspeedai/DeepSpeed#4332; DeepSpeed 0.19.8, installed here, ran
        non-reentrant without it). Reentrant checkpointing breaks this trainer instead: its training forward runs
        the language model once per loop, a reentrant backward fires a parameter's gradient hook once per run, and
        ZeRO-3 asserts that each bucket reduces a parameter once (deepspeedai/DeepSpeed#988), at the first step that
        holds both loops. Measured with 2 CPU processes: reentrant fails there, non-reentrant trains and matches a
        single-process run (tests/test_trainer_distributed.py, and on the published code
        tests/test_trainer_remote_distributed.py). Running both loops through one language-model call would remove
        the cause; the training forward keeps one call per loop for now."""
        args = self.args
        if not (self.zero3 and args.activation_checkpointing):
            return
        if user_reentrant:
            logger.warning("ZeRO-3 with `use_reentrant: true`: the first step that holds both loops may fail "
                           "DeepSpeed's gradient-bucket assertion; unset it to get non-reentrant checkpointing.")
            return
        for name in ("activation_checkpointing_kwargs", "gradient_checkpointing_kwargs"):
            kwargs = getattr(args, name, None)
            if isinstance(kwargs, dict) and kwargs.get("use_reentrant"):
                kwargs["use_reentrant"] = False
                logger.info("ZeRO-3 with activation checkpointing: non-reentrant checkpointing (%s)", name)

    def _with_tasks(self, dataset, loops):
        if dataset is None or TASK_COLUMN in dataset.column_names:
            return dataset
        return expand_loops(dataset, loops, region_fits=self._region_fits)

    def _region_fits(self, region_mask) -> bool:
        """Whether a region covers enough cells of the model's token grid to be shown as a `<vp>` prompt."""
        config = getattr(getattr(self.policy, "core", None), "config", None)
        if config is None or not hasattr(config, "token_grid_size"):
            return True
        grid = mask_to_token_grid(np.asarray(as_mask(region_mask), dtype=bool), config.token_grid_size)
        return int(grid.sum()) >= int(getattr(config, "min_region_cells", 1))

    @staticmethod
    def _set_generation_config(model, tokenizer, stop_ids: Sequence[int] | None = None) -> None:
        """The model's generation config must end completions where the adapter stops sampling (the tokenizer's
        chat-end eos and the template's stop words) and pad with the tokenizer's pad token, or TRL counts every
        completion as truncated."""
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        config = getattr(model, "generation_config", None) or GenerationConfig()
        eos = config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        for token_id in [tokenizer.eos_token_id, *(stop_ids or [])]:
            if token_id is not None and token_id not in eos:
                eos.append(int(token_id))
        config.eos_token_id = eos
        config.pad_token_id = tokenizer.pad_token_id
        model.generation_config = config

    @contextlib.contextmanager
    def ema_weights(self):
        """Swap the EMA weights into the policy for the duration of the block (no-op without an EMA shadow, and
        inside another `ema_weights` block). Collective under ZeRO-3, and then not allowed inside `full_parameters`
        (the gathered copies would keep the live weights): enter it first, as `reverse_model` does."""
        if self.ema is None or not self.ema.is_attached or self._ema_swapped:
            yield
            return
        if self._gathered:
            raise RuntimeError(
                "ema_weights() inside full_parameters(): under ZeRO-3 swap the EMA in first, then gather "
                "(`reverse_model()` does both)."
            )
        self._ema_swapped = True
        try:
            with self.ema.swapped_in():  # the model the callback attached to at train begin
                yield
        finally:
            self._ema_swapped = False

    @contextlib.contextmanager
    def full_parameters(self):
        """Under ZeRO-3: every parameter of the model gathered whole on this rank for the block, with DeepSpeed's
        per-module hooks removed and `generate`'s per-token rank synchronisation off (`policy.synced_gpus`), so the
        block may call any module and sample any number of times without a collective (TRL's generation gather,
        `ds3_gather_for_generation`). Collective: every rank must enter it, once. Nested blocks and other backends:
        no-op. No backward may run inside (the hooks that partition gradients are off).
        """
        if not self.zero3 or self._gathered:
            yield
            return
        import deepspeed
        from trl.models.utils import add_hooks, remove_hooks

        engine = self.model_wrapped if isinstance(self.model_wrapped, deepspeed.DeepSpeedEngine) else None
        if engine is not None and getattr(engine, "optimizer", None) is None:
            engine = None  # no partitioning hooks installed yet
        parameters = [p for p in self.policy.model.parameters() if hasattr(p, "ds_id")]
        synced = getattr(self.policy, "synced_gpus", None)
        with deepspeed.zero.GatheredParameters(parameters):
            if engine is not None:
                remove_hooks(engine)
            self._gathered = True
            if hasattr(self.policy, "synced_gpus"):
                self.policy.synced_gpus = False  # nothing to keep in step: every module is local now
            try:
                yield
            finally:
                self._gathered = False
                if hasattr(self.policy, "synced_gpus"):
                    self.policy.synced_gpus = synced
                if engine is not None:
                    add_hooks(engine)

    @contextlib.contextmanager
    def reverse_model(self):
        """The reverse (EMA) model for the block: the EMA weights swapped in, then (ZeRO-3) gathered whole.

        Under ZeRO-3 the EMA holds this rank's slices only, so the slices are swapped in first and the gather
        assembles the EMA model from them; on exit the gathered copies are dropped and the live slices restored
        exactly. Collective under ZeRO-3 (every rank enters it); reentrant.
        """
        with self.ema_weights(), self.full_parameters():
            yield

    # --- sampling (TRL's rollout_func hook) -------------------------------------------------------------------------

    def _rollout(self, prompts: list, trainer=None) -> dict[str, Any]:
        """Sample every row of the generation batch with the policy; loop 2 also decodes masks.

        Returns TRL's rollout dict: per-sample `prompt_ids`, `completion_ids`, `logprobs`, plus the extra columns
        the rewards read (`pred_mask`, `reverse_policy`).
        """
        inputs = self._rollout_inputs
        if inputs is None or len(inputs) != len(prompts):
            raise RuntimeError("Sa2VAGRPOTrainer._rollout runs only inside _generate_and_score_completions.")
        # The frozen-encoder cache is shared by this rollout, its reverse-model calls and the training forwards
        # until the next one; clearing here keeps it to one generation batch.
        clear = getattr(self.policy, "clear_feature_cache", None)
        if clear is not None:
            clear()
        n = len(inputs)
        if self.zero3 and hasattr(self.policy, "feature_cache_size"):
            # Under ZeRO-3 a training forward must never miss the cache on one rank only (the frozen encoder would
            # then run, and gather, there alone): keep every image of the batch (one entry per encoder).
            self.policy.feature_cache_size = max(self.policy.feature_cache_size, 2 * n)
        # Sampling and mask decoding differ between ranks (generation lengths, loop mix): one gather, no
        # per-module collectives inside (ZeRO-3; elsewhere a no-op).
        with self.full_parameters():
            return self._rollout_gathered(inputs)

    def _rollout_gathered(self, inputs: list[dict]) -> dict[str, Any]:
        mode = "train" if self.model.training else "eval"
        n = len(inputs)
        tasks = [row[TASK_COLUMN] for row in inputs]
        generation = _Generation(size=n, tasks=tasks, completions=[None] * n)
        prompt_ids: list = [None] * n
        completion_ids: list = [None] * n
        logprobs: list = [None] * n
        pred_masks: list = [None] * n
        no_seg = []
        for task in LOOPS:
            positions = [i for i in range(n) if tasks[i] == task]
            if not positions:
                continue
            with torch.no_grad():
                rollout = self._sample_loop(task, [inputs[i] for i in positions], positions)
            loop = _LoopRollout(batch=rollout.batch, positions=positions)
            for j, i in enumerate(positions):
                length = int(rollout.completion_mask[j].sum())
                keep = rollout.batch.attention_mask[j].bool()
                prompt_ids[i] = rollout.batch.input_ids[j][keep].tolist()
                completion_ids[i] = rollout.completion_ids[j, :length].tolist()
                generation.completions[i] = rollout.completions[j]
                logprobs[i] = rollout.logprobs[j, :length].float().tolist()
            if task == CAPTION_TO_MASK:
                with torch.no_grad():
                    masks = self._decode_loop2_masks(rollout, loop)
                for j, i in enumerate(positions):
                    pred_masks[i] = masks[j]
                no_seg.append((~rollout.has_seg).float())
            generation.loops[task] = loop
        self._generation = generation
        # Every process gathers (a rank may hold no loop-2 rows): [completions without [SEG], loop-2 completions],
        # float32 on every rank (an empty sum is an int, and gathering mismatched dtypes breaks the collective)
        counts = torch.tensor(
            [sum(float(x.sum()) for x in no_seg), sum(x.numel() for x in no_seg)], dtype=torch.float32
        )
        counts = self.accelerator.gather(counts.to(self.accelerator.device)).view(-1, 2).sum(dim=0)
        if counts[1] > 0:
            self._metrics[mode][f"loops/{CAPTION_TO_MASK}/frac_no_seg"].append((counts[0] / counts[1]).item())
        return {
            "prompt_ids": prompt_ids,
            "completion_ids": completion_ids,
            "logprobs": logprobs,
            "pred_mask": pred_masks,
            "reverse_policy": self.reverse_policy,
        }

    def _group_runs(self, rows: list[dict]) -> int:
        """G' such that `rows` is a sequence of runs of G' copies of the same row (TRL's order), else 1."""
        ids = [row[ROW_ID_COLUMN] for row in rows]
        for k in (self.num_generations, self.num_generations_eval):
            if k and k > 1 and len(ids) % k == 0 and all(len(set(ids[s : s + k])) == 1 for s in range(0, len(ids), k)):
                return k
        return 1

    def _prompts_for(self, task: str, rows: list[dict]):
        row_ids = [row[ROW_ID_COLUMN] for row in rows]
        images = [row["img"] for row in rows]
        try:
            if task == MASK_TO_CAPTION:
                return self.policy.caption_prompts(images, [row["region_mask"] for row in rows], row_indices=row_ids)
            return self.policy.segmentation_prompts(images, [row["caption"] for row in rows], row_indices=row_ids)
        except Exception as e:
            bad = getattr(e, "row", None)
            row = next((r for r in rows if r[ROW_ID_COLUMN] == bad), None)
            where = _describe_row(row) if row is not None else f"one of rows {sorted(set(row_ids))}"
            raise Sa2VARowError(f"building the {task} prompt failed on {where}: {e}") from e

    def _sample_generators(self, positions: list[int], stream: str, device) -> list[torch.Generator] | None:
        """With `per_sample_seeds`: one generator per sample, seeded from (seed, step, mode, stream, the sample's
        position in the global generation batch), so it is the same whichever process samples it. Else None."""
        if not self.args.per_sample_seeds:
            return None
        if positions is None or self._rollout_inputs is None:
            raise RuntimeError("per_sample_seeds: samples are seeded by their position in a rollout's batch.")
        mode = "train" if self.model.training else "eval"
        offset = self.accelerator.process_index * len(self._rollout_inputs)
        generators = []
        for position in positions:
            key = f"{self.args.seed}:{self.state.global_step}:{mode}:{stream}:{offset + position}".encode()
            seed = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1
            generators.append(torch.Generator(device=device).manual_seed(seed))
        return generators

    def _sample_loop(self, task: str, rows: list[dict], positions: list[int] | None = None):
        """One batched `sample` call for one loop's rows (at `positions` of the generation batch, needed with
        `per_sample_seeds`); G samples per unique row when the rows come in groups."""
        k = self._group_runs(rows)
        batch = self._prompts_for(task, rows[::k])
        device = self.accelerator.device
        generators = self._sample_generators(positions, "tokens", device)
        return self.policy.sample(
            batch.to(device),
            num_generations=k,
            max_new_tokens=self.max_completion_length,
            temperature=self.temperature,
            top_p=self.top_p if self.top_p is not None else 1.0,
            top_k=self.top_k or 0,
            do_sample=True,
            **({"generators": generators} if generators is not None else {}),
        )

    def _decode_loop2_masks(self, rollout, loop: _LoopRollout) -> list[np.ndarray]:
        """Masks of the loop-2 samples: the greedy masks of the prompt embeddings, or samples of the mask actions
        (`sa2va_trl.mask_actions`): the prompt e ~ N(mu, sigma^2 I) and/or every pixel ~ Bernoulli."""
        mu = self.policy.seg_embeddings(rollout.seg_hidden).float()
        prompt_embeddings = mu
        loop.has_seg = rollout.has_seg.detach().cpu()
        mode = "train" if self.model.training else "eval"
        if self.args.mask_action:
            generators = self._sample_generators(loop.positions, "mask_action", mu.device)
            if generators is None:
                prompt_embeddings, loop.seg_scale = sample_prompt_action(mu, self.args.mask_action_sigma,
                                                                         relative=self.args.mask_action_sigma_relative)
            else:  # one draw per sample from its own generator (`per_sample_seeds`)
                draws = [sample_prompt_action(mu[j : j + 1], self.args.mask_action_sigma, generator=g,
                                              relative=self.args.mask_action_sigma_relative)
                         for j, g in enumerate(generators)]
                prompt_embeddings = torch.cat([e for e, _ in draws])
                loop.seg_scale = torch.cat([s for _, s in draws])
            loop.seg_action = prompt_embeddings.detach()
            if rollout.has_seg.any():  # diagnostics, this rank only: compare sigma with the scale of mu
                rms = mu.pow(2).mean(dim=-1).sqrt()
                self._metrics[mode]["mask_action/mu_rms"].append(rms[rollout.has_seg].mean().item())
        out = self.policy.decode_masks(rollout.batch, prompt_embeddings.to(rollout.seg_hidden.dtype), has_seg=rollout.has_seg)
        if not self.args.mask_pixel_action:
            return out.numpy_masks()
        generators = self._sample_generators(loop.positions, "mask_pixels", mu.device)
        temperature = self.args.mask_pixel_temperature
        if self.args.mask_pixel_temperature_relative:
            temperature = relative_pixel_temperatures(out.mask_logits, temperature)
        loop.pixel_temperature = temperature if isinstance(temperature, list) else [temperature] * len(out.mask_logits)
        masks = sample_pixel_action(out.mask_logits, temperature, generator=generators)
        masks = [m & bool(seg) for m, seg in zip(masks, rollout.has_seg.tolist())]
        loop.pixel_action = [m.cpu() for m in masks]
        self._metrics[mode]["mask_action/pixel_flip_frac"].append(flip_fraction(out.mask_logits, masks))
        return [m.cpu().numpy() for m in masks]

    # --- model card -------------------------------------------------------------------------------------------------

    def create_model_card(self, model_name=None, dataset_name=None, tags=None, **unused):
        """Write this package's model card to ``output_dir/README.md`` (`sa2va_trl.model_card.write_model_card`):
        base model, loops, rewards and weights, EMA, GRPO settings, the last evaluation, files, loading code. TRL
        calls it at every checkpoint save and transformers' `push_to_hub` before uploading. The base model and data
        description come from ``self.model_card_info`` (the entry point fills it)."""
        if not self.is_world_process_zero():
            return
        from sa2va_trl.model_card import write_model_card

        write_model_card(self, model_name=model_name, dataset_name=dataset_name, tags=tags)

    # --- evaluation -------------------------------------------------------------------------------------------------

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Greedy referring segmentation and region captioning on the evaluation rows, scored with
        `sa2va_trl.metrics` (through `sa2va_trl.evaluate.evaluate_policy`).

        Replaces `transformers.Trainer.evaluate` (TRL's evaluation would report a GRPO loss on sampled completions,
        which says little about the model). Logged and returned as ``{prefix}_mean_iou``,
        ``{prefix}_cumulative_iou``, ``{prefix}_precision@0.5``, ``{prefix}_meteor``, the reference captions'
        teacher-forced ``{prefix}_caption_nll_per_token`` and ``{prefix}_caption_prob`` (they move before the greedy
        caption changes) and, on the shapes world, ``{prefix}_exact_match``, ``{prefix}_accuracy/<attribute>`` and
        ``{prefix}_caption_prob/<attribute>``: any of them can be `metric_for_best_model`.
        Every process evaluates the same rows; under ZeRO-3 inside one full gather (`full_parameters`), so the
        generations issue no collective. The frozen-encoder features of the current generation batch are kept.
        """
        from sa2va_trl.evaluate import DEFAULT_TASKS, evaluate_policy

        rows = self._eval_rows if eval_dataset is None else eval_dataset
        if isinstance(rows, str):
            raise ValueError("Named evaluation datasets are not supported; pass the rows.")
        if rows is None:
            raise ValueError("evaluate() needs evaluation rows: pass eval_dataset to the trainer or to evaluate().")
        was_training = self.model.training
        self.model.eval()
        preserved = getattr(self.policy, "preserved_feature_cache", None)
        try:
            with self.full_parameters(), (preserved() if preserved is not None else contextlib.nullcontext()):
                tasks = DEFAULT_TASKS
                if hasattr(self.policy, "caption_logprobs"):
                    tasks = (*DEFAULT_TASKS, "caption_likelihood")
                result = evaluate_policy(self.policy, rows, tasks=tasks, progress=False,
                                         max_new_tokens=self.max_completion_length)
        finally:
            self.model.train(was_training)
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in flatten_eval_metrics(result).items()}
        metrics[f"{metric_key_prefix}_failed_rows"] = float(len(result.get("failed_rows") or {}))
        # transformers' log, not TRL's: TRL's would fold in (and clear) the pending training metrics
        transformers.Trainer.log(self, metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    # --- TRL overrides ------------------------------------------------------------------------------------------------

    def _generate_and_score_completions(self, inputs):
        """TRL's, plus: the rows for `_rollout`, the sample index, per-loop metrics, rank advantages, loop weights."""
        self._rollout_inputs = inputs
        self._last_rewards_per_func = None
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._rollout_inputs = None
        device = output["advantages"].device
        n = len(inputs)
        output[SAMPLE_INDEX_KEY] = torch.arange(n, device=device)
        output["advantages"] = self._reshape_advantages(inputs, output["advantages"])
        self._record_recent_samples(inputs, output["advantages"])
        return output

    def _record_recent_samples(self, inputs: list[dict], advantages: torch.Tensor) -> None:
        """Keep this process's samples of the last generation for `recent_samples` (references, no copies)."""
        rewards_per_func = self._last_rewards_per_func
        start = self.accelerator.process_index * len(inputs)
        local = rewards_per_func[start : start + len(inputs)].cpu()
        weights = self.reward_weights.cpu()
        samples = []
        for i, row in enumerate(inputs):
            scored = ~torch.isnan(local[i])
            samples.append({
                "step": self.state.global_step,
                "task": row[TASK_COLUMN],
                "img": row.get("img"),
                "region_mask": row.get("region_mask"),
                "caption": row.get("caption"),
                "source_id": row.get("source_id"),
                "completion": self._generation.completions[i] if self._generation else None,
                "pred_mask": row.get("pred_mask"),
                "reward": float((local[i][scored] * weights[scored]).sum()) if scored.any() else None,
                "advantage": float(advantages[i]),
            })
        self._recent_samples = samples

    def recent_samples(self, max_samples: int | None = None, one_per_group: bool = True) -> list[dict]:
        """Samples of the last generation batch on this process, for logging (e.g. `SampleOverlayCallback`).

        Each is a dict with `step`, `task`, `img` (PIL), `region_mask` (RLE), `caption` (reference), `completion`
        (sampled text), `pred_mask` (loop 2, H x W bool), `reward` (weighted sum) and `advantage`.
        """
        samples = list(getattr(self, "_recent_samples", []))
        if one_per_group:
            step = self.num_generations if self.model.training else self.num_generations_eval
            samples = samples[:: max(1, step or 1)]
        return samples[:max_samples] if max_samples is not None else samples

    def _reshape_advantages(self, inputs: list[dict], advantages: torch.Tensor) -> torch.Tensor:
        """Rank advantages if asked, the negative-advantage weight, loop weights, and the per-loop signal metrics (on
        the global batch)."""
        mode = "train" if self.model.training else "eval"
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval
        rewards_per_func = self._last_rewards_per_func
        device = advantages.device
        n = len(inputs)
        start = self.accelerator.process_index * n
        tasks = gather_object([row[TASK_COLUMN] for row in inputs])
        weights = self.reward_weights.to(rewards_per_func.device)
        unscorable = torch.isnan(rewards_per_func).all(dim=1)
        rewards = (rewards_per_func * weights).nansum(dim=1)
        rewards[unscorable] = torch.nan

        if self.args.advantage_mode == "rank":
            advantages = rank_advantages(rewards, num_generations)[start : start + n].to(device)
        elif self.args.advantage_mode == "likelihood":
            advantages = likelihood_advantages(rewards, num_generations)[start : start + n].to(device)
        if self.args.negative_advantage_weight != 1.0:
            advantages = torch.where(advantages < 0, advantages * self.args.negative_advantage_weight, advantages)
        loop_weight = torch.tensor([self.args.loop_weight(t) for t in tasks], device=rewards.device)
        advantages = advantages * loop_weight[start : start + n].to(device)

        all_advantages = self.accelerator.gather(advantages)
        metrics = self._metrics[mode]
        metrics["advantages/std"].append(all_advantages.std().item() if all_advantages.numel() > 1 else 0.0)
        is_task = {loop: torch.tensor([t == loop for t in tasks], device=rewards.device) for loop in LOOPS}
        grouped = rewards.view(-1, num_generations)
        group_std = torch.nan_to_num(_nanstd(grouped), nan=0.0)
        for loop, rows in is_task.items():
            if not rows.any():
                continue
            values = rewards[rows]
            metrics[f"loops/{loop}/reward_mean"].append(torch.nanmean(values).item())
            metrics[f"loops/{loop}/reward_std"].append(_nanstd(values.unsqueeze(0)).item() if values.numel() > 1 else 0.0)
            group_rows = rows.view(-1, num_generations).all(dim=1)
            metrics[f"loops/{loop}/frac_reward_zero_std"].append(
                torch.isclose(group_std[group_rows], torch.zeros(())).float().mean().item()
            )
            loop_adv = all_advantages[rows.to(all_advantages.device)]
            metrics[f"loops/{loop}/advantage_std"].append(loop_adv.std().item() if loop_adv.numel() > 1 else 0.0)
        return advantages

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        """TRL's, inside `reverse_model()` (the rewards' reverse-model calls then need no swap or gather of their own:
        one per step, collective under ZeRO-3), keeping the gathered rewards and naming the dataset row when a
        reward fails."""
        try:
            with self.reverse_model():
                rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        except RewardError as e:
            row = inputs[e.row] if e.row is not None and 0 <= e.row < len(inputs) else None
            where = _describe_row(row) if row is not None else "an unknown row (the reward did not say which)"
            raise Sa2VARowError(f"reward {e.reward!r} failed on {where}: {e.message}") from e
        self._last_rewards_per_func = rewards
        return rewards

    def _compute_loss(self, model, inputs):
        """TRL's, with the micro-batch's sample positions made known to the log-prob method."""
        self._active_samples = inputs[SAMPLE_INDEX_KEY]
        if self.model.training and self.optimizer is not None:
            # TRL logs the first group's rate only; the projection's own group (`text_hidden_fcs_learning_rate`) too.
            lrs = [g["lr"] for g in self.optimizer.param_groups if g.get("name") == "text_hidden_fcs"]
            if lrs:
                self._metrics["train"]["learning_rate/text_hidden_fcs"].append(float(lrs[0]))
        try:
            return super()._compute_loss(model, inputs)
        finally:
            self._active_samples = None

    def _get_per_token_logps_and_entropies(
        self,
        model,
        input_ids,
        attention_mask,
        logits_to_keep,
        batch_size=None,
        compute_entropy=False,
        compute_aux_loss=False,
        **unused_vlm_kwargs,
    ):
        """Per-token log-probs (and entropies) of the completions through the policy adapter.

        The samples are those of the current generation: the micro-batch's positions inside `_compute_loss`, the
        whole generation batch otherwise (TRL's old / reference log-probs). `model` is TRL's training model or the
        EMA reference stand-in; the adapter always runs the unwrapped policy (with the EMA weights for the latter).
        Loop-2 rows with the mask action add the tempered log-density -||e - mu||^2 / (2 sigma^2 D) (the Gaussian's
        divided by the dimension D, without its constant, which cancels in every ratio and KL) at their first
        `[SEG]` token.

        In chunks of `batch_size` samples when TRL passes one (its old and reference log-probs), and per chunk one
        adapter forward per loop present in the samples, in `LOOPS` order. Under DeepSpeed with several processes
        (`uniform_forward`) every rank must call the same modules in the same order and give gradients to the same
        parameters (ZeRO-3 gathers each module's parameters as it runs; every stage reduces gradients in buckets
        that must match across ranks): a rank whose samples lack a loop of the training set runs that loop's
        modules on one of its own rows with weight 0 (the log-prob forward, plus `text_hidden_fcs` for loop 2 with
        the mask action), which adds exactly 0 to the log-probs and 0 gradients.
        """
        generation = self._generation
        if generation is None:
            raise RuntimeError("No generation batch recorded: log-probs are computed only for sampled completions.")
        positions = self._active_samples
        positions = (
            list(range(generation.size)) if positions is None else [int(p) for p in positions.tolist()]
        )
        if len(positions) != input_ids.shape[0]:
            raise RuntimeError(f"{input_ids.shape[0]} sequences but {len(positions)} recorded samples.")
        completion_ids = input_ids[:, -logits_to_keep:]
        completion_mask = attention_mask[:, -logits_to_keep:]
        context = self.ema_weights() if isinstance(model, _EMAReference) else contextlib.nullcontext()
        # TRL's chunking: the old / reference log-probs of a whole generation batch come `batch_size` rows at a time,
        # so the peak (logits of rows x completion length x vocabulary) stays that of one micro-batch.
        size = batch_size or len(positions)
        chunks = []
        with context:
            for start in range(0, len(positions), size):
                rows = slice(start, start + size)
                chunks.append(forward_through_wrapper(model, functools.partial(
                    self._loop_logprobs, generation, positions[rows], completion_ids[rows], completion_mask[rows],
                    compute_entropy)))
        logps = torch.cat([c[0] for c in chunks])
        entropies = torch.cat([c[1] for c in chunks]) if compute_entropy else None
        aux_loss = torch.zeros((), device=logps.device) if compute_aux_loss else None
        return logps, entropies, aux_loss

    def _loop_logprobs(self, generation: _Generation, positions: list[int], completion_ids, completion_mask,
                       compute_entropy: bool):
        """The log-probs (and entropies) of the samples at `positions`: one adapter forward per loop they hold, in
        `LOOPS` order, and a placeholder forward for a loop of the training set they lack when every rank must run
        the same modules (`_get_per_token_logps_and_entropies`)."""
        logps = torch.zeros(completion_ids.shape, dtype=torch.float32, device=completion_ids.device)
        entropies = torch.zeros_like(logps) if compute_entropy else None
        for task in LOOPS:
            loop = generation.loops.get(task)
            rows = [r for r, p in enumerate(positions) if generation.tasks[p] == task]
            if not rows:
                if self.uniform_forward and task in self._forward_loops:
                    logps = logps + self._placeholder_forward(task, generation, positions, completion_ids,
                                                              completion_mask, compute_entropy)
                continue
            index_of = {p: j for j, p in enumerate(loop.positions)}
            local = [index_of[positions[r]] for r in rows]
            action = task == CAPTION_TO_MASK and (loop.seg_action is not None or loop.pixel_action is not None)
            out = self.policy.completion_logprobs(
                loop.batch.select(local).to(completion_ids.device),
                completion_ids[rows],
                completion_mask[rows],
                temperature=self.temperature,
                with_entropy=compute_entropy,
                with_seg_hidden=action,
            )
            task_logps = out.logprobs.float()
            if action:
                task_logps = self._add_mask_action_logdensity(task_logps, out, loop, local, completion_ids[rows])
            index = torch.tensor(rows, device=logps.device)
            logps = logps.index_put((index,), task_logps)
            if compute_entropy:
                entropies = entropies.index_put((index,), out.entropies.float())
        return logps, entropies

    def _placeholder_forward(self, task: str, generation: _Generation, positions: list[int], completion_ids,
                             completion_mask, compute_entropy: bool) -> torch.Tensor:
        """The modules of `task`'s training forward, run on the first sample of `positions` (of whichever loop) and
        returned times 0: a scalar 0 that keeps the rank in step with ranks that have `task` samples."""
        task_of_row, local = generation.locate(positions[0])
        batch = generation.loops[task_of_row].batch.select([local]).to(completion_ids.device)
        action = task == CAPTION_TO_MASK and self.args.mask_action
        out = self.policy.completion_logprobs(
            batch, completion_ids[:1], completion_mask[:1], temperature=self.temperature,
            with_entropy=compute_entropy, with_seg_hidden=action,
        )
        total = out.logprobs.float().sum()
        if action:
            total = total + self.policy.seg_embeddings(out.seg_hidden).float().sum()
        return total * 0.0

    def _add_mask_action_logdensity(self, logps, out, loop: _LoopRollout, local: list[int], completion_ids):
        """Add each loop-2 sample's mask-action log-probability (prompt and/or pixel action, tempered; see
        `sa2va_trl.mask_actions`) to the log-prob of its first `[SEG]` token."""
        mu = self.policy.seg_embeddings(out.seg_hidden).float()
        has_seg = loop.has_seg[local].to(mu.device)
        log_density = torch.zeros(mu.shape[0], device=mu.device)
        prompt = mu
        if loop.seg_action is not None:
            prompt = loop.seg_action[local].to(mu.device)
            log_density = log_density + prompt_action_logprob(prompt, mu, loop.seg_scale[local].to(mu.device))
        if loop.pixel_action is not None:
            # The decoder sees the prompt the sample was decoded from (mu itself without the prompt action).
            masks = self.policy.decode_masks(loop.batch.select(local), prompt.to(out.seg_hidden.dtype), has_seg=has_seg)
            actions = [loop.pixel_action[j] for j in local]
            temperatures = [loop.pixel_temperature[j] for j in local]
            log_density = log_density + pixel_action_logprob(masks.mask_logits, actions, temperatures)
        is_seg = completion_ids == self.seg_token_id
        seg_pos = is_seg.float().argmax(dim=1)  # first [SEG]
        has_seg = has_seg & is_seg.any(dim=1)
        if self._active_samples is not None and has_seg.any():  # the training forward: diagnostics, this rank only
            mode = "train" if self.model.training else "eval"
            self._metrics[mode]["mask_action/log_density"].append(log_density[has_seg].mean().item())
        bonus = torch.zeros_like(logps)
        rows = torch.arange(logps.shape[0], device=logps.device)
        bonus = bonus.index_put((rows, seg_pos), torch.where(has_seg, log_density, torch.zeros_like(log_density)))
        return logps + bonus


def forward_through_wrapper(model, compute: Callable[[], Any]) -> Any:
    """Run `compute()` as the forward of a `DistributedDataParallel` wrapper, return its result.

    DDP prepares gradient synchronisation in its own `forward`; the adapter calls the model's submodules directly,
    which would silently skip the all-reduce. `compute` is installed for one call as the wrapped module's forward
    (any forward already patched on the instance, e.g. TRL's fused LM head, is restored afterwards). Any other
    model (plain, DeepSpeed, which syncs through parameter hooks) just runs `compute()`.
    """
    if not isinstance(model, torch.nn.parallel.DistributedDataParallel) or not torch.is_grad_enabled():
        return compute()
    inner = model.module
    patched = inner.__dict__.get("forward")
    inner.forward = lambda *args, **kwargs: compute()
    try:
        return model()
    finally:
        if patched is None:
            del inner.forward
        else:
            inner.forward = patched


def _loop_reward_weights(args: Sa2VAGRPOConfig, reward_funcs: dict[str, list]) -> list[float]:
    """TRL's `reward_weights` for `{loop: [reward, ...]}`: each loop's configured weights, in `LOOPS` order."""
    weights = []
    for loop in LOOPS:
        if loop not in args.loops:  # a loop switched off (e.g. `--loops mask_to_caption`) keeps its recipe weights
            continue
        funcs = reward_funcs.get(loop, [])
        _, loop_weights = args.loop_rewards(loop)
        configured = getattr(args, f"{loop}_reward_weights")
        if configured is None:
            loop_weights = [1.0] * len(funcs)
        elif len(configured) != len(funcs):
            raise ValueError(
                f"`{loop}_reward_weights` has {len(configured)} values but {len(funcs)} rewards were passed for the "
                f"{loop} loop: give one weight per reward."
            )
        weights.extend(loop_weights)
    return weights


def flatten_eval_metrics(result: dict) -> dict[str, float]:
    """The scalar scores of `evaluate_policy`'s result, flat: mean_iou, cumulative_iou, precision@0.5, meteor,
    exact_match, accuracy/<attribute>, caption_nll_per_token, caption_prob, caption_prob/<attribute> (sections
    that did not run are left out)."""
    out: dict[str, float] = {}
    for key in ("mean_iou", "cumulative_iou", "precision@0.5"):
        value = (result.get("segmentation") or {}).get(key)
        if value is not None:
            out[key] = float(value)
    meteor = (result.get("captioning") or {}).get("meteor")
    if meteor is not None:
        out["meteor"] = float(meteor)
    attributes = result.get("attributes") or {}
    if attributes.get("exact_match") is not None:
        out["exact_match"] = float(attributes["exact_match"])
    for name, value in (attributes.get("accuracy") or {}).items():
        out[f"accuracy/{name}"] = float(value)
    likelihood = result.get("caption_likelihood") or {}
    if likelihood:
        out["caption_nll_per_token"] = float(likelihood["nll_per_token"])
        out["caption_prob"] = float(likelihood["caption_prob"])
        for name, value in (likelihood.get("attribute_prob") or {}).items():
            out[f"caption_prob/{name}"] = float(value)
    return out


def _nanstd(x: torch.Tensor) -> torch.Tensor:
    """Row-wise std ignoring NaN (unbiased), NaN where fewer than two values."""
    valid = ~torch.isnan(x)
    count = valid.sum(dim=-1)
    mean = torch.nansum(x, dim=-1) / count.clamp(min=1)
    var = torch.nansum((x - mean.unsqueeze(-1)).pow(2) * valid, dim=-1) / (count - 1).clamp(min=1)
    std = var.sqrt()
    return torch.where(count > 1, std, torch.full_like(std, float("nan")))


def _describe_row(row: dict) -> str:
    return (
        f"dataset row {row.get(ROW_ID_COLUMN)} (task {row.get(TASK_COLUMN)!r}, source_id {row.get('source_id')!r}, "
        f"region_index {row.get('region_index')})"
    )
