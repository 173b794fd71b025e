"""bench/gpu_check.py's correctness check, run here on the Triton interpreter (CPU) at a small shape, so the
script a GPU day depends on is known to run and to compare with tests/truth.py before any GPU is lent."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from conftest import BACKENDS, CUDA

from dynsdpb_kernels import backends

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not backends.triton_interpreted(), reason="runs the Triton kernel on CPU tensors (interpreter)")
def test_correctness_check_compares_with_the_float64_truth(capsys):
    gpu_check = _load_script()
    assert gpu_check.truth_dynsdpb.__module__ == "truth"  # the tests' independent statement, not the package's
    assert gpu_check.check_correctness(device="cpu", vocab_sizes=(300,), n_rows=16)
    printed = capsys.readouterr().out
    assert printed.count("-> ok") == 2, printed  # float32 and bfloat16


@pytest.mark.skipif(not backends.triton_interpreted(), reason="runs the Triton kernel on CPU tensors (interpreter)")
def test_correctness_check_fails_a_wrong_kernel(monkeypatch, capsys):
    gpu_check = _load_script()
    real = gpu_check.dynsdpb_loss
    monkeypatch.setattr(gpu_check, "dynsdpb_loss", lambda *args, **kwargs: real(*args, **{**kwargs, "tau": 2.0}))
    assert not gpu_check.check_correctness(device="cpu", vocab_sizes=(300,), n_rows=16)
    assert "FAIL" in capsys.readouterr().out


@pytest.mark.parametrize("backend", BACKENDS)
def test_triton_tests_build_cuda_tensors_on_a_cuda_host(backend):
    """conftest.triton_tensors_on_cuda: the compiled kernel on CUDA tensors where CUDA exists, the
    interpreter on CPU tensors elsewhere; the other backends always get CPU tensors."""
    expected = "cuda" if CUDA and backend == "triton" else "cpu"
    assert torch.randn(3).device.type == expected
    assert backends.triton_interpreted() == (not CUDA)


def test_predicted_floor_reads_the_roofline_table():
    """gpu_check prints the static bound next to the measured time: the bound it reads is the table's,
    scaled linearly in the rows."""
    import csv

    gpu_check = _load_script()
    with open(gpu_check.ROOFLINE, newline="") as file:
        row = next(r for r in csv.DictReader(file)
                   if (r["case"], r["arch"], r["gpu"], r["V"]) == ("teachers-no-stats", "sm_90", "H200", "128256"))
    floor = gpu_check.predicted_floor_ms("NVIDIA H200", "teachers-no-stats", 128256, 4096)
    assert floor == pytest.approx(float(row["floor_ms"]) * 4096 / int(row["N"]))
    assert gpu_check.predicted_floor_ms("NVIDIA H100 80GB HBM3", "teachers-no-stats", 128256, 4096) > floor  # slower HBM
    assert gpu_check.predicted_floor_ms("NVIDIA H200", "no-such-case", 128256, 4096) is None
