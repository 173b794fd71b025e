"""Every argument and value check of the package, in one place.

Argument checks (types, dtypes, shapes, devices, options) read no device value. The value check
(`check_values`: label range, teacher_index range, finiteness) costs one device-to-host sync, and names
the argument at fault only after it failed.
"""

from __future__ import annotations

import torch

from .backends import BACKENDS
from .contract import LOGIT_DTYPES, REDUCTIONS, STATS_WIDTHS, LossOptions

def check_options(options: LossOptions) -> None:
    """ValueError / TypeError naming the option of `options` that is out of range."""
    config = options.distill
    if not (isinstance(config.alpha, (int, float)) and config.alpha >= 0 and config.alpha < float("inf")):
        raise ValueError(f"alpha must be a finite number >= 0, got {config.alpha!r}")
    if not (isinstance(config.tau, (int, float)) and config.tau > 0 and config.tau < float("inf")):
        raise ValueError(f"tau must be a finite number > 0, got {config.tau!r}")
    softcap = config.softcap
    if softcap is not None and (
        isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not 0 < softcap < float("inf")
    ):
        raise ValueError(f"softcap must be None (no capping) or a finite float > 0, got {softcap!r}")
    if isinstance(config.ignore_index, bool) or not isinstance(config.ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {config.ignore_index!r}")
    if options.reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {options.reduction!r}")
    if options.backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {options.backend!r}")


def check_positive_int(name: str, value: object) -> None:
    """ValueError naming `name` unless value is an int >= 1 (a bool is not one)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def check_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_float(name: str, tensor: torch.Tensor, allowed: tuple[torch.dtype, ...] | None = None) -> None:
    if not tensor.is_floating_point() or (allowed is not None and tensor.dtype not in allowed):
        expected = ", ".join(str(d) for d in allowed) if allowed else "a floating-point dtype"
        raise TypeError(f"{name} must have dtype {expected}, got {tensor.dtype}")


def check_integer(name: str, tensor: torch.Tensor) -> None:
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (int64), got {tensor.dtype}")


def check_device(name: str, tensor: torch.Tensor, device: torch.device) -> None:
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device} but logits are on {device}; move them to one device")


def check_logits(name: str, tensor: object, shapes: str) -> torch.Tensor:
    """`tensor` as a float tensor of a LOGIT_DTYPES dtype with 2 or 3 dimensions (`shapes` names them)."""
    tensor = check_tensor(name, tensor)
    check_float(name, tensor, LOGIT_DTYPES)
    if tensor.dim() not in (2, 3):
        raise ValueError(f"{name} must have shape {shapes}, got {tuple(tensor.shape)}")
    return tensor


def check_contract(
    logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_rows: torch.Tensor | None,
    teacher_index: torch.Tensor | None,
    teacher_stats: torch.Tensor | None,
    teacher_support: torch.Tensor | None = None,
    teacher_tail: torch.Tensor | None = None,
) -> None:
    """Shapes, dtypes and devices of the row contract (contract.py); no host sync."""
    check_float("logits", logits, LOGIT_DTYPES)
    if logits.dim() != 2 or logits.shape[1] < 1:
        raise ValueError(f"logits must have shape (N, V) with V >= 1, got {tuple(logits.shape)}")
    if logits.numel() and logits.stride(1) != 1:
        raise ValueError("logits must have unit stride along the vocabulary dimension")
    n_rows, vocab_size = logits.shape
    check_integer("labels", labels)
    if labels.shape != (n_rows,):
        raise ValueError(f"labels must have shape ({n_rows},) to match logits {tuple(logits.shape)}, got {tuple(labels.shape)}")
    check_device("labels", labels, logits.device)
    if (teacher_rows is None) != (teacher_index is None):
        raise ValueError("teacher_rows and teacher_index must be given together")
    if teacher_stats is not None and teacher_rows is None:
        raise ValueError("teacher_stats needs teacher_rows")
    if teacher_rows is None or teacher_index is None:
        return
    check_float("teacher_rows", teacher_rows)
    if teacher_support is not None:
        check_integer("teacher_support", teacher_support)
        if teacher_support.dim() != 2 or teacher_support.shape != teacher_rows.shape or teacher_support.shape[1] > vocab_size:
            raise ValueError(
                f"teacher_support must be (R, k) like the top-k teacher_rows {tuple(teacher_rows.shape)} with k <= {vocab_size}, "
                f"got {tuple(teacher_support.shape)}"
            )
        check_device("teacher_support", teacher_support, logits.device)
        if teacher_stats is None:
            raise ValueError("top-k teachers (teacher_support) need teacher_stats: their (u, d) on the full row")
        if teacher_tail is not None:
            if teacher_tail.dtype != torch.float32 or teacher_tail.shape != (teacher_rows.shape[0],):
                raise ValueError(
                    f"teacher_tail must be float32 of shape ({teacher_rows.shape[0]},), got {teacher_tail.dtype} "
                    f"{tuple(teacher_tail.shape)}"
                )
            check_device("teacher_tail", teacher_tail, logits.device)
    elif teacher_tail is not None:
        raise ValueError("teacher_tail applies to top-k teachers: give teacher_support too")
    elif teacher_rows.dim() != 2 or teacher_rows.shape[1] != vocab_size:
        raise ValueError(
            f"teacher_rows must have shape (R, {vocab_size}) (the logits' vocabulary), got {tuple(teacher_rows.shape)}"
        )
    if teacher_rows.numel() and teacher_rows.stride(1) != 1:
        raise ValueError("teacher_rows must have unit stride along the vocabulary dimension")
    check_device("teacher_rows", teacher_rows, logits.device)
    check_integer("teacher_index", teacher_index)
    if teacher_index.shape != (n_rows,):
        raise ValueError(f"teacher_index must have shape ({n_rows},), got {tuple(teacher_index.shape)}")
    check_device("teacher_index", teacher_index, logits.device)
    if teacher_stats is not None:
        n_teachers = teacher_rows.shape[0]
        if teacher_stats.dtype != torch.float32 or teacher_stats.shape not in [(n_teachers, width) for width in STATS_WIDTHS]:
            raise ValueError(
                f"teacher_stats must be float32 of shape ({n_teachers}, 2) (u, d) or ({n_teachers}, 4) "
                f"(u, d, tau_rec, log_norm), got {teacher_stats.dtype} {tuple(teacher_stats.shape)}"
            )
        if not teacher_stats.is_contiguous():
            raise ValueError("teacher_stats must be contiguous")
        check_device("teacher_stats", teacher_stats, logits.device)


def check_linear_head(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor) -> None:
    """hidden (N, H), weight (V, H) of hidden's dtype, bias (V,) or None, labels (N,), all on hidden's device."""
    check_float("hidden", hidden, LOGIT_DTYPES)
    check_float("weight", weight, (hidden.dtype,))
    if hidden.dim() != 2 or weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"hidden must be (N, H) and weight (V, H) with the same H, got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != hidden.dtype):
        raise ValueError(f"bias must be ({weight.shape[0]},) of dtype {hidden.dtype}, got {bias.dtype} {tuple(bias.shape)}")
    for name, tensor in (("weight", weight), ("labels", labels), ("bias", bias)):
        if tensor is not None and tensor.device != hidden.device:
            raise ValueError(f"{name} is on {tensor.device} but hidden is on {hidden.device}")
    if labels.shape != (hidden.shape[0],):
        raise ValueError(
            f"labels must have shape ({hidden.shape[0]},) to match hidden {tuple(hidden.shape)}, got {tuple(labels.shape)}"
        )


def labels_out_of_range(labels: torch.Tensor, vocab_size: int, ignore_index: int) -> torch.Tensor:
    """Bool mask of the labels that are neither in [0, V) nor ignore_index (no sync)."""
    return (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))


def raise_for_bad_labels(labels: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """ValueError naming `labels` when one lies outside [0, V) and is not ignore_index (reads the device)."""
    out_of_range = labels_out_of_range(labels, vocab_size, ignore_index)
    if out_of_range.any():
        raise ValueError(
            f"labels must lie in [0, {vocab_size}) or equal ignore_index={ignore_index}; "
            f"found {int(out_of_range.sum())} outside, e.g. {labels[out_of_range][:5].tolist()}"
        )


def check_values(
    labels: torch.Tensor,
    vocab_size: int,
    ignore_index: int,
    *,
    logits: torch.Tensor | None = None,
    teacher_rows: torch.Tensor | None = None,
    teacher_index: torch.Tensor | None = None,
    row_terms: torch.Tensor | None = None,
    student_stats: torch.Tensor | None = None,
) -> None:
    """Label range, teacher_index range and finiteness, with one host sync.

    Finiteness is read from the kernel's outputs `row_terms` (N, 5) and `student_stats` (N, 2) when they
    are given (a non-finite logit, or teacher logit in use, makes its row's outputs non-finite: no extra
    pass over the logits), otherwise from `logits` (N, V) and the rows of `teacher_rows` that
    `teacher_index` uses. Only once the check failed are the inputs read again to name the argument at
    fault; `logits` is None for the fused head, whose logits never exist. Meta tensors hold no values:
    nothing to check.
    """
    if labels.device.type == "meta":
        return
    bad_labels = labels_out_of_range(labels, vocab_size, ignore_index).any()
    has_teachers = teacher_rows is not None and teacher_index is not None
    bad_index = ((teacher_index < -1) | (teacher_index >= teacher_rows.shape[0])).any() if has_teachers else None
    if row_terms is not None and student_stats is not None:
        bad_values = ~torch.isfinite(row_terms).all() | ~torch.isfinite(student_stats).all()
    else:
        assert logits is not None, "check_values reads the logits when the kernel's outputs are not given"
        bad_values = ~torch.isfinite(logits).all()
        if has_teachers:
            used = _used_teachers(teacher_rows, teacher_index, labels, ignore_index)
            bad_values |= ~torch.isfinite(teacher_rows.index_select(0, used)).all()
    if torch.compiler.is_compiling():
        # Traced: no host sync and no graph break. The compiled step raises where a check fails, as a
        # RuntimeError on the CPU and as a device-side assertion on CUDA (like F.cross_entropy's own label
        # check), without the detail that naming a row would need a sync for.
        torch._assert_async(~bad_labels, f"labels must lie in [0, {vocab_size}) or equal ignore_index={ignore_index}")
        if bad_index is not None:
            torch._assert_async(~bad_index, f"teacher_index must lie in [-1, {teacher_rows.shape[0]}), -1 meaning no teacher")
        torch._assert_async(~bad_values, "logits or teacher logits (or hidden and weight) contain NaN or inf")
        return
    bad = bad_labels | bad_values if bad_index is None else bad_labels | bad_index | bad_values
    if bad.item():
        _raise_for_bad_values(labels, vocab_size, ignore_index, logits, teacher_rows, teacher_index, row_terms, student_stats)
        raise FloatingPointError("the DynSDPB loss produced non-finite values from finite inputs")


def check_teacher_stats(teacher_stats: torch.Tensor) -> None:
    """Caller-given teacher statistics (R, 2) (u, d): every value in [0, 1] (NaN and inf are not), with
    one host sync (a device-side assertion when traced by torch.compile, as check_values)."""
    if teacher_stats.device.type == "meta":
        return
    in_range = ((teacher_stats >= 0) & (teacher_stats <= 1)).all()
    message = "teacher_stats must hold (u, d) in [0, 1] for every teacher row (NaN or inf is not)"
    if torch.compiler.is_compiling():
        torch._assert_async(in_range, message)
        return
    if not in_range.item():
        bad_rows = (~((teacher_stats >= 0) & (teacher_stats <= 1))).any(1).nonzero().squeeze(1)
        raise ValueError(f"{message}; {bad_rows.numel()} rows are not, e.g. rows {bad_rows[:5].tolist()}: "
                         f"{teacher_stats[bad_rows[:3]].tolist()}")


def _used_teachers(teacher_rows: torch.Tensor, teacher_index: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Indices of the teacher rows that valid student rows read (clamped into range; the range is checked apart)."""
    return teacher_index[(teacher_index >= 0) & (labels != ignore_index)].clamp_max(teacher_rows.shape[0] - 1)


def _raise_for_bad_values(labels, vocab_size, ignore_index, logits, teacher_rows, teacher_index, row_terms, student_stats) -> None:
    """Name the argument behind a failed check_values (runs only once the check has failed)."""
    raise_for_bad_labels(labels, vocab_size, ignore_index)
    if teacher_rows is not None and teacher_index is not None:
        if (teacher_index >= teacher_rows.shape[0]).any() or (teacher_index < -1).any():
            raise ValueError(f"teacher_index must lie in [-1, {teacher_rows.shape[0]}), -1 meaning no teacher")
    if logits is not None:
        bad_rows = (~torch.isfinite(logits)).any(1).nonzero().squeeze(1)
        if bad_rows.numel():
            raise ValueError(f"logits contain NaN or inf in {bad_rows.numel()} rows, e.g. rows {bad_rows[:5].tolist()}")
    if teacher_rows is not None and teacher_index is not None:
        used = _used_teachers(teacher_rows, teacher_index, labels, ignore_index)
        bad_teachers = (~torch.isfinite(teacher_rows[used])).any(1)
        if bad_teachers.any():
            raise ValueError(
                f"teacher logits contain NaN or inf in {int(bad_teachers.sum())} rows used as teachers, "
                f"e.g. teacher rows {used[bad_teachers][:5].tolist()}"
            )
    if logits is None and row_terms is not None and student_stats is not None:
        bad_rows = (~torch.isfinite(row_terms).all(1) | ~torch.isfinite(student_stats).all(1)).nonzero().squeeze(1)
        if bad_rows.numel():
            raise ValueError(
                f"hidden and weight give logits with NaN or inf in {bad_rows.numel()} rows, e.g. rows {bad_rows[:5].tolist()}"
            )
