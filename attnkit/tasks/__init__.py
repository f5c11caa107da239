"""Tasks a recipe can run: generation and log-likelihood multiple choice."""

from attnkit.tasks.config import ChoiceTask, GenerateTask, TaskConfig, parse_task

__all__ = ["ChoiceTask", "GenerateTask", "TaskConfig", "parse_task"]
