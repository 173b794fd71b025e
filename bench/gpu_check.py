"""The one script to run when a GPU is lent: correctness of the Triton kernel on CUDA, then the benchmark.

    python bench/gpu_check.py            # about 6 minutes on one H200

1. For float32 and bfloat16 at V = 32000 and 128256: the Triton kernel against the independent float64
   autograd truth of tests/truth.py (which shares no code with the package) on the same inputs: the loss
   error no worse than eager PyTorch's at the same dtype plus 1e-5 relative, every gradient element within
   one rounding of the logits' dtype; with ignored rows, rows without a teacher and dynamic alpha/tau.
2. The ring and the fused head on CUDA: DynSDPBLoss (dense and top-k ring) and FusedLinearDynSDPBLoss
   over three DLB steps against the same modules on the reference backend.
3. The Triton operator: torch.library.opcheck on dynsdpb::triton_fused_rows, and a step compiled by
   Inductor with fullgraph=True (one graph, eager's loss and gradient).
4. `dynsdpb bench` at N = 4096: ours vs eager vs torch.compile vs Liger (CE + KL), forward+backward,
   with peak memory and bandwidth against the device copy bandwidth; results appended to
   bench/results.csv.
5. `dynsdpb bench-head` at N = 8192, V = 128256, H = 4096, bfloat16: fused head + top-k ring vs dense
   ring vs eager vs Liger's fused linear cross-entropy + KL. The short table is printed last.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import torch

from dynsdpb_kernels import DynSDPBLoss, FusedLinearDynSDPBLoss, dynsdpb_loss
from dynsdpb_kernels.tools.benchmark import run_grid
from dynsdpb_kernels.tools.head_benchmark import run_head_grid

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from truth import eager_dynsdpb, truth_dynsdpb  # noqa: E402  (the tests' independent float64 statement)


def check_correctness(device: str = "cuda", vocab_sizes: tuple[int, ...] = (32000, 128256), n_rows: int = 256) -> bool:
    """The Triton kernel against the float64 truth (tests/test_gpu_check.py runs this on the CPU interpreter)."""
    ok = True
    for dtype in (torch.float32, torch.bfloat16):
        for vocab_size in vocab_sizes:
            torch.manual_seed(0)
            logits = (torch.randn(n_rows, vocab_size, device=device) * 4).to(dtype)
            teacher = (logits.float() + torch.randn_like(logits, dtype=torch.float32) * 2).to(dtype)
            labels = torch.randint(0, vocab_size, (n_rows,), device=device)
            labels[::7] = -100
            mask = torch.rand(n_rows, device=device) < 0.7
            z = logits.clone().requires_grad_(True)
            loss = dynsdpb_loss(z, labels, teacher, mask, backend="triton")
            loss.backward()
            loss, grad = loss.detach().double(), z.grad.double()
            truth = truth_dynsdpb(logits, labels, teacher, mask)
            true_loss, true_grad = truth["loss"], truth["grad"]
            eager_loss = eager_dynsdpb(logits, labels, teacher, mask)["loss"].double()  # PyTorch at this dtype
            scale = true_loss.abs().clamp_min(1)
            loss_error = float((loss - true_loss).abs() / scale)
            eager_error = float((eager_loss - true_loss).abs() / scale)
            bound = torch.finfo(dtype).eps * true_grad.abs() + 2e-6 * true_grad.abs().max()
            grad_excess = float(((grad - true_grad).abs() - bound).max())
            passed = loss_error <= eager_error + 1e-5 and grad_excess <= 0
            ok &= passed
            print(f"correctness {str(dtype):>15} V={vocab_size:>6}: loss rel err {loss_error:.2e} (eager {eager_error:.2e}), "
                  f"grad excess over one rounding {grad_excess:.2e} -> {'ok' if passed else 'FAIL'}")
    return ok


def check_modules() -> bool:
    """Three DLB steps through the ring and the fused head, Triton on CUDA against the reference backend."""
    ok = True
    vocab_size, hidden_size = 32000, 256
    for storage in ("dense", "topk"):
        torch.manual_seed(1)
        weight = torch.randn(vocab_size, hidden_size, device="cuda") / hidden_size**0.5 * 4
        make = lambda cls, backend: cls(vocab_size, capacity_rows=4096, teacher_storage=storage, backend=backend)  # noqa: E731
        modules = {"triton": make(DynSDPBLoss, "triton"), "reference": make(DynSDPBLoss, "reference"),
                   "fused-head": make(FusedLinearDynSDPBLoss, "triton")}
        for ids in ([0, 1, 2, 3], list(range(8)), list(range(4, 12))):
            hidden = torch.randn(len(ids), 64, hidden_size, device="cuda")
            labels = torch.randint(0, vocab_size, (len(ids), 64), device="cuda")
            sample_ids = torch.tensor(ids)
            losses = {}
            for name, module in modules.items():
                h = hidden.clone().requires_grad_(True)
                loss = module(h, weight, labels, sample_ids) if name == "fused-head" else module(h @ weight.T, labels, sample_ids)
                loss.backward()
                losses[name] = (float(loss), h.grad)
            for name in ("triton", "fused-head"):
                loss_error = abs(losses[name][0] - losses["reference"][0]) / abs(losses["reference"][0])
                grad_error = float((losses[name][1] - losses["reference"][1]).norm() / losses["reference"][1].norm())
                passed = loss_error < 1e-5 and grad_error < 1e-4
                ok &= passed
                print(f"ring/{storage:>5} {name:>10} step ids {ids[0]}..{ids[-1]}: loss rel err {loss_error:.1e}, "
                      f"grad rel err {grad_error:.1e} -> {'ok' if passed else 'FAIL'}")
    return ok


def check_compiled_operator() -> bool:
    torch.manual_seed(0)
    n_rows, hidden_size, vocab_size = 512, 256, 32000
    hidden = torch.randn(n_rows, hidden_size, device="cuda", dtype=torch.bfloat16)
    weight = (torch.randn(vocab_size, hidden_size, device="cuda") / hidden_size**0.5).to(torch.bfloat16)
    labels = torch.randint(0, vocab_size, (n_rows,), device="cuda")
    teacher = (hidden @ weight.T).float() + torch.randn(n_rows, vocab_size, device="cuda")
    grad_scale = torch.full((2,), 1.0 / n_rows, device="cuda")
    index = torch.arange(n_rows, device="cuda")
    arguments = (hidden @ weight.T, labels, teacher, index, None, None, None, grad_scale, None, None, None, None,
                 1.0, 3.0, True, True, -100, True, "triton")  # dynamic_alpha, dynamic_tau, ignore_index, ...
    torch.library.opcheck(torch.ops.dynsdpb.triton_fused_rows, arguments)

    def step(weight):
        return dynsdpb_loss(hidden @ weight.T, labels, teacher, validate=False, backend="triton")

    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        leaf = weight.detach().clone().requires_grad_(True)
        loss = fn(leaf)
        loss.backward()
        results.append((loss.detach().float(), leaf.grad.float()))
    loss_error = float((results[1][0] - results[0][0]).abs() / results[0][0].abs())
    grad_error = float((results[1][1] - results[0][1]).abs().max() / results[0][1].abs().max())
    ok = loss_error < 1e-5 and grad_error < 1e-2
    print(f"compiled triton operator: opcheck passed, loss rel err {loss_error:.1e}, grad rel err {grad_error:.1e} "
          f"({'ok' if ok else 'FAILED'})")
    return ok


ROOFLINE = Path(__file__).resolve().parent / "sass_roofline.csv"


def predicted_floor_ms(device_name: str, case: str, vocab_size: int, n_rows: int) -> float | None:
    """The static lower bound of bench/sass_roofline.csv (bfloat16, N = 16384) for `case` on this GPU
    (H200, else H100 SXM), scaled to n_rows (every bound is linear in the rows); None where not tabled."""
    gpu = "H200" if "H200" in device_name else "H100 SXM"
    with open(ROOFLINE, newline="") as file:
        for row in csv.DictReader(file):
            if (row["case"], row["arch"], row["gpu"], row["V"]) == (case, "sm_90", gpu, str(vocab_size)):
                return float(row["floor_ms"]) * n_rows / int(row["N"])
    return None


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 1
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}")
    ok = check_correctness()
    ok &= check_modules()
    ok &= check_compiled_operator()
    results = run_grid(
        [4096], [32000, 128256], ["bfloat16", "float32"], ["full"], ["ours", "eager", "compile", "liger"],
        "cuda", repeats=10, csv_path=Path(__file__).resolve().parent / "results.csv",
    )
    run_head_grid(8192, 128256, 4096, "bfloat16", "cuda", ["ours", "ours-dense", "eager", "liger"], repeats=3)
    print("\nshort table (forward+backward, N=4096): provider dtype V median_ms peak_MB bandwidth_GB/s "
          "predicted_floor_ms (static SASS roofline of dynsdpb_loss(z, y, t), bfloat16; a prediction)")
    for r in results:
        floor = None
        if r.case.provider == "ours" and r.case.dtype == "bfloat16":
            floor = predicted_floor_ms(torch.cuda.get_device_name(), "teachers-no-stats", r.case.vocab_size, 4096)
        print(f"{r.case.provider:>8} {r.case.dtype:>8} {r.case.vocab_size:>6} {1e3 * r.median_s:>9.2f} "
              f"{r.peak_extra_bytes / 2**20:>8.0f} {r.bandwidth_gbs:>7.0f} {'' if floor is None else f'{floor:9.2f}'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
