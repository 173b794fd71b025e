"""DynSDPBTrainer with a tiny random LlamaForCausalLM on the CPU: training, each step's loss, cross-entropy
and distillation term against a replay with DynSDPBLoss, logging, checkpoint and resume. The LLaMA's logits
are peaked (helpers_models.peaked_tiny_llama), so each step with teachers has a distillation term of
percents of its loss, and a run without teachers fails the checks."""

from __future__ import annotations

import functools

import pytest
import torch

transformers = pytest.importorskip("transformers")

from helpers_models import (  # noqa: E402
    RecordingTrainerMixin, StepStats, assert_distillation_visible, assert_steps_match, peaked_tiny_llama, recorded_stats,
    replay_steps,
)

from dynsdpb_kernels import DynSDPBLoss  # noqa: E402
from dynsdpb_kernels.tools.finetune import pad_batch  # noqa: E402
from dynsdpb_kernels.integrations.transformers import RING_FILE, DynSDPBTrainer  # noqa: E402

VOCAB = 1000


class ProgressionDataset(torch.utils.data.Dataset):
    """Learnable toy sequences: runs start, start + 1, ... over a few dozen of the VOCAB tokens, of varying
    length (dynamic padding)."""

    def __init__(self, n: int = 48):
        gen = torch.Generator().manual_seed(0)
        self.items = []
        for _ in range(n):
            start = int(torch.randint(3, 40, (1,), generator=gen))
            length = int(torch.randint(6, 14, (1,), generator=gen))
            ids = start + torch.arange(length)
            self.items.append({"input_ids": ids, "labels": ids.clone()})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def tiny_model():
    return peaked_tiny_llama(VOCAB, seed=0, hidden_size=32, layers=2)


class RecordingTrainer(RecordingTrainerMixin, DynSDPBTrainer):
    """DynSDPBTrainer keeping every training step's batch, parameters and StepStats (helpers_models)."""


def make_trainer(output_dir, max_steps=12, trainer_options=None, **kwargs):
    args = transformers.TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=4, max_steps=max_steps, learning_rate=1e-2,
        logging_steps=3, save_strategy="steps", save_steps=6, report_to=[], use_cpu=True, seed=0,
        disable_tqdm=True, dataloader_num_workers=0, **kwargs,
    )
    return RecordingTrainer(
        model=tiny_model(), args=args, train_dataset=ProgressionDataset(),
        data_collator=functools.partial(pad_batch, pad_id=0), tau=2.0, capacity_rows=256, **(trainer_options or {}),
    )


def _train_logs(trainer):
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def test_trainer_trains_logs_and_saves_the_ring(tmp_path):
    trainer = make_trainer(tmp_path)
    trainer.train()
    # every step's loss, cross-entropy and distillation term equal a replay's; the distillation term is
    # percents of the loss, so a replay (or a trainer) without teachers could not match
    steps = recorded_stats(trainer)
    assert len(steps) == 12
    assert_distillation_visible(steps)
    replay_loss = DynSDPBLoss(VOCAB, tau=2.0, capacity_rows=256)
    assert_steps_match(steps, replay_steps(trainer.steps, tiny_model(), replay_loss))
    logs = _train_logs(trainer)
    assert len(logs) == 4
    for entry, window in zip(logs, (steps[i : i + 3] for i in range(0, 12, 3))):
        for key in ("ce", "kl", "alpha_mean", "tau_mean", "teacher_samples", "ring_bytes"):
            assert key in entry, key
        assert entry["ring_bytes"] > 0
        # each log holds its 3 steps' stats: ce weighted by the valid rows, kl by the distilled rows
        n_valid, n_distilled = sum(s.n_valid for s in window), sum(s.n_distilled for s in window)
        assert entry["ce"] == pytest.approx(sum(s.ce * s.n_valid for s in window) / n_valid, rel=1e-5, abs=1e-6)
        assert entry["kl"] == pytest.approx(sum(s.kl * s.n_distilled for s in window) / max(n_distilled, 1), rel=1e-5, abs=1e-6)
    assert logs[-1]["ring_bytes"] == trainer.dynsdpb_loss.ring.nbytes
    assert logs[-1]["ce"] < logs[0]["ce"] - 0.5  # the loss falls
    assert all(entry["teacher_samples"] > 0 for entry in logs[1:])  # DLB order: half of each batch distills
    assert 1.0 <= logs[-1]["tau_mean"] <= 2.0 and 0.0 <= logs[-1]["alpha_mean"] <= 1.0
    assert (tmp_path / "checkpoint-6" / RING_FILE).is_file()
    # evaluation: plain cross-entropy, the ring untouched
    before = trainer.dynsdpb_loss.ring.state_dict()
    metrics = trainer.evaluate(ProgressionDataset(8))
    assert metrics["eval_loss"] > 0
    after = trainer.dynsdpb_loss.ring.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if isinstance(before[k], torch.Tensor))


def test_resume_restores_the_ring_and_continues_identically(tmp_path):
    uninterrupted = make_trainer(tmp_path / "a")
    uninterrupted.train()
    resumed = make_trainer(tmp_path / "b")
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-6"))
    saved = torch.load(tmp_path / "a" / "checkpoint-6" / RING_FILE, weights_only=True)
    assert saved["head"] > 0
    late = [entry for entry in _train_logs(uninterrupted) if entry["step"] > 6]
    late_resumed = [entry for entry in _train_logs(resumed) if entry["step"] > 6]
    assert [entry["step"] for entry in late_resumed] == [entry["step"] for entry in late]
    for a, b in zip(late, late_resumed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["kl"] == pytest.approx(b["kl"], rel=1e-4, abs=1e-7)
    assert_distillation_visible(recorded_stats(resumed))
    assert_steps_match(recorded_stats(resumed), recorded_stats(uninterrupted)[6:])
    final_a = uninterrupted.dynsdpb_loss.ring.state_dict()
    final_b = resumed.dynsdpb_loss.ring.state_dict()
    assert torch.equal(final_a["entry_ids"], final_b["entry_ids"]) and torch.equal(final_a["entry_start"], final_b["entry_start"])
    assert torch.equal(final_a["head"], final_b["head"])
    torch.testing.assert_close(final_a["rows"].float(), final_b["rows"].float(), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("storage", ["dense", "topk"])
def test_fused_linear_trainer_matches_the_logits_path(tmp_path, storage):
    options = {"teacher_storage": storage, "topk": 32}
    plain = make_trainer(tmp_path / "plain", max_steps=6, trainer_options=options)
    plain.train()
    fused = make_trainer(tmp_path / "fused", max_steps=6, trainer_options={**options, "fused_linear": True})
    fused.train()
    assert_distillation_visible(recorded_stats(plain))
    assert_steps_match(recorded_stats(fused), recorded_stats(plain), rtol=1e-4, atol=1e-5)
    plain_logs, fused_logs = _train_logs(plain), _train_logs(fused)
    assert len(fused_logs) == 2
    for a, b in zip(plain_logs, fused_logs):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["kl"] == pytest.approx(a["kl"], rel=1e-3, abs=1e-6)
        assert b["ring_bytes"] == a["ring_bytes"]
    assert fused.evaluate(ProgressionDataset(8))["eval_loss"] == pytest.approx(plain.evaluate(ProgressionDataset(8))["eval_loss"], rel=1e-4)


def test_apply_dynsdpb_skips_the_logits_in_training_only():
    from dynsdpb_kernels import DynSDPBLoss
    from dynsdpb_kernels.integrations.transformers import apply_dynsdpb

    model = tiny_model()
    reference = tiny_model()
    loss_module = apply_dynsdpb(model, capacity_rows=64, backend="reference")
    plain_loss = DynSDPBLoss(VOCAB, capacity_rows=64, backend="reference")
    batch = pad_batch([ProgressionDataset()[i] for i in range(3)], pad_id=0)
    ids = torch.tensor([0, 1, 2])
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"], sample_ids=ids)
    assert out.logits is None and model.dynsdpb_loss is loss_module
    logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = plain_loss(logits, batch["labels"], ids)
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    # the same samples again after both models' heads moved alike: the first call's rows teach
    with torch.no_grad():
        shift = 0.3 * torch.randn(reference.lm_head.weight.shape, generator=torch.Generator().manual_seed(2))
        model.lm_head.weight.add_(shift)
        reference.lm_head.weight.add_(shift)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"], sample_ids=ids)
    logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = plain_loss(logits, batch["labels"], ids)
    patched_step, plain_step = StepStats.of(out.loss, loss_module), StepStats.of(expected, plain_loss)
    assert patched_step.teacher_samples == 3
    assert_distillation_visible([patched_step])
    assert_steps_match([patched_step], [plain_step], rtol=1e-5, atol=1e-6, label="second call")
    assert "dynsdpb_loss" not in dict(model.named_modules())  # checkpoints stay plain
    model.eval()
    evaluated = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    assert evaluated.logits is not None and evaluated.logits.shape == (3, batch["input_ids"].shape[1], VOCAB)


@pytest.mark.parametrize("fused_linear", [False, True], ids=["logits", "fused"])
def test_previous_visit_teachers_over_epochs(tmp_path, fused_linear):
    """teacher="previous_visit": plain batches of 4 (VisitBatchSampler: every sample once per epoch, no
    re-run), no teachers in epoch 1, then every sample of every step taught by its own logits from the
    previous epoch; each step equals a replay, and the ring kept every sample (none evicted)."""
    n_samples, batch_size, epochs = 16, 4, 3
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=batch_size, num_train_epochs=epochs, learning_rate=1e-2,
        logging_steps=4, save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = RecordingTrainer(
        model=tiny_model(), args=args, train_dataset=ProgressionDataset(n_samples),
        data_collator=functools.partial(pad_batch, pad_id=0), tau=2.0, teacher="previous_visit",
        fused_linear=fused_linear,
    )
    trainer.train()
    steps = recorded_stats(trainer)
    per_epoch = n_samples // batch_size
    assert len(steps) == epochs * per_epoch
    assert [s.teacher_samples for s in steps] == [0] * per_epoch + [batch_size] * (epochs - 1) * per_epoch
    for epoch in range(epochs):  # each epoch visits every sample once, in batches of batch_size
        ids = torch.cat([batch["sample_ids"] for batch, *_ in trainer.steps[epoch * per_epoch : (epoch + 1) * per_epoch]])
        assert sorted(ids.tolist()) == list(range(n_samples))
    assert_distillation_visible(steps)
    replay_loss = DynSDPBLoss(VOCAB, tau=2.0, teacher="previous_visit")
    assert_steps_match(steps, replay_steps(trainer.steps, tiny_model(), replay_loss), atol=1e-5)
    assert trainer.dynsdpb_loss.ring.storage == "topk"


def test_sample_ids_stay_on_the_cpu_while_the_batch_goes_to_the_device(tmp_path, monkeypatch):
    """The train loader leaves its batches on the CPU and the Trainer's _prepare_inputs puts every tensor on
    the device but `sample_ids`, which stay the collator's CPU tensor (the ring reads them on the host; a
    GPU copy would come back each step, a synchronisation). The device here is "meta", so a tensor that
    was moved shows it."""
    trainer = make_trainer(tmp_path / "run")
    batch = next(iter(trainer.get_train_dataloader()))
    assert all(value.device.type == "cpu" for value in batch.values())  # the loader does not place them
    meta = torch.device("meta")
    monkeypatch.setattr(type(trainer.accelerator), "device", property(lambda self: meta))
    monkeypatch.setattr(type(trainer.args), "device", property(lambda self: meta))
    prepared = trainer._prepare_inputs(batch)
    assert prepared["sample_ids"] is batch["sample_ids"] and batch["sample_ids"].device.type == "cpu"
    assert {name: value.device for name, value in prepared.items() if name != "sample_ids"} == {
        name: meta for name in batch if name != "sample_ids"}
    no_ids = {name: value for name, value in batch.items() if name != "sample_ids"}  # e.g. an eval batch
    assert all(value.device == meta for value in trainer._prepare_inputs(no_ids).values())


@pytest.mark.parametrize("dynamic", [False, True])
def test_epoch_ramp_schedules_alpha_over_the_epochs(tmp_path, dynamic):
    """alpha_schedule="epoch_ramp" with last-visit teachers: the kernel's alpha in epoch t = 0, 1, 2 of 3 is
    alpha * t / 3 (each step's alpha_mean with dynamic=False; at most that under the dynamic rule, alpha_r =
    alpha_t (1 - u_r)), and each step equals a replay whose loss has that alpha set before it; another
    schedule name raises."""
    n_samples, batch_size, epochs, alpha = 16, 4, 3, 0.9
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=batch_size, num_train_epochs=epochs, learning_rate=1e-2,
        logging_steps=4, save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
        dataloader_num_workers=0,
    )
    options = dict(model=tiny_model(), args=args, train_dataset=ProgressionDataset(n_samples),
                   data_collator=functools.partial(pad_batch, pad_id=0), tau=2.0, alpha=alpha, dynamic=dynamic,
                   teacher="previous_visit")
    with pytest.raises(ValueError, match="alpha_schedule"):
        RecordingTrainer(**options, alpha_schedule="linear")
    trainer = RecordingTrainer(**options, alpha_schedule="epoch_ramp")
    trainer.train()
    steps = recorded_stats(trainer)
    per_epoch = n_samples // batch_size
    scheduled = [alpha * (i // per_epoch) / epochs for i in range(len(steps))]
    assert len(steps) == epochs * per_epoch
    for step, alpha_t in zip(steps[per_epoch:], scheduled[per_epoch:]):  # epoch 1 has no teachers
        if dynamic:
            assert 0 < step.alpha_mean <= alpha_t + 1e-6
        else:
            assert step.alpha_mean == pytest.approx(alpha_t, rel=1e-6)
    replay_loss = DynSDPBLoss(VOCAB, tau=2.0, alpha=alpha, dynamic=dynamic, teacher="previous_visit")
    replayed = replay_steps(trainer.steps, tiny_model(), replay_loss, before_step=lambda i: replay_loss.set_alpha(scheduled[i]))
    assert_steps_match(steps, replayed, atol=1e-5)
