"""The LM head and the DynSDPB loss fused, chunk by chunk over the tokens: the (N, V) logits never exist.

For hidden states h (N, H), the head's weight W (V, H) and bias b (V,):

    for each chunk c of rows:
        z_c = h_c W^T + b                      (C, V), the only logits in memory
        rows kernel: loss terms of c, teachers recorded into the ring, and g_c = dL/dz_c written over z_c
        dL/dh_c  = g_c W                       (C, H)
        dL/dW   += g_c^T h_c                   (V, H), accumulated in accum_dtype
        dL/db   += sum_rows g_c

The loss normalisers (1 / n_valid, 1 / n_distilled) are computed from all labels and teachers before the
first chunk, so each chunk's gradient is final when it is written; backward only scales the three saved
gradients by grad_output. Peak memory above the inputs: one chunk of logits plus dL/dh and dL/dW.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .loss import (
    LossOptions,
    _check_float,
    _check_options,
    fused_loss,
    labels_out_of_range,
    mean_grad_scale,
    raise_for_bad_labels,
    teacher_index_from_mask,
)
from .rows import N_ROW_TERMS, DistillConfig, RowRecord, row_terms_dtype

# The chunk of logits a call may hold at once when chunk_size is not given: small on the CPU, where a
# chunk of a few hundred rows already keeps the cores busy, larger on a GPU, which needs thousands of
# rows in flight to fill its SMs.
DEFAULT_CHUNK_BYTES = {"cpu": 64 * 2**20, "cuda": 256 * 2**20}


def default_chunk_size(n_rows: int, vocab_size: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> int:
    """Rows per chunk so that one chunk of logits (rows x V in `dtype`) fits in DEFAULT_CHUNK_BYTES of the
    device type (at least 1 row)."""
    budget = DEFAULT_CHUNK_BYTES.get(torch.device(device).type, DEFAULT_CHUNK_BYTES["cpu"])
    per_row = vocab_size * torch.finfo(dtype).bits // 8
    return max(1, min(n_rows, budget // per_row))


@dataclass(frozen=True)
class Teachers:
    """The teacher side of a call (rows.py): rows (R, V) or top-k values (R, k) with their support ids and
    tail mass, the row index (N,) and the (u, d) statistics (R, 2); `topk_writer` stores a top-k ring's rows."""

    rows: torch.Tensor | None = None
    index: torch.Tensor | None = None
    stats: torch.Tensor | None = None
    support: torch.Tensor | None = None
    tail: torch.Tensor | None = None
    topk_writer: object | None = None  # TeacherRing with storage="topk", or None


@dataclass
class LinearResult:
    """What fused_linear_loss returns: the loss (0-d), the (N, 5) row terms, the (N, 2) student
    statistics, and the gradients of the loss (None when not computed)."""

    loss: torch.Tensor
    row_terms: torch.Tensor
    student_stats: torch.Tensor
    grad_hidden: torch.Tensor | None
    grad_weight: torch.Tensor | None
    grad_bias: torch.Tensor | None


def fused_linear_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    teachers: Teachers,
    options: LossOptions,
    *,
    compute_grad: bool,
    record: RowRecord | None = None,
    grad_scale: torch.Tensor | None = None,
    chunk_size: int | None = None,
    accum_dtype: torch.dtype | None = None,
) -> LinearResult:
    """Loss and gradients of hidden (N, H) through the head weight (V, H) (+ bias (V,)) and the DynSDPB
    loss, chunked over rows (module docstring). Arguments as in loss.fused_loss; `accum_dtype`
    (e.g. torch.float32) accumulates dL/dW and dL/db across chunks in that dtype (default: weight's)."""
    _check_options(options)
    _check_float("hidden", hidden, (torch.float32, torch.bfloat16, torch.float16, torch.float64))
    _check_float("weight", weight, (hidden.dtype,))
    if hidden.dim() != 2 or weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"hidden must be (N, H) and weight (V, H) with the same H, got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != hidden.dtype):
        raise ValueError(f"bias must be ({weight.shape[0]},) of dtype {hidden.dtype}, got {bias.dtype} {tuple(bias.shape)}")
    for name, tensor in (("weight", weight), ("labels", labels), ("bias", bias)):
        if tensor is not None and tensor.device != hidden.device:
            raise ValueError(f"{name} is on {tensor.device} but hidden is on {hidden.device}")
    n_rows, vocab_size = hidden.shape[0], weight.shape[0]
    if labels.shape != (n_rows,):
        raise ValueError(f"labels must have shape ({n_rows},) to match hidden {tuple(hidden.shape)}, got {tuple(labels.shape)}")
    config = options.distill
    labels = labels.long()
    if grad_scale is None:
        grad_scale = mean_grad_scale(labels, teachers.index, config.ignore_index)
    chunk = chunk_size or default_chunk_size(n_rows, vocab_size, hidden.dtype, hidden.device)
    # each chunk: the kernel writes the gradient over its own logits buffer; checks run once, at the end
    chunk_options = replace(options, reduction="mean", inplace_grad=True, validate=False)

    device = hidden.device
    row_terms = torch.empty(n_rows, N_ROW_TERMS, dtype=row_terms_dtype(hidden.dtype), device=device)
    student_stats = torch.empty(n_rows, 2, dtype=torch.float32, device=device)
    accum = accum_dtype or weight.dtype
    grad_hidden = torch.empty_like(hidden) if compute_grad else None
    grad_weight = torch.zeros(weight.shape, dtype=accum, device=device) if compute_grad else None
    grad_bias = torch.zeros(vocab_size, dtype=accum, device=device) if compute_grad and bias is not None else None
    loss = torch.zeros((), dtype=row_terms.dtype, device=device)
    for start in range(0, n_rows, chunk):
        rows = slice(start, min(start + chunk, n_rows))
        hidden_chunk = hidden[rows]
        logits = hidden_chunk @ weight.T if bias is None else torch.addmm(bias, hidden_chunk, weight.T)
        chunk_record = RowRecord(record.index[rows], record.rows, record.stats) if record is not None else None
        if teachers.topk_writer is not None:
            teachers.topk_writer.write_topk(logits, chunk_record, config)
        chunk_loss, chunk_rows = fused_loss(
            logits,
            labels[rows],
            teachers.rows,
            teachers.index[rows] if teachers.index is not None else None,
            teachers.stats,
            chunk_options,
            compute_grad,
            record=chunk_record,
            grad_scale=grad_scale,
            teacher_support=teachers.support,
            teacher_tail=teachers.tail,
        )
        loss = loss + chunk_loss
        row_terms[rows] = chunk_rows.row_terms
        student_stats[rows] = chunk_rows.student_stats
        if compute_grad:
            grad = chunk_rows.grad  # the logits buffer, now dL/dz of this chunk
            torch.mm(grad, weight, out=grad_hidden[rows])
            if accum == weight.dtype:
                grad_weight.addmm_(grad.T, hidden_chunk)  # no (V, H) temporary
            else:
                grad_weight += (grad.T @ hidden_chunk).to(accum)
            if grad_bias is not None:
                grad_bias += grad.sum(0, dtype=accum)
        del logits, chunk_rows

    if options.validate:
        _check_values(labels, vocab_size, config.ignore_index, row_terms, student_stats)
    return LinearResult(loss, row_terms, student_stats, grad_hidden, grad_weight, grad_bias)


def _check_values(labels, vocab_size, ignore_index, row_terms, student_stats) -> None:
    """Label range and finiteness, read from the kernel's outputs with one host sync."""
    bad_rows = ~torch.isfinite(row_terms).all(1) | ~torch.isfinite(student_stats).all(1)
    if not (labels_out_of_range(labels, vocab_size, ignore_index).any() | bad_rows.any()).item():
        return
    raise_for_bad_labels(labels, vocab_size, ignore_index)
    rows = bad_rows.nonzero().squeeze(1)
    raise ValueError(
        f"hidden and weight give logits with NaN or inf (or a teacher row does) in {rows.numel()} rows, "
        f"e.g. rows {rows[:5].tolist()}"
    )


class FusedLinearDynSDPBFunction(torch.autograd.Function):
    """autograd.Function of fused_linear_loss.

    apply(hidden (N, H), weight (V, H), bias (V,) | None, labels (N,), teachers: Teachers,
          options: LossOptions, record: RowRecord | None, grad_scale (2,) | None, chunk_size: int | None,
          accum_dtype: torch.dtype | None) -> (loss, row_terms (N, 5))

    The gradients are computed in forward; backward scales them by grad_output (in place, so one
    backward per forward) and returns them in the inputs' dtypes.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, teachers, options, record, grad_scale, chunk_size, accum_dtype):
        compute_grad = any(ctx.needs_input_grad[:3])
        result = fused_linear_loss(
            hidden, weight, bias, labels, teachers, options, compute_grad=compute_grad, record=record,
            grad_scale=grad_scale, chunk_size=chunk_size, accum_dtype=accum_dtype,
        )
        ctx.mark_non_differentiable(result.row_terms)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        ctx.backward_done = False
        if compute_grad:
            ctx.save_for_backward(result.grad_hidden, result.grad_weight, result.grad_bias)
        return result.loss, result.row_terms

    @staticmethod
    def backward(ctx, grad_loss, _grad_row_terms):
        if ctx.backward_done:
            raise RuntimeError("FusedLinearDynSDPBFunction scales its saved gradients in place: one backward per forward")
        ctx.backward_done = True
        grads = []
        for grad, dtype in zip(ctx.saved_tensors, ctx.dtypes):
            if grad is not None:
                if grad_loss.device.type != "cpu" or float(grad_loss) != 1.0:
                    grad.mul_(grad_loss)
                grad = grad.to(dtype)
            grads.append(grad)
        grad_hidden, grad_weight, grad_bias = grads
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None, None


def fused_linear_dynsdpb_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    teacher_mask: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    alpha: float = 1.0,
    tau: float = 3.0,
    dynamic: bool = True,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    accum_dtype: torch.dtype | None = None,
    backend: str = "auto",
    validate: bool = True,
) -> torch.Tensor:
    """dynsdpb_loss(hidden @ weight.T + bias, labels, teacher_logits, teacher_mask) with reduction="mean",
    computed chunk by chunk so that the (N, V) logits never exist (module docstring).

    Args:
        hidden: (N, H) or (B, T, H); weight: (V, H) (the LM head, same dtype); bias: (V,) or None.
        labels: (N,) or (B, T), not shifted here; ignore_index marks rows without a label.
        teacher_logits: None or (N, V) / (B, T, V) teacher rows (any float dtype, detached);
            teacher_mask: None or bool of labels' shape. (DynSDPB training keeps its teachers in a ring:
            see FusedLinearDynSDPBLoss.)
        chunk_size: rows per chunk (default: DEFAULT_CHUNK_BYTES of logits for the device); accum_dtype: dtype of the
            weight / bias gradient accumulation (default weight's; torch.float32 for bf16 training).
    Returns the 0-d float32 loss; gradients flow to hidden, weight and bias.
    """
    vocab_size = weight.shape[0]
    hidden_2d = hidden.reshape(-1, hidden.shape[-1])
    labels_1d = labels.reshape(-1)
    teachers = Teachers()
    if teacher_logits is not None:
        rows = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])
        if rows.shape != (hidden_2d.shape[0], vocab_size):
            raise ValueError(
                f"teacher_logits must hold ({hidden_2d.shape[0]}, {vocab_size}) rows (one per hidden row, the weight's "
                f"vocabulary), got {tuple(teacher_logits.shape)}"
            )
        teachers = Teachers(rows.contiguous(), teacher_index_from_mask(teacher_mask, labels.shape, hidden.device))
    elif teacher_mask is not None:
        raise ValueError("teacher_mask was given without teacher_logits")
    options = LossOptions(
        distill=DistillConfig(alpha=alpha, tau=tau, dynamic=dynamic, ignore_index=ignore_index),
        backend=backend,
        validate=validate,
    )
    loss, _ = FusedLinearDynSDPBFunction.apply(
        hidden_2d, weight, bias, labels_1d, teachers, options, None, None, chunk_size, accum_dtype
    )
    return loss
