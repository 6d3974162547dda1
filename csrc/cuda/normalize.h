// uint8 -> float image normalisation on the GPU. Plain CUDA runtime API, no torch headers, so
// the .cu compiles with nvcc alone (CI checks that without a GPU).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace megatron_navil {

// Largest channel count launch_normalize_u8 accepts (mean/std travel in kernel parameters).
constexpr int kMaxNormalizeChannels = 4;

// out[i] = (in[i] / 255 - mean[c]) / std[c] with c = i % channels, over a flat channels-last
// buffer of n elements (n a multiple of channels). `in` and `out` are device pointers; `mean`
// and `std` are host arrays of `channels` floats. Enqueues on `stream` and returns the launch
// status; cudaErrorInvalidValue for bad arguments (channels outside [1, kMaxNormalizeChannels],
// n negative or not a multiple of channels, a zero std, null pointers with n > 0).
cudaError_t launch_normalize_u8(const uint8_t* in, float* out, int64_t n, int channels,
                                const float* mean, const float* std, cudaStream_t stream);

}  // namespace megatron_navil
