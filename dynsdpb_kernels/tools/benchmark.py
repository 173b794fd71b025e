"""Side-by-side benchmark of the fused loss against what a user would otherwise run.

Providers, all computing the same DynSDPB loss (CE + dynamic alpha/tau distillation, reduction="mean"):
    ours     dynsdpb_loss on the backend "auto" picks for the device
    eager    the PyTorch a user would write: cross_entropy + kl_div of log_softmax at tau_r, with the
             teacher's entropy and top-2 margin for alpha_r / tau_r
    compile  torch.compile of that same function
    liger    LigerCrossEntropyLoss + LigerKLDIVLoss (fixed tau, so a lower bound on its cost), CUDA only

Each (provider, case) runs in a fresh subprocess so that its peak memory is its own: on CUDA
torch.cuda.max_memory_allocated, on the CPU the growth of peak RSS over the RSS once the inputs exist.
Bandwidth is judged against the floor of one read of the logits, one of the teacher and one write of the
gradient, and a measured device copy bandwidth.
"""

from __future__ import annotations

import csv
import datetime
import itertools
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

PROVIDERS = ("ours", "eager", "compile", "liger")
MODES = ("forward", "full")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def eager_distill_terms(logits, teacher_logits, alpha=1.0, tau=3.0):
    """Per-row alpha_r tau_r^2 KL(softmax(t / tau_r) || softmax(z / tau_r)) written the plain PyTorch way, with
    alpha_r, tau_r from the teacher's entropy and top-2 margin (the eager baselines' distillation part)."""
    with torch.no_grad():
        teacher_probs = teacher_logits.float().softmax(-1)
        uncertainty = torch.special.entr(teacher_probs).sum(-1) / math.log(logits.shape[-1])
        top2 = teacher_probs.topk(2, dim=-1).values
        alpha_r = alpha * (1 - uncertainty)
        tau_r = (1 + (tau - 1) * (top2[:, 0] - top2[:, 1]))[:, None]
    log_q = F.log_softmax(logits.float() / tau_r, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / tau_r, dim=-1)
    kl = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    return alpha_r * tau_r.squeeze(1) ** 2 * kl


def eager_dynsdpb_loss(logits, labels, teacher_logits, teacher_mask, alpha=1.0, tau=3.0, ignore_index=-100):
    """The loss written the plain PyTorch way (mean reduction), the baseline for eager and compile."""
    distilled = (labels != ignore_index) & teacher_mask
    ce = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index)
    distill = (eager_distill_terms(logits, teacher_logits, alpha, tau) * distilled).sum() / distilled.sum().clamp_min(1)
    return ce + distill


@dataclass
class Case:
    provider: str
    mode: str
    dtype: str
    n_rows: int
    vocab_size: int
    device: str


@dataclass
class Result:
    case: Case
    median_s: float
    peak_extra_bytes: int
    floor_bytes: int

    @property
    def bandwidth_gbs(self) -> float:
        return self.floor_bytes / self.median_s / 1e9


def make_provider(provider: str, device: str):
    if provider == "ours":
        from .. import dynsdpb_loss

        return lambda z, y, t, m: dynsdpb_loss(z, y, t, m)
    if provider == "eager":
        return eager_dynsdpb_loss
    if provider == "compile":
        return torch.compile(eager_dynsdpb_loss, dynamic=False)
    if provider == "liger":
        if device != "cuda":
            raise RuntimeError("Liger-Kernel runs on CUDA only")
        from liger_kernel.transformers import LigerCrossEntropyLoss, LigerKLDIVLoss

        ce_loss, kl_loss, tau = LigerCrossEntropyLoss(), LigerKLDIVLoss(reduction="batchmean"), 3.0

        def liger(z, y, t, m):
            log_q = F.log_softmax(z[m] / tau, -1)  # Liger's KL takes log-probabilities
            return ce_loss(z, y) + tau**2 * kl_loss(log_q, F.softmax(t[m].float() / tau, -1).to(z.dtype))

        return liger
    raise ValueError(f"unknown provider {provider!r}")


def status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"{field} missing from /proc/self/status")


def reset_peak_rss() -> int:
    """Reset the peak RSS (VmHWM) to the current RSS, so that warm-up and compilation do not count."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    return status_bytes("VmRSS")


def run_case(case: Case, repeats: int) -> Result:
    """Time one case in this process (meant to be a fresh subprocess)."""
    torch.manual_seed(0)
    dtype = DTYPES[case.dtype]
    shape = (case.n_rows, case.vocab_size)
    logits = torch.randn(shape, device=case.device).to(dtype).requires_grad_(case.mode == "full")
    teacher = torch.randn(shape, device=case.device).to(dtype)
    labels = torch.randint(0, case.vocab_size, (case.n_rows,), device=case.device)
    mask = torch.rand(case.n_rows, device=case.device) < 0.5
    loss_fn = make_provider(case.provider, case.device)
    cuda = case.device == "cuda"

    def step():
        if case.mode == "full":
            loss_fn(logits, labels, teacher, mask).backward()
            logits.grad = None
        else:
            with torch.no_grad():
                loss_fn(logits, labels, teacher, mask)
        if cuda:
            torch.cuda.synchronize()

    step()  # warm-up: compiles and builds what needs building
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = reset_peak_rss()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if cuda else status_bytes("VmHWM")
    element = logits.element_size()
    floor = case.n_rows * case.vocab_size * element * (3 if case.mode == "full" else 2)
    return Result(case, statistics.median(times), max(0, peak - baseline), floor)


def copy_bandwidth_gbs(device: str, n_bytes: int = 1 << 30) -> float:
    """Read + write bytes per second of a plain device copy."""
    source = torch.ones(n_bytes // 4, device=device)  # touched pages: an untouched one reads as free zeros
    target = torch.zeros_like(source)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        target.copy_(source)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * n_bytes / min(times) / 1e9


def run_in_subprocess(case: Case, repeats: int) -> Result | str:
    """run_case in a fresh interpreter; the error text when the provider cannot run."""
    command = [sys.executable, "-m", "dynsdpb_kernels.tools.benchmark", json.dumps(asdict(case)), str(repeats)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return (done.stderr.strip().splitlines() or ["failed"])[-1]
    fields = json.loads(done.stdout.strip().splitlines()[-1])
    return Result(case, fields["median_s"], fields["peak_extra_bytes"], fields["floor_bytes"])


def machine_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.machine()
    with open("/proc/cpuinfo") as cpuinfo:
        model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), model)
    return f"{model}, {torch.get_num_threads()} threads"


def run_grid(
    n_rows: list[int], vocab_sizes: list[int], dtypes: list[str], modes: list[str], providers: list[str],
    device: str, repeats: int, csv_path: Path | None,
) -> list[Result]:
    """Every combination, printed as a table with ratios to eager and compile, appended to csv_path."""
    results: list[Result] = []
    copy_gbs = copy_bandwidth_gbs(device)
    print(f"# {machine_name(device)}, torch {torch.__version__}, copy bandwidth {copy_gbs:.1f} GB/s")
    if device == "cpu":  # which build of the C++ kernel "ours" runs
        from ..cpu_kernel import cpu_isa, extension_name

        print(f"# C++ kernel ISA {cpu_isa()} (extension {extension_name()}, ATen capability {torch.backends.cpu.get_cpu_capability()})")
    header = f"{'provider':>8} {'mode':>7} {'dtype':>8} {'N':>5} {'V':>6} {'median s':>9} {'x eager':>8} {'x compile':>9} {'peak MB':>8} {'GB/s':>6} {'% copy':>6}"
    print(header)
    for n, v, dtype, mode in itertools.product(n_rows, vocab_sizes, dtypes, modes):
        group: dict[str, Result] = {}
        for provider in providers:
            outcome = run_in_subprocess(Case(provider, mode, dtype, n, v, device), repeats)
            if isinstance(outcome, str):
                print(f"{provider:>8} {mode:>7} {dtype:>8} {n:>5} {v:>6}  skipped: {outcome}")
                continue
            group[provider] = outcome
        for provider, result in group.items():
            versus = {p: group[p].median_s / result.median_s if p in group else float("nan") for p in ("eager", "compile")}
            print(
                f"{provider:>8} {mode:>7} {dtype:>8} {n:>5} {v:>6} {result.median_s:>9.4f} {versus['eager']:>8.2f} "
                f"{versus['compile']:>9.2f} {result.peak_extra_bytes / 2**20:>8.0f} {result.bandwidth_gbs:>6.1f} "
                f"{100 * result.bandwidth_gbs / copy_gbs:>6.1f}"
            )
            results.append(result)
            if csv_path is not None:
                _append_csv(csv_path, result, versus, copy_gbs, device)
    return results


def _append_csv(path: Path, result: Result, versus: dict[str, float], copy_gbs: float, device: str) -> None:
    row = {
        "date": datetime.date.today().isoformat(),
        "machine": machine_name(device),
        "torch": torch.__version__,
        **asdict(result.case),
        "median_s": f"{result.median_s:.6f}",
        "speedup_vs_eager": f"{versus['eager']:.3f}",
        "speedup_vs_compile": f"{versus['compile']:.3f}",
        "peak_extra_mb": f"{result.peak_extra_bytes / 2**20:.1f}",
        "bandwidth_gbs": f"{result.bandwidth_gbs:.2f}",
        "copy_bandwidth_gbs": f"{copy_gbs:.2f}",
    }
    new = not path.exists()
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def import_pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None (with a message) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed; no plot drawn (pip install matplotlib)", file=sys.stderr)
        return None
    return plt


def plot_csv(csv_path: Path, png_path: Path) -> bool:
    """Median time per provider (log scale) for each case of the newest date in the CSV, one panel per mode."""
    plt = import_pyplot()
    if plt is None:
        return False
    rows = list(csv.DictReader(csv_path.open()))
    newest = max(row["date"] for row in rows)
    rows = [row for row in rows if row["date"] == newest]
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    providers = [p for p in PROVIDERS if any(r["provider"] == p for r in rows)]
    cases = sorted({(int(r["n_rows"]), int(r["vocab_size"]), r["dtype"]) for r in rows})
    figure, axes = plt.subplots(len(modes), 1, figsize=(max(6, 0.9 * len(cases) + 2), 3.2 * len(modes)), squeeze=False)
    width = 0.8 / max(1, len(providers))
    for axis, mode in zip(axes[:, 0], modes):
        for k, provider in enumerate(providers):
            times = []
            for n, v, dtype in cases:
                match = [r for r in rows if (int(r["n_rows"]), int(r["vocab_size"]), r["dtype"], r["mode"], r["provider"]) == (n, v, dtype, mode, provider)]
                times.append(float(match[-1]["median_s"]) if match else float("nan"))
            axis.bar([i + k * width for i in range(len(cases))], times, width, label=provider)
        axis.set_yscale("log")
        axis.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
        axis.set_xticklabels([f"{n}x{v}\n{dtype}" for n, v, dtype in cases], fontsize=7)
        axis.set_ylabel("median s (log)")
        axis.set_title(f"{'forward+backward' if mode == 'full' else mode}: DynSDPB loss, {rows[0]['machine']}, {newest}", fontsize=9)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(png_path, dpi=110)
    plt.close(figure)
    return True


if __name__ == "__main__":  # one case in a fresh process: python -m dynsdpb_kernels.tools.benchmark CASE_JSON REPEATS
    measured = run_case(Case(**json.loads(sys.argv[1])), int(sys.argv[2]))
    print(json.dumps({"median_s": measured.median_s, "peak_extra_bytes": measured.peak_extra_bytes, "floor_bytes": measured.floor_bytes}))
