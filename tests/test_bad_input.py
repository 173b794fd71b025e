"""Every bad input gets a TypeError or ValueError that names the argument, and changes nothing."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import BACKENDS

import dynsdpb_kernels.backends as backends
from dynsdpb_kernels import dynsdpb_loss


def good_inputs(n_rows=5, vocab_size=70):
    logits = torch.randn(n_rows, vocab_size, requires_grad=True)
    labels = torch.randint(0, vocab_size, (n_rows,))
    teacher = torch.randn(n_rows, vocab_size)
    mask = torch.ones(n_rows, dtype=torch.bool)
    return logits, labels, teacher, mask


CASES = {
    "logits not a tensor": (lambda l, y, t, m: ([[1.0]], y, None, None, {}), TypeError, "logits must be a torch.Tensor"),
    "integer logits": (lambda l, y, t, m: (y[:, None].expand(-1, 3), y, None, None, {}), TypeError, "logits must have dtype"),
    "1-D logits": (lambda l, y, t, m: (l[0], y, None, None, {}), ValueError, r"logits must have shape \(N, V\) or \(B, T, V\)"),
    "float labels": (lambda l, y, t, m: (l, y.float(), None, None, {}), TypeError, "labels must be an integer tensor"),
    "bool labels": (lambda l, y, t, m: (l, y > 3, None, None, {}), TypeError, "labels must be an integer tensor"),
    "labels too short": (lambda l, y, t, m: (l, y[:-1], None, None, {}), ValueError, "labels must have logits' leading shape"),
    "label >= V": (lambda l, y, t, m: (l, y.index_fill(0, torch.tensor([2]), 70), t, m, {}), ValueError, r"labels must lie in \[0, 70\)"),
    "negative label": (lambda l, y, t, m: (l, y.index_fill(0, torch.tensor([1]), -1), None, None, {}), ValueError, "labels must lie in"),
    "teacher not float": (lambda l, y, t, m: (l, y, t.long(), m, {}), TypeError, "teacher_logits must have dtype"),
    "teacher vocabulary": (lambda l, y, t, m: (l, y, t[:, :60], m, {}), ValueError, "teacher_logits have vocabulary size 60 but logits have 70"),
    "teacher rows": (lambda l, y, t, m: (l, y, t[:3], m, {}), ValueError, "teacher_logits must have the shape of logits"),
    "mask shape": (lambda l, y, t, m: (l, y, t, m[:3], {}), ValueError, "teacher_mask must be a bool tensor"),
    "mask dtype": (lambda l, y, t, m: (l, y, t, m.long(), {}), ValueError, "teacher_mask must be a bool tensor"),
    "mask without teacher": (lambda l, y, t, m: (l, y, None, m, {}), ValueError, "teacher_mask was given without teacher_logits"),
    "tau zero": (lambda l, y, t, m: (l, y, t, m, {"tau": 0.0}), ValueError, "tau must be a finite number > 0"),
    "tau negative": (lambda l, y, t, m: (l, y, t, m, {"tau": -2.0}), ValueError, "tau must be"),
    "tau nan": (lambda l, y, t, m: (l, y, t, m, {"tau": math.nan}), ValueError, "tau must be"),
    "alpha negative": (lambda l, y, t, m: (l, y, t, m, {"alpha": -0.1}), ValueError, "alpha must be a finite number >= 0"),
    "alpha inf": (lambda l, y, t, m: (l, y, t, m, {"alpha": math.inf}), ValueError, "alpha must be"),
    "dynamic": (lambda l, y, t, m: (l, y, t, m, {"dynamic": "both"}), ValueError, "dynamic must be True, False, 'alpha' or 'tau', got 'both'"),
    "ignore_index float": (lambda l, y, t, m: (l, y, t, m, {"ignore_index": -100.0}), TypeError, "ignore_index must be an int"),
    "reduction": (lambda l, y, t, m: (l, y, t, m, {"reduction": "batchmean"}), ValueError, "reduction must be one of"),
    "backend": (lambda l, y, t, m: (l, y, t, m, {"backend": "cuda"}), ValueError, "backend must be one of"),
    "labels on another device": (lambda l, y, t, m: (l, y.to("meta"), None, None, {}), ValueError, "labels is on meta"),
    "teacher on another device": (lambda l, y, t, m: (l, y, t.to("meta"), None, {}), ValueError, "teacher_logits is on meta"),
    "mask on another device": (lambda l, y, t, m: (l, y, t, m.to("meta"), {}), ValueError, "teacher_mask is on meta"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_named(backend, case):
    build, error, message = CASES[case]
    logits, labels, teacher, mask = good_inputs()
    before = [x.clone() for x in (logits.detach(), labels, teacher, mask)]
    args_logits, args_labels, args_teacher, args_mask, kwargs = build(logits, labels, teacher, mask)
    kwargs.setdefault("backend", backend)
    with pytest.raises(error, match=message):
        dynsdpb_loss(args_logits, args_labels, args_teacher, args_mask, **kwargs)
    for original, copy in zip((logits.detach(), labels, teacher, mask), before):
        assert torch.equal(original, copy)
    assert logits.grad is None


NON_FINITE = [math.nan, math.inf, -math.inf]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy notices the NaN too
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", NON_FINITE, ids=str)
@pytest.mark.parametrize("inplace_grad", [False, True], ids=["fresh", "inplace"])
def test_non_finite_logits_raise(backend, value, inplace_grad):
    logits, labels, teacher, mask = good_inputs()
    with torch.no_grad():
        logits[3, 17] = value
    before = logits.detach().clone()
    with pytest.raises(ValueError, match=r"logits contain NaN or inf in 1 rows, e.g. rows \[3\]"):
        dynsdpb_loss(logits, labels, teacher, mask, backend=backend, inplace_grad=inplace_grad)
    assert torch.equal(logits.detach().isnan(), before.isnan())  # unchanged, even with inplace_grad
    assert torch.equal(torch.nan_to_num(logits.detach()), torch.nan_to_num(before))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", NON_FINITE, ids=str)
@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic", "fixed"])
def test_non_finite_teacher_raises(backend, value, dynamic):
    logits, labels, teacher, mask = good_inputs()
    teacher[2, 5] = value
    with pytest.raises(ValueError, match=r"teacher logits contain NaN or inf in 1 rows used as teachers, e.g. teacher rows \[2\]"):
        dynsdpb_loss(logits, labels, teacher, mask, backend=backend, dynamic=dynamic)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_teacher_row_that_teaches_nobody_is_fine(backend):
    """A teacher row that is masked out is never read, so its values do not matter."""
    logits, labels, teacher, mask = good_inputs()
    teacher[2, 5] = math.nan
    mask[2] = False
    loss = dynsdpb_loss(logits, labels, teacher, mask, backend=backend)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("backend", BACKENDS)
def test_validate_false_makes_bad_labels_visible_as_nan(backend):
    logits, labels, teacher, mask = good_inputs()
    labels[1] = 500
    loss = dynsdpb_loss(logits, labels, teacher, mask, backend=backend, validate=False, reduction="none")
    assert math.isnan(float(loss[1].detach())) and torch.isfinite(loss[[0, 2, 3, 4]]).all()


def test_triton_backend_needs_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.setattr(backends, "triton_interpreted", lambda: False)
    logits, labels, _, _ = good_inputs()
    with pytest.raises(ValueError, match="backend='triton' runs on CUDA tensors"):
        dynsdpb_loss(logits, labels, backend="triton")


# -- DynSDPBLoss and its ring: a clear error and an unchanged ring, or correct handling ---------------------

from dynsdpb_kernels import DynSDPBLoss, TeacherRing  # noqa: E402

VOCAB = 20


def primed_module(backend="reference"):
    """A DynSDPBLoss whose ring already holds samples 5 and 6."""
    module = DynSDPBLoss(VOCAB, capacity_rows=16, backend=backend)
    gen = torch.Generator().manual_seed(0)  # the same teachers every time
    module(torch.randn(2, 3, VOCAB, generator=gen), torch.randint(0, VOCAB, (2, 3), generator=gen), torch.tensor([5, 6]))
    return module


def good_batch():
    return torch.randn(2, 3, VOCAB, requires_grad=True), torch.randint(0, VOCAB, (2, 3)), torch.tensor([6, 7])


def _with_nan(logits):
    poisoned = logits.detach().clone()
    poisoned[1, 0, 3] = math.nan
    return poisoned.requires_grad_(True)


MODULE_CASES = {
    "logits not a tensor": (lambda z, y, i: ([[1.0]], y, i), TypeError, "logits must be a torch.Tensor"),
    "integer logits": (lambda z, y, i: (y[..., None].expand(-1, -1, VOCAB), y, i), TypeError, "logits must have dtype"),
    "4-D logits": (lambda z, y, i: (z[None], y, i), ValueError, r"logits must have shape \(B, T, V\) or \(B, V\)"),
    "vocabulary differs from the ring's": (lambda z, y, i: (torch.randn(2, 3, VOCAB + 1), y, i), ValueError, "vocab_size=20"),
    "float labels": (lambda z, y, i: (z, y.float(), i), TypeError, "labels must be an integer tensor"),
    "labels shape": (lambda z, y, i: (z, y[:, :2], i), ValueError, r"labels must have shape \(2, 3\)"),
    "labels on another device": (lambda z, y, i: (z, y.to("meta"), i), ValueError, "labels is on meta"),
    "label >= V": (lambda z, y, i: (z, y.index_fill(1, torch.tensor([1]), VOCAB), i), ValueError, r"labels must lie in \[0, 20\)"),
    "negative label": (lambda z, y, i: (z, y.index_fill(1, torch.tensor([2]), -5), i), ValueError, "labels must lie in"),
    "NaN logits": (lambda z, y, i: (_with_nan(z), y, i), ValueError, "logits contain NaN or inf"),
    "sample_ids not a tensor": (lambda z, y, i: (z, y, [6, 7]), TypeError, "sample_ids must be a torch.Tensor"),
    "float sample_ids": (lambda z, y, i: (z, y, i.float()), ValueError, "sample_ids must be a 1-D integer tensor"),
    "2-D sample_ids": (lambda z, y, i: (z, y, i[None]), ValueError, "sample_ids must be a 1-D integer tensor"),
    "duplicate sample_ids": (lambda z, y, i: (z, y, torch.tensor([6, 6])), ValueError, "distinct"),
    "negative sample_ids": (lambda z, y, i: (z, y, torch.tensor([6, -1])), ValueError, ">= 0"),
    "sample_ids count": (lambda z, y, i: (z, y, torch.tensor([6, 7, 8])), ValueError, r"one row per sample id"),
    "no sample_ids in training": (lambda z, y, i: (z, y, None), ValueError, "sample_ids are required in training mode"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(MODULE_CASES))
def test_module_bad_input_is_named_and_leaves_the_ring_unchanged(backend, case):
    build, error, message = MODULE_CASES[case]
    module = primed_module(backend)
    state = module.ring.state_dict()
    logits, labels, ids = good_batch()
    inputs = build(logits, labels, ids)
    copies = [x.detach().clone() if isinstance(x, torch.Tensor) and x.device.type != "meta" else x for x in inputs]
    with pytest.raises(error, match=message):
        module(*inputs)
    after = module.ring.state_dict()
    assert after.keys() == state.keys()
    for key in state:
        same = torch.equal(state[key], after[key]) if isinstance(state[key], torch.Tensor) else state[key] == after[key]
        assert same, key
    for original, copy in zip(inputs, copies):
        if isinstance(original, torch.Tensor) and original.device.type != "meta":
            assert torch.equal(original.detach().nan_to_num(), copy.nan_to_num())


def test_ring_arguments_are_named():
    ring = TeacherRing(VOCAB, 8, device="cpu")
    with pytest.raises(ValueError, match="valid must be a bool tensor"):
        ring.lookup(torch.tensor([0]), torch.ones(1, 3))
    with pytest.raises(ValueError, match="record_policy must be one of"):
        ring.lookup(torch.tensor([0]), torch.ones(1, 3, dtype=torch.bool), record_policy="some")
    with pytest.raises(ValueError, match="logits are on meta but the teacher ring lives on cpu"):
        ring.lookup(torch.tensor([0]), torch.ones(1, 3, dtype=torch.bool, device="meta"))
    for other, message in (
        (TeacherRing(VOCAB + 1, 8, device="cpu"), "vocab_size"),
        (TeacherRing(VOCAB, 9, device="cpu"), "capacity_rows"),
        (TeacherRing(VOCAB, 8, dtype=torch.float32, device="cpu"), "dtype"),
    ):
        with pytest.raises(ValueError, match=message):
            ring.load_state_dict(other.state_dict())


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_expanded_inputs_are_handled(backend):
    logits, labels, ids = good_batch()
    expected = primed_module(backend)(logits.detach(), labels, ids)
    transposed = logits.detach().permute(2, 0, 1).contiguous().permute(1, 2, 0)  # stride 6 along V
    assert transposed.stride(-1) != 1
    torch.testing.assert_close(primed_module(backend)(transposed, labels, ids), expected, rtol=0, atol=0)
    row = torch.randint(0, VOCAB, (1, 3))
    expanded_labels = row.expand(2, 3)
    reference = primed_module(backend)(logits.detach(), expanded_labels.contiguous(), ids)
    torch.testing.assert_close(primed_module(backend)(logits.detach(), expanded_labels, ids), reference, rtol=0, atol=0)
    one = torch.randn(1, 3, VOCAB)
    torch.testing.assert_close(
        primed_module(backend)(one.expand(2, 3, VOCAB), labels, ids),
        primed_module(backend)(one.expand(2, 3, VOCAB).contiguous(), labels, ids),
        rtol=0,
        atol=0,
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_that_requires_grad_gets_none(backend):
    logits, labels, teacher, mask = good_inputs()
    teacher.requires_grad_(True)
    loss = dynsdpb_loss(logits, labels, teacher, mask, backend=backend)
    loss.backward()
    assert teacher.grad is None and logits.grad is not None
    torch.testing.assert_close(loss, dynsdpb_loss(logits.detach(), labels, teacher.detach(), mask, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_more_rows_than_the_ring_holds(backend):
    """A call with more rows than capacity_rows: the reserve grows to the rows it can record (one
    reallocation), the loss is right, the ring keeps the most recent samples that fit and warns that the
    others were evicted."""
    module = DynSDPBLoss(VOCAB, capacity_rows=8, backend=backend)
    module.ring = TeacherRing(VOCAB, 8, reserve_rows=4)
    logits = torch.randn(6, 4, VOCAB)
    labels = torch.randint(0, VOCAB, (6, 4))
    with pytest.warns(RuntimeWarning, match="recorded 18 teacher rows, more than capacity_rows=8"):
        loss = module(logits, labels, torch.arange(6))  # 24 rows, 18 recorded
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert module.ring.physical_rows == 8 + 18  # the reserve grows to the rows the call can record: 6 x 3
    assert [i for i in range(6) if i in module.ring] == [4, 5]  # the last 6 rows
