"""The ring at its memory floor (issue 20, item 4): a call's reserve, and a growing ring's capacity, are
the rows the call can record, bounded on the host from the ids (the samples the previous call recorded
for sure are taught, not recorded), so that a DLB ring holds at most twice the teachers one step reads.
"""

from __future__ import annotations

import pytest
import torch
from test_ring import _assert_same_state, _ring_tensor_bytes
from test_ring_capacity import _Stream

import dynsdpb_kernels.ring as ring_module
from dynsdpb_kernels import DynSDPBLoss, OverlapBatchSampler, TeacherRing

IGNORE = -100
LLAMA_VOCAB = 128256


def _row_bytes(ring: TeacherRing) -> int:
    """Bytes of one row in the ring's format: values (and top-k ids and tail), (u, d) in float32 (dense: also
    the row's (tau_rec, log_norm))."""
    element = ring.logits.element_size()
    if ring.support is None:
        return ring.vocab_size * element + 16
    return ring.topk * (element + 8) + 4 + 8


@pytest.mark.parametrize("storage", ["dense", "topk"])
def test_dlb_ring_holds_at_most_twice_the_teachers_the_next_step_reads(storage):
    """DynSDPBLoss(128256) with its default ring: a first call of 4 samples x 64 tokens, then DLB calls of
    the 4 previous + 4 new. After each DLB call the ring holds <= 2.0x the smallest ring of this format
    that holds the teachers the next step reads (the rows the call recorded, their (u, d), one table entry
    a row, head: capacity = those rows, no reserve). Before the fix the ring was 4.06x (dense) / 3.99x."""
    torch.manual_seed(0)
    loss_fn = DynSDPBLoss(LLAMA_VOCAB, backend="cpu", teacher_storage=storage, topk=64)
    ids = torch.arange(4)
    with torch.no_grad():
        loss_fn(torch.randn(4, 64, LLAMA_VOCAB), torch.randint(0, LLAMA_VOCAB, (4, 64)), ids)
        for step in range(2):  # the first DLB call (the ring grew at the first call) and a steady one
            new = torch.arange(4, 8) + 4 * step
            loss_fn(torch.randn(8, 64, LLAMA_VOCAB), torch.randint(0, LLAMA_VOCAB, (8, 64)), torch.cat([ids, new]))
            ids = new
            stats, ring = loss_fn.last_stats, loss_fn.ring
            assert int(stats.teacher_samples) == 4
            recorded = int(stats.recorded_rows)
            assert recorded == 4 * 63  # the 4 new samples, 63 labelled positions each after the shift
            teachers_bytes = recorded * (_row_bytes(ring) + 24) + 8
            assert ring.nbytes == _ring_tensor_bytes(ring) == stats.ring_bytes
            assert ring.nbytes == 2 * recorded * _row_bytes(ring) + 24 * recorded + 8  # README, C = R = 4 * 63
            assert ring.nbytes <= 2.0 * teachers_bytes
    for i in ids.tolist():  # the next step's teachers are live
        assert i in ring


def test_growing_ring_equals_an_ample_ring_on_a_random_dlb_stream():
    """A DLB stream (OverlapBatchSampler, 3 epochs) with random sample lengths, dynamic padding and some
    samples whose length changes between their two visits (a mismatch): the default ring gives bitwise
    the losses, gradients, teacher counts and mismatches of a ring with an ample explicit capacity, and its
    physical rows are twice the most rows one call could record (its new samples x (T - 1))."""
    vocab, n = 24, 20
    gen = torch.Generator().manual_seed(5)
    length = {i: int(torch.randint(1, 9, (1,), generator=gen)) for i in range(n)}
    grown = DynSDPBLoss(vocab, tau=2.0, backend="reference")
    ample = DynSDPBLoss(vocab, tau=2.0, backend="reference", capacity_rows=4096)
    sampler = OverlapBatchSampler(n, 4, seed=1)
    bounds, mismatches = [], 0
    previous_new: set[int] = set()
    for epoch in range(3):
        for batch in sampler:
            lengths = {i: length[i] - (1 if i in previous_new and i % 5 == 0 else 0) for i in batch}
            width = max(lengths.values()) + int(torch.randint(0, 3, (1,), generator=gen))
            labels = torch.full((len(batch), width), IGNORE)
            for row, i in enumerate(batch):
                labels[row, : lengths[i]] = torch.randint(0, vocab, (lengths[i],), generator=gen)
            logits = torch.randn(len(batch), width, vocab, generator=gen)
            outputs = []
            for loss_fn in (grown, ample):
                student = logits.clone().requires_grad_(True)
                loss = loss_fn(student, labels, torch.tensor(batch))
                loss.backward()
                outputs.append((loss.detach(), student.grad, loss_fn.last_stats))
            (loss, grad, stats), (loss_a, grad_a, stats_a) = outputs
            torch.testing.assert_close(loss, loss_a, rtol=0, atol=0)
            torch.testing.assert_close(grad, grad_a, rtol=0, atol=0)
            assert int(stats.teacher_samples) == int(stats_a.teacher_samples)
            assert int(stats.length_mismatches) == int(stats_a.length_mismatches)
            mismatches += int(stats.length_mismatches)
            new = [i for i in batch if i not in previous_new]
            bounds.append(len(new) * (width - 1))
            previous_new = set(new)
    assert mismatches > 0
    ring = grown.ring
    assert (ring.capacity_rows, ring.physical_rows) == (max(bounds), 2 * max(bounds))
    assert ring.nbytes == _ring_tensor_bytes(ring)


def test_a_mismatched_entry_is_consumed_and_the_sample_recorded_at_its_next_visit():
    """A sample whose entry has another length gets no teacher, its entry is consumed and it is not
    recorded by that call (so that a call records at most its samples the previous call did not record);
    its next visit records it and the one after is taught. Likewise a sample the previous call recorded
    with no valid row: the next call neither teaches nor records it."""
    ring = TeacherRing(6, 32, device="cpu", grow_capacity=True)
    ones = lambda *counts: torch.tensor([[k < c for k in range(4)] for c in counts])  # noqa: E731

    def call(ids, valid):
        lookup = ring.lookup(torch.tensor(ids), valid)
        ring.commit(lookup)
        return lookup.has_teacher.tolist(), lookup.mismatched.tolist(), int(lookup.recorded_rows)

    assert call([0, 1, 5], ones(3, 3, 0)) == ([False, False, False], [False, False, False], 6)
    assert 5 not in ring  # no valid row: no entry
    assert call([0, 1, 2, 5], ones(2, 3, 3, 2)) == ([False, True, False, False], [True, False, False, False], 3)
    assert 0 not in ring and 1 not in ring and 5 not in ring and 2 in ring
    assert call([0, 2, 5], ones(2, 3, 2)) == ([False, True, False], [False, False, False], 4)  # 0 and 5 recorded now
    assert call([0, 5], ones(2, 2)) == ([True, True], [False, False], 0)


def test_row_bound_is_enforced_and_sizes_the_reserve():
    """lookup(row_bound=r): the reserve (and a growing capacity) is r per sample that may be recorded, and
    a sample with more than r valid rows is not recorded, so the reserve always holds the call's writes."""
    ring = TeacherRing(6, 1, device="cpu", grow_capacity=True)
    valid = torch.tensor([[True, True, False, False], [True, True, True, False]])
    lookup = ring.lookup(torch.tensor([3, 4]), valid, row_bound=2)
    assert (lookup.layout.capacity_rows, lookup.layout.reserve_rows) == (4, 4)
    assert int(lookup.recorded_rows) == 2  # sample 4 has 3 valid rows > 2: not recorded
    ring.commit(lookup)
    assert 3 in ring and 4 not in ring
    with pytest.raises(ValueError, match="row_bound"):
        ring.lookup(torch.tensor([5]), valid[:1], row_bound=-1)
    fixed = TeacherRing(6, 8, device="cpu", reserve_rows=1)  # explicit capacity: only the reserve follows the bound
    fixed.commit(fixed.lookup(torch.tensor([0, 1]), valid))
    assert (fixed.capacity_rows, fixed.physical_rows) == (8, 8 + 8)
    lookup = fixed.lookup(torch.tensor([0, 1, 2]), torch.ones(3, 4, dtype=torch.bool))
    assert lookup.layout.reserve_rows == 8  # only sample 2 can be recorded: 4 rows < 8
    assert int(lookup.recorded_rows) == 4


@pytest.mark.parametrize("storage", ["dense", "topk"])
def test_resume_keeps_the_floor_and_an_earlier_state_dict_loads(storage):
    """A state_dict saved mid-run (with the host mirror: recorded_ids, possible_ids) continues with the
    uninterrupted run's losses and ring bytes; one of the earlier format (no mirror) gives the same
    losses and teachers; its first call is sized by every sample (B * (T - 1)), so the capacity stays there."""
    stream = _Stream()
    options = dict(backend="reference", teacher_storage=storage, topk=8)

    def run(loss_fn, steps):
        out = []
        for hidden, labels, ids in steps:
            out.append((loss_fn(stream.logits(hidden), labels, ids).detach(), int(loss_fn.last_stats.teacher_samples), loss_fn.ring.nbytes))
        return out

    uninterrupted = DynSDPBLoss(40, **options)
    expected = run(uninterrupted, stream.steps)
    first = DynSDPBLoss(40, **options)
    run(first, stream.steps[:3])
    saved = first.ring.state_dict()
    assert {"recorded_ids", "possible_ids"} <= saved.keys()
    resumed = DynSDPBLoss(40, **options)
    resumed.load_ring_state_dict(saved)
    assert run(resumed, stream.steps[3:]) == expected[3:]
    _assert_same_state(resumed.ring.state_dict(), uninterrupted.ring.state_dict())
    earlier = {k: v for k, v in saved.items() if k not in ("recorded_ids", "possible_ids")}
    old = DynSDPBLoss(40, **options)
    old.load_ring_state_dict(earlier)
    results = run(old, stream.steps[3:])
    for (loss, count, _), (loss_u, count_u, _) in zip(results, expected[3:]):
        assert torch.equal(loss, loss_u) and count == count_u == 4
    assert old.ring.capacity_rows == 8 * (stream.steps[3][1].shape[1] - 1)  # one call sized by all its samples


def test_a_failed_call_changes_neither_the_ring_nor_its_host_mirror():
    """A call that fails (NaN logits) after its lookup leaves the entries, the rows and the host mirror as
    they were: the next good call gives the loss and the ring state of a run that never saw the failure."""
    stream = _Stream(n_steps=3)
    clean, failing = DynSDPBLoss(40, backend="reference"), DynSDPBLoss(40, backend="reference")
    for step, (hidden, labels, ids) in enumerate(stream.steps):
        if step == 1:
            before = failing.ring.state_dict()
            bad = stream.logits(hidden)
            bad[0, 0, 0] = float("nan")
            with pytest.raises(ValueError, match="NaN"):
                failing(bad, labels, ids)
            _assert_same_state(before, failing.ring.state_dict())
            assert failing.ring._recorded == frozenset(before["recorded_ids"].tolist())
        loss, loss_clean = failing(stream.logits(hidden), labels, ids), clean(stream.logits(hidden), labels, ids)
        assert torch.equal(loss, loss_clean)
    _assert_same_state(failing.ring.state_dict(), clean.ring.state_dict())


def test_a_host_mirror_past_its_limit_falls_back_to_every_row(monkeypatch):
    """When more ids than MIRROR_LIMIT may hold an entry (a stream that records samples it does not
    revisit), the mirror stops (any id may be live): the reserve is then sized by every sample's rows
    (with the mirror it would stay at the new samples' rows), and the teachers are an ample ring's."""
    monkeypatch.setattr(ring_module, "MIRROR_LIMIT", 3)
    ring = TeacherRing(5, 1, device="cpu", grow_capacity=True)
    ample = TeacherRing(5, 256, device="cpu")
    reserves, teachers = [], []
    for ids in ([0, 1], [2, 3], [2, 3, 4, 5], [4, 5, 6, 7]):
        valid = torch.ones(len(ids), 3, dtype=torch.bool)
        lookups = [r.lookup(torch.tensor(ids), valid) for r in (ring, ample)]
        assert lookups[0].has_teacher.tolist() == lookups[1].has_teacher.tolist()
        for r, lookup in zip((ring, ample), lookups):
            r.commit(lookup)
        reserves.append(lookups[0].layout.reserve_rows)
        teachers.append(lookups[0].has_teacher.tolist())
    assert ring._possible is None  # 0, 1, 2, 3 may be live after the second call: past the limit of 3
    assert reserves == [6, 6, 6, 12]  # the last call: 4 samples x 3 rows (with the mirror: 6)
    assert teachers[2:] == [[True, True, False, False], [True, True, False, False]]
