// uint8 images -> normalised patches on the GPU, many images in one launch. Plain CUDA runtime
// API, no torch headers, so the .cu compiles with nvcc alone (CI checks that without a GPU).
//
// Layouts (the same as the CPU op, csrc/patchify.h):
//   images  one packed uint8 device buffer; image k is [H_k, W_k, 3] channels-last and
//           contiguous, starting at byte offset_k (any alignment)
//   out     [sum_k gh_k * gw_k, 3 * patch * patch] float32 or bfloat16, row-major; image k's
//           patches start at row first_patch_k, (gh_k, gw_k) = merged_grid(H_k, W_k, ...)
// Patch order: merge units (merge x merge patches) in raster order over the image padded
// bottom/right to a multiple of patch * merge, the patches of a unit row-major inside it; each
// row channel-major [3, patch, patch]. Values: table[c][x] with x the uint8 pixel (0 for
// padding) and table[c][x] = (float(double(x) * (1.0 / 255.0)) - float(mean[c])) /
// float(std[c]) computed on the host in float32 (one rounding per step, no FMA), exactly like
// the CPU op; bfloat16 output is that float rounded to nearest even. So the GPU output equals
// the CPU op's bit for bit.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace megatron_navil {

// One image of the packed input; first_patch is its first row in the output.
struct PatchifyImage {
  int64_t offset;  // byte offset of pixel (0, 0) in the packed buffer
  int64_t height;
  int64_t width;
  int64_t first_patch;
};

enum class PatchifyDtype : int { kFloat32 = 0, kBFloat16 = 1 };

// Patch grid of one image: ceil(side / (patch * merge)) * merge per side. Returns false when
// an argument is not positive or the arithmetic overflows int64.
bool patchify_grid(int64_t height, int64_t width, int64_t patch, int64_t merge, int64_t* gh,
                   int64_t* gw);

// Enqueues the patchify of `num_images` images on `stream` (one kernel launch) and returns its
// status. `meta_host` and `meta_device` hold the same `num_images` entries (the host copy is
// validated here; the kernel reads the device copy, which the caller has copied or is copying
// on `stream`). `images` is a device buffer of `images_bytes` bytes, `out` a device buffer of
// `out_rows` x (3 * patch * patch) elements of `dtype`; `mean` / `std` are host arrays of 3.
// Returns cudaErrorInvalidValue, enqueueing nothing, when: patch or merge is outside
// [1, 2^31 - 1] or 3 * patch * patch overflows; mean / std are not finite, std not positive;
// num_images < 0; an image has a side outside [1, 2^31 - 1], a negative offset or bytes past
// images_bytes; first_patch is not the running sum of the previous images' patch counts;
// out_rows is not the total patch count; or a pointer needed for non-empty work is null.
// Zero images (or zero patches) is a valid no-op.
cudaError_t launch_patchify_packed(const uint8_t* images, int64_t images_bytes,
                                   const PatchifyImage* meta_host,
                                   const PatchifyImage* meta_device, int64_t num_images,
                                   int64_t patch, int64_t merge, const double* mean,
                                   const double* std, PatchifyDtype dtype, void* out,
                                   int64_t out_rows, cudaStream_t stream);

}  // namespace megatron_navil
