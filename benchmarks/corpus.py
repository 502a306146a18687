"""English text that ships offline: this repository's docs and README, and the
docstrings of a fixed list of Python standard-library modules."""

from __future__ import annotations

import importlib
import inspect
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
STDLIB = (
    "argparse", "collections", "json", "logging", "pathlib", "subprocess", "threading",
    "unittest", "email.message", "http.client", "urllib.parse", "zipfile", "tarfile", "csv",
    "random", "statistics", "datetime", "decimal", "fractions", "asyncio", "socket", "shutil",
)  # fmt: skip


def stdlib_docs() -> str:
    texts = []
    for name in STDLIB:
        module = importlib.import_module(name)
        texts.append(inspect.getdoc(module) or "")
        for _, obj in sorted(vars(module).items()):
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and obj.__module__ == name:
                texts.append(inspect.getdoc(obj) or "")
    return "\n\n".join(texts)


def offline_text(extra: list[pathlib.Path] | None = None) -> str:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *(extra or [])]
    return "\n\n".join(f.read_text() for f in files) + "\n\n" + stdlib_docs()


def sentences(extra: list[pathlib.Path] | None = None) -> list[str]:
    text = re.sub(r"```.*?```", " ", offline_text(extra), flags=re.S)  # no code blocks
    text = re.sub(r"[#|*`>\[\]()_-]+", " ", text)
    parts = [" ".join(p.split()) for p in re.split(r"(?<=[.!?])\s+", text)]
    keep = {
        p for p in parts if 6 <= len(p.split()) <= 60 and sum(c.isalpha() for c in p) > 0.7 * len(p)
    }
    return sorted(keep)
