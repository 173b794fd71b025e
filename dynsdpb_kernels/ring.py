"""TeacherRing: the previous step's logits of each sample, kept on the logits' device for the next step.

Layout. `rows` (P, V) and `stats` (P, 4) are preallocated (stats: (u, d, tau_rec, log_norm), the row's
log-normaliser at the temperature it will teach at, which spares the next step's kernel a read of the
teacher row in its first pass: contract.py, "Stored log-normalisers"; NaN where unknown; (P, 2) (u, d)
with top-k storage, whose teachers need no such normaliser). Rows are written in FIFO order; each written
row gets an absolute position a = 0, 1, 2, ... (`head` counts the rows written so far) and lives in slot
a % P. A sample's entry is (start, length): its valid rows, packed in order, at positions start ..
start + length - 1. An entry is live while it lies within the last `capacity_rows` (C) positions:

    live  <=>  start >= 0  and  start >= head - C

P = C + reserve: the reserve (at least the rows the largest call can record) is where one call writes.
A call writes positions head .. head + W - 1 with W <= reserve, and live entries occupy head - C ..
head - 1, so a write never touches a live entry, whatever the call reads as teachers in the same kernel
launch; and a call that fails before `commit` leaves every live entry as it was.

Rows a call can record (its bound W_max, on the host, no sync). "none": 0; "all": r * B; "new":
r * (the samples not recorded for sure by the previous recording call), with r the host's bound on a
sample's valid rows (T, or T - 1 when the modules shift the labels). The host mirror: `_recorded`, the
ids the previous call recorded whatever the device found (they had no possible entry), and
`_possible`, a superset of the ids with a live entry (None past MIRROR_LIMIT ids: any id). A sample
in `_recorded` is live at this call (C >= the previous call's rows), so it is taught, or consumed
without teaching when its length differs; it is never recorded by this call, and the device enforces
that (as it enforces r), so W <= W_max holds whatever the mirror says. Under DLB the samples recorded
for sure are the previous call's new ones, so W_max = r * B_new and P = 2 * r * B_new: the rows being
read and the rows being written, twice the teachers one step needs. The mirror is staged by `lookup`,
installed by `commit`, and saved in the state_dict (an earlier state_dict: nothing recorded for sure,
the live ids possible, so its first call is sized by all its samples).

Capacity. With grow_capacity=True (what DynSDPBLoss does when capacity_rows is not given) a call whose
W_max exceeds C raises C to it; with W_max above the reserve, the reserve grows the same way. Either
way `lookup` stages a larger layout (new tensors, every live row copied to its slot under the new P,
the entry table padded with free slots) and `commit` installs it, so a call that fails leaves the ring
exactly as it was, tensors included. A call records at most W_max <= C rows, so the entries it records
are all still live at the next call: the previous step's samples (DLB's teachers) are never evicted.
With a fixed capacity (grow_capacity=False) only the reserve follows W_max; a call that records more
than C rows evicts some of its own entries before the next call can read them; the ring then warns
once (RuntimeWarning naming capacity_rows).

Last-visit teachers (keep_visits=True, with grow_capacity; DynSDPBLoss(teacher="previous_visit")). Every
visit of a sample records it and the next visit, an epoch later, reads it. With each sample visited once
per epoch, fewer than 2 * S positions are written between two visits of one sample, S the rows of all
samples (the rest of one epoch, the start of the next), so C >= 2 * S keeps every entry live until its
next visit. The ring bounds S on the host, with no sync: a sample seen for the first time in a call of
(B, T) rows adds T (>= its valid rows); the ids seen and the bound travel in the state_dict. A growing
ring doubles C when 2 S passes it (so the first epoch reallocates O(log S) times); a fixed one warns.

Entry table. Every live entry holds at least one row and the live rows are C distinct positions, so at
most C entries are live. The table is three (C,) int64 tensors on the ring's device, sorted by sample id:
`_ids`, `_start`, `_length`; its live entries come first, the free tail holds id 2^63 - 1 and start -1.
A lookup is a `torch.searchsorted` of the batch's ids; a commit merges the batch's new entries into the
live ones, drops the consumed and evicted ones and sorts again (C + B keys). Memory is bounded by the
capacity, whatever the magnitude of the sample ids (any int64 >= 0), and nothing syncs with the host.

Storage. "dense" keeps whole rows (P, V). "topk" keeps the k largest logits of each row (P, k) and their
vocabulary ids `support` (P, k), with (u, d) still computed on the full row; the kernel then takes the
KL over the teacher's top-k support (contract.py), an approximation of the dense KL at a fraction of the
memory (k * (2 + 8) bytes a row in bfloat16 instead of V * 2).

Matching. Row k of a sample (k-th position whose label is not ignore_index) is taught by row k of its
entry. A sample whose number of valid rows differs from its entry's length gets no teacher; under
record_policy="new" its entry is consumed and it is recorded at its next visit (not by this call). A
sample the previous call recorded with no valid row (no entry) is likewise not recorded by the next.
"""

from __future__ import annotations

import math
import operator
import warnings
from dataclasses import dataclass, replace

import torch

from .checks import check_positive_int
from .contract import N_STATS, N_STATS_WITH_LOG_NORM, RowRecord, Teachers, TopkRecord

RECORD_POLICIES = ("new", "all", "none")
STORAGES = ("dense", "topk")
RING_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
FREE_ID = torch.iinfo(torch.int64).max  # id of a free table slot (sorts after every live id)
MIRROR_LIMIT = 1 << 18  # ids the host mirror tracks as possibly live before it gives up (then: any id may be)


@dataclass(frozen=True)
class RingLookup:
    """What one call reads from and writes to the ring; made by `TeacherRing.lookup`, applied by `commit`.

    teacher_index: (B * T,) int64, slot of the teacher row of each student row, -1 for none.
    record:        contract.RowRecord for the kernel's fused write, or None when nothing is recorded.
    has_teacher:   (B,) bool, the sample's entry was live and its length matched.
    mismatched:    (B,) bool, the sample's entry was live but its length differed (no teacher).
    recorded_rows: 0-d int64, rows this call writes.
    teachers:      contract.Teachers the kernel reads (the layout's storage and teacher_index).
    The rest is the new state of the B samples' entries and of head, applied by commit; table_position
    (B,) is where each id was searched in the entry table and found (B,) whether it had a live entry there;
    layout is the storage the call reads and writes (the ring's own, or a larger one commit installs).
    recorded_for_sure, settled_ids, unsure_ids: the host mirror's update (record_policy="new"): the ids
    this call records whatever the device finds (the next call's host-known live ids; None: unchanged),
    the ids it leaves without an entry for sure, and those that may or may not hold one afterwards.
    """

    teacher_index: torch.Tensor
    record: RowRecord | None
    has_teacher: torch.Tensor
    mismatched: torch.Tensor
    recorded_rows: torch.Tensor
    sample_ids: torch.Tensor
    new_start: torch.Tensor
    new_length: torch.Tensor
    new_head: torch.Tensor
    table_position: torch.Tensor
    found: torch.Tensor
    generation: int
    teachers: Teachers
    layout: RingLayout
    first_visits: tuple[int, ...] = ()
    visit_rows: int = 0
    recorded_for_sure: frozenset[int] | None = None
    settled_ids: tuple[int, ...] = ()
    unsure_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class RingLayout:
    """The storage of a ring at one capacity C and reserve R (P = C + R physical rows).

    logits: (P, V) dense rows or (P, k) top-k values, in the ring's dtype; support (P, k) int64 and
    tail (P,) float32 with top-k storage, else None; stats (P, 4) float32 (u, d, tau_rec, log_norm), (P, 2)
    (u, d) with top-k storage; ids, start, length:
    the (C,) int64 entry table (sorted by id, free slots last).
    """

    capacity_rows: int
    reserve_rows: int
    logits: torch.Tensor
    support: torch.Tensor | None
    tail: torch.Tensor | None
    stats: torch.Tensor
    ids: torch.Tensor
    start: torch.Tensor
    length: torch.Tensor

    @property
    def physical_rows(self) -> int:
        return self.logits.shape[0]


class TeacherRing:
    """FIFO store of teacher logits rows, keyed by sample id.

    Args:
        vocab_size: V, the length of every row.
        capacity_rows: C, how many recently written rows stay readable; older entries are evicted.
        dtype: storage dtype of the rows (bfloat16, float16 or float32); rows are rounded to it
            (nearest even) when recorded. (u, d) statistics are kept in float32.
        device: where the ring lives; None allocates it on the device of the first call (and a ring
            made or restored without a device moves to the device of the first call's logits).
        reserve_rows: rows set aside for one call's writes (default C); grown automatically to the
            rows a larger call can record (W_max, module docstring), which reallocates the ring once.
        storage: "dense" (whole rows) or "topk" (the k largest logits of each row and their ids).
        topk: entries kept per row with storage="topk".
        grow_capacity: False (default): C is fixed; a call that records more than C rows evicts some of
            the entries it recorded before the next call reads them, and the ring warns once
            (RuntimeWarning). True: C starts at capacity_rows and a call that can record more rows
            (W_max) than C raises C to them (one reallocation, every live entry kept), so the entries
            one call records are all live at the next call; load_state_dict then adopts the saved C.
        keep_visits: last-visit teachers (record_policy="all", each sample visited once per epoch): with
            grow_capacity, C grows to keep every sample's entry until its next visit an epoch later,
            C >= 2 * S, S the host-side bound of all samples' rows (module docstring), by doubling
            (2 S <= C < 4 S); with a fixed capacity, a RuntimeWarning once 2 * S exceeds it. Costs a
            host set of the sample ids seen (saved in the state_dict).

    Memory (`nbytes`, exact), with P = C + reserve:
        dense: P * (V * dtype + 16) + 24 * C + 8 bytes
        topk:  P * (k * (dtype + 8) + 4 + 8) + 24 * C + 8 bytes
    (rows; top-k ids and tail mass; (u, d) in float32, with (tau_rec, log_norm) when dense; the entry table of C (id, start, length) int64
    triples; head), independent of how many distinct sample ids were seen and of their magnitude. The
    reserve is the largest W_max so far (the rows a call can record, module docstring) and, with
    grow_capacity, C is too (if larger than their initial values): P = 2 * max(W_max) for a ring
    DynSDPBLoss made, 2 * B_new * (T - 1) under DLB with shifted labels. With keep_visits, C is
    between 2 * S and 4 * S (grown by doubling), S = the sum over the samples seen of T at their first
    visit, and the reserve max(B * T). A state_dict holds the reserve, so a resumed ring has the same P.
    The host mirror of record_policy="new" holds at most MIRROR_LIMIT + B ids (host memory, not nbytes).
    """

    def __init__(
        self,
        vocab_size: int,
        capacity_rows: int,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
        reserve_rows: int | None = None,
        storage: str = "dense",
        topk: int = 64,
        grow_capacity: bool = False,
        keep_visits: bool = False,
    ) -> None:
        if storage not in STORAGES:
            raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
        for name, value in (("vocab_size", vocab_size), ("capacity_rows", capacity_rows), ("topk", topk)):
            check_positive_int(name, value)
        if dtype not in RING_DTYPES:
            raise TypeError(f"dtype must be one of {RING_DTYPES}, got {dtype}")
        if not isinstance(grow_capacity, bool):
            raise TypeError(f"grow_capacity must be a bool, got {type(grow_capacity).__name__}")
        if not isinstance(keep_visits, bool):
            raise TypeError(f"keep_visits must be a bool, got {type(keep_visits).__name__}")
        reserve = capacity_rows if reserve_rows is None else reserve_rows
        check_positive_int("reserve_rows", reserve)
        self.vocab_size = vocab_size
        self.capacity_rows = capacity_rows
        self.grow_capacity = grow_capacity
        self.keep_visits = keep_visits
        self._visited: set[int] = set()  # keep_visits: the ids seen, and the bound S of their rows
        self._visit_rows = 0
        # host mirror (record_policy="new"): ids the last recording call recorded whatever the device found
        # (live at the next call), and a superset of the ids that may hold a live entry (None: any id)
        self._recorded: frozenset[int] = frozenset()
        self._possible: set[int] | None = None if keep_visits else set()  # last-visit rings keep their sizing
        self.storage = storage
        self.topk = min(topk, vocab_size) if storage == "topk" else vocab_size
        self.dtype = dtype
        self.device: torch.device | None = None
        self._follows_first_call = device is None  # a ring made or restored without a device moves to the first call's
        self._reserve = reserve
        self._reserve_follows_capacity = reserve_rows is None  # a loaded growing ring takes reserve = C again
        self._warned_eviction = False
        self._generation = 0  # bumped by every change of state; a stale lookup cannot be committed
        self.logits = torch.empty(0, self.topk, dtype=dtype)  # (P, V) dense, (P, k) top-k values
        self.support: torch.Tensor | None = torch.empty(0, self.topk, dtype=torch.int64) if storage == "topk" else None
        self.tail: torch.Tensor | None = torch.empty(0, dtype=torch.float32) if storage == "topk" else None
        self.stats = torch.empty(0, self.stats_width, dtype=torch.float32)
        self._ids = torch.empty(0, dtype=torch.int64)  # entry table (C,) each, made on the device by _allocate
        self._start = torch.empty(0, dtype=torch.int64)
        self._length = torch.empty(0, dtype=torch.int64)
        self._head = torch.zeros((), dtype=torch.int64)
        if device is not None:
            self._allocate(torch.device(device))

    # -- storage -------------------------------------------------------------------------------

    def _empty_layout(self, capacity_rows: int, reserve_rows: int, device: torch.device) -> RingLayout:
        """Zeroed storage of P = capacity_rows + reserve_rows rows and an empty entry table of capacity_rows."""
        physical = capacity_rows + reserve_rows
        topk = self.support is not None
        return RingLayout(
            capacity_rows=capacity_rows,
            reserve_rows=reserve_rows,
            logits=torch.zeros(physical, self.topk, dtype=self.dtype, device=device),
            support=torch.zeros(physical, self.topk, dtype=torch.int64, device=device) if topk else None,
            tail=torch.zeros(physical, dtype=torch.float32, device=device) if topk else None,
            stats=_empty_stats(physical, self.stats_width, device),
            ids=torch.full((capacity_rows,), FREE_ID, dtype=torch.int64, device=device),
            start=torch.full((capacity_rows,), -1, dtype=torch.int64, device=device),
            length=torch.zeros(capacity_rows, dtype=torch.int64, device=device),
        )

    def _layout(self) -> RingLayout:
        """The ring's current storage (its own tensors, not copies)."""
        return RingLayout(
            self.capacity_rows, self._reserve, self.logits, self.support, self.tail, self.stats,
            self._ids, self._start, self._length,
        )

    def _install(self, layout: RingLayout) -> None:
        self.capacity_rows, self._reserve = layout.capacity_rows, layout.reserve_rows
        self.logits, self.support, self.tail, self.stats = layout.logits, layout.support, layout.tail, layout.stats
        self._ids, self._start, self._length = layout.ids, layout.start, layout.length

    def _allocate(self, device: torch.device) -> None:
        """Fresh zeroed storage and an empty entry table on `device` (head kept)."""
        self.device = device
        self._install(self._empty_layout(self.capacity_rows, self._reserve, device))
        self._head = self._head.to(device)

    def _resized(self, capacity_rows: int, reserve_rows: int) -> RingLayout:
        """A new layout with capacity_rows >= C and reserve_rows, holding the same live entries: the rows
        of positions head - C .. head - 1 (slot a % P_old) copied to slot a % P_new, the entry table
        padded with free slots. The ring itself is not changed (commit installs the layout); no sync."""
        assert self.device is not None and capacity_rows >= self.capacity_rows
        layout = self._empty_layout(capacity_rows, reserve_rows, self.device)
        positions = self._head - self.capacity_rows + torch.arange(self.capacity_rows, device=self.device)
        positions = positions.clamp_min(0)  # (before C rows exist, position 0 is copied more than once)
        new_slots, old_slots = positions % layout.physical_rows, positions % self.physical_rows
        for new, old in ((layout.logits, self.logits), (layout.support, self.support), (layout.tail, self.tail), (layout.stats, self.stats)):
            if new is not None:
                new[new_slots] = old[old_slots]
        # the table stays sorted: free slots (id 2^63 - 1) are appended after the old ones
        layout.ids[: self.capacity_rows] = self._ids
        layout.start[: self.capacity_rows] = self._start
        layout.length[: self.capacity_rows] = self._length
        return layout

    @property
    def stats_width(self) -> int:
        """Columns of `stats`: 4 (u, d, tau_rec, log_norm) for dense storage, 2 (u, d) for top-k."""
        return N_STATS if self.storage == "topk" else N_STATS_WITH_LOG_NORM

    @property
    def physical_rows(self) -> int:
        """P = capacity_rows + reserve rows actually allocated (0 before the first call without a device)."""
        return self.logits.shape[0]

    def to(self, device: torch.device | str) -> TeacherRing:
        """Move every tensor of the ring (rows, top-k ids and tail, statistics, entry table, head) to
        `device`; returns self. Contents, layout and `nbytes` are unchanged; the storage dtype stays the
        ring's `dtype` (logits of any dtype can read it), so a dtype is a TypeError. A ring not allocated
        yet is allocated there. After to(), logits on another device are an error (a ring made or
        restored without a device instead follows its first call's logits, see lookup)."""
        if isinstance(device, torch.dtype):
            raise TypeError(
                f"TeacherRing.to takes a device, got the dtype {device}: the ring's storage dtype is fixed at "
                f"construction (dtype={self.dtype}); logits of any float dtype read it"
            )
        self._move(torch.device(device))
        self._follows_first_call = False
        return self

    def _move(self, device: torch.device) -> None:
        if self.device is None:
            self._allocate(device)
        else:
            self.device = device
            self._install(RingLayout(**{name: _to_device(value, device) for name, value in vars(self._layout()).items()}))
            self._head = self._head.to(device)
        self._generation += 1

    # -- public state --------------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        """Bytes held on the device, exactly: every tensor of the ring (rows, top-k ids and tail, (u, d)
        statistics, the entry table and head); see the class docstring for the formula."""
        held = (self.logits, self.support, self.tail, self.stats, self._ids, self._start, self._length, self._head)
        return sum(t.numel() * t.element_size() for t in held if t is not None)

    def __len__(self) -> int:
        """Number of samples with a live entry (reads a device value: one sync)."""
        return int((self._start >= 0).sum())

    def __contains__(self, sample_id: int) -> bool:
        return self._table_position(sample_id) is not None

    def _table_position(self, sample_id: int) -> int | None:
        """Index of a sample's live entry in the table (one sync), None when it has none."""
        try:
            sample_id = operator.index(sample_id)
        except TypeError:
            return None
        if not 0 <= sample_id < FREE_ID or self._ids.numel() == 0:
            return None
        key = torch.tensor([sample_id], dtype=torch.int64, device=self._ids.device)
        position = torch.searchsorted(self._ids, key).clamp_max(self._ids.shape[0] - 1)
        found = bool((self._ids[position] == key).logical_and(self._start[position] >= 0))
        return int(position) if found else None

    def teacher(self, sample_id: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(rows (L, V), stats (L, 4) (u, d, tau_rec, log_norm), (L, 2) with top-k storage) of a sample's live entry, copies; None when it has none. With top-k
        storage the rows are (L, k) values and `teacher_support(sample_id)` gives their ids."""
        slots = self._slots_of(sample_id)
        return None if slots is None else (self.logits[slots].clone(), self.stats[slots].clone())

    def teacher_support(self, sample_id: int) -> torch.Tensor | None:
        """(L, k) vocabulary ids of a top-k sample's stored logits; None when it has no live entry."""
        slots = self._slots_of(sample_id)
        return None if slots is None or self.support is None else self.support[slots].clone()

    def _slots_of(self, sample_id: int) -> torch.Tensor | None:
        position = self._table_position(sample_id)
        if position is None:
            return None
        start, length = int(self._start[position]), int(self._length[position])
        return torch.arange(start, start + length, device=self.device) % self.physical_rows

    def clear(self) -> None:
        """Forget every entry (storage stays allocated)."""
        self._ids.fill_(FREE_ID)
        self._start.fill_(-1)
        self._length.zero_()
        self._head.zero_()
        self._recorded = frozenset()
        if self._possible is not None:
            self._possible = set()
        self._generation += 1

    def _live_positions(self) -> torch.Tensor:
        """Absolute positions max(0, head - C) .. head - 1, the only ones a live entry can occupy."""
        head = int(self._head)
        return torch.arange(max(0, head - self.capacity_rows), head, device=self.device)

    def state_dict(self) -> dict:
        """Everything needed to continue with exactly the same teachers, independent of the physical
        layout: the rows of the last capacity_rows positions in order, the live entries (sample id,
        absolute start position, length) sorted by sample id, head, and the host mirror (recorded_ids,
        possible_ids: None when any id may be live) or, with keep_visits, the ids seen (tensors copied
        to the CPU; reads head and the entry count, syncs)."""
        positions = self._live_positions()
        slots = positions % max(self.physical_rows, 1)
        n_entries = len(self)  # the live entries are the table's first ones
        return {
            "vocab_size": self.vocab_size,
            "capacity_rows": self.capacity_rows,
            "dtype": str(self.dtype).removeprefix("torch."),
            "storage": self.storage,
            "k": self.topk,
            "rows": self.logits[slots].cpu(),
            **({"support": self.support[slots].cpu(), "tail": self.tail[slots].cpu()} if self.support is not None else {}),
            "stats": self.stats[slots].cpu(),
            "entry_ids": self._ids[:n_entries].cpu(),
            "entry_start": self._start[:n_entries].cpu(),
            "entry_length": self._length[:n_entries].cpu(),
            "head": self._head.cpu(),
            "reserve_rows": self._reserve,
            **({"visited_ids": torch.tensor(sorted(self._visited), dtype=torch.int64),
                "visit_rows": self._visit_rows} if self.keep_visits else {}),
            **({} if self.keep_visits else {
                "recorded_ids": _id_tensor(self._recorded),
                "possible_ids": None if self._possible is None else _id_tensor(self._possible),
            }),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a state_dict. vocab_size, dtype and storage (and k) must match this ring's; so must
        capacity_rows, unless the ring grows (grow_capacity), which takes the saved capacity. The saved
        reserve is restored (a state_dict without one: a growing ring with the default reserve takes C). Also reads the earlier format whose `start` /
        `length` tables were indexed by sample id. Everything is checked before anything changes: a
        state_dict that does not fit raises ValueError naming the field and leaves the ring as it was."""
        if state["vocab_size"] != self.vocab_size:
            raise ValueError(f"state_dict has vocab_size={state['vocab_size']} but this ring has vocab_size={self.vocab_size}")
        capacity = state["capacity_rows"]
        if not self.grow_capacity and capacity != self.capacity_rows:
            raise ValueError(
                f"state_dict has capacity_rows={capacity} but this ring has capacity_rows={self.capacity_rows} "
                "(a ring with grow_capacity=True takes the saved capacity)"
            )
        check_positive_int("state_dict capacity_rows", capacity)
        check_positive_int("state_dict reserve_rows", state.get("reserve_rows", 1))
        if state["dtype"] != str(self.dtype).removeprefix("torch."):
            raise ValueError(f"state_dict has dtype {state['dtype']} but this ring stores {self.dtype}")
        if (state.get("storage", "dense"), state.get("k", self.vocab_size)) != (self.storage, self.topk):
            raise ValueError(
                f"state_dict has storage={state.get('storage', 'dense')!r}, k={state.get('k')} but this ring has "
                f"storage={self.storage!r}, k={self.topk}"
            )
        head = int(state["head"])
        n_rows = min(head, capacity)
        # stats: (u, d), and (tau_rec, log_norm) for a dense ring (a state_dict without them: NaN, unknown)
        shapes = {"rows": [(n_rows, self.topk)], "stats": [(n_rows, width) for width in {N_STATS, self.stats_width}]}
        if self.support is not None:
            shapes.update(support=[(n_rows, self.topk)], tail=[(n_rows,)])
        for key, allowed in shapes.items():
            if head < 0 or tuple(state[key].shape) not in allowed:
                raise ValueError(f"state_dict {key} have shape {tuple(state[key].shape)}, inconsistent with its header")
        ids, start, length = _state_entries(state, head, capacity)
        # an earlier state_dict: nothing recorded for sure, the live ids exactly are possible
        recorded = frozenset(state["recorded_ids"].tolist()) if "recorded_ids" in state else frozenset()
        possible = state.get("possible_ids", ids)
        possible = None if possible is None else set(possible.tolist())
        # everything fits: rebuild the ring
        if self.grow_capacity:
            self.capacity_rows = capacity
        if "reserve_rows" in state:  # the saved layout: a resumed ring holds what the saved one held
            self._reserve = int(state["reserve_rows"])
        elif self.grow_capacity and self._reserve_follows_capacity:
            self._reserve = capacity
        self._head = torch.tensor(head, dtype=torch.int64)
        self._allocate(self.device or torch.device("cpu"))
        slots = self._live_positions() % self.physical_rows
        self.logits[slots] = state["rows"].to(device=self.device, dtype=self.dtype)
        if self.support is not None:
            self.support[slots] = state["support"].to(device=self.device, dtype=torch.int64)
            self.tail[slots] = state["tail"].to(device=self.device, dtype=torch.float32)
        saved_stats = state["stats"]
        self.stats[slots, : saved_stats.shape[1]] = saved_stats.to(device=self.device, dtype=torch.float32)
        n_entries = ids.shape[0]
        self._ids[:n_entries] = ids.to(self.device)
        self._start[:n_entries] = start.to(self.device)
        self._length[:n_entries] = length.to(self.device)
        self._generation += 1
        if self.keep_visits:  # a state_dict of a ring without keep_visits restarts the bound
            self._visited = set(state["visited_ids"].tolist()) if "visited_ids" in state else set()
            self._visit_rows = int(state.get("visit_rows", 0))
        else:
            self._recorded, self._possible = recorded, possible

    # -- one call: lookup, kernel, commit ------------------------------------------------------

    def lookup(
        self, sample_ids: torch.Tensor, valid: torch.Tensor, record_policy: str = "new", row_bound: int | None = None,
    ) -> RingLookup:
        """Teachers and recording slots for one call, without changing the ring's state.

        Args:
            sample_ids: (B,) int64 dataset indices, distinct and >= 0. Best kept on the CPU: checking
                ids that live on a GPU copies them to the host (a sync of B integers).
            valid: (B, T) bool on the ring's device, True where a row has a label (T = 1 for
                classification); the student rows are the B * T rows in this order.
            record_policy: "new" records the samples that had no live entry and consumes the entries
                found (each sample is a teacher once, then a student once; an entry whose length differs
                is consumed without teaching); "all" records every sample; "none" records nothing and
                consumes nothing. Under "new", a sample the previous recording call recorded for sure
                (the host mirror, module docstring) is not recorded again: it is taught from its entry,
                or, when that entry has another length or holds no row any more, gets no teacher.
            row_bound: an upper bound on each sample's valid rows known on the host (default T; the
                modules pass T - 1 when they shift the labels, whose last column is then ignored). A
                sample with more valid rows is not recorded (the bound is enforced on the device).

        A call of more than the reserve's rows (or, with grow_capacity, more than capacity_rows) gets a
        larger layout staged in the lookup (RingLookup.layout, live rows copied); commit installs it.
        A ring made or restored without a device that meets `valid` on another device is moved there
        first (TeacherRing.to); a ring given a device (or moved with to()) raises instead.

        Raises ValueError naming the argument for ids that are negative, repeated or not 1-D
        integers, a shape mismatch, or a device other than the ring's.
        """
        if record_policy not in RECORD_POLICIES:
            raise ValueError(f"record_policy must be one of {RECORD_POLICIES}, got {record_policy!r}")
        ids_host = _check_sample_ids(sample_ids)
        if valid.dtype != torch.bool or valid.dim() != 2 or valid.shape[0] != ids_host.shape[0]:
            raise ValueError(
                f"valid must be a bool tensor of shape ({ids_host.shape[0]}, T), one row per sample id, "
                f"got {valid.dtype} {tuple(valid.shape)}"
            )
        if self.device is None or (self._follows_first_call and valid.device != self.device):
            self._move(valid.device)
        self._follows_first_call = False
        if valid.device != self.device:
            raise ValueError(f"the logits are on {valid.device} but the teacher ring lives on {self.device}")
        n_rows = valid.numel()
        width = valid.shape[1]
        row_bound = width if row_bound is None else min(operator.index(row_bound), width)
        if row_bound < 0:
            raise ValueError(f"row_bound must be >= 0 (valid rows a sample can have), got {row_bound}")
        id_list = ids_host.tolist()
        mirror = self._mirror_update(id_list, record_policy)
        if self.keep_visits:
            bound = n_rows  # last-visit rings keep their sizing (a reserve of the largest call)
        elif record_policy == "none":
            bound = 0
        elif record_policy == "all":
            bound = row_bound * len(id_list)
        else:  # the samples the previous call recorded for sure are not recorded (enforced below)
            bound = row_bound * sum(i not in self._recorded for i in id_list)
        capacity = max(self.capacity_rows, bound) if self.grow_capacity else self.capacity_rows
        first_visits: tuple[int, ...] = ()
        visit_rows = self._visit_rows
        if self.keep_visits:
            first_visits = tuple(i for i in ids_host.tolist() if i not in self._visited)
            visit_rows += len(first_visits) * valid.shape[1]  # T >= a sample's valid rows
            if self.grow_capacity and 2 * visit_rows > capacity:
                # fewer than 2 S positions pass between two visits; doubling keeps the first epoch's
                # reallocations (each copies the live rows) to O(log S)
                capacity = max(2 * visit_rows, 2 * capacity)
        reserve = max(self._reserve, bound)
        if (capacity, reserve) == (self.capacity_rows, self._reserve):
            layout = self._layout()
        else:
            layout = self._resized(capacity, reserve)  # live entries keep their contents

        ids = ids_host.to(self.device, non_blocking=True)
        physical = layout.physical_rows
        # the table is sorted by id with its free slots last: the first position whose id is >= the key
        table_position = torch.searchsorted(layout.ids, ids).clamp_max(capacity - 1)
        live = (layout.ids[table_position] == ids) & (layout.start[table_position] >= 0)
        start = torch.where(live, layout.start[table_position], -1)
        length = torch.where(live, layout.length[table_position], 0)
        count = valid.sum(1)
        order = valid.cumsum(1) - 1  # k for the k-th valid row of each sample
        has_teacher = live & (length == count)
        mismatched = live & (length != count)
        teacher_index = torch.where(valid & has_teacher[:, None], (start[:, None] + order) % physical, -1).reshape(-1)

        if record_policy == "none":
            recorded = torch.zeros_like(has_teacher)
        elif record_policy == "all":
            recorded = count <= row_bound
        else:
            recorded_before = [i in self._recorded for i in id_list]
            settled = torch.tensor(recorded_before, dtype=torch.bool).to(self.device, non_blocking=True)
            recorded = ~live & ~settled & (count <= row_bound)
        record_count = count * recorded
        record_start = self._head + record_count.cumsum(0) - record_count
        record_index = torch.where(valid & recorded[:, None], (record_start[:, None] + order) % physical, -1)
        consumed = (live if record_policy == "new" else has_teacher) & (record_policy != "none")
        new_start = torch.where(recorded, record_start, torch.where(consumed, -1, start))
        new_length = torch.where(recorded, count, torch.where(consumed, 0, length))
        recorded_rows = record_count.sum()
        return RingLookup(
            teacher_index=teacher_index,
            record=None if record_policy == "none" else _row_record(layout, record_index.reshape(-1)),
            has_teacher=has_teacher,
            mismatched=mismatched,
            recorded_rows=recorded_rows,
            sample_ids=ids,
            new_start=new_start,
            new_length=new_length,
            new_head=self._head + recorded_rows,
            table_position=table_position,
            found=live,
            generation=self._generation,
            teachers=Teachers(layout.logits, teacher_index, layout.stats, layout.support, layout.tail),
            layout=layout,
            first_visits=first_visits,
            visit_rows=visit_rows,
            **mirror,
        )

    def _mirror_update(self, id_list: list[int], record_policy: str) -> dict:
        """The host mirror after a call of these ids (RingLookup fields; applied by commit). Under "new", an
        id the previous call recorded for sure (in `_recorded`, so live) is consumed or left without an
        entry: settled. An id that cannot hold a live entry (not in `_possible`) is recorded whatever
        the device finds. The others are unsure (they may be recorded or consumed)."""
        possible = self._possible
        if record_policy == "none" or self.keep_visits:
            return {}
        if record_policy == "all":
            return {"recorded_for_sure": frozenset(id_list), "unsure_ids": tuple(id_list)}
        settled = tuple(i for i in id_list if i in self._recorded)
        fresh = [i for i in id_list if i not in self._recorded]
        sure = frozenset(i for i in fresh if possible is not None and i not in possible)
        return {"recorded_for_sure": sure, "settled_ids": settled, "unsure_ids": tuple(fresh)}

    def commit(self, lookup: RingLookup) -> None:
        """Apply a lookup once its kernel call succeeded: its layout is installed (if it staged a larger
        one), new entries become live, used ones are consumed, and entries pushed out of the last
        capacity_rows positions are evicted. With a fixed capacity, the first call that records more than
        capacity_rows rows (so that some of them are evicted before the next call) raises a RuntimeWarning
        once per ring; checking it reads recorded_rows (a sync) only in calls of more than capacity_rows rows."""
        if lookup.generation != self._generation:
            raise RuntimeError("this RingLookup is stale: the ring changed after it was made")
        layout = lookup.layout
        capacity = layout.capacity_rows
        # the batch's ids that had an entry are replaced by their new state (or dropped)
        replaced = torch.zeros(capacity, dtype=torch.int64, device=self.device)
        replaced.index_add_(0, lookup.table_position, lookup.found.long())
        ids = torch.cat([layout.ids, lookup.sample_ids])
        start = torch.cat([layout.start, lookup.new_start])
        length = torch.cat([layout.length, lookup.new_length])
        kept = torch.cat([replaced == 0, torch.ones_like(lookup.found)])
        # live after the commit: holds rows, and they lie within the last C positions under the new head
        live = kept & (start >= 0) & (length > 0) & (start >= lookup.new_head - capacity)
        # at most C entries are live (disjoint non-empty row ranges within C positions): sort by
        # (free, id) and keep the first C
        ids = torch.where(live, ids, FREE_ID)
        order = ids.argsort(stable=True)
        order = order[(~live[order]).to(torch.uint8).argsort(stable=True)][:capacity]
        live = live[order]
        self._install(replace(layout, ids=ids[order], start=torch.where(live, start[order], -1), length=torch.where(live, length[order], 0)))
        self._head = lookup.new_head
        self._generation += 1
        self._visited.update(lookup.first_visits)
        self._visit_rows = lookup.visit_rows
        if self.keep_visits and not self.grow_capacity and not self._warned_eviction and 2 * self._visit_rows > capacity:
            self._warned_eviction = True
            warnings.warn(
                f"TeacherRing: the samples seen so far may hold up to {self._visit_rows} rows, and last-visit "
                f"teachers need capacity_rows >= {2 * self._visit_rows} (two epochs of rows pass between two visits "
                f"of a sample), but capacity_rows={capacity}: samples will find their previous visit evicted and "
                "train on cross-entropy alone (DistillStats.teacher_misses). Leave capacity_rows=None for a ring "
                "that grows as needed. (Warned once per ring.)",
                RuntimeWarning,
                stacklevel=2,
            )
        if lookup.recorded_for_sure is not None:
            self._recorded = lookup.recorded_for_sure
            if self._possible is not None:
                self._possible.difference_update(lookup.settled_ids)
                self._possible.update(lookup.unsure_ids)
                if len(self._possible) > MIRROR_LIMIT:
                    self._possible = None  # every id may be live from now on (bound B * T), until a load
        if not self.grow_capacity and not self._warned_eviction and lookup.teacher_index.numel() > capacity:
            recorded = int(lookup.recorded_rows)
            if recorded > capacity:
                self._warned_eviction = True
                warnings.warn(
                    f"TeacherRing: one call recorded {recorded} teacher rows, more than capacity_rows={capacity}, "
                    "so the first of them are evicted before the next step can read them: those samples get no "
                    "teacher (DistillStats.teacher_misses) and train on cross-entropy alone. Set capacity_rows to at "
                    "least the rows of the largest batch (batch size * padded sequence length), or leave "
                    "capacity_rows=None (DynSDPBLoss, DynSDPBTrainer) for a ring that grows on demand. "
                    "(Warned once per ring.)",
                    RuntimeWarning,
                    stacklevel=2,
                )


def _empty_stats(rows: int, width: int, device: torch.device) -> torch.Tensor:
    """Statistics of `rows` slots not written yet: (u, d) = 0 and, with four columns, (tau_rec, log_norm) NaN."""
    stats = torch.zeros(rows, width, dtype=torch.float32, device=device)
    stats[:, N_STATS:] = math.nan
    return stats


def _row_record(layout: RingLayout, index: torch.Tensor) -> RowRecord:
    """Where the kernel (dense rows, statistics) and loss.fused_loss (top-k values) write recorded rows."""
    if layout.support is None or layout.tail is None:
        return RowRecord(index, layout.logits, layout.stats)
    return RowRecord(index, None, layout.stats, TopkRecord(layout.logits, layout.support, layout.tail))


def _id_tensor(ids: set[int] | frozenset[int]) -> torch.Tensor:
    return torch.tensor(sorted(ids), dtype=torch.int64)


def _to_device(value: object, device: torch.device) -> object:
    return value.to(device) if isinstance(value, torch.Tensor) else value


def _check_sample_ids(sample_ids: object) -> torch.Tensor:
    """sample_ids as a CPU int64 tensor, after checking they are 1-D, >= 0 and distinct."""
    if not isinstance(sample_ids, torch.Tensor):
        raise TypeError(f"sample_ids must be a torch.Tensor of int64 dataset indices, got {type(sample_ids).__name__}")
    if sample_ids.dim() != 1 or sample_ids.is_floating_point() or sample_ids.is_complex() or sample_ids.dtype == torch.bool:
        raise ValueError(f"sample_ids must be a 1-D integer tensor, got {sample_ids.dtype} {tuple(sample_ids.shape)}")
    ids = sample_ids.detach().to("cpu", torch.int64)
    if ids.numel() and int(ids.min()) < 0:
        raise ValueError(f"sample_ids must be >= 0 (dataset indices), got {ids[ids < 0][:5].tolist()}")
    unique, counts = ids.unique(return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"sample_ids must be distinct within a batch; repeated: {unique[counts > 1][:5].tolist()}")
    return ids


def _state_entries(state: dict, head: int, capacity_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, start, length) int64 of a state_dict's live entries, sorted by id, checked against capacity.
    The earlier format's `start` / `length` tables indexed by sample id are converted."""
    if "entry_ids" in state:
        ids, start, length = (state[key].to("cpu", torch.int64) for key in ("entry_ids", "entry_start", "entry_length"))
    else:
        start, length = state["start"].to("cpu", torch.int64), state["length"].to("cpu", torch.int64)
        ids = torch.arange(start.shape[0], dtype=torch.int64)
    if not (ids.dim() == start.dim() == length.dim() == 1 and ids.shape == start.shape == length.shape):
        raise ValueError("state_dict entries (sample ids, start, length) must be 1-D tensors of one length")
    live = (start >= 0) & (length > 0) & (start >= head - capacity_rows) & (start + length <= head)
    ids, start, length = ids[live], start[live], length[live]
    order = ids.argsort()
    ids, start, length = ids[order], start[order], length[order]
    if ids.numel() > capacity_rows:
        raise ValueError(f"state_dict holds {ids.numel()} live entries, more than capacity_rows={capacity_rows}")
    if ids.numel() and (int(ids[0]) < 0 or bool((ids[1:] == ids[:-1]).any())):
        raise ValueError("state_dict entry sample ids must be distinct and >= 0")
    return ids, start, length

