"""Memory and time of the LM head + DynSDPB loss step (forward and backward), each provider in a fresh process.

One DLB step on N rows (each row its own sample): the first N/2 rows are the previous step's new
samples and have a teacher, the last N/2 are new and are recorded for the next step. Providers:

    ours        FusedLinearDynSDPBLoss: chunked head + fused kernel, teachers in a top-k ring (k = 64)
    ours-dense  the same with a dense bfloat16 ring
    eager       what a user would write: logits = h @ W.T, the eager loss (benchmark.eager_distill_terms),
                the previous half's logits kept as a dense bfloat16 tensor for the next step
    liger       (CUDA only) LigerFusedLinearCrossEntropyLoss for the CE plus a separate KL on the
                teacher half's materialised logits

Peak memory is measured above the inputs (hidden, weight, labels) once a step has run: the logits, the
gradients and the teacher storage all count.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .benchmark import DTYPES, reset_peak_rss, status_bytes, eager_distill_terms, machine_name

HEAD_PROVIDERS = ("ours", "ours-dense", "eager", "liger")


@dataclass
class HeadCase:
    provider: str
    n_rows: int
    vocab_size: int
    hidden_size: int
    dtype: str
    device: str
    topk: int = 64


def eager_step(hidden, weight, labels, state: dict, alpha=1.0, tau=3.0):
    """The eager DynSDPB head step: full logits, CE on all rows, dynamic KL on the first half against the
    dense teacher kept in state["teacher"], and the second half kept as the next teacher."""
    logits = hidden @ weight.T
    n_prev = logits.shape[0] // 2
    loss = F.cross_entropy(logits.float(), labels)
    teacher = state.get("teacher")
    if teacher is not None:
        loss = loss + eager_distill_terms(logits[:n_prev], teacher, alpha, tau).mean()
    state["teacher"] = logits[n_prev:].detach().to(torch.bfloat16)
    return loss


def make_head_step(case: HeadCase):
    """step(hidden, weight, labels, step_index) -> loss for the provider."""
    n_prev = case.n_rows // 2
    if case.provider in ("ours", "ours-dense"):
        from ..module import FusedLinearDynSDPBLoss

        storage = "topk" if case.provider == "ours" else "dense"
        module = FusedLinearDynSDPBLoss(
            case.vocab_size, capacity_rows=case.n_rows, teacher_storage=storage, topk=case.topk, validate=False
        )

        def ours(hidden, weight, labels, step):
            ids = torch.arange(step * n_prev, step * n_prev + case.n_rows)  # previous new half, then new
            return module(hidden, weight, labels, ids)

        return ours, module
    if case.provider == "eager":
        state: dict = {}
        return (lambda hidden, weight, labels, step: eager_step(hidden, weight, labels, state)), None
    if case.provider == "liger":
        if case.device != "cuda":
            raise RuntimeError("Liger-Kernel runs on CUDA only")
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        ce_loss, state = LigerFusedLinearCrossEntropyLoss(), {}

        def liger(hidden, weight, labels, step):
            loss = ce_loss(weight, hidden, labels)
            logits = hidden[:n_prev] @ weight.T  # the teacher half still needs its logits for the KL
            if "teacher" in state:
                loss = loss + 9.0 * F.kl_div(F.log_softmax(logits.float() / 3, -1), F.log_softmax(state["teacher"].float() / 3, -1), log_target=True, reduction="batchmean")
            state["teacher"] = (hidden[n_prev:] @ weight.T).detach().to(torch.bfloat16)
            return loss

        return liger, None
    raise ValueError(f"unknown provider {case.provider!r}")


def run_head_case(case: HeadCase, repeats: int) -> dict:
    """Time one provider in this process (meant to be a fresh subprocess)."""
    torch.manual_seed(0)
    dtype = DTYPES[case.dtype]
    cuda = case.device == "cuda"
    hidden = torch.randn(case.n_rows, case.hidden_size, device=case.device).to(dtype).requires_grad_(True)
    weight = (torch.randn(case.vocab_size, case.hidden_size, device=case.device) / case.hidden_size**0.5).to(dtype)
    weight.requires_grad_(True)
    labels = torch.randint(0, case.vocab_size, (case.n_rows,), device=case.device)
    step_fn, module = make_head_step(case)
    if cuda:
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        baseline = reset_peak_rss()
    times = []
    for step in range(repeats + 1):  # step 0 has no teachers yet; the timed steps all have them
        start = time.perf_counter()
        step_fn(hidden, weight, labels, step).backward()
        hidden.grad = weight.grad = None
        if cuda:
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if cuda else status_bytes("VmHWM")
    ring_bytes = module.ring.nbytes if module is not None else case.n_rows // 2 * case.vocab_size * 2
    return {"median_s": statistics.median(times), "peak_extra_bytes": max(0, peak - baseline), "teacher_bytes": ring_bytes}


def run_head_grid(n_rows: int, vocab_size: int, hidden_size: int, dtype: str, device: str, providers: list[str], repeats: int) -> list[dict]:
    """Each provider in a fresh subprocess; prints a table with ratios to eager."""
    rows = []
    print(f"# {machine_name(device)}, torch {torch.__version__}; N={n_rows} V={vocab_size} H={hidden_size} {dtype}, fwd+bwd")
    for provider in providers:
        case = HeadCase(provider, n_rows, vocab_size, hidden_size, dtype, device)
        command = [sys.executable, "-m", "dynsdpb_kernels.tools.head_benchmark", json.dumps(asdict(case)), str(repeats)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{provider:>10}  skipped: {(done.stderr.strip().splitlines() or ['failed'])[-1]}")
            continue
        rows.append({"provider": provider, **json.loads(done.stdout.strip().splitlines()[-1])})
    eager = next((r for r in rows if r["provider"] == "eager"), None)
    print(f"{'provider':>10} {'median s':>9} {'peak MB':>8} {'peak/eager':>10} {'teacher MB':>10} {'x eager time':>12}")
    for row in rows:
        ratio = row["peak_extra_bytes"] / eager["peak_extra_bytes"] if eager else math.nan
        speed = eager["median_s"] / row["median_s"] if eager else math.nan
        print(
            f"{row['provider']:>10} {row['median_s']:>9.3f} {row['peak_extra_bytes'] / 2**20:>8.0f} {ratio:>10.2f} "
            f"{row['teacher_bytes'] / 2**20:>10.2f} {speed:>12.2f}"
        )
    return rows


if __name__ == "__main__":
    print(json.dumps(run_head_case(HeadCase(**json.loads(sys.argv[1])), int(sys.argv[2]))))
