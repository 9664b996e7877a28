// Unit tests of the exact solver core (csrc/core/transport_simplex.h) without torch or Python:
// optimality by strong duality, feasibility, vertex property, degenerate and zero-weight cases.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "core/emd_batch.h"
#include "check.h"

using namespace bert_emd::core;

struct Result {
  std::vector<double> plan, u, v;
  double value;
  int status, error;
};

static Result solve(const std::vector<double>& C, const std::vector<double>* a, const std::vector<double>* b,
                    int M, int N, int64_t max_iter = 1000000) {
  Result r;
  r.plan.assign(size_t(M) * N, -1.0);
  r.u.assign(M, 0.0);
  r.v.assign(N, 0.0);
  EmdBatch<double> bt{};
  bt.C = C.data(); bt.cb = int64_t(M) * N; bt.c0 = N; bt.c1 = 1;
  bt.a = a ? a->data() : nullptr; bt.ab = M; bt.a0 = 1;
  bt.b = b ? b->data() : nullptr; bt.bb = N; bt.b0 = 1;
  bt.value = &r.value; bt.plan = r.plan.data(); bt.u = r.u.data(); bt.v = r.v.data();
  bt.status = &r.status; bt.error = &r.error; bt.sums = nullptr;
  bt.M = M; bt.N = N; bt.max_iter = max_iter;
  std::vector<char> ws(emd_workspace_bytes(M, N));
  emd_batch_solve_one(bt, 0, ws.data());
  return r;
}

// Checks feasibility, vertex property and optimality through the dual certificate.
static void check_optimal(const char* name, const std::vector<double>& C, std::vector<double> a,
                          std::vector<double> b, int M, int N) {
  Result r = solve(C, &a, &b, M, N);
  CHECK(r.error == 0 && r.status == kOptimal, "%s: error %d status %d", name, r.error, r.status);
  double sa = 0, sb = 0, cmax = 0;
  for (double x : a) sa += x;
  for (double x : b) sb += x;
  for (double c : C) cmax = std::fmax(cmax, std::fabs(c));
  int nnz = 0;
  double worst_row = 0, worst_col = 0, dual_viol = 0, value = 0;
  for (int i = 0; i < M; ++i) {
    double s = 0;
    for (int j = 0; j < N; ++j) {
      const double f = r.plan[i * N + j];
      CHECK(f >= 0.0, "%s: negative flow %g", name, f);
      nnz += f > 0;
      s += f;
      value += f * C[i * N + j];
      dual_viol = std::fmax(dual_viol, r.u[i] + r.v[j] - C[i * N + j]);
    }
    worst_row = std::fmax(worst_row, std::fabs(s - a[i]));
  }
  for (int j = 0; j < N; ++j) {
    double s = 0;
    for (int i = 0; i < M; ++i) s += r.plan[i * N + j];
    worst_col = std::fmax(worst_col, std::fabs(s - b[j] * sa / sb));
  }
  double dual = 0;
  for (int i = 0; i < M; ++i) dual += a[i] * r.u[i];
  for (int j = 0; j < N; ++j) dual += b[j] * sa / sb * r.v[j];
  const double scale = std::fmax(cmax * sa, 1e-300);
  CHECK(nnz <= M + N - 1, "%s: %d non-zeros > M+N-1", name, nnz);
  CHECK(worst_row <= 1e-12 * sa && worst_col <= 1e-12 * sa, "%s: marginals off by %g / %g", name, worst_row,
        worst_col);
  CHECK(dual_viol <= 1e-9 * std::fmax(cmax, 1e-300), "%s: dual infeasible by %g", name, dual_viol);
  CHECK(std::fabs(dual - value) <= 1e-9 * scale, "%s: duality gap %g (primal %g, dual %g)", name,
        std::fabs(dual - value), value, dual);
  CHECK(std::fabs(r.value - value) <= 1e-12 * scale, "%s: reported value %g vs %g", name, r.value, value);
}

int main() {
  std::mt19937_64 rng(12345);
  std::uniform_real_distribution<double> U(0.0, 1.0);
  const int shapes[][2] = {{1, 1}, {1, 7}, {7, 1}, {4, 12}, {6, 12}, {12, 12}, {24, 48}, {64, 64}, {100, 37}};
  for (auto& s : shapes) {
    const int M = s[0], N = s[1];
    for (int rep = 0; rep < 20; ++rep) {
      std::vector<double> C(size_t(M) * N), a(M, 1.0 / M), b(N, 1.0 / N);
      for (auto& c : C) c = U(rng);
      check_optimal("uniform", C, a, b, M, N);
      double sa = 0, sb = 0;
      for (auto& x : a) sa += (x = U(rng));
      for (auto& x : b) sb += (x = U(rng));
      for (auto& x : b) x *= sa / sb;
      check_optimal("random weights", C, a, b, M, N);
      // integer costs with many ties
      for (auto& c : C) c = std::floor(U(rng) * 3);
      check_optimal("integer ties", C, std::vector<double>(M, 1.0 / M), std::vector<double>(N, 1.0 / N), M, N);
      // all-equal costs
      for (auto& c : C) c = 0.5;
      check_optimal("all equal", C, std::vector<double>(M, 1.0 / M), std::vector<double>(N, 1.0 / N), M, N);
      // zero weights
      if (M > 2 && N > 2) {
        for (auto& c : C) c = U(rng);
        std::vector<double> az(M, 1.0 / (M - 1)), bz(N, 1.0 / (N - 2));
        az[rep % M] = 0.0;
        bz[0] = 0.0;
        bz[N - 1] = 0.0;
        check_optimal("zero weights", C, az, bz, M, N);
      }
      // scales
      for (double scale : {1e-8, 1e8}) {
        for (auto& c : C) c = U(rng) * scale;
        check_optimal("scaled", C, std::vector<double>(M, 1.0 / M), std::vector<double>(N, 1.0 / N), M, N);
      }
    }
    if (M == N) {  // identity costs: the optimum is 0 on the diagonal... of 1 - I
      std::vector<double> C(size_t(M) * N, 1.0);
      for (int i = 0; i < M; ++i) C[i * N + i] = 0.0;
      Result r = solve(C, nullptr, nullptr, M, N);
      CHECK(std::fabs(r.value) < 1e-15, "identity: value %g", r.value);
    }
  }
  // Square problems with uniform weights take the assignment solver (assignment.h). Its value
  // must equal (a) the brute-force optimum over all permutations for small n and (b) the general
  // simplex's on the same costs with weights 1 ulp away from uniform (which takes the general
  // path); check_optimal above has certified its plans and duals.
  {
    int perm[8];
    for (int n = 2; n <= 7; ++n) {
      for (int rep = 0; rep < 30; ++rep) {
        std::vector<double> C(size_t(n) * n);
        for (auto& c : C) c = rep % 3 == 0 ? std::floor(U(rng) * 4) : U(rng);
        Result r = solve(C, nullptr, nullptr, n, n);
        for (int i = 0; i < n; ++i) perm[i] = i;
        double best = INFINITY;
        do {
          double s = 0;
          for (int i = 0; i < n; ++i) s += C[i * n + perm[i]];
          best = std::fmin(best, s / n);
        } while (std::next_permutation(perm, perm + n));
        CHECK(std::fabs(r.value - best) <= 1e-12, "assignment n=%d: value %.17g, brute force %.17g", n, r.value,
              best);
      }
    }
    for (int n : {12, 32, 64, 128}) {
      for (int rep = 0; rep < 10; ++rep) {
        std::vector<double> C(size_t(n) * n);
        for (auto& c : C) c = rep % 2 ? std::floor(U(rng) * 5) : U(rng);
        std::vector<double> a(n, 1.0 / n), b(n, 1.0 / n);
        Result r = solve(C, &a, &b, n, n);
        a[0] = std::nextafter(a[0], 1.0);
        a[1] = std::nextafter(a[1], 0.0);
        Result g = solve(C, &a, &b, n, n);
        CHECK(r.status == kOptimal && g.status == kOptimal, "assignment n=%d status %d / %d", n, r.status,
              g.status);
        CHECK(std::fabs(r.value - g.value) <= 1e-12 * std::fmax(1.0, std::fabs(g.value)),
              "assignment n=%d: %.17g vs general %.17g", n, r.value, g.value);
      }
    }
  }
  // invalid inputs give codes, never a hang
  {
    std::vector<double> C = {0, NAN, 1, 2}, a = {0.5, 0.5}, b = {0.5, 0.5};
    CHECK(solve(C, &a, &b, 2, 2).error == 1, "NaN cost");
    C[1] = 1;
    std::vector<double> an = {-0.5, 1.5};
    CHECK(solve(C, &an, &b, 2, 2).error == 2, "negative a");
    std::vector<double> bu = {0.5, 0.6};
    CHECK(solve(C, &a, &bu, 2, 2).error == 5, "unbalanced");
    std::vector<double> z = {0.0, 0.0};
    CHECK(solve(C, &z, &z, 2, 2).error == 4, "zero mass");
  }
  // a non-finite cost anywhere in a wide row (the unrolled and the tail part of the check)
  for (double bad : {double(NAN), double(INFINITY), -double(INFINITY)}) {
    for (int at : {0, 3, 4, 9, 10}) {
      std::vector<double> C(3 * 11, 0.5);
      C[2 * 11 + at] = bad;
      CHECK(solve(C, nullptr, nullptr, 3, 11).error == 1, "cost %g at column %d not caught", bad, at);
    }
  }
  // the pivot budget is reported
  {
    std::vector<double> C(16 * 16);
    for (auto& c : C) c = U(rng);
    Result r = solve(C, nullptr, nullptr, 16, 16, 0);
    CHECK(r.status == kMaxIterReached || r.status == kOptimal, "max_iter status %d", r.status);
  }
  return check_summary();
}
