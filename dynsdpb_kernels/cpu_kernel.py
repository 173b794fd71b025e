"""The C++ CPU kernel (csrc/dynsdpb_cpu.cpp): built on first use with ninja through
torch.utils.cpp_extension.load, cached in torch's extensions folder and rebuilt when the source changes."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from types import ModuleType

import torch

from .contract import N_ROW_TERMS, DistillConfig, FusedRows, RowRecord, gradient_buffer, row_terms_dtype

EXTENSION_NAME = "dynsdpb_cpu"
SOURCE_NAME = "dynsdpb_cpu.cpp"
# The kernel reads these dtypes directly; a teacher in any other float dtype is converted first.
NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def source_path() -> Path:
    """csrc/ of a source checkout, or the copy a wheel ships inside the package."""
    package = Path(__file__).resolve().parent
    for folder in (package.parent / "csrc", package / "csrc"):
        if (folder / SOURCE_NAME).is_file():
            return folder / SOURCE_NAME
    raise FileNotFoundError(f"{SOURCE_NAME} is neither in {package.parent / 'csrc'} nor in {package / 'csrc'}")


@functools.cache
def load_extension() -> ModuleType:
    """Compile (first time, about a minute) or load the extension; raises when it cannot be built."""
    from torch.utils import cpp_extension

    source = source_path()
    build_dir = Path(cpp_extension._get_build_directory(EXTENSION_NAME, verbose=False))
    built = next(iter(build_dir.glob(f"{EXTENSION_NAME}*.so")), None)
    if built is None or built.stat().st_mtime < source.stat().st_mtime:
        print(f"dynsdpb_kernels: compiling the C++ CPU kernel into {build_dir} (once, about a minute)...", file=sys.stderr)
    return cpp_extension.load(
        name=EXTENSION_NAME,
        sources=[str(source)],
        extra_cflags=["-O3", "-march=native", "-fopenmp", "-fno-math-errno"],
        extra_ldflags=["-fopenmp"],
        verbose=os.environ.get("DYNSDPB_VERBOSE_BUILD", "0") == "1",
    )


def cpu_fused_rows(
    logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_rows: torch.Tensor | None,
    teacher_index: torch.Tensor | None,
    teacher_stats: torch.Tensor | None,
    config: DistillConfig,
    grad_scale: torch.Tensor,
    compute_grad: bool,
    grad_out: torch.Tensor | None = None,
    record: RowRecord | None = None,
    teacher_support: torch.Tensor | None = None,
    teacher_tail: torch.Tensor | None = None,
) -> FusedRows:
    """Run the C++ kernel on CPU tensors; arguments and results follow contract.py (`record`: the fused ring write)."""
    n_rows, _ = logits.shape
    row_terms = torch.empty(n_rows, N_ROW_TERMS, dtype=torch.float32)
    student_stats = torch.empty(n_rows, 2, dtype=torch.float32)
    grad = gradient_buffer(logits, compute_grad, grad_out)
    if teacher_rows is not None and teacher_rows.dtype not in NATIVE_DTYPES:
        teacher_rows = teacher_rows.float()
    if n_rows:
        load_extension().fused_rows(
            logits,
            labels.contiguous(),
            teacher_rows,
            teacher_index.contiguous() if teacher_index is not None else None,
            teacher_stats,
            grad_scale,
            float(config.alpha),
            float(config.tau),
            bool(config.dynamic),
            int(config.ignore_index),
            compute_grad,
            grad if grad is not None else logits,
            row_terms,
            student_stats,
            record.index.contiguous() if record is not None else None,
            record.ring_logits if record is not None else None,
            record.stats if record is not None else None,
            teacher_support.contiguous() if teacher_support is not None else None,
            teacher_tail.float().contiguous() if teacher_tail is not None else None,
        )
    return FusedRows(row_terms=row_terms.to(row_terms_dtype(logits.dtype)), student_stats=student_stats, grad=grad)
