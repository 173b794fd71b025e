"""The Triton kernel compiles for real GPUs, checked on a machine without one.

For sm_80 (A100) and sm_90 (H100/H200), triton.compile runs the whole GPU pipeline (Triton IR, LLVM IR,
PTX, and the cubin from the ptxas inside Triton) on each launch triton_kernel.triton_fused_rows makes, at
the block width and warps the launcher picks for a large vocabulary, and every compile error fails a test,
as does a spill on sm_90 (the target the block width was chosen for).
The specializations (dynsdpb_kernels/triton_aot.py): on sm_90 every combination of the kernel's flags
(teacher none / dense / dense with statistics / top-k / top-k with tail; record none / rows / statistics;
dynamic True / False / "alpha" / "tau"; gradient) in bfloat16, and the top-k ring's record selected by the
kernel (record "topk") in the launches a top-k ring makes (its first call, each dynamic mode, forward and
backward: triton_aot.topk_record_specializations); on both targets a set holding every pair of
values of those factors and of the logits' and teachers' dtypes (float32, bfloat16, float16, float64 logits; float32, bfloat16, float16
teachers and rings), a vocabulary that is not a multiple of 16, the softcapped launches, and what
bench/gpu_check.py launches (which include the top-k ring's DLB step with its in-kernel record).

Compiling needs the real triton.jit, which TRITON_INTERPRET=1 (conftest.py) replaces, so the compiles
run in one child process per target without it (both at once).
"""

from __future__ import annotations

import functools
import itertools

import pytest

from dynsdpb_kernels import triton_aot

ARCHS = (80, 90)
CHOSEN_FOR_ARCH = 90  # the target whose resources chose the launcher's block width (bench/triton_resources.py)


@functools.cache
def all_compile_results() -> dict[int, dict[str, dict]]:
    # both targets compile at once, in two processes (the compiles are single-threaded)
    processes = {arch: triton_aot.start_isolated(arch) for arch in ARCHS}
    return {
        arch: {result["name"]: result for result in triton_aot.results(process)} for arch, process in processes.items()
    }


def compile_results(arch: int) -> dict[str, dict]:
    return all_compile_results()[arch]


CASES = [(arch, spec.name) for arch in ARCHS for spec in triton_aot.compile_check_set(arch)]


@pytest.mark.parametrize("arch, name", CASES, ids=[f"sm{arch}-{name}" for arch, name in CASES])
def test_compiles(arch: int, name: str) -> None:
    result = compile_results(arch)[name]
    assert result["ok"], f"sm_{arch} {name}: {result['error']}"
    assert 0 < result["registers"] <= 255
    if arch == CHOSEN_FOR_ARCH:
        # the launcher's block width and warps fit sm_90's register file: no local memory (spills or stack).
        # sm_80's ptxas may trade a few bytes of spill for occupancy (bench/triton_resources.md).
        assert result["local"] == 0 and result["stack"] == 0, f"sm_{arch} {name} spills: {result}"


@pytest.mark.parametrize("arch", ARCHS)
def test_inplace_gradient_is_the_same_specialization(arch: int) -> None:
    # grad buffer = the logits (inplace_grad, the fused head) must compile to the kernel already checked
    results = compile_results(arch)
    graded = [result for result in results.values() if "inplace_same" in result]
    assert graded, "no specialization with a gradient was compiled"
    assert all(result["inplace_same"] for result in graded), [r["name"] for r in graded if not r["inplace_same"]]


def test_cover_holds_every_pair_of_factor_values() -> None:
    # the sm_80 set must see every pair of values of any two factors, the sm_90 set also every flag combination
    for arch in ARCHS:
        specs = triton_aot.compile_check_set(arch)
        rows = [triton_aot.factor_values(spec) for spec in specs if spec.vocab_size == triton_aot.LARGE_VOCAB]
        # a teacher dtype of None (nothing of it is passed) stands for every teacher dtype
        matches = lambda row, name, value: row[name] == value or row[name] is None  # noqa: E731
        for (name_a, values_a), (name_b, values_b) in itertools.combinations(triton_aot.FACTORS.items(), 2):
            for value_a, value_b in itertools.product(values_a, values_b):
                assert any(matches(row, name_a, value_a) and matches(row, name_b, value_b) for row in rows), (
                    arch, name_a, value_a, name_b, value_b)
    names = ("side", "record", "dynamic", "compute_grad")
    flags = {tuple(triton_aot.factor_values(spec)[name] for name in names) for spec in triton_aot.compile_check_set(90)}
    product = set(itertools.product(*(triton_aot.FACTORS[name] for name in names)))
    assert len(product) == 6 * 3 * 4 * 2  # teacher side, record, dynamic (True, False, "alpha", "tau"), gradient
    assert product <= flags
    # a top-k ring's record selected by the kernel: its first call, each dynamic mode, forward and backward
    topk_records = {row for row in flags if row[1] == "topk"}
    assert {row[0] for row in topk_records} == {"none", "topk-tail"}
    assert {row[2] for row in topk_records} == set(triton_aot.DYNAMIC_NAMES)
    assert {row[3] for row in topk_records} == {False, True}


@pytest.mark.parametrize("arch", ARCHS)
def test_compiled_launch_is_the_launchers_large_vocabulary_choice(arch: int, monkeypatch) -> None:
    # the compiled block width and warps are the launcher's own (block_config), not a copy of its constants
    from dynsdpb_kernels import triton_kernel

    monkeypatch.undo()  # conftest shrinks MAX_BLOCK_V for the interpreter; the child process does not
    specs = {spec.name: spec for spec in triton_aot.compile_check_set(arch)}
    for name, result in compile_results(arch).items():
        expected = triton_kernel.block_config(specs[name].vocab_size)
        assert expected.block_v == triton_kernel.MAX_BLOCK_V  # a large vocabulary: the widest block
        assert (result["block_v"], result["num_warps"]) == (expected.block_v, expected.num_warps), name
