// Multi-scale deformable attention, CUDA forward and backward (see ms_deform_attn_launch.h for the
// tensor layouts). Torch-free: compiled by plain nvcc.
//
// Thread mapping, shared by both directions: a group of G lanes (a power of two <= 32) serves one
// (b, q, h). Each lane owns VEC contiguous channels moved as one 16-byte vector (8 half/bfloat16 or
// 4 float) when D % VEC == 0 and the pointers are 16-byte aligned; otherwise VEC = 1. With more
// than G vectors per head a lane strides over several. Every lane of a group walks the same
// L * P sampling points, so their loc / weight loads hit one address (a broadcast), and the
// "point outside the map" branch is uniform within the group.
//
// Forward: per point, the four corner vectors are loaded first, then accumulated in float32.
// Backward: per point, each lane scatters weight * corner weight * grad_out into float32 grad_value
// with (vector) atomics and accumulates dot(grad_out, corner value) for the four corners over its
// channels; grad_weight and grad_loc are linear in those four dot products, so each lane forms its
// partials, the group sums them with shuffles, and lane 0 writes.
#include "ms_deform_attn_device.cuh"
#include "ms_deform_attn_launch.h"

#include <climits>

namespace dimaskdino {
namespace msda {
namespace {

using detail::atomic_add_scaled;
using detail::bilinear_weights;
using detail::Corners;
using detail::CornerWeights;
using detail::group_lane_mask;
using detail::group_sum3;
using detail::Level;
using detail::load_or_zero;
using detail::locate_corners;
using detail::read_level;
using detail::stage_levels;
using detail::VecIO;

constexpr int kThreads = 256;  // per block; a multiple of 32 so groups never straddle warps
constexpr int kMaxGroupLog2 = 5;
// Levels are staged in shared memory, 16 bytes each (16 KiB at this limit).
constexpr int64_t kMaxLevels = 1024;

// Sizes shared by both kernels. Products that can exceed 2^31 (B*Q*H, S*H*D) are int64; the rest
// are validated to fit int32 by the launcher.
struct Dims {
  int64_t num_groups;          // B * Q * H
  int64_t groups_per_batch;    // Q * H
  int64_t value_batch_stride;  // S * H * D, elements
  int num_value;               // S: every level must lie inside it
  int heads;                   // H
  int channels;                // D
  int levels;                  // L
  int points;                  // P
  int group_log2;              // log2(G)
};

template <typename T>
struct ForwardParams {
  const T* value;
  const int64_t* spatial_shapes;
  const int64_t* level_start;
  const float* loc;
  const float* weight;
  T* out;
  Dims dims;
};

template <typename T>
struct BackwardParams {
  const T* grad_out;
  const T* value;
  const int64_t* spatial_shapes;
  const int64_t* level_start;
  const float* loc;
  const float* weight;
  float* grad_value;
  float* grad_loc;
  float* grad_weight;
  Dims dims;
};

// Calls fn(k, level, loc_x, loc_y, attention_weight) for the L * P points of one (b, q, h), k being
// the flat point index. The next point's loc / weight are loaded one iteration ahead so that
// their latency overlaps the current point's value gathers.
template <typename Fn>
__device__ __forceinline__ void for_each_point(const int4* levels, int num_levels, int num_points,
                                               const float* __restrict__ loc,
                                               const float* __restrict__ weight, Fn&& fn) {
  const int total = num_levels * num_points;
  if (total == 0) return;
  float next_x = __ldg(loc), next_y = __ldg(loc + 1), next_a = __ldg(weight);
  int k = 0;
  for (int l = 0; l < num_levels; ++l) {
    const Level lv = read_level(levels, l);
    for (int p = 0; p < num_points; ++p, ++k) {
      const float loc_x = next_x, loc_y = next_y, a = next_a;
      const int k_next = min(k + 1, total - 1);  // clamped: the last prefetch is a harmless reload
      next_x = __ldg(loc + 2 * k_next);
      next_y = __ldg(loc + 2 * k_next + 1);
      next_a = __ldg(weight + k_next);
      fn(k, lv, loc_x, loc_y, a);
    }
  }
}

// Element offsets, from a (b, h, channel) base, of the four corners of a located point.
struct CornerOffsets {
  int64_t o00, o01, o10, o11;
};

__device__ __forceinline__ CornerOffsets corner_offsets(const Corners& c, int level_width,
                                                        int row_stride) {
  const int64_t top = static_cast<int64_t>(c.row) * row_stride;
  const int64_t bottom = top + static_cast<int64_t>(level_width) * row_stride;
  return CornerOffsets{top, top + row_stride, bottom, bottom + row_stride};
}

// acc[i] += scale * raw[i] for the VEC channels in `raw`.
template <typename T, int VEC>
__device__ __forceinline__ void accumulate_scaled(const typename VecIO<T, VEC>::Raw& raw,
                                                  float scale, float (&acc)[VEC]) {
  float f[VEC];
  VecIO<T, VEC>::to_float(raw, f);
#pragma unroll
  for (int i = 0; i < VEC; ++i) acc[i] = fmaf(scale, f[i], acc[i]);
}

// dot += sum_i go[i] * raw[i].
template <typename T, int VEC>
__device__ __forceinline__ void accumulate_dot(const typename VecIO<T, VEC>::Raw& raw,
                                               const float (&go)[VEC], float& dot) {
  float f[VEC];
  VecIO<T, VEC>::to_float(raw, f);
#pragma unroll
  for (int i = 0; i < VEC; ++i) dot = fmaf(go[i], f[i], dot);
}

// ------------------------------------------------------------------------------------------------
// Forward

// acc += a * bilinear(value) at one located point, for this lane's VEC channels at value_c.
template <typename T, int VEC>
__device__ __forceinline__ void sample_point(const T* __restrict__ value_c, const Corners& cr,
                                             const CornerOffsets& o, float a, float (&acc)[VEC]) {
  // All four gathers are issued before any is consumed.
  const auto r00 = load_or_zero<T, VEC>(value_c + o.o00, cr.in00);
  const auto r01 = load_or_zero<T, VEC>(value_c + o.o01, cr.in01);
  const auto r10 = load_or_zero<T, VEC>(value_c + o.o10, cr.in10);
  const auto r11 = load_or_zero<T, VEC>(value_c + o.o11, cr.in11);
  const CornerWeights w = bilinear_weights(cr);
  // Outside corners get scale 0 as well as zero data, so that a non-finite attention weight does
  // not turn their 0 into NaN (the reference skips them).
  accumulate_scaled<T, VEC>(r00, cr.in00 ? a * w.w00 : 0.f, acc);
  accumulate_scaled<T, VEC>(r01, cr.in01 ? a * w.w01 : 0.f, acc);
  accumulate_scaled<T, VEC>(r10, cr.in10 ? a * w.w10 : 0.f, acc);
  accumulate_scaled<T, VEC>(r11, cr.in11 ? a * w.w11 : 0.f, acc);
}

// __launch_bounds__(256, 4) caps the kernel at 64 registers, 4 blocks (32 warps) per SM. Without
// the occupancy hint ptxas serialized the four corner gathers against their uses (seen in the
// sm_90a SASS); with it they are issued back to back.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads, 4)
    ms_deform_attn_forward_kernel(const ForwardParams<T> p) {
  const Dims& d = p.dims;
  const int4* levels = stage_levels(p.spatial_shapes, p.level_start, d.levels, d.num_value);

  const int group_size = 1 << d.group_log2;
  const int lane = threadIdx.x & (group_size - 1);
  const int groups_per_block = kThreads >> d.group_log2;
  const int num_vecs = d.channels / VEC;
  const int row_stride = d.heads * d.channels;  // elements between consecutive value tokens
  const int num_samples = d.levels * d.points;

  for (int64_t g = static_cast<int64_t>(blockIdx.x) * groups_per_block +
                   (threadIdx.x >> d.group_log2);
       g < d.num_groups; g += static_cast<int64_t>(gridDim.x) * groups_per_block) {
    // g = (b * Q + q) * H + h indexes (b, q, h) in loc, weight and out.
    const int64_t b = g / d.groups_per_batch;
    const int h = static_cast<int>(g % d.heads);
    const T* value_bh = p.value + b * d.value_batch_stride + static_cast<int64_t>(h) * d.channels;
    const float* loc = p.loc + g * num_samples * 2;
    const float* weight = p.weight + g * num_samples;
    T* out = p.out + g * d.channels;

    for (int v = lane; v < num_vecs; v += group_size) {
      const int c = v * VEC;
      float acc[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] = 0.f;
      for_each_point(levels, d.levels, d.points, loc, weight,
                     [&](int, const Level& lv, float loc_x, float loc_y, float a) {
                       Corners cr;
                       if (!locate_corners(loc_x, loc_y, lv, cr)) return;
                       sample_point<T, VEC>(value_bh + c, cr, corner_offsets(cr, lv.w, row_stride),
                                            a, acc);
                     });
      VecIO<T, VEC>::store(out + c, acc);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Backward

// Dot products of grad_out with the value at each corner, over one lane's channels.
struct CornerDots {
  float d00 = 0.f, d01 = 0.f, d10 = 0.f, d11 = 0.f;
};

// For this lane's VEC channels at offset c of one located point: scatters a * corner weight *
// grad_out into grad_value (atomics; outside corners are skipped) and accumulates the dots.
template <typename T, int VEC>
__device__ __forceinline__ void backprop_point(const T* __restrict__ value_c, float* grad_value_c,
                                               const Corners& cr, const CornerOffsets& o,
                                               const CornerWeights& w, float a,
                                               const float (&go)[VEC], CornerDots& dots) {
  const auto r00 = load_or_zero<T, VEC>(value_c + o.o00, cr.in00);
  const auto r01 = load_or_zero<T, VEC>(value_c + o.o01, cr.in01);
  const auto r10 = load_or_zero<T, VEC>(value_c + o.o10, cr.in10);
  const auto r11 = load_or_zero<T, VEC>(value_c + o.o11, cr.in11);
  // The atomics need only grad_out, so they go out while the gathers are in flight.
  if (cr.in00) atomic_add_scaled<VEC>(grad_value_c + o.o00, go, a * w.w00);
  if (cr.in01) atomic_add_scaled<VEC>(grad_value_c + o.o01, go, a * w.w01);
  if (cr.in10) atomic_add_scaled<VEC>(grad_value_c + o.o10, go, a * w.w10);
  if (cr.in11) atomic_add_scaled<VEC>(grad_value_c + o.o11, go, a * w.w11);
  accumulate_dot<T, VEC>(r00, go, dots.d00);
  accumulate_dot<T, VEC>(r01, go, dots.d01);
  accumulate_dot<T, VEC>(r10, go, dots.d10);
  accumulate_dot<T, VEC>(r11, go, dots.d11);
}

// kOneChunk: every lane owns at most one channel vector (D / VEC <= G), so grad_out is loaded once
// per (b, q, h) and kept in registers across the points. The launch bounds (3 blocks per SM, at
// most 80 registers; 2 for the rarely used multi-chunk variant) keep the four gathers back to
// back and avoid spills, as in the forward.
template <typename T, int VEC, bool kOneChunk>
__global__ void __launch_bounds__(kThreads, kOneChunk ? 3 : 2)
    ms_deform_attn_backward_kernel(const BackwardParams<T> p) {
  using IO = VecIO<T, VEC>;
  const Dims& d = p.dims;
  const int4* levels = stage_levels(p.spatial_shapes, p.level_start, d.levels, d.num_value);

  const int group_size = 1 << d.group_log2;
  const int lane = threadIdx.x & (group_size - 1);
  const unsigned lanes = group_lane_mask(group_size);
  const int groups_per_block = kThreads >> d.group_log2;
  const int num_vecs = d.channels / VEC;
  const int row_stride = d.heads * d.channels;
  const int num_samples = d.levels * d.points;

  for (int64_t g = static_cast<int64_t>(blockIdx.x) * groups_per_block +
                   (threadIdx.x >> d.group_log2);
       g < d.num_groups; g += static_cast<int64_t>(gridDim.x) * groups_per_block) {
    const int64_t b = g / d.groups_per_batch;
    const int h = static_cast<int>(g % d.heads);
    // value and grad_value share the (B, S, H, D) layout.
    const int64_t bh_offset = b * d.value_batch_stride + static_cast<int64_t>(h) * d.channels;
    const T* value_bh = p.value + bh_offset;
    float* grad_value_bh = p.grad_value + bh_offset;
    const T* grad_out = p.grad_out + g * d.channels;
    const float* loc = p.loc + g * num_samples * 2;
    const float* weight = p.weight + g * num_samples;
    float* grad_loc = p.grad_loc + g * num_samples * 2;
    float* grad_weight = p.grad_weight + g * num_samples;

    float go_kept[VEC];  // kOneChunk: this lane's grad_out channels (zero for idle lanes)
#pragma unroll
    for (int i = 0; i < VEC; ++i) go_kept[i] = 0.f;
    if (kOneChunk && lane < num_vecs) IO::to_float(IO::load(grad_out + lane * VEC), go_kept);

    for_each_point(
        levels, d.levels, d.points, loc, weight,
        [&](int k, const Level& lv, float loc_x, float loc_y, float a) {
          float grad_a = 0.f, grad_x = 0.f, grad_y = 0.f;  // stay 0 for points outside the map
          Corners cr;
          if (locate_corners(loc_x, loc_y, lv, cr)) {  // uniform within the group
            const CornerOffsets o = corner_offsets(cr, lv.w, row_stride);
            const CornerWeights w = bilinear_weights(cr);
            CornerDots dots;
            if constexpr (kOneChunk) {
              if (lane < num_vecs) {
                const int c = lane * VEC;
                backprop_point<T, VEC>(value_bh + c, grad_value_bh + c, cr, o, w, a, go_kept,
                                       dots);
              }
            } else {
              // Unrolled only on the scalar path (wider unrolls spill; vectors are 4-8x wider).
#pragma unroll(VEC == 1 ? 2 : 1)
              for (int v = lane; v < num_vecs; v += group_size) {
                const int c = v * VEC;
                float go[VEC];
                IO::to_float(IO::load(grad_out + c), go);
                backprop_point<T, VEC>(value_bh + c, grad_value_bh + c, cr, o, w, a, go, dots);
              }
            }
            // Outside corners read as zero; drop their dots too so that a non-finite grad_out
            // does not leak NaN through them (the reference skips them).
            if (!cr.in00) dots.d00 = 0.f;
            if (!cr.in01) dots.d01 = 0.f;
            if (!cr.in10) dots.d10 = 0.f;
            if (!cr.in11) dots.d11 = 0.f;
            // sampled = w00 v00 + w01 v01 + w10 v10 + w11 v11 with w00 = (1-fy)(1-fx),
            // w01 = (1-fy) fx, w10 = fy (1-fx), w11 = fy fx: d out / d a and the derivatives in
            // fx, fy (= pixel x, y) are all linear in the four dots.
            float d_weight = w.w00 * dots.d00 + w.w01 * dots.d01 + w.w10 * dots.d10 +
                             w.w11 * dots.d11;
            float d_x = (1.f - cr.fy) * (dots.d01 - dots.d00) + cr.fy * (dots.d11 - dots.d10);
            float d_y = (1.f - cr.fx) * (dots.d10 - dots.d00) + cr.fx * (dots.d11 - dots.d01);
            group_sum3(d_weight, d_x, d_y, group_size, lanes);
            grad_a = d_weight;
            // pixel = loc * size - 0.5, so d pixel / d loc = size (w for x, h for y).
            grad_x = a * d_x * lv.wf;
            grad_y = a * d_y * lv.hf;
          }
          if (lane == 0) {
            grad_weight[k] = grad_a;
            grad_loc[2 * k] = grad_x;
            grad_loc[2 * k + 1] = grad_y;
          }
        });
  }
}

// ------------------------------------------------------------------------------------------------
// Launchers

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Rejects sizes the kernels' int32 index math or the shared-memory level table cannot hold.
bool problem_supported(const Problem& pr) {
  const int64_t dims[] = {pr.batch,      pr.num_value, pr.num_heads, pr.channels,
                          pr.num_levels, pr.num_query, pr.num_points};
  for (int64_t v : dims) {
    if (v < 0 || v > INT_MAX) return false;
  }
  if (pr.num_levels > kMaxLevels) return false;
  if (pr.num_heads * pr.channels > INT_MAX) return false;
  if (pr.num_levels * pr.num_points * 2 > INT_MAX) return false;
  return true;
}

// Smallest power of two >= vectors per head, capped at 32 lanes.
int group_log2_for(int64_t num_vecs) {
  int log2 = 0;
  while (log2 < kMaxGroupLog2 && (int64_t{1} << log2) < num_vecs) ++log2;
  return log2;
}

Dims make_dims(const Problem& pr, int vec) {
  Dims d;
  d.num_groups = pr.batch * pr.num_query * pr.num_heads;
  d.groups_per_batch = pr.num_query * pr.num_heads;
  d.value_batch_stride = pr.num_value * pr.num_heads * pr.channels;
  d.num_value = static_cast<int>(pr.num_value);
  d.heads = static_cast<int>(pr.num_heads);
  d.channels = static_cast<int>(pr.channels);
  d.levels = static_cast<int>(pr.num_levels);
  d.points = static_cast<int>(pr.num_points);
  d.group_log2 = group_log2_for(pr.channels / vec);
  return d;
}

dim3 grid_for(const Dims& d) {
  const int64_t groups_per_block = kThreads >> d.group_log2;
  const int64_t blocks = (d.num_groups + groups_per_block - 1) / groups_per_block;
  // The kernels loop over groups, so capping the grid only adds iterations.
  return dim3(static_cast<unsigned>(blocks < INT_MAX ? blocks : INT_MAX));
}

size_t level_smem_bytes(const Problem& pr) {
  return static_cast<size_t>(pr.num_levels) * sizeof(int4);
}

template <typename T>
cudaError_t forward_typed(const Problem& pr, const T* value, const int64_t* spatial_shapes,
                          const int64_t* level_start, const float* loc, const float* weight,
                          T* out, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vectorized = pr.channels % kVec == 0 && aligned16(value) && aligned16(out);
  const int vec = vectorized ? kVec : 1;
  const ForwardParams<T> params{value, spatial_shapes, level_start, loc, weight, out,
                                make_dims(pr, vec)};
  const dim3 grid = grid_for(params.dims);
  const size_t smem = level_smem_bytes(pr);
  if (vectorized) {
    ms_deform_attn_forward_kernel<T, kVec><<<grid, kThreads, smem, stream>>>(params);
  } else {
    ms_deform_attn_forward_kernel<T, 1><<<grid, kThreads, smem, stream>>>(params);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_typed(const Problem& pr, const T* grad_out, const T* value,
                           const int64_t* spatial_shapes, const int64_t* level_start,
                           const float* loc, const float* weight, float* grad_value,
                           float* grad_loc, float* grad_weight, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  // grad_value rows are D floats: D % kVec == 0 (kVec >= 4) keeps them 16-byte aligned too.
  const bool vectorized = pr.channels % kVec == 0 && aligned16(grad_out) && aligned16(value) &&
                          aligned16(grad_value);
  const int vec = vectorized ? kVec : 1;
  const BackwardParams<T> params{grad_out,   value,    spatial_shapes, level_start,
                                 loc,        weight,   grad_value,     grad_loc,
                                 grad_weight, make_dims(pr, vec)};
  const bool one_chunk = pr.channels / vec <= (int64_t{1} << params.dims.group_log2);
  const dim3 grid = grid_for(params.dims);
  const size_t smem = level_smem_bytes(pr);
  if (vectorized && one_chunk) {
    ms_deform_attn_backward_kernel<T, kVec, true><<<grid, kThreads, smem, stream>>>(params);
  } else if (vectorized) {
    ms_deform_attn_backward_kernel<T, kVec, false><<<grid, kThreads, smem, stream>>>(params);
  } else if (one_chunk) {
    ms_deform_attn_backward_kernel<T, 1, true><<<grid, kThreads, smem, stream>>>(params);
  } else {
    ms_deform_attn_backward_kernel<T, 1, false><<<grid, kThreads, smem, stream>>>(params);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_forward(ValueType value_type, const Problem& problem, const void* value,
                           const int64_t* spatial_shapes, const int64_t* level_start,
                           const float* loc, const float* weight, void* out,
                           cudaStream_t stream) {
  if (!problem_supported(problem)) return cudaErrorInvalidValue;
  // Nothing to write: out has no elements.
  if (problem.batch == 0 || problem.num_query == 0 || problem.num_heads == 0 ||
      problem.channels == 0) {
    return cudaSuccess;
  }
  // With no sampling points (L * P == 0) loc and weight are empty and may be null; out is zeroed.
  const bool has_levels = problem.num_levels > 0;
  const bool has_points = has_levels && problem.num_points > 0;
  if (out == nullptr || (has_levels && (spatial_shapes == nullptr || level_start == nullptr)) ||
      (has_points && (loc == nullptr || weight == nullptr))) {
    return cudaErrorInvalidValue;
  }
  switch (value_type) {
    case ValueType::kFloat32:
      return forward_typed(problem, static_cast<const float*>(value), spatial_shapes, level_start,
                           loc, weight, static_cast<float*>(out), stream);
    case ValueType::kFloat16:
      return forward_typed(problem, static_cast<const __half*>(value), spatial_shapes,
                           level_start, loc, weight, static_cast<__half*>(out), stream);
    case ValueType::kBFloat16:
      return forward_typed(problem, static_cast<const __nv_bfloat16*>(value), spatial_shapes,
                           level_start, loc, weight, static_cast<__nv_bfloat16*>(out), stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_backward(ValueType value_type, const Problem& problem, const void* grad_out,
                            const void* value, const int64_t* spatial_shapes,
                            const int64_t* level_start, const float* loc, const float* weight,
                            float* grad_value, float* grad_loc, float* grad_weight,
                            cudaStream_t stream) {
  if (!problem_supported(problem)) return cudaErrorInvalidValue;
  // Nothing to write: grad_loc and grad_weight have no elements, grad_value stays zero.
  if (problem.batch == 0 || problem.num_query == 0 || problem.num_heads == 0 ||
      problem.num_levels == 0 || problem.num_points == 0) {
    return cudaSuccess;
  }
  if (loc == nullptr || weight == nullptr || grad_loc == nullptr || grad_weight == nullptr ||
      spatial_shapes == nullptr || level_start == nullptr) {
    return cudaErrorInvalidValue;
  }
  switch (value_type) {
    case ValueType::kFloat32:
      return backward_typed(problem, static_cast<const float*>(grad_out),
                            static_cast<const float*>(value), spatial_shapes, level_start, loc,
                            weight, grad_value, grad_loc, grad_weight, stream);
    case ValueType::kFloat16:
      return backward_typed(problem, static_cast<const __half*>(grad_out),
                            static_cast<const __half*>(value), spatial_shapes, level_start, loc,
                            weight, grad_value, grad_loc, grad_weight, stream);
    case ValueType::kBFloat16:
      return backward_typed(problem, static_cast<const __nv_bfloat16*>(grad_out),
                            static_cast<const __nv_bfloat16*>(value), spatial_shapes, level_start,
                            loc, weight, grad_value, grad_loc, grad_weight, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace msda
}  // namespace dimaskdino
