// CPU kernels of defect_fast::aw_ssim and defect_fast::aw_ssim_backward (float32 and float64;
// float16 / bfloat16 inputs are computed in float32).
//
// Work is split over the B*C image planes with at::parallel_for; each plane is processed row by
// row with a ring of K horizontally filtered rows, so the working set of one plane stays in the
// L1/L2 cache whatever the image size:
//   forward:  input row r -> 5 horizontal sums (ring slot r % K); once K rows are in the ring,
//             the vertical sums of output row r-K+1 give the 5 statistics, then the index, its
//             5 partial derivatives and the row's contribution to the score.
//   backward: partial-derivative row p (times the upstream gradient) -> horizontal adjoint
//             (full correlation with the flipped window, ring slot p % K); input row q gathers
//             the vertical adjoint of the ring rows q-K+1..q and applies the product rule of
//             the second moments. Without saved partials (the default on the CPU, see
//             defect_fast/ops/_aw_ssim.py) each plane's partials are recomputed into a
//             plane-sized buffer just before its backward.
// The score is summed per plane in double, in a fixed order, then over channels: the result does
// not depend on the number of threads.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <tuple>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

#include "aw_ssim/aw_ssim.h"
#include "aw_ssim/aw_ssim_math.h"

namespace defect_fast {
namespace aw_ssim {
namespace {

using at::Tensor;

#if defined(__GNUC__)
#define AW_ALWAYS_INLINE __attribute__((always_inline)) inline
#else
#define AW_ALWAYS_INLINE inline
#endif

// ---------------------------------------------------------------------------------------------
// Row primitives. They are always inlined into the plane kernels below, which are compiled twice
// on x86-64: for the baseline ISA and for AVX2+FMA (picked at run time), so the same loops
// vectorise to 4- or 8-wide float code.
// ---------------------------------------------------------------------------------------------

// out[j] = w * in[j]
template <typename T>
AW_ALWAYS_INLINE void scale_row(const T* __restrict in, T w, int64_t n, T* __restrict out) {
  for (int64_t j = 0; j < n; ++j) out[j] = w * in[j];
}

// out[j] += wa (a0[j] + a1[j]) + wb (b0[j] + b1[j]): two symmetric tap pairs in one pass.
template <typename T>
AW_ALWAYS_INLINE void add_pairs2(const T* __restrict a0, const T* __restrict a1, const T* __restrict b0,
                                 const T* __restrict b1, T wa, T wb, int64_t n, T* __restrict out) {
  for (int64_t j = 0; j < n; ++j) out[j] += wa * (a0[j] + a1[j]) + wb * (b0[j] + b1[j]);
}

// out[j] += wa (a0[j] + a1[j])
template <typename T>
AW_ALWAYS_INLINE void add_pair(const T* __restrict a0, const T* __restrict a1, T wa, int64_t n, T* __restrict out) {
  for (int64_t j = 0; j < n; ++j) out[j] += wa * (a0[j] + a1[j]);
}

// out[j] = sum_k g[k] src[k][j] for j in [0, n), for a symmetric window (g[k] == g[K-1-k], as
// every Gaussian window here is by construction): the centre tap, then the pairs (k, K-1-k) two
// at a time, so that each pass over `out` does four taps (fewer loads and stores than one pass
// per tap). src[k] may be shifted views of one row (horizontal pass) or K rows (vertical pass).
template <typename T>
AW_ALWAYS_INLINE void filter_sym(const T* const* src, const T* g, int K, int64_t n, T* __restrict out) {
  const int c = K / 2;
  scale_row(src[c], g[c], n, out);
  int a = 0;
  for (; a + 1 < c; a += 2) add_pairs2(src[a], src[K - 1 - a], src[a + 1], src[K - 2 - a], g[a], g[a + 1], n, out);
  if (a < c) add_pair(src[a], src[K - 1 - a], g[a], n, out);
}

// v[j] = sqrt(v[j] + eps), in place. NB: a plain loop over std::sqrt does not vectorise without
// -fno-math-errno, so x86-64 uses the SSE2 / AVX sqrt instructions directly. The AVX variants are
// separate (not inlined) functions: they may only be called from the AVX2 plane kernels.
#if defined(__GNUC__) && defined(__x86_64__)
#define AW_SSIM_X86 1
__attribute__((target("avx2,fma"))) void sqrt_row_avx2(float* v, float eps, int64_t n) {
  const __m256 e = _mm256_set1_ps(eps);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) _mm256_storeu_ps(v + j, _mm256_sqrt_ps(_mm256_add_ps(_mm256_loadu_ps(v + j), e)));
  for (; j < n; ++j) v[j] = std::sqrt(v[j] + eps);
}
__attribute__((target("avx2,fma"))) void sqrt_row_avx2(double* v, double eps, int64_t n) {
  const __m256d e = _mm256_set1_pd(eps);
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) _mm256_storeu_pd(v + j, _mm256_sqrt_pd(_mm256_add_pd(_mm256_loadu_pd(v + j), e)));
  for (; j < n; ++j) v[j] = std::sqrt(v[j] + eps);
}
AW_ALWAYS_INLINE void sqrt_row_base(float* v, float eps, int64_t n) {
  const __m128 e = _mm_set1_ps(eps);
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) _mm_storeu_ps(v + j, _mm_sqrt_ps(_mm_add_ps(_mm_loadu_ps(v + j), e)));
  for (; j < n; ++j) v[j] = std::sqrt(v[j] + eps);
}
AW_ALWAYS_INLINE void sqrt_row_base(double* v, double eps, int64_t n) {
  const __m128d e = _mm_set1_pd(eps);
  int64_t j = 0;
  for (; j + 2 <= n; j += 2) _mm_storeu_pd(v + j, _mm_sqrt_pd(_mm_add_pd(_mm_loadu_pd(v + j), e)));
  for (; j < n; ++j) v[j] = std::sqrt(v[j] + eps);
}
bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
#else
#define AW_SSIM_X86 0
template <typename T>
AW_ALWAYS_INLINE void sqrt_row_base(T* v, T eps, int64_t n) {
  for (int64_t j = 0; j < n; ++j) v[j] = std::sqrt(v[j] + eps);
}
bool cpu_has_avx2() { return false; }
#endif

// Whether the AVX2+FMA compilation of the plane kernels runs: when the CPU has it, unless the
// environment variable DEFECT_FAST_CPU_BASELINE is set to a non-empty value (the tests use it to
// exercise the baseline compilation too). Read once per op call.
bool use_avx2() {
  const char* env = std::getenv("DEFECT_FAST_CPU_BASELINE");
  return cpu_has_avx2() && (env == nullptr || env[0] == '\0');
}

template <typename T, bool AVX2>
AW_ALWAYS_INLINE void sqrt_row(T* v, T eps, int64_t n) {
#if AW_SSIM_X86
  if constexpr (AVX2) {
    sqrt_row_avx2(v, eps, n);
    return;
  }
#endif
  sqrt_row_base(v, eps, n);
}

// Sum of a row in double, four lanes (fixed order).
template <typename T>
AW_ALWAYS_INLINE double sum_row(const T* __restrict v, int64_t n) {
  double a0 = 0, a1 = 0, a2 = 0, a3 = 0;
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    a0 += static_cast<double>(v[j]);
    a1 += static_cast<double>(v[j + 1]);
    a2 += static_cast<double>(v[j + 2]);
    a3 += static_cast<double>(v[j + 3]);
  }
  for (; j < n; ++j) a0 += static_cast<double>(v[j]);
  return (a0 + a1) + (a2 + a3);
}

// out[j] = f_mu[j] + 2 u[j] f_sq[j] + v[j] f_cross[j]: the gradient with respect to u of the
// statistics mu_u, E[u^2], E[uv] given their adjoints.
template <typename T>
AW_ALWAYS_INLINE void product_rule_row(const T* __restrict f_mu, const T* __restrict f_sq, const T* __restrict f_cross,
                                       const T* __restrict u, const T* __restrict v, int64_t n, T* __restrict out) {
  for (int64_t j = 0; j < n; ++j) out[j] = f_mu[j] + T(2) * u[j] * f_sq[j] + v[j] * f_cross[j];
}

// Stage 1 over a row: out[j] = max(second[j] - mean[j]^2, 0).
template <typename T>
AW_ALWAYS_INLINE void clamped_var_row(const T* __restrict second, const T* __restrict mean, int64_t n, T* __restrict out) {
  for (int64_t j = 0; j < n; ++j) out[j] = clamped_var(second[j], mean[j]);
}

// Stage 2 over a row: the index and (SAVE) the partials d0..d4.
template <typename T, int MODE, bool SAVE>
AW_ALWAYS_INLINE void index_row(const Params<T>& p, const T* __restrict mx, const T* __restrict my, const T* __restrict sxx,
                                const T* __restrict syy, const T* __restrict sxy, const T* __restrict sdx,
                                const T* __restrict sdy, int64_t n, T* __restrict index, T* __restrict d0,
                                T* __restrict d1, T* __restrict d2, T* __restrict d3, T* __restrict d4) {
  const Params<T> q = p;
  for (int64_t j = 0; j < n; ++j) {
    T e0, e1, e2, e3, e4;
    index[j] = aw_ssim_index<T, MODE, SAVE>(q, mx[j], my[j], sxx[j], syy[j], sxy[j], sdx[j], sdy[j], e0, e1, e2, e3, e4);
    if (SAVE) {
      d0[j] = e0;
      d1[j] = e1;
      d2[j] = e2;
      d3[j] = e3;
      d4[j] = e4;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Plane kernels.
// ---------------------------------------------------------------------------------------------

// Forward over one plane.
//   x, y: [H, W]; g: [K]; map: [HO, WO] or null; part: [5, HO, WO] (used when SAVE).
//   ws: scratch of forward_workspace(W, K) elements.
// Returns the sum of the index over the plane.
inline int64_t forward_workspace(int64_t W, int K) {
  const int64_t WO = W - K + 1;
  return 3 * W + K * kStats * WO + 8 * WO;
}

template <typename T, int MODE, bool SAVE, bool AVX2>
AW_ALWAYS_INLINE double forward_plane_body(const T* __restrict x, const T* __restrict y, int64_t H, int64_t W, int K,
                                           const T* __restrict g, const Params<T>& p, T* __restrict map,
                                           T* __restrict part, T* __restrict ws, const T** src) {
  const int64_t HO = H - K + 1, WO = W - K + 1;
  T* prod = ws;                       // [3, W]: x^2, y^2, xy of the current input row
  T* ring = prod + 3 * W;             // [K, 5, WO]: horizontal sums of the last K input rows
  T* stat = ring + K * kStats * WO;   // [5, WO]: the statistics of one output row
  T* sdx = stat + kStats * WO;        // [WO] each: standard deviations of one output row
  T* sdy = sdx + WO;
  T* idx_buf = sdy + WO;              // [WO]: the index of one output row when no map is kept
  double total = 0.0;
  for (int64_t r = 0; r < H; ++r) {
    // 1. horizontal pass of input row r over the five statistics (ring slot r % K)
    const T* xr = x + r * W;
    const T* yr = y + r * W;
    for (int64_t j = 0; j < W; ++j) {
      prod[j] = xr[j] * xr[j];
      prod[W + j] = yr[j] * yr[j];
      prod[2 * W + j] = xr[j] * yr[j];
    }
    T* slot = ring + (r % K) * kStats * WO;
    const T* rows[kStats] = {xr, yr, prod, prod + W, prod + 2 * W};
    for (int s = 0; s < kStats; ++s) {
      for (int k = 0; k < K; ++k) src[k] = rows[s] + k;
      filter_sym(src, g, K, WO, slot + s * WO);
    }
    if (r < K - 1) continue;
    // 2. vertical pass: output row i uses input rows i..i+K-1
    const int64_t i = r - K + 1;
    for (int s = 0; s < kStats; ++s) {
      for (int k = 0; k < K; ++k) src[k] = ring + ((i + k) % K) * kStats * WO + s * WO;
      filter_sym(src, g, K, WO, stat + s * WO);
    }
    // 3. standard deviations, index and partials of output row i
    const T* mx = stat;
    const T* my = stat + WO;
    clamped_var_row(stat + 2 * WO, mx, WO, sdx);
    clamped_var_row(stat + 3 * WO, my, WO, sdy);
    sqrt_row<T, AVX2>(sdx, p.var_eps, WO);
    sqrt_row<T, AVX2>(sdy, p.var_eps, WO);
    T* index = map != nullptr ? map + i * WO : idx_buf;
    T* d = SAVE ? part + i * WO : nullptr;
    const int64_t ps = HO * WO;
    index_row<T, MODE, SAVE>(p, mx, my, stat + 2 * WO, stat + 3 * WO, stat + 4 * WO, sdx, sdy, WO, index, d,
                             SAVE ? d + ps : nullptr, SAVE ? d + 2 * ps : nullptr, SAVE ? d + 3 * ps : nullptr,
                             SAVE ? d + 4 * ps : nullptr);
    // 4. the row's share of the score
    total += sum_row(index, WO);
  }
  return total;
}

// Backward over one plane.
//   x, y: [H, W]; part: [5, HO, WO]; gmap: [HO, WO] or null; gs: d score / d index (the same for
//   all pixels of the plane); g: [K] (symmetric, so it is its own flip). Writes gx, gy: [H, W]
//   (each may be null: not needed; then its two statistics are not filtered).
//   ws: scratch of backward_workspace(W, K) elements, zero on entry where the padding and the
//   zero row lie (they are never written); src: scratch of K pointers.
inline int64_t backward_workspace(int64_t W, int K) {
  const int64_t padded = W + K - 1;  // WO + 2 (K - 1)
  return kStats * padded + K * kStats * W + kStats * W + W;
}

// Which of the five statistics the requested gradients need: mu_x, E[x^2] for x, mu_y, E[y^2]
// for y, E[xy] for both.
struct StatMask {
  bool use[kStats];
  StatMask(bool need_x, bool need_y) : use{need_x, need_y, need_x, need_y, need_x || need_y} {}
};

template <typename T, bool AVX2>
AW_ALWAYS_INLINE void backward_plane_body(const T* __restrict x, const T* __restrict y, const T* __restrict part,
                                          const T* __restrict gmap, T gs, int64_t H, int64_t W, int K,
                                          const T* __restrict g, T* __restrict gx, T* __restrict gy,
                                          T* __restrict ws, const T** src) {
  const StatMask mask(gx != nullptr, gy != nullptr);
  const int64_t HO = H - K + 1, WO = W - K + 1;
  const int64_t padded = W + K - 1;
  T* apad = ws;                        // [5, WO + 2(K-1)]: upstream-weighted partials, zero-padded
  T* ring = apad + kStats * padded;    // [K, 5, W]: horizontal adjoints of the last K partial rows
  T* f = ring + K * kStats * W;        // [5, W]: vertical adjoint of one input row
  const T* zero = f + kStats * W;      // [W]: zeros, standing for partial rows outside [0, HO)
  for (int64_t q = 0; q < H; ++q) {
    // 1. partial row p = q: weight by the upstream gradient, horizontal adjoint into ring slot q % K
    if (q < HO) {
      T* slot = ring + (q % K) * kStats * W;
      const T* gm = gmap != nullptr ? gmap + q * WO : nullptr;
      for (int s = 0; s < kStats; ++s) {
        if (!mask.use[s]) continue;
        T* a = apad + s * padded + (K - 1);
        const T* ps = part + s * HO * WO + q * WO;
        if (gm != nullptr) {
          for (int64_t j = 0; j < WO; ++j) a[j] = (gs + gm[j]) * ps[j];
        } else {
          scale_row(ps, gs, WO, a);
        }
        // full correlation: out[qj] = sum_b g[b] A[qj - b] = sum_t g[K-1-t] apad[qj + t]
        //                                                  = sum_t g[t] apad[qj + t] (g symmetric)
        for (int k = 0; k < K; ++k) src[k] = apad + s * padded + k;
        filter_sym(src, g, K, W, slot + s * W);
      }
    }
    // 2. vertical adjoint: input row q receives output rows p = q - a, a in [0, K), those with
    //    p outside [0, HO) being zero
    for (int s = 0; s < kStats; ++s) {
      if (!mask.use[s]) continue;
      for (int a = 0; a < K; ++a) {
        const int64_t p_row = q - a;
        src[a] = (p_row >= 0 && p_row < HO) ? ring + (p_row % K) * kStats * W + s * W : zero;
      }
      filter_sym(src, g, K, W, f + s * W);
    }
    // 3. product rule: E[x^2] -> 2x, E[xy] -> y (and symmetrically for y)
    const T* __restrict xr = x + q * W;
    const T* __restrict yr = y + q * W;
    if (gx != nullptr) product_rule_row(f, f + 2 * W, f + 4 * W, xr, yr, W, gx + q * W);
    if (gy != nullptr) product_rule_row(f + W, f + 3 * W, f + 4 * W, yr, xr, W, gy + q * W);
  }
}

// The two compilations of each plane kernel and the run-time choice between them.
template <typename T, int MODE, bool SAVE>
double forward_plane_generic(const T* x, const T* y, int64_t H, int64_t W, int K, const T* g, const Params<T>& p, T* map,
                             T* part, T* ws, const T** src) {
  return forward_plane_body<T, MODE, SAVE, false>(x, y, H, W, K, g, p, map, part, ws, src);
}
template <typename T>
void backward_plane_generic(const T* x, const T* y, const T* part, const T* gmap, T gs, int64_t H, int64_t W, int K,
                            const T* g, T* gx, T* gy, T* ws, const T** src) {
  backward_plane_body<T, false>(x, y, part, gmap, gs, H, W, K, g, gx, gy, ws, src);
}
#if AW_SSIM_X86
template <typename T, int MODE, bool SAVE>
__attribute__((target("avx2,fma"))) double forward_plane_avx2(const T* x, const T* y, int64_t H, int64_t W, int K,
                                                              const T* g, const Params<T>& p, T* map, T* part, T* ws,
                                                              const T** src) {
  return forward_plane_body<T, MODE, SAVE, true>(x, y, H, W, K, g, p, map, part, ws, src);
}
template <typename T>
__attribute__((target("avx2,fma"))) void backward_plane_avx2(const T* x, const T* y, const T* part, const T* gmap, T gs,
                                                             int64_t H, int64_t W, int K, const T* g, T* gx, T* gy,
                                                             T* ws, const T** src) {
  backward_plane_body<T, true>(x, y, part, gmap, gs, H, W, K, g, gx, gy, ws, src);
}
#endif

template <typename T, int MODE, bool SAVE>
double forward_plane(bool avx2, const T* x, const T* y, int64_t H, int64_t W, int K, const T* g, const Params<T>& p,
                     T* map, T* part, T* ws, const T** src) {
#if AW_SSIM_X86
  if (avx2) return forward_plane_avx2<T, MODE, SAVE>(x, y, H, W, K, g, p, map, part, ws, src);
#else
  (void)avx2;
#endif
  return forward_plane_generic<T, MODE, SAVE>(x, y, H, W, K, g, p, map, part, ws, src);
}

template <typename T>
void backward_plane(bool avx2, const T* x, const T* y, const T* part, const T* gmap, T gs, int64_t H, int64_t W, int K,
                    const T* g, T* gx, T* gy, T* ws, const T** src) {
#if AW_SSIM_X86
  if (avx2) return backward_plane_avx2<T>(x, y, part, gmap, gs, H, W, K, g, gx, gy, ws, src);
#else
  (void)avx2;
#endif
  backward_plane_generic<T>(x, y, part, gmap, gs, H, W, K, g, gx, gy, ws, src);
}

// Normalised windows [B, K]: taps in double, normalised by their sum in index order (as the
// reference), rounded to T. NB: exactly symmetric (the tap of offset -o is the tap of +o), which
// filter_sym relies on.
template <typename T>
std::vector<T> make_windows(const Tensor& sigma, int K) {
  const Tensor s = sigma.to(at::kDouble).contiguous();
  const double* sp = s.data_ptr<double>();
  const int64_t B = s.numel();
  std::vector<T> out(static_cast<size_t>(B * K));
  std::vector<double> taps(K);
  for (int64_t b = 0; b < B; ++b) {
    double total = 0.0;
    for (int k = 0; k < K; ++k) {
      taps[k] = k <= K / 2 ? gaussian_tap(k, K, sp[b]) : taps[K - 1 - k];
      total += taps[k];
    }
    for (int k = 0; k < K; ++k) out[b * K + k] = static_cast<T>(taps[k] / total);
  }
  return out;
}

void check_inputs(const char* op, const Tensor& x, const Tensor& y, const Tensor& sigma, int64_t window, int64_t combine) {
  TORCH_CHECK(x.device().is_cpu() && y.device().is_cpu() && sigma.device().is_cpu(), op,
              ": the CPU kernel got tensors on ", x.device(), ", ", y.device(), ", ", sigma.device());
  check_common(op, x, y, sigma, window, combine);
  const Tensor s = sigma.to(at::kDouble).contiguous();
  const double* sp = s.data_ptr<double>();
  for (int64_t b = 0; b < s.numel(); ++b) {
    TORCH_CHECK(std::isfinite(sp[b]) && sp[b] > 0, op, ": sigma must be finite and > 0, got sigma[", b, "] = ", sp[b]);
  }
}

// Planes per parallel task at least: small images are grouped so that a task does enough work
// to pay for waking a thread (~64K pixels); 128x128 patches go four planes at a time.
int64_t plane_grain(int64_t H, int64_t W) { return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, H * W)); }

at::ScalarType compute_type(at::ScalarType dt) {
  return dt == at::kDouble ? at::kDouble : at::kFloat;
}

template <typename T, int MODE, bool SAVE>
void forward_planes(const T* xp, const T* yp, const std::vector<T>& win, const Params<T>& p, int64_t B, int64_t C,
                    int64_t H, int64_t W, int K, T* mapp, T* partp, double* plane_sums) {
  const int64_t HO = H - K + 1, WO = W - K + 1;
  const bool avx2 = use_avx2();
  at::parallel_for(0, B * C, plane_grain(H, W), [&](int64_t begin, int64_t end) {
    std::vector<T> ws(static_cast<size_t>(forward_workspace(W, K)));
    std::vector<const T*> src(static_cast<size_t>(K));
    for (int64_t pl = begin; pl < end; ++pl) {
      const int64_t b = pl / C;
      plane_sums[pl] = forward_plane<T, MODE, SAVE>(avx2, xp + pl * H * W, yp + pl * H * W, H, W, K,
                                                    win.data() + b * K, p,
                                                    mapp != nullptr ? mapp + pl * HO * WO : nullptr,
                                                    SAVE ? partp + pl * kStats * HO * WO : nullptr, ws.data(),
                                                    src.data());
    }
  });
}

template <typename T, int MODE>
void forward_planes_any(const T* xp, const T* yp, const std::vector<T>& win, const Params<T>& p, int64_t B, int64_t C,
                        int64_t H, int64_t W, int K, T* mapp, T* partp, double* plane_sums) {
  if (partp != nullptr) {
    forward_planes<T, MODE, true>(xp, yp, win, p, B, C, H, W, K, mapp, partp, plane_sums);
  } else {
    forward_planes<T, MODE, false>(xp, yp, win, p, B, C, H, W, K, mapp, partp, plane_sums);
  }
}

// Forward in the compute dtype T (float or double) on contiguous inputs.
template <typename T>
void forward_typed(const Tensor& x, const Tensor& y, const Tensor& sigma, double alpha, double beta, double gamma, int K,
                   int combine, double data_range, Tensor& score, Tensor* map, Tensor* part) {
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t HO = H - K + 1, WO = W - K + 1;
  const std::vector<T> win = make_windows<T>(sigma, K);
  const Params<T> p = make_params<T>(alpha, beta, gamma, data_range);
  std::vector<double> plane_sums(static_cast<size_t>(B * C), 0.0);
  const T* xp = x.data_ptr<T>();
  const T* yp = y.data_ptr<T>();
  T* mapp = map != nullptr ? map->data_ptr<T>() : nullptr;
  T* partp = part != nullptr ? part->data_ptr<T>() : nullptr;
  switch (select_mode(combine, alpha, beta, gamma)) {
    case kModeSum:
      forward_planes_any<T, kModeSum>(xp, yp, win, p, B, C, H, W, K, mapp, partp, plane_sums.data());
      break;
    case kModeProductOnes:
      forward_planes_any<T, kModeProductOnes>(xp, yp, win, p, B, C, H, W, K, mapp, partp, plane_sums.data());
      break;
    default:
      forward_planes_any<T, kModeProduct>(xp, yp, win, p, B, C, H, W, K, mapp, partp, plane_sums.data());
      break;
  }
  // NB: channel sums in a fixed order; 0/0 (C == 0) gives NaN as the reference's empty mean does.
  T* sp = score.data_ptr<T>();
  const double count = static_cast<double>(C * HO * WO);
  for (int64_t b = 0; b < B; ++b) {
    double total = 0.0;
    for (int64_t c = 0; c < C; ++c) total += plane_sums[b * C + c];
    sp[b] = static_cast<T>(total / count);
  }
}

std::tuple<Tensor, Tensor, Tensor> aw_ssim_cpu(const Tensor& x_in, const Tensor& y_in, const Tensor& sigma, double alpha,
                                               double beta, double gamma, int64_t window, int64_t combine,
                                               double data_range, bool return_map, bool save_partials) {
  check_inputs("aw_ssim", x_in, y_in, sigma, window, combine);
  const auto dt = x_in.scalar_type();
  const auto ct = compute_type(dt);
  const Tensor x = x_in.to(ct).contiguous();
  const Tensor y = y_in.to(ct).contiguous();
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int K = static_cast<int>(window);
  const int64_t HO = H - K + 1, WO = W - K + 1;
  Tensor score = at::empty({B}, x.options());
  Tensor map = return_map ? at::empty({B, C, HO, WO}, x.options()) : at::empty({0}, x.options());
  Tensor part = save_partials ? at::empty({B, C, kStats, HO, WO}, x.options()) : at::empty({0}, x.options());
  if (B > 0) {
    AT_DISPATCH_FLOATING_TYPES(ct, "aw_ssim_cpu", [&] {
      forward_typed<scalar_t>(x, y, sigma, alpha, beta, gamma, K, static_cast<int>(combine), data_range, score,
                              return_map ? &map : nullptr, save_partials ? &part : nullptr);
    });
  }
  // NB: float16 / bfloat16 are computed in float32; the partials stay float32.
  return {score.to(dt), map.to(dt), part};
}

// Backward over planes [begin, end) of one chunk. With `saved` null the partials of each plane are
// recomputed (forward kernel with SAVE into a plane-sized buffer that stays in cache) just before
// the plane's backward: cheaper on a CPU than writing and re-reading B*C*5*HO*WO partials.
template <typename T, int MODE>
void backward_chunk(bool avx2, int64_t begin, int64_t end, const T* xp, const T* yp, const T* saved, const T* gmp,
                    const double* gsp, double count, const std::vector<T>& win, const Params<T>& p, int64_t C, int64_t H,
                    int64_t W, int K, T* gxp, T* gyp) {
  const int64_t HO = H - K + 1, WO = W - K + 1;
  // NB: zero-initialised once: the padding of `apad` and the zero row are never written.
  std::vector<T> ws(static_cast<size_t>(backward_workspace(W, K)), T(0));
  std::vector<const T*> src(static_cast<size_t>(K));
  std::vector<T> fws, plane_part;
  if (saved == nullptr) {
    fws.resize(static_cast<size_t>(forward_workspace(W, K)));
    plane_part.resize(static_cast<size_t>(kStats * HO * WO));
  }
  for (int64_t pl = begin; pl < end; ++pl) {
    const int64_t b = pl / C;
    const T* g = win.data() + b * K;
    const T* xpl = xp + pl * H * W;
    const T* ypl = yp + pl * H * W;
    const T* part = saved != nullptr ? saved + pl * kStats * HO * WO : plane_part.data();
    if (saved == nullptr) {
      forward_plane<T, MODE, true>(avx2, xpl, ypl, H, W, K, g, p, nullptr, plane_part.data(), fws.data(), src.data());
    }
    backward_plane<T>(avx2, xpl, ypl, part, gmp != nullptr ? gmp + pl * HO * WO : nullptr,
                      static_cast<T>(gsp[b] / count), H, W, K, g, gxp != nullptr ? gxp + pl * H * W : nullptr,
                      gyp != nullptr ? gyp + pl * H * W : nullptr, ws.data(), src.data());
  }
}

std::tuple<Tensor, Tensor> aw_ssim_backward_cpu(const Tensor& grad_score, const Tensor& grad_map, const Tensor& x_in,
                                                const Tensor& y_in, const Tensor& sigma, const Tensor& partials,
                                                double alpha, double beta, double gamma, int64_t window, int64_t combine,
                                                double data_range, std::array<bool, 2> output_mask) {
  check_inputs("aw_ssim_backward", x_in, y_in, sigma, window, combine);
  const auto dt = x_in.scalar_type();
  const auto ct = compute_type(dt);
  const Tensor x = x_in.to(ct).contiguous();
  const Tensor y = y_in.to(ct).contiguous();
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int K = static_cast<int>(window);
  const int64_t HO = H - K + 1, WO = W - K + 1;
  TORCH_CHECK(grad_score.device().is_cpu() && grad_score.dim() == 1 && grad_score.size(0) == B,
              "aw_ssim_backward: grad_score must be a CPU tensor [B] with B=", B, ", got ", grad_score.sizes());
  const bool has_gmap = grad_map.numel() > 0;
  TORCH_CHECK(!has_gmap || (grad_map.device().is_cpu() && grad_map.sizes() == at::IntArrayRef({B, C, HO, WO})),
              "aw_ssim_backward: grad_map must be empty or [B, C, H-K+1, W-K+1] = [", B, ", ", C, ", ", HO, ", ", WO,
              "], got ", grad_map.sizes());
  const bool has_part = partials.numel() > 0;
  TORCH_CHECK(!has_part || (partials.device().is_cpu() && partials.sizes() == at::IntArrayRef({B, C, kStats, HO, WO})),
              "aw_ssim_backward: partials must be empty or [B, C, 5, H-K+1, W-K+1] = [", B, ", ", C, ", 5, ", HO, ", ",
              WO, "], got ", partials.sizes());
  Tensor gx = output_mask[0] ? at::empty_like(x) : at::empty({0}, x.options());
  Tensor gy = output_mask[1] ? at::empty_like(x) : at::empty({0}, x.options());
  if (B * C == 0 || !(output_mask[0] || output_mask[1])) {
    return {gx.zero_().to(dt), gy.zero_().to(dt)};
  }
  const Tensor part = has_part ? partials.to(ct).contiguous() : Tensor();
  const Tensor gsc = grad_score.to(at::kDouble).contiguous();
  const Tensor gm = has_gmap ? grad_map.to(ct).contiguous() : Tensor();
  const double count = static_cast<double>(C * HO * WO);
  AT_DISPATCH_FLOATING_TYPES(ct, "aw_ssim_backward_cpu", [&] {
    using T = scalar_t;
    const std::vector<T> win = make_windows<T>(sigma, K);
    const Params<T> p = make_params<T>(alpha, beta, gamma, data_range);
    const double* gsp = gsc.data_ptr<double>();
    const T* xp = x.data_ptr<T>();
    const T* yp = y.data_ptr<T>();
    const T* pp = has_part ? part.data_ptr<T>() : nullptr;
    const T* gmp = has_gmap ? gm.data_ptr<T>() : nullptr;
    T* gxp = output_mask[0] ? gx.data_ptr<T>() : nullptr;
    T* gyp = output_mask[1] ? gy.data_ptr<T>() : nullptr;
    const bool avx2 = use_avx2();
    const int mode = select_mode(static_cast<int>(combine), alpha, beta, gamma);
    at::parallel_for(0, B * C, plane_grain(H, W), [&](int64_t begin, int64_t end) {
      switch (mode) {
        case kModeSum:
          backward_chunk<T, kModeSum>(avx2, begin, end, xp, yp, pp, gmp, gsp, count, win, p, C, H, W, K, gxp, gyp);
          break;
        case kModeProductOnes:
          backward_chunk<T, kModeProductOnes>(avx2, begin, end, xp, yp, pp, gmp, gsp, count, win, p, C, H, W, K, gxp,
                                              gyp);
          break;
        default:
          backward_chunk<T, kModeProduct>(avx2, begin, end, xp, yp, pp, gmp, gsp, count, win, p, C, H, W, K, gxp, gyp);
          break;
      }
    });
  });
  return {gx.to(dt), gy.to(dt)};
}

}  // namespace
}  // namespace aw_ssim
}  // namespace defect_fast

TORCH_LIBRARY_IMPL(defect_fast, CPU, m) {
  m.impl("aw_ssim", &defect_fast::aw_ssim::aw_ssim_cpu);
  m.impl("aw_ssim_backward", &defect_fast::aw_ssim::aw_ssim_backward_cpu);
}
