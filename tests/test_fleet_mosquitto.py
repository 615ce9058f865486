"""Integration: the aggregator and real client processes through a real Mosquitto broker."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import TINY_AMOLE, spawn, tiny_task, whole_assignment, write_client_data, write_config

from aggregator.strategies import weighted_average
from aggregator.strategies.flexlora import svd_redistribute
from edgemole.mqtt import MqttLink
from edgemole.protocol import Kind, Message, Topics, decode, encode
from fleet.simulate import stop_processes

pytestmark = pytest.mark.mosquitto

Observed = list[tuple[str, Message, int]]


class Fleet:
    """Aggregator + clients as processes, plus an observer that records every fleet message."""

    def __init__(self, tmp: Path, broker: str, model: str, sizes: list[int], train: dict | None = None,
                 amole: dict | None = None, client_flags: dict[str, list[str]] | None = None,
                 rebuild: bool = True, **fleet: object) -> None:
        """``rebuild``: record assignments sent by version with their whole model, as the device rebuilds them
        (False: as they were on the wire)."""
        self.tmp, self.broker = tmp, broker
        files, labels = write_client_data(tmp, sizes)
        self.config = write_config(tmp / "config.json", model, labels, train, amole, min_clients=len(sizes),
                                   **fleet)
        self.files = files
        self.topics = Topics("t")
        self.observer = MqttLink(broker, "observer", clean_session=True)
        self.observer.connect(10)
        self.observer.subscribe(f"{self.topics.base}/#")
        self.observed: Observed = []
        self.caches: dict | None = {} if rebuild else None  # per client, the cache a listener keeps to rebuild
        self.summary_path = tmp / "summary.json"
        self.aggregator = spawn(["aggregator", "--broker", broker, "--config", str(self.config), "--json-out",
                                 str(self.summary_path)], tmp / "aggregator.log")
        self.clients = [
            spawn(["client", "--broker", broker, "--client-id", f"c{k}", "--data", str(tr), "--test-data", str(te),
                   "--fleet", "t", "--threads", "1", *(client_flags or {}).get(f"c{k}", [])], tmp / f"c{k}.log")
            for k, (tr, te) in enumerate(files)
        ]

    def run(self, on_message: Callable[[str, Message, bytes], None] | None = None, timeout_s: float = 240) -> dict:
        deadline = time.monotonic() + timeout_s
        try:
            while self.aggregator.poll() is None:
                assert time.monotonic() < deadline, "fleet did not finish in time: " + self.logs()
                inbound = self.observer.receive(0.2)
                if inbound is None or not inbound.payload:
                    continue
                try:
                    msg = decode(inbound.payload, 64 * 2**20)
                except Exception:  # the tests' own hostile payloads
                    continue
                if self.caches is not None:
                    msg = whole_assignment(self.caches, msg)  # as the device rebuilds one sent by version
                self.observed.append((inbound.topic, msg, len(inbound.payload)))
                if on_message:
                    on_message(inbound.topic, msg, inbound.payload)
            assert self.aggregator.returncode == 0, self.logs()
            return json.loads(self.summary_path.read_text())
        finally:
            stop_processes([self.aggregator, *self.clients])
            self.observer.close()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.tmp.glob("*.log")))

    def messages(self, kind: Kind, round_: int) -> dict[str, Message]:
        return {m.client: m for _, m, _ in self.observed if m.kind == kind and m.round == round_}


def test_global_adapter_is_sample_weighted_average_of_client_adapters(tmp_path: Path, mosquitto: str,
                                                                      tiny_model: str) -> None:
    fleet = Fleet(tmp_path, mosquitto, tiny_model, sizes=[20, 45, 80])
    summary = fleet.run()
    updates = fleet.messages(Kind.UPDATE, 1)
    assign1 = fleet.messages(Kind.ASSIGN, 1)
    assign2 = fleet.messages(Kind.ASSIGN, 2)
    assert sorted(updates) == ["c0", "c1", "c2"] and sorted(assign2) == ["c0", "c1", "c2"]
    # each device trains on its data less the 10% validation split it holds out (docs/deployed-model.md)
    assert [updates[c].body["num_samples"] for c in ("c0", "c1", "c2")] == [18, 41, 72]
    names = sorted(assign2["c0"].tensors)
    assert any(n.endswith("lora_A") for n in names) and "head.weight" in names
    for name in names:
        clients = [updates[c] for c in ("c0", "c1", "c2")]
        expected = weighted_average([u.tensors[name] for u in clients], [u.body["num_samples"] for u in clients])
        assert torch.allclose(assign2["c1"].tensors[name], expected, atol=1e-6), name
        # the clients really trained: their B factors moved away from the global start and from each other
        if name.endswith("lora_B"):
            assert not torch.equal(clients[0].tensors[name], assign1["c0"].tensors[name])
            assert not torch.equal(clients[0].tensors[name], clients[2].tensors[name])
    # every client received the same global adapter
    for name in names:
        assert torch.equal(assign2["c0"].tensors[name], assign2["c2"].tensors[name])
    # byte counts in the summary are the payload sizes seen on the wire
    seen_up = sum(size for _, m, size in fleet.observed if m.kind == Kind.UPDATE and m.round == 1)
    assert summary["rounds"][0]["bytes_up"] == seen_up
    assert summary["rounds"][0]["answered"] == ["c0", "c1", "c2"]
    assert summary["final"]["phase"] == "eval" and len(summary["final"]["answered"]) == 3
    assert summary["rejected"] == {}


def test_client_killed_mid_round_does_not_stall_the_round(tmp_path: Path, mosquitto: str, tiny_model: str) -> None:
    deadline_s = 20.0
    # local training long enough (hundreds of steps) that the victim is surely mid-round when killed
    fleet = Fleet(tmp_path, mosquitto, tiny_model, sizes=[40, 40, 40], train={"local_steps": 300}, rounds=1,
                  quorum=0.5, round_deadline_s=deadline_s)
    killed: list[int] = []

    def kill_on_assign(topic: str, msg: Message, payload: bytes) -> None:
        if msg.kind == Kind.ASSIGN and msg.client == "c2" and msg.round == 1 and not killed:
            os.kill(fleet.clients[2].pid, signal.SIGKILL)
            killed.append(msg.round)

    summary = fleet.run(kill_on_assign)
    first = summary["rounds"][0]
    assert killed == [1]
    assert first["selected"] == ["c0", "c1", "c2"]
    assert "c2" not in first["answered"] and len(first["answered"]) == 2
    assert first["wall_s"] < deadline_s + 5.0, "round waited past its deadline for a dead client"
    assert summary["final"]["answered"] == ["c0", "c1"]


def test_hostile_updates_are_rejected_and_the_round_completes(tmp_path: Path, mosquitto: str,
                                                             tiny_model: str) -> None:
    fleet = Fleet(tmp_path, mosquitto, tiny_model, sizes=[30, 30, 30], max_message_bytes=2 * 2**20)
    attacker = MqttLink(mosquitto, "attacker", clean_session=True)
    attacker.connect(10)
    sent: list[str] = []

    def attack(topic: str, msg: Message, payload: bytes) -> None:
        if msg.kind != Kind.ASSIGN or msg.round != 1 or msg.client != "c0" or sent:
            return
        run = msg.body["run"]
        good = {k: v.clone() for k, v in msg.tensors.items()}
        nan = {k: v.clone() for k, v in good.items()}
        next(iter(nan.values()))[0] = float("nan")
        wrong_shape = {k: torch.zeros(3, 3) for k in good}

        def update(client: str, tensors: dict, round_: int = 1, body: dict | None = None) -> bytes:
            body = body or {"run": run, "num_samples": 10, "metrics": {}}
            return encode(Message(Kind.UPDATE, "t", round_, "train", client, body, tensors, msg.roles))

        hostile = {
            "garbage": (fleet.topics.update("c0"), os.urandom(500)),
            "nan": (fleet.topics.update("c1"), update("c1", nan)),
            "shape": (fleet.topics.update("c1"), update("c1", wrong_shape)),
            "stale": (fleet.topics.update("c2"), update("c2", good, round_=0)),
            "unknown-client": (fleet.topics.update("intruder"), update("intruder", good)),
            "spoofed-client": (fleet.topics.update("c2"), update("c1", good)),
            "other-run": (fleet.topics.update("c2"), update("c2", good, body={"run": "x", "num_samples": 5})),
            "oversized": (fleet.topics.update("c2"), b"\0" * (3 * 2**20)),
            "status-garbage": (fleet.topics.status("c1"), b"not safetensors"),
        }
        for name, (t, p) in hostile.items():
            attacker.publish(t, p)
            sent.append(name)

    try:
        summary = fleet.run(attack)
    finally:
        attacker.close()
    assert len(sent) == 9
    # the oversized one never reaches the aggregator: its MQTT 5 Maximum Packet Size makes the broker drop it
    assert summary["rejected"].get("update", 0) >= 7
    assert summary["rejected"].get("status", 0) >= 1
    # every honest client was still accepted in both rounds, and the average is untouched by the attack
    assert [r["answered"] for r in summary["rounds"]] == [["c0", "c1", "c2"]] * 2
    assign2 = fleet.messages(Kind.ASSIGN, 2)
    # the honest updates are the ones with 27 samples: 30 less the validation split (every forged one claims 5 or 10)
    real = {m.client: m for _, m, _ in fleet.observed
            if m.kind == Kind.UPDATE and m.round == 1 and m.body.get("num_samples") == 27}
    assert sorted(real) == ["c0", "c1", "c2"]
    for name, value in assign2["c0"].tensors.items():
        expected = weighted_average([real[c].tensors[name] for c in sorted(real)], [27, 27, 27])
        assert torch.allclose(value, expected, atol=1e-6), name


def _wait_for(link: MqttLink, predicate: Callable[[Message, bool], bool], timeout_s: float, why: str) -> Message:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        inbound = link.receive(0.2)
        if inbound is None or not inbound.payload:
            continue
        msg = decode(inbound.payload)
        if predicate(msg, inbound.retain):
            return msg
    raise AssertionError(f"timed out waiting for {why}")


def test_clients_serve_consecutive_runs_and_ignore_a_finished_runs_retained_end(
        tmp_path: Path, mosquitto: str, tiny_model: str) -> None:
    files, labels = write_client_data(tmp_path, [20, 20])
    config = write_config(tmp_path / "config.json", tiny_model, labels, rounds=1, min_clients=2)
    watch = MqttLink(mosquitto, "watch", clean_session=True)
    watch.connect(10)
    watch.subscribe(Topics("t").all_status, Topics("t").round)
    service = [spawn(["client", "--broker", mosquitto, "--client-id", f"s{k}", "--data", str(tr), "--test-data",
                      str(te), "--fleet", "t", "--keep-serving"], tmp_path / f"s{k}.log")
               for k, (tr, te) in enumerate(files)]
    procs = list(service)
    try:
        runs = []
        for i in range(2):  # the same two long-running device services take part in two runs
            agg = spawn(["aggregator", "--broker", mosquitto, "--config", str(config), "--json-out",
                         str(tmp_path / f"run{i}.json")], tmp_path / f"agg{i}.log")
            procs.append(agg)
            assert agg.wait(120) == 0, (tmp_path / f"agg{i}.log").read_text()[-2000:]
            summary = json.loads((tmp_path / f"run{i}.json").read_text())
            assert summary["rounds"][0]["answered"] == ["s0", "s1"]
            runs.append(summary["run"])
        assert runs[0] != runs[1] and all(p.poll() is None for p in service)
        # a device that connects after run 2 ended sees its retained task and "done": it must wait, not exit
        tr, te = files[0]
        late = spawn(["client", "--broker", mosquitto, "--client-id", "late", "--data", str(tr), "--test-data",
                      str(te), "--fleet", "t"], tmp_path / "late.log")
        procs.append(late)
        _wait_for(watch, lambda m, _: m.kind == Kind.STATUS and m.client == "late" and m.body.get("state") == "ready"
                  and m.body.get("run") == runs[1], 60, "the late client to load the finished run's task")
        time.sleep(1.0)
        assert late.poll() is None, (tmp_path / "late.log").read_text()[-2000:]
        for p in service:
            p.send_signal(signal.SIGTERM)
            assert p.wait(30) == 0
        cfg3 = write_config(tmp_path / "config3.json", tiny_model, labels, rounds=1, min_clients=1)
        agg = spawn(["aggregator", "--broker", mosquitto, "--config", str(cfg3), "--json-out",
                     str(tmp_path / "run3.json")], tmp_path / "agg3.log")
        procs.append(agg)
        assert agg.wait(120) == 0, (tmp_path / "agg3.log").read_text()[-2000:]
        assert json.loads((tmp_path / "run3.json").read_text())["rounds"][0]["answered"] == ["late"]
        assert late.wait(30) == 0  # without --keep-serving it exits once the run it joined is over
    finally:
        stop_processes(procs)
        watch.close()


def test_fedamole_fleet_gives_devices_their_own_expert_sets(tmp_path: Path, mosquitto: str, tiny_model: str) -> None:
    fleet = Fleet(tmp_path, mosquitto, tiny_model, sizes=[30, 30, 30, 30], method="fedamole", rounds=3,
                  amole={"experts": 4, "slots": 3, "holders": 2, "top_k": 2})
    summary = fleet.run()
    clients = ["c0", "c1", "c2", "c3"]
    records = [*summary["rounds"], summary["final"]]
    for record in records:
        sets = record["experts"]
        assert sorted(sets) == clients
        for module in sets["c0"]:
            held = [sets[c][module] for c in clients]
            assert all(2 <= len(ids) <= 3 for ids in held)
            assert [sum(e in ids for ids in held) for e in range(4)] == [2, 2, 2, 2]
    # after reverse selection the devices' architectures differ
    assert records[-1]["distinct_architectures"] > 1
    for rnd in (1, 2, 3):
        assigns = fleet.messages(Kind.ASSIGN, rnd)
        updates = fleet.messages(Kind.UPDATE, rnd)
        sets = summary["rounds"][rnd - 1]["experts"]
        for c in clients:
            # a device downloads exactly its own experts and uploads exactly what it trained plus RSEA vectors
            sent = {n.split(".expert.")[1].split(".")[0] for n in assigns[c].tensors if ".expert." in n}
            mods = {n.split(".expert.")[0] for n in assigns[c].tensors if ".expert." in n}
            assert {int(e) for e in sent} == {e for m in mods for e in sets[c][m]}
            assert assigns[c].body["experts"] == sets[c]
            trained = {n for n in updates[c].tensors if ".embed." not in n}
            assert trained == set(assigns[c].tensors)
            assert sum(".embed.token" in n for n in updates[c].tensors) == len(sets[c])
    assert summary["rejected"] == {}


def test_ffa_lora_fleet_sends_only_b_and_keeps_a(tmp_path: Path, mosquitto: str, tiny_model: str) -> None:
    fleet = Fleet(tmp_path, mosquitto, tiny_model, sizes=[20, 40, 30], method="ffa-lora")
    summary = fleet.run()
    assign1, assign2 = fleet.messages(Kind.ASSIGN, 1), fleet.messages(Kind.ASSIGN, 2)
    updates = fleet.messages(Kind.UPDATE, 1)
    assert all(set(u.roles.values()) == {"lora_B", "head"} for u in updates.values())
    for name, value in assign2["c0"].tensors.items():
        if name.endswith("lora_A"):
            assert torch.equal(value, assign1["c0"].tensors[name])
        else:
            clients = [updates[c] for c in ("c0", "c1", "c2")]
            expected = weighted_average([u.tensors[name] for u in clients], [20, 40, 30])
            assert torch.allclose(value, expected, atol=1e-6), name
    assert summary["rejected"] == {}


def test_flexlora_fleet_with_per_device_ranks_averages_products(tmp_path: Path, mosquitto: str,
                                                               tiny_model: str) -> None:
    ranks = {"c0": 4, "c1": 2, "c2": 1}  # each device's own rank, from its own flag (the fleet's r is 4)
    fleet = Fleet(tmp_path, mosquitto, tiny_model, sizes=[20, 40, 30], method="flexlora",
                  client_flags={c: ["--upload-rank", str(k)] for c, k in ranks.items()})
    summary = fleet.run()
    updates = fleet.messages(Kind.UPDATE, 1)
    assigned, following = fleet.messages(Kind.ASSIGN, 1)["c0"].tensors, fleet.messages(Kind.ASSIGN, 2)["c0"].tensors
    modules = [n[: -len(".lora_A")] for n in assigned if n.endswith(".lora_A")]
    for c, u in updates.items():
        assert u.body["metrics"].get("client_rank", 4) == ranks[c]
        for m in modules:
            assert u.tensors[f"{m}.lora_A"].shape[0] == u.tensors[f"{m}.lora_B"].shape[1] == ranks[c]
    scaling = 8.0 / 4
    for m in modules:
        avg = sum(n / 90 * scaling * updates[c].tensors[f"{m}.lora_B"].double() @ updates[c].tensors[f"{m}.lora_A"]
                  .double() for c, n in (("c0", 20), ("c1", 40), ("c2", 30)))
        B, A = svd_redistribute(avg, 4, scaling)
        got = scaling * following[f"{m}.lora_B"].double() @ following[f"{m}.lora_A"].double()
        assert torch.allclose(got, scaling * B.double() @ A.double(), atol=1e-5), m
    # a device of rank 1 sends a quarter of the factors' entries of a rank-4 device
    sizes = {m.client: size for _, m, size in fleet.observed if m.kind == Kind.UPDATE and m.round == 1}
    assert sizes["c2"] < sizes["c1"] < sizes["c0"]
    assert summary["rounds"][0]["client_rank_min"] == 1 and summary["rounds"][0]["client_rank_max"] == 4
    assert summary["rejected"] == {}


def test_lora_a2_fleet_alternates_factors_and_uploads_only_selected_ranks(tmp_path: Path, mosquitto: str,
                                                                          tiny_model: str) -> None:
    budgets = {"c0": 4, "c1": 2, "c2": 1}  # heterogeneous upload ranks, from each device's own flag
    fleet = Fleet(tmp_path, mosquitto, tiny_model, sizes=[20, 40, 30], method="lora-a2", rounds=4,
                  client_flags={c: ["--upload-rank", str(b)] for c, b in budgets.items()})
    summary = fleet.run()
    assert [r["phase"] for r in summary["rounds"]] == ["train-B", "train-A", "train-B", "train-A"]
    weights = {"c0": 20, "c1": 40, "c2": 30}
    for rnd in (1, 2, 3, 4):
        assigned = fleet.messages(Kind.ASSIGN, rnd)["c0"].tensors
        following = fleet.messages(Kind.ASSIGN, rnd + 1)["c0"].tensors
        updates = fleet.messages(Kind.UPDATE, rnd)
        active, frozen = ("lora_B", "lora_A") if rnd % 2 else ("lora_A", "lora_B")
        modules = [n[: -len(".lora_A")] for n in assigned if n.endswith(".lora_A")]
        for c, u in updates.items():
            assert {u.roles[n] for n in u.tensors} <= {active, "ranks", "head"}
            assert sum(t.numel() for n, t in u.tensors.items() if n.endswith(".ranks")) == budgets[c] * len(modules)
        for m in modules:
            # the frozen factor does not move; the active one moves by the zero-filled weighted sum of changes
            assert torch.equal(following[f"{m}.{frozen}"], assigned[f"{m}.{frozen}"])
            expected = assigned[f"{m}.{active}"].double().clone()
            for c, u in updates.items():
                if f"{m}.ranks" in u.tensors:
                    ranks = u.tensors[f"{m}.ranks"]
                    start = assigned[f"{m}.{active}"]
                    old = start[:, ranks] if active == "lora_B" else start[ranks]
                    change = (u.tensors[f"{m}.{active}"] - old).double() * weights[c] / 90
                    if active == "lora_B":
                        expected[:, ranks] += change
                    else:
                        expected[ranks] += change
            assert torch.allclose(following[f"{m}.{active}"].double(), expected, atol=1e-6), (rnd, m)
    # fewer bytes than FedIT's update (every factor in full), and fewer for a smaller budget
    full = fleet.messages(Kind.ASSIGN, 1)["c0"].tensors
    fedit_bytes = len(encode(Message(Kind.UPDATE, "t", 1, "train", "c0", {"run": "0" * 12}, full)))
    sizes = {(m.client, m.round): size for _, m, size in fleet.observed if m.kind == Kind.UPDATE and m.round <= 4}
    assert all(size < fedit_bytes for size in sizes.values())
    assert all(sizes["c2", rnd] < sizes["c1", rnd] < sizes["c0", rnd] for rnd in (1, 2, 3, 4))
    assert summary["rejected"] == {}


def test_fedamole_a2_fleet_alternates_and_selects_ranks_over_held_experts(tmp_path: Path, mosquitto: str,
                                                                          tiny_model: str) -> None:
    fleet = Fleet(tmp_path, mosquitto, tiny_model, sizes=[30, 30, 30, 30], method="fedamole-a2", rounds=4,
                  amole={"experts": 4, "slots": 3, "holders": 2, "top_k": 2})
    summary = fleet.run()
    assert [r["phase"] for r in summary["rounds"]] == ["train-B", "train-A", "train-B", "train-A"]
    for rnd in (1, 2, 3, 4):
        active, frozen = ("lora_B", "lora_A") if rnd % 2 else ("lora_A", "lora_B")
        assigns, updates = fleet.messages(Kind.ASSIGN, rnd), fleet.messages(Kind.UPDATE, rnd)
        for c, u in updates.items():
            # routers move with the A factors: sent (and trained) in A rounds only
            router = {"router"} if active == "lora_A" else set()
            assert {u.roles[n] for n in u.tensors} == {active, "ranks", "head", "embedding", *router}
            modules = {n.split(".embed.token")[0] for n in u.tensors if n.endswith(".embed.token")}
            # budget r_c x modules (r_c = r = 4), spread over the shared expert and every held expert
            assert sum(t.numel() for n, t in u.tensors.items() if n.endswith(".ranks")) == 4 * len(modules)
            sent = {n.rsplit(".", 1)[0] for n in u.tensors if n.endswith(".ranks")}
            held = {n.rsplit(".", 1)[0] for n in assigns[c].tensors if n.endswith(".lora_A")}
            assert sent <= held
        following = fleet.messages(Kind.ASSIGN, rnd + 1)
        for c in set(following) & set(assigns):  # frozen factors never move, whichever device holds them
            for n, t in following[c].tensors.items():
                if (n.endswith(frozen) or (frozen == "lora_A" and n.endswith(".router"))) and n in assigns[c].tensors:
                    assert torch.equal(t, assigns[c].tensors[n]), (rnd, n)
    assert summary["rejected"] == {}


@pytest.mark.parametrize("method", ["fedit", "fedamole-a2"])
def test_executorch_fleet_gives_the_eager_fleets_results(tmp_path: Path, mosquitto: str, tiny_model: str,
                                                         tiny_artifacts: dict[str, Path], method: str) -> None:
    """The same fleet twice, on its own broker each: clients on the exported program and clients on eager
    PyTorch send the same updates, so the aggregated adapters and accuracies agree."""
    from edgemole.broker import mosquitto_broker

    amole = TINY_AMOLE if method == "fedamole-a2" else None
    artifact = tiny_artifacts["amole" if amole else "lora"]
    runs = {}
    for engine in ("eager", "executorch"):
        directory = tmp_path / engine
        directory.mkdir()
        flags = ["--engine", engine, *(["--artifact", str(artifact)] if engine == "executorch" else [])]
        with mosquitto_broker(str(directory / "mosquitto.log")) as url:
            fleet = Fleet(directory, url, tiny_model, sizes=[20, 40, 30], train={"dropout": False}, amole=amole,
                          client_flags={f"c{k}": flags for k in range(3)}, method=method)
            runs[engine] = (fleet.run(), fleet)
    (eager, eager_fleet), (et, et_fleet) = runs["eager"], runs["executorch"]
    assert et["rejected"] == {} and [r["phase"] for r in et["rounds"]] == [r["phase"] for r in eager["rounds"]]
    for rnd in (2, 3):  # the models after rounds 1 and 2, as sent to each device
        ea, xa = eager_fleet.messages(Kind.ASSIGN, rnd), et_fleet.messages(Kind.ASSIGN, rnd)
        assert set(ea) == set(xa) == {"c0", "c1", "c2"}
        for c in ea:
            assert ea[c].body.get("experts") == xa[c].body.get("experts")
            for name, value in ea[c].tensors.items():
                assert torch.allclose(value, xa[c].tensors[name], atol=1e-4), (rnd, c, name)
    for a, b in zip(eager["rounds"] + [eager["final"]], et["rounds"] + [et["final"]], strict=True):
        assert a["accuracy_before"] == pytest.approx(b["accuracy_before"], abs=1e-9)
    updates = et_fleet.messages(Kind.UPDATE, 1)
    assert all(u.body["metrics"]["steps"] == 3 for u in updates.values())


def test_client_with_a_bad_artifact_reports_it_and_keeps_running(tmp_path: Path, mosquitto: str, tiny_model: str,
                                                                 tiny_artifacts: dict[str, Path]) -> None:
    import shutil

    from edgemole.artifact import DATA_FILE

    artifact = shutil.copytree(tiny_artifacts["lora"], tmp_path / "art")
    (artifact / DATA_FILE).write_bytes((artifact / DATA_FILE).read_bytes()[:1000])  # truncated base weights
    files, labels = write_client_data(tmp_path, [20])
    client = spawn(["client", "--broker", mosquitto, "--client-id", "c0", "--data", str(files[0][0]), "--fleet", "t",
                    "--engine", "executorch", "--artifact", str(artifact), "--threads", "1"], tmp_path / "c0.log")
    topics = Topics("t")
    link = MqttLink(mosquitto, "test-observer", clean_session=True)
    try:
        link.connect(10)
        link.subscribe(topics.status("c0"))
        task = tiny_task(tiny_model)
        link.publish(topics.task, encode(Message(Kind.TASK, "t", 0, body={"run": "r" * 12, "task": task.to_body()})),
                     retain=True)
        deadline, error = time.monotonic() + 60, None
        while time.monotonic() < deadline and error is None:
            inbound = link.receive(0.5)
            if inbound is not None and inbound.payload:
                body = decode(inbound.payload).body
                if body.get("state") == "error":
                    error = body["error"]
        assert error is not None, (tmp_path / "c0.log").read_text()[-2000:]
        assert "cannot train this task" in error and "base.ptd" in error and "truncated" in error
        time.sleep(1.0)
        assert client.poll() is None  # still serving
    finally:
        link.close()
        stop_processes([client], 5)
