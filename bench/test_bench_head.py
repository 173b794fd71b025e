"""pytest-benchmark of the LM head + loss step: `pytest bench/test_bench_head.py --benchmark-only`.

Shape from DYNSDPB_BENCH_HEAD ("NxVxH", default "1024x32000x256"), float32 on the CPU, bfloat16 on
CUDA; each provider with a trainable head and with a frozen one (weight.requires_grad=False, as under
LoRA: no dL/dW is formed). Peak memory per provider, measured in fresh processes, is `dynsdpb bench-head`.
"""

from __future__ import annotations

import os

import pytest
import torch

from dynsdpb_kernels.tools.head_benchmark import HEAD_PROVIDERS, HeadCase, make_head_step

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N, V, H = (int(x) for x in os.environ.get("DYNSDPB_BENCH_HEAD", "1024x32000x256").split("x"))
PROVIDERS = [p for p in HEAD_PROVIDERS if p != "liger" or DEVICE == "cuda"]


@pytest.mark.parametrize("head", ["trainable", "frozen"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_head_step(benchmark, provider, head):
    dtype = "bfloat16" if DEVICE == "cuda" else "float32"
    case = HeadCase(provider, N, V, H, dtype, DEVICE)
    try:
        step_fn, _ = make_head_step(case)
    except ImportError as error:
        pytest.skip(f"{provider} is not installed: {error}")
    torch.manual_seed(0)
    hidden = torch.randn(N, H, device=DEVICE).to(getattr(torch, dtype)).requires_grad_(True)
    weight = (torch.randn(V, H, device=DEVICE) / H**0.5).to(getattr(torch, dtype)).requires_grad_(head == "trainable")
    labels = torch.randint(0, V, (N,), device=DEVICE)
    counter = iter(range(10**6))

    def step():
        loss = step_fn(hidden, weight, labels, next(counter))
        loss.backward()
        hidden.grad = weight.grad = None
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return loss

    loss = benchmark.pedantic(step, rounds=3, warmup_rounds=1)  # the warm-up step records the first teachers
    assert torch.isfinite(loss)
