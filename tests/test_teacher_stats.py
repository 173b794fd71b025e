"""dynsdpb_loss(..., teacher_stats=...): teachers whose (u, d) come from the call that computed them.

The previous call returns its student rows' (u, d) (LossStats.student_stats); passed with those logits as
the teachers of the next call, the kernel skips its pass over the teacher rows for them, and the loss,
gradient and stats stay the float64 truth's (which computes (u, d) from the teacher logits itself).
"""

from __future__ import annotations

import pytest
import torch
from conftest import BACKENDS, DYNAMIC_IDS, DYNAMIC_MODES
from test_loss import assert_float32_close, check_against_truth, make_case
from truth import truth_dynsdpb

from dynsdpb_kernels import dynsdpb_loss, row_statistics

VOCAB = 300  # over several of the interpreter's blocks, with a ragged tail


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dynamic", DYNAMIC_MODES, ids=DYNAMIC_IDS)
def test_stats_of_the_teachers_own_call_give_the_truth(backend, dtype, dynamic):
    logits, labels, teacher_logits, teacher_mask = make_case((2, 4), VOCAB, dtype)
    # the call that computed the teacher logits (the previous step) returns their statistics
    _, previous = dynsdpb_loss(teacher_logits, labels, backend=backend, return_stats=True)
    stats = previous.student_stats
    assert stats.shape == (2, 4, 2) and stats.dtype == torch.float32
    assert_float32_close(stats, row_statistics(teacher_logits.double().reshape(-1, VOCAB)).reshape(2, 4, 2), "student_stats")
    given = stats.clone()
    check_against_truth(backend, logits, labels, teacher_logits, teacher_mask, 3.0, ours_only={"teacher_stats": stats},
                        dynamic=dynamic, alpha=0.8, tau=2.5)
    assert torch.equal(stats, given)  # not modified


@pytest.mark.parametrize("backend", BACKENDS)
def test_given_stats_are_the_ones_used(backend):
    """(u, d) = (0, 1) for every teacher row makes the dynamic rule's alpha_r = alpha and tau_r = tau: the
    loss is then the fixed rule's (DLB) truth, whatever the teacher logits' own statistics."""
    logits, labels, teacher_logits, teacher_mask = make_case((8,), VOCAB, torch.float32)
    confident = torch.tensor([0.0, 1.0]).expand(8, 2)
    ours = dynsdpb_loss(logits, labels, teacher_logits, teacher_mask, teacher_stats=confident, backend=backend, tau=2.0)
    fixed = truth_dynsdpb(logits, labels, teacher_logits, teacher_mask, dynamic=False, tau=2.0)["loss"]
    own = truth_dynsdpb(logits, labels, teacher_logits, teacher_mask, dynamic=True, tau=2.0)["loss"]
    assert_float32_close(ours, fixed, "loss")
    assert abs(float(fixed) - float(own)) > 1e-3  # the two rules differ here, so the check can fail


def test_bad_teacher_stats_are_refused_naming_the_argument():
    logits, labels, teacher_logits, _ = make_case((3,), 20, torch.float32)
    good = torch.full((3, 2), 0.5)
    with pytest.raises(ValueError, match="teacher_stats was given without teacher_logits"):
        dynsdpb_loss(logits, labels, teacher_stats=good)
    with pytest.raises(ValueError, match=r"teacher_stats must have shape \(3, 2\)"):
        dynsdpb_loss(logits, labels, teacher_logits, teacher_stats=good[:2])
    with pytest.raises(TypeError, match="teacher_stats"):
        dynsdpb_loss(logits, labels, teacher_logits, teacher_stats=good.long())
    for bad in (float("nan"), float("inf"), 1.5, -0.1):
        stats = good.clone()
        stats[1, 0] = bad
        with pytest.raises(ValueError, match=r"teacher_stats must hold \(u, d\) in \[0, 1\].*rows \[1\]"):
            dynsdpb_loss(logits, labels, teacher_logits, teacher_stats=stats)
        # validate=False checks nothing (no sync) and the loss runs
        dynsdpb_loss(logits, labels, teacher_logits, teacher_stats=stats.clamp(0, 1).nan_to_num(0.5), validate=False)
