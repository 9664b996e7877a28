// Square transport problems with uniform weights are assignment problems: with a_i = b_j = 1/n
// the vertices of the transport polytope are the permutation matrices scaled by 1/n (Birkhoff),
// so an optimal plan is F = P / n for an optimal assignment P, the optimal value is
// (1/n) sum_i C[i, x_i], and the assignment's duals are the transport duals (the constraint
// matrix is the same; only the right-hand side is scaled). The general transportation simplex
// spends most of its pivots on the degeneracy of such problems (n - 1 of its 2n - 1 basic
// cells carry zero flow); a dedicated assignment solver needs none of them.
//
// Algorithm: Jonker & Volgenant (1987), "A shortest augmenting path algorithm for dense and
// sparse linear assignment problems", on a dense n x n matrix in double:
//   1. column reduction: v_j = min_i C_ij, each column's argmin row takes it if still free;
//   2. reduction transfer: a row assigned once moves its slack onto its column's price;
//   3. augmenting row reduction (two passes): each free row takes its cheapest column
//      (C_ij - v_j), lowering that column's price by the gap to its second cheapest, and
//      displaces the row that held it;
//   4. augmentation: for each row still free, a Dijkstra search over reduced costs C_ij - v_j
//      (u implicit) to the nearest free column, prices updated along the settled columns,
//      assignments flipped along the path.
// Invariant after every step: every assigned row holds a column of minimal reduced cost, so
// with u_i = C[i, x_i] - v[x_i] the duals are feasible (u_i + v_j <= C_ij) and tight on the
// assignment: they certify optimality. Step 3 is bounded (a floating-point tie could otherwise
// make it revisit rows without progress); rows it leaves free go to step 4, which always
// terminates (n augmentations, each settling at most n columns).
//
// Same constraints as transport_simplex.h: no torch, no allocation, no recursion, plain arrays
// carved from the caller's workspace, so one CPU thread or one GPU thread runs it per problem.
#pragma once

#include "core_common.h"

namespace bert_emd {
namespace core {

// Scratch of lap_solve: n doubles (d) and 5 n int32 (rowsol, colsol, free, collist, pred);
// `matches` may alias `free`'s storage only if distinct: give it its own n int32.
struct LapScratch {
  double* d;         // [n] shortest-path distances of the current search (step 4); a row's reduced costs (step 3)
  int32_t* rowsol;   // [n] column assigned to each row (-1: free)
  int32_t* colsol;   // [n] row assigned to each column (-1: free)
  int32_t* freerows; // [n] rows still free
  int32_t* collist;  // [n] columns: settled | at the current minimum | not yet reached
  int32_t* pred;     // [n] predecessor row of each column on the shortest-path tree
  int32_t* matches;  // [n] how many columns chose each row in the column reduction
};

// The smallest and second-smallest reduced cost h_j = row_j - v_j of a row and their columns:
// j1 the first column attaining the minimum, j2 the first other column attaining the minimum over
// j != j1 (INFINITY and 0 when n == 1). The reduced costs go to h [n]; the two minima are
// reductions without data-dependent branches, which the compiler vectorises, and only the two
// column lookups branch (they stop at the first hit). One scalar loop with a branch on every
// column was the solver's hot spot at n = 64 (augmenting row reduction: ~70 % of its time).
BEMD_HD inline void lap_two_smallest(const double* __restrict__ row, const double* __restrict__ v,
                                     double* __restrict__ h, int n, double* umin, int* j1, double* usubmin,
                                     int* j2) {
  // four independent accumulators: the min's compare-select chain is latency-bound otherwise
  double m0 = INFINITY, m1 = INFINITY, mm2 = INFINITY, m3 = INFINITY;
  int j = 0;
  for (; j + 4 <= n; j += 4) {
    const double h0 = row[j] - v[j], h1 = row[j + 1] - v[j + 1];
    const double h2 = row[j + 2] - v[j + 2], h3 = row[j + 3] - v[j + 3];
    h[j] = h0; h[j + 1] = h1; h[j + 2] = h2; h[j + 3] = h3;
    m0 = h0 < m0 ? h0 : m0; m1 = h1 < m1 ? h1 : m1; mm2 = h2 < mm2 ? h2 : mm2; m3 = h3 < m3 ? h3 : m3;
  }
  for (; j < n; ++j) {
    h[j] = row[j] - v[j];
    m0 = h[j] < m0 ? h[j] : m0;
  }
  m0 = m1 < m0 ? m1 : m0;
  mm2 = m3 < mm2 ? m3 : mm2;
  const double m = mm2 < m0 ? mm2 : m0;
  int a = 0;
  while (h[a] != m) ++a;  // (costs and prices are finite: the minimum is attained)
  const double ha = h[a];
  h[a] = INFINITY;  // the second minimum: the same reduction without column a
  m0 = m1 = mm2 = m3 = INFINITY;
  for (j = 0; j + 4 <= n; j += 4) {
    m0 = h[j] < m0 ? h[j] : m0; m1 = h[j + 1] < m1 ? h[j + 1] : m1;
    mm2 = h[j + 2] < mm2 ? h[j + 2] : mm2; m3 = h[j + 3] < m3 ? h[j + 3] : m3;
  }
  for (; j < n; ++j) m0 = h[j] < m0 ? h[j] : m0;
  m0 = m1 < m0 ? m1 : m0;
  mm2 = m3 < mm2 ? m3 : mm2;
  const double m2 = mm2 < m0 ? mm2 : m0;
  h[a] = ha;
  int b = 0;
  if (m2 < INFINITY) {
    while (b == a || h[b] != m2) ++b;
  }
  *umin = m;
  *j1 = a;
  *usubmin = m2;
  *j2 = b;
}

// Solve min sum_i C[i, x_i] over permutations x for the dense row-major n x n matrix C.
// Outputs rowsol (x), the column prices v [n] and the row duals u [n]
// (u_i + v_j <= C_ij, equality on the assignment).
BEMD_HD inline void lap_solve(const double* __restrict__ C, int n, double* __restrict__ u,
                              double* __restrict__ v, const LapScratch& s) {
  int32_t* __restrict__ rowsol = s.rowsol;
  int32_t* __restrict__ colsol = s.colsol;
  int32_t* __restrict__ freerows = s.freerows;
  int32_t* __restrict__ collist = s.collist;
  int32_t* __restrict__ pred = s.pred;
  int32_t* __restrict__ matches = s.matches;
  double* __restrict__ d = s.d;
  for (int i = 0; i < n; ++i) { rowsol[i] = -1; matches[i] = 0; }

  // 1. column reduction (last column first, as the original: ties favour lower columns)
  for (int j = n - 1; j >= 0; --j) {
    double mn = C[j];
    int imin = 0;
    for (int i = 1; i < n; ++i) {
      const double c = C[i * n + j];
      if (c < mn) { mn = c; imin = i; }
    }
    v[j] = mn;
    if (++matches[imin] == 1) {
      rowsol[imin] = j;
      colsol[j] = imin;
    } else if (v[j] < v[rowsol[imin]]) {
      const int j1 = rowsol[imin];
      rowsol[imin] = j;
      colsol[j] = imin;
      colsol[j1] = -1;
    } else {
      colsol[j] = -1;
    }
  }

  // 2. reduction transfer
  int numfree = 0;
  for (int i = 0; i < n; ++i) {
    if (matches[i] == 0) {
      freerows[numfree++] = i;
    } else if (matches[i] == 1) {
      const int j1 = rowsol[i];
      double mn = INFINITY;
      const double* row = C + i * n;
      for (int j = 0; j < n; ++j) {
        if (j == j1) continue;
        const double h = row[j] - v[j];
        mn = h < mn ? h : mn;
      }
      if (mn < INFINITY) v[j1] -= mn;
    }
  }

  // 3. augmenting row reduction, two passes, each bounded
  for (int pass = 0; pass < 2 && numfree > 0; ++pass) {
    int k = 0;
    const int prvnumfree = numfree;
    numfree = 0;
    int64_t steps = 0;
    const int64_t max_steps = int64_t(n) * n + 8;
    while (k < prvnumfree) {
      const int i = freerows[k++];
      if (++steps > max_steps) {  // no progress: the rest waits for step 4
        freerows[numfree++] = i;
        continue;
      }
      double umin, usubmin;
      int j1, j2;
      lap_two_smallest(C + i * n, v, d, n, &umin, &j1, &usubmin, &j2);
      int i0 = colsol[j1];
      const bool strict = umin < usubmin;
      if (strict) {
        v[j1] -= usubmin - umin;  // j1 becomes as cheap as the runner-up: i keeps it
      } else if (i0 > -1) {       // a tie: take the runner-up, displacing its holder instead
        j1 = j2;
        i0 = colsol[j2];
      }
      rowsol[i] = j1;
      colsol[j1] = i;
      if (i0 > -1) {
        rowsol[i0] = -1;
        if (strict) freerows[--k] = i0;  // retry the displaced row at once
        else freerows[numfree++] = i0;
      }
    }
  }

  // 4. shortest augmenting paths for the remaining free rows
  for (int f = 0; f < numfree; ++f) {
    const int freerow = freerows[f];
    const double* frow = C + freerow * n;
    for (int j = 0; j < n; ++j) {
      d[j] = frow[j] - v[j];
      pred[j] = freerow;
      collist[j] = j;
    }
    int low = 0, up = 0, last = 0, endofpath = -1;
    double mn = 0.0;
    // collist[0, low): settled; [low, up): at distance mn, to scan; [up, n): not reached
    while (endofpath < 0) {
      if (up == low) {
        last = low - 1;
        mn = d[collist[up++]];
        for (int k = up; k < n; ++k) {
          const int j = collist[k];
          const double h = d[j];
          if (h <= mn) {
            if (h < mn) { up = low; mn = h; }
            collist[k] = collist[up];
            collist[up++] = j;
          }
        }
        for (int k = low; k < up; ++k) {
          if (colsol[collist[k]] < 0) { endofpath = collist[k]; break; }
        }
      }
      if (endofpath < 0) {
        const int j1 = collist[low++];
        const int i = colsol[j1];
        const double* row = C + i * n;
        const double h = row[j1] - v[j1] - mn;
        for (int k = up; k < n; ++k) {
          const int j = collist[k];
          const double v2 = row[j] - v[j] - h;
          if (v2 < d[j]) {
            pred[j] = i;
            if (v2 == mn) {
              if (colsol[j] < 0) { endofpath = j; break; }
              collist[k] = collist[up];
              collist[up++] = j;
            }
            d[j] = v2;
          }
        }
      }
    }
    for (int k = 0; k <= last; ++k) {  // settled columns: prices keep reduced costs >= 0
      const int j1 = collist[k];
      v[j1] += d[j1] - mn;
    }
    for (;;) {  // flip the assignments along the path
      const int i = pred[endofpath];
      colsol[endofpath] = i;
      const int j1 = endofpath;
      endofpath = rowsol[i];
      rowsol[i] = j1;
      if (i == freerow) break;
    }
  }
  for (int i = 0; i < n; ++i) {
    const int j = rowsol[i];
    u[i] = C[i * n + j] - v[j];
  }
}

}  // namespace core
}  // namespace bert_emd
