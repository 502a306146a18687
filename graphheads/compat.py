"""Renamed arguments: an old name keeps working for one release, with a
``DeprecationWarning`` that names the new one (the CHANGELOG lists every rename).

This module imports nothing of ours, so any module can use it.
"""

from __future__ import annotations

import warnings
from typing import TypeVar

__all__ = ["renamed_argument"]

T = TypeVar("T")


def renamed_argument(
    owner: str, old: str, old_value: T | None, new: str, new_value: T, *, stacklevel: int = 3
) -> T:
    """The value of argument ``new`` when the caller may still pass it as ``old``
    (``old_value`` is ``None`` when not passed): warns when ``old`` is used, and raises
    ValueError when both are given (``new_value`` not ``None``). ``stacklevel`` as in
    ``warnings.warn``, counted from here: 3 names the caller of the function that calls
    this one (one more for each decorator between)."""
    if old_value is None:
        return new_value
    if new_value is not None:
        raise ValueError(f"{owner}: got both {old}= and {new}=; pass {new}= only")
    warnings.warn(
        f"{owner}: {old}= is deprecated and will be removed in the next release; use {new}=",
        DeprecationWarning,
        stacklevel=stacklevel,
    )
    return old_value
