#include "resize.h"

#include <cmath>
#include <cstdio>
#include <stdexcept>
#include <string>

namespace megatron_navil {
namespace {

using i128 = __int128;

[[noreturn]] void fail(const std::string& msg) {
  throw std::invalid_argument("smart_resize: " + msg);
}

void require_side(const char* name, int64_t value) {
  if (value <= 0) {
    fail(std::string(name) + " must be a positive integer, got " + std::to_string(value));
  }
  if (value > kMaxImageSide) {
    fail(std::string(name) + " must be at most " + std::to_string(kMaxImageSide) + ", got " +
         std::to_string(value));
  }
}

std::string format_g(double value) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%g", value);  // same text as Python's f"{value:g}"
  return buf;
}

// Padded patch count of an h x w image (merged_grid's product); exact in 128 bits for sides
// and patch/merge up to kMaxImageSide.
i128 padded_count(int64_t h, int64_t w, int64_t unit, int64_t merge) {
  const i128 gh = static_cast<i128>((h + unit - 1) / unit) * merge;
  const i128 gw = static_cast<i128>((w + unit - 1) / unit) * merge;
  return gh * gw;
}

}  // namespace

std::pair<int64_t, int64_t> smart_resize(int64_t height, int64_t width, int64_t patch,
                                         int64_t merge, int64_t min_patches, int64_t max_patches,
                                         double max_aspect) {
  require_side("height", height);
  require_side("width", width);
  require_side("patch", patch);
  require_side("merge", merge);
  if (min_patches <= 0) {
    fail("min_patches must be a positive integer, got " + std::to_string(min_patches));
  }
  if (max_patches <= 0) {
    fail("max_patches must be a positive integer, got " + std::to_string(max_patches));
  }
  if (min_patches > max_patches) {
    fail("min_patches (" + std::to_string(min_patches) + ") must be <= max_patches (" +
         std::to_string(max_patches) + ")");
  }
  const int64_t merge_sq = merge * merge;  // < 2^62: merge <= kMaxImageSide
  if (max_patches < merge_sq) {
    fail("max_patches (" + std::to_string(max_patches) + ") must be >= merge * merge (" +
         std::to_string(merge_sq) + "): any image takes at least one merge unit");
  }
  if (!std::isfinite(max_aspect) || max_aspect < 1.0) {
    fail("max_aspect must be a finite number >= 1, got " + format_g(max_aspect));
  }
  const int64_t long_side = height >= width ? height : width;
  const int64_t short_side = height >= width ? width : height;
  // Both sides are exact in double (< 2^31); the product is one rounding, as in Python.
  if (static_cast<double>(long_side) > max_aspect * static_cast<double>(short_side)) {
    fail("image " + std::to_string(height) + "x" + std::to_string(width) + " has aspect ratio " +
         std::to_string(long_side) + "/" + std::to_string(short_side) +
         " > max_aspect=" + format_g(max_aspect));
  }

  const int64_t unit = patch * merge;  // < 2^62
  const i128 count = padded_count(height, width, unit, merge);
  if (count >= min_patches && count <= max_patches) {
    return {height, width};
  }

  // The aspect-preserving family, indexed by the new long side.
  auto short_for = [&](int64_t new_long) -> int64_t {
    const i128 num = static_cast<i128>(2) * short_side * new_long + long_side;
    const int64_t s = static_cast<int64_t>(num / (static_cast<i128>(2) * long_side));
    return s < 1 ? 1 : s;
  };
  auto count_for = [&](int64_t new_long) -> i128 {
    return padded_count(new_long, short_for(new_long), unit, merge);
  };
  // Largest x in [lo, hi] with count_for(x) <= limit, given count_for(lo) <= limit
  // (count_for is non-decreasing in x).
  auto last_at_most = [&](int64_t lo, int64_t hi, i128 limit) -> int64_t {
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo + 1) / 2;
      if (count_for(mid) <= limit) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    return lo;
  };
  const std::string no_fit = "no size keeping the aspect ratio of " + std::to_string(height) +
                             "x" + std::to_string(width) + " has a padded patch count in [" +
                             std::to_string(min_patches) + ", " + std::to_string(max_patches) +
                             "]";

  int64_t new_long = 0;
  if (count > max_patches) {
    // count_for(1) == merge * merge <= max_patches (checked above), count_for(long_side) > max.
    new_long = last_at_most(1, long_side - 1, max_patches);
  } else {
    // Smallest x in (long_side, kMaxImageSide] with count_for(x) >= min_patches.
    if (count_for(kMaxImageSide) < min_patches) {
      fail(no_fit);
    }
    int64_t lo = long_side + 1;
    int64_t hi = kMaxImageSide;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (count_for(mid) >= min_patches) {
        hi = mid;
      } else {
        lo = mid + 1;
      }
    }
    const i128 target = count_for(lo);
    if (target > max_patches) {
      fail(no_fit);
    }
    new_long = last_at_most(lo, kMaxImageSide, target);
  }
  const int64_t new_short = short_for(new_long);
  if (height >= width) {
    return {new_long, new_short};
  }
  return {new_short, new_long};
}

}  // namespace megatron_navil
