"""Fused kernels for DynSDPB: self-distillation from the previous mini-batch for fine-tuning LMs."""

from .backends import BACKENDS, resolve_backend
from .contract import DistillConfig, FusedRows, LossOptions, RowRecord, Teachers, TopkRecord
from .loss import DynSDPBLossFunction, LossStats, fused_loss, loss_stats
from .fused_linear import FusedLinearDynSDPBFunction
from .functional import dynsdpb_loss, fused_linear_dynsdpb_loss
from .module import DistillStats, DynSDPBLoss, FusedLinearDynSDPBLoss, RingLoss
from .reference import reference_fused_rows, row_statistics
from .ring import RingLookup, TeacherRing
from .sampler import OverlapBatchSampler, SampleIdCollator, SampleIdDataset, VisitBatchSampler

__version__ = "0.2.0"

__all__ = [
    "BACKENDS",
    "DistillConfig",
    "DistillStats",
    "DynSDPBLoss",
    "DynSDPBLossFunction",
    "FusedLinearDynSDPBFunction",
    "FusedLinearDynSDPBLoss",
    "FusedRows",
    "LossOptions",
    "LossStats",
    "OverlapBatchSampler",
    "VisitBatchSampler",
    "RingLoss",
    "RingLookup",
    "RowRecord",
    "SampleIdCollator",
    "SampleIdDataset",
    "TeacherRing",
    "Teachers",
    "TopkRecord",
    "dynsdpb_loss",
    "fused_linear_dynsdpb_loss",
    "fused_loss",
    "loss_stats",
    "reference_fused_rows",
    "resolve_backend",
    "row_statistics",
]
