"""How large the aggregated adapters grow, round by round: the shared expert against the domain experts (issue 23).

Runs one in-memory bench run (the setup of a bench config, e.g. ``benchmarks/sweep_20news.toml``) and, after every
aggregation, takes the Frobenius norm of each adapter's product ``B A`` in the aggregator's state: per target module,
the shared expert and every domain expert (FedAMoLE methods), or the one global adapter (single-model methods).
It prints a line per round and writes the JSON to ``--out``. This is the measurement behind docs/results.md's
finding that on 20 Newsgroups at alpha 0.01 the experts, each averaged over its few holders, grow to several times the
shared expert, which all devices average.

    python benchmarks/expert_norms.py --base benchmarks/sweep_20news.toml --method fedamole-a2 --rounds 4 \\
        --out docs/results/expert-norms-20news.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import torch

from aggregator.strategies import Strategy, strategy_class
from edgemole.adapters.lora.a2 import adapter_prefixes
from fleet import bench as B


def adapter_norms(state: dict[str, torch.Tensor]) -> dict[str, float]:
    """``||B A||_F`` of every adapter prefix in ``state`` (``<module>.shared``, ``<module>.expert.<id>``, or the
    module of a plain LoRA)."""
    return {p: float((state[f"{p}.lora_B"] @ state[f"{p}.lora_A"]).norm()) for p in adapter_prefixes(state)}


def summarise(norms: dict[str, float]) -> dict[str, Any]:
    """Medians over modules: the shared expert, the domain experts (every expert of every module), a plain LoRA."""
    shared = [v for p, v in norms.items() if p.endswith(".shared")]
    experts = [v for p, v in norms.items() if ".expert." in p and v > 0]  # never trained: B still zero
    plain = [v for p, v in norms.items() if not p.endswith(".shared") and ".expert." not in p]
    out: dict[str, Any] = {}
    for name, values in (("shared", shared), ("experts", experts), ("adapter", plain)):
        if values:
            out[f"{name}_median"] = statistics.median(values)
            out[f"{name}_max"] = max(values)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="bench config (TOML) whose setup the run uses")
    p.add_argument("--method", default="fedamole-a2")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--alpha", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", default="{}", help='settings over the base as JSON, e.g. \'{"train": {"lr": 0.01}}\'')
    p.add_argument("--out", required=True, help="JSON file to write")
    args = p.parse_args()

    data = tomllib.loads(Path(args.base).read_text())
    data.setdefault("fleet", {})["rounds"] = args.rounds
    for section, values in json.loads(args.set).items():
        data.setdefault(section, {}).update(values)
    grid = {**data.pop("bench", {}), "methods": [args.method], "alphas": [args.alpha], "seeds": [args.seed],
            "jobs": 1}
    bench = B.from_dict(B.BenchConfig, grid, "bench")
    bench.explicit = B.explicit_keys(data)
    spec = B.prepare_cells(B.plan_runs(B.from_dict(B.Settings, data, ""), bench), Path(tempfile.mkdtemp()))[0]

    rounds: list[dict[str, Any]] = []
    strategy = strategy_class(args.method)
    original = strategy.aggregate

    def measured(self: Strategy, rnd: int, plan: Any, updates: Any) -> dict[str, Any]:
        """The method's own aggregation, then the norms of what it produced."""
        result = original(self, rnd, plan, updates)
        norms = adapter_norms(self.state_dict())
        rounds.append({"round": rnd, "phase": plan.phase, **summarise(norms), "norms": norms})
        brief = {k: round(v, 3) for k, v in rounds[-1].items() if isinstance(v, float)}
        print(f"round {rnd} {plan.phase}: {brief}", flush=True)
        return result

    strategy.aggregate = measured  # type: ignore[method-assign]  # this process runs this one measurement only
    try:
        torch.set_num_threads(1)
        record = B.run_one(spec)
    finally:
        strategy.aggregate = original  # type: ignore[method-assign]
    result = {"base": args.base, "method": args.method, "alpha": args.alpha, "seed": args.seed, "set": args.set,
              "rounds": rounds, "personalised_accuracy": record["personalised_accuracy"],
              "received_accuracy": record["received_accuracy"], "trained_accuracy": record["trained_accuracy"],
              "accuracy_curve": record["accuracy_curve"]}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}: deployed {100 * record['personalised_accuracy']:.1f}%")


if __name__ == "__main__":
    main()
