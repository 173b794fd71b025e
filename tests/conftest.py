import os

import pytest
import torch

# Without CUDA the Triton kernels run on CPU tensors through the interpreter; it must be on before Triton's
# kernels are defined, i.e. before dynsdpb_kernels is imported. On a CUDA host the compiled kernel runs:
# the tests parametrized with backend="triton" build their tensors on the GPU (see triton_tensors_on_cuda).
CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dynsdpb_kernels import triton_kernel  # noqa: E402

# Backends every correctness test runs against.
BACKENDS = ["reference", "triton", "cpu"]

# Every value of `dynamic`: the full rule, DLB's constants, and the two one-sided ablations.
DYNAMIC_MODES = [True, False, "alpha", "tau"]
DYNAMIC_IDS = ["dynamic", "fixed", "alpha-only", "tau-only"]

# Small vocabulary blocks, so that V = 300 spans five blocks with a ragged last one.
TEST_BLOCK_V = 64


@pytest.fixture(autouse=True)
def small_triton_blocks(monkeypatch):
    monkeypatch.setattr(triton_kernel, "MAX_BLOCK_V", TEST_BLOCK_V)


@pytest.fixture(autouse=True)
def triton_tensors_on_cuda(request):
    """On a CUDA host, a test parametrized with backend="triton" runs with CUDA as the default device, so
    its torch.randn/zeros/... inputs (and tests/truth.py's float64 truth on them) live on the GPU and the
    compiled kernel runs; tensors a test places on the CPU explicitly stay there. Elsewhere: nothing."""
    callspec = getattr(request.node, "callspec", None)
    if CUDA and callspec is not None and callspec.params.get("backend") == "triton":
        with torch.device("cuda"):
            yield
    else:
        yield


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(1234)
