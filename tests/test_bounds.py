"""Bounded updates: the aggregator refuses values, norms and sample counts out of bounds, never an honest update;
robust aggregation; clients report a non-finite result instead of crashing on it (issue 22's 1e30 crash)."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY_AMOLE, tiny_task, write_client_data, write_config

import aggregator.service as service_module
import edge_client.client as client_module
from aggregator.bounds import clip_to_bound, norm_ratios, norm_violations, samples_violation, value_violation
from aggregator.robust import robust_average, robust_slices
from aggregator.service import AggregatorService
from aggregator.strategies import FedIT, weighted_average
from edge_client.client import ClientOptions, EdgeClient
from edgemole.adapters.lora.a2 import aggregate_slices
from edgemole.config import FleetConfig, check_robust, load_settings
from edgemole.errors import ConfigError
from edgemole.model import WireState, build_classifier
from edgemole.mqtt import Inbound
from edgemole.protocol import Kind, Message, Topics, decode, encode
from edgemole.protocol.messages import json_safe
from fleet.bench import SharedEngine
from fleet.memory_link import MemoryBroker, MemoryLink, RecordingLink

METHODS = ["fedit", "ffa-lora", "flexlora", "lora-a2", "fedamole", "fedamole-a2"]


# -- the pure checks -------------------------------------------------------------------------------------------------
def test_value_cap_refuses_huge_finite_values_and_ignores_rank_indices() -> None:
    ok = {"a.lora_A": torch.randn(4, 8), "a.ranks": torch.tensor([0, 10**12])}
    assert value_violation(ok, 1e6) is None
    bad = {**ok, "b.lora_B": torch.full((3, 2), 1e30)}
    assert "'b.lora_B'" in (value_violation(bad, 1e6) or "")
    assert value_violation({"x": torch.tensor([float("nan")])}, 1e6) is not None


def test_norm_bound_uses_the_larger_of_sent_norm_and_lower_median() -> None:
    base = torch.ones(4, 4)  # norm 4
    updates = {"c0": {"w": base}, "c1": {"w": 2 * base}, "c2": {"w": 100 * base}, "c3": {"w": 3 * base}}
    # lower median of (4, 8, 12, 400) is 8: 400 > 10 x 8
    assert set(norm_violations(updates, {}, 10.0)) == {"c2"}
    # a sent tensor of norm 80 raises c2's reference to 80 (400 <= 800)
    assert norm_violations(updates, {"c2": {"w": 20 * base}}, 10.0) == {}
    # all zero: no reference, nothing refused; one sender: never refused by its own median
    assert norm_violations({"c0": {"w": torch.zeros(3)}, "c1": {"w": torch.zeros(3)}}, {}, 10.0) == {}
    assert norm_violations({"c0": {"w": 1e5 * base}}, {}, 10.0) == {}
    # float64 norms: values near the float32 limit do not overflow to Inf
    ((norm, _),) = norm_ratios({"c0": {"w": torch.full((4,), 3e38)}}, {})["c0"].values()
    assert norm == pytest.approx(6e38)


def test_embeddings_are_clipped_not_refused() -> None:
    """RSEA embeddings share their module's median and are scaled to the bound: the update itself stays."""
    pools = {"m.embed.token": "m.embed", "m.embed.expert.0": "m.embed"}
    updates = {c: {"m.embed.token": torch.ones(4), "m.embed.expert.0": torch.ones(4), "w": torch.ones(3)}
               for c in ("c0", "c1", "c2")}
    updates["c2"]["m.embed.expert.0"] = torch.full((4,), 100.0)  # norm 200, module median 2
    assert norm_violations(updates, {}, 10.0, pools, clipped=pools) == {}
    clipped = clip_to_bound(updates, {}, 10.0, pools, pools)
    assert list(clipped) == ["c2"] and list(clipped["c2"]) == ["m.embed.expert.0"]
    assert float(clipped["c2"]["m.embed.expert.0"].norm()) == pytest.approx(20.0)
    assert set(norm_violations(updates, {}, 10.0, pools)) == {"c2"}  # not clipped: refused


def test_norm_check_is_deterministic_whatever_the_arrival_order() -> None:
    gen = torch.Generator().manual_seed(0)
    updates = {f"c{k}": {"a": torch.randn(8, 8, generator=gen) * (k + 1), "b": torch.randn(3, generator=gen)}
               for k in range(7)}
    updates["c5"]["a"] = updates["c5"]["a"] * 50
    expected = norm_violations(updates, {}, 10.0)
    assert set(expected) == {"c5"}
    for seed in range(5):
        keys = list(updates)
        random.Random(seed).shuffle(keys)
        assert norm_violations({k: updates[k] for k in keys}, {}, 10.0) == expected


def test_num_samples_must_not_exceed_the_status_or_the_cap() -> None:
    status = {"state": "ready", "num_train": 30, "num_test": 0}
    assert samples_violation(30, "train", status, 1000) is None
    assert "num_train 30" in (samples_violation(31, "train", status, 1000) or "")
    assert "max_samples" in (samples_violation(10**9, "train", {"num_train": 10**9}, 1000) or "")
    assert samples_violation(1, "eval", status, 1000) is None  # an empty test split still reports 1 sample
    assert "no integer" in (samples_violation(5, "train", {"num_train": True}, 1000) or "")
    assert "no integer" in (samples_violation(5, "train", None, 1000) or "")


def test_fleet_config_validates_the_bounds() -> None:
    for bad in ({"max_update_value": 0.0}, {"max_update_value": float("inf")}, {"update_norm_factor": 0.5},
                {"max_samples": 0}, {"robust": "trimmed-mean:0.5"}, {"robust": "trimmed-mean:x"}, {"robust": "mean"}):
        with pytest.raises(ConfigError):
            FleetConfig(**bad)  # type: ignore[arg-type]
    assert check_robust("trimmed-mean:0.2") == ("trimmed-mean", 0.2)
    assert FleetConfig().max_update_value == 1e6 and FleetConfig().update_norm_factor == 10.0


def test_round_record_is_json_safe_even_when_device_metrics_overflow() -> None:
    assert json_safe({"a": [1.0, float("inf")], "b": {"c": float("nan")}, "n": 3}) == {"a": [1.0, None],
                                                                                       "b": {"c": None}, "n": 3}
    assert service_module._mean_std([1e308, 1e308]) == (None, None)


# -- robust aggregation ----------------------------------------------------------------------------------------------
def test_robust_estimators() -> None:
    xs = [torch.tensor([1.0, -1.0]), torch.tensor([2.0, 0.0]), torch.tensor([3.0, 1.0]), torch.tensor([1e3, -1e3])]
    assert torch.equal(robust_average(xs, [1, 1, 1, 1], "none"), weighted_average(xs, [1, 1, 1, 1]))
    assert torch.allclose(robust_average(xs, [1, 1, 1, 1], "median"), torch.tensor([2.5, -0.5]))
    assert torch.allclose(robust_average(xs, [1, 1, 1, 1], "trimmed-mean:0.25"), torch.tensor([2.5, -0.5]))
    clipped = robust_average(xs, [1, 1, 1, 1], "clip")  # every tensor at most the lower-median norm sqrt(4)
    assert float(clipped.norm()) <= 2.0 + 1e-6
    assert robust_average([torch.ones(2, dtype=torch.float32)], [1], "median").dtype == torch.float32


def test_robust_slices_reduce_to_the_lora_a2_mean() -> None:
    """trimmed-mean:0 is the unweighted mean of the zero-filled changes, which is what aggregate_slices computes
    with equal weights: the robust path keeps LoRA-A2's semantics."""
    gen = torch.Generator().manual_seed(1)
    current = torch.randn(6, 4, generator=gen)
    ups = []
    for ranks in ([0, 2], [1], [0, 1, 3]):
        ups.append(({"m.lora_B": torch.randn(6, len(ranks), generator=gen), "m.ranks": torch.tensor(ranks)}, 1 / 3))
    ups.append(({}, 1 / 4))  # selected none of this adapter's ranks
    ups = [(t, 0.25) for t, _ in ups]
    expected = aggregate_slices(current, ups, "m", "train-B")
    got = robust_slices(current, ups, "m", "lora_B", "trimmed-mean:0")
    assert torch.allclose(got, expected, atol=1e-6)


# -- in-memory fleets ------------------------------------------------------------------------------------------------
Tamper = Callable[[Message], list[Message]]


def _fleet(tmp: Path, model: str, method: str, *, rounds: int = 3, amole: dict | None = None,
           train: dict | None = None, tamper: Tamper | None = None, upload_ranks: dict[str, int] | None = None,
           **fleet: Any) -> AggregatorService:
    """Four in-memory devices (the bench's link); ``tamper`` rewrites what c3 publishes on its update topic into the
    messages that are really sent (in that order)."""
    files, labels = write_client_data(tmp, [24, 30, 36, 28])
    if "fedamole" in method:
        amole = {**TINY_AMOLE, **(amole or {})}
    config = write_config(tmp / f"{method}.json", model, labels, {"dropout": False, "local_steps": 4, "lr": 0.02,
                                                                 **(train or {})},
                          amole, method=method, rounds=rounds, min_clients=4, quorum=1.0, **fleet)
    settings = load_settings(config)
    topics = Topics(settings.fleet.fleet, settings.fleet.topic_prefix)
    broker = MemoryBroker()
    service = AggregatorService(settings.fleet, settings.task(labels), link=MemoryLink(broker, "aggregator"))
    engines = SharedEngine("eager", 1)
    for k, (tr, te) in enumerate(files):
        cid = f"c{k}"
        opts = ClientOptions(broker="memory", client_id=cid, data=str(tr), test_data=str(te), fleet="t", threads=1,
                             eval_after_training=False, upload_rank=(upload_ranks or {}).get(cid))
        link = MemoryLink(broker, topics.device_mqtt_id(cid))
        if tamper is not None and cid == "c3":
            publish = link.publish

            def tampered(topic: str, payload: bytes, *, retain: bool = False, wait_s: float | None = 30.0,
                         publish: Any = publish) -> int:
                if not topic.endswith("/update"):
                    return publish(topic, payload, retain=retain)
                return sum(publish(topic, encode(m)) for m in tamper(decode(payload)))

            link.publish = tampered  # type: ignore[method-assign]
        client = EdgeClient(opts, link=link, engine_factory=engines)
        client.start()
        link.serve(client.handle)
    service.run()
    return service


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_honest_updates_are_never_refused(tmp_path: Path, tiny_model: str, method: str,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Every method, non-IID devices, mixed upload ranks, DP noise on RSEA embeddings: nothing is refused, and the
    largest norm / reference ratio seen stays far below the default factor of 10."""
    ratios: dict[bool, list[float]] = {True: [], False: []}  # RSEA embedding or not -> norm / reference
    original = service_module.norm_violations

    def watch(updates: Any, sent: Any, factor: float, pools: Any = None, clipped: Any = ()) -> dict[str, str]:
        for per in norm_ratios(updates, sent, pools).values():
            for name, (norm, reference) in per.items():
                if reference > 0:
                    ratios[".embed." in name].append(norm / reference)
        return original(updates, sent, factor, pools, clipped)

    monkeypatch.setattr(service_module, "norm_violations", watch)
    amole = {"dp_eta": 5.0} if method == "fedamole-a2" else None
    service = _fleet(tmp_path, tiny_model, method, amole=amole, upload_ranks={"c0": 1, "c1": 2})
    assert dict(service.rejected) == {}
    assert all(not r["refused"] for r in service.records if r["phase"] != "eval")
    largest = max(ratios[False])
    assert largest < 3.0, f"{method}: largest norm / reference {largest:.2f}"
    embed = max(ratios[True], default=0.0)  # clipped (not refused) above 10: none clipped either
    assert embed < 5.0, f"{method}: largest RSEA embedding norm / module median {embed:.2f}"
    print(f"{method}: {len(ratios[False])} tensor norms, largest / reference {largest:.3f}; "
          f"{len(ratios[True])} embeddings, largest / module median {embed:.3f}")


@pytest.mark.slow
def test_out_of_bounds_updates_are_refused_and_change_nothing(tmp_path: Path, tiny_model: str) -> None:
    """c3 first publishes a forged copy of its update (1e30 values, then num_samples above its status), then the
    real one: the forgeries are refused on arrival, the real one counts, and the model equals the clean run's."""
    clean = _fleet(tmp_path / "clean", tiny_model, "fedit", rounds=2)

    def forge(msg: Message) -> list[Message]:
        huge = Message(**{**msg.__dict__, "tensors": {k: torch.full_like(v, 1e30) for k, v in msg.tensors.items()}})
        greedy = Message(**{**msg.__dict__, "body": {**msg.body, "num_samples": msg.body["num_samples"] + 1}})
        return [huge, greedy, msg]

    attacked = _fleet(tmp_path / "attacked", tiny_model, "fedit", rounds=2, tamper=forge)
    assert attacked.rejected["bounds"] == 2 and attacked.rejected["samples"] == 2
    assert [r["answered"] for r in attacked.records] == [["c0", "c1", "c2", "c3"]] * 3
    assert clean.strategy is not None and attacked.strategy is not None
    for name, value in clean.strategy.state_dict().items():
        assert torch.allclose(value, attacked.strategy.state_dict()[name], atol=1e-6, rtol=0), name


@pytest.mark.slow
def test_a_scaled_update_is_refused_by_the_norm_bound(tmp_path: Path, tiny_model: str) -> None:
    """An update within the value cap but 100x the round's norms passes arrival and is refused before aggregation:
    the round record names it and the aggregate is that of the three honest devices."""
    def scale(m: Message) -> list[Message]:
        return [Message(**{**m.__dict__, "tensors": {k: v * 100 for k, v in m.tensors.items()}})]

    service = _fleet(tmp_path, tiny_model, "fedit", rounds=1, tamper=scale)
    first = service.records[0]
    assert list(first["refused"]) == ["c3"] and "norm" in first["refused"]["c3"]
    assert first["answered"] == ["c0", "c1", "c2"] and service.rejected["bounds"] == 1


@pytest.mark.slow
@pytest.mark.parametrize(("method", "robust"), [("fedit", "clip"), ("ffa-lora", "median"),
                                                ("flexlora", "trimmed-mean:0.25"), ("lora-a2", "median")])
def test_robust_aggregation_runs_for_the_plain_lora_methods(tmp_path: Path, tiny_model: str, method: str,
                                                            robust: str) -> None:
    service = _fleet(tmp_path, tiny_model, method, rounds=2, robust=robust, upload_ranks={"c0": 1})
    assert service.strategy is not None and service.strategy.robust == robust
    state = service.strategy.state_dict()
    assert all(torch.isfinite(t).all() for t in state.values())
    reference = _fleet(tmp_path / "mean", tiny_model, method, rounds=2, upload_ranks={"c0": 1})
    assert reference.strategy is not None
    assert any(not torch.equal(t, reference.strategy.state_dict()[n]) for n, t in state.items())  # it did act


# -- clients never crash on what they compute ------------------------------------------------------------------------
def _client_with_task(tmp: Path, model: str) -> tuple[EdgeClient, RecordingLink, Message]:
    """A fedit client that accepted a task, and the round-1 assignment of the initial model."""
    files, _ = write_client_data(tmp, [20])
    task = tiny_task(model, "fedit")
    link = RecordingLink()
    client = EdgeClient(ClientOptions(broker="memory", client_id="c0", data=str(files[0][0]),
                                      test_data=str(files[0][1]), fleet="t", threads=1), link=link)  # type: ignore[arg-type]
    topics = Topics("t")
    client.handle(Inbound(topics.task, encode(Message(Kind.TASK, "t", body={"run": "r1", "task": task.to_body()})),
                          False))
    built, _ = build_classifier(task)
    strategy = FedIT(*WireState.of_model(built, task).initial_fleet_state(), task)
    plan = strategy.configure_train(1, ["c0"])
    assign = Message(Kind.ASSIGN, "t", 1, "train", "c0", {"run": "r1"}, plan.assignments["c0"].tensors,
                     {k: strategy.roles.get(k, "") for k in plan.assignments["c0"].tensors})
    return client, link, assign


@pytest.mark.slow
def test_a_model_of_1e30_values_is_an_error_status_not_a_crash(tmp_path: Path, tiny_model: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 22: an accepted 1e30 update came back to every device, whose loss became Inf and whose next message
    failed to encode (ValueError: Out of range float values are not JSON compliant). Reproduced with the check
    switched off, then fixed: an error status for the round, nothing sent, the client keeps serving."""
    client, link, assign = _client_with_task(tmp_path, tiny_model)
    huge = Message(**{**assign.__dict__, "tensors": {k: torch.full_like(v, 1e30) for k, v in assign.tensors.items()}})
    topics = Topics("t")
    with monkeypatch.context() as m:
        m.setattr(client_module, "non_finite", lambda metrics, tensors: None)
        with pytest.raises(ValueError, match="Out of range float values"):
            client.handle(Inbound(topics.assign("c0"), encode(huge), False))
    client.last_round = 0
    link.published.clear()
    client.handle(Inbound(topics.assign("c0"), encode(huge), False))
    kinds = [(t.rsplit("/", 1)[1], decode(p)) for t, p in link.published]
    assert [k for k, _ in kinds] == ["status"]
    assert kinds[0][1].body["state"] == "error" and "non-finite" in kinds[0][1].body["error"]
    # an honest assignment of the next round is served normally
    link.published.clear()
    honest = Message(**{**assign.__dict__, "round": 2})
    client.handle(Inbound(topics.assign("c0"), encode(honest), False))
    assert [t.rsplit("/", 1)[1] for t, _ in link.published] == ["update"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fedit", "fedamole-a2"])
def test_without_bounds_the_1e30_model_reaches_every_device_which_reports_instead_of_crashing(
        tmp_path: Path, tiny_model: str, method: str) -> None:
    """The issue's run, with the bounds opened up (value cap and norm factor 1e38): c3's 1e30 update is accepted and
    aggregated, the model goes back to every device, and every device computes non-finite results. They report an
    error status for the round and send nothing (before: ValueError while encoding, every client crashed); the
    aggregator, left without answers, fails the round cleanly."""
    published: list[tuple[str, bytes]] = []
    original = MemoryLink.publish

    def record(self: MemoryLink, topic: str, payload: bytes, *, retain: bool = False,
               wait_s: float | None = 30.0) -> int:
        published.append((topic, payload))
        return original(self, topic, payload, retain=retain)

    def huge(msg: Message) -> list[Message]:
        return [Message(**{**msg.__dict__, "tensors": {k: torch.full_like(v, 1e30) if v.is_floating_point() else v
                                                       for k, v in msg.tensors.items()}})]

    with pytest.MonkeyPatch.context() as m:
        m.setattr(MemoryLink, "publish", record)
        with pytest.raises(service_module.RoundFailed, match="round 2"):
            _fleet(tmp_path, tiny_model, method, rounds=2, tamper=huge, max_update_value=1e38,
                   update_norm_factor=1e38, round_deadline_s=1.0)
    errors = {}
    for topic, payload in published:
        if topic.endswith("/status"):
            msg = decode(payload)
            if msg.body["state"] == "error":
                errors[msg.client] = msg.body["error"]
    assert sorted(errors) == ["c0", "c1", "c2", "c3"]
    assert all(e.startswith("round 2: non-finite") for e in errors.values()), errors
    assert not any(t.endswith("/update") and decode(p).round == 2 for t, p in published)
