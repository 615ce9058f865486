"""Tables and plots of ``edgemole bench`` runs: one row per run, mean ± std over seeds per method x rank x partition
(a Dirichlet alpha, or another partition such as ``column:domain``).

Everything is derived from the run records of ``results.json``, so the files can always be rewritten from all runs
(including those of earlier sessions). Runs are only summarised together when their setup (every setting but the
grid's method, rank, partition and seed) is the same. Byte figures are in binary units (1 MiB = 2^20 bytes).
"""

from __future__ import annotations

import csv
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from aggregator.service import deployed_accuracy
from edgemole.config import A2_METHODS, EXPERT_METHODS
from fleet.simulate import rejected_text
from fleet.units import fmt_bytes

RUN_COLUMNS = ("key", "setup", "method", "rank", "lora_r", "alpha", "partition", "seed", "dataset", "clients",
               "rounds", "local_steps", "personalised_accuracy", "personalised_accuracy_std",
               "personalised_accuracy_by_example", "received_accuracy",
               "trained_accuracy", "global_accuracy", "global_accuracy_std", "params_up", "params_down", "bytes_up",
               "bytes_down", "ranks_uploaded_mean", "ranks_held_mean", "rejected", "wall_s", "finished_at")
#: per-run figures summarised over seeds, as (name in the summary, key in the run record); the received and
#: trained accuracies and the rank figures are absent from older records (and for most methods)
METRICS = (("personalised_acc", "personalised_accuracy"), ("by_example_acc", "personalised_accuracy_by_example"),
           ("received_acc", "received_accuracy"),
           ("trained_acc", "trained_accuracy"), ("global_acc", "global_accuracy"), ("params_up", "params_up"),
           ("bytes_up", "bytes_up"), ("bytes_down", "bytes_down"), ("ranks_up", "ranks_uploaded_mean"),
           ("ranks_held", "ranks_held_mean"), ("wall_s", "wall_s"))
GROUP = ("setup", "dataset", "method", "rank", "lora_r", "partition", "alpha")


def run_partition(run: dict[str, Any]) -> str:
    """A run's partition (records from before partitions other than Dirichlet have it in their config only)."""
    return run.get("partition") or run["config"]["data"]["partition"]


def by_example_accuracy(run: dict[str, Any]) -> float | None:
    """The deployed models' accuracy over all test examples of the fleet (each client weighted by its test split),
    beside the per-client mean: a client with one or two test rows can move that mean by 1/clients, this figure only
    by its share of the fleet's test rows.
    Derived from the final round's per-client metrics, so older records have it too (None where they lack them)."""
    clients = run.get("service", {}).get("final", {}).get("clients", {}).values()
    pairs = [(deployed_accuracy(m), m["num_test"]) for m in clients
             if "acc_before" in m and m.get("num_test")]
    total = sum(n for _, n in pairs)
    return sum(acc * n for acc, n in pairs) / total if total else None


def with_derived(run: dict[str, Any]) -> dict[str, Any]:
    """The run record with the figures that are derived from it (see :func:`by_example_accuracy`)."""
    return {**run, "personalised_accuracy_by_example": by_example_accuracy(run)}


def _order(alpha: float | None, partition: str) -> tuple:
    """Dirichlet partitions by alpha, large (mild skew) first, then the others by name."""
    return (alpha is None, -(alpha or 0.0), partition)


def _mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation over seeds (None for a single seed: no spread is known)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def summarize(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (setup, method, rank, alpha) with mean and std over seeds; ordered by setup, alpha (large
    first), method (as first run) and rank (large first), whatever order parallel runs finished in."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for run in map(with_derived, runs):
        groups.setdefault(tuple(run_partition(run) if k == "partition" else run[k] for k in GROUP), []).append(run)
    rows = []
    for key, members in groups.items():
        row: dict[str, Any] = dict(zip(GROUP, key, strict=True))
        row["seeds"] = len(members)
        for name, field in METRICS:
            values = [m[field] for m in members if m.get(field) is not None]
            row[f"{name}_mean"], row[f"{name}_std"] = _mean_std(values) if values else (None, None)
        rows.append(row)
    setups = list(dict.fromkeys(r["setup"] for r in runs))
    methods = list(dict.fromkeys(r["method"] for r in runs))
    return sorted(rows, key=lambda r: (setups.index(r["setup"]), _order(r["alpha"], r["partition"]),
                                       methods.index(r["method"]), -r["rank"], -r["lora_r"]))


def _fmt_count(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def _pm(mean: float | None, std: float | None, fmt: Any) -> str:
    """``mean ± std`` with ``fmt`` applied to both (no ± for a single seed)."""
    if mean is None:
        return "-"
    return fmt(mean) if std is None else f"{fmt(mean)} ± {fmt(std)}"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


@dataclass(frozen=True)
class Columns:
    """Which optional columns a table has: the received/trained accuracies and the rank budget appear once some
    row has them, and the partition column reads "alpha" while every partition is Dirichlet."""

    secondary: bool
    ranks: bool
    dirichlet_only: bool

    @classmethod
    def of(cls, rows: Sequence[dict[str, Any]]) -> Columns:
        return cls(any(r.get("received_acc_mean") is not None or r.get("trained_acc_mean") is not None
                       for r in rows),
                   any(r.get("ranks_up_mean") is not None for r in rows),
                   all(r["alpha"] is not None for r in rows))

    def headers(self) -> tuple[str, ...]:
        return ("method", "rank", "alpha" if self.dirichlet_only else "partition", "seeds", "personalised acc %",
                "by example %",
                *(("received %", "trained %") if self.secondary else ()), "global acc %", "params up",
                "bytes up", "bytes down", *(("ranks up/held",) if self.ranks else ()), "wall s")


def _cells(row: dict[str, Any], cols: Columns, spread: bool = True) -> list[str]:
    """The displayed figures of a summary row (accuracies in %); ``spread``: std of the costs too, not only of
    the accuracies."""
    cost = (lambda name: row[f"{name}_std"]) if spread else (lambda name: None)
    secondary = [_pm(row.get("received_acc_mean"), row.get("received_acc_std"), _pct),
                 _pm(row.get("trained_acc_mean"), row.get("trained_acc_std"), _pct)] if cols.secondary else []
    ranks = [_ranks(row)] if cols.ranks else []
    return [_pm(row["personalised_acc_mean"], row["personalised_acc_std"], _pct),
            _pm(row["by_example_acc_mean"], row["by_example_acc_std"], _pct), *secondary,
            _pm(row["global_acc_mean"], row["global_acc_std"], _pct),
            _pm(row["params_up_mean"], cost("params_up"), _fmt_count),
            _pm(row["bytes_up_mean"], cost("bytes_up"), fmt_bytes),
            _pm(row["bytes_down_mean"], cost("bytes_down"), fmt_bytes), *ranks,
            _pm(row["wall_s_mean"], cost("wall_s"), lambda s: f"{s:.0f}")]


def _ranks(row: dict[str, Any]) -> str:
    """A rank-selective method's budget as used: ranks uploaded per update / ranks the device held."""
    up, held = row.get("ranks_up_mean"), row.get("ranks_held_mean")
    if up is None:
        return "-"
    return f"{up:.1f}/{'-' if held is None else f'{held:.0f}'}"


def _partition_cell(row: dict[str, Any]) -> str:
    return f"{row['alpha']:g}" if row["alpha"] is not None else row["partition"]


def _rank(row: dict[str, Any]) -> str:
    """The grid rank; for LoRA-A2 methods the upload budget r_c, shown with the LoRA rank r it selects from."""
    return f"{row['rank']}/{row['lora_r']}" if row["method"] in A2_METHODS else str(row["rank"])


def _setup_lines(run: dict[str, Any], methods: set[str], members: Sequence[dict[str, Any]] = ()) -> list[str]:
    """What a setup is, stated next to its results (DESIGN.md 7a: every reduction visible)."""
    c = run["config"]
    fleet, train, lora, model = c["fleet"], c["train"], c["lora"], c["model"]
    test = run["global_test"]
    split = "Dirichlet label skew" if run["alpha"] is not None else f"partition `{run_partition(run)}`"
    by_method = {m["method"]: m["method_defaults"] for m in members if m.get("method_defaults")}
    per_method = {k for d in by_method.values() for k in d}
    lines = [
        f"dataset `{c['data']['dataset']}`, {split} over {run['clients']} clients "
        f"({c['data']['test_fraction']:g} of each client's share held out as its test split), "
        f"model `{model['name']}`, {model['max_length']} tokens",
        f"{fleet['rounds']} rounds, {fleet['clients_per_round']:.0%} of the clients per round, "
        f"{train['local_steps']} local steps of batch {train['batch_size']}, "
        f"{train.get('optimizer', 'adamw').replace('adamw', 'AdamW').replace('sgd', 'SGD')} "
        + ("lr per method (below)" if "train.lr" in per_method else f"lr {train['lr']:g}"),
        f"LoRA alpha {lora['alpha']:g}, dropout {lora['dropout']:g} on {', '.join(lora['target_modules'])}, "
        f"head {'trained' if lora['train_head'] else 'frozen'}",
        f"global accuracy on {test['examples']} examples ({test['source']}, fixed subsample)",
    ]
    if methods & set(EXPERT_METHODS):
        from edgemole.adapters.amole.config import AMoLEConfig
        from edgemole.config import from_dict
        from fleet.simulate import experts_line

        amole = from_dict(AMoLEConfig, c["amole"], "amole")
        lines.append(experts_line(amole, run["clients"], run.get("service", {}).get("rounds", [])))
    if by_method:
        lines.append("method defaults (edgemole/defaults.py): " + "; ".join(
            f"{m} " + " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items())
            for m, d in by_method.items()))
    return lines


def write_markdown(path: Path, runs: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]]) -> Path:
    first = {}
    for run in runs:
        first.setdefault(run["setup"], run)
    out = ["# edgemole bench", ""]
    for setup, run in first.items():
        out += [f"## Setup {setup[:8]}", ""]
        members = [r for r in runs if r["setup"] == setup]
        out += [f"- {line}" for line in _setup_lines(run, {r["method"] for r in members}, members)]
        own = [r for r in rows if r["setup"] == setup]
        cols = Columns.of(own)
        headers = cols.headers()
        out += ["", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        for row in own:
            out.append("| " + " | ".join([row["method"], _rank(row), _partition_cell(row), str(row["seeds"]),
                                          *_cells(row, cols)]) + " |")
        out.append("")
    out += ["Mean ± sample standard deviation over seeds. Personalised accuracy: each client's final (deployed) model "
            "on its own test split, mean over clients; by example %: the same models on all clients' test examples "
            "together (each client weighted by its test split); received % and trained %, where recorded: the model as"
            " received and after local training. Global accuracy: the aggregated model on the global test set (expert "
            "methods: mean over clients of each client's model). Bytes are payloads on the wire (assignments down, "
            "updates up, every round and the final evaluation; clients skip the evaluation after local training, so "
            "updates carry two metrics fewer than in `edgemole simulate`), in binary units (1 MiB = 2^20 bytes); "
            "params up counts every uploaded tensor element. Rank `u/r` of lora-a2 and fedamole-a2: upload budget u of"
            " LoRA rank r; ranks up/held: ranks a device uploaded per update / ranks it held (LoRA rank x its "
            "adapters), means over devices and rounds.", ""]
    path.write_text("\n".join(out))
    return path


def _write_csv(path: Path, columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def _series_label(method: str, rank: int, lora_r: int) -> str:
    return f"{method} r{rank}/{lora_r}" if method in A2_METHODS else f"{method} r{rank}"


def plot_setup(runs: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]], curves_path: Path,
               tradeoff_path: Path) -> list[Path]:
    """Accuracy per round (one panel per alpha, a line per method x rank, mean ± std over seeds) and accuracy
    against uploaded bytes (log x; filled: personalised, hollow: global), for the runs of one setup.
    A method keeps its colour and a rank its line style and marker in both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator, NullLocator

    panels_of = sorted({(r["alpha"], run_partition(r)) for r in runs}, key=lambda ap: _order(*ap))
    series = list(dict.fromkeys((r["method"], r["rank"], r["lora_r"]) for r in runs))
    methods = list(dict.fromkeys(m for m, _, _ in series))
    ranks = sorted({r for _, r, _ in series}, reverse=True)
    color = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
    style = {r: ("-", "--", ":", "-.")[i % 4] for i, r in enumerate(ranks)}
    marker = {r: "osD^v<>"[i % 7] for i, r in enumerate(ranks)}

    def panels() -> tuple[Any, Any]:
        fig, axes = plt.subplots(1, len(panels_of), figsize=(max(6.0, 4.5 * len(panels_of)), 4), squeeze=False,
                                 sharey=True)
        for ax, (alpha, part) in zip(axes[0], panels_of, strict=True):
            ax.set(title=f"Dirichlet alpha = {alpha:g}" if alpha is not None else f"partition {part}", ylim=(0, 1))
            ax.grid(alpha=0.3, which="both")
        return fig, axes[0]

    def finish(fig: Any, axes: Any, ylabel: str, path: Path) -> None:
        axes[0].set_ylabel(ylabel)
        handles, labels = axes[0].get_legend_handles_labels()
        axes[-1].legend(handles, labels, fontsize=8, loc="center left", bbox_to_anchor=(1.03, 0.5))
        fig.tight_layout()
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)

    fig, axes = panels()
    for ax, (alpha, part) in zip(axes, panels_of, strict=True):
        for s in series:
            curves = [r["accuracy_curve"] for r in runs if (r["method"], r["rank"], r["lora_r"]) == s
                      and r["alpha"] == alpha and run_partition(r) == part]
            if not curves:
                continue
            length = min(len(c) for c in curves)
            points = [[c[i] for c in curves if c[i] is not None] for i in range(length)]
            mean = [statistics.fmean(p) if p else float("nan") for p in points]
            spread = [statistics.stdev(p) if len(p) > 1 else 0.0 for p in points]
            xs = list(range(length))
            ax.plot(xs, mean, color=color[s[0]], linestyle=style[s[1]], marker=marker[s[1]], markersize=3,
                    label=_series_label(*s))
            ax.fill_between(xs, [m - d for m, d in zip(mean, spread, strict=True)],
                            [m + d for m, d in zip(mean, spread, strict=True)], color=color[s[0]], alpha=0.12)
        ax.set_xlabel("rounds done")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    finish(fig, axes, "personalised accuracy", curves_path)

    fig, axes = panels()
    for ax, (alpha, part) in zip(axes, panels_of, strict=True):
        for row in (r for r in rows if r["alpha"] == alpha and r["partition"] == part):
            s = (row["method"], row["rank"], row["lora_r"])
            for key, fill in (("personalised_acc", color[s[0]]), ("global_acc", "none")):
                if row[f"{key}_mean"] is not None:
                    ax.errorbar([row["bytes_up_mean"]], [row[f"{key}_mean"]], yerr=[row[f"{key}_std"] or 0.0],
                                fmt=marker[s[1]], capsize=3, color=color[s[0]], markerfacecolor=fill,
                                label=_series_label(*s) if key == "personalised_acc" else None)
        ax.set(xscale="log", xlabel="uploaded bytes per run (log)")
        sizes = [r["bytes_up_mean"] for r in rows if r["alpha"] == alpha and r["partition"] == part]
        if sizes:  # a few labelled ticks spanning the data: methods often lie within one decade
            low, high = min(sizes) / 1.5, max(sizes) * 1.5
            ticks = [low * 1.2 * (high / low / 1.44) ** (i / 3) for i in range(4)]
            ax.set_xlim(low, high)
            ax.set_xticks(ticks, [fmt_bytes(int(t)) for t in ticks], rotation=20)
            ax.xaxis.set_minor_locator(NullLocator())
    finish(fig, axes, "accuracy (filled: personalised, hollow: global)", tradeoff_path)
    return [curves_path, tradeoff_path]


def write_reports(out: Path, runs: Sequence[dict[str, Any]]) -> list[Path]:
    """results.csv, summary.csv, summary.md and the plots (per setup when there are several) in ``out``."""
    rows = summarize(runs)
    written = [_write_csv(out / "results.csv", RUN_COLUMNS, [with_derived(r) for r in runs]),
               _write_csv(out / "summary.csv", [*GROUP, "seeds", *(f"{n}_{s}" for n, _ in METRICS
                                                                    for s in ("mean", "std"))], rows),
               write_markdown(out / "summary.md", runs, rows)]
    setups = list(dict.fromkeys(r["setup"] for r in runs))
    for setup in setups:
        suffix = "" if len(setups) == 1 else f"-{setup[:8]}"
        written += plot_setup([r for r in runs if r["setup"] == setup], [r for r in rows if r["setup"] == setup],
                              out / f"accuracy_rounds{suffix}.png", out / f"accuracy_vs_bytes{suffix}.png")
    return written


def print_summary(runs: Sequence[dict[str, Any]], console: Console) -> None:
    rows = summarize(runs)
    several = len({r["setup"] for r in rows}) > 1
    cols = Columns.of(rows)
    table = Table(title="edgemole bench", header_style="bold",
                  caption="accuracies in %, mean ± std over seeds (costs: means); personalised: the deployed model; "
                  "rank u/r: upload budget u of LoRA rank r; bytes in binary units (1 MiB = 2^20 bytes)")
    for col in (("setup",) if several else ()) + cols.headers():
        table.add_column(col, justify="left" if col in ("setup", "method") else "right", no_wrap=True)
    for row in rows:
        table.add_row(*([row["setup"][:8]] if several else []), row["method"], _rank(row), _partition_cell(row),
                      str(row["seeds"]), *_cells(row, cols, spread=False))
    console.print(table)
    rejected: dict[str, int] = {}
    for run in runs:
        for reason, count in run.get("service", {}).get("rejected", {}).items():
            rejected[reason] = rejected.get(reason, 0) + count
    console.print(f"messages: {rejected_text(rejected)} by the aggregators of {len(runs)} run(s)", highlight=False)
