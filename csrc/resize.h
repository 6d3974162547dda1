// Target size of an image under the released NaViL code's rule: transformers' Qwen2-VL
// smart_resize with factor 1, its bounds on raw pixels (megatron_navil/ops/resize.py has the
// full statement and the pure-Python reference this op equals).
#pragma once

#include <cstdint>
#include <utility>

namespace megatron_navil {

// Largest image side (and patch / merge size) the size ops accept: int32, like Pillow.
constexpr int64_t kMaxImageSide = 2147483647;
// Pixel counts must be below 2^53: there every integer is an exact double, so dividing two of
// them in double gives Python's correctly rounded int / int.
constexpr int64_t kMaxExactPixels = int64_t{1} << 53;

// (new_height, new_width) to resample a height x width image to before patchify zero-pads it
// to a multiple of patch * merge. With min_pixels = min_patches * patch^2 and
// max_pixels = max_patches * patch^2 (merge takes no part in the size):
//  - height * width > max_pixels: beta = sqrt(height * width / max_pixels),
//    (max(1, floor(height / beta)), max(1, floor(width / beta)));
//  - height * width < min_pixels: beta = sqrt(min_pixels / (height * width)),
//    (ceil(height * beta), ceil(width * beta));
//  - otherwise (height, width).
// Every division and sqrt is one IEEE double operation, as in Python.
// Throws std::invalid_argument for non-positive or too large sizes, min_patches > max_patches,
// max_aspect not finite or < 1, an aspect ratio max(h, w) / min(h, w) above max_aspect,
// max_pixels or height * width not below 2^53, and an upsampled side above kMaxImageSide.
std::pair<int64_t, int64_t> smart_resize(int64_t height, int64_t width, int64_t patch = 16,
                                         int64_t merge = 2, int64_t min_patches = 256,
                                         int64_t max_patches = 24576, double max_aspect = 200.0);

}  // namespace megatron_navil
