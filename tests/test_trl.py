"""DynSDPBSFTTrainer (TRL's SFTTrainer with DynSDPB) with a tiny random LLaMA and a byte tokenizer built in
code, on the CPU: each step's loss, cross-entropy and distillation term against a replay with DynSDPBLoss,
sample ids through SFT's dataset preparation and collator for the three dataset kinds, the fused head,
checkpoint and resume. The LLaMA's logits are peaked (helpers_models.peaked_tiny_llama), so each step with
teachers has a distillation term of percents of its loss, and a run without teachers fails the checks."""

from __future__ import annotations

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from helpers_models import (  # noqa: E402
    RecordingTrainerMixin, assert_distillation_visible, assert_steps_match, peaked_tiny_llama, recorded_stats,
    replay_steps,
)

from dynsdpb_kernels import DynSDPBLoss  # noqa: E402
from dynsdpb_kernels.tools.finetune import hf_byte_tokenizer, tiny_llama  # noqa: E402
from dynsdpb_kernels.integrations.transformers import RING_FILE  # noqa: E402
from dynsdpb_kernels.integrations.trl import DynSDPBSFTTrainer  # noqa: E402

TOKENIZER = hf_byte_tokenizer()
N_SAMPLES = 20


def _records(n: int = N_SAMPLES):
    """Short arithmetic facts of varying length (dynamic padding)."""
    gen = torch.Generator().manual_seed(1)
    pairs = torch.randint(0, 60, (n, 2), generator=gen).tolist()
    return [(f"{a}+{b}=", f"{a + b}" + "!" * (i % 3)) for i, (a, b) in enumerate(pairs)]


def make_dataset(kind: str):
    """The same samples as plain text, pre-tokenized input_ids or conversations, and each sample's
    expected token ids after SFT's preparation."""
    records = _records()
    eos = TOKENIZER.eos_token_id
    if kind == "text":
        rows = [{"text": prompt + answer} for prompt, answer in records]
        expected = [TOKENIZER(prompt + answer)["input_ids"] + [eos] for prompt, answer in records]
    elif kind == "pretokenized":
        expected = [TOKENIZER(prompt + answer)["input_ids"] + [eos] for prompt, answer in records]
        rows = [{"input_ids": ids} for ids in expected]
    else:
        rows = [{"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}
                for prompt, answer in records]
        expected = [TOKENIZER.apply_chat_template(row["messages"], tokenize=True)["input_ids"] for row in rows]
    return datasets.Dataset.from_list(rows), expected


class RecordingSFTTrainer(RecordingTrainerMixin, DynSDPBSFTTrainer):
    """DynSDPBSFTTrainer keeping, for every training step, the batch, num_items_in_batch, the parameters
    before the step and the step's StepStats (helpers_models.RecordingTrainerMixin)."""


def tiny_model():
    """Peaked logits: the teachers' distillation term is a visible part of each loss (helpers_models)."""
    return peaked_tiny_llama(TOKENIZER.vocab_size, seed=0, hidden_size=32, layers=2)


def make_trainer(output_dir, kind="text", max_steps=4, trainer_cls=RecordingSFTTrainer, **options):
    dataset, _ = make_dataset(kind)
    config = trl.SFTConfig(
        output_dir=str(output_dir), per_device_train_batch_size=3, max_steps=max_steps, learning_rate=5e-3,
        logging_steps=1, save_strategy="steps", save_steps=3, report_to=[], use_cpu=True, seed=0,
        disable_tqdm=True, dataloader_num_workers=0, max_length=64, bf16=False,  # SFTConfig defaults to bf16 autocast
    )
    return trainer_cls(
        model=tiny_model(), args=config, train_dataset=dataset, processing_class=TOKENIZER, tau=2.0, capacity_rows=512,
        **options,
    )


def _replay(trainer):
    """Each recorded step's loss and its parts recomputed outside the trainer: the model at that step's
    parameters, its logits, and a fresh DynSDPBLoss fed the same batches in the same order."""
    loss_fn = DynSDPBLoss(TOKENIZER.vocab_size, tau=2.0, capacity_rows=512)
    return replay_steps(trainer.steps, tiny_model(), loss_fn), loss_fn


@pytest.mark.parametrize("kind", ["text", "pretokenized", "conversational"])
def test_sft_losses_equal_a_replay_and_ids_survive_preparation(tmp_path, kind):
    trainer = make_trainer(tmp_path, kind)
    trainer.train()
    _, expected_tokens = make_dataset(kind)
    assert len(trainer.steps) == 4
    for batch, *_ in trainer.steps:
        # each row of a batch is the sample its id names, tokenized as SFT does
        for row, sample_id in enumerate(batch["sample_ids"].tolist()):
            tokens = expected_tokens[sample_id]
            assert batch["input_ids"][row, : len(tokens)].tolist() == tokens
            assert int(batch["attention_mask"][row].sum()) == len(tokens)
    # DLB order: the second half of a step's batch is the first half of the next one
    for (previous, *_), (current, *_) in zip(trainer.steps, trainer.steps[1:]):
        carried = current["sample_ids"][: len(current["sample_ids"]) - 3].tolist()
        assert carried == previous["sample_ids"][-3:].tolist()
    # the loss, its cross-entropy and its distillation term, each equal to the replay's; the distillation
    # term is percents of the loss, so a replay (or a trainer) without teachers could not match
    assert_distillation_visible(recorded_stats(trainer))
    replayed, loss_fn = _replay(trainer)
    assert_steps_match(recorded_stats(trainer), replayed)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 4
    for entry, step in zip(logs, replayed):  # one step per log: the logged stats are the step's
        assert {"ce", "kl", "alpha_mean", "tau_mean", "teacher_samples", "ring_bytes"} <= entry.keys()
        assert entry["ce"] == pytest.approx(step.ce, rel=1e-5, abs=1e-6)
        assert entry["kl"] == pytest.approx(step.kl, rel=1e-5, abs=1e-6)
        assert entry["alpha_mean"] == pytest.approx(step.alpha_mean, rel=1e-5, abs=1e-6)
    assert all(entry["teacher_samples"] == 3 for entry in logs[1:])
    assert logs[-1]["ring_bytes"] == trainer.dynsdpb_loss.ring.nbytes == loss_fn.ring.nbytes
    final, replayed_ring = trainer.dynsdpb_loss.ring.state_dict(), loss_fn.ring.state_dict()
    assert torch.equal(final["entry_ids"], replayed_ring["entry_ids"]) and torch.equal(final["head"], replayed_ring["head"])


@pytest.mark.parametrize("storage", ["dense", "topk"])
def test_fused_head_matches_the_logits_path(tmp_path, storage):
    options = {"teacher_storage": storage, "topk": 16}
    plain = make_trainer(tmp_path / "plain", max_steps=3, **options)
    plain.train()
    fused = make_trainer(tmp_path / "fused", max_steps=3, fused_linear=True, **options)
    fused.train()
    assert_distillation_visible(recorded_stats(plain))
    assert_steps_match(recorded_stats(fused), recorded_stats(plain), rtol=1e-4, atol=1e-5)
    assert fused.dynsdpb_loss.ring.nbytes == plain.dynsdpb_loss.ring.nbytes


def test_resume_restores_the_ring(tmp_path):
    uninterrupted = make_trainer(tmp_path / "a", max_steps=6)
    uninterrupted.train()
    assert (tmp_path / "a" / "checkpoint-3" / RING_FILE).is_file()
    resumed = make_trainer(tmp_path / "b", max_steps=6)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    assert len(resumed.steps) == 3
    assert_distillation_visible(recorded_stats(resumed))
    assert_steps_match(recorded_stats(resumed), recorded_stats(uninterrupted)[3:])
    final_a, final_b = uninterrupted.dynsdpb_loss.ring.state_dict(), resumed.dynsdpb_loss.ring.state_dict()
    for key in ("entry_ids", "entry_start", "entry_length", "head"):
        assert torch.equal(final_a[key], final_b[key]), key
    torch.testing.assert_close(uninterrupted.dynsdpb_loss.ring.state_dict()["rows"], resumed.dynsdpb_loss.ring.state_dict()["rows"])
    # the restored ring teaches the first resumed step (a fresh ring would have no teachers there)
    assert resumed.steps[0][-1].teacher_samples == uninterrupted.steps[3][-1].teacher_samples == 3


def test_padding_free_is_refused():
    config = trl.SFTConfig(output_dir="unused", padding_free=True, report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="padding_free"):
        DynSDPBSFTTrainer(model=tiny_llama(TOKENIZER.vocab_size, seed=0, hidden_size=32, layers=1), args=config,
                          train_dataset=make_dataset("text")[0], processing_class=TOKENIZER)
