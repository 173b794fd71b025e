"""The kernel contract as torch.library operators: torch.compile captures whole steps, opcheck, meta tensors.

A compiled step must give eager's loss and gradients (the same kernel runs in both) and stay within the
float64 truth's tolerance; `fullgraph=True` fails on any graph break, and a counting backend checks that
the step is captured as one graph.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from conftest import BACKENDS
from torch._dynamo.testing import CompileCounterWithBackend
from truth import truth_dynsdpb

from dynsdpb_kernels import dynsdpb_loss, fused_linear_dynsdpb_loss

N_ROWS, HIDDEN, VOCAB = 12, 16, 300

# Inductor compiles the CPU step for real (it calls the C++ kernel through the operator); the other
# backends use aot_eager, which runs AOTAutograd's traced graph without generating code, to keep CI fast.
COMPILER = {"cpu": "inductor", "reference": "aot_eager", "triton": "aot_eager"}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def make_step_inputs(dtype=torch.float32):
    hidden = torch.randn(N_ROWS, HIDDEN, dtype=dtype)
    weight = (torch.randn(VOCAB, HIDDEN) / HIDDEN**0.5).to(dtype)
    labels = torch.randint(0, VOCAB, (N_ROWS,))
    labels[::5] = -100
    teacher = (hidden.float() @ weight.float().T + torch.randn(N_ROWS, VOCAB)).to(dtype)
    teacher_mask = torch.rand(N_ROWS) < 0.7
    teacher_mask[1] = True
    return hidden, weight, labels, teacher, teacher_mask


def run_step(step, hidden, weight, *args):
    """loss and d loss / d weight of step(hidden, weight, *args), on a fresh leaf."""
    weight = weight.detach().clone().requires_grad_(True)
    loss = step(hidden, weight, *args)
    loss.backward()
    return loss.detach(), weight.grad


def compiled(step, backend):
    counter = CompileCounterWithBackend(COMPILER[backend])
    return torch.compile(step, backend=counter, fullgraph=True), counter


def loss_step(head, backend, validate):
    """A training step from the head's hidden states: logits then dynsdpb_loss, or the fused head."""

    def step(hidden, weight, labels, teacher, teacher_mask):
        if head == "logits":
            return dynsdpb_loss(hidden @ weight.T, labels, teacher, teacher_mask, tau=2.0, validate=validate, backend=backend)
        return fused_linear_dynsdpb_loss(
            hidden, weight, labels, teacher, teacher_mask, tau=2.0, chunk_size=5, validate=validate, backend=backend
        )

    return step


@pytest.mark.parametrize("head", ["logits", "fused_linear"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_step_is_one_graph_and_matches_eager_and_truth(backend, head):
    hidden, weight, labels, teacher, teacher_mask = make_step_inputs()
    step = loss_step(head, backend, validate=False)
    eager_loss, eager_grad = run_step(step, hidden, weight, labels, teacher, teacher_mask)
    step_c, counter = compiled(step, backend)
    loss, grad = run_step(step_c, hidden, weight, labels, teacher, teacher_mask)
    assert counter.frame_count == 1
    torch.testing.assert_close(loss, eager_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, eager_grad, rtol=1e-5, atol=1e-6)

    # and both are the loss: d/dW = (d/dz)^T h with the float64 truth's d/dz
    truth = truth_dynsdpb(hidden.double() @ weight.double().T, labels, teacher, teacher_mask, tau=2.0)
    torch.testing.assert_close(loss.double(), truth["loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), truth["grad"].T @ hidden.double(), rtol=1e-4, atol=1e-6)


def op_arguments(backend, dtype, *, teacher, record, compute_grad, grad_out=False, dynamic=(True, True), softcap=None):
    """Arguments of dynsdpb::fused_rows in schema order; dynamic: (dynamic_alpha, dynamic_tau)."""
    logits = (torch.randn(N_ROWS, VOCAB) * 3).to(dtype)
    labels = torch.randint(0, VOCAB, (N_ROWS,))
    labels[0] = -100
    teacher_rows = teacher_index = None
    if teacher:
        teacher_rows = torch.randn(N_ROWS + 2, VOCAB).to(dtype)
        teacher_index = torch.randint(-1, N_ROWS + 2, (N_ROWS,))
    record_index = record_rows = record_stats = None
    topk_storage = (None, None, None)
    if record:  # True: a dense ring's record, "topk": a top-k ring's (k = 4)
        record_index = torch.full((N_ROWS,), -1)
        record_index[::2] = torch.arange(0, N_ROWS, 2)
        record_stats = torch.zeros(N_ROWS, 2)
        if record == "topk":
            topk_storage = (torch.zeros(N_ROWS, 4, dtype=torch.bfloat16), torch.zeros(N_ROWS, 4, dtype=torch.int64), torch.zeros(N_ROWS))
        else:
            record_rows = torch.zeros(N_ROWS, VOCAB, dtype=torch.bfloat16)
    grad_scale = torch.tensor([1 / N_ROWS, 1 / N_ROWS])
    grad_buffer = torch.empty_like(logits) if grad_out else None
    return (
        logits, labels, teacher_rows, teacher_index, None, None, None, grad_scale, grad_buffer,
        record_index, record_rows, record_stats, *topk_storage, 1.5, 2.0, *dynamic, -100, softcap, compute_grad, backend,
    )  # fmt: skip


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize(
    "case",
    [
        dict(teacher=False, record=False, compute_grad=False),
        dict(teacher=True, record=False, compute_grad=True),
        dict(teacher=True, record=True, compute_grad=True),
        dict(teacher=True, record=True, compute_grad=True, grad_out=True),
        dict(teacher=True, record=True, compute_grad=True, softcap=2.0),
        dict(teacher=True, record=False, compute_grad=True, dynamic=(True, False)),
        dict(teacher=True, record=False, compute_grad=True, dynamic=(False, True)),
        dict(teacher=True, record=False, compute_grad=True, dynamic=(False, False)),
        dict(teacher=True, record="topk", compute_grad=True),
    ],
    ids=["ce-forward", "teacher-grad", "record", "grad-out", "softcap", "alpha-only", "tau-only", "fixed", "record-topk"],
)
def test_opcheck(backend, case):
    for dtype in (torch.float32, torch.bfloat16):
        torch.library.opcheck(torch.ops.dynsdpb.fused_rows, op_arguments(backend, dtype, **case))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("validate", [False, True])
def test_meta_tensors_give_the_loss_shape(reduction, validate):
    logits = torch.empty(2, 5, VOCAB, device="meta", dtype=torch.bfloat16, requires_grad=True)
    labels = torch.empty(2, 5, device="meta", dtype=torch.long)
    teacher = torch.empty(2, 5, VOCAB, device="meta", dtype=torch.bfloat16)
    loss = dynsdpb_loss(logits, labels, teacher, reduction=reduction, validate=validate)
    assert loss.device.type == "meta" and loss.dtype == torch.float32
    assert loss.shape == ((2, 5) if reduction == "none" else ())
    loss.sum().backward()
    assert logits.grad.shape == logits.shape and logits.grad.device.type == "meta"

    hidden = torch.empty(10, HIDDEN, device="meta", requires_grad=True)
    weight = torch.empty(VOCAB, HIDDEN, device="meta", requires_grad=True)
    head_loss = fused_linear_dynsdpb_loss(hidden, weight, labels.reshape(-1), validate=validate)
    assert head_loss.shape == () and head_loss.device.type == "meta"


@pytest.mark.parametrize("head", ["logits", "fused_linear"])
def test_validate_true_under_compile_is_one_graph_and_still_raises(head):
    """validate=True under torch.compile: no graph break and no host sync; a bad value raises when the
    compiled step runs (a RuntimeError naming what failed, on the CPU)."""
    hidden, weight, labels, teacher, teacher_mask = make_step_inputs()
    step = loss_step(head, "cpu", validate=True)
    step_c, counter = compiled(step, "cpu")
    eager_loss, eager_grad = run_step(step, hidden, weight, labels, teacher, teacher_mask)
    loss, grad = run_step(step_c, hidden, weight, labels, teacher, teacher_mask)
    assert counter.frame_count == 1
    torch.testing.assert_close(loss, eager_loss)
    torch.testing.assert_close(grad, eager_grad)

    bad_labels = labels.clone()
    bad_labels[3] = VOCAB
    with pytest.raises(RuntimeError, match="labels must lie in"):
        step_c(hidden, weight, bad_labels, teacher, teacher_mask)
    poisoned = teacher.clone()
    poisoned[1, 7] = float("nan")
    with pytest.raises(RuntimeError, match="NaN or inf"):
        step_c(hidden, weight, labels, poisoned, teacher_mask)
