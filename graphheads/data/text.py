"""A byte-level language-modelling dataset over any UTF-8 file or folder."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from graphheads.data.tasks import TaskBatch

__all__ = ["ByteTextDataset", "bits_per_byte"]


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
        if not path.exists():
            raise FileNotFoundError(f"ByteTextDataset: {path} does not exist")
        files = (
            [path]
            if path.is_file()
            else sorted(  # hidden files: judged below the folder given, not above it
                p
                for p in path.rglob("*")
                if p.is_file() and not any(x.startswith(".") for x in p.relative_to(path).parts)
            )
        )
        if not files:
            raise ValueError(f"ByteTextDataset: the folder {path} holds no (non-hidden) files")
        chunks = []
        for f in files:
            raw = f.read_bytes()
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(
                    f"ByteTextDataset: {f} is not UTF-8 text ({err.reason} at byte {err.start})"
                ) from err
            chunks.append(raw)
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

    def sample(
        self, batch_size: int, generator: torch.Generator, *, split: str = "train"
    ) -> TaskBatch:
        """Random windows of ``seq_len + 1`` bytes -> (inputs, next-byte targets)."""
        if split not in ("train", "val"):
            raise ValueError(f"ByteTextDataset: split must be 'train' or 'val', got {split!r}")
        data = self.train if split == "train" else self.val
        starts = torch.randint(0, len(data) - self.seq_len - 1, (batch_size,), generator=generator)
        windows = torch.stack([data[s : s + self.seq_len + 1] for s in starts.tolist()])
        return TaskBatch(windows[:, :-1], windows[:, 1:])
