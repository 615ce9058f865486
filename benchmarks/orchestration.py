"""Where the wall time of a fleet run goes: local training, aggregation, and everything else.

Runs a fixed small ``edgemole simulate`` (default model, synthetic task) several times on each broker and
prints medians of: wall time, start-up and shutdown (process launch, model loading), time inside rounds,
client compute on the critical path (slowest client's training + evaluation, per round), aggregation, and the
rest of the round time (transport, serialisation, waiting), with its share of the round time. Also times the
encoding and decoding of one adapter-sized message, the serialisation part of that rest.

    python benchmarks/orchestration.py                 # 3 repeats on amqtt and, if installed, Mosquitto
    python benchmarks/orchestration.py --repeats 5 --json-out orchestration.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from edgemole.broker import mosquitto_binary, mosquitto_broker
from edgemole.config import load_settings
from edgemole.model import build_classifier, trainable_roles, trainable_state
from edgemole.protocol import Kind, Message, decode, encode
from fleet.simulate import simulate

FIXED = {"fleet": {"rounds": 3, "seed": 0}, "simulate": {"clients": 4}, "train": {"local_steps": 10}}
KEYS = ("wall_s", "startup_and_shutdown_s", "rounds_s", "client_compute_s", "aggregate_s", "orchestration_s")


def serialisation_cost(repeats: int = 20) -> dict[str, float]:
    """Median encode and decode time of one client update of the default model's adapters."""
    settings = load_settings(None, FIXED)
    model, _ = build_classifier(settings.task(labels=[f"l{i}" for i in range(20)]))
    state, roles = trainable_state(model), trainable_roles(model)
    msg = Message(Kind.UPDATE, "bench", 1, "train", "c0", {"run": "r", "num_samples": 1}, state, roles)
    enc, dec = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        payload = encode(msg)
        enc.append(time.perf_counter() - t)
        t = time.perf_counter()
        decode(payload)
        dec.append(time.perf_counter() - t)
    return {"bytes": len(payload), "encode_ms": 1e3 * statistics.median(enc), "decode_ms": 1e3 * statistics.median(dec)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--brokers", default="amqtt,mosquitto", help="comma-separated: amqtt, mosquitto")
    parser.add_argument("--json-out")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    for noisy in ("torchao", "torch.utils._pytree"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    console = Console()
    quiet = Console(file=open(os.devnull, "w"))  # noqa: SIM115
    runs: dict[str, list[dict]] = {}
    for kind in args.brokers.split(","):
        if kind == "mosquitto" and mosquitto_binary() is None:
            console.print("mosquitto not installed: skipped")
            continue
        for i in range(args.repeats):
            with contextlib.ExitStack() as stack:
                url = stack.enter_context(mosquitto_broker()) if kind == "mosquitto" else None
                result = simulate(load_settings(None, FIXED), broker=url, console=quiet)
            runs.setdefault(kind, []).append({**result["timing"], "bytes_up": result["bytes_up_total"],
                                              "final_accuracy": result["final_personalised_accuracy"]})
            console.print(f"{kind} run {i + 1}/{args.repeats}: {result['timing']['wall_s']:.1f} s")
    table = Table(title=f"simulate, 4 clients x 3 rounds x 10 steps, MiniLM, medians of {args.repeats} "
                  f"(cores: {os.cpu_count()})")
    table.add_column("seconds")
    for kind in runs:
        table.add_column(kind, justify="right")
    medians = {kind: {k: statistics.median(r[k] for r in rs) for k in KEYS} for kind, rs in runs.items()}
    for key in KEYS:
        table.add_row(key, *(f"{medians[k][key]:.2f}" for k in runs))
    table.add_row("orchestration / rounds", *(f"{medians[k]['orchestration_s'] / medians[k]['rounds_s']:.1%}"
                                              for k in runs))
    table.add_row("training / rounds", *(f"{medians[k]['client_compute_s'] / medians[k]['rounds_s']:.1%}"
                                         for k in runs))
    console.print(table)
    ser = serialisation_cost()
    console.print(f"one update message: {ser['bytes']} bytes, encode {ser['encode_ms']:.2f} ms, "
                  f"decode+parse {ser['decode_ms']:.2f} ms (medians of 20)")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"runs": runs, "medians": medians, "serialisation": ser,
                                                   "config": FIXED, "python": sys.version}, indent=2))


if __name__ == "__main__":
    main()
