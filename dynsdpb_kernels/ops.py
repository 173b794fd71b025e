"""The row contract (contract.py) as torch.library operators, so that torch.compile captures a step whole.

One schema serves every backend:

    dynsdpb::fused_rows(logits, labels, teacher_rows?, teacher_index?, teacher_stats?, teacher_support?,
                        teacher_tail?, grad_scale, grad_out(a!)?, record_index?, record_rows(b!)?,
                        record_stats(c!)?, record_topk_values(d!)?, record_topk_support(e!)?,
                        record_topk_tail(f!)?, alpha, tau, dynamic_alpha, dynamic_tau, ignore_index,
                        softcap?, compute_grad, backend)
        -> (row_terms (N, 5), student_stats (N, 2), grad (N, V) or (0,))

    dynsdpb::fused_rows          custom_op around backends.row_kernel: the C++ kernel on CPU tensors, the
                                 reference elsewhere (opaque to the compiler, which calls it as one node)
    dynsdpb::triton_fused_rows   triton_op around the Triton launcher, whose launch goes through
                                 wrap_triton, so that Inductor sees the Triton kernel itself

The optional outputs of the Python contract travel as empty tensors: the gradient is (0,) when
compute_grad is False or when it was written into grad_out (the in-place mode), because an operator's
output may not alias its inputs. The fake implementation gives the output shapes without running
anything; it serves FakeTensor tracing and meta tensors alike.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor

from .backends import RECORDS_TOPK, resolve_backend, row_kernel, triton_interpreted
from .contract import N_ROW_TERMS, DistillConfig, FusedRows, RowRecord, TopkRecord, gradient_buffer, row_terms_dtype

MUTATED = ("grad_out", "record_rows", "record_stats", "record_topk_values", "record_topk_support", "record_topk_tail")


def _run_row_kernel(
    logits: Tensor,
    labels: Tensor,
    teacher_rows: Tensor | None,
    teacher_index: Tensor | None,
    teacher_stats: Tensor | None,
    teacher_support: Tensor | None,
    teacher_tail: Tensor | None,
    grad_scale: Tensor,
    grad_out: Tensor | None,
    record_index: Tensor | None,
    record_rows: Tensor | None,
    record_stats: Tensor | None,
    record_topk_values: Tensor | None,
    record_topk_support: Tensor | None,
    record_topk_tail: Tensor | None,
    alpha: float,
    tau: float,
    dynamic_alpha: bool,
    dynamic_tau: bool,
    ignore_index: int,
    softcap: float | None,
    compute_grad: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Both operators' body: unpack the flat schema into the Python contract and run `backend`'s kernel."""
    dynamic = DistillConfig.dynamic_mode(dynamic_alpha, dynamic_tau)
    config = DistillConfig(alpha=alpha, tau=tau, dynamic=dynamic, ignore_index=ignore_index, softcap=softcap)
    topk = None
    if record_topk_values is not None:
        assert record_topk_support is not None and record_topk_tail is not None
        topk = TopkRecord(record_topk_values, record_topk_support, record_topk_tail)
    record = RowRecord(record_index, record_rows, record_stats, topk) if record_index is not None else None
    rows = row_kernel(backend, logits.device)(
        logits,
        labels,
        teacher_rows,
        teacher_index,
        teacher_stats,
        config,
        grad_scale,
        compute_grad,
        grad_out=grad_out,
        record=record,
        teacher_support=teacher_support,
        teacher_tail=teacher_tail,
    )
    grad = rows.grad if rows.grad is not None and grad_out is None else logits.new_empty(0)
    return rows.row_terms, rows.student_stats, grad


fused_rows_op = torch.library.custom_op("dynsdpb::fused_rows", _run_row_kernel, mutates_args=MUTATED)


_SCHEMA = inspect.signature(_run_row_kernel)


def _fake_fused_rows(*args, **kwargs) -> tuple[Tensor, Tensor, Tensor]:
    """Output shapes of the operators, by name from their one schema; nothing runs."""
    arguments = _SCHEMA.bind(*args, **kwargs).arguments
    logits = arguments["logits"]
    row_terms = logits.new_empty(logits.shape[0], N_ROW_TERMS, dtype=row_terms_dtype(logits.dtype))
    student_stats = logits.new_empty(logits.shape[0], 2, dtype=torch.float32)
    fresh_grad = arguments["compute_grad"] and arguments["grad_out"] is None
    grad = gradient_buffer(logits, fresh_grad, None) if fresh_grad else logits.new_empty(0)
    return row_terms, student_stats, grad


fused_rows_op.register_fake(_fake_fused_rows)

try:
    import triton  # noqa: F401  (the Triton operator exists only where Triton does)
except ImportError:
    triton_fused_rows_op = None
else:
    triton_fused_rows_op = torch.library.triton_op("dynsdpb::triton_fused_rows", _run_row_kernel, mutates_args=MUTATED)


# The backend is resolved once per (name, device) at trace time: a constant for the compiler, which would
# otherwise trace into the cached kernel loaders.
_resolve_backend = torch.compiler.assume_constant_result(resolve_backend)
_triton_interpreted = torch.compiler.assume_constant_result(triton_interpreted)


def records_topk(backend: str, device: torch.device) -> bool:
    """Whether `backend` on `device` writes a top-k record (RowRecord.topk) itself, inside its kernel."""
    return _resolve_backend(backend, device) in RECORDS_TOPK


def fused_rows(
    logits: Tensor,
    labels: Tensor,
    teacher_rows: Tensor | None,
    teacher_index: Tensor | None,
    teacher_stats: Tensor | None,
    config: DistillConfig,
    grad_scale: Tensor,
    compute_grad: bool,
    grad_out: Tensor | None = None,
    record: RowRecord | None = None,
    teacher_support: Tensor | None = None,
    teacher_tail: Tensor | None = None,
    backend: str = "auto",
) -> FusedRows:
    """The row contract (contract.py) through the operator of `backend` on logits' device; same arguments and
    results as the backends' own functions, plus the backend's name."""
    name = _resolve_backend(backend, logits.device)
    # Under Triton's CPU interpreter the kernel is no JITFunction that wrap_triton can trace, so it runs
    # inside the opaque operator instead (the same launcher, the same results).
    traceable_triton = name == "triton" and not _triton_interpreted()
    op = torch.ops.dynsdpb.triton_fused_rows if traceable_triton else torch.ops.dynsdpb.fused_rows
    topk = record.topk if record is not None and name in RECORDS_TOPK else None  # others: loss.write_topk_record
    topk_storage = (topk.values, topk.support, topk.tail) if topk is not None else (None, None, None)
    row_terms, student_stats, grad = op(
        logits,
        labels,
        teacher_rows,
        teacher_index,
        teacher_stats,
        teacher_support,
        teacher_tail,
        grad_scale,
        grad_out,
        record.index if record is not None else None,
        record.ring_logits if record is not None else None,
        record.stats if record is not None else None,
        *topk_storage,
        float(config.alpha),
        float(config.tau),
        config.dynamic_alpha,
        config.dynamic_tau,
        int(config.ignore_index),
        float(config.softcap) if config.softcap is not None else None,
        compute_grad,
        name,
    )
    if not compute_grad:
        grad = None
    elif grad_out is not None:
        grad = grad_out
    return FusedRows(row_terms=row_terms, student_stats=student_stats, grad=grad)
