"""``graphheads convert``: the command that converts, scores, tunes and saves a Hugging
Face model (:mod:`graphheads.cli` parses its arguments)."""

from __future__ import annotations

import argparse
import copy
import json
import random
import re
import sys
from pathlib import Path

import torch
from tqdm import tqdm


def read_sentences(path: Path, *, quiet: bool = False) -> list[str]:
    """The sentences of a UTF-8 file, or of every UTF-8 file in a folder (other files,
    images say, are skipped and named on stderr)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    if not path.exists() or not files:
        raise FileNotFoundError(f"no text at {path}")
    texts = []
    for file in files:
        try:
            texts.append(file.read_text(encoding="utf-8"))
        except UnicodeDecodeError as err:
            if path.is_file():
                raise ValueError(f"--text {file} is not UTF-8 text ({err.reason})") from err
            if not quiet:
                print(f"convert: skipping {file} (not UTF-8 text)", file=sys.stderr)
    text = " ".join(texts)
    parts = (" ".join(p.split()) for p in re.split(r"(?<=[.!?])\s+|\n\s*\n", text))
    return [p for p in parts if len(p.split()) >= 3]


def convert(args: argparse.Namespace) -> int:
    """``graphheads convert``: convert a local Hugging Face model, score heads, tune on
    text, save (the full form, or the adapter-only form with ``--adapter-only``)."""
    from graphheads.integrations import hf

    def status(text: str) -> None:
        if not args.quiet:
            print(f"convert: {text}", file=sys.stderr, flush=True)

    from transformers import AutoTokenizer  # after hf: a missing extra is named there

    status(f"loading {args.model}")
    model = hf.load_pretrained(args.model)
    original = copy.deepcopy(model)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    sentences = read_sentences(args.text, quiet=args.quiet)
    random.Random(args.seed).shuffle(sentences)
    held_out, train = sentences[: args.held_out], sentences[args.held_out :]
    if len(train) < args.batch_size:
        raise ValueError(
            f"--text has {len(sentences)} sentences: too few for --held-out and --batch-size"
        )

    def encode(batch: list[str]) -> dict[str, torch.Tensor]:
        return dict(
            tokenizer(batch, padding=True, truncation=True, max_length=128, return_tensors="pt")
        )

    causal = hasattr(model, "lm_head")

    def loss_fn(m: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if causal:
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            return m(**batch, labels=labels).loss
        with torch.no_grad():
            teacher = hf.mean_pool(original(**batch).last_hidden_state, batch["attention_mask"])
        student = hf.mean_pool(m(**batch).last_hidden_state, batch["attention_mask"])
        return 1 - (student * teacher).sum(-1).mean()

    def held_out_loss(m: torch.nn.Module) -> float:
        with torch.no_grad():
            return float(loss_fn(m.eval(), encode(held_out)))

    rng = random.Random(args.seed)
    calibration = [
        encode(rng.sample(train, args.batch_size)) for _ in range(args.calibration_batches)
    ]
    bar = {"disable": args.quiet, "unit": "batch", "file": sys.stderr}
    importance = hf.head_importance(model, tqdm(calibration, desc="head importance", **bar))
    hf.convert_to_goh(
        model,
        num_shared=args.num_shared,
        top_k=args.top_k,
        head_importance=importance,
        feature_dim=args.feature_dim,
        graph_layers=args.graph_layers,
    )
    status(f"held-out loss before tuning ({len(held_out)} sentences)")
    before = held_out_loss(model)
    batches = (encode(rng.sample(train, args.batch_size)) for _ in range(args.steps))
    hf.tune(
        model,
        tqdm(batches, desc="tune", total=args.steps, **bar),
        loss_fn,
        lr=args.lr,
        routers_only=args.mode == "routers",
        lora=args.mode == "lora",
    )
    status("held-out loss after tuning")
    after = held_out_loss(model)
    settings = {
        "steps": args.steps,
        "mode": args.mode,
        "head_importance": importance.tolist(),
        "held_out_loss": {
            "before_tuning": before,
            "after_tuning": after,
            "kind": "lm loss" if causal else "1 - cosine to the original embedding",
        },
    }
    status(f"saving to {args.out}")
    out = hf.save_converted(
        model, args.out, base_model=args.model, adapter_only=args.adapter_only, extra=settings
    )
    print(json.dumps({"out": str(out), **settings["held_out_loss"]}, indent=2))
    return 0
