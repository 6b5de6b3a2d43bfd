"""Build the weighted list of reward functions a GRPO run sums.

Names are the built-ins ``"accuracy"`` (the verifier's score), ``"format"`` and ``"language"`` (R1's
language-consistency reward, ``r1kit.rewards.language``), or an import path
``"package.module:attribute"`` to a user reward. The attribute is either the reward itself, a
callable ``(completions, examples) -> list[float]``, or a class / zero-argument factory returning
one. The trainer sums ``weight * reward`` and logs each function under ``rewards/<name>``.
"""

from __future__ import annotations

import importlib
import inspect
import math
from typing import Any, Callable, Sequence

from r1kit.data.base import Example
from r1kit.errors import ConfigError
from r1kit.rewards.base import RewardFunction, Verifier
from r1kit.rewards.format import FormatReward
from r1kit.rewards.language import LanguageReward
from r1kit.rewards.math import AccuracyReward

BUILTIN_REWARDS = ("accuracy", "format", "language")


class UserReward:
    """A user reward callable with a name, checked for one finite float per completion.

    Raises ConfigError naming the reward when it returns the wrong number of values or a
    non-finite one."""

    def __init__(self, name: str, fn: Callable[..., Sequence[float]]):
        self.name = name
        self.fn = fn

    def __call__(self, completions: Sequence[str], examples: Sequence[Example]) -> list[float]:
        values = self.fn(completions, examples)
        return _finite_floats(values, len(completions), f"reward {self.name!r}", "completions")


def _finite_floats(values: Sequence[Any], count: int, what: str, per: str) -> list[float]:
    """``values`` as floats. Raises ConfigError naming ``what`` unless there are ``count`` of them
    (one per item of ``per``) and all are finite."""
    floats = [float(v) for v in values]
    if len(floats) != count:
        raise ConfigError(f"{what} has {len(floats)} values for {count} {per}; give one finite float each")
    if not all(math.isfinite(v) for v in floats):
        raise ConfigError(f"{what} has a non-finite value: {floats}")
    return floats


def _required_positional(fn: Callable[..., Any]) -> int | None:
    """Number of required positional parameters of ``fn``, or None if it takes ``*args``."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return None
    return sum(
        p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params
    )


def load_reward(path: str) -> RewardFunction:
    """Import a user reward from ``"package.module:attribute"``.

    Classes and callables with no required arguments are factories: they are called once and must
    return the reward callable. The reward's ``name`` attribute names its metric; the attribute name
    is used otherwise.

    Raises:
        ConfigError: the path is malformed, the module or attribute cannot be imported, or the
            object (or what its factory returns) is not a callable taking (completions, examples).
    """
    module_name, sep, attr = path.partition(":")
    if not (sep and module_name and attr):
        raise ConfigError(
            f"reward {path!r} is neither a built-in ({', '.join(BUILTIN_REWARDS)}) "
            "nor an import path 'package.module:callable'"
        )
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"reward {path!r} cannot be imported: {err}") from None
    if inspect.isclass(obj) or (callable(obj) and _required_positional(obj) == 0):
        obj = obj()
    if not callable(obj) or _required_positional(obj) not in (None, 2):
        raise ConfigError(
            f"reward {path!r} is not a callable (completions, examples) -> list[float], "
            "nor a class or factory returning one"
        )
    return UserReward(getattr(obj, "name", attr), obj)


def build_reward_functions(
    names: Sequence[str],
    weights: Sequence[float] | None,
    verifier: Verifier,
    *,
    think_in_prompt: bool = False,
) -> list[tuple[RewardFunction, float]]:
    """The reward functions of a run with their weights.

    Args:
        names: ``"accuracy"``, ``"format"``, ``"language"`` or import paths (see ``load_reward``).
        weights: one weight per name; None gives every function weight 1.0 (R1: accuracy and
            format with equal weight, GRPO_SPEC §4).
        verifier: checks answers for ``"accuracy"`` (the same object evaluation uses).
        think_in_prompt: the prompt ends with ``<think>`` (passed to ``FormatReward`` and
            ``LanguageReward``).

    Raises:
        ConfigError: no names, a weight count that differs from the name count, a non-finite
            weight, two functions with the same metric name, or a bad import path.
    """
    if not names:
        raise ConfigError("reward_funcs is empty; give at least one reward, e.g. ['accuracy', 'format']")
    if weights is None:
        weights = [1.0] * len(names)
    weights = _finite_floats(weights, len(names), "reward_weights", f"reward_funcs {list(names)}")
    functions: list[RewardFunction] = []
    for name in names:
        if name == "accuracy":
            functions.append(AccuracyReward(verifier))
        elif name == "format":
            functions.append(FormatReward(think_in_prompt))
        elif name == "language":
            functions.append(LanguageReward(think_in_prompt))
        else:
            functions.append(load_reward(name))
    metric_names = [f.name for f in functions]
    if len(set(metric_names)) != len(metric_names):
        raise ConfigError(f"reward names must be unique (they name metrics), got {metric_names}")
    return list(zip(functions, weights))
