"""Tasks a recipe can run (generation, log-likelihood multiple choice) and the runner that reports them."""

from attnkit.tasks.choice import run_choice, wilson_interval
from attnkit.tasks.config import ChoiceTask, GenerateTask, TaskConfig, parse_task
from attnkit.tasks.generate import run_generate
from attnkit.tasks.report import summarize
from attnkit.tasks.result import TaskDataError, TaskResult
from attnkit.tasks.runner import run_recipe

__all__ = [
    "ChoiceTask",
    "GenerateTask",
    "TaskConfig",
    "TaskDataError",
    "TaskResult",
    "parse_task",
    "run_choice",
    "run_generate",
    "run_recipe",
    "summarize",
    "wilson_interval",
]
