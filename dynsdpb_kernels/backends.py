"""The one place that maps a backend name and a device to an implementation of the row contract.

    "triton"    Triton kernel: CUDA tensors, or CPU tensors when TRITON_INTERPRET=1 was set before import
    "reference" readable PyTorch (reference.py), any device
    "auto"      CUDA -> "triton" (reference if Triton is missing), otherwise "reference"
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable

import torch

from .reference import reference_fused_rows
from .rows import FusedRows

BACKENDS = ("auto", "triton", "reference")

RowKernel = Callable[..., FusedRows]


@functools.cache
def _triton_rows() -> RowKernel | None:
    try:
        from .triton_kernel import triton_fused_rows
    except ImportError:  # Triton is not installed on this platform
        return None
    return triton_fused_rows


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
        if device.type == "cuda":
            if _triton_rows() is not None:
                return "triton"
            _warn_once("dynsdpb_kernels: Triton is not installed; using the reference backend on CUDA")
        return "reference"
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
    """The function implementing the row contract (rows.py) for `backend` on `device`."""
    name = resolve_backend(backend, device)
    if name == "triton":
        kernel = _triton_rows()
        assert kernel is not None
        return kernel
    return reference_fused_rows
