// Python bindings of the C++ ops: module megatron_navil._C (name from TORCH_EXTENSION_NAME).
// std::invalid_argument thrown by an op surfaces in Python as ValueError (pybind11 translation).
#include <torch/extension.h>

#include "grid.h"
#include "pack.h"
#include "patchify.h"
#include "positions.h"
#include "resize.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megatron_navil native (C++) ops";
  m.def("merged_grid", &megatron_navil::merged_grid, py::arg("height"), py::arg("width"),
        py::arg("patch") = 16, py::arg("merge") = 2,
        "Patch grid (h_patches, w_patches) of an image zero-padded to a multiple of "
        "patch * merge. Raises ValueError for non-positive inputs.");
  m.def("smart_resize", &megatron_navil::smart_resize, py::arg("height"), py::arg("width"),
        py::arg("patch") = 16, py::arg("merge") = 2, py::arg("min_patches") = 256,
        py::arg("max_patches") = 24576, py::arg("max_aspect") = 200.0,
        "(new_height, new_width) under the released NaViL rule (Qwen2-VL smart_resize, factor "
        "1): unchanged when height * width is in [min_patches, max_patches] * patch^2, else "
        "scaled by sqrt of the ratio to the bound crossed (floor above, ceil below). Raises "
        "ValueError for bad arguments or an aspect ratio above max_aspect.");
  // The GIL is released while the ops run: they touch no Python objects, and data-loader
  // threads can patchify concurrently.
  m.def("patchify", &megatron_navil::patchify, py::arg("image"), py::arg("patch"),
        py::arg("merge"), py::arg("mean"), py::arg("std"), py::arg("dtype"),
        py::call_guard<py::gil_scoped_release>(),
        "uint8 [H, W, 3] image -> (patches [gh * gw, 3 * patch * patch] in merge-unit order, "
        "(gh, gw)). Raises ValueError for bad inputs.");
  m.def("patchify_batch", &megatron_navil::patchify_batch, py::arg("images"), py::arg("patch"),
        py::arg("merge"), py::arg("mean"), py::arg("std"), py::arg("dtype"),
        py::call_guard<py::gil_scoped_release>(),
        "List of uint8 [H, W, 3] images -> (packed patches [sum n_i, 3 * patch * patch], "
        "[(gh, gw), ...]). Raises ValueError for bad inputs.");
  m.def("_patchify_kernel", &megatron_navil::patchify_kernel, py::arg("mean"), py::arg("std"),
        py::arg("dtype"),
        "The CPU kernel patchify would use for these parameters: 'avx2' or 'portable' (forced "
        "by MEGATRON_NAVIL_PATCHIFY_PORTABLE=1); both give identical results.");
  m.def("patch_positions", &megatron_navil::patch_positions, py::arg("grids"), py::arg("merge"),
        py::arg("dtype"), py::call_guard<py::gil_scoped_release>(),
        "[(gh, gw), ...] patch grids -> positions [sum gh * gw, 2] (row, col) in patchify's "
        "merge-unit order, int32 or int64. Raises ValueError for bad grids.");
  m.def("vision_cu_seqlens", &megatron_navil::vision_cu_seqlens, py::arg("grids"),
        py::arg("merge"), py::call_guard<py::gil_scoped_release>(),
        "[(gh, gw), ...] patch grids -> int32 cu_seqlens [len(grids) + 1], one segment per "
        "grid. Raises ValueError for bad grids.");
  m.def("window_permutation", &megatron_navil::window_permutation, py::arg("grids"),
        py::arg("window"), py::arg("merge"), py::call_guard<py::gil_scoped_release>(),
        "[(gh, gw), ...] patch grids -> (perm [n] int64, inverse [n] int64, window cu_seqlens "
        "int32) for windows of window x window merge units. Raises ValueError for bad input.");
  m.def("plan_packing", &megatron_navil::plan_packing, py::arg("llm_tokens"),
        py::arg("patches"), py::arg("seq_length"), py::arg("max_patches"), py::arg("oversize"),
        py::arg("costs") = py::none(), py::arg("max_cost") = py::none(),
        py::call_guard<py::gil_scoped_release>(),
        "First-fit-decreasing pack plan of int64 [n] llm_tokens / patches into sequences of at "
        "most seq_length tokens and max_patches patches (None: no limit) -> (seq_offsets, "
        "sample_ids, tokens_per_seq, patches_per_seq, skipped) int64 tensors. oversize is "
        "'error' or 'skip'; costs (int64 [n], each in [0, max_cost]) and max_cost: an optional "
        "third budget per sequence. Raises ValueError for bad input.");
}
