"""The native client (devices/native) against the Python client on the ExecuTorch engine: the same round from the
same task, assignment, artifact, data and seed gives the same per-step losses and the same update."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import TINY_AMOLE, tiny_task, write_client_data
from native import native_build

from aggregator.strategies.lora_a2 import a2_expectation
from edge_client.client import ClientOptions, EdgeClient, deploys_trained
from edgemole.mqtt import Inbound
from edgemole.protocol import Kind, Message, Topics, decode, encode
from fleet.memory_link import RecordingLink

FLEET, RUN, CLIENT = "t", "run-1", "dev-0"
#: the share of the training rows held out to choose the deployed model, the same on both sides (the default)
VAL_FRACTION = 0.1


def _assignment(task, client: EdgeClient, phase: str, rnd: int, seed: int = 11,  # noqa: ANN001
                shifted: bool = False) -> Message:
    """A round's assignment with a random starting point (B != 0, so that every rank of both factors scores);
    ``shifted``: another expert set for the AMoLE methods (a later round's re-assignment)."""
    engine = client.engine
    assert engine is not None
    body: dict = {"run": RUN}
    if task.uses_experts:
        body["experts"] = {m: [0, 1, 3] if (i % 2) != shifted else [2, 3] for i, m in enumerate(engine.wire.layers)}
    full, roles = engine.wire.initial_fleet_state()
    spec = engine.expected_state(body)
    gen = torch.Generator().manual_seed(seed)
    tensors = {n: full[n] + 0.05 * torch.randn(full[n].shape, generator=gen) for n in spec}
    if phase in ("train-A", "train-B"):
        body["train_roles"] = a2_expectation(tensors, {n: s.role for n, s in spec.items()}, phase)[1]
    return Message(Kind.ASSIGN, FLEET, rnd, phase, CLIENT, body, tensors, {n: s.role for n, s in spec.items()})


def python_round(task, artifact: Path, data: tuple[Path, Path], phase: str, rnd: int,  # noqa: ANN001
                 upload_rank: int | None) -> tuple[bytes, bytes, bytes, list[float]]:
    """One round of the Python client on the ExecuTorch engine: task, assignment, update payloads and the
    per-step losses of its training (the probe excluded)."""
    task_payload, assigns, updates, losses = python_rounds(task, artifact, data, [(phase, rnd, 11, False)],
                                                           upload_rank)
    return task_payload, assigns[0], updates[0], losses


def python_rounds(task, artifact: Path, data: tuple[Path, Path],  # noqa: ANN001
                  rounds: list[tuple[str, int, int, bool]],
                  upload_rank: int | None) -> tuple[bytes, list[bytes], list[bytes], list[float]]:
    """Consecutive rounds (phase, round, seed and shifted of :func:`_assignment`) of one Python client on the
    ExecuTorch engine: task, assignment and update payloads, and the per-step losses of the last round's training."""
    link = RecordingLink()
    opts = ClientOptions(broker="mqtt://127.0.0.1:1", client_id=CLIENT, data=str(data[0]), test_data=str(data[1]),
                         fleet=FLEET, engine="executorch", artifact=artifact, threads=1, upload_rank=upload_rank,
                         val_fraction=VAL_FRACTION)
    client = EdgeClient(opts, link=link)
    topics = Topics(FLEET)
    task_payload = encode(Message(Kind.TASK, FLEET, body={"run": RUN, "task": task.to_body()}))
    client.handle(Inbound(topics.task, task_payload, True))
    losses: list[list[float]] = []
    train = client.engine.train

    def recording_train(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        stats = train(*args, **kwargs)
        losses.append(stats.losses)
        return stats

    client.engine.train = recording_train
    assigns = []
    for phase, rnd, seed, shifted in rounds:
        losses.clear()
        assigns.append(encode(_assignment(task, client, phase, rnd, seed, shifted)))
        client.handle(Inbound(topics.assign(CLIENT), assigns[-1], False))
    updates = [p for t, p in link.published if t == topics.update(CLIENT)]
    assert len(updates) == len(rounds), f"the Python client sent {len(updates)} updates (rejected {client.rejected})"
    return task_payload, assigns, updates, losses[-1] if losses else []


def native_round(tmp: Path, artifact: Path, data: tuple[Path, Path], task_payload: bytes,
                 assign_payload: bytes | list[bytes], upload_rank: int | None,
                 device: list[str] | None = None) -> tuple[bytes, list[float]]:
    """One round (or, given a list of assignment payloads, consecutive rounds) of the native client (``device``: the
    edgemole-device command, by default the x86-64 build) from saved task and assignment payloads; the (last)
    update payload and the per-step losses of the last round. Every message it sent is in tmp/published.jsonl."""
    device = device or [str(native_build() / "edgemole-device")]
    config = {"client_id": CLIENT, "fleet": FLEET, "artifact": str(artifact), "data": str(data[0]),
              "test_data": str(data[1]), "threads": 1, "upload_rank": upload_rank or 0, "val_fraction": VAL_FRACTION}
    (tmp / "device.json").write_text(json.dumps(config))
    (tmp / "task.st").write_bytes(task_payload)
    assigns: list[str] = []
    for k, payload in enumerate([assign_payload] if isinstance(assign_payload, bytes) else assign_payload):
        path = tmp / ("assign.st" if k == 0 else f"assign{k + 1}.st")
        path.write_bytes(payload)
        assigns += ["--assign", str(path)]
    proc = subprocess.run([*device, "round", "--config", str(tmp / "device.json"), "--task", str(tmp / "task.st"),
                           *assigns, "--out", str(tmp / "update.st"), "--losses", str(tmp / "losses.json"),
                           "--published", str(tmp / "published.jsonl")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return (tmp / "update.st").read_bytes(), json.loads((tmp / "losses.json").read_text())


CASES = [  # (method, phase, round, upload rank)
    ("fedit", "train", 1, None),
    ("ffa-lora", "train", 1, None),
    ("flexlora", "train", 1, 2),
    ("lora-a2", "train-B", 1, 1),
    ("lora-a2", "train-A", 2, 2),
    ("fedamole-a2", "train-B", 3, 1),
    ("fedamole-a2", "train-A", 4, 1),
    ("fedamole", "train", 1, None),
    ("fedit", "eval", 3, None),
]


@pytest.mark.parametrize("method, phase, rnd, upload_rank", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_native_round_equals_the_python_round(tmp_path: Path, tiny_model: str, tiny_artifacts: dict[str, Path],
                                              method: str, phase: str, rnd: int, upload_rank: int | None) -> None:
    amole = dict(TINY_AMOLE, dp_eta=0.5) if method == "fedamole" else TINY_AMOLE
    task = tiny_task(tiny_model, method, amole, weight_decay=0.01, local_steps=4)
    artifact = tiny_artifacts["amole" if task.uses_experts else "lora"]
    files, _ = write_client_data(tmp_path, [37])
    task_payload, assign_payload, py_update, py_losses = python_round(task, artifact, files[0], phase, rnd,
                                                                       upload_rank)
    native_update, native_losses = native_round(tmp_path, artifact, files[0], task_payload, assign_payload,
                                                 upload_rank)
    a, b = decode(py_update), decode(native_update)
    _assert_same_update(a, b, py_losses, native_losses, steps=4)
    assert "acc_trained" not in b.body["metrics"] and b.body["metrics"]["acc_deployed"] == a.body["metrics"][
        "acc_before"]  # a first round: nothing kept, the received model is deployed
    if phase in ("train-A", "train-B"):  # rank selection kept a strict subset of the ranks
        ranks = [n for n in a.tensors if n.endswith(".ranks")]
        assert ranks and sum(a.tensors[n].numel() for n in ranks) == a.body["metrics"]["ranks_uploaded"]


#: the metrics of the choice of the deployed model (docs/deployed-model.md), present from a device's second round
DEPLOYMENT_METRICS = ("acc_trained", "val_acc_trained", "val_acc_received", "deployed_trained", "acc_deployed")


def _assert_same_update(a: Message, b: Message, py_losses: list[float], native_losses: list[float],
                        steps: int) -> None:
    """The Python client's update ``a`` and the native client's ``b`` are the same (tensors to 1e-5, the same metric
    keys, the same accuracies and counts, the same choice of the deployed model)."""
    assert (b.kind, b.fleet, b.round, b.phase, b.client) == (a.kind, a.fleet, a.round, a.phase, a.client)
    assert b.body["num_samples"] == a.body["num_samples"] and b.body["run"] == RUN
    if a.phase != "eval":
        assert len(native_losses) == len(py_losses) == steps
        assert torch.allclose(torch.tensor(native_losses), torch.tensor(py_losses), rtol=1e-5, atol=0)
    assert sorted(b.tensors) == sorted(a.tensors) and b.roles == a.roles
    _assert_same_metrics(a.body["metrics"], b.body["metrics"])
    for name, t in a.tensors.items():
        if t.is_floating_point():
            assert torch.allclose(b.tensors[name], t, rtol=1e-5, atol=1e-6), name
        else:
            assert torch.equal(b.tensors[name], t), name


def _assert_same_metrics(a: dict, b: dict) -> None:
    assert set(b) == set(a)
    for key in ("acc_before", "acc_after", "num_test", "steps", "ranks_uploaded", "client_rank", *DEPLOYMENT_METRICS):
        assert b.get(key) == a.get(key), (key, a.get(key), b.get(key))


# (method, round 1, round 2 as (phase, round, seed, shifted) of _assignment, upload rank, the choice): the choice is
# what these seeds give on both sides (1.0: the kept model), so that both outcomes are covered
TWO_ROUNDS = [
    ("fedit", ("train", 1, 11, False), ("train", 2, 12, False), None, 1.0),
    ("fedit", ("train", 1, 11, False), ("eval", 2, 11, False), None, 1.0),
    ("lora-a2", ("train-B", 1, 11, False), ("train-A", 2, 13, False), 2, 1.0),
    ("fedamole-a2", ("train-B", 1, 11, False), ("train-A", 2, 12, True), 1, 0.0),
    ("fedamole", ("train", 1, 11, False), ("eval", 2, 12, True), None, 1.0),
]


@pytest.mark.parametrize("val_trained, val_received, expected", [(0.9, 0.8, True), (0.8, 0.9, False),
                                                                  (1.0, 1.0, True), (0.0, 0.0, True)])
def test_the_trained_model_is_deployed_when_at_least_as_accurate_on_validation(val_trained: float,
                                                                              val_received: float,
                                                                              expected: bool) -> None:
    """The rule both clients follow (docs/deployed-model.md): a tie deploys the trained model, the one fitted to the
    device's own data (ties are the norm on small validation splits that both models get right)."""
    assert deploys_trained(val_trained, val_received) is expected


@pytest.mark.parametrize("method, first, second, upload_rank, choice", TWO_ROUNDS,
                         ids=[f"{c[0]}-{c[1][0]}-then-{c[2][0]}" for c in TWO_ROUNDS])
def test_second_round_chooses_the_deployed_model_as_python_does(tmp_path: Path, tiny_model: str,
                                                                tiny_artifacts: dict[str, Path], method: str,
                                                                first: tuple, second: tuple,
                                                                upload_rank: int | None, choice: float) -> None:
    """Round 1 trains; round 2 (training or the final evaluation) evaluates the kept and the received model on the
    validation split (6 of the 60 rows) and reports the same accuracies and the same choice on both sides."""
    task = tiny_task(tiny_model, method, TINY_AMOLE, weight_decay=0.01, local_steps=6)
    artifact = tiny_artifacts["amole" if task.uses_experts else "lora"]
    files, _ = write_client_data(tmp_path, [60])
    task_payload, assigns, py_updates, py_losses = python_rounds(task, artifact, files[0], [first, second],
                                                                 upload_rank)
    native_update, native_losses = native_round(tmp_path, artifact, files[0], task_payload, assigns, upload_rank)
    published = [json.loads(line) for line in (tmp_path / "published.jsonl").read_text().splitlines()]
    native_first = [m for m in published if m["kind"] == "update"]
    assert [m["round"] for m in native_first] == [1, 2]
    _assert_same_metrics(decode(py_updates[0]).body["metrics"], native_first[0]["body"]["metrics"])
    a, b = decode(py_updates[1]), decode(native_update)
    _assert_same_update(a, b, py_losses, native_losses, steps=6)
    metrics = b.body["metrics"]
    assert set(DEPLOYMENT_METRICS) <= set(metrics)
    assert metrics["deployed_trained"] == choice
    chosen = metrics["acc_trained"] if metrics["deployed_trained"] else metrics["acc_before"]
    assert metrics["acc_deployed"] == chosen
    assert deploys_trained(metrics["val_acc_trained"], metrics["val_acc_received"]) == bool(metrics["deployed_trained"])


def test_bad_assignment_is_reported_and_changes_nothing(tmp_path: Path, tiny_model: str,
                                                       tiny_artifacts: dict[str, Path]) -> None:
    """An A round that would train both factors is rejected with a status line; no update is sent."""
    task = tiny_task(tiny_model, "lora-a2", TINY_AMOLE, local_steps=2)
    files, _ = write_client_data(tmp_path, [20])
    task_payload, assign_payload, _, _ = python_round(task, tiny_artifacts["lora"], files[0], "train-A", 2, 1)
    bad = decode(assign_payload)
    bad.body["train_roles"] = ["lora_A", "lora_B"]
    build = native_build()
    config = {"client_id": CLIENT, "fleet": FLEET, "artifact": str(tiny_artifacts["lora"]), "data": str(files[0][0]),
              "test_data": str(files[0][1])}
    (tmp_path / "device.json").write_text(json.dumps(config))
    (tmp_path / "task.st").write_bytes(task_payload)
    (tmp_path / "assign.st").write_bytes(encode(bad))
    proc = subprocess.run([str(build / "edgemole-device"), "round", "--config", str(tmp_path / "device.json"),
                           "--task", str(tmp_path / "task.st"), "--assign", str(tmp_path / "assign.st"),
                           "--out", str(tmp_path / "update.st"), "--published", str(tmp_path / "published.jsonl")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "sent no update (rejected 1 message(s))" in proc.stderr
    published = [json.loads(line) for line in (tmp_path / "published.jsonl").read_text().splitlines()]
    assert [m["kind"] for m in published] == ["status", "status"]
    assert published[0]["body"]["state"] == "ready"
    assert published[1]["body"]["state"] == "error"
    assert published[1]["body"]["error"] == "round 2: a train-A round must train lora_A and not lora_B"
    assert not (tmp_path / "update.st").exists()


def _break_tokenizer(directory: Path) -> None:
    raw = json.loads((directory / "tokenizer" / "tokenizer.json").read_text())
    raw["model"]["type"] = "BPE"
    (directory / "tokenizer" / "tokenizer.json").write_text(json.dumps(raw))


def _corrupt_base(directory: Path) -> None:
    data = bytearray((directory / "base.ptd").read_bytes())
    data[1000:1010] = b"\x00" * 10
    (directory / "base.ptd").write_bytes(bytes(data))


@pytest.mark.parametrize("fault, message", [
    ("unknown key", "unknown key 'colour'"),
    ("missing data", "does not exist"),
    ("no artifact", "no manifest.json"),
    ("corrupt base", "corrupt, truncated or from another export"),
    ("unsupported tokenizer", "BPE"),
    ("bad flag", "--threads has an invalid value"),
])
def test_fatal_configuration_errors_are_one_line(tmp_path: Path, tiny_artifacts: dict[str, Path], fault: str,
                                                 message: str) -> None:
    files, _ = write_client_data(tmp_path, [20])
    artifact = tmp_path / "artifact"
    shutil.copytree(tiny_artifacts["lora"], artifact)
    config = {"broker": "mqtt://127.0.0.1:1", "client_id": CLIENT, "artifact": str(artifact),
              "data": str(files[0][0])}
    flags: list[str] = []
    if fault == "unknown key":
        config["colour"] = "red"
    elif fault == "missing data":
        config["data"] = str(tmp_path / "nope.csv")
    elif fault == "no artifact":
        config["artifact"] = str(tmp_path)
    elif fault == "corrupt base":
        _corrupt_base(artifact)
    elif fault == "unsupported tokenizer":
        _break_tokenizer(artifact)
    else:
        flags = ["--threads", "many"]
    (tmp_path / "device.json").write_text(json.dumps(config))
    proc = subprocess.run([str(native_build() / "edgemole-device"), "--config", str(tmp_path / "device.json"),
                           *flags], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr


def test_predict_answers_with_the_deployed_model(tmp_path: Path, tiny_model: str,
                                                 tiny_artifacts: dict[str, Path]) -> None:
    task = tiny_task(tiny_model, "fedamole-a2", TINY_AMOLE, local_steps=2)
    artifact = tiny_artifacts["amole"]
    files, labels = write_client_data(tmp_path, [20])
    task_payload, assign_payload, _, _ = python_round(task, artifact, files[0], "train-B", 1, 1)
    build = native_build()
    state = tmp_path / "state"
    state.mkdir()
    config = {"client_id": CLIENT, "fleet": FLEET, "artifact": str(artifact), "data": str(files[0][0]),
              "test_data": str(files[0][1]), "state_dir": str(state)}
    (tmp_path / "device.json").write_text(json.dumps(config))
    predict = [str(build / "edgemole-device"), "predict", "--config", str(tmp_path / "device.json")]
    early = subprocess.run([*predict, "hello"], capture_output=True, text=True, timeout=60)
    assert early.returncode == 2 and "no deployed model" in early.stderr
    (tmp_path / "task.st").write_bytes(task_payload)
    (tmp_path / "assign.st").write_bytes(assign_payload)
    subprocess.run([str(build / "edgemole-device"), "round", "--config", str(tmp_path / "device.json"),
                    "--task", str(tmp_path / "task.st"), "--assign", str(tmp_path / "assign.st"),
                    "--out", str(tmp_path / "update.st")], check=True, capture_output=True, timeout=120)
    proc = subprocess.run([*predict, "I need to cancel my appointment", "where is my card"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    answers = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(answers) == 2
    for answer in answers:
        assert answer["label"] in labels and answer["round"] == 1
        assert abs(sum(answer["probabilities"].values()) - 1) < 1e-5
        assert answer["probability"] == max(answer["probabilities"].values())
    piped = subprocess.run([*predict, "-"], input="I need to cancel my appointment\n", capture_output=True,
                           text=True, timeout=60)
    assert json.loads(piped.stdout)["probabilities"] == answers[0]["probabilities"]
