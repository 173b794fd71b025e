"""Readable pure-PyTorch implementation of the per-row contract (see contract.py).

It is the oracle the kernels are tested against, and the fallback where no kernel runs. It computes in
float64 for float64 logits and in float32 otherwise, materialising a few (N, V) temporaries; the
kernels compute the same quantities in one or two streaming passes over each row.
"""

from __future__ import annotations

import math

import torch

from .contract import (
    N_ROW_TERMS,
    ROW_ALPHA,
    ROW_CE,
    ROW_KL,
    ROW_TAU,
    ROW_UNCERTAINTY,
    N_STATS,
    STAT_DISCRIMINATION,
    STAT_LOG_NORM,
    STAT_TAU_REC,
    DistillConfig,
    FusedRows,
    TAIL_FLOOR,
    RowRecord,
    row_temperature,
    row_terms_dtype,
    softcapped,
)


def row_statistics(logits: torch.Tensor) -> torch.Tensor:
    """(u, d) of each row of `logits` (M, V) at temperature 1, as an (M, 2) tensor of logits' dtype.

    u = H(p) / ln V with p = softmax(x) and H(p) = -sum_j p_j ln p_j   (u = 0 when V == 1)
    d = p_(1) - p_(2), the largest minus the second-largest probability (d = 1 when V == 1)
    """
    vocab_size = logits.shape[-1]
    log_p = torch.log_softmax(logits, dim=-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    uncertainty = entropy / math.log(vocab_size) if vocab_size > 1 else torch.zeros_like(entropy)
    top = log_p.topk(min(2, vocab_size), dim=-1).values.exp()
    discrimination = top[:, 0] - top[:, 1] if vocab_size > 1 else top[:, 0]
    return torch.stack([uncertainty.clamp(0, 1), discrimination.clamp(0, 1)], dim=-1)


def reference_fused_rows(
    logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_rows: torch.Tensor | None,
    teacher_index: torch.Tensor | None,
    teacher_stats: torch.Tensor | None,
    config: DistillConfig,
    grad_scale: torch.Tensor,
    compute_grad: bool,
    grad_out: torch.Tensor | None = None,
    record: RowRecord | None = None,
    teacher_support: torch.Tensor | None = None,
    teacher_tail: torch.Tensor | None = None,
) -> FusedRows:
    """Per-row terms, student statistics and gradient of the DynSDPB loss, in plain PyTorch.

    Arguments follow contract.py. `grad_out`, when given, is the (N, V) buffer the gradient is written to
    (the logits themselves in the opt-in in-place mode); otherwise a fresh buffer is allocated.
    `record`, when given, receives copies of the recorded rows and their (u, d) (and, with four stats
    columns, their (tau_rec, log_norm): contract.py, "Stored log-normalisers"). `teacher_support`
    (R, k), when given, holds the vocabulary ids of top-k teacher rows (teacher_rows is then (R, k)), and
    `teacher_tail` (R,) their probability mass outside the top k at tau_r (contract.py). With
    config.softcap = c the student rows are z' = c tanh(z / c) throughout (the record too) and the gradient
    is multiplied by dz'/dz = 1 - tanh^2(z / c) (contract.py).
    """
    compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    student = softcapped(logits.to(compute_dtype), config.softcap)
    n_rows, vocab_size = student.shape

    valid = labels != config.ignore_index
    label_in_range = (labels >= 0) & (labels < vocab_size)
    safe_labels = torch.where(valid & label_in_range, labels, 0)
    log_q1 = torch.log_softmax(student, dim=-1)
    # ce = logsumexp(z) - z_y = softplus(log sum_{j != y} exp z_j - z_y): exact also when p_y -> 1, where
    # logsumexp(z) - z_y cancels; likewise p_y - 1 = -exp(log sum_{j != y} exp z_j - logsumexp(z)).
    label_logit = student.gather(1, safe_labels[:, None]).squeeze(1)
    log_rest = student.scatter(1, safe_labels[:, None], -math.inf).logsumexp(-1)
    ce = torch.where(valid, torch.nn.functional.softplus(log_rest - label_logit), 0.0)
    ce = torch.where(valid & ~label_in_range, math.nan, ce)  # only reachable with validate=False

    row_terms = torch.zeros(n_rows, N_ROW_TERMS, dtype=row_terms_dtype(logits.dtype), device=logits.device)
    row_terms[:, ROW_CE] = ce
    student_stats = row_statistics(student).float()

    grad = None
    ce_scale, distill_scale = grad_scale.to(compute_dtype).unbind()
    if compute_grad:
        # d ce_r / d z_r = softmax(z_r) - onehot(y_r)
        grad = log_q1.exp()
        grad.scatter_(1, safe_labels[:, None], -torch.exp(log_rest - student.logsumexp(-1))[:, None])
        grad *= (valid & label_in_range)[:, None] * ce_scale

    if teacher_rows is not None and teacher_index is not None:
        distilled_rows = ((teacher_index >= 0) & valid).nonzero().squeeze(1)
        index = teacher_index[distilled_rows]
        teacher = teacher_rows[index].to(compute_dtype)
        if teacher_stats is not None:  # (u, d); a stored log-normaliser is not needed here (contract.py)
            stats = teacher_stats[index, :N_STATS].to(compute_dtype)
        else:
            stats = row_statistics(teacher)
        uncertainty, discrimination = stats.unbind(-1)
        if config.dynamic_alpha:
            alpha = config.alpha * (1.0 - uncertainty)
        else:
            alpha = torch.full_like(uncertainty, config.alpha)
        if config.dynamic_tau:
            tau = 1.0 + (config.tau - 1.0) * discrimination
        else:
            tau = torch.full_like(uncertainty, config.tau)
        log_p = torch.log_softmax(teacher / tau[:, None], dim=-1)
        log_q = torch.log_softmax(student[distilled_rows] / tau[:, None], dim=-1)
        p = log_p.exp()
        if teacher_support is not None:
            # top-k teacher on its k support ids: P_j = (1 - tail) P_hat_j there, and the tail mass as one
            # bucket against Q's mass outside the support (contract.py); tail = 0 is the plain top-k KL
            support = teacher_support[index]
            log_q_support = log_q.gather(1, support)
            tail = teacher_tail[index].to(compute_dtype) if teacher_tail is not None else torch.zeros_like(tau)
            log_p = log_p + torch.log1p(-tail)[:, None]
            p = log_p.exp()
            q_tail = (1.0 - log_q_support.exp().sum(-1)).clamp_min(TAIL_FLOOR)
            tail_kl = torch.where(tail > 0, tail * (tail.clamp_min(1e-300).log() - q_tail.log()), 0.0)
            kl = (p * (log_p - log_q_support)).sum(-1) + tail_kl
            # the gradient's target: P on the support, the tail mass spread like Q elsewhere
            p = (log_q.exp() * (tail / q_tail)[:, None]).scatter_(1, support, p)
        else:
            kl = (p * (log_p - log_q)).sum(-1)
        row_terms[distilled_rows, ROW_KL] = kl
        row_terms[distilled_rows, ROW_ALPHA] = alpha
        row_terms[distilled_rows, ROW_TAU] = tau
        row_terms[distilled_rows, ROW_UNCERTAINTY] = uncertainty
        if grad is not None:
            # d (alpha_r tau_r^2 kl_r) / d z_r = alpha_r tau_r (Q - P), alpha_r, tau_r and P held constant
            grad[distilled_rows] += (distill_scale * alpha * tau)[:, None] * (log_q.exp() - p)

    if record is not None:  # before grad_out, which may be the logits' own storage
        recorded = (record.index >= 0).nonzero().squeeze(1)
        slots = record.index[recorded]
        if record.ring_logits is not None:
            recorded_rows = logits if config.softcap is None else student  # the rows as the loss saw them
            record.ring_logits[slots] = recorded_rows[recorded].to(record.ring_logits.dtype)
        record.stats[slots, :N_STATS] = student_stats[recorded]
        if record.log_norm:
            # the stored log-normaliser (contract.py): of the row as stored, at the tau it will teach at
            tau_rec = row_temperature(config, student_stats[recorded, STAT_DISCRIMINATION])
            stored = record.ring_logits[slots].to(compute_dtype)
            record.stats[slots, STAT_TAU_REC] = tau_rec
            record.stats[slots, STAT_LOG_NORM] = (stored / tau_rec.to(compute_dtype)[:, None]).logsumexp(-1).float()

    if grad is not None:
        if config.softcap is not None:
            # dz'/dz = 1 - tanh^2(z / c) = 1 - (z' / c)^2, computed as sech^2(z / c) (no cancellation near
            # saturation; cosh overflows to inf there, giving the exact 0)
            grad *= torch.cosh(logits.to(compute_dtype) / config.softcap).square().reciprocal()
        if grad_out is None:
            grad = grad.to(logits.dtype)
        else:
            grad = grad_out.copy_(grad)
    return FusedRows(row_terms=row_terms, student_stats=student_stats, grad=grad)
