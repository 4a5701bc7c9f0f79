// Shape and dtype checks of the MSDA op shared by the CPU and CUDA implementations. The Python
// wrapper validates user input first; these catch direct torch.ops calls that skip it.
// The contents of spatial_shapes and level_start_index (which bound every read of value) are
// checked here where they are on the host; on a GPU that would cost a device-to-host copy and a
// sync per call, so the CUDA kernels check each level while staging it instead (level_fits in
// cuda/ms_deform_attn_device.cuh) and trap before reading value.
#pragma once
#include <ATen/core/Tensor.h>

#include "common/check.h"

namespace dimaskdino {

struct MsdaSizes {
  int64_t batch, num_value, num_heads, channels, num_levels, num_query, num_points;
};

inline MsdaSizes check_msda_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                   const at::Tensor& level_start_index,
                                   const at::Tensor& sampling_locations,
                                   const at::Tensor& attention_weights) {
  DIMASKDINO_CHECK_ARG(value.dim() == 4, "value", "expected (B, S, H, D), got ", value.sizes());
  DIMASKDINO_CHECK_ARG(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2 &&
                           spatial_shapes.scalar_type() == at::kLong,
                       "spatial_shapes", "expected int64 (L, 2), got ",
                       spatial_shapes.scalar_type(), " ", spatial_shapes.sizes());
  const int64_t L = spatial_shapes.size(0);
  DIMASKDINO_CHECK_ARG(level_start_index.dim() == 1 && level_start_index.size(0) == L &&
                           level_start_index.scalar_type() == at::kLong,
                       "level_start_index", "expected int64 (L,) with L = ", L, ", got ",
                       level_start_index.scalar_type(), " ", level_start_index.sizes());
  DIMASKDINO_CHECK_ARG(sampling_locations.dim() == 6 &&
                           sampling_locations.size(0) == value.size(0) &&
                           sampling_locations.size(2) == value.size(2) &&
                           sampling_locations.size(3) == L && sampling_locations.size(5) == 2,
                       "sampling_locations", "expected (B, Q, H, L, P, 2) matching value ",
                       value.sizes(), " and L = ", L, ", got ", sampling_locations.sizes());
  DIMASKDINO_CHECK_ARG(attention_weights.sizes() == sampling_locations.sizes().slice(0, 5),
                       "attention_weights", "expected ", sampling_locations.sizes().slice(0, 5),
                       ", got ", attention_weights.sizes());
  DIMASKDINO_CHECK_ARG(sampling_locations.scalar_type() == attention_weights.scalar_type(),
                       "attention_weights", "dtype ", attention_weights.scalar_type(),
                       " differs from sampling_locations' ", sampling_locations.scalar_type());
  const auto loc_type = sampling_locations.scalar_type();
  DIMASKDINO_CHECK_ARG(loc_type == at::kFloat || loc_type == value.scalar_type(),
                       "sampling_locations", "expected float32 or value's dtype ",
                       value.scalar_type(), ", got ", loc_type);
  if (spatial_shapes.device().is_cpu() && level_start_index.device().is_cpu()) {
    const at::Tensor shapes = spatial_shapes.contiguous();
    const at::Tensor starts = level_start_index.contiguous();
    const int64_t* hw = shapes.data_ptr<int64_t>();
    const int64_t* start = starts.data_ptr<int64_t>();
    int64_t total = 0;
    for (int64_t l = 0; l < L; ++l) {
      DIMASKDINO_CHECK_ARG(hw[2 * l] > 0 && hw[2 * l + 1] > 0, "spatial_shapes", "level ", l,
                           " has size ", hw[2 * l], " x ", hw[2 * l + 1]);
      DIMASKDINO_CHECK_ARG(start[l] == total, "level_start_index", "level ", l, " starts at ",
                           start[l], ", but the sum of h*w of the levels before it is ", total);
      total += hw[2 * l] * hw[2 * l + 1];
    }
    DIMASKDINO_CHECK_ARG(total == value.size(1), "spatial_shapes", "sum of h*w = ", total,
                         " but value has S = ", value.size(1), " tokens");
  }
  return {value.size(0), value.size(1), value.size(2), value.size(3),
          L, sampling_locations.size(1), sampling_locations.size(4)};
}

}  // namespace dimaskdino
