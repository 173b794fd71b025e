"""The DynSDPB loss core: its statistics, the gradient scales, `fused_loss` (one backend call on the row
contract of contract.py) and its autograd.Function. The functional forms live in functional.py.

For row r with student logits z_r (length V), label y_r and, when it has one, teacher logits t_r (the
logits the same row got one step earlier, detached):

    valid_r     = y_r != ignore_index;  distilled_r = valid_r and row r has a teacher
    ce_r        = logsumexp(z_r) - z_r[y_r]
    (u_r, d_r)  = (H(p) / ln V, p_(1) - p_(2)) with p = softmax(t_r)        teacher uncertainty, discrimination
    alpha_r     = alpha * (1 - u_r),  tau_r = 1 + (tau - 1) * d_r            (dynamic=True)
    alpha_r     = alpha,              tau_r = tau                            (dynamic=False, the DLB loss)
    (dynamic="alpha" keeps only the alpha_r rule with tau_r = tau; dynamic="tau" only the tau_r rule with
    alpha_r = alpha: the two ablations of the dynamic rule.)
    kl_r        = KL(softmax(t_r / tau_r) || softmax(z_r / tau_r))
    distill_r   = alpha_r * tau_r^2 * kl_r
    (softcap = c replaces z_r by c tanh(z_r / c) in all of this and chains dz'/dz = 1 - tanh^2(z_r / c)
    into the gradient below; the teachers t_r are taken as already capped: contract.py.)

    mean: loss = sum_valid ce_r / n_valid + sum_distilled distill_r / n_distilled  (an empty term is 0)
    sum:  loss = sum_valid ce_r + sum_distilled distill_r
    none: loss_r = ce_r + distill_r, 0 on ignored rows

    dL/dz_r (mean) = (softmax(z_r) - onehot(y_r)) / n_valid + alpha_r tau_r (Q_r - P_r) / n_distilled
                     with P_r = softmax(t_r / tau_r), Q_r = softmax(z_r / tau_r); alpha_r, tau_r, P_r are constants.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from . import ops
from .checks import check_contract, check_options, check_values
from .contract import (
    ROW_ALPHA, ROW_CE, ROW_KL, ROW_TAU, ROW_UNCERTAINTY, DistillConfig, FusedRows, LossOptions, RowRecord,
    row_temperature, softcapped,
)


@dataclass(frozen=True)
class LossStats:
    """Diagnostics of one call, as 0-d tensors on the logits' device (reading them syncs, making them does not).

    ce:               mean of ce_r over valid rows
    kl:               mean of kl_r over distilled rows
    distill:          mean of alpha_r * tau_r^2 * kl_r over distilled rows
    alpha_mean:       mean alpha_r over distilled rows
    tau_mean:         mean tau_r over distilled rows
    uncertainty_mean: mean teacher uncertainty u_r over distilled rows
    n_valid:          number of rows whose label is not ignore_index (int64)
    n_distilled:      number of valid rows that have a teacher (int64)
    student_stats:    dynsdpb_loss only: (logits' leading shape, 2) float32 (u_r, d_r) of each student row
                      at temperature 1, the statistics these logits have as a teacher: pass them as
                      `teacher_stats` with the detached logits to the call they teach (no pre-pass there)
    Means over zero rows are 0.
    """

    ce: torch.Tensor
    kl: torch.Tensor
    distill: torch.Tensor
    alpha_mean: torch.Tensor
    tau_mean: torch.Tensor
    uncertainty_mean: torch.Tensor
    n_valid: torch.Tensor
    n_distilled: torch.Tensor
    student_stats: torch.Tensor | None = None


def row_counts(labels: torch.Tensor, teacher_index: torch.Tensor | None, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_valid, n_distilled) as 0-d int64 tensors, without a host sync."""
    valid = labels != ignore_index
    distilled = valid & (teacher_index >= 0) if teacher_index is not None else torch.zeros_like(valid)
    return valid.sum(), distilled.sum()


def mean_grad_scale(labels: torch.Tensor, teacher_index: torch.Tensor | None, ignore_index: int) -> torch.Tensor:
    """(1 / n_valid, 1 / n_distilled) as a float32 (2,) tensor on the labels' device: the weights of the two
    gradient terms for reduction="mean" (an empty count weighs 1; its term is 0 anyway)."""
    n_valid, n_distilled = row_counts(labels, teacher_index, ignore_index)
    return torch.stack([1.0 / n_valid.clamp_min(1), 1.0 / n_distilled.clamp_min(1)]).float()


def loss_stats(row_terms: torch.Tensor, n_valid: torch.Tensor, n_distilled: torch.Tensor) -> LossStats:
    """LossStats from the (N, 5) per-row terms of contract.py and the row counts."""
    per_valid = 1.0 / n_valid.clamp_min(1)
    per_distilled = 1.0 / n_distilled.clamp_min(1)
    column_sums = row_terms.sum(0)  # non-distilled rows hold 0 in every distillation column
    distill = row_terms[:, ROW_ALPHA] * row_terms[:, ROW_TAU].square() * row_terms[:, ROW_KL]
    return LossStats(
        ce=column_sums[ROW_CE] * per_valid,
        kl=column_sums[ROW_KL] * per_distilled,
        distill=distill.sum() * per_distilled,
        alpha_mean=column_sums[ROW_ALPHA] * per_distilled,
        tau_mean=column_sums[ROW_TAU] * per_distilled,
        uncertainty_mean=column_sums[ROW_UNCERTAINTY] * per_distilled,
        n_valid=n_valid,
        n_distilled=n_distilled,
    )


def as_rows(tensor: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(..., V) -> (N, V), a view when possible; copied only when the vocabulary dimension is strided."""
    rows = tensor.reshape(-1, vocab_size)
    return rows.contiguous() if rows.numel() and rows.stride(1) != 1 else rows


TOPK_RECORD_PART = 128  # rows per part of write_topk_record: a (128, V) float32 copy at a time


def write_topk_record(logits: torch.Tensor, record: RowRecord, config: DistillConfig) -> None:
    """Fill record.topk for the recorded rows of `logits` (N, V) (record.index[n] >= 0): their k largest
    logits (torch.topk's order, its ties), their ids and their mass outside them at the temperature tau_r
    that `config` gives the row, m = 1 - sum_topk softmax(z / tau_r) (the kernel writes the (u, d)). For
    the backends whose kernel does not record top-k itself (backends.RECORDS_TOPK); call it before the
    logits are overwritten. With config.softcap the rows are capped first, as the kernel caps them.

    No host synchronisation: every row is processed, TOPK_RECORD_PART at a time, and the unrecorded ones are
    masked out of the scatter on the device (_scatter_rows), so the recorded rows are never counted."""
    topk = record.topk
    assert topk is not None
    k = topk.values.shape[1]
    for start in range(0, logits.shape[0], TOPK_RECORD_PART):
        part = slice(start, start + TOPK_RECORD_PART)
        rows = softcapped(logits[part].float(), config.softcap)
        values, ids = rows.topk(k, dim=-1)
        tail = _tail_mass(rows, values, config)
        slots = record.index[part]
        valid = slots >= 0
        for storage, new in ((topk.values, values.to(topk.values.dtype)), (topk.support, ids), (topk.tail, tail)):
            _scatter_rows(storage, slots, valid, new)


def _scatter_rows(storage: torch.Tensor, slots: torch.Tensor, valid: torch.Tensor, new: torch.Tensor) -> None:
    """storage[slots[n]] = new[n] for every n with valid[n], without a host synchronisation: the other rows
    write slot 0 with the value slot 0 ends up with (the new row of the valid n that writes it, if any, else
    its current one), so that every duplicate of slot 0 writes the same thing and the result is
    deterministic. storage (P, ...), slots / valid (n,), new (n, ...) in storage's dtype; valid slots distinct."""
    lanes = (-1,) + (1,) * (new.dim() - 1)
    writes_first = valid & (slots == 0)
    first = torch.where(writes_first.any(), new.index_select(0, writes_first.int().argmax().view(1)), storage[:1])
    storage.index_put_((torch.where(valid, slots, 0),), torch.where(valid.view(lanes), new, first))


def fused_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_rows: torch.Tensor | None,
    teacher_index: torch.Tensor | None,
    teacher_stats: torch.Tensor | None,
    options: LossOptions,
    compute_grad: bool,
    record: RowRecord | None = None,
    grad_scale: torch.Tensor | None = None,
    teacher_support: torch.Tensor | None = None,
    teacher_tail: torch.Tensor | None = None,
) -> tuple[torch.Tensor, FusedRows]:
    """Reduced loss and per-row results on the row contract (contract.py), without autograd.

    Returns (loss, rows): loss is a 0-d float32 tensor (float64 for float64 logits), or (N,) for
    reduction="none"; rows.grad is the gradient of that loss (of its sum for "none") when
    compute_grad is set. `record` copies the rows into a teacher ring in the same pass (contract.py; a
    top-k record is written by the kernel where it can, backends.RECORDS_TOPK, else here, before the kernel).
    `grad_scale` (2,) overrides the (ce, distill) weights that reduction="mean" derives from the
    row counts: loss = ce_scale * sum_valid ce_r + distill_scale * sum_distilled distill_r.
    `teacher_support` (R, k) makes teacher_rows top-k teachers, `teacher_tail` (R,) their mass outside
    the top k (contract.py).
    """
    check_options(options)
    check_contract(logits, labels, teacher_rows, teacher_index, teacher_stats, teacher_support, teacher_tail)
    if teacher_support is not None:
        teacher_support = teacher_support.long()
    config = options.distill
    labels = labels.long()
    teacher_index = teacher_index.long() if teacher_index is not None else None
    if grad_scale is not None:
        if options.reduction == "none":
            raise ValueError("grad_scale applies to the reduced losses; reduction='none' takes none")
        grad_scale = grad_scale.to(device=logits.device, dtype=torch.float32)
    elif options.reduction == "mean":
        grad_scale = mean_grad_scale(labels, teacher_index, config.ignore_index)
    else:
        grad_scale = torch.ones(2, dtype=torch.float32, device=logits.device)

    inplace = compute_grad and options.inplace_grad
    if inplace:
        if not logits.is_contiguous():
            raise ValueError("inplace_grad=True needs contiguous logits")
        if options.validate:  # the logits are about to be overwritten: check them first
            check_values(
                labels, logits.shape[1], config.ignore_index,
                logits=logits, teacher_rows=teacher_rows, teacher_index=teacher_index,
            )

    if record is not None and record.topk is not None and not ops.records_topk(options.backend, logits.device):
        write_topk_record(logits.detach(), record, config)  # before the logits can be overwritten
    rows = ops.fused_rows(
        logits,
        labels,
        teacher_rows,
        teacher_index,
        teacher_stats,
        config,
        grad_scale,
        compute_grad,
        grad_out=logits if inplace else None,
        record=record,
        teacher_support=teacher_support,
        teacher_tail=teacher_tail,
        backend=options.backend,
    )
    if inplace:
        # The logits now hold the gradient: bump their version so that autograd refuses to use them
        # where another op saved them for its backward, instead of silently computing garbage.
        torch.autograd.graph.increment_version(logits)
    elif options.validate:
        check_values(
            labels, logits.shape[1], config.ignore_index, logits=logits, teacher_rows=teacher_rows,
            teacher_index=teacher_index, row_terms=rows.row_terms, student_stats=rows.student_stats,
        )

    distill = rows.alpha * rows.tau.square() * rows.kl
    if options.reduction == "none":
        loss = rows.ce + distill
    else:
        loss = rows.ce.sum() * grad_scale[0] + distill.sum() * grad_scale[1]
    return loss, rows


class DynSDPBLossFunction(torch.autograd.Function):
    """autograd.Function over the row contract (contract.py).

    apply(logits (N, V), labels (N,), teacher_rows (R, V) | None, teacher_index (N,) | None,
          teacher_stats (R, 2) | None, options: LossOptions, record: RowRecord | None = None,
          grad_scale (2,) | None = None, teacher_support (R, k) | None = None, teacher_tail (R,) | None = None)
      -> (loss, row_terms (N, 5), student_stats (N, 2))

    `record`, `grad_scale`, `teacher_support` and `teacher_tail` are fused_loss's.
    The gradient is computed in the forward pass and saved; backward multiplies it in place by
    grad_output (a scalar, or one value per row for reduction="none"; skipped for a CPU grad_output of
    1, which is free to read) and returns it. Because the
    saved buffer is scaled in place, each forward supports one backward (retain_graph=True and a
    second backward raise rather than return a twice-scaled gradient).
    """

    @staticmethod
    def forward(
        ctx,
        logits,
        labels,
        teacher_rows,
        teacher_index,
        teacher_stats,
        options: LossOptions,
        record=None,
        grad_scale=None,
        teacher_support=None,
        teacher_tail=None,
    ):
        loss, rows = fused_loss(
            logits,
            labels,
            teacher_rows,
            teacher_index,
            teacher_stats,
            options,
            compute_grad=ctx.needs_input_grad[0],
            record=record,
            grad_scale=grad_scale,
            teacher_support=teacher_support,
            teacher_tail=teacher_tail,
        )
        ctx.mark_non_differentiable(rows.row_terms, rows.student_stats)
        ctx.reduction = options.reduction
        ctx.backward_done = False
        if rows.grad is not None:
            ctx.save_for_backward(rows.grad)
        return loss, rows.row_terms, rows.student_stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_row_terms, _grad_student_stats):
        check_single_backward(ctx, "DynSDPBLossFunction")
        (grad,) = ctx.saved_tensors
        grad = scale_saved_grad(grad, grad_loss.reshape(-1, 1) if ctx.reduction == "none" else grad_loss)
        return grad, None, None, None, None, None, None, None, None, None


def dynsdpb_loss_with_grad(
    logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_rows: torch.Tensor | None,
    teacher_index: torch.Tensor | None,
    teacher_stats: torch.Tensor | None,
    options: LossOptions,
    record: RowRecord | None = None,
    grad_scale: torch.Tensor | None = None,
    teacher_support: torch.Tensor | None = None,
    teacher_tail: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DynSDPBLossFunction.apply -> (loss, row_terms, student_stats), with validate=True's check around the Function.

    The check (one host sync) runs before the Function when the kernel overwrites the logits
    (inplace_grad), after it otherwise, on the kernel's per-row outputs. Kept outside the Function so that
    under torch.compile it is the step's one graph break: a break inside an autograd.Function's forward
    would push the whole Function out of the graph.
    """
    config = options.distill
    check = dict(teacher_rows=teacher_rows, teacher_index=teacher_index)
    if options.validate and options.inplace_grad:
        check_values(labels, logits.shape[1], config.ignore_index, logits=logits, **check)
    loss, row_terms, student_stats = DynSDPBLossFunction.apply(
        logits, labels, teacher_rows, teacher_index, teacher_stats, replace(options, validate=False),
        record, grad_scale, teacher_support, teacher_tail,
    )  # fmt: skip
    if options.validate and not options.inplace_grad:
        check_values(
            labels, logits.shape[1], config.ignore_index, logits=logits, row_terms=row_terms,
            student_stats=student_stats, **check,
        )  # fmt: skip
    return loss, row_terms, student_stats


def check_single_backward(ctx, name: str) -> None:
    """Refuse a second backward through a Function whose saved gradients scale_saved_grad scaled in place.
    A compiled graph scales out of place and so needs no such guard (and cannot keep one)."""
    if torch.compiler.is_compiling():
        return
    if ctx.backward_done:
        raise RuntimeError(
            f"{name} scales its saved gradient in place, so it supports one backward per forward; "
            "run the loss forward again to backward a second time"
        )
    ctx.backward_done = True


def scale_saved_grad(grad: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """grad * grad_output for a gradient computed in forward.

    Eager: in place (no second (N, V) buffer), and skipped for a CPU grad_output of 1, which is free to
    read. Under torch.compile: out of place, since a traced graph can neither branch on grad_output's
    value nor mutate a saved tensor (Inductor reuses the buffer where it can).
    """
    if torch.compiler.is_compiling():
        return grad * grad_output
    if grad_output.device.type != "cpu" or grad_output.numel() != 1 or float(grad_output) != 1.0:
        grad.mul_(grad_output)
    return grad


def _tail_mass(rows: torch.Tensor, top_values: torch.Tensor, config: DistillConfig) -> torch.Tensor:
    """1 - sum_topk softmax(rows / tau_r): the probability mass a top-k teacher row leaves out, at the
    temperature the loss will use for it (tau_r from the row's top-1/top-2 margin when config.dynamic_tau)."""
    log_norm = rows.logsumexp(-1)
    if config.dynamic_tau:
        top2 = top_values[:, :2] if top_values.shape[1] >= 2 else rows.topk(min(2, rows.shape[1]), dim=-1).values
        probs = (top2 - log_norm[:, None]).exp()
        margin = probs[:, 0] - probs[:, 1] if probs.shape[1] == 2 else probs[:, 0]
        tau_r = row_temperature(config, margin.clamp(0, 1)).to(rows.dtype)  # the kernels' tau_rec
    else:
        tau_r = torch.full_like(log_norm, config.tau)
    log_norm_tau = (rows / tau_r[:, None]).logsumexp(-1)
    kept = (top_values / tau_r[:, None] - log_norm_tau[:, None]).exp().sum(-1)
    return (1.0 - kept).clamp(0.0, 1.0 - 1e-6)
