"""DynSDPBTrainer and DynSDPBSFTTrainer under real launchers: examples/train_trainer.py run as 2 CPU
processes (gloo) by `torchrun --standalone --nproc_per_node 2` and by `accelerate launch` with
examples/accelerate_ddp.yaml (DDP), with the logits head and fused_linear=True,
gradient_accumulation_steps 1 and 2. (No FSDP config is run: on the CPU accelerate
does not apply FSDP -- its state sets FSDP up only for accelerator devices -- and trains with DDP.)

Each launch is checked against what DLB prescribes, per rank:
  - every requested optimizer step trained (MAX_STEPS * grad_accum micro-batches), on the model the
    launcher's config asks for (2 processes, the DDP wrapper);
  - the rank's batches are OverlapBatchSampler's stream for that rank (disjoint from the other rank's
    within an epoch; each batch opens with the previous one's new samples), each row the sample its id
    names; the first micro-batch has no teacher, every later one exactly BATCH (its carried samples);
  - num_items_in_batch is the number of label tokens (after the causal shift) of the whole step: all
    micro-batches of both ranks.

And against a single-process replay that is exact rather than approximate. The example saves the full
parameters W_s at the start of every optimizer step s (and after the last). For each step, the replay
loads W_s into one model and, for each rank r, runs r's micro-batches of that step (the recorded
tensors) through r's own loss module (one per rank, fed every micro-batch of r in order, so its ring
holds exactly what r's ring held). Then:
  - each micro-batch's loss equals the one the Trainer back-propagated on rank r (the loss module's value
    times WORLD: with average_tokens_across_devices, num_items_in_batch counts both ranks' tokens and
    compute_loss undoes the gradient averaging), and its teacher count and distillation term match;
  - the gradient semantics: with SGD, constant lr and no clipping the optimizer step is
    W_{s+1} = W_s - lr * g_s, where g_s is the mean over ranks (DDP's all-reduce) of each rank's gradient of the sum of its micro-batch losses. The replay computes
    g_s from the same losses and checks W_s - W_{s+1} against lr * g_s.
Because each step starts from the saved W_s, a step's check does not depend on the replay reproducing
earlier steps' float rounding, so the tolerances are float32 ones.

The distillation term is made non-negligible (dynamic=False, alpha=10, tau=2): for the first micro-batch of
every step after the first, a replay whose ring is empty (no teachers) gives a loss that differs from the
recorded one by far more than the tolerance; the test asserts that too, so it cannot pass with the
teachers lost.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from dynsdpb_kernels import DynSDPBLoss, FusedLinearDynSDPBLoss, OverlapBatchSampler, VisitBatchSampler  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "train_trainer.py"
# 48 samples: 6 batches per rank and epoch, so gradient accumulation 2 runs into the second epoch
WORLD, MAX_STEPS, BATCH, SAMPLES, LR, ALPHA, TAU, SAVE_STEPS = 2, 4, 4, 48, 0.5, 10.0, 2.0, 2
BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Setup:
    """Where the teachers come from, and the data and steps that exercise it."""

    teacher: str = "previous_batch"
    samples: int = SAMPLES
    max_steps: int = MAX_STEPS

    def sampler(self, rank: int):
        order = VisitBatchSampler if self.teacher == "previous_visit" else OverlapBatchSampler
        return order(self.samples, BATCH, seed=example.SEED, num_replicas=WORLD, rank=rank)

    def teacher_counts(self, stream: list[list[int]]) -> list[int]:
        """Teachers per micro-batch: DLB's carried samples (all but the first batch), or, for last-visit
        teachers, every sample from the second epoch on."""
        if self.teacher == "previous_batch":
            return [0] + [BATCH] * (len(stream) - 1)
        per_epoch = len(self.sampler(0))
        return [0 if i < per_epoch else len(batch) for i, batch in enumerate(stream)]


DLB = Setup()
# last-visit teachers: 16 samples, 2 batches per rank and epoch, 6 steps = 3 epochs
LAST_VISIT = Setup("previous_visit", samples=16, max_steps=6)


def _load_example():
    spec = importlib.util.spec_from_file_location("train_trainer_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


example = _load_example()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# The launchers' command lines up to the script, as the README gives them (run from the repository root).
LAUNCHERS = {
    "torchrun": f"torchrun --standalone --nproc_per_node {WORLD}",
    "accelerate_ddp": "accelerate launch --config_file examples/accelerate_ddp.yaml",
}


def launch_command(launcher: str) -> list[str]:
    """LAUNCHERS[launcher] with the launcher from this interpreter's environment; accelerate gets a free
    port so that concurrent runs do not collide (torchrun --standalone picks its own)."""
    program, *arguments = LAUNCHERS[launcher].split()
    command = [str(BIN / program), *arguments]
    if program == "accelerate":
        command += ["--main_process_port", str(_free_port())]
    return command


def test_readme_gives_the_launch_commands_these_tests_run():
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Scaling out") :]
    block = re.search(r"```bash\n(.*?)```", section, re.DOTALL).group(1)
    lines = [line for line in block.splitlines() if line and not line.startswith("#")]
    assert len(lines) == len(LAUNCHERS)
    for line, command in zip(lines, LAUNCHERS.values()):
        assert line.startswith(f"{command} examples/train_trainer.py --out run"), line


def run_launch(launcher: str, trainer: str, fused_linear: bool, grad_accum: int, out: Path, setup: Setup = DLB) -> list[dict]:
    """Run the example under the launcher; returns the two ranks' records."""
    arguments = ["--out", str(out), "--trainer", trainer, "--grad-accum", str(grad_accum), "--max-steps", str(setup.max_steps),
                 "--samples", str(setup.samples), "--teacher", setup.teacher,
                 "--batch-size", str(BATCH), "--lr", str(LR), "--optim", "sgd", "--alpha", str(ALPHA), "--tau", str(TAU),
                 "--dynamic", "false", "--save-weights", "--save-steps", str(SAVE_STEPS)]
    if fused_linear:
        arguments.append("--fused-linear")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([*launch_command(launcher), "examples/train_trainer.py", *arguments], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{launcher} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(WORLD)]


def expected_streams(n_batches: int, setup: Setup = DLB) -> list[list[list[int]]]:
    """Each rank's first n_batches batches of its sampler, epoch after epoch (as the Trainer sets them)."""
    streams = []
    for rank in range(WORLD):
        sampler = setup.sampler(rank)
        batches, epoch = [], 0
        while len(batches) < n_batches:
            sampler.set_epoch(epoch)
            batches.extend(sampler)
            epoch += 1
        streams.append(batches[:n_batches])
    return streams


def replay_step_losses(model, loss_fn, micro_batch: dict, fused_linear: bool) -> torch.Tensor:
    """The loss module's value for one recorded micro-batch at the model's current weights."""
    input_ids = torch.tensor(micro_batch["input_ids"])
    attention_mask = torch.tensor(micro_batch["attention_mask"])
    labels, sample_ids = torch.tensor(micro_batch["labels"]), torch.tensor(micro_batch["sample_ids"])
    num_items = micro_batch["num_items_in_batch"]
    if fused_linear:
        hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return loss_fn(hidden, model.lm_head.weight, labels, sample_ids, num_items_in_batch=num_items)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return loss_fn(logits, labels, sample_ids, num_items_in_batch=num_items)


def make_loss(vocab_size: int, fused_linear: bool, teacher: str = "previous_batch"):
    cls = FusedLinearDynSDPBLoss if fused_linear else DynSDPBLoss
    capacity_rows = None if teacher == "previous_visit" else 1024  # as the example
    return cls(vocab_size, alpha=ALPHA, tau=TAU, dynamic=False, capacity_rows=capacity_rows, teacher_dtype=torch.float32,
               teacher=teacher)


LAUNCHES = [
    # (launcher, trainer, fused_linear, gradient_accumulation_steps): each launcher with both trainers, both
    # heads and both accumulation settings
    pytest.param("torchrun", "trainer", False, 1, id="torchrun-trainer-logits-ga1"),
    pytest.param("torchrun", "sft", True, 2, id="torchrun-sft-fused-ga2"),
    pytest.param("accelerate_ddp", "trainer", True, 1, id="accelerate_ddp-trainer-fused-ga1"),
    pytest.param("accelerate_ddp", "sft", False, 2, id="accelerate_ddp-sft-logits-ga2"),
]


@pytest.mark.parametrize("launcher, trainer, fused_linear, grad_accum", LAUNCHES)
def test_launched_trainer_matches_a_single_process_replay(tmp_path, launcher, trainer, fused_linear, grad_accum):
    if trainer == "sft":
        pytest.importorskip("trl")
        pytest.importorskip("datasets")
    records = run_launch(launcher, trainer, fused_linear, grad_accum, tmp_path)
    check_launch(tmp_path, records, launcher, fused_linear, grad_accum)


@pytest.mark.parametrize("launcher", ["torchrun"])
def test_launched_previous_visit_teachers_match_a_replay(tmp_path, launcher):
    """teacher="previous_visit" under DDP: VisitBatchSampler's fixed shards bring each sample back to the
    rank whose ring holds it, so from the second epoch on every sample of every step has its teacher."""
    records = run_launch(launcher, "trainer", False, 1, tmp_path, LAST_VISIT)
    check_launch(tmp_path, records, launcher, False, 1, LAST_VISIT)


def check_launch(out: Path, records: list[dict], launcher: str, fused_linear: bool, grad_accum: int, setup: Setup = DLB) -> None:
    """Every check of the module docstring on one launch's output folder."""
    max_steps, samples = setup.max_steps, setup.samples
    n_micro = max_steps * grad_accum
    tokens = example.make_token_lists(samples)

    # the launcher's configuration is the one that ran
    for record in records:
        assert record["world_size"] == WORLD
        assert record["model_wrapper"] == "DistributedDataParallel"
    assert [record["rank"] for record in records] == list(range(WORLD))

    # every requested step on every rank, in DLB order with the expected teachers
    streams = expected_streams(n_micro, setup)
    for rank, record in enumerate(records):
        micro = record["micro_batches"]
        assert record["global_step"] == max_steps
        assert [m["step"] for m in micro] == [s for s in range(max_steps) for _ in range(grad_accum)]
        assert [m["sample_ids"] for m in micro] == streams[rank]
        assert [m["teacher_samples"] for m in micro] == setup.teacher_counts(streams[rank])
        for m in micro:
            for row, sample_id in enumerate(m["sample_ids"]):
                n = len(tokens[sample_id])
                assert m["input_ids"][row][:n] == tokens[sample_id] and sum(m["attention_mask"][row]) == n
                assert m["labels"][row][:n] == tokens[sample_id] and set(m["labels"][row][n:]) <= {-100}
        logged = [entry for entry in record["log_history"] if "loss" in entry]
        taught = [any(m["teacher_samples"] for m in micro if m["step"] == step) for step in range(max_steps)]
        assert len(logged) == max_steps and [entry["teacher_samples"] > 0 for entry in logged] == taught
    first_epoch = samples // (WORLD * BATCH)  # batches of one epoch per rank
    assert not {i for b in streams[0][:first_epoch] for i in b} & {i for b in streams[1][:first_epoch] for i in b}
    for step in range(max_steps):
        step_tokens = sum(len(tokens[i]) - 1 for record in records for m in record["micro_batches"]
                          if m["step"] == step for i in m["sample_ids"])
        assert all(m["num_items_in_batch"] == step_tokens for record in records for m in record["micro_batches"] if m["step"] == step)

    # each rank's ring file in the checkpoint
    checkpoint = out / f"checkpoint-{SAVE_STEPS}"
    rings = [torch.load(checkpoint / f"dynsdpb_ring_rank{rank}.pt", weights_only=True) for rank in range(WORLD)]

    # the replay: per-step weights, one ring per rank stream, gradient = mean over ranks
    model = example.make_model(example.hf_byte_tokenizer().vocab_size)
    vocab_size = model.config.vocab_size
    loss_fns = [make_loss(vocab_size, fused_linear, setup.teacher).train() for _ in range(WORLD)]
    margins = []
    for step in range(max_steps):
        weights = torch.load(out / f"weights_step{step}.pt", weights_only=True)
        after = torch.load(out / f"weights_step{step + 1}.pt", weights_only=True)
        model.load_state_dict(weights)
        model.zero_grad()
        total = 0.0
        for rank, record in enumerate(records):
            for index, m in enumerate(mb for mb in record["micro_batches"] if mb["step"] == step):
                loss = replay_step_losses(model, loss_fns[rank], m, fused_linear) * WORLD
                stats = loss_fns[rank].last_stats
                assert float(loss.detach()) == pytest.approx(m["loss"], rel=1e-5, abs=1e-6), (rank, step, index)
                assert int(stats.teacher_samples) == m["teacher_samples"]
                assert float(stats.loss.distill) == pytest.approx(m["distill"], rel=1e-4, abs=1e-7)
                if m["teacher_samples"] and index == 0:  # the same call with no teacher: the distillation term is gone
                    with torch.no_grad():
                        empty = replay_step_losses(model, make_loss(vocab_size, fused_linear, setup.teacher).train(), m, fused_linear)
                    margins.append(abs(float(empty) * WORLD - m["loss"]) / (1e-5 * abs(m["loss"]) + 1e-6))
                total = total + loss
        (total / WORLD).backward()  # DDP: the mean of the ranks' gradients
        for name, parameter in model.named_parameters():
            torch.testing.assert_close(weights[name] - after[name], LR * parameter.grad, rtol=1e-3, atol=1e-6,
                                       msg=lambda text, name=name: f"step {step} {name}: {text}")
        if step + 1 == SAVE_STEPS:  # the checkpoint's rings are the replay's rings after SAVE_STEPS steps
            for rank in range(WORLD):
                replayed = loss_fns[rank].ring.state_dict()
                assert torch.equal(rings[rank]["entry_ids"], replayed["entry_ids"])
                assert torch.equal(rings[rank]["head"], replayed["head"])
    assert min(margins) > 100, margins  # an empty ring would miss the loss by > 100 x the tolerance


def test_gpu_fsdp_config_parses_as_fsdp2():
    """examples/accelerate_fsdp_gpu.yaml is for GPUs (accelerate runs an FSDP config as DDP on the CPU, so it
    is not launched here): accelerate reads it as a 2-process FSDP2 config wrapping each decoder layer."""
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ROOT / "examples" / "accelerate_fsdp_gpu.yaml"))
    assert str(config.distributed_type).endswith("FSDP") and config.num_processes == 2 and not config.use_cpu
    assert config.fsdp_config["fsdp_version"] == 2
    assert config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"
