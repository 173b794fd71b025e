"""bench/sass_roofline.py's SASS parsing on one real compile for sm_90: the DynSDPBLoss ring step (dense
bfloat16 teachers with statistics and stored log-normalisers, ring write, dynamic, gradient), whose loop
bodies hold branches (the ring write, the distilled row's teacher terms, the recorded row's log-normaliser).

The compile runs in a child process without TRITON_INTERPRET (conftest.py sets it; compiling needs the real
triton.jit) and dumps its PTX, cubin and SASS; this process parses them with the tool's functions. The
checks are structural, not timings: exactly the three vocabulary loops (the normaliser pass of rows
without a usable stored log-normaliser, pass 1, pass 2), each named by its `for` line and spanning every block from its header to its back edge; their MUFU.EX2 counts equal the `ex2.approx` counts of the same loops in the PTX, found here
independently from LLVM's loop comments ("Loop Header", "in Loop: Header=BB0_n"), not from the tool's
control-flow graph; per-element figures that follow from the loads' widths and the block shape.
Skipped where Triton's ptxas / nvdisasm are absent.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dynsdpb_kernels import triton_aot, triton_kernel

ROOT = Path(__file__).resolve().parent.parent
CASE = "ring-step"


def _tools_present() -> bool:
    try:
        return all(os.access(path, os.X_OK) for path in (triton_aot.ptxas_path(90), triton_aot.nvdisasm_path(90)))
    except Exception:  # no NVIDIA backend in this Triton
        return False


pytestmark = pytest.mark.skipif(not _tools_present(), reason="Triton's ptxas/nvdisasm not available")


def _load_tool():
    if "sass_roofline" not in sys.modules:  # bench/ is not a package; dataclasses need the module registered
        spec = importlib.util.spec_from_file_location("sass_roofline", ROOT / "bench" / "sass_roofline.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules["sass_roofline"]


def dumped(tmp: str) -> dict:
    """Compile CASE for sm_90 in a child process; its JSON row and the dumped files."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    command = [sys.executable, str(ROOT / "bench" / "sass_roofline.py"), "--only", CASE, "--arch", "90", "--dump", tmp]
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    (row,) = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    stem = Path(tmp) / f"{CASE}-sm90"
    return {"row": row, "sass": stem.with_suffix(".sass").read_text(), "ptx": stem.with_suffix(".ptx").read_text(),
            "shape": json.loads(stem.with_suffix(".json").read_text())}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    return dumped(str(tmp_path_factory.mktemp("sass")))


def ptx_loops_from_llvm_comments(ptx: str) -> list[list[str]]:
    """The instruction lines of each loop of Triton's PTX, in header order, from the comments LLVM writes
    on each block label (a header: "Loop Header"; its other blocks: "in Loop: Header=BB0_n")."""
    blocks = []  # [name, comment, lines]
    for line in ptx.splitlines():
        label = re.match(r"^(?:\$L__BB0_(\d+):|// %bb\.(\d+):)(.*)$", line)
        if label:
            blocks.append([f"BB0_{label[1] or label[2]}", label[3], []])
        elif blocks and not blocks[-1][2] and line.strip().startswith("//"):
            blocks[-1][1] += line  # LLVM may put the loop comment on the line after the label
        elif blocks:
            blocks[-1][2].append(line)
    loops: dict[str, list[str]] = {}
    for name, comment, lines in blocks:
        header = name if "Loop Header" in comment else re.search(r"in Loop: Header=(BB0_\d+)", comment)
        if header is not None:
            loops.setdefault(header if isinstance(header, str) else header[1], []).extend(lines)
    order = [name for name, _, _ in blocks]
    return [loops[name] for name in sorted(loops, key=order.index)]


def test_finds_exactly_the_two_vocabulary_loops(compiled):
    tool = _load_tool()
    listing, loops = tool.analyse_sass(compiled["sass"], triton_kernel._dynsdpb_row_kernel, tool.OUR_LOOPS,
                                       compiled["shape"]["block"])
    # no pre-pass: the teacher statistics are given; the normaliser pass (rows without a stored log-normaliser
    # at their tau_r) is a loop of its own, not a branch inside pass 1
    assert list(loops) == ["normaliser pass", "pass 1", "pass 2"]
    # the graph's loops: nvdisasm's one-instruction trap after EXIT, and versions of the two (LLVM may
    # unswitch a loop on `distilled`; the heaviest version is the one named)
    all_loops = tool.natural_loops(listing)
    assert sorted(len(loop.members) for loop in all_loops)[0] == 1
    for name, loop in loops.items():
        unroll = tool.loop_unroll(listing, loop, tool.for_lines(triton_kernel._dynsdpb_row_kernel), compiled["shape"]["block"])
        ops = [listing.instructions[i].opcode for i in loop.members]
        branches = [listing.instructions[i] for i in loop.members if listing.instructions[i].target is not None]
        back_edges = [i for i in loop.members if listing.instructions[i].target is not None
                      and listing.labels[listing.instructions[i].target] == loop.header]
        # one back edge; the body is every instruction from the header to it (Triton's loops are contiguous)
        assert len(back_edges) == 1 and loop.members == list(range(loop.header, back_edges[0] + 1)), name
        # reads and writes per loop: the normaliser pass t; pass 1 z only (its teacher's log-normaliser is
        # stored) and writes the ring row; pass 2 z and t, and writes the gradient
        loads, stores = {"normaliser pass": (1, 0), "pass 1": (1, 1), "pass 2": (2, 1)}[name]
        assert sum(op.startswith("LDG") for op in ops) == loads * unroll, name
        assert sum(op.startswith("STG") for op in ops) == stores * unroll, name
        if name != "normaliser pass":
            assert len(branches) >= 2, name  # a conditional part inside: the body spans several blocks


def test_mufu_matches_the_ptx_exponentials_loop_by_loop(compiled):
    tool = _load_tool()
    listing, loops = tool.analyse_sass(compiled["sass"], triton_kernel._dynsdpb_row_kernel, tool.OUR_LOOPS,
                                       compiled["shape"]["block"])
    ptx_loops = ptx_loops_from_llvm_comments(compiled["ptx"])
    # the same loops (versions of a loop included) in the PTX as in the SASS, in the same order
    sass_loops = sorted((loop for loop in tool.natural_loops(listing) if len(loop.members) > 1), key=lambda l: l.header)
    assert len(ptx_loops) == len(sass_loops) and len(loops) == 3
    for loop, ptx_lines in zip(sass_loops, ptx_loops):
        counts = tool.count_loop(listing, loop)
        ex2 = sum("ex2.approx" in line for line in ptx_lines)
        divisions = sum(bool(re.search(r"\b(div\.full|div\.approx|rcp)", line)) for line in ptx_lines)
        assert counts.mufu["EX2"] == ex2, loop.header
        assert counts.mufu["RCP"] <= divisions, loop.header  # ptxas may share one reciprocal among divisions
        assert set(counts.mufu) <= {"EX2", "RCP"}, counts.mufu  # tl.log is libdevice's polynomial
    for name, loop in loops.items():  # the counted versions: the distilled row's, with its exponentials
        assert tool.count_loop(listing, loop).mufu["EX2"] > 0, name


def test_per_element_figures_follow_from_the_block(compiled):
    row, shape = compiled["row"], compiled["shape"]
    # the child compiled the launcher's own large-vocabulary launch (this process's conftest shrinks MAX_BLOCK_V)
    assert row["per_thread"] == shape["block"] // (32 * shape["num_warps"]) == triton_kernel.ELEMENTS_PER_THREAD
    # bfloat16 z read in both passes, t in pass 2 only (its log-normaliser stored): 6 bytes per element; the
    # ring row and the gradient written once (4); the minimum is each of the four once
    assert (row["load_bytes_per_elem"], row["store_bytes_per_elem"], row["minimal_bytes_per_elem"]) == (6, 4, 8)
    # exponentials per element: z at 1 and at tau_r in pass 1; P, Q, the softmax and the recorded row's sum
    # at tau_rec in pass 2
    assert row["mufu_per_elem"] >= 6
    # per-lane states: the lanes combine once per row after each loop, so no shuffle or barrier inside one
    pass_1, pass_2 = (tuple(map(int, part.split("/"))) for part in row["shfl_bar_per_iter"].split(" + "))
    assert pass_1 == pass_2 == (0, 0)
    assert row["instr_per_elem"] > row["mufu_per_elem"]


def test_bounds_arithmetic():
    tool = _load_tool()
    gpu = tool.Gpu("test", sms=2, clock_hz=1e9, hbm_bytes_per_s=1e12)
    row = {"block": 1000, "instr_per_elem": 128.0, "mufu_per_elem": 16.0, "load_bytes_per_elem": 4.0,
           "store_bytes_per_elem": 2.0, "minimal_bytes_per_elem": 4}
    bound = tool.bounds(row, gpu, n_rows=10, vocab_size=1500)  # 2 iterations of 1000 per row
    # 10 * 2000 slots * 128 instructions / (128 * 2 SMs * 1e9) = 1e-5 s; MUFU the same; HBM 10*1500*6/1e12
    assert bound["issue_ms"] == pytest.approx(1e-2) and bound["mufu_ms"] == pytest.approx(1e-2)
    assert bound["hbm_design_ms"] == pytest.approx(9e-5) and bound["hbm_minimal_ms"] == pytest.approx(6e-5)
    assert bound["floor_ms"] == pytest.approx(1e-2)


def test_loop_unroll_reads_the_induction_step():
    """An unrolled loop's trip covers u BLOCKs: the largest BLOCK multiple an integer add on the `for` line adds."""
    tool = _load_tool()
    text = "\n".join([
        '        //## File "k.py", line 10',
        "        /*0000*/                   IADD3 R2, R2, 0x2000, RZ ;",
        '        //## File "k.py", line 11',
        "        /*0010*/                   IADD3 R3, R1, 0x1800, R2 ;",
        "        /*0020*/                   FMUL R4, R4, 0x800 ;",
    ])
    listing = tool.parse_sass(text)
    loop = tool.Loop(0, [0, 1, 2])
    assert tool.loop_unroll(listing, loop, [10], 2048) == 4  # the induction step: 4 BLOCKs per trip
    assert tool.loop_unroll(listing, loop, [11], 2048) == 1  # a copy's column offset: not a self-increment
    assert tool.loop_unroll(listing, loop, [10], 3000) == 1  # no BLOCK multiple: not unrolled
    assert tool.loop_unroll(listing, loop, [12], 2048) == 1  # no add on the line
