// Exact EMD, CPU kernel: the batch is split over threads with at::parallel_for; each thread
// solves its problems one after another with the shared solver core (csrc/core), reusing one
// workspace allocation, so there is no allocation, Python or copy inside the batch loop.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/SmallVector.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "../emd_common.h"

namespace bert_emd {

void emd_raise_invalid(int64_t t, int code, double sa, double sb, int64_t B) {
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
    default: break;
  }
  TORCH_CHECK_VALUE(false, "emd: invalid input (code ", code, ")", where.str());
  TORCH_INTERNAL_ASSERT(false);  // unreachable: keeps [[noreturn]] honest for the compiler
}


// The solver's workspace, one per thread and kept between calls: a 4 x 12 solve takes about a
// microsecond, and allocating and zeroing its workspace on every call cost a fifth of the call.
// The solver writes every workspace entry before reading it (the CUDA kernel's workspace is
// uninitialised device memory). Workspaces above kKeptWorkspaceBytes are not kept.
constexpr size_t kKeptWorkspaceBytes = size_t(1) << 20;

static double* thread_workspace(size_t bytes, std::vector<double>& own) {
  const size_t n = (bytes + sizeof(double) - 1) / sizeof(double);
  if (bytes > kKeptWorkspaceBytes) {
    own.resize(n);
    return own.data();
  }
  thread_local std::vector<double> kept;
  if (kept.size() < n) kept.resize(n);
  return kept.data();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> emd_exact_cpu(
    const at::Tensor& cost_in, const c10::optional<at::Tensor>& a_in, const c10::optional<at::Tensor>& b_in,
    int64_t max_iter, bool validate) {
  TORCH_CHECK_VALUE(cost_in.device().is_cpu(), "emd (cpu backend): cost must be a CPU tensor, got ",
                    cost_in.device());
  TORCH_CHECK_VALUE(max_iter >= 0, "emd: max_iter must be >= 0, got ", max_iter);
  EmdArgs args = emd_prepare(cost_in, a_in, b_in);
  const int64_t B = args.B, M = args.M, N = args.N;
  EmdOutputs out(args, cost_in.options());
  // per-problem validation codes and masses (on the stack for small batches)
  c10::SmallVector<int32_t, 32> error(static_cast<size_t>(B), 0);
  c10::SmallVector<double, 64> sums(static_cast<size_t>(2 * B), 0.0);

  if (B > 0) {
    AT_DISPATCH_FLOATING_TYPES(cost_in.scalar_type(), "emd_exact_cpu", [&] {
      const core::EmdBatch<scalar_t> bt =
          emd_batch_view<scalar_t>(args, out, error.data(), sums.data(), max_iter);
      const size_t ws_bytes = core::emd_workspace_bytes(bt.M, bt.N);
      // grain: enough problems per task that scheduling costs little next to ~1 us per solve
      const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, M * N));
      at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
        std::vector<double> own;
        double* ws = thread_workspace(ws_bytes, own);
        for (int64_t t = begin; t < end; ++t) core::emd_batch_solve_one(bt, t, ws);
      });
    });
    if (validate) {
      for (int64_t t = 0; t < B; ++t)
        if (error[t] != 0) emd_raise_invalid(t, error[t], sums[2 * t], sums[2 * t + 1], B);
    }
  }
  return out.as_tuple();
}

TORCH_LIBRARY_IMPL(bert_emd, CPU, m) { m.impl("emd_exact", &emd_exact_cpu); }

}  // namespace bert_emd
