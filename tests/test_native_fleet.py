"""The native client as a fleet member through Mosquitto: a mixed fleet (two Python ExecuTorch-engine clients, two
native clients) runs three rounds of fedamole-a2 and of fedit, and its aggregated state equals that of the same fleet
with four Python clients."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_AMOLE, spawn, write_client_data, write_config
from native import native_build

from aggregator.checkpoint import load_checkpoint
from edgemole.simulate import stop_processes

pytestmark = pytest.mark.mosquitto


def run_fleet(tmp: Path, broker: str, model: str, artifact: Path, method: str, native: set[str],
              timeout_s: float = 300) -> tuple[dict, dict[str, torch.Tensor]]:
    """Aggregator and four clients c0..c3 (those in ``native`` as edgemole-device); the summary and final state."""
    import subprocess

    tmp.mkdir(parents=True, exist_ok=True)
    files, labels = write_client_data(tmp, [30, 36, 42, 48])
    config = write_config(tmp / "config.json", model, labels, {"dropout": False, "weight_decay": 0.01},
                          TINY_AMOLE, method=method, rounds=3, min_clients=4, round_deadline_s=120.0,
                          wait_clients_s=300.0)
    aggregator = spawn(["aggregator", "--broker", broker, "--config", str(config), "--json-out",
                        str(tmp / "summary.json"), "--checkpoint-dir", str(tmp / "checkpoints")],
                       tmp / "aggregator.log")
    procs = [aggregator]
    binary = native_build() / "edgemole-device" if native else None
    for k, (train, test) in enumerate(files):
        name = f"c{k}"
        if name in native:
            with open(tmp / f"{name}.log", "ab") as log:
                procs.append(subprocess.Popen(
                    [str(binary), "--broker", broker, "--client-id", name, "--fleet", "t", "--artifact", str(artifact),
                     "--data", str(train), "--test-data", str(test), "--threads", "1"],
                    stdout=log, stderr=subprocess.STDOUT))
        else:
            procs.append(spawn(["client", "--broker", broker, "--client-id", name, "--data", str(train),
                                "--test-data", str(test), "--fleet", "t", "--threads", "1", "--engine", "executorch",
                                "--artifact", str(artifact)], tmp / f"{name}.log"))
    deadline = time.monotonic() + timeout_s
    try:
        while aggregator.poll() is None:
            if time.monotonic() > deadline:
                pytest.fail("the fleet did not finish in time:\n" + _logs(tmp))
            time.sleep(0.5)
        assert aggregator.returncode == 0, _logs(tmp)
        for k, p in enumerate(procs[1:]):  # every client saw the end of the run and exited cleanly
            p.wait(30)
            assert p.returncode == 0, f"c{k} exited with {p.returncode}:\n" + _logs(tmp)
    finally:
        stop_processes(procs)
    loaded = load_checkpoint(tmp / "checkpoints", method=method)
    assert loaded is not None
    return json.loads((tmp / "summary.json").read_text()), loaded[0]


def _logs(tmp: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2500:]}" for p in sorted(tmp.glob("*.log")))


@pytest.mark.parametrize("method", ["fedamole-a2", "fedit"])
def test_mixed_fleet_aggregates_what_a_python_fleet_aggregates(tmp_path: Path, mosquitto: str, tiny_model: str,
                                                               tiny_artifacts: dict[str, Path], method: str) -> None:
    artifact = tiny_artifacts["amole" if method == "fedamole-a2" else "lora"]
    mixed, mixed_state = run_fleet(tmp_path / "mixed", mosquitto, tiny_model, artifact, method, {"c2", "c3"})
    python, python_state = run_fleet(tmp_path / "python", mosquitto, tiny_model, artifact, method, set())
    for summary in (mixed, python):
        assert [len(r["answered"]) for r in summary["rounds"]] == [4, 4, 4]
        assert len(summary["final"]["answered"]) == 4 and summary["rejected"] == {}
    assert [r["phase"] for r in mixed["rounds"]] == [r["phase"] for r in python["rounds"]]
    assert sorted(mixed_state) == sorted(python_state)
    for name, t in python_state.items():
        assert torch.allclose(mixed_state[name], t, rtol=1e-4, atol=1e-4), name
    # the mixed fleet's devices really trained: the state moved away from the initial one
    assert any(not torch.equal(t, torch.zeros_like(t)) for n, t in mixed_state.items() if n.endswith("lora_B"))
    if method == "fedamole-a2":  # same expert assignment in every round
        assert [r["experts"] for r in mixed["rounds"]] == [r["experts"] for r in python["rounds"]]
