// Exact balanced optimal transport on a dense M x N cost matrix: a transportation simplex
// (the network simplex specialised to the complete bipartite graph), one problem per call.
// No torch, no allocation, no recursion: the same code runs in a CPU thread and a GPU thread.
//
// Problem:  min_F  sum_ij F_ij C_ij   s.t.  F >= 0,  sum_j F_ij = a_i,  sum_i F_ij = b_j.
// Dual:     max    sum_i a_i u_i + sum_j b_j v_j   s.t.  u_i + v_j <= C_ij.
//
// A basis is a spanning tree of M + N - 1 cells over the M row nodes and N column nodes.
// Each pivot: potentials from the tree (u_i + v_j = C_ij on basic cells), the entering cell
// with the most negative reduced cost C_ij - u_i - v_j, the cycle it closes in the tree, and a
// ratio test over the cycle's "minus" cells.
//
// Anti-cycling (degeneracy is the rule here: uniform weights make most problems degenerate):
// Orden's perturbation, carried symbolically. Row supplies become a_i + eps and the last
// column's demand b_{n-1} + n_rows * eps, so the perturbed problem is balanced. For strictly
// positive weights every basis of the perturbed problem is non-degenerate: cutting a tree
// cell splits the nodes in two, and the cell's flow is the supply minus the demand of one side,
// whose eps-coefficient is (#rows on that side) - n_rows * [last column on that side]; it is
// zero only when every row is on that side, and then the eps-free part is the demand of the
// other side, a sum of positive weights. Every flow is kept as x + k*eps with an integer k and
// compared lexicographically, so every ratio test has a unique, lexicographically positive
// minimum, every pivot strictly decreases the perturbed objective, no basis repeats and the
// method terminates. Rows and columns of zero weight are taken out before solving (their flow
// is zero) and given valid duals afterwards. The max-iteration guard is a last line of defence
// against floating-point pathologies; reaching it is reported, never silent.
//
// Square problems with uniform weights (nothing dropped) are assignment problems: they go to
// the shortest-augmenting-path solver of assignment.h instead, with the same outputs (plan
// F = P / n, value, duals centred the same way), since degenerate pivots are most of what the
// simplex would do on them.
//
// Tolerances: reduced costs are compared against 1e-12 * max|C|; flows whose eps-free part is
// within 64 ulp of the total mass are snapped to exactly 0 so that near-ties become exact ties
// resolved by the eps-coefficient. After the last pivot the basic flows are recomputed from the
// tree and the unperturbed weights (leaf elimination), clamped at 0, so the marginals hold to
// rounding.
#pragma once

#include "assignment.h"
#include "core_common.h"

namespace bert_emd {
namespace core {

enum EmdStatus : int32_t {
  kOptimal = 0,
  kMaxIterReached = 1,
  kInvalidInput = 2,
};

// Scratch memory for one problem, carved by emd_workspace_layout() from a caller-provided
// buffer (a per-thread vector on the CPU, a slice of a device buffer on the GPU).
// K = M + N nodes; the compacted problem (zero-weight lines removed) has m + n <= K nodes.
struct EmdWorkspace {
  double* wa;      // [M]  active row weights (compacted)
  double* wb;      // [N]  active column weights (compacted)
  double* pot;     // [K]  node potentials: rows 0..m-1, then columns m..m+n-1
  double* fx;      // [K]  eps-free part of each basic flow
  double* rx;      // [K]  remaining supply/demand (initial allocation, final flows)
  double* uo;      // [M]  duals by original row
  double* vo;      // [N]  duals by original column
  double* cl;      // [M*N] compacted costs, row-major m x n, in double
  double* pen;     // [K]  regret of each long line (initial basis)
  int32_t* fk;     // [K]  eps-coefficient of each basic flow
  int32_t* rk;     // [K]  eps-coefficient of the remaining supply/demand
  int32_t* brow;   // [K]  basic cell: row (compacted index)
  int32_t* bcol;   // [K]  basic cell: column (compacted index)
  int32_t* ri;     // [M]  compacted row -> original row
  int32_t* cj;     // [N]  compacted column -> original column
  int32_t* head;   // [K]  first adjacency slot of each node (-1: none); slot 2e / 2e+1 is
                   //      basic cell e seen from its row / column end
  int32_t* nxt;    // [2K] next slot in the node's adjacency list
  int32_t* prv;    // [2K] previous slot (-1 at the head)
  int32_t* par;    // [K]  parent node (-1 at the root)
  int32_t* parc;   // [K]  basic cell joining a node to its parent (-1 at the root)
  int32_t* depth;  // [K]
  int32_t* order;  // [K]  BFS order of the nodes (long lines by regret in the initial basis)
  int32_t* path;   // [K]  scratch for the pivot cycle
  int32_t* done;   // [K]  lines crossed out (initial allocation)
};

// One routine computes the layout so that size and binding can never disagree: with
// mem == nullptr it only returns the byte count.
BEMD_HD inline size_t emd_workspace_layout(void* mem, int M, int N, EmdWorkspace* w) {
  const size_t K = size_t(M) + size_t(N);
  char* base = static_cast<char*>(mem);
  size_t off = 0;
  auto take = [&](size_t bytes) -> char* {
    char* ptr = base ? base + off : nullptr;
    off += (bytes + 7) & ~size_t(7);
    return ptr;
  };
  EmdWorkspace t;
  t.wa = reinterpret_cast<double*>(take(sizeof(double) * M));
  t.wb = reinterpret_cast<double*>(take(sizeof(double) * N));
  t.pot = reinterpret_cast<double*>(take(sizeof(double) * K));
  t.fx = reinterpret_cast<double*>(take(sizeof(double) * K));
  t.rx = reinterpret_cast<double*>(take(sizeof(double) * K));
  t.uo = reinterpret_cast<double*>(take(sizeof(double) * M));
  t.vo = reinterpret_cast<double*>(take(sizeof(double) * N));
  t.cl = reinterpret_cast<double*>(take(sizeof(double) * size_t(M) * size_t(N)));
  t.pen = reinterpret_cast<double*>(take(sizeof(double) * K));
  t.fk = reinterpret_cast<int32_t*>(take(sizeof(int32_t) * K));
  t.rk = reinterpret_cast<int32_t*>(take(sizeof(int32_t) * K));
  t.brow = reinterpret_cast<int32_t*>(take(sizeof(int32_t) * K));
  t.bcol = reinterpret_cast<int32_t*>(take(sizeof(int32_t) * K));
  t.ri = reinterpret_cast<int32_t*>(take(sizeof(int32_t) * M));
  t.cj = reinterpret_cast<int32_t*>(take(sizeof(int32_t) * N));
  t.head = reinterpret_cast<int32_t*>(take(sizeof(int32_t) * K));
  t.nxt = reinterpret_cast<int32_t*>(take(sizeof(int32_t) * 2 * K));
  t.prv = reinterpret_cast<int32_t*>(take(sizeof(int32_t) * 2 * K));
  t.par = reinterpret_cast<int32_t*>(take(sizeof(int32_t) * K));
  t.parc = reinterpret_cast<int32_t*>(take(sizeof(int32_t) * K));
  t.depth = reinterpret_cast<int32_t*>(take(sizeof(int32_t) * K));
  t.order = reinterpret_cast<int32_t*>(take(sizeof(int32_t) * K));
  t.path = reinterpret_cast<int32_t*>(take(sizeof(int32_t) * K));
  t.done = reinterpret_cast<int32_t*>(take(sizeof(int32_t) * K));
  if (w) *w = t;
  return off;
}

BEMD_HD inline size_t emd_workspace_bytes(int M, int N) {
  return emd_workspace_layout(nullptr, M, N, nullptr);
}

BEMD_HD inline EmdWorkspace emd_workspace_bind(void* mem, int M, int N) {
  EmdWorkspace w;
  emd_workspace_layout(mem, M, N, &w);
  return w;
}

// Lexicographic comparison of x1 + k1*eps against x2 + k2*eps, where eps-free parts within
// `tol` of each other count as equal (they differ only by rounding of the input weights).
BEMD_HD inline bool lex_less(double x1, int32_t k1, double x2, int32_t k2, double tol) {
  // bitwise, not short-circuit: the outcome is data-dependent, a branch would mispredict often
  return (x1 < x2 - tol) | ((fabs(x1 - x2) <= tol) & (k1 < k2));
}

// x - y with rounding-level results snapped to exactly 0.
BEMD_HD inline double snap_sub(double x, double y, double tol) {
  const double d = x - y;
  return fabs(d) <= tol ? 0.0 : d;
}

// Strided read-only view of one problem's inputs (element strides).
template <typename T>
struct EmdProblem {
  const T* C;   // cost, C[i * cs0 + j * cs1]
  int64_t cs0, cs1;
  const T* a;   // row weights a[i * as], nullptr = uniform 1/M
  int64_t as;
  const T* b;   // column weights b[j * bs], nullptr = uniform 1/N
  int64_t bs;
  int M, N;
};

template <typename T>
struct EmdOutput {
  T* plan;      // [M, N] contiguous, fully written
  T* u;         // [M]
  T* v;         // [N]
  T* value;     // scalar
};

template <typename T>
BEMD_HD inline double emd_cost(const EmdProblem<T>& p, int i, int j) {
  return double(p.C[i * p.cs0 + j * p.cs1]);
}

// Checks one problem's inputs. Returns 0 if valid, else a code:
//  1 non-finite cost, 2 negative or non-finite a, 3 negative or non-finite b,
//  4 zero total mass, 5 masses differ by more than rel_tol (relative).
template <typename T>
BEMD_HD inline int emd_check(const EmdProblem<T>& p, double rel_tol, double* sa_out, double* sb_out) {
  // c - c is exactly 0 for a finite c and NaN for NaN or +-Inf: a row is finite iff the sum of
  // its c - c is 0. Four independent sums without a branch per cell (an early exit on every
  // cell kept this pass at a cell per several cycles; it reads every cost of every problem).
  for (int i = 0; i < p.M; ++i) {
    const T* row = p.C + int64_t(i) * p.cs0;
    double z0 = 0.0, z1 = 0.0, z2 = 0.0, z3 = 0.0;
    int j = 0;
    if (p.cs1 == 1) {
      for (; j + 4 <= p.N; j += 4) {
        const double c0 = double(row[j]), c1 = double(row[j + 1]), c2 = double(row[j + 2]), c3 = double(row[j + 3]);
        z0 += c0 - c0; z1 += c1 - c1; z2 += c2 - c2; z3 += c3 - c3;
      }
    }
    for (; j < p.N; ++j) {
      const double c = double(row[int64_t(j) * p.cs1]);
      z0 += c - c;
    }
    if (!((z0 + z1) + (z2 + z3) == 0.0)) return 1;
  }
  double sa = 0.0, sb = 0.0;
  if (p.a) {
    for (int i = 0; i < p.M; ++i) {
      const double x = double(p.a[i * p.as]);
      if (!(x >= 0.0) || !isfinite(x)) return 2;
      sa += x;
    }
  } else {
    sa = 1.0;
  }
  if (p.b) {
    for (int j = 0; j < p.N; ++j) {
      const double x = double(p.b[j * p.bs]);
      if (!(x >= 0.0) || !isfinite(x)) return 3;
      sb += x;
    }
  } else {
    sb = 1.0;
  }
  *sa_out = sa;
  *sb_out = sb;
  if (!(sa > 0.0) || !(sb > 0.0)) return 4;
  if (fabs(sa - sb) > rel_tol * fmax(sa, sb)) return 5;
  return 0;
}

// Spanning-tree bookkeeping. The basis is kept as adjacency lists (a doubly linked list of
// "slots" per node: slot 2e is basic cell e at its row end, 2e+1 at its column end) plus, for
// the tree hung from node 0 (the first row): parent, parent cell, depth and potential of every
// node (pot[row 0] = 0, u_r + v_c = C_rc on every basic cell).
BEMD_HD inline void emd_link(EmdWorkspace& w, int slot, int node) {
  const int h = w.head[node];
  w.nxt[slot] = h;
  w.prv[slot] = -1;
  if (h >= 0) w.prv[h] = slot;
  w.head[node] = slot;
}

BEMD_HD inline void emd_unlink(EmdWorkspace& w, int slot, int node) {
  const int a = w.prv[slot], b = w.nxt[slot];
  if (a >= 0) w.nxt[a] = b; else w.head[node] = b;
  if (b >= 0) w.prv[b] = a;
}

// Hangs the component of `root` below `parent` through basic cell `cell` (parent == -1: the
// tree root), walking it depth-first from the adjacency lists: parent pointers, depths and
// potentials. Cost O(size of the component); `stack` needs room for it.
BEMD_HD inline void emd_hang(EmdWorkspace& w, int m, int n, int root, int parent, int cell) {
  const double* __restrict__ cl = w.cl;
  int32_t* __restrict__ stack = w.order;
  w.par[root] = parent;
  w.parc[root] = cell;
  if (parent < 0) {
    w.depth[root] = 0;
    w.pot[root] = 0.0;
  } else {
    w.depth[root] = w.depth[parent] + 1;
    w.pot[root] = cl[w.brow[cell] * n + w.bcol[cell]] - w.pot[parent];
  }
  int top = 0;
  stack[top++] = root;
  while (top > 0) {
    const int v = stack[--top];
    const int pv = w.par[v];
    for (int slot = w.head[v]; slot >= 0; slot = w.nxt[slot]) {
      const int e = slot >> 1;
      const int other = (slot & 1) ? w.brow[e] : m + w.bcol[e];
      if (other == pv) continue;
      w.par[other] = v;
      w.parc[other] = e;
      w.depth[other] = w.depth[v] + 1;
      w.pot[other] = cl[w.brow[e] * n + w.bcol[e]] - w.pot[v];  // u_r + v_c = C_rc
      stack[top++] = other;
    }
  }
}

// Adjacency lists of the basis (parent pointers, depths and potentials come from the start).
BEMD_HD inline void emd_link_basis(EmdWorkspace& w, int m, int n) {
  const int K = m + n;
  for (int v = 0; v < K; ++v) w.head[v] = -1;
  for (int e = 0; e < K - 1; ++e) {
    emd_link(w, 2 * e, w.brow[e]);
    emd_link(w, 2 * e + 1, m + w.bcol[e]);
  }
}

// Nodes by increasing depth (parents before children) for the flow recomputation: a counting
// sort over the depths, which the tree keeps current; no walk of the adjacency lists.
BEMD_HD inline void emd_depth_order(EmdWorkspace& w, int K) {
  int32_t* __restrict__ start = w.path;  // scratch [K]: depths are < K
  for (int d = 0; d < K; ++d) start[d] = 0;
  for (int v = 0; v < K; ++v) ++start[w.depth[v]];
  int sum = 0;
  for (int d = 0; d < K; ++d) { const int c = start[d]; start[d] = sum; sum += c; }
  for (int v = 0; v < K; ++v) w.order[start[w.depth[v]]++] = v;
}

// Initial basis: a greedy start in regret order, a one-pass simplification of Vogel's
// approximation. The lines of the longer side ("long lines") are taken in decreasing order of
// their regret (second-cheapest minus cheapest cost over the other side, computed once), and
// each is filled from its cheapest open cross-lines in turn, as much as the perturbed remainders
// allow, crossing out one line per cell. Under the perturbation no allocation ties (every basis
// of the perturbed problem is non-degenerate), so this yields exactly m + n - 1 cells with
// lexicographically positive flows. Full Vogel (penalties of all open lines kept current after
// every cell) starts closer to the optimum (about 20-40% fewer pivots) but its bookkeeping costs
// more than those pivots: with this start the whole solve is 1.1-2x faster at every size
// measured (1.9x at 4x12, 1.4x at 12x12, 1.1x at 200x300; benchmarks/RESULTS.md).
BEMD_HD inline void emd_initial_basis(EmdWorkspace& w, int m, int n, double ftol) {
  const int K = m + n;
  const double* __restrict__ cl = w.cl;
  double* __restrict__ rx = w.rx;
  int32_t* __restrict__ rk = w.rk;
  int32_t* __restrict__ done = w.done;
  int32_t* __restrict__ order = w.order;  // long lines by regret (w.order is free until the tree)
  double* __restrict__ regret = w.pen;
  for (int i = 0; i < m; ++i) { rx[i] = w.wa[i]; rk[i] = 1; }
  for (int j = 0; j < n; ++j) { rx[m + j] = w.wb[j]; rk[m + j] = 0; }
  rk[K - 1] = m;
  for (int x = 0; x < K; ++x) done[x] = 0;
  // long line x, short line t: cell (t, x) when the columns are the long side, else (x, t)
  const bool long_cols = n >= m;
  const int nl = long_cols ? n : m, ns = long_cols ? m : n;
  const int ls = long_cols ? 1 : n, ss = long_cols ? n : 1;  // cl strides along long / short
  for (int x = 0; x < nl; ++x) {
    double c1 = INFINITY, c2 = INFINITY;
    for (int t = 0; t < ns; ++t) {  // two smallest, as selects (min / max: no branch to mispredict)
      const double c = cl[x * ls + t * ss];
      const double hi = c < c1 ? c1 : c;
      c1 = c < c1 ? c : c1;
      c2 = hi < c2 ? hi : c2;
    }
    regret[x] = ns > 1 ? c2 - c1 : c1;
  }
  // order: decreasing regret, ties by index. Short lists by rank counting (branch-free, O(nl^2)),
  // long ones by insertion
  if (nl <= 24) {
    for (int x = 0; x < nl; ++x) {
      const double r = regret[x];
      int rank = 0;
      for (int y = 0; y < nl; ++y) rank += (regret[y] > r) | ((regret[y] == r) & (y < x));
      order[rank] = x;
    }
  } else {
    for (int x = 0; x < nl; ++x) {
      const double r = regret[x];
      int q = x;
      while (q > 0 && regret[order[q - 1]] < r) { order[q] = order[q - 1]; --q; }
      order[q] = x;
    }
  }
  const int long0 = long_cols ? m : 0, short0 = long_cols ? 0 : m;  // node index of line 0
  int rows_left = m, cols_left = n;
  int p = 0;
  for (int e = 0; e < K - 1; ++e) {
    // while rows and columns are both open, so is some long line at or after p
    while (done[long0 + order[p]]) ++p;
    const int x = order[p];
    int y = -1;
    double cy = 0.0;
    for (int t = 0; t < ns; ++t) {  // cheapest open short line (ties: lower index)
      if (done[short0 + t]) continue;
      const double c = cl[x * ls + t * ss];
      if (y < 0 || c < cy) { y = t; cy = c; }
    }
    const int i = long_cols ? y : x, j = long_cols ? x : y;
    const int rj = m + j;
    // allocate lexmin(remaining row, remaining column); on an exact tie (only possible for the
    // last cell) cross the row while other rows are open
    const bool row_smaller = lex_less(rx[i], rk[i], rx[rj], rk[rj], ftol) ||
                             (!lex_less(rx[rj], rk[rj], rx[i], rk[i], ftol) && rows_left > 1);
    const double f = row_smaller ? rx[i] : rx[rj];
    const int32_t k = row_smaller ? rk[i] : rk[rj];
    w.brow[e] = i;
    w.bcol[e] = j;
    w.fx[e] = f;
    w.fk[e] = k;
    rx[i] = snap_sub(rx[i], f, ftol); rk[i] -= k;
    rx[rj] = snap_sub(rx[rj], f, ftol); rk[rj] -= k;
    // the closed line has no later cell: in the tree it hangs below the other line of this cell
    const bool close_row = (row_smaller && rows_left > 1) || cols_left == 1;
    const int closed = close_row ? i : rj;
    done[closed] = 1;
    if (close_row) --rows_left; else --cols_left;
    w.par[closed] = close_row ? rj : i;
    w.parc[closed] = e;
    w.path[e] = closed;
    if (rows_left == 0 || cols_left == 0) break;
  }
  // The tree, from the allocation order. Every cell closed one line, and each closed line's
  // other cells came earlier, so in reverse allocation order every cell attaches its closed
  // line below a node already placed. One column is never closed (the last row closes only
  // when one column is left, and that column never closes): it is the root. So parent
  // pointers, depths and potentials (u_r + v_c = C_rc on every basic cell) need no tree walk.
  int root = m;
  while (done[root]) ++root;
  w.par[root] = -1;
  w.parc[root] = -1;
  w.depth[root] = 0;
  w.pot[root] = 0.0;
  for (int e = K - 2; e >= 0; --e) {
    const int x = w.path[e], y = w.par[x];
    w.depth[x] = w.depth[y] + 1;
    w.pot[x] = cl[w.brow[e] * n + w.bcol[e]] - w.pot[y];
  }
}

// Solves one problem. `max_iter` bounds the number of pivots. Returns an EmdStatus.
// Inputs must have passed emd_check (sa, sb are its sums).
// Write the duals w.uo [M], w.vo [N] to out, centred as POT does: (u, v) -> (u + c, v - c)
// with c making sum a u = sum b v; the objective sum a u + sum b v is unchanged.
template <typename T>
BEMD_HD inline void emd_centre_duals(const EmdProblem<T>& p, const EmdOutput<T>& out, const EmdWorkspace& w,
                                     double sa, double bscale) {
  const int M = p.M, N = p.N;
  double au = 0.0, bv = 0.0;
  for (int i = 0; i < M; ++i) au += (p.a ? double(p.a[i * p.as]) : sa / M) * w.uo[i];
  for (int j = 0; j < N; ++j) bv += (p.b ? double(p.b[j * p.bs]) * bscale : sa / N) * w.vo[j];
  const double c = (bv - au) / (2.0 * sa);
  for (int i = 0; i < M; ++i) out.u[i] = T(w.uo[i] + c);
  for (int j = 0; j < N; ++j) out.v[j] = T(w.vo[j] - c);
}

BEMD_HD inline bool emd_all_equal(const double* x, int n) {
  for (int i = 1; i < n; ++i) {
    if (x[i] != x[0]) return false;
  }
  return true;
}

// The n x n problem with equal row weights and equal column weights (nothing dropped, the
// compacted costs in w.cl): an assignment problem (assignment.h), solved without pivots.
template <typename T>
BEMD_HD inline int emd_solve_assignment(const EmdProblem<T>& p, const EmdOutput<T>& out, EmdWorkspace& w,
                                        double sa, double bscale) {
  const int n = p.M;
  LapScratch s;
  s.d = w.pen; s.rowsol = w.brow; s.colsol = w.bcol; s.freerows = w.order; s.collist = w.path;
  s.pred = w.par; s.matches = w.fk;
  lap_solve(w.cl, n, w.uo, w.vo, s);
  for (int i = 0; i < n * n; ++i) out.plan[i] = T(0);
  double value = 0.0;
  for (int i = 0; i < n; ++i) {
    const int j = s.rowsol[i];
    out.plan[i * n + j] = T(w.wa[i]);
    value += w.wa[i] * w.cl[i * n + j];
  }
  *out.value = T(value);
  emd_centre_duals(p, out, w, sa, bscale);
  return kOptimal;
}

template <typename T>
BEMD_HD inline int emd_solve(const EmdProblem<T>& p, const EmdOutput<T>& out, EmdWorkspace& w,
                             double sa, double sb, int64_t max_iter) {
  const int M = p.M, N = p.N;
  // --- weights: rescale b to the mass of a; drop zero (or sub-rounding) rows and columns
  const double ftol = 64.0 * DBL_EPSILON * sa;
  const double bscale = sa / sb;
  int m = 0, n = 0;
  for (int i = 0; i < M; ++i) {
    const double x = p.a ? double(p.a[i * p.as]) : sa / M;
    if (x > ftol) { w.ri[m] = i; w.wa[m] = x; ++m; }
  }
  for (int j = 0; j < N; ++j) {
    const double x = (p.b ? double(p.b[j * p.bs]) : sb / N) * bscale;
    if (x > ftol) { w.cj[n] = j; w.wb[n] = x; ++n; }
  }
  // Dropping sub-ftol weights can unbalance the masses by rounding amounts: absorb it.
  {
    double ta = 0.0, tb = 0.0;
    for (int i = 0; i < m; ++i) ta += w.wa[i];
    for (int j = 0; j < n; ++j) tb += w.wb[j];
    const double s = ta / tb;
    for (int j = 0; j < n; ++j) w.wb[j] *= s;
  }
  // compacted costs in double, contiguous: every later pass reads them many times
  double cmax = 0.0;
  if (m == M && n == N && p.cs1 == 1) {
    // nothing dropped, rows contiguous (the usual case): a straight conversion, and the max |c|
    // in four independent chains (no gather through cj, no select chain a cell long)
    double c0 = 0.0, c1 = 0.0, c2 = 0.0, c3 = 0.0;
    for (int i = 0; i < m; ++i) {
      const T* row = p.C + int64_t(i) * p.cs0;
      double* dst = w.cl + i * n;
      int j = 0;
      for (; j + 4 <= n; j += 4) {
        const double x0 = double(row[j]), x1 = double(row[j + 1]), x2 = double(row[j + 2]), x3 = double(row[j + 3]);
        dst[j] = x0; dst[j + 1] = x1; dst[j + 2] = x2; dst[j + 3] = x3;
        c0 = fabs(x0) > c0 ? fabs(x0) : c0; c1 = fabs(x1) > c1 ? fabs(x1) : c1;
        c2 = fabs(x2) > c2 ? fabs(x2) : c2; c3 = fabs(x3) > c3 ? fabs(x3) : c3;
      }
      for (; j < n; ++j) {
        const double x = double(row[j]);
        dst[j] = x;
        c0 = fabs(x) > c0 ? fabs(x) : c0;
      }
    }
    c0 = c1 > c0 ? c1 : c0;
    c2 = c3 > c2 ? c3 : c2;
    cmax = c2 > c0 ? c2 : c0;
  } else {
    for (int i = 0; i < m; ++i) {
      const T* row = p.C + int64_t(w.ri[i]) * p.cs0;
      double* dst = w.cl + i * n;
      for (int j = 0; j < n; ++j) {
        const double c = double(row[int64_t(w.cj[j]) * p.cs1]);
        dst[j] = c;
        const double ac = fabs(c);
        cmax = ac > cmax ? ac : cmax;  // finite (emd_check): no libm fmax call needed
      }
    }
  }
  if (m == M && n == N && M == N && M >= 2 && emd_all_equal(w.wa, m) && emd_all_equal(w.wb, n)) {
    return emd_solve_assignment(p, out, w, sa, bscale);
  }
  const double ctol = 1e-12 * cmax;
  const int K = m + n;
  const int nb = K - 1;

  int status = kOptimal;
  emd_initial_basis(w, m, n, ftol);
  int64_t iter = 0;
  const double* __restrict__ cl = w.cl;
  double* __restrict__ pot = w.pot;
  double* __restrict__ fx = w.fx;
  int32_t* __restrict__ fk = w.fk;
  int32_t* __restrict__ brow = w.brow;
  int32_t* __restrict__ bcol = w.bcol;
  int32_t* __restrict__ path = w.path;
  emd_link_basis(w, m, n);
  // rows per pricing block: everything up to 32x32, else about 2 sqrt(mn) cells
  int block_rows = m;
  if (m * n > 1024) {
    block_rows = int(2.0 * sqrt(double(m) * n) / n);
    block_rows = block_rows < 1 ? 1 : (block_rows > m ? m : block_rows);
  }
  int row0 = 0;
  for (;;) {
    // Pricing: the most negative reduced cost C_ij - u_i - v_j. Small problems scan every
    // cell (Dantzig); large ones use block search (as LEMON's network simplex): scan blocks of
    // about 2 sqrt(mn) cells from where the last scan stopped and take the best of the first
    // block that holds an improving cell; optimality is declared only after a full sweep. The
    // row minimum is a branch-free reduction the compiler vectorises; the argmin is looked up
    // only in rows that improve on the best so far.
    int ei = -1, ej = -1;
    double best = -ctol;
    const double* __restrict__ vcol = pot + m;
    for (int r = 0; r < m; ++r) {
      int i = row0 + r;
      if (i >= m) i -= m;
      const double* __restrict__ crow = cl + i * n;
      const double ui = pot[i];
      double rmin = INFINITY;
#if defined(_OPENMP) && !defined(__CUDA_ARCH__)
#pragma omp simd reduction(min : rmin)
#endif
      for (int j = 0; j < n; ++j) {
        const double rc = crow[j] - ui - vcol[j];
        rmin = rc < rmin ? rc : rmin;
      }
      if (rmin < best) {
        for (int j = 0; j < n; ++j)
          if (crow[j] - ui - vcol[j] == rmin) { ej = j; break; }
        best = rmin;
        ei = i;
      }
      if (ei >= 0 && (r + 1) % block_rows == 0) {
        row0 = i + 1 < m ? i + 1 : 0;
        break;
      }
    }
    if (ei < 0) break;
    if (iter >= max_iter) { status = kMaxIterReached; break; }
    ++iter;
    // Cycle: the tree path from row ei to column ej. Cells at even distance from either end
    // (0, 2, ...) lose theta, the others gain it; the entering cell gains it.
    int a = ei, b = m + ej;
    int na = 0, nbp = 0;  // path[0..na) climbs from a, path[K-1], path[K-2], ... from b
    while (a != b) {
      if (w.depth[a] >= w.depth[b]) {
        path[na++] = w.parc[a];
        a = w.par[a];
      } else {
        path[K - 1 - nbp++] = w.parc[b];
        b = w.par[b];
      }
    }
    // ratio test: the lexicographically smallest "minus" flow leaves (unique, see top)
    int leave = -1;
    bool leave_on_a = true;  // the leaving cell lies on the path climbing from row ei
    double tx = 0.0;
    int32_t tk = 0;
    for (int s = 0; s < na; s += 2) {
      const int e = path[s];
      if (leave < 0 || lex_less(fx[e], fk[e], tx, tk, ftol)) { leave = e; tx = fx[e]; tk = fk[e]; }
    }
    for (int s = 0; s < nbp; s += 2) {
      const int e = path[K - 1 - s];
      if (leave < 0 || lex_less(fx[e], fk[e], tx, tk, ftol)) {
        leave = e; tx = fx[e]; tk = fk[e]; leave_on_a = false;
      }
    }
    for (int s = 0; s < na; ++s) {
      const int e = path[s];
      fx[e] = (s & 1) ? fx[e] + tx : snap_sub(fx[e], tx, ftol);
      fk[e] += (s & 1) ? tk : -tk;
    }
    for (int s = 0; s < nbp; ++s) {
      const int e = path[K - 1 - s];
      fx[e] = (s & 1) ? fx[e] + tx : snap_sub(fx[e], tx, ftol);
      fk[e] += (s & 1) ? tk : -tk;
    }
    // Tree update: cutting the leaving cell detaches the subtree below it, which holds the
    // entering cell's end on the side the leaving cell was found (row ei on the a-side). That
    // subtree is re-hung from the entering cell; nothing else changes.
    emd_unlink(w, 2 * leave, brow[leave]);
    emd_unlink(w, 2 * leave + 1, m + bcol[leave]);
    brow[leave] = ei;
    bcol[leave] = ej;
    fx[leave] = tx;
    fk[leave] = tk;
    emd_link(w, 2 * leave, ei);
    emd_link(w, 2 * leave + 1, m + ej);
    if (leave_on_a) emd_hang(w, m, n, ei, m + ej, leave);
    else emd_hang(w, m, n, m + ej, ei, leave);
  }
  // (the tree and potentials are current: the loop exits right after pricing)
  emd_depth_order(w, K);

  // --- flows from the tree and the unperturbed weights: leaves first (reverse BFS order)
  double* __restrict__ rx = w.rx;
  for (int i = 0; i < m; ++i) rx[i] = w.wa[i];
  for (int j = 0; j < n; ++j) rx[m + j] = w.wb[j];
  for (int q = K - 1; q >= 1; --q) {
    const int v = w.order[q];
    const double f = rx[v];  // what v still has to send (row) or receive (column)
    fx[w.parc[v]] = f;
    rx[w.par[v]] -= f;
  }
  for (int i = 0; i < M * N; ++i) out.plan[i] = T(0);
  double value = 0.0;
  for (int e = 0; e < nb; ++e) {
    const double f = fx[e] > 0.0 ? fx[e] : 0.0;
    out.plan[w.ri[brow[e]] * N + w.cj[bcol[e]]] = T(f);
    value += f * cl[brow[e] * n + bcol[e]];
  }
  *out.value = T(value);

  // --- duals. Active lines from the tree; dropped lines get the tightest feasible value
  // (u_i = min_j C_ij - v_j over active columns, then v_j = min_i C_ij - u_i over all rows),
  // so u_i + v_j <= C_ij holds everywhere and the centred duals are a valid gradient with
  // respect to the weights, zero-weight bins included.
  for (int i = 0; i < M; ++i) w.uo[i] = INFINITY;
  for (int j = 0; j < N; ++j) w.vo[j] = INFINITY;
  for (int i = 0; i < m; ++i) w.uo[w.ri[i]] = pot[i];
  for (int j = 0; j < n; ++j) w.vo[w.cj[j]] = pot[m + j];
  if (m < M) {
    for (int i = 0; i < M; ++i) {
      if (w.uo[i] != INFINITY) continue;
      double ui = INFINITY;
      for (int jj = 0; jj < n; ++jj) ui = fmin(ui, emd_cost(p, i, w.cj[jj]) - pot[m + jj]);
      w.uo[i] = ui;
    }
  }
  if (n < N) {
    for (int j = 0; j < N; ++j) {
      if (w.vo[j] != INFINITY) continue;
      double vj = INFINITY;
      for (int i = 0; i < M; ++i) vj = fmin(vj, emd_cost(p, i, j) - w.uo[i]);
      w.vo[j] = vj;
    }
  }
  emd_centre_duals(p, out, w, sa, bscale);
  return status;
}

}  // namespace core
}  // namespace bert_emd
