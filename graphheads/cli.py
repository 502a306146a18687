"""The ``graphheads`` command line: train, eval, generate, report.

Errors in what the user gave (unknown task, config typo, missing or corrupt checkpoint)
print one ``graphheads: error: ...`` line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from graphheads.data import TaskSuite
from graphheads.train import CheckpointError, RunConfig, Trainer, evaluate, load_run

EXAMPLES = """examples:
  graphheads train --out runs/default
  graphheads train --out runs/moh --set model.attention=moh --set train.steps=500
  graphheads train --config run.yaml --out runs/mine
  graphheads eval --run runs/default
  graphheads generate --run runs/default --task reverse --num 3
  graphheads report --run runs/default
"""


def _train(args: argparse.Namespace) -> int:
    config = RunConfig.load(args.config, args.set or [])
    trainer = Trainer(config, args.out, progress=not args.quiet)
    result = trainer.fit(resume=not args.restart)
    if trainer.is_main:
        summary = {
            k: v for k, v in result.final_eval.items() if k in ("loss", "accuracy", "bits_per_byte")
        }
        print(
            json.dumps(
                {"step": result.step, "seconds": round(result.seconds, 1), **summary}, indent=2
            )
        )
        if not args.no_report:
            from graphheads.report import make_report

            print(f"report: {make_report(args.out)}")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


def _eval(args: argparse.Namespace) -> int:
    model, config, data, step = load_run(args.run)
    t = config.train
    result = evaluate(
        model, data, batches=t.eval_batches, batch_size=t.eval_batch_size, seed=t.seed
    )
    result.pop("head_usage", None)
    print(json.dumps({"step": step, **result}, indent=2))
    return 0


def _generate(args: argparse.Namespace) -> int:
    model, _, data, _ = load_run(args.run)
    if not isinstance(data, TaskSuite):
        raise ValueError("generate works on task-suite runs; this run trained on text")
    task = args.task or data.tasks[0]
    batch = data.sample(args.num, torch.Generator().manual_seed(args.seed), task=task)
    prompt_len = data.prompt_length(task)
    answer_len = 1 if task in ("mqar", "modadd") else data.length
    out = model.generate(batch.inputs[:, :prompt_len], answer_len)
    first = data.first_symbol
    for i in range(args.num):
        prompt = [t - first for t in batch.inputs[i, 1 : prompt_len - 1].tolist()]
        expected = [
            t - first
            for t in batch.targets[i, prompt_len - 1 : prompt_len - 1 + answer_len].tolist()
        ]
        got = [t - first for t in out[i, prompt_len:].tolist()]
        print(f"{task}: prompt {prompt} -> generated {got} (expected {expected})")
    return 0


def _report(args: argparse.Namespace) -> int:
    from graphheads.report import make_report

    print(f"report: {make_report(args.run)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="graphheads",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train", help="train a model (default: a small GoH LM on the built-in tasks)"
    )
    train.add_argument(
        "--out", type=Path, default=Path("runs/default"), help="run folder (default runs/default)"
    )
    train.add_argument(
        "--config", type=Path, help="JSON or YAML file with model/data/train sections"
    )
    train.add_argument(
        "--set", action="append", metavar="SECTION.KEY=VALUE", help="override one setting"
    )
    train.add_argument(
        "--restart", action="store_true", help="ignore an existing checkpoint in --out"
    )
    train.add_argument("--no-report", action="store_true", help="skip the report at the end")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=_train)
    for name, func, text in (
        ("eval", _eval, "evaluate a run"),
        ("report", _report, "write a run's report"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--run", type=Path, required=True, help="run folder or checkpoint file")
        p.set_defaults(func=func)
    gen = sub.add_parser("generate", help="answer task prompts with a trained model")
    gen.add_argument("--run", type=Path, required=True, help="run folder or checkpoint file")
    gen.add_argument("--task", help="task name (default: the run's first task)")
    gen.add_argument("--num", type=int, default=3)
    gen.add_argument("--seed", type=int, default=0)
    gen.set_defaults(func=_generate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError, CheckpointError) as err:
        parser.exit(2, f"graphheads: error: {err}\n")


if __name__ == "__main__":
    sys.exit(main())
