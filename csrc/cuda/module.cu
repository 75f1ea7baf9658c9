// epikern._cuda: CUDA kernels taking raw pointers, strides and a stream (minimal scaffold; the
// CUDA kernels and their bind_* functions are added by the CUDA issue).
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

namespace py = pybind11;

namespace {

// Number of visible CUDA devices; raises RuntimeError with the CUDA error text on failure.
int device_count() {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) throw std::runtime_error(std::string("CUDA error: ") + cudaGetErrorString(err));
  return n;
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "epikern CUDA kernels (raw pointers + cudaStream_t; no libtorch)";
  m.def("device_count", &device_count, "Number of visible CUDA devices.");
}
