"""The fused ring write (rows.RowRecord), TeacherRing and the DynSDPBLoss module, on every backend.

The module's loss is checked against the independent float64 truth (tests/truth.py) fed with teachers
assembled by hand from the logits of the previous step, so the ring's bookkeeping is tested, not trusted.
"""

from __future__ import annotations

import pytest
import torch
from conftest import BACKENDS, DYNAMIC_IDS, DYNAMIC_MODES
from truth import truth_dynsdpb

from dynsdpb_kernels import DistillConfig, DynSDPBLoss, LossOptions, TeacherRing, fused_loss
from dynsdpb_kernels.contract import RowRecord

IGNORE = -100


def _assert_loss_close(actual, expected, rtol=2e-5, atol=2e-6):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


# -- the kernel contract: recording ------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("logits_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("ring_dtype", [torch.bfloat16, torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("inplace", [False, True], ids=["fresh_grad", "inplace_grad"])
def test_record_writes_rounded_rows_and_stats(backend, logits_dtype, ring_dtype, inplace):
    n_rows, vocab_size, physical = 6, 300, 10  # 300 = five blocks of 64, the last ragged
    logits = (torch.randn(n_rows, vocab_size) * 3).to(logits_dtype)
    labels = torch.randint(0, vocab_size, (n_rows,))
    labels[2] = IGNORE
    teacher_rows = torch.randn(physical, vocab_size).to(ring_dtype)
    teacher_stats = torch.rand(physical, 2)
    teacher_index = torch.tensor([0, -1, 1, -1, -1, 2])
    record_index = torch.tensor([-1, 7, -1, 3, 9, 4])  # disjoint from the teacher slots 0..2
    ring_before, stats_before = teacher_rows.clone(), teacher_stats.clone()
    options = LossOptions(distill=DistillConfig(tau=2.0), backend=backend, inplace_grad=inplace)

    reference_options = LossOptions(distill=options.distill, backend="reference")
    expected_loss, expected = fused_loss(logits.clone(), labels, ring_before, teacher_index, stats_before, reference_options, True)
    student = logits.clone()
    loss, rows = fused_loss(
        student, labels, teacher_rows, teacher_index, teacher_stats, options, True,
        record=RowRecord(record_index, teacher_rows, teacher_stats),
    )

    recorded = record_index >= 0
    slots = record_index[recorded]
    assert torch.equal(teacher_rows[slots], logits[recorded].to(ring_dtype))  # round to nearest even, exactly
    torch.testing.assert_close(teacher_stats[slots], rows.student_stats[recorded], rtol=0, atol=0)
    untouched = torch.ones(physical, dtype=torch.bool)
    untouched[slots] = False
    assert torch.equal(teacher_rows[untouched], ring_before[untouched])
    assert torch.equal(teacher_stats[untouched], stats_before[untouched])
    # recording changes nothing else
    _assert_loss_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rows.grad.float(), expected.grad.float(), rtol=2e-2, atol=1e-6)


def test_record_policy_unknown_and_ring_arguments():
    with pytest.raises(ValueError, match="record"):
        DynSDPBLoss(10, record_policy="sometimes")
    with pytest.raises(ValueError, match="capacity_rows"):
        TeacherRing(10, 0)
    with pytest.raises(TypeError, match="dtype"):
        TeacherRing(10, 4, dtype=torch.int32)


# -- the module against a hand-built DLB teacher -------------------------------------------------


def _batch(sample_lengths: dict[int, int], pad_to: int, vocab_size: int, gen: torch.Generator):
    """Right-padded causal-LM batch: logits (B, pad_to, V), labels (B, pad_to), ids (B,)."""
    ids = torch.tensor(list(sample_lengths))
    labels = torch.full((len(ids), pad_to), IGNORE)
    for row, length in enumerate(sample_lengths.values()):
        labels[row, :length] = torch.randint(0, vocab_size, (length,), generator=gen)
    logits = torch.randn(len(ids), pad_to, vocab_size, generator=gen) * 2
    return logits, labels, ids


def _valid_rows(logits, labels):
    """The student rows the loss uses, per sample: {row index in batch: (K, V) rows, (K,) targets}."""
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE)
    return {b: (logits[b][shifted[b] != IGNORE], shifted[b][shifted[b] != IGNORE]) for b in range(labels.shape[0])}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("teacher_dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("dynamic", DYNAMIC_MODES, ids=DYNAMIC_IDS)
def test_module_dlb_steps_match_truth(backend, teacher_dtype, dynamic):
    """Three DLB steps with dynamic padding: each step's loss and gradient equal the float64 truth
    computed with teachers taken by hand from the previous step's logits (rounded to the ring's dtype)."""
    gen = torch.Generator().manual_seed(7)
    vocab_size = 300
    loss_fn = DynSDPBLoss(vocab_size, tau=2.5, dynamic=dynamic, capacity_rows=64, teacher_dtype=teacher_dtype, backend=backend)
    # lengths are the tokens of each sample (targets = length - 1 after the shift)
    lengths = {0: 5, 1: 3, 2: 6, 3: 4, 4: 2, 5: 5}
    schedule = [([0, 1], 6), ([0, 1, 2, 3], 8), ([2, 3, 4, 5], 7)]  # DLB: previous new samples + new ones
    previous: dict[int, torch.Tensor] = {}  # sample id -> its valid rows the last time it was recorded
    for ids, pad_to in schedule:
        logits, labels, sample_ids = _batch({i: lengths[i] for i in ids}, pad_to, vocab_size, gen)
        # the same sample keeps the same tokens across steps (teacher forcing); regenerate them deterministically
        for row, i in enumerate(ids):
            token_gen = torch.Generator().manual_seed(100 + i)
            labels[row, : lengths[i]] = torch.randint(0, vocab_size, (lengths[i],), generator=token_gen)
        per_sample = _valid_rows(logits, labels)
        rows = torch.cat([per_sample[b][0] for b in range(len(ids))])
        targets = torch.cat([per_sample[b][1] for b in range(len(ids))])
        teacher = torch.zeros_like(rows)
        teacher_unrounded = torch.zeros_like(rows)
        mask = torch.zeros(len(rows), dtype=torch.bool)
        offset = 0
        for b, i in enumerate(ids):
            k = len(per_sample[b][1])
            if i in previous:
                teacher[offset : offset + k] = previous[i].to(teacher_dtype).float()
                teacher_unrounded[offset : offset + k] = previous[i]
                mask[offset : offset + k] = True
            offset += k
        # KL against the stored (rounded) rows; (u, d) from the rows as they were before rounding
        truth = truth_dynsdpb(
            rows.double(), targets, teacher.double(), mask, tau=2.5, dynamic=dynamic, stats_from=teacher_unrounded.double()
        )

        student = logits.clone().requires_grad_(True)
        loss = loss_fn(student, labels, sample_ids)
        loss.backward()
        _assert_loss_close(loss, truth["loss"], rtol=1e-5, atol=1e-6)
        shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE)
        grad_valid = student.grad[shifted != IGNORE]
        torch.testing.assert_close(grad_valid.double(), truth["grad"], rtol=1e-4, atol=1e-6)
        assert torch.all(student.grad[shifted == IGNORE] == 0)

        stats = loss_fn.last_stats
        with_teacher = [i for i in ids if i in previous]
        assert int(stats.teacher_samples) == len(with_teacher)
        assert int(stats.teacher_misses) == len(ids) - len(with_teacher)
        assert int(stats.loss.n_distilled) == int(mask.sum())
        # "new": teachers are consumed, the others recorded
        for b, i in enumerate(ids):
            if i in previous:
                del previous[i]
            else:
                previous[i] = per_sample[b][0].clone()
        for i in range(6):
            assert (i in loss_fn.ring) == (i in previous)


@pytest.mark.parametrize("backend", BACKENDS)
def test_recorded_teacher_is_the_rounded_row_with_its_stats(backend):
    vocab_size = 300
    loss_fn = DynSDPBLoss(vocab_size, capacity_rows=16, backend=backend)
    logits = torch.randn(2, 4, vocab_size)
    labels = torch.randint(0, vocab_size, (2, 4))
    labels[1, 2:] = IGNORE  # sample 11 has one target (position 0 -> label 1)
    loss_fn(logits, labels, torch.tensor([10, 11]))
    rows, stats = loss_fn.ring.teacher(11)
    assert rows.shape == (1, vocab_size)
    assert torch.equal(rows[0], logits[1, 0].to(torch.bfloat16))
    from dynsdpb_kernels import row_statistics

    assert stats.shape == (1, 4)  # (u, d, tau_rec, log_norm)
    torch.testing.assert_close(stats[:, :2], row_statistics(logits[1, :1].double()).float(), rtol=1e-5, atol=1e-6)
    tau_rec = 1 + (3.0 - 1) * stats[0, 1].double()  # the module's default tau = 3, dynamic
    torch.testing.assert_close(stats[0, 2].double(), tau_rec, rtol=1e-6, atol=0)
    torch.testing.assert_close(stats[0, 3].double(), (rows[0].double() / tau_rec).logsumexp(-1), rtol=1e-6, atol=1e-6)
    assert loss_fn.ring.teacher(12) is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_length_mismatch_gets_no_teacher_and_is_counted(backend):
    vocab_size = 40
    loss_fn = DynSDPBLoss(vocab_size, capacity_rows=16, backend=backend)
    labels = torch.randint(0, vocab_size, (1, 5))
    loss_fn(torch.randn(1, 5, vocab_size), labels, torch.tensor([3]))
    shorter = labels.clone()
    shorter[0, 3:] = IGNORE
    logits = torch.randn(1, 5, vocab_size)
    loss = loss_fn(logits, shorter, torch.tensor([3]))
    assert int(loss_fn.last_stats.length_mismatches) == 1
    assert int(loss_fn.last_stats.teacher_samples) == 0
    plain = torch.nn.functional.cross_entropy(logits[0, :-1], torch.nn.functional.pad(shorter[0, 1:], (0, 0))[:4], ignore_index=IGNORE)
    _assert_loss_close(loss, plain)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fifo_eviction_never_reads_an_overwritten_entry(backend):
    vocab_size = 40
    ring = TeacherRing(vocab_size, capacity_rows=6, dtype=torch.float32, reserve_rows=4)
    loss_fn = DynSDPBLoss(vocab_size, backend=backend, record_policy="all")
    loss_fn.ring = ring
    recorded = {}
    for step in range(6):  # each step records one sample of 3 rows; the ring keeps the last 6 rows = 2 samples
        logits = torch.randn(1, 4, vocab_size)
        labels = torch.randint(0, vocab_size, (1, 4))
        loss_fn(logits, labels, torch.tensor([step]))
        recorded[step] = logits[0, :3]
        live = [i for i in recorded if i in ring]
        assert live == [i for i in (step - 1, step) if i >= 0]
        for i in live:
            assert torch.equal(ring.teacher(i)[0], recorded[i])
    assert len(ring) == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_reserve_grows_and_keeps_live_teachers(backend):
    vocab_size = 40
    ring = TeacherRing(vocab_size, capacity_rows=8, dtype=torch.float32, reserve_rows=2)
    loss_fn = DynSDPBLoss(vocab_size, backend=backend)
    loss_fn.ring = ring
    first = torch.randn(1, 2, vocab_size)
    loss_fn(first, torch.randint(0, vocab_size, (1, 2)), torch.tensor([0]))  # 2 rows: fits the reserve
    physical = ring.physical_rows
    loss_fn(torch.randn(2, 4, vocab_size), torch.randint(0, vocab_size, (2, 4)), torch.tensor([5, 6]))  # 8 rows, 6 valid
    assert ring.physical_rows > physical
    assert torch.equal(ring.teacher(0)[0], first[0, :1])


@pytest.mark.parametrize("policy", ["new", "all", "none"])
def test_record_policies(policy):
    vocab_size = 40
    loss_fn = DynSDPBLoss(vocab_size, capacity_rows=32, backend="reference", record_policy=policy)
    loss_fn.ring = TeacherRing(vocab_size, 32)
    labels = torch.randint(0, vocab_size, (2, 3))
    if policy == "none":  # nothing gets recorded: seed the ring through another module sharing it
        seeder = DynSDPBLoss(vocab_size, backend="reference")
        seeder.ring = loss_fn.ring
        seeder(torch.randn(1, 3, vocab_size), labels[:1], torch.tensor([0]))
    else:
        loss_fn(torch.randn(1, 3, vocab_size), labels[:1], torch.tensor([0]))
    loss_fn(torch.randn(2, 3, vocab_size), labels, torch.tensor([0, 1]))
    assert int(loss_fn.last_stats.teacher_samples) == 1
    expected_live = {"new": {1}, "all": {0, 1}, "none": {0}}[policy]
    assert {i for i in (0, 1) if i in loss_fn.ring} == expected_live


def test_classification_rows_and_no_shift():
    vocab_size = 5
    loss_fn = DynSDPBLoss(vocab_size, capacity_rows=8, backend="reference", dynamic=False, tau=2.0, alpha=0.5)
    first = torch.randn(2, vocab_size)
    labels = torch.tensor([1, 3])
    loss_fn(first, labels, torch.tensor([0, 1]))
    second = torch.randn(3, vocab_size)
    labels2 = torch.tensor([1, 3, 0])
    loss = loss_fn(second, labels2, torch.tensor([0, 1, 2]))
    teacher = torch.cat([first.to(torch.bfloat16).float(), torch.zeros(1, vocab_size)])
    mask = torch.tensor([True, True, False])
    truth = truth_dynsdpb(second.double(), labels2, teacher.double(), mask, dynamic=False, tau=2.0, alpha=0.5)
    _assert_loss_close(loss, truth["loss"])


def test_shift_can_be_turned_off():
    vocab_size = 30
    logits = torch.randn(2, 4, vocab_size)
    labels = torch.randint(0, vocab_size, (2, 4))
    unshifted = DynSDPBLoss(vocab_size, shift_labels=False, backend="reference").eval()
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab_size), labels.reshape(-1))
    _assert_loss_close(unshifted(logits, labels), expected)
    shifted = DynSDPBLoss(vocab_size, backend="reference").eval()
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab_size), labels[:, 1:].reshape(-1))
    _assert_loss_close(shifted(logits, labels), expected)


def test_eval_mode_is_plain_cross_entropy_and_leaves_the_ring_alone():
    vocab_size = 30
    loss_fn = DynSDPBLoss(vocab_size, capacity_rows=16, backend="reference")
    loss_fn(torch.randn(1, 3, vocab_size), torch.randint(0, vocab_size, (1, 3)), torch.tensor([0]))
    before = loss_fn.ring.state_dict()
    loss_fn.eval()
    logits = torch.randn(1, 3, vocab_size)
    labels = torch.randint(0, vocab_size, (1, 3))
    loss = loss_fn(logits, labels, torch.tensor([0]))
    _assert_loss_close(loss, torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:]))
    _assert_same_state(before, loss_fn.ring.state_dict())
    loss_fn.train()
    with pytest.raises(ValueError, match="sample_ids"):
        loss_fn(logits, labels)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_accumulation_with_num_items_adds_up(backend):
    """Two micro-batches with num_items_in_batch sum to the loss of the whole batch when both micro-batches
    distill the same fraction of their rows."""
    vocab_size = 60
    logits = torch.randn(4, 5, vocab_size)
    labels = torch.randint(0, vocab_size, (4, 5))
    ids = torch.arange(4)
    prime = torch.randn(4, 5, vocab_size)

    def fresh():
        loss_fn = DynSDPBLoss(vocab_size, capacity_rows=64, backend=backend, record_policy="all")
        loss_fn(prime[[0, 2]], labels[[0, 2]], ids[[0, 2]])  # samples 0 and 2 get teachers
        return loss_fn

    whole = fresh()(logits, labels, ids)
    loss_fn = fresh()
    n_items = int((labels[:, 1:] != IGNORE).sum())
    parts = [loss_fn(logits[[b, b + 1]], labels[[b, b + 1]], ids[[b, b + 1]], num_items_in_batch=n_items) for b in (0, 2)]
    _assert_loss_close(parts[0] + parts[1], whole, rtol=1e-5, atol=1e-6)


# -- state, resume and failure atomicity -------------------------------------------------------------


def _assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_resume_gives_the_same_teachers(backend):
    vocab_size = 50
    data = [(torch.randn(2, 4, vocab_size), torch.randint(0, vocab_size, (2, 4)), torch.tensor(ids)) for ids in ([0, 1], [1, 2], [2, 3])]
    original = DynSDPBLoss(vocab_size, capacity_rows=16, backend=backend)
    original(*data[0])
    saved = original.state_dict()  # the ring rides along as the module's extra state
    resumed = DynSDPBLoss(vocab_size, capacity_rows=16, backend=backend)
    resumed.load_state_dict(saved)
    for batch in data[1:]:
        torch.testing.assert_close(original(*batch), resumed(*batch), rtol=0, atol=0)
    _assert_same_state(original.ring.state_dict(), resumed.ring.state_dict())


@pytest.mark.parametrize("backend", BACKENDS)
def test_failed_call_leaves_the_ring_unchanged(backend):
    vocab_size = 50
    loss_fn = DynSDPBLoss(vocab_size, capacity_rows=8, backend=backend)
    loss_fn(torch.randn(2, 3, vocab_size), torch.randint(0, vocab_size, (2, 3)), torch.tensor([0, 1]))
    before = loss_fn.ring.state_dict()
    live_before = {i: loss_fn.ring.teacher(i) for i in (0, 1)}
    bad_logits = torch.randn(2, 3, vocab_size)
    bad_logits[1, 0, 5] = float("nan")
    with pytest.raises(ValueError, match="logits contain NaN"):
        loss_fn(bad_logits, torch.randint(0, vocab_size, (2, 3)), torch.tensor([1, 2]))
    bad_labels = torch.randint(0, vocab_size, (2, 3))
    bad_labels[0, 1] = vocab_size
    with pytest.raises(ValueError, match="labels must lie"):
        loss_fn(torch.randn(2, 3, vocab_size), bad_labels, torch.tensor([1, 2]))
    _assert_same_state(before, loss_fn.ring.state_dict())  # only reserved (dead) slots may have been written
    for i, (rows, stats) in live_before.items():
        assert torch.equal(loss_fn.ring.teacher(i)[0], rows) and torch.equal(loss_fn.ring.teacher(i)[1], stats)


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        (torch.tensor([1, 1]), "distinct"),
        (torch.tensor([0, -3]), ">= 0"),
        (torch.tensor([0, -(2**62)]), ">= 0"),
        (torch.tensor([0.0, 1.0]), "integer"),
        (torch.tensor([[0, 1]]), "1-D"),
        ([0, 1], "torch.Tensor"),
        (torch.tensor([0, 1, 2]), r"shape \(3, T\)"),
    ],
)
def test_bad_sample_ids_are_named_and_change_nothing(ids, message):
    vocab_size = 20
    loss_fn = DynSDPBLoss(vocab_size, capacity_rows=8, backend="reference")
    loss_fn(torch.randn(2, 3, vocab_size), torch.randint(0, vocab_size, (2, 3)), torch.tensor([0, 1]))
    before = loss_fn.ring.state_dict()
    with pytest.raises((ValueError, TypeError), match=message):
        loss_fn(torch.randn(2, 3, vocab_size), torch.randint(0, vocab_size, (2, 3)), ids)
    _assert_same_state(before, loss_fn.ring.state_dict())


def test_vocabulary_mismatch_is_named():
    loss_fn = DynSDPBLoss(20, capacity_rows=8, backend="reference")
    with pytest.raises(ValueError, match="vocab_size=20"):
        loss_fn(torch.randn(2, 3, 21), torch.zeros(2, 3, dtype=torch.long), torch.tensor([0, 1]))
    ring = TeacherRing(20, 4)
    with pytest.raises(ValueError, match="vocab_size"):
        ring.load_state_dict(TeacherRing(21, 4, device="cpu").state_dict())


def test_stale_lookup_cannot_be_committed():
    ring = TeacherRing(10, 4, device="cpu")
    valid = torch.ones(1, 2, dtype=torch.bool)
    first = ring.lookup(torch.tensor([0]), valid)
    second = ring.lookup(torch.tensor([1]), valid)
    ring.commit(second)
    with pytest.raises(RuntimeError, match="stale"):
        ring.commit(first)


def _ring_tensor_bytes(ring: TeacherRing) -> int:
    """Bytes of every tensor the ring holds, found by walking its attributes (not its own bookkeeping)."""
    return sum(t.numel() * t.element_size() for t in vars(ring).values() if isinstance(t, torch.Tensor))


@pytest.mark.parametrize("storage", ["dense", "topk"])
def test_nbytes_is_the_exact_formula_and_independent_of_the_ids(storage):
    vocab_size, capacity, reserve, k = 100, 10, 6, 7
    dtype_bytes = 2  # bfloat16
    physical = capacity + reserve
    per_row = vocab_size * dtype_bytes + 16 if storage == "dense" else k * (dtype_bytes + 8) + 4 + 8
    # README: rows + (u, d) [+ (tau_rec, log_norm) dense; + ids, tail top-k], entry table, head
    formula = physical * per_row + 24 * capacity + 8
    rings = []
    for ids in ([0, 1, 2], [2**40 + 3, 2**62 + 1, 2**63 - 1]):
        ring = TeacherRing(vocab_size, capacity, device="cpu", reserve_rows=reserve, storage=storage, topk=k)
        assert ring.nbytes == formula == _ring_tensor_bytes(ring)
        loss_fn = DynSDPBLoss(vocab_size, backend="reference", teacher_storage=storage, topk=k, record_policy="all")
        loss_fn.ring = ring
        for _ in range(4):  # 6 rows a call (the reserve), 4 valid: more rows than the capacity
            loss_fn(torch.randn(3, 2, vocab_size), torch.randint(0, vocab_size, (3, 2)), torch.tensor(ids))
            assert ring.nbytes == formula == _ring_tensor_bytes(ring) == loss_fn.last_stats.ring_bytes
        rings.append(ring)
    assert len(rings[0]) == len(rings[1]) > 0


def test_clear_forgets_every_entry():
    ring = TeacherRing(100, 10, dtype=torch.bfloat16, device="cpu", reserve_rows=6)
    loss_fn = DynSDPBLoss(100, backend="reference")
    loss_fn.ring = ring
    loss_fn(torch.randn(1, 3, 100), torch.randint(0, 100, (1, 3)), torch.tensor([2**50]))
    assert len(ring) == 1 and 2**50 in ring
    ring.clear()
    assert len(ring) == 0 and 2**50 not in ring and ring.state_dict()["entry_ids"].numel() == 0


# -- any int64 sample id: the entry table against a plain Python model of the ring -------------------


class _RingModel:
    """The ring's bookkeeping in plain Python: a dict sample id -> (start, length) and a head, and the
    host mirror of record_policy="new": the ids the last recording call recorded whatever the entries
    were (`sure`; not recorded again by the next call) and every id that may hold an entry (`possible`)."""

    def __init__(self, capacity_rows: int):
        self.capacity, self.head, self.entries = capacity_rows, 0, {}
        self.sure, self.possible = set(), set()

    def live(self, sample_id):
        entry = self.entries.get(sample_id)
        return entry if entry is not None and entry[1] > 0 and entry[0] >= self.head - self.capacity else None

    def step(self, ids, counts, policy):
        has_teacher, mismatched, new = [], [], {}
        position = self.head
        for sample_id, count in zip(ids, counts):
            entry = self.live(sample_id)
            has_teacher.append(entry is not None and entry[1] == count)
            mismatched.append(entry is not None and entry[1] != count)
            # "new": an entry found is consumed (a mismatched one too), a sample the previous call surely
            # recorded is not recorded again
            if policy == "all" or (policy == "new" and entry is None and sample_id not in self.sure):
                new[sample_id] = (position, count)
                position += count
            elif policy == "new":
                new[sample_id] = None  # consumed
        if policy == "all":
            self.sure, self.possible = set(ids), self.possible | set(ids)
        elif policy == "new":
            fresh = [i for i in ids if i not in self.sure]
            self.sure, self.possible = set(fresh) - self.possible, (self.possible | set(fresh)) - (set(ids) - set(fresh))
        self.entries.update(new)
        self.head = position
        self.entries = {i: e for i, e in self.entries.items() if e is not None and self.live(i) is not None}
        return has_teacher, mismatched


@pytest.mark.parametrize("policy", ["new", "all", "none"])
@pytest.mark.parametrize("id_scale", [2**40, 2**62, 2**63 - 64], ids=["2^40", "2^62", "int64_max"])
def test_huge_sample_ids_follow_the_python_model(policy, id_scale):
    """Random ids drawn from a pool near id_scale (and a few small ones), random lengths, capacity small
    enough to evict: has_teacher, mismatches, membership and the saved entries equal the Python model's."""
    gen = torch.Generator().manual_seed(id_scale % 1000 + len(policy))
    capacity = 12
    pool = torch.cat([id_scale + torch.randint(0, 63, (14,), generator=gen), torch.tensor([0, 1, 7])]).unique()
    ring = TeacherRing(5, capacity, device="cpu", reserve_rows=16)
    model = _RingModel(capacity)
    seeder_policy = "all" if policy == "none" else policy  # "none" never records: seed with "all" steps
    for step in range(30):
        step_policy = seeder_policy if policy == "none" and step % 3 == 0 else policy
        ids = pool[torch.randperm(len(pool), generator=gen)[: int(torch.randint(1, 5, (1,), generator=gen))]]
        valid = torch.rand(len(ids), 4, generator=gen) < 0.6
        counts = valid.sum(1).tolist()
        lookup = ring.lookup(ids, valid, record_policy=step_policy)
        ring.commit(lookup)
        has_teacher, mismatched = model.step(ids.tolist(), counts, step_policy)
        assert lookup.has_teacher.tolist() == has_teacher
        assert lookup.mismatched.tolist() == mismatched
        assert int(ring._head) == model.head
        for sample_id in pool.tolist():
            assert (sample_id in ring) == (model.live(sample_id) is not None)
        state = ring.state_dict()
        expected = sorted(model.entries.items())
        assert state["entry_ids"].tolist() == [i for i, _ in expected]
        assert state["entry_start"].tolist() == [e[0] for _, e in expected]
        assert state["entry_length"].tolist() == [e[1] for _, e in expected]
        assert len(ring) <= capacity


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_ids_give_the_losses_of_small_ids_and_resume(backend):
    """The ring does not depend on the ids' values: a DLB schedule over ids near 2^40, 2^62 and random
    63-bit ids gives exactly the losses of the same schedule over 0..5, with evictions, and a ring saved
    and restored mid-way continues identically."""
    vocab_size = 60
    gen = torch.Generator().manual_seed(3)
    huge = [2**40, 2**40 + 1, 2**62, 2**63 - 1] + torch.randint(0, 2**62, (2,), generator=gen).mul(2).tolist()
    schedule = [[0, 1], [0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 0, 1], [0, 1, 2, 3], [2, 3, 4, 5]]
    data = [(torch.randn(len(ids), 4, vocab_size, generator=gen), ids) for ids in schedule]
    labels = {i: torch.randint(0, vocab_size, (4,), generator=gen) for i in range(6)}
    labels[3][2:] = IGNORE

    def run(id_map, resume_at=None):
        loss_fn = DynSDPBLoss(vocab_size, capacity_rows=12, backend=backend)  # 12 rows: about 4 samples
        losses = []
        for step, (logits, ids) in enumerate(data):
            if step == resume_at:
                restored = DynSDPBLoss(vocab_size, capacity_rows=12, backend=backend)
                restored.load_state_dict(loss_fn.state_dict())
                loss_fn = restored
            batch_labels = torch.stack([labels[i] for i in ids])
            losses.append(loss_fn(logits, batch_labels, torch.tensor([id_map[i] for i in ids])))
            losses.append(loss_fn.last_stats.teacher_samples)
        return losses, [id_map[i] in loss_fn.ring for i in range(6)]

    small_losses, small_live = run(list(range(6)))
    huge_losses, huge_live = run(huge)
    resumed_losses, resumed_live = run(huge, resume_at=3)
    for a, b, c in zip(small_losses, huge_losses, resumed_losses):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, c, rtol=0, atol=0)
    assert small_live == huge_live == resumed_live
    assert sum(int(t) for t in small_losses[1::2]) > 0


def test_state_dict_of_the_dense_table_format_loads():
    """A state_dict saved by the earlier version (start / length tables indexed by sample id) restores
    the same live entries; its dead and empty entries are dropped."""
    vocab_size = 20
    loss_fn = DynSDPBLoss(vocab_size, capacity_rows=8, backend="reference")
    loss_fn(torch.randn(3, 3, vocab_size), torch.randint(0, vocab_size, (3, 3)), torch.tensor([0, 4, 9]))
    state = loss_fn.ring.state_dict()
    old = {key: value for key, value in state.items() if not key.startswith("entry_")}
    old["start"] = torch.full((11,), -1, dtype=torch.int64)
    old["length"] = torch.zeros(11, dtype=torch.int64)
    old["start"][state["entry_ids"]] = state["entry_start"]
    old["length"][state["entry_ids"]] = state["entry_length"]
    old["start"][10] = 0  # an empty entry: not live
    restored = TeacherRing(vocab_size, 8)
    restored.load_state_dict(old)
    _assert_same_state(state, restored.state_dict())
    for i in (0, 4, 9):
        assert torch.equal(restored.teacher(i)[0], loss_fn.ring.teacher(i)[0])
