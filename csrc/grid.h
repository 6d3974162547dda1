// Patch-grid arithmetic for variable-resolution images (NaViL packing).
#pragma once

#include <cstdint>
#include <utility>

namespace megatron_navil {

// Patch grid (h_patches, w_patches) of an image of height x width pixels after zero-padding
// each side up to a multiple of patch * merge (merge x merge patches become one token after
// pixel shuffle). Each count is ceil(side / (patch * merge)) * merge, so it is a multiple of
// merge. Throws std::invalid_argument for non-positive inputs or if patch * merge overflows.
std::pair<int64_t, int64_t> merged_grid(int64_t height, int64_t width, int64_t patch = 16,
                                        int64_t merge = 2);

}  // namespace megatron_navil
