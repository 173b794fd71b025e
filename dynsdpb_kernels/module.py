"""The loss as nn.Modules that keep their own teachers in a TeacherRing: DynSDPBLoss (from logits) and
FusedLinearDynSDPBLoss (from hidden states and the LM head, the logits never formed).

Both are RingLoss modules: each training call reads the teachers of the samples seen one step earlier
from the ring and records the current rows of the new samples into it, inside the fused kernel
(contract.RowRecord), so a training loop only passes logits (or hidden states), labels and the samples'
dataset indices. RingLoss owns that ring step (label shifting, lookup, loss weights, commit, stats);
the two modules differ only in how they compute the rows' loss.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from .checks import check_device, check_integer, check_logits, check_options, check_positive_int, check_tensor
from .contract import DistillConfig, LossOptions, RowRecord, Teachers
from .fused_linear import fused_linear_loss, fused_linear_loss_with_grad
from .loss import LossStats, dynsdpb_loss_with_grad, as_rows, fused_loss, loss_stats, row_counts
from .ring import RECORD_POLICIES, RingLookup, TeacherRing

# Where a sample's teacher comes from: its logits one step earlier (DLB's batch order, OverlapBatchSampler),
# or its logits at its previous visit, an epoch earlier (any once-per-epoch order, VisitBatchSampler).
TEACHERS = ("previous_batch", "previous_visit")


@dataclass(frozen=True)
class DistillStats:
    """Diagnostics of DynSDPBLoss's last call; tensors stay on the device (reading them syncs).

    loss:              LossStats of the call (ce, kl, alpha_mean, tau_mean, ...)
    teacher_samples:   samples that had a teacher (0-d int64)
    teacher_misses:    samples that had none: never recorded, evicted, consumed or length mismatch
    length_mismatches: samples whose entry had a different number of valid rows (so no teacher)
    recorded_rows:     rows written into the ring by this call
    ring_bytes:        bytes the ring holds on its device
    """

    loss: LossStats
    teacher_samples: torch.Tensor
    teacher_misses: torch.Tensor
    length_mismatches: torch.Tensor
    recorded_rows: torch.Tensor
    ring_bytes: int


@dataclass(frozen=True)
class RingStep:
    """One call's side of the ring, made by RingLoss._begin_step and closed by RingLoss._end_step.

    labels:     (N,) int64 labels of the N student rows (shifted for causal LMs).
    teachers:   the teachers the ring holds for those rows (empty outside training).
    record:     where the kernel records the rows that become teachers, or None.
    grad_scale: (2,) (ce, distill) weights for num_items_in_batch, or None for the plain means.
    lookup:     the ring lookup to commit once the loss succeeded, or None outside training.
    """

    labels: torch.Tensor
    teachers: Teachers
    record: RowRecord | None
    grad_scale: torch.Tensor | None
    lookup: RingLookup | None


class RingLoss(nn.Module):
    """The part DynSDPBLoss and FusedLinearDynSDPBLoss share: options, the teacher ring (created on the
    first call unless capacity_rows is given, then growing on demand; saved with the module's
    state_dict), and the ring step
    around each loss computation: _begin_step (labels checked and shifted, ring lookup, loss weights),
    then the subclass's loss, then _end_step (commit, DistillStats in `last_stats`).
    Arguments: see DynSDPBLoss (all but inplace_grad, which only DynSDPBLoss has).
    """

    def __init__(
        self,
        vocab_size: int,
        *,
        alpha: float = 1.0,
        tau: float = 3.0,
        dynamic: bool | str = True,
        ignore_index: int = -100,
        softcap: float | None = None,
        capacity_rows: int | None = None,
        teacher_dtype: torch.dtype = torch.bfloat16,
        teacher_storage: str | None = None,
        topk: int = 64,
        record_policy: str | None = None,
        shift_labels: bool = True,
        backend: str = "auto",
        validate: bool = True,
        teacher: str = "previous_batch",
    ) -> None:
        super().__init__()
        check_positive_int("vocab_size", vocab_size)
        if teacher not in TEACHERS:
            raise ValueError(f"teacher must be one of {TEACHERS}, got {teacher!r}")
        last_visit = teacher == "previous_visit"
        if record_policy is None:
            record_policy = "all" if last_visit else "new"
        if record_policy not in RECORD_POLICIES:
            raise ValueError(f"record_policy must be one of {RECORD_POLICIES}, got {record_policy!r}")
        if last_visit and record_policy != "all":
            raise ValueError(f"teacher='previous_visit' records every visit: record_policy must be 'all', got {record_policy!r}")
        self.vocab_size = vocab_size
        self.options = LossOptions(
            distill=DistillConfig(alpha=alpha, tau=tau, dynamic=dynamic, ignore_index=ignore_index, softcap=softcap),
            reduction="mean",
            backend=backend,
            validate=validate,
        )
        check_options(self.options)
        self.capacity_rows = capacity_rows
        self.teacher_dtype = teacher_dtype
        self.teacher = teacher
        self.teacher_storage = teacher_storage or ("topk" if last_visit else "dense")
        self.topk = topk
        self.record_policy = record_policy
        self.shift_labels = shift_labels
        self.ring: TeacherRing | None = None
        if capacity_rows is not None:
            self.ring = self._new_ring(capacity_rows)
        self.last_stats: DistillStats | None = None

    def extra_repr(self) -> str:
        config = self.options.distill
        return (
            f"vocab_size={self.vocab_size}, alpha={config.alpha}, tau={config.tau}, dynamic={config.dynamic!r}, "
            f"softcap={config.softcap}, "
            f"teacher={self.teacher!r}, capacity_rows={self.capacity_rows}, teacher_dtype={self.teacher_dtype}, "
            f"teacher_storage={self.teacher_storage!r}, record_policy={self.record_policy!r}"
        )

    def set_alpha(self, alpha: float) -> None:
        """Set the distillation weight alpha for the calls that follow (alpha_r = alpha * (1 - u_r) under
        the dynamic rule, alpha itself with dynamic=False or "tau"): a schedule, e.g. PS-KD's ramp
        alpha_t = alpha * t / T over the epochs t = 0..T-1 for teacher="previous_visit". ValueError (naming
        alpha) unless a finite number >= 0, and nothing changes; the ring is untouched. alpha is not part
        of the state_dict: a resumed run sets it again."""
        options = replace(self.options, distill=replace(self.options.distill, alpha=alpha))
        check_options(options)
        self.options = options

    # The ring travels with the module's state_dict (and so with checkpoints of a model that owns it).
    def get_extra_state(self) -> dict:
        return {"ring": self.ring.state_dict() if self.ring is not None else None}

    def set_extra_state(self, state: dict) -> None:
        self.load_ring_state_dict(state.get("ring"))

    def load_ring_state_dict(self, ring_state: dict | None) -> None:
        """Restore the ring from TeacherRing.state_dict() (None: an empty ring), creating it if needed."""
        if ring_state is None:
            self.ring = None if self.capacity_rows is None else self._new_ring(self.capacity_rows)
            return
        ring = self.ring if self.ring is not None else self._new_ring(ring_state["capacity_rows"])
        ring.load_state_dict(ring_state)  # checks everything first: on an error the module keeps its ring
        self.ring = ring

    def _new_ring(self, capacity_rows: int) -> TeacherRing:
        """A ring without a device (it follows the first call's logits); it grows on demand unless the
        module was given capacity_rows."""
        return TeacherRing(
            self.vocab_size, capacity_rows, dtype=self.teacher_dtype, storage=self.teacher_storage, topk=self.topk,
            grow_capacity=self.capacity_rows is None, keep_visits=self.teacher == "previous_visit",
        )

    def _begin_step(
        self,
        labels: object,
        leading_shape: torch.Size,
        device: torch.device,
        sample_ids: torch.Tensor | None,
        num_items_in_batch: torch.Tensor | int | None,
    ) -> RingStep:
        """Labels checked against the student rows' leading shape (and shifted), the ring looked up by
        sample_ids in training mode (nothing changes in the ring until _end_step), and the loss weights."""
        labels = check_tensor("labels", labels)
        check_integer("labels", labels)
        if labels.shape != leading_shape:
            raise ValueError(f"labels must have shape {tuple(leading_shape)} to match logits, got {tuple(labels.shape)}")
        check_device("labels", labels, device)
        ignore_index = self.options.distill.ignore_index
        labels = labels.long()
        if labels.dim() == 2 and self.shift_labels:
            # position t predicts token t + 1; the last position has no target
            labels = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=ignore_index)
        per_sample = labels if labels.dim() == 2 else labels[:, None]
        labels_1d = per_sample.reshape(-1)
        if not self.training or sample_ids is None:
            if self.training:
                raise ValueError("sample_ids are required in training mode: the teachers are looked up by them")
            return RingStep(labels_1d, Teachers(), None, self._grad_scale(labels_1d, None, num_items_in_batch), None)

        shifted = labels.dim() == 2 and self.shift_labels  # then a sample's last position is never valid
        ring = self._ring_for()
        lookup = ring.lookup(
            sample_ids, per_sample != ignore_index, record_policy=self.record_policy,
            row_bound=per_sample.shape[1] - 1 if shifted else None,
        )
        grad_scale = self._grad_scale(labels_1d, lookup.teacher_index, num_items_in_batch)
        return RingStep(labels_1d, lookup.teachers, lookup.record, grad_scale, lookup)

    def _end_step(self, step: RingStep, row_terms: torch.Tensor) -> None:
        """Commit the step's lookup (only after the loss and its checks succeeded) and set last_stats."""
        lookup = step.lookup
        if lookup is None or self.ring is None:
            return
        self.ring.commit(lookup)
        n_valid, n_distilled = row_counts(step.labels, lookup.teacher_index, self.options.distill.ignore_index)
        teacher_samples = lookup.has_teacher.sum()
        self.last_stats = DistillStats(
            loss=loss_stats(row_terms, n_valid, n_distilled),
            teacher_samples=teacher_samples,
            teacher_misses=lookup.has_teacher.numel() - teacher_samples,
            length_mismatches=lookup.mismatched.sum(),
            recorded_rows=lookup.recorded_rows,
            ring_bytes=self.ring.nbytes,
        )

    def _grad_scale(self, labels, teacher_index, num_items_in_batch) -> torch.Tensor | None:
        """(ce, distill) weights for num_items_in_batch (see forward); None: the plain means."""
        if num_items_in_batch is None:
            return None
        n_valid, n_distilled = row_counts(labels, teacher_index, self.options.distill.ignore_index)
        total = torch.as_tensor(num_items_in_batch, device=labels.device).float().clamp_min(1)
        return torch.stack([1.0 / total, n_valid / (n_distilled.clamp_min(1) * total)]).float()

    def _ring_for(self) -> TeacherRing:
        """The ring, made at the first training call when the module was not given capacity_rows: it
        starts at one row and grows in that call's lookup to the rows the call can record."""
        if self.ring is None:
            self.ring = self._new_ring(1)
        return self.ring


class DynSDPBLoss(RingLoss):
    """Cross-entropy plus self-distillation from the previous mini-batch, with its own teacher ring.

    In training mode, for a batch of samples with dataset indices `sample_ids`:

        loss = sum_valid ce_r / n_valid + sum_distilled alpha_r tau_r^2 KL(softmax(t_r/tau_r) || softmax(z_r/tau_r)) / n_distilled

    where the teacher t_r of row r is the row the same sample's same valid position got the last time
    the sample was recorded (detached, stored in `teacher_dtype`), and alpha_r, tau_r follow
    DistillConfig. Rows are matched by the order of each sample's valid (label != ignore_index)
    positions, so a sample padded differently in two steps still lines up. In eval mode (or without
    sample_ids in eval) the loss is plain cross-entropy and the ring is neither read nor written.

    Args:
        vocab_size: V; logits with another last dimension are an error.
        alpha, tau, dynamic, ignore_index: as in dynsdpb_loss.
        softcap: None, or c > 0 for final-logit softcapping: the loss (CE, statistics, KL) sees
            c tanh(z / c) and the ring records those capped rows, so the next step's teachers are capped
            logits (dynsdpb_loss). Pass it only for raw logits: a model that caps its own output (Gemma 2's
            logits) needs none.
        capacity_rows: teacher rows the ring keeps (FIFO), fixed; a call that records more evicts some of
            its own samples before the next step reads them, with a RuntimeWarning (once). None
            (default): the ring grows on demand to the rows (B * T, padding included) of the largest call
            so far, so the previous step's samples always find their teachers (TeacherRing's
            grow_capacity; memory 2 * max(B * T) rows, see TeacherRing).
        teacher_dtype: storage dtype of the ring (bfloat16 halves the float32 memory).
        teacher_storage: "dense" (whole rows) or "topk" (the `topk` largest logits of each row and their
            ids; the KL is then taken over the teacher's top-k support, see TeacherRing). None (default):
            "dense" for teacher="previous_batch", "topk" for "previous_visit".
        topk: k for teacher_storage="topk".
        record_policy: "new" (the default for previous_batch: a sample with a teacher is consumed, one
            without is recorded), "all" (the default, and the only one, for previous_visit) or "none";
            see TeacherRing.lookup.
        teacher: "previous_batch" (default; DLB): a sample is taught by its logits one step earlier, so
            each batch holds the previous step's new samples again (OverlapBatchSampler).
            "previous_visit": a sample is taught by its own logits from its previous visit, an epoch
            earlier, with no re-run: use a once-per-epoch order (VisitBatchSampler; under DDP each
            sample must return to the same rank, as VisitBatchSampler's fixed shards ensure). The first
            epoch has no teachers. The ring keeps every sample: with capacity_rows=None it grows to
            2 * S rows, S = sum over the samples of their padded length T at their first visit
            (TeacherRing keep_visits); top-k storage by default, k * (dtype + 8) + 12 bytes a row.
        shift_labels: for (B, T, V) logits, position t predicts labels[:, t + 1] (Hugging Face
            causal-LM convention); set False when labels are already shifted.
        backend, validate, inplace_grad: as in dynsdpb_loss.

    Shapes: logits (B, T, V) with labels (B, T) (causal LM) or logits (B, V) with labels (B,)
    (classification); sample_ids (B,) int64, distinct, >= 0. `last_stats` holds a DistillStats.
    """

    def __init__(self, vocab_size: int, *, inplace_grad: bool = False, **options) -> None:
        super().__init__(vocab_size, **options)
        self.options = replace(self.options, inplace_grad=inplace_grad)

    def forward(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        sample_ids: torch.Tensor | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """The loss of one batch (0-d float32), recording this step's teachers in training mode.

        num_items_in_batch (Hugging Face gradient accumulation): the number of valid rows in the
        whole accumulated batch. The cross-entropy is then summed and divided by it, and the
        distillation mean of this micro-batch is weighted by n_valid / num_items_in_batch, so the
        micro-batch losses add up to the full batch's loss.
        """
        logits = check_logits("logits", logits, "(B, T, V) or (B, V)")
        if logits.shape[-1] != self.vocab_size:
            raise ValueError(
                f"logits have vocabulary size {logits.shape[-1]} but this DynSDPBLoss (and its teacher ring) "
                f"was built for vocab_size={self.vocab_size}"
            )
        step = self._begin_step(labels, logits.shape[:-1], logits.device, sample_ids, num_items_in_batch)
        logits_2d = as_rows(logits, self.vocab_size)
        teachers = step.teachers
        arguments = (logits_2d, step.labels, teachers.logits, teachers.index, teachers.stats, self.options)
        topk_arguments = (teachers.support, teachers.tail)
        if torch.is_grad_enabled() and logits_2d.requires_grad:
            loss, row_terms, _ = dynsdpb_loss_with_grad(*arguments, step.record, step.grad_scale, *topk_arguments)
        else:
            loss, per_row = fused_loss(*arguments, False, step.record, step.grad_scale, *topk_arguments)
            row_terms = per_row.row_terms
        self._end_step(step, row_terms)
        return loss


class FusedLinearDynSDPBLoss(RingLoss):
    """DynSDPBLoss computed from hidden states and the LM head, without materialising the logits.

    forward(hidden (B, T, H) or (B, H), weight (V, H), labels, sample_ids=None, bias=None,
    num_items_in_batch=None) gives the same loss as DynSDPBLoss on logits = hidden @ weight.T + bias, and
    gradients for hidden, weight and bias, but processes `chunk_size` rows at a time (fused_linear.py):
    only one chunk of logits exists at once. It owns a TeacherRing like DynSDPBLoss (use
    teacher_storage="topk" to keep the ring small too).

    Args: those of DynSDPBLoss except inplace_grad (each chunk's logits buffer always receives its
    gradient), plus chunk_size (rows per chunk; default from fused_linear.DEFAULT_CHUNK_BYTES) and
    accum_dtype (dtype of the weight and bias gradients' accumulation across chunks, e.g. torch.float32).
    """

    def __init__(
        self, vocab_size: int, *, chunk_size: int | None = None, accum_dtype: torch.dtype | None = None, **options
    ) -> None:
        super().__init__(vocab_size, **options)
        if chunk_size is not None:
            check_positive_int("chunk_size", chunk_size)
        self.chunk_size = chunk_size
        self.accum_dtype = accum_dtype

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        sample_ids: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """The loss of one batch (0-d float32); see DynSDPBLoss.forward with logits = hidden @ weight.T + bias."""
        hidden = check_logits("hidden", hidden, "(B, T, H) or (B, H)")
        weight = check_tensor("weight", weight)
        if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
            raise ValueError(f"weight must have shape (V, {hidden.shape[-1]}), got {tuple(weight.shape)}")
        if weight.shape[0] != self.vocab_size:
            raise ValueError(
                f"weight has {weight.shape[0]} output rows (vocabulary) but this loss (and its teacher ring) "
                f"was built for vocab_size={self.vocab_size}"
            )
        step = self._begin_step(labels, hidden.shape[:-1], hidden.device, sample_ids, num_items_in_batch)
        hidden_2d = hidden.reshape(-1, hidden.shape[-1])
        arguments = (hidden_2d, weight, bias, step.labels, step.teachers, self.options)
        needs_grad = any(t is not None and t.requires_grad for t in (hidden, weight, bias))
        if torch.is_grad_enabled() and needs_grad:
            loss, row_terms = fused_linear_loss_with_grad(
                *arguments, step.record, step.grad_scale, self.chunk_size, self.accum_dtype
            )
        else:
            result = fused_linear_loss(
                *arguments, compute_grad=False, record=step.record, grad_scale=step.grad_scale, chunk_size=self.chunk_size
            )
            loss, row_terms = result.loss, result.row_terms
        self._end_step(step, row_terms)
        return loss
