// C++ CPU kernel of the fused DynSDPB loss, with the Triton kernel's semantics (dynsdpb_kernels/rows.py).
//
// One row at a time per OpenMP thread. The row is read from memory once into float32 scratch buffers
// that stay in L2 (4 x V floats: 512 KB at V = 32000), the exponentials computed for the normalisers are
// kept there, and the gradient is written once: memory traffic is one read of the logits, one of the
// teacher row and one write of the gradient, as in the Triton kernel. The inner loops are plain
// element-wise code (a branch-free exp included) that the compiler vectorises at -O3 -march=native.

#include <torch/extension.h>

#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Q's mass off a top-k teacher's support is taken as at least this (rows.py): below it, 1 - sum_k Q_k is
// float32 rounding noise, and the tail bucket's gradient Q_j (1 - m / Q_tail) must stay bounded.
constexpr float kTailFloor = 1e-6f;

// exp(x) for x <= 0 (every caller passes x - max), about 1 ulp: x = n ln2 + r with |r| <= ln2 / 2,
// e^r by its degree-7 Taylor polynomial (truncation < 7e-9), 2^n through the exponent bits. Inputs below
// -87.3 flush to 0 (e^-87.3 is float32's smallest normal); NaN stays NaN.
inline float exp_nonpositive(float x) {
  // round to nearest by the 1.5 * 2^23 trick (vectorises everywhere, exact for |x log2 e| < 2^22)
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187045e-06f;
  float p = 1.98412698412698413e-04f;
  p = p * r + 1.38888888888888889e-03f;
  p = p * r + 8.33333333333333333e-03f;
  p = p * r + 4.16666666666666667e-02f;
  p = p * r + 1.66666666666666667e-01f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const bool in_range = x >= -87.3f;  // false for NaN too
  const int32_t exponent = (static_cast<int32_t>(in_range ? n : 0.0f) + 127) << 23;
  float scale;
  std::memcpy(&scale, &exponent, sizeof(scale));
  const float value = in_range ? p * scale : 0.0f;
  return x != x ? x : value;
}

void load_row(const at::Tensor& rows, int64_t row, int64_t vocab, float* out) {
  switch (rows.scalar_type()) {
    case at::kFloat: {
      const float* in = rows.data_ptr<float>() + row * rows.stride(0);
      std::memcpy(out, in, vocab * sizeof(float));
      break;
    }
    case at::kBFloat16: {
      const uint16_t* in = reinterpret_cast<const uint16_t*>(rows.data_ptr<at::BFloat16>()) + row * rows.stride(0);
      // bfloat16 is the upper half of a float32
      for (int64_t j = 0; j < vocab; ++j) {
        const uint32_t bits = static_cast<uint32_t>(in[j]) << 16;
        std::memcpy(out + j, &bits, sizeof(float));
      }
      break;
    }
    case at::kHalf: {
      const at::Half* in = rows.data_ptr<at::Half>() + row * rows.stride(0);
      for (int64_t j = 0; j < vocab; ++j) out[j] = static_cast<float>(in[j]);
      break;
    }
    case at::kDouble: {
      const double* in = rows.data_ptr<double>() + row * rows.stride(0);
      for (int64_t j = 0; j < vocab; ++j) out[j] = static_cast<float>(in[j]);
      break;
    }
    default:
      TORCH_CHECK(false, "dynsdpb_cpu: unsupported dtype ", rows.scalar_type());
  }
}

void store_row(const float* in, int64_t vocab, at::Tensor& rows, int64_t row) {
  switch (rows.scalar_type()) {
    case at::kFloat:
      std::memcpy(rows.data_ptr<float>() + row * rows.stride(0), in, vocab * sizeof(float));
      break;
    case at::kBFloat16: {
      uint16_t* out = reinterpret_cast<uint16_t*>(rows.data_ptr<at::BFloat16>()) + row * rows.stride(0);
      for (int64_t j = 0; j < vocab; ++j) {
        uint32_t bits;
        std::memcpy(&bits, in + j, sizeof(bits));
        // round to nearest even: add 0x7FFF plus the lowest kept bit, keep the upper 16 bits; NaN stays NaN
        const uint16_t rounded = static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
        out[j] = in[j] != in[j] ? static_cast<uint16_t>(0x7FC0) : rounded;
      }
      break;
    }
    case at::kHalf: {
      at::Half* out = rows.data_ptr<at::Half>() + row * rows.stride(0);
      for (int64_t j = 0; j < vocab; ++j) out[j] = static_cast<at::Half>(in[j]);
      break;
    }
    case at::kDouble: {
      double* out = rows.data_ptr<double>() + row * rows.stride(0);
      for (int64_t j = 0; j < vocab; ++j) out[j] = in[j];
      break;
    }
    default:
      TORCH_CHECK(false, "dynsdpb_cpu: unsupported dtype ", rows.scalar_type());
  }
}

float row_max(const float* x, int64_t vocab) {
  float max = kNegInf;
#pragma omp simd reduction(max : max)
  for (int64_t j = 0; j < vocab; ++j) max = x[j] > max ? x[j] : max;
  return max;
}

// Temperature-1 statistics of a row x, and e[j] = exp(x[j] - max) left in `weights`:
//   max, argmax, second (largest value apart from that one occurrence of the max),
//   rest = sum_{j != argmax} e[j]  (sum_j e[j] = 1 + rest, kept apart so 1 - p_max = rest / (1 + rest)
//          and log(1 + rest) = log1p(rest) stay exact for confident rows)
//   ent  = sum_j e[j] (x[j] - max)  (H = log1p(rest) - ent / (1 + rest))
struct RowStats {
  float max = kNegInf;
  int64_t argmax = 0;
  float second = kNegInf;
  float rest = 0.0f;
  float ent = 0.0f;

  float uncertainty(float inv_log_v) const {
    const float entropy = std::log1p(rest) - ent / (1.0f + rest);
    return clamp_unit(entropy * inv_log_v);
  }
  float discrimination() const { return clamp_unit((1.0f - std::exp(second - max)) / (1.0f + rest)); }
  static float clamp_unit(float x) { return x != x ? x : std::fmin(std::fmax(x, 0.0f), 1.0f); }
};

RowStats row_stats(const float* x, int64_t vocab, float* weights) {
  // A NaN is skipped by the max but turns its weight, and so rest and ent, into NaN.
  const float max = row_max(x, vocab);
  int64_t argmax = 0;
  while (argmax < vocab - 1 && x[argmax] != max) ++argmax;
  float second = kNegInf, rest = 0.0f, ent = 0.0f;
#pragma omp simd reduction(max : second) reduction(+ : rest, ent)
  for (int64_t j = 0; j < vocab; ++j) {
    const float shifted = x[j] - max;
    const float e = exp_nonpositive(shifted);
    weights[j] = e;
    // the max's own 1 is left out of rest by skipping that one occurrence
    const bool is_argmax = j == argmax;
    rest += is_argmax ? 0.0f : e;
    second = is_argmax || x[j] <= second ? second : x[j];
    ent += e * shifted;
  }
  RowStats stats;
  stats.max = max;
  stats.argmax = argmax;
  stats.second = second;
  stats.rest = rest;
  stats.ent = ent;
  return stats;
}

// sum_j exp((x[j] - max) / tau), the unnormalised softmax at tau left in `weights`.
float tempered_sum(const float* x, int64_t vocab, float max, float inv_tau, float* weights) {
  float total = 0.0f;
#pragma omp simd reduction(+ : total)
  for (int64_t j = 0; j < vocab; ++j) {
    const float e = exp_nonpositive((x[j] - max) * inv_tau);
    weights[j] = e;
    total += e;
  }
  return total;
}

}  // namespace

// Same arguments and results as triton_fused_rows (dynsdpb_kernels/rows.py); `grad` is the (N, V)
// output buffer (ignored unless compute_grad), row_terms (N, 5) and student_stats (N, 2) are filled.
// record_index / ring_rows / ring_stats are rows.py's RowRecord (all three or none); teacher_support (R, k)
// makes teacher_rows (R, k) top-k teachers whose KL is taken over their support.
void fused_rows(const at::Tensor& logits, const at::Tensor& labels, const c10::optional<at::Tensor>& teacher_rows,
                const c10::optional<at::Tensor>& teacher_index, const c10::optional<at::Tensor>& teacher_stats,
                const at::Tensor& grad_scale, double alpha, double tau, bool dynamic, int64_t ignore_index,
                bool compute_grad, at::Tensor grad, at::Tensor row_terms, at::Tensor student_stats,
                const c10::optional<at::Tensor>& record_index, c10::optional<at::Tensor> ring_rows,
                const c10::optional<at::Tensor>& ring_stats, const c10::optional<at::Tensor>& teacher_support,
                const c10::optional<at::Tensor>& teacher_tail) {
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
  const bool record = record_index.has_value() && ring_stats.has_value();  // rows too when ring_rows is given
  const bool record_rows = record && ring_rows.has_value();
  const int64_t* record_ptr = record ? record_index->data_ptr<int64_t>() : nullptr;
  float* ring_stats_ptr = record ? ring_stats->data_ptr<float>() : nullptr;
  const int64_t* support_ptr = teacher_support.has_value() ? teacher_support->data_ptr<int64_t>() : nullptr;
  const int64_t top_k = support_ptr != nullptr ? teacher_support->size(1) : 0;
  const int64_t support_stride = support_ptr != nullptr ? teacher_support->stride(0) : 0;
  const float* tail_ptr = teacher_tail.has_value() ? teacher_tail->data_ptr<float>() : nullptr;
  auto terms = row_terms.accessor<float, 2>();
  auto student = student_stats.accessor<float, 2>();

#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<float> z(vocab), z_exp(vocab), z_tau_exp(vocab), t(vocab), t_tau_exp(vocab), out(vocab);
#pragma omp for schedule(dynamic, 1)
    for (int64_t row = 0; row < n_rows; ++row) {
      const int64_t label = label_ptr[row];
      const bool valid = label != ignore_index;
      const bool label_in_range = label >= 0 && label < vocab;
      const int64_t teacher = has_teacher ? index_ptr[row] : -1;
      const bool distilled = valid && teacher >= 0;

      load_row(logits, row, vocab, z.data());
      const RowStats zs = row_stats(z.data(), vocab, z_exp.data());
      student[row][0] = zs.uncertainty(inv_log_v);
      student[row][1] = zs.discrimination();
      if (record && record_ptr[row] >= 0) {  // the fused ring write, from the row already in cache
        const int64_t slot = record_ptr[row];
        if (record_rows) store_row(z.data(), vocab, *ring_rows, slot);
        ring_stats_ptr[2 * slot] = student[row][0];
        ring_stats_ptr[2 * slot + 1] = student[row][1];
      }

      float ce = 0.0f;
      float label_grad = 0.0f;  // d ce / d z_y = p_y - 1, exact for the argmax: -rest / (1 + rest)
      if (valid) {
        if (label_in_range) {
          const float z_label = z[label];
          ce = (zs.max - z_label) + std::log1p(zs.rest);
          label_grad = z_label == zs.max ? -zs.rest / (1.0f + zs.rest)
                                         : exp_nonpositive(z_label - zs.max) / (1.0f + zs.rest) - 1.0f;
        } else {
          ce = std::numeric_limits<float>::quiet_NaN();  // reachable only with validate=False
        }
      }
      const float ce_coef = valid && label_in_range ? ce_scale : 0.0f;

      float alpha_r = 0.0f, tau_r = 0.0f, t_uncertainty = 0.0f, kl = 0.0f;
      float t_max = 0.0f, log_t_sum = 0.0f, log_z_sum = 0.0f, inv_tau = 1.0f, tail = 0.0f, q_tail = 1.0f;
      if (distilled && support_ptr != nullptr) {
        // top-k teacher: P_hat = softmax(t_k / tau_r) on its support; KL(P_hat || Q) over the support
        const int64_t* support = support_ptr + teacher * support_stride;
        load_row(*teacher_rows, teacher, top_k, t.data());
        t_uncertainty = stats_ptr[2 * teacher];
        const float t_discrimination = stats_ptr[2 * teacher + 1];
        alpha_r = dynamic ? static_cast<float>(alpha) * (1.0f - t_uncertainty) : static_cast<float>(alpha);
        tau_r = dynamic ? 1.0f + (static_cast<float>(tau) - 1.0f) * t_discrimination : static_cast<float>(tau);
        inv_tau = 1.0f / tau_r;
        t_max = row_max(t.data(), top_k);
        log_z_sum = std::log(tempered_sum(z.data(), vocab, zs.max, inv_tau, z_tau_exp.data()));
        log_t_sum = std::log(tempered_sum(t.data(), top_k, t_max, inv_tau, t_tau_exp.data()));
        // P_j = (1 - tail) P_hat_j on the support; the tail mass is one bucket against Q's mass outside it
        tail = tail_ptr != nullptr ? tail_ptr[teacher] : 0.0f;
        log_t_sum -= std::log1p(-tail);
        float q_support = 0.0f;
        for (int64_t j = 0; j < top_k; ++j) {
          const float log_p = (t[j] - t_max) * inv_tau - log_t_sum;
          const float log_q = (z[support[j]] - zs.max) * inv_tau - log_z_sum;
          kl += std::exp(log_p) * (log_p - log_q);
          q_support += std::exp(log_q);
        }
        q_tail = std::fmax(1.0f - q_support, kTailFloor);
        if (tail > 0.0f) kl += tail * (std::log(tail) - std::log(q_tail));
      } else if (distilled) {
        load_row(*teacher_rows, teacher, vocab, t.data());
        float t_discrimination;
        if (has_stats) {
          t_uncertainty = stats_ptr[2 * teacher];
          t_discrimination = stats_ptr[2 * teacher + 1];
          t_max = row_max(t.data(), vocab);
        } else {
          const RowStats ts = row_stats(t.data(), vocab, t_tau_exp.data());
          t_uncertainty = ts.uncertainty(inv_log_v);
          t_discrimination = ts.discrimination();
          t_max = ts.max;
        }
        alpha_r = dynamic ? static_cast<float>(alpha) * (1.0f - t_uncertainty) : static_cast<float>(alpha);
        tau_r = dynamic ? 1.0f + (static_cast<float>(tau) - 1.0f) * t_discrimination : static_cast<float>(tau);
        inv_tau = 1.0f / tau_r;
        log_z_sum = std::log(tempered_sum(z.data(), vocab, zs.max, inv_tau, z_tau_exp.data()));
        log_t_sum = std::log(tempered_sum(t.data(), vocab, t_max, inv_tau, t_tau_exp.data()));
        // KL(P || Q) = sum_j P_j (log P_j - log Q_j), log P_j = (t_j - t_max) / tau_r - log_t_sum,
        // log Q_j = (z_j - z_max) / tau_r - log_z_sum
        const float inv_t_total = std::exp(-log_t_sum);
#pragma omp simd reduction(+ : kl)
        for (int64_t j = 0; j < vocab; ++j) {
          const float log_p = (t[j] - t_max) * inv_tau - log_t_sum;
          const float log_q = (z[j] - zs.max) * inv_tau - log_z_sum;
          kl += t_tau_exp[j] * inv_t_total * (log_p - log_q);
        }
      }

      if (compute_grad) {
        // grad = ce_coef (softmax(z) - onehot(y)) + distill_scale alpha_r tau_r (Q - P)
        const float inv_z_total = 1.0f / (1.0f + zs.rest);
        for (int64_t j = 0; j < vocab; ++j) out[j] = ce_coef * (z_exp[j] * inv_z_total);
        if (valid && label_in_range) out[label] = ce_coef * label_grad;
        if (distilled) {
          const float kl_coef = distill_scale * alpha_r * tau_r;
          const float inv_q_total = std::exp(-log_z_sum);
          const float inv_p_total = std::exp(-log_t_sum);
          if (support_ptr != nullptr) {  // Q (1 - tail / q_tail) off the support; the support rewritten whole
            const int64_t* support = support_ptr + teacher * support_stride;
            const float tail_scale = 1.0f - tail / q_tail;
            for (int64_t j = 0; j < vocab; ++j) out[j] += kl_coef * z_tau_exp[j] * inv_q_total * tail_scale;
            for (int64_t j = 0; j < top_k; ++j) {
              const int64_t id = support[j];
              const float ce_part = id == label ? ce_coef * label_grad : ce_coef * (z_exp[id] * inv_z_total);
              out[id] = ce_part + kl_coef * (z_tau_exp[id] * inv_q_total - t_tau_exp[j] * inv_p_total);
            }
          } else {
            for (int64_t j = 0; j < vocab; ++j) out[j] += kl_coef * (z_tau_exp[j] * inv_q_total - t_tau_exp[j] * inv_p_total);
          }
        }
        store_row(out.data(), vocab, grad, row);
      }

      terms[row][0] = ce;
      terms[row][1] = kl;
      terms[row][2] = distilled ? alpha_r : 0.0f;
      terms[row][3] = distilled ? tau_r : 0.0f;
      terms[row][4] = distilled ? t_uncertainty : 0.0f;
    }
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fused_rows", &fused_rows, "Fused DynSDPB loss rows on the CPU (see dynsdpb_kernels/rows.py)");
}
