r"""Which path one routed-attention call runs, and why: the execution policy that
:class:`~graphheads.routed.RoutedAttention` consults on every call.

Three paths, each a function of tensors, give equal outputs (and gradients) up to
rounding:

- ``"dense"``: every head, multiplied by its gate (static shapes: ``torch.compile``,
  DDP, FSDP).
- ``"sparse"``: only the active (token, head) pairs
  (:func:`graphheads.sparse.sparse_routed_attention`, backend from
  :func:`graphheads.flex.choose_sparse_backend`).
- ``"decode"``: one query token per sequence, inference: only the active heads' caches
  are read (:func:`graphheads.sparse.routed_decode_attention`).

=============  =================================  =======================================
``execution``  training / prompts (t > 1, grad,    one-token inference step
               or dropout active)
=============  =================================  =======================================
``"dense"``    dense                              dense
``"auto"``     dense                              decode when compiled and the skipped
                                                  cache bytes reach
                                                  ``DECODE_MIN_SKIPPED_BYTES``, else dense
``"sparse"``   sparse                             decode
=============  =================================  =======================================

The reasons are constant strings, so choosing a path under ``torch.compile`` adds no
guard beyond the one comparison of :func:`~graphheads.sparse.decode_pays`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor

from graphheads.flex import choose_sparse_backend
from graphheads.sparse import SparseBackend, decode_pays

__all__ = [
    "EXECUTIONS",
    "SPARSE_BACKENDS",
    "Execution",
    "ExecutionChoice",
    "ExecutionPath",
    "SparseBackendChoice",
    "choose_execution",
    "one_token_inference",
    "takes_sparse_path",
]

Execution = Literal["auto", "dense", "sparse"]
SparseBackendChoice = Literal["auto", "chunked", "flex"]
ExecutionPath = Literal["dense", "sparse", "decode"]
EXECUTIONS: tuple[Execution, ...] = ("auto", "dense", "sparse")
SPARSE_BACKENDS: tuple[SparseBackendChoice, ...] = ("auto", "chunked", "flex")


@dataclass(frozen=True)
class ExecutionChoice:
    """The path of one call (``"dense"``, ``"sparse"`` or ``"decode"``), why it was
    taken, and the sparse path's backend (``None`` on the other paths)."""

    path: ExecutionPath
    reason: str
    backend: SparseBackend | None = None


def one_token_inference(query_len: int, *, grad: bool, dropout_p: float) -> bool:
    """One query token per sequence, no autograd, no dropout: a step routed decoding can
    take."""
    return query_len == 1 and not grad and dropout_p == 0


def takes_sparse_path(
    execution: Execution, *, query_len: int, grad: bool, dropout_p: float
) -> bool:
    """Whether :func:`choose_execution` will pick ``"sparse"`` for this call; known
    before routing (it needs neither the keys nor the active heads), so a caller can
    project every head's queries only when another path will use them."""
    return execution == "sparse" and not one_token_inference(
        query_len, grad=grad, dropout_p=dropout_p
    )


def choose_execution(
    execution: Execution,
    *,
    query_len: int,
    grad: bool,
    dropout_p: float,
    key: Tensor,
    num_active: int,
    sparse_backend: SparseBackendChoice = "auto",
    compiled: bool | None = None,
) -> ExecutionChoice:
    """The path of one routed-attention call (the table in the module docstring).

    Args:
        execution: the module's setting, ``"auto"``, ``"dense"`` or ``"sparse"``.
        query_len: query tokens per sequence in this call.
        grad: whether autograd records this call.
        dropout_p: attention dropout in effect (0 in eval mode).
        key: the keys attended to (b, h_kv, s, e), cache included.
        num_active: query heads on per token (shared plus top-k).
        sparse_backend: the module's backend setting for the sparse path.
        compiled: as :func:`~graphheads.sparse.decode_pays` (``None``: the code running).
    """
    if execution not in EXECUTIONS:
        raise ValueError(
            f"choose_execution: execution must be 'auto', 'dense' or 'sparse', got {execution!r}"
        )
    if execution == "dense":
        return ExecutionChoice("dense", "execution='dense'")
    one_token = one_token_inference(query_len, grad=grad, dropout_p=dropout_p)
    if execution == "sparse":
        if one_token:
            return ExecutionChoice("decode", "execution='sparse', one-token inference step")
        backend = choose_sparse_backend(
            sparse_backend, key.device, grad=grad, dropout_p=dropout_p, head_dim=key.size(-1)
        )
        return ExecutionChoice("sparse", "execution='sparse'", backend)
    if not one_token:
        return ExecutionChoice("dense", "execution='auto' skips heads only when decoding")
    if decode_pays(key, num_active, compiled=compiled):
        return ExecutionChoice(
            "decode", "execution='auto', compiled, and the cache bytes skipped pay"
        )
    return ExecutionChoice(
        "dense",
        "execution='auto', one-token step: eager (the routed kernel would copy the "
        "caches), or too few cache bytes skipped to pay",
    )
