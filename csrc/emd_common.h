// Host-side argument handling shared by the CPU and CUDA exact-EMD kernels: the checks that
// name the argument, the expected and the received shape/dtype/device, the flattening of any
// batch shape to [B, M, N], and the error message for per-problem validation codes.
#pragma once

#include <ATen/EmptyTensor.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "core/emd_batch.h"

namespace bert_emd {

inline std::string shape_str(at::IntArrayRef s) {
  std::ostringstream o;
  o << "[";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << "]";
  return o.str();
}

// The batch of problems as raw strides: no view or copy is made where the batch dims can be
// flattened by strides alone (views cost microseconds each outside inference mode, and the
// B = 1 call is on every training step's path).
struct EmdArgs {
  at::Tensor cost;  // tensor whose data the strides below describe
  int64_t cb = 0, c0 = 0, c1 = 0;
  at::Tensor a, b;  // undefined = uniform
  int64_t ab = 0, a0 = 0, bb = 0, b0 = 0;
  std::vector<int64_t> batch;
  int64_t B = 0, M = 0, N = 0;
};

// Stride that walks the flattened leading `nlead` dims of t, or -1 if they do not flatten.
inline int64_t flat_batch_stride(const at::Tensor& t, int64_t nlead) {
  if (nlead == 0) return 0;
  for (int64_t d = 0; d + 1 < nlead; ++d)
    if (t.size(d) != 1 && t.stride(d) != t.stride(d + 1) * t.size(d + 1)) return -1;
  return t.stride(nlead - 1);
}

// Validates weights `name` ([..., len] broadcastable to the batch) and returns the tensor and
// its (batch stride, element stride) for the flattened batch; undefined when absent.
inline at::Tensor emd_weights_arg(const char* name, const c10::optional<at::Tensor>& w, const at::Tensor& cost,
                                  const std::vector<int64_t>& batch, int64_t len, const char* len_name,
                                  int64_t* bstride, int64_t* estride) {
  if (!w.has_value() || !w->defined()) return at::Tensor();
  at::Tensor t = *w;
  TORCH_CHECK_VALUE(at::isFloatingType(t.scalar_type()), "emd: ", name,
                    " must be a floating-point tensor, got dtype ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == cost.device(), "emd: ", name, " must be on the same device as cost (",
                    cost.device(), "), got ", t.device());
  TORCH_CHECK_VALUE(t.dim() >= 1 && t.size(-1) == len, "emd: ", name, " must have shape [..., ", len_name, "=",
                    len, "] broadcastable to cost's batch shape ", shape_str(batch), ", got shape ",
                    shape_str(t.sizes()));
  const int64_t lead = t.dim() - 1;
  bool ok = lead <= int64_t(batch.size());
  bool full = lead == int64_t(batch.size());
  for (int64_t d = 0; ok && d < lead; ++d) {
    const int64_t s = t.size(d), want = batch[batch.size() - lead + d];
    ok = (s == 1 || s == want);
    full = full && s == want;
  }
  TORCH_CHECK_VALUE(ok, "emd: ", name, " of shape ", shape_str(t.sizes()),
                    " does not broadcast to cost's batch shape ", shape_str(batch), " + [", len, "]");
  if (t.scalar_type() != cost.scalar_type()) t = t.to(cost.scalar_type());
  int64_t bs = -1;
  bool all_one = true;
  for (int64_t d = 0; d < lead; ++d) all_one = all_one && t.size(d) == 1;
  if (all_one) bs = 0;  // one weight vector for every problem
  else if (full) bs = flat_batch_stride(t, lead);
  if (bs < 0) {  // partial broadcast or unflattenable strides: materialise [B, len]
    std::vector<int64_t> shape(batch);
    shape.push_back(len);
    int64_t B = 1;
    for (auto x : batch) B *= x;
    t = t.expand(shape).reshape({B, len}).contiguous();
    bs = len;
  }
  *bstride = bs;
  *estride = t.stride(-1);
  return t;
}

inline EmdArgs emd_prepare(const at::Tensor& cost, const c10::optional<at::Tensor>& a,
                           const c10::optional<at::Tensor>& b) {
  TORCH_CHECK_VALUE(cost.defined(), "emd: cost must be a tensor");
  TORCH_CHECK_VALUE(cost.dim() >= 2, "emd: cost must have shape [..., M, N] (at least 2 dims), got shape ",
                    shape_str(cost.sizes()));
  TORCH_CHECK_VALUE(cost.scalar_type() == at::kFloat || cost.scalar_type() == at::kDouble,
                    "emd: cost must be float32 or float64, got dtype ", cost.scalar_type());
  EmdArgs r;
  r.M = cost.size(-2);
  r.N = cost.size(-1);
  TORCH_CHECK_VALUE(r.M >= 1 && r.N >= 1, "emd: cost must have M >= 1 rows and N >= 1 columns, got shape ",
                    shape_str(cost.sizes()));
  r.batch.assign(cost.sizes().begin(), cost.sizes().end() - 2);
  r.B = 1;
  for (auto x : r.batch) r.B *= x;
  const int64_t nlead = cost.dim() - 2;
  r.cost = cost;
  r.cb = flat_batch_stride(cost, nlead);
  if (r.cb < 0) {
    r.cost = cost.reshape({r.B, r.M, r.N}).contiguous();
    r.cb = r.M * r.N;
  }
  r.c0 = r.cost.stride(-2);
  r.c1 = r.cost.stride(-1);
  r.a = emd_weights_arg("a", a, cost, r.batch, r.M, "M", &r.ab, &r.a0);
  r.b = emd_weights_arg("b", b, cost, r.batch, r.N, "N", &r.bb, &r.b0);
  return r;
}

// Output shapes: batch + extra dims.
inline std::vector<int64_t> emd_shape(const std::vector<int64_t>& batch, std::initializer_list<int64_t> extra) {
  std::vector<int64_t> s(batch);
  s.insert(s.end(), extra.begin(), extra.end());
  return s;
}

// An uninitialised tensor on the device of `opts`; CPU tensors are made directly, without the
// dispatcher's round trip of at::empty (five outputs a call, on the per-step B = 1 path).
inline at::Tensor emd_empty(at::IntArrayRef shape, const at::TensorOptions& opts) {
  if (opts.device().is_cpu()) return at::detail::empty_cpu(shape, opts.dtype().toScalarType(), false, std::nullopt);
  return at::empty(shape, opts);
}

// The op's five outputs, allocated on the cost's device: value [...], plan [..., M, N], duals
// [..., M] and [..., N], status [...] (int32).
struct EmdOutputs {
  at::Tensor value, plan, u, v, status;
  EmdOutputs(const EmdArgs& args, const at::TensorOptions& opts)
      : value(emd_empty(args.batch, opts)),
        plan(emd_empty(emd_shape(args.batch, {args.M, args.N}), opts)),
        u(emd_empty(emd_shape(args.batch, {args.M}), opts)),
        v(emd_empty(emd_shape(args.batch, {args.N}), opts)),
        status(emd_empty(args.batch, opts.dtype(at::kInt))) {}
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> as_tuple() const {
    return {value, plan, u, v, status};
  }
};

// The solver core's view of one call (shared by the CPU and CUDA kernels): the inputs as `args`
// describes them, the outputs, and where each problem's error code (and, on the CPU, its two
// masses for the error message; nullptr on the GPU) goes.
template <typename scalar_t>
core::EmdBatch<scalar_t> emd_batch_view(const EmdArgs& args, const EmdOutputs& out, int32_t* error, double* sums,
                                        int64_t max_iter) {
  core::EmdBatch<scalar_t> bt;
  bt.C = args.cost.data_ptr<scalar_t>();
  bt.cb = args.cb; bt.c0 = args.c0; bt.c1 = args.c1;
  bt.a = args.a.defined() ? args.a.data_ptr<scalar_t>() : nullptr;
  bt.ab = args.ab; bt.a0 = args.a0;
  bt.b = args.b.defined() ? args.b.data_ptr<scalar_t>() : nullptr;
  bt.bb = args.bb; bt.b0 = args.b0;
  bt.value = out.value.data_ptr<scalar_t>();
  bt.plan = out.plan.data_ptr<scalar_t>();
  bt.u = out.u.data_ptr<scalar_t>();
  bt.v = out.v.data_ptr<scalar_t>();
  bt.status = out.status.data_ptr<int32_t>();
  bt.error = error;
  bt.sums = sums;
  bt.M = static_cast<int>(args.M);
  bt.N = static_cast<int>(args.N);
  bt.max_iter = max_iter;
  return bt;
}

// Raises the ValueError for the first invalid problem (codes from core::emd_check). Defined
// in csrc/cpu/emd_cpu.cpp: the exception is thrown from host code compiled by the C++
// compiler, also when the CUDA kernel reports the error.
[[noreturn]] void emd_raise_invalid(int64_t t, int code, double sa, double sb, int64_t B);

}  // namespace bert_emd
