"""Ahead-of-time compilation of the Triton kernel for CUDA targets, on a machine without a GPU.

Triton compiles a kernel for a named target (`GPUTarget("cuda", 90, 32)`) without a driver: Python AST ->
Triton IR -> LLVM IR -> PTX -> cubin (the ptxas shipped inside Triton). This module builds, for each
kernel specialization the public API can launch, the launch that triton_kernel.triton_fused_rows makes for
it, turns that launch into a signature, constexprs and alignment attributes with Triton's own launch
binder (the code a real `kernel[grid](...)` call runs), and compiles it. Used by
tests/test_gpu_compile.py, bench/triton_resources.py and bench/sass_roofline.py.

It needs the compiled Triton front end, not the interpreter: run it in a process without
TRITON_INTERPRET=1 (`python -m dynsdpb_kernels.triton_aot --arch 90` does so and prints one JSON line
per specialization).

Specializations. The kernel's constexprs are fixed by what a call passes (triton_kernel.triton_fused_rows):
teacher rows or none, their statistics, dynamic alpha/tau, the gradient, a ring record (rows in the
ring's dtype; for a top-k ring the row's k largest logits, ids and tail mass, selected by the kernel; or
the statistics only), top-k teachers with or without a tail; the
pointer types by the logits' and teachers' dtypes; softcapping (SOFTCAP) in a few launches
(softcap_specializations). Who launches what:
  dynsdpb_loss / fused_linear_dynsdpb_loss: no teacher, or dense teachers without statistics, no record
  DynSDPBLoss / FusedLinearDynSDPBLoss / the Trainer: a ring's teachers (ring dtype, statistics given),
      dense or top-k with a tail, recording (record="new"/"all") or not (record="none")
  fused_loss: any of these, also dense teachers with statistics and top-k teachers without a tail
In-place gradients (inplace_grad=True, and always in the fused head) pass the logits as the gradient
buffer: the same pointer type, so the same specialization (`inplace_grad_is_same_specialization`).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass

import torch

from .contract import N_STATS, N_STATS_WITH_LOG_NORM, DistillConfig, RowRecord, TopkRecord

# A large vocabulary (Llama 3's): the launcher's choice of BLOCK_V and warps for it is the one compiled.
LARGE_VOCAB = 128256
# A vocabulary not divisible by 16 (GPT-2's): strides and row starts lose Triton's alignment attributes.
ODD_VOCAB = 50257
# The top-k rings' default k (ring.TeacherRing).
TOPK_K = 64

FLOAT_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
RING_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The record factor of the flag product and the pairwise cover. "topk" (the kernel selects a top-k ring's record)
# is compiled in the few launches a top-k ring makes (topk_record_specializations and the lists below) rather
# than crossed with every other factor, which would add 54 sm_90 specializations to the compile check.
RECORDS = ("none", "rows", "stats")
# The softcap of softcapped specializations (Gemma 2's final_logit_softcapping); a runtime argument, so any
# value compiles to the same kernel.
SOFTCAP_EXAMPLE = 30.0


@dataclass(frozen=True)
class Specialization:
    """One kernel variant, described by what the caller passes.

    teacher: "none", "dense" (full rows, any float dtype) or "topk" (k values + ids; statistics required).
    teacher_stats: statistics given; log_norm: of four columns, (u, d, tau_rec, log_norm), as a dense ring
        passes them (TEACHER_LOG_NORM), else (u, d).
    record: "none", "rows" (rows and (u, d, tau_rec, log_norm) into a dense ring of ring_dtype, as the ring
        records), "stats" ((u, d) only) or "topk" ((u, d) and the k = TOPK_K largest logits in ring_dtype,
        their ids and tail mass: a top-k ring's record, selected by the kernel, RECORD_TOPK).
    """

    logits_dtype: torch.dtype
    teacher: str = "none"
    teacher_dtype: torch.dtype = torch.bfloat16
    teacher_stats: bool = False
    tail: bool = False
    record: str = "none"
    ring_dtype: torch.dtype = torch.bfloat16
    dynamic: bool | str = True  # DistillConfig.dynamic: True, False, "alpha" or "tau"
    compute_grad: bool = True
    vocab_size: int = LARGE_VOCAB
    softcap: bool = False  # DistillConfig.softcap set (SOFTCAP_EXAMPLE) or None
    log_norm: bool = False  # teacher_stats of four columns (last: the positional fields above keep their places)

    @property
    def name(self) -> str:
        parts = [FLOAT_NAMES[self.logits_dtype]]
        if self.teacher != "none":
            parts.append(f"{self.teacher}-{FLOAT_NAMES[self.teacher_dtype]}")
            parts += ["stats"] * self.teacher_stats + ["lognorm"] * self.log_norm + ["tail"] * self.tail
        else:
            parts.append("no-teacher")
        if self.record != "none":
            ring = f"-{FLOAT_NAMES[self.ring_dtype]}" if self.record in ("rows", "topk") else ""
            parts.append(f"record-{self.record}{ring}")
        parts.append(DYNAMIC_NAMES[self.dynamic])
        parts.append("grad" if self.compute_grad else "forward")
        if self.softcap:
            parts.append("softcap")
        if self.vocab_size != LARGE_VOCAB:
            parts.append(f"V{self.vocab_size}")
        return "-".join(parts)


# DistillConfig.dynamic's values, as they appear in a specialization's name.
DYNAMIC_NAMES = {False: "static", True: "dynamic", "alpha": "alpha-only", "tau": "tau-only"}
# The teacher side as one factor: its kind, whether statistics are given and whether a tail is.
TEACHER_SIDES = {
    "none": dict(teacher="none"),
    "dense": dict(teacher="dense"),
    "dense-stats": dict(teacher="dense", teacher_stats=True),
    "dense-ring": dict(teacher="dense", teacher_stats=True, log_norm=True),
    "topk": dict(teacher="topk", teacher_stats=True),
    "topk-tail": dict(teacher="topk", teacher_stats=True, tail=True),
}
# Every factor of a launch and its values (teacher_dtype is also the ring's dtype when recording rows).
FACTORS = {
    "side": tuple(TEACHER_SIDES),
    "record": RECORDS,
    "dynamic": tuple(DYNAMIC_NAMES),
    "compute_grad": (False, True),
    "logits_dtype": LOGIT_DTYPES,
    "teacher_dtype": RING_DTYPES,
}


def _specialization(row: dict) -> Specialization:
    return Specialization(
        logits_dtype=row["logits_dtype"], teacher_dtype=row["teacher_dtype"], ring_dtype=row["teacher_dtype"],
        record=row["record"], dynamic=row["dynamic"], compute_grad=row["compute_grad"], **TEACHER_SIDES[row["side"]],
    )


def factor_values(spec: Specialization) -> dict:
    """The FACTORS values of `spec`; teacher_dtype is None where nothing of that dtype is passed (no
    teacher and no ring rows), since the kernel is then the same for every teacher dtype."""
    side = next(name for name, fields in TEACHER_SIDES.items()
                if all(getattr(spec, key) == value for key, value in fields.items())
                and spec.teacher_stats == fields.get("teacher_stats", False) and spec.tail == fields.get("tail", False)
                and spec.log_norm == fields.get("log_norm", False))
    uses_dtype = spec.teacher != "none" or spec.record in ("rows", "topk")
    return {"side": side, "record": spec.record, "dynamic": spec.dynamic, "compute_grad": spec.compute_grad,
            "logits_dtype": spec.logits_dtype, "teacher_dtype": spec.teacher_dtype if uses_dtype else None}


def flag_product(
    logits_dtype: torch.dtype = torch.bfloat16, teacher_dtype: torch.dtype = torch.bfloat16
) -> list[Specialization]:
    """Every combination of the kernel's flags (teacher side, record, dynamic, gradient) at one pair of
    dtypes: 6 * 3 * 4 * 2 = 144 specializations."""
    names = ("side", "record", "dynamic", "compute_grad")
    return [
        _specialization(dict(zip(names, values), logits_dtype=logits_dtype, teacher_dtype=teacher_dtype))
        for values in itertools.product(*(FACTORS[name] for name in names))
    ]


def _pairs(row: dict) -> set:
    items = sorted((name, repr(value)) for name, value in row.items())
    return set(itertools.combinations(items, 2))


def pairwise_cover() -> list[Specialization]:
    """A small set in which every pair of values of two factors (FACTORS: teacher side, record, dynamic,
    gradient, logits dtype, teacher/ring dtype) occurs at least once; greedy, deterministic."""
    candidates = [dict(zip(FACTORS, values)) for values in itertools.product(*FACTORS.values())]
    uncovered = set().union(*(_pairs(row) for row in candidates))
    rows = []
    while uncovered:
        best = max(candidates, key=lambda row: len(_pairs(row) & uncovered))  # first of the best: deterministic
        rows.append(best)
        uncovered -= _pairs(best)
    return [_specialization(row) for row in rows]


def odd_vocab_specializations() -> list[Specialization]:
    """The heaviest variants at a vocabulary that is not a multiple of 16 (no alignment attributes)."""
    return [
        Specialization(torch.bfloat16, "dense", torch.bfloat16, True, record="rows", vocab_size=ODD_VOCAB),
        Specialization(torch.bfloat16, "topk", torch.bfloat16, True, True, "topk", vocab_size=ODD_VOCAB),
        Specialization(torch.float32, "dense", torch.float32, vocab_size=ODD_VOCAB),
    ]


def gpu_check_specializations() -> list[Specialization]:
    """What bench/gpu_check.py launches: dynsdpb_loss on float32 and bfloat16 logits with teachers of the
    same dtype; DynSDPBLoss and FusedLinearDynSDPBLoss (dense and top-k rings of the default bfloat16)
    on float32 logits and, in the head benchmark, bfloat16 ones; all dynamic, with the gradient. The
    vocabularies it uses (32000, 128256) are multiples of 16 and at least MAX_BLOCK_V: the same launch."""
    return [
        Specialization(dtype, "dense", dtype) for dtype in (torch.float32, torch.bfloat16)
    ] + [
        Specialization(dtype, "dense", torch.bfloat16, True, record="rows", log_norm=True) for dtype in (torch.float32, torch.bfloat16)
    ] + [
        Specialization(dtype, "topk", torch.bfloat16, True, True, "topk") for dtype in (torch.float32, torch.bfloat16)
    ]


def topk_record_specializations() -> list[Specialization]:
    """The other launches of a top-k ring on Triton, whose kernel selects the record (record "topk", sm_90
    only): the first call (no teacher yet) and the dynamic modes other than True, at bfloat16, and the
    forward-only step (a ring filled under torch.no_grad). gpu_check_specializations, the unaligned
    vocabulary and the softcapped launches hold the DLB step itself on both targets."""
    bf16 = torch.bfloat16
    return [
        Specialization(bf16, "none", record="topk", ring_dtype=bf16),
        Specialization(bf16, "topk", bf16, True, True, "topk", dynamic=False),
        Specialization(bf16, "topk", bf16, True, True, "topk", dynamic="alpha"),
        Specialization(bf16, "topk", bf16, True, True, "topk", dynamic="tau", compute_grad=False),
    ]


def softcap_specializations() -> list[Specialization]:
    """Final-logit softcapping (Gemma 2 / 3) in the launches that carry it: the ring's training step (dense
    with statistics recording rows, top-k with a tail recording statistics), the first step and the fused
    head's chunks (no teacher, float32 logits), and dense teachers without statistics (dynsdpb_loss)."""
    return [
        Specialization(torch.bfloat16, "dense", torch.bfloat16, True, record="rows", softcap=True, log_norm=True),
        Specialization(torch.bfloat16, "topk", torch.bfloat16, True, True, "topk", softcap=True),
        Specialization(torch.float32, "none", record="rows", ring_dtype=torch.bfloat16, softcap=True),
        Specialization(torch.bfloat16, "dense", torch.bfloat16, softcap=True),
    ]


def compile_check_set(arch: int) -> list[Specialization]:
    """What tests/test_gpu_compile.py compiles for `arch`: for sm_90 (H100/H200) every flag combination at
    bfloat16, plus (both targets) the pairwise cover of flags and dtypes, the unaligned vocabulary, the
    softcapped launches and what bench/gpu_check.py launches."""
    specs = flag_product() + topk_record_specializations() if arch == 90 else []
    specs += pairwise_cover() + odd_vocab_specializations() + softcap_specializations() + gpu_check_specializations()
    return list({spec.name: spec for spec in specs}.values())


def example_launch(spec: Specialization, block_v: int | None = None, inplace_grad: bool = False, n_rows: int = 2):
    """The KernelLaunch triton_kernel.triton_fused_rows makes for `spec`, taken from its `launcher` hook
    instead of run: small CPU tensors of the dtypes, shapes and strides a real call passes. `block_v`
    overrides the launcher's block width; `inplace_grad` passes the logits as the gradient buffer, as
    loss.fused_loss does for inplace_grad=True and the fused head always."""
    from .triton_kernel import triton_fused_rows

    vocab_size = spec.vocab_size
    logits = torch.zeros(n_rows, vocab_size, dtype=spec.logits_dtype)
    labels = torch.zeros(n_rows, dtype=torch.int64)
    teacher_rows = teacher_index = teacher_stats = support = tail = record = None
    n_teachers = 2 * n_rows  # a ring: recorded slots are distinct from the slots read
    if spec.teacher != "none":
        width = TOPK_K if spec.teacher == "topk" else vocab_size
        teacher_rows = torch.zeros(n_teachers, width, dtype=spec.teacher_dtype)
        teacher_index = torch.arange(n_rows, dtype=torch.int64)
        if spec.teacher_stats:
            teacher_stats = torch.zeros(n_teachers, N_STATS_WITH_LOG_NORM if spec.log_norm else N_STATS, dtype=torch.float32)
        if spec.teacher == "topk":
            support = torch.zeros(n_teachers, TOPK_K, dtype=torch.int64)
            tail = torch.zeros(n_teachers, dtype=torch.float32) if spec.tail else None
    if spec.record != "none":
        ring_rows = torch.zeros(n_teachers, vocab_size, dtype=spec.ring_dtype) if spec.record == "rows" else None
        stats_width = N_STATS_WITH_LOG_NORM if spec.record == "rows" else N_STATS  # what a dense / top-k ring records
        topk = None
        if spec.record == "topk":
            topk = TopkRecord(torch.zeros(n_teachers, TOPK_K, dtype=spec.ring_dtype),
                              torch.zeros(n_teachers, TOPK_K, dtype=torch.int64), torch.zeros(n_teachers, dtype=torch.float32))
        record = RowRecord(torch.arange(n_rows, 2 * n_rows), ring_rows, torch.zeros(n_teachers, stats_width, dtype=torch.float32), topk)
    launches = []
    triton_fused_rows(
        logits, labels, teacher_rows, teacher_index, teacher_stats,
        DistillConfig(dynamic=spec.dynamic, softcap=SOFTCAP_EXAMPLE if spec.softcap else None),
        torch.ones(2, dtype=torch.float32), spec.compute_grad, grad_out=logits if inplace_grad else None,
        record=record, teacher_support=support, teacher_tail=tail, block_v=block_v, launcher=launches.append,
    )
    (launch,) = launches
    return launch


def _kernel():
    from .triton_kernel import _dynsdpb_row_kernel

    if not hasattr(_dynsdpb_row_kernel, "params"):
        raise RuntimeError("the Triton kernel was defined under TRITON_INTERPRET=1; compile it in a process without it")
    return _dynsdpb_row_kernel


def compile_inputs(launch, target, kernel=None) -> tuple[dict, dict, dict, dict]:
    """(signature, constexprs, attrs, options) that `kernel[grid](**arguments, **constexprs, num_warps=...)`
    hands to triton.compile for `target`: Triton's own launch binder specializes the arguments (pointer
    dtypes, integer widths, integers equal to 1, 16-byte alignment of pointers and integers).
    `launch` is a KernelLaunch (or anything with .arguments, .constexprs, .num_warps); `kernel` a
    @triton.jit function, by default our row kernel."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = _kernel() if kernel is None else kernel
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = {"num_warps": launch.num_warps, "debug": kernel.debug}
    bound, specialization, options = binder(**launch.arguments, **launch.constexprs, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return signature, constexprs, attrs, options.__dict__


def compile_launch(launch, arch: int, kernel=None):
    """triton.compile of `launch` for CUDA compute capability `arch` (80, 90, ...); returns the CompiledKernel
    (asm["ptx"], asm["cubin"], metadata). Raises Triton's CompilationError on a compile error. `kernel`:
    another @triton.jit function than our row kernel (bench/sass_roofline.py compiles Liger's with it)."""
    import triton
    from triton.backends.compiler import GPUTarget

    kernel = _kernel() if kernel is None else kernel
    target = GPUTarget("cuda", arch, 32)
    signature, constexprs, attrs, options = compile_inputs(launch, target, kernel)
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=target, options=options)


def nvdisasm_path(arch: int) -> str:
    """The nvdisasm shipped next to Triton's ptxas (backends/nvidia/bin)."""
    return os.path.join(os.path.dirname(ptxas_path(arch)), "nvdisasm")


def ptxas_path(arch: int) -> str:
    """The ptxas Triton itself runs for `arch` (the newer one, `ptxas-blackwell`, from sm_90 on)."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(arch).path


def cubin_resources(cubin: bytes, arch: int) -> dict[str, int]:
    """Registers per thread, static shared memory, local memory (spills and stack) per thread, from
    `cuobjdump --dump-resource-usage` on the cubin Triton made."""
    import tempfile

    tool = os.path.join(os.path.dirname(ptxas_path(arch)), "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        command = [tool, "--dump-resource-usage", file.name]
        report = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", report))
    return {"registers": int(fields["REG"]), "stack": int(fields["STACK"]), "static_shared": int(fields["SHARED"]),
            "local": int(fields["LOCAL"])}


def inplace_grad_is_same_specialization(spec: Specialization, arch: int = 90) -> bool:
    """Whether an in-place gradient (grad buffer = the logits) gives the same compile inputs as a fresh one."""
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", arch, 32)
    fresh = compile_inputs(example_launch(spec), target)
    inplace = compile_inputs(example_launch(spec, inplace_grad=True), target)
    return repr(fresh) == repr(inplace)


def compile_all(specs: list[Specialization], arch: int) -> list[dict]:
    """Compile every spec for `arch`; one result per spec: name, ok, error (first lines), registers, local."""
    results = []
    for spec in specs:
        launch = example_launch(spec)
        result: dict = {"name": spec.name, "arch": arch, "block_v": launch.constexprs["BLOCK_V"],
                        "num_warps": launch.num_warps}
        try:
            compiled = compile_launch(launch, arch)
            result.update(ok=True, **cubin_resources(compiled.asm["cubin"], arch))
            if spec.compute_grad:
                result["inplace_same"] = inplace_grad_is_same_specialization(spec, arch)
        except Exception as error:  # every compile error is reported, and fails the test
            result.update(ok=False, error=f"{type(error).__name__}: {error}"[:4000])
        results.append(result)
    return results


def start_isolated(arch: int) -> subprocess.Popen:
    """Start compile_all(compile_check_set(arch), arch) in a fresh Python process without TRITON_INTERPRET
    (the interpreter replaces triton.jit, and a compile needs the real one); read it with `results`."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "dynsdpb_kernels.triton_aot", "--arch", str(arch)]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def results(process: subprocess.Popen, timeout: float = 1800) -> list[dict]:
    """The JSON results of a process from start_isolated; raises with its stderr if it failed."""
    stdout, stderr = process.communicate(timeout=timeout)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(process.args)} failed ({process.returncode}):\n{stderr[-4000:]}")
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability times 10 (80, 90)")
    parser.add_argument("--only", default="", help="comma-separated specialization names (default: all)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: compiling needs the real triton.jit")
    specs = compile_check_set(args.arch)
    if args.only:
        wanted = set(args.only.split(","))
        specs = [spec for spec in specs if spec.name in wanted]
        missing = wanted - {spec.name for spec in specs}
        if missing:
            parser.error(f"unknown specializations: {sorted(missing)}")
    for result in compile_all(specs, args.arch):
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
