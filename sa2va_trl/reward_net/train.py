"""Train the reward network: `python -m sa2va_trl.reward_net RECIPE.yaml [--key value ...]`.

    python -m sa2va_trl.reward_net recipes/demo_reward_net.yaml               # CPU, a few minutes
    python -m sa2va_trl.reward_net recipes/demo_reward_net.yaml --num_train_epochs 2
    accelerate launch -m sa2va_trl.reward_net recipes/reward_net.yaml       # GPUs

The recipe is YAML with the fields of `RewardNetScriptArguments` (data, generation, network) and
of `RewardNetTrainingArguments` (transformers `TrainingArguments`; output_dir, report_to,
save_strategy, push_to_hub, hub_model_id, ...). Command-line flags override the recipe
(`--config RECIPE.yaml` works too). Steps:

1. data: load saved reward data (`data_path`), or build it from schema rows (the synthetic shapes
   world by default, or `rows_path`) with perturbed masks and, optionally, a policy's masks; save it;
2. split: hold out `eval_fraction` of the source images;
3. model: a new `LightweightRewardNetwork` (or `init_from` a trained one);
4. train with MSE through the transformers Trainer (logging, checkpoints, resume), on the true Dice
   or (`train_label: expected_dice`) on `expected_dice`;
5. save the model (safetensors + config) and evaluate on the held-out split against the true Dice:
   MSE, MAE, Pearson, Spearman, per perturbation kind, the true-Dice distribution, and the
   ambiguity floor (the MSE of `expected_dice`: what no image + mask network can get below, since
   a merge of several whole regions does not say which one was meant); printed as a table and
   written to `<output_dir>/reward_net_eval.json`;
6. push to the Hub when `push_to_hub` is set (the token is never logged).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import datasets
import numpy as np
import torch
import transformers
from transformers import EvalPrediction, Trainer, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from .checkpoint import SEED_CHECKPOINT_SUFFIXES, load_reward_net
from .data import RewardNetTorchDataset, generate_reward_data, split_by_source
from .metrics import evaluation_report, format_report, regression_metrics
from .model import LightweightRewardNetwork, RewardNetConfig
from .perturbations import PERTURBATION_KINDS

logger = logging.getLogger(__name__)

EVAL_FILENAME = "reward_net_eval.json"


@dataclass
class RewardNetScriptArguments:
    """Data, data generation and network options of the reward-network trainer."""

    data_path: str | None = field(
        default=None,
        metadata={"help": "Reward data saved by a previous run (datasets.load_from_disk); skips generation."},
    )
    rows_path: str | None = field(
        default=None,
        metadata={"help": "Schema rows to generate data from: a path `sa2va_trl.data.loaders.load_rows` reads "
                  "(GAR arrow, Sa2VA JSON, a saved schema dataset). None: the synthetic shapes world."},
    )
    rows_split: str | None = field(default=None, metadata={"help": "Split of rows_path to read (None: its default)."})
    max_rows: int | None = field(default=None, metadata={"help": "Use at most this many rows (regions)."})
    synthetic_images: int = field(default=600, metadata={"help": "Shapes-world images to generate (no rows_path)."})
    synthetic_image_size: int = field(default=128, metadata={"help": "Shapes-world image side in pixels."})
    synthetic_max_shapes: int = field(default=3, metadata={"help": "Shapes per synthetic image, at most."})
    synthetic_seed: int = field(default=0, metadata={"help": "Shapes-world seed."})
    samples_per_region: int = field(default=12, metadata={"help": "Perturbed masks per region."})
    num_dice_bins: int = field(
        default=10, metadata={"help": "Perturbed masks' Dice values visit this many equal bins of [0, 1] in turn."}
    )
    oversample: int = field(default=4, metadata={"help": "Candidate perturbations drawn per kept one."})
    perturbation_kinds: list[str] = field(
        default_factory=lambda: list(PERTURBATION_KINDS),
        metadata={"help": f"Perturbation kinds to use; any of {list(PERTURBATION_KINDS)}."},
    )
    policy: str | None = field(
        default=None,
        metadata={"help": "Sa2VA policy whose masks (segment(image, caption)) join the data: 'tiny' (a random "
                  "tiny model: poor masks, for tests) or a native Sa2VA model directory. None: perturbations only."},
    )
    policy_batch_size: int = field(default=8, metadata={"help": "Rows per policy.segment call."})
    max_image_side: int | None = field(
        default=None, metadata={"help": "Downscale stored images (and masks) to this longer side; None keeps them."}
    )
    data_seed_generation: int = field(default=0, metadata={"help": "Seed of the perturbations."})
    save_data_to: str | None = field(
        default=None, metadata={"help": "Where to save generated data; default <output_dir>/reward_data; 'none' skips."}
    )
    eval_fraction: float = field(default=0.15, metadata={"help": "Share of source images held out for evaluation."})
    input_size: int = field(default=128, metadata={"help": "Network input side (images and masks are resized)."})
    hflip: bool = field(default=True, metadata={"help": "Random left-right flips of training samples."})
    dihedral: bool = field(
        default=False,
        metadata={"help": "Also random top-bottom flips and transposes of training samples (with hflip: all 8 "
                  "symmetries of the square; none changes the Dice)."},
    )
    train_label: str = field(
        default="dice",
        metadata={"help": "Training target: 'dice', or 'expected_dice' (a merge of several whole regions labelled "
                  "with its mean Dice over the regions it could have been meant for: what a network that sees only "
                  "image and mask can know). The held-out evaluation always scores against the true Dice.",
                  "choices": ["dice", "expected_dice"]},
    )
    channels_last: bool = field(
        default=True,
        metadata={"help": "Keep the conv weights in channels-last memory format while training (on this 2-core CPU "
                  "at input 64, measured 10-25%% less time per training step; the saved weights are the same values)."},
    )
    init_from: str | None = field(
        default=None, metadata={"help": "Start from a trained network: a save_pretrained dir, a Hub id or a .pth."}
    )
    bn_recalibration_samples: int = field(
        default=1024,
        metadata={"help": "Before each evaluation and before saving, recompute BatchNorm running statistics with "
                  "the current weights over this many training samples (0: off). The running averages lag "
                  "weights that move fast at lr 1e-3, and eval-mode scores then drift far from train-mode ones."},
    )
    eval_only: bool = field(
        default=False,
        metadata={"help": "Skip training: evaluate init_from (e.g. a checkpoint-N directory) on the held-out split."},
    )


@dataclass
class RewardNetTrainingArguments(TrainingArguments):
    """transformers `TrainingArguments` with the seed's defaults (Adam, lr 1e-3, batch 4, 10 epochs).

    AdamW with weight_decay 0 is Adam. The learning rate is constant, as in the seed.
    """

    output_dir: str | None = field(default="outputs/reward_net", metadata={"help": "Checkpoints, model, eval JSON."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Adam learning rate (seed: 1e-3)."})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Batch size per device (seed: 4)."})
    per_device_eval_batch_size: int = field(default=64, metadata={"help": "Evaluation batch size per device."})
    num_train_epochs: float = field(default=10.0, metadata={"help": "Epochs (seed: 10)."})
    optim: str = field(default="adamw_torch", metadata={"help": "Optimizer; adamw_torch with weight_decay 0 is Adam."})
    weight_decay: float = field(default=0.0, metadata={"help": "Decoupled weight decay (0: plain Adam)."})
    lr_scheduler_type: str = field(default="constant", metadata={"help": "Learning-rate schedule (seed: constant)."})
    eval_strategy: str = field(default="epoch", metadata={"help": "When to evaluate on the held-out split."})
    save_strategy: str = field(default="epoch", metadata={"help": "When to save checkpoints."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Checkpoints kept on disk."})
    logging_steps: float = field(default=50, metadata={"help": "Log every this many steps."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Kept False: the dataset is custom."})


@torch.no_grad()
def recalibrate_batchnorm(model: torch.nn.Module, dataset, num_samples: int, batch_size: int = 64, seed: int = 0) -> int:
    """Recompute every BatchNorm's running mean / variance with the current weights.

    The statistics become the plain average over `num_samples` samples of `dataset` (a fixed random
    subset, the same on every process), taken in train mode without gradients; other parameters
    and the module's mode are left as they were.

    Args:
        model: the network.
        dataset: a dataset of {"pixel_values", ...} items.
        num_samples: how many samples to average over (all when larger than the dataset).
        batch_size: samples per forward pass.
        seed: picks the subset.

    Returns:
        The number of samples used (0 when the model has no BatchNorm or the dataset is empty).
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms or len(dataset) == 0 or num_samples <= 0:
        return 0
    indices = np.random.default_rng(seed).permutation(len(dataset))[:num_samples].tolist()
    device = next(model.parameters()).device
    was_training, momenta = model.training, [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the passes below
    model.train()
    try:
        for start in range(0, len(indices), batch_size):
            batch = torch.stack([dataset[i]["pixel_values"] for i in indices[start : start + batch_size]])
            model(batch.to(device))
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)
    return len(indices)


class RewardNetTrainer(Trainer):
    """transformers `Trainer` that recalibrates BatchNorm statistics before each evaluation.

    Overrides `evaluate` only (public API, transformers 5.x); see `recalibrate_batchnorm`.

    Args:
        bn_recalibration_samples: training samples averaged over (0: plain Trainer behaviour).
        *args, **kwargs: passed to `Trainer`.
    """

    def __init__(self, *args, bn_recalibration_samples: int = 1024, **kwargs):
        super().__init__(*args, **kwargs)
        self.bn_recalibration_samples = bn_recalibration_samples

    def recalibrate(self) -> None:
        """Recompute the BatchNorm statistics of `self.model` over the training set."""
        used = recalibrate_batchnorm(self.model, self.train_dataset, self.bn_recalibration_samples,
                                     batch_size=self.args.per_device_eval_batch_size, seed=self.args.seed)
        if used:
            logger.info("recalibrated BatchNorm statistics over %d training samples", used)

    def evaluate(self, *args, **kwargs):
        self.recalibrate()
        return super().evaluate(*args, **kwargs)


def parse_args(argv: Sequence[str] | None = None) -> tuple[RewardNetScriptArguments, RewardNetTrainingArguments]:
    """Parse `RECIPE.yaml` (positional or `--config`) plus command-line overrides.

    Args:
        argv: the arguments (default: `sys.argv[1:]`).

    Returns:
        (script_args, training_args).
    """
    from trl import TrlParser

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):
        recipe = argv.pop(0)
        if not os.path.isfile(recipe):
            raise FileNotFoundError(f"recipe {recipe!r} not found (usage: python -m sa2va_trl.reward_net RECIPE.yaml)")
        argv = ["--config", recipe, *argv]
    parser = TrlParser((RewardNetScriptArguments, RewardNetTrainingArguments))
    script_args, training_args = parser.parse_args_and_config(argv)
    return script_args, training_args


def load_policy(spec: str):
    """Build the Sa2VA policy named in a recipe.

    Args:
        spec: "tiny" (a random tiny native model: masks of poor quality) or a directory holding a
            native Sa2VA model and its tokenizer (`Sa2VAPolicy.from_pretrained`).

    Returns:
        A `Sa2VAPolicy`.
    """
    from ..models.adapter import Sa2VAPolicy

    if spec == "tiny":
        from ..models.tiny import build_tiny_model

        return Sa2VAPolicy(*build_tiny_model())
    if not os.path.isdir(spec):
        raise FileNotFoundError(f"policy {spec!r}: not 'tiny' nor a directory holding a native Sa2VA model + tokenizer")
    return Sa2VAPolicy.from_pretrained(spec)


def load_source_rows(args: RewardNetScriptArguments) -> datasets.Dataset:
    """The schema rows data is generated from: `rows_path`, or the synthetic shapes world.

    Args:
        args: the script arguments.

    Returns:
        A schema `datasets.Dataset` (at most `max_rows` rows).
    """
    if args.rows_path:
        from ..data.loaders import load_rows

        rows = load_rows(args.rows_path, split=args.rows_split, max_rows=args.max_rows)
    else:
        from ..data.synthetic import shapes_dataset

        rows = shapes_dataset(
            args.synthetic_images, seed=args.synthetic_seed, image_size=args.synthetic_image_size,
            max_shapes=args.synthetic_max_shapes,
        )
    if args.max_rows is not None:
        rows = rows.select(range(min(args.max_rows, len(rows))))
    return rows


def build_reward_data(
    args: RewardNetScriptArguments, output_dir: str, progress: bool = True, is_main_process: bool = True
) -> datasets.Dataset:
    """Load or generate the reward data (and save newly generated data).

    Under several processes the main process generates and saves; the others (run after it, see
    `main_process_first`) load what it saved instead of generating again.

    Args:
        args: the script arguments.
        output_dir: the run's output directory (default place to save the data).
        progress: show progress bars.
        is_main_process: whether this process generates and saves.

    Returns:
        The reward data (`data.reward_data_features()`).
    """
    if args.data_path:
        return datasets.load_from_disk(args.data_path)
    target = args.save_data_to or os.path.join(output_dir, "reward_data")
    save = target.lower() != "none"
    if save and not is_main_process and os.path.isdir(target):
        return datasets.load_from_disk(target)
    rows = load_source_rows(args)
    policy = load_policy(args.policy) if args.policy else None
    data = generate_reward_data(
        rows, samples_per_region=args.samples_per_region, num_bins=args.num_dice_bins, oversample=args.oversample,
        kinds=tuple(args.perturbation_kinds), policy=policy, policy_batch_size=args.policy_batch_size,
        max_image_side=args.max_image_side, seed=args.data_seed_generation, progress=progress,
    )
    if save and is_main_process:
        data.save_to_disk(target)
        logger.info("saved %d reward-data samples to %s", len(data), target)
    return data


def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
    """Trainer hook: MSE / MAE / Pearson / Spearman of the eval predictions (scores vs Dice)."""
    scores = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    metrics = regression_metrics(np.asarray(scores), np.asarray(prediction.label_ids))
    metrics.pop("count")
    return metrics


def evaluate_held_out(trainer: Trainer, eval_data: datasets.Dataset, eval_dataset: RewardNetTorchDataset) -> dict:
    """Score the held-out split and build the report (overall, per kind, true-Dice distribution).

    Args:
        trainer: the trained Trainer.
        eval_data: the held-out reward data (for the `kind` column).
        eval_dataset: the same rows as the Trainer's dataset.

    Returns:
        The `metrics.evaluation_report` dict.
    """
    output = trainer.predict(eval_dataset, metric_key_prefix="heldout")
    scores = output.predictions[0] if isinstance(output.predictions, tuple) else output.predictions
    expected = eval_data["expected_dice"] if "expected_dice" in eval_data.column_names else None
    return evaluation_report(np.asarray(scores).reshape(-1), np.asarray(eval_data["dice"], dtype=np.float64),
                             eval_data["kind"], expected_dice=expected)


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the whole pipeline (see the module docstring).

    Args:
        argv: command-line arguments (default: `sys.argv[1:]`).

    Returns:
        The held-out evaluation report (also written to `<output_dir>/reward_net_eval.json`).
    """
    script_args, training_args = parse_args(argv)
    if script_args.eval_only and not script_args.init_from:
        raise ValueError("eval_only needs init_from: the network to evaluate (a directory, Hub id or .pth)")
    start = time.time()

    # --- logging and seed ------------------------------------------------------------------
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    log_level = training_args.get_process_log_level()
    logger.setLevel(logging.INFO if training_args.should_log else log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    set_seed(training_args.seed)
    progress = not training_args.disable_tqdm

    # --- data --------------------------------------------------------------------------------
    with training_args.main_process_first(desc="reward data"):
        data = build_reward_data(script_args, training_args.output_dir, progress=progress,
                                 is_main_process=training_args.local_process_index == 0)
    train_data, eval_data = split_by_source(data, script_args.eval_fraction, seed=script_args.data_seed_generation)
    logger.info("reward data: %d train / %d held-out samples", len(train_data), len(eval_data))

    # --- model -------------------------------------------------------------------------------
    if script_args.init_from:
        is_pth = os.path.isfile(script_args.init_from) and script_args.init_from.endswith(SEED_CHECKPOINT_SUFFIXES)
        # a seed .pth carries no config: it gets the recipe's input size
        kwargs = {"config": RewardNetConfig(input_size=script_args.input_size)} if is_pth else {}
        model = load_reward_net(script_args.init_from, **kwargs)
        if model.config.input_size != script_args.input_size:
            raise ValueError(
                f"input_size {script_args.input_size} differs from {script_args.init_from}'s "
                f"{model.config.input_size}; set input_size: {model.config.input_size} in the recipe"
            )
        model.train()
    else:
        model = LightweightRewardNetwork(RewardNetConfig(input_size=script_args.input_size))
    if script_args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    config = model.config
    train_dataset = RewardNetTorchDataset(train_data, config.input_size, config.image_mean, config.image_std,
                                          hflip=script_args.hflip, dihedral=script_args.dihedral,
                                          label_column=script_args.train_label)
    eval_dataset = RewardNetTorchDataset(eval_data, config.input_size, config.image_mean, config.image_std)

    # --- train -------------------------------------------------------------------------------
    trainer = RewardNetTrainer(
        model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
        compute_metrics=compute_metrics, bn_recalibration_samples=script_args.bn_recalibration_samples,
    )
    if not script_args.eval_only:
        checkpoint = training_args.resume_from_checkpoint
        if checkpoint is None and os.path.isdir(training_args.output_dir):
            checkpoint = get_last_checkpoint(training_args.output_dir)
            if checkpoint is not None:
                logger.info("resuming from %s", checkpoint)
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.log_metrics("train", train_result.metrics)
        trainer.save_metrics("train", train_result.metrics)
        trainer.save_state()
        trainer.recalibrate()  # the saved model carries statistics that match its final weights
        trainer.save_model(training_args.output_dir)

    # --- held-out evaluation -------------------------------------------------------------------
    report = evaluate_held_out(trainer, eval_data, eval_dataset)
    report["num_train_samples"] = len(train_data)
    report["num_heldout_samples"] = len(eval_data)
    report["input_size"] = config.input_size
    report["wall_time_s"] = round(time.time() - start, 1)
    report["evaluated_model"] = script_args.init_from if script_args.eval_only else training_args.output_dir
    if trainer.is_world_process_zero():
        print(format_report(report))
        os.makedirs(training_args.output_dir, exist_ok=True)
        with open(os.path.join(training_args.output_dir, EVAL_FILENAME), "w") as f:
            json.dump(report, f, indent=2)
        logger.info("wrote %s", os.path.join(training_args.output_dir, EVAL_FILENAME))
    trainer.log({f"heldout_{k}": v for k, v in report["overall"].items()})

    # --- push ----------------------------------------------------------------------------------
    if training_args.push_to_hub and not script_args.eval_only:
        trainer.push_to_hub(commit_message="reward network: trained with sa2va-trl")
    return report
