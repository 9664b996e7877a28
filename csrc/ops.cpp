// Schemas of every bert_emd op, defined once. Kernels are registered per device in
// csrc/cpu/*.cpp and csrc/cuda/*.cu; autograd and fake (meta) kernels are registered once
// in Python (python/bert_emd/ops/), shared by every backend.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "build_info.h"

namespace bert_emd {

static std::string build_info() {
  std::string s = "cuda=";
#ifdef BERT_EMD_WITH_CUDA
  s += "1";
#else
  s += "0";
#endif
  s += ";openmp=";
#ifdef _OPENMP
  s += "1";
#else
  s += "0";
#endif
  s += ";cuda_max_nodes=" + std::to_string(BERT_EMD_CUDA_MAX_NODES);
  return s;
}

TORCH_LIBRARY(bert_emd, m) {
  // Exact balanced transport, batched over the leading dims of cost [..., M, N].
  // Returns (value [...], plan [..., M, N], u [..., M], v [..., N], status [...] int32).
  m.def("emd_exact(Tensor cost, Tensor? a, Tensor? b, int max_iter, bool validate) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Layer cost matrices D_ij = mean((S_i - T_j)^2) over M student and N teacher tensors.
  m.def("layer_costs_fwd(Tensor[] student, Tensor[] teacher, Tensor? mask, bool per_sample, "
        "float? attention_floor) -> Tensor");
  // Fused backward: grads for student (and teacher when need_teacher) from G [M,N] / [B,M,N].
  m.def("layer_costs_bwd(Tensor grad, Tensor[] student, Tensor[] teacher, Tensor? mask, "
        "bool per_sample, float? attention_floor, bool need_teacher) -> (Tensor[], Tensor[])");
  // Log-domain Sinkhorn, batched: (value, plan, u, v, status) as emd_exact.
  m.def("sinkhorn(Tensor cost, Tensor? a, Tensor? b, float reg, int max_iter, float tol) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The cost-attention rule of one step for F features sharing one pair of layer weights:
  // plan, cost [F * B, M, N] (B problems a feature), weights [M], [N] -> new weights (float64).
  // normalize: 0 sum, 1 softmax, 2 double_softmax.
  m.def("cost_attention_step(Tensor plan, Tensor cost, Tensor student_weight, Tensor teacher_weight, "
        "int features, int normalize, float temperature, float eps) -> (Tensor, Tensor)");
  m.def("build_info() -> str", &build_info);
}

}  // namespace bert_emd

// A bare Python module: importing bert_emd._C runs the static registrations above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
