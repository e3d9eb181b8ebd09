"""Rewards for Sa2VA GRPO, in TRL's convention: `fn(prompts, completions, completion_ids, **columns) -> list[float | None]`.

None means "does not apply to this row" (TRL excludes it), so loop-1 and loop-2 rows share a
batch. Build rewards by name with `get_reward` / `build_rewards`; see `list_rewards()` for the
names (`mask_iou`, `mask_dice`, `caption_meteor`, `cycle_iou`, `cycle_meteor`, and `reward_net`
when `sa2va_trl.rewards.learned` is present). Every reward here also works in a stock
`trl.GRPOTrainer`.
"""

from .checks import checked_reward, validate_rewards
from .errors import (
    MaskFormatError,
    RewardError,
    RewardFailedError,
    RewardInputError,
    RewardOutputError,
    UnknownRewardError,
)
from .registry import build_rewards, get_reward, list_rewards, register_reward, unregister_reward
from .masks import MaskDice, MaskIoU, as_mask, as_mask_cached, batch_dice, batch_iou, dice, iou, mask_to_rle  # noqa: E402  (registers)
from .meteor import CaptionMeteor, meteor, meteor_tokens, tokenize  # noqa: E402
from .cycle import CycleIoU, CycleMeteor  # noqa: E402
from .wordnet import WordNetUnavailableError, load_wordnet  # noqa: E402

__all__ = [
    "register_reward",
    "unregister_reward",
    "get_reward",
    "list_rewards",
    "build_rewards",
    "checked_reward",
    "validate_rewards",
    "as_mask",
    "as_mask_cached",
    "mask_to_rle",
    "iou",
    "dice",
    "batch_iou",
    "batch_dice",
    "tokenize",
    "meteor",
    "meteor_tokens",
    "load_wordnet",
    "MaskIoU",
    "MaskDice",
    "CaptionMeteor",
    "CycleIoU",
    "CycleMeteor",
    "RewardError",
    "RewardInputError",
    "RewardOutputError",
    "RewardFailedError",
    "MaskFormatError",
    "UnknownRewardError",
    "WordNetUnavailableError",
]
