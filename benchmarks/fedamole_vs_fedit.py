"""Personalised accuracy of fedamole against fedit under heterogeneity (issue 3's comparison).

Each cell is a real ``edgemole simulate`` run (embedded broker, one process per client, default MiniLM) with
the same model, rounds, local steps and seeds for both methods. Raw per-run results are appended to a JSON file;
runs already in it are skipped, so the grid can be extended later. Prints and writes a markdown table.

    python benchmarks/fedamole_vs_fedit.py                       # the full grid (about 40 min on 2 cores)
    python benchmarks/fedamole_vs_fedit.py --seeds 0 --grids synthetic
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
from pathlib import Path

from rich.console import Console
from rich.progress import Progress

from edgemole.config import load_settings
from fleet.simulate import simulate

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
GRIDS = {
    "synthetic": {"dataset": "synthetic", "partition": "column:domain"},
    "banking77-a0.1": {"dataset": str(DATASETS / "banking77"), "partition": "dirichlet:0.1"},
    "banking77-a0.01": {"dataset": str(DATASETS / "banking77"), "partition": "dirichlet:0.01"},
}
COMMON = {"clients": 6, "rounds": 5, "local_steps": 10}


def run_one(grid: str, method: str, seed: int) -> dict:
    settings = load_settings(None, {
        "fleet": {"method": method, "rounds": COMMON["rounds"], "seed": seed},
        "simulate": {"clients": COMMON["clients"]},
        "train": {"local_steps": COMMON["local_steps"]},
        "data": GRIDS[grid],
    })
    quiet = Console(file=open(os.devnull, "w"))  # noqa: SIM115
    r = simulate(settings, console=quiet)
    final = r["final"]
    return {
        "grid": grid, "method": method, "seed": seed,
        "personalised_accuracy": final["accuracy_before"],
        "personalised_accuracy_std_over_clients": final["accuracy_before_std"],
        "accuracy_curve": r["accuracy_curve"],
        "per_client": {c: m["acc_before"] for c, m in final["clients"].items()},
        "bytes_up": r["bytes_up_total"], "bytes_down": r["bytes_down_total"], "wall_s": r["wall_s"],
        "distinct_architectures": final.get("distinct_architectures"),
        "partition": r["data"]["partition"], "clients": r["data"]["clients"],
    }


def table(results: list[dict]) -> str:
    rows = ["| data, partition | method | personalised acc (mean ± std over seeds) | spread over clients | "
            "MB up | MB down | seeds |", "|---|---|---|---|---|---|---|"]
    for grid in GRIDS:
        for method in ("fedit", "fedamole"):
            cell = [r for r in results if r["grid"] == grid and r["method"] == method]
            if not cell:
                continue
            accs = [r["personalised_accuracy"] for r in cell]
            std = statistics.stdev(accs) if len(accs) > 1 else 0.0
            spread = statistics.fmean(r["personalised_accuracy_std_over_clients"] for r in cell)
            rows.append(f"| {grid} | {method} | {100 * statistics.fmean(accs):.1f} ± {100 * std:.1f} | "
                        f"{100 * spread:.1f} | {statistics.fmean(r['bytes_up'] for r in cell) / 1e6:.1f} | "
                        f"{statistics.fmean(r['bytes_down'] for r in cell) / 1e6:.1f} | {len(cell)} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--grids", nargs="+", default=list(GRIDS), choices=list(GRIDS))
    parser.add_argument("--methods", nargs="+", default=["fedit", "fedamole"])
    parser.add_argument("--results", default=str(Path(__file__).resolve().parents[1] / "docs" / "results"
                                                  / "fedamole_vs_fedit.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    for noisy in ("torchao", "torch.utils._pytree"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    path = Path(args.results)
    results = json.loads(path.read_text()) if path.exists() else []
    done = {(r["grid"], r["method"], r["seed"]) for r in results}
    todo = [(g, m, s) for s in args.seeds for g in args.grids for m in args.methods if (g, m, s) not in done]
    console = Console()
    with Progress(console=console) as progress:
        task = progress.add_task("runs", total=len(todo))
        for grid, method, seed in todo:
            progress.update(task, description=f"{grid} {method} seed {seed}")
            results.append(run_one(grid, method, seed))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(results, indent=1))
            last = results[-1]
            progress.console.print(f"{grid} {method} seed {seed}: {100 * last['personalised_accuracy']:.1f}% "
                                   f"({last['wall_s']:.0f} s)")
            progress.advance(task)
    console.print(table(results))


if __name__ == "__main__":
    main()
