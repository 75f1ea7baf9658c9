// Runtime ISA dispatch of epikern._cpu. CMakeLists.txt compiles every kernel source of csrc/cpu
// (all but module.cpp) once per instruction-set variant — on x86-64: baseline (-march=x86-64-v2),
// avx2 (x86-64-v3: AVX2, FMA, F16C, BMI2) and avx512 (x86-64-v4: AVX-512 F/BW/CD/DQ/VL) — each
// time with EPIKERN_ISA_NS defined to the variant's name. All their code lives in the inline
// namespace epikern::cpu::EPIKERN_ISA_NS, so the variants' functions (the inline ones of simd.h,
// fast_math.h and dtype.h included) are distinct symbols and the linker cannot swap an AVX-512
// copy into the baseline kernels. module.cpp calls each variant's bind_kernels into a submodule
// and points the module's attributes at the variant chosen at import.
//
// A new kernel source: open its code with EPIKERN_CPU_NAMESPACE_BEGIN, give it a bind_<name>
// function and add <name> to EPIKERN_CPU_BINDINGS below; its functions then exist in every variant.
#pragma once

#ifndef EPIKERN_ISA_NS
#error "csrc/cpu kernel sources are compiled once per ISA with -DEPIKERN_ISA_NS=<variant> (see CMakeLists.txt)"
#endif

#define EPIKERN_CPU_NAMESPACE_BEGIN \
  namespace epikern::cpu {          \
  inline namespace EPIKERN_ISA_NS {
#define EPIKERN_CPU_NAMESPACE_END \
  }                               \
  }

// The bind_<name>(pybind11::module_&) of every kernel source file, called in this order by
// bind_kernels (bind_kernels.cpp).
#define EPIKERN_CPU_BINDINGS(X) X(decoder_step) X(draft_uncertainty) X(forward_kl) X(microbench) X(test_hooks)
