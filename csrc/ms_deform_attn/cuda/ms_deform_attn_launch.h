// Torch-free interface between the CUDA kernels (.cu) and the PyTorch glue (ms_deform_attn_cuda.cpp).
// Keeping torch headers out of the .cu files lets CI compile every kernel with plain nvcc on a
// machine whose torch build has no CUDA.
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

namespace dimaskdino {
namespace msda {

enum class ValueType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct Problem {
  int64_t batch;       // B
  int64_t num_value;   // S, tokens of all levels
  int64_t num_heads;   // H
  int64_t channels;    // D, per head
  int64_t num_levels;  // L
  int64_t num_query;   // Q
  int64_t num_points;  // P
};

// All pointers are device pointers to contiguous tensors.
//   value          (B, S, H, D)        of ValueType
//   spatial_shapes (L, 2) int64 (h, w); level_start (L,) int64
//   loc            (B, Q, H, L, P, 2)  float32, normalized (x, y)
//   weight         (B, Q, H, L, P)     float32, already softmaxed
//   out            (B, Q, H, D)        of ValueType, fully written
cudaError_t launch_forward(ValueType value_type, const Problem& problem, const void* value,
                           const int64_t* spatial_shapes, const int64_t* level_start,
                           const float* loc, const float* weight, void* out, cudaStream_t stream);

//   grad_out       (B, Q, H, D)        of ValueType
//   grad_value     (B, S, H, D)        float32, zero-filled by the caller, accumulated into
//   grad_loc       (B, Q, H, L, P, 2)  float32, fully written
//   grad_weight    (B, Q, H, L, P)     float32, fully written
cudaError_t launch_backward(ValueType value_type, const Problem& problem, const void* grad_out,
                            const void* value, const int64_t* spatial_shapes,
                            const int64_t* level_start, const float* loc, const float* weight,
                            float* grad_value, float* grad_loc, float* grad_weight,
                            cudaStream_t stream);

}  // namespace msda
}  // namespace dimaskdino
