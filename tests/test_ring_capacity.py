"""The teacher ring's capacity (issue 18, item 5) and its device moves (item 6).

Item 5: a ring DynSDPBLoss makes without capacity_rows grows on demand, so the previous step's samples
always find their teachers, whatever the first batch's padding; a fixed capacity_rows that a call
overflows warns. Item 6: TeacherRing.to() moves every tensor, and a ring restored on the CPU follows the
first call's logits to their device.
"""

from __future__ import annotations

import pytest
import torch
from conftest import BACKENDS
from test_ring import _assert_same_state, _ring_tensor_bytes
from truth import truth_dynsdpb

from dynsdpb_kernels import DynSDPBLoss, FusedLinearDynSDPBLoss, OverlapBatchSampler, TeacherRing

IGNORE = -100
VOCAB = 40
HIDDEN = 8
SHORT, LONG = 3, 12  # tokens of the first chunk's samples, and of all later ones
# The ring's growth does not depend on the backend; Triton without CUDA runs in its interpreter (about a
# minute for a six-step stream), so the longer streams use it only with CUDA. The truth test runs on all.
STREAM_BACKENDS = [b for b in BACKENDS if b != "triton" or torch.cuda.is_available()]


def _dense_formula(capacity: int, reserve: int, vocab_size: int = VOCAB, dtype_bytes: int = 2) -> int:
    return (capacity + reserve) * (vocab_size * dtype_bytes + 16) + 24 * capacity + 8  # README's formula


class _Stream:
    """A DLB stream with dynamic padding: OverlapBatchSampler's order (4 new samples, then the previous 4
    plus 4 new), the first chunk's samples SHORT tokens long and the others LONG, each batch padded to its
    longest sample. Each sample keeps its tokens; logits are fresh every step."""

    def __init__(self, n_steps: int = 6, batch_size: int = 4, seed: int = 0):
        sampler = OverlapBatchSampler(4 * n_steps, batch_size, shuffle=False)
        self.batches = [ids for ids, _ in zip(iter(sampler), range(n_steps))]
        first = set(self.batches[0])
        gen = torch.Generator().manual_seed(seed)
        self.length = {i: SHORT if i in first else LONG for i in range(4 * n_steps)}
        self.tokens = {i: torch.randint(0, VOCAB, (n,), generator=gen) for i, n in self.length.items()}
        self.steps = []
        for ids in self.batches:
            pad_to = max(self.length[i] for i in ids)
            labels = torch.full((len(ids), pad_to), IGNORE)
            for row, i in enumerate(ids):
                labels[row, : self.length[i]] = self.tokens[i]
            hidden = torch.randn(len(ids), pad_to, HIDDEN, generator=gen)
            self.steps.append((hidden, labels, torch.tensor(ids)))
        self.weight = torch.randn(VOCAB, HIDDEN, generator=gen)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.weight.T


def _run(stream: _Stream, loss_fn, fused: bool = False, steps=None, dtype=torch.float32):
    """Losses, input gradients and teacher counts of each step of `stream` through `loss_fn`."""
    results = []
    for hidden, labels, ids in stream.steps if steps is None else steps:
        if fused:
            student = hidden.to(dtype).requires_grad_(True)
            loss = loss_fn(student, stream.weight.to(dtype), labels, ids)
        else:
            student = stream.logits(hidden).to(dtype).requires_grad_(True)
            loss = loss_fn(student, labels, ids)
        loss.backward()
        results.append((loss.detach(), student.grad, int(loss_fn.last_stats.teacher_samples)))
    return results


def _module(fused: bool, backend: str, **options):
    kind = FusedLinearDynSDPBLoss if fused else DynSDPBLoss
    return kind(VOCAB, tau=2.0, backend=backend, **options)


# -- item 5: the default capacity grows on demand -----------------------------------------------------


@pytest.mark.parametrize("backend", STREAM_BACKENDS)
@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused_linear"])
@pytest.mark.parametrize("storage", ["dense", "topk"])
def test_default_ring_keeps_every_previous_teacher_with_dynamic_padding(backend, fused, storage):
    """A short first batch (SHORT tokens) then LONG ones: every step after the first finds the 4 teachers
    of the previous step (before the fix, the ring sized from the first call evicted all but one); the
    losses and gradients equal those of a ring with an ample explicit capacity, bitwise, and the grown
    ring's memory is the formula's with C = reserve = the most rows a call can record (its 4 new samples,
    LONG - 1 positions each after the label shift): the floor (issue 20 item 4; before it, B * T)."""
    stream = _Stream()
    options = dict(teacher_storage=storage, topk=8)
    grown = _module(fused, backend, **options)
    ample = _module(fused, backend, capacity_rows=1024, **options)
    results, expected = _run(stream, grown, fused), _run(stream, ample, fused)
    assert [count for *_, count in results] == [0, 4, 4, 4, 4, 4]
    for (loss, grad, _), (loss_ample, grad_ample, _) in zip(results, expected):
        torch.testing.assert_close(loss, loss_ample, rtol=0, atol=0)
        torch.testing.assert_close(grad, grad_ample, rtol=0, atol=0)
    largest = 4 * (LONG - 1)  # rows a DLB call can record: its 4 new samples
    ring = grown.ring
    assert (ring.capacity_rows, ring.physical_rows) == (largest, 2 * largest)
    assert ring.nbytes == _ring_tensor_bytes(ring) == grown.last_stats.ring_bytes
    per_row = VOCAB * 2 + 16 if storage == "dense" else 8 * (2 + 8) + 12  # bfloat16 rows, k = 8
    assert ring.nbytes == 2 * largest * per_row + 24 * largest + 8  # README's formula, P = 2 * C
    for i in stream.batches[-1][4:]:  # the last step's new samples are live, with the same rows as the ample ring's
        assert torch.equal(ring.teacher(i)[0], ample.ring.teacher(i)[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_grown_ring_loss_equals_the_float64_truth(backend):
    """The growth step itself (step 1 reads the 4 short teachers while the ring grows to 8 * LONG rows) and
    the next step, against the float64 truth with teachers taken by hand from the previous logits."""
    stream = _Stream(n_steps=3)
    loss_fn = DynSDPBLoss(VOCAB, tau=2.0, backend=backend)
    previous: dict[int, torch.Tensor] = {}
    for hidden, labels, ids in stream.steps:
        logits = stream.logits(hidden)
        shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE)
        rows, targets, teacher, unrounded, mask = [], [], [], [], []
        for b, i in enumerate(ids.tolist()):
            own = logits[b][shifted[b] != IGNORE]
            rows.append(own)
            targets.append(shifted[b][shifted[b] != IGNORE])
            has = i in previous
            teacher.append(previous[i].to(torch.bfloat16).float() if has else torch.zeros_like(own))
            unrounded.append(previous[i] if has else torch.zeros_like(own))
            mask.append(torch.full((len(own),), has))
            if has:
                del previous[i]
            else:
                previous[i] = own.clone()
        truth = truth_dynsdpb(
            torch.cat(rows).double(), torch.cat(targets), torch.cat(teacher).double(), torch.cat(mask),
            tau=2.0, stats_from=torch.cat(unrounded).double(),
        )
        loss = loss_fn(logits, labels, ids)
        torch.testing.assert_close(loss.double(), truth["loss"], rtol=1e-5, atol=1e-6)
        assert int(loss_fn.last_stats.teacher_samples) == sum(bool(m[0]) for m in mask)
    assert loss_fn.ring.capacity_rows == 4 * (LONG - 1)  # the rows one call can record (4 new samples)


@pytest.mark.parametrize("storage", ["dense", "topk"])
def test_failed_growing_call_leaves_the_ring_unchanged(storage):
    """A call that would grow the ring but fails (NaN logits) changes nothing: entries, rows, capacity,
    layout and nbytes are those before it; the same call with good logits then grows it."""
    stream = _Stream(n_steps=2)
    loss_fn = DynSDPBLoss(VOCAB, backend="reference", teacher_storage=storage, topk=8)
    hidden, labels, ids = stream.steps[0]
    loss_fn(stream.logits(hidden), labels, ids)
    ring = loss_fn.ring
    before = ring.state_dict()
    layout = (ring.capacity_rows, ring.physical_rows, ring.nbytes)
    teachers = {i: ring.teacher(i) for i in ids.tolist()}
    hidden, labels, ids = stream.steps[1]
    bad = stream.logits(hidden)
    bad[5, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="logits contain NaN"):
        loss_fn(bad, labels, ids)
    assert (ring.capacity_rows, ring.physical_rows, ring.nbytes) == layout
    _assert_same_state(before, ring.state_dict())
    for i, (rows, stats) in teachers.items():
        assert torch.equal(ring.teacher(i)[0], rows) and torch.equal(ring.teacher(i)[1], stats)
    loss_fn(stream.logits(hidden), labels, ids)
    assert int(loss_fn.last_stats.teacher_samples) == 4 and ring.capacity_rows == 4 * (labels.shape[1] - 1)


def test_fixed_capacity_that_a_call_overflows_warns_once():
    """capacity_rows=12 (what the first call's rows used to give): the call that records 44 rows warns,
    naming capacity_rows; the next step then misses 3 of its 4 teachers (the warned consequence), and the
    ring warns only once (pyproject turns any further RuntimeWarning into an error)."""
    stream = _Stream()
    loss_fn = DynSDPBLoss(VOCAB, backend="reference", capacity_rows=12)
    counts = []
    for step, (hidden, labels, ids) in enumerate(stream.steps):
        if step == 1:
            with pytest.warns(RuntimeWarning, match=r"recorded 44 teacher rows, more than capacity_rows=12.*capacity_rows=None"):
                loss_fn(stream.logits(hidden), labels, ids)
        else:
            loss_fn(stream.logits(hidden), labels, ids)
        counts.append(int(loss_fn.last_stats.teacher_samples))
    assert counts == [0, 4, 1, 1, 1, 1]
    assert loss_fn.ring.capacity_rows == 12  # fixed


def test_fixed_capacity_that_holds_every_call_does_not_warn():
    """Padded rows (96) above capacity_rows (48) but recorded rows (44) within it: no warning (any
    RuntimeWarning is an error here), and every teacher is found."""
    stream = _Stream()
    loss_fn = DynSDPBLoss(VOCAB, backend="reference", capacity_rows=48)
    counts = [count for *_, count in _run(stream, loss_fn)]
    assert counts == [0, 4, 4, 4, 4, 4]
    assert loss_fn.ring.capacity_rows == 48


@pytest.mark.parametrize("storage", ["dense", "topk"])
def test_grown_ring_resumes_exactly(storage):
    """A grown ring saved with the module's state_dict and loaded into a new default module continues with
    the same losses, teachers, capacity and nbytes as the uninterrupted run; loaded into a module whose
    ring has already grown elsewhere, it takes the saved capacity back."""
    stream = _Stream()
    options = dict(backend="reference", teacher_storage=storage, topk=8)
    uninterrupted = DynSDPBLoss(VOCAB, **options)
    expected = _run(stream, uninterrupted)
    first = DynSDPBLoss(VOCAB, **options)
    _run(stream, first, steps=stream.steps[:3])
    saved = first.state_dict()
    resumed = DynSDPBLoss(VOCAB, **options)
    resumed.load_state_dict(saved)
    assert resumed.ring.grow_capacity
    assert resumed.ring.capacity_rows == first.ring.capacity_rows and resumed.ring.nbytes == first.ring.nbytes
    results = _run(stream, resumed, steps=stream.steps[3:])
    for (loss, grad, count), (loss_u, grad_u, count_u) in zip(results, expected[3:]):
        torch.testing.assert_close(loss, loss_u, rtol=0, atol=0)
        torch.testing.assert_close(grad, grad_u, rtol=0, atol=0)
        assert count == count_u == 4
    _assert_same_state(resumed.ring.state_dict(), uninterrupted.ring.state_dict())
    assert resumed.ring.nbytes == uninterrupted.ring.nbytes
    # a module whose ring grew larger (a longer batch) takes the saved, smaller capacity back
    other = DynSDPBLoss(VOCAB, **options)
    other(torch.randn(8, 20, VOCAB), torch.randint(0, VOCAB, (8, 20)), torch.arange(100, 108))
    assert other.ring.capacity_rows == 8 * 19  # 8 new samples of 20 tokens, 19 of them can have a label
    other.load_state_dict(saved)
    assert other.ring.capacity_rows == first.ring.capacity_rows and other.ring.nbytes == first.ring.nbytes
    _assert_same_state(other.ring.state_dict(), first.ring.state_dict())


def test_grown_state_into_a_fixed_ring_of_another_capacity_is_refused():
    stream = _Stream(n_steps=2)
    grown = DynSDPBLoss(VOCAB, backend="reference")
    _run(stream, grown)
    fixed = DynSDPBLoss(VOCAB, backend="reference", capacity_rows=16)
    before = fixed.ring.state_dict()
    with pytest.raises(ValueError, match=r"capacity_rows=44 but this ring has capacity_rows=16"):
        fixed.load_state_dict(grown.state_dict())
    _assert_same_state(before, fixed.ring.state_dict())
    fixed_44 = DynSDPBLoss(VOCAB, backend="reference", capacity_rows=44)
    fixed_44.load_state_dict(grown.state_dict())
    _assert_same_state(fixed_44.ring.state_dict(), grown.ring.state_dict())


def test_state_dict_of_the_dense_table_format_loads_into_a_growing_ring():
    """The earlier state_dict format (start / length tables indexed by sample id) restores a default
    module's ring, which keeps growing afterwards."""
    stream = _Stream(n_steps=3)
    original = DynSDPBLoss(VOCAB, backend="reference")
    _run(stream, original, steps=stream.steps[:2])
    state = original.ring.state_dict()
    old = {key: value for key, value in state.items() if not key.startswith("entry_")}
    n_ids = int(state["entry_ids"].max()) + 1
    old["start"] = torch.full((n_ids,), -1, dtype=torch.int64)
    old["length"] = torch.zeros(n_ids, dtype=torch.int64)
    old["start"][state["entry_ids"]] = state["entry_start"]
    old["length"][state["entry_ids"]] = state["entry_length"]
    resumed = DynSDPBLoss(VOCAB, backend="reference")
    resumed.load_ring_state_dict(old)
    _assert_same_state(state, resumed.ring.state_dict())
    assert resumed.ring.grow_capacity
    (loss, _, count), = _run(stream, resumed, steps=stream.steps[2:])
    (loss_u, _, count_u), = _run(stream, original, steps=stream.steps[2:])
    torch.testing.assert_close(loss, loss_u, rtol=0, atol=0)
    assert count == count_u == 4


def test_growing_ring_direct_use_and_nbytes():
    """TeacherRing(grow_capacity=True) used directly: each call of more rows than C raises C (and the
    reserve) to them, keeping the live entries; nbytes is the formula at every step."""
    ring = TeacherRing(VOCAB, 4, device="cpu", grow_capacity=True)
    assert ring.nbytes == _dense_formula(4, 4) == _ring_tensor_bytes(ring)
    for n_ids, width, expected_capacity in ((1, 3, 4), (3, 4, 12), (2, 3, 12), (4, 5, 20)):
        ids = torch.arange(n_ids) + 10 * width
        lookup = ring.lookup(ids, torch.ones(n_ids, width, dtype=torch.bool))
        ring.commit(lookup)
        assert ring.capacity_rows == expected_capacity
        assert ring.nbytes == _dense_formula(expected_capacity, expected_capacity) == _ring_tensor_bytes(ring)
        assert all(int(i) in ring for i in ids)  # a call's own entries are never evicted by it
    with pytest.raises(TypeError, match="grow_capacity"):
        TeacherRing(VOCAB, 4, grow_capacity="yes")


# -- item 6: to() and rings that follow the logits' device --------------------------------------------


def _primed_ring(storage: str = "dense") -> tuple[DynSDPBLoss, TeacherRing]:
    loss_fn = DynSDPBLoss(VOCAB, capacity_rows=32, backend="reference", teacher_storage=storage, topk=8)
    loss_fn(torch.randn(3, 4, VOCAB), torch.randint(0, VOCAB, (3, 4)), torch.tensor([0, 5, 9]))
    return loss_fn, loss_fn.ring


@pytest.mark.parametrize("storage", ["dense", "topk"])
def test_to_moves_every_tensor_and_keeps_nbytes(storage):
    """ring.to(device) (AttributeError before the fix) moves each of the ring's tensors, returns the ring,
    keeps the layout and nbytes; to() of the device it is on keeps the contents; a dtype is refused."""
    _, ring = _primed_ring(storage)
    before, nbytes = ring.state_dict(), ring.nbytes
    assert ring.to("cpu") is ring
    _assert_same_state(before, ring.state_dict())
    assert ring.to(torch.device("meta")) is ring
    tensors = [t for t in vars(ring).values() if isinstance(t, torch.Tensor)]
    assert len(tensors) == (8 if storage == "topk" else 6) and all(t.device.type == "meta" for t in tensors)
    assert ring.device == torch.device("meta") and ring.nbytes == nbytes == _ring_tensor_bytes(ring)
    with pytest.raises(TypeError, match="storage dtype is fixed"):
        ring.to(torch.float32)
    # a ring that was never allocated is allocated on the device it is moved to
    fresh = TeacherRing(VOCAB, 6).to("meta")
    assert fresh.device.type == "meta" and fresh.nbytes == _dense_formula(6, 6) == _ring_tensor_bytes(fresh)
    # after an explicit to(), logits on another device are an error, not a silent move
    with pytest.raises(ValueError, match="logits are on cpu but the teacher ring lives on meta"):
        fresh.lookup(torch.tensor([0]), torch.ones(1, 3, dtype=torch.bool))


def test_lookup_moves_a_restored_ring_to_the_logits_device():
    """A ring restored (on the CPU) without a device meets `valid` on another device: lookup moves it
    there (before the fix it called to(), which raised), with every tensor and the same nbytes."""
    _, source = _primed_ring()
    ring = TeacherRing(VOCAB, 32)
    ring.load_state_dict(source.state_dict())
    assert ring.device == torch.device("cpu")
    nbytes = ring.nbytes
    lookup = ring.lookup(torch.tensor([0, 5, 7]), torch.ones(3, 3, dtype=torch.bool, device="meta"))
    assert ring.device.type == "meta" and lookup.teacher_index.device.type == "meta"
    assert all(t.device.type == "meta" for t in vars(ring).values() if isinstance(t, torch.Tensor))
    assert ring.nbytes == nbytes
    ring.commit(lookup)


def test_module_resumed_onto_another_device_continues():
    """A module's state_dict loaded into a new module (ring restored on the CPU) and then called with meta
    logits (a stand-in for a GPU): the ring follows the logits and the call runs on meta."""
    stream = _Stream(n_steps=3)
    original = DynSDPBLoss(VOCAB, backend="reference")
    _run(stream, original, steps=stream.steps[:2])
    resumed = DynSDPBLoss(VOCAB, backend="reference", validate=False)  # validation reads values: not on meta
    resumed.load_state_dict(original.state_dict())
    nbytes = resumed.ring.nbytes
    hidden, labels, ids = stream.steps[2]
    logits = stream.logits(hidden).to("meta").requires_grad_(True)
    loss = resumed(logits, labels.to("meta"), ids)
    loss.backward()
    assert loss.device.type == "meta" and logits.grad.device.type == "meta"
    assert resumed.ring.device.type == "meta" and resumed.ring.nbytes == nbytes


@pytest.mark.parametrize("backend", STREAM_BACKENDS)
@pytest.mark.parametrize("logits_dtype", [torch.float64, torch.bfloat16], ids=str)
def test_resumed_ring_read_by_logits_of_another_dtype_gives_the_uninterrupted_loss(backend, logits_dtype):
    """A bfloat16 ring recorded from float32 logits, saved, loaded into a new module, then read by
    logits of another dtype: the same loss, gradient and teachers as the uninterrupted module fed the
    same logits."""
    stream = _Stream(n_steps=4)
    uninterrupted = DynSDPBLoss(VOCAB, backend=backend)
    first = DynSDPBLoss(VOCAB, backend=backend)
    _run(stream, uninterrupted, steps=stream.steps[:2])
    _run(stream, first, steps=stream.steps[:2])
    resumed = DynSDPBLoss(VOCAB, backend=backend)
    resumed.load_state_dict(first.state_dict())
    expected = _run(stream, uninterrupted, steps=stream.steps[2:], dtype=logits_dtype)
    results = _run(stream, resumed, steps=stream.steps[2:], dtype=logits_dtype)
    for (loss, grad, count), (loss_u, grad_u, count_u) in zip(results, expected):
        assert grad.dtype == logits_dtype
        torch.testing.assert_close(loss, loss_u, rtol=0, atol=0)
        torch.testing.assert_close(grad, grad_u, rtol=0, atol=0)
        assert count == count_u == 4
    _assert_same_state(resumed.ring.state_dict(), uninterrupted.ring.state_dict())
