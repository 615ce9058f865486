"""What each fault costs a fleet run: updates lost, re-sent and the time to recover, on the fault-injection fleet of
tests/test_faults.py (real processes through Mosquitto; a tiny 2-layer BERT, 2 devices, 3 rounds, quorum 1.0).

For each method, one fault-free run and one run per fault (kill -9 of the aggregator then ``--resume``, of Mosquitto
without persistence then a restart on the same port, of one device then a restart), struck in round 2. Recorded per
fault: updates lost (selected devices whose update never counted), duplicates and early updates dropped (the
re-sends), whether the final model equals the fault-free one (largest difference), the seconds from the kill to the
close of the struck round, and the run's extra wall time against the fault-free run.

    python benchmarks/faults.py                          # fedit and fedamole-a2, JSON to docs/results/faults.json
    python benchmarks/faults.py --methods fedit --repeats 3 --json-out /tmp/faults.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # run from anywhere, installed or not

from conftest import write_tiny_model  # noqa: E402
from fault_fleet import FAULT_ROUND, FAULTS, ROUNDS, FaultFleet, lost_updates, max_difference  # noqa: E402

from edgemole.broker import mosquitto_binary  # noqa: E402


def mosquitto_version() -> str:
    binary = mosquitto_binary()
    if binary is None:
        return ""
    return subprocess.run([binary, "-h"], capture_output=True, text=True).stdout.split("\n", 1)[0].strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="fedit,fedamole-a2")
    parser.add_argument("--repeats", type=int, default=1, help="fault runs per method and fault (medians reported)")
    parser.add_argument("--json-out", default=str(REPO / "docs" / "results" / "faults.json"))
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="edgemole-faults-") as tmp:
        work = Path(tmp)
        model = write_tiny_model(work / "model")
        for method in args.methods.split(","):
            reference = FaultFleet(work / f"{method}-reference", model, method).run()
            print(f"{method}: fault-free run {reference.wall_s:.1f} s", flush=True)
            for fault in FAULTS:
                runs = [FaultFleet(work / f"{method}-{fault}-{i}", model, method).run(fault)
                        for i in range(args.repeats)]
                record = {
                    "method": method,
                    "fault": fault,
                    "repeats": len(runs),
                    "updates_lost": sum(lost_updates(r.summary) for r in runs),
                    "updates_before_fault": [r.updates_before_fault for r in runs],
                    "duplicates_dropped": [r.summary.get("duplicates", 0) for r in runs],
                    "early_dropped": [r.summary.get("early", 0) for r in runs],
                    "max_abs_difference": max(max_difference(r.state, reference.state) for r in runs),
                    "same_expert_state": all(r.extra == reference.extra for r in runs),
                    "recover_s_median": statistics.median(r.recover_s for r in runs if r.recover_s is not None),
                    "extra_wall_s_median": statistics.median(r.wall_s - reference.wall_s for r in runs),
                    "reference_wall_s": reference.wall_s,
                    "events": [e for r in runs for e in r.events],
                }
                results.append(record)
                print(f"{method} {fault}: lost {record['updates_lost']}, max diff {record['max_abs_difference']:.1e}, "
                      f"recovered in {record['recover_s_median']:.1f} s, run +{record['extra_wall_s_median']:.1f} s",
                      flush=True)
    out = {
        "benchmark": "benchmarks/faults.py",
        "setup": {"devices": 2, "rounds": ROUNDS, "fault_round": FAULT_ROUND, "quorum": 1.0,
                  "model": "tiny 2-layer BERT (tests/conftest.py)", "broker": "Mosquitto, persistence false"},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "mosquitto": mosquitto_version()},
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "results": results,
    }
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json_out}")


if __name__ == "__main__":
    main()
