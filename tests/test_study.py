"""`dynsdpb study`: the tiny configuration end to end, its resumability, and the pieces it is built from."""

from __future__ import annotations

import csv
import json
import math
import os

import pytest
import torch

from dynsdpb_kernels.cli import main
from dynsdpb_kernels.tools.finetune import ByteTokenizer, tiny_llama
from dynsdpb_kernels.tools.study import (
    ARMS,
    COMPUTE_ARMS,
    CSV_COLUMNS,
    DEFAULT_ARMS,
    Example,
    StudyConfig,
    TopModel,
    batch_tensors,
    check_config,
    frozen_features,
    mean_std_ci,
    step_batches,
    t_quantile_975,
)


def test_tiny_study_runs_and_resumes(tmp_path):
    out = tmp_path / "study"
    main(["study", "--tiny", "--out", str(out)])
    with open(out / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == CSV_COLUMNS
    expected = {(task, arm, str(seed)) for task in ("sentiment", "gsm") for arm in DEFAULT_ARMS for seed in range(2)}
    assert {(r["task"], r["arm"], r["seed"]) for r in rows} == expected
    for row in rows:
        assert 0.0 <= float(row["value"]) <= 1.0 and float(row["wall_s"]) > 0 and math.isfinite(float(row["heldout_loss"]))
        assert row["metric"] == ("accuracy" if row["task"] == "sentiment" else "token_accuracy")
    summary = json.loads((out / "summary.json").read_text())
    for task in ("sentiment", "gsm"):
        arms = summary["tasks"][task]["arms"]
        assert set(arms) == set(DEFAULT_ARMS) and "diff_to_ce" not in arms["ce"]
        assert "diff_to_ce_rerun" in arms["dlb"] and not {"diff_to_ce_rerun"} & (set(arms["ce"]) | set(arms["ce_rerun"]))
        assert {"diff_to_dlb"} <= set(arms["dynsdpb"]) & set(arms["alpha_only"]) & set(arms["tau_only"])
        assert not {"diff_to_dlb"} & (set(arms["ce"]) | set(arms["ce_rerun"]) | set(arms["dlb"]))
        ce = {int(r["seed"]): float(r["value"]) for r in rows if r["task"] == task and r["arm"] == "ce"}
        dlb = {int(r["seed"]): float(r["value"]) for r in rows if r["task"] == task and r["arm"] == "dlb"}
        assert arms["dlb"]["diff_to_ce"]["mean"] == pytest.approx(sum(dlb[s] - ce[s] for s in ce) / len(ce), abs=1e-6)
        dynsdpb = {int(r["seed"]): float(r["value"]) for r in rows if r["task"] == task and r["arm"] == "dynsdpb"}
        assert arms["dynsdpb"]["diff_to_dlb"]["mean"] == pytest.approx(sum(dynsdpb[s] - dlb[s] for s in dlb) / len(dlb), abs=1e-6)
        assert (out / f"{task}.png").is_file()
    assert (out / "curves.png").is_file()
    assert "diff to ce_rerun" in (out / "summary.txt").read_text() and "diff to dlb" in (out / "summary.txt").read_text()
    assert (out / "summary.md").read_text().count("| dynsdpb | 2 |") == 2
    # every DLB-arm run found a teacher for each re-run sample after the first step
    for path in (out / "runs").glob("*-seed*.json"):
        run = json.loads(path.read_text())
        assert run["teacher_misses"] == 0
        assert (run["teacher_samples"] > 0) == (ARMS[run["arm"]].dynamic is not None)
    # step 1 has no previous samples: every arm starts from the same weights on the same batch, and the
    # distilling arms have no teacher yet (their loss is the CE); ce_rerun is DLB's batch without distillation
    for task in ("sentiment", "gsm"):
        for seed in range(2):
            runs = {arm: json.loads((out / "runs" / f"{task}-{arm}-seed{seed}.json").read_text()) for arm in DEFAULT_ARMS}
            for arm, run in runs.items():
                assert run["train_ce"][0] == pytest.approx(runs["ce"]["train_ce"][0], rel=1e-5)
                assert run["train_loss"][0] == pytest.approx(run["train_ce"][0], rel=1e-6)
            assert runs["ce_rerun"]["train_loss"] == runs["ce_rerun"]["train_ce"]
            assert runs["ce_rerun"]["train_ce"][1] != pytest.approx(runs["ce"]["train_ce"][1], rel=1e-6)

    # resumed: a deleted run is recomputed with the same result, the others are read back untouched
    target = out / "runs" / "gsm-dynsdpb-seed1.json"
    before = json.loads(target.read_text())
    untouched = (out / "runs" / "sentiment-ce-seed0.json").stat().st_mtime_ns
    target.unlink()
    main(["study", "--tiny", "--out", str(out)])
    after = json.loads(target.read_text())
    assert after["train_ce"] == before["train_ce"] and after["heldout"] == before["heldout"]
    assert (out / "runs" / "sentiment-ce-seed0.json").stat().st_mtime_ns == untouched


def test_compute_matched_study(tmp_path):
    """--epochs and the compute-matched arms: ce_long makes twice the updates of ce on the same stream,
    ce_ls is label-smoothed CE, the last-visit arms see no re-run and get a teacher for every sample of
    the second epoch (their first epoch is plain CE), and the summary carries the cost columns and the
    comparisons with ce_long."""
    out = tmp_path / "compute"
    main(["study", "--tiny", "--epochs", "2", "--tasks", "gsm", "--arms", "compute", "--out", str(out)])
    per_epoch = 6  # 12 train examples, 2 new samples a step
    runs = {(arm, seed): json.loads((out / "runs" / f"gsm-{arm}-seed{seed}.json").read_text()) for arm in COMPUTE_ARMS for seed in range(2)}
    for (arm, seed), run in runs.items():
        spec = ARMS[arm]
        assert run["updates"] == len(run["train_ce"]) == 2 * per_epoch * spec.passes
        assert run["sample_passes"] == (2 * 12 * spec.passes if not spec.rerun else 2 * 12 + 2 * 12 - 2)
        assert run["teacher_misses"] == 0
        if spec.teacher == "previous_visit":
            assert run["teacher_samples"] == 12  # every sample of epoch 2, none in epoch 1
            # epoch 1 is plain CE on the same batches as ce: the same losses step by step
            assert run["train_loss"][:per_epoch] == pytest.approx(runs[("ce", seed)]["train_loss"][:per_epoch], rel=1e-5)
            assert run["train_loss"][per_epoch:] != pytest.approx(run["train_ce"][per_epoch:], rel=1e-7)
    for seed in range(2):
        ce, long = runs[("ce", seed)], runs[("ce_long", seed)]
        assert long["train_ce"][: len(ce["train_ce"])] == pytest.approx(ce["train_ce"], rel=1e-6)  # same stream, then more
        smoothed = runs[("ce_ls", seed)]
        assert smoothed["train_ce"][0] == pytest.approx(ce["train_ce"][0], rel=1e-6)
        assert smoothed["train_loss"][0] != pytest.approx(smoothed["train_ce"][0], rel=1e-7)  # label smoothing's loss
        assert smoothed["train_ce"][1] != pytest.approx(ce["train_ce"][1], rel=1e-7)  # and its own update
    summary = json.loads((out / "summary.json").read_text())["tasks"]["gsm"]
    arms = summary["arms"]
    assert set(arms) == set(COMPUTE_ARMS) and summary["timing"]["steps_timed"] == 1
    assert "diff_to_ce" in arms["ce_long"] and not {"diff_to_ce", "diff_to_ce_long"} & set(arms["ce"])
    assert all("diff_to_ce_long" in arms[a] for a in COMPUTE_ARMS if a not in ("ce", "ce_long"))
    assert "diff_to_ce_rerun" in arms["lastvisit"] and "diff_to_dlb" not in arms["lastvisit"]
    for arm in COMPUTE_ARMS:
        timed = summary["timing"]["arms"][arm]
        assert arms[arm]["full_model_s"] == pytest.approx(timed["s_per_update"] * arms[arm]["updates"])
        assert timed["samples_per_update"] == (4 if ARMS[arm].rerun else 2)
        assert (timed["teacher_samples_last"] > 0) == (ARMS[arm].dynamic is not None)
    assert arms["ce_ls"]["distill_term"]["mean"] == 0.0
    table = (out / "summary.md").read_text()
    assert "difference to ce_long [95% CI]" in table and "full fine-tuning s/run" in table and "| lastvisit | 2 |" in table
    assert (out / "gsm_cost.png").is_file()


def test_split_model_equals_the_full_model():
    """Frozen lower layers + TopModel give the logits of the whole model at the target positions."""
    tokenizer = ByteTokenizer()
    model = tiny_llama(tokenizer.vocab_size, seed=3, layers=3).eval()
    examples = []
    for text in ("a short one", "a rather longer example sentence"):
        ids = torch.tensor(tokenizer.encode(text))
        examples.append(Example(ids, torch.arange(2, len(ids) - 1), ids[3:]))
    features = frozen_features(model, examples, n_frozen=2, pad_id=tokenizer.pad_token_id)
    top = TopModel(model, n_frozen=2)
    assert {name.split(".")[0] for name, _ in top.named_parameters()} == {"layers", "norm"}
    feats, mask, positions, labels = batch_tensors(examples, [0, 1], features)
    logits = top(feats, mask, positions)
    for row, example in enumerate(examples):
        full = model(input_ids=example.input_ids[None]).logits[0]
        k = len(example.target_positions)
        torch.testing.assert_close(logits[row, :k], full[example.target_positions], rtol=1e-4, atol=1e-5)
        assert (labels[row, k:] == -100).all() and torch.equal(labels[row, :k], example.target_tokens)


def test_every_arm_sees_the_same_new_samples():
    steps = step_batches(n_train=10, batch_size=3, steps=9, seed=4)
    new_stream = [i for _, new in steps for i in new]
    assert all(len(new) == 3 or len(new) == 1 for _, new in steps)  # 10 = 3 + 3 + 3 + 1 per epoch
    assert sorted(new_stream[:10]) == list(range(10))  # the first epoch covers every sample once
    for (previous_batch, previous_new), (batch, new) in zip(steps, steps[1:]):
        assert batch == previous_new + new and not set(previous_new) & set(new)


def t_cdf_above_zero(q: float, df: int) -> float:
    """P(0 < T < q) for Student's t with df degrees of freedom, by Simpson's rule on its density in float64
    (an independent check of the study's quantile table)."""
    x = torch.linspace(0.0, q, 20001, dtype=torch.float64)
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    density = torch.exp(log_norm - (df + 1) / 2 * torch.log1p(x * x / df))
    weights = torch.ones_like(x)
    weights[1:-1:2], weights[2:-1:2] = 4.0, 2.0
    return float((density * weights).sum() * (q / (len(x) - 1)) / 3)


@pytest.mark.parametrize("df", [1, 2, 4, 9, 30, 31, 60, 200])
def test_t_quantiles(df):
    """t_{0.975, df} leaves 2.5% above it: P(0 < T < q) = 0.475 (the table to its 4 decimals, the expansion beyond)."""
    assert t_cdf_above_zero(t_quantile_975(df), df) == pytest.approx(0.475, abs=2e-5)


def test_confidence_interval():
    values = [float(v) for v in torch.randn(6, dtype=torch.float64)]
    stats = mean_std_ci(values)
    reference = torch.tensor(values, dtype=torch.float64)
    assert stats["mean"] == pytest.approx(float(reference.mean()), rel=1e-12)
    assert stats["std"] == pytest.approx(float(reference.std()), rel=1e-9)
    half_width = stats["ci_high"] - stats["mean"]
    assert half_width == pytest.approx(stats["mean"] - stats["ci_low"], rel=1e-12)
    assert half_width == pytest.approx(2.5706 * float(reference.std()) / math.sqrt(6), rel=1e-9)
    assert math.isnan(mean_std_ci([1.0])["std"])


def test_confidence_interval_matches_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")  # where it is installed (not a dependency)
    values = [float(v) for v in torch.randn(6, dtype=torch.float64)]
    stats = mean_std_ci(values)
    expected = float(scipy_stats.t.ppf(0.975, 5)) * float(scipy_stats.sem(values))
    assert stats["ci_high"] - stats["mean"] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"arms": ("ce", "kd")}, "arms must be among"), ({"tasks": ("mnli",)}, "tasks must be among"),
        ({"seeds": 0}, "seeds must be a positive int"), ({"epochs": 0}, "epochs must be a positive int"),
        ({"timing_steps": -1}, "timing_steps must be an int >= 0"),
    ],
)
def test_bad_study_options_are_named(tmp_path, change, message):
    config = StudyConfig.tiny(tmp_path)
    for name, value in change.items():
        setattr(config, name, value)
    with pytest.raises(ValueError, match=message):
        check_config(config)


def test_workers_claim_runs(tmp_path):
    """A run claimed by a live process is skipped by another worker; a dead owner's claim is taken over."""
    from dynsdpb_kernels.tools.study import _claim

    run = tmp_path / "gsm-dlb-seed0.json"
    assert _claim(run) and not _claim(run)  # this process holds it now
    run.with_suffix(".claim").write_text("999999999")  # no such process
    assert _claim(run) and run.with_suffix(".claim").read_text() == str(os.getpid())


def test_learning_rate_option(tmp_path):
    config = StudyConfig.tiny(tmp_path)
    config.with_lr(3e-3)
    assert config.sentiment.lr == config.gsm.lr == 3e-3
    assert StudyConfig.tiny(tmp_path).identity() != config.identity()  # stored runs of another lr are refused
    for bad in (0.0, -1e-3, math.inf, math.nan, "1e-3"):
        with pytest.raises(ValueError, match="lr must be a finite number > 0"):
            config.with_lr(bad)
