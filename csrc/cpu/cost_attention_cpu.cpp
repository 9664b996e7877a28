// Cost attention, CPU kernel: the whole layer-weight rule of one step (csrc/core/cost_attention.h)
// in one call, instead of ~45 tensor ops a feature.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "../cost_attention_common.h"

namespace bert_emd {

std::tuple<at::Tensor, at::Tensor> cost_attention_step_cpu(const at::Tensor& plan, const at::Tensor& cost,
                                                           const at::Tensor& student_weight,
                                                           const at::Tensor& teacher_weight, int64_t features,
                                                           int64_t normalize, double temperature, double eps) {
  TORCH_CHECK_VALUE(cost.device().is_cpu(), "cost_attention_step (cpu backend): cost must be a CPU tensor, got ",
                    cost.device());
  CostAttentionArgs a =
      cost_attention_prepare(plan, cost, student_weight, teacher_weight, features, normalize, temperature, eps);
  auto opts = a.ws.options();
  at::Tensor out_s = at::empty({a.M}, opts), out_t = at::empty({a.N}, opts);
  std::vector<double> scratch(static_cast<size_t>(2 * (a.M + a.N)));
  AT_DISPATCH_FLOATING_TYPES(a.cost.scalar_type(), "cost_attention_step_cpu", [&] {
    core::cost_attention_rule<scalar_t>(a.plan.data_ptr<scalar_t>(), a.cost.data_ptr<scalar_t>(), int(a.F), a.B,
                                        int(a.M), int(a.N), a.ws.data_ptr<double>(), a.wt.data_ptr<double>(),
                                        int(normalize), temperature, eps, out_s.data_ptr<double>(),
                                        out_t.data_ptr<double>(), scratch.data());
  });
  return {out_s, out_t};
}

TORCH_LIBRARY_IMPL(bert_emd, CPU, m) { m.impl("cost_attention_step", &cost_attention_step_cpu); }

}  // namespace bert_emd
