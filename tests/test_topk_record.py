"""The top-k ring record (RowRecord.topk) on every backend against a float64 truth: the k largest (capped)
logits of each recorded row, their ids and the tail mass m = 1 - sum_topk softmax(z / tau_rec) at the
temperature the loss gives the row when it teaches (tau_rec from the row's own d), written by the C++
kernel in its pass over the row and by loss.write_topk_record (sync-free) for the other backends."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import BACKENDS
from torch.utils._python_dispatch import TorchDispatchMode

from dynsdpb_kernels import DistillConfig, LossOptions, fused_loss
from dynsdpb_kernels.contract import RowRecord, TopkRecord

TAU = 2.5
TAIL_CEILING = 1.0 - 1e-6


def record_topk(backend, logits, slots, k, ring_dtype=torch.float32, softcap=None, dynamic=True, compute_grad=True,
                inplace=False, teacher=None):
    """fused_loss with a top-k record of `logits` (N, V) rows into the ring slots `slots` (N,) (-1: not
    recorded); returns the TopkRecord (P = 8 slots, pre-filled with a marker) and the stats."""
    n_slots = 8
    topk = TopkRecord(
        values=torch.full((n_slots, k), 7.0, dtype=ring_dtype),
        support=torch.full((n_slots, k), -5, dtype=torch.int64),
        tail=torch.full((n_slots,), 0.5, dtype=torch.float32),
    )
    stats = torch.zeros(n_slots, 2)
    record = RowRecord(index=slots, ring_logits=None, stats=stats, topk=topk)
    labels = torch.randint(0, logits.shape[1], (logits.shape[0],))
    teacher_rows, teacher_index, teacher_stats = teacher if teacher is not None else (None, None, None)
    options = LossOptions(distill=DistillConfig(tau=TAU, dynamic=dynamic, softcap=softcap), backend=backend,
                          inplace_grad=inplace, validate=False)
    fused_loss(logits, labels, teacher_rows, teacher_index, teacher_stats, options, compute_grad, record=record)
    return topk, stats


def truth_topk(logits, k, softcap=None, dynamic=True):
    """float64: (values (N, k), ids (N, k), tail (N,)) of every row, torch.topk on the capped float64 rows,
    tau_rec = 1 + (tau - 1) d with d = p_(1) - p_(2) of the row (dynamic tau) or tau, and
    m = 1 - sum_topk exp(v / tau_rec - logsumexp(z / tau_rec)) clamped to [0, 1 - 1e-6]."""
    z = logits.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    values, ids = z.topk(k, dim=-1)
    if dynamic:
        top2 = z.topk(2, dim=-1).values
        probs = (top2 - z.logsumexp(-1, keepdim=True)).exp()
        tau_rec = 1 + (TAU - 1) * (probs[:, 0] - probs[:, 1])
    else:
        tau_rec = torch.full((z.shape[0],), TAU, dtype=torch.float64)
    kept = (values / tau_rec[:, None] - (z / tau_rec[:, None]).logsumexp(-1, keepdim=True)).exp().sum(-1)
    return values, ids, (1 - kept).clamp(0, TAIL_CEILING)


def lowest_index_ties(logits, k, softcap=None):
    """The ids the C++ kernel keeps: value descending, ties to the lower index (a stable sort)."""
    z = logits.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return torch.sort(z, dim=-1, descending=True, stable=True).indices[:, :k]


def check_record(topk, stats, logits, slots, k, ring_dtype, softcap=None, dynamic=True, ids_exact=True):
    values, ids, tail = truth_topk(logits, k, softcap, dynamic)
    recorded = [n for n in range(logits.shape[0]) if slots[n] >= 0]
    untouched = sorted(set(range(topk.tail.shape[0])) - {int(slots[n]) for n in recorded})
    for n in recorded:
        slot = int(slots[n])
        # values: the truth rounded once to the ring's dtype (softcap: the kernel's tanh, within a few ulp)
        expected = values[n].to(ring_dtype).double()
        tolerance = dict(rtol=2e-6, atol=2e-6) if softcap is not None and ring_dtype == torch.float32 else dict(rtol=0, atol=0)
        if softcap is not None and ring_dtype != torch.float32:
            tolerance = dict(rtol=8e-3, atol=0)  # a capped value near a rounding boundary may round the other way
        torch.testing.assert_close(topk.values[slot].double(), expected, **tolerance, equal_nan=False)
        if ids_exact:
            assert torch.equal(topk.support[slot], ids[n]), (n, topk.support[slot], ids[n])
        else:  # ties: distinct ids that hold the recorded values
            assert topk.support[slot].unique().numel() == k
            z = logits[n].double() if softcap is None else softcap * torch.tanh(logits[n].double() / softcap)
            torch.testing.assert_close(z[topk.support[slot]].to(ring_dtype).double(), expected, rtol=0, atol=0)
        torch.testing.assert_close(topk.tail[slot].double(), tail[n], rtol=1e-4, atol=1e-5)
        assert (stats[slot] != 0).any()  # the kernel wrote the (u, d) (u is NaN on a row with -inf entries)
    for slot in untouched:  # slots no row records are left alone
        assert (topk.values[slot] == 7.0).all() and (topk.support[slot] == -5).all() and topk.tail[slot] == 0.5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("logits_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic", "fixed"])
@pytest.mark.parametrize("compute_grad", [True, False], ids=["grad", "forward"])
def test_record_matches_truth(backend, logits_dtype, dynamic, compute_grad):
    logits = (torch.randn(7, 300) * 3).to(logits_dtype)
    slots = torch.tensor([3, -1, 0, 5, -1, 1, 7])
    k = 16
    topk, stats = record_topk(backend, logits, slots, k, ring_dtype=torch.bfloat16 if logits_dtype == torch.bfloat16 else torch.float32,
                              dynamic=dynamic, compute_grad=compute_grad)
    # bf16 / fp16 logits hold ties by construction: the ids are checked against the values then
    distinct = all(logits[n].double().unique().numel() == logits.shape[1] for n in range(logits.shape[0]))
    check_record(topk, stats, logits, slots, k, topk.values.dtype, dynamic=dynamic, ids_exact=distinct)


@pytest.mark.parametrize("backend", BACKENDS)
def test_record_while_distilling_in_place(backend):
    """A DLB call: rows read dense teachers and are recorded, with the gradient written over the logits."""
    logits = torch.randn(6, 300) * 2
    original = logits.clone()
    slots = torch.tensor([-1, 2, 4, -1, 6, 0])
    teacher_rows = torch.randn(3, 300) * 2
    teacher = (teacher_rows, torch.tensor([0, 1, 2, 0, -1, 1]), torch.rand(3, 2))
    topk, stats = record_topk(backend, logits, slots, 8, teacher=teacher, inplace=True)
    check_record(topk, stats, original, slots, 8, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softcap", [None, 4.0], ids=["plain", "softcap"])
def test_record_ties_and_infinities(backend, softcap):
    """Ties, -inf entries, a row with fewer than k finite entries, k = V: the values and the tail match the
    truth; the ids are distinct and hold those values, and on the C++ kernel they are the lowest-index ones
    (value descending, ties to the lower index)."""
    vocab, k = 40, 12
    ties = torch.randint(0, 4, (2, vocab)).float()  # many equal values
    infinities = torch.randn(2, vocab)
    infinities[0, ::3] = -math.inf
    infinities[1, 5:] = -math.inf  # 5 finite entries < k
    # softcapping maps a non-finite logit to NaN (contract.py: validate reports it): ties only there
    logits = ties if softcap is not None else torch.cat([ties, infinities])
    slots = torch.tensor([0, 1, 2, 3])[: logits.shape[0]]
    for kept in (k, vocab):
        topk, stats = record_topk(backend, logits, slots, kept, softcap=softcap)
        check_record(topk, stats, logits, slots, kept, torch.float32, softcap=softcap, ids_exact=False)
        if backend in ("cpu", "triton"):  # the kernels that select in their pass over the row
            assert torch.equal(topk.support[: len(slots)], lowest_index_ties(logits, kept, softcap))


@pytest.mark.parametrize("backend", BACKENDS)
def test_record_softcap_matches_truth(backend):
    logits = torch.randn(5, 300) * 20
    slots = torch.tensor([1, -1, 2, 3, 0])
    topk, stats = record_topk(backend, logits, slots, 16, softcap=15.0)
    check_record(topk, stats, logits, slots, 16, torch.float32, softcap=15.0)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_record_is_bitwise_deterministic(backend):
    logits = torch.randn(40, 3000, dtype=torch.bfloat16)
    slots = torch.where(torch.arange(40) % 3 == 0, -1, torch.arange(40) % 8)
    slots[8:] = -1  # distinct slots
    first = record_topk(backend, logits, slots, 64, ring_dtype=torch.bfloat16)[0]
    second = record_topk(backend, logits, slots, 64, ring_dtype=torch.bfloat16)[0]
    for a, b in zip((first.values, first.support, first.tail), (second.values, second.support, second.tail)):
        assert torch.equal(a, b)


class RecordOps(TorchDispatchMode):
    """The aten ops a block of code runs."""

    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.overloadpacket)
        return func(*args, **(kwargs or {}))


def test_record_makes_no_host_synchronisation():
    """The reference backend's top-k record runs neither aten.nonzero nor a tensor-to-scalar read
    (_local_scalar_dense: .item(), .tolist(), bool(tensor)), and a slot 0 written by a recorded row that
    shares its part with unrecorded ones (which write slot 0 as a mask) ends up with that row."""
    logits = torch.randn(6, 200)
    slots = torch.tensor([-1, 0, -1, 2, -1, 1])
    with RecordOps() as recorded:
        topk, stats = record_topk("reference", logits, slots, 8)
    assert torch.ops.aten.nonzero not in recorded.ops
    assert torch.ops.aten._local_scalar_dense not in recorded.ops
    assert torch.ops.aten.topk in recorded.ops  # the mode saw the record being made
    check_record(topk, stats, logits, slots, 8, torch.float32)


def test_triton_records_topk_in_its_kernel(monkeypatch):
    """backends.RECORDS_TOPK holds "triton": fused_loss does not call loss.write_topk_record for it (made to
    raise here) and the kernel's record still matches the truth."""
    from dynsdpb_kernels import loss

    def refuse(*args, **kwargs):
        raise AssertionError("write_topk_record was called for the triton backend")

    monkeypatch.setattr(loss, "write_topk_record", refuse)
    logits = torch.randn(4, 300) * 3
    slots = torch.tensor([2, -1, 0, 1])
    topk, stats = record_topk("triton", logits, slots, 16)
    check_record(topk, stats, logits, slots, 16, torch.float32)
    with pytest.raises(AssertionError, match="write_topk_record"):
        record_topk("reference", logits, slots, 16)  # the patch is live: the other backends do call it


@pytest.mark.parametrize("logits_dtype", [torch.float32, torch.bfloat16], ids=["fp32-logits", "bf16-logits"])
@pytest.mark.parametrize("ring_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("softcap", [None, 6.0], ids=["plain", "softcap"])
def test_triton_record_with_several_blocks_matches_cpu(logits_dtype, ring_dtype, softcap):
    """The Triton kernel's record over several vocabulary blocks (block_v = 32), where lanes hold many of
    the k best (a row rising with the id, a row of 3 distinct values, one lane holding 7 of them: the
    kernel's record passes for "open" lanes, a row of zeros of both signs at the k-th place), equals the
    C++ kernel's in ids (value descending, ties to the lower id, -0 equal to +0) and, bitwise without a
    softcap, in values, and its tail matches the float64 truth; a k above the kernel's block is refused.
    bfloat16 logits without a softcap take the kernel's packed-key path (_packed_key)."""
    from dynsdpb_kernels.cpu_kernel import cpu_fused_rows
    from dynsdpb_kernels.triton_kernel import triton_fused_rows

    torch.manual_seed(0)
    vocab, k, rows = 200, 24, 6
    logits = torch.randn(rows, vocab) * 3
    logits[0] = torch.arange(vocab) * 0.01  # the k best all in the last blocks, several per lane
    logits[1] = torch.randint(0, 3, (vocab,)).float()  # ties everywhere
    logits[4, ::32] += 20.0  # lane 0 holds 7 of the k best: two record passes after pass 1
    logits[5] = torch.where(torch.arange(vocab) % 3 == 0, -0.0, 0.0)  # zeros of both signs,
    logits[5, 150::5] = 1.0  # 10 ones, then the 14 lowest-id zeros whatever their sign
    if softcap is None:  # (softcapping maps -inf to NaN, which validate reports)
        logits[2, 100:] = -math.inf  # -inf entries in every lane
        logits[3, 7:] = -math.inf  # 7 finite < k: the lowest-id -inf entries fill the record
    logits = logits.to(logits_dtype)
    slots = torch.arange(rows)
    config = DistillConfig(tau=TAU, dynamic=True, softcap=softcap)
    labels = torch.randint(0, vocab, (rows,))
    records = []
    for run in (lambda **kw: triton_fused_rows(block_v=32, **kw), cpu_fused_rows):
        topk = TopkRecord(values=torch.full((rows, k), 7.0, dtype=ring_dtype), support=torch.full((rows, k), -5),
                          tail=torch.full((rows,), 0.5))
        record = RowRecord(index=slots, ring_logits=None, stats=torch.zeros(rows, 2), topk=topk)
        run(logits=logits, labels=labels, teacher_rows=None, teacher_index=None, teacher_stats=None, config=config,
            grad_scale=torch.ones(2), compute_grad=True, record=record)
        records.append(topk)
    triton_record, cpu_record = records
    assert torch.equal(triton_record.support, cpu_record.support)
    if softcap is None:
        assert torch.equal(triton_record.values, cpu_record.values)
    else:  # the kernels' tanh differ by a few ulp (check_record's tolerances)
        tolerance = dict(rtol=2e-6, atol=2e-6) if ring_dtype == torch.float32 else dict(rtol=8e-3, atol=0)
        torch.testing.assert_close(triton_record.values, cpu_record.values, **tolerance)
    assert torch.equal(triton_record.support, lowest_index_ties(logits, k, softcap))
    _, _, tail = truth_topk(logits, k, softcap)
    torch.testing.assert_close(triton_record.tail.double(), tail, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="record.topk"):  # k above the kernel's block: refused, nothing written
        triton_fused_rows(logits=logits, labels=labels, teacher_rows=None, teacher_index=None, teacher_stats=None,
                          config=config, grad_scale=torch.ones(2), compute_grad=True, record=record, block_v=16)


def test_triton_packed_record_refuses_more_blocks_than_its_16_bit_index():
    """bfloat16 logits (the packed-key record: a 16-bit block index) over more than 65535 blocks are refused
    with a ValueError naming record.topk before anything is written (the record keeps its marker values)."""
    from dynsdpb_kernels.triton_kernel import triton_fused_rows

    topk = TopkRecord(torch.full((1, 4), 7.0, dtype=torch.bfloat16), torch.full((1, 4), -5), torch.full((1,), 0.5))
    record = RowRecord(index=torch.tensor([0]), ring_logits=None, stats=torch.zeros(1, 2), topk=topk)
    logits = torch.zeros(1, 4 * 65535 + 1, dtype=torch.bfloat16)  # 65536 blocks of 4
    with pytest.raises(ValueError, match="record.topk.*65535 blocks"):
        triton_fused_rows(logits=logits, labels=torch.zeros(1, dtype=torch.long), teacher_rows=None, teacher_index=None,
                          teacher_stats=None, config=DistillConfig(tau=TAU), grad_scale=torch.ones(2), compute_grad=False,
                          record=record, block_v=4)
    assert (topk.values == 7.0).all() and (topk.support == -5).all() and (topk.tail == 0.5).all()
