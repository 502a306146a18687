"""Integrations with other libraries; each submodule needs its optional extra."""

from __future__ import annotations

import importlib


def require_extra(owner: str, extra: str, *modules: str) -> None:
    """Import ``modules`` or raise a ModuleNotFoundError naming the missing one and the
    extra that installs it (rather than a bare one from deep inside an import)."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ModuleNotFoundError(
                f"{owner} needs the {extra!r} extra ({err.name or module} is missing): "
                f"pip install 'graphheads[{extra}]'",
                name=err.name or module,
            ) from err
