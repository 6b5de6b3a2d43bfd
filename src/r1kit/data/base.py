"""The data seam: ``Example`` rows and the task registry.

A task is a function ``(split, **options) -> list[Example]`` registered under a name with
``@register_task("name")``. Loaders validate every row at load time (a gold answer that cannot be
parsed raises ``DataError`` naming the file and row) so training never sees a row whose reward would
silently be 0 or 1 (GRPO_SPEC.md §5, open-r1 #215/#293).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from r1kit.errors import DataError

TaskLoader = Callable[..., "list[Example]"]
_TASKS: dict[str, TaskLoader] = {}
_TASK_VERIFIER: dict[str, str] = {}


@dataclass(frozen=True)
class Example:
    """One problem.

    Attributes:
        id: stable identifier, unique within the task (e.g. ``"gsm8k/train/17"``).
        prompt: the problem statement shown to the model (no template applied).
        gold: the reference answer as a string (math: the final answer; code: ``None``).
        meta: task-specific fields (code tests, entry point, subject, level, ...).
    """

    id: str
    prompt: str
    gold: str | None
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


def register_task(name: str, verifier: str = "math") -> Callable[[TaskLoader], TaskLoader]:
    """Register a task loader under ``name``; ``verifier`` names the verifier kind that checks its
    completions (see ``r1kit.rewards.registry``). Raises ValueError if the name is taken."""

    def wrap(fn: TaskLoader) -> TaskLoader:
        if name in _TASKS:
            raise ValueError(f"task {name!r} is already registered")
        _TASKS[name] = fn
        _TASK_VERIFIER[name] = verifier
        return fn

    return wrap


def task_names() -> list[str]:
    """Names of all registered tasks, sorted."""
    _import_builtin_tasks()
    return sorted(_TASKS)


def get_task_loader(name: str) -> TaskLoader:
    """The loader registered as ``name``. Raises DataError listing the known tasks if unknown."""
    _import_builtin_tasks()
    if name not in _TASKS:
        raise DataError(
            f"unknown task {name!r}; known tasks: {', '.join(sorted(_TASKS))}; "
            "or pass a local .jsonl/.parquet file with --prompt-field/--answer-field"
        )
    return _TASKS[name]


def task_verifier(name: str) -> str:
    """The verifier kind (``"math"``, ``"code"``, ...) registered for task ``name``."""
    get_task_loader(name)
    return _TASK_VERIFIER[name]


def _import_builtin_tasks() -> None:
    import importlib
    import pkgutil

    import r1kit.data as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name not in ("base", "templates"):
            importlib.import_module(f"r1kit.data.{mod.name}")
