// The fused SGLD update on the CPU: one pass over memory, OpenMP over (chain, block of groups).
//
// A pybind11 module without torch headers: tensors arrive as raw data pointers (Python ints)
// and sizes; llc_fast/kernels/cpp_update.py checks shapes, dtypes and devices before calling.
// Build flags (cpp_update.py): -O3 -fopenmp -ffp-contract=off (no fused multiply-add, so the
// deterministic part of the update is bit-identical to the torch reference).
#include <pybind11/pybind11.h>

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>

#include "philox.h"
#include "sgld_update.h"

namespace py = pybind11;

namespace llc {
namespace {

constexpr int64_t kGroupsPerBlock = 1024;  // 4096 elements per OpenMP work item

template <typename S>
struct Storage;  // how a storage type is read into / written from its compute type
template <>
struct Storage<float> {
  using T = float;
  static T load(const float* p, int64_t i) { return p[i]; }
};
template <>
struct Storage<double> {
  using T = double;
  static T load(const double* p, int64_t i) { return p[i]; }
};
template <>
struct Storage<uint16_t> {  // bfloat16 bits
  using T = float;
  static T load(const uint16_t* p, int64_t i) { return bf16_bits_to_float(p[i]); }
};

template <typename S>
void update_impl(const UpdateArgs& a, int num_threads) {
  using T = typename Storage<S>::T;
  constexpr bool kBF16 = sizeof(S) == 2;
  const Hyper<T> h = make_hyper<T>(a);
  S* w = static_cast<S*>(a.w);
  const S* grad = static_cast<const S*>(a.grad);
  const S* w_star = static_cast<const S*>(a.w_star);
  T* stat = static_cast<T*>(a.stat);
  const T* lr = static_cast<const T*>(a.lr);
  const T* nbeta = static_cast<const T*>(a.nbeta);
  const T* gamma = static_cast<const T*>(a.gamma);
  const int64_t n = a.n;
  const int64_t off = a.index_offset;
  // The global groups that cover elements [off, off + n), in blocks of kGroupsPerBlock.
  const int64_t g_first = off / 4;
  const int64_t g_end = (off + n - 1) / 4 + 1;
  const int64_t blocks = (g_end - g_first + kGroupsPerBlock - 1) / kGroupsPerBlock;
  const int64_t items = a.num_chains * blocks;
  if (num_threads <= 0) num_threads = omp_get_max_threads();

#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (int64_t item = 0; item < items; ++item) {
    const int64_t c = item / blocks;
    const int64_t b = item - c * blocks;
    const uint32_t chain = static_cast<uint32_t>(a.chain_ids[c]);
    const T lr_c = lr[c], nbeta_c = nbeta[c], gamma_c = gamma[c];
    const int64_t row = c * n;
    const int64_t gb = g_first + b * kGroupsPerBlock;
    const int64_t ge = std::min(g_end, gb + kGroupsPerBlock);
    for (int64_t g = gb; g < ge; ++g) {
      const Normals4 xi = normals_from_words(group_words(a.seed, chain, a.step, static_cast<uint64_t>(g), kStreamGaussian));
      Words4 rbits;
      if (kBF16) rbits = group_words(a.seed, chain, a.step, static_cast<uint64_t>(g), kStreamRounding);
      const int64_t e0 = 4 * g - off;  // local index of lane 0 (negative or >= n at the edges)
      const int j0 = e0 < 0 ? static_cast<int>(-e0) : 0;
      const int j1 = e0 + 4 > n ? static_cast<int>(n - e0) : 4;
      for (int j = j0; j < j1; ++j) {
        const int64_t e = e0 + j;
        const int64_t i = row + e;
        const bool m = !a.has_mask || a.mask[e] != 0;
        T v_dummy = T(0);
        T* v = h.preconditioned ? stat + i : &v_dummy;
        const T out = update_element<T>(Storage<S>::load(w, i), Storage<S>::load(grad, i), Storage<S>::load(w_star, e), v,
                                        xi.n[j], m, lr_c, nbeta_c, gamma_c, h);
        if constexpr (kBF16) {
          w[i] = stochastic_round_bf16(out, rbits.w[j]);
        } else {
          w[i] = out;
        }
      }
    }
  }
}

void sgld_update(uintptr_t w, uintptr_t grad, uintptr_t w_star, uintptr_t stat, uintptr_t mask, uintptr_t lr,
                 uintptr_t nbeta, uintptr_t gamma, uintptr_t chain_ids, int64_t num_chains, int64_t n, uint64_t seed,
                 uint64_t step, double stat_scale, int32_t sampler, bool update_statistic, bool has_mask, bool has_box,
                 double alpha, double one_minus_alpha, double eps, double weight_decay, double box,
                 double noise_level, int64_t index_offset, int32_t dtype, int32_t num_threads) {
  if (num_chains < 0 || n < 0 || index_offset < 0 || n > INT64_MAX - index_offset - 4 || step > 0xFFFFFFFFull)
    throw std::invalid_argument("sgld_update: bad sizes, offset or step");
  if (sampler < kSGLD || sampler > kRMSPropBC) throw std::invalid_argument("sgld_update: bad sampler code");
  if (dtype != kFloat32 && dtype != kFloat64 && dtype != kBFloat16) throw std::invalid_argument("sgld_update: bad dtype code");
  if (num_chains > 0 && n > INT64_MAX / num_chains) throw std::invalid_argument("sgld_update: C * N overflows int64");
  if (num_chains == 0 || n == 0) return;
  UpdateArgs a;
  a.w = reinterpret_cast<void*>(w);
  a.grad = reinterpret_cast<const void*>(grad);
  a.w_star = reinterpret_cast<const void*>(w_star);
  a.stat = reinterpret_cast<void*>(stat);
  a.mask = reinterpret_cast<const uint8_t*>(mask);
  a.lr = reinterpret_cast<const void*>(lr);
  a.nbeta = reinterpret_cast<const void*>(nbeta);
  a.gamma = reinterpret_cast<const void*>(gamma);
  a.chain_ids = reinterpret_cast<const int64_t*>(chain_ids);
  a.num_chains = num_chains;
  a.n = n;
  a.seed = seed;
  a.step = static_cast<uint32_t>(step);
  a.index_offset = index_offset;
  a.stat_scale = stat_scale;
  a.sampler = sampler;
  a.update_statistic = update_statistic;
  a.has_mask = has_mask;
  a.has_box = has_box;
  a.alpha = alpha;
  a.one_minus_alpha = one_minus_alpha;
  a.eps = eps;
  a.weight_decay = weight_decay;
  a.box = box;
  a.noise_level = noise_level;
  a.dtype = dtype;
  if (!a.w || !a.grad || !a.w_star || !a.lr || !a.nbeta || !a.gamma || !a.chain_ids || (sampler != kSGLD && !a.stat) ||
      (has_mask && !a.mask))
    throw std::invalid_argument("sgld_update: null data pointer");
  py::gil_scoped_release release;
  switch (dtype) {
    case kFloat32: update_impl<float>(a, num_threads); break;
    case kFloat64: update_impl<double>(a, num_threads); break;
    case kBFloat16: update_impl<uint16_t>(a, num_threads); break;
  }
}

// Debug / test hook: for each chain c and element k < count (global index start + k), writes the
// stream's Philox word (uint32 [C, count]), its uniform and, for stream 0, the normal (float32
// [C, count]). Any output pointer may be 0.
void philox_debug(uint64_t seed, uintptr_t chain_ids, int64_t num_chains, uint64_t step, int64_t start, int64_t count,
                  uint32_t stream, uintptr_t words_out, uintptr_t uniforms_out, uintptr_t normals_out) {
  const int64_t* ids = reinterpret_cast<const int64_t*>(chain_ids);
  uint32_t* words = reinterpret_cast<uint32_t*>(words_out);
  float* uniforms = reinterpret_cast<float*>(uniforms_out);
  float* normals = reinterpret_cast<float*>(normals_out);
  for (int64_t c = 0; c < num_chains; ++c) {
    for (int64_t k = 0; k < count; ++k) {
      const uint64_t i = static_cast<uint64_t>(start) + static_cast<uint64_t>(k);
      const Words4 wd = group_words(seed, static_cast<uint32_t>(ids[c]), static_cast<uint32_t>(step), i / 4, stream);
      const int j = static_cast<int>(i % 4);
      if (words) words[c * count + k] = wd.w[j];
      if (uniforms) uniforms[c * count + k] = uniform_from_word(wd.w[j]);
      if (normals) normals[c * count + k] = normals_from_words(wd).n[j];
    }
  }
}

py::tuple philox4x32_py(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  const Words4 w = philox4x32_10(c0, c1, c2, c3, k0, k1);
  return py::make_tuple(w.w[0], w.w[1], w.w[2], w.w[3]);
}

// Debug / test hook: stochastic rounding of float32 x [n] with words [n] (uint32) into bf16 bits.
void stochastic_round_debug(uintptr_t x, uintptr_t words, uintptr_t out, int64_t n) {
  const float* xp = reinterpret_cast<const float*>(x);
  const uint32_t* wp = reinterpret_cast<const uint32_t*>(words);
  uint16_t* op = reinterpret_cast<uint16_t*>(out);
  for (int64_t k = 0; k < n; ++k) op[k] = stochastic_round_bf16(xp[k], wp[k]);
}

}  // namespace
}  // namespace llc

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "llc_fast fused SGLD update on the CPU (raw pointers, no torch headers)";
  m.attr("DTYPE_FLOAT32") = static_cast<int>(llc::kFloat32);
  m.attr("DTYPE_FLOAT64") = static_cast<int>(llc::kFloat64);
  m.attr("DTYPE_BFLOAT16") = static_cast<int>(llc::kBFloat16);
  m.def("sgld_update", &llc::sgld_update, "One SGLD step in place (see cpp_update.py)", py::arg("w"), py::arg("grad"),
        py::arg("w_star"), py::arg("stat"), py::arg("mask"), py::arg("lr"), py::arg("nbeta"), py::arg("gamma"),
        py::arg("chain_ids"), py::arg("num_chains"), py::arg("n"), py::arg("seed"), py::arg("step"),
        py::arg("stat_scale"), py::arg("sampler"), py::arg("update_statistic"), py::arg("has_mask"),
        py::arg("has_box"), py::arg("alpha"), py::arg("one_minus_alpha"), py::arg("eps"), py::arg("weight_decay"),
        py::arg("box"), py::arg("noise_level"), py::arg("index_offset"), py::arg("dtype"),
        py::arg("num_threads") = 0);
  m.def("philox_debug", &llc::philox_debug, py::arg("seed"), py::arg("chain_ids"), py::arg("num_chains"),
        py::arg("step"), py::arg("start"), py::arg("count"), py::arg("stream"), py::arg("words_out"),
        py::arg("uniforms_out"), py::arg("normals_out"));
  m.def("philox4x32", &llc::philox4x32_py, "Philox4x32-10 of counters (c0..c3) under key (k0, k1)");
  m.def("stochastic_round_debug", &llc::stochastic_round_debug, py::arg("x"), py::arg("words"), py::arg("out"),
        py::arg("n"));
}
