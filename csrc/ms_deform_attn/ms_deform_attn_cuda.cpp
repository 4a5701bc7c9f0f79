// Multi-scale deformable attention on CUDA: the PyTorch side of the torch-free kernels in
// cuda/ms_deform_attn_kernels.cu (interface: cuda/ms_deform_attn_launch.h). Built only when torch
// has CUDA (setup.py). Value may be float32 / float16 / bfloat16; sampling locations and attention
// weights are converted to float32, and the kernels accumulate in float32.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
// at::cuda::getCurrentCUDAStream comes from c10/cuda/CUDAStream.h; ATen/cuda/CUDAContext.h would
// also pull in the cuBLAS / cuSPARSE / cuSOLVER headers, which this file does not need.
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>
#include <tuple>

#include "common/check.h"
#include "ms_deform_attn/ms_deform_attn_checks.h"
#include "ms_deform_attn/cuda/ms_deform_attn_launch.h"

namespace dimaskdino {
namespace {

// The kernels stage the level table in shared memory (16 bytes a level) and index with int32
// where it is provably safe; these limits mirror the checks in launch_forward / launch_backward,
// so that a user sees which size is out of range instead of "invalid argument".
constexpr int64_t kMaxLevels = 1024;

msda::ValueType value_type_of(const at::Tensor& value) {
  switch (value.scalar_type()) {
    case at::kFloat:
      return msda::ValueType::kFloat32;
    case at::kHalf:
      return msda::ValueType::kFloat16;
    case at::kBFloat16:
      return msda::ValueType::kBFloat16;
    default:
      DIMASKDINO_CHECK_ARG(false, "value",
                           "the CUDA op supports float32, float16 and bfloat16 values, got ",
                           value.scalar_type(),
                           " (float64 runs on the CPU op or the Python reference)");
  }
  return msda::ValueType::kFloat32;  // unreachable
}

void check_on_device(const at::Tensor& t, const char* name, const at::Device& device) {
  DIMASKDINO_CHECK_ARG(t.is_cuda(), name, "expected a CUDA tensor, got ", t.device());
  DIMASKDINO_CHECK_ARG(t.device() == device, name, "expected it on ", device,
                       " with value, got ", t.device());
}

// Shapes, dtypes and devices; returns the problem sizes.
msda::Problem check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                           const at::Tensor& level_start_index,
                           const at::Tensor& sampling_locations,
                           const at::Tensor& attention_weights) {
  DIMASKDINO_CHECK_ARG(value.is_cuda(), "value", "expected a CUDA tensor, got ", value.device());
  const at::Device device = value.device();
  check_on_device(spatial_shapes, "spatial_shapes", device);
  check_on_device(level_start_index, "level_start_index", device);
  check_on_device(sampling_locations, "sampling_locations", device);
  check_on_device(attention_weights, "attention_weights", device);

  value_type_of(value);
  const MsdaSizes sizes = check_msda_inputs(value, spatial_shapes, level_start_index,
                                            sampling_locations, attention_weights);
  const int64_t L = sizes.num_levels;
  const msda::Problem problem{sizes.batch,      sizes.num_value, sizes.num_heads, sizes.channels,
                              sizes.num_levels, sizes.num_query, sizes.num_points};
  DIMASKDINO_CHECK_ARG(L <= kMaxLevels, "spatial_shapes", "the CUDA op supports at most ",
                       kMaxLevels, " levels, got ", L);
  DIMASKDINO_CHECK_ARG(problem.num_value <= INT_MAX, "value", "at most ", INT_MAX,
                       " tokens (S) per batch element, got ", problem.num_value);
  DIMASKDINO_CHECK_ARG(problem.num_heads * problem.channels <= INT_MAX, "value",
                       "H * D must fit in int32, got ", problem.num_heads, " * ", problem.channels);
  DIMASKDINO_CHECK_ARG(problem.batch <= INT_MAX && problem.num_query <= INT_MAX &&
                           problem.num_points <= INT_MAX &&
                           problem.num_levels * problem.num_points * 2 <= INT_MAX,
                       "sampling_locations", "sizes must fit in int32 (and L * P * 2 too), got ",
                       sampling_locations.sizes());
  return problem;
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err != cudaErrorInvalidValue, "dimaskdino: ", op,
              ": the CUDA kernel launch was rejected (", cudaGetErrorString(err),
              "): unsupported sizes or pointers");
  C10_CUDA_CHECK(err);
}

at::Tensor ms_deform_attn_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                               const at::Tensor& level_start_index,
                               const at::Tensor& sampling_locations,
                               const at::Tensor& attention_weights) {
  const msda::Problem n = check_inputs(value, spatial_shapes, level_start_index,
                                       sampling_locations, attention_weights);
  const c10::cuda::CUDAGuard guard(value.device());
  const auto value_c = value.contiguous();
  const auto shapes_c = spatial_shapes.contiguous();
  const auto starts_c = level_start_index.contiguous();
  const auto loc_c = sampling_locations.to(at::kFloat).contiguous();
  const auto weight_c = attention_weights.to(at::kFloat).contiguous();
  auto out = at::empty({n.batch, n.num_query, n.num_heads, n.channels}, value_c.options());

  const cudaError_t err = msda::launch_forward(
      value_type_of(value), n, value_c.const_data_ptr(), shapes_c.const_data_ptr<int64_t>(),
      starts_c.const_data_ptr<int64_t>(), loc_c.const_data_ptr<float>(),
      weight_c.const_data_ptr<float>(), out.mutable_data_ptr(),
      at::cuda::getCurrentCUDAStream());
  check_launch(err, "ms_deform_attn");
  return out.view({n.batch, n.num_query, n.num_heads * n.channels});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  const msda::Problem n = check_inputs(value, spatial_shapes, level_start_index,
                                       sampling_locations, attention_weights);
  check_on_device(grad_output, "grad_output", value.device());
  DIMASKDINO_CHECK_ARG(grad_output.numel() == n.batch * n.num_query * n.num_heads * n.channels,
                       "grad_output", "expected (B, Q, H*D) = (", n.batch, ", ", n.num_query,
                       ", ", n.num_heads * n.channels, "), got ", grad_output.sizes());
  const c10::cuda::CUDAGuard guard(value.device());
  const auto grad_c = grad_output.to(value.scalar_type()).contiguous();
  const auto value_c = value.contiguous();
  const auto shapes_c = spatial_shapes.contiguous();
  const auto starts_c = level_start_index.contiguous();
  const auto loc_c = sampling_locations.to(at::kFloat).contiguous();
  const auto weight_c = attention_weights.to(at::kFloat).contiguous();
  // grad_value is accumulated with float32 atomics, then cast to value's dtype.
  auto grad_value = at::zeros(value.sizes(), value_c.options().dtype(at::kFloat));
  auto grad_loc = at::empty(sampling_locations.sizes(), loc_c.options());
  auto grad_weight = at::empty(attention_weights.sizes(), weight_c.options());

  const cudaError_t err = msda::launch_backward(
      value_type_of(value), n, grad_c.const_data_ptr(), value_c.const_data_ptr(),
      shapes_c.const_data_ptr<int64_t>(), starts_c.const_data_ptr<int64_t>(),
      loc_c.const_data_ptr<float>(), weight_c.const_data_ptr<float>(),
      grad_value.mutable_data_ptr<float>(), grad_loc.mutable_data_ptr<float>(),
      grad_weight.mutable_data_ptr<float>(), at::cuda::getCurrentCUDAStream());
  check_launch(err, "_ms_deform_attn_backward");
  return {grad_value.to(value.scalar_type()), grad_loc.to(sampling_locations.scalar_type()),
          grad_weight.to(attention_weights.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(dimaskdino, CUDA, m) {
  m.impl("ms_deform_attn", &ms_deform_attn_cuda);
  m.impl("_ms_deform_attn_backward", &ms_deform_attn_backward_cuda);
}

}  // namespace dimaskdino
