// uint8 images -> normalised patches in merge-unit order (NaViL / Qwen2-VL layout).
//
// Layouts:
//   image   [H, W, C] uint8, channels-last, C == 3 (RGB)
//   patches [n, C * patch * patch] float32 or bfloat16, n = gh * gw, one row per patch
//   grid    (gh, gw) = merged_grid(H, W, patch, merge): the padded image is gh*patch x gw*patch
// Patch order: merge units (merge x merge patches) in raster order over the padded image, the
// merge * merge patches of a unit row-major inside it; each patch row is channel-major
// [C, patch, patch] (Qwen2-VL's flattening with temporal_patch_size == 1).
// Values: v = (float(double(x) * (1.0 / 255.0)) - mean[c]) / std[c], the subtraction and
// division in fp32 (then rounded to bfloat16 if asked); the zero padding (bottom/right) goes
// through the same formula, so it becomes -mean[c] / std[c] (-1 for mean = std = 0.5).
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace megatron_navil {

using Grid = std::pair<int64_t, int64_t>;

// One image. Throws std::invalid_argument for a non-uint8 / non-CPU / non-[H, W, 3] / empty
// image, bad patch / merge, mean / std not 3 finite values (std > 0), or a dtype other than
// float32 / bfloat16. A non-contiguous image is made contiguous.
std::pair<torch::Tensor, Grid> patchify(const torch::Tensor& image, int64_t patch, int64_t merge,
                                        const std::vector<double>& mean,
                                        const std::vector<double>& stdev,
                                        at::ScalarType dtype);

// Many images into one packed [sum n_i, C * patch * patch] tensor, in input order, plus the
// grid of each. An empty list gives a [0, C * patch * patch] tensor.
std::pair<torch::Tensor, std::vector<Grid>> patchify_batch(const std::vector<torch::Tensor>& images,
                                                           int64_t patch, int64_t merge,
                                                           const std::vector<double>& mean,
                                                           const std::vector<double>& stdev,
                                                           at::ScalarType dtype);

// Which CPU kernel patchify / patchify_batch use for these parameters on this machine: "avx2"
// (AVX2 + FMA arithmetic, picked at run time where the CPU has it and it reproduces the
// portable kernel's value table bit for bit) or "portable" (table lookups; also forced by the
// environment variable MEGATRON_NAVIL_PATCHIFY_PORTABLE=1). Both give identical results.
// Throws std::invalid_argument for bad mean / std / dtype.
std::string patchify_kernel(const std::vector<double>& mean, const std::vector<double>& stdev,
                            at::ScalarType dtype);

}  // namespace megatron_navil
