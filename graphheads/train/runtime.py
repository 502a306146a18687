"""Where and how the trainer computes: the device, the numeric precision, and stopping
cleanly on SIGINT/SIGTERM.

``train.device``: "auto" picks ``cuda:LOCAL_RANK`` under torchrun (``cuda`` otherwise)
when CUDA is available, else the CPU; any explicit device ("cpu", "cuda", "cuda:1")
is checked. ``train.precision``: "fp32"; "bf16" (``torch.autocast`` with bfloat16, on
CPU too); "fp16" (autocast with float16 plus a ``GradScaler``; CUDA only). Routing
(router logits, softmax, top-k, the load-balance loss) stays in fp32 whatever the
precision (:func:`graphheads.gates.moh_gates`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Any

import torch

__all__ = [
    "PRECISIONS",
    "StopSignals",
    "autocast",
    "check_precision",
    "grad_scaler",
    "model_flops_per_token",
    "peak_flops",
    "resolve_device",
    "restore_rng_states",
    "rng_states",
]

PRECISIONS = ("fp32", "bf16", "fp16")


def resolve_device(name: str) -> torch.device:
    """The device ``train.device`` names; ValueError naming it when it cannot be used."""
    if name == "auto":
        return resolve_device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"train.device {name!r} is not a device ({err})") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device {name!r}: this machine has no CUDA device; use 'cpu'")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"train.device {name!r}: only 'auto', 'cpu' and 'cuda[:N]' are supported")
    if device.type == "cuda" and device.index is None:  # this process's GPU, with its index
        local_rank = os.environ.get("LOCAL_RANK")  # (set_device and DDP need one); modulo
        # the visible GPUs: a launcher may show each rank only its own
        index = torch.cuda.current_device()
        if local_rank is not None:
            index = int(local_rank) % torch.cuda.device_count()
        device = torch.device("cuda", index)
    return device


def check_precision(precision: str, device: torch.device) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(
            f"train.precision 'fp16' needs CUDA (loss scaling); on {device.type} use 'bf16'"
        )


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager[None]:
    """The forward-pass context for ``precision`` (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """A loss scaler for fp16 (``None`` otherwise: bf16 has fp32's exponent range)."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def rng_states(device: torch.device) -> dict[str, Any]:
    """The random generators a training step draws from: the CPU's (``torch_rng``) and,
    on CUDA, ``device``'s (``cuda_rng``: dropout on the GPU draws from it)."""
    states: dict[str, Any] = {"torch_rng": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda_rng"] = torch.cuda.get_rng_state(device)
    return states


def restore_rng_states(states: dict[str, Any], device: torch.device) -> None:
    """Set the generators :func:`rng_states` saved; a CUDA state is restored only on a
    CUDA device (a run resumed on another kind of device draws afresh there)."""
    torch.set_rng_state(states["torch_rng"])
    if device.type == "cuda" and "cuda_rng" in states:
        torch.cuda.set_rng_state(states["cuda_rng"], device)


class StopSignals:
    """While active, SIGINT and SIGTERM set ``received`` (the loop stops at the next step
    boundary) and restore the previous handlers, so a second signal acts at once. Only in
    the main thread (Python delivers signals there); a no-op elsewhere."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: Any) -> None:
        self.received = signal.Signals(signum).name
        self.restore()

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __exit__(self, *exc: object) -> None:
        self.restore()


# dense bf16/fp16 tensor-core peaks (FLOP/s) of common GPUs, for model FLOPs utilisation
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}


def model_flops_per_token(num_params: int, num_layers: int, d_model: int, seq_len: int) -> float:
    """Training FLOPs per token, PaLM's count (Chowdhery et al. 2022, appendix B):
    ``6 N`` for the weights (forward + backward) plus ``12 L d T`` for attention scores."""
    return 6.0 * num_params + 12.0 * num_layers * d_model * seq_len


def peak_flops(device: torch.device, precision: str) -> float | None:
    """The device's dense bf16/fp16 peak from :data:`PEAK_FLOPS`, or ``None`` (CPU, fp32,
    an unknown GPU): then no utilisation is reported."""
    if device.type != "cuda" or precision == "fp32":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_FLOPS.items() if key in name), None)
