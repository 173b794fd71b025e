"""OverlapBatchSampler and the sample-id dataset / collator."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, SequentialSampler

from dynsdpb_kernels import OverlapBatchSampler, SampleIdCollator, SampleIdDataset


def _epochs(sampler, n_epochs):
    out = []
    for epoch in range(n_epochs):
        sampler.set_epoch(epoch)
        out.append(list(sampler))
    return out


@pytest.mark.parametrize(("n", "batch_size", "drop_last"), [(10, 3, False), (10, 3, True), (12, 4, False), (7, 2, False)])
def test_overlap_structure_over_epochs(n, batch_size, drop_last):
    sampler = OverlapBatchSampler(n, batch_size, drop_last=drop_last, seed=3)
    epochs = _epochs(sampler, 4)
    previous_new: list[int] = []
    for epoch in epochs:
        assert len(epoch) == len(sampler)
        new_this_epoch = []
        for batch in epoch:
            assert batch[: len(previous_new)] == previous_new  # the previous step's new samples come first
            new = batch[len(previous_new) :]
            assert 1 <= len(new) <= batch_size
            assert len(set(batch)) == len(batch)  # never a sample twice in one batch
            new_this_epoch += new
            previous_new = new
        if drop_last:
            assert len(new_this_epoch) == n // batch_size * batch_size
            assert len(set(new_this_epoch)) == len(new_this_epoch)
        else:
            assert sorted(new_this_epoch) == list(range(n))  # every sample is new exactly once per epoch
    assert epochs[0] != epochs[1]  # reshuffled


def test_first_batch_has_only_new_samples_and_epoch_carry():
    sampler = OverlapBatchSampler(9, 3, shuffle=False)
    first, second = _epochs(sampler, 2)
    assert first == [[0, 1, 2], [0, 1, 2, 3, 4, 5], [3, 4, 5, 6, 7, 8]]
    assert second[0][:3] == [6, 7, 8]  # the last chunk of epoch 0 is carried into epoch 1
    assert not set(second[0][3:]) & {6, 7, 8}


def test_stream_is_a_function_of_seed_and_epoch():
    a = OverlapBatchSampler(50, 4, seed=11)
    b = OverlapBatchSampler(50, 4, seed=11)
    a_epochs = _epochs(a, 3)
    b.set_epoch(2)  # a resumed run jumps straight to epoch 2
    assert list(b) == a_epochs[2]
    assert _epochs(OverlapBatchSampler(50, 4, seed=12), 1)[0] != a_epochs[0]


def test_iteration_advances_the_epoch_without_set_epoch():
    sampler = OverlapBatchSampler(20, 4, seed=0)
    first, second = list(sampler), list(sampler)
    reference = _epochs(OverlapBatchSampler(20, 4, seed=0), 2)
    assert [first, second] == reference


@pytest.mark.parametrize("replicas", [2, 3])
def test_ranks_get_disjoint_streams(replicas):
    n, batch_size = 31, 2
    per_rank = [_epochs(OverlapBatchSampler(n, batch_size, seed=5, num_replicas=replicas, rank=r), 2) for r in range(replicas)]
    for epoch in range(2):
        seen = [set(i for batch in per_rank[r][epoch] for i in batch[-batch_size:]) for r in range(replicas)]
        for r in range(replicas):
            for q in range(r + 1, replicas):
                assert not seen[r] & seen[q]
        assert len({len(per_rank[r][epoch]) for r in range(replicas)}) == 1  # ranks step in lockstep


def test_sampler_source_and_bad_arguments():
    sampler = OverlapBatchSampler(SequentialSampler(range(6)), 2)
    assert list(sampler) == [[0, 1], [0, 1, 2, 3], [2, 3, 4, 5]]
    assert list(sampler)[0] == [4, 5, 0, 1]  # carried from the previous iteration
    with pytest.raises(ValueError, match="batch_size"):
        OverlapBatchSampler(10, 0)
    with pytest.raises(ValueError, match="2 \\* batch_size"):
        OverlapBatchSampler(5, 3)
    with pytest.raises(ValueError, match="rank"):
        OverlapBatchSampler(10, 2, num_replicas=2, rank=2)
    with pytest.raises(TypeError, match="data_len_or_sampler"):
        OverlapBatchSampler("ten", 2)


def test_dataloader_passes_sample_ids_without_touching_items():
    items = [{"input_ids": torch.tensor([i, i + 1]), "labels": torch.tensor([i, -100])} for i in range(8)]
    dataset = SampleIdDataset(items)
    loader = DataLoader(dataset, batch_sampler=OverlapBatchSampler(len(items), 2, seed=1), collate_fn=SampleIdCollator())
    for batch in loader:
        assert batch["sample_ids"].dtype == torch.int64
        assert torch.equal(batch["input_ids"][:, 0], batch["sample_ids"])
    assert "sample_id" not in items[0]
    pairs = DataLoader(SampleIdDataset([torch.tensor(float(i)) for i in range(4)]), batch_size=2, collate_fn=SampleIdCollator())
    ids, values = next(iter(pairs))
    assert ids.tolist() == [0, 1] and values.tolist() == [0.0, 1.0]


@pytest.mark.parametrize(("n", "batch_size", "replicas", "drop_last"), [(10, 3, 1, False), (10, 3, 1, True), (11, 2, 3, False), (11, 2, 3, True), (10, 1, 3, False), (9, 4, 2, False)])
def test_visit_sampler_keeps_each_sample_on_its_rank(n, batch_size, replicas, drop_last):
    """Every epoch, each rank sees exactly its fixed shard (once each), reshuffled; the ranks' shards are
    disjoint and cover the dataset, so a sample always comes back to the ring that holds its teacher."""
    from dynsdpb_kernels import VisitBatchSampler

    shards, lengths = [], []
    for rank in range(replicas):
        sampler = VisitBatchSampler(n, batch_size, drop_last=drop_last, seed=5, num_replicas=replicas, rank=rank)
        epochs = _epochs(sampler, 3)
        shard = set(range(rank, n - n % replicas, replicas))
        lengths.append(len(sampler))
        for epoch in epochs:
            assert len(epoch) == len(sampler)
            seen = [i for batch in epoch for i in batch]
            assert len(seen) == len(set(seen))
            assert all(1 <= len(b) <= batch_size for b in epoch)
            if drop_last:  # the same samples left out every epoch
                assert set(seen) <= shard and len(seen) == len(shard) // batch_size * batch_size
                assert set(seen) == {i for b in epochs[0] for i in b}
            else:
                assert set(seen) == shard
        assert epochs[0] != epochs[1] or len(shard) == 1  # reshuffled within the shard
        again = VisitBatchSampler(n, batch_size, drop_last=drop_last, seed=5, num_replicas=replicas, rank=rank)
        assert _epochs(again, 3) == epochs  # a pure function of (seed, epoch, rank): resume sees the same
        shards.append(shard)
    assert set().union(*shards) == set(range(n - n % replicas)) and sum(map(len, shards)) == n - n % replicas
    assert len(set(lengths)) == 1, lengths  # every rank takes the same steps (DDP's all-reduce pairs them)


def test_visit_sampler_rejects_bad_arguments():
    from dynsdpb_kernels import VisitBatchSampler

    with pytest.raises(ValueError, match="batch_size"):
        VisitBatchSampler(10, 0)
    with pytest.raises(ValueError, match="rank"):
        VisitBatchSampler(10, 2, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="data_len"):
        VisitBatchSampler(1, 2, num_replicas=2, rank=0)
