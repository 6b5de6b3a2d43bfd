"""Tasks (problems with verifiable answers) and prompt templates."""

from r1kit.data.base import Example, get_task_loader, register_task, task_names
from r1kit.data.loading import load_task

__all__ = ["Example", "get_task_loader", "load_task", "register_task", "task_names"]
