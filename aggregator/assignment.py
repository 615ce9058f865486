"""RSEA expert assignment (DESIGN.md 5.2): which clients hold which experts, per module and round.

The problem, for one module: maximise ``sum P_ic X_ic`` over binary ``X`` (experts x clients) such that every expert
is held by exactly ``C`` clients and every client holds between ``k`` and ``M`` experts. It is a bipartite
b-matching, so its LP relaxation is integral, but at 10,000 clients a generic LP (HiGHS: seconds) or min-cost flow
(OR-tools: about 0.25 s) per module misses the budget of 2 s for a round's 24 modules. :func:`assign_experts`
exploits the shape instead (few experts, many clients) and takes about 30 ms per module there:

1. *Dummy expert.* A client that holds fewer than ``M`` experts fills its other slots with copies of a dummy expert
   (profit 0, at most ``M - k`` copies per client). Every client then takes exactly ``M`` items, a transportation
   problem with ``E + 1`` sources whose dual has only ``E`` free prices ``u`` (the dummy's is 0).
2. *Dual prices (Jacobi market clearing).* Given prices, a client's best response is its ``M`` best items by
   reduced profit ``P_ic - u_i``. Each iteration shifts all prices to the common level at which the total held is
   E*C, then sets every price to the value that clears its own market given the others (a C-th largest critical
   value). This reaches an almost balanced best response in a handful of vectorised passes, each O(E N).
3. *Exact finish (successive shortest paths).* The best response is optimal for the amounts each expert actually
   got, so the few experts left over- or under-held are balanced by shortest augmenting paths in the residual graph,
   compressed to the ``E + 1`` expert nodes: the arc ``j -> i`` is the cheapest client that swaps ``j`` for ``i``.
   Most clients are far from indifferent and cannot carry a cheap arc, so each row of arcs is computed over its few
   most nearly indifferent clients, with an exact lower bound for the rest; a path that leans on a bound gets those
   arcs computed over every client and is searched again, so every augmentation follows a true shortest path and
   the result is optimal. Typical cost: a few passes of step 2 and a few dozen tiny shortest-path problems.

Exact ties (identical rows, uniform or coarsely rounded scores) make best responses degenerate and the finish slow,
so the scores are perturbed by less than ``TIE_BREAK * mean(P)`` per entry (a fixed pseudo-random pattern, so the
result is deterministic). Permuting the clients of any feasible assignment shows that the optimum is at least
``C * E * mean(P)`` for non-negative scores, so the returned objective is within ``TIE_BREAK`` (1e-10) relative of
the true optimum (plus float rounding: the measured gaps to HiGHS are about 1e-14), and exactly optimal whenever
distinct objective values differ by more than that. The constraints always hold exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np
from scipy import sparse
from scipy.optimize import linprog

from edgemole.errors import ConfigError

TIE_BREAK = 1e-10
"""Largest perturbation of a score, relative to the mean score: the objective's relative tolerance."""

_MAX_MARKET_ITERS = 60
_PROGRESS = 0.75
_CANDIDATES_PER_ROW = 32


def feasible_holders(num_experts: int, num_clients: int, holders: int, min_experts: int, max_experts: int) -> int:
    """C as configured, or the nearest C that lets ``num_clients`` devices hold between k and M experts each
    (k*N <= E*C <= M*N, C <= N): a fleet larger or smaller than the configuration was sized for still runs.
    ``holders`` 0 ("auto") is the smallest such C, ceil(k*N / E): each device holds as few experts as it may.
    Raises :class:`ConfigError` when no C works (e.g. fewer than E/M devices)."""
    low = max(1, -(-min_experts * num_clients // num_experts))
    high = min((max_experts * num_clients) // num_experts, num_clients)
    if holders == 0:
        holders = low
    if low > high or holders < 1:
        raise ConfigError(f"expert assignment infeasible: no number of holders C lets {num_clients} device(s) hold "
                          f"{num_experts} experts with {min_experts} to {max_experts} each (need N >= E/M = "
                          f"{num_experts}/{max_experts} devices)")
    chosen = min(max(holders, low), high)
    check_feasible(num_experts, num_clients, chosen, min_experts, max_experts)
    return chosen


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
        raise ValueError(
            f"expert assignment: scores must be a non-empty 2-D array (experts x clients), got shape {arr.shape}"
        )
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


@lru_cache(maxsize=4)
def _tie_pattern(num_experts: int, num_clients: int) -> np.ndarray:
    """A fixed pseudo-random pattern in [0, 1), cached per shape so that repeated rounds do not pay for it."""
    pattern = np.random.default_rng(0x5EA).random((num_experts, num_clients))
    pattern.setflags(write=False)
    return pattern


def _common_level(S: np.ndarray, C: int, k: int, M: int) -> float:
    """The shift t of every price at which the clients hold E*C experts in all (S: reduced profits sorted per client).

    A client keeps its k best experts and, of its next M - k, those with profit above t (the dummy's 0 after the
    shift), so t is a quantile of those next ranks. It fixes the price level, which Jacobi steps adjust slowly.
    """
    E, N = S.shape
    extra = S[E - M : E - k].ravel()
    need = E * C - k * N
    if need <= 0:
        return float(extra.max())
    if need >= extra.size:
        return float(np.nextafter(extra.min(), -np.inf))
    part = np.partition(extra, extra.size - need)
    return 0.5 * float(part[extra.size - need] + part[: extra.size - need].max())


def _thresholds(r: np.ndarray, S: np.ndarray, M: int, D: int) -> tuple[np.ndarray, np.ndarray]:
    """Per client: the M-th and (M+1)-th largest reduced profit among its items, dummy copies at 0 included.

    ``q_m`` is the worst item a client keeps and ``q_m1`` the best it leaves (S is r sorted per client); the market
    step and the exact finish both follow from them.
    """
    E = r.shape[0]
    if D == 0:
        return S[E - M], S[E - M - 1]
    nonneg = np.count_nonzero(r >= 0, axis=0)

    def q(m: int) -> np.ndarray:
        real_above = S[max(E - m, 0)]  # the m-th largest real, when m <= nonneg
        real_below = S[min(max(E - (m - D), 0), E - 1)]  # the (m - D)-th largest real, past all the dummies
        out = np.where(m <= nonneg, real_above, 0.0)
        return np.where(m > nonneg + D, real_below, out)

    return q(M), q(M + 1)


def _market_prices(
    P: np.ndarray, C: int, k: int, M: int, D: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Expert prices whose best response is nearly balanced (Jacobi market clearing, see the module docstring).

    Stops once few holders are off (max(8, N/600): the exact finish then costs less than another O(E N) pass) or
    when progress slows (the iteration can settle into a small oscillation that the exact finish removes anyway).
    Returns the prices u and, at u, the reduced profits with a zero dummy row appended ((E+1) x N), the same sorted
    per client, and both client thresholds, so that the caller does not recompute them.
    """
    E, N = P.shape
    u = np.zeros(E)
    best: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None
    best_imbalance = 0
    for _ in range(_MAX_MARKET_ITERS):
        r_ext = np.empty((E + 1, N))
        r = r_ext[:E]
        np.subtract(P, u[:, None], out=r)
        r_ext[E] = 0.0
        S = np.sort(r, axis=0)
        if D > 0:  # without dummies only price differences matter
            level = _common_level(S, C, k, M)
            u, r, S = u + level, np.subtract(r, level, out=r), np.subtract(S, level, out=S)
        q_m, q_m1 = _thresholds(r, S, M, D)
        keeps = r >= q_m
        imbalance = int(np.abs(np.count_nonzero(keeps, axis=1) - C).sum())
        slow = best is not None and imbalance > _PROGRESS * best_imbalance
        if best is None or imbalance < best_imbalance:
            best, best_imbalance = (u, r_ext, S, q_m, q_m1), imbalance
        if imbalance <= max(8, N // 600) or slow:
            break
        # Client c takes expert i iff u_i < P_ic - (the worst item it would keep without i): the critical value is
        # r_ic - q_m1_c + u_i if it keeps i now, else r_ic - q_m_c + u_i. Price i at the C-th largest one.
        critical = r - q_m[None, :]
        critical -= keeps * (q_m1 - q_m)[None, :]
        critical.partition(N - C, axis=1)
        u = u + 0.5 * (critical[:, N - C] + critical[:, : N - C].max(axis=1))
    assert best is not None
    return best


def _best_response(r: np.ndarray, S: np.ndarray, k: int, M: int) -> np.ndarray:
    """Each client's M best items at reduced profits r (dummies on ties at 0): the E x N set of real experts."""
    E = r.shape[0]
    n_real = np.clip(np.count_nonzero(r > 0, axis=0), k, M)
    cut = np.take_along_axis(S, (E - n_real)[None, :], axis=0)[0]  # the n_real-th largest real
    X = r >= cut
    cols = np.flatnonzero(np.count_nonzero(X, axis=0) > n_real)
    if cols.size:  # exact ties at the cut: keep only as many tied experts as there are places left
        sub, at = r[:, cols], cut[cols]
        tied = sub == at
        left = n_real[cols] - np.count_nonzero(sub > at, axis=0)
        X[:, cols] = (sub > at) | (tied & (np.cumsum(tied, axis=0) <= left))
    return X


def _balance(
    r_ext: np.ndarray, u: np.ndarray, X: np.ndarray, q_m: np.ndarray, q_m1: np.ndarray, C: int, M: int, D: int
) -> np.ndarray:
    """Make every expert's holder count C by successive shortest paths; X must be a best response at prices u.

    Nodes are the E experts and the dummy (index E, reduced profit 0 in the last row of ``r_ext``). The arc
    j -> i is the cheapest client that gives up j and takes i. In reduced terms a client that has not moved yet
    costs r_jc - r_ic >= r_jc - q_m1_c =: slack_jc >= 0, since i is no better than the best item it left. So row j
    is computed over its clients of smallest slack (and every client already moved), and the next smallest slack
    bounds the rest of the row from below. A path that leans on a bound is not trusted: those arcs are computed over
    every client and the search reruns, so every augmentation follows a true shortest path and the final X is
    optimal (the classic successive-shortest-path invariant: no negative cycle in the residual graph).
    """
    n, N = r_ext.shape
    E = n - 1
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
    slack = r_ext - q_m1[None, :]
    slack[units < 1] = np.inf
    size = min(N - 1, _CANDIDATES_PER_ROW)
    part = np.argpartition(slack, size, axis=1)
    cand = part[:, :size]
    bound = np.take_along_axis(slack, part[:, size : size + 1], axis=1)  # per row, as a column
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
        at_j = cand[j][~moved[cand[j]] & (units[j, cand[j]] >= 1)]
        base[j], base_pick[j] = np.inf, -1
        if at_j.size:
            cost = r_ext[j, at_j][None, :] - r_ext[:, at_j]
            cost[units[:, at_j] >= cap[:, None]] = np.inf
            cost[j] = np.inf
            at = cost.argmin(axis=1)
            base[j] = cost[nodes, at]
            base_pick[j] = np.where(np.isfinite(base[j]), at_j[at], -1)

    def arc(j: int, i: int) -> None:
        at_ji = np.flatnonzero((units[j] >= 1) & (units[i] < cap[i]) & ~moved)
        full[j, i], full_pick[j, i], known[j, i] = np.inf, -1, True
        if at_ji.size:
            cost = r_ext[j, at_ji] - r_ext[i, at_ji]
            at = int(cost.argmin())
            full[j, i], full_pick[j, i] = cost[at], at_ji[at]

    for j in range(n):
        row(j)
    tol = 64 * np.finfo(float).eps * float(np.abs(r_ext).max())
    rounds, limit = 0, (n * n + 10) * (int(np.abs(excess).sum()) + 10)
    while excess.any():
        unmoved = np.where(known, full, base)
        trusted = known | (unmoved <= bound)
        arcs = np.where(trusted, unmoved, bound)
        pick = np.where(known, full_pick, base_pick)
        mv = np.flatnonzero(moved)
        if mv.size:
            r_moved = r_ext[:, mv]
            cost = r_moved[:, None, :] - r_moved[None, :, :]
            cost[~((units[:, mv] >= 1)[:, None, :] & (units[:, mv] < cap[:, None])[None, :, :])] = np.inf
            cost[nodes, nodes] = np.inf
            at = cost.argmin(axis=2)
            via_moved = np.take_along_axis(cost, at[:, :, None], axis=2)[:, :, 0]
            use_moved = via_moved < arcs
            trusted |= use_moved  # below the bound on every unmoved client of the row
            arcs = np.where(use_moved, via_moved, arcs)
            pick = np.where(use_moved, mv[at], pick)
        rounds += 1
        if rounds > limit:
            raise RuntimeError("expert assignment: the exact finish did not converge (please report this instance)")
        path = _shortest_path(arcs + shift, excess, tol)
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


def _shortest_path(arcs: np.ndarray, excess: np.ndarray, tol: float) -> list[int] | None:
    """Cheapest path from an over-held node to an under-held one (Bellman-Ford), or a negative cycle if one shows up.

    Only improvements larger than ``tol`` count, so rounding-level cycles cannot loop. A returned cycle (first
    node == last) costs less than zero: the caller either cancels it or, when it leans on lower bounds, computes
    those arcs exactly. None means that no under-held node can be reached.
    """
    n = arcs.shape[0]
    dist = np.where(excess > 0, 0.0, np.inf)
    pred = np.full(n, -1)
    cols = np.arange(n)
    history: list[tuple[np.ndarray, np.ndarray]] = []
    for _ in range(n):
        cand = dist[:, None] + arcs
        via = cand.argmin(axis=0)
        best = cand[via, cols]
        better = best < dist - tol
        if not better.any():
            break
        history.append((better, via))
        dist = np.where(better, best, dist)
        pred = np.where(better, via, pred)
    else:
        # Still improving at pass n: the walk that improved a node has n arcs, so it repeats a node, and the stretch
        # between the repeats is a negative cycle. Rebuild that walk backwards from the passes' predecessors.
        walk = [int(np.flatnonzero(history[-1][0])[0])]
        for better, via in reversed(history):
            if better[walk[-1]]:
                walk.append(int(via[walk[-1]]))
        first: dict[int, int] = {}
        for pos, node in enumerate(walk):
            if node in first:
                return walk[first[node] : pos + 1][::-1]
            first[node] = pos
        raise RuntimeError("expert assignment: Bellman-Ford did not converge but found no cycle")
    sinks = np.flatnonzero(excess < 0)
    target = int(sinks[np.argmin(dist[sinks])])
    if not np.isfinite(dist[target]):
        return None
    path, seen = [target], {target}
    while pred[path[-1]] != -1:
        node = int(pred[path[-1]])
        if node in seen:  # a cycle among the predecessors is negative too
            return [*path[path.index(node) :], node][::-1]
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
    scale = float(scores.mean()) or 1.0  # all-zero scores: every assignment is optimal, any tie-break will do
    scores = scores + (TIE_BREAK * scale) * _tie_pattern(E, N)
    u, r_ext, S, q_m, q_m1 = _market_prices(scores, C, k, M, D)
    X = _best_response(r_ext[:E], S, k, M)
    return _balance(r_ext, u, X, q_m, q_m1, C, M, D)


def assign_experts_all(
    Ps: Sequence[np.ndarray], holders: int, min_experts: int, max_experts: int, workers: int = 1
) -> list[np.ndarray]:
    """:func:`assign_experts` for every module of a round (the modules are independent), in ``workers`` threads.

    One module takes about 5 ms at 1,000 clients and 30 ms at 10,000 (E=30), so a round of 24 modules fits the
    budget on one core, and that is the default. Threads overlap only the numpy-heavy half of the work (sorts,
    selections, O(E N) arithmetic release the GIL; the exact finish is many small calls that hold it): on an idle
    multi-core machine they can save up to about a third, but on a busy 2-core machine they measured slower than one
    thread. The result never depends on ``workers``.
    """
    workers = min(len(Ps), workers)
    if workers <= 1:
        return [assign_experts(P, holders, min_experts, max_experts) for P in Ps]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda P: assign_experts(P, holders, min_experts, max_experts), Ps))


def random_assignment(
    num_experts: int, num_clients: int, holders: int, min_experts: int, max_experts: int, rng: np.random.Generator
) -> np.ndarray:
    """A random feasible assignment for round 0, before any scores exist (bool E x N).

    Client degrees: every client gets ``k`` experts plus a uniform random choice, without replacement, of the
    ``E*C - k*N`` remaining places among all clients' ``M - k`` optional ones, so degrees stay near their mean.
    Then the experts, in random order, each pick ``C`` clients with probability proportional to the places those
    clients still have open (sequential importance sampling, close to uniform over graphs with these degrees),
    always taking the clients that need every remaining expert. With equal expert degrees that is all Gale-Ryser
    asks, so the construction never gets stuck and the constraints hold exactly.
    """
    check_feasible(num_experts, num_clients, holders, min_experts, max_experts)
    E, N, C, k = int(num_experts), int(num_clients), int(holders), int(min_experts)
    optional = min(int(max_experts), E) - k
    degree = np.full(N, k, dtype=np.int64)
    need = E * C - k * N
    if need:
        chosen = rng.choice(N * optional, size=need, replace=False)
        degree += np.bincount(chosen // optional, minlength=N)
    X = np.zeros((E, N), dtype=bool)
    for placed, expert in enumerate(rng.permutation(E)):
        with np.errstate(divide="ignore"):
            key = np.log(degree) + rng.gumbel(size=N)  # Gumbel top-C: weighted sampling without replacement
        key[degree == E - placed] = np.inf
        pick = np.argpartition(-key, C - 1)[:C]
        X[expert, pick] = True
        degree[pick] -= 1
    return X


def assignment_lp(P: np.ndarray, holders: int, min_experts: int, max_experts: int) -> tuple[np.ndarray, float]:
    """Reference optimum from the LP relaxation with scipy's HiGHS: (rounded X, LP objective on the given P).

    Scores about 1/N sit below HiGHS's default 1e-7 tolerances, so the LP is solved on ``P * N / mean row sum``
    (entries about 1) with feasibility tolerances of 1e-10: with the defaults it stopped up to 3e-10 relative short
    of the optimum on peaked scores. The relaxation of a bipartite b-matching is integral, so rounding the solution
    only removes solver noise. Seconds at 10,000 clients: a reference for tests and benchmarks, not for rounds.
    """
    scores = _scores(P)
    E, N = scores.shape
    check_feasible(E, N, holders, min_experts, max_experts)
    row_sum = float(scores.sum(axis=1).mean())
    scale = N / row_sum if row_sum > 0 else 1.0
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
        options={"primal_feasibility_tolerance": 1e-10, "dual_feasibility_tolerance": 1e-10},
    )
    if result.status != 0:
        raise RuntimeError(f"expert assignment LP failed: {result.message}")
    return result.x.reshape(E, N) > 0.5, float(-result.fun / scale) + 0.0
