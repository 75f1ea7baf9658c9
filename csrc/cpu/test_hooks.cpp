// Small hooks that expose the shared math (epikern/online_softmax.h) and the CPU fast-math
// routines to the unit tests (tests/backends/test_cpu_kernel.py). Not part of the public API.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "epikern/online_softmax.h"
#include "fast_math.h"
#include "isa.h"
#include "simd.h"

namespace py = pybind11;

EPIKERN_CPU_NAMESPACE_BEGIN
namespace {

using F32 = py::array_t<float, py::array::c_style | py::array::forcecast>;
using U16 = py::array_t<uint16_t, py::array::c_style | py::array::forcecast>;

// fn is a lambda, not a pointer to the always_inline routine: gcc cannot inline through a pointer
// below -O2 (a sanitizer build is -O1).
template <class In, class Fn>
F32 map_elementwise(const In& in, Fn fn) {
  F32 out(in.request().shape);
  const auto* src = in.data();
  float* dst = out.mutable_data();
  for (py::ssize_t i = 0; i < in.size(); ++i) dst[i] = fn(src[i]);
  return out;
}

struct LibmExp {
  float operator()(float x) const { return std::exp(x); }
};
struct LibmLog {
  float operator()(float x) const { return std::log(x); }
};

// Online-softmax state of x (cross term against y) gathered element by element in chunks of
// `chunk` entries, the chunk states merged left to right. Returns (m, s, t, c, lse, entropy,
// c/s − lse_x + lse_y) where lse_y is passed in.
py::tuple softmax_chunks(const F32& x, const F32& y, int64_t chunk, float lse_y) {
  const int64_t n = x.size();
  const float* xs = x.data();
  const float* ys = y.data();
  SoftmaxState total = softmax_state_empty();
  for (int64_t c0 = 0; c0 < n; c0 += std::max<int64_t>(chunk, 1)) {
    SoftmaxState part = softmax_state_empty();
    for (int64_t i = c0; i < std::min(n, c0 + std::max<int64_t>(chunk, 1)); ++i) {
      softmax_rescale(part, xs[i], LibmExp{});
      softmax_add(part, xs[i], ys[i], LibmExp{});
    }
    softmax_merge(total, part, LibmExp{});
  }
  const float lse = softmax_lse(total);
  return py::make_tuple(total.m, total.s, total.t, total.c, lse, softmax_entropy(total),
                        softmax_kl(total, lse, lse_y));
}

// mixture_terms at every entry v of l[K, V] → [3, V] (jsd, −q̄ log q̄, q̄ (log q̄ − y + lse_p)).
F32 mixture_terms_all(const F32& l, const F32& log_w, const F32& y, float lse_p, bool has_p) {
  const int64_t K = l.shape(0), V = l.shape(1);
  F32 out({int64_t{3}, V});
  float* o = out.mutable_data();
  for (int64_t v = 0; v < V; ++v) {
    const MixtureTerms t = mixture_terms(l.data() + v, V, log_w.data(), static_cast<int>(K),
                                         has_p, y.data()[v], lse_p, LibmExp{}, LibmLog{});
    o[v] = t.jsd;
    o[V + v] = t.entropy;
    o[2 * V + v] = t.kl;
  }
  return out;
}

// simd::exp2 / simd::log2 lane by lane over an array (the vector routines of draft_uncertainty).
template <class Fn>
F32 map_simd(const F32& in, Fn fn) {
  F32 out(in.request().shape);
  const float* src = in.data();
  float* dst = out.mutable_data();
  const int64_t n = in.size();
  for (int64_t i = 0; i < n; i += simd::kWidth) {
    const int64_t len = std::min<int64_t>(simd::kWidth, n - i);
    const simd::vf v = fn(simd::load_partial(src + i, len, 1.f));
    for (int64_t j = 0; j < len; ++j) dst[i + j] = v[j];
  }
  return out;
}

}  // namespace

void bind_test_hooks(py::module_& m) {
  m.def("_test_exp", [](const F32& x) { return map_elementwise(x, [](float v) { return fast_exp(v); }); });
  m.def("_test_simd_exp2", [](const F32& x) { return map_simd(x, [](simd::vf v) { return simd::exp2(v); }); });
  m.def("_test_simd_log2", [](const F32& x) { return map_simd(x, [](simd::vf v) { return simd::log2(v); }); });
  m.def("_test_half_to_float", [](const U16& h) { return map_elementwise(h, [](uint16_t v) { return half_to_float(v); }); });
  m.def("_test_bf16_to_float", [](const U16& b) { return map_elementwise(b, [](uint16_t v) { return bf16_to_float(v); }); });
  m.def("_test_softmax_chunks", &softmax_chunks, py::arg("x"), py::arg("y"), py::arg("chunk"),
        py::arg("lse_y"));
  m.def("_test_mixture_terms", &mixture_terms_all, py::arg("l"), py::arg("log_w"), py::arg("y"),
        py::arg("lse_p"), py::arg("has_p"));
}

EPIKERN_CPU_NAMESPACE_END
