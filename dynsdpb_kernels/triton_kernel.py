"""Triton kernel of the fused DynSDPB loss: one program per student row, streaming over the vocabulary.

Per row r (student logits z, label y, teacher logits t when the row has a teacher):

    pre-pass (only when DYNAMIC_TAU and no teacher statistics were given): (u, d) of t at temperature 1,
              because tau_r must be known before the temperature-tau sums of pass 1 can start (alpha_r
              is needed only in pass 2, so DYNAMIC_ALPHA alone takes u from pass 1).
    normaliser pass (only TEACHER_LOG_NORM, a ring's teachers, and only for a row whose stored
              log-normaliser is missing or was taken at another tau): t's max and sum at tau_r.
    pass 1:   online max / sum states of z at temperature 1 (cross-entropy and the student's own
              (u, d)), of z at tau_r and, unless its log-normaliser is known (TEACHER_LOG_NORM), of t at
              tau_r; a recorded row is copied into the ring here.
    pass 2:   KL(P || Q) with the final log-normalisers, and the gradient, written once; a row recorded
              with RECORD_LOG_NORM also sums exp(r / tau_rec) of its stored row r for its log-normaliser.

Stored log-normalisers (contract.py): a ring's dense teacher row comes with (u, d, tau_rec, log_norm),
where log_norm = log sum_j exp(t_j / tau_rec) was written by the step that recorded the row (its pass 2,
where tau_rec = 1 + (tau - 1) d of the row's own d is known and the row is read anyway). The ring step's
pass 1 then reads z only: 2 (z) + 2 (ring write) + 6 (pass 2: z, t, gradient) = 10 bytes per element
instead of 12, i.e. 1.67x the 6 bytes of reading z and t and writing the gradient once. The value is used
only where tau_rec is, bit for bit, this launch's tau_r for the row (_row_temperature in both places);
otherwise, or when it is NaN, the row takes the normaliser pass (the same bytes as before).

How a row is walked. Each of the BLOCK_V lanes of a loop step keeps its own online state in the loop's
block-shaped accumulators, and the lanes are combined once per row after the loop (tl.max / tl.sum over
the block axis): no shuffle, shared memory or barrier inside a vocabulary loop. Per lane and element,
with delta = x - m_lane and e = exp2(-|delta| * scale) (the exp(-|x - m|) trick: ONE exponential per
element per state, whichever of x and m is larger):
    temperature-1 state (_lane_step): max m, second max m2 = max(m2, min(m, x)), s_rest (the lane's sum
        without one occurrence of its max, the 1 + s_rest form) and ent = sum e (x - m), rescaled by
        r = (delta > 0 ? e : 1): s_rest = r s_rest + e, ent = r ent + e (-|delta|) (1 + (delta > 0 ? s_rest : 0))
    sums at tau_r (_tempered_step, _max_sum_step): total = (delta > 0 ? total e + 1 : total + e); the
        student's shares its lane maximum (and delta) with the temperature-1 state
All exponentials are exp2 with log2(e) and 1 / tau_r folded into one scale (tau_scale = log2(e) / tau_r);
pass 2 works in base 2 (log2 P - log2 Q = (t - z) tau_scale + a per-row offset) and the label's gradient
entry is rewritten once after pass 2 (no per-element select): each element is still rounded once, and the
precision tricks stay (1 + s_rest for confident rows, the exact true-class gradient -s_rest / (1 + s_rest)).

Budget per specialization (bench/sass_roofline.md: static counts of the loops' SASS per logit element on
sm_90, bfloat16, V = 128256, BLOCK_V 2048 at 16 warps = 4 entries per thread; Triton 3.9.0, 2026-12-01,
the ring step 2026-12-02; predictions from the machine code, not GPU timings):

    specialization                         instructions (pre-pass + pass 1 + pass 2)  MUFU  LDG+STG bytes
    plain CE (no teacher, grad)            26.0  (      17.0 +  9.0)                   2.0   4+2 (4 minimal)
    ring step (dense bf16 teachers with    51.0  (      24.25 + 26.75)                 6.0   6+4 (8 minimal)
      stats and stored log-normalisers,
      ring write, dynamic, grad)
    teachers without stats (dynamic)       69.25 (17.0 + 29.25 + 23.0)                 7.0   10+2 (6 minimal)
    top-k ring step (k=64, tail, stats)    36.75 (      22.75 + 14.0)                  4.0   4+2 (4 minimal)
    the same recording top-k (k=64 bf16)   51.25 (      33.75 + 17.5)                  5.0   4+2 (4 minimal)
      (float32 logits, or softcapped: the (key, id) path below, 58.75 = 41.25 + 17.5 for bf16 with it)

MUFU per element: 1 per state of pass 1 (z at 1, z at tau_r, t at tau_r unless its log-normaliser is
stored; the pre-pass's t at 1) and in pass 2 one each for softmax(z), Q and P, plus the recorded row's
sum at tau_rec (the ring step: 2 + 4); no division in a loop (the per-row reciprocals are hoisted). The
ring step's normaliser pass (rows without a usable stored value) is not on the counted path.
tests/test_roofline_budget.py fails when a loop exceeds issue 19's budgets (plain CE <= 32 / 2.1, ring step
<= 64 / 6, teachers without stats <= 80 / 7.5).

Top-k ring record (RECORD_TOPK, a RowRecord with topk): the recorded row's k largest logits (value
descending, ties to the lower vocabulary id: the C++ kernel's order, bit for bit), their ids and the tail
mass m = 1 - sum_topk softmax(z / tau_rec), selected in the kernel. Pass 1 keeps per lane its three best
(an int32 order key of the float32 value and the id: _order_key, _top3_step; 3 compares and 8 selects or
maxima per element, no cross-lane work). For bfloat16 logits without softcapping, whose float32 values
have 16 zero low bits, the value's key and the block index share one int32 (_packed_key: key in the high
half, 0xFFFF - block in the low) and the lane's three best are a sorting network of 5 integer min/max per
element (_top3_packed_step), unpacked into (key, id) once per row (_unpack_key); after the loop, once per row, the k best ranks (_rank: key, then
id) of those 3 x BLOCK_V candidates are selected (tl.topk, one candidate block at a time). They are the
row's k best unless a lane had all three of its candidates among them; then a record pass collects the
next three of each such lane, merged in, until none is left (exact; for a random row of V = 128256 and
k = 64, about 1 row in 100 takes one: C(64, 3) / 2048^2, an estimate by counting, not measured).
Pass 2 sums 2^((z - zm1) log2(e) / tau_rec) for m (one exponential per element); the values are rounded once to the ring's dtype, entries past V (k > V) hold -inf and id -1, and
k is at most BLOCK_V (the launcher widens its block for a larger k; an explicit block_v that is too small is
refused). Counted: 51.25 instructions and 5.0 MUFU per element (bfloat16 logits; 58.75 on the (key, id) path).

With SOFTCAP (config.softcap = c), every student load is z' = c tanh(z / c) (contract.py, _student_logits):
pass 1, the label's logit, the top-k support's logits and the ring record see z', and the gradient is
chained with dz'/dz. Without it the kernel is the same code (a constexpr branch; the budget above). With
it each pass adds _softcap's EX2 and RCP per element: plain CE 78.25 instructions and 6.0 MUFU per element,
the ring step 104.75 and 10.0 (110.0 before the stored log-normalisers; no budget yet;
docs/triton_kernel_roofline.md).

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

from .backends import triton_interpreted
from .contract import (
    N_ROW_TERMS, N_STATS_WITH_LOG_NORM, DistillConfig, FusedRows, RowRecord, gradient_buffer, row_terms_dtype,
)

# Q's mass off a top-k teacher's support is taken as at least this (contract.py).
TAIL_FLOOR = tl.constexpr(1e-6)
TAIL_CEILING = tl.constexpr(1.0 - 1e-6)  # a recorded top-k row's tail mass is clamped to [0, TAIL_CEILING]
LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * LOG2E)
LN2 = tl.constexpr(0.6931471805599453)
# What masked lanes load and lane maxima start from (_lane_floor): below any logit, finite in the dtype.
LANE_FLOOR = tl.constexpr(-1e30)
FP16_LANE_FLOOR = tl.constexpr(-65504.0)

# Largest vocabulary block of one loop step, and vocabulary entries per thread (and per-lane state): of the
# blocks that spill in no specialization on sm_90 (H100/H200) and keep at least 16 of its 64 warp slots
# resident in each, 2048 at 16 warps has the fewest vocabulary-loop instructions per element
# (bench/triton_resources.md: 40-95 registers per thread; 2 entries per thread cost the ring step 66).
MAX_BLOCK_V = 2048
ELEMENTS_PER_THREAD = 4


@triton.jit
def _log1p(x):
    # log(1 + x) without losing x when x < float32 eps (Goldberg's trick): with w = 1 + x rounded,
    # log(w) * x / (w - 1) is accurate to a few ulp; w == 1 means log1p(x) = x to float32 precision.
    w = 1.0 + x
    return tl.where(w == 1.0, x, tl.log(w) * (x / tl.where(w == 1.0, 1.0, w - 1.0)))


@triton.jit
def _round_to(x, dtype: tl.constexpr, SOFTWARE_ROUNDING: tl.constexpr):
    """float32 -> dtype, rounding to nearest even.

    On the GPU the cast is cvt.rn (one F2FP per two elements). Triton's CPU interpreter truncates the
    bfloat16 cast instead, so there (SOFTWARE_ROUNDING) the rounding is spelled out: add 0x7FFF plus the
    lowest kept bit, drop 16 bits, which is what cvt.rn.bf16.f32 does.
    """
    if SOFTWARE_ROUNDING and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(x != x, x.to(tl.bfloat16), rounded)  # keep NaN a NaN
    else:
        return x.to(dtype)


@triton.jit
def _lane_floor(ptr):
    """The value masked lanes of a load from `ptr` hold and lane maxima start from: far below any logit,
    finite in the pointer's dtype, and with room for x - floor and (t - z) / tau in float32."""
    if ptr.dtype.element_ty == tl.float16:
        floor = FP16_LANE_FLOOR
    else:
        floor = LANE_FLOOR
    return floor


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
def _student_logits(row_ptr, cols, mask, SOFTCAP: tl.constexpr, cap, inv_cap, two_log2e_over_cap):
    """The student logits of one block: (as stored, float32, dz'/dz); masked lanes hold _lane_floor.

    The one place the kernel reads and transforms student logits: every pass goes through here. With
    SOFTCAP the float32 logits are z' = cap tanh(z / cap) (_softcap) and the slope dz'/dz (1 on masked
    lanes); without it the slope is 1 and unused.
    """
    floor = _lane_floor(row_ptr)
    raw = tl.load(row_ptr + cols, mask=mask, other=floor)
    z = raw.to(tl.float32)
    slope = tl.full(z.shape, 1.0, tl.float32)
    if SOFTCAP:
        capped, derivative = _softcap(z, cap, inv_cap, two_log2e_over_cap)
        z = tl.where(mask, capped, floor)
        slope = tl.where(mask, derivative, 1.0)
    return raw, z, slope


@triton.jit
def _teacher_logits(row_ptr, cols, mask):
    """The teacher logits of one block in float32 (masked lanes hold _lane_floor)."""
    return tl.load(row_ptr + cols, mask=mask, other=_lane_floor(row_ptr)).to(tl.float32)


@triton.jit
def _lane_step(m, m2, s_rest, ent, x):
    """Fold one element per lane, x, into that lane's temperature-1 state; ONE exponential per element.

    m, m2   the lane's largest and second-largest value (LANE_FLOOR before any)
    s_rest  sum over the lane's elements but one occurrence of m of exp(x_j - m): the lane's
            sum_j exp(x_j - m) is 1 + s_rest (the 1 kept apart: see _combine_row_stats)
    ent     sum_j exp(x_j - m) (x_j - m)

    With delta = x - m and e = exp(-|delta|): a new maximum (delta > 0) rescales the old state by
    e = exp(m - x) and the old maximum's 1 joins the rest, s_rest' = (s_rest + 1) e, ent' = e (ent +
    (m - x)(1 + s_rest)); otherwise x joins the rest, s_rest' = s_rest + e, ent' = ent + e (x - m). Both
    are s_rest' = r s_rest + e and ent' = r ent + e (-|delta|) w with r = (e or 1), w = (1 + s_rest or 1).
    Also returns (grew, delta) for the tempered sums that share this maximum (_tempered_step).
    NaN or inf in x makes s_rest or ent NaN (reported, never dropped).
    """
    delta = x - m
    grew = delta > 0.0
    neg_abs = -tl.abs(delta)
    e = tl.exp2(neg_abs * LOG2E)
    r = tl.where(grew, e, 1.0)
    shift = neg_abs * e
    ent = r * ent + (shift + shift * tl.where(grew, s_rest, 0.0))
    s_rest = r * s_rest + e
    m2 = tl.maximum(m2, tl.minimum(m, x))
    m = tl.maximum(m, x)
    return m, m2, s_rest, ent, grew, delta


@triton.jit
def _tempered_step(total, grew, delta, scale):
    """Fold x into a lane's full sum total = sum_j 2^((x_j - m) scale) at the lane maximum m of
    _lane_step (grew, delta = x - m_old from it); scale = log2(e) / tau: one exponential per element."""
    e = tl.exp2(-tl.abs(delta) * scale)
    return tl.where(grew, total * e + 1.0, total + e)


@triton.jit
def _max_sum_step(m, total, x, scale):
    """A lane's own running maximum m and full sum total = sum_j 2^((x_j - m) scale); one exponential."""
    delta = x - m
    e = tl.exp2(-tl.abs(delta) * scale)
    total = tl.where(delta > 0.0, total * e + 1.0, total + e)
    return tl.maximum(m, x), total


@triton.jit
def _combine_row_stats(m, m2, s_rest, ent):
    """The row's temperature-1 state (m1, m2, s_rest, ent) from the lanes' (after the loop, once per row).

    The lane `top` holding the row maximum m1 (its first occurrence) keeps its 1 apart: s_rest =
    s_rest_top + sum_{lane != top} exp(m_lane - m1) (1 + s_rest_lane), so 1 - p_(1) = s_rest / (1 + s_rest)
    and log(1 + s_rest) stay exact for confident rows. Lanes that saw no element (m = LANE_FLOOR) weigh 0.
    """
    lane = tl.arange(0, m.shape[0])
    m1 = tl.max(m, axis=0)
    top = tl.argmax(m, axis=0)
    weight = tl.exp2((m - m1) * LOG2E)
    lane_total = 1.0 + s_rest
    row_rest = tl.sum(tl.where(lane == top, s_rest, weight * lane_total), axis=0)
    row_ent = tl.sum(weight * (ent + (m - m1) * lane_total), axis=0)
    row_m2 = tl.maximum(tl.max(m2, axis=0), tl.max(tl.where(lane == top, LANE_FLOOR, m), axis=0))
    return m1, row_m2, row_rest, row_ent


@triton.jit
def _combine_sum(m, total, row_max, scale):
    """sum_j 2^((x_j - row_max) scale) from the lanes' sums at their own maxima m."""
    return tl.sum(tl.exp2((m - row_max) * scale) * total, axis=0)


@triton.jit
def _finish_row_stats(m1, m2, s_rest, ent, inv_log_v):
    """(u, d) from a finished temperature-1 state: u = H / ln V, d = (1 - exp(m2 - m1)) / (1 + s_rest)."""
    total = 1.0 + s_rest
    entropy = _log1p(s_rest) - ent / total
    return _clamp_unit(entropy * inv_log_v), _clamp_unit((1.0 - tl.exp(m2 - m1)) / total)


@triton.jit
def _row_temperature(tau, discrimination, DYNAMIC_TAU: tl.constexpr):
    """tau_r of a teacher row of discrimination d: 1 + (tau - 1) d rounded once (an fma) with a dynamic tau,
    else tau. The one place the kernel computes it, for the teacher it reads and for the row it records
    (whose stored log-normaliser is used only at exactly this tau: contract.py, "Stored log-normalisers")."""
    if DYNAMIC_TAU:
        return tl.fma(tau - 1.0, discrimination, 1.0)
    else:
        return tau + 0.0 * discrimination


@triton.jit
def _clamp_unit(x):
    # Clamp rounding excursions into [0, 1] while letting NaN through, so non-finite input stays visible.
    # (the enum is spelled at each call: the compiler takes it as a constant argument, not as a local variable)
    return tl.minimum(tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL), 1.0, propagate_nan=tl.PropagateNan.ALL)


# Top-k ring record (RECORD_TOPK): an element's order key, int32, ordered like its float32 value; masked
# lanes and empty candidate slots hold KEY_EMPTY, below every value's key (-inf's is 0x807FFFFF).
KEY_EMPTY = tl.constexpr(-2147483648)
INDEX_EMPTY = tl.constexpr(2147483647)  # an empty slot's vocabulary id: its rank word 0x7FFFFFFF - id is 0


@triton.jit
def _order_key(x):
    """int32 key of float32 x with x < y <=> key(x) < key(y) and equal values equal keys (-0 is taken as +0):
    the sign-magnitude bits with the magnitude flipped for negatives. A NaN gets a key (unspecified order)."""
    bits = tl.where(x == 0.0, 0.0, x).to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _key_value(key):
    """The float32 value of an _order_key (its inverse)."""
    return (key ^ ((key >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _rank(key, index):
    """int64 rank of (value key, vocabulary id): larger ranks first means value descending, then id
    ascending (the C++ kernel's order: ties to the lower index); an empty slot has the smallest rank."""
    return (key.to(tl.int64) << 32) | (index * -1 + INDEX_EMPTY).to(tl.int64)


@triton.jit
def _packed_key(z, block):
    """bfloat16 logits without softcapping (their float32 values have 16 zero low bits): one int32 per
    element whose order is the value's, then the lower block: the order key of z (-0 taken as +0, by
    z + 0.0) in the high half, 0xFFFF - block in the low half (block = start / BLOCK_V < 2^16). So a
    lane's top 3 costs 5 integer min/max per element and no id selects (_top3_packed_step)."""
    bits = (z + 0.0).to(tl.int32, bitcast=True)
    return (bits ^ ((bits >> 31) & 0x7FFF0000)) | (0xFFFF - block)


@triton.jit
def _top3_packed_step(p1, p2, p3, key):
    """Fold one packed key per lane (_packed_key; KEY_EMPTY for a masked lane) into the lane's three largest
    (p1 >= p2 >= p3): a sorting network on the keys alone (keys of one lane are distinct)."""
    p3 = tl.maximum(p3, tl.minimum(p2, key))
    p2 = tl.maximum(p2, tl.minimum(p1, key))
    p1 = tl.maximum(p1, key)
    return p1, p2, p3


@triton.jit
def _unpack_key(packed, lane, BLOCK_V: tl.constexpr):
    """(order key as _order_key gives it, vocabulary id) of a _packed_key (KEY_EMPTY: an empty slot). A
    negative value's _order_key has its 16 low bits set (its float32 bits' are 0, flipped)."""
    empty = packed == KEY_EMPTY
    key = (packed & -65536) | ((packed >> 31) & 0xFFFF)
    index = (0xFFFF - (packed & 0xFFFF)) * BLOCK_V + lane
    return tl.where(empty, KEY_EMPTY, key), tl.where(empty, INDEX_EMPTY, index)


@triton.jit
def _top3_step(k1, i1, k2, i2, k3, i3, key, col):
    """Fold one element per lane (order key `key`, id `col`) into the lane's three best (k1 >= k2 >= k3).
    Ids arrive in increasing order per lane, so a strict compare keeps the lower id among equal values."""
    above1 = key > k1
    above2 = key > k2
    above3 = key > k3
    k3 = tl.where(above2, k2, tl.maximum(k3, key))
    i3 = tl.where(above2, i2, tl.where(above3, col, i3))
    k2 = tl.where(above1, k1, tl.maximum(k2, key))
    i2 = tl.where(above1, i1, tl.where(above2, col, i2))
    k1 = tl.maximum(k1, key)
    i1 = tl.where(above1, col, i1)
    return k1, i1, k2, i2, k3, i3


@triton.jit
def _merge_ranks(top, ranks, K_BLOCK: tl.constexpr):
    """The K_BLOCK largest of `top` (K_BLOCK ranks, descending) and of the block `ranks`, descending."""
    return tl.topk(tl.reshape(tl.join(top, tl.topk(ranks, K_BLOCK)), [2 * K_BLOCK]), K_BLOCK)


@triton.jit
def _dynsdpb_row_kernel(
    logits_ptr,
    logits_row_stride,
    labels_ptr,
    teacher_ptr,
    teacher_row_stride,
    teacher_index_ptr,
    teacher_stats_ptr,
    teacher_stats_row_stride,
    grad_ptr,
    grad_row_stride,
    row_terms_ptr,
    student_stats_ptr,
    grad_scale_ptr,
    record_index_ptr,
    ring_ptr,
    ring_row_stride,
    ring_stats_ptr,
    ring_stats_row_stride,
    support_ptr,
    support_row_stride,
    tail_ptr,
    record_values_ptr,
    record_values_row_stride,
    record_support_ptr,
    record_support_row_stride,
    record_tail_ptr,
    K,
    RECORD_K,
    V,
    ignore_index,
    alpha,
    tau,
    inv_log_v,
    softcap,
    HAS_TEACHER: tl.constexpr,
    HAS_TEACHER_STATS: tl.constexpr,
    TEACHER_LOG_NORM: tl.constexpr,
    DYNAMIC_ALPHA: tl.constexpr,
    DYNAMIC_TAU: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    RECORD: tl.constexpr,
    RECORD_ROWS: tl.constexpr,
    RECORD_LOG_NORM: tl.constexpr,
    TEACHER_TOPK: tl.constexpr,
    HAS_TAIL: tl.constexpr,
    SOFTCAP: tl.constexpr,
    K_BLOCK: tl.constexpr,
    RECORD_TOPK: tl.constexpr,
    PACKED_TOPK: tl.constexpr,
    RECORD_K_BLOCK: tl.constexpr,
    BLOCK_V: tl.constexpr,
    SOFTWARE_ROUNDING: tl.constexpr,
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

    zeros = tl.zeros([BLOCK_V], dtype=tl.float32)
    z_floor = zeros + _lane_floor(logits_ptr)
    t_floor = zeros + _lane_floor(teacher_ptr)

    # Teacher statistics (u, d) at temperature 1: given, or from a pre-pass when tau_r needs them.
    t_uncertainty = 0.0
    t_discrimination = 0.0
    teacher_max = 0.0  # the pre-pass's row maximum of t, which pass 1 then needs not track
    if HAS_TEACHER_STATS:
        if distilled:
            t_uncertainty = tl.load(teacher_stats_ptr + teacher_id * teacher_stats_row_stride).to(tl.float32)
            t_discrimination = tl.load(teacher_stats_ptr + teacher_id * teacher_stats_row_stride + 1).to(tl.float32)
    elif DYNAMIC_TAU:
        if distilled:
            tm_lanes, tm2_lanes, ts_rest_lanes, tent_lanes = t_floor, t_floor, zeros, zeros
            for start in range(0, V, BLOCK_V):
                cols = start + lane
                t = _teacher_logits(teacher_row, cols, cols < V)
                tm_lanes, tm2_lanes, ts_rest_lanes, tent_lanes, _, _ = _lane_step(tm_lanes, tm2_lanes, ts_rest_lanes, tent_lanes, t)
            tm1, tm2, ts_rest, tent = _combine_row_stats(tm_lanes, tm2_lanes, ts_rest_lanes, tent_lanes)
            t_uncertainty, t_discrimination = _finish_row_stats(tm1, tm2, ts_rest, tent, inv_log_v)
            teacher_max = tm1

    tau_r = _row_temperature(tau, t_discrimination, DYNAMIC_TAU)
    inv_tau = 1.0 / tau_r
    tau_scale = LOG2E * inv_tau  # exp(x / tau_r) = exp2(x * tau_scale)

    # TEACHER_LOG_NORM (dense teachers whose stats carry (tau_rec, log_norm): a ring's): the teacher's
    # log-normaliser at tau_r is known before pass 1 where it was stored at exactly this tau_r, and pass 1
    # then reads no teacher logits: log2 P_j = (t_j - tm1) tau_scale - log2_ts_tau with tm1 = 0 and
    # log2_ts_tau = log2(e) log_norm. Other rows (NaN: not recorded so, or recorded at another tau: a
    # changed config) take it from a pass of their own over t (2 bytes and one exponential per element,
    # what pass 1 would spend on it otherwise): a per-row branch around a loop, not inside pass 1.
    tm1 = 0.0
    log2_ts_tau = 0.0
    if TEACHER_LOG_NORM:
        if distilled:
            stored = teacher_stats_ptr + teacher_id * teacher_stats_row_stride
            stored_tau = tl.load(stored + 2)
            stored_log_norm = tl.load(stored + 3)
            if (stored_tau == tau_r) & (stored_log_norm == stored_log_norm):
                log2_ts_tau = stored_log_norm * LOG2E
            else:
                tm_lanes, ts_tau_lanes = t_floor, zeros
                for start in range(0, V, BLOCK_V):
                    cols = start + lane
                    t = _teacher_logits(teacher_row, cols, cols < V)
                    tm_lanes, ts_tau_lanes = _max_sum_step(tm_lanes, ts_tau_lanes, t, tau_scale)
                tm1 = tl.max(tm_lanes, axis=0)
                log2_ts_tau = tl.log2(_combine_sum(tm_lanes, ts_tau_lanes, tm1, tau_scale))

    # Pass 1, per lane (no cross-lane work in the loop): the student's temperature-1 state (_lane_step)
    # and its sum at tau_r, which shares the lane maximum since max(z / tau) = max(z) / tau; the teacher's
    # maximum and sum at tau_r (its maximum already known after a pre-pass), and its temperature-1 state
    # when its statistics are still unknown. A recorded row is copied into the ring here.
    zm_lanes, zm2_lanes, zs_rest_lanes, zent_lanes, zs_tau_lanes = z_floor, z_floor, zeros, zeros, zeros
    # RECORD_TOPK: each lane's three best (order key, id) of the recorded row (_top3_step), or for bfloat16
    # logits without softcapping its three best packed keys (_top3_packed_step), unpacked after the loop
    key_empty = tl.full([BLOCK_V], KEY_EMPTY, tl.int32)
    index_empty = tl.full([BLOCK_V], INDEX_EMPTY, tl.int32)
    rk1, ri1, rk2, ri2, rk3, ri3 = key_empty, index_empty, key_empty, index_empty, key_empty, index_empty
    tm_lanes, tm2_lanes, ts_rest_lanes, tent_lanes, ts_tau_lanes = t_floor, t_floor, zeros, zeros, zeros
    for start in range(0, V, BLOCK_V):
        cols = start + lane
        mask = cols < V
        z_raw, z, z_slope = _student_logits(logits_row, cols, mask, SOFTCAP, softcap, inv_cap, two_log2e_over_cap)
        if RECORD_ROWS:
            if record_slot >= 0:  # the fused ring write: this block is in registers anyway
                if ring_ptr.dtype.element_ty == logits_ptr.dtype.element_ty and not SOFTCAP:
                    tl.store(ring_row + cols, z_raw, mask=mask)
                else:
                    tl.store(ring_row + cols, _round_to(z, ring_ptr.dtype.element_ty, SOFTWARE_ROUNDING), mask=mask)
        zm_lanes, zm2_lanes, zs_rest_lanes, zent_lanes, grew, delta = _lane_step(zm_lanes, zm2_lanes, zs_rest_lanes, zent_lanes, z)
        if RECORD_TOPK:
            if record_slot >= 0:
                if PACKED_TOPK:  # rk1..rk3 hold packed keys until the loop ends
                    key = tl.where(mask, _packed_key(z, start // BLOCK_V), KEY_EMPTY)
                    rk1, rk2, rk3 = _top3_packed_step(rk1, rk2, rk3, key)
                else:
                    key = tl.where(mask, _order_key(z), KEY_EMPTY)
                    rk1, ri1, rk2, ri2, rk3, ri3 = _top3_step(rk1, ri1, rk2, ri2, rk3, ri3, key, cols)
        if distilled:
            zs_tau_lanes = _tempered_step(zs_tau_lanes, grew, delta, tau_scale)
            if not TEACHER_TOPK and not TEACHER_LOG_NORM:
                t = _teacher_logits(teacher_row, cols, mask)
                if HAS_TEACHER_STATS:
                    tm_lanes, ts_tau_lanes = _max_sum_step(tm_lanes, ts_tau_lanes, t, tau_scale)
                elif DYNAMIC_TAU:
                    ts_tau_lanes += tl.exp2((t - teacher_max) * tau_scale)
                else:
                    tm_lanes, tm2_lanes, ts_rest_lanes, tent_lanes, t_grew, t_delta = _lane_step(tm_lanes, tm2_lanes, ts_rest_lanes, tent_lanes, t)
                    ts_tau_lanes = _tempered_step(ts_tau_lanes, t_grew, t_delta, tau_scale)

    # Across lanes, once per row.
    zm1, zm2, zs_rest, zent = _combine_row_stats(zm_lanes, zm2_lanes, zs_rest_lanes, zent_lanes)

    zs_tau = _combine_sum(zm_lanes, zs_tau_lanes, zm1, tau_scale)
    if TEACHER_TOPK or TEACHER_LOG_NORM:
        pass  # tm1 and log2_ts_tau: from the k values below, or set before pass 1
    elif HAS_TEACHER_STATS:
        tm1 = tl.max(tm_lanes, axis=0)
        log2_ts_tau = tl.log2(tl.where(distilled, _combine_sum(tm_lanes, ts_tau_lanes, tm1, tau_scale), 1.0))
    elif DYNAMIC_TAU:
        tm1 = teacher_max + 0.0 * zm1
        log2_ts_tau = tl.log2(tl.where(distilled, tl.sum(ts_tau_lanes, axis=0), 1.0))
    else:
        tm1, tm2, ts_rest, tent = _combine_row_stats(tm_lanes, tm2_lanes, ts_rest_lanes, tent_lanes)
        log2_ts_tau = tl.log2(tl.where(distilled, _combine_sum(tm_lanes, ts_tau_lanes, tm1, tau_scale), 1.0))
        if distilled:
            t_uncertainty, t_discrimination = _finish_row_stats(tm1, tm2, ts_rest, tent, inv_log_v)
    if DYNAMIC_ALPHA:
        alpha_r = alpha * (1.0 - t_uncertainty)
    else:
        alpha_r = alpha + 0.0 * t_uncertainty

    # RECORD_TOPK: the recorded row's k best (value descending, ties to the lower id), exactly. The k best
    # ranks (_rank) among the lanes' three candidates are the row's k best unless some lane had all three
    # of its candidates among them (it may hold more): such a lane is "open", and a further pass collects
    # the next three of each open lane (elements ranked below its third), merged in, until none is open
    # (terminates: each pass lowers every open lane's floor; a random row of V = 128256, k = 64 has an
    # open lane in about 1 of 100 rows, by counting). Before pass 2, which may overwrite the logits with the gradient, and after the other lanes'
    # states are combined (fewer live registers).
    record_lane = tl.arange(0, RECORD_K_BLOCK)
    record_ranks = tl.full([RECORD_K_BLOCK], -9223372036854775808, tl.int64)
    if RECORD_TOPK:
        if record_slot >= 0:
            if PACKED_TOPK:
                rk1, ri1 = _unpack_key(rk1, lane, BLOCK_V)
                rk2, ri2 = _unpack_key(rk2, lane, BLOCK_V)
                rk3, ri3 = _unpack_key(rk3, lane, BLOCK_V)
            lane_open = lane >= 0  # the first round merges pass 1's candidates of every lane
            record_round = 0
            while tl.max(lane_open.to(tl.int32), axis=0) > 0:
                if record_round > 0:  # the record pass: each open lane's next three, below its third
                    floor_rank = tl.where(lane_open, _rank(rk3, ri3), -9223372036854775808)
                    rk1, ri1, rk2, ri2, rk3, ri3 = key_empty, index_empty, key_empty, index_empty, key_empty, index_empty
                    for start in range(0, V, BLOCK_V):
                        cols = start + lane
                        mask = cols < V
                        z_raw, z, z_slope = _student_logits(logits_row, cols, mask, SOFTCAP, softcap, inv_cap, two_log2e_over_cap)
                        key = _order_key(z)
                        key = tl.where(mask & (_rank(key, cols) < floor_rank), key, KEY_EMPTY)
                        rk1, ri1, rk2, ri2, rk3, ri3 = _top3_step(rk1, ri1, rk2, ri2, rk3, ri3, key, cols)
                candidate = 0  # one candidate block at a time, through one copy of the selection network
                while candidate < 3:
                    # the candidate's 32-bit key and id selected first: one int64 rank live, not three
                    key = tl.where(candidate == 0, rk1, tl.where(candidate == 1, rk2, rk3))
                    ranks = _rank(key, tl.where(candidate == 0, ri1, tl.where(candidate == 1, ri2, ri3)))
                    record_ranks = _merge_ranks(record_ranks, ranks, RECORD_K_BLOCK)
                    candidate += 1
                kth = tl.min(tl.where(record_lane < RECORD_K, record_ranks, 9223372036854775807), axis=0)
                lane_open = (rk3 != KEY_EMPTY) & (_rank(rk3, ri3) >= kth)
                record_round += 1

    # Cross-entropy: ce = logsumexp(z) - z_y = (zm1 - z_y) + log(1 + zs_rest). When y is the argmax the
    # first term is exactly 0 and the loss keeps its precision for confident rows.
    z_label_raw, z_label, label_slope = _student_logits(
        logits_row, label, valid & label_in_range, SOFTCAP, softcap, inv_cap, two_log2e_over_cap
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
    q_scale = kl_coef  # the factor of Q in the gradient (off a top-k support: kl_coef (1 - tail / q_tail))
    if TEACHER_TOPK:
        k_lane = tl.arange(0, K_BLOCK)
        k_mask = k_lane < tl.where(distilled, K, 0)  # nothing to load for rows without a teacher
        t_k = tl.load(teacher_row + k_lane, mask=k_mask, other=float("-inf")).to(tl.float32)
        support = tl.load(support_ptr + tl.maximum(teacher_id, 0) * support_row_stride + k_lane, mask=k_mask, other=0)
        z_k_raw, z_k, slope_k = _student_logits(logits_row, support, k_mask, SOFTCAP, softcap, inv_cap, two_log2e_over_cap)
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
        q_scale = kl_coef * (1.0 - tail / q_tail)  # off the support the target is tail * Q / q_tail

    # Pass 2, in base 2: log2 Q_j = (z_j - zm1) tau_scale - log2 zs_tau, log2 P_j = (t_j - tm1) tau_scale -
    # log2 ts_tau, so log2 P_j - log2 Q_j = (t_j - z_j) tau_scale + log_ratio_offset; KL(P || Q) =
    # ln 2 sum_j P_j (log2 P_j - log2 Q_j), summed per lane. The gradient is stored once per element.
    log2_zs_tau = log_zs_tau * LOG2E
    log_ratio_offset = (zm1 - tm1) * tau_scale + log2_zs_tau - log2_ts_tau
    prob_scale = ce_coef / zs_total
    label_value = ce_coef * label_grad
    kl_lanes = zeros
    grad_row = grad_ptr + row * grad_row_stride
    if TEACHER_TOPK:
        kl_in_pass_2 = False
    else:
        kl_in_pass_2 = distilled
    # RECORD_LOG_NORM: a recorded row's log-normaliser at tau_rec, the temperature the loss will give it as
    # a teacher (its own d is known now), for the next step's pass 1 (contract.py, "Stored log-normalisers"):
    # log_norm = log sum_j exp(r_j / tau_rec) = zm1 / tau_rec + ln sum_j 2^((r_j - zm1) record_scale), r the
    # row as stored in the ring (z itself when the ring has the logits' dtype and no softcap, else z rounded
    # as pass 1 rounded it), the sum at the row's known maximum zm1 (r_j - zm1 <= round(zm1) - zm1: no
    # overflow). One exponential per element in pass 2, only in recorded rows.
    z_uncertainty, z_discrimination = _finish_row_stats(zm1, zm2, zs_rest, zent, inv_log_v)
    tau_rec = _row_temperature(tau, z_discrimination, DYNAMIC_TAU)
    record_scale = LOG2E * (1.0 / tau_rec)  # as tau_scale is formed from tau_r when the row teaches
    record_lanes = zeros
    records_log_norm = False
    if RECORD_LOG_NORM:
        records_log_norm = record_slot >= 0
    # RECORD_TOPK: the tail mass m = 1 - sum_topk 2^((v - zm1) record_scale) / sum_j 2^((z_j - zm1) record_scale),
    # the sum over the row as read (the C++ kernel's), riding in pass 2 like the log-normaliser's
    records_topk = False
    if RECORD_TOPK:
        records_topk = record_slot >= 0
    if kl_in_pass_2 | COMPUTE_GRAD | records_log_norm | records_topk:
        for start in range(0, V, BLOCK_V):
            cols = start + lane
            mask = cols < V
            z_raw, z, z_slope = _student_logits(logits_row, cols, mask, SOFTCAP, softcap, inv_cap, two_log2e_over_cap)
            z_shifted = z - zm1
            grad = zeros
            if COMPUTE_GRAD:  # the label's entry is rewritten below
                grad = tl.exp2(z_shifted * LOG2E) * prob_scale
            if distilled:
                q = tl.exp2(z_shifted * tau_scale - log2_zs_tau)
                if TEACHER_TOPK:  # the support entries are rewritten below
                    if COMPUTE_GRAD:
                        grad += q_scale * q
                else:
                    t = _teacher_logits(teacher_row, cols, mask)
                    p = tl.exp2((t - tm1) * tau_scale - log2_ts_tau)
                    kl_lanes += p * ((t - z) * tau_scale + log_ratio_offset)
                    if COMPUTE_GRAD:
                        grad += kl_coef * (q - p)
            if RECORD_LOG_NORM:
                if records_log_norm:
                    if ring_ptr.dtype.element_ty == logits_ptr.dtype.element_ty and not SOFTCAP:
                        stored_z = z
                    else:
                        stored_z = _round_to(z, ring_ptr.dtype.element_ty, SOFTWARE_ROUNDING).to(tl.float32)
                    record_lanes += tl.exp2((stored_z - zm1) * record_scale)
            if RECORD_TOPK:
                if records_topk:
                    record_lanes += tl.exp2((z - zm1) * record_scale)
            if COMPUTE_GRAD:
                if SOFTCAP:  # chain rule through the softcap: dL/dz = dL/dz' dz'/dz
                    grad *= z_slope
                tl.store(grad_row + cols, _round_to(grad, grad_ptr.dtype.element_ty, SOFTWARE_ROUNDING), mask=mask)
    kl += LN2 * tl.sum(kl_lanes, axis=0)

    if COMPUTE_GRAD:
        if valid & label_in_range:
            # The label's entry, rewritten whole (its exact ce gradient label_value, no per-element select in
            # pass 2), so that it is still rounded once; the barrier orders this store after pass 2's.
            tl.debug_barrier()
            label_entry = label_value
            if distilled:
                q_label = tl.exp2((z_label - zm1) * tau_scale - log2_zs_tau)
                if TEACHER_TOPK:  # a label on the support is rewritten again below
                    label_entry += q_scale * q_label
                else:
                    t_label = tl.load(teacher_row + label).to(tl.float32)
                    label_entry += kl_coef * (q_label - tl.exp2((t_label - tm1) * tau_scale - log2_ts_tau))
            if SOFTCAP:
                label_entry *= label_slope
            tl.store(grad_row + label, _round_to(label_entry, grad_ptr.dtype.element_ty, SOFTWARE_ROUNDING))

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
            tl.store(grad_row + support, _round_to(grad_k, grad_ptr.dtype.element_ty, SOFTWARE_ROUNDING), mask=k_mask)

    tl.store(student_stats_ptr + row * 2, z_uncertainty)
    tl.store(student_stats_ptr + row * 2 + 1, z_discrimination)
    if RECORD:
        if record_slot >= 0:
            ring_stats = ring_stats_ptr + record_slot * ring_stats_row_stride
            tl.store(ring_stats, z_uncertainty)
            tl.store(ring_stats + 1, z_discrimination)
            if RECORD_TOPK:
                # values rounded once to the ring's dtype, ids, the tail clamped to [0, 1 - 1e-6] (NaN kept);
                # entries past a row's V (k > V) hold -inf and id -1
                record_keys = (record_ranks >> 32).to(tl.int32)
                record_ids = (record_keys.to(tl.int64) << 32) - record_ranks + INDEX_EMPTY
                record_filled = record_ranks != -9223372036854775808
                record_values = tl.where(record_filled, _key_value(record_keys), float("-inf"))
                in_record = record_lane < RECORD_K
                kept = tl.sum(tl.where(in_record & record_filled, tl.exp2((record_values - zm1) * record_scale), 0.0), axis=0)
                tail_mass = 1.0 - kept / tl.sum(record_lanes, axis=0)
                tail_mass = tl.where(tail_mass != tail_mass, tail_mass, tl.minimum(tl.maximum(tail_mass, 0.0), TAIL_CEILING))
                values_row = record_values_ptr + record_slot * record_values_row_stride
                tl.store(values_row + record_lane, _round_to(record_values, record_values_ptr.dtype.element_ty, SOFTWARE_ROUNDING), mask=in_record)
                support_row = record_support_ptr + record_slot * record_support_row_stride
                tl.store(support_row + record_lane, tl.where(record_filled, record_ids, -1), mask=in_record)
                tl.store(record_tail_ptr + record_slot, tail_mass)
            if RECORD_LOG_NORM:
                tl.store(ring_stats + 2, tau_rec)
                tl.store(ring_stats + 3, zm1 * (1.0 / tau_rec) + tl.log(tl.sum(record_lanes, axis=0)))
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
    has_dense_teacher = has_teacher and teacher_support is None
    grad = outputs.grad
    blocks = block_config(vocab_size, block_v)
    record_topk = record.topk if record is not None else None
    record_k = record_topk.values.shape[1] if record_topk is not None else 1
    if record_topk is not None and block_v is None and record_k > blocks.block_v:
        # the record's selection takes k ranks out of one block of candidates: a k above the launcher's
        # block (2048 on a GPU) widens the block of this launch (not among the compile-checked ones)
        blocks = block_config(vocab_size, triton.next_power_of_2(record_k))
    # bfloat16 logits without softcapping record through packed keys (_packed_key: a 16-bit block index)
    packed_topk = record_topk is not None and logits.dtype == torch.bfloat16 and config.softcap is None
    if packed_topk and triton.cdiv(vocab_size, blocks.block_v) > 0xFFFF:
        raise ValueError(f"record.topk: bfloat16 logits of V = {vocab_size} span more than 65535 blocks of "
                         f"{blocks.block_v}; the Triton kernel's top-k record takes at most that")
    if record_topk is not None and not 1 <= record_k <= blocks.block_v:
        raise ValueError(
            f"record.topk: the Triton kernel records 1 to {blocks.block_v} (its block of "
            f"{blocks.block_v}) logits per row, got k = {record_k}"
        )
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
        teacher_stats_row_stride=teacher_stats.stride(0) if teacher_stats is not None else 0,
        grad_ptr=grad if grad is not None else logits,
        grad_row_stride=grad.stride(0) if grad is not None else 0,
        row_terms_ptr=outputs.row_terms,
        student_stats_ptr=outputs.student_stats,
        grad_scale_ptr=grad_scale,
        record_index_ptr=record.index if record is not None else labels,
        ring_ptr=record.ring_logits if record is not None and record.ring_logits is not None else placeholder,
        ring_row_stride=record.ring_logits.stride(0) if record is not None and record.ring_logits is not None else 0,
        ring_stats_ptr=record.stats if record is not None else placeholder,
        ring_stats_row_stride=record.stats.stride(0) if record is not None else 0,
        support_ptr=teacher_support if teacher_support is not None else labels,
        support_row_stride=teacher_support.stride(0) if teacher_support is not None else 0,
        tail_ptr=teacher_tail if teacher_tail is not None else placeholder,
        record_values_ptr=record_topk.values if record_topk is not None else placeholder,
        record_values_row_stride=record_topk.values.stride(0) if record_topk is not None else 0,
        record_support_ptr=record_topk.support if record_topk is not None else labels,
        record_support_row_stride=record_topk.support.stride(0) if record_topk is not None else 0,
        record_tail_ptr=record_topk.tail if record_topk is not None else placeholder,
        K=teacher_support.shape[1] if teacher_support is not None else 1,
        RECORD_K=record_k,
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
        TEACHER_LOG_NORM=has_dense_teacher and teacher_stats is not None
        and teacher_stats.shape[1] == N_STATS_WITH_LOG_NORM,
        DYNAMIC_ALPHA=config.dynamic_alpha,
        DYNAMIC_TAU=config.dynamic_tau,
        COMPUTE_GRAD=grad is not None,
        RECORD=record is not None,
        RECORD_ROWS=record is not None and record.ring_logits is not None,
        RECORD_LOG_NORM=record is not None and record.ring_logits is not None
        and record.stats.shape[1] == N_STATS_WITH_LOG_NORM,
        TEACHER_TOPK=teacher_support is not None,
        HAS_TAIL=teacher_support is not None and teacher_tail is not None,
        SOFTCAP=config.softcap is not None,
        K_BLOCK=triton.next_power_of_2(teacher_support.shape[1]) if teacher_support is not None else 1,
        RECORD_TOPK=record_topk is not None,
        PACKED_TOPK=packed_topk,
        RECORD_K_BLOCK=triton.next_power_of_2(record_k),
        BLOCK_V=blocks.block_v,
        SOFTWARE_ROUNDING=triton_interpreted(),
    )
    launch = KernelLaunch(grid=(n_rows,), arguments=arguments, constexprs=constexprs, num_warps=blocks.num_warps)
    launcher(launch)
    return outputs
