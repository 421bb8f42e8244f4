// One SGLD / RMSProp-SGLD step of one element, shared by the C++ (OpenMP) and CUDA kernels.
//
// The math and the order of operations are those of llc_fast/kernels/reference.py
// (docs/update.md); every operation below is one correctly rounded operation there too, so with
// -ffp-contract=off (host) / --fmad=false (device) the only difference from the reference is in
// the normal xi (an ulp or two of float32 log/cos/sin).
#pragma once

#include <cstdint>
#include <climits>

#include "philox.h"

namespace llc {

// Storage codes of the weights (and of grad and w*). The statistic V is float32, float64 for
// float64 weights; bfloat16 weights are passed as their uint16 bit patterns.
enum DType : int32_t { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2 };

// Sampler codes: 0 "sgld" (G = 1), 1 "rmsprop_sgld", 2 "rmsprop_sgld_bc". The bias correction
// enters only through stat_scale (s_t, computed by the host), so the kernels only ask whether
// the sampler is preconditioned.
enum Sampler : int32_t { kSGLD = 0, kRMSProp = 1, kRMSPropBC = 2 };

// One segment of an update (a sharded rank's local shard of one parameter, or the whole buffer): its
// own [C, n] weights and gradient, and where it sits in the flat per-rank buffers ([N_local] w* and
// mask, [C, N_local] statistic: columns [local_start, local_start + n)) and in the global flat
// vector (element j gets the noise of global index global_offset + j). The host passes a table of
// these as int64 [S, 5]: w pointer, grad pointer, n, local_start, global_offset.
struct Segment {
  int64_t w;     // pointer, as an integer
  int64_t grad;  // pointer, as an integer
  int64_t n;
  int64_t local_start;
  int64_t global_offset;
};
static_assert(sizeof(Segment) == 5 * sizeof(int64_t), "Segment is the host's int64 [S, 5] table row");

// The one argument of every update entry point (the C++ module's sgld_update; the CUDA library's
// llc_sgld_update_cuda and llc_sgld_update_segments_cuda), passed by address. The host fills it
// through its mirror, the ctypes.Structure native.UpdateArgs (llc_fast/kernels/native.py): the same
// fields in the same order, so that adding an argument is one field here and one there. Host
// scalars are held in float64 and rounded once to the compute type T, as torch does with a Python
// scalar or torch.tensor(x, T).
struct UpdateArgs {
  // The segments: num_segments rows. Host memory for the C++ kernel and CUDA's single-buffer entry
  // (one row); device memory for CUDA's segment entry, followed there by first_block
  // (sgld_update_cuda.cu), whose last value total_blocks repeats.
  const Segment* segments;
  int64_t num_segments;
  int64_t total_blocks;
  // [N_local] w* and mask (uint8 0/1, or null), [C, N_local] statistic (or null)
  const void* w_star;
  void* stat;
  const uint8_t* mask;
  // Per-row masks (RowMasks, llc_fast/kernels/update_spec.py), or both null: row_windows is int64
  // [C, 3], row c's (lo, hi, offset) resolved by the host (offset < 0: row c is unrestricted);
  // row c's mask of local element i is lo <= i < hi ? row_mask[offset + i - lo] : 0. When set,
  // has_mask is false and mask is null.
  const int64_t* row_windows;
  const uint8_t* row_mask;
  // [C] per-row lr, nbeta, gamma (float32; float64 for float64 weights) and chain indices
  const void* lr;
  const void* nbeta;
  const void* gamma;
  const int64_t* chain_ids;
  int64_t num_rows;  // C
  int64_t n_local;   // N_local: elements of w*, of the mask and of a statistic row
  uint64_t seed;
  uint64_t step;      // in [0, 2^32)
  double stat_scale;  // s_t
  int32_t sampler;
  bool update_statistic;
  bool has_mask;
  bool has_box;
  bool lm_noise;  // noise_scheme "lm": xi = (xi_step + xi_{step+1}) / 2
  double alpha, one_minus_alpha, eps, weight_decay, box, noise_level;
  int32_t dtype;
  int32_t num_threads;  // the C++ kernel's OpenMP threads (0: all)
  uint64_t stream;      // the CUDA kernels' cudaStream_t
};

// Whether the scalars and sizes of an update are in range and the pointers it reads are set
// (callers check the segments themselves).
inline bool valid_args(const UpdateArgs& a) {
  if (a.num_rows < 0 || a.n_local < 0 || a.num_segments < 0 || a.step > 0xFFFFFFFFull) return false;
  if (a.lm_noise && a.step == 0xFFFFFFFFull) return false;  // the next step's normals need step + 1
  if (a.num_rows > 0 && a.n_local > INT64_MAX / a.num_rows) return false;
  if (a.sampler < kSGLD || a.sampler > kRMSPropBC) return false;
  if (a.dtype != kFloat32 && a.dtype != kFloat64 && a.dtype != kBFloat16) return false;
  if (a.num_rows == 0 || a.num_segments == 0) return true;  // nothing is read
  return a.segments && a.w_star && a.lr && a.nbeta && a.gamma && a.chain_ids && (a.sampler == kSGLD || a.stat) &&
         (!a.has_mask || a.mask) && (!a.row_windows || (!a.has_mask && a.row_mask));
}

// Whether a segment fits the flat buffers and the global index range (host memory only).
inline bool valid_segment(const UpdateArgs& a, const Segment& g) {
  return g.n >= 0 && g.local_start >= 0 && g.local_start <= a.n_local - g.n && g.global_offset >= 0 &&
         g.n <= INT64_MAX - g.global_offset - 4 && (g.n == 0 || (g.w && g.grad)) &&
         (a.num_rows == 0 || g.n <= INT64_MAX / a.num_rows);
}

template <typename T>
struct Hyper {  // the scalars of one update, in the compute type
  T alpha, one_minus_alpha, scale, eps, weight_decay, box, noise_level;
  bool preconditioned, update_statistic, has_wd, has_box;
};

template <typename T>
LLC_HD Hyper<T> make_hyper(const UpdateArgs& a) {
  Hyper<T> h;
  h.alpha = static_cast<T>(a.alpha);
  h.one_minus_alpha = static_cast<T>(a.one_minus_alpha);
  h.scale = static_cast<T>(a.stat_scale);
  h.eps = static_cast<T>(a.eps);
  h.weight_decay = static_cast<T>(a.weight_decay);
  h.box = static_cast<T>(a.box);
  h.noise_level = static_cast<T>(a.noise_level);
  h.preconditioned = a.sampler != kSGLD;
  h.update_statistic = a.update_statistic;
  h.has_wd = a.weight_decay != 0.0;  // the reference adds wd*w only when weight_decay is nonzero
  h.has_box = a.has_box;
  return h;
}

LLC_HD float t_sqrt(float x) { return sqrtf(x); }
LLC_HD double t_sqrt(double x) { return sqrt(x); }

// Row c's window of a per-row mask (UpdateArgs::row_windows): elements [lo, hi) of the local
// flat index take row_mask[offset + i - lo], the others 0; unrestricted rows take 1.
struct RowWindow {
  int64_t lo, hi, offset;
  bool unrestricted;
};

LLC_HD RowWindow row_window(const UpdateArgs& a, int64_t c) {
  RowWindow r;
  r.lo = a.row_windows[3 * c];
  r.hi = a.row_windows[3 * c + 1];
  r.offset = a.row_windows[3 * c + 2];
  r.unrestricted = r.offset < 0;
  return r;
}

// The mask value of local element i in row window r.
LLC_HD bool row_mask_value(const UpdateArgs& a, const RowWindow& r, int64_t i) {
  return r.unrestricted || (i >= r.lo && i < r.hi && a.row_mask[r.offset + i - r.lo] != 0);
}

// The new value of one weight. w, g, ws: weight, gradient, w*; v: the statistic (read and,
// if update_statistic, written; ignored for SGLD); xi: the element's normal; m: mask value.
template <typename T>
LLC_HD T update_element(T w, T g, T ws, T* v, float xi, bool m, T lr, T nbeta, T gamma, const Hyper<T>& h) {
  T precond = static_cast<T>(1);
  if (h.preconditioned) {
    T vv = *v;
    if (h.update_statistic) {
      vv = h.alpha * vv + h.one_minus_alpha * (g * g);
      *v = vv;
    }
    precond = static_cast<T>(1) / (t_sqrt(vv * h.scale) + h.eps);
  }
  T drift = nbeta * g + gamma * (w - ws);
  if (h.has_wd) drift = drift + h.weight_decay * w;
  T delta = -(static_cast<T>(0.5) * lr) * precond * drift +
            h.noise_level * t_sqrt(lr * precond) * static_cast<T>(xi);
  if (!m) delta = delta * static_cast<T>(0);  // as delta * mask: masked weights never move
  T out = w + delta;
  if (h.has_box) {  // torch.minimum(torch.maximum(out, ws - box), ws + box), NaN propagating
    const T lo = ws - h.box;
    const T hi = ws + h.box;
    out = out < lo ? lo : out;
    out = out > hi ? hi : out;
  }
  return out;
}

}  // namespace llc
