"""Renamed arguments: an old name keeps working for one release, with a
``DeprecationWarning`` that names the new one (the CHANGELOG lists every rename).

This module imports nothing of ours, so any module can use it.
"""

from __future__ import annotations

import warnings
from typing import TypeVar

from torch import Tensor

__all__ = ["FORWARD_STACKLEVEL", "padding_from_token_mask", "renamed_argument"]

FORWARD_STACKLEVEL = 5  # warn -> helper -> forward -> _call_impl -> _wrapped_call_impl -> caller

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


def padding_from_token_mask(
    owner: str, token_mask: Tensor | None, padding_mask: Tensor | None, *, stacklevel: int = 3
) -> Tensor | None:
    """``padding_mask`` (True at padding, the polarity of ``key_padding_mask``) when the
    caller may still pass the deprecated ``token_mask`` (True at real tokens: the other
    polarity, inverted here); warns when it is used, ValueError when both are given.
    ``stacklevel`` as in :func:`renamed_argument`; a module's ``forward`` passes
    :data:`FORWARD_STACKLEVEL` (``nn.Module.__call__`` adds two frames)."""
    if token_mask is None:
        return padding_mask
    if padding_mask is not None:
        raise ValueError(f"{owner}: got both token_mask= and padding_mask=; pass padding_mask=")
    warnings.warn(
        f"{owner}: token_mask= (True at real tokens) is deprecated and will be removed in "
        "the next release; use padding_mask= (True at padding, as key_padding_mask)",
        DeprecationWarning,
        stacklevel=stacklevel,
    )
    return ~token_mask.bool()
