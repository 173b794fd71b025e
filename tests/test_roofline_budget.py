"""Static per-element budgets of the Triton kernel's vocabulary loops (issue 19), checked at compile time.

bench/sass_roofline.py compiles the launches bench/gpu_check.py makes (bfloat16, V = 128256, the launcher's
block and warps) for sm_90, finds the vocabulary loops on the SASS control-flow graph and counts, per logit
element, the instructions and MUFU operations of their bodies (an unrolled body divided by its unroll
factor). These are compile-time properties, not timings, like the spill check of test_gpu_compile.py: a
change that adds work to a steady-state loop (a per-element select that could be hoisted, a second
exponential, a block-wide reduction back inside the loop) fails here. A budget a specialization does not
reach is marked xfail(strict=False) with the figure it reached, never loosened.

The compile runs in a child process without TRITON_INTERPRET (conftest.py sets it). Skipped where
Triton's ptxas / nvdisasm are absent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_sass_roofline import _tools_present

ROOT = Path(__file__).resolve().parent.parent

# case of bench/sass_roofline.py -> (instructions per element, MUFU per element) on sm_90. The first three
# are issue 19's targets.
BUDGETS = {
    "plain-ce": (32.0, 2.1),
    "ring-step": (64.0, 6.0),
    "teachers-no-stats": (80.0, 7.5),
    # dynsdpb_loss(..., teacher_stats=...): the no-stats launch without its pre-pass (its budget)
    "teachers-with-stats": (80.0, 7.5),
    # issue 20: the top-k ring step with the record selected in the kernel within 1.25x of the ring step's
    # 64 instructions; one MUFU more than the top-k ring step (the record's sum at tau_rec). Reached: 51.25, 5.0 (2026-12-02; 58.75 before bf16's packed keys)
    "topk-record-ring-step": (80.0, 5.0),
}
# Global bytes per element (the loops' LDG + STG) against the rows a step cannot avoid touching once:
# case -> (largest ratio, bfloat16 rows). Issue 19: the ring step (read z, read t, write the gradient: 6 B)
# at most 1.7x; it moved 12 B (2.0x) until the teachers' log-normalisers were stored with them (10 B).
# dynsdpb_loss with teacher_stats: no pre-pass over t, 10 B (without them, 12 B: teachers-no-stats).
BYTE_BUDGETS = {"ring-step": (1.7, 3), "teachers-with-stats": (1.7, 3)}
# Budgets not reached yet: case -> the figures reached (none at present).
NOT_REACHED: dict[str, str] = {}

pytestmark = pytest.mark.skipif(not _tools_present(), reason="Triton's ptxas/nvdisasm not available")


@pytest.fixture(scope="module")
def rows() -> dict[str, dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    command = [sys.executable, str(ROOT / "bench" / "sass_roofline.py"), "--only", ",".join(BUDGETS), "--arch", "90"]
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    found = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    return {row["case"]: row for row in found}


def _cases():
    for case in BUDGETS:
        marks = [pytest.mark.xfail(strict=False, reason=NOT_REACHED[case])] if case in NOT_REACHED else []
        yield pytest.param(case, marks=marks, id=case)


@pytest.mark.parametrize("case", list(_cases()))
def test_vocabulary_loops_within_budget(rows, case):
    row = rows[case]
    instructions, mufu = BUDGETS[case]
    assert row["arch"] == "sm_90" and row["block"] > 0
    assert row["instr_per_elem"] <= instructions, f"{case}: {row['instr_per_elem']} instr/elem ({row['instr_by_loop']})"
    assert row["mufu_per_elem"] <= mufu, f"{case}: {row['mufu_per_elem']} MUFU/elem ({row['mufu_kinds']})"


@pytest.mark.parametrize("case", list(BYTE_BUDGETS))
def test_global_bytes_within_budget(rows, case):
    ratio, n_rows = BYTE_BUDGETS[case]
    row = rows[case]
    design = row["load_bytes_per_elem"] + row["store_bytes_per_elem"]
    assert design <= ratio * n_rows * 2, f"{case}: {design} B/elem, {design / (n_rows * 2):.2f}x the {n_rows}-row floor"


@pytest.mark.parametrize("case", list(BUDGETS))
def test_no_cross_lane_reduction_inside_a_vocabulary_loop(rows, case):
    """Per-lane states: no shuffle and no barrier in any steady-state loop (the lanes combine once per row)."""
    per_loop = [tuple(map(int, part.split("/"))) for part in rows[case]["shfl_bar_per_iter"].split(" + ")]
    assert per_loop and all(counts == (0, 0) for counts in per_loop), rows[case]["shfl_bar_per_iter"]
