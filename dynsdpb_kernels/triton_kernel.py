"""Triton kernel of the fused DynSDPB loss: one program per student row, streaming over the vocabulary.

Per row r (student logits z, label y, teacher logits t when the row has a teacher):

    pre-pass (only when DYNAMIC_TAU and no teacher statistics were given): (u, d) of t at temperature 1,
              because tau_r must be known before the temperature-tau sums of pass 1 can start (alpha_r
              is needed only in pass 2, so DYNAMIC_ALPHA alone takes u from pass 1).
    pass 1:   online max / sum states of z at temperature 1 (cross-entropy and the student's own
              (u, d)), of z at tau_r and of t at tau_r; a recorded row is copied into the ring here.
    pass 2:   KL(P || Q) with the final log-normalisers, and the gradient, written once.

With SOFTCAP (config.softcap = c), every student load is z' = c tanh(z / c) (contract.py): pass 1, the
label's logit, the top-k support's logits and the ring record see z', and pass 2 chains dz'/dz into the
gradient. Without it the kernel is the same code as before (a constexpr branch).

Everything is accumulated in float32; the gradient is rounded to the logits' dtype once, on store.
Set TRITON_INTERPRET=1 before importing this module to run the kernel on CPU tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .contract import N_ROW_TERMS, DistillConfig, FusedRows, RowRecord, gradient_buffer, row_terms_dtype

# Q's mass off a top-k teacher's support is taken as at least this (contract.py).
TAIL_FLOOR = tl.constexpr(1e-6)

# Largest vocabulary block of one loop step, and vocabulary entries per thread (and live operand): the
# widest block that spills in no specialization on sm_90 (H100/H200) and keeps at least 32 of its 64 warp
# slots resident in each is 2048 at 16 warps (bench/triton_resources.md: 32-52 registers per thread).
MAX_BLOCK_V = 2048
ELEMENTS_PER_THREAD = 4


@triton.jit
def _log1p(x):
    # log(1 + x) without losing x when x < float32 eps (Goldberg's trick): with w = 1 + x rounded,
    # log(w) * x / (w - 1) is accurate to a few ulp; w == 1 means log1p(x) = x to float32 precision.
    w = 1.0 + x
    return tl.where(w == 1.0, x, tl.log(w) * (x / tl.where(w == 1.0, 1.0, w - 1.0)))


@triton.jit
def _round_to(x, dtype: tl.constexpr):
    """float32 -> dtype, rounding to nearest even.

    For bfloat16 the rounding is spelled out (add 0x7FFF plus the lowest kept bit, drop 16 bits), which is
    what the GPU's cvt.rn.bf16.f32 does, because Triton's CPU interpreter truncates that cast instead.
    """
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(x != x, x.to(tl.bfloat16), rounded)  # keep NaN a NaN
    else:
        return x.to(dtype)


@triton.jit
def _softcap(z, cap, inv_cap, two_log2e_over_cap):
    """(z', dz'/dz) for z' = cap tanh(z / cap), elementwise, from e = exp(-2 |z| / cap) = exp2(-|z| 2 log2(e) / cap)
    in (0, 1] (the scale folded on the host): tanh(|x|) = 1 - 2 e / (1 + e) and dz'/dz = 4 e / (1 + e)^2,
    which saturate to 1 and 0 (e underflows to 0; nothing overflows, no NaN for any finite z). Below
    |x| = 1/8, where 1 - 2 e / (1 + e) loses x's relative precision, tanh is its odd Taylor polynomial to
    x^7 (relative error < 2e-9). A non-finite z gives a NaN z' (kept visible to the finiteness check)."""
    e = tl.exp2(-tl.abs(z) * two_log2e_over_cap)
    inv_one_plus_e = 1.0 / (1.0 + e)
    x = z * inv_cap
    x2 = x * x
    tanh_small = x * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * -0.05396825396825397)))
    tanh_large = 1.0 - 2.0 * e * inv_one_plus_e
    tanh = tl.where(tl.abs(x) < 0.125, tanh_small, tl.where(z < 0.0, -tanh_large, tanh_large))
    capped = tl.where(tl.abs(z) < float("inf"), cap * tanh, float("nan"))
    return capped, 4.0 * e * inv_one_plus_e * inv_one_plus_e


@triton.jit
def _load_student(ptrs, mask, other, SOFTCAP: tl.constexpr, cap, inv_cap, two_log2e_over_cap):
    """Student logits at `ptrs` as float32 (`other` on masked lanes), softcapped when SOFTCAP, and dz'/dz
    (1 without SOFTCAP; 1 on masked lanes)."""
    z = tl.load(ptrs, mask=mask, other=other).to(tl.float32)
    derivative = tl.full(z.shape, 1.0, tl.float32)
    if SOFTCAP:
        capped, slope = _softcap(z, cap, inv_cap, two_log2e_over_cap)
        z = tl.where(mask, capped, other)
        derivative = tl.where(mask, slope, 1.0)
    return z, derivative


@triton.jit
def _merge_row_stats(m1, m2, s_rest, ent, x, mask, BLOCK_V: tl.constexpr):
    """Fold one block x (masked lanes hold -inf) into the temperature-1 state of a row.

    m1, m2  largest and second-largest logit seen so far
    s_rest  sum over all entries but one occurrence of the maximum of exp(x_j - m1), so that
            sum_j exp(x_j - m1) = 1 + s_rest; keeping the 1 apart keeps 1 - p_(1) = s_rest / (1 + s_rest)
            and log(1 + s_rest) exact for confident rows, where 1 + s_rest rounds to 1.
    ent     sum_j exp(x_j - m1) * (x_j - m1), so that H = log(1 + s_rest) - ent / (1 + s_rest)
    """
    lane = tl.arange(0, BLOCK_V)
    block_max = tl.max(x, axis=0)
    block_arg = tl.argmax(x, axis=0)
    block_second = tl.max(tl.where(lane == block_arg, float("-inf"), x), axis=0)
    new_m1 = tl.maximum(m1, block_max)
    new_m2 = tl.maximum(tl.minimum(m1, block_max), tl.maximum(m2, block_second))

    shifted = tl.where(mask, x - new_m1, 0.0)
    weights = tl.where(mask, tl.exp(shifted), 0.0)
    block_ent = tl.sum(weights * shifted, axis=0)
    max_moved = block_max > m1
    # When the maximum moves into this block, the old maximum's 1 joins the rest (rescaled) and the
    # block's own maximum is left out; otherwise the whole block joins the rest.
    old_shift = tl.where(m1 > float("-inf"), m1 - new_m1, 0.0)  # 0 before the first block: no state yet
    scale = tl.exp(m1 - new_m1)
    block_rest = tl.sum(tl.where(lane == block_arg, 0.0, weights), axis=0)
    s_rest_moved = scale * (s_rest + 1.0) + block_rest
    s_rest_kept = s_rest + tl.sum(weights, axis=0)
    # ent rescales as exp(m1 - m1') * (ent + (m1 - m1') * sum); before the first block scale = 0 and
    # old_shift = 0, so nothing is carried (and no 0 * inf appears).
    ent_moved = scale * (ent + old_shift * (1.0 + s_rest))
    new_s_rest = tl.where(max_moved, s_rest_moved, s_rest_kept)
    new_ent = tl.where(max_moved, ent_moved, ent) + block_ent
    return new_m1, new_m2, new_s_rest, new_ent


@triton.jit
def _finish_row_stats(m1, m2, s_rest, ent, inv_log_v):
    """(u, d) from a finished temperature-1 state: u = H / ln V, d = (1 - exp(m2 - m1)) / (1 + s_rest)."""
    total = 1.0 + s_rest
    entropy = _log1p(s_rest) - ent / total
    return _clamp_unit(entropy * inv_log_v), _clamp_unit((1.0 - tl.exp(m2 - m1)) / total)


@triton.jit
def _clamp_unit(x):
    # Clamp rounding excursions into [0, 1] while letting NaN through, so non-finite input stays visible.
    # (the enum is spelled at each call: the compiler takes it as a constant argument, not as a local variable)
    return tl.minimum(tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL), 1.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _dynsdpb_row_kernel(
    logits_ptr,
    logits_row_stride,
    labels_ptr,
    teacher_ptr,
    teacher_row_stride,
    teacher_index_ptr,
    teacher_stats_ptr,
    grad_ptr,
    grad_row_stride,
    row_terms_ptr,
    student_stats_ptr,
    grad_scale_ptr,
    record_index_ptr,
    ring_ptr,
    ring_row_stride,
    ring_stats_ptr,
    support_ptr,
    support_row_stride,
    tail_ptr,
    K,
    V,
    ignore_index,
    alpha,
    tau,
    inv_log_v,
    softcap,
    HAS_TEACHER: tl.constexpr,
    HAS_TEACHER_STATS: tl.constexpr,
    DYNAMIC_ALPHA: tl.constexpr,
    DYNAMIC_TAU: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    RECORD: tl.constexpr,
    RECORD_ROWS: tl.constexpr,
    TEACHER_TOPK: tl.constexpr,
    HAS_TAIL: tl.constexpr,
    SOFTCAP: tl.constexpr,
    K_BLOCK: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride can exceed 2^31
    logits_row = logits_ptr + row * logits_row_stride
    lane = tl.arange(0, BLOCK_V)

    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    label_in_range = (label >= 0) & (label < V)
    inv_cap = 1.0 / softcap  # softcapping's constants (unused without SOFTCAP)
    two_log2e_over_cap = 2.8853900817779268 * inv_cap  # 2 log2(e) / softcap

    teacher_id = -1
    if HAS_TEACHER:
        teacher_id = tl.load(teacher_index_ptr + row)
    distilled = valid & (teacher_id >= 0)
    teacher_row = teacher_ptr + tl.maximum(teacher_id, 0) * teacher_row_stride
    record_slot = -1
    if RECORD:
        record_slot = tl.load(record_index_ptr + row)
    ring_row = ring_ptr + tl.maximum(record_slot, 0) * ring_row_stride

    # Teacher statistics (u, d) at temperature 1: given, or from a pre-pass when tau_r needs them.
    t_uncertainty = 0.0
    t_discrimination = 0.0
    if HAS_TEACHER_STATS:
        if distilled:
            t_uncertainty = tl.load(teacher_stats_ptr + teacher_id * 2).to(tl.float32)
            t_discrimination = tl.load(teacher_stats_ptr + teacher_id * 2 + 1).to(tl.float32)
    elif DYNAMIC_TAU:
        if distilled:
            tm1 = float("-inf")
            tm2 = float("-inf")
            ts_rest = 0.0
            tent = 0.0
            for start in range(0, V, BLOCK_V):
                cols = start + lane
                mask = cols < V
                t = tl.load(teacher_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
                tm1, tm2, ts_rest, tent = _merge_row_stats(tm1, tm2, ts_rest, tent, t, mask, BLOCK_V)
            t_uncertainty, t_discrimination = _finish_row_stats(tm1, tm2, ts_rest, tent, inv_log_v)

    if DYNAMIC_TAU:
        tau_r = 1.0 + (tau - 1.0) * t_discrimination
    else:
        tau_r = tau + 0.0 * t_discrimination
    inv_tau = 1.0 / tau_r

    # Pass 1. Student at temperature 1 (zm1, zm2, zs_rest, zent); student at tau_r shares the maximum
    # zm1 since max(z / tau) = max(z) / tau: zs_tau = sum_j exp((z_j - zm1) / tau_r). Teacher at tau_r:
    # tm1, ts_tau likewise, and its temperature-1 state when its statistics are still unknown.
    zm1 = float("-inf")
    zm2 = float("-inf")
    zs_rest = 0.0
    zent = 0.0
    zs_tau = 0.0
    tm1 = float("-inf")
    tm2 = float("-inf")
    ts_rest = 0.0
    tent = 0.0
    ts_tau = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + lane
        mask = cols < V
        z, _ = _load_student(logits_row + cols, mask, float("-inf"), SOFTCAP, softcap, inv_cap, two_log2e_over_cap)
        if RECORD_ROWS:
            if record_slot >= 0:  # the fused ring write: this block is in registers anyway
                tl.store(ring_row + cols, _round_to(z, ring_ptr.dtype.element_ty), mask=mask)
        zm1_old = zm1
        zm1, zm2, zs_rest, zent = _merge_row_stats(zm1, zm2, zs_rest, zent, z, mask, BLOCK_V)
        if distilled:
            zs_tau = zs_tau * tl.exp((zm1_old - zm1) * inv_tau) + tl.sum(
                tl.where(mask, tl.exp((z - zm1) * inv_tau), 0.0), axis=0
            )
            if not TEACHER_TOPK:
                t = tl.load(teacher_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
                tm1_old = tm1
                if HAS_TEACHER_STATS or DYNAMIC_TAU:
                    tm1 = tl.maximum(tm1, tl.max(t, axis=0))
                else:
                    tm1, tm2, ts_rest, tent = _merge_row_stats(tm1, tm2, ts_rest, tent, t, mask, BLOCK_V)
                ts_tau = ts_tau * tl.exp((tm1_old - tm1) * inv_tau) + tl.sum(
                    tl.where(mask, tl.exp((t - tm1) * inv_tau), 0.0), axis=0
                )

    if not HAS_TEACHER_STATS and not DYNAMIC_TAU:
        if distilled:
            t_uncertainty, t_discrimination = _finish_row_stats(tm1, tm2, ts_rest, tent, inv_log_v)
    if DYNAMIC_ALPHA:
        alpha_r = alpha * (1.0 - t_uncertainty)
    else:
        alpha_r = alpha + 0.0 * t_uncertainty

    # Cross-entropy: ce = logsumexp(z) - z_y = (zm1 - z_y) + log(1 + zs_rest). When y is the argmax the
    # first term is exactly 0 and the loss keeps its precision for confident rows.
    z_label, _ = _load_student(
        logits_row + label, valid & label_in_range, 0.0, SOFTCAP, softcap, inv_cap, two_log2e_over_cap
    )
    ce = tl.where(valid, (zm1 - z_label) + _log1p(zs_rest), 0.0)
    ce = tl.where(valid & ((label < 0) | (label >= V)), float("nan"), ce)

    # d ce / d z_y = p_y - 1; for the argmax this is -zs_rest / (1 + zs_rest), exact where p_y - 1 would
    # cancel (a confident bfloat16 row keeps its tiny true-class gradient).
    zs_total = 1.0 + zs_rest
    label_grad = tl.where(z_label == zm1, -zs_rest / zs_total, tl.exp(z_label - zm1) / zs_total - 1.0)
    ce_scale = tl.load(grad_scale_ptr).to(tl.float32)
    distill_scale = tl.load(grad_scale_ptr + 1).to(tl.float32)
    ce_coef = tl.where(valid & label_in_range, ce_scale, 0.0)
    # d (alpha_r tau_r^2 KL(P || Q)) / dz = alpha_r tau_r (Q - P)  (alpha_r, tau_r and P are constants)
    kl_coef = distill_scale * alpha_r * tau_r
    log_zs_tau = tl.log(tl.where(distilled, zs_tau, 1.0))  # the sums are 0 on rows without a teacher

    # Top-k teacher: P_hat = softmax(t_k / tau_r) over its k stored logits, at vocabulary ids `support`.
    # KL(P_hat || Q) = sum_k P_hat_k (log P_hat_k - log Q_support_k) needs only the k student logits at the
    # support, read here (before pass 2, which may overwrite the logits with the gradient in place).
    kl = 0.0
    if TEACHER_TOPK:
        k_lane = tl.arange(0, K_BLOCK)
        k_mask = k_lane < tl.where(distilled, K, 0)  # nothing to load for rows without a teacher
        t_k = tl.load(teacher_row + k_lane, mask=k_mask, other=float("-inf")).to(tl.float32)
        support = tl.load(support_ptr + tl.maximum(teacher_id, 0) * support_row_stride + k_lane, mask=k_mask, other=0)
        z_k, slope_k = _load_student(logits_row + support, k_mask, 0.0, SOFTCAP, softcap, inv_cap, two_log2e_over_cap)
        tm1 = tl.where(distilled, tl.max(t_k, axis=0), 0.0)
        ts_tau = tl.sum(tl.where(k_mask, tl.exp((t_k - tm1) * inv_tau), 0.0), axis=0)
        # P_k = (1 - tail) P_hat_k; the tail mass is one bucket against Q's mass off the support
        tail = tm1 * 0.0  # a float32 scalar tensor either way (compiled Triton wants tensors in tl.log)
        if HAS_TAIL:
            tail = tl.load(tail_ptr + tl.maximum(teacher_id, 0), mask=distilled, other=0.0).to(tl.float32)
        log_p_k = (t_k - tm1) * inv_tau - tl.log(tl.where(distilled, ts_tau, 1.0)) + _log1p(-tail)
        log_q_k = (z_k - zm1) * inv_tau - log_zs_tau
        kl = tl.sum(tl.where(k_mask, tl.exp(log_p_k) * (log_p_k - log_q_k), 0.0), axis=0)
        q_tail = tl.maximum(1.0 - tl.sum(tl.where(k_mask, tl.exp(log_q_k), 0.0), axis=0), TAIL_FLOOR)
        kl += tl.where(tail > 0.0, tail * (tl.log(tl.maximum(tail, 1.1754944e-38)) - tl.log(q_tail)), 0.0)
        tail_scale = 1.0 - tail / q_tail  # off the support the target is tail * Q / q_tail
    log_ts_tau = tl.log(tl.where(distilled, ts_tau, 1.0))

    # Pass 2: KL(P || Q) = sum_j P_j (log P_j - log Q_j), with log P_j = (t_j - tm1) / tau_r - log ts_tau
    # and log Q_j = (z_j - zm1) / tau_r - log zs_tau; and the gradient, stored once per element.
    grad_row = grad_ptr + row * grad_row_stride
    if TEACHER_TOPK:
        kl_in_pass_2 = False
    else:
        kl_in_pass_2 = distilled
    if kl_in_pass_2 | COMPUTE_GRAD:
        for start in range(0, V, BLOCK_V):
            cols = start + lane
            mask = cols < V
            z, slope = _load_student(logits_row + cols, mask, 0.0, SOFTCAP, softcap, inv_cap, two_log2e_over_cap)
            grad = tl.zeros([BLOCK_V], dtype=tl.float32)
            if COMPUTE_GRAD:
                probs = tl.exp(z - zm1) / zs_total
                grad = ce_coef * tl.where(cols == label, label_grad, probs)
            if distilled:
                log_q = (z - zm1) * inv_tau - log_zs_tau
                if TEACHER_TOPK:  # the support entries are rewritten below
                    if COMPUTE_GRAD:
                        grad += kl_coef * tl.exp(log_q) * tail_scale
                else:
                    t = tl.load(teacher_row + cols, mask=mask, other=0.0).to(tl.float32)
                    log_p = (t - tm1) * inv_tau - log_ts_tau
                    p = tl.exp(log_p)
                    kl += tl.sum(tl.where(mask, p * (log_p - log_q), 0.0), axis=0)
                    if COMPUTE_GRAD:
                        grad += kl_coef * (tl.exp(log_q) - p)
            if COMPUTE_GRAD:
                if SOFTCAP:  # chain rule through the softcap: dL/dz = dL/dz' dz'/dz
                    grad *= slope
                tl.store(grad_row + cols, _round_to(grad, grad_ptr.dtype.element_ty), mask=mask)

    if TEACHER_TOPK and COMPUTE_GRAD:
        if distilled:
            # Rewrite the k support entries whole, from the logits read before pass 2, so that each
            # gradient element is still rounded once. The barrier orders these stores after pass 2's.
            tl.debug_barrier()
            probs_k = tl.exp(z_k - zm1) / zs_total
            grad_k = ce_coef * tl.where(support == label, label_grad, probs_k)
            grad_k += kl_coef * (tl.exp(log_q_k) - tl.exp(log_p_k))
            if SOFTCAP:
                grad_k *= slope_k
            tl.store(grad_row + support, _round_to(grad_k, grad_ptr.dtype.element_ty), mask=k_mask)

    z_uncertainty, z_discrimination = _finish_row_stats(zm1, zm2, zs_rest, zent, inv_log_v)
    tl.store(student_stats_ptr + row * 2, z_uncertainty)
    tl.store(student_stats_ptr + row * 2 + 1, z_discrimination)
    if RECORD:
        if record_slot >= 0:
            tl.store(ring_stats_ptr + record_slot * 2, z_uncertainty)
            tl.store(ring_stats_ptr + record_slot * 2 + 1, z_discrimination)
    terms = row_terms_ptr + row * 5
    tl.store(terms, ce)
    tl.store(terms + 1, kl)
    tl.store(terms + 2, tl.where(distilled, alpha_r, 0.0))
    tl.store(terms + 3, tl.where(distilled, tau_r, 0.0))
    tl.store(terms + 4, tl.where(distilled, t_uncertainty, 0.0))


@dataclass(frozen=True)
class BlockConfig:
    """How one launch tiles a row: BLOCK_V vocabulary entries per loop step, held by num_warps warps
    (BLOCK_V / (32 num_warps) entries per thread and live operand)."""

    block_v: int
    num_warps: int


def block_config(vocab_size: int, block_v: int | None = None) -> BlockConfig:
    """The launcher's choice for a vocabulary of `vocab_size`: the whole row up to MAX_BLOCK_V entries
    (a power of two), or `block_v` when given; ELEMENTS_PER_THREAD entries per thread (1 to 16 warps)."""
    if block_v is None:
        block_v = min(MAX_BLOCK_V, triton.next_power_of_2(vocab_size))
    return BlockConfig(block_v=block_v, num_warps=min(16, max(1, block_v // (32 * ELEMENTS_PER_THREAD))))


@dataclass
class KernelLaunch:
    """Everything one launch of _dynsdpb_row_kernel passes (made by triton_fused_rows): the grid, the
    runtime arguments and the constexprs by the kernel's parameter names, and the warps.
    tests/test_gpu_compile.py compiles exactly these for GPU targets."""

    grid: tuple[int]
    arguments: dict[str, object]
    constexprs: dict[str, object]
    num_warps: int


def run_launch(launch: KernelLaunch) -> None:
    """Run `launch` on the device of its tensors (or in the interpreter)."""
    # wrap_triton: inside the dynsdpb::triton_fused_rows operator (ops.py) Inductor traces this launch and
    # sees the kernel; called eagerly it launches as usual.
    wrap_triton(_dynsdpb_row_kernel)[launch.grid](**launch.arguments, **launch.constexprs, num_warps=launch.num_warps)


def triton_fused_rows(
    logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_rows: torch.Tensor | None,
    teacher_index: torch.Tensor | None,
    teacher_stats: torch.Tensor | None,
    config: DistillConfig,
    grad_scale: torch.Tensor,
    compute_grad: bool,
    grad_out: torch.Tensor | None = None,
    record: RowRecord | None = None,
    teacher_support: torch.Tensor | None = None,
    teacher_tail: torch.Tensor | None = None,
    block_v: int | None = None,
    launcher: Callable[[KernelLaunch], None] = run_launch,
) -> FusedRows:
    """Launch the fused kernel; arguments and results follow contract.py (`record`: the fused ring write,
    `teacher_support` / `teacher_tail`: top-k teacher rows' vocabulary ids and tail mass).

    `grad_out` is the (N, V) buffer to write the gradient to (fresh when None). `block_v` overrides
    the vocabulary block width (a power of two), which tests use to force several blocks. `launcher`
    receives the KernelLaunch (triton_aot passes one that compiles it for a GPU target instead).
    """
    n_rows, vocab_size = logits.shape
    device = logits.device
    outputs = FusedRows(
        row_terms=torch.empty(n_rows, N_ROW_TERMS, dtype=row_terms_dtype(logits.dtype), device=device),
        student_stats=torch.empty(n_rows, 2, dtype=torch.float32, device=device),
        grad=gradient_buffer(logits, compute_grad, grad_out),
    )
    if n_rows == 0:
        return outputs
    has_teacher = teacher_rows is not None and teacher_index is not None
    grad = outputs.grad
    blocks = block_config(vocab_size, block_v)
    # Unused pointers still need a valid tensor argument; the constexpr flags keep them unread.
    placeholder = outputs.row_terms
    arguments = dict(
        logits_ptr=logits,
        logits_row_stride=logits.stride(0),
        labels_ptr=labels,
        teacher_ptr=teacher_rows if has_teacher else placeholder,
        teacher_row_stride=teacher_rows.stride(0) if has_teacher else 0,
        teacher_index_ptr=teacher_index if has_teacher else labels,
        teacher_stats_ptr=teacher_stats if teacher_stats is not None else placeholder,
        grad_ptr=grad if grad is not None else logits,
        grad_row_stride=grad.stride(0) if grad is not None else 0,
        row_terms_ptr=outputs.row_terms,
        student_stats_ptr=outputs.student_stats,
        grad_scale_ptr=grad_scale,
        record_index_ptr=record.index if record is not None else labels,
        ring_ptr=record.ring_logits if record is not None and record.ring_logits is not None else placeholder,
        ring_row_stride=record.ring_logits.stride(0) if record is not None and record.ring_logits is not None else 0,
        ring_stats_ptr=record.stats if record is not None else placeholder,
        support_ptr=teacher_support if teacher_support is not None else labels,
        support_row_stride=teacher_support.stride(0) if teacher_support is not None else 0,
        tail_ptr=teacher_tail if teacher_tail is not None else placeholder,
        K=teacher_support.shape[1] if teacher_support is not None else 1,
        V=vocab_size,
        ignore_index=config.ignore_index,
        alpha=float(config.alpha),
        tau=float(config.tau),
        inv_log_v=1.0 / math.log(vocab_size) if vocab_size > 1 else 0.0,
        softcap=float(config.softcap) if config.softcap is not None else 1.0,  # read only with SOFTCAP
    )
    constexprs = dict(
        HAS_TEACHER=has_teacher,
        HAS_TEACHER_STATS=has_teacher and teacher_stats is not None,
        DYNAMIC_ALPHA=config.dynamic_alpha,
        DYNAMIC_TAU=config.dynamic_tau,
        COMPUTE_GRAD=grad is not None,
        RECORD=record is not None,
        RECORD_ROWS=record is not None and record.ring_logits is not None,
        TEACHER_TOPK=teacher_support is not None,
        HAS_TAIL=teacher_support is not None and teacher_tail is not None,
        SOFTCAP=config.softcap is not None,
        K_BLOCK=triton.next_power_of_2(teacher_support.shape[1]) if teacher_support is not None else 1,
        BLOCK_V=blocks.block_v,
    )
    launch = KernelLaunch(grid=(n_rows,), arguments=arguments, constexprs=constexprs, num_warps=blocks.num_warps)
    launcher(launch)
    return outputs
