// Entropic optimal transport, CPU kernel: log-domain Sinkhorn batched with at::parallel_for,
// one problem at a time per thread, float64 inside, no allocation inside the batch loop.
//
// Maths (python/bert_emd/reference/sinkhorn.py is the readable version, same schedule and
// the same iterates up to rounding):
//   P_ij = exp(phi_i + psi_j - Cr_ij),  Cr = C / reg,  potentials phi = f / reg, psi = g / reg.
//   row update:     phi_i <- log a_i - LSE_j(psi_j - Cr_ij)     (rows of P sum to a)
//   column update:  psi_j <- log b_j - LSE_i(phi_i - Cr_ij)     (columns of P sum to b)
//   error:          err = sum_j |colsum_j(P) - b_j|, checked before each column update
// Start psi = 0, phi = row update; loop {err; stop if err <= tol * mass (status 0) or after
// max_iter loops (status 1); column update; row update}. Outputs u = reg phi, v = reg psi,
// the plan P and value <P, C>.
//
// Speed. Each log-sum-exp is shifted by the current potential instead of by a max pass:
//   s_j = sum_i exp(phi_i + psi_j - log b_j - Cr_ij) = colsum_j / b_j,  psi_j <- psi_j - log s_j
//   r_i = sum_j exp(phi_i + psi_j - log a_i - Cr_ij) = rowsum_i / a_i,  phi_i <- phi_i - log r_i
// which halves the passes over the matrix and gives the error for free: err = sum_j b_j |s_j - 1|.
// Every term is <= its sum, so when 1e-280 <= s <= 1e280 nothing over- or underflowed (a term
// below e^-708 is invisible next to s) and the update is as accurate as the max-shifted one;
// otherwise (early iterations at small reg) that line is recomputed with the max shift. exp
// and log are branch-free polynomials (|rel err| ~ 2e-16) that the compiler vectorises; on
// x86-64 Linux with GCC the solver is compiled three times (SSE2, AVX2+FMA, AVX-512) and the
// loader picks the best one for the CPU (target_clones).
//
// Zero-weight rows / columns are compacted away (they carry no mass); their duals are the
// soft c-transform over the active lines, u_i = -reg * LSE_j(psi_j - Cr_ij), finite where POT
// returns -inf. Masses that differ by <= 1e-6 relative are reconciled by rescaling b.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "../emd_common.h"

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && defined(__x86_64__) && defined(__linux__)
#define BEMD_SK_CLONES __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#else
#define BEMD_SK_CLONES
#endif
#if defined(__GNUC__)
#define BEMD_SK_INLINE __attribute__((always_inline)) inline  // so each clone gets its own copy
#else
#define BEMD_SK_INLINE inline
#endif

namespace bert_emd {
namespace {

#if defined(__GNUC__) && !defined(__clang__)
// GCC will not if-convert a floating-point compare (the clamps below) while it must preserve
// FP exceptions, and so would not vectorise the loops; we never read the FP exception flags.
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#endif

constexpr double kLo = 1e-280, kHi = 1e280;  // accepted range of a shifted sum (see top)

// exp(x): x = n ln2 + r, |r| <= ln2/2, e^r by its degree-13 Taylor polynomial (truncation
// < 4e-18), 2^n assembled in the exponent bits. x is clamped to [-708, 709]: e^-708 ~ 3e-308
// is invisible in any sum we add it to, and a term clamped at e^709 pushes its sum above kHi,
// which sends the line to the exact path. NaN propagates.
BEMD_SK_INLINE double fast_exp(double x) {
  x = x < -708.0 ? -708.0 : x;
  x = x > 709.0 ? 709.0 : x;
  const double kLog2e = 1.4426950408889634, kLn2Hi = 6.93147180369123816490e-01,
               kLn2Lo = 1.90821492927058770002e-10, kShift = 6755399441055744.0;  // 1.5 * 2^52
  const double t = x * kLog2e + kShift;  // round to nearest integer, kept in the low mantissa bits
  const double n = t - kShift;
  const double r = (x - n * kLn2Hi) - n * kLn2Lo;
  double p = 1.0 / 6227020800.0;
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  // low mantissa bits of t: 2^51 + n, so this is (n + 1023) << 52, the bits of 2^n
  const uint64_t bits = (__builtin_bit_cast(uint64_t, t) + 1023) << 52;
  return p * __builtin_bit_cast(double, bits);
}

// log(x) for normal x > 0: x = 2^e m, m in [sqrt(1/2), sqrt(2)), log m = 2 atanh(z) with
// z = (m - 1) / (m + 1), |z| <= 0.172, series to z^21 (truncation < 1e-18).
BEMD_SK_INLINE double fast_log(double x) {
  const uint64_t bits = __builtin_bit_cast(uint64_t, x);
  const double kTwo52 = 4503599627370496.0;  // 2^52: exponent field -> double without a cvt
  double e = __builtin_bit_cast(double, (bits >> 52) | __builtin_bit_cast(uint64_t, kTwo52)) - (kTwo52 + 1023.0);
  double m = __builtin_bit_cast(double, (bits & 0x000FFFFFFFFFFFFFull) | 0x3FF0000000000000ull);  // [1, 2)
  const bool big = m > 1.4142135623730951;
  m = big ? 0.5 * m : m;
  e = big ? e + 1.0 : e;
  const double z = (m - 1.0) / (m + 1.0), z2 = z * z;
  double p = 1.0 / 21;
  p = p * z2 + 1.0 / 19;
  p = p * z2 + 1.0 / 17;
  p = p * z2 + 1.0 / 15;
  p = p * z2 + 1.0 / 13;
  p = p * z2 + 1.0 / 11;
  p = p * z2 + 1.0 / 9;
  p = p * z2 + 1.0 / 7;
  p = p * z2 + 1.0 / 5;
  p = p * z2 + 1.0 / 3;
  p = p * z2 + 1.0;
  const double kLn2Hi = 6.93147180369123816490e-01, kLn2Lo = 1.90821492927058770002e-10;
  return e * kLn2Hi + (e * kLn2Lo + 2.0 * z * p);
}

BEMD_SK_INLINE bool in_range(double s) { return s >= kLo && s <= kHi; }

// LSE_j(psi_j - c_j) with the max shift (always safe; c is one row of Cr).
BEMD_SK_INLINE double row_lse_exact(const double* c, const double* psi, int n) {
  double m = -std::numeric_limits<double>::infinity();
  for (int j = 0; j < n; ++j) m = m > psi[j] - c[j] ? m : psi[j] - c[j];
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (int j = 0; j < n; ++j) s += fast_exp(psi[j] - c[j] - m);
  return m + std::log(s);
}

// LSE_i(phi_i - Cr_ij) for one column j with the max shift.
BEMD_SK_INLINE double col_lse_exact(const double* cr, const double* phi, int m, int n, int j) {
  double mx = -std::numeric_limits<double>::infinity();
  for (int i = 0; i < m; ++i) mx = mx > phi[i] - cr[int64_t(i) * n + j] ? mx : phi[i] - cr[int64_t(i) * n + j];
  double s = 0.0;
  for (int i = 0; i < m; ++i) s += fast_exp(phi[i] - cr[int64_t(i) * n + j] - mx);
  return mx + std::log(s);
}

// The iteration on a compacted problem (all weights > 0): cr [m*n] = C / reg, la = log a,
// lb = log b, bw = b; scratch w [max(m, n)], s [n], r [m]. Leaves the final potentials in phi, psi.
BEMD_SK_CLONES int32_t sinkhorn_core(const double* cr, int m, int n, const double* la, const double* lb,
                                     const double* bw, double tol_abs, int64_t max_iter, double* phi,
                                     double* psi, double* w, double* s, double* r) {
  for (int j = 0; j < n; ++j) psi[j] = 0.0;
  for (int i = 0; i < m; ++i) phi[i] = la[i] - row_lse_exact(cr + int64_t(i) * n, psi, n);
  double err;
  for (int64_t it = 0;; ++it) {
    // s_j = colsum_j / b_j of the current plan (rows are exact here)
    for (int j = 0; j < n; ++j) { w[j] = psi[j] - lb[j]; s[j] = 0.0; }
    for (int i = 0; i < m; ++i) {
      const double* c = cr + int64_t(i) * n;
      const double p = phi[i];
#pragma omp simd
      for (int j = 0; j < n; ++j) s[j] += fast_exp(p + w[j] - c[j]);
    }
    err = 0.0;
    for (int j = 0; j < n; ++j) err += bw[j] * std::fabs((s[j] > kHi ? kHi : s[j]) - 1.0);
    if (!(err > tol_abs) || it >= max_iter) break;  // a NaN error stops too (status 2)
    // column update
#pragma omp simd
    for (int j = 0; j < n; ++j) w[j] = psi[j] - fast_log(in_range(s[j]) ? s[j] : 1.0);
    for (int j = 0; j < n; ++j) psi[j] = in_range(s[j]) ? w[j] : lb[j] - col_lse_exact(cr, phi, m, n, j);
    // row update: r_i = rowsum_i / a_i
    for (int i = 0; i < m; ++i) {
      const double* c = cr + int64_t(i) * n;
      const double x = phi[i] - la[i];
      double acc = 0.0;
#pragma omp simd reduction(+ : acc)
      for (int j = 0; j < n; ++j) acc += fast_exp(x + psi[j] - c[j]);
      r[i] = acc;
    }
#pragma omp simd
    for (int i = 0; i < m; ++i) w[i] = phi[i] - fast_log(in_range(r[i]) ? r[i] : 1.0);
    for (int i = 0; i < m; ++i)
      phi[i] = in_range(r[i]) ? w[i] : la[i] - row_lse_exact(cr + int64_t(i) * n, psi, n);
  }
  return err <= tol_abs ? core::kOptimal : std::isfinite(err) ? core::kMaxIterReached : core::kInvalidInput;
}

// Per-thread scratch, sized once per parallel chunk.
struct Workspace {
  std::vector<double> cr;          // [M*N] compacted C / reg, row-major
  std::vector<double> phi, la, r;  // [M]
  std::vector<double> psi, lb, bw, s;  // [N]
  std::vector<double> w;           // [max(M, N)]
  std::vector<int32_t> ri, cj;     // compacted -> original row / column
  Workspace(int64_t M, int64_t N)
      : cr(M * N), phi(M), la(M), r(M), psi(N), lb(N), bw(N), s(N), w(std::max(M, N)), ri(M), cj(N) {}
};

// One problem: compact, iterate, write the outputs in the original layout.
template <typename T>
int32_t sinkhorn_one(const core::EmdProblem<T>& p, double sa, double sb, double reg, int64_t max_iter,
                     double tol, Workspace& w, T* plan, T* u, T* v, T* value) {
  const int M = p.M, N = p.N;
  const double ireg = 1.0 / reg;
  int m = 0, n = 0;
  for (int i = 0; i < M; ++i) {
    const double ai = p.a ? double(p.a[i * p.as]) : 1.0 / M;
    if (ai > 0.0) { w.ri[m] = i; w.la[m] = std::log(ai); ++m; }
  }
  const double bscale = sa / sb;  // absorbs a rounding-level mass mismatch
  for (int j = 0; j < N; ++j) {
    const double bj = (p.b ? double(p.b[j * p.bs]) : 1.0 / N) * bscale;
    if (bj > 0.0) { w.cj[n] = j; w.bw[n] = bj; w.lb[n] = std::log(bj); ++n; }
  }
  double* cr = w.cr.data();
  for (int ii = 0; ii < m; ++ii)
    for (int jj = 0; jj < n; ++jj) cr[int64_t(ii) * n + jj] = core::emd_cost(p, w.ri[ii], w.cj[jj]) * ireg;
  double *phi = w.phi.data(), *psi = w.psi.data();
  const int32_t status = sinkhorn_core(cr, m, n, w.la.data(), w.lb.data(), w.bw.data(), tol * sa, max_iter, phi,
                                       psi, w.w.data(), w.s.data(), w.r.data());

  // Outputs in the original layout: zero rows / columns of the plan, soft c-transform duals.
  for (int64_t k = 0; k < int64_t(M) * N; ++k) plan[k] = T(0);
  double val = 0.0;
  for (int ii = 0; ii < m; ++ii) {
    const int i = w.ri[ii];
    for (int jj = 0; jj < n; ++jj) {
      const double pij = std::exp(phi[ii] + psi[jj] - cr[int64_t(ii) * n + jj]);
      plan[int64_t(i) * N + w.cj[jj]] = T(pij);
      val += pij * core::emd_cost(p, i, w.cj[jj]);
    }
  }
  *value = T(val);
  for (int ii = 0; ii < m; ++ii) u[w.ri[ii]] = T(reg * phi[ii]);
  for (int jj = 0; jj < n; ++jj) v[w.cj[jj]] = T(reg * psi[jj]);
  const double inf = std::numeric_limits<double>::infinity();
  for (int i = 0, ii = 0; i < M; ++i) {
    if (ii < m && w.ri[ii] == i) { ++ii; continue; }
    double mx = -inf, s = 0.0;
    for (int jj = 0; jj < n; ++jj) mx = std::max(mx, psi[jj] - core::emd_cost(p, i, w.cj[jj]) * ireg);
    for (int jj = 0; jj < n; ++jj) s += std::exp(psi[jj] - core::emd_cost(p, i, w.cj[jj]) * ireg - mx);
    u[i] = T(-reg * (mx + std::log(s)));
  }
  for (int j = 0, jj = 0; j < N; ++j) {
    if (jj < n && w.cj[jj] == j) { ++jj; continue; }
    double mx = -inf, s = 0.0;
    for (int ii = 0; ii < m; ++ii) mx = std::max(mx, phi[ii] - core::emd_cost(p, w.ri[ii], j) * ireg);
    for (int ii = 0; ii < m; ++ii) s += std::exp(phi[ii] - core::emd_cost(p, w.ri[ii], j) * ireg - mx);
    v[j] = T(-reg * (mx + std::log(s)));
  }
  return status;
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sinkhorn_cpu(
    const at::Tensor& cost_in, const c10::optional<at::Tensor>& a_in, const c10::optional<at::Tensor>& b_in,
    double reg, int64_t max_iter, double tol) {
  TORCH_CHECK_VALUE(cost_in.device().is_cpu(), "emd (cpu backend): cost must be a CPU tensor, got ",
                    cost_in.device());
  TORCH_CHECK_VALUE(std::isfinite(reg) && reg > 0.0, "emd: reg must be a finite float > 0 for method='sinkhorn', got ",
                    reg);
  TORCH_CHECK_VALUE(max_iter >= 0, "emd: max_iter must be >= 0, got ", max_iter);
  TORCH_CHECK_VALUE(std::isfinite(tol) && tol >= 0.0, "emd: tol must be a finite float >= 0, got ", tol);
  EmdArgs args = emd_prepare(cost_in, a_in, b_in);
  const int64_t B = args.B, M = args.M, N = args.N;
  auto opts = cost_in.options();
  at::Tensor value = at::empty({B}, opts);
  at::Tensor plan = at::empty({B, M, N}, opts);
  at::Tensor u = at::empty({B, M}, opts);
  at::Tensor v = at::empty({B, N}, opts);
  at::Tensor status = at::empty({B}, opts.dtype(at::kInt));

  if (B > 0) {
    AT_DISPATCH_FLOATING_TYPES(cost_in.scalar_type(), "sinkhorn_cpu", [&] {
      // strides of the flattened batch (0 for weights shared by every problem)
      const scalar_t* C = args.cost.data_ptr<scalar_t>();
      const int64_t cb = args.cb, c0 = args.c0, c1 = args.c1;
      const scalar_t* A = args.a.defined() ? args.a.data_ptr<scalar_t>() : nullptr;
      const scalar_t* Bw = args.b.defined() ? args.b.data_ptr<scalar_t>() : nullptr;
      const int64_t ab = args.ab, a0 = args.a0, bb = args.bb, b0 = args.b0;
      auto problem = [&](int64_t t) {
        core::EmdProblem<scalar_t> p;
        p.C = C + t * cb; p.cs0 = c0; p.cs1 = c1;
        p.a = A ? A + t * ab : nullptr; p.as = a0;
        p.b = Bw ? Bw + t * bb : nullptr; p.bs = b0;
        p.M = static_cast<int>(M); p.N = static_cast<int>(N);
        return p;
      };
      // Validate everything before solving anything: one cheap pass, and the error names the
      // first invalid problem exactly as the exact solver does.
      std::vector<int32_t> error(static_cast<size_t>(B), 0);
      std::vector<double> sums(static_cast<size_t>(2 * B), 0.0);
      at::parallel_for(0, B, std::max<int64_t>(1, 16384 / (M * N)), [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t)
          error[t] = core::emd_check(problem(t), core::kMassRelTol, &sums[2 * t], &sums[2 * t + 1]);
      });
      for (int64_t t = 0; t < B; ++t)
        if (error[t] != 0) emd_raise_invalid(t, error[t], sums[2 * t], sums[2 * t + 1], B);

      scalar_t *val_p = value.data_ptr<scalar_t>(), *plan_p = plan.data_ptr<scalar_t>();
      scalar_t *u_p = u.data_ptr<scalar_t>(), *v_p = v.data_ptr<scalar_t>();
      int32_t* st_p = status.data_ptr<int32_t>();
      // A solve is tens to thousands of sweeps over M*N entries: a few problems per task
      // already outweigh the scheduling cost.
      const int64_t grain = std::max<int64_t>(1, 256 / (M * N));
      at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
        Workspace w(M, N);
        for (int64_t t = begin; t < end; ++t)
          st_p[t] = sinkhorn_one(problem(t), sums[2 * t], sums[2 * t + 1], reg, max_iter, tol, w,
                                 plan_p + t * M * N, u_p + t * M, v_p + t * N, val_p + t);
      });
    });
  }
  return {value.view(args.batch), plan.view(emd_shape(args.batch, {M, N})), u.view(emd_shape(args.batch, {M})),
          v.view(emd_shape(args.batch, {N})), status.view(args.batch)};
}

}  // namespace

TORCH_LIBRARY_IMPL(bert_emd, CPU, m) { m.impl("sinkhorn", &sinkhorn_cpu); }

}  // namespace bert_emd
