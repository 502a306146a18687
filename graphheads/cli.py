"""The ``graphheads`` command line.

Errors in what the user gave (unknown task, config typo, missing or corrupt checkpoint),
which graphheads' own checks raise, print one ``graphheads: error: ...`` line and exit
with status 2; any other error keeps its traceback. Each command imports what it needs
when it runs, so ``--help`` and ``--version`` answer at once.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from graphheads import __version__

DESCRIPTION = "graphheads: attention heads as nodes of a learnable graph."

EXAMPLES = """examples:
  graphheads train --out runs/default
  graphheads train --out runs/moh --set model.attention=moh --set train.steps=500
  graphheads config > run.yaml    # every setting, its default and meaning; edit, then:
  graphheads train --config run.yaml --out runs/mine
  graphheads prepare --input corpus/ --tokenizer bytes --out shards/
  graphheads train --out runs/lm --set data.tokens='"shards/"' --set model.preset=llama-10m
  graphheads eval --run runs/default
  graphheads generate --run runs/default --task reverse --num 3
  graphheads generate --run runs/default --task sort --prompt "5 2 9 1 7 3"
  graphheads generate --run runs/text --prompt "The head graph"
  graphheads report --run runs/default
  graphheads viz --run runs/default   # runs/default/report/explorer.html (viz extra)
  graphheads export --run runs/default --out models/default
  graphheads continual --config stages.yaml --out runs/continual
  graphheads federated --mode personal --rounds 5 --out runs/federated
  graphheads convert --run runs/dense --attention goh --num-shared 2 --top-k 2 --out runs/goh
  graphheads convert --model hf-model/ --text notes.txt --num-shared 3 --top-k 3 --out out/
"""


class _HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: ...)`` where there is a default worth saying."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or action.default in (None, False, argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


def _continual(args: argparse.Namespace) -> int:
    from graphheads.train.config import read_config_file
    from graphheads.train.continual import ContinualConfig
    from graphheads.train.continual_run import ContinualRun

    config = ContinualConfig.from_dict(read_config_file(args.config))
    result = ContinualRun(config, args.out, progress=not args.quiet).run(resume=not args.restart)
    if result.interrupted:
        print(f"graphheads: stopped; rerun to continue ({args.out})", file=sys.stderr)
        return 130
    print(json.dumps({"tasks": result.tasks, "accuracy_matrix": result.matrix, **result.metrics}))
    print(f"report: {args.out / 'continual.json'}")
    return 0


def _federated(args: argparse.Namespace) -> int:
    from graphheads.integrations.federated import (
        APP_DIR,
        FederatedConfig,
        plot_rounds,
        run_federated,
    )

    if args.app_dir:  # for `flwr run "$(graphheads federated --app-dir)"`
        print(APP_DIR)
        return 0
    keys = ("rounds", "local_steps", "mode", "proximal_mu", "seed")
    config = FederatedConfig(num_clients=args.clients, **{k: getattr(args, k) for k in keys})
    records = run_federated(config, args.out, restart=args.restart)
    if records:
        last = {k: v for k, v in records[-1].items() if not k.startswith("usage")}
        print(json.dumps(last, indent=1))
        print(f"report: {plot_rounds(records, args.out / 'rounds.png')}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from graphheads.train import RunConfig, Trainer

    config = RunConfig.load(args.config, args.set or [])
    trainer = Trainer(config, args.out, progress=not args.quiet)
    result = trainer.fit(resume=not args.restart)
    if result.interrupted is not None:
        if trainer.is_main:
            print(
                f"graphheads: {result.interrupted} at step {result.step}: checkpoint written "
                f"to {args.out}; run the same command again to continue",
                file=sys.stderr,
            )
        _leave_process_group()
        return 130 if result.interrupted == "SIGINT" else 143
    if trainer.is_main:
        labels = {
            "loss": "eval_loss",
            "accuracy": "eval_accuracy",
            "bits_per_byte": "bits_per_byte",
        }
        summary = {labels[k]: v for k, v in result.final_eval.items() if k in labels}
        print(
            json.dumps(
                {"step": result.step, "seconds_this_run": round(result.seconds, 1), **summary},
                indent=2,
            )
        )
        if not args.no_report:
            _print_report(args.out)
    _leave_process_group()
    return 0


def _leave_process_group() -> None:
    """Every rank tears the group down together: a rank that left while rank 0 still
    evaluated was seen to abort in gloo's teardown (SIGABRT at exit)."""
    import torch

    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _eval(args: argparse.Namespace) -> int:
    from graphheads.train import evaluate, load_run

    model, config, data, step = load_run(args.run)
    t = config.train
    result = evaluate(
        model, data, batches=t.eval_batches, batch_size=t.eval_batch_size, seed=t.seed
    )
    result.pop("head_usage", None)
    print(json.dumps({"step": step, **result}, indent=2))
    return 0


def _export(args: argparse.Namespace) -> int:
    from graphheads.train import load_run

    if (Path(args.out) / "checkpoint.pt").exists():
        raise ValueError(f"export: {args.out} is a run folder; write the model to another one")
    model, run_config, _, step = load_run(args.run)
    extra = {"run_config": run_config.to_dict(), "step": step}
    out = model.save_pretrained(args.out, extra=extra)
    print(f"exported step {step} to {out}; load it with graphheads.load({str(out)!r})")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from graphheads.cli_generate import generate

    return generate(args)


def _prepare(args: argparse.Namespace) -> int:
    from graphheads.data import prepare_tokens

    header = prepare_tokens(
        args.input, args.out, tokenizer=args.tokenizer, val_fraction=args.val_fraction
    )
    print(json.dumps({"out": str(args.out), **header}, indent=2))
    return 0


def _config(args: argparse.Namespace) -> int:
    from graphheads.train.config import describe_settings

    print(describe_settings(), end="")
    return 0


def _print_report(run: Path) -> None:
    from graphheads.report import make_report

    folder = make_report(run)
    print(f"report: {folder}")
    if (folder / "explorer.html").exists():
        print(f"explorer: {folder / 'explorer.html'} (open it in a browser)")


def _report(args: argparse.Namespace) -> int:
    _print_report(args.run)
    return 0


def _viz(args: argparse.Namespace) -> int:
    from graphheads.explorer_page import write_explorer

    print(f"explorer: {write_explorer(args.run, args.out)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="graphheads",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"graphheads {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = sub.add_parser(
        "train",
        help="train a model (default: a small GoH LM on the built-in tasks)",
        formatter_class=_HelpWithDefaults,
    )
    train.add_argument("--out", type=Path, default=Path("runs/default"), help="run folder")
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
        p = sub.add_parser(name, help=text, formatter_class=_HelpWithDefaults)
        p.add_argument("--run", type=Path, required=True, help="run folder or checkpoint file")
        p.set_defaults(func=func)
    viz = sub.add_parser(
        "viz",
        help="write a run's interactive explorer: one offline HTML page (viz extra)",
        formatter_class=_HelpWithDefaults,
    )
    viz.add_argument("--run", type=Path, required=True, help="run folder or checkpoint file")
    viz.add_argument("--out", type=Path, help="HTML file (default: RUN/report/explorer.html)")
    viz.set_defaults(func=_viz)
    conf = sub.add_parser(
        "config", help="print every train setting with its default and meaning (a YAML file)"
    )
    conf.set_defaults(func=_config)
    export = sub.add_parser(
        "export",
        help="write a run's model as a Hugging Face-style folder (config.json, model.safetensors)",
        formatter_class=_HelpWithDefaults,
    )
    export.add_argument("--run", type=Path, required=True, help="run folder or checkpoint file")
    export.add_argument("--out", type=Path, required=True, help="folder to write")
    export.set_defaults(func=_export)
    cont = sub.add_parser(
        "continual",
        help="continual learning: stages of tasks, an accuracy matrix, forgetting",
        description="Train stage after stage (a JSON/YAML file of stages and a method; see "
        "docs/continual.md), evaluating every task after each stage.",
        formatter_class=_HelpWithDefaults,
    )
    cont.add_argument("--config", type=Path, required=True, help="JSON or YAML stages file")
    cont.add_argument("--out", type=Path, default=Path("runs/continual"), help="run folder")
    cont.add_argument("--restart", action="store_true", help="ignore an existing checkpoint")
    cont.add_argument("--quiet", action="store_true", help="no progress bars")
    cont.set_defaults(func=_continual)
    fed = sub.add_parser(
        "federated",
        help="federated training with Flower's simulation runtime (federated extra)",
        formatter_class=_HelpWithDefaults,
    )
    fed.add_argument("--out", type=Path, default=Path("runs/federated"), help="run folder")
    fed.add_argument("--clients", type=int, default=2, help="clients (each its own tasks)")
    fed.add_argument("--rounds", type=int, default=5, help="federated rounds")
    fed.add_argument(
        "--restart", action="store_true", help="start over in a folder that holds a run"
    )
    fed.add_argument("--local-steps", type=int, default=40, help="local steps per task held")
    fed.add_argument(
        "--mode",
        choices=["fedavg", "personal", "local"],
        default="fedavg",
        help="what the server averages: every weight, all but the routers, nothing",
    )
    fed.add_argument("--proximal-mu", type=float, default=0.0, help="FedProx's mu (0: off)")
    fed.add_argument("--seed", type=int, default=0)
    fed.add_argument(
        "--app-dir", action="store_true", help="print the Flower app folder for `flwr run`, exit"
    )
    fed.set_defaults(func=_federated)
    from graphheads.cli_convert import add_convert_parser

    add_convert_parser(sub, _HelpWithDefaults)
    prep = sub.add_parser(
        "prepare",
        help="tokenise a text corpus into memory-mapped shards (train with data.tokens=DIR)",
        formatter_class=_HelpWithDefaults,
    )
    prep.add_argument("--input", type=Path, required=True, help="UTF-8 file or folder")
    prep.add_argument(
        "--tokenizer", default="bytes", help="'bytes' or a local Hugging Face tokenizer folder"
    )
    prep.add_argument("--out", type=Path, required=True, help="new folder for the shards")
    prep.add_argument("--val-fraction", type=float, default=0.05, help="held-out tail")
    prep.set_defaults(func=_prepare)
    gen = sub.add_parser(
        "generate",
        help="continue a prompt with a trained model (task prompts or text)",
        formatter_class=_HelpWithDefaults,
    )
    gen.add_argument("--run", type=Path, required=True, help="run folder or checkpoint file")
    gen.add_argument(
        "--prompt",
        help="text runs: any text; task runs: symbols as numbers ('3 1 4'; mqar: "
        "'1 9 2 12 | 2'). Default: sampled task prompts, or the start of the held-out text",
    )
    gen.add_argument(
        "--task", help="task name (default: sampled prompts of every task; --prompt needs it)"
    )
    gen.add_argument("--num", type=int, default=3, help="sampled task prompts")
    gen.add_argument(
        "--max-new-tokens", type=int, help="text runs: bytes to generate (default: up to 200)"
    )
    gen.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="text runs: sampling temperature (0: greedy, the default)",
    )
    gen.add_argument("--seed", type=int, default=0, help="sampling seed")
    gen.set_defaults(func=_generate)
    return parser


def _raised_by_graphheads(err: BaseException) -> bool:
    """Whether ``err`` comes from a ``raise`` statement of graphheads' own code (a check of
    what the user gave), not from a library or a builtin it called (a bug: shown in full)."""
    import linecache

    package = Path(__file__).parent
    tb: TracebackType | None = err.__traceback__
    last = None
    while tb is not None:
        last, tb = tb, tb.tb_next
    if last is None:
        return False
    filename = last.tb_frame.f_code.co_filename
    line = linecache.getline(filename, last.tb_lineno).strip()
    return Path(filename).is_relative_to(package) and line.startswith("raise")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError, ModuleNotFoundError, RuntimeError) as err:
        if not _raised_by_graphheads(err):  # CheckpointError is a RuntimeError of ours
            raise
        parser.exit(2, f"graphheads: error: {err}\n")
    except KeyboardInterrupt:  # outside a training loop (which stops at a step boundary)
        parser.exit(130, "graphheads: interrupted\n")


if __name__ == "__main__":
    sys.exit(main())
