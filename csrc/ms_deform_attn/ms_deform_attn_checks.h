// Shape and dtype checks of the MSDA op shared by the CPU and CUDA implementations. The Python
// wrapper validates user input first; these catch direct torch.ops calls that skip it.
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
  return {value.size(0), value.size(1), value.size(2), value.size(3),
          L, sampling_locations.size(1), sampling_locations.size(4)};
}

}  // namespace dimaskdino
