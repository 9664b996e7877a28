// Exact EMD, CUDA kernel: one thread per problem, each running the same solver core
// (csrc/core/transport_simplex.h, __host__ __device__) that the CPU kernel runs and that the C++
// unit tests check. The problems are tiny (4x12 .. 24x48) and independent, so a thread per
// problem with its scratch in a slice of one device buffer needs no synchronisation at all.
//
// Capacity: problems with M + N <= BERT_EMD_CUDA_MAX_NODES (256) are solved on the GPU. Larger
// ones are sent to the CPU kernel by bert_emd.emd (inputs copied to the host, results copied
// back, with a warning): a single GPU thread walking a spanning tree of hundreds of nodes is
// slower than a CPU core, and such problems are far from the BERT-EMD sizes.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "../build_info.h"
#include "../emd_common.h"

namespace bert_emd {

template <typename T>
__global__ void emd_exact_kernel(core::EmdBatch<T> bt, int64_t B, char* ws, size_t ws_stride) {
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= B) return;
  core::emd_batch_solve_one(bt, t, ws + t * ws_stride);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> emd_exact_cuda(
    const at::Tensor& cost_in, const c10::optional<at::Tensor>& a_in, const c10::optional<at::Tensor>& b_in,
    int64_t max_iter, bool validate) {
  TORCH_CHECK_VALUE(cost_in.is_cuda(), "emd (cuda backend): cost must be a CUDA tensor, got ", cost_in.device());
  TORCH_CHECK_VALUE(max_iter >= 0, "emd: max_iter must be >= 0, got ", max_iter);
  const c10::cuda::CUDAGuard guard(cost_in.device());
  EmdArgs args = emd_prepare(cost_in, a_in, b_in);
  const int64_t B = args.B, M = args.M, N = args.N;
  // bert_emd.emd routes larger problems to the CPU kernel before they get here
  TORCH_CHECK_VALUE(M + N <= BERT_EMD_CUDA_MAX_NODES, "emd (cuda backend): problems of size ", M, "x", N,
                    " exceed the CUDA kernel's capacity (M + N <= ", BERT_EMD_CUDA_MAX_NODES,
                    "); solve them on the CPU (bert_emd.emd does this automatically)");
  auto opts = cost_in.options();
  EmdOutputs out(args, opts);
  at::Tensor error = at::empty({B}, opts.dtype(at::kInt));
  if (B > 0) {
    const size_t ws_stride = (core::emd_workspace_bytes(int(M), int(N)) + 15) & ~size_t(15);
    at::Tensor ws = at::empty({int64_t(ws_stride) * B}, opts.dtype(at::kByte));
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(cost_in.scalar_type(), "emd_exact_cuda", [&] {
      const core::EmdBatch<scalar_t> bt =
          emd_batch_view<scalar_t>(args, out, error.data_ptr<int32_t>(), nullptr, max_iter);
      const int threads = 64;
      const int64_t blocks = (B + threads - 1) / threads;
      emd_exact_kernel<scalar_t><<<blocks, threads, 0, stream.stream()>>>(
          bt, B, static_cast<char*>(ws.data_ptr()), ws_stride);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    // Invalid problems come back with status 2 (kInvalidInput) and NaN outputs; the Python
    // wrapper turns them into a ValueError when validate=True (one device-to-host read of the
    // status, shared with the max_iter check), so nothing here synchronises with the device.
    (void)validate;
  }
  return out.as_tuple();
}

TORCH_LIBRARY_IMPL(bert_emd, CUDA, m) { m.impl("emd_exact", &emd_exact_cuda); }

}  // namespace bert_emd
