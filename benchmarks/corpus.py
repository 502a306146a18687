"""English text that ships offline: this repository's docs and README, and the
docstrings of a fixed list of Python standard-library modules (``offline_text``, 0.3 MB);
or the larger ``stdlib_text`` (2.1 MB on CPython 3.11): the Python reference's topic
pages (``pydoc_data.topics``) and every docstring of the standard library's modules."""

from __future__ import annotations

import importlib
import inspect
import pathlib
import re
import sysconfig

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


def stdlib_text() -> str:
    """The topic pages of the Python reference that ``help()`` shows (pydoc_data.topics,
    0.46 MB on 3.11), then the docstrings of every standard-library module, class and
    function, read from the sources with ``ast`` (no module is imported; tests, idlelib
    and site-packages skipped; 1.7 MB), files in sorted order: the same text from the
    same CPython build (a distribution that splits modules out, as Debian does tkinter,
    gives a little less; the benchmarks freeze the text in their work folder). The
    held-out tail is therefore docstrings of the last
    modules in that order (xml, zipfile, zoneinfo, ...)."""
    import ast
    from pydoc_data import topics

    texts = [topics.topics[name] for name in sorted(topics.topics)]
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "lib2to3"}
    nodes = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    for path in sorted(root.rglob("*.py")):
        if skip & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        texts += [
            doc for n in ast.walk(tree) if isinstance(n, nodes) and (doc := ast.get_docstring(n))
        ]
    return "\n\n".join(texts)
