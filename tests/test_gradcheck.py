"""torch.autograd.gradcheck of the reference's closed-form gradient, in float64.

DynSDPBLossFunction scales its saved gradient in place and so allows one backward per forward, while
gradcheck backpropagates several times through one graph; this test therefore wraps the same
fused_loss (reference backend) in a Function whose backward scales out of place.
"""

from __future__ import annotations

import pytest
import torch

from dynsdpb_kernels import DistillConfig, LossOptions, fused_loss


class ReferenceLossForGradcheck(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, teacher_rows, teacher_index, options):
        loss, rows = fused_loss(logits, labels, teacher_rows, teacher_index, None, options, compute_grad=True)
        ctx.save_for_backward(rows.grad)
        ctx.reduction = options.reduction
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        scale = grad_loss.reshape(-1, 1) if ctx.reduction == "none" else grad_loss
        return grad * scale, None, None, None, None


@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic", "fixed"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("tau", [0.5, 3.0])
def test_reference_gradient_gradcheck(dynamic, reduction, tau):
    n_rows, vocab_size = 5, 11
    logits = (torch.randn(n_rows, vocab_size, dtype=torch.float64) * 2).requires_grad_(True)
    labels = torch.randint(0, vocab_size, (n_rows,))
    labels[1] = -100
    teacher_rows = torch.randn(3, vocab_size, dtype=torch.float64) * 2
    teacher_index = torch.tensor([0, 2, -1, 1, 0])
    options = LossOptions(
        distill=DistillConfig(alpha=0.8, tau=tau, dynamic=dynamic), reduction=reduction, backend="reference"
    )
    assert torch.autograd.gradcheck(
        lambda z: ReferenceLossForGradcheck.apply(z, labels, teacher_rows, teacher_index, options),
        (logits,),
        eps=1e-6,
        atol=1e-7,
    )
