"""The DynSDPB loss: input checks, the autograd.Function and the functional `dynsdpb_loss`.

For row r with student logits z_r (length V), label y_r and, when it has one, teacher logits t_r (the
logits the same row got one step earlier, detached):

    valid_r     = y_r != ignore_index;  distilled_r = valid_r and row r has a teacher
    ce_r        = logsumexp(z_r) - z_r[y_r]
    (u_r, d_r)  = (H(p) / ln V, p_(1) - p_(2)) with p = softmax(t_r)        teacher uncertainty, discrimination
    alpha_r     = alpha * (1 - u_r),  tau_r = 1 + (tau - 1) * d_r            (dynamic=True)
    alpha_r     = alpha,              tau_r = tau                            (dynamic=False, the DLB loss)
    kl_r        = KL(softmax(t_r / tau_r) || softmax(z_r / tau_r))
    distill_r   = alpha_r * tau_r^2 * kl_r

    mean: loss = sum_valid ce_r / n_valid + sum_distilled distill_r / n_distilled  (an empty term is 0)
    sum:  loss = sum_valid ce_r + sum_distilled distill_r
    none: loss_r = ce_r + distill_r, 0 on ignored rows

    dL/dz_r (mean) = (softmax(z_r) - onehot(y_r)) / n_valid + alpha_r tau_r (Q_r - P_r) / n_distilled
                     with P_r = softmax(t_r / tau_r), Q_r = softmax(z_r / tau_r); alpha_r, tau_r, P_r are constants.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .backends import BACKENDS, row_kernel
from .rows import ROW_ALPHA, ROW_CE, ROW_KL, ROW_TAU, ROW_UNCERTAINTY, DistillConfig, FusedRows, RowRecord

REDUCTIONS = ("mean", "sum", "none")
LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass(frozen=True)
class LossOptions:
    """Everything but tensors that DynSDPBLossFunction needs.

    validate=True runs the checks that need one device-to-host synchronisation per call: labels outside
    [0, V) and non-finite logits or teacher logits (detected from the kernel's per-row outputs, so
    without an extra pass over the logits). inplace_grad=True writes the gradient into the logits'
    own storage (see dynsdpb_loss).
    """

    distill: DistillConfig = DistillConfig()
    reduction: str = "mean"
    backend: str = "auto"
    validate: bool = True
    inplace_grad: bool = False


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
    """LossStats from the (N, 5) per-row terms of rows.py and the row counts."""
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


def _check_options(options: LossOptions) -> None:
    config = options.distill
    if not (isinstance(config.alpha, (int, float)) and config.alpha >= 0 and config.alpha < float("inf")):
        raise ValueError(f"alpha must be a finite number >= 0, got {config.alpha!r}")
    if not (isinstance(config.tau, (int, float)) and config.tau > 0 and config.tau < float("inf")):
        raise ValueError(f"tau must be a finite number > 0, got {config.tau!r}")
    if isinstance(config.ignore_index, bool) or not isinstance(config.ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {config.ignore_index!r}")
    if options.reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {options.reduction!r}")
    if options.backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {options.backend!r}")


def check_positive_int(name: str, value: object) -> None:
    """ValueError naming `name` unless value is an int >= 1 (a bool is not one)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _check_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _check_float(name: str, tensor: torch.Tensor, allowed: tuple[torch.dtype, ...] | None = None) -> None:
    if not tensor.is_floating_point() or (allowed is not None and tensor.dtype not in allowed):
        expected = ", ".join(str(d) for d in allowed) if allowed else "a floating-point dtype"
        raise TypeError(f"{name} must have dtype {expected}, got {tensor.dtype}")


def _check_integer(name: str, tensor: torch.Tensor) -> None:
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (int64), got {tensor.dtype}")


def _check_device(name: str, tensor: torch.Tensor, device: torch.device) -> None:
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device} but logits are on {device}; move them to one device")


def teacher_index_from_mask(teacher_mask: torch.Tensor | None, leading_shape: torch.Size, device: torch.device) -> torch.Tensor:
    """teacher_index (N,) for teacher rows aligned with the student rows: row n teaches row n where
    teacher_mask (of the leading shape, bool) is True or absent, -1 elsewhere."""
    teacher_index = torch.arange(leading_shape.numel(), device=device)
    if teacher_mask is None:
        return teacher_index
    teacher_mask = _check_tensor("teacher_mask", teacher_mask)
    if teacher_mask.dtype != torch.bool or teacher_mask.shape != leading_shape:
        raise ValueError(
            f"teacher_mask must be a bool tensor of logits' leading shape {tuple(leading_shape)}, "
            f"got {teacher_mask.dtype} {tuple(teacher_mask.shape)}"
        )
    _check_device("teacher_mask", teacher_mask, device)
    return torch.where(teacher_mask.reshape(-1), teacher_index, -1)


def as_rows(tensor: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(..., V) -> (N, V), a view when possible; copied only when the vocabulary dimension is strided."""
    rows = tensor.reshape(-1, vocab_size)
    return rows.contiguous() if rows.numel() and rows.stride(1) != 1 else rows


def _check_contract(
    logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_rows: torch.Tensor | None,
    teacher_index: torch.Tensor | None,
    teacher_stats: torch.Tensor | None,
    teacher_support: torch.Tensor | None = None,
    teacher_tail: torch.Tensor | None = None,
) -> None:
    """Shapes, dtypes and devices of the row contract (rows.py); no host sync."""
    _check_float("logits", logits, LOGIT_DTYPES)
    if logits.dim() != 2 or logits.shape[1] < 1:
        raise ValueError(f"logits must have shape (N, V) with V >= 1, got {tuple(logits.shape)}")
    if logits.numel() and logits.stride(1) != 1:
        raise ValueError("logits must have unit stride along the vocabulary dimension")
    n_rows, vocab_size = logits.shape
    _check_integer("labels", labels)
    if labels.shape != (n_rows,):
        raise ValueError(f"labels must have shape ({n_rows},) to match logits {tuple(logits.shape)}, got {tuple(labels.shape)}")
    _check_device("labels", labels, logits.device)
    if (teacher_rows is None) != (teacher_index is None):
        raise ValueError("teacher_rows and teacher_index must be given together")
    if teacher_stats is not None and teacher_rows is None:
        raise ValueError("teacher_stats needs teacher_rows")
    if teacher_rows is None or teacher_index is None:
        return
    _check_float("teacher_rows", teacher_rows)
    if teacher_support is not None:
        _check_integer("teacher_support", teacher_support)
        if teacher_support.dim() != 2 or teacher_support.shape != teacher_rows.shape or teacher_support.shape[1] > vocab_size:
            raise ValueError(
                f"teacher_support must be (R, k) like the top-k teacher_rows {tuple(teacher_rows.shape)} with k <= {vocab_size}, "
                f"got {tuple(teacher_support.shape)}"
            )
        _check_device("teacher_support", teacher_support, logits.device)
        if teacher_stats is None:
            raise ValueError("top-k teachers (teacher_support) need teacher_stats: their (u, d) on the full row")
        if teacher_tail is not None:
            if teacher_tail.dtype != torch.float32 or teacher_tail.shape != (teacher_rows.shape[0],):
                raise ValueError(
                    f"teacher_tail must be float32 of shape ({teacher_rows.shape[0]},), got {teacher_tail.dtype} "
                    f"{tuple(teacher_tail.shape)}"
                )
            _check_device("teacher_tail", teacher_tail, logits.device)
    elif teacher_tail is not None:
        raise ValueError("teacher_tail applies to top-k teachers: give teacher_support too")
    elif teacher_rows.dim() != 2 or teacher_rows.shape[1] != vocab_size:
        raise ValueError(
            f"teacher_rows must have shape (R, {vocab_size}) (the logits' vocabulary), got {tuple(teacher_rows.shape)}"
        )
    if teacher_rows.numel() and teacher_rows.stride(1) != 1:
        raise ValueError("teacher_rows must have unit stride along the vocabulary dimension")
    _check_device("teacher_rows", teacher_rows, logits.device)
    _check_integer("teacher_index", teacher_index)
    if teacher_index.shape != (n_rows,):
        raise ValueError(f"teacher_index must have shape ({n_rows},), got {tuple(teacher_index.shape)}")
    _check_device("teacher_index", teacher_index, logits.device)
    if teacher_stats is not None:
        if teacher_stats.dtype != torch.float32 or teacher_stats.shape != (teacher_rows.shape[0], 2):
            raise ValueError(
                f"teacher_stats must be float32 of shape ({teacher_rows.shape[0]}, 2), "
                f"got {teacher_stats.dtype} {tuple(teacher_stats.shape)}"
            )
        if not teacher_stats.is_contiguous():
            raise ValueError("teacher_stats must be contiguous")
        _check_device("teacher_stats", teacher_stats, logits.device)


def labels_out_of_range(labels: torch.Tensor, vocab_size: int, ignore_index: int) -> torch.Tensor:
    """Bool mask of the labels that are neither in [0, V) nor ignore_index (no sync)."""
    return (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))


def raise_for_bad_labels(labels: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """ValueError naming `labels` when one lies outside [0, V) and is not ignore_index (reads the device)."""
    out_of_range = labels_out_of_range(labels, vocab_size, ignore_index)
    if out_of_range.any():
        raise ValueError(
            f"labels must lie in [0, {vocab_size}) or equal ignore_index={ignore_index}; "
            f"found {int(out_of_range.sum())} outside, e.g. {labels[out_of_range][:5].tolist()}"
        )


def _raise_for_bad_values(
    logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_rows: torch.Tensor | None,
    teacher_index: torch.Tensor | None,
    ignore_index: int,
) -> None:
    """Name the argument behind a failed value check (runs only once a check has failed)."""
    raise_for_bad_labels(labels, logits.shape[1], ignore_index)
    bad_rows = (~torch.isfinite(logits)).any(1).nonzero().squeeze(1)
    if bad_rows.numel():
        raise ValueError(f"logits contain NaN or inf in {bad_rows.numel()} rows, e.g. rows {bad_rows[:5].tolist()}")
    if teacher_rows is not None and teacher_index is not None:
        used = teacher_index[(teacher_index >= 0) & (labels != ignore_index)]
        bad_teachers = (~torch.isfinite(teacher_rows[used])).any(1)
        if bad_teachers.any():
            raise ValueError(
                f"teacher logits contain NaN or inf in {int(bad_teachers.sum())} rows used as teachers, "
                f"e.g. teacher rows {used[bad_teachers][:5].tolist()}"
            )
    if teacher_index is not None and teacher_rows is not None:
        if (teacher_index >= teacher_rows.shape[0]).any() or (teacher_index < -1).any():
            raise ValueError(f"teacher_index must lie in [-1, {teacher_rows.shape[0]}), -1 meaning no teacher")


def _validate_values(
    logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_rows: torch.Tensor | None,
    teacher_index: torch.Tensor | None,
    ignore_index: int,
    rows: FusedRows | None,
) -> None:
    """Label range and finiteness with one host sync: from the kernel's outputs when `rows` is given
    (a non-finite logit makes its row's outputs non-finite), otherwise from the inputs themselves."""
    bad = labels_out_of_range(labels, logits.shape[1], ignore_index).any()
    if teacher_index is not None and teacher_rows is not None:
        bad |= ((teacher_index < -1) | (teacher_index >= teacher_rows.shape[0])).any()
    if rows is not None:
        bad |= ~torch.isfinite(rows.row_terms).all() | ~torch.isfinite(rows.student_stats).all()
    else:
        bad |= ~torch.isfinite(logits).all()
        if teacher_rows is not None and teacher_index is not None:  # only the rows used as teachers
            used = teacher_index[(teacher_index >= 0) & (labels != ignore_index)].clamp_max(teacher_rows.shape[0] - 1)
            bad |= ~torch.isfinite(teacher_rows.index_select(0, used)).all()
    if bad.item():
        _raise_for_bad_values(logits, labels, teacher_rows, teacher_index, ignore_index)
        raise FloatingPointError("the DynSDPB loss produced non-finite values from finite inputs")


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
    """Reduced loss and per-row results on the row contract (rows.py), without autograd.

    Returns (loss, rows): loss is a 0-d float32 tensor (float64 for float64 logits), or (N,) for
    reduction="none"; rows.grad is the gradient of that loss (of its sum for "none") when
    compute_grad is set. `record` copies rows into a teacher ring in the same pass (rows.py).
    `grad_scale` (2,) overrides the (ce, distill) weights that reduction="mean" derives from the
    row counts: loss = ce_scale * sum_valid ce_r + distill_scale * sum_distilled distill_r.
    `teacher_support` (R, k) makes teacher_rows top-k teachers, `teacher_tail` (R,) their mass outside
    the top k (rows.py).
    """
    _check_options(options)
    _check_contract(logits, labels, teacher_rows, teacher_index, teacher_stats, teacher_support, teacher_tail)
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
            _validate_values(logits, labels, teacher_rows, teacher_index, config.ignore_index, rows=None)

    kernel = row_kernel(options.backend, logits.device)
    rows = kernel(
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
    )
    if inplace:
        # The logits now hold the gradient: bump their version so that autograd refuses to use them
        # where another op saved them for its backward, instead of silently computing garbage.
        torch.autograd.graph.increment_version(logits)
    elif options.validate:
        _validate_values(logits, labels, teacher_rows, teacher_index, config.ignore_index, rows=rows)

    distill = rows.alpha * rows.tau.square() * rows.kl
    if options.reduction == "none":
        loss = rows.ce + distill
    else:
        loss = rows.ce.sum() * grad_scale[0] + distill.sum() * grad_scale[1]
    return loss, rows


class DynSDPBLossFunction(torch.autograd.Function):
    """autograd.Function over the row contract (rows.py).

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
        if ctx.backward_done:
            raise RuntimeError(
                "DynSDPBLossFunction scales its saved gradient in place, so it supports one backward per "
                "forward; run the loss forward again to backward a second time"
            )
        ctx.backward_done = True
        (grad,) = ctx.saved_tensors
        if ctx.reduction == "none":
            grad.mul_(grad_loss.reshape(-1, 1))
        elif grad_loss.device.type != "cpu" or float(grad_loss) != 1.0:  # reading a CPU scalar costs no sync
            grad.mul_(grad_loss)
        return grad, None, None, None, None, None, None, None, None, None


def dynsdpb_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    teacher_mask: torch.Tensor | None = None,
    *,
    alpha: float = 1.0,
    tau: float = 3.0,
    dynamic: bool = True,
    ignore_index: int = -100,
    reduction: str = "mean",
    return_stats: bool = False,
    backend: str = "auto",
    validate: bool = True,
    inplace_grad: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, LossStats]:
    """Cross-entropy plus dynamic self-distillation from the previous mini-batch (DynSDPB).

    loss = sum_valid ce_r / n_valid + sum_distilled alpha_r tau_r^2 KL(softmax(t_r/tau_r) || softmax(z_r/tau_r)) / n_distilled
    with alpha_r = alpha (1 - u_r), tau_r = 1 + (tau - 1) d_r from the teacher's normalised entropy u_r and
    top-1/top-2 probability margin d_r when dynamic=True, alpha_r = alpha and tau_r = tau otherwise; see
    loss.py's module docstring for the full contract, including reduction="sum" and "none".

    Args:
        logits: (N, V) or (B, T, V) student logits, float32, bfloat16, float16 (or float64).
        labels: integer tensor of logits' leading shape; ignore_index marks rows without a label. No
            shifting happens here.
        teacher_logits: None for plain cross-entropy, or the logits the same rows got at the previous
            step, shape of logits, any float dtype. Detached: no gradient flows into the teacher.
        teacher_mask: None (every row has a teacher) or bool of logits' leading shape, True where the
            row has a teacher.
        alpha: distillation weight, >= 0. tau: temperature, > 0. dynamic: per-row alpha_r, tau_r.
        reduction: "mean", "sum" or "none" (per-row losses of logits' leading shape).
        return_stats: also return a LossStats of 0-d tensors (no host sync).
        backend: "auto", "triton" or "reference" (see backends.py).
        validate: check label range and finiteness of logits and teacher logits; this costs one
            device-to-host sync per call. With validate=False no check syncs: an out-of-range label
            gives a NaN loss for its row and non-finite logits propagate.
        inplace_grad: opt-in; write the gradient into the logits' own storage instead of a fresh
            buffer, saving one (N, V) allocation. The logits' values are destroyed by the forward pass
            (their autograd version is bumped, so an op that saved them for backward raises instead
            of computing a wrong gradient). Needs contiguous logits.

    Returns:
        loss (float32, float64 for float64 logits; 0-d, or logits' leading shape for "none"), and
        LossStats when return_stats.

    Raises:
        TypeError / ValueError naming the argument for wrong types, dtypes, shapes, devices, options,
        out-of-range labels and non-finite logits or teacher logits.
    """
    logits = _check_tensor("logits", logits)
    labels = _check_tensor("labels", labels)
    _check_float("logits", logits, LOGIT_DTYPES)
    if logits.dim() not in (2, 3):
        raise ValueError(f"logits must have shape (N, V) or (B, T, V), got {tuple(logits.shape)}")
    leading_shape = logits.shape[:-1]
    vocab_size = logits.shape[-1]
    _check_integer("labels", labels)
    if labels.shape != leading_shape:
        raise ValueError(
            f"labels must have logits' leading shape {tuple(leading_shape)}, got {tuple(labels.shape)}"
        )
    _check_device("labels", labels, logits.device)

    logits_2d = as_rows(logits, vocab_size)
    teacher_rows = teacher_index = None
    if teacher_logits is not None:
        teacher_logits = _check_tensor("teacher_logits", teacher_logits)
        _check_float("teacher_logits", teacher_logits)
        if teacher_logits.shape != logits.shape:
            if teacher_logits.shape[:-1] == logits.shape[:-1]:
                raise ValueError(
                    f"teacher_logits have vocabulary size {teacher_logits.shape[-1]} but logits have {vocab_size}"
                )
            raise ValueError(
                f"teacher_logits must have the shape of logits {tuple(logits.shape)}, got {tuple(teacher_logits.shape)}"
            )
        _check_device("teacher_logits", teacher_logits, logits.device)
        teacher_rows = as_rows(teacher_logits.detach(), vocab_size)
        teacher_index = teacher_index_from_mask(teacher_mask, leading_shape, logits.device)
    elif teacher_mask is not None:
        raise ValueError("teacher_mask was given without teacher_logits")

    options = LossOptions(
        distill=DistillConfig(alpha=alpha, tau=tau, dynamic=dynamic, ignore_index=ignore_index),
        reduction=reduction,
        backend=backend,
        validate=validate,
        inplace_grad=inplace_grad,
    )
    labels_1d = labels.reshape(-1).long()
    if torch.is_grad_enabled() and logits.requires_grad:
        loss, row_terms, _ = DynSDPBLossFunction.apply(logits_2d, labels_1d, teacher_rows, teacher_index, None, options)
    else:
        loss, rows = fused_loss(logits_2d, labels_1d, teacher_rows, teacher_index, None, options, compute_grad=False)
        row_terms = rows.row_terms
    if reduction == "none":
        loss = loss.reshape(leading_shape)
    if not return_stats:
        return loss
    n_valid, n_distilled = row_counts(labels_1d, teacher_index, ignore_index)
    return loss, loss_stats(row_terms, n_valid, n_distilled)
