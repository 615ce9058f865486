"""End to end: ``edgemole simulate`` as a user runs it, on the embedded broker and on Mosquitto."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO


def _simulate(tmp: Path, *args: str, timeout: float = 400) -> tuple[dict, subprocess.CompletedProcess]:
    out = tmp / "r.json"
    proc = subprocess.run(
        [sys.executable, "-m", "fleet", "simulate", "--json-out", str(out), "--work-dir", str(tmp / "work"),
         *args],
        capture_output=True, text=True, timeout=timeout, cwd=REPO,
    )
    logs = "\n".join(p.read_text()[-2000:] for p in (tmp / "work" / "logs").glob("*.log"))
    assert proc.returncode == 0, proc.stdout + proc.stderr + logs
    return json.loads(out.read_text()), proc


def _check_result(result: dict, clients: int, rounds: int) -> None:
    assert [r["round"] for r in result["rounds"]] == list(range(1, rounds + 1))
    assert all(len(r["answered"]) == clients for r in result["rounds"])
    assert result["final"]["phase"] == "eval" and len(result["final"]["answered"]) == clients
    assert len(result["accuracy_curve"]) == rounds + 1
    assert result["bytes_up_total"] > 0 and result["bytes_down_total"] > 0
    assert result["bytes_up_total"] == sum(r["bytes_up"] for r in result["rounds"]) + result["final"]["bytes_up"]
    names = list(result["data"]["clients"])
    assert [n.rsplit("-", 1)[0] if result["data"]["partition"].startswith("column:") else n for n in names] == [
        f"client-{i}" for i in range(clients)]  # a column partition's names end in the client's value
    assert all(code == 0 for code in result["client_exit_codes"].values())
    timing = result["timing"]
    assert timing["rounds_s"] <= timing["wall_s"]
    assert timing["client_compute_s"] > 0


def test_simulate_tiny_model_on_embedded_broker(tmp_path: Path, tiny_model: str) -> None:
    result, proc = _simulate(tmp_path, "--clients", "3", "--rounds", "2", "--model", tiny_model, "--local-steps",
                             "2", "--samples-per-domain", "30", "--max-length", "16", "--rank", "2",
                             "--plot", str(tmp_path / "run.png"))
    assert (tmp_path / "run.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _check_result(result, clients=3, rounds=2)
    assert result["broker"]["kind"] == "amqtt (embedded)"
    assert result["task"]["lora"]["r"] == 2
    assert "final personalised accuracy" in proc.stdout
    # stdout is a pipe: one plain line per round instead of progress bars, then the table; units and rejections
    assert "round 1 train-B: 3/3 clients, acc in" in proc.stdout and "round 3 eval: 3/3 clients" in proc.stdout
    assert "KiB" in proc.stdout and " KB" not in proc.stdout and "messages: 0 rejected" in proc.stdout
    assert "fedamole-a2 defaults: train.lr=0.01 a2.b_lr_multiplier=1" in proc.stdout
    assert "experts: E=8, M=4, C=1 (auto), k=2" in proc.stdout  # k*N = 6 <= E*C = 8 <= M*N = 12
    assert "infeasible" not in (tmp_path / "work" / "logs" / "aggregator.log").read_text()
    for name in result["data"]["clients"]:
        assert (tmp_path / "work" / "logs" / f"{name}.log").exists()
    assert "Traceback" not in (tmp_path / "work" / "logs" / "broker.log").read_text()


@pytest.mark.mosquitto
def test_simulate_against_mosquitto(tmp_path: Path, tiny_model: str, mosquitto: str) -> None:
    result, _ = _simulate(tmp_path, "--broker", mosquitto, "--clients", "2", "--rounds", "1", "--model", tiny_model,
                          "--local-steps", "2", "--samples-per-domain", "20", "--max-length", "16",
                          "--partition", "dirichlet:0.5")
    _check_result(result, clients=2, rounds=1)
    assert result["broker"] == {"kind": "external", "url": mosquitto}
    assert result["data"]["partition"] == "dirichlet:0.5"


@pytest.mark.slow
def test_default_model_learns_the_synthetic_task(tmp_path: Path) -> None:
    """The real all-MiniLM-L6-v2: accuracy of the aggregated model rises well above its start."""
    result, _ = _simulate(tmp_path, "--clients", "2", "--rounds", "2", "--local-steps", "10",
                          "--samples-per-domain", "60")
    _check_result(result, clients=2, rounds=2)
    curve = result["accuracy_curve"]
    assert curve[-1] > curve[0] + 0.2, curve


def test_simulate_with_the_executorch_engine_exports_once_and_trains_on_it(tmp_path: Path, tiny_model: str) -> None:
    result, proc = _simulate(tmp_path, "--engine", "executorch", "--method", "lora-a2", "--clients", "2", "--rounds",
                             "2", "--model", tiny_model, "--local-steps", "2", "--samples-per-domain", "30",
                             "--max-length", "16", "--rank", "2")
    _check_result(result, clients=2, rounds=2)
    assert result["engine"] == "executorch" and result["task"]["train"]["dropout"] is False
    assert [r["phase"] for r in result["rounds"]] == ["train-B", "train-A"]
    assert "train without dropout" in proc.stderr and "exported lora program" in proc.stdout
    manifest = json.loads((tmp_path / "work" / "artifact" / "manifest.json").read_text())
    assert manifest["adapter"] == "lora" and "lora-a2" in manifest["methods"]
    logs = next((tmp_path / "work" / "logs").glob("client-0-*.log")).read_text()  # named after its domain
    assert "building executorch engine" in logs


def test_simulate_runs_native_clients_beside_python_ones(tmp_path: Path, tiny_model: str) -> None:
    """``--native-clients 1``: the last client is edgemole-device (devices/native), trained on the exported program
    next to a Python client; both answer every round."""
    from native import native_build

    native_build()  # simulate finds it in build/native (or builds it there)
    result, proc = _simulate(tmp_path, "--native-clients", "1", "--method", "fedamole-a2", "--clients", "2",
                             "--rounds", "2", "--model", tiny_model, "--local-steps", "2", "--samples-per-domain",
                             "30", "--max-length", "16", "--rank", "2", "--experts", "2", "--slots", "2")
    _check_result(result, clients=2, rounds=2)
    assert result["native_clients"] == 1 and result["task"]["train"]["dropout"] is False
    python, native = sorted(result["client_exit_codes"])  # client-N-<domain> of the column:domain partition
    assert python.startswith("client-0-") and native.startswith("client-1-")
    logs = tmp_path / "work" / "logs"
    assert f"edgemole.device: client {native} online" in (logs / f"{native}.log").read_text()
    assert f"edgemole.client INFO client {python} online" in (logs / f"{python}.log").read_text()
    assert result["client_exit_codes"] == {python: 0, native: 0}


def test_simulate_stops_cleanly_on_sigterm(tmp_path: Path, tiny_model: str) -> None:
    """SIGTERM: the children (broker, aggregator, clients) are stopped, the exit status is 143 and no leaked
    semaphore (multiprocessing resource tracker) or stack trace is reported."""
    import signal

    proc = subprocess.Popen(
        [sys.executable, "-m", "fleet", "simulate", "--clients", "2", "--rounds", "50", "--model", tiny_model,
         "--local-steps", "1", "--samples-per-domain", "20", "--max-length", "16", "--rank", "2", "--method",
         "fedit", "--work-dir", str(tmp_path / "work")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout is not None
    for line in proc.stdout:  # a pipe: plain round lines
        if line.startswith("round 1 "):
            break
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "leaked" not in err and "resource_tracker" not in err and "Traceback" not in err, err
    assert err.strip() == "stopped by SIGTERM"
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(tmp_path / "work") not in ps  # no role left running


def test_broker_log_drops_ordinary_disconnects_and_keeps_errors_one_line() -> None:
    import logging

    from edgemole.broker import QuietDisconnects

    def record(msg: str, exc: BaseException | None) -> logging.LogRecord:
        return logging.LogRecord("amqtt.broker", logging.ERROR, __file__, 1, msg, (),
                                 (type(exc), exc, None) if exc else None)

    quiet = QuietDisconnects()
    assert not quiet.filter(record("client closed", ConnectionResetError(104, "Connection reset by peer")))
    assert not quiet.filter(record("No data from x : No data to decode MQTT packet fixed header", None))
    real = record("Broadcast loop stopped by exception", ValueError("bad topic"))
    assert quiet.filter(real) and real.exc_info is None
    assert logging.Formatter().format(real) == "Broadcast loop stopped by exception: ValueError: bad topic"
