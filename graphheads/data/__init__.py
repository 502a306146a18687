"""Built-in, generated sequence tasks (no downloads)."""

from graphheads.data.tasks import IGNORE_INDEX, TaskBatch, copy_task

__all__ = ["IGNORE_INDEX", "TaskBatch", "copy_task"]
