"""How fast RSEA's expert assignment is at fleet scale, and whether it is exactly optimal.

For each number of clients N: E=30 experts, 24 modules, C = 6N/E holders per expert, k=2 and M=8 experts per
client, and scores built like RSEA's (P_i = softmax over clients of <e_i, t_c>/sqrt(r), random r=8 vectors). Times
``assign_experts_all`` over the 24 modules (median of the repeats; one thread, the default, and two), then,
for one module, scipy's HiGHS LP (``assignment_lp``) and, when importable, OR-tools' ``SimpleMinCostFlow`` with
integer costs. Every module's objective is checked against the LP's, and the constraints exactly.

    python benchmarks/assignment_scale.py                      # N = 1000 and 10000, LP check on all 24 modules
    python benchmarks/assignment_scale.py --lp-check 1 --json-out assignment.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np
from rich.console import Console
from rich.table import Table

from aggregator.assignment import TIE_BREAK, assign_experts, assign_experts_all, assignment_lp, assignment_objective

E, MODULES, K, M, RANK = 30, 24, 2, 8, 8


def rsea_scores(num_clients: int, rng: np.random.Generator) -> np.ndarray:
    """One module's P: softmax over clients of <e_i, t_c> / sqrt(r)."""
    s = rng.standard_normal((E, RANK)) @ rng.standard_normal((RANK, num_clients)) / np.sqrt(RANK)
    p = np.exp(s - s.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


def feasible(X: np.ndarray, holders: int) -> bool:
    per_client = X.sum(axis=0)
    return bool((X.sum(axis=1) == holders).all() and per_client.min() >= K and per_client.max() <= M)


def ortools_assignment(P: np.ndarray, holders: int) -> np.ndarray | None:
    """The same problem as an OR-tools min-cost flow with integer costs (None when ortools is not installed).

    Costs are -round(P * 2^40 / max P): the rounding moves the objective by at most E*C/2 units of 2^-40 max P,
    far below the gaps between distinct assignments of random scores, and the check against the LP confirms it.
    """
    try:
        from ortools.graph.python import min_cost_flow
    except ImportError:
        return None
    n = P.shape[1]
    scale = 2.0**40 / float(P.max())
    flow = min_cost_flow.SimpleMinCostFlow()
    experts = np.repeat(np.arange(E), n)
    clients = E + np.tile(np.arange(n), E)
    pair_arcs = flow.add_arcs_with_capacity_and_unit_cost(
        experts, clients, np.ones(E * n, dtype=np.int64), -np.rint(P.ravel() * scale).astype(np.int64)
    )
    sink = E + n
    flow.add_arcs_with_capacity_and_unit_cost(
        E + np.arange(n), np.full(n, sink), np.full(n, M - K, dtype=np.int64), np.zeros(n, dtype=np.int64)
    )
    supplies = np.concatenate([np.full(E, holders), np.full(n, -K), [-(E * holders - K * n)]]).astype(np.int64)
    flow.set_nodes_supplies(np.arange(E + n + 1), supplies)
    if flow.solve() != flow.OPTIMAL:
        raise RuntimeError("OR-tools min-cost flow did not reach an optimum")
    return flow.flows(pair_arcs).reshape(E, n) > 0


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Median wall time of ``repeats`` calls, and the last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def bench(num_clients: int, repeats: int, lp_check: int, seed: int) -> dict[str, object]:
    holders = 6 * num_clients // E
    rng = np.random.default_rng(seed)
    Ps = [rsea_scores(num_clients, rng) for _ in range(MODULES)]
    assign_experts(Ps[0], holders, K, M)  # warm caches (tie-break pattern, imports)
    serial_s, Xs = timed(lambda: assign_experts_all(Ps, holders, K, M), repeats)
    threads_s, threaded = timed(lambda: assign_experts_all(Ps, holders, K, M, workers=2), repeats)
    per_module = []
    for P in Ps:
        start = time.perf_counter()
        assign_experts(P, holders, K, M)
        per_module.append(time.perf_counter() - start)
    assert isinstance(Xs, list) and isinstance(threaded, list)
    gaps, lp_times = [], []
    for P, X, X2 in zip(Ps[:lp_check], Xs, threaded, strict=False):
        start = time.perf_counter()
        _, lp_value = assignment_lp(P, holders, K, M)
        lp_times.append(time.perf_counter() - start)
        gaps.append((lp_value - assignment_objective(P, X)) / lp_value)
        assert np.array_equal(X, X2), "threaded and serial runs disagree"
    if not lp_times:
        start = time.perf_counter()
        assignment_lp(Ps[0], holders, K, M)
        lp_times.append(time.perf_counter() - start)
    start = time.perf_counter()
    X_or = ortools_assignment(Ps[0], holders)
    ortools_s = time.perf_counter() - start if X_or is not None else None
    return {
        "clients": num_clients,
        "holders": holders,
        "all_modules_s": serial_s,
        "all_modules_2_threads_s": threads_s,
        "module_median_ms": 1e3 * statistics.median(per_module),
        "module_max_ms": 1e3 * max(per_module),
        "lp_one_module_s": lp_times[0],
        "ortools_one_module_s": ortools_s,
        "ortools_rel_gap_to_ours": None if X_or is None else _gap(Ps[0], X_or, Xs[0]),
        "lp_checked_modules": len(gaps),
        "max_rel_gap_to_lp": max(gaps) if gaps else None,
        "min_rel_gap_to_lp": min(gaps) if gaps else None,
        "all_feasible": all(feasible(X, holders) for X in Xs) and (X_or is None or feasible(X_or, holders)),
    }


def _gap(P: np.ndarray, other: np.ndarray, ours: np.ndarray) -> float:
    """Relative objective difference of another solver's X to ours (positive: ours is better)."""
    mine = assignment_objective(P, ours)
    return (mine - assignment_objective(P, other)) / mine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1000,10000", help="comma-separated numbers of clients")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lp-check", type=int, default=MODULES, help="modules per N checked against the LP")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-out")
    args = parser.parse_args()
    rows = [bench(int(n), args.repeats, args.lp_check, args.seed) for n in args.clients.split(",")]

    table = Table(title=f"RSEA assignment: E={E}, {MODULES} modules, C=6N/E, k={K}, M={M} (median of {args.repeats})")
    for col in ("N", "24 modules", "24, 2 threads", "per module (med/max)", "HiGHS LP, 1 module", "OR-tools, 1 module",
                "gap to LP (modules)", "feasible"):  # fmt: skip
        table.add_column(col, justify="right")
    for r in rows:
        ort = "not installed"
        if r["ortools_one_module_s"] is not None:
            ort = f"{r['ortools_one_module_s']:.2f} s (gap {r['ortools_rel_gap_to_ours']:.0e})"
        gap = "unchecked"
        if r["max_rel_gap_to_lp"] is not None:
            gap = f"{r['min_rel_gap_to_lp']:.0e} .. {r['max_rel_gap_to_lp']:.0e} ({r['lp_checked_modules']})"
        table.add_row(
            str(r["clients"]),
            f"{r['all_modules_s']:.3f} s",
            f"{r['all_modules_2_threads_s']:.3f} s",
            f"{r['module_median_ms']:.1f} / {r['module_max_ms']:.1f} ms",
            f"{r['lp_one_module_s']:.2f} s",
            ort,
            gap,
            "yes" if r["all_feasible"] else "NO",
        )
    console = Console(width=160)
    console.print(table)
    console.print(
        f"gap to LP = (LP - ours) / LP on the float scores, min .. max over the checked modules; the documented "
        f"tolerance is {TIE_BREAK:g}. "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, numpy {np.__version__}."
    )
    if args.json_out:
        meta = {"experts": E, "modules": MODULES, "k": K, "M": M, "repeats": args.repeats, "seed": args.seed,
                "cpus": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__}  # fmt: skip
        with open(args.json_out, "w", encoding="utf-8") as fh:
            json.dump({"meta": meta, "results": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
