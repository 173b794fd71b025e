"""Batch orders with sample ids: DLB's overlap order (OverlapBatchSampler), and plain epochs over a fixed
per-rank shard (VisitBatchSampler, for teachers from a sample's previous visit).

DLB batch order: each batch is the previous step's new samples followed by new ones.

    step 0: [c0]        step 1: [c0, c1]        step 2: [c1, c2]   ...

where c_k is the k-th chunk of `batch_size` new samples of a shuffled epoch. The chunk carried into the first
batch of an epoch is the last chunk of the previous epoch (as in DLB's reference code); samples of that
chunk are moved out of the new epoch's first chunk so that no batch holds a sample twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler, default_collate

from .checks import check_positive_int


def _check_stream(batch_size: int, num_replicas: int, rank: int) -> None:
    check_positive_int("batch_size", batch_size)
    check_positive_int("num_replicas", num_replicas)
    if not isinstance(rank, int) or not 0 <= rank < num_replicas:
        raise ValueError(f"rank must be an int in [0, {num_replicas}), got {rank!r}")


def _epoch_permutation(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled order of 0 .. n-1 in `epoch`: a pure function of (seed, epoch)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


class OverlapBatchSampler(Sampler[list[int]]):
    """Batch sampler of DLB / DynSDPB: previous new samples + `batch_size` new samples per batch.

    Args:
        data_len_or_sampler: dataset length (indices 0..n-1, shuffled per epoch with `seed` when
            `shuffle`), or a Sampler giving the order of each epoch (its set_epoch is forwarded).
        batch_size: new samples per batch; batches after the first hold up to 2 * batch_size.
        drop_last: drop an epoch's last chunk when it is smaller than batch_size.
        shuffle, seed: the per-epoch permutation is torch.randperm with generator seed (seed, epoch).
        num_replicas, rank: distributed training; rank r takes positions r, r + R, ... of each epoch's
            order (the remainder n mod R is left out that epoch), so ranks get disjoint streams and a
            rank's teachers always come from its own previous batch.

    Each iteration runs the current epoch and then advances to the next; set_epoch(e) sets it
    explicitly (as a training loop or the Hugging Face Trainer does). With an integer length the
    stream is a pure function of (seed, epoch), so a resumed run sees the same batches.
    """

    def __init__(
        self,
        data_len_or_sampler: int | Sampler,
        batch_size: int,
        *,
        drop_last: bool = False,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        _check_stream(batch_size, num_replicas, rank)
        if isinstance(data_len_or_sampler, int) and not isinstance(data_len_or_sampler, bool):
            self.source: int | Sampler = data_len_or_sampler
            total = data_len_or_sampler
        elif isinstance(data_len_or_sampler, Sampler) and hasattr(data_len_or_sampler, "__len__"):
            self.source = data_len_or_sampler
            total = len(data_len_or_sampler)
        else:
            raise TypeError(f"data_len_or_sampler must be an int or a Sampler with a length, got {type(data_len_or_sampler).__name__}")
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.shuffle = shuffle
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.samples_per_rank = total // num_replicas
        if self.samples_per_rank < 2 * batch_size:
            raise ValueError(
                f"each rank needs at least 2 * batch_size = {2 * batch_size} samples per epoch so that a batch never "
                f"holds a sample twice; got {self.samples_per_rank} ({total} samples over {num_replicas} replicas)"
            )
        self.epoch = 0
        self._orders: dict[int, list[int]] = {}
        self._carried: list[int] = []  # with a Sampler source: last chunk of the previous iteration

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        full, rest = divmod(self.samples_per_rank, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def _chunks(self, order: list[int]) -> list[list[int]]:
        return [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)][: len(self)]

    def _rank_order(self, order: Sequence[int]) -> list[int]:
        used = self.samples_per_rank * self.num_replicas
        return list(order[:used][self.rank :: self.num_replicas])

    def _separate(self, order: list[int], carried: list[int]) -> list[int]:
        """Swap samples of the carried chunk out of the first chunk (with the next samples that are not)."""
        carried_set = set(carried)
        order = list(order)
        replacement = self.batch_size
        for position in range(min(self.batch_size, len(order))):
            if order[position] in carried_set:
                while order[replacement] in carried_set:
                    replacement += 1
                order[position], order[replacement] = order[replacement], order[position]
                replacement += 1
        return order

    def _epoch_order(self, epoch: int) -> list[int]:
        """This rank's order of `epoch` (integer source), after separating it from the carried chunk."""
        start = max((e for e in self._orders if e <= epoch), default=0)
        for e in range(start, epoch + 1):
            if e in self._orders:
                continue
            if self.shuffle:
                order = _epoch_permutation(int(self.source), self.seed, e)
            else:
                order = list(range(int(self.source)))
            carried = self._chunks(self._orders[e - 1])[-1] if e > 0 else []
            self._orders[e] = self._separate(self._rank_order(order), carried)
        for old in [e for e in self._orders if e < epoch - 1]:
            del self._orders[old]
        return self._orders[epoch]

    def __iter__(self) -> Iterator[list[int]]:
        epoch = self.epoch
        self.epoch += 1
        if isinstance(self.source, int):
            carried = self._chunks(self._epoch_order(epoch - 1))[-1] if epoch > 0 else []
            chunks = self._chunks(self._epoch_order(epoch))
        else:
            if hasattr(self.source, "set_epoch"):
                self.source.set_epoch(epoch)
            carried = self._carried
            chunks = self._chunks(self._separate(self._rank_order(list(self.source)), carried))
            self._carried = chunks[-1] if chunks else []
        previous = carried
        for chunk in chunks:
            yield previous + chunk
            previous = chunk


class VisitBatchSampler(Sampler[list[int]]):
    """Plain batches of `batch_size` samples, each sample once per epoch, for last-visit teachers
    (DynSDPBLoss(teacher="previous_visit")): a sample is taught by its own logits from its previous
    visit, one epoch earlier, so no sample is run twice in a step.

    Under distributed training a sample must come back to the rank that holds its teacher, so the shards
    are fixed: rank r owns the ids r, r + R, r + 2R, ... < n - (n mod R) (every rank the same number of
    samples, so all ranks take the same steps; the last n mod R ids are never trained), for every epoch;
    only the order within a shard changes, torch.randperm with generator seed (seed, epoch). With drop_last
    the same samples are left out every epoch (the shard's last len(shard) mod batch_size), so every sample
    trained is visited once per epoch, as the last-visit ring assumes.
    (A DistributedSampler reshuffles the whole dataset across ranks each epoch: a sample's teacher would
    then be on another rank's ring.)

    Args:
        data_len: n, the dataset length (ids 0 .. n-1).
        batch_size: samples per batch.
        drop_last: drop an epoch's last batch when it is smaller than batch_size.
        shuffle, seed: per-epoch shuffle of the shard.
        num_replicas, rank: the rank's fixed shard.
    Each iteration runs the current epoch and advances to the next; set_epoch(e) sets it explicitly.
    The stream is a pure function of (seed, epoch, rank), so a resumed run sees the same batches.
    """

    def __init__(
        self,
        data_len: int,
        batch_size: int,
        *,
        drop_last: bool = False,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        check_positive_int("data_len", data_len)
        _check_stream(batch_size, num_replicas, rank)
        if data_len < num_replicas:
            raise ValueError(f"data_len must be at least num_replicas = {num_replicas} (a sample per rank), got {data_len}")
        self.data_len = data_len
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.shuffle = shuffle
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.shard = list(range(rank, data_len - data_len % num_replicas, num_replicas))
        if drop_last:
            self.shard = self.shard[: len(self.shard) // batch_size * batch_size]
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-len(self.shard) // self.batch_size)

    def epoch_order(self, epoch: int) -> list[int]:
        """The rank's sample ids in the order of `epoch`."""
        if not self.shuffle:
            return list(self.shard)
        return [self.shard[i] for i in _epoch_permutation(len(self.shard), self.seed, epoch)]

    def __iter__(self) -> Iterator[list[int]]:
        order = self.epoch_order(self.epoch)
        self.epoch += 1
        for i in range(len(self)):
            yield order[i * self.batch_size : (i + 1) * self.batch_size]


class SampleIdDataset(Dataset):
    """Wraps a map-style dataset so that each item carries its index: a Mapping item gets a
    "sample_id" key (a copy; the dataset's own item is not modified), any other item becomes (index, item)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        item = self.dataset[index]
        if isinstance(item, Mapping):
            return {**item, "sample_id": int(index)}
        return int(index), item


class SampleIdCollator:
    """Collate function that takes the sample ids out of SampleIdDataset items, collates the rest with
    `collate_fn` (default_collate, or e.g. a Hugging Face data collator) and returns them as an int64
    tensor: batch["sample_ids"] for Mapping items, (sample_ids, batch) otherwise. The ids stay on the CPU."""

    def __init__(self, collate_fn: Callable[[list], Any] | None = None) -> None:
        self.collate_fn = collate_fn or default_collate

    def __call__(self, items: list) -> Any:
        if items and isinstance(items[0], Mapping):
            ids = torch.tensor([item["sample_id"] for item in items], dtype=torch.int64)
            batch = self.collate_fn([{k: v for k, v in item.items() if k != "sample_id"} for item in items])
            batch["sample_ids"] = ids
            return batch
        ids = torch.tensor([index for index, _ in items], dtype=torch.int64)
        return ids, self.collate_fn([item for _, item in items])
