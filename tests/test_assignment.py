"""RSEA expert assignment: exact optimality (brute force, HiGHS LP, a negative-cycle certificate), constraints,
infeasible settings and the random round-0 assignment."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from aggregator.assignment import (
    TIE_BREAK,
    _shortest_path,
    assign_experts,
    assign_experts_all,
    assignment_lp,
    assignment_objective,
    check_feasible,
    random_assignment,
)
from edgemole.errors import ConfigError


def rsea_scores(num_experts: int, num_clients: int, rng: np.random.Generator, rank: int = 8) -> np.ndarray:
    """Like RSEA: P_i = softmax over clients of <e_i, t_c> / sqrt(r)."""
    s = rng.standard_normal((num_experts, rank)) @ rng.standard_normal((rank, num_clients)) / np.sqrt(rank)
    p = np.exp(s - s.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


def assert_feasible(X: np.ndarray, holders: int, k: int, m: int) -> None:
    assert X.dtype == bool
    assert (X.sum(axis=1) == holders).all(), "every expert needs exactly C holders"
    per_client = X.sum(axis=0)
    assert per_client.min() >= k and per_client.max() <= m, "every client needs between k and M experts"


def has_improving_cycle(P: np.ndarray, X: np.ndarray, k: int, m: int) -> bool:
    """Whether some cycle of single-client moves gains more than the documented tolerance allows per move.

    Independent of the solver: nodes are the experts plus a "slot" node; the arc j -> i is the cheapest client that
    drops j and takes i, j -> slot a client above k that drops j, slot -> i a client below M that takes i (costs =
    profit lost). X is optimal iff this residual graph has no negative cycle. The solver is exact for scores
    perturbed by less than TIE_BREAK * mean(P) each, so every arc may look cheaper by twice that (plus rounding):
    that slack is added to every arc before Floyd-Warshall looks for a negative cycle.
    """
    E, N = P.shape
    per_client = X.sum(axis=0)
    arcs = np.full((E + 1, E + 1), np.inf)
    for j in range(E):
        cols = np.flatnonzero(X[j])
        if cols.size:
            swap = P[j, cols][None, :] - P[:, cols]
            swap[X[:, cols]] = np.inf
            arcs[j, :E] = swap.min(axis=1)
        can_drop = X[j] & (per_client > k)
        if can_drop.any():
            arcs[j, E] = P[j, can_drop].min()
        can_take = ~X[j] & (per_client < m)
        if can_take.any():
            arcs[E, j] = -P[j, can_take].max()
    dist = arcs + (2 * TIE_BREAK * float(P.mean()) + 1e-14 * float(P.max()))
    for mid in range(E + 1):
        dist = np.minimum(dist, dist[:, mid : mid + 1] + dist[mid : mid + 1, :])
    return bool(np.diag(dist).min() < 0)


def brute_force_optimum(P: np.ndarray, holders: int, k: int, m: int) -> float:
    """Best objective over every feasible X (each expert's row is one C-subset of the clients)."""
    E, N = P.shape
    rows = np.array([[c in subset for c in range(N)] for subset in itertools.combinations(range(N), holders)])
    choice = np.array(list(itertools.product(range(len(rows)), repeat=E)))
    X = rows[choice]  # (candidates, E, N)
    per_client = X.sum(axis=1)
    ok = ((per_client >= k) & (per_client <= m)).all(axis=1)
    assert ok.any()
    return float((X[ok] * P).sum(axis=(1, 2)).max())


SMALL = [(3, 4, 2, 1, 2), (3, 4, 2, 1, 3), (3, 5, 2, 1, 2), (3, 4, 4, 3, 3), (3, 4, 3, 2, 3), (4, 6, 3, 1, 3),
         (4, 6, 3, 2, 2), (4, 5, 2, 1, 4), (4, 5, 4, 3, 4)]  # fmt: skip


@pytest.mark.parametrize(("E", "N", "C", "k", "m"), SMALL)
def test_matches_brute_force_on_small_instances(E: int, N: int, C: int, k: int, m: int) -> None:
    rng = np.random.default_rng(E * 1000 + N * 100 + C * 10 + k + m)
    instances = [rng.random((E, N)) for _ in range(4)]
    instances.append(rsea_scores(E, N, rng))
    instances.append(np.repeat(rng.random((1, N)), E, axis=0))  # identical rows: ties everywhere
    instances.append(rng.integers(0, 3, size=(E, N)).astype(float))  # coarse values: many ties
    instances.append(np.zeros((E, N)))
    for P in instances:
        X = assign_experts(P, C, k, m)
        assert_feasible(X, C, k, m)
        best = brute_force_optimum(P, C, k, m)
        assert assignment_objective(P, X) == pytest.approx(best, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("N", [200, 500])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_lp_on_medium_rsea_instances(N: int, seed: int) -> None:
    E, k, m = 30, 2, 8
    C = 6 * N // E
    P = rsea_scores(E, N, np.random.default_rng(seed))
    X = assign_experts(P, C, k, m)
    assert_feasible(X, C, k, m)
    X_lp, lp_value = assignment_lp(P, C, k, m)
    assert_feasible(X_lp, C, k, m)
    ours = assignment_objective(P, X)
    assert abs(ours - lp_value) <= 1e-9 * lp_value
    assert not has_improving_cycle(P, X, k, m)


def _adversarial(rng: np.random.Generator, N: int) -> list[tuple[str, np.ndarray, int, int, int]]:
    E = 30
    p = rsea_scores(E, N, rng)
    sharp = rsea_scores(E, N, rng) ** 8
    spike = np.zeros((E, N))
    spike[:, :3] = rng.random((E, 3))
    return [
        ("uniform", np.full((E, N), 1.0 / N), 6 * N // E, 2, 8),
        ("identical rows", np.repeat(rsea_scores(1, N, rng), E, axis=0), 6 * N // E, 2, 8),
        ("rounded to 1/(2N)", np.round(p * 2 * N) / (2 * N), 6 * N // E, 2, 8),
        ("concentrated", sharp / sharp.sum(axis=1, keepdims=True), 6 * N // E, 2, 8),
        ("three clients only", spike, 6 * N // E, 2, 8),
        ("k = M", p, 6 * N // E, 6, 6),
        ("C = N", p, N, E, E),
        ("E*C = k*N", p, -(-2 * N // E), 2, 8),
        ("E*C = M*N", p, 8 * N // E, 2, 8),
        ("M > E", p, N // 2, 1, 40),
        ("C = N - 1", p, N - 1, 20, 30),
    ]


ADVERSARIAL = _adversarial(np.random.default_rng(7), 300)


@pytest.mark.parametrize(("name", "P", "C", "k", "m"), ADVERSARIAL, ids=[case[0] for case in ADVERSARIAL])
def test_matches_lp_on_adversarial_instances(name: str, P: np.ndarray, C: int, k: int, m: int) -> None:
    X = assign_experts(P, C, k, m)
    assert_feasible(X, C, k, min(m, P.shape[0]))
    _, lp_value = assignment_lp(P, C, k, m)
    assert assignment_objective(P, X) == pytest.approx(lp_value, rel=1e-9, abs=1e-12), name
    assert not has_improving_cycle(P, X, k, m), name


@pytest.mark.parametrize(("C", "k", "m"), [(1000, 2, 8), (1000, 6, 6), (500, 1, 30)])
def test_large_instances_are_feasible_and_certified_optimal(C: int, k: int, m: int) -> None:
    E, N = 30, 5000
    P = rsea_scores(E, N, np.random.default_rng(C + k))
    X = assign_experts(P, C, k, m)
    assert_feasible(X, C, k, m)
    assert not has_improving_cycle(P, X, k, m)
    baseline = random_assignment(E, N, C, k, m, np.random.default_rng(0))
    assert has_improving_cycle(P, baseline, k, m)  # the certificate does catch a suboptimal assignment
    assert assignment_objective(P, X) > assignment_objective(P, baseline)


def test_shortest_path_finds_paths_and_negative_cycles() -> None:
    inf = np.inf
    arcs = np.array([[inf, 1.0, 5.0], [inf, inf, 1.0], [inf, inf, inf]])
    assert _shortest_path(arcs, np.array([1, 0, -1]), 0.0) == [0, 1, 2]
    assert _shortest_path(arcs, np.array([-1, 0, 1]), 0.0) is None  # nothing leads back to node 0
    arcs[1, 0] = -2.0  # 0 -> 1 -> 0 now costs -1
    cycle = _shortest_path(arcs, np.array([1, 0, -1]), 0.0)
    assert cycle is not None and cycle[0] == cycle[-1]
    assert sum(arcs[a, b] for a, b in zip(cycle[:-1], cycle[1:], strict=True)) < 0


def test_result_is_deterministic_and_independent_of_input_layout() -> None:
    P = rsea_scores(30, 400, np.random.default_rng(3))
    X = assign_experts(P, 80, 2, 8)
    assert np.array_equal(X, assign_experts(P, 80, 2, 8))
    assert np.array_equal(X, assign_experts(np.asfortranarray(P), 80, 2, 8))
    assert_feasible(assign_experts(P.astype(np.float32), 80, 2, 8), 80, 2, 8)


@pytest.mark.parametrize("workers", [1, 2])
def test_all_modules_equal_one_by_one(workers: int) -> None:
    rng = np.random.default_rng(11)
    Ps = [rsea_scores(30, 300, rng) for _ in range(5)]
    got = assign_experts_all(Ps, 60, 2, 8, workers=workers)
    assert len(got) == len(Ps)
    for P, X in zip(Ps, got, strict=True):
        assert np.array_equal(X, assign_experts(P, 60, 2, 8))
    assert assign_experts_all([], 60, 2, 8) == []


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ((30, 100, 5, 2, 8), "k*N = 2*100 = 200 > E*C = 30*5 = 150"),
        ((30, 100, 30, 2, 8), "E*C = 30*30 = 900 > M*N = 8*100 = 800"),
        ((3, 4, 5, 1, 3), "C=5 exceeds the number of clients N=4"),
        ((30, 100, 20, 9, 8), "k=9 exceeds max experts per client M=8"),
        ((0, 100, 20, 2, 8), "experts must be at least 1, got 0"),
        ((30, 100, -1, 2, 8), "holders per expert must be at least 1, got -1"),
        ((30, 100, 20, 0, 8), "min experts per client must be at least 1, got 0"),
        ((30, 0, 20, 2, 8), "clients must be at least 1, got 0"),
        ((30, 100, 20.0, 2, 8), "holders per expert must be an integer"),
        ((30, 100, True, 2, 8), "must be an integer"),
    ],
)
def test_infeasible_settings_are_rejected_clearly(args: tuple, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        check_feasible(*args)
    message = str(err.value)
    assert fragment in message and "\n" not in message
    E, N = args[0], args[1]
    if isinstance(E, int) and isinstance(N, int) and E > 0 and N > 0:
        with pytest.raises(ConfigError):
            assign_experts(np.full((E, N), 1.0 / N), *args[2:])
        with pytest.raises(ConfigError):
            random_assignment(*args, rng=np.random.default_rng(0))


def test_feasible_boundaries_are_accepted() -> None:
    check_feasible(30, 100, 20, 6, 6)  # E*C = k*N = M*N
    check_feasible(3, 4, 4, 3, 3)  # C = N
    check_feasible(np.int64(30), 100, np.int32(20), 2, 8)


@pytest.mark.parametrize(
    ("P", "fragment"),
    [
        (np.array([[0.5, np.nan], [0.2, 0.3]]), "NaN"),
        (np.array([[0.5, np.inf], [0.2, 0.3]]), "NaN or infinity"),
        (np.array([[0.5, -0.1], [0.2, 0.3]]), "non-negative"),
        (np.array([0.5, 0.5]), "2-D"),
        (np.zeros((2, 0)), "non-empty"),
        (np.zeros((2, 2, 2)), "2-D"),
        (np.array([["a", "b"], ["c", "d"]]), "real numbers"),
    ],
)
def test_bad_scores_are_rejected(P: np.ndarray, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        assign_experts(P, 1, 1, 2)
    with pytest.raises(ValueError, match=fragment):
        assignment_lp(P, 1, 1, 2)


def test_random_assignment_is_always_feasible() -> None:
    rng = np.random.default_rng(5)
    checked = 0
    while checked < 300:
        E, N = int(rng.integers(1, 12)), int(rng.integers(1, 40))
        k = int(rng.integers(1, E + 1))
        m = int(rng.integers(k, E + 4))
        C = int(rng.integers(1, N + 1))
        try:
            check_feasible(E, N, C, k, m)
        except ConfigError:
            continue
        X = random_assignment(E, N, C, k, m, rng)
        assert X.shape == (E, N)
        assert_feasible(X, C, k, min(m, E))
        checked += 1
    X = random_assignment(30, 10000, 2000, 2, 8, rng)
    assert_feasible(X, 2000, 2, 8)


def test_random_assignment_is_random() -> None:
    E, N, C, k, m = 6, 12, 5, 1, 4
    draws = [random_assignment(E, N, C, k, m, np.random.default_rng(seed)) for seed in range(400)]
    assert np.array_equal(draws[0], random_assignment(E, N, C, k, m, np.random.default_rng(0)))
    assert len({d.tobytes() for d in draws}) > 390  # seeds give different assignments
    frequency = np.mean(draws, axis=0)
    assert np.abs(frequency - C / N).max() < 0.12  # no expert-client pair is favoured
    degrees = np.array([d.sum(axis=0) for d in draws])
    assert set(np.unique(degrees)) >= {3, 4}  # client degrees vary (mean E*C/N = 2.5, capped at M = 4)
    assert np.bincount(degrees.ravel()).argmax() in (2, 3)


def test_feasible_holders_adapts_c_to_the_fleet_size_or_says_why_not() -> None:
    from aggregator.assignment import feasible_holders

    assert feasible_holders(8, 4, 2, 2, 4) == 2  # as configured
    assert feasible_holders(8, 10, 0, 2, 4) == 3  # auto: the smallest C giving every device k experts
    assert feasible_holders(8, 4, 0, 2, 4) == 1 and feasible_holders(30, 100, 0, 2, 8) == 7
    assert feasible_holders(8, 10, 2, 2, 4) == 3  # k*N = 20 > E*C = 16: raised to the smallest feasible C
    assert feasible_holders(8, 2, 2, 2, 4) == 1  # E*C = 16 > M*N = 8: lowered
    for n in range(2, 17):
        c = feasible_holders(8, n, 2, 2, 4)
        check_feasible(8, n, c, 2, 4)
    with pytest.raises(ConfigError, match="need N >= E/M"):
        feasible_holders(8, 1, 2, 2, 4)
