"""The README's examples run exactly as written."""

from __future__ import annotations

import contextlib
import io
import math
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def python_block_after(heading: str) -> str:
    text = README.read_text()
    section = text[text.index(heading) :]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, f"no python block after {heading!r}"
    return match.group(1)


def test_training_loop_example_runs_and_learns():
    code = python_block_after("## Example: a DLB training loop")
    namespace: dict = {}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, str(README), "exec"), namespace)
    stats = namespace["stats"]
    assert int(stats.n_distilled) == 16  # the previous step's 16 samples are taught
    assert float(stats.ce) < 0.5 * math.log(10)  # well below chance: the model learnt the rule
    assert 0.0 < float(stats.alpha_mean) <= 1.0 and 1.0 <= float(stats.tau_mean) <= 3.0
    assert re.fullmatch(r"loss [\d.]+  ce [\d.]+  kl [\d.]+  alpha_mean [\d.]+  tau_mean [\d.]+\n", printed.getvalue())


def test_readme_test_command_is_the_ci_command():
    ci = (README.parent / ".ci" / "run").read_text()
    command = re.search(r"## Tests\n\n```bash\n(.*?)\n```", README.read_text(), re.DOTALL).group(1)
    assert command in ci.splitlines()


def test_module_example_runs_and_distills(capsys):
    code = python_block_after("## Example: the module, the sampler and sample ids")
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    stats = namespace["stats"]
    assert int(stats.teacher_samples) == 16  # the last batch: 16 previous samples taught, 16 new ones
    assert float(stats.loss.ce) < 0.5 * math.log(64)  # it learnt to count
    assert re.fullmatch(
        r"loss [\d.]+  ce [\d.]+  teachers 16/32  tau_mean [\d.]+  ring [\d.]+ MiB\n", capsys.readouterr().out
    )


def _trainer_example_logs(heading: str, tmp_path, monkeypatch) -> list[dict]:
    """Run a Trainer example in tmp_path (it writes its output folder to the working directory); its
    training log entries."""
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(python_block_after(heading), str(README), "exec"), namespace)
    return [entry for entry in namespace["trainer"].state.log_history if "loss" in entry]


def test_trainer_example_runs(tmp_path, monkeypatch):
    logs = _trainer_example_logs("## Example: Hugging Face Trainer", tmp_path, monkeypatch)
    assert len(logs) == 4 and logs[-1]["ce"] < logs[0]["ce"]
    assert {"kl", "alpha_mean", "tau_mean", "ring_bytes"} <= logs[-1].keys()
    assert (tmp_path / "trainer_out" / "checkpoint-10" / "dynsdpb_ring.pt").is_file()


def test_trl_example_runs(tmp_path, monkeypatch):
    pytest.importorskip("trl")
    logs = _trainer_example_logs("## Example: TRL's SFTTrainer", tmp_path, monkeypatch)
    assert len(logs) == 3 and logs[-1]["ce"] < logs[0]["ce"]
    assert logs[-1]["teacher_samples"] == 4 and {"kl", "alpha_mean", "tau_mean", "ring_bytes"} <= logs[-1].keys()
    assert (tmp_path / "sft_out" / "checkpoint-6" / "dynsdpb_ring.pt").is_file()


def test_fused_head_example_runs(capsys):
    code = python_block_after("## Memory-constrained fine-tuning: the fused head and top-k teachers")
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    assert namespace["hidden"].grad is not None and namespace["head"].weight.grad is not None
    assert re.fullmatch(r"loss [\d.]+  teachers 2  ring \d+ bytes\n", capsys.readouterr().out)


def test_last_visit_example_runs_and_distills(capsys):
    code = python_block_after("## Teachers from the previous visit (no re-run)")
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    assert re.fullmatch(r"epoch 0: loss [\d.]+  teachers 0/8  ring \d+ bytes", lines[0])
    for line in lines[1:]:  # every sample of every batch taught by its previous visit
        assert re.fullmatch(r"epoch \d: loss [\d.]+  teachers 8/8  ring \d+ bytes", line), line
    ring = namespace["loss_fn"].ring
    assert ring.storage == "topk" and int(namespace["loss_fn"].last_stats.teacher_misses) == 0


def test_first_screen_loop_runs_and_distills():
    """The first screen's own-loop example, given what it assumes exists (a Hugging Face causal LM, a dataset
    of equal-length input_ids/labels tensors, an optimizer): it trains with DLB batches and its last step
    distills the previous step's samples."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    model = LlamaForCausalLM(config)
    starts = torch.randint(0, 80, (40,)).tolist()
    dataset = [{"input_ids": s + torch.arange(12), "labels": s + torch.arange(12)} for s in starts]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    namespace: dict = {"model": model, "dataset": dataset, "optimizer": optimizer}
    exec(compile(python_block_after("### In your own training loop"), str(README), "exec"), namespace)
    stats = namespace["loss_fn"].last_stats
    assert int(stats.teacher_samples) == 8 and int(stats.teacher_misses) == 8  # the previous step's 8 new samples taught, 8 new
    assert len(namespace["batch"]["sample_ids"]) == 16 and namespace["loss"].requires_grad
