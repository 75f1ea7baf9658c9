// Logit storage types of the CPU kernels and their dispatch from the Python dtype codes.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include "fast_math.h"
#include "isa.h"

EPIKERN_CPU_NAMESPACE_BEGIN

// Dtype codes passed from Python (epikern/backends/cpu.py: _DTYPE_CODES).
enum DtypeCode : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

EPIKERN_INLINE float to_float(float v) { return v; }
EPIKERN_INLINE float to_float(Half v) { return half_to_float(v.bits); }
EPIKERN_INLINE float to_float(BFloat16 v) { return bf16_to_float(v.bits); }

// Calls f(T{}) with T the storage type of `code`.
template <class F>
decltype(auto) dispatch_dtype(int code, F&& f) {
  switch (code) {
    case kFloat32: return f(float{});
    case kFloat16: return f(Half{});
    case kBFloat16: return f(BFloat16{});
  }
  throw std::invalid_argument("epikern._cpu: unknown dtype code " + std::to_string(code));
}

EPIKERN_CPU_NAMESPACE_END
