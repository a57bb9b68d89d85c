// Per-element maths of memory_address, shared by the CPU and CUDA kernels.
//
// The op (see memory_address.cpp for the schema and defect_fast/ops/reference.py for the
// definition), per query row b, with e = kNormEps:
//   1. s_n   = <z_b / max(|z_b|, e), m_n / max(|m_n|, e)> / temperature
//   2. w     = softmax_n(s)
//   3. w'_n  = relu(w_n - t) * w_n / (|w_n - t| + kShrinkEps)       (t = 0: w' = w)
//   4. w''   = w' / max(||w'||_p, e)
//   5. zhat  = sum_n w''_n m_n
// Everything here is a scalar function of the accumulation type (float or double), so it
// compiles with the host compiler and with nvcc alike. Only <cmath> and macros.h.
#pragma once

#include <cmath>

#include "common/macros.h"

namespace defect_fast {
namespace memory_address {

// NB: the same values as reference.NORM_EPS and reference.SHRINK_EPS.
constexpr double kNormEps = 1e-12;
constexpr double kShrinkEps = 1e-12;

// 1 / max(norm, kNormEps): the factor that normalises a row (F.normalize's clamp).
template <typename acc_t>
DF_HOST_DEVICE DF_INLINE acc_t inv_clamped_norm(acc_t norm) {
  const acc_t eps = static_cast<acc_t>(kNormEps);
  return acc_t(1) / (norm > eps ? norm : eps);
}

// Whether the gradient flows through max(norm, eps) into the norm. NB: torch's clamp_min
// passes the gradient where norm >= eps, so the same comparison is used here.
template <typename acc_t>
DF_HOST_DEVICE DF_INLINE bool norm_passes_grad(acc_t norm) {
  return norm >= static_cast<acc_t>(kNormEps);
}

// NB: the two functions below compute both sides and then select (no early return), so that
// CPU loops over them vectorise; the discarded side may be inf or NaN, never the result.

// Hard shrinkage w' = relu(w - t) * w / (|w - t| + eps) for t > 0 (Eq. 3 of CMA-AE).
// Evaluated in the reference's order ((relu(d) * w) / (d + eps)) so that float results agree.
template <typename acc_t>
DF_HOST_DEVICE DF_INLINE acc_t shrink(acc_t w, acc_t t) {
  const acc_t d = w - t;
  const acc_t kept = d * w / (d + static_cast<acc_t>(kShrinkEps));
  // !(d <= 0), not d > 0: a NaN weight (a NaN or inf in z or the memory) stays NaN, as in the
  // reference, instead of becoming a zero weight that hides it from the loss's finite check
  return !(d <= acc_t(0)) ? kept : acc_t(0);
}

// d shrink(w, t) / dw. Zero where w <= t (relu passes no gradient at 0, as in torch).
// For d = w - t > 0: (d (d + eps) + w eps) / (d + eps)^2, the exact derivative written without
// the cancellation of the product-rule form w/(d+eps) + d/(d+eps) - d w/(d+eps)^2.
template <typename acc_t>
DF_HOST_DEVICE DF_INLINE acc_t shrink_grad(acc_t w, acc_t t) {
  const acc_t eps = static_cast<acc_t>(kShrinkEps);
  const acc_t d = w - t;
  const acc_t den = d + eps;
  const acc_t grad = (d * den + w * eps) / (den * den);
  return !(d <= acc_t(0)) ? grad : acc_t(0);  // NaN stays NaN (see shrink)
}

// Contribution of one renormalised weight to ||w'||_p^p (w' >= 0, so |w'| = w').
template <typename acc_t>
DF_HOST_DEVICE DF_INLINE acc_t pnorm_term(acc_t wprime, int p) {
  return p == 1 ? wprime : wprime * wprime;
}

// ||w'||_p from the accumulated sum of pnorm_term.
template <typename acc_t>
DF_HOST_DEVICE DF_INLINE acc_t pnorm_finish(acc_t acc, int p) {
  return p == 1 ? acc : static_cast<acc_t>(sqrt(acc));
}

// Backward of step 4 for one element.
//   g2:     dL/dw''_n (both outputs' gradients already summed)
//   w2:     w''_n
//   dot:    sum_k g2_k w''_k over the row
//   inv:    1 / max(||w'||_p, eps)
//   passes: norm_passes_grad(||w'||_p)
// Returns dL/dw'_n = (g2 - dot * d||w'||_p/dw'_n * ||w'||_p) / ||w'||_p, where
// d||w'||_1/dw'_n = sign(w'_n) (0 at 0, as torch's abs) and d||w'||_2/dw'_n = w''_n.
// NB: where the clamp holds (||w'||_p < eps, e.g. every weight shrunk to 0) only g2 * inv
// remains; the reference's p=2 path gives NaN there (sqrt'(0) * 0), this gives the limit.
template <typename acc_t>
DF_HOST_DEVICE DF_INLINE acc_t renorm_grad(acc_t g2, acc_t w2, acc_t dot, acc_t inv, int p, bool passes) {
  const acc_t dn = p == 1 ? (w2 > acc_t(0) ? acc_t(1) : acc_t(0)) : w2;
  return (g2 - (passes ? dot : acc_t(0)) * dn) * inv;
}

}  // namespace memory_address
}  // namespace defect_fast
