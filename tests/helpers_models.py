"""Shared pieces of the integration tests (Trainer, TRL, DDP, FSDP): a tiny random LLaMA whose logits are
peaked, a Trainer mixin that records every training step, and the check that a step's distillation term
is a visible part of its loss.

Why peaked: a random tiny LLaMA predicts nearly uniform distributions, so its rows as teachers have an
uncertainty u_r ~ 1, the dynamic weight alpha_r = alpha * (1 - u_r) ~ 0.001, and the distillation term is
~1e-6 of the loss, below the tests' tolerances: a replay without any teachers would pass them. Scaling the
LM head by `LOGIT_SCALE` spreads the logits over several units: teachers with a small u_r (alpha_r ~ 0.6 of
alpha with dynamic=True) and a distillation term that is percents to tens of percents of the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dynsdpb_kernels.tools.finetune import tiny_llama

LOGIT_SCALE = 32.0  # the tiny LLaMA's LM head times this: teachers with alpha_r = 1 - u_r ~ 0.6 at first
MIN_DISTILL_FRACTION = 0.01  # a step with teachers: distillation term / loss at least this


def peaked_tiny_llama(vocab_size: int, seed: int, hidden_size: int, layers: int, logit_scale: float = LOGIT_SCALE):
    """tools.finetune.tiny_llama with its lm_head weight multiplied by logit_scale (its logits likewise)."""
    model = tiny_llama(vocab_size, seed=seed, hidden_size=hidden_size, layers=layers)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(logit_scale)
    return model


@dataclass(frozen=True)
class StepStats:
    """What one training call of a RingLoss reported (DistillStats, read to floats)."""

    loss: float
    ce: float
    kl: float
    distill: float
    alpha_mean: float
    n_valid: int
    n_distilled: int
    teacher_samples: int

    @classmethod
    def of(cls, loss: torch.Tensor, loss_module) -> "StepStats":
        stats = loss_module.last_stats
        return cls(
            loss=float(loss.detach()), ce=float(stats.loss.ce), kl=float(stats.loss.kl),
            distill=float(stats.loss.distill), alpha_mean=float(stats.loss.alpha_mean), n_valid=int(stats.loss.n_valid),
            n_distilled=int(stats.loss.n_distilled), teacher_samples=int(stats.teacher_samples),
        )


def assert_distillation_visible(steps: list[StepStats], min_fraction: float = MIN_DISTILL_FRACTION) -> None:
    """Every step with teachers has a distillation term of at least min_fraction of its loss (so a run
    that lost its teachers could not match a replay within the tests' tolerances); a step without any
    has none."""
    assert any(step.n_distilled > 0 for step in steps), "no step had teachers"
    for index, step in enumerate(steps):
        if step.n_distilled == 0:
            assert step.distill == 0.0 and step.kl == 0.0, (index, step)
            continue
        assert step.distill > min_fraction * step.loss, (
            f"step {index}: distillation term {step.distill:.3g} is below {min_fraction:.0%} of the loss {step.loss:.3g}"
        )


def assert_steps_match(
    actual: list[StepStats], expected: list[StepStats], rtol: float = 1e-5, atol: float = 1e-6, label: str = "step"
) -> None:
    """The loss, cross-entropy, distillation term and KL of each step agree, each on its own (the total
    alone could hide a wrong distillation term behind a large cross-entropy), and so do the row and teacher
    counts. A failure names f"{label} {index}" (label: what the lists run over)."""
    assert len(actual) == len(expected)
    for index, (a, b) in enumerate(zip(actual, expected)):
        for name in ("loss", "ce", "distill", "kl"):
            torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=rtol, atol=atol,
                                       msg=lambda m, name=name, index=index: f"{label} {index} {name}: {m}")
        counts = [(s.teacher_samples, s.n_valid, s.n_distilled) for s in (a, b)]
        assert counts[0] == counts[1], f"{label} {index}: (teacher_samples, n_valid, n_distilled) {counts[0]} != {counts[1]}"


class RecordingTrainerMixin:
    """Put before a DynSDPBTrainerMixin trainer in the bases: keeps, for every training step, the batch,
    num_items_in_batch, the parameters before the step and the StepStats of the step's loss, in `steps`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps: list[tuple[dict, object, dict, StepStats]] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        parameters = {name: p.detach().clone() for name, p in model.state_dict().items()} if model.training else None
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if model.training:
            loss = result[0] if return_outputs else result
            batch = {k: v.clone() for k, v in inputs.items() if k in ("input_ids", "attention_mask", "labels", "sample_ids")}
            self.steps.append((batch, num_items_in_batch, parameters, StepStats.of(loss, self.dynsdpb_loss)))
        return result


def recorded_stats(trainer) -> list[StepStats]:
    """The StepStats of every training step a RecordingTrainerMixin trainer took."""
    return [stats for *_, stats in trainer.steps]


def replay_steps(steps: list, model: torch.nn.Module, loss_fn, before_step=None) -> list[StepStats]:
    """RecordingTrainerMixin.steps recomputed outside the trainer: for each step, `model` loaded with the
    step's parameters, its logits, and `loss_fn` (a fresh DynSDPBLoss, so with its own ring) fed the same
    batches in the same order; `before_step(i)`, when given, runs before step i (e.g. a schedule's
    set_alpha). Returns each step's StepStats."""
    replayed = []
    for index, (batch, num_items, parameters, _) in enumerate(steps):
        if before_step is not None:
            before_step(index)
        model.load_state_dict(parameters)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = loss_fn(logits, batch["labels"], batch["sample_ids"], num_items_in_batch=num_items)
        replayed.append(StepStats.of(loss, loss_fn))
    return replayed
