"""Registers, spills, shared memory and occupancy of the Triton kernel on H100/H200 (sm_90) and A100
(sm_80), from compiles.

    python bench/triton_resources.py            # writes bench/triton_resources.csv and .md (no GPU needed)

For each specialization below and each (BLOCK_V, num_warps) candidate, the launch that
triton_kernel.triton_fused_rows makes for a large vocabulary (V = 128256) is compiled for sm_90 and sm_80 with
triton.compile (dynsdpb_kernels/triton_aot.py, in a process without TRITON_INTERPRET), and the PTX is
run again through the ptxas Triton uses, with Triton's flags and -v, for registers per thread and spill
stores / loads; the cubin's register count (cuobjdump) must agree. Shared memory is Triton's dynamic
shared memory (metadata.shared) for the cross-warp reductions.

Occupancy, as CUDA's occupancy calculator (cuda_occupancy.h) computes it. H100 and H200 have the same
sm_90 SM: 65536 registers in 4 sub-partitions, at most 64 warps and 32 blocks, 228 KB shared memory, 1 KB
of it reserved per block; A100's sm_80 SM differs only in 164 KB shared memory:
    registers per warp   = roundup(registers per thread * 32, 256)
    warps by registers   = floor((65536 / 4) / registers per warp) * 4      (allocated per sub-partition)
    blocks by registers  = floor(warps by registers / num_warps)
    blocks by warps      = floor(64 / num_warps)
    blocks by shared mem = floor(shared per SM / roundup(shared + 1 KB, 128))
    blocks per SM        = min(blocks by registers, by warps, by shared memory, 32)
    warps per SM         = blocks per SM * num_warps   (occupancy = warps per SM / 64)
The choice is made for H100/H200 (sm_90), the GPUs this package targets first. Spilled registers go to
local memory (L1/L2/HBM traffic), so a configuration that spills in any specialization on sm_90 is
rejected. Of the rest, those that keep at least a quarter of the warp slots (16 warps per SM) in every
specialization qualify (the loops hold per-lane states and no block-wide reduction, so there is no barrier
to hide; at 4 entries per thread ptxas takes 89-95 registers in the dense-teacher specializations, one
16-warp block per SM). Among those, the fewest static instructions per logit element in the vocabulary
loops, summed over the specializations, wins (the loops' SASS counted as bench/sass_roofline.py counts it:
the kernel is issue-bound or close, and the block shape acts through the elements per thread: loop
overhead, load width, and the register pressure that ptxas answers with extra moves), then the widest
block, then the fewer warps. The sm_80 rows are listed for reference: the
ptxas Triton uses there (12.9) sometimes picks a register count (40, 48, 64) that costs a few bytes of
spill per thread. Rules of thumb, not measurements: this is compile-time data, and a GPU timing
(bench/gpu_check.py) is what would confirm or overturn it.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compiling needs the real triton.jit (before any import of it)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import triton  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dynsdpb_kernels import triton_aot, triton_kernel  # noqa: E402
from dynsdpb_kernels.triton_aot import Specialization  # noqa: E402

import sass_roofline  # noqa: E402

ARCHS = (90, 80)
DATE = datetime.date.today().isoformat()
CANDIDATES = [(1024, 16), (2048, 8), (2048, 16), (4096, 16)]
# The variants with the most live state: teachers without statistics (pre-pass, or the full teacher state in
# pass 1 when static), a ring's dense and top-k teachers while recording, plain cross-entropy; float32 logits
# hold the most registers per element, bfloat16 is the training dtype; and the heaviest at a vocabulary
# that is not a multiple of 16 (no vectorised loads).
CHOICE_ARCH = 90
SPECS = [
    Specialization(torch.float32, "dense", torch.float32, dynamic=True),
    Specialization(torch.float32, "dense", torch.float32, dynamic=False),
    Specialization(torch.float32, "dense", torch.float32, True, record="rows", ring_dtype=torch.float32),
    Specialization(torch.bfloat16, "dense", torch.bfloat16, True, record="rows"),
    Specialization(torch.bfloat16, "topk", torch.bfloat16, True, True, "topk"),
    Specialization(torch.bfloat16),
    Specialization(torch.bfloat16, "dense", torch.bfloat16, True, record="rows", vocab_size=triton_aot.ODD_VOCAB),
]

# the SM of sm_90 (H100 SXM/PCIe and H200 alike) and sm_80 (A100)
REGISTERS_PER_SM = 65536
SUB_PARTITIONS = 4
REGISTER_UNIT = 256
MAX_WARPS = 64
MAX_BLOCKS = 32
SHARED_PER_SM = {90: 228 * 1024, 80: 164 * 1024}
SHARED_RESERVED_PER_BLOCK = 1024
SHARED_UNIT = 128


def round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def warps_per_sm(registers: int, num_warps: int, shared: int, arch: int) -> tuple[int, str]:
    """Resident warps per SM of `arch` and what limits them (module docstring)."""
    per_warp = round_up(registers * 32, REGISTER_UNIT)
    limits = {
        "registers": (REGISTERS_PER_SM // SUB_PARTITIONS // per_warp) * SUB_PARTITIONS // num_warps,
        "warps": MAX_WARPS // num_warps,
        "shared": SHARED_PER_SM[arch] // round_up(shared + SHARED_RESERVED_PER_BLOCK, SHARED_UNIT),
        "blocks": MAX_BLOCKS,
    }
    blocks = min(limits.values())
    return blocks * num_warps, "+".join(name for name, value in limits.items() if value == blocks)


def ptxas_report(ptx: str, arch: int) -> dict[str, int]:
    """ptxas -v on Triton's PTX with the flags Triton passes (backends/nvidia/compiler.py make_cubin)."""
    gpu = re.search(r"\.target (sm_\w+)", ptx).group(1)
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "kernel.ptx"
        source.write_text(ptx)
        command = [triton_aot.ptxas_path(arch), "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}",
                   str(source), "-o", str(Path(folder) / "kernel.cubin")]
        log = subprocess.run(command, capture_output=True, text=True, check=True).stderr
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {"registers": int(re.search(r"Used (\d+) registers", log).group(1)),
            "spill_stores": int(spills.group(1)), "spill_loads": int(spills.group(2))}


def measure(spec: Specialization, block_v: int, num_warps: int, arch: int) -> dict:
    launch = dataclasses.replace(triton_aot.example_launch(spec, block_v=block_v), num_warps=num_warps)
    compiled = triton_aot.compile_launch(launch, arch)
    report = ptxas_report(compiled.asm["ptx"], arch)
    cubin = triton_aot.cubin_resources(compiled.asm["cubin"], arch)
    if cubin["registers"] != report["registers"]:
        raise RuntimeError(f"ptxas rerun disagrees with Triton's cubin: {report} vs {cubin}")
    shared = compiled.metadata.shared
    warps, limit = warps_per_sm(report["registers"], num_warps, shared, arch)
    instructions = loop_instructions(compiled.asm["cubin"], arch, block_v, num_warps)
    return {"arch": f"sm_{arch}", "specialization": spec.name, "block_v": block_v, "num_warps": num_warps,
            "per_thread": block_v // (32 * num_warps), "steps_at_V": -(-spec.vocab_size // block_v), **report,
            "local_bytes": cubin["local"], "stack_bytes": cubin["stack"], "shared_bytes": shared, "warps_per_sm": warps,
            "occupancy": warps / MAX_WARPS, "limited_by": limit, "instr_per_elem": instructions}


def loop_instructions(cubin: bytes, arch: int, block_v: int, num_warps: int) -> float:
    """Static instructions per logit element of all the vocabulary loops in `cubin`, counted as
    bench/sass_roofline.py counts them (every loop body instruction once, / unroll, / elements per thread)."""
    kernel = triton_kernel._dynsdpb_row_kernel
    sass = sass_roofline.disassemble(cubin, arch)
    listing, loops = sass_roofline.analyse_sass(sass, kernel, sass_roofline.OUR_LOOPS, block_v)
    lines = sass_roofline.for_lines(kernel)
    per_thread = block_v // (32 * num_warps)
    counts = [sass_roofline.count_loop(listing, loop, sass_roofline.loop_unroll(listing, loop, lines, block_v))
              for loop in loops.values()]
    return sum(c.instructions / c.unroll for c in counts) / per_thread


MIN_WARPS_PER_SM = 16  # a quarter of the 64 warp slots


def choose(rows: list[dict]) -> tuple[int, int]:
    """(BLOCK_V, num_warps) by the rule in the module docstring: on CHOICE_ARCH, no spill in any
    specialization, at least MIN_WARPS_PER_SM in each, then the fewest loop instructions per element
    summed over the specializations, then the widest block, then the fewer warps."""
    qualified = []
    for block_v, num_warps in CANDIDATES:
        key = (f"sm_{CHOICE_ARCH}", block_v, num_warps)
        mine = [row for row in rows if (row["arch"], row["block_v"], row["num_warps"]) == key]
        spills = any(row[key] for row in mine for key in ("spill_stores", "spill_loads", "local_bytes", "stack_bytes"))
        if not spills and min(row["warps_per_sm"] for row in mine) >= MIN_WARPS_PER_SM:
            qualified.append((round(sum(row["instr_per_elem"] for row in mine), 2), -block_v, num_warps))
    _, negative_block, num_warps = min(qualified)
    return -negative_block, num_warps


def write_markdown(rows: list[dict], chosen: tuple[int, int], path: Path) -> None:
    lines = [
        f"# Triton kernel resources on sm_90 (H100/H200) and sm_80 (A100), {DATE}",
        "",
        f"Compile-time data from `python bench/triton_resources.py`: Triton {triton.__version__} (ptxas "
        f"`{Path(triton_aot.ptxas_path(90)).name}` for sm_90a, `{Path(triton_aot.ptxas_path(80)).name}` for sm_80), "
        f"V = {triton_aot.LARGE_VOCAB}, no GPU involved "
        "(not a speed measurement). Registers per thread and spills from `ptxas -v`, shared memory from Triton's "
        "metadata, warps per SM by the occupancy formula in the script's docstring (64 = full occupancy).",
        "",
        f"**Chosen: BLOCK_V = {chosen[0]}, num_warps = {chosen[1]}**: on sm_{CHOICE_ARCH}, no spills in any "
        f"specialization, at least {MIN_WARPS_PER_SM} warps per SM in each, then the fewest vocabulary-loop "
        "instructions per element summed over the specializations, then the widest block, then the fewer "
        "warps; the sm_80 rows are for reference (the rule and the "
        "formula are in the script's docstring). `spill st/ld` are ptxas's spill stores/loads in bytes per thread, "
        "`stack` the stack frame; `steps` the loop steps over the row at that V; `instr/elem` the loops' static "
        "instructions per logit element, counted as bench/sass_roofline.py counts them.",
        "",
        "| target | specialization | BLOCK_V | warps | elems/thread | steps | regs | spill st/ld (B) | stack (B) "
        "| smem (B) | warps/SM | limit | instr/elem |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for row in rows:
        mark = " **(chosen)**" if (row["block_v"], row["num_warps"]) == chosen else ""
        lines.append(
            f"| {row['arch']} | {row['specialization']}{mark} | {row['block_v']} | {row['num_warps']} | "
            f"{row['per_thread']} | {row['steps_at_V']} | {row['registers']} | "
            f"{row['spill_stores']}/{row['spill_loads']} | {row['stack_bytes']} | "
            f"{row['shared_bytes']} | "
            f"{row['warps_per_sm']} | {row['limited_by']} | {row['instr_per_elem']:.2f} |"
        )
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    rows = []
    for arch, spec, (block_v, num_warps) in itertools.product(ARCHS, SPECS, CANDIDATES):
        row = measure(spec, block_v, num_warps, arch)
        print(json.dumps(row), flush=True)
        rows.append(row)
    chosen = choose(rows)
    out = Path(__file__).resolve().parent
    with open(out / "triton_resources.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    write_markdown(rows, chosen, out / "triton_resources.md")
    current = triton_kernel.block_config(triton_aot.LARGE_VOCAB)
    print(f"chosen BLOCK_V={chosen[0]} num_warps={chosen[1]}; the launcher picks BLOCK_V={current.block_v} "
          f"num_warps={current.num_warps} for V={triton_aot.LARGE_VOCAB}")
    return 0 if (current.block_v, current.num_warps) == chosen else 1


if __name__ == "__main__":
    sys.exit(main())
