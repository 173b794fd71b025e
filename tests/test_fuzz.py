"""Property tests (hypothesis): random shapes, dtypes, ignore patterns, teacher masks, alpha and tau, extreme
logits. Every backend agrees with the float64 truth by the criteria of test_loss.py; an input with NaN or
inf gives a clear error, never a NaN loss.

Examples are derandomized so that CI is reproducible; run with `--hypothesis-seed=<n>` (and
HYPOTHESIS_EXAMPLES=<k>) to explore further.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from conftest import BACKENDS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_loss import check_against_truth

from dynsdpb_kernels import DynSDPBLoss, dynsdpb_loss, triton_kernel

EXAMPLES = int(os.environ.get("HYPOTHESIS_EXAMPLES", "0"))
# the interpreter is slow: fewer examples and smaller batches for Triton
BUDGET = {"reference": (30, 64), "cpu": (40, 64), "triton": (12, 8)}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@st.composite
def loss_case(draw, max_rows):
    n_rows = draw(st.integers(0, max_rows))
    vocab_size = draw(st.integers(1, 5000))
    dtype = draw(st.sampled_from(DTYPES))
    scale = draw(st.sampled_from([0.01, 1.0, 8.0, 100.0, 3e4]))
    seed = draw(st.integers(0, 2**31 - 1))
    ignore_fraction = draw(st.sampled_from([0.0, 0.3, 1.0]))
    teacher_kind = draw(st.sampled_from(["none", "all", "masked"]))
    options = {
        "alpha": draw(st.floats(0.0, 5.0)),
        "tau": draw(st.floats(0.1, 10.0)),
        "dynamic": draw(st.booleans()),
        "reduction": draw(st.sampled_from(["mean", "sum", "none"])),
    }
    poison = draw(st.sampled_from([None, None, None, "logits", "teacher"]))
    return n_rows, vocab_size, dtype, scale, seed, ignore_fraction, teacher_kind, options, poison


def build(case):
    n_rows, vocab_size, dtype, scale, seed, ignore_fraction, teacher_kind, options, poison = case
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n_rows, vocab_size, generator=gen) * scale).to(dtype)
    labels = torch.randint(0, vocab_size, (n_rows,), generator=gen)
    labels[torch.rand(n_rows, generator=gen) < ignore_fraction] = -100
    teacher_logits = teacher_mask = None
    if teacher_kind != "none":
        teacher_logits = (logits.float() + torch.randn(n_rows, vocab_size, generator=gen) * scale / 2).to(dtype)
        if teacher_kind == "masked":
            teacher_mask = torch.rand(n_rows, generator=gen) < 0.5
    return logits, labels, teacher_logits, teacher_mask, options, poison


def used_teacher_rows(labels, teacher_logits, teacher_mask):
    if teacher_logits is None:
        return torch.zeros(len(labels), dtype=torch.bool)
    used = labels != -100
    return used & teacher_mask if teacher_mask is not None else used


@pytest.mark.parametrize("backend", BACKENDS)
def test_fuzz_against_truth(backend, monkeypatch):
    examples, max_rows = BUDGET[backend]
    monkeypatch.setattr(triton_kernel, "MAX_BLOCK_V", 512)  # V up to 5000: up to 10 blocks, ragged tails

    @settings(
        max_examples=EXAMPLES or examples,
        deadline=None,
        derandomize=not EXAMPLES,
        suppress_health_check=[HealthCheck.too_slow],
        database=None,
    )
    @given(case=loss_case(max_rows))
    def run(case):
        logits, labels, teacher_logits, teacher_mask, options, poison = build(case)
        if os.environ.get("FUZZ_TRACE"):
            print("case", tuple(logits.shape), logits.dtype, options, poison)
        used = used_teacher_rows(labels, teacher_logits, teacher_mask)
        if poison == "logits" and logits.numel():
            logits.view(-1)[len(logits.view(-1)) // 2] = float("nan")
        if poison == "teacher" and used.any():
            teacher_logits[used.nonzero()[0, 0], 0] = float("inf")
        bad_logits = not torch.isfinite(logits).all()
        bad_teacher = teacher_logits is not None and not torch.isfinite(teacher_logits[used]).all()
        if bad_logits or bad_teacher:  # a poisoned or overflowing input: a clear error, inputs untouched
            before = logits.clone()
            with pytest.raises(ValueError, match="logits contain NaN or inf" if bad_logits else "teacher logits contain"):
                dynsdpb_loss(logits.requires_grad_(True), labels, teacher_logits, teacher_mask, backend=backend, **options)
            assert torch.equal(logits.detach().nan_to_num(), before.nan_to_num())
            return
        ours, _ = check_against_truth(backend, logits, labels, teacher_logits, teacher_mask, **options)
        assert torch.isfinite(ours["loss"]).all() and torch.isfinite(ours["grad"]).all()

    run()


@pytest.mark.parametrize("backend", BACKENDS)
def test_fuzz_module_steps_never_misalign(backend):
    """Random DLB streams through DynSDPBLoss: random lengths and padding; the number of teachers found
    is always the number of previous samples whose length did not change, and losses stay finite."""

    @settings(max_examples=EXAMPLES or (4 if backend == "triton" else 10), deadline=None, derandomize=not EXAMPLES, database=None)
    @given(seed=st.integers(0, 2**31 - 1), vocab_size=st.integers(2, 400), capacity=st.integers(16, 200))
    def run(seed, vocab_size, capacity):
        gen = torch.Generator().manual_seed(seed)
        loss_fn = DynSDPBLoss(vocab_size, capacity_rows=capacity, backend=backend, tau=2.0)
        lengths = torch.randint(2, 9, (12,), generator=gen)
        previous: list[int] = []
        warned = False
        for step in range(4):
            new = list(range(3 * step, 3 * step + 3))
            ids = previous + new
            pad_to = int(lengths[ids].max()) + int(torch.randint(0, 3, (1,), generator=gen))
            labels = torch.full((len(ids), pad_to), -100)
            for row, i in enumerate(ids):
                labels[row, : lengths[i]] = torch.randint(0, vocab_size, (int(lengths[i]),), generator=gen)
            logits = torch.randn(len(ids), pad_to, vocab_size, generator=gen).requires_grad_(True)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                loss = loss_fn(logits, labels, torch.tensor(ids))
            # a fixed ring warns (once) when a call records more rows than it holds
            evicting = int(loss_fn.last_stats.recorded_rows) > capacity
            ring_warnings = [w for w in caught if "TeacherRing" in str(w.message)]
            assert len(ring_warnings) == int(evicting and not warned)
            warned |= evicting
            loss.backward()
            assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
            rows_needed = sum(int(lengths[i]) - 1 for i in previous)
            expected = len(previous) if rows_needed <= capacity else None  # the ring may have evicted some
            if expected is not None:
                assert int(loss_fn.last_stats.teacher_samples) == expected
            previous = new

    run()
