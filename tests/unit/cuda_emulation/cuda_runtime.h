// Test-only stand-in for <cuda_runtime.h>: just enough of the CUDA runtime and device
// built-ins for g++ to compile csrc/cuda/patchify.cu and run its kernel on CPU threads (see
// tests/unit/test_cuda_emulated.py). A block is 256 std::threads meeting at a std::barrier for
// __syncthreads; __shared__ variables are statics (blocks run one after another); blocks run in
// order. It checks the kernel's indexing, tiling, loads and stores, not GPU timing or the
// memory model. Never on the include path of a real build.
#pragma once

#include <algorithm>
#include <barrier>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(n)
#define __grid_constant__

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorLaunchFailure = 4 };
using cudaStream_t = struct CUstream_st*;
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };

struct dim3 {
  unsigned int x = 1, y = 1, z = 1;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1)
      : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};

inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;
inline std::barrier<>* emu_barrier = nullptr;
// Multiprocessor count the emulated device reports (small, so grids are small and the kernel's
// grid-stride loop runs several rounds).
inline int emu_sms = 1;
inline long emu_launches = 0;

inline void __syncthreads() { emu_barrier->arrive_and_wait(); }

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
using std::max;
using std::min;

inline unsigned int __float_as_uint(float v) {
  unsigned int u;
  std::memcpy(&u, &v, sizeof u);
  return u;
}

inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr, int) {
  *value = emu_sms;
  return cudaSuccess;
}
inline cudaError_t cudaGetLastError() { return cudaSuccess; }

// Runs the grid: each block as blockDim.x threads (x only), blocks in order.
template <typename... A>
cudaError_t cudaLaunchKernel(void (*kernel)(A...), dim3 grid, dim3 block, void** args, size_t,
                             cudaStream_t) {
  if (grid.x == 0 || block.x == 0 || block.x > 1024 || grid.y != 1 || block.y != 1) {
    return cudaErrorInvalidValue;
  }
  ++emu_launches;
  std::tuple<std::decay_t<A>...> values = [&]<size_t... I>(std::index_sequence<I...>) {
    return std::tuple<std::decay_t<A>...>(*static_cast<std::decay_t<A>*>(args[I])...);
  }(std::index_sequence_for<A...>{});
  for (unsigned int b = 0; b < grid.x; ++b) {
    std::barrier<> bar(block.x);
    emu_barrier = &bar;
    std::vector<std::thread> threads;
    for (unsigned int t = 0; t < block.x; ++t) {
      threads.emplace_back([&, t] {
        threadIdx = dim3(t);
        blockIdx = dim3(b);
        blockDim = block;
        gridDim = grid;
        std::apply(kernel, values);
      });
    }
    for (auto& th : threads) th.join();
  }
  emu_barrier = nullptr;
  return cudaSuccess;
}
