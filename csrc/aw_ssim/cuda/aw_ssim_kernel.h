// CUDA launchers of the fused AW-SSIM kernels (aw_ssim_kernel.cu). Raw pointers, sizes and a
// stream in, cudaError_t out; no torch headers (the torch glue is aw_ssim_cuda.cpp).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace defect_fast {
namespace aw_ssim {
namespace cuda {

// Element type of x, y, map, grad_x, grad_y. The accumulation type ("acc") is double for kDouble
// and float for the others; partial derivatives and the workspace are stored in acc.
enum class DType : int { kFloat = 0, kDouble = 1, kHalf = 2, kBFloat16 = 3 };

struct Problem {
  int64_t B, C, H, W;  // x, y: [B, C, H, W], contiguous
  int window;          // K, odd, K <= H and K <= W
  int combine;         // 0 "sum", 1 "product" (aw_ssim_math.h)
  double alpha, beta, gamma, data_range;
};

// Tallest image the kernels take: one block per 16 rows of tiles in grid.y, which CUDA caps at
// 65535 (grid.x, over the columns, goes to 2^31 - 1; the planes loop over a capped grid.z).
constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kMaxRows = kMaxGridY * 16;
// Widest image: the kernels index columns in int, up to a tile (16) and a window past the last one.
constexpr int64_t kIndexMargin = 16;

// Whether the backward of window pb.window fits this GPU's shared memory (it stages more than the
// forward: a forward that saves its partials checks it first, so the failure comes before the
// training step, not in its backward). cudaErrorInvalidConfiguration when it does not.
cudaError_t prepare_backward(DType dtype, const Problem& pb);

// Number of acc elements of the forward workspace (one partial score per 16x16 tile and plane).
int64_t forward_workspace_elems(const Problem& pb);

// Forward.
//   x, y:      [B, C, H, W] of `dtype`.
//   sigma:     [B] float64, > 0.
//   score:     [B] of `dtype` (out).
//   map:       [B, C, H-K+1, W-K+1] of `dtype` (out), or null.
//   partials:  [B, C, 5, H-K+1, W-K+1] of acc (out), or null: d index / d(mu_x, mu_y, E[x^2],
//              E[y^2], E[xy]).
//   workspace: forward_workspace_elems(pb) elements of acc.
// The score is reduced deterministically: per-tile sums, then a fixed-order sum per sample.
cudaError_t launch_forward(DType dtype, const void* x, const void* y, const double* sigma, const Problem& pb, void* score,
                           void* map, void* partials, void* workspace, cudaStream_t stream);

// Backward.
//   grad_score: [B] of `dtype`.
//   grad_map:   [B, C, H-K+1, W-K+1] of `dtype`, or null for none.
//   x, y, sigma: as for the forward; partials: as written by launch_forward.
//   grad_x, grad_y: [B, C, H, W] of `dtype` (out), either may be null (not needed). Every element
//   is written once (no atomics).
cudaError_t launch_backward(DType dtype, const void* grad_score, const void* grad_map, const void* x, const void* y,
                            const double* sigma, const void* partials, const Problem& pb, void* grad_x, void* grad_y,
                            cudaStream_t stream);

}  // namespace cuda
}  // namespace aw_ssim
}  // namespace defect_fast
