// CUDA registration of defect_fast::memory_address and its backward (float, double, half,
// bfloat16). Torch glue only: the GEMMs go to cuBLAS through at::mm on the current stream, the
// passes between them are the kernels of memory_address_kernel.cu.
//
// Forward:  zn, mn = normalised rows; cos = zn mn^T (GEMM); forward_rows (in place) -> w'';
//           z_hat = w'' memory (GEMM). With need_backward, zn and mn are returned (z_unit,
//           m_unit) for the backward pass.
// Backward: h = grad_z_hat memory^T (GEMM); backward_rows (in place) -> dL/dcos;
//           grad_z = project(h mn) (GEMM); grad_memory = project(h^T zn) + w''^T grad_z_hat (2 GEMMs).
// NB: unlike the CPU kernel, which scales raw dot products, the cosines are computed from
// normalised copies: for half and bfloat16 a raw z m^T can overflow.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <tuple>

#include "memory_address/memory_address.h"
#include "memory_address/cuda/memory_address_kernel.h"

namespace defect_fast {
namespace memory_address {

namespace {

// The CUDA type with the layout of a torch scalar type.
template <typename T>
struct CudaScalar {
  using type = T;
};
template <>
struct CudaScalar<at::Half> {
  using type = __half;
};
template <>
struct CudaScalar<at::BFloat16> {
  using type = __nv_bfloat16;
};

template <typename scalar_t>
using cuda_t = typename CudaScalar<scalar_t>::type;

template <typename scalar_t>
cuda_t<scalar_t>* ptr(const at::Tensor& t) {
  return reinterpret_cast<cuda_t<scalar_t>*>(t.data_ptr<scalar_t>());
}

template <typename scalar_t>
cuda::acc_t<cuda_t<scalar_t>>* acc_ptr(const at::Tensor& t) {
  return t.data_ptr<cuda::acc_t<cuda_t<scalar_t>>>();
}

at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

void check_cuda(const at::Tensor& z, const char* op) {
  TORCH_CHECK(z.is_cuda(), op, ": the CUDA kernel got a tensor on ", z.device());
  const auto t = z.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16, op,
              ": the CUDA kernel supports float32, float64, float16 and bfloat16, got ", t);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
memory_address_cuda(
    const at::Tensor& z, const at::Tensor& memory, double shrink_threshold, double temperature, int64_t p,
    bool need_backward) {
  check_forward_args(z, memory, shrink_threshold, temperature, p);
  check_cuda(z, "memory_address");
  const c10::cuda::CUDAGuard guard(z.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor zc = z.contiguous();
  const at::Tensor mc = memory.contiguous();
  const int64_t B = zc.size(0), N = mc.size(0), C = zc.size(1);
  const auto opts = zc.options();
  const auto acc_opts = opts.dtype(acc_type(zc.scalar_type()));

  at::Tensor weights = at::empty({B, N}, opts);
  at::Tensor probs = need_backward ? at::empty({B, N}, acc_opts) : at::empty({0}, acc_opts);
  at::Tensor z_norm = at::empty({B}, acc_opts);
  at::Tensor m_norm = at::empty({N}, acc_opts);
  // NB: forward_rows writes every w_norm[b]; only the degenerate N == 0 case below fills it.
  at::Tensor w_norm = at::empty({B}, acc_opts);
  at::Tensor zn = at::empty_like(zc);
  at::Tensor mn = at::empty_like(mc);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, zc.scalar_type(), "memory_address_cuda", [&] {
    // 1. Normalised rows and their norms.
    C10_CUDA_CHECK(cuda::normalize_rows(ptr<scalar_t>(zc), ptr<scalar_t>(zn), acc_ptr<scalar_t>(z_norm), true, B, C,
                                        stream));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    C10_CUDA_CHECK(cuda::normalize_rows(ptr<scalar_t>(mc), ptr<scalar_t>(mn), acc_ptr<scalar_t>(m_norm), true, N, C,
                                        stream));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (B == 0 || N == 0) {
      w_norm.zero_();
      return;
    }
    // 2. Cosines (GEMM), then softmax, shrinkage and renormalisation in place.
    at::mm_out(weights, zn, mn.t());
    C10_CUDA_CHECK(cuda::forward_rows(ptr<scalar_t>(weights), ptr<scalar_t>(weights),
                                      need_backward ? acc_ptr<scalar_t>(probs) : nullptr, acc_ptr<scalar_t>(w_norm), B,
                                      N, shrink_threshold, temperature, static_cast<int>(p), stream));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // 3. Read-out (GEMM).
  at::Tensor z_hat = N == 0 ? at::zeros({B, C}, opts) : at::mm(weights, mc);
  // 4. The normalised rows are kept for the backward pass (not recomputed there).
  if (!need_backward) {
    zn = at::empty({0}, opts);
    mn = at::empty({0}, opts);
  }
  return {z_hat, weights, probs, z_norm, m_norm, w_norm, zn, mn};
}

std::tuple<at::Tensor, at::Tensor> memory_address_backward_cuda(
    const at::Tensor& grad_z_hat, const at::Tensor& grad_weights, const at::Tensor& z, const at::Tensor& memory,
    const at::Tensor& weights, const at::Tensor& probs, const at::Tensor& z_norm, const at::Tensor& m_norm,
    const at::Tensor& w_norm, const at::Tensor& z_unit, const at::Tensor& m_unit, double shrink_threshold,
    double temperature, int64_t p, std::array<bool, 2> output_mask) {
  check_backward_args(grad_z_hat, grad_weights, z, memory, weights, probs, z_norm, m_norm, w_norm, z_unit, m_unit,
                      shrink_threshold, temperature, p);
  check_cuda(z, "memory_address_backward");
  const c10::cuda::CUDAGuard guard(z.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor zc = z.contiguous();
  const at::Tensor mc = memory.contiguous();
  const at::Tensor gzc = grad_z_hat.contiguous();
  const at::Tensor gwc = grad_weights.contiguous();
  const at::Tensor wc = weights.contiguous();
  const at::Tensor pc = probs.contiguous();
  const at::Tensor znc = z_norm.contiguous();
  const at::Tensor mnc = m_norm.contiguous();
  const at::Tensor wnc = w_norm.contiguous();
  const int64_t B = zc.size(0), N = mc.size(0), C = zc.size(1);
  const auto opts = zc.options();

  if (B == 0 || N == 0 || !(output_mask[0] || output_mask[1])) {
    return {output_mask[0] ? at::zeros({B, C}, opts) : at::empty({0}, opts),
            output_mask[1] ? at::zeros({N, C}, opts) : at::empty({0}, opts)};
  }
  at::Tensor grad_z = at::empty({0}, opts);
  at::Tensor grad_m = at::empty({0}, opts);
  // The normalised rows saved by the forward pass; recomputed from the saved norms only when a
  // caller of the raw op passes empty ones.
  const bool have_zn = z_unit.numel() > 0, have_mn = m_unit.numel() > 0;
  const at::Tensor zn = have_zn ? z_unit.contiguous() : at::empty_like(zc);
  const at::Tensor mn = have_mn ? m_unit.contiguous() : at::empty_like(mc);
  at::Tensor h = at::mm(gzc, mc.t());  // 1. the read-out's part of dL/dw'' (GEMM)

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, zc.scalar_type(), "memory_address_backward_cuda", [&] {
    // 2. dL/dcos in place of h (normalised rows first, if they were not saved).
    if (!have_zn) {
      C10_CUDA_CHECK(cuda::normalize_rows(ptr<scalar_t>(zc), ptr<scalar_t>(zn), acc_ptr<scalar_t>(znc), false, B, C,
                                          stream));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (!have_mn) {
      C10_CUDA_CHECK(cuda::normalize_rows(ptr<scalar_t>(mc), ptr<scalar_t>(mn), acc_ptr<scalar_t>(mnc), false, N, C,
                                          stream));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    C10_CUDA_CHECK(cuda::backward_rows(ptr<scalar_t>(h), ptr<scalar_t>(gwc), acc_ptr<scalar_t>(pc),
                                       acc_ptr<scalar_t>(wnc), ptr<scalar_t>(h), B, N, shrink_threshold, temperature,
                                       static_cast<int>(p), stream));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // 3. grad_z = project(h mn) (GEMM).
    if (output_mask[0]) {
      grad_z = at::mm(h, mn).contiguous();
      C10_CUDA_CHECK(cuda::project_rows(ptr<scalar_t>(grad_z), ptr<scalar_t>(zn), acc_ptr<scalar_t>(znc), B, C, stream));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    // 4. grad_memory = project(h^T zn) + w''^T grad_z_hat (2 GEMMs).
    if (output_mask[1]) {
      grad_m = at::mm(h.t(), zn).contiguous();
      C10_CUDA_CHECK(cuda::project_rows(ptr<scalar_t>(grad_m), ptr<scalar_t>(mn), acc_ptr<scalar_t>(mnc), N, C, stream));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      grad_m.addmm_(wc.t(), gzc);
    }
  });
  return {grad_z, grad_m};
}

}  // namespace
}  // namespace memory_address
}  // namespace defect_fast

TORCH_LIBRARY_IMPL(defect_fast, CUDA, m) {
  m.impl("memory_address", &defect_fast::memory_address::memory_address_cuda);
  m.impl("memory_address_backward", &defect_fast::memory_address::memory_address_backward_cuda);
}
