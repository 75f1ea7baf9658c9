// Micro-benchmarks behind `epikern bench` (epikern/eval/kernel_bench.py): the core clock, and the
// cost of the kernels' own vectorised exp2 and log2 per element (simd.h), from which the benchmark
// computes the transcendental floor of draft_uncertainty (K + 1 exponentials and one logarithm
// per vocabulary entry). Single thread, data in L1, thread CPU time, best of several trials.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <ctime>
#include <vector>

#include "isa.h"
#include "simd.h"

namespace py = pybind11;

EPIKERN_CPU_NAMESPACE_BEGIN
namespace {

namespace S = simd;

double thread_seconds() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

// Best of `trials` timings of fn() (thread CPU time, so time spent descheduled does not count).
template <class Fn>
double best_seconds(int trials, Fn fn) {
  double best = 1e300;
  for (int t = 0; t < trials; ++t) {
    const double t0 = thread_seconds();
    fn();
    best = std::min(best, thread_seconds() - t0);
  }
  return best;
}

// Clock rate from a chain of dependent integer adds (one cycle each on every x86-64 and ARM core
// we know of): `iterations` × 4 adds.
double clock_hz(int64_t iterations) {
  uint64_t x = 0;
  const double s = best_seconds(5, [&] {
    for (int64_t i = 0; i < iterations; ++i) {
#if defined(__x86_64__)
      asm volatile("add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0" : "+r"(x));
#elif defined(__aarch64__)
      asm volatile("add %0, %0, #1\n\tadd %0, %0, #1\n\tadd %0, %0, #1\n\tadd %0, %0, #1" : "+r"(x));
#else
      for (int j = 0; j < 4; ++j) asm volatile("" : "+r"(x) : "r"(x + 1));
#endif
    }
  });
  return 4.0 * static_cast<double>(iterations) / s;
}

// Seconds per element of simd::exp2 and simd::log2 over 2048 floats in L1 (summed with two
// accumulators so that the sum's latency does not bound the loop); arguments as the kernel sees
// them (2^{x − max} with x − max ∈ [−30, 0] bits, log2 of probabilities in (0, 1]).
py::tuple transcendental_seconds(int64_t reps) {
  constexpr int64_t n = 2048;
  std::vector<float> ex(n), lx(n);
  for (int64_t i = 0; i < n; ++i) {
    ex[i] = -30.f * static_cast<float>((i * 7919) % n) / n;
    lx[i] = std::max(1e-30f, static_cast<float>((i * 104729) % n + 1) / n);
  }
  volatile float sink = 0.f;
  const auto time = [&](const std::vector<float>& x, auto f) {
    return best_seconds(7, [&] {
             S::vf a{}, b{};
             for (int64_t r = 0; r < reps; ++r)
               for (int64_t i = 0; i < n; i += 2 * S::kWidth) {
                 a += f(S::load(x.data() + i));
                 b += f(S::load(x.data() + i + S::kWidth));
               }
             sink = S::hsum(a + b);
           }) / static_cast<double>(reps * n);
  };
  const double t_exp = time(ex, [](S::vf v) { return S::exp2(v); });
  const double t_log = time(lx, [](S::vf v) { return S::log2(v); });
  return py::make_tuple(t_exp, t_log);
}

}  // namespace

void bind_microbench(py::module_& m) {
  m.def("_clock_hz", &clock_hz, py::call_guard<py::gil_scoped_release>(),
        py::arg("iterations") = 100'000'000,
        "Core clock (Hz) from a timed chain of 4·iterations dependent integer adds.");
  m.def("_transcendental_seconds", &transcendental_seconds, py::arg("reps") = 2000,
        "(seconds per exp2, seconds per log2) of the kernels' vectorised routines, one thread, L1.");
  m.attr("_simd_width") = S::kWidth;
}

EPIKERN_CPU_NAMESPACE_END
