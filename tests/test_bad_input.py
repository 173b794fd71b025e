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
