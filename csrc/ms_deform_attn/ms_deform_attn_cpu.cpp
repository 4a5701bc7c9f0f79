// Multi-scale deformable attention on the CPU: forward and backward, float32 / float64 / bfloat16 /
// float16 value with accumulation in at::opmath_type (float, or double for double).
//
// Forward parallelizes over (batch, query); backward over (batch, head), because every (b, h) owns
// a disjoint slice of grad_value, so the scatter needs no atomics and no per-thread buffers.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "common/check.h"
#include "ms_deform_attn/ms_deform_attn_checks.h"

namespace dimaskdino {
namespace {

// The four bilinear corners of one sampling point; invalid (outside) corners have weight 0 and are
// skipped, which is grid_sample's zero padding.
template <typename acc_t>
struct Corners {
  int64_t row[4];     // value row (token index) of each corner
  acc_t weight[4];    // bilinear weight
  acc_t d_dx[4];      // d weight / d pixel x
  acc_t d_dy[4];      // d weight / d pixel y
  bool valid[4];
};

template <typename acc_t>
inline bool make_corners(acc_t loc_x, acc_t loc_y, int64_t height, int64_t width, int64_t start,
                         Corners<acc_t>& corners) {
  const acc_t x = loc_x * static_cast<acc_t>(width) - acc_t(0.5);
  const acc_t y = loc_y * static_cast<acc_t>(height) - acc_t(0.5);
  if (!(x > acc_t(-1) && y > acc_t(-1) && x < static_cast<acc_t>(width) &&
        y < static_cast<acc_t>(height))) {
    return false;  // also rejects NaN
  }
  const acc_t x_floor = std::floor(x);
  const acc_t y_floor = std::floor(y);
  const int64_t x0 = static_cast<int64_t>(x_floor);
  const int64_t y0 = static_cast<int64_t>(y_floor);
  const acc_t fx = x - x_floor;
  const acc_t fy = y - y_floor;
  const int64_t xs[4] = {x0, x0 + 1, x0, x0 + 1};
  const int64_t ys[4] = {y0, y0, y0 + 1, y0 + 1};
  const acc_t wx[4] = {1 - fx, fx, 1 - fx, fx};
  const acc_t wy[4] = {1 - fy, 1 - fy, fy, fy};
  const acc_t dwx[4] = {-1, 1, -1, 1};
  const acc_t dwy[4] = {-1, -1, 1, 1};
  for (int i = 0; i < 4; ++i) {
    corners.valid[i] = xs[i] >= 0 && xs[i] < width && ys[i] >= 0 && ys[i] < height;
    corners.row[i] = start + ys[i] * width + xs[i];
    corners.weight[i] = wx[i] * wy[i];
    corners.d_dx[i] = dwx[i] * wy[i];
    corners.d_dy[i] = wx[i] * dwy[i];
  }
  return true;
}

template <typename scalar_t, typename acc_t>
void forward_kernel(const MsdaSizes& n, const scalar_t* value, const int64_t* shapes,
                    const int64_t* starts, const acc_t* loc, const acc_t* weight, scalar_t* out) {
  const int64_t H = n.num_heads, D = n.channels, L = n.num_levels, P = n.num_points;
  const int64_t grain = std::max<int64_t>(1, 1024 / std::max<int64_t>(1, H * L * P));
  at::parallel_for(0, n.batch * n.num_query, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(D);
    Corners<acc_t> corners;
    for (int64_t bq = begin; bq < end; ++bq) {
      const int64_t b = bq / n.num_query;
      for (int64_t h = 0; h < H; ++h) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        const int64_t point_base = (bq * H + h) * L * P;
        for (int64_t l = 0; l < L; ++l) {
          for (int64_t p = 0; p < P; ++p) {
            const int64_t point = point_base + l * P + p;
            if (!make_corners(loc[2 * point], loc[2 * point + 1], shapes[2 * l], shapes[2 * l + 1],
                              starts[l], corners)) {
              continue;
            }
            for (int i = 0; i < 4; ++i) {
              if (!corners.valid[i]) continue;
              const acc_t w = weight[point] * corners.weight[i];
              const scalar_t* v = value + ((b * n.num_value + corners.row[i]) * H + h) * D;
              for (int64_t c = 0; c < D; ++c) acc[c] += w * static_cast<acc_t>(v[c]);
            }
          }
        }
        scalar_t* o = out + (bq * H + h) * D;
        for (int64_t c = 0; c < D; ++c) o[c] = static_cast<scalar_t>(acc[c]);
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void backward_kernel(const MsdaSizes& n, const scalar_t* grad_out, const scalar_t* value,
                     const int64_t* shapes, const int64_t* starts, const acc_t* loc,
                     const acc_t* weight, acc_t* grad_value, acc_t* grad_loc, acc_t* grad_weight) {
  const int64_t H = n.num_heads, D = n.channels, L = n.num_levels, P = n.num_points;
  at::parallel_for(0, n.batch * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> go(D);
    Corners<acc_t> corners;
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      for (int64_t q = 0; q < n.num_query; ++q) {
        const int64_t bqh = (b * n.num_query + q) * H + h;
        const scalar_t* g = grad_out + bqh * D;
        for (int64_t c = 0; c < D; ++c) go[c] = static_cast<acc_t>(g[c]);
        for (int64_t l = 0; l < L; ++l) {
          for (int64_t p = 0; p < P; ++p) {
            const int64_t point = (bqh * L + l) * P + p;
            grad_weight[point] = 0;
            grad_loc[2 * point] = 0;
            grad_loc[2 * point + 1] = 0;
            if (!make_corners(loc[2 * point], loc[2 * point + 1], shapes[2 * l], shapes[2 * l + 1],
                              starts[l], corners)) {
              continue;
            }
            const acc_t w = weight[point];
            acc_t sampled = 0, d_x = 0, d_y = 0;
            for (int i = 0; i < 4; ++i) {
              if (!corners.valid[i]) continue;
              const int64_t offset = ((b * n.num_value + corners.row[i]) * H + h) * D;
              const scalar_t* v = value + offset;
              acc_t* gv = grad_value + offset;
              const acc_t scatter = w * corners.weight[i];
              acc_t dot = 0;
              for (int64_t c = 0; c < D; ++c) {
                dot += go[c] * static_cast<acc_t>(v[c]);
                gv[c] += scatter * go[c];
              }
              sampled += corners.weight[i] * dot;
              d_x += corners.d_dx[i] * dot;
              d_y += corners.d_dy[i] * dot;
            }
            grad_weight[point] = sampled;
            // pixel = loc * size - 0.5, so d pixel / d loc = size.
            grad_loc[2 * point] = w * d_x * static_cast<acc_t>(shapes[2 * l + 1]);
            grad_loc[2 * point + 1] = w * d_y * static_cast<acc_t>(shapes[2 * l]);
          }
        }
      }
    }
  });
}

at::ScalarType accumulate_type(at::ScalarType value_type) {
  return value_type == at::kDouble ? at::kDouble : at::kFloat;
}

void check_cpu(const at::Tensor& t, const char* name) {
  DIMASKDINO_CHECK_ARG(t.device().is_cpu(), name, "expected a CPU tensor, got ", t.device());
}

at::Tensor ms_deform_attn_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                              const at::Tensor& level_start_index,
                              const at::Tensor& sampling_locations,
                              const at::Tensor& attention_weights) {
  for (auto [t, name] : {std::pair{&value, "value"}, {&spatial_shapes, "spatial_shapes"},
                         {&level_start_index, "level_start_index"},
                         {&sampling_locations, "sampling_locations"},
                         {&attention_weights, "attention_weights"}}) {
    check_cpu(*t, name);
  }
  const MsdaSizes n = check_msda_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                               attention_weights);
  const auto acc_type = accumulate_type(value.scalar_type());
  const auto value_c = value.contiguous();
  const auto shapes_c = spatial_shapes.contiguous();
  const auto starts_c = level_start_index.contiguous();
  const auto loc_c = sampling_locations.to(acc_type).contiguous();
  const auto weight_c = attention_weights.to(acc_type).contiguous();
  auto out = at::empty({n.batch, n.num_query, n.num_heads, n.channels}, value.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, value.scalar_type(), "ms_deform_attn_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_kernel<scalar_t, acc_t>(n, value_c.const_data_ptr<scalar_t>(),
                                    shapes_c.const_data_ptr<int64_t>(),
                                    starts_c.const_data_ptr<int64_t>(),
                                    loc_c.const_data_ptr<acc_t>(), weight_c.const_data_ptr<acc_t>(),
                                    out.mutable_data_ptr<scalar_t>());
  });
  return out.view({n.batch, n.num_query, n.num_heads * n.channels});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  check_cpu(grad_output, "grad_output");
  check_cpu(value, "value");
  const MsdaSizes n = check_msda_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                               attention_weights);
  DIMASKDINO_CHECK_ARG(grad_output.numel() == n.batch * n.num_query * n.num_heads * n.channels,
                       "grad_output", "expected (B, Q, H*D), got ", grad_output.sizes());
  const auto acc_type = accumulate_type(value.scalar_type());
  const auto grad_c = grad_output.to(value.scalar_type()).contiguous();
  const auto value_c = value.contiguous();
  const auto shapes_c = spatial_shapes.contiguous();
  const auto starts_c = level_start_index.contiguous();
  const auto loc_c = sampling_locations.to(acc_type).contiguous();
  const auto weight_c = attention_weights.to(acc_type).contiguous();
  auto grad_value = at::zeros(value.sizes(), value.options().dtype(acc_type));
  auto grad_loc = at::empty(sampling_locations.sizes(), loc_c.options());
  auto grad_weight = at::empty(attention_weights.sizes(), weight_c.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    backward_kernel<scalar_t, acc_t>(
        n, grad_c.const_data_ptr<scalar_t>(), value_c.const_data_ptr<scalar_t>(),
        shapes_c.const_data_ptr<int64_t>(), starts_c.const_data_ptr<int64_t>(),
        loc_c.const_data_ptr<acc_t>(), weight_c.const_data_ptr<acc_t>(),
        grad_value.mutable_data_ptr<acc_t>(), grad_loc.mutable_data_ptr<acc_t>(),
        grad_weight.mutable_data_ptr<acc_t>());
  });
  return {grad_value.to(value.scalar_type()), grad_loc.to(sampling_locations.scalar_type()),
          grad_weight.to(attention_weights.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(dimaskdino, CPU, m) {
  m.impl("ms_deform_attn", &ms_deform_attn_cpu);
  m.impl("_ms_deform_attn_backward", &ms_deform_attn_backward_cpu);
}

}  // namespace dimaskdino
