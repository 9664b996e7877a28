// Host-side argument handling shared by the CPU and CUDA exact-EMD kernels: the checks that
// name the argument, the expected and the received shape/dtype/device, the flattening of any
// batch shape to [B, M, N], and the error message for per-problem validation codes.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <sstream>
#include <string>
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

struct EmdArgs {
  at::Tensor cost;  // [B, M, N] (a view where possible)
  at::Tensor a, b;  // [B, M], [B, N] in cost's dtype (may have zero strides), or undefined
  std::vector<int64_t> batch;
  int64_t B = 0, M = 0, N = 0;
};

inline at::Tensor emd_weights_arg(const char* name, const c10::optional<at::Tensor>& w, const at::Tensor& cost,
                                  const std::vector<int64_t>& batch, int64_t len, const char* len_name) {
  if (!w.has_value() || !w->defined()) return at::Tensor();
  const at::Tensor& t = *w;
  TORCH_CHECK_VALUE(at::isFloatingType(t.scalar_type()), "emd: ", name,
                    " must be a floating-point tensor, got dtype ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == cost.device(), "emd: ", name, " must be on the same device as cost (",
                    cost.device(), "), got ", t.device());
  TORCH_CHECK_VALUE(t.dim() >= 1 && t.size(-1) == len, "emd: ", name, " must have shape [..., ", len_name, "=",
                    len, "] broadcastable to cost's batch shape ", shape_str(batch), ", got shape ",
                    shape_str(t.sizes()));
  const int64_t lead = t.dim() - 1;
  bool ok = lead <= int64_t(batch.size());
  for (int64_t d = 0; ok && d < lead; ++d) {
    const int64_t s = t.size(d), want = batch[batch.size() - lead + d];
    ok = (s == 1 || s == want);
  }
  TORCH_CHECK_VALUE(ok, "emd: ", name, " of shape ", shape_str(t.sizes()),
                    " does not broadcast to cost's batch shape ", shape_str(batch), " + [", len, "]");
  std::vector<int64_t> full(batch);
  full.push_back(len);
  int64_t B = 1;
  for (auto s : batch) B *= s;
  return t.to(cost.scalar_type()).expand(full).reshape({B, len});
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
  for (auto s : r.batch) r.B *= s;
  r.cost = cost.reshape({r.B, r.M, r.N});
  r.a = emd_weights_arg("a", a, cost, r.batch, r.M, "M");
  r.b = emd_weights_arg("b", b, cost, r.batch, r.N, "N");
  return r;
}

// Raises the ValueError for the first invalid problem (codes from core::emd_check).
inline void emd_raise_invalid(int64_t t, int code, double sa, double sb, int64_t B) {
  std::ostringstream where;
  if (B > 1) where << " (batch element " << t << ")";
  switch (code) {
    case 1: TORCH_CHECK_VALUE(false, "emd: cost contains NaN or Inf", where.str());
    case 2: TORCH_CHECK_VALUE(false, "emd: a must be finite and non-negative", where.str());
    case 3: TORCH_CHECK_VALUE(false, "emd: b must be finite and non-negative", where.str());
    case 4:
      TORCH_CHECK_VALUE(false, "emd: a and b must have positive total mass, got sum(a)=", sa, " and sum(b)=", sb,
                        where.str());
    case 5: {
      const double rel = std::abs(sa - sb) / std::max(sa, sb);
      TORCH_CHECK_VALUE(false, "emd: a and b must have equal total mass (balanced transport): sum(a)=", sa,
                        " and sum(b)=", sb, " differ by ", rel, " relative (tolerance ", core::kMassRelTol, ")",
                        where.str(), ". Normalise both to the same total.");
    }
    default: TORCH_CHECK_VALUE(false, "emd: invalid input (code ", code, ")", where.str());
  }
}

}  // namespace bert_emd
