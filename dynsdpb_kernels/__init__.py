"""Fused kernels for DynSDPB: self-distillation from the previous mini-batch for fine-tuning LMs."""

from .backends import BACKENDS, resolve_backend
from .loss import DynSDPBLossFunction, LossOptions, LossStats, dynsdpb_loss, fused_loss, loss_stats
from .reference import reference_fused_rows, row_statistics
from .rows import DistillConfig, FusedRows

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "DistillConfig",
    "DynSDPBLossFunction",
    "FusedRows",
    "LossOptions",
    "LossStats",
    "dynsdpb_loss",
    "fused_loss",
    "loss_stats",
    "reference_fused_rows",
    "resolve_backend",
    "row_statistics",
]
