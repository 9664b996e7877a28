// Cost attention, the BERT-EMD layer-weight rule, as one pass over a step's plans and costs:
// shared by the CPU kernel (csrc/cpu/cost_attention_cpu.cpp) and the CUDA kernel (one thread,
// csrc/cuda/cost_attention_cuda.cu). The rule is a few dozen flops on vectors of a dozen layers;
// as tensor ops it is ~45 small ops a feature, each costing the host far more than its arithmetic.
//
// For F features (attention, hidden) sharing one pair of weights w^S [M], w^T [N], each with B
// problems (B = 1, or one per example) of flow F_fb and cost D_fb [M, N]:
//   c^S_i = mean_b sum_j F_bij D_bij,     c^T_j = mean_b sum_i F_bij D_bij        (float64)
//   r_i = c^S_i / w^S_i,   w_hat_i = (sum_k r_k) / r_i   (0 where r_i == 0; +inf -> DBL_MAX / 4K)
//   p_f = inner(w_hat):  "sum": w_hat / sum(w_hat) (0 when the sum is 0),  else softmax(w_hat / T)
//   p = mean_f p_f;   "double_softmax": p = softmax(p);   w = max(p, eps) / sum(max(p, eps))
// and the teacher side alike over columns. A NaN anywhere (a NaN cost) reaches every entry of its
// side through the sums; if either side is then not finite, both old weight vectors are kept.
#pragma once

#include "core_common.h"

namespace bert_emd {
namespace core {

enum CostAttentionNormalize { kCaSum = 0, kCaSoftmax = 1, kCaDoubleSoftmax = 2 };

// softmax(x / t) in place, max-subtracted as torch.softmax; a NaN entry makes every entry NaN.
BEMD_HD inline void ca_softmax(double* x, int K, double t) {
  double m = -DBL_MAX;
  bool nan = false;
  for (int k = 0; k < K; ++k) {
    x[k] = x[k] / t;
    nan = nan || isnan(x[k]);
    m = x[k] > m ? x[k] : m;
  }
  double s = 0.0;
  for (int k = 0; k < K; ++k) {
    x[k] = nan ? NAN : exp(x[k] - m);
    s += x[k];
  }
  for (int k = 0; k < K; ++k) x[k] = x[k] / s;
}

// x: the contributions c [K] in, the feature's proposal p_f [K] out (see above).
BEMD_HD inline void ca_propose(double* x, const double* w, int K, int normalize, double temperature) {
  double total = 0.0;
  for (int k = 0; k < K; ++k) {
    x[k] = x[k] / w[k];
    total += x[k];
  }
  const double big = DBL_MAX / (4.0 * K);
  for (int k = 0; k < K; ++k) {
    double v = x[k] != 0.0 ? total / x[k] : 0.0;  // (NaN != 0: a NaN stays NaN)
    if (isinf(v)) v = v > 0 ? big : -DBL_MAX;     // torch.nan_to_num(posinf=big), its neginf default
    x[k] = v;
  }
  if (normalize == kCaSum) {
    double s = 0.0;
    for (int k = 0; k < K; ++k) s += x[k];
    // all-zero w_hat (every layer at zero cost) stays zero: the eps floor then makes it uniform
    for (int k = 0; k < K; ++k) x[k] = s == 0.0 ? 0.0 : x[k] / s;
  } else {
    ca_softmax(x, K, temperature);
  }
}

// The outer step on the averaged proposals p [K] in place; returns whether all are finite.
BEMD_HD inline bool ca_finish(double* p, int K, int normalize, double eps) {
  if (normalize == kCaDoubleSoftmax) ca_softmax(p, K, 1.0);
  double s = 0.0;
  for (int k = 0; k < K; ++k) {
    p[k] = p[k] < eps ? eps : p[k];  // (NaN < eps is false: NaN stays)
    s += p[k];
  }
  bool finite = true;
  for (int k = 0; k < K; ++k) {
    p[k] = p[k] / s;
    finite = finite && isfinite(p[k]);
  }
  return finite;
}

// plan, cost: [F, B, M, N] contiguous; ws [M], wt [N] the current weights; out_s [M], out_t [N]
// the new ones (they may alias ws / wt); scratch: 2 * (M + N) doubles.
template <typename T>
BEMD_HD inline void cost_attention_rule(const T* plan, const T* cost, int F, int64_t B, int M, int N,
                                        const double* ws, const double* wt, int normalize, double temperature,
                                        double eps, double* out_s, double* out_t, double* scratch) {
  double* cs = scratch;   // [M] this feature's contributions, then its proposal
  double* ct = cs + M;    // [N]
  double* ps = ct + N;    // [M] sum of the proposals
  double* pt = ps + M;    // [N]
  for (int i = 0; i < M; ++i) ps[i] = 0.0;
  for (int j = 0; j < N; ++j) pt[j] = 0.0;
  const int64_t MN = int64_t(M) * N;
  for (int f = 0; f < F; ++f) {
    for (int i = 0; i < M; ++i) cs[i] = 0.0;
    for (int j = 0; j < N; ++j) ct[j] = 0.0;
    for (int64_t b = 0; b < B; ++b) {
      const T* P = plan + (int64_t(f) * B + b) * MN;
      const T* D = cost + (int64_t(f) * B + b) * MN;
      for (int i = 0; i < M; ++i) {
        double row = 0.0;
        for (int j = 0; j < N; ++j) {
          const double fd = double(P[i * N + j]) * double(D[i * N + j]);
          row += fd;
          ct[j] += fd;
        }
        cs[i] += row;
      }
    }
    for (int i = 0; i < M; ++i) cs[i] /= double(B);
    for (int j = 0; j < N; ++j) ct[j] /= double(B);
    ca_propose(cs, ws, M, normalize, temperature);
    ca_propose(ct, wt, N, normalize, temperature);
    for (int i = 0; i < M; ++i) ps[i] += cs[i];
    for (int j = 0; j < N; ++j) pt[j] += ct[j];
  }
  for (int i = 0; i < M; ++i) ps[i] /= double(F);
  for (int j = 0; j < N; ++j) pt[j] /= double(F);
  const bool ok = ca_finish(ps, M, normalize, eps) & ca_finish(pt, N, normalize, eps);
  for (int i = 0; i < M; ++i) out_s[i] = ok ? ps[i] : ws[i];
  for (int j = 0; j < N; ++j) out_t[j] = ok ? pt[j] : wt[j];
}

}  // namespace core
}  // namespace bert_emd
