// Per-element maths of the multi-scale feature residual (MSFR, Eq. 15 of CMA-AE), shared by
// the CPU kernel and the CUDA kernel. Only <cstdint> and macros.h: this header compiles with
// the host compiler and with nvcc alike.
//
// The op, for S scales with features F_i, F'_i of shape [B, C_i, H_i, W_i] and weights w_i:
//   R_i[b, y, x]   = (1 / C_i) * sum_c (F_i[b, c, y, x] - F'_i[b, c, y, x])^2   (low resolution)
//   out[b, 0, Y, X] = sum_i (w_i / sum_j w_j) * bilinear_i(R_i[b])(Y, X)
// where bilinear_i resizes (H_i, W_i) to the output (H, W) exactly as
// torch.nn.functional.interpolate(mode="bilinear", align_corners=False) given a size.
#pragma once

#include <cstdint>

#include "common/macros.h"

namespace defect_fast {
namespace msfr {

// Source-pixel ratio in/out of one axis, as ATen's area_pixel_compute_scale with a size given
// (no scale factor, align_corners=false): computed in the accumulation type acc_t.
template <typename acc_t>
DF_HOST_DEVICE DF_INLINE acc_t axis_scale(int64_t in_size, int64_t out_size) {
  return static_cast<acc_t>(in_size) / static_cast<acc_t>(out_size);
}

// The two taps and weights that linear interpolation along one axis reads for output index
// `dst`: value = l0 * in[i0] + l1 * in[i1].
//
// Mirrors ATen's compute_source_index_and_lambda (align_corners=false):
//   equal sizes -> a plain copy (i0 = i1 = dst, l0 = 1, l1 = 0);
//   otherwise src = scale * (dst + 0.5) - 0.5, clamped below at 0 (edge clamping),
//   i0 = min(floor(src), in - 1), l1 = clamp(src - i0, 0, 1), i1 = i0 + (i0 < in - 1), l0 = 1 - l1.
// NB: src >= 0 after the clamp, so the integer conversion is the floor.
template <typename acc_t>
DF_HOST_DEVICE DF_INLINE void axis_taps(
    int64_t dst, int64_t in_size, int64_t out_size, acc_t scale,
    int64_t& i0, int64_t& i1, acc_t& l0, acc_t& l1) {
  if (in_size == out_size) {
    i0 = dst;
    i1 = dst;
    l0 = static_cast<acc_t>(1);
    l1 = static_cast<acc_t>(0);
    return;
  }
  acc_t src = scale * (static_cast<acc_t>(dst) + static_cast<acc_t>(0.5)) - static_cast<acc_t>(0.5);
  if (src < static_cast<acc_t>(0)) {
    src = static_cast<acc_t>(0);
  }
  int64_t i = static_cast<int64_t>(src);
  if (i > in_size - 1) {
    i = in_size - 1;
  }
  acc_t lambda = src - static_cast<acc_t>(i);
  if (lambda < static_cast<acc_t>(0)) {
    lambda = static_cast<acc_t>(0);
  }
  if (lambda > static_cast<acc_t>(1)) {
    lambda = static_cast<acc_t>(1);
  }
  i0 = i;
  i1 = i + ((i < in_size - 1) ? 1 : 0);
  l1 = lambda;
  l0 = static_cast<acc_t>(1) - lambda;
}

// Squared difference of one feature element, in the accumulation type.
template <typename acc_t>
DF_HOST_DEVICE DF_INLINE acc_t squared_residual(acc_t x, acc_t r) {
  const acc_t d = x - r;
  return d * d;
}

// Bilinear sample of one low-resolution plane `plane` (row stride `width`) from precomputed
// taps. NB: the order of the arithmetic is ATen's CPU kernel's: the two taps along the width
// first, then the two rows weighted by the height weights.
template <typename acc_t>
DF_HOST_DEVICE DF_INLINE acc_t bilinear_sample(
    const acc_t* plane, int64_t width,
    int64_t y0, int64_t y1, acc_t ly0, acc_t ly1,
    int64_t x0, int64_t x1, acc_t lx0, acc_t lx1) {
  const acc_t* row0 = plane + y0 * width;
  const acc_t* row1 = plane + y1 * width;
  const acc_t top = row0[x0] * lx0 + row0[x1] * lx1;
  const acc_t bottom = row1[x0] * lx0 + row1[x1] * lx1;
  return top * ly0 + bottom * ly1;
}

}  // namespace msfr
}  // namespace defect_fast
