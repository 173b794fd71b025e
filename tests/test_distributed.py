"""DynSDPB under torch.distributed: 2 processes, gloo on the CPU, DDP over a tiny LLaMA.

Checked: each rank's teachers are exactly its own previous batch's new samples, and every rank's loss,
cross-entropy and distillation term at every step equal a single-process run that replays both ranks'
streams on one model (the DDP gradient is the mean of the ranks' gradients). The LLaMA's logits are peaked
and the loss is DLB's (dynamic=False, alpha=1): each step with teachers has a distillation term of tens of
percents of its loss, so a replay without teachers fails.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

transformers = pytest.importorskip("transformers")

from helpers_models import StepStats, assert_distillation_visible, assert_steps_match, peaked_tiny_llama  # noqa: E402

from dynsdpb_kernels import DynSDPBLoss, OverlapBatchSampler  # noqa: E402
from dynsdpb_kernels.tools.finetune import pad_batch  # noqa: E402

WORLD, STEPS, BATCH, VOCAB, N_SAMPLES = 2, 6, 3, 300, 40
LR = 0.5
LOSS_OPTIONS = dict(capacity_rows=128, tau=2.0, dynamic=False, backend="cpu")  # DLB: alpha_r = 1, tau_r = 2


def make_dataset():
    gen = torch.Generator().manual_seed(0)
    items = []
    for _ in range(N_SAMPLES):
        length = int(torch.randint(5, 11, (1,), generator=gen))
        ids = torch.randint(3, VOCAB, (length,), generator=gen)
        items.append({"input_ids": ids, "labels": ids.clone()})
    return items


def make_model():
    return peaked_tiny_llama(VOCAB, seed=0, hidden_size=32, layers=1)


def rank_batches(rank):
    sampler = OverlapBatchSampler(N_SAMPLES, BATCH, seed=1, num_replicas=WORLD, rank=rank)
    return [batch for _, batch in zip(range(STEPS), sampler)]


def step_loss(model, loss_fn, dataset, indices):
    batch = pad_batch([dataset[i] for i in indices], pad_id=0)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return loss_fn(logits, batch["labels"], torch.tensor(indices))


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        dataset = make_dataset()
        model = torch.nn.parallel.DistributedDataParallel(make_model())
        optimizer = torch.optim.SGD(model.parameters(), lr=LR)
        loss_fn = DynSDPBLoss(VOCAB, **LOSS_OPTIONS)
        record = {"steps": [], "batches": rank_batches(rank)}
        for indices in record["batches"]:
            loss = step_loss(model, loss_fn, dataset, indices)
            optimizer.zero_grad()
            loss.backward()  # DDP averages the gradients over the ranks
            optimizer.step()
            record["steps"].append(StepStats.of(loss, loss_fn))
        write_record(out_dir, rank, record)
        dist.barrier()  # both ranks are done with every collective before either tears gloo down
    finally:
        dist.destroy_process_group()
    # reached only when the worker succeeded (its record is written and closed): skip the interpreter's
    # teardown, where gloo's threads were seen to hang a rank after its peer had exited (a flake of CI)
    os._exit(0)


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_record(out_dir: str, rank: int, record: dict) -> None:
    """A worker's record (its batches and its steps' StepStats) for read_records."""
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
        json.dump({**record, "steps": [dataclasses.asdict(step) for step in record["steps"]]}, handle)


def read_records(out_dir) -> list[dict]:
    """Each rank's record: its batches and its steps' StepStats; the teachers of each rank checked to be
    BATCH samples (its previous batch's new ones) after the first step, with a visible distillation term."""
    records = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for record in records:
        record["steps"] = [StepStats(**step) for step in record["steps"]]
        assert [step.teacher_samples for step in record["steps"]] == [0] + [BATCH] * (STEPS - 1)
        assert_distillation_visible(record["steps"])
    return records


def test_ddp_two_ranks_match_a_single_process_replay(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    records = read_records(tmp_path)

    # each rank's teachers are its own previous batch's new samples
    for record in records:
        for previous, current in zip(record["batches"], record["batches"][1:]):
            assert current[:BATCH] == previous[-BATCH:]
    assert not {i for b in records[0]["batches"] for i in b} & {i for b in records[1]["batches"] for i in b}

    # single process: one model, one ring per rank stream, gradient = mean of the two ranks' gradients
    dataset = make_dataset()
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    loss_fns = [DynSDPBLoss(VOCAB, **LOSS_OPTIONS) for _ in range(WORLD)]
    for step in range(STEPS):
        losses = [step_loss(model, loss_fns[r], dataset, records[r]["batches"][step]) for r in range(WORLD)]
        replayed = [StepStats.of(losses[r], loss_fns[r]) for r in range(WORLD)]
        optimizer.zero_grad()
        (sum(losses) / WORLD).backward()
        optimizer.step()
        assert_steps_match(replayed, [records[r]["steps"][step] for r in range(WORLD)], label=f"step {step}, rank")
