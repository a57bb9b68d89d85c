// CUDA kernels of defect_fast::memory_address: the passes between the GEMMs.
//
// The GEMMs (z memory^T, weights memory and the four of the backward pass) are left to cuBLAS
// through at::mm in memory_address_cuda.cpp; these kernels do everything else, each in one
// pass over its rows:
//   normalize_rows   x / max(|x|, eps) per row (and |x|)
//   forward_rows     cosines -> softmax -> shrinkage -> Lp renormalisation, one block per query
//   backward_rows    the backward of the same chain, one block per query
//   project_rows     the backward of the row normalisation
// No torch headers: this file and memory_address_kernel.cu compile with plain nvcc.
// Launchers take raw pointers, sizes and the stream, and return the launch status. Every
// launcher is instantiated for float, double, __half and __nv_bfloat16; the arithmetic runs in
// acc_t (float, or double for double inputs). Indices into global memory are 64-bit.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace defect_fast {
namespace memory_address {
namespace cuda {

template <typename scalar_t>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename scalar_t>
using acc_t = typename AccType<scalar_t>::type;

// Normalises rows: xn[r, :] = x[r, :] / max(|x_r|, 1e-12).
//   x, xn: [rows, cols] contiguous.
//   norms: [rows] |x_r|; computed and written when compute_norms, else read.
template <typename scalar_t>
cudaError_t normalize_rows(const scalar_t* x, scalar_t* xn, acc_t<scalar_t>* norms, bool compute_norms, int64_t rows,
                           int64_t cols, cudaStream_t stream);

// Forward row pass, one block per query row b:
//   cosines: [B, N] <z_b/|z_b|, m_n/|m_n|>.
//   weights: [B, N] output w'' (may be the same buffer as cosines).
//   probs:   [B, N] output softmax w, or nullptr when the backward pass is not needed.
//   w_norm:  [B] output ||w'||_p before the clamp.
template <typename scalar_t>
cudaError_t forward_rows(const scalar_t* cosines, scalar_t* weights, acc_t<scalar_t>* probs, acc_t<scalar_t>* w_norm,
                         int64_t B, int64_t N, double shrink_threshold, double temperature, int p,
                         cudaStream_t stream);

// Backward row pass, one block per query row b:
//   g_readout: [B, N] grad_z_hat memory^T (the read-out's part of dL/dw'').
//   g_weights: [B, N] grad of the weights output.
//   probs, w_norm: saved by forward_rows.
//   h:        [B, N] output dL/dcos = (dL/ds) / temperature (may be the same buffer as g_readout).
template <typename scalar_t>
cudaError_t backward_rows(const scalar_t* g_readout, const scalar_t* g_weights, const acc_t<scalar_t>* probs,
                          const acc_t<scalar_t>* w_norm, scalar_t* h, int64_t B, int64_t N, double shrink_threshold,
                          double temperature, int p, cudaStream_t stream);

// Backward of the row normalisation, in place:
//   g[r, :] <- (g[r, :] - xn[r, :] <g[r, :], xn[r, :]>) / max(norm_r, 1e-12)
// with the projection dropped where norm_r < 1e-12 (the clamp holds).
//   g: [rows, cols] dL/dxn on entry, dL/dx on exit; xn: [rows, cols] normalised rows; norms: [rows].
template <typename scalar_t>
cudaError_t project_rows(scalar_t* g, const scalar_t* xn, const acc_t<scalar_t>* norms, int64_t rows, int64_t cols,
                         cudaStream_t stream);

}  // namespace cuda
}  // namespace memory_address
}  // namespace defect_fast
