"""Sa2VA model backends and the policy adapter.

Importing this package registers the native backend with transformers' Auto classes
(model_type "sa2va_trl_native"), so `AutoConfig` / `AutoModel.from_pretrained(dir)` load it.
"""

from .adapter import LogprobOutput, MaskOutput, PromptBatch, Rollout, Sa2VAPolicy
from .configuration_sa2va import CHAT_TEMPLATES, MODEL_TYPE, Sa2VAConfig
from .image_processing import Sa2VAInputError
from .modeling_sa2va import Sa2VAModel
from .remote import RemoteSa2VAPolicy, is_published_sa2va, load_published_sa2va, policy_class_for
from .tiny import build_tiny_model, tiny_sa2va_config
from .tokenizer import build_tiny_tokenizer

__all__ = [
    "CHAT_TEMPLATES",
    "LogprobOutput",
    "MODEL_TYPE",
    "MaskOutput",
    "PromptBatch",
    "RemoteSa2VAPolicy",
    "Rollout",
    "Sa2VAConfig",
    "Sa2VAInputError",
    "Sa2VAModel",
    "Sa2VAPolicy",
    "build_tiny_model",
    "build_tiny_tokenizer",
    "is_published_sa2va",
    "load_published_sa2va",
    "policy_class_for",
    "tiny_sa2va_config",
]
