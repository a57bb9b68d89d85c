// Schemas of defect_fast::memory_address and defect_fast::memory_address_backward, and the
// argument checks shared by the CPU and CUDA implementations.
//
// Implementations: cpu/memory_address_cpu.cpp (CPU, float and double) and
// cuda/memory_address_cuda.cpp (CUDA, float, double, half, bfloat16). Fake kernels and autograd
// are attached from Python in defect_fast/ops/_memory_address.py.
//
// memory_address(z, memory, shrink_threshold, temperature, p, need_backward)
//   Cosine attention of queries over memory items, softmax, hard shrinkage, Lp renormalisation
//   and read-out (CMA-AE Eq. 2-4, MemAE); see memory_address_math.h for the steps.
//   Args:
//     z:                [B, C] queries, floating point.
//     memory:           [N, C] memory items, same dtype and device as z.
//     shrink_threshold: t >= 0 (0 disables shrinkage).
//     temperature:      > 0; logits are cosine / temperature.
//     p:                1 or 2, the norm of the renormalisation.
//     need_backward:    also return the softmax weights needed by the backward pass.
//   Returns, with acc = float64 for float64 inputs and float32 otherwise:
//     z_hat   [B, C] dtype of z: the read-out sum_n w''_n m_n.
//     weights [B, N] dtype of z: the renormalised weights w''.
//     probs   [B, N] acc (or [0] when need_backward is false): the softmax w before shrinkage.
//     z_norm  [B]    acc: |z_b| (before the clamp at 1e-12).
//     m_norm  [N]    acc: |m_n| (before the clamp).
//     w_norm  [B]    acc: ||w'_b||_p (before the clamp).
//     z_unit  [B, C] dtype of z: z_b / max(|z_b|, 1e-12), saved for the backward pass by the CUDA
//                    kernel when need_backward is true; [0] otherwise (and always on the CPU,
//                    whose kernel scales raw dot products instead).
//     m_unit  [N, C] dtype of z: the normalised memory rows, under the same rule as z_unit.
//
// memory_address_backward(grad_z_hat, grad_weights, z, memory, weights, probs, z_norm, m_norm,
//                         w_norm, z_unit, m_unit, shrink_threshold, temperature, p, output_mask)
//   Gradients of a loss that depends on both outputs.
//   Args:
//     grad_z_hat [B, C], grad_weights [B, N]: gradients of the two outputs (dtype of z).
//     z, memory, shrink_threshold, temperature, p: the forward inputs.
//     weights, probs, z_norm, m_norm, w_norm, z_unit, m_unit: the forward outputs
//       (need_backward=true); an empty z_unit or m_unit is recomputed from z or memory.
//     output_mask: which of (grad_z, grad_memory) to compute.
//   Returns:
//     grad_z [B, C] and grad_memory [N, C] (dtype of z); a masked-out gradient is an empty [0].
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>

#include "memory_address/memory_address.h"

namespace defect_fast {
namespace memory_address {

// Checks the arguments of memory_address (both devices); raises with an actionable message.
void check_forward_args(const at::Tensor& z, const at::Tensor& memory, double shrink_threshold, double temperature,
                        int64_t p) {
  TORCH_CHECK(z.dim() == 2 && memory.dim() == 2 && z.size(1) == memory.size(1),
              "memory_address: expected z [B, C] and memory [N, C] with the same C, got z ", z.sizes(),
              " and memory ", memory.sizes());
  TORCH_CHECK(z.scalar_type() == memory.scalar_type(), "memory_address: z and memory must have the same dtype, got ",
              z.scalar_type(), " and ", memory.scalar_type());
  TORCH_CHECK(at::isFloatingType(z.scalar_type()), "memory_address: z and memory must be floating point, got ",
              z.scalar_type());
  TORCH_CHECK(z.device() == memory.device(), "memory_address: z and memory must be on the same device, got ",
              z.device(), " and ", memory.device());
  TORCH_CHECK(p == 1 || p == 2, "memory_address: p must be 1 or 2, got ", p);
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, "memory_address: temperature must be > 0, got ",
              temperature);
  TORCH_CHECK(std::isfinite(shrink_threshold) && shrink_threshold >= 0,
              "memory_address: shrink_threshold must be >= 0, got ", shrink_threshold);
}

// Checks the arguments of memory_address_backward against the forward inputs.
void check_backward_args(const at::Tensor& grad_z_hat, const at::Tensor& grad_weights, const at::Tensor& z,
                         const at::Tensor& memory, const at::Tensor& weights, const at::Tensor& probs,
                         const at::Tensor& z_norm, const at::Tensor& m_norm, const at::Tensor& w_norm,
                         const at::Tensor& z_unit, const at::Tensor& m_unit, double shrink_threshold,
                         double temperature, int64_t p) {
  check_forward_args(z, memory, shrink_threshold, temperature, p);
  const int64_t B = z.size(0), N = memory.size(0), C = z.size(1);
  TORCH_CHECK(grad_z_hat.dim() == 2 && grad_z_hat.size(0) == B && grad_z_hat.size(1) == C,
              "memory_address_backward: grad_z_hat must be [B, C] = [", B, ", ", C, "], got ", grad_z_hat.sizes());
  TORCH_CHECK(grad_weights.dim() == 2 && grad_weights.size(0) == B && grad_weights.size(1) == N,
              "memory_address_backward: grad_weights must be [B, N] = [", B, ", ", N, "], got ",
              grad_weights.sizes());
  TORCH_CHECK(weights.dim() == 2 && weights.size(0) == B && weights.size(1) == N,
              "memory_address_backward: weights must be [B, N], got ", weights.sizes());
  TORCH_CHECK(probs.dim() == 2 && probs.size(0) == B && probs.size(1) == N,
              "memory_address_backward: probs must be [B, N] = [", B, ", ", N, "], got ", probs.sizes(),
              " (was the forward run with need_backward=False?)");
  TORCH_CHECK(z_norm.dim() == 1 && z_norm.size(0) == B && w_norm.dim() == 1 && w_norm.size(0) == B &&
                  m_norm.dim() == 1 && m_norm.size(0) == N,
              "memory_address_backward: z_norm, w_norm must be [B] and m_norm [N], got ", z_norm.sizes(), ", ",
              w_norm.sizes(), " and ", m_norm.sizes());
  const auto acc = z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(probs.scalar_type() == acc && z_norm.scalar_type() == acc && m_norm.scalar_type() == acc &&
                  w_norm.scalar_type() == acc,
              "memory_address_backward: probs and the norms must be ", acc, " for ", z.scalar_type(), " inputs");
  TORCH_CHECK(z_unit.numel() == 0 || z_unit.sizes() == z.sizes(),
              "memory_address_backward: z_unit must be empty or [B, C] = ", z.sizes(), ", got ", z_unit.sizes());
  TORCH_CHECK(m_unit.numel() == 0 || m_unit.sizes() == memory.sizes(),
              "memory_address_backward: m_unit must be empty or [N, C] = ", memory.sizes(), ", got ", m_unit.sizes());
  for (const at::Tensor* t : {&grad_z_hat, &grad_weights, &weights, &z_unit, &m_unit}) {
    TORCH_CHECK(t->scalar_type() == z.scalar_type(), "memory_address_backward: gradients and weights must be ",
                z.scalar_type(), ", got ", t->scalar_type());
  }
  for (const at::Tensor* t : {&grad_z_hat, &grad_weights, &weights, &probs, &z_norm, &m_norm, &w_norm, &z_unit, &m_unit}) {
    TORCH_CHECK(t->device() == z.device(), "memory_address_backward: all tensors must be on ", z.device(),
                ", got one on ", t->device());
  }
}

}  // namespace memory_address
}  // namespace defect_fast

TORCH_LIBRARY_FRAGMENT(defect_fast, m) {
  m.set_python_module("defect_fast.ops._memory_address");
  m.def(
      "memory_address(Tensor z, Tensor memory, float shrink_threshold, float temperature, int p, "
      "bool need_backward) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "memory_address_backward(Tensor grad_z_hat, Tensor grad_weights, Tensor z, Tensor memory, "
      "Tensor weights, Tensor probs, Tensor z_norm, Tensor m_norm, Tensor w_norm, Tensor z_unit, Tensor m_unit, "
      "float shrink_threshold, float temperature, int p, bool[2] output_mask) -> (Tensor, Tensor)");
}
