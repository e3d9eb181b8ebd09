"""The reward registry: names -> factories, and recipe specs -> TRL's `reward_funcs` / `reward_weights`.

A factory is a class or function that takes the reward's options as keywords and returns a
reward function in TRL's convention (`fn(prompts, completions, completion_ids, **columns)`).
A registered plain reward function (one with a `completions` parameter) is its own factory and
takes no options. A name of the form `package.module:attribute` loads a user's reward.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .errors import RewardError, UnknownRewardError

__all__ = ["register_reward", "unregister_reward", "get_reward", "list_rewards", "build_rewards"]

_REGISTRY: dict[str, Callable[..., Callable]] = {}
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")
# Imported on first lookup so that their decorators run. `learned` (the reward CNN) is optional.
_BUILTIN_MODULES = ("masks", "meteor", "cycle")
_OPTIONAL_MODULES = ("learned",)
_builtins_loaded = False


def register_reward(name: str) -> Callable[[Callable], Callable]:
    """Class/function decorator: register a reward factory under `name`.

    Args:
        name: the registry name (letters, digits, `_`, `.`, `-`; no `:`, which marks user paths).

    Returns:
        The decorator; it returns the factory unchanged.

    Example:
        >>> @register_reward("doc_length_demo")
        ... class LengthReward:
        ...     __name__ = "doc_length_demo"
        ...     def __init__(self, scale=1.0):
        ...         self.scale = scale
        ...     def __call__(self, prompts, completions, completion_ids, **kwargs):
        ...         return [self.scale * len(c) for c in completions]
        >>> get_reward("doc_length_demo", scale=0.5)(prompts=["p"], completions=["abcd"], completion_ids=[[1]])
        [2.0]
        >>> unregister_reward("doc_length_demo")
    """
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"invalid reward name {name!r}: use letters, digits, '_', '.', '-' (':' marks module paths)")

    def decorator(factory: Callable) -> Callable:
        if not callable(factory):
            raise TypeError(f"register_reward({name!r}) needs a class or function, got {type(factory).__name__}")
        existing = _REGISTRY.get(name)
        if existing is not None and _qualified(existing) != _qualified(factory):
            raise ValueError(f"reward name {name!r} is already registered by {_qualified(existing)}")
        _REGISTRY[name] = factory
        return factory

    return decorator


def unregister_reward(name: str) -> None:
    """Remove `name` from the registry (tests and notebooks that re-register); unknown names raise."""
    _load_builtins()
    if name not in _REGISTRY:
        raise UnknownRewardError(f"is not registered; registered rewards: {list_rewards()}", reward=name)
    del _REGISTRY[name]


def _qualified(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def _load_builtins() -> None:
    global _builtins_loaded
    if _builtins_loaded:
        return
    for module in _BUILTIN_MODULES:
        importlib.import_module(f"{__package__}.{module}")
    for module in _OPTIONAL_MODULES:
        full = f"{__package__}.{module}"
        try:
            importlib.import_module(full)
        except ModuleNotFoundError as e:
            if e.name != full:  # the module exists but one of its own imports is missing: say so
                raise
    _builtins_loaded = True


def list_rewards() -> list[str]:
    """Names of all registered rewards, sorted (built-in ones included).

    Example:
        >>> {"mask_iou", "mask_dice", "caption_meteor", "cycle_iou", "cycle_meteor"} <= set(list_rewards())
        True
    """
    _load_builtins()
    return sorted(_REGISTRY)


def _is_reward_function(obj: Any) -> bool:
    """A plain reward function (has a `completions` parameter) rather than a factory."""
    if isinstance(obj, type):
        return False
    try:
        return "completions" in inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return False


def _check_options(factory: Callable, options: Mapping[str, Any], label: str) -> None:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [k for k, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and k != "self"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise RewardError(f"unknown option(s) {unknown}; options it takes: {accepted}", reward=label, field="options")


def _load_user(path: str) -> Any:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise UnknownRewardError(f"{path!r} is not of the form 'package.module:function'", reward=path)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UnknownRewardError(f"cannot import module {module_name!r} ({e})", reward=path) from e
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UnknownRewardError(f"module {module_name!r} has no attribute {attr!r}", reward=path)
        obj = getattr(obj, part)
    return obj


def get_reward(name: str, *, checked: bool = True, **options: Any) -> Callable:
    """Build a reward function from its registry name (or a `package.module:attribute` path).

    Args:
        name: a name from `list_rewards()`, or `package.module:attribute` naming a user reward
            function (used as is) or factory/class (called with `options`).
        checked: wrap the reward with `checked_reward` (output validation, errors naming the
            reward and row). Leave on unless you measure the overhead matters.
        **options: keyword options of the reward's factory (e.g. `reverse_policy=policy`).

    Returns:
        A callable in TRL's reward convention, with a stable `__name__`.

    Raises:
        UnknownRewardError: unknown name (the message lists the registered names).
        RewardError: an option the factory does not take.

    Example:
        >>> iou = get_reward("mask_iou")
        >>> iou.__name__, iou(prompts=["p"], completions=["c"], completion_ids=[[0]],
        ...                   region_mask=[[[1, 1]]], pred_mask=[[[1, 0]]])
        ('mask_iou', [0.5])
        >>> get_reward("mask_iuo")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        sa2va_trl.rewards.errors.UnknownRewardError: reward 'mask_iuo': unknown reward (did you mean 'mask_iou'?); ...
    """
    if not isinstance(name, str) or not name:
        raise UnknownRewardError(f"a reward name must be a non-empty str, got {name!r}; known: {list_rewards()}")
    if ":" in name:
        target = _load_user(name)
        if not callable(target):
            raise RewardError(f"is a {type(target).__name__}, not a reward function or factory", reward=name)
        if _is_reward_function(target) and not isinstance(target, type):
            if options:
                raise RewardError(f"is a reward function, not a factory: it takes no options, got {sorted(options)}", reward=name, field="options")
            reward = target
        else:
            _check_options(target, options, name)
            reward = target(**options)
    else:
        _load_builtins()
        if name not in _REGISTRY:
            close = difflib.get_close_matches(name, _REGISTRY, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UnknownRewardError(
                f"unknown reward{hint}; registered rewards: {list_rewards()}; "
                "a user reward can be named as 'package.module:function'",
                reward=name,
            )
        factory = _REGISTRY[name]
        if _is_reward_function(factory):
            if options:
                raise RewardError(f"takes no options, got {sorted(options)}", reward=name, field="options")
            reward = factory
        else:
            _check_options(factory, options, name)
            reward = factory(**options)
    if not callable(reward):
        raise RewardError(f"factory returned a {type(reward).__name__}, not a callable reward", reward=name)
    if checked:
        from .checks import checked_reward

        reward = checked_reward(reward)
    return reward


def _accepts(factory: Any, key: str) -> bool:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False
    return key in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def build_rewards(
    specs: Sequence[str | Mapping[str, Any]],
    weights: Sequence[float] | None = None,
    *,
    checked: bool = True,
    shared_options: Mapping[str, Any] | None = None,
) -> tuple[list[Callable], list[float]]:
    """Turn a recipe's reward list into TRL's `(reward_funcs, reward_weights)`.

    Args:
        specs: one entry per reward: a name (`"mask_iou"`, `"pkg.mod:fn"`) or a mapping
            `{"name": ..., "weight": 1.0, "options": {...}, "log_name": ...}` (`log_name` renames
            the logged `rewards/<name>/mean`, needed when one reward appears twice).
        weights: optional weights, one per spec (instead of the specs' `weight` keys; setting both
            is an error).
        checked: wrap each reward with `checked_reward`.
        shared_options: options given to every factory that takes them (e.g.
            `{"reverse_policy": ema_policy}` reaches only the cycle rewards).

    Returns:
        `(reward_funcs, reward_weights)`, ready for `GRPOTrainer(reward_funcs=...)` and
        `GRPOConfig(reward_weights=...)`.

    Example:
        >>> funcs, weights = build_rewards(["mask_iou", {"name": "caption_meteor", "weight": 0.5}])
        >>> [f.__name__ for f in funcs], weights
        (['mask_iou', 'caption_meteor'], [1.0, 0.5])
    """
    if isinstance(specs, (str, Mapping)) or not isinstance(specs, Sequence):
        raise RewardError(f"reward specs must be a list of names or mappings, got {type(specs).__name__}", field="rewards")
    if weights is not None and len(weights) != len(specs):
        raise RewardError(f"got {len(weights)} reward weights for {len(specs)} rewards", field="reward_weights")
    funcs: list[Callable] = []
    out_weights: list[float] = []
    for i, spec in enumerate(specs):
        if isinstance(spec, str):
            spec = {"name": spec}
        if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str):
            raise RewardError(f"a reward spec needs a 'name' (str), got {spec!r}", row=i, field="rewards")
        unknown = sorted(set(spec) - {"name", "weight", "options", "log_name"})
        if unknown:
            raise RewardError(
                f"unknown spec key(s) {unknown}; use 'name', 'weight', 'options', 'log_name'", row=i, field="rewards"
            )
        name = spec["name"]
        options = dict(spec.get("options") or {})
        if shared_options and ":" not in name:
            _load_builtins()
            factory = _REGISTRY.get(name)
            for key, value in shared_options.items():
                if key not in options and factory is not None and not _is_reward_function(factory) and _accepts(factory, key):
                    options[key] = value
        if "weight" in spec and weights is not None:
            raise RewardError("weight given both in the spec and in reward_weights", row=i, field="weight")
        weight = weights[i] if weights is not None else spec.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise RewardError(f"weight must be a finite number, got {weight!r}", reward=name, row=i, field="weight")
        reward = get_reward(name, checked=checked, **options)
        if spec.get("log_name"):
            from .checks import checked_reward

            reward = checked_reward(reward, name=spec["log_name"])
        funcs.append(reward)
        out_weights.append(float(weight))
    names = [getattr(f, "__name__", type(f).__name__) for f in funcs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise RewardError(
            f"rewards {duplicates} appear more than once and would be logged under the same name; "
            "give the copies a 'log_name'",
            field="rewards",
        )
    return funcs, out_weights
