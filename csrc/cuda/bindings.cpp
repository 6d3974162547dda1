// Torch-tensor wrapper of the CUDA ops: module megatron_navil._C_cuda (CUDA builds only).
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <string>
#include <vector>

#include "normalize.h"

namespace {

// image_u8: uint8 CUDA tensor, channels last ([..., C]). Returns float32 of the same shape.
torch::Tensor normalize_u8(const torch::Tensor& image_u8, const std::vector<double>& mean,
                           const std::vector<double>& std) {
  TORCH_CHECK(image_u8.is_cuda(), "normalize_u8: input must be a CUDA tensor");
  TORCH_CHECK(image_u8.scalar_type() == torch::kUInt8, "normalize_u8: input must be uint8");
  TORCH_CHECK(image_u8.dim() >= 1, "normalize_u8: input needs a channel (last) dimension");
  const int64_t channels = image_u8.size(-1);
  TORCH_CHECK(channels >= 1 && channels <= megatron_navil::kMaxNormalizeChannels,
              "normalize_u8: channels must be in [1, ", megatron_navil::kMaxNormalizeChannels,
              "], got ", channels);
  TORCH_CHECK(static_cast<int64_t>(mean.size()) == channels &&
                  static_cast<int64_t>(std.size()) == channels,
              "normalize_u8: mean and std need one value per channel (", channels, ")");
  const std::vector<float> mean_f(mean.begin(), mean.end());
  const std::vector<float> std_f(std.begin(), std.end());
  for (float s : std_f) {
    TORCH_CHECK(s != 0.0f, "normalize_u8: std must be non-zero");
  }

  const c10::cuda::CUDAGuard guard(image_u8.device());
  const torch::Tensor in = image_u8.contiguous();
  torch::Tensor out = torch::empty(in.sizes(), in.options().dtype(torch::kFloat32));
  const cudaError_t err = megatron_navil::launch_normalize_u8(
      in.data_ptr<uint8_t>(), out.data_ptr<float>(), in.numel(), static_cast<int>(channels),
      mean_f.data(), std_f.data(), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "normalize_u8: ", cudaGetErrorString(err));
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megatron_navil native CUDA ops";
  m.def("normalize_u8", &normalize_u8, py::arg("image_u8"), py::arg("mean"), py::arg("std"),
        "(x / 255 - mean) / std per channel of a channels-last uint8 CUDA tensor -> float32.");
}
