// Python bindings of the C++ ops: module megatron_navil._C (name from TORCH_EXTENSION_NAME).
// std::invalid_argument thrown by an op surfaces in Python as ValueError (pybind11 translation).
#include <torch/extension.h>

#include "grid.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megatron_navil native (C++) ops";
  m.def("merged_grid", &megatron_navil::merged_grid, py::arg("height"), py::arg("width"),
        py::arg("patch") = 16, py::arg("merge") = 2,
        "Patch grid (h_patches, w_patches) of an image zero-padded to a multiple of "
        "patch * merge. Raises ValueError for non-positive inputs.");
}
