"""The fused LM head + DynSDPB loss: chunked equals unchunked equals the float64 truth, the module equals
DynSDPBLoss on materialised logits, and no chunk larger than chunk_size is ever formed."""

from __future__ import annotations

import pytest
import torch
from conftest import BACKENDS
from test_loss import assert_no_worse_than_eager
from truth import eager_dynsdpb, truth_dynsdpb

import dynsdpb_kernels.fused_linear as fused_linear
from dynsdpb_kernels import DynSDPBLoss, FusedLinearDynSDPBLoss, fused_linear_dynsdpb_loss

N, H, V = 23, 16, 300


def head_case(dtype, bias=True):
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(N, H, generator=gen).to(dtype)
    weight = (torch.randn(V, H, generator=gen) / H**0.5 * 3).to(dtype)
    b = (torch.randn(V, generator=gen) * 0.1).to(dtype) if bias else None
    labels = torch.randint(0, V, (N,), generator=gen)
    labels[::4] = -100
    teacher = torch.randn(N, V, generator=gen) * 2
    mask = torch.rand(N, generator=gen) < 0.6
    return hidden, weight, b, labels, teacher, mask


def head_reference(hidden, weight, bias, labels, teacher, mask, dtype, **kwargs):
    """Loss and the gradients of hidden, weight and bias by the chain rule, computed in `dtype`: float64 is
    the truth; the inputs' dtype is what eager PyTorch gets (logits rounded to it, matmuls in it)."""
    h, w = hidden.to(dtype), weight.to(dtype)
    logits = h @ w.T + (bias.to(dtype) if bias is not None else 0)
    if dtype == torch.float64:
        out = truth_dynsdpb(logits, labels, teacher.double(), mask, **kwargs)
    else:
        out = eager_dynsdpb(logits, labels, teacher.to(dtype), mask, **kwargs)
    g = out["grad"]
    return out["loss"], g @ w, g.T @ h, g.sum(0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk_size", [1, 7, None], ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_linear_matches_truth(backend, chunk_size, dtype):
    hidden, weight, bias, labels, teacher, mask = head_case(dtype)
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    loss = fused_linear_dynsdpb_loss(
        leaves[0], leaves[1], labels, teacher, mask, bias=leaves[2], tau=2.0, chunk_size=chunk_size,
        accum_dtype=torch.float32, backend=backend,
    )
    (loss * 3.0).backward()
    truth = head_reference(hidden, weight, bias, labels, teacher, mask, torch.float64, tau=2.0)
    eager = head_reference(hidden, weight, bias, labels, teacher, mask, dtype, tau=2.0)
    # no worse than eager PyTorch at the same dtype (logits rounded to it, matmuls in it), plus a rounding
    tol = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (2**-7, 2e-3)}[dtype]
    assert_no_worse_than_eager(loss, eager[0].float(), truth[0], *tol, "loss")
    for leaf, eager_grad, true_grad, name in zip(leaves, eager[1:], truth[1:], ("hidden", "weight", "bias")):
        assert leaf.grad.dtype == dtype, name
        assert_no_worse_than_eager(leaf.grad / 3.0, eager_grad, true_grad, *tol, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunked_equals_unchunked_materialised_path(backend):
    hidden, weight, bias, labels, teacher, mask = head_case(torch.float32, bias=False)
    from dynsdpb_kernels import dynsdpb_loss

    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    expected = dynsdpb_loss(h1 @ w1.T, labels, teacher, mask, backend=backend)
    expected.backward()
    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss = fused_linear_dynsdpb_loss(h2, w2, labels, teacher, mask, chunk_size=5, backend=backend)
    loss.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(w2.grad, w1.grad, rtol=1e-5, atol=1e-7)


def test_no_chunk_larger_than_chunk_size(monkeypatch):
    seen = []
    real = fused_linear.fused_loss

    def spy(logits, *args, **kwargs):
        seen.append(tuple(logits.shape))
        return real(logits, *args, **kwargs)

    monkeypatch.setattr(fused_linear, "fused_loss", spy)
    hidden, weight, bias, labels, teacher, mask = head_case(torch.float32)
    fused_linear_dynsdpb_loss(hidden.requires_grad_(True), weight, labels, teacher, mask, chunk_size=6, backend="reference")
    assert seen == [(6, V)] * 3 + [(5, V)]
    assert fused_linear.default_chunk_size(10**6, 128256, torch.bfloat16) == fused_linear.DEFAULT_CHUNK_BYTES["cpu"] // (128256 * 2)
    assert fused_linear.default_chunk_size(10, 128256, torch.float32, "cuda") == 10


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("storage", ["dense", "topk"])
def test_module_equals_dynsdpb_loss_on_materialised_logits(backend, storage):
    gen = torch.Generator().manual_seed(9)
    weight = torch.randn(V, H, generator=gen) / H**0.5 * 3
    options = dict(capacity_rows=64, backend=backend, teacher_storage=storage, topk=16, tau=2.0)
    fused = FusedLinearDynSDPBLoss(V, chunk_size=4, **options)
    plain = DynSDPBLoss(V, **options)
    for ids in ([0, 1], [0, 1, 2, 3], [2, 3, 4, 5]):
        hidden = torch.randn(len(ids), 5, H, generator=gen)
        labels = torch.randint(0, V, (len(ids), 5), generator=gen)
        h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        expected = plain(h1 @ w1.T, labels, torch.tensor(ids))
        expected.backward()
        h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        loss = fused(h2, w2, labels, torch.tensor(ids))
        loss.backward()
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(w2.grad, w1.grad, rtol=1e-4, atol=1e-6)
        assert int(fused.last_stats.teacher_samples) == int(plain.last_stats.teacher_samples)
    assert int(fused.last_stats.teacher_samples) == 2


def test_fused_linear_bad_input_is_named():
    module = FusedLinearDynSDPBLoss(V, capacity_rows=8, backend="reference")
    hidden = torch.randn(2, 3, H)
    with pytest.raises(ValueError, match="built for vocab_size=300"):
        module(hidden, torch.randn(V + 1, H), torch.zeros(2, 3, dtype=torch.long), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"weight must have shape \(V, 16\)"):
        module(hidden, torch.randn(V, H + 1), torch.zeros(2, 3, dtype=torch.long), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="labels must lie in"):
        module(hidden, torch.randn(V, H), torch.full((2, 3), V), torch.tensor([0, 1]))
    bad = hidden.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        module(bad, torch.randn(V, H), torch.zeros(2, 3, dtype=torch.long), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="chunk_size"):
        FusedLinearDynSDPBLoss(V, chunk_size=0)
