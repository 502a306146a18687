"""``graphheads generate``: continue task prompts or text with a trained run's model
(:mod:`graphheads.cli` parses the arguments)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

from graphheads.data import SEP, ByteTextDataset, TokenShardDataset
from graphheads.train import load_run
from graphheads.transformer import Transformer


def generate(args: argparse.Namespace) -> int:
    """Sampled task prompts (every task, or ``--task``), a ``--prompt``, or text."""
    model, _, data, _ = load_run(args.run)
    gen = torch.Generator().manual_seed(args.seed)
    if isinstance(data, TokenShardDataset) and not data.bytes_level:
        raise ValueError("generate: runs on Hugging Face-tokenised shards are not supported yet")
    if isinstance(data, ByteTextDataset | TokenShardDataset):
        return _generate_text(args, model, data, gen)
    if args.max_new_tokens is not None:
        raise ValueError("--max-new-tokens is for text runs; a task's answer length is fixed")
    if args.temperature != 0:
        raise ValueError("--temperature is for text runs; task answers are greedy")
    if args.num < 1:
        raise ValueError(f"generate: --num must be >= 1, got {args.num}")
    if args.task is None and args.prompt is not None and len(data.tasks) > 1:
        raise ValueError(
            f"generate: this run trained on {', '.join(data.tasks)}: say which task the "
            "prompt is for with --task"
        )
    for task in [args.task] if args.task is not None else list(data.tasks):
        _generate_task(args, model, data, task, gen)
    return 0


def _generate_task(
    args: argparse.Namespace, model: Any, data: Any, task: str, gen: torch.Generator
) -> None:
    """Sampled prompts of ``task`` (or ``--prompt``) and what the model generates."""
    if args.prompt is not None:
        prompt_tokens, answer_len = data.encode_prompt(task, args.prompt)
        expected = None
        trained, given = data.prompt_length(task), prompt_tokens.size(1)
        # copy/reverse/sort: the symbols typed (the task token and SEP are not)
        one_answer = ("mqar", "modadd", "hops")  # one answer token per prompt
        unit, extra = ("tokens", 0) if task in one_answer else ("symbols", 2)
        if given + answer_len - 1 > data.max_seq_len:
            # n symbols take n + 2 prompt tokens and n answer tokens, the last not fed back
            longest = (data.max_seq_len - 1) // 2 if extra else data.max_seq_len
            raise ValueError(
                f"generate: this {task} prompt ({given - extra} {unit}) and its answer do not "
                f"fit the run's context ({data.max_seq_len} tokens); the longest that fits "
                f"has {longest} {unit}"
            )
        if given != trained:
            print(
                f"graphheads: warning: this run trained on {task} prompts of "
                f"{trained - extra} {unit}; this one has {given - extra}: the model never "
                "saw its length",
                file=sys.stderr,
            )
    else:
        batch = data.sample(args.num, gen, task=task)
        prompt_len = data.prompt_length(task)
        answer_len = 1 if task in ("mqar", "modadd", "hops") else data.length
        prompt_tokens = batch.inputs[:, :prompt_len]
        expected = batch.targets[:, prompt_len - 1 : prompt_len - 1 + answer_len]
    if isinstance(model, Transformer):  # source up to SEP; the decoder starts at SEP
        sep = int((prompt_tokens[0] == SEP).nonzero()[0])
        start = prompt_tokens[:, sep:]
        new = model.generate(prompt_tokens[:, : sep + 1], start, answer_len)[:, start.size(1) :]
    else:
        new = model.generate(prompt_tokens, answer_len)[:, prompt_tokens.size(1) :]
    first = data.first_symbol
    for i in range(prompt_tokens.size(0)):
        got = [t - first for t in new[i].tolist()]
        line = f"{data.render(prompt_tokens[i].tolist())} -> generated {got}"
        if expected is not None:
            line += f" (expected {[t - first for t in expected[i].tolist()]})"
        print(line)


def _generate_text(
    args: argparse.Namespace,
    model: torch.nn.Module,
    data: ByteTextDataset | TokenShardDataset,
    gen: torch.Generator,
) -> int:
    """Continue a byte-level prompt (``--prompt``, default: the start of the held-out text)."""
    if args.task is not None:
        raise ValueError("--task is for task-suite runs; this run trained on text")
    text = args.prompt
    if text is None:
        held_out = data.val if isinstance(data, ByteTextDataset) else data.splits["val"]
        text = bytes(held_out[:48].tolist()).decode("utf-8", errors="ignore")
    prompt = list(text.encode("utf-8"))
    if not prompt:
        raise ValueError("--prompt is empty: give at least one character")
    room = data.max_seq_len - len(prompt) + 1  # the last new byte is not fed back
    n = args.max_new_tokens if args.max_new_tokens is not None else min(200, room)
    if n < 1 or n > room:
        raise ValueError(
            f"the prompt ({len(prompt)} bytes) + {n} new bytes must fit this run's "
            f"{data.max_seq_len}-byte context; shorten --prompt or lower --max-new-tokens"
        )
    out = model.generate(  # type: ignore[operator]
        torch.tensor([prompt]), n, temperature=args.temperature, generator=gen
    )
    print(f"prompt ({len(prompt)} bytes):\n{text}")
    print(f"generated ({n} bytes, {'greedy' if args.temperature == 0 else 'sampled'}):")
    print(bytes(out[0, len(prompt) :].tolist()).decode("utf-8", errors="replace"))
    return 0
