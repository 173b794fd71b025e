"""`dynsdpb bench-ring`: a DLB step with a dense and with a top-k teacher ring, side by side.

One case = a DynSDPBLoss(V, teacher_storage=dense | topk, topk=k) (the default growing ring) after a first call
on the first S/2 new samples (DLB's first batch), then two DLB calls (forward + backward) of S samples x T
tokens each: samples 0..S-1 and S/2..3S/2-1, the previous step's S/2 new samples taught by the ring and S/2 new. The two storages are timed interleaved
(dense, top-k, dense, ...) in one process, so that a loaded or throttled machine slows both alike; the
table gives the median seconds per two calls, the top-k / dense ratio, and the ring's bytes against the
bytes of the teachers the next step reads (the rows of the last call's new samples, T - 1 each with shifted
labels, in the smallest ring of the same format that holds them: rows, statistics, entry table, head).
"""

from __future__ import annotations

import statistics
import time

import torch

from .benchmark import DTYPES, machine_name


def dlb_setup(
    vocab_size: int, storage: str, dtype: torch.dtype, device: str, samples: int = 8, tokens: int = 256, topk: int = 64,
    capacity_rows: int | None = None,
):
    """(loss_fn, calls): a DynSDPBLoss with a `storage` ring after a first call on samples 0..samples/2-1, and
    the (logits, labels, sample_ids) of the two DLB calls that follow (samples/2 taught, samples/2 new each)."""
    from ..module import DynSDPBLoss

    loss_fn = DynSDPBLoss(vocab_size, capacity_rows=capacity_rows, teacher_storage=storage, topk=topk, validate=False).to(device)
    loss_fn.train()

    def call(first: int, count: int = samples):
        logits = torch.randn(count, tokens, vocab_size, device=device).to(dtype).requires_grad_(True)
        labels = torch.randint(0, vocab_size, (count, tokens), device=device)
        return logits, labels, torch.arange(first, first + count, device=device)

    half = samples // 2
    dlb_calls(loss_fn, [call(0, half)])
    return loss_fn, [call(0), call(half)]


def dlb_calls(loss_fn, calls) -> float:
    """Forward + backward of each (logits, labels, sample_ids) in `calls`; the last loss."""
    loss = torch.zeros(())
    for logits, labels, sample_ids in calls:
        loss = loss_fn(logits, labels, sample_ids=sample_ids)
        loss.backward()
    if loss.device.type == "cuda":
        torch.cuda.synchronize()
    return float(loss.detach())


def next_step_teacher_bytes(loss_fn, rows: int) -> int:
    """Bytes of the smallest ring of this ring's format that holds `rows` teacher rows, which is what the
    next step reads: one row of each row-indexed tensor (values, top-k ids and tail, float32 statistics),
    one entry-table slot a row (its (id, start, length)) and the head, read off the allocated ring
    (tests/test_ring_floor.py counts the same)."""
    ring = loss_fn.ring
    row_tensors = (ring.logits, ring.support, ring.tail, ring.stats, ring._ids, ring._start, ring._length)
    per_row = sum(t[0].numel() * t.element_size() for t in row_tensors if t is not None)
    return rows * per_row + ring._head.numel() * ring._head.element_size()


def run_ring_bench(vocab_sizes: list[int], dtypes: list[str], device: str, repeats: int, samples: int = 8, tokens: int = 256) -> list[dict]:
    """Print and return one row per (V, dtype): dense and top-k medians, their ratio, and ring bytes."""
    print(f"dynsdpb bench-ring: {machine_name(device)}, ISA {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d')}; two DLB calls of {samples} x {tokens} rows, fwd+bwd, median of {repeats}")  # fmt: skip
    print(f"{'V':>7} {'dtype':>9} {'dense s':>8} {'top-k s':>8} {'top-k/dense':>11} {'dense ring/next':>15} {'top-k ring/next':>15}")
    rows = []
    for vocab_size in vocab_sizes:
        for dtype in dtypes:
            seconds = {"dense": [], "topk": []}
            ratio_bytes = {}
            for _ in range(repeats):
                for storage in ("dense", "topk"):
                    torch.manual_seed(0)
                    loss_fn, calls = dlb_setup(vocab_size, storage, DTYPES[dtype], device, samples, tokens)
                    started = time.perf_counter()
                    dlb_calls(loss_fn, calls)
                    seconds[storage].append(time.perf_counter() - started)
                    ratio_bytes[storage] = loss_fn.ring.nbytes / next_step_teacher_bytes(loss_fn, samples // 2 * (tokens - 1))
            dense, topk = statistics.median(seconds["dense"]), statistics.median(seconds["topk"])
            row = {"vocab_size": vocab_size, "dtype": dtype, "dense_s": dense, "topk_s": topk, "ratio": topk / dense,
                   "dense_ring_over_next": ratio_bytes["dense"], "topk_ring_over_next": ratio_bytes["topk"]}  # fmt: skip
            rows.append(row)
            print(f"{vocab_size:>7} {dtype:>9} {dense:>8.3f} {topk:>8.3f} {row['ratio']:>11.3f} {row['dense_ring_over_next']:>15.2f} {row['topk_ring_over_next']:>15.2f}")
    return rows
