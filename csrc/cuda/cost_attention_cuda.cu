// Cost attention, CUDA kernel: the layer-weight rule of one step (csrc/core/cost_attention.h, the
// same core as the CPU kernel) in one launch of one thread. The rule reads F x B x M x N values
// and writes M + N: a single thread takes microseconds, and one launch replaces ~45 tensor ops a
// feature, each its own launch. It never synchronises with the host.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "../cost_attention_common.h"

namespace bert_emd {

template <typename T>
__global__ void cost_attention_kernel(const T* plan, const T* cost, int F, int64_t B, int M, int N, const double* ws,
                                      const double* wt, int normalize, double temperature, double eps,
                                      double* out_s, double* out_t, double* scratch) {
  core::cost_attention_rule<T>(plan, cost, F, B, M, N, ws, wt, normalize, temperature, eps, out_s, out_t, scratch);
}

std::tuple<at::Tensor, at::Tensor> cost_attention_step_cuda(const at::Tensor& plan, const at::Tensor& cost,
                                                            const at::Tensor& student_weight,
                                                            const at::Tensor& teacher_weight, int64_t features,
                                                            int64_t normalize, double temperature, double eps) {
  TORCH_CHECK_VALUE(cost.is_cuda(), "cost_attention_step (cuda backend): cost must be a CUDA tensor, got ",
                    cost.device());
  const c10::cuda::CUDAGuard guard(cost.device());
  CostAttentionArgs a =
      cost_attention_prepare(plan, cost, student_weight, teacher_weight, features, normalize, temperature, eps);
  auto opts = a.ws.options();
  at::Tensor out_s = at::empty({a.M}, opts), out_t = at::empty({a.N}, opts);
  at::Tensor scratch = at::empty({2 * (a.M + a.N)}, opts);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(a.cost.scalar_type(), "cost_attention_step_cuda", [&] {
    cost_attention_kernel<scalar_t><<<1, 1, 0, stream.stream()>>>(
        a.plan.data_ptr<scalar_t>(), a.cost.data_ptr<scalar_t>(), int(a.F), a.B, int(a.M), int(a.N),
        a.ws.data_ptr<double>(), a.wt.data_ptr<double>(), int(normalize), temperature, eps,
        out_s.data_ptr<double>(), out_t.data_ptr<double>(), scratch.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out_s, out_t};
}

TORCH_LIBRARY_IMPL(bert_emd, CUDA, m) { m.impl("cost_attention_step", &cost_attention_step_cuda); }

}  // namespace bert_emd
