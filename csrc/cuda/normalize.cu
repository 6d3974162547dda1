#include "normalize.h"

#include <algorithm>

namespace megatron_navil {
namespace {

struct ChannelParams {
  float mean[kMaxNormalizeChannels];
  float inv_std[kMaxNormalizeChannels];
};

__global__ void normalize_u8_kernel(const uint8_t* __restrict__ in, float* __restrict__ out,
                                    int64_t n, int channels, ChannelParams params) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    const int c = static_cast<int>(i % channels);
    out[i] = (static_cast<float>(in[i]) * (1.0f / 255.0f) - params.mean[c]) * params.inv_std[c];
  }
}

}  // namespace

cudaError_t launch_normalize_u8(const uint8_t* in, float* out, int64_t n, int channels,
                                const float* mean, const float* std, cudaStream_t stream) {
  if (channels < 1 || channels > kMaxNormalizeChannels || n < 0 || n % channels != 0 ||
      mean == nullptr || std == nullptr) {
    return cudaErrorInvalidValue;
  }
  if (n == 0) {
    return cudaSuccess;
  }
  if (in == nullptr || out == nullptr) {
    return cudaErrorInvalidValue;
  }
  ChannelParams params{};
  for (int c = 0; c < channels; ++c) {
    if (std[c] == 0.0f) {
      return cudaErrorInvalidValue;
    }
    params.mean[c] = mean[c];
    params.inv_std[c] = 1.0f / std[c];
  }
  constexpr int kThreads = 256;
  // Grid-stride loop: cap the grid, each thread handles several elements on large inputs.
  const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, 65535);
  normalize_u8_kernel<<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
      in, out, n, channels, params);
  return cudaGetLastError();
}

}  // namespace megatron_navil
