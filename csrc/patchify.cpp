// CPU patchify: see patchify.h for layouts. Work is split over patch rows of all images at once
// (at::parallel_for), so a batch of many small images parallelises as well as one large image.
#include "patchify.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <sstream>
#include <stdexcept>
#include <string>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "grid.h"
#include "resize.h"

namespace megatron_navil {
namespace {

constexpr int64_t kChannels = 3;

[[noreturn]] void fail(const std::string& where, const std::string& msg) {
  throw std::invalid_argument(where + ": " + msg);
}

std::string shape_str(const torch::Tensor& t) {
  std::ostringstream out;
  out << "(";
  for (int64_t d = 0; d < t.dim(); ++d) {
    out << (d ? ", " : "") << t.size(d);
  }
  out << (t.dim() == 1 ? ",)" : ")");
  return out.str();
}

void check_params(int64_t patch, int64_t merge, const std::vector<double>& mean,
                  const std::vector<double>& stdev, at::ScalarType dtype) {
  const std::string where = "patchify";
  const std::pair<const char*, int64_t> sizes[] = {{"patch", patch}, {"merge", merge}};
  for (const auto& [name, value] : sizes) {
    if (value <= 0 || value > kMaxImageSide) {
      fail(where, std::string(name) + " must be an integer in [1, " +
                      std::to_string(kMaxImageSide) + "], got " + std::to_string(value));
    }
  }
  const auto finite = [](double v) { return std::isfinite(v); };
  const auto finite_positive = [](double v) { return std::isfinite(v) && v > 0; };
  if (mean.size() != kChannels || !std::all_of(mean.begin(), mean.end(), finite)) {
    fail(where, "mean must be 3 finite numbers (one per RGB channel)");
  }
  if (stdev.size() != kChannels || !std::all_of(stdev.begin(), stdev.end(), finite_positive)) {
    fail(where, "std must be 3 finite positive numbers (one per RGB channel)");
  }
  if (dtype != at::kFloat && dtype != at::kBFloat16) {
    fail(where, std::string("dtype must be torch.float32 or torch.bfloat16, got ") +
                    c10::toString(dtype));
  }
}

// Validates one image and returns it contiguous.
torch::Tensor check_image(const torch::Tensor& image, const std::string& where) {
  if (image.scalar_type() != at::kByte) {
    fail(where, std::string("image must be uint8, got ") + c10::toString(image.scalar_type()));
  }
  if (!image.device().is_cpu()) {
    fail(where, "image must be on the CPU, got device " + image.device().str());
  }
  if (image.dim() != 3 || image.size(2) != kChannels) {
    fail(where, "image must have shape [H, W, 3] (RGB, channels last), got shape " +
                    shape_str(image));
  }
  if (image.size(0) == 0 || image.size(1) == 0) {
    fail(where, "image is empty, got shape " + shape_str(image));
  }
  if (image.size(0) > kMaxImageSide || image.size(1) > kMaxImageSide) {
    fail(where, "image sides must be at most " + std::to_string(kMaxImageSide) +
                    ", got shape " + shape_str(image));
  }
  return image.contiguous();
}

// The per-channel lookup table of all 256 uint8 values, in the output type.
template <typename T>
std::array<std::array<T, 256>, kChannels> make_lut(const std::vector<double>& mean,
                                                   const std::vector<double>& stdev) {
  std::array<std::array<T, 256>, kChannels> lut{};
  // One rounding per step, in this order (setup.py builds with -ffp-contract=off, so no FMA);
  // the PyTorch reference computes the same expression elementwise. The scaling is done in
  // double and rounded once to float, as transformers' rescale does (uint8 -> float64 *
  // (1/255) -> float32), so the values equal its Qwen2-VL pixel_values bit for bit.
  const double inv255 = 1.0 / 255.0;
  for (int64_t c = 0; c < kChannels; ++c) {
    const float m = static_cast<float>(mean[c]);
    const float s = static_cast<float>(stdev[c]);
    for (int v = 0; v < 256; ++v) {
      const float scaled = static_cast<float>(static_cast<double>(v) * inv255);
      const float centred = scaled - m;
      lut[c][v] = static_cast<T>(centred / s);
    }
  }
  return lut;
}

// Asks Linux to back the (not yet touched) output with transparent huge pages where it allows
// them on request (/sys/kernel/mm/transparent_hugepage/enabled = madvise or always): a large
// fresh output otherwise costs one page fault per 4 KiB, which took 2/3 of the time of a
// float32 batch here (benchmarks/bench_patchify.py). Only the 2 MiB-aligned interior of the
// buffer is advised, so nothing outside the tensor's own memory is touched; a no-op for small
// outputs, elsewhere than Linux, or when the kernel says no (the advice is only a hint).
void advise_huge_pages(const torch::Tensor& out) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const auto begin = reinterpret_cast<uintptr_t>(out.data_ptr());
  const uintptr_t end = begin + static_cast<uintptr_t>(out.nbytes());
  const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t hi = end & ~(kHuge - 1);
  if (hi > lo) {
    madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);  // a hint: result ignored
  }
#else
  (void)out;
#endif
}

struct ImageJob {
  const uint8_t* src;  // [H, W, 3] contiguous
  int64_t height, width;
  int64_t gh, gw;
  int64_t row_begin;    // first global patch row of this image
  int64_t patch_begin;  // first output row (patch) of this image
};

// Writes the patches of patch row `py` of one image. kPatch > 0 fixes the patch side at compile
// time (NaViL's 16: the per-row loops unroll fully); 0 takes `patch` at run time.
template <typename T, int kPatch>
void patch_row(const ImageJob& job, int64_t py, int64_t patch_arg, int64_t merge,
               const std::array<std::array<T, 256>, kChannels>& lut, T* out) {
  const int64_t patch = kPatch > 0 ? kPatch : patch_arg;
  const int64_t plane = patch * patch;
  const int64_t dim = kChannels * plane;
  const int64_t units_w = job.gw / merge;
  const int64_t uy = py / merge;
  const int64_t my = py % merge;
  const auto& t0 = lut[0];
  const auto& t1 = lut[1];
  const auto& t2 = lut[2];
  for (int64_t px = 0; px < job.gw; ++px) {
    const int64_t ux = px / merge;
    const int64_t mx = px % merge;
    const int64_t n = job.patch_begin + ((uy * units_w + ux) * merge + my) * merge + mx;
    T* dst = out + n * dim;
    const int64_t x0 = px * patch;
    // Columns [x0, x0 + valid) are inside the image; the rest is padding.
    const int64_t valid = std::max<int64_t>(0, std::min<int64_t>(patch, job.width - x0));
    for (int64_t i = 0; i < patch; ++i) {
      const int64_t y = py * patch + i;
      const int64_t row_valid = y < job.height ? valid : 0;
      T* d0 = dst + i * patch;  // channel planes of row i
      T* d1 = d0 + plane;
      T* d2 = d1 + plane;
      if (row_valid == patch) {  // the common case: one pass over the row's pixels
        const uint8_t* src = job.src + (y * job.width + x0) * kChannels;
        for (int64_t j = 0; j < patch; ++j) {
          d0[j] = t0[src[kChannels * j]];
          d1[j] = t1[src[kChannels * j + 1]];
          d2[j] = t2[src[kChannels * j + 2]];
        }
        continue;
      }
      // Only formed for rows with pixels to read, so it never points past the image.
      const uint8_t* src = row_valid > 0 ? job.src + (y * job.width + x0) * kChannels : job.src;
      for (int64_t j = 0; j < row_valid; ++j) {
        d0[j] = t0[src[kChannels * j]];
        d1[j] = t1[src[kChannels * j + 1]];
        d2[j] = t2[src[kChannels * j + 2]];
      }
      for (int64_t j = row_valid; j < patch; ++j) {
        d0[j] = t0[0];
        d1[j] = t1[0];
        d2[j] = t2[0];
      }
    }
  }
}

template <typename T>
void run_jobs(const std::vector<ImageJob>& jobs, int64_t total_rows, int64_t patch, int64_t merge,
              const std::vector<double>& mean, const std::vector<double>& stdev, T* out) {
  const auto lut = make_lut<T>(mean, stdev);
  at::parallel_for(0, total_rows, 1, [&](int64_t begin, int64_t end) {
    // The job holding global patch row `begin`: the last one starting at or before it.
    auto it = std::upper_bound(jobs.begin(), jobs.end(), begin,
                               [](int64_t row, const ImageJob& j) { return row < j.row_begin; });
    size_t k = static_cast<size_t>(it - jobs.begin()) - 1;
    for (int64_t row = begin; row < end; ++row) {
      while (row >= jobs[k].row_begin + jobs[k].gh) {
        ++k;
      }
      if (patch == 16) {
        patch_row<T, 16>(jobs[k], row - jobs[k].row_begin, patch, merge, lut, out);
      } else {
        patch_row<T, 0>(jobs[k], row - jobs[k].row_begin, patch, merge, lut, out);
      }
    }
  });
}

std::pair<torch::Tensor, std::vector<Grid>> patchify_impl(
    const std::vector<torch::Tensor>& images, int64_t patch, int64_t merge,
    const std::vector<double>& mean, const std::vector<double>& stdev, at::ScalarType dtype,
    bool batched) {
  check_params(patch, merge, mean, stdev, dtype);
  int64_t dim = 0;  // kChannels * patch * patch
  if (__builtin_mul_overflow(kChannels * patch, patch, &dim)) {  // kChannels * patch < 2^33
    fail("patchify", "patch " + std::to_string(patch) + " is too large");
  }
  std::vector<torch::Tensor> contiguous;
  contiguous.reserve(images.size());
  std::vector<ImageJob> jobs;
  jobs.reserve(images.size());
  std::vector<Grid> grids;
  grids.reserve(images.size());
  int64_t total_rows = 0;
  int64_t total_patches = 0;
  for (size_t k = 0; k < images.size(); ++k) {
    const std::string where =
        batched ? "patchify_batch: image " + std::to_string(k) : std::string("patchify");
    contiguous.push_back(check_image(images[k], where));
    const torch::Tensor& img = contiguous.back();
    const auto [gh, gw] = merged_grid(img.size(0), img.size(1), patch, merge);
    int64_t n = 0;
    int64_t numel = 0;
    if (__builtin_mul_overflow(gh, gw, &n) ||
        __builtin_add_overflow(total_patches, n, &total_patches) ||
        __builtin_mul_overflow(total_patches, dim, &numel)) {
      fail(where, "output of " + std::to_string(gh) + "x" + std::to_string(gw) +
                      " patches overflows int64");
    }
    jobs.push_back({img.data_ptr<uint8_t>(), img.size(0), img.size(1), gh, gw, total_rows,
                    total_patches - n});
    grids.emplace_back(gh, gw);
    total_rows += gh;
  }
  auto out = torch::empty({total_patches, dim}, torch::TensorOptions().dtype(dtype));
  advise_huge_pages(out);
  if (total_patches > 0) {
    if (dtype == at::kFloat) {
      run_jobs<float>(jobs, total_rows, patch, merge, mean, stdev, out.data_ptr<float>());
    } else {
      run_jobs<at::BFloat16>(jobs, total_rows, patch, merge, mean, stdev,
                             out.data_ptr<at::BFloat16>());
    }
  }
  return {out, grids};
}

}  // namespace

std::pair<torch::Tensor, Grid> patchify(const torch::Tensor& image, int64_t patch, int64_t merge,
                                        const std::vector<double>& mean,
                                        const std::vector<double>& stdev, at::ScalarType dtype) {
  auto [out, grids] = patchify_impl({image}, patch, merge, mean, stdev, dtype, false);
  return {out, grids.front()};
}

std::pair<torch::Tensor, std::vector<Grid>> patchify_batch(const std::vector<torch::Tensor>& images,
                                                           int64_t patch, int64_t merge,
                                                           const std::vector<double>& mean,
                                                           const std::vector<double>& stdev,
                                                           at::ScalarType dtype) {
  return patchify_impl(images, patch, merge, mean, stdev, dtype, true);
}

}  // namespace megatron_navil
