"""Per-method defaults by sweep (issue 23): learning rate, B multiplier, local steps and fedamole-a2's options.

Each variant is a base bench config (``--base``, TOML) with some settings changed; it runs as its own
``edgemole bench`` into ``OUT/<variant>/`` (runs already there are skipped, so an interrupted sweep resumes), and
the sweep ends with one table over all variants: ``OUT/sweep.json`` (machines) and ``OUT/sweep.md`` (people).

    python benchmarks/sweep.py --base benchmarks/sweep_banking77.toml --out docs/results/sweep-banking77 \\
        --variants fedamole-a2:lr0.01-b1,fedamole-a2:lr0.02-b1 --seeds 0

``--list`` prints the variants. Variant names say what they change; every method's variants are in VARIANTS.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Any

from edgemole.defaults import METHOD_DEFAULTS

#: fedamole-a2's defaults (edgemole/defaults.py) as config sections: the sweep bases set every swept setting
#: explicitly, so a variant "the defaults plus one change" must write them out
FEDAMOLE_A2_DEFAULTS: dict[str, dict[str, Any]] = {}
for _key, _value in METHOD_DEFAULTS["fedamole-a2"].items():
    _section, _name = _key.split(".", 1)
    FEDAMOLE_A2_DEFAULTS.setdefault(_section, {})[_name] = _value


def _with(base: dict[str, dict[str, Any]], change: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``base`` with ``change`` merged in, section by section."""
    return {s: {**base.get(s, {}), **change.get(s, {})} for s in {*base, *change}}


#: method -> variant name -> settings changed from the base config ({section: {key: value}})
VARIANTS: dict[str, dict[str, dict[str, dict[str, Any]]]] = {
    "fedit": {**{f"lr{lr:g}": {"train": {"lr": lr}} for lr in (0.005, 0.01, 0.02, 0.04)},
              "lr0.01-steps16": {"train": {"lr": 0.01, "local_steps": 16}}},
    "flexlora": {f"lr{lr:g}": {"train": {"lr": lr}} for lr in (0.005, 0.01, 0.02)},
    "lora-a2": {
        **{f"lr{lr:g}-b1": {"train": {"lr": lr}, "a2": {"b_lr_multiplier": 1.0}} for lr in (0.005, 0.01, 0.02, 0.04)},
        "lr0.005-b5": {"train": {"lr": 0.005}, "a2": {"b_lr_multiplier": 5.0}},
        "lr0.01-b1-steps16": {"train": {"lr": 0.01, "local_steps": 16}, "a2": {"b_lr_multiplier": 1.0}},
    },
    "fedamole": {**{f"lr{lr:g}": {"train": {"lr": lr}} for lr in (0.0025, 0.005, 0.01)},
                 "lr0.005-steps16": {"train": {"lr": 0.005, "local_steps": 16}}},
    "fedamole-a2": {
        **{f"lr{lr:g}-b1": {"train": {"lr": lr}, "a2": {"b_lr_multiplier": 1.0}} for lr in (0.005, 0.01, 0.02)},
        "lr0.005-b5": {"train": {"lr": 0.005}, "a2": {"b_lr_multiplier": 5.0}},
        "lr0.01-b1-router": {"train": {"lr": 0.01}, "a2": {"b_lr_multiplier": 1.0, "router_every_round": True}},
        "lr0.01-b1-warm": {"train": {"lr": 0.01}, "a2": {"b_lr_multiplier": 1.0, "warm_start": True}},
        "lr0.01-b1-warm-router": {"train": {"lr": 0.01},
                                  "a2": {"b_lr_multiplier": 1.0, "warm_start": True, "router_every_round": True}},
        "lr0.01-b1-reassign2": {"train": {"lr": 0.01}, "a2": {"b_lr_multiplier": 1.0},
                                "amole": {"reassign_every": 2}},
        **{f"lr0.01-b1-reassign2-keep{bonus:g}": {"train": {"lr": 0.01}, "a2": {"b_lr_multiplier": 1.0},
                                                 "amole": {"reassign_every": 2, "keep_bonus": bonus}}
           for bonus in (1.0, 2.0, 3.0, 10.0)},
        "lr0.01-b1-k1": {"train": {"lr": 0.01}, "a2": {"b_lr_multiplier": 1.0}, "amole": {"top_k": 1}},
        # the chosen options (edgemole/defaults.py) at other rates: the rate is what 20 Newsgroups is sensitive to
        **{f"lr{lr:g}-b1-reassign2-keep1": {"train": {"lr": lr}, "a2": {"b_lr_multiplier": 1.0},
                                           "amole": {"reassign_every": 2, "keep_bonus": 1.0}}
           for lr in (0.0025, 0.005, 0.01)},
        "lr0.01-b1-steps16": {"train": {"lr": 0.01, "local_steps": 16}, "a2": {"b_lr_multiplier": 1.0}},
        # why the expert methods fine-tune worse on 20 Newsgroups (docs/results.md): the defaults plus one change
        "default-weighted": _with(FEDAMOLE_A2_DEFAULTS, {"amole": {"sample_weighted": True}}),
        # r_c x 12 modules >= every rank a device holds: no rank selection, alternation only
        "default-allranks": _with(FEDAMOLE_A2_DEFAULTS, {"bench": {"ranks": [28]}}),
        "default-lr0.02": _with(FEDAMOLE_A2_DEFAULTS, {"train": {"lr": 0.02}}),
        "default-steps16": _with(FEDAMOLE_A2_DEFAULTS, {"train": {"local_steps": 16}}),
        # every device holds every expert (E = M = 4, C = 10 devices): no personal expert sets, all else the same
        "default-allhold": _with(FEDAMOLE_A2_DEFAULTS, {"amole": {"experts": 4, "slots": 4, "holders": 10}}),
    },
}


def variant_config(base: dict[str, Any], method: str, name: str, out: Path, seeds: list[int],
                   alphas: list[float] | None) -> dict[str, Any]:
    """The bench config of one variant: the base with the variant's changes, one method, its own folder."""
    config = json.loads(json.dumps(base))
    for section, values in VARIANTS[method][name].items():
        config.setdefault(section, {}).update(values)
    bench = config.setdefault("bench", {})
    bench.update(methods=[method], seeds=seeds, out=str(out / f"{method}-{name}"))
    if alphas:
        bench["alphas"] = alphas
    return config


def run_variant(config: dict[str, Any]) -> list[dict[str, Any]]:
    """One ``edgemole bench`` over the variant's config (a JSON file, since bench reads JSON as well as TOML)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(config, f)
    try:
        subprocess.run([sys.executable, "-m", "fleet", "bench", "--config", f.name], check=True)
    finally:
        Path(f.name).unlink()
    results = Path(config["bench"]["out"]) / "results.json"
    return json.loads(results.read_text())["runs"] if results.exists() else []


def _mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "-"
    mean = 100 * statistics.fmean(values)
    return f"{mean:.1f} ± {100 * statistics.pstdev(values):.1f}" if len(values) > 1 else f"{mean:.1f}"


def summarise(out: Path) -> list[dict[str, Any]]:
    """One row per (variant, alpha) over the variant folders in ``out``: accuracies (mean ± std over seeds)."""
    rows = []
    for results in sorted(out.glob("*/results.json")):
        runs = json.loads(results.read_text())["runs"]
        by_alpha: dict[float, list[dict[str, Any]]] = {}
        for r in runs:
            by_alpha.setdefault(r["alpha"], []).append(r)
        for alpha, group in sorted(by_alpha.items()):
            rows.append({
                "variant": results.parent.name,
                "alpha": alpha,
                "seeds": sorted(r["seed"] for r in group),
                "personalised": [r["personalised_accuracy"] for r in group],
                "received": [r.get("received_accuracy", r["service"].get("final_received_accuracy")) for r in group],
                "trained": [r.get("trained_accuracy", r["service"].get("final_trained_accuracy")) for r in group],
                "global": [r["global_accuracy"] for r in group],
                "mib_up": statistics.fmean(r["bytes_up"] for r in group) / 2**20,
                "mib_down": statistics.fmean(r["bytes_down"] for r in group) / 2**20,
            })
    (out / "sweep.json").write_text(json.dumps(rows, indent=1))
    lines = ["| variant | alpha | seeds | personalised (deployed) % | received % | trained % | global % | MiB up | "
             "MiB down |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['alpha']:g} | {','.join(map(str, r['seeds']))} | {_mean_std(r['personalised'])} "
              f"| {_mean_std(r['received'])} | {_mean_std(r['trained'])} | {_mean_std(r['global'])} | "
              f"{r['mib_up']:.1f} | {r['mib_down']:.1f} |" for r in rows]
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", help="base bench config (TOML)")
    p.add_argument("--out", help="folder of the sweep (one sub-folder per variant)")
    p.add_argument("--variants", default="", help="method:variant,... (default: every variant of every method)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds")
    p.add_argument("--alphas", default="", help="comma-separated Dirichlet alphas (default: the base config's)")
    p.add_argument("--list", action="store_true", help="print the variants and exit")
    p.add_argument("--summary-only", action="store_true", help="rewrite sweep.json/sweep.md from what is in --out")
    args = p.parse_args()
    if args.list:
        for method, variants in VARIANTS.items():
            for name, change in variants.items():
                print(f"{method}:{name}  {json.dumps(change)}")
        return 0
    if not args.out or (not args.summary_only and not args.base):
        p.error("--base and --out are required (--out only with --summary-only)")
    out = Path(args.out)
    if not args.summary_only:
        base = tomllib.loads(Path(args.base).read_text())
        chosen = [v.split(":", 1) for v in args.variants.split(",") if v] or [
            [m, n] for m, vs in VARIANTS.items() for n in vs]
        for method, name in chosen:
            if name not in VARIANTS.get(method, {}):
                p.error(f"unknown variant {method}:{name} (see --list)")
        seeds = [int(s) for s in args.seeds.split(",")]
        alphas = [float(a) for a in args.alphas.split(",") if a] or None
        for method, name in chosen:
            print(f"== {method}:{name}", flush=True)
            run_variant(variant_config(base, method, name, out, seeds, alphas))
    for row in summarise(out):
        print(f"{row['variant']:>32} a{row['alpha']:g}: personalised {_mean_std(row['personalised'])}, "
              f"received {_mean_std(row['received'])}, trained {_mean_std(row['trained'])}, "
              f"global {_mean_std(row['global'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
