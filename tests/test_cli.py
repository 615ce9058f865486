"""Bad input on the command line: one clear line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgemole.broker import free_port
from fleet.cli import main


def _fail(capsys: pytest.CaptureFixture[str], argv: list[str], code: int = 2) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == code
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return err


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    err = _fail(capsys, argv)
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_unknown_subcommand_and_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert "invalid choice" in _fail(capsys, ["teleport"])
    assert "unrecognized arguments: --bogus" in _fail(capsys, ["simulate", "--bogus"])


def test_unknown_method(capsys: pytest.CaptureFixture[str]) -> None:
    line = _one_line_error(capsys, ["simulate", "--method", "fedmagic"])
    assert "unknown method 'fedmagic'" in line and "fedamole, fedamole-a2, fedit, ffa-lora, flexlora, lora-a2" in line


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["simulate", "--partition", "dirichlet:-1"], "dirichlet"),
        (["simulate", "--partition", "zigzag"], "zigzag"),
        (["simulate", "--rounds", "0"], "fleet.rounds"),
        (["simulate", "--quorum", "1.5"], "quorum"),
        (["simulate", "--rank", "0"], "lora.r"),
        (["simulate", "--clients", "0"], "simulate.clients"),
        (["simulate", "--engine", "warp"], "unknown engine 'warp'"),
        (["simulate", "--dataset", "/nonexistent/data.csv"], "/nonexistent/data.csv"),
        (["simulate", "--fleet", "a/b"], "fleet name"),
        (["simulate", "--clients", "500"], "simulate.clients"),
        (["client", "--broker", "mqtt://127.0.0.1:1", "--client-id", "x", "--data", "/nope.csv"], "/nope.csv"),
        (["client", "--broker", "mqtt://127.0.0.1:1", "--client-id", "bad/id", "--data", "x.csv"], "client id"),
        (["aggregator", "--broker", "mqtt://127.0.0.1:1", "--method", "nope"], "unknown method"),
        (["client", "--broker", "mqtt://127.0.0.1:1", "--client-id", "x", "--data", "x.csv", "--engine",
          "executorch"], "needs --artifact"),
        (["client", "--broker", "mqtt://127.0.0.1:1", "--client-id", "x", "--data", "x.csv", "--artifact", "a"],
         "--artifact is for --engine executorch"),
        (["export", "--out", "/tmp/x", "--task", "translate"], "--task must be classify or causal-lm"),
        (["export", "--out", "/tmp/x", "--num-labels", "1"], "--num-labels"),
    ],
)
def test_bad_values_give_one_line(capsys: pytest.CaptureFixture[str], argv: list[str], needle: str) -> None:
    assert needle in _one_line_error(capsys, argv)


def test_missing_label_column(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    data = tmp_path / "d.csv"
    data.write_text("text,topic\nhello,a\nworld,b\n")
    line = _one_line_error(capsys, ["simulate", "--dataset", str(data), "--label-column", "intent"])
    assert "intent" in line and "topic" in line


def test_bad_config_files(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[fleet\nrounds = 3\n")
    assert "malformed" in _one_line_error(capsys, ["simulate", "--config", str(bad)])
    typo = tmp_path / "typo.json"
    typo.write_text(json.dumps({"fleet": {"roundz": 3}}))
    assert "fleet.roundz" in _one_line_error(capsys, ["simulate", "--config", str(typo)])
    section = tmp_path / "section.toml"
    section.write_text("[network]\nport = 1\n")
    assert "network" in _one_line_error(capsys, ["simulate", "--config", str(section)])
    assert "does not exist" in _one_line_error(capsys, ["simulate", "--config", str(tmp_path / "none.toml")])


def test_unreachable_broker(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n{"text": "c", "label": "x"}\n')
    port = free_port()
    line = _one_line_error(capsys, ["client", "--broker", f"mqtt://127.0.0.1:{port}", "--client-id", "c1",
                                    "--data", str(data), "--connect-timeout", "1"])
    assert f"cannot reach MQTT broker at mqtt://127.0.0.1:{port}" in line
    line = _one_line_error(capsys, ["client", "--broker", "http://host:1", "--client-id", "c1", "--data", str(data)])
    assert "invalid broker URL 'http://host:1'" in line


def test_export_writes_an_artifact_and_never_overwrites_one(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                            tiny_model: str) -> None:
    out = tmp_path / "art"
    argv = ["export", "--out", str(out), "--model", tiny_model, "--method", "lora-a2", "--max-length", "16",
            "--batch-size", "4", "--rank", "2", "--num-labels", "5"]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["adapter"] == "lora" and report["batch_size"] == 4 and report["max_length"] == 16
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_labels"] == 5 and manifest["config"]["r"] == 2
    assert (out / "program.pte").stat().st_size == manifest["program"]["bytes"] == report["program_bytes"]
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert "exists and is not empty" in _one_line_error(capsys, argv)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_export_of_a_model_it_cannot_adapt_fails_with_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                               tiny_model: str) -> None:
    line = _one_line_error(capsys, ["export", "--out", str(tmp_path / "a"), "--model", tiny_model,
                                    "--target-modules", "c_attn", "--num-labels", "3"])
    assert "no linear layer named ['c_attn']" in line and "query" in line
    line = _one_line_error(capsys, ["export", "--out", str(tmp_path / "b"), "--model", str(tmp_path / "missing"),
                                    "--num-labels", "3"])
    assert "cannot load model" in line
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
