"""An independent statement of the DynSDPB loss with autograd: float64 truth, and eager PyTorch at any dtype.

Built from torch.nn.functional.cross_entropy, kl_div, torch.special.entr and topk; it shares no code with
the package, and its gradient comes from autograd rather than from the closed form the kernels use.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def teacher_uncertainty_discrimination(teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    probs = teacher.softmax(-1)
    vocab_size = teacher.shape[-1]
    entropy = torch.special.entr(probs).sum(-1)
    uncertainty = entropy / math.log(vocab_size) if vocab_size > 1 else torch.zeros_like(entropy)
    top = probs.topk(min(2, vocab_size), dim=-1).values
    discrimination = top[..., 0] - top[..., 1] if vocab_size > 1 else top[..., 0]
    return uncertainty, discrimination


def eager_dynsdpb(
    logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    teacher_mask: torch.Tensor | None = None,
    *,
    alpha: float = 1.0,
    tau: float = 3.0,
    dynamic: bool | str = True,
    ignore_index: int = -100,
    reduction: str = "mean",
    grad_output: torch.Tensor | float = 1.0,
    dtype: torch.dtype | None = None,
    stats_from: torch.Tensor | None = None,
    softcap: float | None = None,
) -> dict:
    """Loss, d(loss * grad_output)/d logits and stats, computed eagerly in `dtype` (the inputs' by default).

    stats_from: logits to take the teachers' (u, d) from instead of teacher_logits (a ring computes them
    on the row before rounding it to its storage dtype). softcap: the student logits enter the loss as
    softcap * tanh(z / softcap) (Gemma 2's final-logit softcapping), differentiated by autograd; teacher
    logits are used as given (already capped)."""
    vocab_size = logits.shape[-1]
    dtype = dtype or logits.dtype
    z_raw = logits.detach().reshape(-1, vocab_size).to(dtype).requires_grad_(True)
    z = z_raw if softcap is None else softcap * torch.tanh(z_raw / softcap)
    y = labels.reshape(-1)
    valid = y != ignore_index
    ce = F.cross_entropy(z, y, ignore_index=ignore_index, reduction="none")
    n_valid = valid.sum()
    out = {"n_valid": n_valid}
    if teacher_logits is None:
        distill = torch.zeros_like(ce)
        distilled = torch.zeros_like(valid)
        kl = alpha_r = tau_r = uncertainty = torch.zeros_like(ce)
    else:
        t = teacher_logits.detach().reshape(-1, vocab_size).to(dtype)
        has_teacher = torch.ones_like(valid) if teacher_mask is None else teacher_mask.reshape(-1)
        distilled = valid & has_teacher
        stats_source = t if stats_from is None else stats_from.detach().reshape(-1, vocab_size).to(dtype)
        uncertainty, discrimination = teacher_uncertainty_discrimination(stats_source)
        # dynamic: True (both), "alpha" or "tau" (one half of the rule), False (DLB's constants)
        weight_follows_teacher = dynamic is True or dynamic == "alpha"
        temperature_follows_teacher = dynamic is True or dynamic == "tau"
        alpha_r = alpha * (1 - uncertainty) if weight_follows_teacher else torch.full_like(uncertainty, alpha)
        tau_r = 1 + (tau - 1) * discrimination if temperature_follows_teacher else torch.full_like(uncertainty, tau)
        log_q = F.log_softmax(z / tau_r[:, None], dim=-1)
        log_p = F.log_softmax(t / tau_r[:, None], dim=-1)
        kl = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
        distill = torch.where(distilled, alpha_r * tau_r**2 * kl, 0)
    n_distilled = distilled.sum()
    if reduction == "mean":
        loss = ce.sum() / n_valid.clamp_min(1) + distill.sum() / n_distilled.clamp_min(1)
    elif reduction == "sum":
        loss = ce.sum() + distill.sum()
    else:
        loss = (ce + distill).reshape(labels.shape)
    (grad,) = torch.autograd.grad((loss * grad_output).sum(), z_raw)
    per_distilled = n_distilled.clamp_min(1)
    mask = distilled.to(dtype)
    out.update(
        capped_logits=z.detach().reshape(logits.shape),
        loss=loss.detach(),
        grad=grad.reshape(logits.shape),
        n_distilled=n_distilled,
        ce=ce.detach().sum() / n_valid.clamp_min(1),
        kl=(kl.detach() * mask).sum() / per_distilled,
        distill=distill.detach().sum() / per_distilled,
        alpha_mean=(alpha_r.detach() * mask).sum() / per_distilled,
        tau_mean=(tau_r.detach() * mask).sum() / per_distilled,
        uncertainty_mean=(uncertainty.detach() * mask).sum() / per_distilled,
    )
    return out


def truth_dynsdpb(logits, labels, teacher_logits=None, teacher_mask=None, **kwargs) -> dict:
    """eager_dynsdpb in float64."""
    return eager_dynsdpb(logits, labels, teacher_logits, teacher_mask, dtype=torch.float64, **kwargs)
