// Test-only stand-in for <cuda_bf16.h> (see cuda_runtime.h here): float -> bfloat16 rounding to
// nearest even, written independently of torch (the test compares with torch's rounding).
#pragma once

#include <cstdint>
#include <cstring>

struct __nv_bfloat16 {
  uint16_t bits;
};

inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN: keep it a (quiet) NaN
    return {static_cast<uint16_t>((u >> 16) | 0x40)};
  }
  u += 0x7fffu + ((u >> 16) & 1u);  // round half to even
  return {static_cast<uint16_t>(u >> 16)};
}
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.bits; }
