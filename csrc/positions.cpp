// CPU positions / segments / window permutation: see positions.h for layouts. Plain serial
// loops (memory-bound, a few ns per patch): they run in data-loader workers, which use one
// thread each, and are deterministic by construction.
#include "positions.h"

#include <algorithm>
#include <stdexcept>
#include <string>

#include "resize.h"

namespace megatron_navil {
namespace {

constexpr int64_t kInt32Max = 2147483647;

[[noreturn]] void fail(const char* op, const std::string& msg) {
  throw std::invalid_argument(std::string(op) + ": " + msg);
}

void check_param(const char* op, const char* name, int64_t value) {
  if (value <= 0 || value > kMaxImageSide) {
    fail(op, std::string(name) + " must be an integer in [1, " + std::to_string(kMaxImageSide) +
                 "], got " + std::to_string(value));
  }
}

// Validates merge and the grids (same checks and messages as megatron_navil/ops/positions.py);
// returns the total patch count.
int64_t check_grids(const char* op, const std::vector<Grid>& grids, int64_t merge) {
  check_param(op, "merge", merge);
  int64_t total = 0;
  for (size_t k = 0; k < grids.size(); ++k) {
    const auto [gh, gw] = grids[k];
    const std::string pair = "(" + std::to_string(gh) + ", " + std::to_string(gw) + ")";
    if (gh <= 0 || gw <= 0 || gh > kMaxImageSide || gw > kMaxImageSide) {
      fail(op, "grid " + std::to_string(k) + " sides must be integers in [1, " +
                   std::to_string(kMaxImageSide) + "], got " + pair);
    }
    if (gh % merge != 0 || gw % merge != 0) {
      fail(op, "grid " + std::to_string(k) + " " + pair + " is not a multiple of merge=" +
                   std::to_string(merge) + " (patchify grids are whole merge units)");
    }
    total += gh * gw;  // < 2^62 each, and total <= kInt32Max before: no overflow
    if (total > kInt32Max) {
      fail(op, "more than " + std::to_string(kInt32Max) +
                   " patches in total (cu_seqlens are int32): " + std::to_string(total) +
                   " after grid " + std::to_string(k));
    }
  }
  return total;
}

template <typename T>
void fill_positions(const std::vector<Grid>& grids, int64_t merge, T* out) {
  for (const auto& [gh, gw] : grids) {
    const int64_t uh = gh / merge;
    const int64_t uw = gw / merge;
    for (int64_t uy = 0; uy < uh; ++uy) {
      for (int64_t ux = 0; ux < uw; ++ux) {
        for (int64_t my = 0; my < merge; ++my) {
          for (int64_t mx = 0; mx < merge; ++mx) {
            *out++ = static_cast<T>(uy * merge + my);
            *out++ = static_cast<T>(ux * merge + mx);
          }
        }
      }
    }
  }
}

}  // namespace

torch::Tensor patch_positions(const std::vector<Grid>& grids, int64_t merge,
                              at::ScalarType dtype) {
  const char* op = "patch_positions";
  if (dtype != at::kInt && dtype != at::kLong) {
    fail(op, std::string("dtype must be torch.int32 or torch.int64, got ") +
                 c10::toString(dtype));
  }
  const int64_t total = check_grids(op, grids, merge);
  auto positions = torch::empty({total, 2}, torch::TensorOptions().dtype(dtype));
  if (dtype == at::kInt) {
    fill_positions(grids, merge, positions.data_ptr<int32_t>());
  } else {
    fill_positions(grids, merge, positions.data_ptr<int64_t>());
  }
  return positions;
}

torch::Tensor vision_cu_seqlens(const std::vector<Grid>& grids, int64_t merge) {
  check_grids("vision_cu_seqlens", grids, merge);
  const int64_t count = static_cast<int64_t>(grids.size());
  auto cu = torch::empty({count + 1}, torch::TensorOptions().dtype(at::kInt));
  int32_t* out = cu.data_ptr<int32_t>();
  int64_t acc = 0;
  out[0] = 0;
  for (int64_t k = 0; k < count; ++k) {
    acc += grids[k].first * grids[k].second;
    out[k + 1] = static_cast<int32_t>(acc);  // <= kInt32Max (checked)
  }
  return cu;
}

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> window_permutation(
    const std::vector<Grid>& grids, int64_t window, int64_t merge) {
  const char* op = "window_permutation";
  check_param(op, "window", window);
  const int64_t total = check_grids(op, grids, merge);
  auto perm = torch::empty({total}, torch::TensorOptions().dtype(at::kLong));
  auto inverse = torch::empty({total}, torch::TensorOptions().dtype(at::kLong));
  int64_t* p = perm.data_ptr<int64_t>();
  int64_t* inv = inverse.data_ptr<int64_t>();
  std::vector<int32_t> bounds{0};
  const int64_t unit = merge * merge;
  int64_t k = 0;     // position in window order
  int64_t base = 0;  // packed index of the grid's first patch
  for (const auto& [gh, gw] : grids) {
    const int64_t uh = gh / merge;
    const int64_t uw = gw / merge;
    for (int64_t y0 = 0; y0 < uh; y0 += window) {  // y0 + window < 2^32: no overflow
      const int64_t y1 = std::min(y0 + window, uh);
      for (int64_t x0 = 0; x0 < uw; x0 += window) {
        const int64_t x1 = std::min(x0 + window, uw);
        for (int64_t uy = y0; uy < y1; ++uy) {
          for (int64_t ux = x0; ux < x1; ++ux) {
            const int64_t first = base + (uy * uw + ux) * unit;
            for (int64_t j = 0; j < unit; ++j) {
              p[k] = first + j;
              inv[first + j] = k;
              ++k;
            }
          }
        }
        bounds.push_back(static_cast<int32_t>(k));
      }
    }
    base += gh * gw;
  }
  auto window_cu = torch::empty({static_cast<int64_t>(bounds.size())},
                                torch::TensorOptions().dtype(at::kInt));
  std::copy(bounds.begin(), bounds.end(), window_cu.data_ptr<int32_t>());
  return {perm, inverse, window_cu};
}

}  // namespace megatron_navil
