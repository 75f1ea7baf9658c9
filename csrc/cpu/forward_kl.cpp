// Fused CPU kernels of epikern::forward_kl and epikern::forward_kl_backward.
//
// Per row with x = s/T (student) and y = t/T (teacher), using the online-softmax state of
// epikern/online_softmax.h with the teacher as the distribution and the student as its reference:
//
//   forward, one sweep:   state_t = (m, s = Σ e^{y−m}, c = Σ e^{y−m}(y − x)),  state_s = (m, s)
//                         loss = KL(p ‖ q) = c/s − lse_t + lse_s   (softmax_kl)
//   backward, one sweep:  grad[v] = g · (e^{x_v − lse_s} − e^{y_v − lse_t}) / T
//
// Logits are fp32/fp16/bf16 read in place (unit stride over V, int64 row strides); the gradient
// is written in the student's dtype with round-to-nearest-even and may alias the student (each
// element is read before it is written). OpenMP over rows, schedule static: a row is computed by
// one thread in a fixed order, so results do not depend on the thread count. Rows with keep = 0
// (forward) or g = 0 (backward) are not read: zeros are written.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "dtype.h"
#include "epikern/online_softmax.h"
#include "fast_math.h"
#include "isa.h"

namespace py = pybind11;

EPIKERN_CPU_NAMESPACE_BEGIN
namespace {

constexpr int64_t kBlock = 2048;  // forward block: two 8 KiB fp32 buffers per thread

struct FastExp {
  float operator()(float x) const { return fast_exp(x); }
};

// float → storage type, round to nearest even, branch-free (vectorisable).
inline float from_float(float v, float) { return v; }

inline BFloat16 from_float(float v, BFloat16) {
  const uint32_t u = float_to_bits(v);
  const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return BFloat16{static_cast<uint16_t>(nan ? ((u >> 16) | 0x40u) : rounded)};
}

inline Half from_float(float v, Half) {
  const uint32_t u = float_to_bits(v);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  // Normal halves: drop 13 mantissa bits and rebias; a carry rounds into the exponent (up to inf).
  const uint32_t nrm = (a - 0x38000000u) >> 13;
  const uint32_t nrem = a & 0x1fffu;
  const uint32_t normal = nrm + ((nrem > 0x1000u) | ((nrem == 0x1000u) & (nrm & 1u)));
  // Subnormal halves (|v| < 2^−14): m · 2^(e−150) = (m >> (126 − e)) · 2^−24.
  const uint32_t e = a >> 23;
  // shift ∈ [1, 31] keeps every shift below defined (the value only matters for shift ≥ 14)
  const uint32_t shift = std::clamp<uint32_t>(126u - std::min<uint32_t>(e, 126u), 1u, 31u);
  const uint32_t m = (a & 0x7fffffu) | 0x800000u;
  const uint32_t sub = m >> shift;
  const uint32_t srem = m & ((1u << shift) - 1u);
  const uint32_t half = 1u << (shift - 1u);
  const uint32_t subnormal = sub + ((srem > half) | ((srem == half) & (sub & 1u)));
  uint32_t h = a < 0x38800000u ? (a < 0x33000000u ? 0u : subnormal) : normal;
  h = a >= 0x477ff000u ? 0x7c00u : h;          // rounds to ±inf (also inf itself)
  h = a > 0x7f800000u ? 0x7e00u : h;           // NaN → quiet NaN
  return Half{static_cast<uint16_t>(h | sign)};
}

// One element's teacher cross term e·(y − x): +inf where the teacher is finite and the student
// −inf (even if e underflowed), 0 where the teacher is −inf.
inline float cross_term(float e, float y, float x) {
  const float d = y - x;
  return d == INFINITY ? INFINITY : prob_times(e, d);
}

template <class TS, class TT>
void forward_kl_row(const TS* __restrict s, const TT* __restrict t, int64_t V, float inv_t,
                    float* __restrict xb, float* __restrict yb, float& loss, float& lse_s,
                    float& lse_t) {
  SoftmaxState ss = softmax_state_empty(), st = softmax_state_empty();
  for (int64_t v0 = 0; v0 < V; v0 += kBlock) {
    const int64_t len = std::min(kBlock, V - v0);
    float mx = -INFINITY, my = -INFINITY;
#pragma omp simd reduction(max : mx, my)
    for (int64_t i = 0; i < len; ++i) {
      const float x = to_float(s[v0 + i]) * inv_t, y = to_float(t[v0 + i]) * inv_t;
      xb[i] = x;
      yb[i] = y;
      mx = x > mx ? x : mx;
      my = y > my ? y : my;
    }
    softmax_rescale(ss, mx, FastExp{});
    softmax_rescale(st, my, FastExp{});
    const float rs = exp_origin(ss.m), rt = exp_origin(st.m);
    float sum_s = 0.f, sum_t = 0.f, c = 0.f;
#pragma omp simd reduction(+ : sum_s, sum_t, c)
    for (int64_t i = 0; i < len; ++i) {
      sum_s += fast_exp(xb[i] - rs);
      const float e = fast_exp(yb[i] - rt);
      sum_t += e;
      c += cross_term(e, yb[i], xb[i]);
    }
    // a NaN logit is ignored by the max but reaches the sums: NaN stays in its row
    ss.s += sum_s;
    st.s += sum_t;
    st.c += c;
  }
  lse_s = softmax_lse(ss);
  lse_t = softmax_lse(st);
  loss = softmax_kl(st, lse_t, lse_s);
}

struct ForwardArgs {
  const void* student;
  int64_t student_stride;
  const void* teacher;
  int64_t teacher_stride;
  int64_t N, V;
  const uint8_t* keep;  // nullptr: every row
  float inv_t;
  float *loss, *student_lse, *teacher_lse;
};

template <class TS, class TT>
void forward_kl_rows(const ForwardArgs& a, int threads) {
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> xb(kBlock), yb(kBlock);
#pragma omp for schedule(static)
    for (int64_t n = 0; n < a.N; ++n) {
      float loss = 0.f, ls = 0.f, lt = 0.f;
      if (a.keep == nullptr || a.keep[n]) {
        forward_kl_row(static_cast<const TS*>(a.student) + n * a.student_stride,
                       static_cast<const TT*>(a.teacher) + n * a.teacher_stride, a.V, a.inv_t,
                       xb.data(), yb.data(), loss, ls, lt);
      }
      a.loss[n] = loss;
      a.student_lse[n] = ls;
      a.teacher_lse[n] = lt;
    }
  }
}

void forward_kl(uintptr_t student, int student_dtype, int64_t student_stride, uintptr_t teacher,
                int teacher_dtype, int64_t teacher_stride, int64_t N, int64_t V, uintptr_t keep,
                double temperature, uintptr_t loss, uintptr_t student_lse, uintptr_t teacher_lse,
                int num_threads) {
  if (N < 0 || V < 1) throw std::invalid_argument("epikern._cpu.forward_kl: bad N/V");
  const ForwardArgs a{reinterpret_cast<const void*>(student), student_stride,
                      reinterpret_cast<const void*>(teacher), teacher_stride, N, V,
                      reinterpret_cast<const uint8_t*>(keep), static_cast<float>(1.0 / temperature),
                      reinterpret_cast<float*>(loss), reinterpret_cast<float*>(student_lse),
                      reinterpret_cast<float*>(teacher_lse)};
  const int threads = std::max(1, num_threads);
  dispatch_dtype(student_dtype, [&](auto ts) {
    dispatch_dtype(teacher_dtype, [&](auto tt) {
      forward_kl_rows<decltype(ts), decltype(tt)>(a, threads);
    });
  });
}

struct BackwardArgs {
  const float* grad_loss;
  const void* student;
  int64_t student_stride;
  const void* teacher;
  int64_t teacher_stride;
  int64_t N, V;
  const float *student_lse, *teacher_lse;
  float inv_t;
  void* out;  // student dtype; may alias student
  int64_t out_stride;
};

template <class TS, class TT>
void forward_kl_backward_rows(const BackwardArgs& a, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t n = 0; n < a.N; ++n) {
    const TS* s = static_cast<const TS*>(a.student) + n * a.student_stride;
    const TT* t = static_cast<const TT*>(a.teacher) + n * a.teacher_stride;
    TS* out = static_cast<TS*>(a.out) + n * a.out_stride;
    const float g = a.grad_loss[n];
    const int64_t V = a.V;
    if (g == 0.f) {
      const TS zero = from_float(0.f, TS{});
      std::fill(out, out + V, zero);
      continue;
    }
    const float scale = g * a.inv_t, inv_t = a.inv_t;
    const float ls = a.student_lse[n], lt = a.teacher_lse[n];
    // `out` may alias `s`: element i is read before it is written, no other element is touched.
#pragma omp simd
    for (int64_t i = 0; i < V; ++i) {
      const float q = fast_exp(to_float(s[i]) * inv_t - ls);
      const float p = fast_exp(to_float(t[i]) * inv_t - lt);
      out[i] = from_float((q - p) * scale, TS{});
    }
  }
}

void forward_kl_backward(uintptr_t grad_loss, uintptr_t student, int student_dtype,
                         int64_t student_stride, uintptr_t teacher, int teacher_dtype,
                         int64_t teacher_stride, int64_t N, int64_t V, uintptr_t student_lse,
                         uintptr_t teacher_lse, double temperature, uintptr_t out,
                         int64_t out_stride, int num_threads) {
  if (N < 0 || V < 1) throw std::invalid_argument("epikern._cpu.forward_kl_backward: bad N/V");
  const BackwardArgs a{reinterpret_cast<const float*>(grad_loss),
                       reinterpret_cast<const void*>(student), student_stride,
                       reinterpret_cast<const void*>(teacher), teacher_stride, N, V,
                       reinterpret_cast<const float*>(student_lse),
                       reinterpret_cast<const float*>(teacher_lse),
                       static_cast<float>(1.0 / temperature), reinterpret_cast<void*>(out),
                       out_stride};
  const int threads = std::max(1, num_threads);
  dispatch_dtype(student_dtype, [&](auto ts) {
    dispatch_dtype(teacher_dtype, [&](auto tt) {
      forward_kl_backward_rows<decltype(ts), decltype(tt)>(a, threads);
    });
  });
}

// Test hook: the kernels' float → fp16 (dtype 1) / bf16 (dtype 2) rounding, as raw bits.
py::array_t<uint16_t> round_float32(
    const py::array_t<float, py::array::c_style | py::array::forcecast>& x, int dtype) {
  py::array_t<uint16_t> out(x.request().shape);
  const float* src = x.data();
  uint16_t* dst = out.mutable_data();
  const py::ssize_t n = x.size();
  if (dtype == kFloat16) {
    for (py::ssize_t i = 0; i < n; ++i) dst[i] = from_float(src[i], Half{}).bits;
  } else if (dtype == kBFloat16) {
    for (py::ssize_t i = 0; i < n; ++i) dst[i] = from_float(src[i], BFloat16{}).bits;
  } else {
    throw std::invalid_argument("round_float32: dtype must be 1 (float16) or 2 (bfloat16)");
  }
  return out;
}

}  // namespace

void bind_forward_kl(py::module_& m) {
  m.def("forward_kl", &forward_kl, py::call_guard<py::gil_scoped_release>(), py::arg("student"),
        py::arg("student_dtype"), py::arg("student_stride"), py::arg("teacher"),
        py::arg("teacher_dtype"), py::arg("teacher_stride"), py::arg("N"), py::arg("V"),
        py::arg("keep"), py::arg("temperature"), py::arg("loss"), py::arg("student_lse"),
        py::arg("teacher_lse"), py::arg("num_threads"),
        "Per-row KL(softmax(t/T) ‖ softmax(s/T)) over raw pointers (row strides in elements; "
        "dtype codes 0 = float32, 1 = float16, 2 = bfloat16; keep = 0 or a bool[N] pointer). "
        "Writes float32 loss[N], student_lse[N], teacher_lse[N] (zeros on dropped rows).");
  m.def("forward_kl_backward", &forward_kl_backward, py::call_guard<py::gil_scoped_release>(),
        py::arg("grad_loss"), py::arg("student"), py::arg("student_dtype"),
        py::arg("student_stride"), py::arg("teacher"), py::arg("teacher_dtype"),
        py::arg("teacher_stride"), py::arg("N"), py::arg("V"), py::arg("student_lse"),
        py::arg("teacher_lse"), py::arg("temperature"), py::arg("out"), py::arg("out_stride"),
        py::arg("num_threads"),
        "grad[n, v] = grad_loss[n]·(softmax(s/T) − softmax(t/T))[n, v]/T in the student's dtype "
        "(out may alias student; rows with grad_loss = 0 are zeros).");
  m.def("round_float32", &round_float32, py::arg("x"), py::arg("dtype"),
        "Test hook: the kernels' round-to-nearest-even float32 → float16/bfloat16, as uint16 bits.");
}

EPIKERN_CPU_NAMESPACE_END
