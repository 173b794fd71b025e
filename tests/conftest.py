import os

import pytest
import torch

# The Triton kernels run on CPU tensors through the interpreter; it must be on before Triton's
# kernels are defined, i.e. before dynsdpb_kernels is imported.
if not torch.cuda.is_available():
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
def seeded():
    torch.manual_seed(1234)
