"""Top-k teachers (rows.py's teacher_support) on every backend, against an independent float64 truth."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, DYNAMIC_IDS, DYNAMIC_MODES
from truth import teacher_uncertainty_discrimination
from test_loss import assert_one_rounding

from dynsdpb_kernels import DistillConfig, LossOptions, fused_loss

IGNORE = -100


def topk_truth(logits, labels, teacher_full, index, k, alpha, tau, dynamic, with_tail=False):
    """Loss and gradient by autograd in float64: CE + alpha_r tau_r^2 KL / n_distilled with (u, d) from the
    full teacher row, and KL(P_hat || Q), P_hat = softmax(top-k of the teacher / tau_r) on the top-k ids;
    with_tail: the KL between P and Q coarsened to (the k top ids, one bucket for all other ids)."""
    z = logits.double().requires_grad_(True)
    valid = labels != IGNORE
    ce = F.cross_entropy(z, labels, ignore_index=IGNORE, reduction="sum") / valid.sum().clamp_min(1)
    distilled = valid & (index >= 0)
    rows = distilled.nonzero().squeeze(1)
    teacher = teacher_full[index[rows]].double()
    u, d = teacher_uncertainty_discrimination(teacher)
    alpha_r = alpha * (1 - u) if dynamic in (True, "alpha") else torch.full_like(u, alpha)
    tau_r = 1 + (tau - 1) * d if dynamic in (True, "tau") else torch.full_like(u, tau)
    values, support = teacher.topk(k, dim=-1)
    log_q_full = F.log_softmax(z[rows] / tau_r[:, None], -1)
    log_q = log_q_full.gather(1, support)
    if with_tail:
        p_full = F.softmax(teacher / tau_r[:, None], -1)
        p_support = p_full.gather(1, support)
        p_coarse = torch.cat([p_support, (1 - p_support.sum(-1, keepdim=True)).clamp_min(0)], -1)
        q_support = log_q.exp()
        q_coarse = torch.cat([q_support, (1 - q_support.sum(-1, keepdim=True)).clamp_min(1e-300)], -1)
        kl = torch.special.xlogy(p_coarse, p_coarse).sum(-1) - (p_coarse * q_coarse.log()).sum(-1)
    else:
        log_p = F.log_softmax(values / tau_r[:, None], -1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    loss = ce + (alpha_r * tau_r**2 * kl).sum() / distilled.sum().clamp_min(1)
    (grad,) = torch.autograd.grad(loss, z)
    return loss.detach(), grad


def topk_inputs(teacher_full, k, ring_dtype, tau=2.5, dynamic=True):
    """Top-k values and ids, (u, d) and the tail mass at tau_r, computed here in float64."""
    values, support = teacher_full.topk(k, dim=-1)
    u, d = teacher_uncertainty_discrimination(teacher_full.double())
    tau_r = 1 + (tau - 1) * d if dynamic in (True, "tau") else torch.full_like(d, tau)
    tail = 1 - F.softmax(teacher_full.double() / tau_r[:, None], -1).gather(1, support).sum(-1)
    return values.to(ring_dtype), support, torch.stack([u, d], -1).float(), tail.float()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("k", [1, 16, 300], ids=lambda k: f"k{k}")
@pytest.mark.parametrize("inplace", [False, True], ids=["fresh", "inplace"])
@pytest.mark.parametrize("dynamic", DYNAMIC_MODES, ids=DYNAMIC_IDS)
@pytest.mark.parametrize("with_tail", [False, True], ids=["plain", "tail"])
def test_topk_teacher_matches_truth(backend, dtype, k, inplace, dynamic, with_tail):
    n_rows, vocab_size = 9, 300
    logits = (torch.randn(n_rows, vocab_size) * 3).to(dtype)
    labels = torch.randint(0, vocab_size, (n_rows,))
    labels[3] = IGNORE
    teacher_full = torch.randn(5, vocab_size) * 3
    teacher_full[0, labels[0]] = 20.0  # the label inside the support: its gradient entry is rewritten there
    index = torch.tensor([0, 1, -1, 2, 3, -1, 4, 1, 0])
    values, support, stats, tail = topk_inputs(teacher_full, k, torch.float32, dynamic=dynamic)
    options = LossOptions(distill=DistillConfig(tau=2.5, dynamic=dynamic), backend=backend, inplace_grad=inplace)
    student = logits.clone()
    loss, rows = fused_loss(
        student, labels, values, index, stats, options, True, teacher_support=support, teacher_tail=tail if with_tail else None
    )
    truth_loss, truth_grad = topk_truth(logits, labels, teacher_full, index, k, 1.0, 2.5, dynamic, with_tail)
    torch.testing.assert_close(loss.double(), truth_loss, rtol=2e-5, atol=2e-6)
    assert_one_rounding(rows.grad, truth_grad, dtype, "grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_with_the_whole_vocabulary_is_the_dense_loss(backend):
    n_rows, vocab_size = 6, 300
    logits = torch.randn(n_rows, vocab_size) * 2
    labels = torch.randint(0, vocab_size, (n_rows,))
    teacher = torch.randn(n_rows, vocab_size) * 2
    index = torch.arange(n_rows)
    values, support, stats, _ = topk_inputs(teacher, vocab_size, torch.float32)
    options = LossOptions(distill=DistillConfig(tau=3.0), backend=backend)
    dense_loss, dense = fused_loss(logits, labels, teacher, index, stats, options, True)
    topk_loss, topk = fused_loss(logits, labels, values, index, stats, options, True, teacher_support=support)
    torch.testing.assert_close(topk_loss, dense_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(topk.grad, dense.grad, rtol=1e-4, atol=1e-7)


def test_topk_needs_stats_and_matching_support():
    logits, labels = torch.randn(2, 10), torch.tensor([1, 2])
    values, support = torch.randn(2, 3), torch.randint(0, 10, (2, 3))
    options = LossOptions(backend="reference")
    with pytest.raises(ValueError, match="need teacher_stats"):
        fused_loss(logits, labels, values, torch.tensor([0, 1]), None, options, False, teacher_support=support)
    with pytest.raises(ValueError, match="teacher_support must be"):
        fused_loss(logits, labels, values, torch.tensor([0, 1]), torch.rand(2, 2), options, False, teacher_support=support[:, :2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_with_topk_ring_matches_truth(backend):
    from dynsdpb_kernels import DynSDPBLoss

    vocab_size, k = 300, 16
    module = DynSDPBLoss(vocab_size, capacity_rows=32, teacher_dtype=torch.float32, teacher_storage="topk", topk=k,
                         backend=backend, tau=2.5)
    first = torch.randn(2, 4, vocab_size) * 3
    labels = torch.randint(0, vocab_size, (2, 4))
    module(first, labels, torch.tensor([0, 1]))
    rows, _ = module.ring.teacher(1)
    assert rows.shape == (3, k) and torch.equal(module.ring.teacher_support(1), first[1, :3].topk(k, -1).indices)
    second = torch.randn(3, 4, vocab_size) * 3
    labels2 = torch.cat([labels, torch.randint(0, vocab_size, (1, 4))])
    student = second.clone().requires_grad_(True)
    loss = module(student, labels2, torch.tensor([0, 1, 2]))
    loss.backward()
    flat_labels = F.pad(labels2[:, 1:], (0, 1), value=IGNORE).reshape(-1)
    teacher_full = first[:, :3].reshape(-1, vocab_size)
    index = torch.tensor([0, 1, 2, -1, 3, 4, 5, -1, -1, -1, -1, -1])
    truth_loss, truth_grad = topk_truth(
        second.reshape(-1, vocab_size), flat_labels, teacher_full, index, k, 1.0, 2.5, True, with_tail=True
    )
    torch.testing.assert_close(loss.double(), truth_loss, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(student.grad.reshape(-1, vocab_size).double(), truth_grad, rtol=1e-4, atol=1e-7)


def test_topk_ring_memory_and_state():
    from dynsdpb_kernels import TeacherRing

    dense = TeacherRing(49152, 64, dtype=torch.bfloat16, device="cpu")
    topk = TeacherRing(49152, 64, dtype=torch.bfloat16, device="cpu", storage="topk", topk=64)
    assert topk.logits.shape == (128, 64) and topk.support.shape == (128, 64)
    assert topk.nbytes < 0.01 * dense.nbytes
    with pytest.raises(ValueError, match="storage"):
        TeacherRing(10, 4, storage="sparse")
    with pytest.raises(ValueError, match="storage='topk'"):
        topk.load_state_dict(dense.state_dict())


@pytest.mark.parametrize("backend", BACKENDS)
def test_tail_bucket_is_closer_to_the_dense_kl(backend):
    """A flat tempered teacher: the tail bucket keeps the top-k KL near the dense one, the plain top-k does not."""
    vocab_size, k = 300, 16
    logits = torch.randn(8, vocab_size)
    labels = torch.randint(0, vocab_size, (8,))
    teacher = logits + 0.3 * torch.randn(8, vocab_size)  # a student close to its teacher, as one step later
    index = torch.arange(8)
    values, support, stats, tail = topk_inputs(teacher, k, torch.float32, tau=3.0)
    options = LossOptions(distill=DistillConfig(tau=3.0), backend=backend)
    dense = fused_loss(logits, labels, teacher, index, stats, options, False)[1].kl
    plain = fused_loss(logits, labels, values, index, stats, options, False, teacher_support=support)[1].kl
    bucket = fused_loss(logits, labels, values, index, stats, options, False, teacher_support=support, teacher_tail=tail)[1].kl
    assert (bucket <= dense + 1e-6).all()  # coarsening never increases a KL (data processing inequality)
    assert (bucket - dense).abs().mean() < 0.5 * (plain - dense).abs().mean()
