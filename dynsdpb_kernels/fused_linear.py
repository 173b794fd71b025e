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
A gradient nobody asks for (a frozen head's dL/dW, under LoRA) is neither allocated nor computed.

Under autocast on hidden's device type (e.g. Trainer bf16=True with float32 weights), the chunk does what
F.linear would: h, W, b are cast to the autocast dtype and the GEMMs run in it, so the logits and g_c are
in that dtype; dL/dh is returned in hidden's dtype, dL/dW and dL/db in their own (accumulated across
chunks in accum_dtype, by default the weight's own dtype).

Softcapping (options.distill.softcap = c): the GEMM gives the raw z_c and the rows kernel caps it on load,
c tanh(z_c / c), so g_c = dL/dz_c already holds the factor dz'/dz (contract.py); nothing here changes.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import torch

from .checks import check_linear_head, check_options, check_values
from .contract import N_ROW_TERMS, LossOptions, RowRecord, Teachers, row_terms_dtype
from .loss import check_single_backward, fused_loss, mean_grad_scale, scale_saved_grad

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
class HeadGrads:
    """Which gradients fused_linear_loss computes: of hidden, of weight, of bias (ignored without a bias)."""

    hidden: bool
    weight: bool
    bias: bool

    @classmethod
    def of(cls, compute_grad: bool | HeadGrads) -> HeadGrads:
        """A bool means all three or none."""
        return compute_grad if isinstance(compute_grad, HeadGrads) else cls(*(bool(compute_grad),) * 3)

    @property
    def any(self) -> bool:
        return self.hidden or self.weight or self.bias


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast runs matmuls in on `device_type`, or None where it is off (or does not exist)."""
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def autocast_cast(tensor: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """`tensor` as autocast hands it to a matmul: floating tensors other than float64 cast to `dtype`."""
    if tensor is None or not tensor.is_floating_point() or tensor.dtype == torch.float64:
        return tensor
    return tensor.to(dtype)


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
    compute_grad: bool | HeadGrads,
    record: RowRecord | None = None,
    grad_scale: torch.Tensor | None = None,
    chunk_size: int | None = None,
    accum_dtype: torch.dtype | None = None,
) -> LinearResult:
    """Loss and gradients of hidden (N, H) through the head weight (V, H) (+ bias (V,)) and the DynSDPB
    loss, chunked over rows (module docstring). Arguments as in loss.fused_loss; `compute_grad`: True / False
    for all three gradients, or a HeadGrads naming which; `accum_dtype` (e.g. torch.float32) accumulates
    dL/dW and dL/db across chunks in that dtype (default: the weight's own, before any autocast cast).
    Under autocast on hidden's device type the GEMMs and logits are in the autocast dtype (module docstring);
    grad_hidden is then in that dtype too (FusedLinearDynSDPBFunction returns it in hidden's)."""
    check_options(options)
    grads = HeadGrads.of(compute_grad)
    accum = accum_dtype or weight.dtype
    device_type = hidden.device.type
    compute_dtype = autocast_dtype(device_type)
    if compute_dtype is not None:  # F.linear's casts; the loop then runs with autocast off (out= needs it)
        hidden, weight, bias = (autocast_cast(t, compute_dtype) for t in (hidden, weight, bias))
    check_linear_head(hidden, weight, bias, labels)
    n_rows, vocab_size = hidden.shape[0], weight.shape[0]
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
    grad_hidden = torch.empty_like(hidden) if grads.hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=accum, device=device) if grads.weight else None
    grad_bias = torch.zeros(vocab_size, dtype=accum, device=device) if grads.bias and bias is not None else None
    loss = torch.zeros((), dtype=row_terms.dtype, device=device)
    no_autocast = torch.autocast(device_type, enabled=False) if compute_dtype is not None else contextlib.nullcontext()
    with no_autocast:
        for start in range(0, n_rows, chunk):
            part = slice(start, min(start + chunk, n_rows))
            hidden_chunk = hidden[part]
            logits = hidden_chunk @ weight.T if bias is None else torch.addmm(bias, hidden_chunk, weight.T)
            chunk_loss, chunk_result = fused_loss(
                logits,
                labels[part],
                teachers.logits,
                teachers.index[part] if teachers.index is not None else None,
                teachers.stats,
                chunk_options,
                grads.any,
                record=record.chunk(part) if record is not None else None,
                grad_scale=grad_scale,
                teacher_support=teachers.support,
                teacher_tail=teachers.tail,
            )
            loss = loss + chunk_loss
            row_terms[part] = chunk_result.row_terms
            student_stats[part] = chunk_result.student_stats
            grad = chunk_result.grad  # the logits buffer, now dL/dz of this chunk (None without grads)
            if grad_hidden is not None:
                torch.mm(grad, weight, out=grad_hidden[part])
            if grad_weight is not None:
                if accum == weight.dtype:
                    grad_weight.addmm_(grad.T, hidden_chunk)  # no (V, H) temporary
                else:
                    grad_weight += grad.T @ hidden_chunk  # one (V, H) temporary in weight's dtype
            if grad_bias is not None:
                grad_bias += grad.sum(0, dtype=accum)
            del logits, chunk_result, grad

    if options.validate:
        check_values(
            labels, vocab_size, config.ignore_index, teacher_rows=teachers.logits, teacher_index=teachers.index,
            row_terms=row_terms, student_stats=student_stats,
        )
    return LinearResult(loss, row_terms, student_stats, grad_hidden, grad_weight, grad_bias)


class FusedLinearDynSDPBFunction(torch.autograd.Function):
    """autograd.Function of fused_linear_loss.

    apply(hidden (N, H), weight (V, H), bias (V,) | None, labels (N,), teachers: Teachers,
          options: LossOptions, record: RowRecord | None, grad_scale (2,) | None, chunk_size: int | None,
          accum_dtype: torch.dtype | None) -> (loss, row_terms (N, 5), student_stats (N, 2))

    The gradients are computed in forward, only those of the inputs that require one (a frozen head's
    weight gets none); backward scales them by grad_output (in place, so one backward per forward) and
    returns them in the inputs' dtypes (also under autocast, as autograd through F.linear does).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, teachers, options, record, grad_scale, chunk_size, accum_dtype):
        grads = HeadGrads(*ctx.needs_input_grad[:3])
        result = fused_linear_loss(
            hidden, weight, bias, labels, teachers, options, compute_grad=grads, record=record,
            grad_scale=grad_scale, chunk_size=chunk_size, accum_dtype=accum_dtype,
        )
        ctx.mark_non_differentiable(result.row_terms, result.student_stats)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        ctx.backward_done = False
        if grads.any:
            ctx.save_for_backward(result.grad_hidden, result.grad_weight, result.grad_bias)
        return result.loss, result.row_terms, result.student_stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_row_terms, _grad_student_stats):
        check_single_backward(ctx, "FusedLinearDynSDPBFunction")
        grad_hidden, grad_weight, grad_bias = (
            scale_saved_grad(grad, grad_loss).to(dtype) if grad is not None else None
            for grad, dtype in zip(ctx.saved_tensors, ctx.dtypes)
        )
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None, None


def fused_linear_loss_with_grad(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    teachers: Teachers,
    options: LossOptions,
    record: RowRecord | None = None,
    grad_scale: torch.Tensor | None = None,
    chunk_size: int | None = None,
    accum_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FusedLinearDynSDPBFunction.apply -> (loss, row_terms), with validate=True's check (one host sync,
    on the kernel's per-row outputs) after the Function rather than inside it: under torch.compile it is
    then the step's one graph break (loss.dynsdpb_loss_with_grad)."""
    loss, row_terms, student_stats = FusedLinearDynSDPBFunction.apply(
        hidden, weight, bias, labels, teachers, replace(options, validate=False), record, grad_scale, chunk_size,
        accum_dtype,
    )  # fmt: skip
    if options.validate:
        check_values(
            labels, weight.shape[0], options.distill.ignore_index, teacher_rows=teachers.logits,
            teacher_index=teachers.index, row_terms=row_terms, student_stats=student_stats,
        )  # fmt: skip
    return loss, row_terms
