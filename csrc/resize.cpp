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
  // patch^2 < 2^62 and max_patches < 2^63: the products are exact in 128 bits.
  const i128 patch_area = static_cast<i128>(patch) * patch;
  const i128 max_pixels = patch_area * max_patches;
  if (max_pixels >= kMaxExactPixels) {
    fail("max_patches * patch * patch must be below 2**53 (max_patches=" +
         std::to_string(max_patches) + ", patch=" + std::to_string(patch) + ")");
  }
  const int64_t pixels = height * width;  // < 2^62: both sides < 2^31
  if (pixels >= kMaxExactPixels) {
    fail("height * width must be below 2**53 (image " + std::to_string(height) + "x" +
         std::to_string(width) + ")");
  }
  // min_pixels <= max_pixels < 2^53 (min_patches <= max_patches): every count below is an
  // exact double, so each division is Python's correctly rounded int / int.
  const int64_t min_pixels = static_cast<int64_t>(patch_area * min_patches);
  const auto hd = static_cast<double>(height);
  const auto wd = static_cast<double>(width);
  if (pixels > static_cast<int64_t>(max_pixels)) {
    const double beta = std::sqrt(static_cast<double>(pixels) / static_cast<double>(max_pixels));
    // h / beta <= h < 2^31: the casts are exact.
    const auto new_h = static_cast<int64_t>(std::floor(hd / beta));
    const auto new_w = static_cast<int64_t>(std::floor(wd / beta));
    return {new_h < 1 ? 1 : new_h, new_w < 1 ? 1 : new_w};
  }
  if (pixels < min_pixels) {
    const double beta = std::sqrt(static_cast<double>(min_pixels) / static_cast<double>(pixels));
    const double new_h = std::ceil(hd * beta);
    const double new_w = std::ceil(wd * beta);
    if (new_h > static_cast<double>(kMaxImageSide) || new_w > static_cast<double>(kMaxImageSide)) {
      fail("upsampling image " + std::to_string(height) + "x" + std::to_string(width) + " to " +
           std::to_string(min_pixels) + " pixels gives a side above " +
           std::to_string(kMaxImageSide));
    }
    return {static_cast<int64_t>(new_h), static_cast<int64_t>(new_w)};
  }
  return {height, width};
}

}  // namespace megatron_navil
