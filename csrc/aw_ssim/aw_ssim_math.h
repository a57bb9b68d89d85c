// Per-pixel math of AW-SSIM, shared by the CPU and CUDA kernels.
//
// The definition is defect_fast/ops/reference.py::aw_ssim. Per sample b and channel, with the
// separable Gaussian window g (one sigma per sample) and valid filtering "*":
//   mx = g*x, my = g*y, sxx = g*(x^2), syy = g*(y^2), sxy = g*(xy)          (the five statistics)
//   vx = sxx - mx^2, vy = syy - my^2, cv = sxy - mx my
//   sdx = sqrt(max(vx, 0) + VAR_EPS), sdy likewise
//   l = (2 mx my + C1) / (mx^2 + my^2 + C1)
//   c = (2 sdx sdy + C2) / (vx + vy + C2)
//   s = (cv + C3) / (sdx sdy + C3)
//   index = alpha l + beta c + gamma s                                         (combine "sum")
//         = P(l, alpha) P(c, beta) P(s, gamma),  P(v, e) = sign(v)|v|^e        (combine "product")
//
// Besides the index, aw_ssim_point() returns its partial derivatives with respect to the five
// statistics. The gradient with respect to an input pixel is then a second (adjoint) filtering
// pass over those partials, weighted by the upstream gradient:
//   dL/dx = g (*) (A_mx) + 2 x g (*) (A_sxx) + y g (*) (A_sxy)
//   dL/dy = g (*) (A_my) + 2 y g (*) (A_syy) + x g (*) (A_sxy)
// with A_k = dL/dindex * dindex/dk and (*) the adjoint of valid filtering (a full correlation with
// the flipped window).
//
// Only <cmath> and macros.h: this header is compiled by the host compiler and by nvcc.
#pragma once

#include <cmath>

#include "common/macros.h"

namespace defect_fast {
namespace aw_ssim {

// Combination modes. The integer values are part of the op schema (argument `combine`).
enum Combine : int {
  kSum = 0,      // alpha l + beta c + gamma s
  kProduct = 1,  // sign-preserving l^alpha c^beta s^gamma
};

// Kernel specialisations of the combination (template argument of the kernels).
enum Mode : int {
  kModeSum = 0,
  kModeProduct = 1,      // general exponents (one pow per factor)
  kModeProductOnes = 2,  // alpha = beta = gamma = 1: standard SSIM, no pow
};

// Number of statistics / partial-derivative planes: mx, my, sxx, syy, sxy.
constexpr int kStats = 5;

// NB: the constants are those of the reference: C1 = (0.01 L)^2, C2 = (0.03 L)^2, C3 = C2 / 2,
// VAR_EPS = (1e-4 L)^2.
template <typename acc_t>
struct Params {
  acc_t c1, c2, c3, var_eps;
  acc_t alpha, beta, gamma;
};

template <typename acc_t>
DF_HOST_DEVICE DF_INLINE Params<acc_t> make_params(double alpha, double beta, double gamma, double data_range) {
  Params<acc_t> p;
  const double c1 = (0.01 * data_range) * (0.01 * data_range);
  const double c2 = (0.03 * data_range) * (0.03 * data_range);
  p.c1 = static_cast<acc_t>(c1);
  p.c2 = static_cast<acc_t>(c2);
  p.c3 = static_cast<acc_t>(c2 / 2);
  p.var_eps = static_cast<acc_t>((1e-4 * data_range) * (1e-4 * data_range));
  p.alpha = static_cast<acc_t>(alpha);
  p.beta = static_cast<acc_t>(beta);
  p.gamma = static_cast<acc_t>(gamma);
  return p;
}

// Which kernel specialisation serves a (combine, alpha, beta, gamma).
DF_HOST_DEVICE DF_INLINE int select_mode(int combine, double alpha, double beta, double gamma) {
  if (combine == kSum) return kModeSum;
  return (alpha == 1.0 && beta == 1.0 && gamma == 1.0) ? kModeProductOnes : kModeProduct;
}

// Overloads so that float math stays in float on both compilers (::sqrtf is a builtin on the
// host and a device function under nvcc).
DF_HOST_DEVICE DF_INLINE float df_sqrt(float v) { return sqrtf(v); }
DF_HOST_DEVICE DF_INLINE double df_sqrt(double v) { return sqrt(v); }
DF_HOST_DEVICE DF_INLINE float df_pow(float v, float e) { return powf(v, e); }
DF_HOST_DEVICE DF_INLINE double df_pow(double v, double e) { return pow(v, e); }
DF_HOST_DEVICE DF_INLINE float df_exp(float v) { return expf(v); }
DF_HOST_DEVICE DF_INLINE double df_exp(double v) { return exp(v); }

// Un-normalised Gaussian tap k of a window of odd length K: exp(-(k - K/2)^2 / (2 sigma^2)).
// Callers normalise by the sum of the K taps (summed in index order, as the reference does).
DF_HOST_DEVICE DF_INLINE double gaussian_tap(int k, int window, double sigma) {
  const double o = static_cast<double>(k - window / 2);
  return exp(-(o * o) / (2.0 * sigma * sigma));
}

// Sign-preserving power P(v, e) = sign(v)|v|^e and its derivative e|v|^(e-1), computed with one
// pow: q = |v|^(e-1), P = v q, P' = e q.
// NB: at v == 0 both are returned as 0 (for e > 1 that is exact; for e < 1 the derivative is
// unbounded there and the reference's autograd gives NaN).
template <typename acc_t>
DF_HOST_DEVICE DF_INLINE void signed_pow(acc_t v, acc_t e, acc_t& value, acc_t& deriv) {
  const acc_t zero = acc_t(0);
  const acc_t a = v < zero ? -v : v;
  const acc_t q = a > zero ? df_pow(a, e - acc_t(1)) : zero;
  value = v * q;
  deriv = e * q;
}

DF_HOST_DEVICE DF_INLINE float df_abs(float v) { return fabsf(v); }
DF_HOST_DEVICE DF_INLINE double df_abs(double v) { return fabs(v); }
// 1 where v >= 0 (v = +0 included), 0 where v < 0, without a branch or a comparison (so that CPU
// loops over it vectorise). NB: v = -0.0 maps to 0, where torch's clamp_min mask gives 1.
DF_HOST_DEVICE DF_INLINE float step_nonneg(float v) { return 0.5f + 0.5f * copysignf(1.0f, v); }
DF_HOST_DEVICE DF_INLINE double step_nonneg(double v) { return 0.5 + 0.5 * copysign(1.0, v); }

// A product rounded on its own, never fused with the subtraction that follows it into a
// multiply-add. In E[v^2] - mu^2 over a flat window the two terms are equal after rounding and
// the difference is 0, as the reference computes it; a fused multiply-add subtracts the exact
// product instead and leaves the rounding error of E[v^2] (3e-8 for a grey level of 200/255 in
// float32), over VAR_EPS, so that the standard deviation doubled and the contrast and structure
// terms moved wherever flat ground met texture (map errors of 5e-3). nvcc fuses by default, so
// CUDA uses the intrinsics that it never fuses; the C++ build turns contraction off
// (-ffp-contract=off, defect_fast/ops/_native.py).
DF_HOST_DEVICE DF_INLINE float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
DF_HOST_DEVICE DF_INLINE double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

// A sum rounded on its own (never fused with a product into a multiply-add; see mul_rn).
DF_HOST_DEVICE DF_INLINE float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
DF_HOST_DEVICE DF_INLINE double add_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

// sum_k g[k] v(k) over a symmetric window of odd length K (g[k] == g[K-1-k]) in the CPU kernel's
// order (filter_sym in cpu/aw_ssim_cpu.cpp): the centre tap, then the pairs (k, K-1-k) two at a
// time, out + (g[a] (v(a) + v(K-1-a)) + g[a+1] (v(a+1) + v(K-2-a))), each operation rounded on
// its own. The CUDA forward filters with it, so that its five statistics are those of the CPU
// kernel: over a flat window E[v^2] - mu^2 is then 0 wherever it is 0 on the CPU (fused and
// reordered sums left up to 1.2e-7 there at data range 1, against a VAR_EPS of 1e-8, and 3.6e-7
// at data range 2, against 4e-8).
template <typename acc_t, typename Tap>
DF_HOST_DEVICE DF_INLINE acc_t sym_filter(const acc_t* g, int K, Tap v) {
  const int c = K / 2;
  acc_t out = mul_rn(g[c], v(c));
  int a = 0;
  for (; a + 1 < c; a += 2) {
    const acc_t pa = mul_rn(g[a], add_rn(v(a), v(K - 1 - a)));
    const acc_t pb = mul_rn(g[a + 1], add_rn(v(a + 1), v(K - 2 - a)));
    out = add_rn(out, add_rn(pa, pb));
  }
  if (a < c) out = add_rn(out, mul_rn(g[a], add_rn(v(a), v(K - 1 - a))));
  return out;
}

// N sums at once, each by the operations sym_filter does for it (the same results): v(k, t)
// writes the N values of tap k into t[0..N-1], so that each tap is read once for all N.
template <int N, typename acc_t, typename Tap>
DF_HOST_DEVICE DF_INLINE void sym_filter_n(const acc_t* g, int K, Tap v, acc_t* out) {
  const int c = K / 2;
  acc_t t0[N], t1[N], t2[N], t3[N];
  v(c, t0);
  for (int s = 0; s < N; ++s) out[s] = mul_rn(g[c], t0[s]);
  int a = 0;
  for (; a + 1 < c; a += 2) {
    v(a, t0);
    v(K - 1 - a, t1);
    v(a + 1, t2);
    v(K - 2 - a, t3);
    for (int s = 0; s < N; ++s) {
      const acc_t pa = mul_rn(g[a], add_rn(t0[s], t1[s]));
      const acc_t pb = mul_rn(g[a + 1], add_rn(t2[s], t3[s]));
      out[s] = add_rn(out[s], add_rn(pa, pb));
    }
  }
  if (a < c) {
    v(a, t0);
    v(K - 1 - a, t1);
    for (int s = 0; s < N; ++s) out[s] = add_rn(out[s], mul_rn(g[a], add_rn(t0[s], t1[s])));
  }
}

// Stage 1 of a pixel: the clamped variance max(E[v^2] - mu^2, 0) whose square root (after adding
// VAR_EPS) is the standard deviation.
template <typename acc_t>
DF_HOST_DEVICE DF_INLINE acc_t clamped_var(acc_t second_moment, acc_t mean) {
  const acc_t v = second_moment - mul_rn(mean, mean);
  return v * step_nonneg(v);
}

// Stage 2 of a pixel: the index from the five statistics and the standard deviations
// sdx = sqrt(clamped_var(sxx, mx) + VAR_EPS), sdy likewise; when SAVE, also
// d index / d(mx, my, sxx, syy, sxy) written to d0..d4. Branch-free apart from compile-time choices.
template <typename acc_t, int MODE, bool SAVE>
DF_HOST_DEVICE DF_INLINE acc_t aw_ssim_index(const Params<acc_t>& p, acc_t mx, acc_t my, acc_t sxx, acc_t syy, acc_t sxy,
                                             acc_t sdx, acc_t sdy, acc_t& d0, acc_t& d1, acc_t& d2, acc_t& d3,
                                             acc_t& d4) {
  const acc_t one = acc_t(1), two = acc_t(2);
  // 1. central moments and the three terms
  const acc_t vx = sxx - mul_rn(mx, mx);
  const acc_t vy = syy - mul_rn(my, my);
  const acc_t cv = sxy - mul_rn(mx, my);
  const acc_t dl = mx * mx + my * my + p.c1;
  const acc_t dc = vx + vy + p.c2;
  const acc_t sd = sdx * sdy;
  const acc_t ds = sd + p.c3;
  const acc_t inv_dl = one / dl, inv_dc = one / dc, inv_ds = one / ds;
  const acc_t l = (two * mx * my + p.c1) * inv_dl;
  const acc_t c = (two * sd + p.c2) * inv_dc;
  const acc_t s = (cv + p.c3) * inv_ds;
  // 2. the combination and its derivatives with respect to l, c, s
  acc_t index, fl, fc, fs;
  if (MODE == kModeSum) {
    index = p.alpha * l + p.beta * c + p.gamma * s;
    fl = p.alpha;
    fc = p.beta;
    fs = p.gamma;
  } else if (MODE == kModeProductOnes) {
    index = l * c * s;
    fl = c * s;
    fc = l * s;
    fs = l * c;
  } else {
    acc_t pl, pc, ps, dpl, dpc, dps;
    signed_pow(l, p.alpha, pl, dpl);
    signed_pow(c, p.beta, pc, dpc);
    signed_pow(s, p.gamma, ps, dps);
    index = pl * pc * ps;
    fl = dpl * pc * ps;
    fc = pl * dpc * ps;
    fs = pl * pc * dps;
  }
  if (SAVE) {
    // 3. chain rule down to the five statistics.
    //   dl/dmx = 2 (my - l mx) / dl                      dl/dmy = 2 (mx - l my) / dl
    //   dc/dvx = (kx sdy / sdx - c) / dc                 (d sdx / d vx = kx / (2 sdx), kx = [vx >= 0])
    //   ds/dvx = -s kx sdy / (2 sdx ds)                  ds/dcv = 1 / ds
    //   vx = sxx - mx^2, vy = syy - my^2, cv = sxy - mx my
    const acc_t inv_sd = one / sd;
    const acc_t rx = step_nonneg(vx) * sdy * sdy * inv_sd;  // kx sdy / sdx
    const acc_t ry = step_nonneg(vy) * sdx * sdx * inv_sd;  // ky sdx / sdy
    const acc_t half_s_ids = s * inv_ds / two;
    const acc_t f_vx = fc * (rx - c) * inv_dc - fs * half_s_ids * rx;
    const acc_t f_vy = fc * (ry - c) * inv_dc - fs * half_s_ids * ry;
    const acc_t f_cv = fs * inv_ds;
    const acc_t f_l = fl * two * inv_dl;
    d0 = f_l * (my - l * mx) - two * mx * f_vx - my * f_cv;
    d1 = f_l * (mx - l * my) - two * my * f_vy - mx * f_cv;
    d2 = f_vx;
    d3 = f_vy;
    d4 = f_cv;
  }
  return index;
}

// One output pixel from the five statistics (both stages): the index and, when SAVE, its five
// partial derivatives d[0..4].
template <typename acc_t, int MODE, bool SAVE>
DF_HOST_DEVICE DF_INLINE acc_t aw_ssim_point(const Params<acc_t>& p, acc_t mx, acc_t my, acc_t sxx, acc_t syy, acc_t sxy,
                                             acc_t* d) {
  const acc_t sdx = df_sqrt(clamped_var(sxx, mx) + p.var_eps);
  const acc_t sdy = df_sqrt(clamped_var(syy, my) + p.var_eps);
  acc_t unused;
  if (SAVE) return aw_ssim_index<acc_t, MODE, true>(p, mx, my, sxx, syy, sxy, sdx, sdy, d[0], d[1], d[2], d[3], d[4]);
  return aw_ssim_index<acc_t, MODE, false>(p, mx, my, sxx, syy, sxy, sdx, sdy, unused, unused, unused, unused, unused);
}

}  // namespace aw_ssim
}  // namespace defect_fast
