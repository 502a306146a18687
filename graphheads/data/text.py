"""A byte-level language-modelling dataset over any UTF-8 file or folder."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from graphheads.data.tasks import TaskBatch

__all__ = [
    "ByteTextDataset",
    "bits_per_byte",
    "byte_names",
    "read_text",
    "sample_windows",
    "text_files",
]

_NAMED_BYTES = {32: "\u2423", 10: "\\n", 9: "\\t", 13: "\\r"}  # a space: the open box


def byte_names(tokens: Sequence[int]) -> list[str]:
    """A name per byte token, for figures: printable ASCII as itself, a space as the open
    box, newline, tab and carriage return escaped, other bytes as ``\\xNN`` (a UTF-8
    character of several bytes is several names)."""
    return [_NAMED_BYTES.get(i, chr(i) if 32 < i < 127 else f"\\x{i:02x}") for i in tokens]


def text_files(path: str | Path) -> list[Path]:
    """A file, or every non-hidden file below a folder, sorted by path (hidden is judged
    below the folder given, not above it); FileNotFoundError when ``path`` is missing."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_file():
        return [path]
    return sorted(
        p
        for p in path.rglob("*")
        if p.is_file() and not any(x.startswith(".") for x in p.relative_to(path).parts)
    )


def read_text(path: Path) -> str:
    """A file's text; ValueError naming the file when it is not UTF-8."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from err


def sample_windows(
    data: Sequence[int] | Tensor | np.ndarray,
    seq_len: int,
    batch_size: int,
    generator: torch.Generator,
) -> TaskBatch:
    """Random windows of ``seq_len + 1`` tokens of ``data`` (a tensor or a memory map) ->
    (inputs, next-token targets), the starts drawn from ``generator``."""
    last = len(data) - seq_len - 1  # the last start whose window fits (inclusive)
    if last < 0:
        raise ValueError(f"sample_windows: {len(data)} tokens hold no window of {seq_len + 1}")
    starts = torch.randint(0, last + 1, (batch_size,), generator=generator)
    rows = [np.asarray(data[s : s + seq_len + 1], dtype=np.int64) for s in starts.tolist()]
    windows = torch.from_numpy(np.stack(rows))
    return TaskBatch(windows[:, :-1], windows[:, 1:])


def bits_per_byte(loss_nats: float) -> float:
    """Mean next-byte cross-entropy in nats -> bits per byte."""
    return loss_nats / math.log(2)


class ByteTextDataset:
    """Bytes of UTF-8 text (vocabulary 256), split into train and validation parts.

    Args:
        path: a UTF-8 text file, or a folder whose files (recursively, sorted by path,
            hidden files skipped) are concatenated.
        seq_len: tokens per training window (inputs and targets are ``seq_len`` long).
        val_fraction: the last part of the bytes held out for validation.
    """

    vocab_size = 256

    def __init__(self, path: str | Path, *, seq_len: int = 128, val_fraction: float = 0.1) -> None:
        path = Path(path)
        files = text_files(path)
        if not files:
            raise ValueError(f"ByteTextDataset: the folder {path} holds no (non-hidden) files")
        chunks = [read_text(f).encode("utf-8") for f in files]
        data = torch.frombuffer(bytearray(b"\n".join(chunks)), dtype=torch.uint8).long()
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"ByteTextDataset: val_fraction must be in (0, 1), got {val_fraction}")
        split = int(len(data) * (1 - val_fraction))
        self.train, self.val = data[:split], data[split:]
        if min(len(self.train), len(self.val)) <= seq_len:
            raise ValueError(
                f"ByteTextDataset: {path} has {len(data)} bytes: too few for seq_len={seq_len} "
                f"with val_fraction={val_fraction}"
            )
        self.seq_len = seq_len

    @property
    def max_seq_len(self) -> int:
        return self.seq_len

    def token_names(self, tokens: Sequence[int]) -> list[str]:
        """A name per token (:func:`byte_names`)."""
        return byte_names(tokens)

    def sample(
        self, batch_size: int, generator: torch.Generator, *, split: str = "train"
    ) -> TaskBatch:
        """Random windows of ``seq_len + 1`` bytes -> (inputs, next-byte targets)."""
        if split not in ("train", "val"):
            raise ValueError(f"ByteTextDataset: split must be 'train' or 'val', got {split!r}")
        return sample_windows(
            self.train if split == "train" else self.val, self.seq_len, batch_size, generator
        )
