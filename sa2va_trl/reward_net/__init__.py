"""The learned reward CNN: predicts the Dice of a mask on its image.

- `LightweightRewardNetwork` / `RewardNetConfig` (model.py): the 140,193-parameter network, a
  transformers model (`save_pretrained`, `from_pretrained`, `push_to_hub`) with `score(images, masks)`.
- `load_reward_net` (checkpoint.py): a saved directory, a Hub id, or a seed-style `.pth`.
- `generate_reward_data` (data.py): (image, mask, Dice) training data from schema rows.
- `python -m sa2va_trl.reward_net RECIPE.yaml` (train.py): data -> training -> held-out evaluation.
"""

from .checkpoint import CheckpointLayoutError, UnsafeCheckpointError, load_reward_net, load_seed_checkpoint
from .data import generate_reward_data, reward_data_features, split_by_source
from .metrics import evaluation_report, regression_metrics
from .model import LightweightRewardNetwork, RewardNetConfig, RewardNetOutput
from .perturbations import PERTURBATION_KINDS, dice
from .preprocessing import MaskSizeError, RewardNetInputError, prepare_inputs

__all__ = [
    "LightweightRewardNetwork",
    "RewardNetConfig",
    "RewardNetOutput",
    "load_reward_net",
    "load_seed_checkpoint",
    "UnsafeCheckpointError",
    "CheckpointLayoutError",
    "generate_reward_data",
    "reward_data_features",
    "split_by_source",
    "evaluation_report",
    "regression_metrics",
    "PERTURBATION_KINDS",
    "dice",
    "prepare_inputs",
    "MaskSizeError",
    "RewardNetInputError",
]
