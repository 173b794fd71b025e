"""The one place that maps a backend name and a device to an implementation of the row contract.

    "triton"    Triton kernel: CUDA tensors, or CPU tensors when TRITON_INTERPRET=1 was set before import
    "cpu"       C++ kernel (dynsdpb_kernels/csrc/), CPU tensors; built on first use, reference with a warning if it cannot be
    "reference" readable PyTorch (reference.py), any device
    "auto"      CUDA -> "triton", CPU -> "cpu", anything else -> "reference" (with a warning where the
                chosen kernel is unavailable); the environment variable DYNSDPB_BACKEND, when set to one
                of the other names, replaces "auto" (an explicit backend argument always wins)
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable

import torch

from .reference import reference_fused_rows
from .contract import FusedRows

BACKENDS = ("auto", "triton", "cpu", "reference")
BACKEND_VARIABLE = "DYNSDPB_BACKEND"  # replaces backend="auto" when set
# Backends whose kernel selects and writes a top-k ring record (RowRecord.topk) in its pass over the row
# (C++: a min-heap per thread; Triton: per-lane candidates, triton_kernel.py); for the others
# loss.write_topk_record fills it before the kernel runs.
RECORDS_TOPK = frozenset({"cpu", "triton"})

RowKernel = Callable[..., FusedRows]


@functools.cache
def _triton_rows() -> RowKernel | None:
    try:
        from .triton_kernel import triton_fused_rows
    except ImportError:  # Triton is not installed on this platform
        return None
    return triton_fused_rows


@functools.cache
def _cpu_rows() -> RowKernel | None:
    from .cpu_kernel import cpu_fused_rows, load_extension

    try:
        load_extension()
    except Exception as error:  # no compiler, no ninja, or a failed build
        _warn_once(f"dynsdpb_kernels: the C++ CPU kernel is unavailable ({error}); using the reference backend")
        return None
    return cpu_fused_rows


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def resolve_backend(backend: str, device: torch.device) -> str:
    """Name of the implementation that `backend` selects for tensors on `device`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        chosen = os.environ.get(BACKEND_VARIABLE, "auto") or "auto"
        if chosen not in BACKENDS:
            raise ValueError(f"the environment variable {BACKEND_VARIABLE} must be one of {BACKENDS}, got {chosen!r}")
        if chosen != "auto":
            return resolve_backend(chosen, device)
        if device.type == "cuda":
            if _triton_rows() is not None:
                return "triton"
            _warn_once("dynsdpb_kernels: Triton is not installed; using the reference backend on CUDA")
        if device.type == "cpu" and _cpu_rows() is not None:
            return "cpu"
        return "reference"
    if backend == "cpu":
        if device.type != "cpu":
            raise ValueError(f"backend='cpu' runs on CPU tensors; got tensors on {device}")
        return "cpu" if _cpu_rows() is not None else "reference"
    if backend == "triton":
        if _triton_rows() is None:
            raise ValueError("backend='triton' needs the triton package, which is not importable here")
        if device.type != "cuda" and not (device.type == "cpu" and triton_interpreted()):
            raise ValueError(
                f"backend='triton' runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1); "
                f"got tensors on {device}"
            )
    return backend


def row_kernel(backend: str, device: torch.device) -> RowKernel:
    """The function implementing the row contract (contract.py) for `backend` on `device`."""
    name = resolve_backend(backend, device)
    kernel = {"triton": _triton_rows, "cpu": _cpu_rows}.get(name, lambda: reference_fused_rows)()
    assert kernel is not None
    return kernel
