"""RSEA expert assignment (DESIGN.md 5.2): which clients hold which experts, per module and round.

The problem, for one module: maximise ``sum P_ic X_ic`` over binary ``X`` (experts x clients) such that every expert
is held by exactly ``C`` clients and every client holds between ``k`` and ``M`` experts. It is a bipartite
b-matching, so its LP relaxation is integral, but generic LP or flow solvers are 10-100x too slow at thousands of
clients. :func:`assign_experts` exploits the shape instead (few experts, many clients):

1. *Dummy expert.* A client that holds fewer than ``M`` experts fills its other slots with copies of a dummy expert
   (profit 0, at most ``M - k`` copies per client). Every client then takes exactly ``M`` items, a transportation
   problem with ``E + 1`` sources whose dual has only ``E`` free prices ``u`` (the dummy's is 0).
2. *Dual prices (Jacobi market clearing).* Given prices, a client's best response is its ``M`` best items by
   reduced profit ``P_ic - u_i``. Each iteration sets every price to the value that clears its own market given the
   others (a C-th largest critical value); starting from a common price level that clears the total, this reaches
   an almost balanced best response in a handful of vectorised passes, each O(E N).
3. *Exact finish (successive shortest paths).* The best response is optimal for the amounts each expert actually
   got, so the few experts left over- or under-held are balanced by shortest augmenting paths in the residual graph,
   compressed to the ``E + 1`` expert nodes: the arc ``j -> i`` is the cheapest client that swaps ``j`` for ``i``.
   Clients whose margin between their last taken and first left item is large cannot carry a cheap arc, so arcs are
   computed over the few smallest-margin clients, with the margin as an exact lower bound for the rest; a path that
   leans on a bound widens the set and is recomputed, so every path is a true shortest path and the result is
   exactly optimal.

Ties (identical rows, uniform scores) would make the best responses degenerate and the finish slow, so the scores
are perturbed by at most ``TIE_BREAK * mean(P)`` per entry (fixed pseudo-random pattern, deterministic result).
Since the optimum is at least ``C * E * mean(P)`` for non-negative scores, the returned objective is within
``TIE_BREAK`` (1e-13) relative of the true optimum, and exactly optimal whenever distinct objective values differ
by more than that; the constraints always hold exactly.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np
from scipy import sparse
from scipy.optimize import linprog

from edgemole.errors import ConfigError

TIE_BREAK = 1e-13
"""Largest perturbation of a score, relative to the mean score: the objective's relative tolerance."""

_MAX_DUAL_ITERS = 60
_STALL_ITERS = 6
_GOOD_ENOUGH = 2
_ROW_CANDIDATES = 32


def check_feasible(num_experts: int, num_clients: int, holders: int, min_experts: int, max_experts: int) -> None:
    """Raise :class:`ConfigError` unless some assignment satisfies the constraints (E*C within [k*N, M*N], C <= N)."""
    named = {
        "experts": num_experts,
        "clients": num_clients,
        "holders per expert": holders,
        "min experts per client": min_experts,
        "max experts per client": max_experts,
    }
    for name, value in named.items():
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise ConfigError(f"expert assignment: {name} must be an integer, got {value!r}")
        if value < 1:
            raise ConfigError(f"expert assignment: {name} must be at least 1, got {value}")
    e, n, c, k, m = (int(v) for v in named.values())
    if k > m:
        raise ConfigError(f"expert assignment: min experts per client k={k} exceeds max experts per client M={m}")
    if c > n:
        raise ConfigError(f"expert assignment infeasible: holders per expert C={c} exceeds the number of clients N={n}")
    if k * n > e * c:
        raise ConfigError(
            f"expert assignment infeasible: k*N = {k}*{n} = {k * n} > E*C = {e}*{c} = {e * c} "
            "(too few expert slots for every client to hold its minimum)"
        )
    if e * c > m * n:
        raise ConfigError(
            f"expert assignment infeasible: E*C = {e}*{c} = {e * c} > M*N = {m}*{n} = {m * n} "
            "(the clients cannot hold every expert's copies)"
        )


def _scores(P: np.ndarray) -> np.ndarray:
    """P as a C-contiguous float64 E x N array, or ValueError saying what is wrong with it."""
    arr = np.asarray(P)
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"expert assignment: scores must be a non-empty 2-D array (experts x clients), got shape "
                         f"{arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"expert assignment: scores must be real numbers, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float64)
    if not np.isfinite(arr).all():
        raise ValueError("expert assignment: scores contain NaN or infinity")
    if (arr < 0).any():
        raise ValueError(f"expert assignment: scores must be non-negative probabilities, min is {arr.min():g}")
    return arr


def assignment_objective(P: np.ndarray, X: np.ndarray) -> float:
    """sum P_ic X_ic, accumulated in float64 (the quantity every solver here maximises)."""
    return float(np.sum(np.asarray(P, dtype=np.float64), where=np.asarray(X, dtype=bool)))


@lru_cache(maxsize=8)
def _tie_pattern(num_experts: int, num_clients: int) -> np.ndarray:
    """A fixed pseudo-random pattern in [0, 1), cached per shape so that repeated rounds do not pay for it."""
    pattern = np.random.default_rng(0x5EA).random((num_experts, num_clients))
    pattern.setflags(write=False)
    return pattern


def _clearing_quantities(
    R: np.ndarray, k: int, M: int, D: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per client: the M-th and (M+1)-th largest reduced profit among its items (dummy copies at 0), and sorted R.

    ``q_M`` is the worst item a client keeps and ``q_M1`` the best it leaves; everything the market step and the
    exact finish need follows from them.
    """
    E = R.shape[0]
    S = np.sort(R, axis=0)  # ascending: the m-th largest is S[E - m]
    if D == 0:
        return S[E - M], S[E - M - 1], S
    nonneg = np.count_nonzero(R >= 0, axis=0)

    def q(m: int) -> np.ndarray:
        real_above = S[max(E - m, 0)]  # the m-th largest real, when m <= nonneg
        real_below = S[min(max(E - (m - D), 0), E - 1)]  # the (m - D)-th largest real, past all the dummies
        out = np.where(m <= nonneg, real_above, 0.0)
        return np.where(m > nonneg + D, real_below, out)

    return q(M), q(M + 1), S


def _dual_prices(P: np.ndarray, C: int, k: int, M: int, D: int) -> np.ndarray:
    """Expert prices whose best response is nearly balanced (Jacobi market clearing from a common price level)."""
    E, N = P.shape
    if D > 0:
        # Common level t: clients keep k items, then those of their next M - k whose profit exceeds t; pick t so
        # that the total held equals E*C (a quantile of the ranks k+1..M).
        S = np.sort(P, axis=0)
        extra = S[E - M : E - k].ravel()
        need = E * C - k * N
        if need <= 0:
            level = float(extra.max()) + 1.0
        elif need >= extra.size:
            level = float(extra.min()) - 1.0
        else:
            part = np.partition(extra, extra.size - need)
            level = 0.5 * (part[extra.size - need] + part[: extra.size - need].max())
        u = np.full(E, level)
    else:
        u = np.zeros(E)  # without dummies only price differences matter
    best_u, best_imbalance, since_best = u, None, 0
    for _ in range(_MAX_DUAL_ITERS):
        R = P - u[:, None]
        q_m, q_m1, _ = _clearing_quantities(R, k, M, D)
        keeps = R >= q_m
        imbalance = int(np.abs(np.count_nonzero(keeps, axis=1) - C).sum())
        if best_imbalance is None or imbalance < best_imbalance:
            best_u, best_imbalance, since_best = u, imbalance, 0
        else:
            since_best += 1
        if imbalance <= _GOOD_ENOUGH or since_best >= _STALL_ITERS:
            break
        # Client c takes expert i iff u_i < P_ic - (its best alternative threshold): price i at the C-th largest.
        critical = P - q_m[None, :] - keeps * (q_m1 - q_m)[None, :]
        part = np.partition(critical, N - C, axis=1)
        u = 0.5 * (part[:, N - C] + part[:, : N - C].max(axis=1))
    return best_u


def _best_response(R: np.ndarray, S: np.ndarray, k: int, M: int) -> np.ndarray:
    """Each client's M best items at reduced profits R (dummies on ties at 0): the E x N set of real experts."""
    E = R.shape[0]
    n_real = np.clip(np.count_nonzero(R > 0, axis=0), k, M)
    cut = np.take_along_axis(S, (E - n_real)[None, :], axis=0)[0]  # the n_real-th largest real
    X = R >= cut
    cols = np.flatnonzero(np.count_nonzero(X, axis=0) > n_real)
    if cols.size:  # exact ties at the cut: keep only as many tied experts as there are places left
        sub, at = R[:, cols], cut[cols]
        tied = sub == at
        left = n_real[cols] - np.count_nonzero(sub > at, axis=0)
        X[:, cols] = (sub > at) | (tied & (np.cumsum(tied, axis=0) <= left))
    return X


def _balance(R: np.ndarray, u: np.ndarray, X: np.ndarray, q_m1: np.ndarray, C: int, M: int, D: int) -> np.ndarray:
    """Make every expert's holder count C by successive shortest paths; X must be a best response at prices u.

    Nodes are the E experts and the dummy (index E). The arc j -> i is the cheapest client that gives up j and
    takes i; in reduced terms (profits R = P - u) that client costs R_jc - R_ic >= R_jc - q_m1_c =: slack_jc >= 0,
    since i is no better than the best item it left. Row j is first computed over the few clients with the
    smallest slack_jc (plus every client already moved), and the next smallest slack bounds the rest of the row
    from below. A path that uses a bound is not trusted: those arcs are computed over all clients and the search
    reruns, so every augmentation follows a true shortest path and the final X is optimal.
    """
    E, N = R.shape
    n = E + 1
    units = np.empty((n, N), dtype=np.int8)
    units[:E] = X
    units[E] = M - np.count_nonzero(X, axis=0)
    cap = np.ones(n, dtype=np.int8)
    cap[E] = D
    excess = units.sum(axis=1, dtype=np.int64)
    excess[:E] -= C
    excess[E] = -excess[:E].sum()
    if not excess.any():
        return X
    R_ext = np.vstack([R, np.zeros((1, N))])
    slack = R_ext - q_m1[None, :]
    slack[units < 1] = np.inf
    size = min(N - 1, _ROW_CANDIDATES)
    part = np.argpartition(slack, size, axis=1)
    cand, bound = part[:, :size], np.take_along_axis(slack, part[:, size : size + 1], axis=1)[:, 0]
    u_ext = np.append(u, 0.0)
    shift = u_ext[:, None] - u_ext[None, :]  # true arc cost = reduced arc cost + shift
    nodes = np.arange(n)
    moved = np.zeros(N, dtype=bool)
    base = np.full((n, n), np.inf)  # over each row's candidates that never moved
    base_pick = np.full((n, n), -1, dtype=np.int64)
    full = np.full((n, n), np.inf)  # over every client that never moved, where known
    full_pick = np.full((n, n), -1, dtype=np.int64)
    known = np.zeros((n, n), dtype=bool)

    def row(j: int) -> None:
        cols = cand[j][~moved[cand[j]] & (units[j, cand[j]] >= 1)]
        base[j], base_pick[j] = np.inf, -1
        if cols.size:
            cost = R_ext[j, cols][None, :] - R_ext[:, cols]
            cost[units[:, cols] >= cap[:, None]] = np.inf
            cost[j] = np.inf
            at = cost.argmin(axis=1)
            base[j] = cost[nodes, at]
            base_pick[j] = np.where(np.isfinite(base[j]), cols[at], -1)

    def arc(j: int, i: int) -> None:
        cols = np.flatnonzero((units[j] >= 1) & (units[i] < cap[i]) & ~moved)
        full[j, i], full_pick[j, i], known[j, i] = np.inf, -1, True
        if cols.size:
            cost = R_ext[j, cols] - R_ext[i, cols]
            at = int(cost.argmin())
            full[j, i], full_pick[j, i] = cost[at], cols[at]

    for j in range(n):
        row(j)
    while excess.any():
        unmoved = np.where(known, full, base)
        trusted = known | (unmoved <= bound[:, None])
        arcs = np.where(trusted, unmoved, bound[:, None])
        pick = np.where(known, full_pick, base_pick)
        mv = np.flatnonzero(moved)
        if mv.size:
            Rm = R_ext[:, mv]
            cost = Rm[:, None, :] - Rm[None, :, :]
            cost[~((units[:, mv] >= 1)[:, None, :] & (units[:, mv] < cap[:, None])[None, :, :])] = np.inf
            cost[nodes, nodes] = np.inf
            at = cost.argmin(axis=2)
            via_moved = np.take_along_axis(cost, at[:, :, None], axis=2)[:, :, 0]
            use_moved = via_moved < arcs
            trusted |= use_moved  # below every bound of the unmoved clients
            arcs = np.where(use_moved, via_moved, arcs)
            pick = np.where(use_moved, mv[at], pick)
        path = _shortest_path(arcs + shift, excess)
        if path is None:
            raise RuntimeError("expert assignment: no augmenting path although the problem is feasible")
        steps = list(zip(path[:-1], path[1:], strict=True))
        loose = [(a, b) for a, b in steps if not trusted[a, b]]
        if loose:
            for a, b in loose:
                arc(a, b)
            continue
        changed = [int(pick[a, b]) for a, b in steps]
        for (a, b), c in zip(steps, changed, strict=True):
            units[a, c] -= 1
            units[b, c] += 1
        moved[changed] = True
        excess[path[0]] -= 1
        excess[path[-1]] += 1
        known &= ~np.isin(full_pick, changed)
        for j in np.flatnonzero(np.isin(base_pick, changed).any(axis=1)):
            row(int(j))
    return units[:E] >= 1


def _shortest_path(arcs: np.ndarray, excess: np.ndarray) -> list[int] | None:
    """Cheapest path from an over-held node to an under-held one (Bellman-Ford), or a negative cycle if one shows up.

    A returned cycle (first node == last) is an improving exchange; None means no path within the given arcs.
    """
    n = arcs.shape[0]
    dist = np.where(excess > 0, 0.0, np.inf)
    pred = np.full(n, -1)
    cols = np.arange(n)
    for _ in range(n + 1):
        cand = dist[:, None] + arcs
        via = cand.argmin(axis=0)
        best = cand[via, cols]
        better = best < dist
        if not better.any():
            break
        dist[better] = best[better]
        pred[better] = via[better]
    sinks = np.flatnonzero(excess < 0)
    target = int(sinks[np.argmin(dist[sinks])])
    if not np.isfinite(dist[target]):
        return None
    path, seen = [target], {target}
    while pred[path[-1]] != -1:
        node = int(pred[path[-1]])
        if node in seen:  # a negative cycle (rounding-level): cancel it instead
            cycle = path[path.index(node) :] + [node]
            return cycle[::-1]
        path.append(node)
        seen.add(node)
    return path[::-1]


def assign_experts(P: np.ndarray, holders: int, min_experts: int, max_experts: int) -> np.ndarray:
    """Exact optimum of RSEA's assignment for one module: bool E x N, each expert held by ``holders`` clients.

    See the module docstring for the method and the tolerance (objective within ``TIE_BREAK`` relative).
    """
    scores = _scores(P)
    E, N = scores.shape
    check_feasible(E, N, holders, min_experts, max_experts)
    C, k, M = int(holders), int(min_experts), min(int(max_experts), E)
    if C == N:
        return np.ones((E, N), dtype=bool)
    D = M - k
    scores = scores + (TIE_BREAK * float(scores.mean())) * _tie_pattern(E, N)
    u = _dual_prices(scores, C, k, M, D)
    R = scores - u[:, None]
    _, q_m1, S = _clearing_quantities(R, k, M, D)
    X = _best_response(R, S, k, M)
    return _balance(R, u, X, q_m1, C, M, D)


def assign_experts_all(
    Ps: Sequence[np.ndarray], holders: int, min_experts: int, max_experts: int, workers: int | None = None
) -> list[np.ndarray]:
    """:func:`assign_experts` for every module of a round, in ``workers`` threads (default: the CPU count).

    The modules are independent and numpy releases the GIL in the heavy steps, so threads overlap them without
    copying score matrices to other processes; ``workers=1`` runs them in order.
    """
    workers = min(len(Ps), workers if workers is not None else (os.cpu_count() or 1))
    if workers <= 1:
        return [assign_experts(P, holders, min_experts, max_experts) for P in Ps]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda P: assign_experts(P, holders, min_experts, max_experts), Ps))


def random_assignment(
    num_experts: int, num_clients: int, holders: int, min_experts: int, max_experts: int, rng: np.random.Generator
) -> np.ndarray:
    """A random feasible assignment (round 0, before any scores exist): the exact optimum for i.i.d. random scores.

    Continuous random scores make the optimum unique almost surely, so the result is random, and it satisfies the
    constraints exactly because it comes from the same solver as every later round.
    """
    check_feasible(num_experts, num_clients, holders, min_experts, max_experts)
    return assign_experts(rng.random((num_experts, num_clients)), holders, min_experts, max_experts)


def assignment_lp(P: np.ndarray, holders: int, min_experts: int, max_experts: int) -> tuple[np.ndarray, float]:
    """Reference optimum from the LP relaxation with scipy's HiGHS: (rounded X, LP objective on the given P).

    Scores about 1/N sit below HiGHS's 1e-7 tolerances, so the LP is solved on ``P * N / mean-row-sum``; the
    relaxation of a bipartite b-matching is integral, so rounding the solution only removes solver noise.
    """
    scores = _scores(P)
    E, N = scores.shape
    check_feasible(E, N, holders, min_experts, max_experts)
    scale = N / max(float(scores.sum(axis=1).mean()), np.finfo(float).tiny)
    per_expert = sparse.kron(sparse.identity(E, format="csr"), np.ones((1, N)), format="csr")
    per_client = sparse.kron(np.ones((1, E)), sparse.identity(N, format="csr"), format="csr")
    result = linprog(
        -(scores * scale).ravel(),
        A_ub=sparse.vstack([per_client, -per_client], format="csr"),
        b_ub=np.concatenate([np.full(N, float(max_experts)), np.full(N, -float(min_experts))]),
        A_eq=per_expert,
        b_eq=np.full(E, float(holders)),
        bounds=(0.0, 1.0),
        method="highs",
    )
    if result.status != 0:
        raise RuntimeError(f"expert assignment LP failed: {result.message}")
    return result.x.reshape(E, N) > 0.5, float(-result.fun / scale)
