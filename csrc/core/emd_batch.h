// Batch driver shared by the CPU and CUDA kernels: validation codes, messages, and the loop
// body that solves problem `t` of a batch laid out as cost [B, M, N] (strided), a [B, M] and
// b [B, N] (strided, or absent for uniform weights).
#pragma once

#include "transport_simplex.h"

namespace bert_emd {
namespace core {

// Relative tolerance on |sum a - sum b| / max(sum a, sum b).
constexpr double kMassRelTol = 1e-6;

template <typename T>
struct EmdBatch {
  const T* C; int64_t cb, c0, c1;   // cost strides: batch, row, column
  const T* a; int64_t ab, a0;       // nullptr = uniform
  const T* b; int64_t bb, b0;
  T* value; T* plan; T* u; T* v;    // contiguous outputs [B], [B,M,N], [B,M], [B,N]
  int32_t* status;                  // [B]
  int32_t* error;                   // [B] validation codes (0 = ok), see emd_check
  double* sums;                     // [B, 2] sum a, sum b (for error messages), may be null
  int M, N;
  int64_t max_iter;
};

template <typename T>
BEMD_HD inline void emd_batch_solve_one(const EmdBatch<T>& bt, int64_t t, void* ws_mem) {
  EmdProblem<T> p;
  p.C = bt.C + t * bt.cb; p.cs0 = bt.c0; p.cs1 = bt.c1;
  p.a = bt.a ? bt.a + t * bt.ab : nullptr; p.as = bt.a0;
  p.b = bt.b ? bt.b + t * bt.bb : nullptr; p.bs = bt.b0;
  p.M = bt.M; p.N = bt.N;
  EmdOutput<T> o;
  o.plan = bt.plan + t * int64_t(bt.M) * bt.N;
  o.u = bt.u + t * bt.M;
  o.v = bt.v + t * bt.N;
  o.value = bt.value + t;
  double sa = 0.0, sb = 0.0;
  const int err = emd_check(p, kMassRelTol, &sa, &sb);
  if (bt.sums) { bt.sums[2 * t] = sa; bt.sums[2 * t + 1] = sb; }
  bt.error[t] = err;
  if (err != 0) {
    // invalid input: NaN outputs and a status that says so (never a silent zero plan)
    for (int i = 0; i < bt.M * bt.N; ++i) o.plan[i] = T(NAN);
    for (int i = 0; i < bt.M; ++i) o.u[i] = T(NAN);
    for (int j = 0; j < bt.N; ++j) o.v[j] = T(NAN);
    *o.value = T(NAN);
    bt.status[t] = kInvalidInput;
    return;
  }
  EmdWorkspace w = emd_workspace_bind(ws_mem, bt.M, bt.N);
  bt.status[t] = emd_solve(p, o, w, sa, sb, bt.max_iter);
}

}  // namespace core
}  // namespace bert_emd
