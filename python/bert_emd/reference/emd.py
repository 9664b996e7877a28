"""Pure-Python reference of exact balanced optimal transport (the test oracle and fallback).

A textbook transportation simplex, deliberately different from the C++/CUDA solver core so
that the two check each other: north-west-corner start, u-v potentials from the basis tree,
Bland's rule (first improving cell in row-major order enters; among tied leaving cells the
smallest index leaves), which cannot cycle even on degenerate problems. Plain Python floats
(float64); one problem at a time. Slow by design: use it for testing, not training.
"""

from __future__ import annotations

import math

import torch

from ._problem import invalid_problems, problem_weights

__all__ = ["solve_transport", "emd_exact_reference"]

STATUS_OPTIMAL, STATUS_MAX_ITER, STATUS_INVALID = 0, 1, 2


def solve_transport(
    C: list[list[float]], a: list[float], b: list[float], max_iter: int
) -> tuple[float, list[list[float]], list[float], list[float], int]:
    """Solve one balanced problem. Returns (value, plan, u, v, status); u, v centred as POT."""
    M, N = len(a), len(b)
    sa, sb = sum(a), sum(b)
    b = [x * sa / sb for x in b]  # absorb a rounding-level mass mismatch
    cmax = max(abs(c) for row in C for c in row)
    ctol = 1e-12 * cmax
    ftol = 64 * 2.220446049250313e-16 * sa

    # north-west corner start: M + N - 1 basic cells (degenerate zeros included)
    flow: dict[tuple[int, int], float] = {}
    ra, rb = list(a), list(b)
    i = j = 0
    while True:
        x = min(ra[i], rb[j])
        flow[(i, j)] = x
        ra[i] -= x
        rb[j] -= x
        if i == M - 1 and j == N - 1:
            break
        if j == N - 1 or (i < M - 1 and ra[i] <= rb[j]):
            i += 1  # row exhausted (on a tie keep the column: a degenerate zero follows)
        else:
            j += 1

    status = STATUS_OPTIMAL
    it = 0
    while True:
        u, v = _potentials(C, flow, M, N)
        entering = None
        for i in range(M):  # Bland: first improving cell
            for j in range(N):
                if (i, j) not in flow and C[i][j] - u[i] - v[j] < -ctol:
                    entering = (i, j)
                    break
            if entering:
                break
        if entering is None:
            break
        if it >= max_iter:
            status = STATUS_MAX_ITER
            break
        it += 1
        cycle = _cycle(flow, entering, M)
        minus = cycle[1::2]
        theta = min(flow[c] for c in minus)
        leave = min(c for c in minus if flow[c] <= theta + ftol)  # Bland: smallest index
        for k, c in enumerate(cycle):
            if c == entering:
                continue
            flow[c] += theta if k % 2 == 0 else -theta
        del flow[leave]
        flow[entering] = theta

    plan = [[0.0] * N for _ in range(M)]
    for (i, j), x in flow.items():
        plan[i][j] = max(x, 0.0)
    value = sum(plan[i][j] * C[i][j] for i in range(M) for j in range(N))
    u, v = _potentials(C, flow, M, N)
    c = (sum(bj * vj for bj, vj in zip(b, v)) - sum(ai * ui for ai, ui in zip(a, u))) / (sa + sa)
    return value, plan, [x + c for x in u], [x - c for x in v], status


def _potentials(C, flow, M, N):
    """u_i + v_j = C_ij on every basic cell, u_0 = 0 (the basis is a spanning tree)."""
    u: list[float | None] = [None] * M
    v: list[float | None] = [None] * N
    u[0] = 0.0
    cells = list(flow)
    changed = True
    while changed:
        changed = False
        for i, j in cells:
            if u[i] is not None and v[j] is None:
                v[j] = C[i][j] - u[i]
                changed = True
            elif v[j] is not None and u[i] is None:
                u[i] = C[i][j] - v[j]
                changed = True
    return [float(x) for x in u], [float(x) for x in v]


def _cycle(flow, entering, M):
    """The cycle the entering cell closes, as a cell list starting with it (signs +,-,+,...)."""
    # tree adjacency over nodes: rows 0..M-1, columns M..
    adj: dict[int, list[int]] = {}
    for i, j in flow:
        adj.setdefault(i, []).append(M + j)
        adj.setdefault(M + j, []).append(i)
    start, goal = M + entering[1], entering[0]  # path column -> row closes the cycle
    parent = {start: None}
    stack = [start]
    while stack:
        node = stack.pop()
        for nxt in adj.get(node, []):
            if nxt not in parent:
                parent[nxt] = node
                stack.append(nxt)
    path = [goal]
    while path[-1] != start:
        path.append(parent[path[-1]])
    # path: row(entering) ... column(entering); consecutive nodes are basic cells
    cells = [entering]
    for x, y in zip(path, path[1:]):
        cells.append((x, y - M) if x < M else (y, x - M))
    return cells


def emd_exact_reference(
    cost: torch.Tensor,
    a: torch.Tensor | None,
    b: torch.Tensor | None,
    max_iter: int,
    validate: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched wrapper with the op contract of ``bert_emd::emd_exact`` (see ``bert_emd.emd``).

    Invalid problems (:func:`~bert_emd.reference._problem.invalid_problems`) raise a
    ``ValueError`` with ``validate``, else get status 2 and NaN outputs. The shapes, dtypes and
    devices are taken as given: ``bert_emd.emd`` checks them (and names the invalid value)
    before it calls this.
    """
    batch, (M, N) = cost.shape[:-2], cost.shape[-2:]
    a_full, b_full = problem_weights(cost, a, b)
    errors = invalid_problems(cost, a_full, b_full)
    if validate and bool(errors.any()):
        raise ValueError(f"emd (reference): problem {int(errors.nonzero()[0, 0])} of the batch is invalid")
    C64 = cost.detach().to("cpu", torch.float64).reshape(-1, M, N)
    A64 = a_full.detach().to("cpu", torch.float64).reshape(-1, M)
    B64 = b_full.detach().to("cpu", torch.float64).reshape(-1, N)
    nb = C64.shape[0]
    value = torch.full((nb,), math.nan, dtype=torch.float64)
    plan = torch.full((nb, M, N), math.nan, dtype=torch.float64)
    u = torch.full((nb, M), math.nan, dtype=torch.float64)
    v = torch.full((nb, N), math.nan, dtype=torch.float64)
    status = torch.full((nb,), STATUS_INVALID, dtype=torch.int32)
    for t in range(nb):
        if errors[t]:
            continue
        val, P, ut, vt, st = solve_transport(C64[t].tolist(), A64[t].tolist(), B64[t].tolist(), max_iter)
        f64 = torch.float64
        value[t], plan[t], status[t] = val, torch.tensor(P, dtype=f64), st
        u[t], v[t] = torch.tensor(ut, dtype=f64), torch.tensor(vt, dtype=f64)
    dev, dt = cost.device, cost.dtype
    return (
        value.reshape(batch).to(dev, dt),
        plan.reshape(*batch, M, N).to(dev, dt),
        u.reshape(*batch, M).to(dev, dt),
        v.reshape(*batch, N).to(dev, dt),
        status.reshape(batch).to(dev),
    )
