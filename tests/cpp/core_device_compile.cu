// Instantiates the exact-EMD solver core as device code, without torch, so that every build
// with nvcc checks that csrc/core stays __host__ __device__ clean (CMake target
// bert_emd_core_device, sm_80 and sm_90).
#include "core/cost_attention.h"
#include "core/emd_batch.h"

namespace bert_emd {

template <typename T>
__global__ void core_device_compile_kernel(core::EmdBatch<T> bt, int64_t B, char* ws, size_t stride) {
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t < B) core::emd_batch_solve_one(bt, t, ws + t * stride);
}

template __global__ void core_device_compile_kernel<float>(core::EmdBatch<float>, int64_t, char*, size_t);
template __global__ void core_device_compile_kernel<double>(core::EmdBatch<double>, int64_t, char*, size_t);

template <typename T>
__global__ void cost_attention_device_compile_kernel(const T* plan, const T* cost, int F, int64_t B, int M, int N,
                                                     const double* ws, const double* wt, double* out_s,
                                                     double* out_t, double* scratch) {
  core::cost_attention_rule<T>(plan, cost, F, B, M, N, ws, wt, core::kCaDoubleSoftmax, 1.0, 1e-6, out_s, out_t,
                               scratch);
}

template __global__ void cost_attention_device_compile_kernel<float>(const float*, const float*, int, int64_t, int,
                                                                     int, const double*, const double*, double*,
                                                                     double*, double*);
template __global__ void cost_attention_device_compile_kernel<double>(const double*, const double*, int, int64_t,
                                                                      int, int, const double*, const double*,
                                                                      double*, double*, double*);

}  // namespace bert_emd
