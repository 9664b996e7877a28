// Instantiates the exact-EMD solver core as device code, without torch, so that every build
// with nvcc checks that csrc/core stays __host__ __device__ clean (CMake target
// bert_emd_core_device, sm_80 and sm_90).
#include "core/emd_batch.h"

namespace bert_emd {

template <typename T>
__global__ void core_device_compile_kernel(core::EmdBatch<T> bt, int64_t B, char* ws, size_t stride) {
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t < B) core::emd_batch_solve_one(bt, t, ws + t * stride);
}

template __global__ void core_device_compile_kernel<float>(core::EmdBatch<float>, int64_t, char*, size_t);
template __global__ void core_device_compile_kernel<double>(core::EmdBatch<double>, int64_t, char*, size_t);

}  // namespace bert_emd
