"""The functional forms of the loss, in the style of torch.nn.functional: tensors in, a loss out, teachers
given as aligned logits (no ring; DynSDPB training keeps its teachers in one: see module.py).

    dynsdpb_loss(logits, labels, teacher_logits=None, teacher_mask=None, *, teacher_stats=None, alpha, tau, ...)
    fused_linear_dynsdpb_loss(hidden, weight, labels, teacher_logits=None, teacher_mask=None, *, bias, ...)
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .checks import check_device, check_float, check_integer, check_logits, check_teacher_stats, check_tensor
from .contract import DistillConfig, LossOptions, Teachers
from .fused_linear import fused_linear_loss_with_grad
from .loss import LossStats, dynsdpb_loss_with_grad, as_rows, fused_loss, loss_stats, row_counts


def teacher_index_from_mask(teacher_mask: torch.Tensor | None, leading_shape: torch.Size, device: torch.device) -> torch.Tensor:
    """teacher_index (N,) for teacher rows aligned with the student rows: row n teaches row n where
    teacher_mask (of the leading shape, bool) is True or absent, -1 elsewhere."""
    teacher_index = torch.arange(leading_shape.numel(), device=device)
    if teacher_mask is None:
        return teacher_index
    teacher_mask = check_tensor("teacher_mask", teacher_mask)
    if teacher_mask.dtype != torch.bool or teacher_mask.shape != leading_shape:
        raise ValueError(
            f"teacher_mask must be a bool tensor of logits' leading shape {tuple(leading_shape)}, "
            f"got {teacher_mask.dtype} {tuple(teacher_mask.shape)}"
        )
    check_device("teacher_mask", teacher_mask, device)
    return torch.where(teacher_mask.reshape(-1), teacher_index, -1)


def dynsdpb_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    teacher_mask: torch.Tensor | None = None,
    *,
    teacher_stats: torch.Tensor | None = None,
    alpha: float = 1.0,
    tau: float = 3.0,
    dynamic: bool | str = True,
    ignore_index: int = -100,
    softcap: float | None = None,
    reduction: str = "mean",
    return_stats: bool = False,
    backend: str = "auto",
    validate: bool = True,
    inplace_grad: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, LossStats]:
    """Cross-entropy plus dynamic self-distillation from the previous mini-batch (DynSDPB).

    loss = sum_valid ce_r / n_valid + sum_distilled alpha_r tau_r^2 KL(softmax(t_r/tau_r) || softmax(z_r/tau_r)) / n_distilled
    with alpha_r = alpha (1 - u_r), tau_r = 1 + (tau - 1) d_r from the teacher's normalised entropy u_r and
    top-1/top-2 probability margin d_r when dynamic=True, alpha_r = alpha and tau_r = tau when False (DLB);
    dynamic="alpha" or "tau" keeps one half of the rule (ablations); see loss.py's module docstring for the
    full definition, including reduction="sum" and "none".

    Args:
        logits: (N, V) or (B, T, V) student logits, float32, bfloat16, float16 (or float64).
        labels: integer tensor of logits' leading shape; ignore_index marks rows without a label. No
            shifting happens here.
        teacher_logits: None for plain cross-entropy, or the logits the same rows got at the previous
            step, shape of logits, any float dtype. Detached: no gradient flows into the teacher.
        teacher_mask: None (every row has a teacher) or bool of logits' leading shape, True where the
            row has a teacher.
        teacher_stats: None, or (logits' leading shape, 2) float (u_r, d_r) of each teacher row at
            temperature 1 (reference.row_statistics), as the call that computed the teacher logits
            returns them (LossStats.student_stats, return_stats=True). Given, the kernel skips its pass
            over the teacher rows for them (under dynamic=True, "alpha" or "tau" it reads each teacher row
            twice instead of three times); they must be the teacher logits' own statistics for the loss
            to be the one above. Checked for values in [0, 1] when validate (one more host sync).
        alpha: distillation weight, >= 0. tau: temperature, > 0. dynamic: per-row alpha_r and tau_r (True),
            only alpha_r ("alpha"), only tau_r ("tau"), or neither (False, DLB).
        softcap: None, or c > 0 for final-logit softcapping (Gemma 2): the logits enter the loss as
            z' = c tanh(z / c) (the gradient chains through it). teacher_logits are taken as given, i.e.
            as already capped (the logits z' of the previous step), and are not capped again.
        reduction: "mean", "sum" or "none" (per-row losses of logits' leading shape).
        return_stats: also return a LossStats of 0-d tensors (no host sync), with the student rows'
            (u, d) in its student_stats (logits' leading shape, 2).
        backend: "auto", "triton", "cpu" or "reference" (see backends.py).
        validate: check label range and finiteness of logits and teacher logits (and teacher_stats'
            range); this costs one device-to-host sync per call (two with teacher_stats). With validate=False no check syncs: an out-of-range label
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
    logits = check_logits("logits", logits, "(N, V) or (B, T, V)")
    labels = check_tensor("labels", labels)
    leading_shape = logits.shape[:-1]
    vocab_size = logits.shape[-1]
    check_integer("labels", labels)
    if labels.shape != leading_shape:
        raise ValueError(
            f"labels must have logits' leading shape {tuple(leading_shape)}, got {tuple(labels.shape)}"
        )
    check_device("labels", labels, logits.device)

    logits_2d = as_rows(logits, vocab_size)
    teacher_rows = teacher_index = None
    if teacher_logits is not None:
        teacher_logits = check_tensor("teacher_logits", teacher_logits)
        check_float("teacher_logits", teacher_logits)
        if teacher_logits.shape != logits.shape:
            if teacher_logits.shape[:-1] == logits.shape[:-1]:
                raise ValueError(
                    f"teacher_logits have vocabulary size {teacher_logits.shape[-1]} but logits have {vocab_size}"
                )
            raise ValueError(
                f"teacher_logits must have the shape of logits {tuple(logits.shape)}, got {tuple(teacher_logits.shape)}"
            )
        check_device("teacher_logits", teacher_logits, logits.device)
        teacher_rows = as_rows(teacher_logits.detach(), vocab_size)
        teacher_index = teacher_index_from_mask(teacher_mask, leading_shape, logits.device)
    elif teacher_mask is not None:
        raise ValueError("teacher_mask was given without teacher_logits")
    if teacher_stats is not None:
        if teacher_logits is None:
            raise ValueError("teacher_stats was given without teacher_logits")
        teacher_stats = check_tensor("teacher_stats", teacher_stats)
        check_float("teacher_stats", teacher_stats)
        if teacher_stats.shape != (*leading_shape, 2):
            raise ValueError(
                f"teacher_stats must have shape {(*leading_shape, 2)} (u, d) of each teacher row, got {tuple(teacher_stats.shape)}"
            )
        check_device("teacher_stats", teacher_stats, logits.device)
        teacher_stats = teacher_stats.detach().reshape(-1, 2).float().contiguous()

    options = LossOptions(
        distill=DistillConfig(alpha=alpha, tau=tau, dynamic=dynamic, ignore_index=ignore_index, softcap=softcap),
        reduction=reduction,
        backend=backend,
        validate=validate,
        inplace_grad=inplace_grad,
    )
    labels_1d = labels.reshape(-1).long()
    if validate and teacher_stats is not None:
        check_teacher_stats(teacher_stats)
    arguments = (logits_2d, labels_1d, teacher_rows, teacher_index, teacher_stats, options)
    if torch.is_grad_enabled() and logits.requires_grad:
        loss, row_terms, student_stats = dynsdpb_loss_with_grad(*arguments)
    else:
        loss, per_row = fused_loss(*arguments, compute_grad=False)
        row_terms, student_stats = per_row.row_terms, per_row.student_stats
    if reduction == "none":
        loss = loss.reshape(leading_shape)
    if not return_stats:
        return loss
    n_valid, n_distilled = row_counts(labels_1d, teacher_index, ignore_index)
    stats = loss_stats(row_terms, n_valid, n_distilled)
    return loss, replace(stats, student_stats=student_stats.reshape(*leading_shape, 2))


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
    dynamic: bool | str = True,
    ignore_index: int = -100,
    softcap: float | None = None,
    chunk_size: int | None = None,
    accum_dtype: torch.dtype | None = None,
    backend: str = "auto",
    validate: bool = True,
) -> torch.Tensor:
    """dynsdpb_loss(hidden @ weight.T + bias, labels, teacher_logits, teacher_mask, softcap=softcap) with reduction="mean",
    computed chunk by chunk so that the (N, V) logits never exist (module docstring).

    Args:
        hidden: (N, H) or (B, T, H); weight: (V, H) (the LM head, same dtype); bias: (V,) or None.
        labels: (N,) or (B, T), not shifted here; ignore_index marks rows without a label.
        teacher_logits: None or (N, V) / (B, T, V) teacher rows (any float dtype, detached);
            teacher_mask: None or bool of labels' shape. (DynSDPB training keeps its teachers in a ring:
            see FusedLinearDynSDPBLoss.)
        softcap: None or c > 0: the head's raw logits are capped, c tanh(z / c), inside the kernel, chunk by
            chunk (as dynsdpb_loss; teacher_logits are taken as already capped).
        chunk_size: rows per chunk (default: DEFAULT_CHUNK_BYTES of logits for the device); accum_dtype: dtype of the
            weight / bias gradient accumulation (default weight's; torch.float32 for bf16 training).
    Returns the 0-d float32 loss; gradients flow to hidden, weight and bias.
    """
    vocab_size = weight.shape[0]
    hidden_2d = hidden.reshape(-1, hidden.shape[-1])
    labels_1d = labels.reshape(-1)
    teachers = Teachers()
    if teacher_logits is not None:
        teacher_2d = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])
        if teacher_2d.shape != (hidden_2d.shape[0], vocab_size):
            raise ValueError(
                f"teacher_logits must hold ({hidden_2d.shape[0]}, {vocab_size}) rows (one per hidden row, the weight's "
                f"vocabulary), got {tuple(teacher_logits.shape)}"
            )
        teachers = Teachers(teacher_2d.contiguous(), teacher_index_from_mask(teacher_mask, labels.shape, hidden.device))
    elif teacher_mask is not None:
        raise ValueError("teacher_mask was given without teacher_logits")
    options = LossOptions(
        distill=DistillConfig(alpha=alpha, tau=tau, dynamic=dynamic, ignore_index=ignore_index, softcap=softcap),
        backend=backend,
        validate=validate,
    )
    loss, _ = fused_linear_loss_with_grad(
        hidden_2d, weight, bias, labels_1d, teachers, options, chunk_size=chunk_size, accum_dtype=accum_dtype
    )
    return loss
