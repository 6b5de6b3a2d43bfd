"""Tasks (problems with verifiable answers) and prompt templates. Load problems with
``r1kit.data.loading.load_task``."""

from r1kit.data.base import Example, get_task_loader, register_task, task_names

__all__ = ["Example", "get_task_loader", "register_task", "task_names"]
