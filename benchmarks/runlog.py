"""The runs file of a resumable benchmark (quality.py, study.py): one JSON record per
finished run, appended whole; an interrupted benchmark resumes from it."""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
from collections.abc import Callable


def load_records(path: pathlib.Path) -> list[dict]:
    """The records of ``path``. A torn last line (a run interrupted while writing) is cut
    off the file, so the next record starts on a line of its own."""
    if not path.exists():
        return []
    text = path.read_text()
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    records = []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return records


def append_record(path: pathlib.Path, record: dict) -> None:
    with open(path, "a") as fh:  # one whole line per finished run
        fh.write(json.dumps(record) + "\n")


def frozen_corpus(work: pathlib.Path, name: str = "corpus.txt") -> pathlib.Path:
    """``work/corpus.txt``: the offline English text (benchmarks/corpus.py), written at
    the first run and kept, so later changes to the docs do not change a benchmark;
    ``name="stdlib.txt"``: the larger standard-library text (``corpus.stdlib_text``)."""
    import corpus

    path = work / name
    if not path.exists():
        tmp = path.with_name(f".{name}.tmp")
        text = corpus.stdlib_text() if name == "stdlib.txt" else corpus.offline_text()
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return path


def add_runner_arguments(parser: argparse.ArgumentParser, work: str) -> None:
    """``--workers``, ``--work`` (default ``work``), ``--report-only`` and the hidden
    ``--run-one SPEC`` a worker process is started with."""
    parser.add_argument("--workers", type=int, default=2, help="runs at a time (1 thread each)")
    parser.add_argument("--work", type=pathlib.Path, default=pathlib.Path(work),
                        help="the study's folder (runs.jsonl, report.md, figures)")  # fmt: skip
    parser.add_argument(
        "--report-only", action="store_true", help="no runs: report what --work holds"
    )
    parser.add_argument("--run-one", help=argparse.SUPPRESS)


def completed(result):
    """A :class:`graphheads.train.TrainResult` that ran to its last step; ``SystemExit``
    if a signal stopped it (the worker fails and nothing is recorded; a rerun trains it
    again, or resumes it where its run folder is kept, as in continued.py)."""
    if result.interrupted:
        raise SystemExit(f"interrupted by {result.interrupted} after step {result.step}")
    return result


def run_worker_or_prepare(args: argparse.Namespace, run_one: Callable[[dict], dict]) -> bool:
    """In a worker (``--run-one``): run it, print its record, and return True; else make
    the work folder and return False."""
    if args.run_one:
        print(json.dumps(run_one(json.loads(args.run_one))))
        return True
    args.work.mkdir(parents=True, exist_ok=True)
    return False


def launch(script: str, spec: dict, pythonpath: str | None = None) -> dict:
    """Run one spec in a worker process of ``script`` (``--run-one``, one thread; with
    ``pythonpath`` first on its path) and return the record it printed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    done = subprocess.run(
        [sys.executable, script, "--run-one", json.dumps(spec)],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"{spec}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
