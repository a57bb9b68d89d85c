// CPU implementation of defect_fast::memory_address and its backward (float and double).
//
// The two GEMMs of the forward pass and the four of the backward pass go to at::mm (MKL or
// whatever BLAS torch was built with); everything between them is fused into one parallel
// pass over the query rows, each row (N values) staying in L1 while it is worked on.
//
// NB: the logits are computed as (z m^T)_bn / (|z_b| |m_n|) from the raw inputs instead of from
// normalised copies (as the reference does); the normalisation becomes two scalings inside the
// row pass and two rank-1 projections after the backward GEMMs. This saves materialising
// normalised copies of z and memory in both passes. The results agree to rounding.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>

#include "memory_address/memory_address.h"
#include "memory_address/memory_address_math.h"

namespace defect_fast {
namespace memory_address {

namespace {

// Independent accumulators per loop so that reductions vectorise without reassociation flags.
constexpr int64_t kLanes = 8;

// Rows per parallel_for task: about 16K elements of work each.
int64_t grain_rows(int64_t row_len) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, row_len));
}

template <typename T>
T lane_sum(const T* acc) {
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// sum_i a_i b_i.
template <typename T>
T dot(const T* __restrict a, const T* __restrict b, int64_t n) {
  T acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t k = 0; k < kLanes; ++k) {
      acc[k] += a[i + k] * b[i + k];
    }
  }
  T s = lane_sum(acc);
  for (; i < n; ++i) {
    s += a[i] * b[i];
  }
  return s;
}

// sum_i a_i.
template <typename T>
T sum_of(const T* __restrict a, int64_t n) {
  T acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t k = 0; k < kLanes; ++k) {
      acc[k] += a[i + k];
    }
  }
  T s = lane_sum(acc);
  for (; i < n; ++i) {
    s += a[i];
  }
  return s;
}

// max_i a_i (-inf for n = 0).
template <typename T>
T max_of(const T* __restrict a, int64_t n) {
  T mx[kLanes];
  for (int64_t k = 0; k < kLanes; ++k) {
    mx[k] = -std::numeric_limits<T>::infinity();
  }
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t k = 0; k < kLanes; ++k) {
      const T v = a[i + k];
      mx[k] = v > mx[k] ? v : mx[k];
    }
  }
  T r = mx[0];
  for (int64_t k = 1; k < kLanes; ++k) {
    r = mx[k] > r ? mx[k] : r;
  }
  for (; i < n; ++i) {
    r = a[i] > r ? a[i] : r;
  }
  return r;
}

// exp(x) for x <= 0, branch-free so that the loops calling it vectorise. Cephes' expf
// (range reduction by ln 2, degree-6 polynomial; within 2 ulp of std::exp).
// NB: results below FLT_MIN (x < -87.34) flush to 0, where torch may return a denormal.
inline float exp_nonpositive(float x) {
  const float lo = -87.3365447505f;  // log(FLT_MIN)
  const bool under = x < lo;
  x = under ? lo : x;
  float kf = x * 1.44269504088896341f + 12582912.0f;  // 1.5 * 2^23: rounds to an integer
  kf -= 12582912.0f;
  float r = x - kf * 0.693359375f;
  r = r - kf * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(kf) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return under ? 0.0f : y * scale;
}

inline double exp_nonpositive(double x) {
  return std::exp(x);
}

// |x_r| for each of `rows` rows of length `cols`.
template <typename scalar_t>
void row_norms(const scalar_t* x, int64_t rows, int64_t cols, scalar_t* out) {
  at::parallel_for(0, rows, grain_rows(cols), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* row = x + r * cols;
      out[r] = std::sqrt(dot(row, row, cols));
    }
  });
}

// Step 3 of the row pass on one row holding exp(s_n - max): softmax (saved to prow when
// kProbs) and shrinkage (when kShrink), in place. Plain elementwise loop: it vectorises.
template <bool kShrink, bool kProbs, typename scalar_t>
void softmax_shrink_row(scalar_t* __restrict row, scalar_t* __restrict prow, int64_t N, scalar_t inv_sum,
                        scalar_t t) {
  for (int64_t n = 0; n < N; ++n) {
    const scalar_t w = row[n] * inv_sum;
    if (kProbs) {
      prow[n] = w;
    }
    row[n] = kShrink ? shrink(w, t) : w;
  }
}

// Step 2 of the backward row pass, in place: dL/dw''_n -> dL/dw_n through the renormalisation
// and (when kShrink) the shrinkage. dot is sum_k dL/dw''_k w''_k, or 0 where the norm's clamp
// holds. Plain elementwise loop: it vectorises.
template <bool kShrink, int kP, typename scalar_t>
void renorm_shrink_grad_row(scalar_t* __restrict row, const scalar_t* __restrict w2, const scalar_t* __restrict pr,
                            int64_t N, scalar_t dot, scalar_t inv, scalar_t t) {
  for (int64_t n = 0; n < N; ++n) {
    scalar_t g = renorm_grad(row[n], w2[n], dot, inv, kP, true);
    if (kShrink) {
      g *= shrink_grad(pr[n], t);
    }
    row[n] = g;
  }
}

// Forward row pass. On entry weights[b, :] holds (z m^T)[b, :]; on exit w''[b, :].
//   probs:  [B, N] softmax, written when not null.
//   w_norm: [B] ||w'||_p before the clamp.
//   z_norm: [B] |z_b|; m_inv: [N] 1 / max(|m_n|, eps).
template <typename scalar_t>
void forward_rows(scalar_t* weights, scalar_t* probs, scalar_t* w_norm, const scalar_t* z_norm, const scalar_t* m_inv,
                  int64_t B, int64_t N, scalar_t t, scalar_t temperature, int p) {
  const bool do_shrink = t > scalar_t(0);
  at::parallel_for(0, B, grain_rows(N), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      scalar_t* __restrict row = weights + b * N;
      const scalar_t* __restrict minv = m_inv;
      const scalar_t zs = inv_clamped_norm(z_norm[b]) / temperature;

      // 1. Logits s_n = cos(z_b, m_n) / temperature, then their maximum (two loops: each
      // vectorises on its own).
      for (int64_t n = 0; n < N; ++n) {
        row[n] *= minv[n] * zs;
      }
      const scalar_t row_max = max_of(row, N);

      // 2. exp(s - max) and its sum.
      scalar_t acc[kLanes] = {};
      int64_t n = 0;
      for (; n + kLanes <= N; n += kLanes) {
        for (int64_t k = 0; k < kLanes; ++k) {
          const scalar_t e = exp_nonpositive(row[n + k] - row_max);
          row[n + k] = e;
          acc[k] += e;
        }
      }
      scalar_t sum = lane_sum(acc);
      for (; n < N; ++n) {
        const scalar_t e = exp_nonpositive(row[n] - row_max);
        row[n] = e;
        sum += e;
      }

      // 3. Softmax (saved for the backward pass), shrinkage and ||w'||_p.
      const scalar_t inv_sum = scalar_t(1) / sum;
      scalar_t* prow = probs != nullptr ? probs + b * N : nullptr;
      if (do_shrink) {
        prow != nullptr ? softmax_shrink_row<true, true>(row, prow, N, inv_sum, t)
                        : softmax_shrink_row<true, false>(row, prow, N, inv_sum, t);
      } else {
        prow != nullptr ? softmax_shrink_row<false, true>(row, prow, N, inv_sum, t)
                        : softmax_shrink_row<false, false>(row, prow, N, inv_sum, t);
      }
      const scalar_t norm = pnorm_finish(p == 1 ? sum_of(row, N) : dot(row, row, N), p);
      w_norm[b] = norm;

      // 4. Renormalise.
      const scalar_t inv = inv_clamped_norm(norm);
      for (n = 0; n < N; ++n) {
        row[n] *= inv;
      }
    }
  });
}

// Backward row pass. On entry g[b, :] holds (grad_z_hat memory^T)[b, :]; on exit
//   H[b, n] = dL/ds_bn / temperature / (max(|z_b|, eps) max(|m_n|, eps)),
// the matrix that the backward GEMMs multiply with memory and z.
//   gw: [B, N] grad_weights; weights: [B, N] w''; probs: [B, N] softmax; w_norm, z_norm: [B];
//   m_inv: [N] 1 / max(|m_n|, eps).
template <typename scalar_t>
void backward_rows(scalar_t* g, const scalar_t* gw, const scalar_t* weights, const scalar_t* probs,
                   const scalar_t* w_norm, const scalar_t* z_norm, const scalar_t* m_inv, int64_t B, int64_t N,
                   scalar_t t, scalar_t temperature, int p) {
  const bool do_shrink = t > scalar_t(0);
  at::parallel_for(0, B, grain_rows(N), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      scalar_t* __restrict row = g + b * N;
      const scalar_t* __restrict gwr = gw + b * N;
      const scalar_t* __restrict wr = weights + b * N;
      const scalar_t* __restrict pr = probs + b * N;
      const scalar_t* __restrict minv = m_inv;

      // 1. Total gradient of w'' (read-out plus grad_weights) and its dot product with w''.
      for (int64_t n = 0; n < N; ++n) {
        row[n] += gwr[n];
      }
      const scalar_t dot1 = dot(row, wr, N);

      // 2. Through the renormalisation and the shrinkage to dL/dw; its dot product with w.
      const scalar_t inv = inv_clamped_norm(w_norm[b]);
      const scalar_t d1 = norm_passes_grad(w_norm[b]) ? dot1 : scalar_t(0);
      if (do_shrink) {
        p == 1 ? renorm_shrink_grad_row<true, 1>(row, wr, pr, N, d1, inv, t)
               : renorm_shrink_grad_row<true, 2>(row, wr, pr, N, d1, inv, t);
      } else {
        p == 1 ? renorm_shrink_grad_row<false, 1>(row, wr, pr, N, d1, inv, t)
               : renorm_shrink_grad_row<false, 2>(row, wr, pr, N, d1, inv, t);
      }
      const scalar_t dot2 = dot(row, pr, N);

      // 3. Through the softmax, the temperature and the two normalisations.
      const scalar_t zs = inv_clamped_norm(z_norm[b]) / temperature;
      for (int64_t n = 0; n < N; ++n) {
        row[n] = pr[n] * (row[n] - dot2) * (minv[n] * zs);
      }
    }
  });
}

// g_r -= x_r <g_r, x_r> / max(|x_r|, eps)^2 where the norm passes the gradient: the backward
// of x -> x / max(|x|, eps) applied to g = (dL/dx_normalised) / max(|x|, eps).
template <typename scalar_t>
void project_rows(scalar_t* g, const scalar_t* x, const scalar_t* norms, int64_t rows, int64_t cols) {
  at::parallel_for(0, rows, grain_rows(cols), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      if (!norm_passes_grad(norms[r])) {
        continue;
      }
      scalar_t* __restrict gr = g + r * cols;
      const scalar_t* __restrict xr = x + r * cols;
      const scalar_t inv = inv_clamped_norm(norms[r]);
      const scalar_t coef = dot(gr, xr, cols) * inv * inv;
      for (int64_t c = 0; c < cols; ++c) {
        gr[c] -= coef * xr[c];
      }
    }
  });
}

template <typename scalar_t>
at::Tensor inverse_norms(const at::Tensor& norms) {
  at::Tensor inv = at::empty_like(norms);
  const scalar_t* src = norms.data_ptr<scalar_t>();
  scalar_t* dst = inv.data_ptr<scalar_t>();
  for (int64_t i = 0; i < norms.numel(); ++i) {
    dst[i] = inv_clamped_norm(src[i]);
  }
  return inv;
}

void check_cpu(const at::Tensor& z, const char* op) {
  TORCH_CHECK(z.device().is_cpu(), op, ": the CPU kernel got a tensor on ", z.device());
  TORCH_CHECK(z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble, op,
              ": the CPU kernel supports float32 and float64, got ", z.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
memory_address_cpu(
    const at::Tensor& z, const at::Tensor& memory, double shrink_threshold, double temperature, int64_t p,
    bool need_backward) {
  check_forward_args(z, memory, shrink_threshold, temperature, p);
  check_cpu(z, "memory_address");
  const at::Tensor zc = z.contiguous();
  const at::Tensor mc = memory.contiguous();
  const int64_t B = zc.size(0), N = mc.size(0), C = zc.size(1);
  const auto opts = zc.options();

  at::Tensor weights = at::empty({B, N}, opts);
  at::Tensor probs = need_backward ? at::empty({B, N}, opts) : at::empty({0}, opts);
  at::Tensor z_norm = at::empty({B}, opts);
  at::Tensor m_norm = at::empty({N}, opts);
  at::Tensor w_norm = at::empty({B}, opts);

  AT_DISPATCH_FLOATING_TYPES(zc.scalar_type(), "memory_address_cpu", [&] {
    row_norms(zc.data_ptr<scalar_t>(), B, C, z_norm.data_ptr<scalar_t>());
    row_norms(mc.data_ptr<scalar_t>(), N, C, m_norm.data_ptr<scalar_t>());
    if (B == 0 || N == 0) {
      w_norm.zero_();
      return;
    }
    const at::Tensor m_inv = inverse_norms<scalar_t>(m_norm);
    at::mm_out(weights, zc, mc.t());
    forward_rows(weights.data_ptr<scalar_t>(), need_backward ? probs.data_ptr<scalar_t>() : nullptr,
                 w_norm.data_ptr<scalar_t>(), z_norm.data_ptr<scalar_t>(), m_inv.data_ptr<scalar_t>(), B, N,
                 static_cast<scalar_t>(shrink_threshold), static_cast<scalar_t>(temperature), static_cast<int>(p));
  });
  at::Tensor z_hat = N == 0 ? at::zeros({B, C}, opts) : at::mm(weights, mc);
  // The CPU backward scales raw dot products: no normalised copies are saved.
  return {z_hat, weights, probs, z_norm, m_norm, w_norm, at::empty({0}, opts), at::empty({0}, opts)};
}

std::tuple<at::Tensor, at::Tensor> memory_address_backward_cpu(
    const at::Tensor& grad_z_hat, const at::Tensor& grad_weights, const at::Tensor& z, const at::Tensor& memory,
    const at::Tensor& weights, const at::Tensor& probs, const at::Tensor& z_norm, const at::Tensor& m_norm,
    const at::Tensor& w_norm, const at::Tensor& z_unit, const at::Tensor& m_unit, double shrink_threshold,
    double temperature, int64_t p, std::array<bool, 2> output_mask) {
  check_backward_args(grad_z_hat, grad_weights, z, memory, weights, probs, z_norm, m_norm, w_norm, z_unit, m_unit,
                      shrink_threshold, temperature, p);
  check_cpu(z, "memory_address_backward");
  const at::Tensor zc = z.contiguous();
  const at::Tensor mc = memory.contiguous();
  const at::Tensor gw = grad_weights.contiguous();
  const at::Tensor wc = weights.contiguous();
  const at::Tensor pc = probs.contiguous();
  const at::Tensor znc = z_norm.contiguous();
  const at::Tensor mnc = m_norm.contiguous();
  const at::Tensor wnc = w_norm.contiguous();
  const int64_t B = zc.size(0), N = mc.size(0), C = zc.size(1);
  const auto opts = zc.options();

  at::Tensor grad_z = output_mask[0] ? at::empty({B, C}, opts) : at::empty({0}, opts);
  at::Tensor grad_m = output_mask[1] ? at::empty({N, C}, opts) : at::empty({0}, opts);
  if (B == 0 || N == 0 || !(output_mask[0] || output_mask[1])) {
    grad_z.zero_();
    grad_m.zero_();
    return {grad_z, grad_m};
  }

  // 1. dL/dw'' from the read-out, then the fused row pass to H (in place).
  at::Tensor h = at::mm(grad_z_hat, mc.t());
  AT_DISPATCH_FLOATING_TYPES(zc.scalar_type(), "memory_address_backward_cpu", [&] {
    const at::Tensor m_inv = inverse_norms<scalar_t>(mnc);
    backward_rows(h.data_ptr<scalar_t>(), gw.data_ptr<scalar_t>(), wc.data_ptr<scalar_t>(), pc.data_ptr<scalar_t>(),
                  wnc.data_ptr<scalar_t>(), znc.data_ptr<scalar_t>(), m_inv.data_ptr<scalar_t>(), B, N,
                  static_cast<scalar_t>(shrink_threshold), static_cast<scalar_t>(temperature), static_cast<int>(p));
    // 2. grad_z = H memory, projected.
    if (output_mask[0]) {
      at::mm_out(grad_z, h, mc);
      project_rows(grad_z.data_ptr<scalar_t>(), zc.data_ptr<scalar_t>(), znc.data_ptr<scalar_t>(), B, C);
    }
    // 3. grad_memory = H^T z, projected, plus the read-out's w''^T grad_z_hat.
    if (output_mask[1]) {
      at::mm_out(grad_m, h.t(), zc);
      project_rows(grad_m.data_ptr<scalar_t>(), mc.data_ptr<scalar_t>(), mnc.data_ptr<scalar_t>(), N, C);
      grad_m.addmm_(wc.t(), grad_z_hat);
    }
  });
  return {grad_z, grad_m};
}

}  // namespace
}  // namespace memory_address
}  // namespace defect_fast

TORCH_LIBRARY_IMPL(defect_fast, CPU, m) {
  m.impl("memory_address", &defect_fast::memory_address::memory_address_cpu);
  m.impl("memory_address_backward", &defect_fast::memory_address::memory_address_backward_cpu);
}
