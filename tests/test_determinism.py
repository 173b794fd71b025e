"""The same inputs give bitwise the same loss, gradient and ring on each backend, run after run.

Every kernel computes each row in one program / one thread with a fixed order of operations, and the
reductions over rows are torch sums of fixed shape, so nothing depends on scheduling. On the CPU the
result does not depend on the number of threads either (tested); on CUDA the Triton kernel is likewise
free of atomics.
"""

from __future__ import annotations

import pytest
import torch
from conftest import BACKENDS

from dynsdpb_kernels import DynSDPBLoss, dynsdpb_loss


def _run_function(backend, dtype):
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(37, 300, generator=gen) * 4).to(dtype).requires_grad_(True)
    labels = torch.randint(0, 300, (37,), generator=gen)
    labels[::5] = -100
    teacher = (torch.randn(37, 300, generator=gen) * 4).to(dtype)
    mask = torch.rand(37, generator=gen) < 0.6
    loss = dynsdpb_loss(logits, labels, teacher, mask, backend=backend, tau=2.5)
    loss.backward()
    return loss.detach(), logits.grad


def _run_module(backend):
    gen = torch.Generator().manual_seed(4)
    module = DynSDPBLoss(300, capacity_rows=64, backend=backend)
    outputs = []
    for ids in ([0, 1, 2], [0, 1, 2, 3, 4, 5], [3, 4, 5, 6, 7, 8]):
        logits = torch.randn(len(ids), 7, 300, generator=gen, requires_grad=True)
        labels = torch.randint(0, 300, (len(ids), 7), generator=gen)
        loss = module(logits, labels, torch.tensor(ids))
        loss.backward()
        outputs += [loss.detach(), logits.grad]
    state = module.ring.state_dict()
    return outputs + [state["rows"].float(), state["stats"]]


def _assert_bitwise(first, second):
    for a, b in zip(first, second):
        assert a.dtype == b.dtype and torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_function_is_bitwise_reproducible(backend, dtype):
    _assert_bitwise(_run_function(backend, dtype), _run_function(backend, dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_steps_and_ring_are_bitwise_reproducible(backend):
    _assert_bitwise(_run_module(backend), _run_module(backend))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_cpu_results_do_not_depend_on_the_thread_count(backend):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = _run_function(backend, torch.float32) + tuple(_run_module(backend))
        torch.set_num_threads(max(2, threads))
        several = _run_function(backend, torch.float32) + tuple(_run_module(backend))
    finally:
        torch.set_num_threads(threads)
    _assert_bitwise(single, several)
