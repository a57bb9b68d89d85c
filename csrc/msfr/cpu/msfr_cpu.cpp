// CPU kernel of defect_fast::msfr (float and double), parallel with at::parallel_for.
//
// Two phases, both memory-friendly:
//   1. For each unit (b, scale i, block of low-resolution rows): the channel-mean squared
//      residual R_i of the block (one streaming read of both feature tensors, summed over C
//      into a small buffer), then its horizontal interpolation to the output width W, stored
//      in a workspace T_i[b] of shape [H_i, W].
//   2. For each output row (b, Y): the vertical interpolation of the two rows of every T_i it
//      needs, weighted and summed over the scales, written straight into the output.
// The separable split does the same arithmetic in the same order as ATen's bilinear kernel
// (width taps first, then the two rows), and makes phase 2 contiguous and vectorisable.
// With many batch items (B >= 2 x threads) one parallel region runs both phases item by item;
// with few (a whole image), phase 1 runs over all units, then phase 2 over all output rows.
// Features may be NCHW or channels-last (NHWC) per scale: channels-last features (what a
// channels-last model produces) are read in place, the channel sum then running over a
// contiguous run of C values per position; anything else is made NCHW-contiguous first.
// defect_fast::msfr_float is the same kernel reading features of any floating dtype in place and
// computing and writing float32 (float64 for float64 features): each bfloat16/half value widens
// exactly, so its output equals msfr on the upcast features, without the upcast copies.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <type_traits>
#include <vector>

#include "common/macros.h"
#include "msfr/msfr.h"
#include "msfr/msfr_math.h"

namespace defect_fast {
namespace msfr {

namespace {

// Linear-interpolation taps of one axis for every output index.
template <typename acc_t>
struct AxisTable {
  std::vector<int64_t> i0, i1;
  std::vector<acc_t> l0, l1;

  AxisTable(int64_t in_size, int64_t out_size) : i0(out_size), i1(out_size), l0(out_size), l1(out_size) {
    const acc_t scale = axis_scale<acc_t>(in_size, out_size);
    for (int64_t d = 0; d < out_size; ++d) {
      axis_taps<acc_t>(d, in_size, out_size, scale, i0[d], i1[d], l0[d], l1[d]);
    }
  }
};

// Number of low-resolution rows per phase-1 unit: enough elements per unit (>= 4096) that the
// channel loop streams long runs (and the block stays in L1), at most the whole plane.
int64_t rows_per_unit(int64_t height, int64_t width) {
  const int64_t rows = (4096 + width - 1) / width;
  return std::max<int64_t>(1, std::min(rows, height));
}

template <typename scalar_t, typename acc_t>
void msfr_cpu_kernel(
    const std::vector<at::Tensor>& xs,  // S [B, C_i, H_i, W_i], contiguous NCHW or NHWC
    const std::vector<at::Tensor>& rs,  // same shapes and layouts
    const std::vector<bool>& nhwc,  // per scale: channels-last layout
    const std::vector<double>& weights,  // S normalised weights
    int64_t out_h, int64_t out_w,
    at::Tensor& out) {  // contiguous [B, 1, out_h, out_w] of acc_t
  // acc_t: float for float, bfloat16 and half features; double for double.
  const int64_t num_scales = static_cast<int64_t>(xs.size());
  const int64_t batch = xs[0].size(0);

  // Per-scale geometry, phase-1 unit counts and offsets of T_i inside one batch item's workspace.
  std::vector<int64_t> chans(num_scales), heights(num_scales), widths(num_scales);
  std::vector<int64_t> unit_rows(num_scales), unit_begin(num_scales + 1), t_offset(num_scales + 1);
  std::vector<AxisTable<acc_t>> cols, rows;
  std::vector<acc_t> w(num_scales);
  unit_begin[0] = 0;
  t_offset[0] = 0;
  for (int64_t i = 0; i < num_scales; ++i) {
    chans[i] = xs[i].size(1);
    heights[i] = xs[i].size(2);
    widths[i] = xs[i].size(3);
    unit_rows[i] = rows_per_unit(heights[i], widths[i]);
    unit_begin[i + 1] = unit_begin[i] + (heights[i] + unit_rows[i] - 1) / unit_rows[i];
    t_offset[i + 1] = t_offset[i] + heights[i] * out_w;
    cols.emplace_back(widths[i], out_w);
    rows.emplace_back(heights[i], out_h);
    w[i] = static_cast<acc_t>(weights[i]);
  }
  const int64_t units_per_item = unit_begin[num_scales];
  const int64_t t_per_item = t_offset[num_scales];
  acc_t* out_ptr = out.data_ptr<acc_t>();

  // Phase 1 for one unit (b, local unit index): the channel-mean squared residual of a block of
  // rows of one scale, then its horizontal interpolation into T_i[b], which lives in `t_item`
  // (the item's t_per_item workspace). `block` is scratch.
  auto residual_unit = [&](int64_t b, int64_t local, acc_t* t_item, std::vector<acc_t>& block) {
    int64_t i = 0;
    while (local >= unit_begin[i + 1]) {
      ++i;
    }
    const int64_t C = chans[i], Hi = heights[i], Wi = widths[i];
    const int64_t plane = Hi * Wi;
    const int64_t row0 = (local - unit_begin[i]) * unit_rows[i];
    const int64_t nrows = std::min(unit_rows[i], Hi - row0);
    const int64_t n = nrows * Wi;
    block.assign(static_cast<size_t>(n), acc_t(0));
    acc_t* acc = block.data();

    if (nhwc[i]) {
      // 1a'. channels-last: the block is n positions of C contiguous values each, summed in
      //      kLanes independent partial sums (one vector register, no serial dependency chain).
      constexpr int64_t kLanes = 8;
      const scalar_t* xq = xs[i].data_ptr<scalar_t>() + ((b * Hi + row0) * Wi) * C;
      const scalar_t* rq = rs[i].data_ptr<scalar_t>() + ((b * Hi + row0) * Wi) * C;
      for (int64_t k = 0; k < n; ++k) {
        const scalar_t* DF_RESTRICT xk = xq + k * C;
        const scalar_t* DF_RESTRICT rk = rq + k * C;
        acc_t lanes[kLanes] = {};
        int64_t c = 0;
        for (; c + kLanes <= C; c += kLanes) {
          for (int64_t l = 0; l < kLanes; ++l) {
            lanes[l] += squared_residual<acc_t>(xk[c + l], rk[c + l]);
          }
        }
        acc_t sum = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
        for (; c < C; ++c) {
          sum += squared_residual<acc_t>(xk[c], rk[c]);
        }
        acc[k] = sum;
      }
    } else {
      // 1a. sum over channels of (x - r)^2 for this block (a contiguous run of n elements per
      //     channel), four channels per sweep: eight concurrent read streams keep more loads in
      //     flight than two, and the buffer is read and written a quarter as often.
      const scalar_t* xp = xs[i].data_ptr<scalar_t>() + (b * C) * plane + row0 * Wi;
      const scalar_t* rp = rs[i].data_ptr<scalar_t>() + (b * C) * plane + row0 * Wi;
      int64_t c = 0;
      for (; c + 4 <= C; c += 4) {
        const scalar_t* DF_RESTRICT x0 = xp + c * plane;
        const scalar_t* DF_RESTRICT r0 = rp + c * plane;
        const scalar_t* DF_RESTRICT x1 = x0 + plane;
        const scalar_t* DF_RESTRICT r1 = r0 + plane;
        const scalar_t* DF_RESTRICT x2 = x1 + plane;
        const scalar_t* DF_RESTRICT r2 = r1 + plane;
        const scalar_t* DF_RESTRICT x3 = x2 + plane;
        const scalar_t* DF_RESTRICT r3 = r2 + plane;
        for (int64_t k = 0; k < n; ++k) {
          acc[k] += (squared_residual<acc_t>(x0[k], r0[k]) + squared_residual<acc_t>(x1[k], r1[k])) +
                    (squared_residual<acc_t>(x2[k], r2[k]) + squared_residual<acc_t>(x3[k], r3[k]));
        }
      }
      for (; c < C; ++c) {
        const scalar_t* DF_RESTRICT xc = xp + c * plane;
        const scalar_t* DF_RESTRICT rc = rp + c * plane;
        for (int64_t k = 0; k < n; ++k) {
          acc[k] += squared_residual<acc_t>(xc[k], rc[k]);
        }
      }
    }
    // NB: the mean as torch's: the sum divided by the count.
    const acc_t count = static_cast<acc_t>(C);
    for (int64_t k = 0; k < n; ++k) {
      acc[k] /= count;
    }

    // 1b. horizontal interpolation of each row of the block to the output width
    const AxisTable<acc_t>& ct = cols[i];
    acc_t* t_rows = t_item + t_offset[i] + row0 * out_w;
    for (int64_t y = 0; y < nrows; ++y) {
      const acc_t* src = acc + y * Wi;
      acc_t* dst = t_rows + y * out_w;
      for (int64_t X = 0; X < out_w; ++X) {
        dst[X] = src[ct.i0[X]] * ct.l0[X] + src[ct.i1[X]] * ct.l1[X];
      }
    }
  };

  // Phase 2 for one output row (b, Y): vertical interpolation and the weighted sum over scales.
  auto output_row = [&](int64_t b, int64_t Y, const acc_t* t_item) {
    acc_t* dst = out_ptr + (b * out_h + Y) * out_w;
    for (int64_t i = 0; i < num_scales; ++i) {
      const AxisTable<acc_t>& rt = rows[i];
      const acc_t* t_scale = t_item + t_offset[i];
      const acc_t* top = t_scale + rt.i0[Y] * out_w;
      const acc_t* bottom = t_scale + rt.i1[Y] * out_w;
      const acc_t ly0 = rt.l0[Y], ly1 = rt.l1[Y], wi = w[i];
      // NB: same order as the reference: up = top*ly0 + bottom*ly1; out = out + up*w_i.
      if (i == 0) {
        for (int64_t X = 0; X < out_w; ++X) {
          dst[X] = (top[X] * ly0 + bottom[X] * ly1) * wi;
        }
      } else {
        for (int64_t X = 0; X < out_w; ++X) {
          dst[X] += (top[X] * ly0 + bottom[X] * ly1) * wi;
        }
      }
    }
  };

  if (batch >= 2 * at::get_num_threads()) {
    // Many batch items (patches): one parallel region, each task doing whole items, phase 1
    // then phase 2, in one item-sized workspace that stays in cache.
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> block;
      std::vector<acc_t> t_item(static_cast<size_t>(t_per_item));
      for (int64_t b = begin; b < end; ++b) {
        for (int64_t local = 0; local < units_per_item; ++local) {
          residual_unit(b, local, t_item.data(), block);
        }
        for (int64_t Y = 0; Y < out_h; ++Y) {
          output_row(b, Y, t_item.data());
        }
      }
    });
    return;
  }
  // Few batch items (whole images): phase 1 over all units, then phase 2 over all output rows.
  // NB: uninitialised on purpose; phase 1 writes every element before phase 2 reads it.
  std::unique_ptr<acc_t[]> workspace(new acc_t[static_cast<size_t>(batch * t_per_item)]);
  acc_t* t_all = workspace.get();
  at::parallel_for(0, batch * units_per_item, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> block;
    for (int64_t u = begin; u < end; ++u) {
      const int64_t b = u / units_per_item;
      residual_unit(b, u - b * units_per_item, t_all + b * t_per_item, block);
    }
  });
  const int64_t grain = std::max<int64_t>(1, 16384 / (out_w * num_scales));
  at::parallel_for(0, batch * out_h, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / out_h;
      output_row(b, row - b * out_h, t_all + b * t_per_item);
    }
  });
}

// Both ops: checks, layouts, the output of dtype `out_type`, then the kernel.
at::Tensor msfr_cpu_impl(at::TensorList feats_x, at::TensorList feats_r, at::IntArrayRef out_size,
                         at::ArrayRef<double> weights, bool float_out) {
  const std::vector<double> normalised = check_inputs(feats_x, feats_r, out_size, weights);
  const at::Tensor& first = feats_x[0];
  const char* op = float_out ? "defect_fast::msfr_float" : "defect_fast::msfr";
  TORCH_CHECK(first.device().is_cpu(), op, " (CPU): features must be CPU tensors, got ", first.device());
  const at::ScalarType type = first.scalar_type();
  if (float_out) {
    TORCH_CHECK(type == at::kFloat || type == at::kDouble || type == at::kBFloat16 || type == at::kHalf, op,
                " (CPU): float32, float64, bfloat16 or float16 features expected, got ", type);
  } else {
    TORCH_CHECK(type == at::kFloat || type == at::kDouble, op, " (CPU): float32 or float64 features expected, got ", type);
  }
  const at::ScalarType out_type = type == at::kDouble ? at::kDouble : at::kFloat;

  const int64_t batch = first.size(0);
  const int64_t out_h = out_size[0], out_w = out_size[1];
  at::Tensor out = at::empty({batch, 1, out_h, out_w}, first.options().dtype(out_type));
  if (batch == 0) {
    return out;
  }
  std::vector<at::Tensor> xs, rs;
  std::vector<bool> nhwc;
  xs.reserve(feats_x.size());
  rs.reserve(feats_r.size());
  for (size_t i = 0; i < feats_x.size(); ++i) {
    const at::Tensor& x = feats_x[i];
    const at::Tensor& r = feats_r[i];
    const bool cl = x.is_contiguous(at::MemoryFormat::ChannelsLast) && r.is_contiguous(at::MemoryFormat::ChannelsLast) &&
                    !(x.is_contiguous() && r.is_contiguous());
    nhwc.push_back(cl);
    xs.push_back(cl ? x : x.contiguous());
    rs.push_back(cl ? r : r.contiguous());
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, type, "msfr_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    msfr_cpu_kernel<scalar_t, acc_t>(xs, rs, nhwc, normalised, out_h, out_w, out);
  });
  return out;
}

at::Tensor msfr_cpu(at::TensorList feats_x, at::TensorList feats_r, at::IntArrayRef out_size,
                    at::ArrayRef<double> weights) {
  return msfr_cpu_impl(feats_x, feats_r, out_size, weights, false);
}

at::Tensor msfr_float_cpu(at::TensorList feats_x, at::TensorList feats_r, at::IntArrayRef out_size,
                          at::ArrayRef<double> weights) {
  return msfr_cpu_impl(feats_x, feats_r, out_size, weights, true);
}

}  // namespace
}  // namespace msfr
}  // namespace defect_fast

TORCH_LIBRARY_IMPL(defect_fast, CPU, m) {
  m.impl("msfr", &defect_fast::msfr::msfr_cpu);
  m.impl("msfr_float", &defect_fast::msfr::msfr_float_cpu);
}
