"""Built-in data: generated sequence tasks and byte-level text (no downloads)."""

from graphheads.data.shards import TokenShardDataset, prepare_tokens
from graphheads.data.tasks import (
    ALL_TASKS,
    EXTRA_TASKS,
    IGNORE_INDEX,
    PAD,
    SEP,
    TASKS,
    TaskBatch,
    TaskSuite,
    copy_task,
    to_device,
)
from graphheads.data.text import ByteTextDataset, bits_per_byte

__all__ = [
    "ALL_TASKS",
    "EXTRA_TASKS",
    "IGNORE_INDEX",
    "PAD",
    "SEP",
    "TASKS",
    "ByteTextDataset",
    "TaskBatch",
    "TaskSuite",
    "TokenShardDataset",
    "bits_per_byte",
    "copy_task",
    "prepare_tokens",
    "to_device",
]
