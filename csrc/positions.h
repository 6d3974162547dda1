// Per-patch 2D RoPE positions, vision-encoder segments (cu_seqlens) and the optional window
// permutation for a packed list of patch grids (NaViL / Qwen2.5-VL layout).
//
// Layouts (n = sum over grids of gh * gw, grids in packing order, one grid per image *scale*):
//   grids        [(gh, gw), ...] patch grids from patchify; both sides multiples of merge
//   positions    [n, 2] int32 or int64: (row, col) of each patch in its grid, in patchify's
//                order (merge x merge units in raster order, row-major inside a unit)
//   cu_seqlens   [num_grids + 1] int32: 0, n_0, n_0 + n_1, ... (one segment per grid)
//   perm         [n] int64: window order -> packed index (x_window = x[perm])
//   inverse      [n] int64: packed index -> window order (x = x_window[inverse])
//   window_cu    [num_windows + 1] int32: segments of the window order, one per window
// Windows are window x window merge units tiled from the top-left of each grid, partial at the
// right/bottom edges, in raster order; inside a window its units stay in raster order and each
// unit's merge * merge patches stay contiguous (Qwen2.5-VL's get_window_index).
// Every op throws std::invalid_argument (ValueError in Python) for merge / window outside
// [1, 2**31 - 1], a grid side outside [1, 2**31 - 1] or not a multiple of merge, and more than
// 2**31 - 1 patches in total (cu_seqlens are int32).
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <tuple>
#include <utility>
#include <vector>

namespace megatron_navil {

using Grid = std::pair<int64_t, int64_t>;

torch::Tensor patch_positions(const std::vector<Grid>& grids, int64_t merge, at::ScalarType dtype);

torch::Tensor vision_cu_seqlens(const std::vector<Grid>& grids, int64_t merge);

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> window_permutation(
    const std::vector<Grid>& grids, int64_t window, int64_t merge);

}  // namespace megatron_navil
