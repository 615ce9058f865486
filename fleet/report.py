"""Pictures of a run for people: accuracy per round and bytes on the wire, as one PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgemole.errors import ConfigError


def plot_run(result: dict[str, Any], path: str | Path) -> Path:
    """Write a two-panel PNG (accuracy, bytes per round) of a simulate/aggregator result."""
    out = Path(path)
    if out.suffix.lower() != ".png":
        raise ConfigError(f"plot file '{out}' must end in .png")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = result["rounds"]
    xs = [r["round"] for r in rounds]
    fig, (acc_ax, bytes_ax) = plt.subplots(1, 2, figsize=(11, 4))
    # the model after round t is measured when round t+1 (or the final evaluation) receives it
    after = [r["accuracy_before"] for r in rounds[1:]] + [result["final"]["accuracy_before"]]
    spread = [r["accuracy_before_std"] or 0.0 for r in rounds[1:]] + [result["final"]["accuracy_before_std"] or 0.0]
    acc_ax.errorbar(xs, after, yerr=spread, marker="o", capsize=3, label="aggregated model (mean ± std over clients)")
    acc_ax.plot(xs, [r["accuracy_after_local"] for r in rounds], marker="s", linestyle="--",
                label="after local training")
    acc_ax.axhline(rounds[0]["accuracy_before"], color="grey", linewidth=0.8, label="initial model")
    acc_ax.set(xlabel="round", ylabel="personalised accuracy", ylim=(0, 1), title=f"{result['method']}: accuracy")
    acc_ax.set_xticks(xs)
    acc_ax.legend(fontsize=8, loc="lower right")
    bytes_ax.bar([x - 0.2 for x in xs], [r["bytes_up"] / 1e6 for r in rounds], width=0.4, label="uploaded")
    bytes_ax.bar([x + 0.2 for x in xs], [r["bytes_down"] / 1e6 for r in rounds], width=0.4, label="downloaded")
    bytes_ax.set(xlabel="round", ylabel="MB on the wire", title="traffic per round")
    bytes_ax.set_xticks(xs)
    bytes_ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
