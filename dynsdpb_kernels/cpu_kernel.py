"""The C++ CPU kernel (dynsdpb_kernels/csrc/dynsdpb_cpu.cpp, shipped inside the package): built on first
use with ninja through torch.utils.cpp_extension.load, once per CPU capability, cached in torch's
extensions folder and rebuilt when the source changes.

The capability is torch.backends.cpu.get_cpu_capability() (what ATen itself dispatches to on this machine,
lowered by ATEN_CPU_CAPABILITY): "AVX512", "AVX2" or anything else (compiled for the baseline). Each gets
its own extension name (dynsdpb_cpu_avx512, dynsdpb_cpu_avx2, dynsdpb_cpu_default) and that ISA's flags,
never -march=native, so a shared extensions folder cannot hand AVX-512 code to a machine without it.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from types import ModuleType

import torch

from .contract import N_ROW_TERMS, DistillConfig, FusedRows, RowRecord, TopkRecord, gradient_buffer, row_terms_dtype

SOURCE = Path(__file__).resolve().parent / "csrc" / "dynsdpb_cpu.cpp"
# The kernel reads these dtypes directly; a teacher in any other float dtype is converted first.
NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# Elements per block of the kernel's streamed passes: three float32 blocks per thread (24 KB) stay in L1.
BLOCK_V = 2048
COMMON_FLAGS = ["-O3", "-fopenmp", "-fno-math-errno"]
# at::vec (ATen/cpu/vec) picks its AVX2 / AVX-512 classes from CPU_CAPABILITY_*; the -m flags let the
# compiler emit them. These are the flags ATen builds its own AVX2 / AVX512 kernels with.
ISA_FLAGS = {
    "avx512": ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512",
               "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
    "avx2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
    "default": ["-DCPU_CAPABILITY=DEFAULT"],
}


def cpu_isa() -> str:
    """The instruction set the kernel is built for here: "avx512", "avx2" or "default" (from ATen's capability)."""
    capability = torch.backends.cpu.get_cpu_capability().lower()
    return capability if capability in ISA_FLAGS else "default"


def extension_name(isa: str | None = None) -> str:
    return f"dynsdpb_cpu_{isa or cpu_isa()}"


@functools.cache
def load_extension() -> ModuleType:
    """Compile (first time, about a minute) or load the extension for this machine's ISA; raises when it cannot be built."""
    from torch.utils import cpp_extension

    isa = cpu_isa()
    name = extension_name(isa)
    build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
    built = next(iter(build_dir.glob(f"{name}*.so")), None)
    if built is None or built.stat().st_mtime < SOURCE.stat().st_mtime:
        print(f"dynsdpb_kernels: compiling the C++ CPU kernel ({isa}) into {build_dir} (once, about a minute)...", file=sys.stderr)
    return cpp_extension.load(
        name=name,
        sources=[str(SOURCE)],
        extra_cflags=COMMON_FLAGS + ISA_FLAGS[isa],
        extra_ldflags=["-fopenmp"],
        verbose=os.environ.get("DYNSDPB_VERBOSE_BUILD", "0") == "1",
    )


def build_info() -> dict[str, str | int]:
    """The C++ kernel this process runs: {"isa", "extension", "path", "vector_lanes"} (builds it if needed)."""
    module = load_extension()
    return {"isa": cpu_isa(), "extension": module.__name__, "path": str(module.__file__), "vector_lanes": module.vector_lanes()}


def check_topk_record(topk: TopkRecord) -> None:
    """The layout the kernel writes a TopkRecord into: values (P, k) float32 / bfloat16 / float16 / float64 and
    support (P, k) int64 with unit stride along k, tail (P,) contiguous float32."""
    if topk.values.dtype not in NATIVE_DTYPES or topk.values.stride(-1) != 1:
        raise ValueError(f"record.topk.values must be (P, k) of {NATIVE_DTYPES} with unit stride, got {topk.values.dtype}")
    if topk.support.dtype != torch.int64 or topk.support.stride(-1) != 1 or topk.support.shape != topk.values.shape:
        raise ValueError(f"record.topk.support must be (P, k) int64 like the values, got {topk.support.dtype} {tuple(topk.support.shape)}")
    if topk.tail.dtype != torch.float32 or not topk.tail.is_contiguous():
        raise ValueError(f"record.topk.tail must be (P,) contiguous float32, got {topk.tail.dtype}")


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
    """Run the C++ kernel on CPU tensors; arguments and results follow contract.py (`record`: the fused ring write,
    a top-k record's values, ids and tail mass included: backends.RECORDS_TOPK)."""
    n_rows, _ = logits.shape
    row_terms = torch.empty(n_rows, N_ROW_TERMS, dtype=torch.float32)
    student_stats = torch.empty(n_rows, 2, dtype=torch.float32)
    grad = gradient_buffer(logits, compute_grad, grad_out)
    if teacher_rows is not None and teacher_rows.dtype not in NATIVE_DTYPES:
        teacher_rows = teacher_rows.float()
    topk = record.topk if record is not None else None  # a top-k ring: the kernel selects and writes it
    if topk is not None:
        check_topk_record(topk)
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
            config.dynamic_alpha,
            config.dynamic_tau,
            int(config.ignore_index),
            float(config.softcap) if config.softcap is not None else 0.0,  # 0: no softcapping
            compute_grad,
            grad if grad is not None else logits,
            row_terms,
            student_stats,
            record.index.contiguous() if record is not None else None,
            record.ring_logits if record is not None else None,
            record.stats if record is not None else None,
            teacher_support.contiguous() if teacher_support is not None else None,
            teacher_tail.float().contiguous() if teacher_tail is not None else None,
            topk.values if topk is not None else None,
            topk.support if topk is not None else None,
            topk.tail if topk is not None else None,
            BLOCK_V,
        )
    return FusedRows(row_terms=row_terms.to(row_terms_dtype(logits.dtype)), student_stats=student_stats, grad=grad)
