// One ISA variant's entry point: binds every kernel source's functions (EPIKERN_CPU_BINDINGS of
// isa.h) into the variant's submodule, epikern._cpu.<variant>.
#include <pybind11/pybind11.h>

#include "isa.h"

EPIKERN_CPU_NAMESPACE_BEGIN

#define EPIKERN_DECLARE_BIND(name) void bind_##name(pybind11::module_& m);
EPIKERN_CPU_BINDINGS(EPIKERN_DECLARE_BIND)
#undef EPIKERN_DECLARE_BIND

void bind_kernels(pybind11::module_& m) {
#define EPIKERN_CALL_BIND(name) bind_##name(m);
  EPIKERN_CPU_BINDINGS(EPIKERN_CALL_BIND)
#undef EPIKERN_CALL_BIND
}

EPIKERN_CPU_NAMESPACE_END
