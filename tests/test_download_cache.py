"""Download by version (edgemole/protocol/delta.py, docs/protocol.md 4.4.1): a device with a download cache is sent
only what it does not hold, and every model it rebuilds is bit-identical to the one sent whole."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY_AMOLE, initial_versions, task_wire, write_client_data, write_config

from aggregator.service import AggregatorService
from edge_client.client import ClientOptions, EdgeClient
from edge_client.engines import make_engine
from edgemole.adapters.amole.model import ROUTER_ROLE
from edgemole.config import TaskSpec, load_settings
from edgemole.errors import ProtocolError
from edgemole.protocol import Topics, decode
from edgemole.protocol.delta import (
    INITIAL,
    MODEL,
    PATCH_MARK,
    CacheMiss,
    DownloadRecord,
    Version,
    apply_download,
    encode_download,
    parse_initial,
    parse_model_digest,
    patch_pays,
    remember,
    state_digest,
    tensor_digest,
    versions_of,
)
from fleet.memory_link import MemoryBroker, MemoryLink

A, B = "m.lora_A", "m.lora_B"
_CHECK, _DOWNLOAD = EdgeClient._check_assignment, EdgeClient._download
ROLES = {A: "lora_A", B: "lora_B", "head.bias": "head"}


def _model(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {A: torch.randn(8, 64, generator=g), B: torch.randn(64, 8, generator=g), "head.bias": torch.randn(3,
                                                                                                     generator=g)}


def _held(tensors: dict[str, torch.Tensor]) -> dict[str, Version]:
    held: dict[str, Version] = {}
    remember(held, tensors, ROLES)
    return held


def _bits(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    return {n: tensor_digest(t) for n, t in tensors.items()}


# -- the formulas ------------------------------------------------------------------------------------------------
def test_digest_covers_dtype_shape_and_every_bit() -> None:
    t = torch.zeros(2, 3)
    assert len(tensor_digest(t)) == 16 and tensor_digest(t) == tensor_digest(torch.zeros(2, 3))
    assert tensor_digest(t) != tensor_digest(torch.zeros(3, 2))
    assert tensor_digest(t) != tensor_digest(torch.zeros(2, 3, dtype=torch.float16))
    negative_zero = t.clone()
    negative_zero[1, 2] = -0.0  # equal as numbers, not as bits
    assert tensor_digest(negative_zero) != tensor_digest(t)
    assert tensor_digest(torch.arange(6.0).reshape(2, 3).t()) == tensor_digest(torch.tensor([[0.0, 3], [1, 4],
                                                                                             [2, 5]]))
    # the documented formula (docs/protocol.md 4.4.1), as another implementation would compute it
    import hashlib
    x = torch.tensor([[0.5, -1.0]])
    assert tensor_digest(x) == hashlib.sha256(b"F32;1,2;" + bytes.fromhex("0000003f000080bf")).hexdigest()[:16]


def test_keep_patch_and_full() -> None:
    old = _model()
    new = {n: t.clone() for n, t in old.items()}
    new[A][[1, 5]] += 1.0  # two rows of A: a patch
    new[B][:, 2] = -0.0 * new[B][:, 2].abs()  # one column of B, changed in sign bits only: a patch
    new["head.bias"] += 1  # no rank axis: whole
    payload, roles, model = encode_download(new, ROLES, _held(old))
    assert set(payload) == {A + "@1,5", B + "@2", "head.bias"}  # one entry per patch, its slice indices in its name
    assert torch.equal(payload[A + "@1,5"], new[A][[1, 5]]) and torch.equal(payload[B + "@2"], new[B][:, [2]])
    assert set(roles) == {"head.bias"}  # a patch carries no role: the tensor keeps the one it is held with
    assert model == state_digest(versions_of(new, ROLES))  # one digest of the whole model, whatever travels
    out, out_roles, digests = apply_download(_held(old), payload, roles, set(new), model)
    assert _bits(out) == _bits(new) == digests and out_roles == ROLES
    # the same model again: nothing travels, and the rebuilt tensors are copies, not the cache's
    held = _held(new)
    payload, roles, model = encode_download(new, ROLES, held)
    assert payload == {} and model == state_digest(versions_of(new, ROLES))
    out, _, _ = apply_download(held, payload, roles, set(new), model)
    out[A].add_(1)
    assert held[A].digest == tensor_digest(held[A].tensor)
    # nothing held, or most slices changed: whole tensors under their own names
    assert set(encode_download(new, ROLES, {})[0]) == set(new)
    changed = {**new, A: new[A] + 1}
    assert A in encode_download(changed, ROLES, held)[0]
    # a role that differs from the held one is never kept
    assert set(encode_download(new, {**ROLES, "head.bias": "other"}, held)[0]) == {"head.bias"}


def test_a_tiny_slice_travels_whole_when_a_patch_would_be_larger() -> None:
    old = {A: torch.zeros(4, 1, dtype=torch.float16)}  # 2-byte slices: the indices in the name cost more
    new = {A: torch.tensor([[0.0], [0], [1], [1]], dtype=torch.float16)}
    payload, _, _ = encode_download(new, ROLES, _held(old))
    assert set(payload) == {A}
    # the rule: slices plus the name's index text below the whole tensor; 4-byte slices pay from one slice of two
    assert patch_pays(torch.zeros(2, 1), 0, [1]) and not patch_pays(torch.zeros(2, 1), 0, [0, 1])
    assert not patch_pays(torch.zeros(4, 1, dtype=torch.float16), 0, [2, 3])


def test_missing_or_mismatching_tensors_are_a_cache_miss() -> None:
    old, new = _model(0), _model(0)
    new[A][3] += 1
    payload, roles, model = encode_download(new, ROLES, _held(old))
    with pytest.raises(CacheMiss, match="neither sent nor held"):
        apply_download({}, payload, roles, set(new), model)  # a device that lost its cache (restart)
    with pytest.raises(CacheMiss, match="neither sent nor held"):
        apply_download({}, {}, {}, {B}, model)
    stale = _held(_model(1))
    with pytest.raises(CacheMiss, match="does not match"):
        apply_download(stale, payload, roles, set(new), model)  # a cache that is not what the aggregator thinks
    with pytest.raises(CacheMiss, match="no held version"):
        patch = {n: t for n, t in payload.items() if n.startswith(A + PATCH_MARK)}
        apply_download({B: _held(old)[B]}, patch, roles, {A, B}, model)
    with pytest.raises(CacheMiss, match="does not match"):
        apply_download(_held(old), payload, roles, set(new), "0" * 16)  # the aggregator meant another model
    # the body implies a model with a tensor more than the aggregator's (held from an earlier round): the digest tells
    with pytest.raises(CacheMiss, match="does not match"):
        apply_download({**_held(old), "x.bias": _held({"x.bias": torch.zeros(2)})["x.bias"]}, payload, roles,
                       {*new, "x.bias"}, model)


def _renamed(payload: dict, name: str) -> None:
    payload[name] = payload.pop(A + "@3")


@pytest.mark.parametrize("mutate, needle", [
    (lambda p: p.update({"x@0": torch.zeros(1)}), "travel once"),  # a patch of a tensor the model does not have
    (lambda p: p.update({"x.bias": torch.zeros(1)}), "travel once"),  # a whole one likewise
    (lambda p: p.update({A: torch.zeros(8, 64)}), "travel once"),  # whole and patched
    (lambda p: p.update({A + "@4": torch.zeros(1, 64)}), "travel once"),  # patched twice
    (lambda p: _renamed(p, A + "@3,3"), "increasing"),
    (lambda p: _renamed(p, A + "@4,3"), "increasing"),
    (lambda p: _renamed(p, A + "@3,8"), "not below the held size 8"),
    (lambda p: _renamed(p, A + "@"), "slice indices"),
    (lambda p: _renamed(p, A + "@03"), "slice indices"),
    (lambda p: _renamed(p, A + "@-1"), "slice indices"),
    (lambda p: _renamed(p, A + "@3.0"), "slice indices"),
    (lambda p: _renamed(p, A + "@3@3"), "slice indices"),
    (lambda p: _renamed(p, A + "@" + "9" * 400), "slice indices"),
    (lambda p: p.update({A + "@3": torch.zeros(1, 63)}), "has shape"),
    (lambda p: p.update({A + "@3": torch.zeros(1, 64, dtype=torch.float16)}), "has shape"),
])
def test_malformed_payloads_are_protocol_errors(mutate, needle: str) -> None:  # noqa: ANN001
    old = _model()
    new = {**old, A: old[A].clone(), "head.bias": old["head.bias"] + 1}
    new[A][3] += 1
    payload, roles, model = encode_download(new, ROLES, _held(old))
    assert A + "@3" in payload
    mutate(payload)
    with pytest.raises(ProtocolError, match=needle) as exc:
        apply_download(_held(old), payload, roles, set(new), model)
    assert not isinstance(exc.value, CacheMiss)  # a re-send would not help: rejected, not recovered


def test_a_role_given_for_a_patch_is_rejected() -> None:
    old = _model()
    new = {**old, A: old[A].clone()}
    new[A][3] += 1
    payload, roles, model = encode_download(new, ROLES, _held(old))
    with pytest.raises(ProtocolError, match="carries no role"):
        apply_download(_held(old), payload, {**roles, A + "@3": "lora_A"}, set(new), model)


def test_a_patch_against_a_version_held_with_another_role_is_a_cache_miss() -> None:
    old = _model()
    new = {**old, A: old[A].clone()}
    new[A][3] += 1
    payload, roles, model = encode_download(new, ROLES, _held(old))
    held = _held(old)
    held[A] = held[A]._replace(role=ROUTER_ROLE)  # held with another role (same rank axis) than the aggregator meant
    with pytest.raises(CacheMiss, match="does not match"):
        apply_download(held, payload, roles, set(new), model)


@pytest.mark.parametrize("body", [{MODEL: []}, {MODEL: "x"}, {MODEL: "A" * 16}, {MODEL: 1}, {MODEL: {A: "0" * 16}}])
def test_bad_model_field(body: dict) -> None:
    with pytest.raises(ProtocolError, match="16 lower-case hex"):
        parse_model_digest(body)
    assert parse_model_digest({}) is None and parse_model_digest({MODEL: "0" * 16}) == "0" * 16


def test_record_shares_one_copy_and_is_safe_from_later_changes() -> None:
    record = DownloadRecord()
    model = _model()
    for client in ("c1", "c2"):
        assert set(record.encode(client, model, ROLES)[0]) == set(model)
    assert record.holds("c1")[A].tensor is record.holds("c2")[A].tensor  # one copy per digest
    model[A].add_(1)  # the strategy changes its tensors in place: the record keeps what was sent
    assert record.holds("c1")[A].digest == tensor_digest(record.holds("c1")[A].tensor)
    assert set(record.encode("c1", model, ROLES)[0]) == {A}
    record.forget("c1")
    assert set(record.encode("c1", model, ROLES)[0]) == set(model)


def test_state_digest_names_every_tensor_role_and_bit() -> None:
    model = _model()
    base = state_digest(versions_of(model, ROLES))
    assert parse_initial({INITIAL: base}) == base and parse_initial({}) is None
    changed = {**model, A: model[A].clone()}
    changed[A][0, 0] += 1
    assert state_digest(versions_of(changed, ROLES)) != base
    assert state_digest(versions_of(model, {**ROLES, A: "lora_B"})) != base
    assert state_digest(versions_of({n: t for n, t in model.items() if n != A}, ROLES)) != base
    for bad in ("xyz", 7, base.upper(), base + "0"):
        with pytest.raises(ProtocolError, match=INITIAL):
            parse_initial({INITIAL: bad})


# -- whole fleets in memory --------------------------------------------------------------------------------------
@dataclass
class Fleet:
    summary: dict[str, Any]
    state: dict[str, torch.Tensor]
    #: (client, round, phase) -> digests and roles of the model the device loaded
    received: dict[tuple[str, int, str], tuple[dict[str, str], dict[str, str]]]
    clients: dict[str, EdgeClient]
    assigns: list[tuple[str, bytes]] = field(default_factory=list)


@pytest.fixture(scope="module")
def fleet_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[tuple[Path, Path]], list[str]]:
    return write_client_data(tmp_path_factory.mktemp("dl-data"), [24, 24, 24])


def _run(tmp_path: Path, model: str, data: tuple[list[tuple[Path, Path]], list[str]], method: str, cache: bool,
         monkeypatch: pytest.MonkeyPatch, clear: tuple[str, int] | None = None, rounds: int = 3,
         dropout: bool = False) -> Fleet:
    """One in-memory fleet of three devices (upload ranks 1, 1, 2 of r = 4), recording what every device loaded;
    ``clear`` = (device, round): that device's cache is emptied just before it rebuilds that round's assignment."""
    files, labels = data
    path = write_config(tmp_path / f"{method}-{cache}.json", model, labels, {"local_steps": 2, "dropout": dropout},
                        TINY_AMOLE, method=method, rounds=rounds)
    settings = load_settings(path)
    task = settings.task(labels)
    topics = Topics(settings.fleet.fleet, settings.fleet.topic_prefix)
    broker = MemoryBroker()
    fleet = Fleet({}, {}, {}, {})
    route = broker.route
    broker.route = lambda topic, payload, retain: (  # type: ignore[method-assign]
        fleet.assigns.append((topic, payload)) if topic.endswith("/assign") else None, route(topic, payload, retain))
    engine: dict[str, Any] = {}

    def engines(t: TaskSpec):  # noqa: ANN202 - one engine for all devices, as the bench shares one
        if engine.get("task") != t:
            engine.update(task=t, engine=make_engine("eager", t, threads=1))
        return engine["engine"]

    def recording_check(self: EdgeClient, msg):  # noqa: ANN001, ANN202
        fleet.received[(self.opts.client_id, msg.round, msg.phase)] = (_bits(msg.tensors), dict(msg.roles))
        return _CHECK(self, msg)

    def clearing_download(self: EdgeClient, msg) -> bool:  # noqa: ANN001
        if clear == (self.opts.client_id, msg.round) and self.cache_misses == 0:
            self.cache.clear()
        return _DOWNLOAD(self, msg)

    monkeypatch.setattr(EdgeClient, "_check_assignment", recording_check)
    monkeypatch.setattr(EdgeClient, "_download", clearing_download)
    service = AggregatorService(settings.fleet, task, link=MemoryLink(broker, topics.mqtt_client_id("aggregator")))
    for i, (train, test) in enumerate(files):
        name = f"c{i}"
        opts = ClientOptions(broker="memory", client_id=name, data=str(train), test_data=str(test),
                             fleet=settings.fleet.fleet, topic_prefix=settings.fleet.topic_prefix, threads=1,
                             eval_after_training=False, upload_rank=(1, 1, 2)[i], download_cache=cache)
        link = MemoryLink(broker, topics.device_mqtt_id(name))
        client = EdgeClient(opts, link=link, engine_factory=engines)
        client.start()
        link.serve(client.handle)
        fleet.clients[name] = client
    fleet.summary = service.run()
    assert service.strategy is not None
    fleet.state = service.strategy.state_dict()
    return fleet


METHODS = ("fedit", "lora-a2", "fedamole-a2")


@pytest.fixture(scope="module")
def uncached(tiny_model: str, fleet_data, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Fleet]:  # noqa: ANN001
    with pytest.MonkeyPatch.context() as mp:
        return {m: _run(tmp_path_factory.mktemp(m), tiny_model, fleet_data, m, False, mp) for m in METHODS}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().reshape(-1).view(torch.uint8),
                                                                     b.contiguous().reshape(-1).view(torch.uint8))


def _same_run(a: Fleet, b: Fleet) -> None:
    assert a.received == b.received  # every device, every round: the same model, bit for bit, with its roles
    assert a.state.keys() == b.state.keys()
    assert all(_same_bits(a.state[k], b.state[k]) for k in a.state)
    assert a.summary["accuracy_curve"] == b.summary["accuracy_curve"]


@pytest.mark.parametrize("method", METHODS)
def test_cached_fleet_is_bit_identical_and_downloads_less(method: str, uncached, tiny_model: str,  # noqa: ANN001
                                                          fleet_data, tmp_path: Path,  # noqa: ANN001
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    cached = _run(tmp_path, tiny_model, fleet_data, method, True, monkeypatch)
    plain = uncached[method]
    _same_run(cached, plain)
    assert len(cached.received) == 3 * 4  # 3 devices x (3 rounds + the final evaluation)
    assert all(decode(p).body.get(MODEL) is None for _, p in plain.assigns)  # no capability: nothing changes
    assert all(MODEL in decode(p).body for _, p in cached.assigns)
    assert sum(c.cache_misses for c in cached.clients.values()) == 0
    assert all(c.cache_is_initial is False for c in cached.clients.values())
    down, plain_down = cached.summary["bytes_down_total"], plain.summary["bytes_down_total"]
    first = [decode(p) for _, p in cached.assigns if decode(p).round == 1]
    assert len(first) == 3 and all(not m.tensors and m.body[MODEL] for m in first)  # built from the task's seed
    if method == "fedit":  # FedAvg changes every tensor every round: after round 1, all whole
        assert cached.summary["params_down_total"] == plain.summary["params_down_total"] * 3 // 4
    else:  # alternating rounds: the frozen factor kept, patches of the active one
        assert down < plain_down and cached.summary["params_down_total"] < plain.summary["params_down_total"]
        names = [n for _, p in cached.assigns for n in decode(p).tensors]
        assert any(PATCH_MARK in n for n in names)
    print(f"{method}: bytes down {plain.summary['bytes_down_total']} -> {cached.summary['bytes_down_total']}")


def test_a_device_that_lost_its_cache_gets_everything_and_the_run_is_unchanged(
        uncached, tiny_model: str, fleet_data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    fleet = _run(tmp_path, tiny_model, fleet_data, "fedamole-a2", True, monkeypatch, clear=("c1", 3))
    _same_run(fleet, uncached["fedamole-a2"])
    assert fleet.clients["c1"].cache_misses == 1
    assert sum(c.cache_misses for c in fleet.clients.values()) == 1
    third = [decode(p) for t, p in fleet.assigns if t.endswith("/c1/assign") and decode(p).round == 3]
    assert len(third) == 2  # the delta it could not rebuild, then everything again
    delta, whole = third
    assert delta.body[MODEL] == whole.body[MODEL]  # the same model, the second time all of it
    assert not any(PATCH_MARK in n for n in whole.tensors)
    assert set(whole.tensors) == set(fleet.received[("c1", 3, whole.phase)][0])


# -- real processes through Mosquitto ----------------------------------------------------------------------------
@pytest.mark.mosquitto
def test_real_fleet_rebuilds_exactly_the_aggregated_model(tmp_path: Path, mosquitto: str, tiny_model: str) -> None:
    """lora-a2 with client processes over Mosquitto: an observer that rebuilds every device's assignments from their
    model digest gets, each round, exactly the previous model plus the aggregated slices of the devices' updates."""
    from test_fleet_mosquitto import Fleet as ProcessFleet

    from aggregator.robust import robust_average
    from edgemole.adapters.lora.a2 import active_factor, adapter_prefixes, aggregate_slices
    from edgemole.protocol import Kind

    flags = {f"c{k}": ["--upload-rank", "1"] for k in range(3)}
    fleet = ProcessFleet(tmp_path, mosquitto, tiny_model, sizes=[20, 30, 40], method="lora-a2", rounds=3,
                         client_flags=flags, rebuild=False)
    summary = fleet.run()
    caches: dict[str, dict[str, Version]] = {}
    models: dict[int, dict[str, torch.Tensor]] = {}
    for _, msg, _ in fleet.observed:
        if msg.kind == Kind.TASK:  # each device starts from the initial state it builds from the task's seed
            wire = task_wire(TaskSpec.from_body(msg.body["task"]))
            initial = initial_versions(None, wire)
            caches = {c: dict(initial) for c in flags}
        if msg.kind == Kind.ASSIGN:
            assert msg.round > 1 or not msg.tensors  # round 1 is the initial state: nothing to send
            model_digest = parse_model_digest(msg.body)
            assert model_digest is not None  # the Python client announces its cache
            tensors, roles, digests = apply_download(caches[msg.client], msg.tensors, msg.roles,
                                                  wire.assignment_spec(msg.body), model_digest)
            remember(caches[msg.client], tensors, roles, digests)
            model = models.setdefault(msg.round, tensors)
            assert _bits(model) == _bits(tensors)  # every device of a round: the same global model
    assert sorted(models) == [1, 2, 3, 4]
    for rnd in (1, 2, 3):
        updates = [u for _, u in sorted(fleet.messages(Kind.UPDATE, rnd).items())]  # the aggregator's order
        total = float(sum(u.body["num_samples"] for u in updates))
        weighted = [(u.tensors, u.body["num_samples"] / total) for u in updates]
        phase = updates[0].phase
        expected = dict(models[rnd])
        for p in adapter_prefixes(expected):
            name = f"{p}.{active_factor(phase)}"
            expected[name] = aggregate_slices(expected[name], weighted, p, phase)
        for name in [n for n in expected if n.startswith("head.")]:
            expected[name] = robust_average([u.tensors[name] for u in updates], [u.body["num_samples"]
                                                                                for u in updates])
        assert _bits(models[rnd + 1]) == _bits(expected), rnd
    names = {n for _, m, _ in fleet.observed if m.kind == Kind.ASSIGN and m.round > 1 for n in m.tensors}
    assert any(PATCH_MARK in n for n in names)
    assert "cache miss" not in fleet.logs() and summary["rejected"] == {}


def test_a_device_with_another_initial_state_gets_round_one_whole(
        uncached, tiny_model: str, fleet_data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    """A device whose own initial state differs from the aggregator's (another torch, another artifact) names another
    digest: it is sent round 1 whole, misses nothing, and the run is bit-identical."""
    import edge_client.client as client_module

    monkeypatch.setattr(client_module, "state_digest", lambda versions: "0" * 16)
    fleet = _run(tmp_path, tiny_model, fleet_data, "fedamole-a2", True, monkeypatch)
    _same_run(fleet, uncached["fedamole-a2"])
    assert sum(c.cache_misses for c in fleet.clients.values()) == 0
    first = [decode(p) for _, p in fleet.assigns if decode(p).round == 1]
    plain_first = [decode(p) for _, p in uncached["fedamole-a2"].assigns if decode(p).round == 1]
    assert sorted(len(m.tensors) for m in first) == sorted(len(m.tensors) for m in plain_first)


def test_a_run_does_not_depend_on_what_ran_before_it_in_the_process(
        tiny_model: str, fleet_data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    """With dropout on, two runs of the same fleet in one process (as a bench worker runs them) are bit-identical:
    each device seeds dropout from the task, itself and the round, not from the process's history."""
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    first = _run(tmp_path / "a", tiny_model, fleet_data, "fedamole-a2", True, monkeypatch, dropout=True)
    torch.rand(1000)  # whatever else the process did in between
    second = _run(tmp_path / "b", tiny_model, fleet_data, "fedamole-a2", True, monkeypatch, dropout=True)
    _same_run(first, second)
