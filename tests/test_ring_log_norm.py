"""Stored log-normalisers (contract.py, "Stored log-normalisers"): a recorded dense row's
(tau_rec, log_norm) in four-column stats, and the loss of teachers that come with them, on every backend.

Each recorded value is checked against float64 on the row as stored in the ring; the loss and gradient of
teachers with a stored value, with NaN, and with a stale one (recorded under another tau or dynamic rule:
never used) against the independent float64 truth (tests/truth.py), so a backend that used a value it must
not use, or used a wrong one, fails.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import BACKENDS, DYNAMIC_IDS, DYNAMIC_MODES
from truth import truth_dynsdpb

from dynsdpb_kernels import DistillConfig, DynSDPBLoss, LossOptions, TeacherRing, fused_loss, row_statistics
from dynsdpb_kernels.contract import STAT_LOG_NORM, STAT_TAU_REC, RowRecord, row_temperature
from dynsdpb_kernels.loss import dynsdpb_loss_with_grad

VOCAB = 300  # five blocks of 64 (conftest), the last ragged
N_ROWS = 6


def _record_step(backend, logits, config, ring_dtype, compute_grad=True):
    """One call that records every row of `logits` into slots N..2N-1 of a fresh (2N, V) ring with
    four-column stats (its slots 0..N-1 hold nothing: NaN statistics); returns (ring rows, stats)."""
    n_rows = logits.shape[0]
    ring = torch.zeros(2 * n_rows, logits.shape[1], dtype=ring_dtype)
    stats = torch.full((2 * n_rows, 4), math.nan)
    labels = torch.randint(0, logits.shape[1], (n_rows,))
    record = RowRecord(torch.arange(n_rows, 2 * n_rows), ring, stats)
    fused_loss(logits.clone(), labels, None, None, None, LossOptions(distill=config, backend=backend), compute_grad, record=record)
    return ring[n_rows:], stats[n_rows:]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dynamic", DYNAMIC_MODES, ids=DYNAMIC_IDS)
@pytest.mark.parametrize("logits_dtype,ring_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16),
                                                     (torch.float32, torch.float32), (torch.float16, torch.float16)], ids=str)
@pytest.mark.parametrize("compute_grad", [True, False], ids=["grad", "forward"])
def test_recorded_log_norm_is_the_stored_rows_logsumexp(backend, dynamic, logits_dtype, ring_dtype, compute_grad):
    """tau_rec is the temperature the loss gives the row as a teacher, bit for bit as row_temperature
    computes it from the recorded d; log_norm = log sum_j exp(r_j / tau_rec) of the row r as stored (rounded
    to the ring's dtype: with float32 logits in a bfloat16 ring the unrounded row's value is off by far more
    than the tolerance), to float32's own tolerance (torch.testing's defaults)."""
    config = DistillConfig(tau=2.5, dynamic=dynamic)
    logits = (torch.randn(N_ROWS, VOCAB) * 3).to(logits_dtype)
    rows, stats = _record_step(backend, logits, config, ring_dtype, compute_grad)
    tau_rec = row_temperature(config, stats[:, 1])
    assert torch.equal(stats[:, STAT_TAU_REC], tau_rec)
    expected = (rows.double() / tau_rec.double()[:, None]).logsumexp(-1)
    torch.testing.assert_close(stats[:, STAT_LOG_NORM].double(), expected, rtol=1.3e-6, atol=1e-5)
    if logits_dtype != ring_dtype:  # the stored row, not the logits before rounding
        unrounded = (logits.double() / tau_rec.double()[:, None]).logsumexp(-1)
        assert not torch.allclose(unrounded, expected, rtol=1.3e-6, atol=1e-5)


def test_recorded_log_norm_with_softcap():
    """With softcapping the ring holds z' = c tanh(z / c); log_norm is that stored row's (reference, Triton, C++)."""
    config = DistillConfig(tau=2.0, softcap=5.0)
    logits = torch.randn(N_ROWS, VOCAB) * 6
    for backend in BACKENDS:
        rows, stats = _record_step(backend, logits, config, torch.bfloat16)
        expected = (rows.double() / stats[:, STAT_TAU_REC].double()[:, None]).logsumexp(-1)
        torch.testing.assert_close(stats[:, STAT_LOG_NORM].double(), expected, rtol=1.3e-6, atol=1e-5)


def _teacher_case(case, config, rows, stats):
    """The stats a reading call gets: the recorded ones, their log-normaliser columns NaN, or stale ones
    (a log-normaliser recorded under another config: tau 2.0 or the opposite dynamic rule)."""
    stats = stats.clone()
    if case == "nan":
        stats[:, 2:] = math.nan
    elif case == "stale":
        other = DistillConfig(tau=2.0, dynamic=not config.dynamic_tau)
        tau_other = row_temperature(other, stats[:, 1])
        stats[:, STAT_TAU_REC] = tau_other
        stats[:, STAT_LOG_NORM] = (rows.double() / tau_other.double()[:, None]).logsumexp(-1).float()
    return stats


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["stored", "nan", "stale"])
@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic", "fixed"])
@pytest.mark.parametrize("writer", ["reference", "triton", "cpu"])
def test_loss_of_teachers_with_stored_log_norm_is_exact(backend, case, dynamic, writer):
    """Step k records the rows (with `writer`: rings are shared across backends), step k + 1 reads them as
    teachers with the stored (tau_rec, log_norm), with NaN there, or with a stale pair; loss and gradient
    match float64 truth on the stored rows (their (u, d) from the rows before rounding) every time."""
    config = DistillConfig(tau=2.5, dynamic=dynamic)
    previous = torch.randn(N_ROWS, VOCAB) * 3
    rows, stats = _record_step(writer, previous, config, torch.bfloat16)
    stats = _teacher_case(case, config, rows, stats)
    student = torch.randn(N_ROWS, VOCAB) * 3
    labels = torch.randint(0, VOCAB, (N_ROWS,))
    teacher_index = torch.tensor([0, 1, -1, 3, 4, 5])
    options = LossOptions(distill=config, backend=backend)
    logits = student.clone().requires_grad_(True)
    loss, _, _ = dynsdpb_loss_with_grad(logits, labels, rows, teacher_index, stats, options)
    loss.backward()
    teachers = rows[teacher_index.clamp_min(0)].double()
    truth = truth_dynsdpb(student.double(), labels, teachers, teacher_index >= 0, tau=2.5, dynamic=dynamic,
                          stats_from=previous[teacher_index.clamp_min(0)].double())
    torch.testing.assert_close(loss.double(), truth["loss"], rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(logits.grad.double(), truth["grad"], rtol=1e-4, atol=1e-6)


def test_triton_uses_the_stored_log_norm_exactly_at_its_tau():
    """White box: the Triton kernel takes P's normaliser from the stats when tau_rec is its tau_r (a log_norm
    shifted by 0.5 then shifts the KL: sum_j P_j = e^-0.5), and reads the teacher row otherwise (the same
    shifted value beside a tau_rec one ulp off changes nothing). The C++ and reference backends never use it."""
    config = DistillConfig(tau=2.5)
    rows, stats = _record_step("triton", torch.randn(N_ROWS, VOCAB) * 3, config, torch.bfloat16)
    student = torch.randn(N_ROWS, VOCAB) * 3
    labels = torch.randint(0, VOCAB, (N_ROWS,))
    index = torch.arange(N_ROWS)
    shifted = stats.clone()
    shifted[:, STAT_LOG_NORM] += 0.5
    off_by_one_ulp = shifted.clone()
    off_by_one_ulp[:, STAT_TAU_REC] = torch.nextafter(shifted[:, STAT_TAU_REC], torch.tensor(math.inf))
    kl = {}
    for backend in BACKENDS:
        for name, teacher_stats in (("stored", stats), ("shifted", shifted), ("stale", off_by_one_ulp)):
            _, result = fused_loss(student, labels, rows, index, teacher_stats, LossOptions(distill=config, backend=backend, validate=False), False)
            kl[backend, name] = result.kl
    torch.testing.assert_close(kl["triton", "stale"], kl["triton", "stored"], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(kl["triton", "shifted"], kl["triton", "stored"], rtol=1e-2, atol=1e-2)
    for backend in ("reference", "cpu"):
        assert torch.equal(kl[backend, "shifted"], kl[backend, "stored"])


def test_two_column_teacher_stats_still_accepted():
    """User-supplied (R, 2) stats keep working (no log-normaliser: the teacher row is read), on every backend."""
    config = DistillConfig(tau=2.0)
    teachers = torch.randn(4, VOCAB)
    student = torch.randn(4, VOCAB)
    labels = torch.randint(0, VOCAB, (4,))
    stats = row_statistics(teachers).float()
    truth = truth_dynsdpb(student.double(), labels, teachers.double(), tau=2.0)
    for backend in BACKENDS:
        loss, _ = fused_loss(student, labels, teachers, torch.arange(4), stats, LossOptions(distill=config, backend=backend), False)
        torch.testing.assert_close(loss.double(), truth["loss"], rtol=2e-5, atol=2e-6)
    with pytest.raises(ValueError, match="teacher_stats must be float32 of shape"):
        fused_loss(student, labels, teachers, torch.arange(4), torch.zeros(4, 3), LossOptions(distill=config), False)


def test_record_stats_width_is_checked():
    ring = torch.zeros(4, VOCAB)
    with pytest.raises(ValueError, match=r"record.stats must be \(P, 2\)"):
        RowRecord(torch.arange(2), ring, torch.zeros(4, 3))
    with pytest.raises(ValueError, match="for a dense ring"):
        RowRecord(torch.arange(2), None, torch.zeros(4, 4))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ring_step_records_the_log_norm_it_reads_next_step(backend):
    """DynSDPBLoss: the value a step records for a sample equals log sum exp(r / tau_rec) of its stored row
    in float64; the next step, reading it, matches float64 truth; a module whose tau changed between the
    steps (stale values in the ring) still does."""
    loss_fn = DynSDPBLoss(VOCAB, tau=2.5, capacity_rows=32, backend=backend)
    first = torch.randn(2, 4, VOCAB) * 3
    labels = torch.randint(0, VOCAB, (2, 4))
    ids = torch.tensor([7, 8])
    loss_fn(first, labels, ids)
    # targets after the shift: positions 0..2 predict labels 1..3; the teachers are those rows as stored
    teachers = torch.cat([loss_fn.ring.teacher(sample)[0] for sample in (7, 8)]).double()
    for sample in (7, 8):
        rows, stats = loss_fn.ring.teacher(sample)
        tau_rec = 1 + (2.5 - 1) * stats[:, 1].double()
        torch.testing.assert_close(stats[:, STAT_TAU_REC].double(), tau_rec, rtol=1e-6, atol=0)
        torch.testing.assert_close(stats[:, STAT_LOG_NORM].double(), (rows.double() / tau_rec[:, None]).logsumexp(-1),
                                   rtol=1.3e-6, atol=1e-5)
    saved = loss_fn.ring.state_dict()
    for tau in (2.5, 2.0):
        module = DynSDPBLoss(VOCAB, tau=tau, capacity_rows=32, backend=backend)
        module.ring.load_state_dict(saved)
        second = torch.randn(2, 4, VOCAB) * 3
        student = second.clone().requires_grad_(True)
        loss = module(student, labels, ids)
        loss.backward()
        truth = truth_dynsdpb(second[:, :3].reshape(-1, VOCAB).double(), labels[:, 1:].reshape(-1), teachers,
                              tau=tau, stats_from=first[:, :3].reshape(-1, VOCAB).double())
        torch.testing.assert_close(loss.double(), truth["loss"], rtol=2e-5, atol=2e-6)
        torch.testing.assert_close(student.grad[:, :3].reshape(-1, VOCAB).double(), truth["grad"], rtol=1e-4, atol=1e-6)


def test_old_state_dict_without_log_norm_loads_with_nan():
    """A state_dict of (u, d) stats (before the log-normaliser columns) loads: (u, d) kept, the new columns NaN."""
    ring = TeacherRing(VOCAB, 8, device="cpu")
    loss_fn = DynSDPBLoss(VOCAB, capacity_rows=8, backend="reference")
    loss_fn.ring = ring
    loss_fn(torch.randn(1, 3, VOCAB), torch.randint(0, VOCAB, (1, 3)), torch.tensor([5]))
    state = ring.state_dict()
    assert state["stats"].shape[1] == 4 and not state["stats"][:, 2:].isnan().any()
    old = dict(state, stats=state["stats"][:, :2].clone())
    restored = TeacherRing(VOCAB, 8, device="cpu")
    restored.load_state_dict(old)
    _, stats = restored.teacher(5)
    _, original = ring.teacher(5)
    assert torch.equal(stats[:, :2], original[:, :2]) and stats[:, 2:].isnan().all()
    restored.load_state_dict(state)  # the new format round-trips exactly
    assert torch.equal(restored.teacher(5)[1], original)
    with pytest.raises(ValueError, match="stats have shape"):
        restored.load_state_dict(dict(state, stats=state["stats"][:, :3]))
