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
