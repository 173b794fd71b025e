"""The `dynsdpb finetune` job with a tiny setting (what CI can afford), and its shipped dataset."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

from dynsdpb_kernels import cli  # noqa: E402
from dynsdpb_kernels.tools.finetune import DATA_PATH, ByteTokenizer, load_examples, pad_batch, tokenize  # noqa: E402


def test_shipped_dataset_is_small_split_and_disjoint():
    assert DATA_PATH.stat().st_size < 5 * 2**20
    splits = load_examples(DATA_PATH)
    assert len(splits["train"]) == 1200 and len(splits["test"]) == 200
    train_questions = {r["question"] for r in splits["train"]}
    assert not any(r["question"] in train_questions for r in splits["test"])
    assert all(r["solution"].rstrip().endswith(f"#### {r['answer']}") for r in splits["train"][:50])


def test_tokenize_masks_the_prompt_and_pad_batch_pads():
    tokenizer = ByteTokenizer()
    record = {"question": "1+1?", "solution": "2\n#### 2"}
    item = tokenize(record, tokenizer.encode, tokenizer.eos_token_id, max_length=64)
    prompt_length = len(tokenizer.encode("Question: 1+1?\nAnswer: "))
    assert (item["labels"][:prompt_length] == -100).all()
    assert item["labels"][prompt_length:].tolist() == tokenizer.encode("2\n#### 2") + [tokenizer.eos_token_id]
    batch = pad_batch([item, tokenize(record, tokenizer.encode, 2, max_length=10)], pad_id=0)
    assert batch["input_ids"].shape == (2, len(item["input_ids"]))
    assert batch["attention_mask"][1].sum() == 10 and (batch["labels"][1, 10:] == -100).all()


def test_finetune_command_runs_both_arms(tmp_path, capsys):
    cli.main(["finetune", "--model", "tiny", "--steps", "8", "--eval-samples", "4", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    arms = {arm["method"]: arm for arm in results["arms"]}
    assert set(arms) == {"ce", "dynsdpb"}
    for arm in arms.values():
        assert len(arm["train_ce"]) == 8 and all(ce > 0 for ce in arm["train_ce"])
        assert arm["train_ce"][-1] < arm["train_ce"][0]  # the random model learns byte statistics fast
        assert 0 <= arm["heldout_token_accuracy"] <= 1 and arm["heldout_loss"] > 0
    assert arms["dynsdpb"]["ring_bytes"] > 0 and arms["ce"]["ring_bytes"] == 0
    # DLB order: the distilled arm's optimised loss includes the distillation term after the first step
    assert any(total != ce for total, ce in zip(arms["dynsdpb"]["train_loss"][1:], arms["dynsdpb"]["train_ce"][1:]))
    assert (tmp_path / "loss_curves.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "held-out loss" in out and "dynsdpb" in out


def test_finetune_fused_linear_topk_matches_the_logits_path(tmp_path):
    """The flag changes how the DynSDPB arm computes its loss, not what it computes."""
    common = ["finetune", "--model", "tiny", "--steps", "4", "--eval-samples", "2", "--teacher-storage", "topk", "--topk", "32"]
    cli.main(common + ["--out", str(tmp_path / "logits")])
    cli.main(common + ["--fused-linear", "--out", str(tmp_path / "fused")])
    plain = json.loads((tmp_path / "logits" / "results.json").read_text())["arms"][1]
    fused = json.loads((tmp_path / "fused" / "results.json").read_text())["arms"][1]
    assert plain["method"] == fused["method"] == "dynsdpb"
    assert fused["train_loss"] == pytest.approx(plain["train_loss"], rel=1e-4)
    assert fused["ring_bytes"] == plain["ring_bytes"] > 0
