"""Fuzzing (hypothesis) of every Python decoder and validator, and of the roles' inbound handlers: whatever arrives,
only the protocol's own error (ProtocolError, or ConfigError for a task) escapes a decoder or validator, and a
role's handler raises nothing at all. Derandomized, so CI explores the same few thousand cases every time."""

from __future__ import annotations

import contextlib
import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_task, write_client_data
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregator.service import AggregatorService
from aggregator.strategies import LoRAA2
from edge_client.client import ClientOptions, EdgeClient
from edgemole.config import FleetConfig, TaskSpec
from edgemole.errors import ConfigError, EdgemoleError, ProtocolError
from edgemole.mqtt import Inbound
from edgemole.protocol import (
    PHASES,
    SCHEMA_VERSION,
    Kind,
    Message,
    TensorSpec,
    Topics,
    check_tensors,
    decode,
    encode,
    validate_assignment,
    validate_update,
)
from fleet.memory_link import RecordingLink

FUZZ = settings(max_examples=800, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
RUN = "run1"
TOPICS = Topics("t")
A, B, R, H = "m.lora_A", "m.lora_B", "m.ranks", "head.weight"
#: what a LoRA-A2 B round expects back: a rank slice of B with its indices, and the head
EXPECT = {B: TensorSpec((3, None), role="lora_B", optional=True, bound=4),
          R: TensorSpec((None,), torch.int64, role="ranks", optional=True, bound=4),
          H: TensorSpec((2, 3), role="head")}

# -- building blocks -------------------------------------------------------------------------------------------------
SPECIAL_FLOATS = st.sampled_from([0.0, -0.0, 1.0, 1e30, -1e30, 3.4e38, float("nan"), float("inf"), float("-inf")])
#: JSON numbers at and beyond the float range (an int of 400 digits is valid JSON and a valid Python int)
NUMBERS = st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(),
                    st.sampled_from([10**309, -(2**1100), 2**63, -1, 1e308, 10**4000]))
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(10**400), max_value=10**400),
                      NUMBERS,
                      st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12))
json_value = st.recursive(json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                              st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                          max_leaves=12)


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    """A small tensor of a wire dtype (or an odd one), of a plausible or implausible shape, with special values."""
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
                                  torch.float64, torch.uint8]))
    shape = tuple(draw(st.lists(st.integers(0, 4), min_size=0, max_size=3)))
    n = 1
    for d in shape:
        n *= d
    if dtype.is_floating_point:
        values = draw(st.lists(st.one_of(SPECIAL_FLOATS, st.floats(-10, 10)), min_size=n, max_size=n))
    else:
        values = draw(st.lists(st.integers(-3, 6), min_size=n, max_size=n))
    return torch.tensor(values, dtype=torch.float64 if dtype.is_floating_point else torch.int64).reshape(shape).to(
        dtype)


names = st.sampled_from([A, B, R, H, "x", ""])
fields = st.one_of(st.sampled_from(["t", "u", "", "c0", "c1", RUN, "train", "train-B", "eval", "done"]),
                   st.text(max_size=10))


@st.composite
def messages(draw: st.DrawFn) -> Message:
    """A message near the valid ones: often the right kind, fleet, run, client and round, with fuzzed tensors."""
    ts = draw(st.dictionaries(names, tensors(), max_size=4))
    ts = {k: v for k, v in ts.items() if v.dtype not in (torch.float64, torch.uint8) or draw(st.booleans())}
    body = draw(st.dictionaries(st.sampled_from(["run", "num_samples", "metrics", "experts", "local_steps",
                                                 "train_roles", "state", "num_train", "num_test", "task", "x"]),
                                st.one_of(json_value, st.just(RUN)), max_size=5))
    if draw(st.booleans()):
        body.setdefault("run", RUN)
    return Message(kind=draw(st.sampled_from(list(Kind))), fleet=draw(st.sampled_from(["t", "t", "u", ""])),
                   round=draw(st.integers(0, 3)), phase=draw(fields), client=draw(fields), body=body, tensors=ts,
                   roles={k: draw(st.sampled_from(["lora_A", "lora_B", "ranks", "head", ""])) for k in ts})


@st.composite
def near_valid_updates(draw: st.DrawFn) -> Message:
    """An update that :data:`EXPECT` accepts as sent by c0 in round 1, with a few of its parts fuzzed."""
    k = draw(st.integers(1, 4))
    ranks = sorted(draw(st.sets(st.integers(0, 3), min_size=k, max_size=k)))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    ts: dict[str, torch.Tensor] = {B: torch.randn(3, k, generator=gen), R: torch.tensor(ranks),
                                   H: torch.randn(2, 3, generator=gen)}
    roles = {B: "lora_B", R: "ranks", H: "head"}
    body: dict[str, Any] = {"run": RUN, "num_samples": 5, "metrics": {"acc_before": 0.5}}
    header = {"round": 1, "client": "c0"}
    for _ in range(draw(st.integers(0, 2))):
        part = draw(st.integers(0, 6))
        if part == 0:
            ts[draw(st.sampled_from([B, R, H]))] = draw(tensors())
        elif part == 1:
            name = draw(st.sampled_from([B, H]))
            if name in ts:
                ts[name] = ts[name] * draw(SPECIAL_FLOATS)
        elif part == 2:
            body["num_samples"] = draw(st.one_of(json_leaf, st.integers(-2, 2**70)))
        elif part == 3:
            body["metrics"] = draw(st.one_of(json_value, st.dictionaries(st.text(max_size=5), NUMBERS, min_size=1,
                                                                         max_size=3)))
        elif part == 4:
            body[draw(st.sampled_from(["run", "x"]))] = draw(json_value)
        elif part == 5:
            ts.pop(draw(st.sampled_from([B, R, H])), None)
        else:
            header = {"round": draw(st.integers(0, 2)), "client": draw(st.sampled_from(["c0", "c1", "c9"]))}
    roles = {n: r for n, r in roles.items() if n in ts}
    return Message(Kind.UPDATE, "t", header["round"], "train-B", str(header["client"]), body, ts, roles)


def _encode_or_none(msg: Message) -> bytes | None:
    """Encode what safetensors can carry (float64/uint8 tensors are not wire dtypes but safetensors writes them)."""
    try:
        return encode(msg)
    except (ValueError, TypeError):  # e.g. a value json cannot hold: the fuzzer's own message, not the decoder's
        return None


@st.composite
def payloads(draw: st.DrawFn) -> bytes:
    """Raw bytes, a hand-made safetensors header with fuzzed metadata and tensor entries, or a mutated message."""
    kind = draw(st.integers(0, 2))
    if kind == 0:
        return draw(st.binary(max_size=300))
    if kind == 1:
        meta = {"schema": draw(st.sampled_from([SCHEMA_VERSION, "edgemole/0"])), "kind": draw(fields),
                "fleet": "t", "round": draw(st.sampled_from(["1", "0", "-1", "99999999999", "1e3", ""])),
                "body": draw(st.one_of(st.text(max_size=20), json_value.map(json.dumps))),
                "roles": draw(st.one_of(st.text(max_size=10), json_value.map(json.dumps)))}
        header: dict[str, Any] = {"__metadata__": draw(st.one_of(st.just(meta), json_value))}
        for name in draw(st.lists(names, max_size=3)):
            header[name] = {"dtype": draw(st.sampled_from(["F32", "I64", "F64", "U8", "BOOL", 7])),
                            "shape": draw(st.lists(st.integers(-1, 2**40), max_size=3)),
                            "data_offsets": draw(st.lists(st.integers(-1, 2**40), min_size=0, max_size=3))}
        text = json.dumps(header).encode()
        return struct.pack("<Q", draw(st.sampled_from([len(text), len(text) + 1, 2**63]))) + text + draw(
            st.binary(max_size=64))
    payload = _encode_or_none(draw(messages())) or b""
    cuts = draw(st.lists(st.tuples(st.integers(0, max(len(payload) - 1, 0)), st.integers(0, 255)), max_size=4))
    out = bytearray(payload)
    for at, byte in cuts:
        if at < len(out):
            out[at] = byte
    return bytes(out[: draw(st.integers(0, len(out)))]) if draw(st.booleans()) else bytes(out)


# -- decoders and validators -----------------------------------------------------------------------------------------
@FUZZ
@given(payloads())
def test_decode_raises_only_protocol_errors(payload: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode(payload, 4096)


@FUZZ
@given(st.one_of(messages(), near_valid_updates(), near_valid_updates()))
def test_validators_raise_only_protocol_errors(msg: Message) -> None:
    payload = _encode_or_none(msg)
    if payload is not None:
        try:
            msg = decode(payload)
        except ProtocolError:
            return
    for check in (
        lambda: validate_update(msg, fleet="t", run=RUN, round=1, phase="train-B", topic_client="c0",
                                selected=["c0"], expected=EXPECT),
        lambda: validate_assignment(msg, fleet="t", run=RUN, client="c0", after_round=0, expected=EXPECT),
        lambda: check_tensors(msg, EXPECT),
    ):
        with contextlib.suppress(ProtocolError):
            check()


@st.composite
def task_bodies(draw: st.DrawFn) -> Any:
    """Random JSON, or a valid task body with one field replaced by a random value."""
    if draw(st.booleans()):
        return draw(json_value)
    body = TaskSpec(labels=["a", "b"]).to_body()
    section = draw(st.sampled_from(sorted(body)))
    if isinstance(body[section], dict) and body[section]:
        body[section][draw(st.sampled_from(sorted(body[section])))] = draw(json_value)
    else:
        body[section] = draw(json_value)
    return body


@settings(FUZZ, max_examples=500)
@given(task_bodies())
def test_task_spec_from_body_raises_only_config_errors(body: Any) -> None:
    with contextlib.suppress(ConfigError):
        TaskSpec.from_body(body)


# -- the roles' handlers ---------------------------------------------------------------------------------------------
def _service() -> AggregatorService:
    """An aggregator with a LoRA-A2 B round open for c0 and c1 (rank slices: the hardest expectation)."""
    task = TaskSpec(labels=["a", "b"], method="lora-a2")
    service = AggregatorService(FleetConfig(fleet="t", method="lora-a2"), task, link=RecordingLink())  # type: ignore[arg-type]
    service.run_id = RUN
    gen = torch.Generator().manual_seed(0)
    state = {A: torch.randn(4, 5, generator=gen), B: torch.zeros(3, 4), H: torch.randn(2, 3, generator=gen)}
    strategy = LoRAA2(state, {A: "lora_A", B: "lora_B", H: "head"}, task)
    plan = strategy.configure_train(1, ["c0", "c1"])
    service.strategy = strategy
    service._open = (1, plan.phase, plan)
    service.status = {c: {"state": "ready", "run": RUN, "num_train": 10, "num_test": 5} for c in ("c0", "c1")}
    return service


@settings(FUZZ, max_examples=250)
@given(st.lists(st.tuples(st.sampled_from(["c0", "c1", "c9", "c0/x"]), st.sampled_from(["update", "status", "x"]),
                          st.one_of(payloads(), st.one_of(messages(), near_valid_updates()).map(
                              lambda m: _encode_or_none(m) or b""))),
                min_size=1, max_size=6))
def test_aggregator_handlers_never_raise_and_records_always_encode(inbound: list[tuple[str, str, bytes]]) -> None:
    """(That this reaches aggregation is checked by test_validators' near-valid updates being accepted.)"""
    service = _service()
    assert service.strategy is not None and service._open is not None
    for client, kind, payload in inbound:
        service._handle(Inbound(f"{TOPICS.base}/clients/{client}/{kind}", payload, False))
    plan = service._open[2]
    updates = service._within_norm_bounds(1, plan, list(service._updates.values()))
    if updates:
        service.strategy.aggregate(1, plan, updates)
    record = service._record(1, plan.phase, ["c0", "c1"], updates, (0, 0), 0.0, 0.0, {})
    encode(Message(Kind.METRICS, "t", 1, plan.phase, body=record))
    json.dumps(record, allow_nan=False)


@pytest.fixture(scope="module")
def fuzz_client(tmp_path_factory: pytest.TempPathFactory, tiny_model: str) -> tuple[EdgeClient, Message]:
    """A fedit client of the tiny model that accepted run ``RUN``, and a valid round-1 assignment for it."""
    tmp = tmp_path_factory.mktemp("fuzz-client")
    files, _ = write_client_data(tmp, [12])
    task = tiny_task(tiny_model, "fedit")
    engines: dict[str, Any] = {}

    def only_this_task(t: TaskSpec) -> Any:
        if t != task:  # a fuzzed task that happens to be valid: refusing it is the client's normal error path
            raise EdgemoleError("this test builds no other engine")
        if "e" not in engines:
            from edge_client.engines import make_engine
            engines["e"] = make_engine("eager", t, threads=1)
        return engines["e"]

    client = EdgeClient(ClientOptions(broker="memory", client_id="c0", data=str(files[0][0]),
                                      test_data=str(files[0][1]), fleet="t", threads=1, eval_after_training=False),
                        link=RecordingLink(), engine_factory=only_this_task)  # type: ignore[arg-type]
    client._handle(Inbound(TOPICS.task, encode(Message(Kind.TASK, "t", body={"run": RUN, "task": task.to_body()})),
                           False))
    assert client.engine is not None
    tensors, roles = client.engine.get_state({})
    return client, Message(Kind.ASSIGN, "t", 1, "train", "c0", {"run": RUN, "local_steps": 1}, tensors, roles)


def test_client_handler_never_raises(fuzz_client: tuple[EdgeClient, Message]) -> None:
    client, assign = fuzz_client
    link = client.link
    assert isinstance(link, RecordingLink)

    @settings(max_examples=300, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(data=st.data())
    def one(data: st.DataObject) -> None:
        client.last_round, client.run_id, client._stop, client.kept = 0, RUN, False, None
        topic = data.draw(st.sampled_from([TOPICS.task, TOPICS.round, TOPICS.assign("c0"), TOPICS.assign("c1")]))
        choice = data.draw(st.integers(0, 3))
        if choice == 0:
            payload = data.draw(payloads())
        elif choice == 1:
            payload = _encode_or_none(data.draw(messages())) or b""
        else:  # the valid assignment with fuzzed values, body fields or phase
            topic = TOPICS.assign("c0")
            body = {**assign.body, **data.draw(st.dictionaries(
                st.sampled_from(["local_steps", "train_roles", "run", "own_rank"]), json_value, max_size=1))}
            values = data.draw(st.sampled_from([1.0, 1e30, -3e38, float("nan"), 0.0]))
            payload = _encode_or_none(Message(Kind.ASSIGN, "t", data.draw(st.sampled_from([1, 1, 0])),
                                              data.draw(st.sampled_from(["train", "train", "eval", *PHASES, "x"])),
                                              "c0", body, {k: v * values for k, v in assign.tensors.items()},
                                              assign.roles)) or b""
        client._handle(Inbound(topic, payload, data.draw(st.booleans())))

    one()
    sent = [decode(p) for t, p in link.published]
    # the fuzzer did reach local training: updates were sent, and rounds with non-finite results became errors
    assert any(m.kind == Kind.UPDATE for m in sent)
    assert any(m.kind == Kind.STATUS and "non-finite" in m.body.get("error", "") for m in sent)


def test_fuzz_found_bugs_stay_fixed(tmp_path: Path) -> None:
    """What the fuzzers found: a huge integer metric overflowed math.isfinite in validate_update (OverflowError
    escaped), and so did a huge integer for a float field of a task (TaskSpec.from_body); an assignment whose
    ``train_roles`` held a list crashed the client (TypeError: unhashable), which test_client_handler finds."""
    msg = Message(Kind.UPDATE, "t", 1, "train-B", "c0", {"run": RUN, "num_samples": 1, "metrics": {"x": 10**400}},
                  {H: torch.zeros(2, 3)}, {H: "head"})
    with pytest.raises(ProtocolError, match="finite"):
        validate_update(msg, fleet="t", run=RUN, round=1, phase="train-B", topic_client="c0", selected=["c0"],
                        expected=EXPECT)
    with pytest.raises(ConfigError, match="finite"):
        TaskSpec.from_body({"labels": ["a", "b"], "train": {"lr": 10**400}})
