"""dynsdpb_loss on every backend against the float64 truth of tests/truth.py.

Two criteria on fresh random inputs:
- the error of our loss and gradient against the float64 truth (computed from the very same, already
  rounded, inputs) is no worse than eager PyTorch's at the input dtype, plus a small tolerance;
- since the kernels accumulate in float32 and round the gradient once, the loss and stats are float32
  accurate and each gradient element is within one rounding of the truth, whatever the input dtype.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, DYNAMIC_IDS, DYNAMIC_MODES
from truth import eager_dynsdpb, truth_dynsdpb

from dynsdpb_kernels import dynsdpb_loss

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
STAT_FIELDS = ["ce", "kl", "distill", "alpha_mean", "tau_mean", "uncertainty_mean"]


def make_case(shape, vocab_size, dtype, *, teacher=True, ignore_fraction=0.25, mask_fraction=0.3, scale=3.0):
    """Student logits, labels with ignored rows, teacher logits near the student's, and a teacher mask."""
    logits = (torch.randn(*shape, vocab_size) * scale).to(dtype)
    labels = torch.randint(0, vocab_size, shape)
    labels[torch.rand(shape) < ignore_fraction] = -100
    labels.view(-1)[0] = 0  # at least one valid row
    teacher_logits = teacher_mask = None
    if teacher:
        teacher_logits = (logits.float() + torch.randn(*shape, vocab_size) * scale / 2).to(dtype)
        teacher_mask = torch.rand(shape) >= mask_fraction
        teacher_mask.view(-1)[0] = True
    return logits, labels, teacher_logits, teacher_mask


def run_ours(backend, logits, labels, teacher_logits=None, teacher_mask=None, grad_output=1.0, **kwargs):
    logits = logits.detach().clone().requires_grad_(True)
    loss, stats = dynsdpb_loss(
        logits, labels, teacher_logits, teacher_mask, backend=backend, return_stats=True, **kwargs
    )
    (loss * grad_output).sum().backward()
    return {"loss": loss.detach(), "grad": logits.grad, "stats": stats}


def assert_no_worse_than_eager(ours, eager, truth, rtol, atol, what):
    """Elementwise |ours - truth| <= |eager - truth| + rtol |truth| + atol max|truth|."""
    assert ours.shape == truth.shape, what
    if not truth.numel():
        return
    ours, eager, truth = ours.double(), eager.double(), truth.double()
    bound = (eager - truth).abs() + rtol * truth.abs() + atol * truth.abs().max().clamp_min(1e-12)
    excess = (ours - truth).abs() - bound
    worst = int(excess.reshape(-1).argmax()) if excess.numel() else 0
    assert excess.numel() == 0 or excess.max() <= 0, (
        f"{what}: ours {ours.reshape(-1)[worst]:.8g}, eager {eager.reshape(-1)[worst]:.8g}, "
        f"truth {truth.reshape(-1)[worst]:.8g} at flat index {worst}"
    )


def assert_one_rounding(ours, truth, dtype, what):
    """Each element within one unit in the last place of `dtype` (plus float32 noise) of the truth."""
    assert ours.shape == truth.shape, what
    if not truth.numel():
        return
    ours, truth = ours.double(), truth.double()
    eps = torch.finfo(dtype).eps
    bound = eps * truth.abs() + 2e-6 * truth.abs().max() + torch.finfo(dtype).tiny
    excess = (ours - truth).abs() - bound
    worst = int(excess.reshape(-1).argmax()) if excess.numel() else 0
    assert excess.numel() == 0 or excess.max() <= 0, (
        f"{what}: ours {ours.reshape(-1)[worst]:.8g}, truth {truth.reshape(-1)[worst]:.8g} at flat index {worst}"
    )


def assert_float32_close(ours, truth, what, rtol=2e-5):
    ours, truth = torch.as_tensor(ours).double(), torch.as_tensor(truth).double()
    scale = truth.abs().clamp_min(1.0)
    assert ((ours - truth).abs() <= rtol * scale).all(), f"{what}: ours {ours}, truth {truth}"


def check_against_truth(backend, logits, labels, teacher_logits, teacher_mask, grad_output=1.0, ours_only=None, **kwargs):
    """Our loss, gradient and stats against the float64 truth and eager PyTorch at the input dtype, with the
    options `kwargs` (and `ours_only`, options of ours that the truth computes by itself, e.g. teacher_stats)."""
    ours = run_ours(backend, logits, labels, teacher_logits, teacher_mask, grad_output, **kwargs, **(ours_only or {}))
    truth = truth_dynsdpb(logits, labels, teacher_logits, teacher_mask, grad_output=grad_output, **kwargs)
    eager = eager_dynsdpb(logits, labels, teacher_logits, teacher_mask, grad_output=grad_output, **kwargs)
    dtype = logits.dtype
    assert ours["loss"].dtype == torch.float32 and ours["loss"].shape == truth["loss"].shape
    assert ours["grad"].dtype == dtype and ours["grad"].shape == logits.shape
    assert_float32_close(ours["loss"], truth["loss"], "loss")
    # One unit of rounding: the gradient is rounded once in forward and once more when backward scales
    # it by grad_output != 1.
    tol = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (2**-7, 1e-3), torch.float16: (2**-10, 1e-4)}[dtype]
    assert_no_worse_than_eager(ours["loss"], eager["loss"].float(), truth["loss"], *tol, "loss")
    assert_no_worse_than_eager(ours["grad"], eager["grad"], truth["grad"], *tol, "grad")
    assert_one_rounding(ours["grad"], truth["grad"], dtype, "grad")
    for field in STAT_FIELDS:
        assert_float32_close(getattr(ours["stats"], field), truth[field], field)
    assert int(ours["stats"].n_valid) == int(truth["n_valid"])
    assert int(ours["stats"].n_distilled) == int(truth["n_distilled"])
    return ours, truth


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab_size", [40, 300], ids=lambda v: f"V{v}")
@pytest.mark.parametrize("dynamic", DYNAMIC_MODES, ids=DYNAMIC_IDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_truth(backend, dtype, vocab_size, dynamic, reduction):
    """Ignored rows, rows without a teacher, V below one block (40 < 64) and over five blocks with a
    ragged tail (300), and grad_output != 1: loss * 3, or per-row weights with reduction='none'."""
    logits, labels, teacher_logits, teacher_mask = make_case((2, 4), vocab_size, dtype)
    grad_output = torch.rand(2, 4) * 2 if reduction == "none" else 3.0
    check_against_truth(
        backend, logits, labels, teacher_logits, teacher_mask, grad_output, dynamic=dynamic, reduction=reduction
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tau", [0.5, 1.0, 4.0])
@pytest.mark.parametrize("dynamic", DYNAMIC_MODES, ids=DYNAMIC_IDS)
def test_temperatures(backend, tau, dynamic):
    logits, labels, teacher_logits, teacher_mask = make_case((6,), 150, torch.float32)
    check_against_truth(backend, logits, labels, teacher_logits, teacher_mask, tau=tau, alpha=0.7, dynamic=dynamic)


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_in_another_dtype(backend):
    logits, labels, teacher_logits, teacher_mask = make_case((5,), 130, torch.bfloat16)
    check_against_truth(backend, logits, labels, teacher_logits.float(), teacher_mask)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_plain_cross_entropy_matches_torch(backend, dtype):
    """Without a teacher the loss is torch's cross-entropy (mean over non-ignored rows)."""
    logits, labels, _, _ = make_case((7,), 200, dtype, teacher=False)
    ours = run_ours(backend, logits, labels)
    reference = logits.double().requires_grad_(True)
    expected = F.cross_entropy(reference, labels)
    expected.backward()
    assert_float32_close(ours["loss"], expected, "loss")
    assert_one_rounding(ours["grad"], reference.grad, dtype, "grad")
    assert float(ours["stats"].kl) == 0.0 and int(ours["stats"].n_distilled) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_fixed_rule_is_dlb_loss(backend):
    """dynamic=False with every row valid is DLB's loss: CE + alpha * tau^2 * kl_div(batchmean)."""
    logits, labels, teacher_logits, _ = make_case((6,), 100, torch.float64, ignore_fraction=0.0)
    ours = dynsdpb_loss(logits.float(), labels, teacher_logits.float(), alpha=0.5, tau=2.0, dynamic=False, backend=backend)
    kl = F.kl_div(F.log_softmax(logits / 2.0, -1), F.softmax(teacher_logits / 2.0, -1), reduction="batchmean")
    expected = F.cross_entropy(logits, labels) + 0.5 * 4.0 * kl
    assert_float32_close(ours, expected, "loss")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_extreme_logits(backend, dtype):
    """Logits of +-1e4 (+-6e4 is float16's range, so 1e4 fits every dtype) stay finite and accurate."""
    logits, labels, teacher_logits, teacher_mask = make_case((6,), 150, dtype)
    big = torch.randint(0, 150, (6, 3))
    logits = logits.float().scatter(1, big, 1e4 * torch.sign(torch.randn(6, 3))).to(dtype)
    teacher_logits = teacher_logits.float().scatter(1, big[:, :1], -1e4).to(dtype)
    labels[1] = int(big[1, 0])
    ours, _ = check_against_truth(backend, logits, labels, teacher_logits, teacher_mask)
    assert torch.isfinite(ours["grad"].float()).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_confident_bfloat16_true_class_gradient(backend):
    """A confident bfloat16 row has a tiny true-class gradient p_y - 1; it must survive, not cancel to 0."""
    vocab_size = 300
    logits = torch.randn(4, vocab_size).to(torch.bfloat16)
    labels = torch.tensor([3, 10, 200, 299])
    logits[torch.arange(4), labels] = torch.tensor([18.0, 20.0, 22.0, 24.0], dtype=torch.bfloat16)
    ours = run_ours(backend, logits, labels)
    truth = truth_dynsdpb(logits, labels)
    true_class = ours["grad"][torch.arange(4), labels].double()
    expected = truth["grad"][torch.arange(4), labels]
    assert (expected < 0).all() and (expected.abs() < 1e-5).all()
    assert ((true_class - expected).abs() <= 2**-8 * expected.abs()).all(), (true_class, expected)
    assert_float32_close(ours["loss"], truth["loss"], "loss", rtol=1e-6)  # the loss itself is ~1e-7


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_ignored_or_untaught(backend):
    """Terms with zero rows contribute 0, and their rows get zero gradient."""
    logits, labels, teacher_logits, _ = make_case((4,), 90, torch.float32)
    labels[:] = -100
    ours = run_ours(backend, logits, labels, teacher_logits)
    assert float(ours["loss"]) == 0.0 and torch.count_nonzero(ours["grad"]) == 0
    labels = torch.randint(0, 90, (4,))
    mask = torch.zeros(4, dtype=torch.bool)
    ours = run_ours(backend, logits, labels, teacher_logits, mask)
    assert_float32_close(ours["loss"], F.cross_entropy(logits.double(), labels), "loss")
    assert int(ours["stats"].n_distilled) == 0 and float(ours["stats"].tau_mean) == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch(backend, reduction):
    logits = torch.randn(0, 50, requires_grad=True)
    labels = torch.zeros(0, dtype=torch.long)
    loss, stats = dynsdpb_loss(
        logits, labels, torch.randn(0, 50), reduction=reduction, backend=backend, return_stats=True
    )
    assert loss.shape == ((0,) if reduction == "none" else ())
    loss.sum().backward()
    assert logits.grad.shape == (0, 50)
    assert int(stats.n_valid) == 0 and float(stats.ce) == 0.0
    if reduction != "none":
        assert float(loss.detach()) == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_only_matches_training_forward(backend):
    """Under no_grad (or with logits that need no grad) the kernel skips the gradient, same loss."""
    logits, labels, teacher_logits, teacher_mask = make_case((6,), 120, torch.float32)
    with torch.no_grad():
        no_grad_loss = dynsdpb_loss(logits, labels, teacher_logits, teacher_mask, backend=backend)
    ours = run_ours(backend, logits, labels, teacher_logits, teacher_mask)
    assert torch.equal(no_grad_loss, ours["loss"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_are_not_mutated(backend):
    logits, labels, teacher_logits, teacher_mask = make_case((6,), 120, torch.bfloat16)
    copies = [t.clone() for t in (logits, labels, teacher_logits, teacher_mask)]
    run_ours(backend, logits, labels, teacher_logits, teacher_mask)
    for original, copy in zip((logits, labels, teacher_logits, teacher_mask), copies):
        assert torch.equal(original, copy)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_grad_opt_in(backend):
    """inplace_grad=True returns the same gradient, written into the logits' storage."""
    logits, labels, teacher_logits, teacher_mask = make_case((6,), 120, torch.float32)
    expected = run_ours(backend, logits, labels, teacher_logits, teacher_mask)
    leaf = logits.clone().requires_grad_(True)
    storage = leaf.data_ptr()
    loss = dynsdpb_loss(leaf, labels, teacher_logits, teacher_mask, backend=backend, inplace_grad=True)
    assert torch.equal(loss.detach(), expected["loss"])
    loss.backward()
    assert torch.equal(leaf.grad, expected["grad"])
    assert leaf.grad.data_ptr() == storage


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_grad_refuses_to_corrupt_saved_logits(backend):
    """If an upstream op saved the logits for its backward, autograd raises rather than use the gradient."""
    hidden = torch.randn(6, 120, requires_grad=True)
    logits = hidden.exp()  # exp saves its output for backward
    labels = torch.randint(0, 120, (6,))
    loss = dynsdpb_loss(logits, labels, backend=backend, inplace_grad=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_backward_raises(backend):
    logits, labels, teacher_logits, _ = make_case((4,), 60, torch.float32)
    logits.requires_grad_(True)
    loss = dynsdpb_loss(logits, labels, teacher_logits, backend=backend)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward per"):
        loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_student_statistics_are_next_teachers(backend):
    """The per-row (u, d) the function emits for the students are the teacher statistics of those logits."""
    from dynsdpb_kernels import DistillConfig, fused_loss, LossOptions
    from truth import teacher_uncertainty_discrimination

    logits, labels, _, _ = make_case((7,), 300, torch.float32)
    logits[0, :] = 0.0  # a uniform row: u = 1, d = 0
    options = LossOptions(distill=DistillConfig(), backend=backend)
    _, rows = fused_loss(logits, labels, None, None, None, options, compute_grad=False)
    uncertainty, discrimination = teacher_uncertainty_discrimination(logits.double())
    assert torch.allclose(rows.student_stats[:, 0].double(), uncertainty, atol=1e-6)
    assert torch.allclose(rows.student_stats[:, 1].double(), discrimination, atol=1e-6)
    assert abs(float(rows.student_stats[0, 0]) - 1.0) < 1e-6 and float(rows.student_stats[0, 1]) == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_precomputed_teacher_stats_and_teacher_index(backend):
    """The row contract: teacher rows read through an index, with or without precomputed (u, d)."""
    from dynsdpb_kernels import DistillConfig, LossOptions, fused_loss, row_statistics

    logits, labels, _, _ = make_case((6,), 200, torch.float32)
    table = torch.randn(4, 200) * 3
    teacher_index = torch.tensor([2, -1, 0, 3, 2, -1])
    dense_teacher = table[teacher_index.clamp_min(0)]
    truth = truth_dynsdpb(logits, labels, dense_teacher, teacher_index >= 0)
    options = LossOptions(distill=DistillConfig(), backend=backend)
    for stats in (None, row_statistics(table.double()).float()):
        loss, rows = fused_loss(logits, labels, table, teacher_index, stats, options, compute_grad=True)
        assert_float32_close(loss, truth["loss"], "loss")
        assert_one_rounding(rows.grad, truth["grad"], torch.float32, "grad")


def test_backends_agree_bitwise_shapes_and_closely_values():
    logits, labels, teacher_logits, teacher_mask = make_case((3, 5), 300, torch.bfloat16)
    results = [run_ours(b, logits, labels, teacher_logits, teacher_mask) for b in BACKENDS]
    assert_float32_close(results[0]["loss"], results[1]["loss"], "loss")
    diff = (results[0]["grad"].double() - results[1]["grad"].double()).abs()
    assert (diff <= 2**-7 * results[0]["grad"].double().abs() + 1e-7).all()


def test_cpu_kernel_is_built_and_chosen_by_auto():
    """CI must build the C++ kernel: a silent fallback to the reference would hide a broken build."""
    from dynsdpb_kernels import resolve_backend

    assert resolve_backend("cpu", torch.device("cpu")) == "cpu"
    assert resolve_backend("auto", torch.device("cpu")) == "cpu"
