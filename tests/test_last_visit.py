"""Teachers from a sample's previous visit (DynSDPBLoss(teacher="previous_visit") + VisitBatchSampler):
each sample is taught by its own logits from one epoch earlier, with no re-run in the step.

The loss is checked against the float64 truth (tests/truth.py) fed with teachers assembled by hand from the
logits each sample got at its previous visit, so the ring's bookkeeping across epochs is tested, not trusted.
"""

from __future__ import annotations

import pytest
import torch
from conftest import BACKENDS
from truth import truth_dynsdpb

from dynsdpb_kernels import DynSDPBLoss, VisitBatchSampler

IGNORE = -100
VOCAB = 50
N_SAMPLES = 10
LENGTHS = [3, 7, 5, 2, 6, 4, 7, 1, 5, 3]  # valid rows of each sample: the same at every visit
OPTIONS = dict(alpha=2.0, tau=2.0, dynamic=False, shift_labels=False)  # a distillation term well above noise


def _batch(ids: list[int], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh logits (B, T, V) for a visit (T the batch's longest sample, padded rows ignored) and labels."""
    width = max(LENGTHS[i] for i in ids)
    logits = torch.randn(len(ids), width, VOCAB, generator=generator, dtype=torch.float64) * 3
    labels = torch.randint(0, VOCAB, (len(ids), width), generator=generator)
    for row, i in enumerate(ids):
        labels[row, LENGTHS[i]:] = IGNORE
    return logits.float(), labels


def _run_epochs(module, epochs, check, generator_seed=0, start_epoch=0):
    generator = torch.Generator().manual_seed(generator_seed)
    previous_visit: dict[int, torch.Tensor] = {}  # sample id -> its valid rows' logits at its last visit
    counts = []
    sampler = VisitBatchSampler(N_SAMPLES, 4, seed=7)
    for epoch in range(start_epoch, start_epoch + epochs):
        sampler.set_epoch(epoch)
        for ids in sampler:
            logits, labels = _batch(ids, generator)
            loss = module(logits, labels, torch.tensor(ids))
            if check:
                teacher = torch.zeros_like(logits)
                has = torch.zeros(labels.shape, dtype=torch.bool)
                for row, i in enumerate(ids):
                    if i in previous_visit:
                        teacher[row, : LENGTHS[i]] = previous_visit[i]
                        has[row, : LENGTHS[i]] = True
                truth = truth_dynsdpb(logits, labels, teacher, has, **{k: OPTIONS[k] for k in ("alpha", "tau", "dynamic")})
                torch.testing.assert_close(loss.double(), truth["loss"], rtol=2e-5, atol=2e-6)
            for row, i in enumerate(ids):
                previous_visit[i] = logits[row, : LENGTHS[i]].clone()
            counts.append(int(module.last_stats.teacher_samples))
    return counts


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_sample_is_taught_by_its_previous_visit(backend):
    module = DynSDPBLoss(VOCAB, teacher="previous_visit", teacher_storage="dense", teacher_dtype=torch.float32,
                         backend=backend, **OPTIONS)
    counts = _run_epochs(module, 3, check=True)
    per_epoch = len(VisitBatchSampler(N_SAMPLES, 4))
    assert counts[:per_epoch] == [0] * per_epoch  # the first epoch has no teachers
    sizes = [len(b) for b in VisitBatchSampler(N_SAMPLES, 4)]
    assert counts[per_epoch:] == sizes * 2  # afterwards every sample has one, every epoch: none is evicted
    # the ring grew to its documented size: 2 S <= C < 4 S, S = the sum over the samples of T (their
    # batch's longest sample) at their first visit; the reserve is the largest call's rows
    first_epoch = list(VisitBatchSampler(N_SAMPLES, 4, seed=7))
    widths = [max(LENGTHS[i] for i in ids) for ids in first_epoch]
    bound = sum(len(ids) * width for ids, width in zip(first_epoch, widths))
    assert 2 * bound <= module.ring.capacity_rows < 4 * bound
    assert module.ring.physical_rows - module.ring.capacity_rows == 4 * max(LENGTHS)  # (seed 7: some call is 4 samples x 7 rows)


def test_previous_batch_mode_forgets_after_one_step():
    """The control: DLB's default ring consumes a teacher after one use, so a once-per-epoch order gets
    no teachers at all (which is why previous_visit exists)."""
    module = DynSDPBLoss(VOCAB, backend="reference", **OPTIONS)
    counts = _run_epochs(module, 2, check=False)
    per_epoch = len(VisitBatchSampler(N_SAMPLES, 4))
    # every sample was recorded in epoch 1, but the previous_batch ring keeps only about the last call's
    # rows: most of epoch 2 finds no teacher
    assert sum(counts[per_epoch:]) < N_SAMPLES // 2


def test_topk_last_visit_stores_the_previous_visits_top_k():
    module = DynSDPBLoss(VOCAB, teacher="previous_visit", topk=8, backend="reference", **OPTIONS)
    assert module.teacher_storage == "topk"
    generator = torch.Generator().manual_seed(3)
    sampler = VisitBatchSampler(N_SAMPLES, 4, seed=1)
    last = {}
    for epoch in range(2):
        sampler.set_epoch(epoch)
        for ids in sampler:
            logits, labels = _batch(ids, generator)
            module(logits, labels, torch.tensor(ids))
            for row, i in enumerate(ids):
                last[i] = logits[row, : LENGTHS[i]]
            if epoch == 1:
                assert int(module.last_stats.teacher_samples) == len(ids)
    for i, rows in last.items():
        values, support = module.ring.teacher(i)[0], module.ring.teacher_support(i)
        expected_values, expected_ids = rows.topk(8, dim=-1)
        assert torch.equal(support, expected_ids)
        assert torch.equal(values, expected_values.to(values.dtype))


def test_resume_mid_training_gives_the_same_losses():
    def losses(module, epochs, start_epoch):
        generator = torch.Generator().manual_seed(11 + start_epoch)
        sampler = VisitBatchSampler(N_SAMPLES, 4, seed=2)
        out = []
        for epoch in range(start_epoch, start_epoch + epochs):
            sampler.set_epoch(epoch)
            for ids in sampler:
                logits, labels = _batch(ids, generator)
                out.append(module(logits, labels, torch.tensor(ids)).item())
        return out

    options = dict(teacher="previous_visit", backend="reference", **OPTIONS)
    straight = DynSDPBLoss(VOCAB, **options)
    losses(straight, 2, 0)
    state = straight.state_dict()
    capacity = straight.ring.capacity_rows
    resumed = DynSDPBLoss(VOCAB, **options)
    resumed.load_state_dict(state)
    assert resumed.ring.physical_rows == straight.ring.physical_rows and resumed.ring.nbytes == straight.ring.nbytes
    assert losses(resumed, 2, 2) == losses(straight, 2, 2)
    # the seen ids travel with the state: no sample counts as new again, so the ring does not grow
    assert resumed.ring.capacity_rows == straight.ring.capacity_rows == capacity
    assert resumed.ring.nbytes == straight.ring.nbytes


def test_a_fixed_capacity_too_small_for_last_visits_warns():
    module = DynSDPBLoss(VOCAB, teacher="previous_visit", capacity_rows=40, backend="reference", **OPTIONS)
    with pytest.warns(RuntimeWarning, match=r"capacity_rows >= \d+"):
        counts = _run_epochs(module, 2, check=False)
    assert sum(counts) < N_SAMPLES  # and teachers are indeed lost (what the warning says)


def test_bad_teacher_options_are_named():
    with pytest.raises(ValueError, match="teacher must be one of"):
        DynSDPBLoss(VOCAB, teacher="previous_epoch")
    with pytest.raises(ValueError, match="record_policy must be 'all'"):
        DynSDPBLoss(VOCAB, teacher="previous_visit", record_policy="new")


@pytest.mark.parametrize("backend", BACKENDS)
def test_set_alpha_schedules_the_distillation_weight(backend):
    """set_alpha(a) makes the next calls distill with weight a (PS-KD's ramp over epochs): each visit's loss
    equals the float64 truth at that alpha with the previous visit's logits as teachers; a bad alpha is
    refused by name and changes nothing."""
    module = DynSDPBLoss(VOCAB, teacher="previous_visit", teacher_storage="dense", teacher_dtype=torch.float32,
                         backend=backend, **OPTIONS)  # fmt: skip
    generator = torch.Generator().manual_seed(3)
    ids = [0, 1, 2]
    previous, _ = _batch(ids, generator)
    module(previous, _, torch.tensor(ids))  # the first visit: recorded, no teachers
    for alpha in (0.0, 0.5, 1.5):
        module.set_alpha(alpha)
        logits, labels = _batch(ids, generator)
        loss = module(logits, labels, torch.tensor(ids))
        assert int(module.last_stats.teacher_samples) == 3
        truth = truth_dynsdpb(logits, labels, previous, labels != IGNORE, alpha=alpha, tau=OPTIONS["tau"], dynamic=False)
        torch.testing.assert_close(loss.double(), truth["loss"], rtol=2e-5, atol=2e-6)
        previous = logits
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="alpha must be a finite number >= 0"):
            module.set_alpha(bad)
        assert module.options.distill.alpha == 1.5
