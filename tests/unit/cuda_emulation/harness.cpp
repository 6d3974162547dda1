// Test-only: csrc/cuda/patchify.cu compiled with g++ against the stand-in CUDA headers beside
// this file, behind a C function for ctypes (tests/unit/test_cuda_emulated.py). "Device"
// pointers are host pointers.
#include "../../../csrc/cuda/patchify.cu"

extern "C" int emu_patchify(const uint8_t* images, int64_t images_bytes,
                            const megatron_navil::PatchifyImage* meta, int64_t num_images,
                            int64_t patch, int64_t merge, const double* mean, const double* std,
                            int dtype, void* out, int64_t out_rows, int sms, long* launches) {
  emu_sms = sms;
  emu_launches = 0;
  const cudaError_t err = megatron_navil::launch_patchify_packed(
      images, images_bytes, meta, meta, num_images, patch, merge, mean, std,
      static_cast<megatron_navil::PatchifyDtype>(dtype), out, out_rows, nullptr);
  *launches = emu_launches;
  return static_cast<int>(err);
}
