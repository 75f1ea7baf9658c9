// epikern._cpu: the fused CPU kernels. One bind_* function per op source file.
#include <pybind11/pybind11.h>

namespace epikern::cpu {
void bind_decoder_step(pybind11::module_& m);
void bind_draft_uncertainty(pybind11::module_& m);
void bind_forward_kl(pybind11::module_& m);
void bind_microbench(pybind11::module_& m);
void bind_test_hooks(pybind11::module_& m);
}  // namespace epikern::cpu

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "epikern fused CPU kernels (OpenMP over rows, vectorised inner loops)";
  epikern::cpu::bind_decoder_step(m);
  epikern::cpu::bind_draft_uncertainty(m);
  epikern::cpu::bind_forward_kl(m);
  epikern::cpu::bind_microbench(m);
  epikern::cpu::bind_test_hooks(m);
}
