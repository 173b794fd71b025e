// C++ CPU kernel of the fused DynSDPB loss, with the Triton kernel's semantics (dynsdpb_kernels/contract.py).
//
// SIMD: every hot loop is written with ATen's portable vector layer, at::vec::Vectorized<float> (8 lanes
// under AVX2, 16 under AVX-512, scalar under DEFAULT), its inline exp_u20 (measured: relative error below
// 3.9e-7 on [-86, 0], the range every call here uses; 0 below -87.3; Sleef's exp is 8e-8 but an
// out-of-line call that cost 1.5x the time per exponential on an AVX2 EPYC) and its bfloat16 / float16
// conversions (round to nearest even on the way out). Define DYNSDPB_SLEEF_EXP to use Sleef's exp. cpu_kernel.py compiles this file once per
// CPU capability with that capability's flags (-DCPU_CAPABILITY_AVX2 -mavx2 -mfma -mf16c, or the AVX-512
// set), so the width does not depend on what the auto-vectoriser makes of the target.
//
// Memory: one OpenMP thread per row at a time, the row streamed in blocks of `block` elements (2048 from
// cpu_kernel.py: three 8 KB float buffers per thread, in L1) with no full-length scratch: pass A folds each block into
// online statistics (running max, sums rescaled by exp(old max - new max) once per block), pass B (only
// when the temperature tau_r depends on teacher statistics that are not stored) forms the tempered sums
// and the KL with the maxima known, and pass C writes the gradient, recomputing its exponentials rather
// than keeping V floats of them. The row itself (V = 128256: 500 KB of float32) is read from L2/L3 again
// by each pass; the gradient is written once.
//
// Exponentials per element of the vocabulary (per row: ~V each; a top-k teacher adds O(k)):
//   mode                                   forward   forward + backward
//   cross-entropy only (no teacher)            1            2
//   dense teacher, stored (u, d) stats         3            6      z, z/tau, t/tau; pass C again
//   dense teacher, stats from the row          4            7      plus t at temperature 1 for (u, d)
//   top-k teacher (stats always stored)        2            4      z, z/tau
// The ring passes stored statistics, so training runs the 3 / 6 row. A row recorded into a top-k ring adds
// one exponential per element (sum_j exp((z_j - max) / tau_rec) for its tail mass: in pass A with a fixed
// tau, in pass C with a dynamic one, in a pass of its own when no gradient is computed) and one vector
// compare per vector for the selection of its k largest logits (TopkSelector), no extra pass otherwise.
// A row recorded into a dense ring with four stats columns adds the same one exponential per element, over
// the ring's block read back as stored (rounded), for its log-normaliser (tau_rec, log_norm: contract.py,
// "Stored log-normalisers"); this kernel writes it but reads t for P as before (its KL pass streams t anyway).
//
// Final-logit softcapping (softcap = c > 0; 0 is off and takes none of the code below): each student block
// is replaced on load by z' = c tanh(z / c) (Sleef's tanh through at::vec, NaN for a non-finite z), so
// every pass, the label's logit, the top-k support's logits and the ring record see z'; pass C multiplies
// the block's gradient by dz'/dz = sech^2(z / c) = 4 e / (1 + e)^2, e = exp(-2 |z| / c) in (0, 1] (equal to
// 1 - (z' / c)^2 without its cancellation near saturation; exactly 0 once e underflows). One tanh per
// element per pass, plus one exponential in pass C.

#include <torch/extension.h>

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Q's mass off a top-k teacher's support is taken as at least this (rows.py): below it, 1 - sum_k Q_k is
// float32 rounding noise, and the tail bucket's gradient Q_j (1 - m / Q_tail) must stay bounded.
constexpr float kTailFloor = 1e-6f;

// body(offset, count) over [0, n) in whole vectors; count < kLanes only on the last call.
template <typename Body>
inline void for_each_vector(int64_t n, const Body& body) {
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) body(j, kLanes);
  if (j < n) body(j, n - j);
}

// count lanes of x, the others `fill`
inline Vec load(const float* x, int64_t count, float fill) {
  return count == kLanes ? Vec::loadu(x) : Vec::set(Vec(fill), Vec::loadu(x, count), count);
}

// v on the first count lanes, 0 on the rest (what a partial vector adds to a sum)
inline Vec first_lanes(const Vec& v, int64_t count) { return count == kLanes ? v : Vec::set(Vec(0.0f), v, count); }

inline float reduce_sum(const Vec& v) {
  return at::vec::vec_reduce_all([](Vec& a, Vec& b) { return a + b; }, v);
}

// NaN-propagating maximum
inline float reduce_max(const Vec& v) {
  return at::vec::vec_reduce_all([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, v);
}

// max(a, b), NaN if either is NaN (so a NaN logit stays visible in everything derived from the max)
inline float max_nan(float a, float b) { return (a != a || b != b) ? std::numeric_limits<float>::quiet_NaN() : std::max(a, b); }

// exp of a vector (arguments <= 0 here): ATen's exp_u20, an inline degree-5 polynomial, with NaN passed
// through (exp_u20 alone clamps NaN to a finite value).
inline Vec vec_exp(const Vec& x) {
#ifdef DYNSDPB_SLEEF_EXP
  return x.exp();  // Sleef, 1 ulp, an out-of-line call per vector
#else
  return Vec::blendv(x.exp_u20(), x, x != x);
#endif
}

inline float finite_or_zero(float x) { return std::isfinite(x) ? x : 0.0f; }

// z' = cap tanh(z / cap) of n values into `capped` (which may be z itself), NaN where z is not finite (tanh
// would map +-inf to a finite +-cap and hide it from the finiteness check); with `derivative`, also
// dz'/dz = 4 e / (1 + e)^2 with e = exp(-2 |z| / cap) (exp_u20's argument is <= 0, as everywhere here).
void softcap_block(const float* z, int64_t n, float cap, float* capped, float* derivative) {
  const Vec c(cap), inv_c(1.0f / cap), inf(std::numeric_limits<float>::infinity());
  const Vec nan(std::numeric_limits<float>::quiet_NaN());
  for_each_vector(n, [&](int64_t j, int64_t count) {
    const Vec v = load(z + j, count, 0.0f);
    const Vec x = v * inv_c;
    Vec::blendv(c * x.tanh(), nan, v.abs() == inf).store(capped + j, count);
    if (derivative != nullptr) {
      const Vec e = vec_exp(x.abs() * Vec(-2.0f));
      const Vec one_plus_e = Vec(1.0f) + e;
      (Vec(4.0f) * e / (one_plus_e * one_plus_e)).store(derivative + j, count);
    }
  });
}

float block_max(const float* x, int64_t n) {
  Vec max(kNegInf);
  for_each_vector(n, [&](int64_t j, int64_t count) { max = at::vec::maximum(max, load(x + j, count, kNegInf)); });
  return reduce_max(max);
}

// A block of row `row` of `rows` (unit stride along V) as float32: a pointer into the tensor itself for
// float32, else converted into `buffer` (bfloat16 / float16 through at::vec, float64 by a scalar loop).
const float* load_block(const at::Tensor& rows, int64_t row, int64_t start, int64_t n, float* buffer) {
  const int64_t offset = row * rows.stride(0) + start;
  switch (rows.scalar_type()) {
    case at::kFloat:
      return rows.data_ptr<float>() + offset;
    case at::kBFloat16:
    case at::kHalf: {
      auto convert = [&](auto* in) {
        using Reduced = std::remove_const_t<std::remove_pointer_t<decltype(in)>>;
        using ReducedVec = at::vec::Vectorized<Reduced>;
        int64_t j = 0;
        for (; j < n; j += ReducedVec::size()) {  // 2 float vectors per reduced-precision vector
          const int64_t count = std::min<int64_t>(ReducedVec::size(), n - j);
          auto [low, high] = at::vec::convert_to_float<Reduced>(ReducedVec::loadu(in + j, count));
          low.store(buffer + j, std::min<int64_t>(kLanes, count));
          if (count > kLanes) high.store(buffer + j + kLanes, count - kLanes);
        }
      };
      if (rows.scalar_type() == at::kBFloat16) convert(rows.data_ptr<at::BFloat16>() + offset);
      else convert(rows.data_ptr<at::Half>() + offset);
      return buffer;
    }
    case at::kDouble: {
      const double* in = rows.data_ptr<double>() + offset;
      for (int64_t j = 0; j < n; ++j) buffer[j] = static_cast<float>(in[j]);
      return buffer;
    }
    default:
      TORCH_CHECK(false, "dynsdpb_cpu: unsupported dtype ", rows.scalar_type());
  }
}

// Write a float32 block into row `row` of `rows`, rounded to nearest even (NaN stays NaN).
void store_block(const float* in, int64_t n, at::Tensor& rows, int64_t row, int64_t start) {
  const int64_t offset = row * rows.stride(0) + start;
  switch (rows.scalar_type()) {
    case at::kFloat: {
      float* out = rows.data_ptr<float>() + offset;
      if (out != in) std::memcpy(out, in, n * sizeof(float));
      break;
    }
    case at::kBFloat16:
    case at::kHalf: {
      auto convert = [&](auto* out) {
        using Reduced = std::remove_pointer_t<decltype(out)>;
        using ReducedVec = at::vec::Vectorized<Reduced>;
        int64_t j = 0;
        for (; j < n; j += ReducedVec::size()) {
          const int64_t count = std::min<int64_t>(ReducedVec::size(), n - j);
          const Vec low = load(in + j, std::min<int64_t>(kLanes, count), 0.0f);
          const Vec high = count > kLanes ? load(in + j + kLanes, count - kLanes, 0.0f) : Vec(0.0f);
          at::vec::convert_from_float<Reduced>(low, high).store(out + j, count);
        }
      };
      if (rows.scalar_type() == at::kBFloat16) convert(rows.data_ptr<at::BFloat16>() + offset);
      else convert(rows.data_ptr<at::Half>() + offset);
      break;
    }
    case at::kDouble: {
      double* out = rows.data_ptr<double>() + offset;
      for (int64_t j = 0; j < n; ++j) out[j] = in[j];
      break;
    }
    default:
      TORCH_CHECK(false, "dynsdpb_cpu: unsupported dtype ", rows.scalar_type());
  }
}

// A block of student logits: load_block's, softcapped into `buffer` when cap > 0 (with dz'/dz into
// `derivative` when that is given); with cap == 0 exactly load_block.
const float* load_student_block(const at::Tensor& logits, int64_t row, int64_t start, int64_t n, float* buffer, float cap,
                                float* derivative = nullptr) {
  const float* z = load_block(logits, row, start, n, buffer);
  if (cap <= 0.0f) return z;
  softcap_block(z, n, cap, buffer, derivative);
  return buffer;
}

// One student logit (the label's, a top-k support id's), softcapped when cap > 0.
float load_student_element(const at::Tensor& logits, int64_t row, int64_t column, float cap, float* derivative = nullptr) {
  float value;
  return *load_student_block(logits, row, column, 1, &value, cap, derivative);
}

// One element written, rounded to nearest even.
void store_element(float value, at::Tensor& rows, int64_t row, int64_t column) { store_block(&value, 1, rows, row, column); }

// Temperature-1 statistics of a row x, folded in block by block. Relative to the running max m:
//   rest   = sum_{j != argmax} exp(x_j - m)   (sum_j exp(x_j - m) = 1 + rest, kept apart so that
//            1 - p_max = rest / (1 + rest) and log(1 + rest) = log1p(rest) stay exact for confident rows)
//   ent    = sum_j exp(x_j - m) (x_j - m)      (H = log1p(rest) - ent / (1 + rest))
//   second = the largest value apart from one occurrence of the max
// A new max m' rescales: exp(x - m') = s exp(x - m) with s = exp(m - m'), so 1 + rest -> s (1 + rest),
// ent -> s (ent + (m - m') (1 + rest)), and the old argmax's 1 joins rest.
struct RowStats {
  float max = kNegInf;
  float rest = 0.0f;
  float ent = 0.0f;
  float second = kNegInf;

  void add_block(const float* x, int64_t n, float max_of_block) {
    const float new_max = max_nan(max, max_of_block);
    const Vec shift(new_max);
    // below: the block's sum of exp(x - new_max) over x < new_max, its count of x == new_max, its
    // sum of exp(x - new_max) (x - new_max), and its largest value below new_max
    Vec below(0.0f), at_max(0.0f), entropy(0.0f), second_below(kNegInf);
    for_each_vector(n, [&](int64_t j, int64_t count) {
      const Vec v = load(x + j, count, kNegInf);
      const Vec shifted = v - shift;
      const Vec e = vec_exp(shifted);
      const Vec is_below = v < shift;
      below += e & is_below;
      at_max += first_lanes((v == shift) & Vec(1.0f), count);
      entropy += first_lanes(e * shifted, count);
      second_below = at::vec::maximum(second_below, Vec::blendv(Vec(kNegInf), v, is_below));
    });
    const float block_below = reduce_sum(below), block_at_max = reduce_sum(at_max);
    const float block_ent = reduce_sum(entropy), block_second = reduce_max(second_below);
    if (new_max == max) {  // an old max exists: every occurrence here adds a 1 to rest
      rest += block_below + block_at_max;
      ent += block_ent;
      second = block_at_max > 0.0f ? new_max : std::max(second, block_second);
    } else {
      const bool first = max == kNegInf;
      const float scale = first ? 0.0f : std::exp(max - new_max);
      const float total = 1.0f + rest;
      ent = (first ? 0.0f : scale * (ent + (max - new_max) * total)) + block_ent;
      rest = (first ? 0.0f : scale * total) + block_below + (block_at_max - 1.0f);
      second = block_at_max > 1.0f ? new_max : max_nan(first ? kNegInf : max, block_second);
      max = new_max;
    }
  }

  static float clamp_unit(float x) { return x != x ? x : std::fmin(std::fmax(x, 0.0f), 1.0f); }
  // u = H / ln V
  float uncertainty(float inv_log_v) const { return clamp_unit((std::log1p(rest) - ent / (1.0f + rest)) * inv_log_v); }
  // d = p_(1) - p_(2) = (1 - exp(second - max)) / (1 + rest)
  float discrimination() const { return clamp_unit((1.0f - std::exp(second - max)) / (1.0f + rest)); }
};

// sum_j exp((x_j - m) / tau) over a row, m its running max, and for a teacher row t against the
// student z also  weighted = sum_j exp((t_j - m) / tau) (t_j - z_j - offset), the KL's cross term.
struct TemperedSum {
  float max = kNegInf;
  float sum = 0.0f;
  float weighted = 0.0f;

  void rescale(float new_max, float inv_tau) {
    if (new_max == max) return;
    const float scale = max == kNegInf ? 0.0f : std::exp((max - new_max) * inv_tau);
    sum *= scale;
    weighted *= scale;
    max = new_max;
  }

  void add_block(const float* x, int64_t n, float max_of_block, float inv_tau) {
    rescale(max_nan(max, max_of_block), inv_tau);
    const Vec shift(max), scale(inv_tau);
    Vec total(0.0f);
    for_each_vector(n, [&](int64_t j, int64_t count) { total += vec_exp((load(x + j, count, kNegInf) - shift) * scale); });
    sum += reduce_sum(total);
  }

  void add_teacher_block(const float* t, const float* z, int64_t n, float max_of_block, float inv_tau, float offset) {
    rescale(max_nan(max, max_of_block), inv_tau);
    const Vec shift(max), scale(inv_tau), z_offset(offset);
    Vec total(0.0f), cross(0.0f);
    for_each_vector(n, [&](int64_t j, int64_t count) {
      const Vec tv = load(t + j, count, kNegInf);
      const Vec e = vec_exp((tv - shift) * scale);
      total += e;
      cross += first_lanes(e * (tv - load(z + j, count, 0.0f) - z_offset), count);
    });
    sum += reduce_sum(total);
    weighted += reduce_sum(cross);
  }
};

// Gradient of one block: out_j = ce_weight exp(z_j - z_max) + q_weight exp((z_j - z_max) / tau)
//                               - p_weight exp((t_j - t_max) / tau)       (terms absent per kMode)
enum GradientMode { kCrossEntropy, kStudentTempered, kDenseTeacher };

struct GradientWeights {
  float z_max, t_max, inv_tau, ce_weight, q_weight, p_weight;
};

template <GradientMode kMode>
void gradient_block(const float* z, const float* t, int64_t n, const GradientWeights& w, float* out) {
  const Vec z_max(w.z_max), t_max(w.t_max), inv_tau(w.inv_tau), ce(w.ce_weight), q(w.q_weight), p(w.p_weight);
  for_each_vector(n, [&](int64_t j, int64_t count) {
    const Vec shifted = load(z + j, count, 0.0f) - z_max;
    Vec g = vec_exp(shifted) * ce;
    if constexpr (kMode != kCrossEntropy) g += vec_exp(shifted * inv_tau) * q;
    if constexpr (kMode == kDenseTeacher) g -= vec_exp((load(t + j, count, 0.0f) - t_max) * inv_tau) * p;
    g.store(out + j, count);
  });
}

// The k largest values of a row streamed block by block (the top-k ring record), ordered by value, ties
// to the lower index: a min-heap of k candidates whose root, the worst kept (smallest value, highest index
// among equals), is the admission threshold. Once k are held, a vector costs one compare against the
// broadcast threshold; only lanes above it are inserted, one by one. Since indices arrive in increasing
// order, an element equal to the threshold never displaces a kept one: among equal values the lower
// indices win, so the kept set and its order (value descending, index ascending) are deterministic.
// (torch.topk on CPU breaks ties in no fixed order.) A NaN never passes the compare; a row holding one is
// reported by validate and its record is unspecified.
struct TopkSelector {
  explicit TopkSelector(int64_t k) : k(k), value(k), id(k), order(k) {}
  int64_t k;
  int64_t count = 0;
  std::vector<float> value;
  std::vector<int64_t> id;
  std::vector<int64_t> order;

  // a ranks below b
  bool worse(int64_t a, int64_t b) const { return value[a] < value[b] || (value[a] == value[b] && id[a] > id[b]); }

  void sift_down(int64_t at) {
    for (;;) {
      const int64_t left = 2 * at + 1, right = left + 1;
      int64_t smallest = at;
      if (left < count && worse(left, smallest)) smallest = left;
      if (right < count && worse(right, smallest)) smallest = right;
      if (smallest == at) return;
      std::swap(value[at], value[smallest]);
      std::swap(id[at], id[smallest]);
      at = smallest;
    }
  }

  void push(float v, int64_t i) {
    int64_t at = count++;
    value[at] = v;
    id[at] = i;
    while (at > 0) {
      const int64_t parent = (at - 1) / 2;
      if (!worse(at, parent)) break;
      std::swap(value[at], value[parent]);
      std::swap(id[at], id[parent]);
      at = parent;
    }
  }

  void replace_worst(float v, int64_t i) {
    value[0] = v;
    id[0] = i;
    sift_down(0);
  }

  // elements x[0, n) of the row, at vocabulary ids start + j
  void add_block(const float* x, int64_t n, int64_t start) {
    int64_t j = 0;
    for (; j < n && count < k; ++j) push(x[j], start + j);
    if (j == n || k == 0) return;
    constexpr int kAllFail = static_cast<int>((1ull << kLanes) - 1);
    Vec threshold(value[0]);
    for (; j < n; j += kLanes) {
      const int64_t lanes = std::min<int64_t>(kLanes, n - j);
      const int fail = (load(x + j, lanes, kNegInf) > threshold).zero_mask();
      if (fail == kAllFail) continue;
      for (int64_t lane = 0; lane < lanes; ++lane) {
        if (!((fail >> lane) & 1) && x[j + lane] > value[0]) replace_worst(x[j + lane], start + j + lane);
      }
      threshold = Vec(value[0]);
    }
  }

  // the kept values (value descending, index ascending) into values[0, k) and ids[0, k)
  void finish(float* values, int64_t* ids) {
    for (int64_t j = 0; j < count; ++j) order[j] = j;
    std::sort(order.begin(), order.begin() + count, [&](int64_t a, int64_t b) { return worse(b, a); });
    for (int64_t j = 0; j < count; ++j) {
      values[j] = value[order[j]];
      ids[j] = id[order[j]];
    }
  }
};

// Per-thread block buffers (float32 copies of reduced-precision blocks, and the gradient block).
struct Scratch {
  Scratch(int64_t block, int64_t top_k, bool softcap, int64_t record_k, bool record_log_norm)
      : z(block), t(block), out(block), derivative(softcap ? block : 0), support_z(top_k), support_t(top_k),
        support_derivative(softcap ? top_k : 0), selector(record_k), record_values(record_k), record_ids(record_k),
        stored(record_log_norm ? block : 0) {}
  std::vector<float> z, t, out;
  std::vector<float> derivative;  // dz'/dz of the block (softcapping only)
  std::vector<float> support_z, support_t;  // a top-k teacher's k logits and the student's at those ids
  std::vector<float> support_derivative;  // dz'/dz at those ids (softcapping only)
  TopkSelector selector;  // a top-k ring record's candidates
  std::vector<float> record_values;  // and its k values / ids, sorted
  std::vector<int64_t> record_ids;
  std::vector<float> stored;  // a dense ring row's block as stored (rounded), for its log-normaliser
};

}  // namespace

// Same arguments and results as triton_fused_rows (dynsdpb_kernels/rows.py); `grad` is the (N, V)
// output buffer (ignored unless compute_grad; it may be the logits themselves), row_terms (N, 5) and
// student_stats (N, 2) are filled. record_index / ring_rows / ring_stats are rows.py's RowRecord (all
// three or none); teacher_support (R, k) makes teacher_rows (R, k) top-k teachers whose KL is taken over
// their support. record_topk_values (P, k) / record_topk_support (P, k) int64 / record_topk_tail (P,) float32:
// a top-k ring's TopkRecord (all three or none, with record_index and ring_stats), written for every
// recorded row instead of ring_rows. `block`: elements per block of the streamed passes (any positive number).
void fused_rows(const at::Tensor& logits, const at::Tensor& labels, const c10::optional<at::Tensor>& teacher_rows,
                const c10::optional<at::Tensor>& teacher_index, const c10::optional<at::Tensor>& teacher_stats,
                const at::Tensor& grad_scale, double alpha, double tau, bool dynamic_alpha, bool dynamic_tau,
                int64_t ignore_index, double softcap,
                bool compute_grad, at::Tensor grad, at::Tensor row_terms, at::Tensor student_stats,
                const c10::optional<at::Tensor>& record_index, c10::optional<at::Tensor> ring_rows,
                const c10::optional<at::Tensor>& ring_stats, const c10::optional<at::Tensor>& teacher_support,
                const c10::optional<at::Tensor>& teacher_tail, c10::optional<at::Tensor> record_topk_values,
                const c10::optional<at::Tensor>& record_topk_support, const c10::optional<at::Tensor>& record_topk_tail,
                int64_t block) {
  TORCH_CHECK(block > 0, "dynsdpb_cpu: block must be positive, got ", block);
  TORCH_CHECK(softcap >= 0.0 && std::isfinite(softcap), "dynsdpb_cpu: softcap must be 0 (off) or finite > 0, got ", softcap);
  const float cap = static_cast<float>(softcap);
  const int64_t n_rows = logits.size(0);
  const int64_t vocab = logits.size(1);
  const bool has_teacher = teacher_rows.has_value() && teacher_index.has_value();
  const bool has_stats = has_teacher && teacher_stats.has_value();
  const float inv_log_v = vocab > 1 ? 1.0f / std::log(static_cast<float>(vocab)) : 0.0f;
  const float ce_scale = grad_scale[0].item<float>();
  const float distill_scale = grad_scale[1].item<float>();
  const int64_t* label_ptr = labels.data_ptr<int64_t>();
  const int64_t* index_ptr = has_teacher ? teacher_index->data_ptr<int64_t>() : nullptr;
  const float* stats_ptr = has_stats ? teacher_stats->data_ptr<float>() : nullptr;
  const int64_t stats_stride = has_stats ? teacher_stats->stride(0) : 0;  // (u, d [, tau_rec, log_norm])
  const bool record = record_index.has_value() && ring_stats.has_value();  // rows too when ring_rows is given
  const bool record_rows = record && ring_rows.has_value();
  const int64_t* record_ptr = record ? record_index->data_ptr<int64_t>() : nullptr;
  float* ring_stats_ptr = record ? ring_stats->data_ptr<float>() : nullptr;
  const int64_t ring_stats_stride = record ? ring_stats->stride(0) : 0;
  // a dense ring with four stats columns: each recorded row's (tau_rec, log_norm) too (contract.py)
  const bool record_log_norm = record_rows && ring_stats->size(1) == 4;
  const int64_t* support_ptr = teacher_support.has_value() ? teacher_support->data_ptr<int64_t>() : nullptr;
  const int64_t top_k = support_ptr != nullptr ? teacher_support->size(1) : 0;
  const int64_t support_stride = support_ptr != nullptr ? teacher_support->stride(0) : 0;
  const float* tail_ptr = teacher_tail.has_value() ? teacher_tail->data_ptr<float>() : nullptr;
  // a top-k ring record: values (P, k) in the ring's dtype, support (P, k) int64, tail (P,) float32
  const bool record_topk = record && record_topk_values.has_value();
  const int64_t record_k = record_topk ? record_topk_values->size(1) : 0;
  TORCH_CHECK(record_k <= vocab, "dynsdpb_cpu: a top-k record keeps at most V = ", vocab, " entries, got k = ", record_k);
  int64_t* record_support_ptr = record_topk ? record_topk_support->data_ptr<int64_t>() : nullptr;
  const int64_t record_support_stride = record_topk ? record_topk_support->stride(0) : 0;
  float* record_tail_ptr = record_topk ? record_topk_tail->data_ptr<float>() : nullptr;
  auto terms = row_terms.accessor<float, 2>();
  auto student = student_stats.accessor<float, 2>();

#pragma omp parallel num_threads(at::get_num_threads())
  {
    Scratch scratch(block, top_k, cap > 0.0f, record_k, record_log_norm);
#pragma omp for schedule(dynamic, 1)
    for (int64_t row = 0; row < n_rows; ++row) {
      const int64_t label = label_ptr[row];
      const bool valid = label != ignore_index;
      const bool label_in_range = label >= 0 && label < vocab;
      const int64_t teacher = has_teacher ? index_ptr[row] : -1;
      const bool distilled = valid && teacher >= 0;
      const bool top_k_teacher = distilled && support_ptr != nullptr;
      const bool dense_teacher = distilled && support_ptr == nullptr;
      const int64_t slot = record ? record_ptr[row] : -1;

      // alpha_r, tau_r: known before the row is read when the teacher's (u, d) are stored or tau is fixed
      // (dynamic_alpha alone needs u only after pass A, so the fixed-tau sums still go in pass A)
      float t_uncertainty = 0.0f, t_discrimination = 0.0f, alpha_r = 0.0f, tau_r = 0.0f, inv_tau = 1.0f;
      // tau_r of a teacher row of discrimination d: fma(tau - 1, d, 1), rounded once as every backend rounds
      // it (a stored log-normaliser is keyed by it: contract.py), or tau
      auto row_temperature = [&](float d) {
        return dynamic_tau ? std::fma(static_cast<float>(tau) - 1.0f, d, 1.0f) : static_cast<float>(tau);
      };
      auto set_temperature = [&]() {
        alpha_r = dynamic_alpha ? static_cast<float>(alpha) * (1.0f - t_uncertainty) : static_cast<float>(alpha);
        tau_r = row_temperature(t_discrimination);
        inv_tau = 1.0f / tau_r;
      };
      const bool tempered_in_pass_a = distilled && (has_stats || !dynamic_tau);
      if (distilled && has_stats) {
        t_uncertainty = stats_ptr[stats_stride * teacher];
        t_discrimination = stats_ptr[stats_stride * teacher + 1];
      }
      if (tempered_in_pass_a) set_temperature();

      // Pass A: student statistics, the ring copy, the teacher's statistics, and the tempered sums when
      // tau_r is already known. offset: a constant taken out of t - z in the KL's cross term (rounding).
      RowStats zs, ts;
      TemperedSum zq, tp;
      float offset = 0.0f;
      // a top-k record: its tail mass needs sum_j exp((z_j - max) / tau_rec) at the temperature the loss
      // will give this row as a teacher, tau_rec from the row's own d (known after pass A) or fixed; a dense
      // record with four stats columns: its log-normaliser, the same sum over the row as stored (the ring's
      // block read back, rounded to the ring's dtype), log_norm = max / tau_rec + log(sum)
      const bool topk_slot = record_topk && slot >= 0;
      const bool dense_log_norm_slot = record_log_norm && slot >= 0;
      const bool record_sum_slot = topk_slot || dense_log_norm_slot;
      auto recorded_block = [&](const float* z, int64_t start, int64_t n) {
        return dense_log_norm_slot ? load_block(*ring_rows, slot, start, n, scratch.stored.data()) : z;
      };
      const bool record_sum_in_pass_a = record_sum_slot && !dynamic_tau;
      const float inv_tau_record = dynamic_tau ? 1.0f : 1.0f / static_cast<float>(tau);  // fixed tau; else set after pass A
      TemperedSum record_sum;
      if (topk_slot) scratch.selector.count = 0;
      for (int64_t start = 0; start < vocab; start += block) {
        const int64_t n = std::min(block, vocab - start);
        const float* z = load_student_block(logits, row, start, n, scratch.z.data(), cap);
        if (record_rows && slot >= 0) store_block(z, n, *ring_rows, slot, start);
        const float z_block_max = block_max(z, n);
        zs.add_block(z, n, z_block_max);
        if (topk_slot) scratch.selector.add_block(z, n, start);
        if (record_sum_in_pass_a) {
          const float* recorded = recorded_block(z, start, n);
          record_sum.add_block(recorded, n, recorded == z ? z_block_max : block_max(recorded, n), inv_tau_record);
        }
        if (top_k_teacher) {
          zq.add_block(z, n, z_block_max, inv_tau);
        } else if (dense_teacher) {
          const float* t = load_block(*teacher_rows, teacher, start, n, scratch.t.data());
          const float t_block_max = block_max(t, n);
          if (!has_stats) ts.add_block(t, n, t_block_max);
          if (tempered_in_pass_a) {
            if (start == 0) offset = finite_or_zero(t_block_max - z_block_max);
            zq.add_block(z, n, z_block_max, inv_tau);
            tp.add_teacher_block(t, z, n, t_block_max, inv_tau, offset);
          }
        }
      }
      student[row][0] = zs.uncertainty(inv_log_v);
      student[row][1] = zs.discrimination();
      if (slot >= 0) {
        ring_stats_ptr[ring_stats_stride * slot] = student[row][0];
        ring_stats_ptr[ring_stats_stride * slot + 1] = student[row][1];
      }
      // tau_rec of a dynamic temperature: 1 + (tau - 1) d, the row's own d (what the loss computes from
      // the ring's stats when this row teaches); its sum rides in pass C, or has its own pass without one
      const float tau_rec = row_temperature(student[row][1]);
      const float inv_tau_rec = dynamic_tau ? 1.0f / tau_rec : inv_tau_record;
      const bool record_sum_in_pass_c = record_sum_slot && dynamic_tau && compute_grad;
      // at the row's maximum (a stored block's entries exceed it by at most its rounding: no overflow)
      if (record_sum_slot && dynamic_tau) record_sum.max = zs.max;
      if (record_sum_slot && dynamic_tau && !compute_grad) {
        for (int64_t start = 0; start < vocab; start += block) {
          const int64_t n = std::min(block, vocab - start);
          const float* recorded = dense_log_norm_slot ? recorded_block(nullptr, start, n)
                                                      : load_student_block(logits, row, start, n, scratch.z.data(), cap);
          record_sum.add_block(recorded, n, zs.max, inv_tau_rec);
        }
      }
      if (dense_teacher && !has_stats) {
        t_uncertainty = ts.uncertainty(inv_log_v);
        t_discrimination = ts.discrimination();
        set_temperature();
      }

      // Pass B: the tempered sums, now that tau_r is known (maxima known: no rescaling)
      if (dense_teacher && !tempered_in_pass_a) {
        zq.max = zs.max;
        tp.max = ts.max;
        offset = finite_or_zero(ts.max - zs.max);
        for (int64_t start = 0; start < vocab; start += block) {
          const int64_t n = std::min(block, vocab - start);
          const float* z = load_student_block(logits, row, start, n, scratch.z.data(), cap);
          const float* t = load_block(*teacher_rows, teacher, start, n, scratch.t.data());
          zq.add_block(z, n, zs.max, inv_tau);
          tp.add_teacher_block(t, z, n, ts.max, inv_tau, offset);
        }
      }

      float ce = 0.0f;
      float label_logit = 0.0f;
      float label_grad = 0.0f;  // d ce / d z_y = p_y - 1, exact for the argmax: -rest / (1 + rest)
      if (valid) {
        if (label_in_range) {
          label_logit = load_student_element(logits, row, label, cap);
          ce = (zs.max - label_logit) + std::log1p(zs.rest);
          label_grad = label_logit == zs.max ? -zs.rest / (1.0f + zs.rest)
                                             : std::exp(label_logit - zs.max) / (1.0f + zs.rest) - 1.0f;
        } else {
          ce = std::numeric_limits<float>::quiet_NaN();  // reachable only with validate=False
        }
      }
      const float ce_coef = valid && label_in_range ? ce_scale : 0.0f;

      // KL(P || Q) = sum_j P_j (log P_j - log Q_j) with log P_j = (t_j - t_max) / tau_r - log T,
      // log Q_j = (z_j - z_max) / tau_r - log Z; sum_j P_j (t_j - z_j) = weighted / T + offset gives
      // KL = (weighted / T + offset - (t_max - z_max)) / tau_r - log T + log Z.
      float kl = 0.0f, log_t_sum = 0.0f, tail = 0.0f, q_tail = 1.0f;
      const float log_z_sum = distilled ? std::log(zq.sum) : 0.0f;
      if (dense_teacher) {
        log_t_sum = std::log(tp.sum);
        kl = (tp.weighted / tp.sum + offset - (tp.max - zq.max)) * inv_tau - log_t_sum + log_z_sum;
      } else if (top_k_teacher) {
        // P_hat = softmax(t_k / tau_r) on the support; P_j = (1 - tail) P_hat_j, the tail mass as one
        // bucket against Q's mass outside the support
        const int64_t* support = support_ptr + teacher * support_stride;
        float* support_t = scratch.support_t.data();
        float* support_z = scratch.support_z.data();
        const float* teacher_k = load_block(*teacher_rows, teacher, 0, top_k, support_t);
        if (teacher_k != support_t) std::memcpy(support_t, teacher_k, top_k * sizeof(float));
        float* support_derivative = cap > 0.0f ? scratch.support_derivative.data() : nullptr;
        for (int64_t j = 0; j < top_k; ++j) {
          support_z[j] = load_student_element(logits, row, support[j], cap, support_derivative ? support_derivative + j : nullptr);
        }
        tp.max = top_k ? block_max(support_t, top_k) : kNegInf;
        for (int64_t j = 0; j < top_k; ++j) tp.sum += std::exp((support_t[j] - tp.max) * inv_tau);
        tail = tail_ptr != nullptr ? tail_ptr[teacher] : 0.0f;
        log_t_sum = std::log(tp.sum) - std::log1p(-tail);
        float q_support = 0.0f;
        for (int64_t j = 0; j < top_k; ++j) {
          const float log_p = (support_t[j] - tp.max) * inv_tau - log_t_sum;
          const float log_q = (support_z[j] - zs.max) * inv_tau - log_z_sum;
          kl += std::exp(log_p) * (log_p - log_q);
          q_support += std::exp(log_q);
        }
        q_tail = std::fmax(1.0f - q_support, kTailFloor);
        if (tail > 0.0f) kl += tail * (std::log(tail) - std::log(q_tail));
      }

      // Pass C: grad = ce_coef (softmax(z) - onehot(y)) + distill_scale alpha_r tau_r (Q - P), written once
      if (compute_grad) {
        const float kl_coef = distilled ? distill_scale * alpha_r * tau_r : 0.0f;
        const float inv_q_total = std::exp(-log_z_sum), inv_p_total = std::exp(-log_t_sum);
        // off a top-k support the target is the tail spread like Q: Q (1 - tail / q_tail)
        GradientWeights weights{zs.max, tp.max, inv_tau, ce_coef / (1.0f + zs.rest),
                                kl_coef * inv_q_total * (top_k_teacher ? 1.0f - tail / q_tail : 1.0f), kl_coef * inv_p_total};
        // the label's entry, computed whole (the vector formula would cancel for confident rows)
        auto label_entry = [&](const float* t_block, int64_t start) {
          float value = ce_coef * label_grad;
          if (distilled) value += weights.q_weight * std::exp((label_logit - zs.max) * inv_tau);
          if (dense_teacher) value -= weights.p_weight * std::exp((t_block[label - start] - tp.max) * inv_tau);
          return value;
        };
        for (int64_t start = 0; start < vocab; start += block) {
          const int64_t n = std::min(block, vocab - start);
          float* derivative = cap > 0.0f ? scratch.derivative.data() : nullptr;
          const float* z = load_student_block(logits, row, start, n, scratch.z.data(), cap, derivative);
          if (record_sum_in_pass_c) record_sum.add_block(recorded_block(z, start, n), n, zs.max, inv_tau_rec);
          const float* t = dense_teacher ? load_block(*teacher_rows, teacher, start, n, scratch.t.data()) : nullptr;
          float* out = scratch.out.data();
          if (dense_teacher) gradient_block<kDenseTeacher>(z, t, n, weights, out);
          else if (distilled) gradient_block<kStudentTempered>(z, t, n, weights, out);
          else gradient_block<kCrossEntropy>(z, t, n, weights, out);
          if (valid && label_in_range && label >= start && label < start + n) out[label - start] = label_entry(t, start);
          if (derivative != nullptr) {  // chain rule through the softcap: dL/dz = dL/dz' * dz'/dz
            for_each_vector(n, [&](int64_t j, int64_t count) {
              (load(out + j, count, 0.0f) * load(derivative + j, count, 0.0f)).store(out + j, count);
            });
          }
          store_block(out, n, grad, row, start);
        }
        if (top_k_teacher) {  // the support rewritten whole: ce part + kl_coef (Q_j - P_j)
          const int64_t* support = support_ptr + teacher * support_stride;
          const float inv_z_total = 1.0f / (1.0f + zs.rest);
          for (int64_t j = 0; j < top_k; ++j) {
            const int64_t id = support[j];
            const float z_id = scratch.support_z[j];
            const float ce_part = id == label ? ce_coef * label_grad : ce_coef * std::exp(z_id - zs.max) * inv_z_total;
            const float q = std::exp((z_id - zs.max) * inv_tau) * inv_q_total;
            const float p = std::exp((scratch.support_t[j] - tp.max) * inv_tau) * inv_p_total;
            const float chain = cap > 0.0f ? scratch.support_derivative[j] : 1.0f;
            store_element((ce_part + kl_coef * (q - p)) * chain, grad, row, id);
          }
        }
      }

      if (topk_slot) {  // values rounded once to the ring's dtype, ids, m = 1 - sum_topk softmax(z / tau_rec)
        float* values = scratch.record_values.data();
        int64_t* ids = scratch.record_ids.data();
        scratch.selector.finish(values, ids);
        store_block(values, record_k, *record_topk_values, slot, 0);
        std::memcpy(record_support_ptr + slot * record_support_stride, ids, record_k * sizeof(int64_t));
        float kept = 0.0f;
        for (int64_t j = 0; j < record_k; ++j) kept += std::exp((values[j] - record_sum.max) * inv_tau_rec);
        const float tail_mass = 1.0f - kept / record_sum.sum;
        record_tail_ptr[slot] = tail_mass != tail_mass ? tail_mass : std::fmin(std::fmax(tail_mass, 0.0f), static_cast<float>(1.0 - 1e-6));
      }

      if (dense_log_norm_slot) {
        ring_stats_ptr[ring_stats_stride * slot + 2] = tau_rec;
        ring_stats_ptr[ring_stats_stride * slot + 3] = record_sum.max * inv_tau_rec + std::log(record_sum.sum);
      }

      terms[row][0] = ce;
      terms[row][1] = kl;
      terms[row][2] = distilled ? alpha_r : 0.0f;
      terms[row][3] = distilled ? tau_r : 0.0f;
      terms[row][4] = distilled ? t_uncertainty : 0.0f;
    }
  }
}

// The vector width this file was compiled for (8: AVX2, 16: AVX-512, 1 lane per float otherwise).
int64_t vector_lanes() { return kLanes; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fused_rows", &fused_rows, "Fused DynSDPB loss rows on the CPU (see dynsdpb_kernels/contract.py)");
  m.def("vector_lanes", &vector_lanes, "float32 lanes per vector of the build (8 for AVX2, 16 for AVX-512)");
}
