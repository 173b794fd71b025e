"""The per-row kernel contract that every backend (Triton, C++ CPU, reference) implements, and the option
and data types that travel through every layer above it (LossOptions, Teachers, RowRecord, TopkRecord).

A backend receives the student rows of one batch and, for each of them, an index into a table of
teacher rows. It returns per-row loss terms, the (uncertainty, discrimination) statistics of every
student row (the teacher statistics of the next step), and optionally the gradient of the reduced
loss with respect to the student logits.

Shapes (N student rows, R teacher rows, V vocabulary entries):

    logits           (N, V)  float32 | bfloat16 | float16 | float64, unit stride along V
    labels           (N,)    int64, ignore_index marks rows without a label
    teacher_rows     (R, V)  any float dtype, or None for plain cross-entropy
    teacher_index    (N,)    int64, row of teacher_rows that teaches row n, -1 for none
    teacher_stats    (R, 2) | (R, 4)  float32 (u, d) of each teacher row at temperature 1, or None;
                     four columns add (tau_rec, log_norm): the row's tempered log-normaliser
                     log_norm = log sum_j exp(t_j / tau_rec) and the temperature it was taken at
                     (NaN, NaN when unknown). Below: "Stored log-normalisers".
    grad_scale       (2,)    float32 on the logits' device: (ce_scale, distill_scale), the
                             factors the two gradient terms are multiplied by (1 / n_valid and
                             1 / n_distilled for reduction="mean"), read by the kernel so that
                             no host synchronisation is needed.
    record           RowRecord | None: logits to copy into a teacher ring in the same pass (below).
    teacher_support  (R, k) int64 | None: top-k teachers. teacher_rows is then (R, k), the k largest
                     logits of each teacher row, at these vocabulary ids, and teacher_stats (their (u, d)
                     on the full row) is required. The KL is taken over the teacher's support:
                     P_hat = softmax(t_k / tau_r) on the k ids, kl_r = KL(P_hat || Q), and the gradient
                     alpha_r tau_r (Q - P_hat scattered to the support): an approximation of the dense KL.
    teacher_tail     (R,) float32 | None, with teacher_support: the teacher's probability mass outside its
                     top k at tau_r, m = 1 - sum_topk softmax(t / tau_r). Then P_j = (1 - m) P_hat_j on
                     the support and the tail is one bucket: kl_r = sum_k P_k log(P_k / Q_k)
                     + m log(m / Q_tail), Q_tail = 1 - sum_k Q_k, with gradient alpha_r tau_r (Q - P) on the
                     support and alpha_r tau_r Q (1 - m / Q_tail) off it. This is the KL between the two
                     distributions coarsened to (top-k ids, everything else), far closer to the dense KL
                     than the plain top-k one when the tempered teacher is flat (m = 0 gives that one).
                     Q_tail is floored at TAIL_FLOOR = 1e-6, below which 1 - sum_k Q_k is rounding noise.

Recording (the fused ring write): for every row n with record.index[n] >= 0 the kernel writes the
row's logits, rounded to nearest-even into the ring's dtype, to record.ring_logits[record.index[n]], and
the row's (u, d) to record.stats[record.index[n]], while it streams the row for the loss anyway: no extra
read of the logits and no extra launch. The caller guarantees that recorded slots are distinct and
disjoint from every slot read through teacher_index in the same call (ring.py reserves them). A top-k
ring's values, ids and tail mass (record.topk, a TopkRecord) are written by the C++ and Triton kernels in the same
pass (each selects the row's k largest logits while it streams the row, value descending, ties to the lower
index; the tail mass's sum at tau_rec rides in the gradient pass) and, for the backends outside
backends.RECORDS_TOPK, by loss.write_topk_record before the kernel runs (torch.topk's order and ties), with
no host synchronisation either way. tau_rec is the temperature the loss gives the row when it teaches:
1 + (tau - 1) d from the row's own d with a dynamic tau, else tau.

Stored log-normalisers (teacher_stats of four columns; a dense ring keeps them: ring.py). A dense teacher
row's P = softmax(t / tau_r) needs its log-normaliser lse_t(tau_r), which costs the Triton kernel a read of
t in pass 1 (2 of its 12 bytes per element in a ring step). tau_r depends only on the row's (u, d) and the
config, so the kernel computes it when the row is recorded, one step earlier: the recorded row is the
student row, whose d and so tau_rec = row_temperature(d) are known after pass 1, and pass 2 reads it anyway.
Every backend that records into four-column stats writes, for each recorded dense row,
    tau_rec  = row_temperature(config, d) in float32 (fma(tau - 1, d, 1) rounded once; tau without dynamic tau)
    log_norm = log sum_j exp(r_j / tau_rec), r the row as STORED in the ring (rounded to its dtype), float32
(NaN, NaN where it does not: a top-k ring has two columns). A reader uses log_norm only where tau_rec equals,
bit for bit, the tau_r it computes for that teacher row itself (so a changed tau, dynamic rule or a stale or
user-supplied value is never used: those rows read t as before) and log_norm is not NaN; then log P_j =
t_j / tau_r - log_norm. Using it or not changes nothing but rounding: the Triton kernel uses it, the C++ and
reference backends write it but compute P from the row (they stream t in their KL pass anyway).

Final-logit softcapping (config.softcap = c, None for off; Gemma 2 / 3's final_logit_softcapping): the
student logits are replaced on load by z' = c tanh(z / c) (softcapped below), before everything else,
so that z' is what the cross-entropy, the (u, d) statistics, the KL and the ring record see; the gradient
is chained through dz'/dz = 1 - tanh^2(z / c) = 1 - (z' / c)^2 (0 where tanh saturates). A non-finite z
gives a NaN z' (c tanh(inf / c) = c would hide it), so validate still reports it. Teacher rows are not
capped: they are taken as already in capped space, which is what a ring holds (it records z').
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

REDUCTIONS = ("mean", "sum", "none")
LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# Columns of FusedRows.row_terms.
ROW_CE = 0  # ce_r = logsumexp(z_r) - z_r[y_r]; 0 on ignored rows
ROW_KL = 1  # kl_r = KL(softmax(t_r / tau_r) || softmax(z_r / tau_r)); 0 unless distilled
ROW_ALPHA = 2  # alpha_r; 0 unless distilled
ROW_TAU = 3  # tau_r; 0 unless distilled
ROW_UNCERTAINTY = 4  # the teacher's u_r; 0 unless distilled
N_ROW_TERMS = 5

# Floor of Q's mass off a top-k teacher's support (teacher_tail above); the kernels use the same value.
TAIL_FLOOR = 1e-6

# Columns of FusedRows.student_stats and of teacher_stats.
STAT_UNCERTAINTY = 0  # u = H(softmax(x)) / ln V, in [0, 1] (0 when V == 1)
STAT_DISCRIMINATION = 1  # d = p_(1) - p_(2), top-1 minus top-2 probability, in [0, 1]
# The optional columns of teacher_stats and RowRecord.stats ("Stored log-normalisers" above).
STAT_TAU_REC = 2  # tau_rec, the temperature log_norm was taken at (NaN: unknown)
STAT_LOG_NORM = 3  # log sum_j exp(t_j / tau_rec) of the stored row (NaN: unknown)
N_STATS = 2  # (u, d)
N_STATS_WITH_LOG_NORM = 4  # (u, d, tau_rec, log_norm)
STATS_WIDTHS = (N_STATS, N_STATS_WITH_LOG_NORM)


# The string values of DistillConfig.dynamic: one half of the dynamic rule only (the ablations).
DYNAMIC_MODES = ("alpha", "tau")


@dataclass(frozen=True)
class DistillConfig:
    """Scalar options of the fused loss.

    dynamic=True:    alpha_r = alpha * (1 - u_r),  tau_r = 1 + (tau - 1) * d_r
    dynamic="alpha": alpha_r = alpha * (1 - u_r),  tau_r = tau                  (ablation)
    dynamic="tau":   alpha_r = alpha,              tau_r = 1 + (tau - 1) * d_r  (ablation)
    dynamic=False:   alpha_r = alpha,              tau_r = tau                  (the DLB loss)
    where (u_r, d_r) are the teacher row's uncertainty and discrimination at temperature 1.

    softcap: final-logit softcapping, z' = softcap * tanh(z / softcap) applied to the student logits
    before everything (module docstring); None (the default) leaves them as they are. A finite float > 0
    (checks.check_options).
    """

    alpha: float = 1.0
    tau: float = 3.0
    dynamic: bool | str = True
    ignore_index: int = -100
    softcap: float | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.dynamic, bool) or self.dynamic in DYNAMIC_MODES):
            raise ValueError(f"dynamic must be True, False, 'alpha' or 'tau', got {self.dynamic!r}")

    @property
    def dynamic_alpha(self) -> bool:
        """alpha_r = alpha * (1 - u_r) (dynamic=True or "alpha")."""
        return self.dynamic is True or self.dynamic == "alpha"

    @property
    def dynamic_tau(self) -> bool:
        """tau_r = 1 + (tau - 1) * d_r (dynamic=True or "tau")."""
        return self.dynamic is True or self.dynamic == "tau"

    @staticmethod
    def dynamic_mode(dynamic_alpha: bool, dynamic_tau: bool) -> bool | str:
        """The value of `dynamic` that has these two halves of the rule (the operators' schema carries two bools)."""
        if dynamic_alpha and dynamic_tau:
            return True
        return "alpha" if dynamic_alpha else "tau" if dynamic_tau else False


@dataclass(frozen=True)
class LossOptions:
    """Everything but tensors that the loss (loss.fused_loss and the autograd.Functions) needs.

    validate=True runs the checks that need one device-to-host synchronisation per call: labels outside
    [0, V) and non-finite logits or teacher logits (detected from the kernel's per-row outputs, so
    without an extra pass over the logits). inplace_grad=True writes the gradient into the logits'
    own storage (see functional.dynsdpb_loss).
    """

    distill: DistillConfig = DistillConfig()
    reduction: str = "mean"
    backend: str = "auto"
    validate: bool = True
    inplace_grad: bool = False


@dataclass(frozen=True)
class Teachers:
    """The teacher side of one call, passed whole from the modules to the loss core.

    logits:  (R, V) teacher rows, or (R, k) top-k values when `support` is given; None: no teachers.
    index:   (N,) int64, row of `logits` that teaches student row n, -1 for none.
    stats:   (R, 2) float32 (u, d) of each teacher row on its full row (required with `support`), or
             (R, 4) with the stored log-normalisers (tau_rec, log_norm) of dense rows (module docstring).
    support: (R, k) int64 vocabulary ids of top-k values, or None for whole rows.
    tail:    (R,) float32 teacher mass outside the top k (with `support`), or None.
    """

    logits: torch.Tensor | None = None
    index: torch.Tensor | None = None
    stats: torch.Tensor | None = None
    support: torch.Tensor | None = None
    tail: torch.Tensor | None = None


@dataclass(frozen=True)
class TopkRecord:
    """A top-k teacher ring's storage, filled for every recorded row by the kernel or loss.write_topk_record.

    values:  (P, k) the k largest logits of each recorded row, in the ring's dtype.
    support: (P, k) int64, their vocabulary ids.
    tail:    (P,) float32, the row's probability mass outside its top k at the temperature tau_r the loss
             will use for it (see teacher_tail above).
    """

    values: torch.Tensor
    support: torch.Tensor
    tail: torch.Tensor


@dataclass(frozen=True)
class RowRecord:
    """Where a call records the student rows that become teachers (see the module docstring).

    index:       (N,) int64, ring slot that student row n is written to, -1 for rows not recorded.
    ring_logits: (P, V) dense ring storage, any float dtype the kernel can write (float32, bfloat16,
                 float16), written by the kernel; None for a top-k ring (written through `topk`).
    stats:       (P, 2) float32, receives the recorded rows' (u, d) (written by the kernel); (P, 4) for
                 a dense ring also their (tau_rec, log_norm) (module docstring, "Stored log-normalisers").
    topk:        TopkRecord of a top-k ring, or None.
    """

    index: torch.Tensor
    ring_logits: torch.Tensor | None
    stats: torch.Tensor
    topk: TopkRecord | None = None

    def __post_init__(self) -> None:
        width = self.stats.shape[1] if self.stats.dim() == 2 else None
        if width not in STATS_WIDTHS or (width == N_STATS_WITH_LOG_NORM and self.ring_logits is None):
            raise ValueError(
                f"record.stats must be (P, 2) (u, d), or (P, 4) (u, d, tau_rec, log_norm) for a dense ring "
                f"(ring_logits given), got {tuple(self.stats.shape)} with ring_logits {'given' if self.ring_logits is not None else 'None'}"
            )

    @property
    def log_norm(self) -> bool:
        """Whether the recorded rows' (tau_rec, log_norm) are written too (module docstring)."""
        return self.stats.shape[1] == N_STATS_WITH_LOG_NORM

    def chunk(self, rows: slice) -> RowRecord:
        """The record of student rows `rows` (the same ring storage)."""
        return replace(self, index=self.index[rows])


@dataclass
class FusedRows:
    """What a backend returns for N student rows.

    row_terms:     (N, 5) float32 (float64 for float64 logits), columns ROW_CE, ROW_KL, ROW_ALPHA, ROW_TAU, ROW_UNCERTAINTY.
    student_stats: (N, 2) float32 (u, d) of every student row at temperature 1.
    grad:          (N, V) in the logits' dtype, or None when no gradient was requested:
                   ce_scale * valid_r * (softmax(z_r) - onehot(y_r))
                   + distill_scale * distilled_r * alpha_r * tau_r * (Q_r - P_r).
    """

    row_terms: torch.Tensor
    student_stats: torch.Tensor
    grad: torch.Tensor | None

    @property
    def ce(self) -> torch.Tensor:
        return self.row_terms[:, ROW_CE]

    @property
    def kl(self) -> torch.Tensor:
        return self.row_terms[:, ROW_KL]

    @property
    def alpha(self) -> torch.Tensor:
        return self.row_terms[:, ROW_ALPHA]

    @property
    def tau(self) -> torch.Tensor:
        return self.row_terms[:, ROW_TAU]

    @property
    def uncertainty(self) -> torch.Tensor:
        return self.row_terms[:, ROW_UNCERTAINTY]


def row_temperature(config: DistillConfig, discrimination: torch.Tensor) -> torch.Tensor:
    """tau_rec (float32, the shape of `discrimination`): the temperature the loss gives a teacher row of
    discrimination d, as every kernel computes it (rounded once: fma(tau - 1, d, 1) in float32, here exact
    in float64 and rounded; tau in float32 without a dynamic tau). The key a stored log-normaliser is valid for."""
    tau = torch.tensor(config.tau, dtype=torch.float32).double()  # the kernels' float32 tau
    d = discrimination.double()
    if config.dynamic_tau:
        return (1.0 + (tau - 1.0) * d).float()
    return (tau + 0.0 * d).float()


def row_terms_dtype(logits_dtype: torch.dtype) -> torch.dtype:
    """dtype of FusedRows.row_terms and so of the loss: float64 for float64 logits, float32 otherwise."""
    return torch.float64 if logits_dtype == torch.float64 else torch.float32


def softcapped(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """z' = softcap * tanh(z / softcap) of `logits` (any shape, in their dtype), NaN where z is not finite;
    `logits` itself when softcap is None. The transform the kernels apply on load (module docstring)."""
    if softcap is None:
        return logits
    capped = softcap * torch.tanh(logits / softcap)
    return torch.where(torch.isinf(logits), math.nan, capped)


def gradient_buffer(logits: torch.Tensor, compute_grad: bool, grad_out: torch.Tensor | None) -> torch.Tensor | None:
    """Where a kernel writes the (N, V) gradient: `grad_out` when given (the in-place mode), else a fresh
    contiguous buffer of the logits' dtype; None when no gradient is wanted."""
    if not compute_grad:
        return None
    return torch.empty_like(logits, memory_format=torch.contiguous_format) if grad_out is None else grad_out
