// The fused SGLD update on a CUDA GPU: the math of sgld_update.h, the noise of philox.h.
//
// One thread takes one quad (four elements) of one chain (one Philox call per stream), with
// 16-byte vector loads and stores when the quad lies inside the buffer and its addresses are
// aligned; edge quads and quads that index_offset makes misaligned take a scalar path.
// Grid: x strides over quads (64-bit), y over chains. No torch headers: pointers and the
// cudaStream_t arrive as integers through the extern "C" launchers below (loaded with ctypes by
// llc_fast/kernels/cuda_update.py). Build: nvcc -O3 --fmad=false (no contraction, as the torch
// reference computes each operation separately) -shared -Xcompiler -fPIC.
#include <cuda_runtime.h>

#include <cstdint>

#include "philox.h"
#include "sgld_update.h"

namespace llc {
namespace {

constexpr int kThreads = 256;

// Storage of the weights, gradient, w* and statistic: load / store four elements at once.
template <typename S>
struct Vec;

template <>
struct Vec<float> {
  static constexpr uintptr_t kAlign = 16;
  __device__ static void load(const float* p, float (&o)[4]) {
    const float4 v = *reinterpret_cast<const float4*>(p);
    o[0] = v.x; o[1] = v.y; o[2] = v.z; o[3] = v.w;
  }
  __device__ static void store(float* p, const float (&o)[4]) {
    *reinterpret_cast<float4*>(p) = make_float4(o[0], o[1], o[2], o[3]);
  }
};

template <>
struct Vec<double> {
  static constexpr uintptr_t kAlign = 16;
  __device__ static void load(const double* p, double (&o)[4]) {
    const double2 a = reinterpret_cast<const double2*>(p)[0];
    const double2 b = reinterpret_cast<const double2*>(p)[1];
    o[0] = a.x; o[1] = a.y; o[2] = b.x; o[3] = b.y;
  }
  __device__ static void store(double* p, const double (&o)[4]) {
    reinterpret_cast<double2*>(p)[0] = make_double2(o[0], o[1]);
    reinterpret_cast<double2*>(p)[1] = make_double2(o[2], o[3]);
  }
};

template <>
struct Vec<uint16_t> {  // bfloat16 bits
  static constexpr uintptr_t kAlign = 8;
  __device__ static void load(const uint16_t* p, uint16_t (&o)[4]) {
    const ushort4 v = *reinterpret_cast<const ushort4*>(p);
    o[0] = v.x; o[1] = v.y; o[2] = v.z; o[3] = v.w;
  }
  __device__ static void store(uint16_t* p, const uint16_t (&o)[4]) {
    *reinterpret_cast<ushort4*>(p) = make_ushort4(o[0], o[1], o[2], o[3]);
  }
};

template <>
struct Vec<uint8_t> {  // the mask (load only)
  static constexpr uintptr_t kAlign = 4;
  __device__ static void load(const uint8_t* p, uint8_t (&o)[4]) {
    const uchar4 v = *reinterpret_cast<const uchar4*>(p);
    o[0] = v.x; o[1] = v.y; o[2] = v.z; o[3] = v.w;
  }
};

template <typename S>
__device__ __forceinline__ bool aligned4(const S* p) {
  return (reinterpret_cast<uintptr_t>(p) & (Vec<S>::kAlign - 1)) == 0;
}

// Storage value -> compute value, and compute value -> storage value (bf16: stochastic rounding).
__device__ __forceinline__ float to_compute(float x) { return x; }
__device__ __forceinline__ double to_compute(double x) { return x; }
__device__ __forceinline__ float to_compute(uint16_t x) { return bf16_bits_to_float(x); }
__device__ __forceinline__ float to_storage(float x, float*, uint32_t) { return x; }
__device__ __forceinline__ double to_storage(double x, double*, uint32_t) { return x; }
__device__ __forceinline__ uint16_t to_storage(float x, uint16_t*, uint32_t word) { return stochastic_round_bf16(x, word); }

// One quad g (global) of one chain: w_row, g_row: the chain's row of the weights and gradient;
// w_star, stat_row, mask: the same elements' w*, statistic row (or null) and mask (or null), all
// indexed by the local element index e = 4 g + lane - off, valid for 0 <= e < n.
template <typename S, typename T>
__device__ __forceinline__ void update_quad(const UpdateArgs& a, const Hyper<T>& h, S* __restrict__ w_row,
                                             const S* __restrict__ g_row, const S* __restrict__ w_star,
                                             T* __restrict__ stat_row, const uint8_t* __restrict__ mask, int64_t n,
                                             int64_t off, int64_t g, uint32_t chain, T lr_c, T nbeta_c, T gamma_c,
                                             bool row_masks, const RowWindow& rw, int64_t local_start) {
  constexpr bool kBF16 = sizeof(S) == 2;
  Normals4 xi = normals_from_words(quad_words(a.seed, chain, a.step, static_cast<uint64_t>(g), kStreamGaussian));
  if (a.lm_noise) {  // noise_scheme "lm": the mean of this step's normals and the next step's
    const Normals4 next =
        normals_from_words(quad_words(a.seed, chain, a.step + 1, static_cast<uint64_t>(g), kStreamGaussian));
    for (int j = 0; j < 4; ++j) xi.n[j] = 0.5f * (xi.n[j] + next.n[j]);
  }
  Words4 rbits = {{0u, 0u, 0u, 0u}};
  if (kBF16) rbits = quad_words(a.seed, chain, a.step, static_cast<uint64_t>(g), kStreamRounding);
  const int64_t e0 = 4 * g - off;  // local index of lane 0
  S* wp = w_row + e0;
  const S* gp = g_row + e0;
  const S* sp = w_star + e0;
  T* vp = stat_row ? stat_row + e0 : nullptr;
  const uint8_t* mp = mask ? mask + e0 : nullptr;
  const bool full = e0 >= 0 && e0 + 4 <= n;
  const bool vec = full && aligned4(wp) && aligned4(gp) && aligned4(sp) && (!vp || aligned4(vp)) &&
                   (!mp || aligned4(mp));
  if (vec) {
    S wv[4], gv[4], sv[4];
    T vv[4] = {T(0), T(0), T(0), T(0)};
    uint8_t mv[4] = {1, 1, 1, 1};
    Vec<S>::load(wp, wv);
    Vec<S>::load(gp, gv);
    Vec<S>::load(sp, sv);
    if (vp) Vec<T>::load(vp, vv);
    if (mp) Vec<uint8_t>::load(mp, mv);
    if (row_masks) {
#pragma unroll
      for (int j = 0; j < 4; ++j) mv[j] = row_mask_value(a, rw, local_start + e0 + j) ? 1 : 0;
    }
    S out[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const T o = update_element<T>(to_compute(wv[j]), to_compute(gv[j]), to_compute(sv[j]), &vv[j], xi.n[j],
                                    mv[j] != 0, lr_c, nbeta_c, gamma_c, h);
      out[j] = to_storage(o, static_cast<S*>(nullptr), rbits.w[j]);
    }
    Vec<S>::store(wp, out);
    if (vp && h.update_statistic) Vec<T>::store(vp, vv);
  } else {
    const int j0 = e0 < 0 ? static_cast<int>(-e0) : 0;
    const int j1 = e0 + 4 > n ? static_cast<int>(n - e0) : 4;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (j < j0 || j >= j1) continue;
      T v = vp ? vp[j] : T(0);
      const bool m = row_masks ? row_mask_value(a, rw, local_start + e0 + j) : (!mp || mp[j] != 0);
      const T o = update_element<T>(to_compute(wp[j]), to_compute(gp[j]), to_compute(sp[j]), &v, xi.n[j], m, lr_c,
                                    nbeta_c, gamma_c, h);
      wp[j] = to_storage(o, static_cast<S*>(nullptr), rbits.w[j]);
      if (vp && h.update_statistic) vp[j] = v;
    }
  }
}

template <typename S, typename T>
__global__ void __launch_bounds__(kThreads) sgld_update_kernel(UpdateArgs a, Segment seg, int64_t g_first,
                                                               int64_t num_quads) {
  const Hyper<T> h = make_hyper<T>(a);
  S* w = reinterpret_cast<S*>(static_cast<uintptr_t>(seg.w));
  const S* grad = reinterpret_cast<const S*>(static_cast<uintptr_t>(seg.grad));
  const S* w_star = static_cast<const S*>(a.w_star);
  T* stat = static_cast<T*>(a.stat);
  const int64_t n = seg.n;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;

  for (int64_t c = blockIdx.y; c < a.num_rows; c += gridDim.y) {
    const uint32_t chain = static_cast<uint32_t>(a.chain_ids[c]);
    const T lr_c = static_cast<const T*>(a.lr)[c];
    const T nbeta_c = static_cast<const T*>(a.nbeta)[c];
    const T gamma_c = static_cast<const T*>(a.gamma)[c];
    const int64_t row = c * n;
    const bool row_masks = a.row_windows != nullptr;
    RowWindow rw = {0, 0, -1, true};
    if (row_masks) rw = row_window(a, c);  // once per chain row
    for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < num_quads; t += stride) {
      update_quad<S, T>(a, h, w + row, grad + row, w_star, h.preconditioned ? stat + row : nullptr,
                         a.has_mask ? a.mask : nullptr, n, seg.global_offset, g_first + t, chain, lr_c, nbeta_c,
                         gamma_c, row_masks, rw, 0);
    }
  }
}

// All segments of a multi-segment update in one launch. a.segments (device memory): the Segment rows
// [S] followed by first_block [S + 1] (int64): the virtual blocks of kThreads quads of segment s are
// [first_block[s], first_block[s + 1]). blockIdx.x strides over the virtual blocks (a binary search
// finds the segment), y over chain rows. The statistic's rows are n_local long.
template <typename S, typename T>
__global__ void __launch_bounds__(kThreads) sgld_update_segments_kernel(UpdateArgs a) {
  const Hyper<T> h = make_hyper<T>(a);
  const Segment* segs = a.segments;
  const int64_t num_segments = a.num_segments, stat_stride = a.n_local;
  const int64_t* first_block = reinterpret_cast<const int64_t*>(segs + num_segments);
  const int64_t total_blocks = first_block[num_segments];
  const S* w_star = static_cast<const S*>(a.w_star);
  T* stat = static_cast<T*>(a.stat);

  for (int64_t c = blockIdx.y; c < a.num_rows; c += gridDim.y) {
    const uint32_t chain = static_cast<uint32_t>(a.chain_ids[c]);
    const T lr_c = static_cast<const T*>(a.lr)[c];
    const T nbeta_c = static_cast<const T*>(a.nbeta)[c];
    const T gamma_c = static_cast<const T*>(a.gamma)[c];
    const bool row_masks = a.row_windows != nullptr;
    RowWindow rw = {0, 0, -1, true};
    if (row_masks) rw = row_window(a, c);  // once per chain row
    for (int64_t vb = blockIdx.x; vb < total_blocks; vb += gridDim.x) {
      int64_t lo = 0, hi = num_segments - 1;  // the last s with first_block[s] <= vb
      while (lo < hi) {
        const int64_t mid = (lo + hi + 1) / 2;
        if (first_block[mid] <= vb) lo = mid; else hi = mid - 1;
      }
      const Segment seg = segs[lo];
      const int64_t n = seg.n, off = seg.global_offset;
      const int64_t num_quads = (off + n - 1) / 4 + 1 - off / 4;
      const int64_t t = (vb - first_block[lo]) * kThreads + threadIdx.x;
      if (t >= num_quads) continue;
      S* w = reinterpret_cast<S*>(static_cast<uintptr_t>(seg.w));
      const S* grad = reinterpret_cast<const S*>(static_cast<uintptr_t>(seg.grad));
      const int64_t row = c * n;
      update_quad<S, T>(a, h, w + row, grad + row, w_star + seg.local_start,
                         h.preconditioned ? stat + c * stat_stride + seg.local_start : nullptr,
                         a.has_mask ? a.mask + seg.local_start : nullptr, n, off, off / 4 + t, chain, lr_c, nbeta_c,
                         gamma_c, row_masks, rw, seg.local_start);
    }
  }
}

// Philox words, uniforms and normals of elements [start, start + count) of each chain (tests).
__global__ void philox_debug_kernel(uint64_t seed, const int64_t* chain_ids, int64_t num_rows, uint32_t step,
                                    int64_t start, int64_t count, uint32_t stream, uint32_t* words, float* uniforms,
                                    float* normals) {
  const int64_t total = num_rows * count;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = t / count;
    const uint64_t i = static_cast<uint64_t>(start) + static_cast<uint64_t>(t - c * count);
    const Words4 wd = quad_words(seed, static_cast<uint32_t>(chain_ids[c]), step, i / 4, stream);
    const int j = static_cast<int>(i % 4);
    if (words) words[t] = wd.w[j];
    if (uniforms) uniforms[t] = uniform_from_word(wd.w[j]);
    if (normals) normals[t] = normals_from_words(wd).n[j];
  }
}

// Blocks along x for `blocks_needed` blocks of work per chain row: enough resident blocks (16 per SM)
// over the rows of the grid's y (at most 65535) to hide latency.
cudaError_t grid_for(const UpdateArgs& a, int64_t blocks_needed, dim3* grid) {
  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  const int64_t rows_y = a.num_rows < 65535 ? a.num_rows : 65535;
  const int64_t target = static_cast<int64_t>(sms) * 16;
  int64_t blocks_x = (target + rows_y - 1) / rows_y;
  if (blocks_x > blocks_needed) blocks_x = blocks_needed;
  if (blocks_x < 1) blocks_x = 1;
  if (blocks_x > 0x7FFFFFFF) blocks_x = 0x7FFFFFFF;
  *grid = dim3(static_cast<unsigned>(blocks_x), static_cast<unsigned>(rows_y));
  return cudaSuccess;
}

template <typename S, typename T>
cudaError_t launch(const UpdateArgs& a, const Segment& seg) {
  const int64_t g_first = seg.global_offset / 4;
  const int64_t num_quads = (seg.global_offset + seg.n - 1) / 4 + 1 - g_first;
  dim3 grid;
  const cudaError_t err = grid_for(a, (num_quads + kThreads - 1) / kThreads, &grid);
  if (err != cudaSuccess) return err;
  sgld_update_kernel<S, T><<<grid, kThreads, 0, reinterpret_cast<cudaStream_t>(a.stream)>>>(a, seg, g_first, num_quads);
  return cudaGetLastError();
}

template <typename S, typename T>
cudaError_t launch_segments(const UpdateArgs& a) {
  dim3 grid;
  const cudaError_t err = grid_for(a, a.total_blocks, &grid);
  if (err != cudaSuccess) return err;
  sgld_update_segments_kernel<S, T><<<grid, kThreads, 0, reinterpret_cast<cudaStream_t>(a.stream)>>>(a);
  return cudaGetLastError();
}

}  // namespace
}  // namespace llc

// Return codes: a cudaError_t (0 = success), or -1 for bad arguments (the Python side checks
// them first; these checks only keep a wrong call from reading out of bounds). Both update entries
// take the address of an UpdateArgs (sgld_update.h), filled by the host's native.UpdateArgs, and
// launch on its stream.

// One buffer: args->segments is one Segment row in host memory (local_start 0, n = n_local).
extern "C" int llc_sgld_update_cuda(const llc::UpdateArgs* args) {
  using namespace llc;
  if (!args || !valid_args(*args) || args->num_segments > 1) return -1;
  const UpdateArgs& a = *args;
  if (a.num_rows == 0 || a.num_segments == 0) return 0;
  const Segment seg = a.segments[0];
  if (!valid_segment(a, seg) || seg.local_start != 0 || seg.n != a.n_local) return -1;
  if (seg.n == 0) return 0;
  switch (a.dtype) {
    case kFloat32: return static_cast<int>(launch<float, float>(a, seg));
    case kFloat64: return static_cast<int>(launch<double, double>(a, seg));
    case kBFloat16: return static_cast<int>(launch<uint16_t, float>(a, seg));
    default: return -1;
  }
}

extern "C" int llc_philox_debug_cuda(uint64_t seed, uintptr_t chain_ids, int64_t num_rows, uint64_t step,
                                     int64_t start, int64_t count, uint32_t stream_id, uintptr_t words_out,
                                     uintptr_t uniforms_out, uintptr_t normals_out, uintptr_t stream) {
  if (num_rows < 0 || count < 0 || start < 0 || step > 0xFFFFFFFFull || stream_id > 1) return -1;
  if (num_rows == 0 || count == 0) return 0;
  const int64_t total = num_rows * count;
  int64_t blocks = (total + llc::kThreads - 1) / llc::kThreads;
  if (blocks > 65535) blocks = 65535;
  llc::philox_debug_kernel<<<static_cast<unsigned>(blocks), llc::kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      seed, reinterpret_cast<const int64_t*>(chain_ids), num_rows, static_cast<uint32_t>(step), start, count,
      stream_id, reinterpret_cast<uint32_t*>(words_out), reinterpret_cast<float*>(uniforms_out),
      reinterpret_cast<float*>(normals_out));
  return static_cast<int>(cudaGetLastError());
}

extern "C" const char* llc_cuda_error_string(int code) {
  if (code == -1) return "invalid arguments";
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}

// The threads' quad count per virtual block of the segment kernel (the host builds first_block with it).
extern "C" int llc_cuda_segment_block_quads() { return llc::kThreads; }

// The size of UpdateArgs, which the host checks its mirror against.
extern "C" int64_t llc_update_args_size() { return static_cast<int64_t>(sizeof(llc::UpdateArgs)); }

// One update over several segments in one launch. args->segments: device int64 [5 * S + S + 1]: the
// Segment rows (sgld_update.h), then first_block (S + 1 values; first_block[S] = total_blocks, all
// virtual blocks), built and checked by cuda_update.py. Return codes as above.
extern "C" int llc_sgld_update_segments_cuda(const llc::UpdateArgs* args) {
  using namespace llc;
  if (!args || !valid_args(*args) || args->total_blocks < 0) return -1;
  const UpdateArgs& a = *args;
  if (a.num_rows == 0 || a.num_segments == 0 || a.total_blocks == 0) return 0;
  switch (a.dtype) {
    case kFloat32: return static_cast<int>(launch_segments<float, float>(a));
    case kFloat64: return static_cast<int>(launch_segments<double, double>(a));
    case kBFloat16: return static_cast<int>(launch_segments<uint16_t, float>(a));
    default: return -1;
  }
}
