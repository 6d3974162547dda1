// Target size of an image under NaViL's native-resolution rule (see megatron_navil/ops/resize.py
// for the full statement and how it differs from Qwen2-VL's smart_resize).
#pragma once

#include <cstdint>
#include <utility>

namespace megatron_navil {

// Largest image side (and patch / merge size) the size ops accept: int32, like Pillow.
constexpr int64_t kMaxImageSide = 2147483647;

// (new_height, new_width) to resample a height x width image to before patchify zero-pads it
// to a multiple of patch * merge. The patch count is the padded one, merged_grid's
// h_patches * w_patches.
//  - In [min_patches, max_patches]: the image is kept as is (returns (height, width)).
//  - Otherwise the image is rescaled keeping its aspect ratio: the long side L' is searched
//    (short side = max(1, round_half_up(S * L' / L))) and the result is
//      above max: the largest L' < L whose padded count is <= max_patches;
//      below min: the smallest padded count >= min_patches reachable, at the largest L' that
//                 gives that count (fills the padding instead of adding empty pixels).
// Throws std::invalid_argument for non-positive or too large sizes, min_patches > max_patches,
// max_patches < merge * merge, max_aspect not finite or < 1, an aspect ratio
// max(h, w) / min(h, w) above max_aspect, and when no size in the family fits the bounds.
std::pair<int64_t, int64_t> smart_resize(int64_t height, int64_t width, int64_t patch = 16,
                                         int64_t merge = 2, int64_t min_patches = 256,
                                         int64_t max_patches = 24576, double max_aspect = 200.0);

}  // namespace megatron_navil
