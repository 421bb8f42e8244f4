// The fused SGLD update on a CUDA GPU: the math of sgld_update.h, the noise of philox.h.
//
// One thread takes one group of four elements of one chain (one Philox call per stream), with
// 16-byte vector loads and stores when the group lies inside the buffer and its addresses are
// aligned; edge groups and groups that index_offset makes misaligned take a scalar path.
// Grid: x strides over groups (64-bit), y over chains. No torch headers: pointers and the
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

// One group g (global) of one chain: w_row, g_row: the chain's row of the weights and gradient;
// w_star, stat_row, mask: the same elements' w*, statistic row (or null) and mask (or null), all
// indexed by the local element index e = 4 g + lane - off, valid for 0 <= e < n.
template <typename S, typename T>
__device__ __forceinline__ void update_group(const UpdateArgs& a, const Hyper<T>& h, S* __restrict__ w_row,
                                             const S* __restrict__ g_row, const S* __restrict__ w_star,
                                             T* __restrict__ stat_row, const uint8_t* __restrict__ mask, int64_t n,
                                             int64_t off, int64_t g, uint32_t chain, T lr_c, T nbeta_c, T gamma_c,
                                             bool row_masks, const RowWindow& rw, int64_t local_start) {
  constexpr bool kBF16 = sizeof(S) == 2;
  const Normals4 xi = normals_from_words(group_words(a.seed, chain, a.step, static_cast<uint64_t>(g), kStreamGaussian));
  Words4 rbits = {{0u, 0u, 0u, 0u}};
  if (kBF16) rbits = group_words(a.seed, chain, a.step, static_cast<uint64_t>(g), kStreamRounding);
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
__global__ void __launch_bounds__(kThreads) sgld_update_kernel(UpdateArgs a, int64_t g_first, int64_t num_groups) {
  const Hyper<T> h = make_hyper<T>(a);
  S* w = static_cast<S*>(a.w);
  const S* grad = static_cast<const S*>(a.grad);
  const S* w_star = static_cast<const S*>(a.w_star);
  T* stat = static_cast<T*>(a.stat);
  const int64_t n = a.n;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;

  for (int64_t c = blockIdx.y; c < a.num_chains; c += gridDim.y) {
    const uint32_t chain = static_cast<uint32_t>(a.chain_ids[c]);
    const T lr_c = static_cast<const T*>(a.lr)[c];
    const T nbeta_c = static_cast<const T*>(a.nbeta)[c];
    const T gamma_c = static_cast<const T*>(a.gamma)[c];
    const int64_t row = c * n;
    const bool row_masks = a.row_windows != nullptr;
    RowWindow rw = {0, 0, -1, true};
    if (row_masks) rw = row_window(a, c);  // once per chain row
    for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < num_groups; t += stride) {
      update_group<S, T>(a, h, w + row, grad + row, w_star, h.preconditioned ? stat + row : nullptr,
                         a.has_mask ? a.mask : nullptr, n, a.index_offset, g_first + t, chain, lr_c, nbeta_c, gamma_c,
                         row_masks, rw, 0);
    }
  }
}

// All segments of a multi-segment update in one launch. table: the Segment rows [S] followed by
// first_block [S + 1] (int64): the virtual blocks of kThreads groups of segment s are
// [first_block[s], first_block[s + 1]). blockIdx.x strides over the virtual blocks (a binary search
// finds the segment), y over chains. stat_stride: the statistic's row length (n_local).
template <typename S, typename T>
__global__ void __launch_bounds__(kThreads) sgld_update_segments_kernel(UpdateArgs a, const int64_t* __restrict__ table,
                                                                       int64_t num_segments, int64_t stat_stride) {
  const Hyper<T> h = make_hyper<T>(a);
  const Segment* segs = reinterpret_cast<const Segment*>(table);
  const int64_t* first_block = table + 5 * num_segments;
  const int64_t total_blocks = first_block[num_segments];
  const S* w_star = static_cast<const S*>(a.w_star);
  T* stat = static_cast<T*>(a.stat);

  for (int64_t c = blockIdx.y; c < a.num_chains; c += gridDim.y) {
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
      const int64_t num_groups = (off + n - 1) / 4 + 1 - off / 4;
      const int64_t t = (vb - first_block[lo]) * kThreads + threadIdx.x;
      if (t >= num_groups) continue;
      S* w = reinterpret_cast<S*>(static_cast<uintptr_t>(seg.w));
      const S* grad = reinterpret_cast<const S*>(static_cast<uintptr_t>(seg.grad));
      const int64_t row = c * n;
      update_group<S, T>(a, h, w + row, grad + row, w_star + seg.local_start,
                         h.preconditioned ? stat + c * stat_stride + seg.local_start : nullptr,
                         a.has_mask ? a.mask + seg.local_start : nullptr, n, off, off / 4 + t, chain, lr_c, nbeta_c,
                         gamma_c, row_masks, rw, seg.local_start);
    }
  }
}

// Philox words, uniforms and normals of elements [start, start + count) of each chain (tests).
__global__ void philox_debug_kernel(uint64_t seed, const int64_t* chain_ids, int64_t num_chains, uint32_t step,
                                    int64_t start, int64_t count, uint32_t stream, uint32_t* words, float* uniforms,
                                    float* normals) {
  const int64_t total = num_chains * count;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = t / count;
    const uint64_t i = static_cast<uint64_t>(start) + static_cast<uint64_t>(t - c * count);
    const Words4 wd = group_words(seed, static_cast<uint32_t>(chain_ids[c]), step, i / 4, stream);
    const int j = static_cast<int>(i % 4);
    if (words) words[t] = wd.w[j];
    if (uniforms) uniforms[t] = uniform_from_word(wd.w[j]);
    if (normals) normals[t] = normals_from_words(wd).n[j];
  }
}

template <typename S, typename T>
cudaError_t launch(const UpdateArgs& a, cudaStream_t stream) {
  const int64_t g_first = a.index_offset / 4;
  const int64_t num_groups = (a.index_offset + a.n - 1) / 4 + 1 - g_first;
  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  const int64_t chains_y = a.num_chains < 65535 ? a.num_chains : 65535;
  const int64_t blocks_needed = (num_groups + kThreads - 1) / kThreads;
  const int64_t target = static_cast<int64_t>(sms) * 16;  // enough resident blocks to hide latency
  int64_t blocks_x = (target + chains_y - 1) / chains_y;
  if (blocks_x > blocks_needed) blocks_x = blocks_needed;
  if (blocks_x < 1) blocks_x = 1;
  if (blocks_x > 0x7FFFFFFF) blocks_x = 0x7FFFFFFF;
  const dim3 grid(static_cast<unsigned>(blocks_x), static_cast<unsigned>(chains_y));
  sgld_update_kernel<S, T><<<grid, kThreads, 0, stream>>>(a, g_first, num_groups);
  return cudaGetLastError();
}

template <typename S, typename T>
cudaError_t launch_segments(const UpdateArgs& a, const int64_t* table, int64_t num_segments, int64_t total_blocks,
                            cudaStream_t stream) {
  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  const int64_t chains_y = a.num_chains < 65535 ? a.num_chains : 65535;
  const int64_t target = static_cast<int64_t>(sms) * 16;
  int64_t blocks_x = (target + chains_y - 1) / chains_y;
  if (blocks_x > total_blocks) blocks_x = total_blocks;
  if (blocks_x < 1) blocks_x = 1;
  const dim3 grid(static_cast<unsigned>(blocks_x), static_cast<unsigned>(chains_y));
  sgld_update_segments_kernel<S, T><<<grid, kThreads, 0, stream>>>(a, table, num_segments, a.n);
  return cudaGetLastError();
}

}  // namespace
}  // namespace llc

// Return codes: a cudaError_t (0 = success), or -1 for bad arguments (the Python side checks
// them first; these checks only keep a wrong call from reading out of bounds).
extern "C" int llc_sgld_update_cuda(uintptr_t w, uintptr_t grad, uintptr_t w_star, uintptr_t stat, uintptr_t mask,
                                    uintptr_t row_windows, uintptr_t row_mask, uintptr_t lr, uintptr_t nbeta, uintptr_t gamma, uintptr_t chain_ids,
                                    int64_t num_chains, int64_t n, uint64_t seed, uint64_t step, double stat_scale,
                                    int32_t sampler, int32_t update_statistic, int32_t has_mask, int32_t has_box,
                                    double alpha, double one_minus_alpha, double eps, double weight_decay, double box,
                                    double noise_level, int64_t index_offset, int32_t dtype, uintptr_t stream) {
  using namespace llc;
  if (num_chains < 0 || n < 0 || index_offset < 0 || n > INT64_MAX - index_offset - 4 || step > 0xFFFFFFFFull ||
      sampler < kSGLD || sampler > kRMSPropBC || (num_chains > 0 && n > INT64_MAX / num_chains))
    return -1;
  if (num_chains == 0 || n == 0) return 0;
  UpdateArgs a;
  a.w = reinterpret_cast<void*>(w);
  a.grad = reinterpret_cast<const void*>(grad);
  a.w_star = reinterpret_cast<const void*>(w_star);
  a.stat = reinterpret_cast<void*>(stat);
  a.mask = has_mask ? reinterpret_cast<const uint8_t*>(mask) : nullptr;
  a.row_windows = reinterpret_cast<const int64_t*>(row_windows);
  a.row_mask = reinterpret_cast<const uint8_t*>(row_mask);
  a.lr = reinterpret_cast<const void*>(lr);
  a.nbeta = reinterpret_cast<const void*>(nbeta);
  a.gamma = reinterpret_cast<const void*>(gamma);
  a.chain_ids = reinterpret_cast<const int64_t*>(chain_ids);
  a.num_chains = num_chains;
  a.n = n;
  a.index_offset = index_offset;
  set_scalars(a, seed, step, stat_scale, sampler, update_statistic != 0, has_mask != 0, has_box != 0, alpha,
              one_minus_alpha, eps, weight_decay, box, noise_level, dtype);
  if (!a.w || !a.grad || !a.w_star || !a.lr || !a.nbeta || !a.gamma || !a.chain_ids || (sampler != kSGLD && !a.stat) ||
      (a.has_mask && !a.mask) || (a.row_windows && (a.has_mask || !a.row_mask)))
    return -1;
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kFloat32: return static_cast<int>(launch<float, float>(a, s));
    case kFloat64: return static_cast<int>(launch<double, double>(a, s));
    case kBFloat16: return static_cast<int>(launch<uint16_t, float>(a, s));
    default: return -1;
  }
}

extern "C" int llc_philox_debug_cuda(uint64_t seed, uintptr_t chain_ids, int64_t num_chains, uint64_t step,
                                     int64_t start, int64_t count, uint32_t stream_id, uintptr_t words_out,
                                     uintptr_t uniforms_out, uintptr_t normals_out, uintptr_t stream) {
  if (num_chains < 0 || count < 0 || start < 0 || step > 0xFFFFFFFFull || stream_id > 1) return -1;
  if (num_chains == 0 || count == 0) return 0;
  const int64_t total = num_chains * count;
  int64_t blocks = (total + llc::kThreads - 1) / llc::kThreads;
  if (blocks > 65535) blocks = 65535;
  llc::philox_debug_kernel<<<static_cast<unsigned>(blocks), llc::kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      seed, reinterpret_cast<const int64_t*>(chain_ids), num_chains, static_cast<uint32_t>(step), start, count,
      stream_id, reinterpret_cast<uint32_t*>(words_out), reinterpret_cast<float*>(uniforms_out),
      reinterpret_cast<float*>(normals_out));
  return static_cast<int>(cudaGetLastError());
}

extern "C" const char* llc_cuda_error_string(int code) {
  if (code == -1) return "invalid arguments";
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}

// The threads' group count per virtual block of the segment kernel (the host builds first_block with it).
extern "C" int llc_cuda_segment_block_groups() { return llc::kThreads; }

// One update over several segments in one launch. table: device int64 [5 * S + S + 1]: the Segment
// rows (sgld_update.h), then first_block (S + 1 values; first_block[S] = all virtual blocks), built
// and checked by cuda_update.py. w_star, mask: [n_local]; stat: [C, n_local]. Return codes as above.
extern "C" int llc_sgld_update_segments_cuda(uintptr_t table, int64_t num_segments, int64_t total_blocks,
                                             uintptr_t w_star, uintptr_t stat, uintptr_t mask, uintptr_t row_windows,
                                             uintptr_t row_mask, uintptr_t lr,
                                             uintptr_t nbeta, uintptr_t gamma, uintptr_t chain_ids,
                                             int64_t num_chains, int64_t n_local, uint64_t seed, uint64_t step,
                                             double stat_scale, int32_t sampler, int32_t update_statistic,
                                             int32_t has_mask, int32_t has_box, double alpha, double one_minus_alpha,
                                             double eps, double weight_decay, double box, double noise_level,
                                             int32_t dtype, uintptr_t stream) {
  using namespace llc;
  if (num_chains < 0 || n_local < 0 || num_segments < 0 || total_blocks < 0 || step > 0xFFFFFFFFull ||
      sampler < kSGLD || sampler > kRMSPropBC || (num_chains > 0 && n_local > INT64_MAX / num_chains))
    return -1;
  if (num_chains == 0 || num_segments == 0 || total_blocks == 0) return 0;
  UpdateArgs a;
  a.w = nullptr;
  a.grad = nullptr;
  a.w_star = reinterpret_cast<const void*>(w_star);
  a.stat = reinterpret_cast<void*>(stat);
  a.mask = has_mask ? reinterpret_cast<const uint8_t*>(mask) : nullptr;
  a.row_windows = reinterpret_cast<const int64_t*>(row_windows);
  a.row_mask = reinterpret_cast<const uint8_t*>(row_mask);
  a.lr = reinterpret_cast<const void*>(lr);
  a.nbeta = reinterpret_cast<const void*>(nbeta);
  a.gamma = reinterpret_cast<const void*>(gamma);
  a.chain_ids = reinterpret_cast<const int64_t*>(chain_ids);
  a.num_chains = num_chains;
  a.n = n_local;
  a.index_offset = 0;
  set_scalars(a, seed, step, stat_scale, sampler, update_statistic != 0, has_mask != 0, has_box != 0, alpha,
              one_minus_alpha, eps, weight_decay, box, noise_level, dtype);
  const int64_t* t = reinterpret_cast<const int64_t*>(table);
  if (!t || !a.w_star || !a.lr || !a.nbeta || !a.gamma || !a.chain_ids || (sampler != kSGLD && !a.stat) ||
      (a.has_mask && !a.mask) || (a.row_windows && (a.has_mask || !a.row_mask)))
    return -1;
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kFloat32: return static_cast<int>(launch_segments<float, float>(a, t, num_segments, total_blocks, s));
    case kFloat64: return static_cast<int>(launch_segments<double, double>(a, t, num_segments, total_blocks, s));
    case kBFloat16: return static_cast<int>(launch_segments<uint16_t, float>(a, t, num_segments, total_blocks, s));
    default: return -1;
  }
}
