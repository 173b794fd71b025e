"""The C++ kernel's streamed passes across many blocks.

The kernel reads each row in blocks of cpu_kernel.BLOCK_V elements (2048), folding every block into online
statistics (a running max, sums rescaled when it grows). The suite's vocabularies fit in one block, so
here the block is made small (64, and 7: fewer than one AVX2 vector, ragged everywhere) and the suite's
own truth checks are rerun on the "cpu" backend: a new maximum in a late block, confident rows, ragged
tails, every dtype, in-place gradients, the ring write and top-k teachers all cross block boundaries.
"""

from __future__ import annotations

import pytest
import torch
import test_loss
import test_ring
import test_topk

from dynsdpb_kernels import cpu_kernel


@pytest.fixture(autouse=True, params=[64, 7], ids=lambda block: f"block{block}")
def small_cpu_blocks(request, monkeypatch):
    monkeypatch.setattr(cpu_kernel, "BLOCK_V", request.param)


@pytest.mark.parametrize("dtype", test_loss.DTYPES, ids=str)
@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic", "fixed"])
def test_matches_truth_across_blocks(dtype, dynamic):
    test_loss.test_matches_truth("cpu", dtype, 300, dynamic, "mean")


@pytest.mark.parametrize("dtype", test_loss.DTYPES, ids=str)
def test_extreme_logits_across_blocks(dtype):
    test_loss.test_extreme_logits("cpu", dtype)


def test_confident_rows_with_the_max_in_the_last_block():
    """The max arrives in the last block: earlier sums are rescaled, and 1 - p_max stays exact."""
    vocab_size = 300
    logits = torch.randn(6, vocab_size)
    labels = torch.full((6,), vocab_size - 3)
    logits[:, vocab_size - 3] = 40.0  # p_y = 1 - O(1e-15): p_y - 1 only survives as -rest / (1 + rest)
    teacher = torch.randn(6, vocab_size)
    teacher[:, 5] = 30.0  # the teacher's max in the first block
    test_loss.check_against_truth("cpu", logits, labels, teacher, torch.ones(6, dtype=torch.bool))


def test_confident_bfloat16_gradient_across_blocks():
    test_loss.test_confident_bfloat16_true_class_gradient("cpu")


def test_precomputed_stats_across_blocks():
    test_loss.test_precomputed_teacher_stats_and_teacher_index("cpu")


def test_student_statistics_across_blocks():
    test_loss.test_student_statistics_are_next_teachers("cpu")


def test_inplace_gradient_across_blocks():
    test_loss.test_inplace_grad_opt_in("cpu")


@pytest.mark.parametrize("logits_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("inplace", [False, True], ids=["fresh_grad", "inplace_grad"])
def test_ring_write_across_blocks(logits_dtype, inplace):
    test_ring.test_record_writes_rounded_rows_and_stats("cpu", logits_dtype, torch.bfloat16, inplace)


@pytest.mark.parametrize("k", [1, 16, 300], ids=lambda k: f"k{k}")
@pytest.mark.parametrize("inplace", [False, True], ids=["fresh", "inplace"])
def test_topk_teacher_across_blocks(k, inplace):
    test_topk.test_topk_teacher_matches_truth("cpu", torch.bfloat16, k, inplace, True, True)
