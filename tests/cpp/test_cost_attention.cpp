// Unit tests of the cost-attention core (csrc/core/cost_attention.h) without torch or Python:
// a hand-computed step of each rule, the average over features, the eps floor on zero-cost layers,
// and non-finite costs keeping the old weights.
#include <cmath>
#include <cstdio>
#include <vector>

#include "core/cost_attention.h"
#include "check.h"

using namespace bert_emd::core;

struct Step {
  std::vector<double> s, t;
};

static Step step(const std::vector<double>& plan, const std::vector<double>& cost, int F, int B, int M, int N,
                 const std::vector<double>& ws, const std::vector<double>& wt, int normalize, double T = 1.0,
                 double eps = 1e-6) {
  Step r{std::vector<double>(M), std::vector<double>(N)};
  std::vector<double> scratch(2 * (M + N));
  cost_attention_rule<double>(plan.data(), cost.data(), F, B, M, N, ws.data(), wt.data(), normalize, T, eps,
                              r.s.data(), r.t.data(), scratch.data());
  return r;
}

static bool near(double x, double y, double tol = 1e-12) { return std::fabs(x - y) <= tol; }

static std::vector<double> softmax(std::vector<double> x, double T) {
  double m = -INFINITY, s = 0;
  for (auto& v : x) m = std::fmax(m, v / T);
  for (auto& v : x) s += (v = std::exp(v / T - m));
  for (auto& v : x) v /= s;
  return x;
}

static std::vector<double> floored(std::vector<double> x, double eps) {
  double s = 0;
  for (auto& v : x) s += (v = std::fmax(v, eps));
  for (auto& v : x) v /= s;
  return x;
}

int main() {
  // 2 x 2: the optimal flow of C = [[1, 2], [4, 8]] is the anti-diagonal (1/2 each).
  // c^S = (1, 2), r = (2, 4), w_hat = (3, 1.5); c^T = (2, 1), r = (4, 2), w_hat = (1.5, 3).
  const std::vector<double> plan = {0.0, 0.5, 0.5, 0.0}, cost = {1.0, 2.0, 4.0, 8.0}, u2 = {0.5, 0.5};
  {
    Step r = step(plan, cost, 1, 1, 2, 2, u2, u2, kCaSum);
    CHECK(near(r.s[0], 2.0 / 3) && near(r.s[1], 1.0 / 3), "sum: student %g %g", r.s[0], r.s[1]);
    CHECK(near(r.t[0], 1.0 / 3) && near(r.t[1], 2.0 / 3), "sum: teacher %g %g", r.t[0], r.t[1]);
  }
  for (double T : {1.0, 0.5}) {
    Step r = step(plan, cost, 1, 1, 2, 2, u2, u2, kCaSoftmax, T);
    const auto s = floored(softmax({3.0, 1.5}, T), 1e-6), t = floored(softmax({1.5, 3.0}, T), 1e-6);
    CHECK(near(r.s[0], s[0]) && near(r.s[1], s[1]), "softmax T=%g: student %g %g", T, r.s[0], r.s[1]);
    CHECK(near(r.t[0], t[0]) && near(r.t[1], t[1]), "softmax T=%g: teacher %g %g", T, r.t[0], r.t[1]);
    Step d = step(plan, cost, 1, 1, 2, 2, u2, u2, kCaDoubleSoftmax, T);
    const auto ds = floored(softmax(softmax({3.0, 1.5}, T), 1.0), 1e-6);
    CHECK(near(d.s[0], ds[0]) && near(d.s[1], ds[1]), "double_softmax T=%g: %g %g", T, d.s[0], d.s[1]);
  }
  // Two features stacked: their proposals are averaged before the outer step.
  {
    const std::vector<double> cost2 = {8.0, 4.0, 2.0, 1.0};  // feature 2 prefers the other layers
    std::vector<double> plans = plan, costs = cost;
    plans.insert(plans.end(), plan.begin(), plan.end());
    costs.insert(costs.end(), cost2.begin(), cost2.end());
    Step r = step(plans, costs, 2, 1, 2, 2, u2, u2, kCaDoubleSoftmax);
    // feature 2: c^S = (2, 1), w_hat = (1.5, 3); averaged inner softmaxes are symmetric: uniform
    const auto p1 = softmax({3.0, 1.5}, 1.0), p2 = softmax({1.5, 3.0}, 1.0);
    const auto want = floored(softmax({(p1[0] + p2[0]) / 2, (p1[1] + p2[1]) / 2}, 1.0), 1e-6);
    CHECK(near(r.s[0], want[0]) && near(r.s[1], want[1]), "two features: %g %g", r.s[0], r.s[1]);
    CHECK(near(r.s[0], 0.5), "two mirrored features: uniform, got %g", r.s[0]);
  }
  // B problems: the mean contribution (two copies of the same problem = one).
  {
    std::vector<double> plans = plan, costs = cost;
    plans.insert(plans.end(), plan.begin(), plan.end());
    costs.insert(costs.end(), cost.begin(), cost.end());
    Step one = step(plan, cost, 1, 1, 2, 2, u2, u2, kCaSoftmax), two = step(plans, costs, 1, 2, 2, 2, u2, u2, kCaSoftmax);
    CHECK(near(one.s[0], two.s[0]) && near(one.t[1], two.t[1]), "batch mean: %g vs %g", one.s[0], two.s[0]);
  }
  for (int rule : {kCaSum, kCaSoftmax, kCaDoubleSoftmax}) {
    // a zero-cost row: w_hat 0 (never 0 / 0), floored, finite, summing to 1
    const std::vector<double> zc = {0.0, 0.0, 0.0, 4.0, 8.0, 2.0}, p6(6, 1.0 / 6);
    const std::vector<double> w2 = {0.5, 0.5}, w3 = {1.0 / 3, 1.0 / 3, 1.0 / 3};
    Step r = step(p6, zc, 1, 1, 2, 3, w2, w3, rule);
    double ss = 0;
    for (double x : r.s) {
      CHECK(std::isfinite(x) && x >= 1e-6 * 0.999, "rule %d zero row: %g", rule, x);
      ss += x;
    }
    CHECK(near(ss, 1.0), "rule %d zero row: sum %g", rule, ss);
    // all-zero costs: uniform
    Step z = step(p6, std::vector<double>(6, 0.0), 1, 1, 2, 3, w2, w3, rule);
    CHECK(near(z.s[0], 0.5) && near(z.t[2], 1.0 / 3), "rule %d all zero: %g %g", rule, z.s[0], z.t[2]);
    // a NaN or Inf cost: both old weight vectors kept, exactly
    const std::vector<double> ws = {0.3, 0.7}, wt = {0.2, 0.5, 0.3};
    for (double bad : {NAN, INFINITY}) {
      std::vector<double> c = {1.0, 2.0, 3.0, 4.0, 5.0, 6.0};
      c[4] = bad;
      Step k = step(p6, c, 1, 1, 2, 3, ws, wt, rule);
      CHECK(k.s[0] == 0.3 && k.s[1] == 0.7 && k.t[0] == 0.2 && k.t[1] == 0.5 && k.t[2] == 0.3,
            "rule %d cost %g: weights changed to %g %g", rule, bad, k.s[0], k.s[1]);
    }
  }
  return check_summary();
}
