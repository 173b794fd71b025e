"""The benchmark compares like with like, and its command line runs."""

from __future__ import annotations

import csv

import torch
from truth import truth_dynsdpb

from dynsdpb_kernels import dynsdpb_loss
from dynsdpb_kernels.tools.benchmark import eager_dynsdpb_loss
from dynsdpb_kernels.cli import main


def test_eager_baseline_is_the_same_loss():
    logits = torch.randn(12, 300) * 3
    teacher = logits + torch.randn(12, 300)
    labels = torch.randint(0, 300, (12,))
    labels[3] = -100
    mask = torch.rand(12) < 0.5
    mask[0] = True
    truth = truth_dynsdpb(logits, labels, teacher, mask)["loss"]
    assert torch.allclose(eager_dynsdpb_loss(logits, labels, teacher, mask).double(), truth, rtol=1e-5)
    assert torch.allclose(dynsdpb_loss(logits, labels, teacher, mask).double(), truth, rtol=1e-5)


def test_bench_command_writes_csv(tmp_path, capsys):
    csv_path = tmp_path / "results.csv"
    main(["bench", "--n", "8", "--v", "100", "--dtype", "float32", "--mode", "full", "--providers", "ours,eager",
          "--device", "cpu", "--repeats", "1", "--csv", str(csv_path), "--png", str(tmp_path / "results.png")])
    rows = list(csv.DictReader(csv_path.open()))
    assert [row["provider"] for row in rows] == ["ours", "eager"]
    assert all(float(row["median_s"]) > 0 for row in rows)
    assert "copy bandwidth" in capsys.readouterr().out


def test_bench_ring_command(capsys):
    """`dynsdpb bench-ring` times dense and top-k rings on the same DLB calls and reports the ring's bytes
    against the next step's teachers: each ring holds at most twice the smallest ring that holds them (rows
    double-buffered, one entry table)."""
    from test_ring_floor import _row_bytes

    from dynsdpb_kernels.tools.ring_benchmark import dlb_calls, dlb_setup, next_step_teacher_bytes, run_ring_bench

    main(["bench-ring", "--v", "512", "--dtype", "float32,bfloat16", "--samples", "4", "--tokens", "8", "--repeats", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert "ISA" in lines[0] and len(lines) == 4
    rows = run_ring_bench([512], ["bfloat16"], "cpu", 1, samples=4, tokens=8)
    assert rows[0]["dense_s"] > 0 and rows[0]["topk_s"] > 0
    for storage in ("dense", "topk"):
        loss_fn, calls = dlb_setup(512, storage, torch.bfloat16, "cpu", samples=4, tokens=8)
        dlb_calls(loss_fn, calls)
        assert int(loss_fn.last_stats.teacher_samples) == 2  # the previous call's 2 new samples were taught
        next_rows = 2 * 7  # 2 new samples x (8 - 1) shifted rows
        row = _row_bytes(loss_fn.ring)  # a row in this format (the README's formula), without its entry
        teachers = next_step_teacher_bytes(loss_fn, next_rows)
        assert teachers == next_rows * (row + 24) + 8  # the smallest ring holding them: rows, entries, head
        assert loss_fn.ring.nbytes == 2 * next_rows * row + 24 * next_rows + 8  # double buffer + entry table
        assert loss_fn.ring.nbytes <= 2.0 * teachers
    capsys.readouterr()
