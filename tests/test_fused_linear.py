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


# ---- autocast: float32 weights under bf16 / fp16 autocast (Trainer bf16=True, TRL's default) ----

AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]


def autocast_reference(hidden, weight, bias, labels, teacher, mask, dtype, **kwargs):
    """What autograd gives through F.linear inside the same autocast with the float64 truth's dL/dz on its
    (autocast-rounded) logits, and the float64 chain rule on those logits and the rounded operands.
    Returns (logits, truth loss, autograd grads (h, W, b), float64 grads (h, W, b))."""
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    with torch.autocast("cpu", dtype=dtype):
        logits = torch.nn.functional.linear(*leaves)
    truth = truth_dynsdpb(logits.detach().double(), labels, teacher.double(), mask, **kwargs)
    logits.backward(truth["grad"].to(dtype))
    g = truth["grad"]
    h, w = hidden.to(dtype).double(), weight.to(dtype).double()
    return logits, truth["loss"], [leaf.grad for leaf in leaves], (g @ w, g.T @ h, g.sum(0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
def test_fused_linear_under_autocast_matches_autograd_through_linear(backend, dtype):
    hidden, weight, bias, labels, teacher, mask = head_case(torch.float32)
    logits, true_loss, autograd_grads, true_grads = autocast_reference(
        hidden, weight, bias, labels, teacher, mask, dtype, tau=2.0
    )
    assert logits.dtype == dtype
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    with torch.autocast("cpu", dtype=dtype):
        loss = fused_linear_dynsdpb_loss(
            leaves[0], leaves[1], labels, teacher, mask, bias=leaves[2], tau=2.0, chunk_size=7, backend=backend
        )
    (loss * 3.0).backward()
    # the loss of the autocast-rounded logits (the kernels compute in float32): logits in fp32 would miss it
    # by about eps(dtype) * |z|
    torch.testing.assert_close(loss.double(), true_loss, rtol=1e-5, atol=1e-6)
    # gradients: as autograd's (dL/dz and each GEMM's result rounded to dtype once), plus one rounding of
    # dtype relative to each element (dL/dz rounded in another order), plus eps/4 of the largest for dL/dW's
    # and dL/db's per-chunk roundings, summed in float32
    eps = torch.finfo(dtype).eps
    for leaf, autograd_grad, true_grad, name in zip(leaves, autograd_grads, true_grads, ("hidden", "weight", "bias")):
        assert leaf.grad.dtype == torch.float32 == autograd_grad.dtype, name  # the leaves' own dtype
        assert_no_worse_than_eager(leaf.grad / 3.0, autograd_grad, true_grad, eps, eps / 4, name)


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
def test_module_under_autocast_equals_dynsdpb_loss_on_autocast_logits(dtype):
    """Two steps (the second distils from the ring the first filled) through FusedLinearDynSDPBLoss and
    through DynSDPBLoss on F.linear's logits, both under autocast: same loss, same gradients."""
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(V, H, generator=gen) / H**0.5 * 3
    options = dict(capacity_rows=64, backend="cpu", tau=2.0)
    fused = FusedLinearDynSDPBLoss(V, chunk_size=4, **options)
    plain = DynSDPBLoss(V, **options)
    for ids in ([0, 1], [1, 2]):
        hidden = torch.randn(len(ids), 5, H, generator=gen)
        labels = torch.randint(0, V, (len(ids), 5), generator=gen)
        h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=dtype):
            expected = plain(torch.nn.functional.linear(h1, w1), labels, torch.tensor(ids))
            loss = fused(h2, w2, labels, torch.tensor(ids))
        expected.backward()
        loss.backward()
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(h2.grad, h1.grad, rtol=eps, atol=eps * h1.grad.abs().max().item())
        torch.testing.assert_close(w2.grad, w1.grad, rtol=eps, atol=eps * w1.grad.abs().max().item())
    assert int(fused.last_stats.teacher_samples) == int(plain.last_stats.teacher_samples) == 1


def test_apply_dynsdpb_on_a_tiny_llama_under_bf16_autocast():
    """The patched LLaMA forward/backward under bf16 autocast with float32 weights (Trainer bf16=True)
    equals the model's own logits + DynSDPBLoss under the same autocast."""
    pytest.importorskip("transformers")
    from dynsdpb_kernels.integrations.transformers import apply_dynsdpb
    from dynsdpb_kernels.tools.finetune import tiny_llama

    vocab = 200
    model, reference = tiny_llama(vocab, seed=0, hidden_size=32), tiny_llama(vocab, seed=0, hidden_size=32)
    apply_dynsdpb(model, capacity_rows=16, backend="cpu", chunk_size=5)
    plain = DynSDPBLoss(vocab, capacity_rows=16, backend="cpu")
    gen = torch.Generator().manual_seed(0)
    for ids in ([0, 1], [1, 2]):
        input_ids = torch.randint(3, vocab, (2, 7), generator=gen)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=input_ids, labels=input_ids, sample_ids=torch.tensor(ids))
            logits = reference(input_ids=input_ids).logits
            expected = plain(logits, input_ids, torch.tensor(ids))
        assert out.logits is None and logits.dtype == torch.bfloat16
        out.loss.backward()
        expected.backward()
        torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
        for (name, ours), theirs in zip(model.named_parameters(), reference.parameters()):
            assert ours.grad.dtype == torch.float32, name
            scale = theirs.grad.abs().max().item()
            torch.testing.assert_close(ours.grad, theirs.grad, rtol=2**-7, atol=2**-7 * scale, msg=name)
            ours.grad = theirs.grad = None
    assert int(model.dynsdpb_loss.last_stats.teacher_samples) == 1


# ---- a frozen head (LoRA): no dL/dW is allocated or computed ----

MATMULS = {"mm", "addmm", "addmm_", "matmul", "bmm", "baddbmm"}


class OutputShapes(torch.utils._python_dispatch.TorchDispatchMode):
    """Records (op name, output shape) of every aten op that is not a view (views allocate nothing)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            for tensor in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(tensor, torch.Tensor):
                    self.ops.append((func.overloadpacket.__name__, tuple(tensor.shape)))
        return out

    def matmuls(self):
        return [shape for name, shape in self.ops if name in MATMULS]


CHUNK = 7  # 23 rows: chunks of 7, 7, 7, 2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("trainable", ["hidden", "weight", "hidden+weight"])
def test_only_the_wanted_gradients_are_allocated_and_computed(backend, trainable):
    hidden, weight, _, labels, teacher, mask = head_case(torch.float32, bias=False)
    h = hidden.clone().requires_grad_("hidden" in trainable)
    w = weight.clone().requires_grad_("weight" in trainable)
    spy = OutputShapes()
    with spy:
        loss = fused_linear_dynsdpb_loss(h, w, labels, teacher, mask, tau=2.0, chunk_size=CHUNK, backend=backend)
        loss.backward()
    chunks = [(CHUNK, V)] * 3 + [(N - 3 * CHUNK, V)]
    grad_hidden_mms = [(rows, H) for rows, _ in chunks] if h.requires_grad else []
    grad_weight_mms = [(V, H)] * len(chunks) if w.requires_grad else []
    # per chunk: the logits, then dL/dh_c = g_c W for a trainable hidden, dL/dW += g_c^T h_c for a trainable W
    assert sorted(spy.matmuls()) == sorted(chunks + grad_hidden_mms + grad_weight_mms)
    shapes = {shape for _, shape in spy.ops}
    assert ((V, H) in shapes) == w.requires_grad  # no (V, H) buffer at all for a frozen head
    assert ((N, H) in shapes) == h.requires_grad
    truth = head_reference(hidden, weight, None, labels, teacher, mask, torch.float64, tau=2.0)
    for leaf, true_grad in ((h, truth[1]), (w, truth[2])):
        if leaf.requires_grad:
            torch.testing.assert_close(leaf.grad.double(), true_grad, rtol=1e-4, atol=1e-6)
        else:
            assert leaf.grad is None
    torch.testing.assert_close(loss.double(), truth[0], rtol=1e-5, atol=1e-6)


def test_a_frozen_bias_gets_no_gradient_buffer():
    hidden, weight, bias, labels, teacher, mask = head_case(torch.float32)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    spy = OutputShapes()
    with spy:
        fused_linear_dynsdpb_loss(h, w, labels, teacher, mask, bias=bias, chunk_size=CHUNK, backend="reference").backward()
    assert (V,) not in {shape for _, shape in spy.ops}
    trained_bias = bias.clone().requires_grad_(True)
    spy = OutputShapes()
    with spy:
        fused_linear_dynsdpb_loss(h, w, labels, teacher, mask, bias=trained_bias, chunk_size=CHUNK, backend="reference").backward()
    assert (V,) in {shape for _, shape in spy.ops}  # the spy sees the bias gradient when there is one
    truth = head_reference(hidden, weight, bias, labels, teacher, mask, torch.float64, tau=3.0)
    torch.testing.assert_close(trained_bias.grad.double(), truth[3], rtol=1e-4, atol=1e-6)
