// Device building blocks of the multi-scale deformable attention kernels: typed vector loads and
// stores, vector atomics, per-level metadata staged in shared memory, bilinear corner location and
// group-wide reductions. Torch-free: only CUDA toolkit headers.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstring>

namespace dimaskdino {
namespace msda {
namespace detail {

// ---------------------------------------------------------------------------------------------
// Element conversions. Half and bfloat16 are moved as raw 16-bit words so that the loads do not
// depend on the __ldg overloads of cuda_fp16.h / cuda_bf16.h.

template <typename T>
struct Scalar;

template <>
struct Scalar<float> {
  using Bits = float;
  static __device__ __forceinline__ Bits load(const float* p) { return __ldg(p); }
  static __device__ __forceinline__ float to_float(Bits b) { return b; }
  static __device__ __forceinline__ void store(float* p, float f) { *p = f; }
};

template <>
struct Scalar<__half> {
  using Bits = unsigned short;
  static __device__ __forceinline__ Bits load(const __half* p) {
    return __ldg(reinterpret_cast<const unsigned short*>(p));
  }
  static __device__ __forceinline__ float to_float(Bits b) {
    return __half2float(__ushort_as_half(b));
  }
  static __device__ __forceinline__ void store(__half* p, float f) { *p = __float2half_rn(f); }
};

template <>
struct Scalar<__nv_bfloat16> {
  using Bits = unsigned short;
  static __device__ __forceinline__ Bits load(const __nv_bfloat16* p) {
    return __ldg(reinterpret_cast<const unsigned short*>(p));
  }
  // bfloat16 is the top half of a float32: widening is a shift.
  static __device__ __forceinline__ float to_float(Bits b) {
    return __uint_as_float(static_cast<unsigned>(b) << 16);
  }
  static __device__ __forceinline__ void store(__nv_bfloat16* p, float f) {
    *p = __float2bfloat16_rn(f);
  }
};

template <typename To, typename From>
__device__ __forceinline__ To bit_cast(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast needs equal sizes");
  To to;
  memcpy(&to, &from, sizeof(To));
  return to;
}

// Two packed 16-bit elements (the first in the low half) to two floats.
__device__ __forceinline__ float2 half2_bits_to_float2(unsigned w) {
  return __half22float2(bit_cast<__half2>(w));
}
__device__ __forceinline__ float2 bf162_bits_to_float2(unsigned w) {
  return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u));
}
__device__ __forceinline__ unsigned float2_to_half2_bits(float a, float b) {
  return bit_cast<unsigned>(__floats2half2_rn(a, b));
}
__device__ __forceinline__ unsigned float2_to_bf162_bits(float a, float b) {
  return bit_cast<unsigned>(__floats2bfloat162_rn(a, b));
}

// One 16-byte global store (p 16-byte aligned). Written as PTX because the compiler split the
// equivalent `*reinterpret_cast<uint4*>(p) = v` into four 4-byte stores in these kernels.
__device__ __forceinline__ void store_global_16B(void* p, uint4 v) {
#if defined(__CUDA_ARCH__)
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};"
               :
               : "l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
               : "memory");
#else  // a host compiler (the kernels emulated on the CPU for testing)
  *static_cast<uint4*>(p) = v;
#endif
}

// ---------------------------------------------------------------------------------------------
// VecIO<T, N>: N contiguous elements of T. `load` returns the raw bits (so that several loads can
// be issued before any of them is consumed), `to_float` widens them, `store` narrows and writes.
// N * sizeof(T) is 16 bytes on the fast path (pointer 16-byte aligned) or N == 1.

template <typename T, int N>
struct VecIO;

template <typename T>
struct VecIO<T, 1> {
  using Raw = typename Scalar<T>::Bits;
  static __device__ __forceinline__ Raw load(const T* p) { return Scalar<T>::load(p); }
  static __device__ __forceinline__ void to_float(const Raw& r, float (&f)[1]) {
    f[0] = Scalar<T>::to_float(r);
  }
  static __device__ __forceinline__ void store(T* p, const float (&f)[1]) {
    Scalar<T>::store(p, f[0]);
  }
};

template <>
struct VecIO<float, 4> {
  using Raw = float4;
  static __device__ __forceinline__ Raw load(const float* p) {
    return __ldg(reinterpret_cast<const float4*>(p));
  }
  static __device__ __forceinline__ void to_float(const Raw& r, float (&f)[4]) {
    f[0] = r.x;
    f[1] = r.y;
    f[2] = r.z;
    f[3] = r.w;
  }
  static __device__ __forceinline__ void store(float* p, const float (&f)[4]) {
    store_global_16B(p, make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]),
                                   __float_as_uint(f[2]), __float_as_uint(f[3])));
  }
};

template <>
struct VecIO<__half, 8> {
  using Raw = uint4;
  static __device__ __forceinline__ Raw load(const __half* p) {
    return __ldg(reinterpret_cast<const uint4*>(p));
  }
  static __device__ __forceinline__ void to_float(const Raw& r, float (&f)[8]) {
    const unsigned words[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 two = half2_bits_to_float2(words[i]);
      f[2 * i] = two.x;
      f[2 * i + 1] = two.y;
    }
  }
  static __device__ __forceinline__ void store(__half* p, const float (&f)[8]) {
    store_global_16B(p, make_uint4(float2_to_half2_bits(f[0], f[1]),
                                   float2_to_half2_bits(f[2], f[3]),
                                   float2_to_half2_bits(f[4], f[5]),
                                   float2_to_half2_bits(f[6], f[7])));
  }
};

template <>
struct VecIO<__nv_bfloat16, 8> {
  using Raw = uint4;
  static __device__ __forceinline__ Raw load(const __nv_bfloat16* p) {
    return __ldg(reinterpret_cast<const uint4*>(p));
  }
  static __device__ __forceinline__ void to_float(const Raw& r, float (&f)[8]) {
    const unsigned words[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 two = bf162_bits_to_float2(words[i]);
      f[2 * i] = two.x;
      f[2 * i + 1] = two.y;
    }
  }
  static __device__ __forceinline__ void store(__nv_bfloat16* p, const float (&f)[8]) {
    store_global_16B(p, make_uint4(float2_to_bf162_bits(f[0], f[1]),
                                   float2_to_bf162_bits(f[2], f[3]),
                                   float2_to_bf162_bits(f[4], f[5]),
                                   float2_to_bf162_bits(f[6], f[7])));
  }
};

// Raw bits of N elements at p, or zero bits (0.0 in every type) when the corner lies outside the
// map: grid_sample's zero padding. An outside corner issues no memory access (predicated load).
template <typename T, int N>
__device__ __forceinline__ typename VecIO<T, N>::Raw load_or_zero(const T* p, bool valid) {
  typename VecIO<T, N>::Raw r;
  memset(&r, 0, sizeof(r));
  if (valid) r = VecIO<T, N>::load(p);
  return r;
}

// dst[i] += scale * g[i] for N floats in global memory. On sm_90+ 16-byte groups use the vector
// atomics (one red.global.v4.f32 instead of four); dst is 16-byte aligned whenever N % 4 == 0.
template <int N>
__device__ __forceinline__ void atomic_add_scaled(float* dst, const float (&g)[N], float scale) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr bool kVectorAtomics = N % 4 == 0;
#else
  constexpr bool kVectorAtomics = false;
#endif
  if constexpr (kVectorAtomics) {
#pragma unroll
    for (int i = 0; i < N; i += 4) {
      atomicAdd(reinterpret_cast<float4*>(dst + i),
                make_float4(scale * g[i], scale * g[i + 1], scale * g[i + 2], scale * g[i + 3]));
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) atomicAdd(dst + i, scale * g[i]);
  }
}

// ---------------------------------------------------------------------------------------------
// Level metadata. spatial_shapes / level_start_index are tiny int64 device arrays; every block
// copies them once into shared memory as int32 (h, w, start), so the per-level reads in the hot
// loop are one broadcast 16-byte LDS.

struct Level {
  int h, w, start;
  float hf, wf;
};

// Whether a level's rows [start, start + h * w) lie inside value's num_value tokens: the bound on
// every read of value. On the CPU the op checks the contents of spatial_shapes on the host; a GPU
// check there would cost a device-to-host copy and a sync per call, so the kernels check each
// level while staging it (a few integer ops per level and block). Host-callable for the tests.
__host__ __device__ __forceinline__ bool level_fits(int64_t h, int64_t w, int64_t start,
                                                    int64_t num_value) {
  return h > 0 && w > 0 && start >= 0 && start <= num_value && h <= num_value &&
         w <= num_value && h * w <= num_value - start;
}

// A level that does not fit stops the kernel before any read of value: the message names the
// level, then __trap() aborts the launch (the CUDA context reports a launch failure at the next
// sync, like a device-side assert in PyTorch's own kernels).
__device__ __forceinline__ const int4* stage_levels(const int64_t* spatial_shapes,
                                                    const int64_t* level_start, int num_levels,
                                                    int num_value) {
  extern __shared__ int4 s_levels[];
  for (int l = threadIdx.x; l < num_levels; l += blockDim.x) {
    const int64_t h = spatial_shapes[2 * l], w = spatial_shapes[2 * l + 1], start = level_start[l];
    if (!level_fits(h, w, start, num_value)) {
      printf("dimaskdino ms_deform_attn: spatial_shapes / level_start_index: level %d (h=%lld, "
             "w=%lld, start=%lld) does not lie inside value's %d tokens\n",
             l, static_cast<long long>(h), static_cast<long long>(w),
             static_cast<long long>(start), num_value);
      __trap();
    }
    s_levels[l] = make_int4(static_cast<int>(h), static_cast<int>(w), static_cast<int>(start), 0);
  }
  __syncthreads();
  return s_levels;
}

__device__ __forceinline__ Level read_level(const int4* levels, int l) {
  const int4 v = levels[l];
  return Level{v.x, v.y, v.z, static_cast<float>(v.x), static_cast<float>(v.y)};
}

// ---------------------------------------------------------------------------------------------
// Bilinear sampling geometry of one point in one level.

// Corners in the order (y0, x0), (y0, x1), (y1, x0), (y1, x1): 00, 01, 10, 11.
struct Corners {
  int row;       // value row (token index) of corner 00; out of range when corner 00 is outside the
                 // map, in which case it is only used to reach the other corners
  float fx, fy;  // position inside the cell, in [0, 1)
  bool in00, in01, in10, in11;  // corner inside the map (else it reads as zero)
};

// Pixel coordinates follow grid_sample(align_corners=False): pixel = loc * size - 0.5. Returns
// false (the point contributes nothing) outside (-1, w) x (-1, h); NaN fails every comparison.
__device__ __forceinline__ bool locate_corners(float loc_x, float loc_y, const Level& lv,
                                               Corners& c) {
  // __fmul_rn keeps the multiply out of an FMA: rounding the product, then subtracting, is what the
  // CPU op computes, so both agree on which points fall inside and on floor() near integers.
  const float x = __fmul_rn(loc_x, lv.wf) - 0.5f;
  const float y = __fmul_rn(loc_y, lv.hf) - 0.5f;
  if (!(x > -1.f && y > -1.f && x < lv.wf && y < lv.hf)) return false;
  // Inside that range floor() is in [-1, size - 1], so the int conversion cannot overflow.
  const float x0f = floorf(x);
  const float y0f = floorf(y);
  const int x0 = static_cast<int>(x0f);
  const int y0 = static_cast<int>(y0f);
  c.fx = x - x0f;
  c.fy = y - y0f;
  const bool x0_in = x0 >= 0, x1_in = x0 + 1 < lv.w;
  const bool y0_in = y0 >= 0, y1_in = y0 + 1 < lv.h;
  c.in00 = y0_in && x0_in;
  c.in01 = y0_in && x1_in;
  c.in10 = y1_in && x0_in;
  c.in11 = y1_in && x1_in;
  c.row = lv.start + y0 * lv.w + x0;
  return true;
}

// Bilinear weights of the four corners.
struct CornerWeights {
  float w00, w01, w10, w11;
};

__device__ __forceinline__ CornerWeights bilinear_weights(const Corners& c) {
  const float gx = 1.f - c.fx, gy = 1.f - c.fy;
  return CornerWeights{gy * gx, gy * c.fx, c.fy * gx, c.fy * c.fx};
}

// ---------------------------------------------------------------------------------------------
// Thread groups: G consecutive lanes (G a power of two <= 32) serve one (b, q, h).

// The lanes of this thread's group, for the *_sync intrinsics: groups in one warp may diverge
// (different points fall outside the map, a group past the end), so the mask names only the
// group's own lanes.
__device__ __forceinline__ unsigned group_lane_mask(int group_size) {
  if (group_size >= 32) return 0xffffffffu;
  const int first_lane = (threadIdx.x & 31) & ~(group_size - 1);
  return ((1u << group_size) - 1u) << first_lane;
}

// Butterfly sum over the group: every lane ends with the group total.
__device__ __forceinline__ void group_sum3(float& a, float& b, float& c, int group_size,
                                           unsigned mask) {
  for (int offset = group_size >> 1; offset > 0; offset >>= 1) {
    a += __shfl_xor_sync(mask, a, offset, group_size);
    b += __shfl_xor_sync(mask, b, offset, group_size);
    c += __shfl_xor_sync(mask, c, offset, group_size);
  }
}

}  // namespace detail
}  // namespace msda
}  // namespace dimaskdino
