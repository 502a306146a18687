"""Tokenised corpora as memory-mapped token shards.

:func:`prepare_tokens` (``graphheads prepare``) reads UTF-8 text (a file or a folder),
tokenises it (``"bytes"``, or a local Hugging Face tokenizer folder) and writes::

    DIR/header.json   format, tokenizer, vocab_size, dtype, token counts
    DIR/train.bin     the first (1 - val_fraction) of the tokens
    DIR/val.bin       the rest

as raw ``uint16`` when the vocabulary fits, else ``uint32``. Everything is written to a
temporary folder next to ``DIR`` and renamed at the end: an interrupted or refused
command leaves no ``DIR`` at all. :class:`TokenShardDataset` (``data.tokens=DIR``)
samples training windows from the memory maps without reading the corpus into RAM.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from graphheads.data.tasks import TaskBatch
from graphheads.data.text import byte_names, read_text, sample_windows, text_files
from graphheads.hub import usual_mode

__all__ = ["SHARD_FORMAT", "TokenShardDataset", "prepare_tokens"]

SHARD_FORMAT = "graphheads-tokens-v1"


def _tokenizer(name: str) -> tuple[Any, int, int | None]:
    """(encode function, vocabulary size, end-of-document id)."""
    if name == "bytes":
        return (lambda text: list(text.encode("utf-8"))), 256, 10  # documents end in "\n"
    try:
        from transformers import AutoTokenizer
    except ImportError as err:
        raise ModuleNotFoundError(
            "a Hugging Face tokenizer needs the 'hf' extra: pip install 'graphheads[hf]'",
            name=err.name,
        ) from err
    if not Path(name).is_dir():
        raise ValueError(f"--tokenizer must be 'bytes' or a local tokenizer folder, got {name!r}")
    tok = AutoTokenizer.from_pretrained(name)
    encode = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    return encode, len(tok), tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id


def prepare_tokens(
    source: str | Path, out: str | Path, *, tokenizer: str = "bytes", val_fraction: float = 0.05
) -> dict[str, Any]:
    """Tokenise ``source`` into shards in ``out`` (see the module docstring); returns the
    header. ``out`` must not exist yet (a ValueError names it otherwise). Documents are
    read, tokenised and written one at a time: memory holds one document, not the corpus."""
    out = Path(out)
    if out.exists():
        raise ValueError(f"{out} already exists; choose a new --out (nothing was written)")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    encode, vocab_size, eos = _tokenizer(tokenizer)
    if vocab_size > 2**32:
        raise ValueError(f"a vocabulary of {vocab_size} tokens does not fit uint32")
    dtype = np.uint16 if vocab_size <= 2**16 else np.uint32
    files = text_files(source)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        total, with_text = 0, 0
        with open(tmp / "train.bin", "wb") as fh:  # every token, one document at a time
            for f in files:
                text = read_text(f)
                with_text += bool(text.strip())
                ids = encode(text) + ([eos] if eos is not None else [])
                np.asarray(ids, dtype=dtype).tofile(fh)
                total += len(ids)
        if not with_text:
            raise ValueError(f"{source} holds no text")
        split = int(total * (1 - val_fraction))
        tokens = np.memmap(tmp / "train.bin", dtype=dtype, mode="r")
        tokens[split:].tofile(tmp / "val.bin")  # the tail, then cut it off the train file
        del tokens
        os.truncate(tmp / "train.bin", split * np.dtype(dtype).itemsize)
        header = {
            "format": SHARD_FORMAT,
            "tokenizer": tokenizer if tokenizer == "bytes" else str(Path(tokenizer).resolve()),
            "vocab_size": vocab_size,
            "dtype": np.dtype(dtype).name,
            "train_tokens": split,
            "val_tokens": total - split,
            "files": len(files),
        }
        (tmp / "header.json").write_text(json.dumps(header, indent=2))
        usual_mode(tmp)  # mkdtemp made the folder private (0700): the usual mode
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return header


class TokenShardDataset:
    """Windows of ``seq_len + 1`` tokens sampled from prepared shards (memory-mapped).

    Args:
        path: a folder written by :func:`prepare_tokens`.
        seq_len: tokens per training window.
    """

    def __init__(self, path: str | Path, *, seq_len: int = 128) -> None:
        path = Path(path)
        header_file = path / "header.json"
        if not header_file.exists():
            raise FileNotFoundError(
                f"TokenShardDataset: no header.json in {path} (graphheads prepare)"
            )
        header = json.loads(header_file.read_text())
        if header.get("format") != SHARD_FORMAT:
            raise ValueError(f"TokenShardDataset: {path} is not a {SHARD_FORMAT} folder")
        self.header = header
        self.vocab_size = int(header["vocab_size"])
        self.seq_len = seq_len
        self.bytes_level = header["tokenizer"] == "bytes"
        self.splits = {
            split: np.memmap(path / f"{split}.bin", dtype=header["dtype"], mode="r")
            for split in ("train", "val")
        }
        short = [s for s, data in self.splits.items() if len(data) <= seq_len + 1]
        if short:
            raise ValueError(
                f"TokenShardDataset: the {short} split of {path} has too few tokens for "
                f"seq_len={seq_len}"
            )

    @property
    def max_seq_len(self) -> int:
        return self.seq_len

    def token_names(self, tokens: Sequence[int]) -> list[str]:
        """A name per token: bytes for byte shards (:func:`~graphheads.data.text.byte_names`),
        ``#id`` for a tokenizer's ids (the shards keep no vocabulary)."""
        return byte_names(tokens) if self.bytes_level else [f"#{t}" for t in tokens]

    def sample(
        self, batch_size: int, generator: torch.Generator, *, split: str = "train"
    ) -> TaskBatch:
        """Random windows -> (inputs, next-token targets), as ``ByteTextDataset.sample``."""
        if split not in self.splits:
            raise ValueError(f"TokenShardDataset: split must be 'train' or 'val', got {split!r}")
        return sample_windows(self.splits[split], self.seq_len, batch_size, generator)
