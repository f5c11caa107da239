"""Tasks a recipe can run (generation, multiple choice, knowledge conflicts, needle and passkey retrieval) and the
runner that reports them; their configs are in :mod:`attnkit.recipe.tasks`."""

from attnkit.tasks.choice import run_choice, wilson_interval
from attnkit.tasks.generate import run_generate
from attnkit.tasks.report import summarize
from attnkit.tasks.result import TaskDataError, TaskResult
from attnkit.tasks.runner import run_recipe

__all__ = [
    "TaskDataError",
    "TaskResult",
    "run_choice",
    "run_generate",
    "run_recipe",
    "summarize",
    "wilson_interval",
]
