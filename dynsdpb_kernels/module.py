"""DynSDPBLoss: the loss as an nn.Module that keeps its own teachers in a TeacherRing.

Each training call reads the teachers of the samples seen one step earlier from the ring and records the
current rows of the new samples into it, inside the fused kernel (rows.RowRecord), so a training loop
only passes logits, labels and the samples' dataset indices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .loss import (
    LOGIT_DTYPES,
    DynSDPBLossFunction,
    LossOptions,
    LossStats,
    _check_device,
    _check_float,
    _check_integer,
    _check_options,
    _check_tensor,
    as_rows,
    check_positive_int,
    fused_loss,
    loss_stats,
    row_counts,
)
from .fused_linear import FusedLinearDynSDPBFunction, Teachers, fused_linear_loss
from .ring import RECORD_POLICIES, TeacherRing
from .rows import DistillConfig, RowRecord


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


class DynSDPBLoss(nn.Module):
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
        capacity_rows: teacher rows the ring keeps (FIFO); None sizes it to the rows of the first call.
        teacher_dtype: storage dtype of the ring (bfloat16 halves the float32 memory).
        teacher_storage: "dense" (whole rows) or "topk" (the `topk` largest logits of each row and their
            ids; the KL is then taken over the teacher's top-k support, see TeacherRing).
        topk: k for teacher_storage="topk".
        record: "new" (default: a sample with a teacher is consumed, one without is recorded),
            "all" or "none"; see TeacherRing.lookup.
        shift_labels: for (B, T, V) logits, position t predicts labels[:, t + 1] (Hugging Face
            causal-LM convention); set False when labels are already shifted.
        backend, validate, inplace_grad: as in dynsdpb_loss.

    Shapes: logits (B, T, V) with labels (B, T) (causal LM) or logits (B, V) with labels (B,)
    (classification); sample_ids (B,) int64, distinct, >= 0. `last_stats` holds a DistillStats.
    """

    def __init__(
        self,
        vocab_size: int,
        *,
        alpha: float = 1.0,
        tau: float = 3.0,
        dynamic: bool = True,
        ignore_index: int = -100,
        capacity_rows: int | None = None,
        teacher_dtype: torch.dtype = torch.bfloat16,
        teacher_storage: str = "dense",
        topk: int = 64,
        record: str = "new",
        shift_labels: bool = True,
        backend: str = "auto",
        validate: bool = True,
        inplace_grad: bool = False,
    ) -> None:
        super().__init__()
        check_positive_int("vocab_size", vocab_size)
        if record not in RECORD_POLICIES:
            raise ValueError(f"record must be one of {RECORD_POLICIES}, got {record!r}")
        self.vocab_size = vocab_size
        self.options = LossOptions(
            distill=DistillConfig(alpha=alpha, tau=tau, dynamic=dynamic, ignore_index=ignore_index),
            reduction="mean",
            backend=backend,
            validate=validate,
            inplace_grad=inplace_grad,
        )
        _check_options(self.options)
        self.capacity_rows = capacity_rows
        self.teacher_dtype = teacher_dtype
        self.teacher_storage = teacher_storage
        self.topk = topk
        self.record = record
        self.shift_labels = shift_labels
        self.ring: TeacherRing | None = None
        if capacity_rows is not None:
            self.ring = self._new_ring(capacity_rows)
        self.last_stats: DistillStats | None = None

    def extra_repr(self) -> str:
        config = self.options.distill
        return (
            f"vocab_size={self.vocab_size}, alpha={config.alpha}, tau={config.tau}, dynamic={config.dynamic}, "
            f"capacity_rows={self.capacity_rows}, teacher_dtype={self.teacher_dtype}, record={self.record!r}"
        )

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
        if self.ring is None:
            self.ring = self._new_ring(ring_state["capacity_rows"])
        self.ring.load_state_dict(ring_state)

    def _new_ring(self, capacity_rows: int) -> TeacherRing:
        return TeacherRing(
            self.vocab_size, capacity_rows, dtype=self.teacher_dtype, storage=self.teacher_storage, k=self.topk
        )

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
        logits = _check_tensor("logits", logits)
        _check_float("logits", logits, LOGIT_DTYPES)
        if logits.dim() not in (2, 3):
            raise ValueError(f"logits must have shape (B, T, V) or (B, V), got {tuple(logits.shape)}")
        if logits.shape[-1] != self.vocab_size:
            raise ValueError(
                f"logits have vocabulary size {logits.shape[-1]} but this DynSDPBLoss (and its teacher ring) "
                f"was built for vocab_size={self.vocab_size}"
            )
        logits_2d = as_rows(logits, self.vocab_size)

        def compute(labels_1d, ring, teacher_index, record, grad_scale):
            return self._apply(logits_2d, labels_1d, ring, teacher_index, record, grad_scale)

        return self._distill(compute, labels, logits.shape[:-1], logits.device, sample_ids, num_items_in_batch)

    def _distill(self, compute, labels, leading_shape, device, sample_ids, num_items_in_batch) -> torch.Tensor:
        """Everything around the rows computation: labels (checked, shifted), the ring lookup, the loss
        weights, the commit and the stats. compute(labels (N,), ring | None, teacher_index | None,
        record | None, grad_scale | None) -> (loss, row_terms)."""
        labels = _check_tensor("labels", labels)
        _check_integer("labels", labels)
        if labels.shape != leading_shape:
            raise ValueError(f"labels must have shape {tuple(leading_shape)} to match logits, got {tuple(labels.shape)}")
        _check_device("labels", labels, device)
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
            loss, _ = compute(labels_1d, None, None, None, self._grad_scale(labels_1d, None, num_items_in_batch))
            return loss

        ring = self._ring_for(per_sample.numel())
        valid = per_sample != ignore_index
        lookup = ring.lookup(sample_ids, valid, record=self.record)
        grad_scale = self._grad_scale(labels_1d, lookup.teacher_index, num_items_in_batch)
        loss, row_terms = compute(labels_1d, ring, lookup.teacher_index, lookup.record, grad_scale)
        ring.commit(lookup)  # only after the kernel and its checks succeeded

        n_valid, n_distilled = row_counts(labels_1d, lookup.teacher_index, ignore_index)
        teacher_samples = lookup.has_teacher.sum()
        self.last_stats = DistillStats(
            loss=loss_stats(row_terms, n_valid, n_distilled),
            teacher_samples=teacher_samples,
            teacher_misses=lookup.has_teacher.numel() - teacher_samples,
            length_mismatches=lookup.mismatched.sum(),
            recorded_rows=lookup.recorded_rows,
            ring_bytes=ring.nbytes,
        )
        return loss

    def _grad_scale(self, labels, teacher_index, num_items_in_batch) -> torch.Tensor | None:
        """(ce, distill) weights for num_items_in_batch (see forward); None: the plain means."""
        if num_items_in_batch is None:
            return None
        n_valid, n_distilled = row_counts(labels, teacher_index, self.options.distill.ignore_index)
        total = torch.as_tensor(num_items_in_batch, device=labels.device).float().clamp_min(1)
        return torch.stack([1.0 / total, n_valid / (n_distilled.clamp_min(1) * total)]).float()

    def _ring_for(self, n_rows: int) -> TeacherRing:
        if self.ring is None:
            self.ring = self._new_ring(max(n_rows, 1))
        return self.ring

    def _apply(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        ring: TeacherRing | None,
        teacher_index: torch.Tensor | None,
        record: RowRecord | None,
        grad_scale: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        teacher_rows = ring.rows if ring is not None else None
        teacher_stats = ring.stats if ring is not None else None
        teacher_support = ring.support if ring is not None else None
        teacher_tail = ring.tail if ring is not None else None
        if ring is not None:  # top-k storage only; before the logits can be overwritten
            ring.write_topk(logits.detach(), record, self.options.distill)
        arguments = (logits, labels, teacher_rows, teacher_index, teacher_stats, self.options)
        if torch.is_grad_enabled() and logits.requires_grad:
            loss, row_terms, _ = DynSDPBLossFunction.apply(*arguments, record, grad_scale, teacher_support, teacher_tail)
            return loss, row_terms
        loss, rows = fused_loss(*arguments, False, record, grad_scale, teacher_support, teacher_tail)
        return loss, rows.row_terms


class FusedLinearDynSDPBLoss(DynSDPBLoss):
    """DynSDPBLoss computed from hidden states and the LM head, without materialising the logits.

    forward(hidden (B, T, H) or (B, H), weight (V, H), labels, sample_ids=None, bias=None,
    num_items_in_batch=None) gives the same loss as DynSDPBLoss on logits = hidden @ weight.T + bias, and
    gradients for hidden, weight and bias, but processes `chunk_size` rows at a time (fused_linear.py):
    only one chunk of logits exists at once. It owns a TeacherRing like DynSDPBLoss (use
    teacher_storage="topk" to keep the ring small too).

    Args: those of DynSDPBLoss (inplace_grad does not apply: each chunk's logits buffer always receives
    its gradient), plus chunk_size (rows per chunk; default from fused_linear.DEFAULT_CHUNK_BYTES) and
    accum_dtype (dtype of the weight and bias gradients' accumulation across chunks, e.g. torch.float32).
    """

    def __init__(self, vocab_size: int, *, chunk_size: int | None = None, accum_dtype: torch.dtype | None = None, **kwargs) -> None:
        super().__init__(vocab_size, **kwargs)
        if chunk_size is not None:
            check_positive_int("chunk_size", chunk_size)
        self.chunk_size = chunk_size
        self.accum_dtype = accum_dtype

    def forward(  # type: ignore[override]
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        sample_ids: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """The loss of one batch (0-d float32); see DynSDPBLoss.forward with logits = hidden @ weight.T + bias."""
        hidden = _check_tensor("hidden", hidden)
        weight = _check_tensor("weight", weight)
        _check_float("hidden", hidden, LOGIT_DTYPES)
        if hidden.dim() not in (2, 3):
            raise ValueError(f"hidden must have shape (B, T, H) or (B, H), got {tuple(hidden.shape)}")
        if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
            raise ValueError(f"weight must have shape (V, {hidden.shape[-1]}), got {tuple(weight.shape)}")
        if weight.shape[0] != self.vocab_size:
            raise ValueError(
                f"weight has {weight.shape[0]} output rows (vocabulary) but this loss (and its teacher ring) "
                f"was built for vocab_size={self.vocab_size}"
            )
        hidden_2d = hidden.reshape(-1, hidden.shape[-1])

        def compute(labels_1d, ring, teacher_index, record, grad_scale):
            teachers = Teachers()
            if ring is not None:
                topk_writer = ring if ring.support is not None else None
                teachers = Teachers(ring.rows, teacher_index, ring.stats, ring.support, ring.tail, topk_writer)
            arguments = (hidden_2d, weight, bias, labels_1d, teachers, self.options)
            if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
                return FusedLinearDynSDPBFunction.apply(*arguments, record, grad_scale, self.chunk_size, self.accum_dtype)
            result = fused_linear_loss(
                *arguments, compute_grad=False, record=record, grad_scale=grad_scale, chunk_size=self.chunk_size
            )
            return result.loss, result.row_terms

        return self._distill(compute, labels, hidden.shape[:-1], hidden.device, sample_ids, num_items_in_batch)
