"""The native client as a fleet member through Mosquitto: a mixed fleet (two Python ExecuTorch-engine clients, two
native clients) runs three rounds of fedamole-a2 and of fedit, and its aggregated state equals that of the same fleet
with four Python clients."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from native import native_build, run_fleet

pytestmark = pytest.mark.mosquitto


@pytest.mark.parametrize("method", ["fedamole-a2", "fedit"])
def test_mixed_fleet_aggregates_what_a_python_fleet_aggregates(tmp_path: Path, mosquitto: str, tiny_model: str,
                                                               tiny_artifacts: dict[str, Path], method: str) -> None:
    artifact = tiny_artifacts["amole" if method == "fedamole-a2" else "lora"]
    device = [str(native_build() / "edgemole-device")]
    mixed, mixed_state = run_fleet(tmp_path / "mixed", mosquitto, tiny_model, artifact, method, {"c2", "c3"}, device)
    python, python_state = run_fleet(tmp_path / "python", mosquitto, tiny_model, artifact, method, set(), device)
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
