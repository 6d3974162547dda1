#include "grid.h"

#include <stdexcept>
#include <string>

namespace megatron_navil {
namespace {

void require_positive(const char* name, int64_t value) {
  if (value <= 0) {
    throw std::invalid_argument(std::string("merged_grid: ") + name +
                                " must be a positive integer, got " + std::to_string(value));
  }
}

// ceil(side / unit) * merge. The ceil cannot overflow (side / unit + 1 <= side for unit >= 2;
// no rounding for unit == 1), but the product can for sides near INT64_MAX (e.g. patch == 1).
int64_t padded_count(const char* name, int64_t side, int64_t unit, int64_t merge) {
  const int64_t merged_units = side / unit + (side % unit != 0 ? 1 : 0);
  int64_t count = 0;
  if (__builtin_mul_overflow(merged_units, merge, &count)) {
    throw std::invalid_argument(std::string("merged_grid: padded ") + name +
                                " patch count overflows int64 (" + name + "=" +
                                std::to_string(side) + ")");
  }
  return count;
}

}  // namespace

std::pair<int64_t, int64_t> merged_grid(int64_t height, int64_t width, int64_t patch,
                                        int64_t merge) {
  require_positive("height", height);
  require_positive("width", width);
  require_positive("patch", patch);
  require_positive("merge", merge);
  int64_t unit = 0;
  if (__builtin_mul_overflow(patch, merge, &unit)) {
    throw std::invalid_argument("merged_grid: patch * merge overflows int64 (patch=" +
                                std::to_string(patch) + ", merge=" + std::to_string(merge) + ")");
  }
  return {padded_count("height", height, unit, merge), padded_count("width", width, unit, merge)};
}

}  // namespace megatron_navil
