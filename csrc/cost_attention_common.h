// Host-side argument handling shared by the CPU and CUDA cost-attention kernels: the checks that
// name the argument and what was expected, and the float64 / contiguous views the core reads.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <tuple>

#include "core/cost_attention.h"

namespace bert_emd {

struct CostAttentionArgs {
  at::Tensor plan, cost;  // [F, B, M, N] contiguous, one floating dtype (float32 or float64)
  at::Tensor ws, wt;      // [M], [N] float64 contiguous
  int64_t F = 1, B = 1, M = 0, N = 0;
};

// t in dtype dt, contiguous; t itself when it already is (no dispatched call on the common path)
inline at::Tensor as_read(const at::Tensor& t, at::ScalarType dt) {
  return t.scalar_type() == dt && t.is_contiguous() ? t : t.to(dt).contiguous();
}

inline CostAttentionArgs cost_attention_prepare(const at::Tensor& plan, const at::Tensor& cost, const at::Tensor& ws,
                                                const at::Tensor& wt, int64_t features, int64_t normalize,
                                                double temperature, double eps) {
  const char* op = "cost_attention_step";
  TORCH_CHECK_VALUE(plan.dim() >= 2 && plan.sizes() == cost.sizes(), op,
                    ": plan and cost must both be [..., M, N] with the same shape, got ", plan.sizes(), " and ",
                    cost.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(plan.scalar_type()) && at::isFloatingType(cost.scalar_type()), op,
                    ": plan and cost must be floating-point, got ", plan.scalar_type(), " and ", cost.scalar_type());
  TORCH_CHECK_VALUE(plan.device() == cost.device() && ws.device() == cost.device() && wt.device() == cost.device(),
                    op, ": plan, cost and the weights must be on one device, got ", plan.device(), ", ",
                    cost.device(), ", ", ws.device(), ", ", wt.device());
  CostAttentionArgs r;
  r.M = plan.size(-2);
  r.N = plan.size(-1);
  TORCH_CHECK_VALUE(ws.dim() == 1 && ws.size(0) == r.M && wt.dim() == 1 && wt.size(0) == r.N, op,
                    ": student_weight must be [M=", r.M, "] and teacher_weight [N=", r.N, "], got ", ws.sizes(),
                    " and ", wt.sizes());
  TORCH_CHECK_VALUE(normalize >= core::kCaSum && normalize <= core::kCaDoubleSoftmax, op,
                    ": normalize must be 0 (sum), 1 (softmax) or 2 (double_softmax), got ", normalize);
  TORCH_CHECK_VALUE(temperature > 0 && eps > 0, op, ": temperature and eps must be > 0, got ", temperature,
                    " and ", eps);
  const int64_t problems = plan.numel() / std::max<int64_t>(1, r.M * r.N);
  TORCH_CHECK_VALUE(features >= 1 && problems % features == 0 && r.M * r.N > 0 && problems > 0, op,
                    ": features must be >= 1 and divide the ", problems, " problems of shape ", plan.sizes());
  r.F = features;
  r.B = problems / features;
  // one dtype for both (a float32 flow and a float64 cost are read as float64)
  const auto dt = plan.scalar_type() == cost.scalar_type() &&
                          (plan.scalar_type() == at::kFloat || plan.scalar_type() == at::kDouble)
                      ? plan.scalar_type()
                      : at::kDouble;
  r.plan = as_read(plan, dt);
  r.cost = as_read(cost, dt);
  r.ws = as_read(ws, at::kDouble);
  r.wt = as_read(wt, at::kDouble);
  return r;
}

}  // namespace bert_emd
