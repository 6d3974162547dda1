// Torch-tensor wrapper of the CUDA ops: module megatron_navil._C_cuda (CUDA builds only).
// Bad arguments raise std::invalid_argument, which pybind11 turns into ValueError.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <cmath>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "patchify.h"

namespace {

using Grid = std::pair<int64_t, int64_t>;

[[noreturn]] void fail(const std::string& msg) {
  throw std::invalid_argument("patchify_packed: " + msg);
}

// buffer_u8: uint8 CUDA tensor holding the images back to back, image k [H_k, W_k, 3]
// channels-last (shapes[k] = (H_k, W_k)), no gaps; shapes: int64 CPU tensor [k, 2].
// Returns (packed [sum gh_k * gw_k, 3 * patch * patch] of `dtype` on the buffer's device,
// [(gh_k, gw_k), ...]); enqueued on the current stream, nothing synchronises.
std::pair<torch::Tensor, std::vector<Grid>> patchify_packed(
    const torch::Tensor& buffer_u8, const torch::Tensor& shapes, int64_t patch, int64_t merge,
    const std::vector<double>& mean, const std::vector<double>& stdev, at::ScalarType dtype) {
  if (!buffer_u8.is_cuda() || buffer_u8.scalar_type() != at::kByte || buffer_u8.dim() != 1 ||
      !buffer_u8.is_contiguous()) {
    fail("buffer must be a contiguous 1-D uint8 CUDA tensor");
  }
  if (!shapes.device().is_cpu() || shapes.scalar_type() != at::kLong || shapes.dim() != 2 ||
      shapes.size(1) != 2) {
    fail("shapes must be an int64 CPU tensor of shape [num_images, 2] (height, width)");
  }
  if (patch < 1 || patch > 2147483647 || merge < 1 || merge > 2147483647) {
    fail("patch and merge must be integers in [1, 2147483647], got " + std::to_string(patch) +
         " and " + std::to_string(merge));
  }
  const auto finite = [](const std::vector<double>& v, bool positive) {
    if (v.size() != 3) return false;
    for (double x : v) {
      if (!std::isfinite(x) || (positive && !(x > 0))) return false;
    }
    return true;
  };
  if (!finite(mean, false)) fail("mean must be 3 finite numbers (one per RGB channel)");
  if (!finite(stdev, true)) fail("std must be 3 finite positive numbers (one per RGB channel)");
  if (dtype != at::kFloat && dtype != at::kBFloat16) {
    fail(std::string("dtype must be torch.float32 or torch.bfloat16, got ") +
         c10::toString(dtype));
  }
  int64_t dim = 0;
  if (__builtin_mul_overflow(3 * patch, patch, &dim)) {
    fail("patch " + std::to_string(patch) + " is too large");
  }
  const torch::Tensor hw = shapes.contiguous();
  const int64_t* hw_ptr = hw.data_ptr<int64_t>();
  const int64_t num_images = hw.size(0);
  // Metadata as an int64 [k, 4] tensor laid out like PatchifyImage.
  static_assert(sizeof(megatron_navil::PatchifyImage) == 4 * sizeof(int64_t));
  torch::Tensor meta = torch::empty({num_images, 4}, torch::kLong);
  auto* info = reinterpret_cast<megatron_navil::PatchifyImage*>(meta.data_ptr<int64_t>());
  std::vector<Grid> grids;
  grids.reserve(num_images);
  int64_t offset = 0;
  int64_t total = 0;
  for (int64_t k = 0; k < num_images; ++k) {
    const int64_t h = hw_ptr[2 * k];
    const int64_t w = hw_ptr[2 * k + 1];
    const std::string where = "image " + std::to_string(k) + " (" + std::to_string(h) + "x" +
                              std::to_string(w) + ")";
    int64_t gh = 0, gw = 0, n = 0, bytes = 0;
    if (h < 1 || h > 2147483647 || w < 1 || w > 2147483647) {
      fail(where + ": sides must be in [1, 2147483647]");
    }
    if (!megatron_navil::patchify_grid(h, w, patch, merge, &gh, &gw) ||
        __builtin_mul_overflow(gh, gw, &n) || __builtin_mul_overflow(h * w, 3, &bytes)) {
      fail(where + ": patch grid overflows int64");
    }
    info[k] = {offset, h, w, total};
    if (__builtin_add_overflow(offset, bytes, &offset) ||
        __builtin_add_overflow(total, n, &total)) {
      fail(where + ": sizes overflow int64");
    }
    grids.emplace_back(gh, gw);
  }
  if (offset != buffer_u8.numel()) {
    fail("buffer holds " + std::to_string(buffer_u8.numel()) + " bytes, the shapes need " +
         std::to_string(offset) + " (H * W * 3 per image, back to back)");
  }
  int64_t numel = 0;
  if (__builtin_mul_overflow(total, dim, &numel)) {
    fail("output of " + std::to_string(total) + " patches overflows int64");
  }

  const c10::cuda::CUDAGuard guard(buffer_u8.device());
  torch::Tensor out = torch::empty({total, dim}, buffer_u8.options().dtype(dtype));
  if (total == 0) {
    return {out, grids};
  }
  // Pinned, then non_blocking: torch keeps the pinned block alive until the copy has run.
  const torch::Tensor meta_device = meta.pin_memory().to(buffer_u8.device(), true);
  const cudaError_t err = megatron_navil::launch_patchify_packed(
      buffer_u8.data_ptr<uint8_t>(), buffer_u8.numel(), info,
      reinterpret_cast<const megatron_navil::PatchifyImage*>(meta_device.data_ptr<int64_t>()),
      num_images, patch, merge, mean.data(), stdev.data(),
      dtype == at::kFloat ? megatron_navil::PatchifyDtype::kFloat32
                          : megatron_navil::PatchifyDtype::kBFloat16,
      out.data_ptr(), total, c10::cuda::getCurrentCUDAStream());
  if (err == cudaErrorInvalidValue) {
    fail("rejected by the launcher (inconsistent arguments)");
  }
  TORCH_CHECK(err == cudaSuccess, "patchify_packed: ", cudaGetErrorString(err));
  return {out, grids};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megatron_navil native CUDA ops";
  m.def("patchify_packed", &patchify_packed, py::arg("buffer_u8"), py::arg("shapes"),
        py::arg("patch"), py::arg("merge"), py::arg("mean"), py::arg("std"), py::arg("dtype"),
        "Patchify many uint8 [H, W, 3] images packed back to back in one CUDA buffer into one "
        "[sum n_i, 3 * patch * patch] tensor in a single launch; returns (packed, grids).");
}
