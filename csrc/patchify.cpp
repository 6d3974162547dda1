// CPU patchify: see patchify.h for layouts. Work is split over patch rows of all images at once
// (at::parallel_for), so a batch of many small images parallelises as well as one large image.
// Two kernels write the patches, with identical results: a portable one that looks values up
// in a per-channel table, and an AVX2 + FMA one (x86-64, picked at run time) that computes
// them 8 at a time; choose_kernel uses the latter only where it reproduces the table exactly.
#include "patchify.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <stdexcept>
#include <string>

#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__x86_64__)
#include <immintrin.h>
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

// Per-channel float32 normalisation constants, as the reference rounds them.
struct Norm {
  float mean[kChannels];
  float stdev[kChannels];
};

Norm make_norm(const std::vector<double>& mean, const std::vector<double>& stdev) {
  Norm norm{};
  for (int64_t c = 0; c < kChannels; ++c) {
    norm.mean[c] = static_cast<float>(mean[c]);
    norm.stdev[c] = static_cast<float>(stdev[c]);
  }
  return norm;
}

// The value of every uint8 in every channel, in the output type: lut[c][x].
template <typename T>
using Lut = std::array<std::array<T, 256>, kChannels>;

// The per-channel lookup table of all 256 uint8 values: the definition of the op's values.
// The portable kernel reads it; the fast kernel computes the values and is only used when it
// reproduces this table bit for bit (choose_kernel).
template <typename T>
Lut<T> make_lut(const Norm& norm) {
  Lut<T> lut{};
  // One rounding per step, in this order (setup.py builds with -ffp-contract=off, so no FMA);
  // the PyTorch reference computes the same expression elementwise. The scaling is done in
  // double and rounded once to float, as transformers' rescale does (uint8 -> float64 *
  // (1/255) -> float32), so the values equal its Qwen2-VL pixel_values bit for bit.
  const double inv255 = 1.0 / 255.0;
  for (int64_t c = 0; c < kChannels; ++c) {
    for (int v = 0; v < 256; ++v) {
      const float scaled = static_cast<float>(static_cast<double>(v) * inv255);
      const float centred = scaled - norm.mean[c];
      lut[c][v] = static_cast<T>(centred / norm.stdev[c]);
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

// The image pixels of one patch: rows [0, rows) x columns [0, cols) of the patch lie inside
// the image (row i starts at src + i * stride, interleaved RGB); the rest is padding.
struct PatchSrc {
  const uint8_t* src;
  int64_t stride;  // bytes between image rows
  int64_t rows, cols;
};

// Pixels [0, count) of one image row (interleaved RGB at src) -> the three channel rows.
template <typename T>
inline void lut_pixels(const uint8_t* src, int64_t count, const Lut<T>& lut, T* d0, T* d1,
                       T* d2) {
  for (int64_t j = 0; j < count; ++j) {
    d0[j] = lut[0][src[kChannels * j]];
    d1[j] = lut[1][src[kChannels * j + 1]];
    d2[j] = lut[2][src[kChannels * j + 2]];
  }
}

// Columns [from, patch) of the three channel rows are padding: the value of a zero pixel.
template <typename T>
inline void pad_pixels(int64_t from, int64_t patch, const Lut<T>& lut, T* d0, T* d1, T* d2) {
  for (int64_t j = from; j < patch; ++j) {
    d0[j] = lut[0][0];
    d1[j] = lut[1][0];
    d2[j] = lut[2][0];
  }
}

// ---- portable kernel: table lookups ------------------------------------------------------
// Writes one patch ([C, patch, patch] at dst). kPatch > 0 fixes the patch side at compile time
// (NaViL's 16: the per-row loops unroll fully); 0 takes `patch` at run time.
template <typename T, int kPatch>
void fill_patch_portable(const PatchSrc& p, int64_t patch_arg, const Lut<T>& lut, const Norm&,
                         T* dst) {
  const int64_t patch = kPatch > 0 ? kPatch : patch_arg;
  const int64_t plane = patch * patch;
  for (int64_t i = 0; i < patch; ++i) {
    T* d0 = dst + i * patch;  // channel planes of row i
    T* d1 = d0 + plane;
    T* d2 = d1 + plane;
    if (i < p.rows && p.cols == patch) {  // the common case: a whole row of pixels
      lut_pixels(p.src + i * p.stride, patch, lut, d0, d1, d2);
      continue;
    }
    const int64_t cols = i < p.rows ? p.cols : 0;
    if (cols > 0) {  // src + i * stride is only formed for rows inside the image
      lut_pixels(p.src + i * p.stride, cols, lut, d0, d1, d2);
    }
    pad_pixels(cols, patch, lut, d0, d1, d2);
  }
}

// ---- fast kernel: AVX2 + FMA arithmetic (x86-64, chosen at run time) ---------------------
// The table lookup costs about 1 ns per value (three dependent loads and a store per pixel
// channel); computing the values 8 at a time in vector registers is ~5x cheaper, which leaves
// the op bound by memory. Only this section is compiled for AVX2 + FMA (GCC/Clang target
// pragma, no -march flag), so the library still loads on any x86-64; choose_kernel calls it
// only on CPUs that have both, and only when it reproduces the lookup table bit for bit.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MEGATRON_NAVIL_PATCHIFY_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")

// The channels of 8 pixels (the 24 bytes at src, no byte beyond) as int32 lanes: bytes 0..15
// go to the low 128-bit lane and bytes 8..23 to the high one, then one in-lane byte shuffle per
// channel picks pixels 0-3 (low lane) and 4-7 (high lane), zero-extended.
inline void deinterleave8(const uint8_t* src, __m256i& r, __m256i& g, __m256i& b) {
  const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
  const __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 8));
  const __m256i v = _mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1);
  constexpr char Z = -128;  // shuffle index with the high bit set: a zero byte
  const __m256i mr = _mm256_setr_epi8(0, Z, Z, Z, 3, Z, Z, Z, 6, Z, Z, Z, 9, Z, Z, Z,  //
                                      4, Z, Z, Z, 7, Z, Z, Z, 10, Z, Z, Z, 13, Z, Z, Z);
  const __m256i mg = _mm256_setr_epi8(1, Z, Z, Z, 4, Z, Z, Z, 7, Z, Z, Z, 10, Z, Z, Z,  //
                                      5, Z, Z, Z, 8, Z, Z, Z, 11, Z, Z, Z, 14, Z, Z, Z);
  const __m256i mb = _mm256_setr_epi8(2, Z, Z, Z, 5, Z, Z, Z, 8, Z, Z, Z, 11, Z, Z, Z,  //
                                      6, Z, Z, Z, 9, Z, Z, Z, 12, Z, Z, Z, 15, Z, Z, Z);
  r = _mm256_shuffle_epi8(v, mr);
  g = _mm256_shuffle_epi8(v, mg);
  b = _mm256_shuffle_epi8(v, mb);
}

// (float(x / 255) - mean) / stdev for 8 uint8 values x in int32 lanes. float(x / 255) is the
// correctly rounded quotient, which for every x in [0, 255] equals the reference's
// float(double(x) * (1/255)) (the table check proves it at run time): q = x * (1/255) is within
// an ulp, x - q * 255 is exact with FMA, and q + (x - q * 255) * (1/255) rounds to the
// quotient. The subtraction and the (true, IEEE) division are the reference's float32 steps.
inline __m256 normalise8(__m256i x_i32, __m256 mean, __m256 stdev) {
  const __m256 x = _mm256_cvtepi32_ps(x_i32);  // exact
  const __m256 inv255 = _mm256_set1_ps(1.0f / 255.0f);
  const __m256 q = _mm256_mul_ps(x, inv255);
  const __m256 rem = _mm256_fnmadd_ps(q, _mm256_set1_ps(255.0f), x);
  const __m256 scaled = _mm256_fmadd_ps(rem, inv255, q);
  return _mm256_div_ps(_mm256_sub_ps(scaled, mean), stdev);
}

// Stores 8 values; kStream: non-temporal, for a 32-byte (float) / 16-byte (bfloat16) aligned
// dst. The output is written once and not read back here, so streaming it past the caches
// saves the read-for-ownership of every line (fill_rows fences after its last one).
template <bool kStream>
inline void store8(float* dst, __m256 v) {
  if constexpr (kStream) {
    _mm256_stream_ps(dst, v);
  } else {
    _mm256_storeu_ps(dst, v);
  }
}

// float32 -> bfloat16 round to nearest even, as c10::BFloat16: (bits + 0x7FFF + lsb) >> 16,
// NaN -> 0x7FC0.
template <bool kStream>
inline void store8(at::BFloat16* dst, __m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i bias = _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF));
  __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, bias), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), nan);
  // Lanes hold values < 2^16, so the saturating pack keeps them; 8 x uint16 in order.
  const __m128i packed =
      _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1));
  if constexpr (kStream) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst), packed);
  } else {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), packed);
  }
}

struct Avx2Norm {
  __m256 mean[kChannels], stdev[kChannels];
  explicit Avx2Norm(const Norm& norm) {
    for (int64_t c = 0; c < kChannels; ++c) {
      mean[c] = _mm256_set1_ps(norm.mean[c]);
      stdev[c] = _mm256_set1_ps(norm.stdev[c]);
    }
  }
};

// lut_pixels for count >= 8: groups of 8 pixels, the last group moved back to end at `count`
// (it rewrites a few values with the same bits) so nothing is read or written past the run.
// kStream needs count % 8 == 0 and aligned rows (see store8).
template <bool kStream = false, typename T>
inline void avx2_pixels(const uint8_t* src, int64_t count, const Avx2Norm& k, T* d0, T* d1,
                        T* d2) {
  for (int64_t j = 0;; j += 8) {
    j = std::min<int64_t>(j, count - 8);
    __m256i r, g, b;
    deinterleave8(src + kChannels * j, r, g, b);
    store8<kStream>(d0 + j, normalise8(r, k.mean[0], k.stdev[0]));
    store8<kStream>(d1 + j, normalise8(g, k.mean[1], k.stdev[1]));
    store8<kStream>(d2 + j, normalise8(b, k.mean[2], k.stdev[2]));
    if (j + 8 >= count) {
      break;
    }
  }
}

// fill_patch_portable with avx2_pixels for runs of at least 8 pixels.
template <typename T, int kPatch>
void fill_patch_avx2(const PatchSrc& p, int64_t patch_arg, const Lut<T>& lut, const Norm& norm,
                     T* dst) {
  const int64_t patch = kPatch > 0 ? kPatch : patch_arg;
  const int64_t plane = patch * patch;
  const Avx2Norm k(norm);
  // Whole rows are streamed when every 8-value group is aligned: patch a multiple of 8 and dst
  // aligned (always so for patch 16: torch aligns the output to 64 bytes, a patch is 3 KiB).
  const bool stream = patch % 8 == 0 && reinterpret_cast<uintptr_t>(dst) % (8 * sizeof(T)) == 0;
  for (int64_t i = 0; i < patch; ++i) {
    T* d0 = dst + i * patch;
    T* d1 = d0 + plane;
    T* d2 = d1 + plane;
    if (i < p.rows && p.cols == patch && stream) {
      avx2_pixels<true>(p.src + i * p.stride, patch, k, d0, d1, d2);
      continue;
    }
    const int64_t cols = i < p.rows ? p.cols : 0;
    if (cols >= 8) {
      avx2_pixels(p.src + i * p.stride, cols, k, d0, d1, d2);
    } else if (cols > 0) {
      lut_pixels(p.src + i * p.stride, cols, lut, d0, d1, d2);
    }
    pad_pixels(cols, patch, lut, d0, d1, d2);
  }
}

// Whether avx2_pixels gives exactly `lut` for every value of every channel. Every output value
// is a function of (channel, uint8 value) alone, so this proves the fast kernel equal to the
// portable one on all images for these mean / std / dtype (also when some are inf or NaN).
template <typename T>
bool avx2_matches_lut(const Lut<T>& lut, const Norm& norm) {
  std::array<uint8_t, 256 * kChannels> pixels{};  // pixel v = (v, v, v)
  for (int v = 0; v < 256; ++v) {
    for (int64_t c = 0; c < kChannels; ++c) {
      pixels[kChannels * v + c] = static_cast<uint8_t>(v);
    }
  }
  Lut<T> got{};
  avx2_pixels(pixels.data(), 256, Avx2Norm(norm), got[0].data(), got[1].data(), got[2].data());
  return std::memcmp(got.data(), lut.data(), sizeof(Lut<T>)) == 0;
}

#pragma GCC pop_options
#endif  // AVX2 section

enum class Kernel { kPortable, kAvx2 };

bool cpu_has_avx2_fma() {
#ifdef MEGATRON_NAVIL_PATCHIFY_AVX2
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return has;
#else
  return false;
#endif
}

// MEGATRON_NAVIL_PATCHIFY_PORTABLE set to anything but "" or "0" forces the portable kernel
// (read at each call; tests compare the two kernels with it).
bool portable_forced() {
  const char* v = std::getenv("MEGATRON_NAVIL_PATCHIFY_PORTABLE");
  return v != nullptr && v[0] != '\0' && std::strcmp(v, "0") != 0;
}

// The fast kernel where the CPU has it, it is not disabled, and it reproduces the table.
template <typename T>
Kernel choose_kernel(const Lut<T>& lut, const Norm& norm) {
#ifdef MEGATRON_NAVIL_PATCHIFY_AVX2
  if (!portable_forced() && cpu_has_avx2_fma() && avx2_matches_lut(lut, norm)) {
    return Kernel::kAvx2;
  }
#else
  (void)lut;
  (void)norm;
#endif
  return Kernel::kPortable;
}

const char* kernel_name(Kernel kernel) { return kernel == Kernel::kAvx2 ? "avx2" : "portable"; }

struct ImageJob {
  const uint8_t* src;  // [H, W, 3] contiguous
  int64_t height, width;
  int64_t gh, gw;
  int64_t row_begin;    // first global patch row of this image
  int64_t patch_begin;  // first output row (patch) of this image
};

// Writes the patches of patch row `py` of one image with `fill` (a fill_patch_* instance).
template <typename T, typename Fill>
void patch_row(const ImageJob& job, int64_t py, int64_t patch, int64_t merge, const Lut<T>& lut,
               const Norm& norm, Fill fill, T* out) {
  const int64_t dim = kChannels * patch * patch;
  const int64_t units_w = job.gw / merge;
  const int64_t uy = py / merge;
  const int64_t my = py % merge;
  const int64_t y0 = py * patch;
  const int64_t rows = std::max<int64_t>(0, std::min<int64_t>(patch, job.height - y0));
  for (int64_t px = 0; px < job.gw; ++px) {
    const int64_t ux = px / merge;
    const int64_t mx = px % merge;
    const int64_t n = job.patch_begin + ((uy * units_w + ux) * merge + my) * merge + mx;
    const int64_t x0 = px * patch;
    const int64_t cols = std::max<int64_t>(0, std::min<int64_t>(patch, job.width - x0));
    // Only formed for patches with pixels to read, so it never points past the image.
    const uint8_t* src =
        rows > 0 && cols > 0 ? job.src + (y0 * job.width + x0) * kChannels : job.src;
    fill(PatchSrc{src, job.width * kChannels, rows, cols}, patch, lut, norm, out + n * dim);
  }
}

template <typename T, int kPatch>
void fill_rows(const std::vector<ImageJob>& jobs, int64_t begin, int64_t end, int64_t patch,
               int64_t merge, const Lut<T>& lut, const Norm& norm, Kernel kernel, T* out) {
  // The job holding global patch row `begin`: the last one starting at or before it.
  auto it = std::upper_bound(jobs.begin(), jobs.end(), begin,
                             [](int64_t row, const ImageJob& j) { return row < j.row_begin; });
  size_t k = static_cast<size_t>(it - jobs.begin()) - 1;
  for (int64_t row = begin; row < end; ++row) {
    while (row >= jobs[k].row_begin + jobs[k].gh) {
      ++k;
    }
    const int64_t py = row - jobs[k].row_begin;
#ifdef MEGATRON_NAVIL_PATCHIFY_AVX2
    if (kernel == Kernel::kAvx2) {
      patch_row(jobs[k], py, patch, merge, lut, norm, fill_patch_avx2<T, kPatch>, out);
      continue;
    }
#endif
    patch_row(jobs[k], py, patch, merge, lut, norm, fill_patch_portable<T, kPatch>, out);
  }
#ifdef MEGATRON_NAVIL_PATCHIFY_AVX2
  if (kernel == Kernel::kAvx2) {
    _mm_sfence();  // order the streaming stores before the caller (another thread) reads
  }
#endif
}

template <typename T>
void run_jobs(const std::vector<ImageJob>& jobs, int64_t total_rows, int64_t patch, int64_t merge,
              const Norm& norm, T* out) {
  const auto lut = make_lut<T>(norm);
  const Kernel kernel = choose_kernel(lut, norm);
  at::parallel_for(0, total_rows, 1, [&](int64_t begin, int64_t end) {
    if (patch == 16) {
      fill_rows<T, 16>(jobs, begin, end, patch, merge, lut, norm, kernel, out);
    } else {
      fill_rows<T, 0>(jobs, begin, end, patch, merge, lut, norm, kernel, out);
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
  const Norm norm = make_norm(mean, stdev);
  auto out = torch::empty({total_patches, dim}, torch::TensorOptions().dtype(dtype));
  advise_huge_pages(out);
  if (total_patches > 0) {
    if (dtype == at::kFloat) {
      run_jobs<float>(jobs, total_rows, patch, merge, norm, out.data_ptr<float>());
    } else {
      run_jobs<at::BFloat16>(jobs, total_rows, patch, merge, norm, out.data_ptr<at::BFloat16>());
    }
  }
  return {out, grids};
}

}  // namespace

std::string patchify_kernel(const std::vector<double>& mean, const std::vector<double>& stdev,
                            at::ScalarType dtype) {
  check_params(1, 1, mean, stdev, dtype);
  const Norm norm = make_norm(mean, stdev);
  if (dtype == at::kFloat) {
    return kernel_name(choose_kernel(make_lut<float>(norm), norm));
  }
  return kernel_name(choose_kernel(make_lut<at::BFloat16>(norm), norm));
}

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
