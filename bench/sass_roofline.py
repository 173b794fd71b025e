"""Static roofline of the Triton kernel from its machine code (SASS): a lower bound on time, no GPU involved.

    python bench/sass_roofline.py              # writes bench/sass_roofline.md and .csv (about a minute)
    python bench/sass_roofline.py --only plain-ce --arch 90 --dump DIR   # one kernel; its cubin, PTX, SASS

For each kernel that bench/gpu_check.py launches (CASES below) the launch triton_kernel.triton_fused_rows
makes is compiled ahead of time (dynsdpb_kernels/triton_aot.py: Triton's own pipeline and ptxas, for
GPUTarget("cuda", 90, 32) and 80) and the cubin disassembled with the nvdisasm shipped inside Triton
(`nvdisasm -c -g`: code and source lines). The vocabulary loops are found on the control-flow graph, not
by reading: basic blocks split at labels and after branches/exits, dominators by the iterative data-flow
algorithm, a back edge is an edge u -> h where h dominates u, and its natural loop is h plus every block
reaching u without passing h. Each loop is named by the Python `for` statement whose source line its
instructions carry (the kernel's `for ... in range(...)` lines, in source order; an unnamed loop is an
error). Per loop, every instruction of its blocks counts once (NOPs excluded): the path of a distilled,
recorded row, on which every conditional part of the body runs. One iteration covers BLOCK vocabulary
entries, BLOCK / (32 num_warps) per thread; a loop that LLVM unrolled (runtime unrolling of a small body)
runs u iterations per trip, u read from its induction step (loop_unroll), and its counts are divided by
u (the unrolled remainder is straight-line code, not counted). So per logit element:

    instructions = body instructions / elements per thread   (an SM issues 4 warp-instructions per clock:
                                                               128 lane-instructions)
    MUFU         = MUFU.* in the body / elements per thread  (16 results per clock per SM)
    global bytes = sum of LDG (STG) widths in the body / elements per thread
    SHFL, BAR    = per iteration of a warp (the block-wide reductions of one BLOCK)

and, at N rows of V entries, with ceil(V / BLOCK) iterations per row (the masked tail still issues):

    issue bound = N ceil(V/BLOCK) BLOCK instructions / (128 SMs clock)
    MUFU bound  = N ceil(V/BLOCK) BLOCK MUFU / (16 SMs clock)
    HBM bound   = N V bytes / bandwidth, at the minimal traffic (each tensor the loss must touch, touched
                  once) and at the design's (the loops' LDG + STG bytes, as if no re-read hit L2)

Only the loops count (the per-row code around them is left out), so each is a floor; the largest of the
three is a floor on the kernel's time. Nothing here is a measurement.

Calibration: the same count on Liger-Kernel's cross-entropy kernel (liger_kernel.ops.cross_entropy,
imported when installed, compiled with its own launch's BLOCK_SIZE and Hopper's 32 warps).
"""

from __future__ import annotations

import argparse
import collections
import csv
import datetime
import importlib.metadata
import inspect
import json
import math
import re
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dynsdpb_kernels import triton_aot, triton_kernel  # noqa: E402
from dynsdpb_kernels.triton_aot import Specialization  # noqa: E402

ROWS = 16384
VOCABS = (128256, 32000)
DTYPE_BYTES = 2  # bfloat16 logits, teachers, gradient and ring rows
ARCHS = (90, 80)


@dataclass(frozen=True)
class Gpu:
    """Throughput limits of one GPU (from shared/research/gpu_limits.md: spec sheets, CUDA guide)."""

    name: str
    sms: int
    clock_hz: float
    hbm_bytes_per_s: float
    lane_instructions_per_clock: int = 128  # 4 schedulers x 1 warp-instruction x 32 lanes, per SM
    mufu_per_clock: int = 16  # per SM


# 1.83 GHz is gpu_limits.md's clock for both (its MUFU figure, ~3.9e12/s); HBM at the spec's bandwidth.
GPUS = (Gpu("H100 SXM", 132, 1.83e9, 3.35e12), Gpu("H200", 132, 1.83e9, 4.8e12))


# ---------------------------------------------------------------------------------------------------------
# Listings and control flow


@dataclass
class Instruction:
    """One instruction of a listing: its text, opcode with modifiers (e.g. "MUFU.EX2", "ld.global.v2.b32"),
    whether a predicate guards it, the label it branches to (None if it does not), and its source line."""

    text: str
    opcode: str
    predicated: bool
    target: str | None
    source_line: int | None


@dataclass
class Listing:
    """Instructions in address order and each label's index (the instruction it precedes)."""

    instructions: list[Instruction]
    labels: dict[str, int]
    ends_block: set[int] = field(default_factory=set)  # indices after which a new block starts (calls aside)
    stops: set[int] = field(default_factory=set)  # indices with no fall-through (unguarded branch or exit)


SASS_LINE = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?P<body>.*?);?\s*(?:/\*.*\*/)?\s*$")
SASS_LABEL = re.compile(r"^(\.L_x_\d+):")
SASS_SOURCE = re.compile(r'^\s*//## File "(?P<file>[^"]+)", line (?P<line>\d+)')
SASS_TARGET = re.compile(r"`\((\.L_x_\d+)\)")


def parse_sass(text: str, source_file: str | None = None) -> Listing:
    """Parse `nvdisasm -c -g` output of one kernel. source_line is kept for lines of `source_file` only
    (None: any file); instructions annotated with another file (inlined library code) keep None."""
    instructions: list[Instruction] = []
    labels: dict[str, int] = {}
    listing = Listing(instructions, labels)
    line_no = None
    for raw in text.splitlines():
        if match := SASS_SOURCE.match(raw):
            # the same file by its last two path parts: Triton's cache may hand back a cubin compiled from an
            # identical kernel in another checkout, whose line info names that checkout's path
            keep = source_file is None or Path(match["file"]).parts[-2:] == Path(source_file).resolve().parts[-2:]
            line_no = int(match["line"]) if keep else None
            continue
        if match := SASS_LABEL.match(raw):
            labels[match[1]] = len(instructions)
            continue
        match = SASS_LINE.match(raw)
        if not match:
            continue
        body = match["body"].strip()
        predicated = body.startswith("@")
        if predicated:
            body = body.split(None, 1)[1]
        opcode = body.split()[0]
        target = SASS_TARGET.search(body)
        branch = opcode.split(".")[0] in ("BRA", "BRX", "JMP", "JMX")
        instructions.append(Instruction(raw.strip(), opcode, predicated, target[1] if branch and target else None,
                                        line_no))
        base = opcode.split(".")[0]
        if base in ("BRA", "BRX", "JMP", "JMX", "EXIT", "RET", "KILL"):
            listing.ends_block.add(len(instructions) - 1)
            if not predicated:
                listing.stops.add(len(instructions) - 1)
    return listing


@dataclass
class Loop:
    """A natural loop: its header block's first instruction and the indices of all its instructions."""

    header: int
    members: list[int]


def natural_loops(listing: Listing) -> list[Loop]:
    """The natural loops of `listing`'s control-flow graph (one per loop header, back edges to the same
    header merged), ordered by header address."""
    instructions = listing.instructions
    starts = {0} | set(listing.labels.values()) | {i + 1 for i in listing.ends_block}
    starts = sorted(s for s in starts if s < len(instructions))
    block_of = {}
    blocks = []
    for number, start in enumerate(starts):
        end = starts[number + 1] if number + 1 < len(starts) else len(instructions)
        blocks.append(range(start, end))
        for i in range(start, end):
            block_of[i] = number
    successors: list[set[int]] = []
    for number, block in enumerate(blocks):
        last = block[-1]
        out = set()
        if instructions[last].target is not None:
            out.add(block_of[listing.labels[instructions[last].target]])
        if last not in listing.stops and number + 1 < len(blocks):
            out.add(number + 1)
        successors.append(out)
    predecessors = [set() for _ in blocks]
    for number, out in enumerate(successors):
        for succ in out:
            predecessors[succ].add(number)
    # dominators: iterate dom(b) = {b} | intersection of dom(p) over predecessors, from the entry
    everything = set(range(len(blocks)))
    dominators = [everything.copy() for _ in blocks]
    dominators[0] = {0}
    changed = True
    while changed:
        changed = False
        for number in range(1, len(blocks)):
            preds = [dominators[p] for p in predecessors[number]]
            new = ({number} | set.intersection(*preds)) if preds else {number}
            if new != dominators[number]:
                dominators[number], changed = new, True
    bodies: dict[int, set[int]] = {}
    for tail, out in enumerate(successors):
        for head in out:
            if head in dominators[tail]:  # a back edge tail -> head
                body = bodies.setdefault(head, {head})
                stack = [tail]
                while stack:
                    node = stack.pop()
                    if node not in body:
                        body.add(node)
                        stack.extend(predecessors[node])
    return [Loop(blocks[head][0], sorted(i for b in body for i in blocks[b]))
            for head, body in sorted(bodies.items())]


def for_lines(kernel) -> list[int]:
    """Source lines (in the kernel's file) of the `for ... in range(...)` statements of a @triton.jit function."""
    lines, first = inspect.getsourcelines(kernel.fn)
    return [first + offset for offset, line in enumerate(lines) if re.match(r"\s*for .* in (tl\.)?range\(", line)]


def while_lines(kernel) -> list[int]:
    """Source lines of the `while` statements of a @triton.jit function: per-row loops (the top-k record's
    rounds and candidate blocks), not vocabulary loops."""
    lines, first = inspect.getsourcelines(kernel.fn)
    return [first + offset for offset, line in enumerate(lines) if re.match(r"\s*while ", line)]


def name_loops(listing: Listing, loops: list[Loop], lines: list[int], names: tuple[str, ...],
               block: int | None = None, row_loop_lines: list[int] = ()) -> dict[str, Loop]:
    """Name each loop by the kernel `for` line most of its instructions carry (`names[k]` for lines[k]); a
    loop with no such line or two equally often (not a vocabulary loop, or a changed kernel) raises.
    A trivial self-loop of one instruction (nvdisasm's `BRA` to itself after EXIT) is skipped, and so is a loop
    carrying one of `row_loop_lines` (a per-row `while`: the top-k record's rounds, and what they hold).
    Several loops on one line are versions of it (LLVM's loop unswitching on a row-invariant flag such as
    `distilled`); the one named is the heaviest per source iteration (instructions / loop_unroll, with
    `block` given), the path of a distilled row that the counts are of."""
    if len(lines) != len(names):
        raise ValueError(f"the kernel has {len(lines)} for-loops (lines {lines}); {len(names)} names given: {names}")
    named = {}
    for loop in loops:
        if len(loop.members) == 1:
            continue
        source_lines = {listing.instructions[i].source_line for i in loop.members}
        if source_lines & set(row_loop_lines):
            continue  # a per-row `while` loop (row_loop_lines), or one holding a vocabulary loop
        # the for-line most of its instructions carry: ptxas may tag an instruction it shares between two
        # loops (an address or induction term) with the other loop's line (seen on sm_80: 1 of 4)
        carried = collections.Counter(listing.instructions[i].source_line for i in loop.members
                                      if listing.instructions[i].source_line in lines).most_common()
        if not carried or (len(carried) > 1 and carried[0][1] == carried[1][1]):
            raise ValueError(f"loop at instruction {loop.header} carries for-lines {carried}, not mostly one of {lines}")
        name = names[lines.index(carried[0][0])]
        named.setdefault(name, []).append(loop)

    def weight(loop: Loop) -> float:
        unroll = 1 if block is None else loop_unroll(listing, loop, lines, block)
        return sum(listing.instructions[i].opcode != "NOP" for i in loop.members) / unroll

    heaviest = {name: max(versions, key=weight) for name, versions in named.items()}
    return dict(sorted(heaviest.items(), key=lambda item: item[1].header))


# ---------------------------------------------------------------------------------------------------------
# Counting

GLOBAL_WIDTHS = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}


def access_bytes(opcode: str) -> int:
    """Bytes per thread of one LDG/STG/LDGSTS (32-bit unless a width modifier says otherwise)."""
    widths = [GLOBAL_WIDTHS[part] for part in opcode.split(".")[1:] if part in GLOBAL_WIDTHS]
    return widths[0] if widths else 4


@dataclass
class LoopCounts:
    """Static counts of one loop body, per thread and iteration."""

    instructions: int
    mufu: Counter
    shfl: int
    bar: int
    shared_accesses: int
    load_bytes: int
    store_bytes: int
    unroll: int = 1  # BLOCK-wide source iterations per trip (loop_unroll); the counts are per trip


def count_loop(listing: Listing, loop: Loop, unroll: int = 1) -> LoopCounts:
    """Count one SASS loop body (module docstring: NOPs left out; every instruction once); `unroll`:
    source iterations per trip (loop_unroll), kept for the per-element division."""
    opcodes = [listing.instructions[i].opcode for i in loop.members]
    base = [op.split(".")[0] for op in opcodes]
    return LoopCounts(
        instructions=sum(b != "NOP" for b in base),
        mufu=Counter(op.split(".")[1] for op in opcodes if op.startswith("MUFU.")),
        shfl=base.count("SHFL"),
        bar=base.count("BAR"),
        shared_accesses=sum(b in ("LDS", "STS", "ATOMS") for b in base),
        load_bytes=sum(access_bytes(op) for op, b in zip(opcodes, base) if b in ("LDG", "LDGSTS")),
        store_bytes=sum(access_bytes(op) for op, b in zip(opcodes, base) if b == "STG"),
        unroll=unroll,
    )


INTEGER_ADDS = ("IADD3", "UIADD3", "VIADD", "IADD", "UIADD")
IMMEDIATE = re.compile(r"(?<![\w.])(0x[0-9a-f]+)\b")


def loop_unroll(listing: Listing, loop: Loop, lines: list[int], block: int) -> int:
    """How many BLOCK-wide iterations of the source loop one trip of the SASS loop runs (LLVM's runtime
    unrolling: 1 when not unrolled): the largest immediate that a self-increment (`IADD3 R, R, imm`) on
    the loop's `for` line adds, in units of BLOCK (the induction step; an unrolled body's copies add
    1..u-1 BLOCKs to their columns on the `cols` line instead, and its remainder is straight-line code
    outside the loop)."""
    steps = []
    for i in loop.members:
        instruction = listing.instructions[i]
        if instruction.source_line in lines and instruction.opcode.split(".")[0] in INTEGER_ADDS:
            body = instruction.text.split(";")[0]
            operands = [part.strip() for part in body[body.index(instruction.opcode) + len(instruction.opcode):].split(",")]
            if len(operands) >= 3 and operands[0] == operands[1]:  # a self-increment: i += step
                steps += [int(value, 16) for value in IMMEDIATE.findall(",".join(operands[2:]))]
    multiples = [step // block for step in steps if step > 0 and step % block == 0]
    return max(multiples, default=1)


def disassemble(cubin: bytes, arch: int) -> str:
    """`nvdisasm -c -g` (code sections, source lines) of a cubin, with the nvdisasm shipped in Triton."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        command = [triton_aot.nvdisasm_path(arch), "-c", "-g", file.name]
        return subprocess.run(command, capture_output=True, text=True, check=True).stdout


# ---------------------------------------------------------------------------------------------------------
# What is compiled

# Our kernel's five `for` statements in source order (triton_kernel._dynsdpb_row_kernel); the normaliser
# pass runs only for a ring's teacher rows without a usable stored log-normaliser (TEACHER_LOG_NORM), the
# record pass only for a top-k record's row with an "open" lane (RECORD_TOPK).
OUR_LOOPS = ("pre-pass", "normaliser pass", "pass 1", "record pass", "pass 2")
# Liger's: the zero fill of an ignored row (not on a counted row's path), its two passes.
LIGER_LOOPS = ("ignored row", "pass 1", "pass 2")


@dataclass(frozen=True)
class Case:
    """One kernel launch to analyse.

    key, description  short name and the call it stands for
    spec              our kernel's specialization (None: Liger's kernel)
    expected_loops    the vocabulary loops a counted row runs, by OUR_LOOPS / LIGER_LOOPS name
    minimal_tensors   bfloat16 tensors of N x V the loss must touch once (reads + writes)
    fallback_loops    loops the launch also has that the counted row does not run (found, not counted)
    """

    key: str
    description: str
    spec: Specialization | None
    expected_loops: tuple[str, ...]
    minimal_tensors: int
    fallback_loops: tuple[str, ...] = ()


BF16 = torch.bfloat16
CASES = (
    Case("plain-ce", "dynsdpb_loss(z, y): plain CE", Specialization(BF16), ("pass 1", "pass 2"), 2),
    # the teachers' log-normalisers stored by the previous step (the normaliser pass: rows without one)
    Case("ring-step", "DynSDPBLoss ring step: dense bf16 teachers with stats, ring write, dynamic, grad",
         Specialization(BF16, "dense", BF16, True, record="rows", log_norm=True), ("pass 1", "pass 2"), 4,
         fallback_loops=("normaliser pass",)),
    Case("teachers-no-stats", "dynsdpb_loss(z, y, t): dense teachers without stats, dynamic (pre-pass + 2)",
         Specialization(BF16, "dense", BF16), ("pre-pass", "pass 1", "pass 2"), 3),
    Case("teachers-with-stats", "dynsdpb_loss(z, y, t, teacher_stats=s): dense teachers with their (u, d), dynamic",
         Specialization(BF16, "dense", BF16, True), ("pass 1", "pass 2"), 3),
    # the top-k ring step as the Triton kernel runs it (it records top-k itself, RECORD_TOPK): pass 1 keeps
    # each lane's three best, pass 2 sums the recorded row at tau_rec; the further passes for "open" lanes
    # (about 1 row in 100) are not on the counted path
    Case("topk-record-ring-step", "DynSDPBLoss top-k ring step recording top-k in the kernel: k=64 bf16 teachers "
         "with tail, top-k record (k=64, bf16), dynamic", Specialization(BF16, "topk", BF16, True, True, "topk"),
         ("pass 1", "pass 2"), 2, fallback_loops=("record pass",)),
    Case("liger-ce", "Liger-Kernel cross-entropy (calibration), forward+backward in place", None,
         ("pass 1", "pass 2"), 2),
)
CASE_KEYS = tuple(case.key for case in CASES)


@dataclass
class Compiled:
    """A compiled case: its kernel function, elements per thread per iteration, block, warps, PTX, cubin."""

    kernel: object
    block: int
    num_warps: int
    ptx: str
    cubin: bytes

    @property
    def per_thread(self) -> int:
        return self.block // (32 * self.num_warps)


def liger_launch(vocab_size: int = triton_aot.LARGE_VOCAB, n_rows: int = 2):
    """(kernel, launch) of liger_kernel.ops.cross_entropy.cross_entropy_forward for bfloat16 logits that
    require a gradient, mean reduction, no weight / smoothing / z-loss / softcap, on Hopper (32 warps);
    raises ImportError without liger_kernel."""
    from liger_kernel.ops import cross_entropy as liger

    block = min(liger.MAX_FUSED_SIZE, triton.next_power_of_2(vocab_size))
    logits = torch.zeros(n_rows, vocab_size, dtype=BF16)
    target = torch.zeros(n_rows, dtype=torch.int64)
    loss = torch.zeros(n_rows, dtype=BF16)
    arguments = dict(X_ptr=logits, X_stride=logits.stride(-2), Y_ptr=target, Y_stride=target.stride(-1),
                     weight_ptr=None, loss_ptr=loss, z_loss_ptr=None, loss_stride=loss.stride(-1),
                     token_accuracy_ptr=None, token_accuracy_stride=0, predicted_tokens_ptr=None,
                     predicted_tokens_stride=0, n_cols=vocab_size, n_non_ignore=n_rows,
                     sum_non_ignore_weight=n_rows, weight_sum=0.0, ignore_index=-100, softcap=None)
    constexprs = dict(lse_square_scale=0.0, label_smoothing=0.0, reduction="mean", RETURN_Z_LOSS=False,
                      RETURN_TOKEN_ACCURACY=False, RETURN_PREDICTED_TOKENS=False, BLOCK_SIZE=block,
                      HAS_WEIGHT=False, HAS_SOFTCAPPING=False, HAS_GRADIENTS=True)
    launch = triton_kernel.KernelLaunch(grid=(n_rows,), arguments=arguments, constexprs=constexprs, num_warps=32)
    return liger.liger_cross_entropy_kernel, launch


def compile_case(case: Case, arch: int) -> Compiled:
    """Compile `case` for sm_`arch` with triton_aot (Triton's launch binder, then triton.compile)."""
    if case.spec is None:
        kernel, launch = liger_launch()
        block = launch.constexprs["BLOCK_SIZE"]
    else:
        kernel, launch = triton_kernel._dynsdpb_row_kernel, triton_aot.example_launch(case.spec)
        block = launch.constexprs["BLOCK_V"]
    compiled = triton_aot.compile_launch(launch, arch, kernel)
    return Compiled(kernel, block, launch.num_warps, compiled.asm["ptx"], compiled.asm["cubin"])


def loop_names(case: Case) -> tuple[str, ...]:
    return LIGER_LOOPS if case.spec is None else OUR_LOOPS


def analyse_sass(sass: str, kernel, names: tuple[str, ...], block: int | None = None) -> tuple[Listing, dict[str, Loop]]:
    """Parse `sass` (nvdisasm -c -g of `kernel`) and find and name its loops (module docstring; `block`:
    the BLOCK of one source iteration, to pick among unswitched versions of a loop, name_loops)."""
    source_file = inspect.getsourcefile(kernel.fn)
    listing = parse_sass(sass, source_file)
    return listing, name_loops(listing, natural_loops(listing), for_lines(kernel), names, block, while_lines(kernel))


# ---------------------------------------------------------------------------------------------------------
# Per element and bounds


def per_element(case: Case, compiled: Compiled, arch: int, counts: dict[str, LoopCounts]) -> dict:
    """The row of one (case, arch): per-loop and total per-element figures (module docstring)."""
    t = compiled.per_thread
    counted = {name: c for name, c in counts.items() if name in case.expected_loops}
    mufu = sum((Counter({k: n / c.unroll for k, n in c.mufu.items()}) for c in counted.values()), Counter())
    row = {
        "case": case.key, "arch": f"sm_{arch}", "block": compiled.block, "num_warps": compiled.num_warps,
        "per_thread": t, "loops": "+".join(counted) + "".join(f" (+{name}: not counted)" for name in counts
                                                                if name not in counted),
        "instr_per_elem": sum(c.instructions / c.unroll for c in counted.values()) / t,
        "instr_by_loop": " + ".join(f"{name}: {c.instructions / c.unroll / t:.2f}" for name, c in counted.items()),
        "unroll": " + ".join(str(c.unroll) for c in counted.values()),
        "mufu_per_elem": sum(mufu.values()) / t,
        "mufu_kinds": " ".join(f"{kind} {n / t:.2f}" for kind, n in sorted(mufu.items())),
        "shfl_bar_per_iter": " + ".join(f"{c.shfl // c.unroll}/{c.bar // c.unroll}" for c in counted.values()),
        "shared_per_iter": sum(c.shared_accesses // c.unroll for c in counted.values()),
        "load_bytes_per_elem": sum(c.load_bytes / c.unroll for c in counted.values()) / t,
        "store_bytes_per_elem": sum(c.store_bytes / c.unroll for c in counted.values()) / t,
        "minimal_bytes_per_elem": case.minimal_tensors * DTYPE_BYTES,
    }
    return row


def bounds(row: dict, gpu: Gpu, n_rows: int, vocab_size: int) -> dict:
    """Issue, MUFU and HBM lower bounds in milliseconds for one row of per_element at N x V."""
    slots = n_rows * math.ceil(vocab_size / row["block"]) * row["block"]  # lane slots the loops run
    elements = n_rows * vocab_size
    issue = slots * row["instr_per_elem"] / (gpu.lane_instructions_per_clock * gpu.sms * gpu.clock_hz)
    mufu = slots * row["mufu_per_elem"] / (gpu.mufu_per_clock * gpu.sms * gpu.clock_hz)
    design_bytes = row["load_bytes_per_elem"] + row["store_bytes_per_elem"]
    hbm_min = elements * row["minimal_bytes_per_elem"] / gpu.hbm_bytes_per_s
    hbm_design = elements * design_bytes / gpu.hbm_bytes_per_s
    named = {"issue": issue, "MUFU": mufu, "HBM": hbm_design}
    limit = max(named, key=named.get)
    return {"gpu": gpu.name, "N": n_rows, "V": vocab_size, "issue_ms": 1e3 * issue, "mufu_ms": 1e3 * mufu,
            "hbm_minimal_ms": 1e3 * hbm_min, "hbm_design_ms": 1e3 * hbm_design, "floor_ms": 1e3 * named[limit],
            "limited_by": limit}


def analyse_case(case: Case, arch: int, dump: Path | None = None) -> dict:
    """Compile, disassemble and count `case` on sm_`arch`; checks that exactly the expected loops were
    found. With `dump`, writes <key>-sm<arch>.{ptx,cubin,sass} and .json (the compile's block and warps)."""
    compiled = compile_case(case, arch)
    sass = disassemble(compiled.cubin, arch)
    listing, loops = analyse_sass(sass, compiled.kernel, loop_names(case), compiled.block)
    expected = set(case.expected_loops) | set(case.fallback_loops) | ({"ignored row"} if case.spec is None else set())
    if set(loops) != expected:
        raise RuntimeError(f"{case.key} sm_{arch}: found loops {list(loops)}, expected {sorted(expected)}")
    if dump is not None:
        dump.mkdir(parents=True, exist_ok=True)
        stem = dump / f"{case.key}-sm{arch}"
        stem.with_suffix(".ptx").write_text(compiled.ptx)
        stem.with_suffix(".cubin").write_bytes(compiled.cubin)
        stem.with_suffix(".sass").write_text(sass)
        stem.with_suffix(".json").write_text(json.dumps({"block": compiled.block, "num_warps": compiled.num_warps}))
    lines = for_lines(compiled.kernel)
    counts = {name: count_loop(listing, loop, loop_unroll(listing, loop, lines, compiled.block))
              for name, loop in loops.items()}
    return per_element(case, compiled, arch, counts)


# ---------------------------------------------------------------------------------------------------------
# Output


def write_outputs(rows: list[dict], skipped: list[str], out: Path) -> None:
    today = datetime.date.today().isoformat()
    bound_rows = [{**row, **bounds(row, gpu, ROWS, vocab)} for row in rows if row["arch"] == "sm_90"
                  for gpu in GPUS for vocab in VOCABS]
    csv_rows = bound_rows + [row for row in rows if row["arch"] != "sm_90"]
    fields = list(bound_rows[0]) if bound_rows else list(rows[0])
    with open(out.with_suffix(".csv"), "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(csv_rows)
    descriptions = {case.key: case.description for case in CASES}
    lines = [
        f"# Static roofline from SASS, {today} (static bound, not a GPU measurement)",
        "",
        f"`python bench/sass_roofline.py`: Triton {triton.__version__}, each kernel compiled ahead of time "
        "(dynsdpb_kernels/triton_aot.py) for sm_90a and sm_80 and disassembled with Triton's nvdisasm; the "
        "vocabulary loops found on the control-flow graph (back edges to a dominating header) and named by "
        "their `for` line. Per logit element: loop-body instructions (NOPs aside, each once: the path of a "
        "distilled, recorded row) / elements per thread per iteration (a loop that LLVM unrolled u times runs "
        "u BLOCK-wide iterations per trip: `unroll`, from its induction step); MUFU likewise; SHFL/BAR per iteration "
        "of a warp, per loop; global bytes from the LDG/STG widths. The script's docstring has the method.",
        "",
        "| case | target | BLOCK / warps | elem/thread | loops | unroll | instr/elem (by loop) | MUFU/elem | "
        "SHFL/BAR per iter | LDG+STG B/elem | minimal B/elem |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['case']} | {row['arch']} | {row['block']} / {row['num_warps']} | {row['per_thread']} | "
            f"{row['loops']} | {row['unroll']} | **{row['instr_per_elem']:.1f}** ({row['instr_by_loop']}) | "
            f"**{row['mufu_per_elem']:.2f}** ({row['mufu_kinds']}) | {row['shfl_bar_per_iter']} | "
            f"{row['load_bytes_per_elem']:g}+{row['store_bytes_per_elem']:g} | {row['minimal_bytes_per_elem']} |")
    gpu_text = "; ".join(f"{g.name}: {g.sms} SMs at {g.clock_hz / 1e9:.2f} GHz, {g.lane_instructions_per_clock} "
                         f"lane-instructions and {g.mufu_per_clock} MUFU per clock per SM, HBM "
                         f"{g.hbm_bytes_per_s / 1e12:.2f} TB/s" for g in GPUS)
    lines += [
        "",
        f"Lower bounds in ms at N = {ROWS}, bfloat16, from the sm_90 rows ({gpu_text}; figures from "
        "shared/research/gpu_limits.md). Issue and MUFU count ceil(V / BLOCK) iterations per row; HBM at the "
        "minimal traffic (each tensor the loss needs, once) and at the design's (the loops' LDG + STG, no L2 "
        "hits). The floor is the largest of issue, MUFU and design HBM.",
        "",
        "| case | GPU | V | issue | MUFU | HBM minimal | HBM design | floor | limited by |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in bound_rows:
        lines.append(f"| {row['case']} | {row['gpu']} | {row['V']} | {row['issue_ms']:.2f} | {row['mufu_ms']:.2f} | "
                     f"{row['hbm_minimal_ms']:.2f} | {row['hbm_design_ms']:.2f} | **{row['floor_ms']:.2f}** | "
                     f"{row['limited_by']} |")
    lines += ["", "Cases:"] + [f"- `{key}`: {text}" for key, text in descriptions.items()]
    if any(row["case"] == "liger-ce" for row in rows):
        lines += [
            "",
            f"Calibration: liger-kernel {importlib.metadata.version('liger-kernel')}, its launch on Hopper "
            "(BLOCK_SIZE = min(32768, next_power_of_2(V)), 32 warps, mean reduction). Its published H100 SXM "
            "time at N = 16384, V = 128256, bf16, forward+backward is 4.14 ms (PR 1268, gpu_limits.md), "
            "above its floor here. liger-kernel 0.6.4 (tl.exp and a per-element select in pass 2, before "
            "PRs 1266/1268), counted the same way by hand on 2026-12-01, gives 35.3 instr/elem (pass 1: "
            "12.38 + pass 2: 22.91) and 2.09 MUFU/elem: the issue's reading of 35.5 / 2.1 was of such a "
            "version.",
        ]
    lines += [f"- skipped: {reason}" for reason in skipped]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help=f"comma-separated cases of {', '.join(CASE_KEYS)}")
    parser.add_argument("--arch", type=int, action="append", help="90 and/or 80 (default: both)")
    parser.add_argument("--dump", type=Path, help="write each compile's PTX, cubin and SASS here")
    parser.add_argument("--out", type=Path, help="output stem (.md, .csv); default bench/sass_roofline, "
                        "written only for a full run unless given")
    args = parser.parse_args(argv)
    cases = CASES
    if args.only:
        wanted = args.only.split(",")
        unknown = sorted(set(wanted) - set(CASE_KEYS))
        if unknown:
            parser.error(f"--only: unknown cases {unknown}; expected some of {list(CASE_KEYS)}")
        cases = tuple(case for case in CASES if case.key in wanted)
    archs = tuple(args.arch or ARCHS)
    if any(arch not in ARCHS for arch in archs):
        parser.error(f"--arch: expected 90 or 80, got {archs}")
    rows, skipped = [], []
    for arch in archs:
        for case in cases:
            try:
                row = analyse_case(case, arch, args.dump)
            except ImportError as error:
                if case.spec is not None:
                    raise
                skipped.append(f"{case.key} sm_{arch}: {error} (pip install liger-kernel to add the row)")
                print(f"skipping {case.key}: {error}", file=sys.stderr)
                continue
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.out is not None or not args.only:
        write_outputs(rows, skipped, args.out or Path(__file__).resolve().with_suffix(""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
