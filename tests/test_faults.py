"""Faults only delay, they change nothing: a fedit and a fedamole-a2 fleet of real processes through Mosquitto,
with kill -9 of the aggregator (resumed with --resume), of Mosquitto (no persistence; restarted) and of one client
(restarted) in the middle of a round, each ends with the fault-free run's model (1e-6) and no lost update."""

from __future__ import annotations

from pathlib import Path

import pytest
from fault_fleet import FAULTS, FaultFleet, FaultRun, lost_updates, max_difference

from edgemole.broker import mosquitto_binary

pytestmark = [pytest.mark.mosquitto, pytest.mark.slow]

_REFERENCES: dict[str, FaultRun] = {}


@pytest.fixture(autouse=True)
def _needs_mosquitto() -> None:
    import os

    if mosquitto_binary() is None:
        if os.environ.get("CI"):
            pytest.fail("mosquitto is not installed but CI is set: broker tests must run in CI")
        pytest.skip("mosquitto not installed (apt-get install -y mosquitto)")


def _reference(method: str, tmp: Path, model: str) -> FaultRun:
    """The fault-free run of ``method``, shared by its three fault cases."""
    if method not in _REFERENCES:
        _REFERENCES[method] = FaultFleet(tmp / f"{method}-reference", model, method).run()
    return _REFERENCES[method]


@pytest.mark.parametrize("method", ["fedit", "fedamole-a2"])
@pytest.mark.parametrize("fault", FAULTS)
def test_fault_mid_round_changes_nothing(tmp_path_factory: pytest.TempPathFactory, tiny_model: str, method: str,
                                         fault: str) -> None:
    reference = _reference(method, tmp_path_factory.mktemp("reference"), tiny_model)
    run = FaultFleet(tmp_path_factory.mktemp(f"{method}-{fault}"), tiny_model, method).run(fault)
    assert run.recover_s is not None, "the fault round never closed after the fault"
    assert lost_updates(run.summary) == 0 and lost_updates(reference.summary) == 0
    assert max_difference(run.state, reference.state) <= 1e-6
    assert run.extra == reference.extra  # FedAMoLE: the same expert sets, assignment state and RNG
    assert [r["answered"] for r in run.summary["rounds"]] == [r["answered"] for r in reference.summary["rounds"]]
    assert len(run.summary["rounds"]) == 3 and run.summary["final"]["phase"] == "eval"
