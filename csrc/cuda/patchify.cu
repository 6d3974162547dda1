// CUDA patchify: see patchify.h for layouts and values.
//
// Work split. The output is cut into tiles, each filled by one thread block (grid-stride loop
// over tiles, so any count of tiles fits one launch):
//   unit tiles   when (patch * merge)^2 <= kTilePixels (NaViL: 16 * 2 = 32, 1024 pixels): one
//                merge unit, i.e. merge^2 consecutive output rows = one contiguous stretch of
//                merge^2 * 3 * patch^2 elements (NaViL: 3072, 12 KiB of float32);
//   patch tiles  otherwise: a rectangle of at most kTilePixels pixels of one patch (the whole
//                patch when patch^2 <= kTilePixels, so again one contiguous output row).
// Per tile: (1) thread 0 finds the tile's image by binary search over first_patch and its
// pixel rectangle; (2) the block copies the rectangle's input rows (each a contiguous run of
// bytes in the packed buffer) into shared memory: every 16-byte-aligned chunk that lies inside
// a row's run is one uint4 load, the partial chunks at the two ends of the run are copied
// byte by byte; the shared row is laid out at the same address mod 16 as the global run, so
// the uint4 store to shared memory is aligned too; (3) the block writes the tile's output in
// output order, consecutive threads writing consecutive 16-byte vectors (4 floats or 8
// bfloat16, same channel and patch row) when patch allows it, or consecutive scalars
// otherwise: global writes are fully coalesced. Each value is a lookup in a per-block shared
// table[3][256] (already in the output type); pixels outside the image read x = 0.
// Memory traffic: every input byte is read once (the row runs of different tiles do not
// overlap), every output element written once.
#include "patchify.h"

#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>

namespace megatron_navil {
namespace {

constexpr int kChannels = 3;
constexpr int kThreads = 256;
constexpr int64_t kMaxSide = 2147483647;  // csrc/resize.h kMaxImageSide
// A tile has at most this many pixels; its shared input copy is at most
// rows * (16 * ((3 * cols + 15) / 16 + 1)) <= 3 * kTilePixels + 32 * rows bytes (rows <= 32
// when rows * cols <= 1024 and rows <= cols; see tile_shape), below kSmemBytes.
constexpr int64_t kTilePixels = 1024;
constexpr int kSmemBytes = 3 * kTilePixels + 32 * 32 + 64;

struct Params {
  float table[kChannels][256];  // normalised value of each uint8 value, per channel
  const uint8_t* images;
  const PatchifyImage* meta;  // device
  int64_t num_images;
  int64_t patch;
  int64_t merge;
  int64_t dim;          // 3 * patch * patch
  int64_t num_tiles;
  int64_t tile_rows;    // patch tiles: rows / cols of a full tile (edge tiles are clipped)
  int64_t tile_cols;
  int64_t tiles_down;   // patch tiles per patch, vertically / horizontally
  int64_t tiles_across;
  int64_t smem_stride;  // bytes per shared input row (multiple of 16)
  bool unit_tiles;
};

// The tile a block works on, decoded once by thread 0.
struct Tile {
  const uint8_t* src;  // input pixel (row0, col0) of the rectangle (may lie past the image)
  int64_t width;       // image width (row pitch / 3)
  int64_t rows, cols;  // rectangle size in pixels
  int64_t rows_valid, cols_valid;  // part inside the image (the rest is padding)
  int64_t unit_patch;  // output row of the unit's first patch
  int64_t my, mx;      // patch tiles: the patch inside its unit
  int64_t i0, j0;      // patch tiles: rectangle origin inside the patch
};

// The output element's bits: uint32_t for float32, uint16_t for bfloat16 (kernels move bits,
// so 16-byte vectors are plain integer unions).
template <typename Bits>
__device__ __forceinline__ Bits to_bits(float v);
template <>
__device__ __forceinline__ uint32_t to_bits<uint32_t>(float v) {
  return __float_as_uint(v);
}
template <>
__device__ __forceinline__ uint16_t to_bits<uint16_t>(float v) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(v));  // nearest even, like torch's cast
}

__device__ Tile decode_tile(const Params& p, int64_t tile) {
  const int64_t per_unit = p.merge * p.merge;
  const int64_t n = p.unit_tiles ? tile * per_unit : tile / (p.tiles_down * p.tiles_across);
  // Image k: the last with first_patch <= n (first_patch strictly increases: every image has
  // at least one patch).
  int64_t lo = 0;
  int64_t hi = p.num_images - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (p.meta[mid].first_patch <= n) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const PatchifyImage img = p.meta[lo];
  const int64_t unit = p.patch * p.merge;
  const int64_t units_w = (img.width + unit - 1) / unit;
  const int64_t local = n - img.first_patch;
  const int64_t u = local / per_unit;
  const int64_t uy = u / units_w;
  const int64_t ux = u % units_w;
  Tile t;
  t.width = img.width;
  t.unit_patch = img.first_patch + u * per_unit;
  int64_t y0 = uy * unit;
  int64_t x0 = ux * unit;
  if (p.unit_tiles) {
    t.rows = t.cols = unit;
    t.my = t.mx = t.i0 = t.j0 = 0;
  } else {
    const int64_t in_patch = tile % (p.tiles_down * p.tiles_across);
    t.my = (local % per_unit) / p.merge;
    t.mx = local % p.merge;
    t.i0 = (in_patch / p.tiles_across) * p.tile_rows;
    t.j0 = (in_patch % p.tiles_across) * p.tile_cols;
    t.rows = min(p.tile_rows, p.patch - t.i0);
    t.cols = min(p.tile_cols, p.patch - t.j0);
    y0 += t.my * p.patch + t.i0;
    x0 += t.mx * p.patch + t.j0;
  }
  t.rows_valid = max(int64_t{0}, min(t.rows, img.height - y0));
  t.cols_valid = max(int64_t{0}, min(t.cols, img.width - x0));
  // Only an offset, never dereferenced outside [0, rows_valid) x [0, cols_valid).
  t.src = p.images + img.offset + (y0 * img.width + x0) * kChannels;
  return t;
}

// Copies the tile's valid input rows into shared memory: row r's bytes go to
// smem + r * stride + (address mod 16) + b, b in [0, 3 * cols_valid).
__device__ void load_tile(const Tile& t, int64_t stride, uint8_t* smem) {
  if (t.rows_valid == 0 || t.cols_valid == 0) {
    return;
  }
  const int64_t len = t.cols_valid * kChannels;
  const int64_t chunks = stride / 16;  // 16-byte chunks per row, aligned to global addresses
  const int64_t items = t.rows_valid * chunks;
  for (int64_t w = threadIdx.x; w < items; w += blockDim.x) {
    const int64_t r = w / chunks;
    const int64_t c = w % chunks;
    const uint8_t* run = t.src + r * t.width * kChannels;  // row r's first byte
    const uintptr_t begin = reinterpret_cast<uintptr_t>(run);
    const uintptr_t end = begin + static_cast<uintptr_t>(len);
    const uintptr_t chunk = (begin & ~static_cast<uintptr_t>(15)) + 16 * static_cast<uintptr_t>(c);
    if (chunk >= end) {
      continue;
    }
    uint8_t* dst = smem + r * stride + 16 * c;  // aligned like `chunk`
    if (chunk >= begin && chunk + 16 <= end) {
      *reinterpret_cast<uint4*>(dst) = __ldg(reinterpret_cast<const uint4*>(chunk));
    } else {  // a partial chunk at either end of the run: only the run's own bytes
      const uintptr_t lo = max(chunk, begin);
      const uintptr_t hi = min(chunk + 16, end);
      for (uintptr_t a = lo; a < hi; ++a) {
        dst[a - chunk] = __ldg(reinterpret_cast<const uint8_t*>(a));
      }
    }
  }
}

// Output element `e` of the tile, in output order -> (output offset, pixel row, column,
// channel inside the tile rectangle). Elements of one patch (patch tiles: of the rectangle)
// are channel-major, then row, then column.
struct Element {
  int64_t out;
  int64_t r, q;
  int c;
};

__device__ __forceinline__ Element locate(const Params& p, const Tile& t, int64_t e) {
  Element el;
  if (p.unit_tiles) {
    const int64_t pp = p.patch * p.patch;
    const int64_t k = e / p.dim;  // patch inside the unit, row-major
    const int64_t rem = e - k * p.dim;
    el.c = static_cast<int>(rem / pp);
    const int64_t in_c = rem - el.c * pp;
    const int64_t i = in_c / p.patch;
    const int64_t j = in_c - i * p.patch;
    el.r = (k / p.merge) * p.patch + i;
    el.q = (k % p.merge) * p.patch + j;
    el.out = t.unit_patch * p.dim + e;
  } else {
    const int64_t area = t.rows * t.cols;
    el.c = static_cast<int>(e / area);
    const int64_t in_c = e - el.c * area;
    el.r = in_c / t.cols;
    el.q = in_c - el.r * t.cols;
    const int64_t n = t.unit_patch + t.my * p.merge + t.mx;
    el.out = n * p.dim + el.c * p.patch * p.patch + (t.i0 + el.r) * p.patch + t.j0 + el.q;
  }
  return el;
}

template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads)
    patchify_kernel(const __grid_constant__ Params p, T* __restrict__ out) {
  __shared__ T table[kChannels][256];  // bits of the output values
  __shared__ __align__(16) uint8_t smem[kSmemBytes];
  __shared__ Tile tile;
  for (int v = threadIdx.x; v < kChannels * 256; v += blockDim.x) {
    table[v / 256][v % 256] = to_bits<T>(p.table[v / 256][v % 256]);
  }
  for (int64_t tile_id = blockIdx.x; tile_id < p.num_tiles; tile_id += gridDim.x) {
    if (threadIdx.x == 0) {
      tile = decode_tile(p, tile_id);
    }
    __syncthreads();  // tile decoded (and, the first time, the table filled)
    const Tile t = tile;
    load_tile(t, p.smem_stride, smem);
    __syncthreads();
    // Pixel (r, q) channel c of the tile's rectangle, 0 (padding) outside the image.
    const auto pixel = [&](int64_t r, int64_t q, int c) -> uint8_t {
      if (r >= t.rows_valid || q >= t.cols_valid) {
        return 0;
      }
      const uintptr_t shift = reinterpret_cast<uintptr_t>(t.src + r * t.width * kChannels) & 15;
      return smem[r * p.smem_stride + static_cast<int64_t>(shift) + q * kChannels + c];
    };
    const int64_t elements = p.unit_tiles ? p.merge * p.merge * p.dim
                                          : kChannels * t.rows * t.cols;
    // kVec > 1: the host checked that kVec divides the tile's columns and the patch, and that
    // `out` is 16-byte aligned, so a vector never crosses a row and is aligned.
    for (int64_t v = threadIdx.x; v < elements / kVec; v += blockDim.x) {
      const Element el = locate(p, t, v * kVec);
      if constexpr (kVec == 1) {
        out[el.out] = table[el.c][pixel(el.r, el.q, el.c)];
      } else {
        union {
          uint4 u;
          T x[kVec];
        } pack;
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          pack.x[j] = table[el.c][pixel(el.r, el.q + j, el.c)];
        }
        *reinterpret_cast<uint4*>(out + el.out) = pack.u;
      }
    }
    __syncthreads();  // the tile's shared input is consumed before the next tile overwrites it
  }
}

template <typename T, int kVec>
cudaError_t launch(const Params& p, void* out, cudaStream_t stream) {
  int device = 0;
  int sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) {
    err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  }
  if (err != cudaSuccess) {
    return err;
  }
  // Enough blocks to fill every SM several times over; the grid-stride loop takes the rest.
  const int64_t blocks = std::min<int64_t>(p.num_tiles, static_cast<int64_t>(sms) * 16);
  // cudaLaunchKernel rather than <<<>>>: plain C++, so tests/unit/test_cuda_emulated.py can
  // compile this file with g++ and run the kernel on CPU threads.
  T* out_t = static_cast<T*>(out);
  void* args[] = {const_cast<Params*>(&p), &out_t};
  return cudaLaunchKernel(patchify_kernel<T, kVec>, dim3(static_cast<unsigned int>(blocks)),
                          dim3(kThreads), args, 0, stream);
}

bool mul(int64_t a, int64_t b, int64_t* out) { return !__builtin_mul_overflow(a, b, out); }
bool add(int64_t a, int64_t b, int64_t* out) { return !__builtin_add_overflow(a, b, out); }

}  // namespace

bool patchify_grid(int64_t height, int64_t width, int64_t patch, int64_t merge, int64_t* gh,
                   int64_t* gw) {
  int64_t unit = 0;
  if (height <= 0 || width <= 0 || patch <= 0 || merge <= 0 || !mul(patch, merge, &unit)) {
    return false;
  }
  // ceil(side / unit) * merge without overflow: ceil(side / unit) <= side.
  return mul(height / unit + (height % unit != 0), merge, gh) &&
         mul(width / unit + (width % unit != 0), merge, gw);
}

cudaError_t launch_patchify_packed(const uint8_t* images, int64_t images_bytes,
                                   const PatchifyImage* meta_host,
                                   const PatchifyImage* meta_device, int64_t num_images,
                                   int64_t patch, int64_t merge, const double* mean,
                                   const double* std, PatchifyDtype dtype, void* out,
                                   int64_t out_rows, cudaStream_t stream) {
  if (patch < 1 || patch > kMaxSide || merge < 1 || merge > kMaxSide || num_images < 0 ||
      images_bytes < 0 || mean == nullptr || std == nullptr ||
      (dtype != PatchifyDtype::kFloat32 && dtype != PatchifyDtype::kBFloat16) ||
      (num_images > 0 && meta_host == nullptr)) {
    return cudaErrorInvalidValue;
  }
  Params p{};
  if (!mul(patch, patch, &p.dim) || !mul(p.dim, kChannels, &p.dim)) {
    return cudaErrorInvalidValue;
  }
  for (int c = 0; c < kChannels; ++c) {
    if (!std::isfinite(mean[c]) || !std::isfinite(std[c]) || !(std[c] > 0)) {
      return cudaErrorInvalidValue;
    }
  }
  // Validate the images and their output rows; count the patches.
  int64_t total = 0;
  for (int64_t k = 0; k < num_images; ++k) {
    const PatchifyImage& m = meta_host[k];
    int64_t gh = 0, gw = 0, n = 0, bytes = 0, end = 0;
    if (m.height < 1 || m.height > kMaxSide || m.width < 1 || m.width > kMaxSide ||
        m.offset < 0 || !mul(m.height, m.width, &bytes) || !mul(bytes, kChannels, &bytes) ||
        !add(m.offset, bytes, &end) || end > images_bytes ||
        !patchify_grid(m.height, m.width, patch, merge, &gh, &gw) || !mul(gh, gw, &n) ||
        m.first_patch != total || !add(total, n, &total)) {
      return cudaErrorInvalidValue;
    }
  }
  int64_t numel = 0;
  if (out_rows != total || !mul(total, p.dim, &numel)) {
    return cudaErrorInvalidValue;
  }
  if (total == 0) {
    return cudaSuccess;
  }
  if (images == nullptr || meta_device == nullptr || out == nullptr) {
    return cudaErrorInvalidValue;
  }
  // The values of all 256 uint8 inputs, exactly as csrc/patchify.cpp's make_lut: scaling in
  // double rounded once to float, then subtraction and division in float (setup.py passes
  // -ffp-contract=off to the host compiler too, though there is no multiply-add to fuse).
  const double inv255 = 1.0 / 255.0;
  for (int c = 0; c < kChannels; ++c) {
    const float m = static_cast<float>(mean[c]);
    const float s = static_cast<float>(std[c]);
    for (int v = 0; v < 256; ++v) {
      const float scaled = static_cast<float>(static_cast<double>(v) * inv255);
      const float centred = scaled - m;
      p.table[c][v] = centred / s;
    }
  }
  p.images = images;
  p.meta = meta_device;
  p.num_images = num_images;
  p.patch = patch;
  p.merge = merge;
  const int64_t unit = patch * merge;  // no overflow: gh = ceil(H / unit) * merge did not
  int64_t cols = 0;
  if (unit <= kTilePixels / unit) {  // unit^2 <= kTilePixels
    p.unit_tiles = true;
    p.num_tiles = total / (merge * merge);
    cols = unit;
  } else {
    // Rows and columns of a patch tile: whole rows of the patch when they fit, so that a
    // patch of up to 32 x 32 is a single tile (one contiguous output row).
    p.unit_tiles = false;
    p.tile_cols = std::min<int64_t>(patch, kTilePixels);
    p.tile_rows = std::min<int64_t>(patch, kTilePixels / p.tile_cols);
    p.tiles_down = (patch + p.tile_rows - 1) / p.tile_rows;
    p.tiles_across = (patch + p.tile_cols - 1) / p.tile_cols;
    int64_t per_patch = 0;
    if (!mul(p.tiles_down, p.tiles_across, &per_patch) ||
        !mul(total, per_patch, &p.num_tiles)) {
      return cudaErrorInvalidValue;
    }
    cols = p.tile_cols;
  }
  const int64_t rows = p.unit_tiles ? unit : p.tile_rows;
  p.smem_stride = 16 * ((kChannels * cols + 15) / 16 + 1);
  if (rows * p.smem_stride > kSmemBytes) {  // cannot happen with the shapes above
    return cudaErrorInvalidValue;
  }
  // 16-byte stores need every vector inside one patch row and aligned: the vector length
  // divides the patch side and the tile's columns (then it divides every output offset).
  const int vec = dtype == PatchifyDtype::kFloat32 ? 4 : 8;
  const bool vector = patch % vec == 0 && cols % vec == 0 &&
                      reinterpret_cast<uintptr_t>(out) % 16 == 0;
  if (dtype == PatchifyDtype::kFloat32) {
    return vector ? launch<uint32_t, 4>(p, out, stream) : launch<uint32_t, 1>(p, out, stream);
  }
  return vector ? launch<uint16_t, 8>(p, out, stream) : launch<uint16_t, 1>(p, out, stream);
}

}  // namespace megatron_navil
