"""Tests of the wire protocol (edgemole.protocol) against docs/protocol.md, and of config parsing.

Fast: no broker, no model. The test vectors are read from the spec itself, so the document and the code cannot
drift apart silently.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from edgemole.adapters.amole.config import AMoLEConfig
from edgemole.adapters.lora.config import A2Config
from edgemole.config import (
    FleetConfig,
    LoRAConfig,
    ModelConfig,
    Settings,
    TaskSpec,
    TrainConfig,
    from_dict,
    load_settings,
)
from edgemole.defaults import METHOD_DEFAULTS
from edgemole.errors import ConfigError, ProtocolError
from edgemole.protocol import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DONE,
    PHASES,
    SCHEMA_VERSION,
    Kind,
    Message,
    TensorSpec,
    Topics,
    check_name,
    decode,
    encode,
    spec_of,
    validate_assignment,
    validate_update,
)

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "docs" / "protocol.md"
VECTOR_BLOCK = re.compile(r"^```hex name=([A-Za-z0-9_.-]+)[ \t]*\n(.*?)^```", re.MULTILINE | re.DOTALL)

RUN = "5f3a9c0e12ab"
A = "backbone.encoder.layer.0.attention.self.query.lora_A"
B = "backbone.encoder.layer.0.attention.self.query.lora_B"
ROLES = {A: "lora_A", B: "lora_B"}
A_VALUES = [[0.5, -1.0, 2.0], [0.25, 1.5, -0.75]]
B_VALUES = [[1.0, 0.0], [-0.5, 0.125], [3.0, -2.0]]
B_NAN = [[1.0, math.nan], [-0.5, 0.125], [3.0, -2.0]]
WIRE_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
}
ELEMENT_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4}

TASK_BODY = {
    "labels": ["negative", "positive"],
    "method": "fedit",
    "seed": 0,
    "model": {"name": "all-MiniLM-L6-v2", "max_length": 32},
    "lora": {"r": 8, "alpha": 16.0, "dropout": 0.05, "target_modules": ["query", "value"],
             "train_head": True},
    "train": {"local_steps": 10, "batch_size": 16, "lr": 0.002, "weight_decay": 0.0, "eval_batch_size": 64},
}
UPDATE_BODY = {"metrics": {"acc_before": 0.5, "train_loss": 0.25}, "num_samples": 120, "run": RUN}

#: What the spec says each valid vector decodes to: metadata fields, body, roles and tensor values (F32).
VALID_VECTORS: dict[str, dict[str, Any]] = {
    "task": dict(kind=Kind.TASK, round=0, phase="", client="", body={"run": RUN, "task": TASK_BODY},
                 roles={}, tensors={}, size=528),
    "status-ready": dict(
        kind=Kind.STATUS, round=0, phase="", client="phone-1",
        body={"engine": "eager", "num_test": 30, "num_train": 120, "run": RUN, "state": "ready"},
        roles={}, tensors={}, size=248,
    ),
    "round-train": dict(
        kind=Kind.ROUND, round=1, phase="train", client="",
        body={"deadline_unix": 1700000300.5, "hparams": {}, "rounds": 5, "run": RUN,
              "selected": ["phone-1", "phone-2"]},
        roles={}, tensors={}, size=272,
    ),
    "assign-train": dict(kind=Kind.ASSIGN, round=1, phase="train", client="phone-1", body={"run": RUN},
                         roles=ROLES, tensors={A: A_VALUES, B: [[0.0, 0.0]] * 3}, size=576),
    "update-ok": dict(kind=Kind.UPDATE, round=1, phase="train", client="phone-1", body=UPDATE_BODY,
                      roles=ROLES, tensors={A: A_VALUES, B: B_VALUES}, size=648),
    "round-done": dict(
        kind=Kind.ROUND, round=6, phase=DONE, client="",
        body={"deadline_unix": 1700000900.0, "hparams": {}, "rounds": 5, "run": RUN, "selected": []},
        roles={}, tensors={}, size=248,
    ),
    "update-nan": dict(kind=Kind.UPDATE, round=1, phase="train", client="phone-1", body=UPDATE_BODY,
                       roles=ROLES, tensors={A: A_VALUES, B: B_NAN}, size=648),
}
#: Hostile vectors of the spec and a key word of the reason the decoder must give.
HOSTILE_VECTORS = {
    "hostile-dtype-f64": "dtype 'F64'",
    "hostile-header-length": "header length 4096",
    "hostile-offsets": "invalid offset",
}

UPDATE_SPEC = {A: TensorSpec((2, 3), torch.float32, "lora_A"), B: TensorSpec((3, 2), torch.float32, "lora_B")}


# -- helpers -------------------------------------------------------------------------------------------------


def spec_vectors() -> dict[str, bytes]:
    """Every ```hex name=...``` block of docs/protocol.md as bytes."""
    text = SPEC.read_text(encoding="utf-8")
    found: dict[str, bytes] = {}
    for name, block in VECTOR_BLOCK.findall(text):
        assert name not in found, f"vector {name} appears twice in the spec"
        hex_text = "".join(block.split())
        assert re.fullmatch(r"[0-9a-f]*", hex_text), f"vector {name} is not lower-case hex"
        found[name] = bytes.fromhex(hex_text)
    return found


def meta(**over: str) -> dict[str, str]:
    """A valid update's metadata with some keys replaced."""
    m = {
        "schema": SCHEMA_VERSION,
        "kind": "update",
        "fleet": "demo",
        "round": "1",
        "phase": "train",
        "client": "phone-1",
        "body": json.dumps({"num_samples": 1, "run": RUN}),
        "roles": "{}",
    }
    m.update(over)
    return m


def raw(header: Any, data: bytes = b"", *, length: int | None = None, pad: bool = True) -> bytes:
    """A safetensors-like payload from a header (JSON value or raw bytes), with an optional forged length."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    if pad:
        text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def with_tensors(entries: dict[str, Any], data: bytes, **meta_over: str) -> bytes:
    return raw({"__metadata__": meta(**meta_over), **entries}, data)


def f32(*values: float) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


def entry(dtype: str, shape: list[int], begin: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def read_as_spec_says(payload: bytes) -> tuple[dict[str, str], dict[str, tuple[str, list[int], list[float]]]]:
    """An independent reader written from docs/protocol.md section 2 only (no safetensors library)."""
    (n,) = struct.unpack_from("<Q", payload, 0)
    assert n <= len(payload) - 8
    header = json.loads(payload[8 : 8 + n].decode("utf-8"))
    data = payload[8 + n :]
    metadata = header.pop("__metadata__")
    tensors = {}
    covered = 0
    formats = {"F32": "f", "I64": "q", "I32": "i"}
    for name, e in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        begin, end = e["data_offsets"]
        assert begin == covered, "tensors must tile the data section"
        count = math.prod(e["shape"])
        assert end - begin == count * ELEMENT_BYTES[e["dtype"]]
        values = list(struct.unpack_from(f"<{count}{formats[e['dtype']]}", data, begin))
        tensors[name] = (e["dtype"], e["shape"], values)
        covered = end
    assert covered == len(data), "no trailing bytes after the last tensor"
    return metadata, tensors


def assert_one_line_protocol_error(payload: Any, keyword: str = "", **kwargs: Any) -> ProtocolError:
    """decode must raise ProtocolError (no other type) with a one-line message containing keyword."""
    try:
        decode(payload, **kwargs)
    except ProtocolError as exc:
        message = str(exc)
        assert message and "\n" not in message
        assert keyword.lower() in message.lower(), f"{keyword!r} not in {message!r}"
        return exc
    except Exception as exc:  # the point: nothing else may escape
        pytest.fail(f"decode raised {type(exc).__name__} instead of ProtocolError: {exc}")
    pytest.fail("decode accepted a payload that must be rejected")


def messages_equal(a: Message, b: Message) -> None:
    assert (a.kind, a.fleet, a.round, a.phase, a.client) == (b.kind, b.fleet, b.round, b.phase, b.client)
    assert a.body == b.body
    assert a.roles == b.roles
    assert set(a.tensors) == set(b.tensors)
    for name, t in a.tensors.items():
        assert t.dtype == b.tensors[name].dtype, name
        assert tuple(t.shape) == tuple(b.tensors[name].shape), name
        assert torch.equal(t, b.tensors[name]), name


# -- the spec's test vectors ---------------------------------------------------------------------------------


def test_spec_holds_exactly_the_documented_vectors() -> None:
    assert set(spec_vectors()) == set(VALID_VECTORS) | set(HOSTILE_VECTORS)


@pytest.mark.parametrize("name", sorted(VALID_VECTORS))
def test_valid_vector_decodes_to_the_documented_fields(name: str) -> None:
    payload = spec_vectors()[name]
    want = VALID_VECTORS[name]
    assert len(payload) == want["size"]
    msg = decode(payload)
    assert msg.kind == want["kind"]
    assert msg.fleet == "demo"
    assert msg.round == want["round"]
    assert msg.phase == want["phase"]
    assert msg.client == want["client"]
    assert msg.body == want["body"]
    assert msg.roles == want["roles"]
    assert set(msg.tensors) == set(want["tensors"])
    for tensor_name, values in want["tensors"].items():
        t = msg.tensors[tensor_name]
        assert t.dtype == torch.float32
        torch.testing.assert_close(t, torch.tensor(values), equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(VALID_VECTORS))
def test_valid_vector_follows_the_documented_layout(name: str) -> None:
    """Header length is a multiple of 8, padding is spaces, metadata holds the 8 keys as strings, and a reader
    written from the spec alone gets the same tensors as the library."""
    payload = spec_vectors()[name]
    (n,) = struct.unpack_from("<Q", payload)
    assert n % 8 == 0
    header_text = payload[8 : 8 + n].decode("utf-8")
    assert header_text.startswith("{")
    assert header_text.rstrip(" ").endswith("}")
    metadata, tensors = read_as_spec_says(payload)
    assert set(metadata) == {"schema", "kind", "fleet", "round", "phase", "client", "body", "roles"}
    assert all(isinstance(v, str) for v in metadata.values())
    assert json.loads(metadata["body"]) == VALID_VECTORS[name]["body"]
    decoded = decode(payload)
    for tensor_name, (dtype, shape, values) in tensors.items():
        assert dtype == "F32"
        assert list(decoded.tensors[tensor_name].shape) == shape
        expected = torch.tensor(values, dtype=torch.float32).reshape(shape)
        torch.testing.assert_close(decoded.tensors[tensor_name], expected, equal_nan=True, rtol=0, atol=0)


def test_update_ok_byte_table_of_the_spec() -> None:
    payload = spec_vectors()["update-ok"]
    assert payload[:8] == bytes.fromhex("5002000000000000")
    assert payload[598:600] == b"  " and payload[597:598] == b"}"
    assert payload[600:624] == f32(0.5, -1.0, 2.0, 0.25, 1.5, -0.75)
    assert payload[624:648] == f32(1.0, 0.0, -0.5, 0.125, 3.0, -2.0)
    nan = spec_vectors()["update-nan"]
    assert nan[628:632] == bytes.fromhex("0000c07f")
    assert nan[:628] == payload[:628] and nan[632:] == payload[632:]


def test_update_vectors_against_the_aggregator_validator() -> None:
    vectors = spec_vectors()
    kwargs = dict(fleet="demo", run=RUN, round=1, phase="train", topic_client="phone-1",
                  selected=["phone-1", "phone-2"], expected=UPDATE_SPEC)
    validate_update(decode(vectors["update-ok"]), **kwargs)
    with pytest.raises(ProtocolError, match="NaN or Inf"):
        validate_update(decode(vectors["update-nan"]), **kwargs)


def test_assign_vector_against_the_client_validator() -> None:
    msg = decode(spec_vectors()["assign-train"])
    validate_assignment(msg, fleet="demo", run=RUN, client="phone-1", after_round=0, expected=UPDATE_SPEC)
    with pytest.raises(ProtocolError, match="addressed"):
        validate_assignment(msg, fleet="demo", run=RUN, client="phone-2", after_round=0, expected=UPDATE_SPEC)


def test_task_vector_body_is_a_valid_task_spec() -> None:
    body = decode(spec_vectors()["task"]).body
    task = TaskSpec.from_body(body["task"])
    assert task.labels == ["negative", "positive"]
    assert task.lora.target_modules == ("query", "value")
    # the vector predates expert methods, LoRA-A2 and the executorch engine's training switches: absent `amole`
    # and `a2` objects and the absent `train.dropout` and `train.optimizer` take their defaults
    assert json.loads(json.dumps(task.to_body())) == {
        **TASK_BODY, "amole": dataclasses.asdict(AMoLEConfig()), "a2": dataclasses.asdict(A2Config()),
        "train": {**TASK_BODY["train"], "dropout": True, "optimizer": "adamw"}}


@pytest.mark.parametrize("name", sorted(HOSTILE_VECTORS))
def test_hostile_vector_is_rejected_with_the_documented_reason(name: str) -> None:
    assert_one_line_protocol_error(spec_vectors()[name], HOSTILE_VECTORS[name])


def test_metadata_key_order_is_not_significant() -> None:
    """The same message with the header members and metadata keys in reverse order decodes identically."""
    payload = spec_vectors()["update-ok"]
    (n,) = struct.unpack_from("<Q", payload)
    header = json.loads(payload[8 : 8 + n])
    header["__metadata__"] = dict(reversed(list(header["__metadata__"].items())))
    reordered = dict(reversed(list(header.items())))
    other = raw(json.dumps(reordered, separators=(",", ":")).encode(), payload[8 + n :])
    assert other != payload
    messages_equal(decode(other), decode(payload))


def test_encoder_output_follows_the_spec_layout() -> None:
    msg = Message(Kind.UPDATE, "demo", 1, "train", "phone-1", UPDATE_BODY,
                  {A: torch.tensor(A_VALUES), B: torch.tensor(B_VALUES)}, ROLES)
    payload = encode(msg)
    (n,) = struct.unpack_from("<Q", payload)
    assert n % 8 == 0
    metadata, tensors = read_as_spec_says(payload)
    assert metadata["schema"] == SCHEMA_VERSION and metadata["round"] == "1"
    assert json.loads(metadata["roles"]) == ROLES
    assert tensors[A] == ("F32", [2, 3], [v for row in A_VALUES for v in row])
    assert tensors[B] == ("F32", [3, 2], [v for row in B_VALUES for v in row])
    # same message as the spec's vector, whatever the key order the library chose
    messages_equal(decode(payload), decode(spec_vectors()["update-ok"]))


# -- round trips ---------------------------------------------------------------------------------------------


def every_dtype_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {
        "f32": torch.randn(3, 4, generator=g),
        "f16": torch.randn(2, 5, generator=g).to(torch.float16),
        "bf16": torch.randn(4, 2, generator=g).to(torch.bfloat16),
        "i64": torch.randint(-(2**40), 2**40, (2, 3), generator=g, dtype=torch.int64),
        "i32": torch.randint(-1000, 1000, (5,), generator=g, dtype=torch.int32),
        "scalar": torch.tensor(-2.5),
        "empty": torch.zeros(0, 3),
        "transposed": torch.arange(6, dtype=torch.float32).reshape(2, 3).T,
    }


@pytest.mark.parametrize("kind", list(Kind))
def test_round_trip_every_kind_with_every_dtype(kind: Kind) -> None:
    tensors = every_dtype_tensors()
    assert {str(t.dtype) for t in tensors.values()} >= {f"torch.{d}" for d in
                                                         ("float32", "float16", "bfloat16", "int64", "int32")}
    body = {
        "run": RUN,
        "nested": {"list": [1, 2.5, "x", None, True, {"deep": [[], {}]}],
                   "unicode": "h\u00e9llo \u2713 \U0001f600"},
        "negative": -3,
        "big": 2**62,
        "quote": 'a "quoted" \\ string\n',
    }
    roles = {"f32": "lora_A", "bf16": "lora_B", "i64": "custom role"}
    msg = Message(kind, "fleet.1", 42, "train-A", "dev_1", body, tensors, roles)
    back = decode(encode(msg))
    expected = Message(kind, "fleet.1", 42, "train-A", "dev_1", body,
                       {k: v.contiguous() for k, v in tensors.items()}, roles)
    messages_equal(back, expected)
    assert back.tensors["transposed"].tolist() == [[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]]


def test_round_trip_accepts_bytearray_and_memoryview_and_defaults() -> None:
    payload = encode(Message(Kind.STATUS, "demo", client="phone-1", body={"state": "online"}))
    for form in (payload, bytearray(payload), memoryview(payload)):
        msg = decode(form)
        assert (msg.kind, msg.round, msg.phase, msg.client, msg.tensors, msg.roles) == (
            Kind.STATUS, 0, "", "phone-1", {}, {})


def test_round_bounds_survive() -> None:
    for rnd in (0, 1, 10**9):
        assert decode(encode(Message(Kind.ROUND, "demo", rnd, "train"))).round == rnd


def test_encode_refuses_what_the_decoder_would_reject() -> None:
    with pytest.raises(ValueError, match="roles"):
        encode(Message(Kind.UPDATE, "demo", 1, roles={"absent": "lora_A"}))
    with pytest.raises(ValueError):
        encode(Message(Kind.METRICS, "demo", 1, body={"loss": math.nan}))


# -- hostile payloads ----------------------------------------------------------------------------------------

_GOOD_DATA = f32(1, 2, 3, 4, 5, 6)
_GOOD_ENTRY = {"t": entry("F32", [2, 3], 0, 24)}


def _huge_round() -> str:
    return str(10**9 + 1)


HOSTILE: list[tuple[str, Any, str]] = [
    ("empty", b"", "too short"),
    ("seven bytes", b"\x00" * 7, "too short"),
    ("garbage text", b"hello world, this is not a safetensors payload at all", "header length"),
    ("header length larger than payload", raw({"__metadata__": meta()}, length=10_000), "header length"),
    ("header length one too large", raw(b'{"__metadata__":{}}', pad=False, length=20), "header length"),
    ("header length huge", raw({"__metadata__": meta()}, length=2**64 - 1), "header length"),
    ("header length over the 1 MiB header limit", raw(b"{" + b" " * (1024 * 1024 + 7)), "header length"),
    ("header not JSON", raw(b"{this is not json"), "not valid JSON"),
    ("header not UTF-8", raw(b'{"\xff\xfe": 1}'), "not valid JSON"),
    ("header empty", raw(b"", pad=False), "not valid JSON"),
    ("header JSON array", raw([{"__metadata__": meta()}]), "not a JSON object"),
    ("header JSON string", raw("__metadata__"), "not a JSON object"),
    ("missing __metadata__", raw({"t": entry("F32", [1], 0, 4)}, f32(1)), "__metadata__"),
    ("__metadata__ is a list", raw({"__metadata__": list(meta().items())}), "__metadata__"),
    ("metadata with a number value", raw({"__metadata__": {**meta(), "round": 1}}), "__metadata__"),
    ("metadata with a null value", raw({"__metadata__": {**meta(), "phase": None}}), "__metadata__"),
    ("metadata with an object value", raw({"__metadata__": {**meta(), "body": {"run": RUN}}}),
     "__metadata__"),
    ("wrong schema version", raw({"__metadata__": meta(schema="edgemole/2")}), "schema"),
    ("missing schema", raw({"__metadata__": {k: v for k, v in meta().items() if k != "schema"}}), "schema"),
    ("unknown kind", raw({"__metadata__": meta(kind="upgrade")}), "kind"),
    ("kind in upper case", raw({"__metadata__": meta(kind="UPDATE")}), "kind"),
    ("round not a number", raw({"__metadata__": meta(round="one")}), "round"),
    ("round negative", raw({"__metadata__": meta(round="-1")}), "round"),
    ("round with a plus sign", raw({"__metadata__": meta(round="+1")}), "round"),
    ("round fractional", raw({"__metadata__": meta(round="1.5")}), "round"),
    ("round with exponent", raw({"__metadata__": meta(round="1e3")}), "round"),
    ("round with spaces", raw({"__metadata__": meta(round=" 1")}), "round"),
    ("round empty", raw({"__metadata__": meta(round="")}), "round"),
    ("round missing", raw({"__metadata__": {k: v for k, v in meta().items() if k != "round"}}), "round"),
    ("round huge", raw({"__metadata__": meta(round=_huge_round())}), "round"),
    ("round 2**64", raw({"__metadata__": meta(round=str(2**64))}), "round"),
    ("body not JSON", raw({"__metadata__": meta(body="{run:")}), "body"),
    ("body a JSON array", raw({"__metadata__": meta(body="[1, 2]")}), "body"),
    ("body a JSON string", raw({"__metadata__": meta(body='"text"')}), "body"),
    ("body null", raw({"__metadata__": meta(body="null")}), "body"),
    ("body with NaN", raw({"__metadata__": meta(body='{"num_samples": NaN}')}), "body"),
    ("body with Infinity", raw({"__metadata__": meta(body='{"metrics": {"loss": Infinity}}')}), "body"),
    ("body with -Infinity", raw({"__metadata__": meta(body='{"x": [-Infinity]}')}), "body"),
    ("body with a 5000-digit integer", raw({"__metadata__": meta(body='{"x": ' + "9" * 5000 + "}")}), "body"),
    ("roles not JSON", raw({"__metadata__": meta(roles="{")}), "roles"),
    ("roles a JSON array", raw({"__metadata__": meta(roles='["t"]')}), "roles"),
    ("roles naming an absent tensor", with_tensors(_GOOD_ENTRY, _GOOD_DATA, roles='{"ghost": "lora_A"}'),
     "roles"),
    ("roles with a non-string role", with_tensors(_GOOD_ENTRY, _GOOD_DATA, roles='{"t": 1}'), "roles"),
    ("dtype F64", with_tensors({"t": entry("F64", [2], 0, 16)}, b"\0" * 16), "dtype 'F64'"),
    ("dtype U8", with_tensors({"t": entry("U8", [4], 0, 4)}, b"\1\2\3\4"), "dtype 'U8'"),
    ("dtype BOOL", with_tensors({"t": entry("BOOL", [2], 0, 2)}, b"\0\1"), "dtype 'BOOL'"),
    ("dtype I8", with_tensors({"t": entry("I8", [2], 0, 2)}, b"\0\1"), "dtype 'I8'"),
    ("dtype I16", with_tensors({"t": entry("I16", [1], 0, 2)}, b"\0\1"), "dtype 'I16'"),
    ("dtype U64", with_tensors({"t": entry("U64", [1], 0, 8)}, b"\0" * 8), "dtype 'U64'"),
    ("dtype F8_E4M3", with_tensors({"t": entry("F8_E4M3", [1], 0, 1)}, b"\0"), "dtype 'F8_E4M3'"),
    ("dtype lower case", with_tensors({"t": entry("f32", [1], 0, 4)}, f32(1)), "dtype 'f32'"),
    ("dtype missing", with_tensors({"t": {"shape": [1], "data_offsets": [0, 4]}}, f32(1)), "dtype None"),
    ("dtype a number", with_tensors({"t": entry("F32", [1], 0, 4) | {"dtype": 32}}, f32(1)), "dtype 32"),
    ("tensor entry not an object", with_tensors({"t": [0, 4]}, f32(1)), "dtype None"),
    ("F32 after a bad tensor", with_tensors({"a": entry("F32", [1], 0, 4), "b": entry("F64", [1], 4, 12)},
                                            b"\0" * 12), "'b'"),
    ("data_offsets past the end", with_tensors({"t": entry("F32", [2, 3], 0, 48)}, _GOOD_DATA), "malformed"),
    ("data_offsets reversed", with_tensors({"t": entry("F32", [0], 4, 0)}, f32(1)), "malformed"),
    ("data_offsets overlapping",
     with_tensors({"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 4, 12)}, f32(1, 2, 3)), "malformed"),
    ("data_offsets with a gap",
     with_tensors({"a": entry("F32", [1], 0, 4), "b": entry("F32", [1], 8, 12)}, f32(1, 2, 3)), "malformed"),
    ("data_offsets not starting at 0", with_tensors({"t": entry("F32", [1], 4, 8)}, f32(1, 2)), "malformed"),
    ("data_offsets negative", with_tensors({"t": entry("F32", [1], -4, 0)}, f32(1)), "malformed"),
    ("data_offsets fractional", with_tensors({"t": entry("F32", [1], 0, 4) | {"data_offsets": [0.0, 4.0]}},
                                             f32(1)), "malformed"),
    ("data_offsets missing", with_tensors({"t": {"dtype": "F32", "shape": [1]}}, f32(1)), "malformed"),
    ("data truncated", with_tensors(_GOOD_ENTRY, _GOOD_DATA[:20]), "malformed"),
    ("data truncated to nothing", with_tensors(_GOOD_ENTRY, b""), "malformed"),
    ("trailing bytes after the data", with_tensors(_GOOD_ENTRY, _GOOD_DATA + b"\0\0\0\0"), "malformed"),
    ("trailing bytes without tensors", raw({"__metadata__": meta()}, b"\0" * 8), "malformed"),
    ("shape does not match the size", with_tensors({"t": entry("F32", [2, 2], 0, 24)}, _GOOD_DATA),
     "malformed"),
    ("shape negative", with_tensors({"t": entry("F32", [-6], 0, 24)}, _GOOD_DATA), "malformed"),
    ("shape overflowing", with_tensors({"t": entry("F32", [2**62, 2**62], 0, 0)}, b""), "malformed"),
    ("shape not a list", with_tensors({"t": entry("F32", [6], 0, 24) | {"shape": 6}}, _GOOD_DATA),
     "malformed"),
    ("not bytes", "a string payload", "bytes"),
    ("None", None, "bytes"),
]


@pytest.mark.parametrize(("payload", "keyword"), [pytest.param(p, k, id=i) for i, p, k in HOSTILE])
def test_hostile_payload_is_rejected(payload: Any, keyword: str) -> None:
    assert_one_line_protocol_error(payload, keyword)


@pytest.mark.parametrize("seed", range(8))
def test_random_bytes_are_rejected(seed: int) -> None:
    rng = random.Random(seed)
    payload = bytes(rng.randrange(256) for _ in range(rng.randrange(8, 2048)))
    assert_one_line_protocol_error(payload)


@pytest.mark.parametrize("seed", range(4))
def test_random_bytes_behind_a_plausible_length_are_rejected(seed: int) -> None:
    rng = random.Random(100 + seed)
    body = bytes(rng.randrange(256) for _ in range(rng.randrange(16, 512)))
    assert_one_line_protocol_error(struct.pack("<Q", rng.randrange(len(body) + 1)) + body)


def test_size_limit() -> None:
    payload = spec_vectors()["update-ok"]
    assert decode(payload, max_bytes=len(payload)).kind == Kind.UPDATE
    assert_one_line_protocol_error(payload, "exceeds the limit", max_bytes=len(payload) - 1)
    too_big = encode(Message(Kind.UPDATE, "demo", 1, tensors={"x": torch.zeros(4 * 1024 * 1024 + 1)}))
    assert len(too_big) > DEFAULT_MAX_MESSAGE_BYTES
    assert_one_line_protocol_error(too_big, "exceeds the limit")


def test_decode_without_metadata_extras_uses_documented_defaults() -> None:
    """Only schema, kind and round are required; missing fleet/phase/client/body/roles decode as empty."""
    msg = decode(raw({"__metadata__": {"schema": SCHEMA_VERSION, "kind": "round", "round": "7"}}))
    assert (msg.fleet, msg.phase, msg.client, msg.body, msg.roles) == ("", "", "", {}, {})
    # and unknown metadata keys are ignored
    assert decode(raw({"__metadata__": {**meta(), "future": "x"}})).body == {"num_samples": 1, "run": RUN}


# Defects found while writing the spec, now fixed: each of these payloads once let another exception escape or
# was accepted; all must be rejected with ProtocolError.
_NESTED = "[" * 100_000 + "]" * 100_000
KNOWN_DECODER_BUGS = [
    ("round in non-ASCII digits crashes int()", raw({"__metadata__": meta(round="\u00b2")}), ValueError),
    ("round in full-width digits is accepted", raw({"__metadata__": meta(round="\uff11\uff12")}), None),
    ("round of 5000 digits crashes int()", raw({"__metadata__": meta(round="1" * 5000)}), ValueError),
    ("unhashable dtype crashes the dtype check",
     with_tensors({"t": entry("F32", [1], 0, 4) | {"dtype": ["F32"]}}, f32(1)), TypeError),
    ("deeply nested header overflows the JSON parser", raw(_NESTED.encode()), RecursionError),
    ("deeply nested body overflows the JSON parser", raw({"__metadata__": meta(body=_NESTED)}),
     RecursionError),
    ("5000-digit integer in the header crashes json", raw(b'{"x": ' + b"7" * 5000 + b"}"), ValueError),
    ("1e999 in the body decodes to infinity", raw({"__metadata__": meta(body='{"x": 1e999}')}), None),
]


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(p, id=name) for name, p, _ in KNOWN_DECODER_BUGS
    ],
)
def test_known_decoder_defects(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode(payload)


# -- fuzzing -------------------------------------------------------------------------------------------------


def _mutate_bytes(rng: random.Random, payload: bytes) -> bytes:
    b = bytearray(payload)
    op = rng.randrange(7)
    if op == 0:  # overwrite a few bytes anywhere
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] = rng.randrange(256)
    elif op == 1:  # flip single bits
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif op == 2:  # truncate
        del b[rng.randrange(len(b)) :]
    elif op == 3:  # extend
        b += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    elif op == 4:  # corrupt the length field
        b[rng.randrange(8)] = rng.randrange(256)
    elif op == 5:  # delete a slice in the middle
        i = rng.randrange(len(b))
        del b[i : i + rng.randint(1, 32)]
    else:  # overwrite a slice with printable JSON-ish characters
        i = rng.randrange(len(b))
        junk = "".join(rng.choice('{}[]",:0123456789-eE.ntrufalsNaI ') for _ in range(rng.randint(1, 16)))
        b[i : i + len(junk)] = junk.encode()
    return bytes(b)


def test_fuzz_byte_mutations_only_give_messages_or_protocol_errors() -> None:
    rng = random.Random(20240611)
    seeds = [spec_vectors()[n] for n in ("update-ok", "status-ready", "assign-train", "round-train")]
    outcomes = {"accepted": 0, "rejected": 0}
    for i in range(400):
        payload = _mutate_bytes(rng, rng.choice(seeds))
        try:
            msg = decode(payload)
        except ProtocolError as exc:
            assert str(exc) and "\n" not in str(exc)
            outcomes["rejected"] += 1
        except Exception as exc:
            pytest.fail(f"mutation {i} ({payload[:80]!r}...) raised {type(exc).__name__}: {exc}")
        else:
            assert isinstance(msg, Message)
            outcomes["accepted"] += 1
    # mutations of tensor bytes keep a payload valid, nearly all others break it: both must occur
    assert outcomes["accepted"] > 0 and outcomes["rejected"] > 200, outcomes


_POOL: list[Any] = [None, True, False, 0, -1, 3, 2**64, 1.5, -0.0, "", "x", "F32", "F64", "I64", "99",
                    [], [1], [0, 4], [4, 0], [-1, 2], [2, 3], {}, {"a": 1}, ["F32"], [[1]]]


def _mutate_structure(rng: random.Random, header: dict[str, Any]) -> dict[str, Any]:
    """Replace one value somewhere in the header (metadata, an entry or one of its fields) by a pool value."""
    header = json.loads(json.dumps(header))
    name = rng.choice(sorted(header))
    target = header[name]
    key = rng.choice(sorted(target))
    value = rng.choice(_POOL)
    if key == "dtype" and isinstance(value, list | dict):
        value = "BF16"  # an unhashable dtype is a known decoder defect, see test_known_decoder_defects
    if rng.random() < 0.2:
        del target[key]
    elif name == "__metadata__" and rng.random() < 0.5:
        target[key] = json.dumps(value)  # a string that holds some other JSON value
    else:
        target[key] = value
    return header


def test_fuzz_header_structure_only_gives_messages_or_protocol_errors() -> None:
    rng = random.Random(7)
    payload = spec_vectors()["update-ok"]
    (n,) = struct.unpack_from("<Q", payload)
    header, data = json.loads(payload[8 : 8 + n]), payload[8 + n :]
    rejected = 0
    for i in range(300):
        mutated = raw(_mutate_structure(rng, header), data)
        try:
            decode(mutated)
        except ProtocolError:
            rejected += 1
        except Exception as exc:
            pytest.fail(f"structural mutation {i} raised {type(exc).__name__}: {exc}\n{mutated[8:600]!r}")
    assert rejected > 100


# -- validate_update -----------------------------------------------------------------------------------------


def good_update(**changes: Any) -> Message:
    msg = Message(Kind.UPDATE, "demo", 3, "train", "phone-1",
                  {"run": RUN, "num_samples": 50, "metrics": {"acc_before": 0.5, "steps": 10}},
                  {A: torch.tensor(A_VALUES), B: torch.tensor(B_VALUES)}, dict(ROLES))
    msg = decode(encode(msg))
    for key, value in changes.items():
        setattr(msg, key, value)
    return msg


def update_kwargs(**changes: Any) -> dict[str, Any]:
    kwargs = dict(fleet="demo", run=RUN, round=3, phase="train", topic_client="phone-1",
                  selected=["phone-1", "phone-2"], expected=UPDATE_SPEC)
    kwargs.update(changes)
    return kwargs


def test_validate_update_accepts_a_good_update() -> None:
    validate_update(good_update(), **update_kwargs())
    validate_update(good_update(body={"run": RUN, "num_samples": 10**9}), **update_kwargs())
    validate_update(good_update(body={"run": RUN, "num_samples": 1, "metrics": {}}), **update_kwargs())
    # an eval update carries no tensors and is checked against an empty expectation
    validate_update(good_update(phase="eval", tensors={}, roles={}),
                    **update_kwargs(phase="eval", expected={}))


def _set_tensor(name: str, value: torch.Tensor) -> Callable[[Message], None]:
    return lambda m: m.tensors.__setitem__(name, value)


def _poison(value: float) -> Callable[[Message], None]:
    def apply(m: Message) -> None:
        t = m.tensors[B].clone()
        t[1, 0] = value
        m.tensors[B] = t

    return apply


def _body(**fields: Any) -> Callable[[Message], None]:
    return lambda m: m.body.update(fields)


def _drop_body(key: str) -> Callable[[Message], None]:
    return lambda m: m.body.pop(key)


BAD_UPDATES: list[tuple[str, Callable[[Message], None], dict[str, Any], str]] = [
    ("wrong kind", lambda m: setattr(m, "kind", Kind.ASSIGN), {}, "expected a update"),
    ("status kind", lambda m: setattr(m, "kind", Kind.STATUS), {}, "expected a update"),
    ("wrong fleet", lambda m: setattr(m, "fleet", "other"), {}, "fleet"),
    ("client field differs from topic", lambda m: setattr(m, "client", "phone-2"), {}, "topic client"),
    ("topic client differs from field", lambda m: None, {"topic_client": "phone-2"}, "topic client"),
    ("client not selected", lambda m: None, {"selected": ["phone-2"]}, "not selected"),
    ("nobody selected", lambda m: None, {"selected": []}, "not selected"),
    ("stale round", lambda m: setattr(m, "round", 2), {}, "stale or future"),
    ("future round", lambda m: setattr(m, "round", 4), {}, "stale or future"),
    ("wrong phase", lambda m: setattr(m, "phase", "eval"), {}, "phase"),
    ("empty phase", lambda m: setattr(m, "phase", ""), {}, "phase"),
    ("wrong run id", _body(run="000000000000"), {}, "run"),
    ("run id missing", _drop_body("run"), {}, "run"),
    ("run id not a string", _body(run=5), {}, "run"),
    ("missing tensor", lambda m: m.tensors.pop(B), {}, "missing"),
    ("extra tensor", _set_tensor("head.bias", torch.zeros(2)), {}, "unexpected"),
    ("renamed tensor", lambda m: m.tensors.__setitem__(A + "x", m.tensors.pop(A)), {}, "missing"),
    ("wrong shape", _set_tensor(A, torch.zeros(3, 2)), {}, "shape"),
    ("wrong rank", _set_tensor(A, torch.zeros(6)), {}, "shape"),
    ("wrong dtype", _set_tensor(A, torch.zeros(2, 3, dtype=torch.float16)), {}, "dtype"),
    ("integer dtype", _set_tensor(A, torch.zeros(2, 3, dtype=torch.int32)), {}, "dtype"),
    ("wrong role", lambda m: m.roles.__setitem__(A, "lora_B"), {}, "role"),
    ("missing role", lambda m: m.roles.pop(A), {}, "role"),
    ("NaN", _poison(math.nan), {}, "NaN or Inf"),
    ("+Inf", _poison(math.inf), {}, "NaN or Inf"),
    ("-Inf", _poison(-math.inf), {}, "NaN or Inf"),
    ("num_samples missing", _drop_body("num_samples"), {}, "num_samples"),
    ("num_samples zero", _body(num_samples=0), {}, "num_samples"),
    ("num_samples negative", _body(num_samples=-5), {}, "num_samples"),
    ("num_samples bool", _body(num_samples=True), {}, "num_samples"),
    ("num_samples float", _body(num_samples=50.0), {}, "num_samples"),
    ("num_samples string", _body(num_samples="50"), {}, "num_samples"),
    ("num_samples too large", _body(num_samples=10**9 + 1), {}, "num_samples"),
    ("metrics a list", _body(metrics=[0.5]), {}, "metrics"),
    ("metrics a number", _body(metrics=0.5), {}, "metrics"),
    ("metrics null", _body(metrics=None), {}, "metrics"),
    ("metric NaN", _body(metrics={"loss": math.nan}), {}, "metrics"),
    ("metric +Inf", _body(metrics={"loss": math.inf}), {}, "metrics"),
    ("metric -Inf", _body(metrics={"loss": -math.inf}), {}, "metrics"),
    ("metric a string", _body(metrics={"loss": "0.5"}), {}, "metrics"),
    ("metric a bool", _body(metrics={"ok": True}), {}, "metrics"),
    ("metric null", _body(metrics={"loss": None}), {}, "metrics"),
    ("metric nested", _body(metrics={"loss": {"v": 1}}), {}, "metrics"),
    ("metric key not a string", _body(metrics={1: 0.5}), {}, "metrics"),
]


@pytest.mark.parametrize(("mutate", "kwargs", "keyword"),
                         [pytest.param(f, k, w, id=i) for i, f, k, w in BAD_UPDATES])
def test_validate_update_rejects(
    mutate: Callable[[Message], None], kwargs: dict[str, Any], keyword: str
) -> None:
    msg = good_update()
    mutate(msg)
    with pytest.raises(ProtocolError) as info:
        validate_update(msg, **update_kwargs(**kwargs))
    assert keyword.lower() in str(info.value).lower()


def test_validate_update_of_a_decoded_nan_payload() -> None:
    """NaN that arrives over the wire (not just set in memory) is caught too."""
    tensors = {A: torch.tensor(A_VALUES), B: torch.tensor(B_NAN)}
    msg = decode(encode(Message(Kind.UPDATE, "demo", 3, "train", "phone-1", {"run": RUN, "num_samples": 5},
                                tensors, dict(ROLES))))
    with pytest.raises(ProtocolError, match="NaN"):
        validate_update(msg, **update_kwargs())


def test_spec_of_describes_what_was_sent() -> None:
    tensors = {A: torch.zeros(2, 3), "head.bias": torch.zeros(2, dtype=torch.float16)}
    spec = spec_of(tensors, {A: "lora_A"})
    assert spec == {A: TensorSpec((2, 3), torch.float32, "lora_A"),
                    "head.bias": TensorSpec((2,), torch.float16, "")}


# -- validate_assignment -------------------------------------------------------------------------------------


def good_assignment(**changes: Any) -> Message:
    msg = Message(Kind.ASSIGN, "demo", 4, "train", "phone-1", {"run": RUN, "local_steps": 5},
                  {A: torch.tensor(A_VALUES), B: torch.zeros(3, 2)}, dict(ROLES))
    msg = decode(encode(msg))
    for key, value in changes.items():
        setattr(msg, key, value)
    return msg


def assign_kwargs(**changes: Any) -> dict[str, Any]:
    kwargs = dict(fleet="demo", run=RUN, client="phone-1", after_round=3, expected=UPDATE_SPEC)
    kwargs.update(changes)
    return kwargs


@pytest.mark.parametrize("phase", PHASES)
def test_validate_assignment_accepts_every_phase(phase: str) -> None:
    validate_assignment(good_assignment(phase=phase), **assign_kwargs())


def test_validate_assignment_accepts_any_newer_round() -> None:
    validate_assignment(good_assignment(round=1), **assign_kwargs(after_round=0))
    validate_assignment(good_assignment(round=100), **assign_kwargs())


BAD_ASSIGNMENTS: list[tuple[str, dict[str, Any], dict[str, Any], str]] = [
    ("wrong kind", {"kind": Kind.UPDATE}, {}, "expected a assign"),
    ("other fleet", {"fleet": "elsewhere"}, {}, "fleet"),
    ("other client", {"client": "phone-2"}, {}, "addressed"),
    ("no client", {"client": ""}, {}, "addressed"),
    ("other run", {"body": {"run": "ffffffffffff"}}, {}, "run"),
    ("no run", {"body": {}}, {}, "run"),
    ("client has no run yet", {}, {"run": ""}, "run"),
    ("same round as the last answered (stale or duplicate)", {"round": 3}, {}, "stale"),
    ("older round", {"round": 1}, {}, "stale"),
    ("round 0", {"round": 0}, {"after_round": 0}, "stale"),
    ("phase done", {"phase": DONE}, {}, "phase"),
    ("empty phase", {"phase": ""}, {}, "phase"),
    ("phase in upper case", {"phase": "TRAIN"}, {}, "phase"),
    ("wrong shapes", {"tensors": {A: torch.zeros(3, 2), B: torch.zeros(2, 3)}}, {}, "shape"),
    ("missing tensor", {"tensors": {A: torch.zeros(2, 3)}}, {}, "missing"),
    ("extra tensor", {}, {"expected": {A: UPDATE_SPEC[A]}}, "unexpected"),
    ("wrong dtype", {"tensors": {A: torch.zeros(2, 3, dtype=torch.bfloat16), B: torch.zeros(3, 2)}}, {},
     "dtype"),
    ("wrong role", {"roles": {A: "lora_B", B: "lora_B"}}, {}, "role"),
    ("NaN", {"tensors": {A: torch.full((2, 3), math.nan), B: torch.zeros(3, 2)}}, {}, "NaN"),
]


@pytest.mark.parametrize(("changes", "kwargs", "keyword"),
                         [pytest.param(c, k, w, id=i) for i, c, k, w in BAD_ASSIGNMENTS])
def test_validate_assignment_rejects(changes: dict[str, Any], kwargs: dict[str, Any], keyword: str) -> None:
    with pytest.raises(ProtocolError) as info:
        validate_assignment(good_assignment(**changes), **assign_kwargs(**kwargs))
    assert keyword.lower() in str(info.value).lower()


# -- topics --------------------------------------------------------------------------------------------------


def test_topic_names() -> None:
    t = Topics("demo")
    assert t.base == "edgemole/demo"
    assert t.task == "edgemole/demo/task"
    assert t.round == "edgemole/demo/round"
    assert t.metrics == "edgemole/demo/metrics"
    assert t.assign("phone-1") == "edgemole/demo/clients/phone-1/assign"
    assert t.update("phone-1") == "edgemole/demo/clients/phone-1/update"
    assert t.status("phone-1") == "edgemole/demo/clients/phone-1/status"
    assert t.all_updates == "edgemole/demo/clients/+/update"
    assert t.all_status == "edgemole/demo/clients/+/status"


def test_topic_prefix_with_levels() -> None:
    t = Topics("f1", "site1/lab.2/edgemole")
    assert t.round == "site1/lab.2/edgemole/f1/round"
    assert t.update("c") == "site1/lab.2/edgemole/f1/clients/c/update"
    assert t.parse_client_topic("site1/lab.2/edgemole/f1/clients/c/status") == ("c", "status")
    assert t.parse_client_topic("edgemole/f1/clients/c/status") is None


@pytest.mark.parametrize("prefix", ["", "/edgemole", "edgemole/", "a//b", "a/+/b", "edge#mole", "+", "#"])
def test_topic_prefix_rejected(prefix: str) -> None:
    with pytest.raises(ConfigError, match="prefix"):
        Topics("demo", prefix)


def test_topic_fleet_name_checked() -> None:
    with pytest.raises(ConfigError, match="fleet name"):
        Topics("de/mo")
    with pytest.raises(ConfigError, match="fleet name"):
        Topics("+")


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        ("edgemole/demo/clients/phone-1/update", ("phone-1", "update")),
        ("edgemole/demo/clients/phone-1/status", ("phone-1", "status")),
        ("edgemole/demo/clients/A.b_c-9/assign", ("A.b_c-9", "assign")),
        ("edgemole/other/clients/phone-1/update", None),
        ("edgemole/demo2/clients/phone-1/update", None),
        ("edgemole/dem/clients/phone-1/update", None),
        ("other/demo/clients/phone-1/update", None),
        ("edgemole/demo/clients/phone-1/update/extra", None),
        ("edgemole/demo/clients/phone-1", None),
        ("edgemole/demo/clients//update", None),
        ("edgemole/demo/clients/+/update", None),
        ("edgemole/demo/clients/#", None),
        ("edgemole/demo/clients/ph+one/update", None),
        ("edgemole/demo/clients/" + "x" * 65 + "/update", None),
        ("edgemole/demo/round", None),
    ],
)
def test_parse_client_topic(topic: str, expected: tuple[str, str] | None) -> None:
    assert Topics("demo").parse_client_topic(topic) == expected


@pytest.mark.parametrize("name", ["a", "phone-1", "A.b_c-9", "0", "x" * 64])
def test_check_name_accepts(name: str) -> None:
    assert check_name(name, "client id") == name


@pytest.mark.parametrize(
    "name",
    ["", "a/b", "/", "+", "#", "a+", "a#", "x" * 65, "-a", ".a", "_a", "a b", " a", "caf\u00e9", "a\tb",
     "a\0b", None, 5],
)
def test_check_name_rejects(name: Any) -> None:
    with pytest.raises(ConfigError, match="client id"):
        check_name(name, "client id")


def test_check_name_rejects_trailing_newline() -> None:
    with pytest.raises(ConfigError):
        check_name("phone-1\n", "client id")


# -- configuration -------------------------------------------------------------------------------------------


def test_from_dict_builds_nested_dataclasses() -> None:
    s = from_dict(Settings, {"fleet": {"rounds": 3, "quorum": 1}, "lora": {"target_modules": ["query"]}}, "")
    assert s.fleet.rounds == 3
    assert s.fleet.quorum == 1.0 and isinstance(s.fleet.quorum, float)
    assert s.lora.target_modules == ("query",)
    assert s.train == TrainConfig()


@pytest.mark.parametrize(
    ("cls", "data", "where", "needle"),
    [
        (TrainConfig, {"lcoal_steps": 3}, "train", "unknown key 'train.lcoal_steps'"),
        (Settings, {"fleet": {"round": 3}}, "", "unknown key 'fleet.round'"),
        (Settings, {"flet": {}}, "", "unknown key 'flet'"),
        (TrainConfig, {"local_steps": "3"}, "train", "train.local_steps must be an integer"),
        (TrainConfig, {"local_steps": 3.0}, "train", "train.local_steps must be an integer"),
        (TrainConfig, {"local_steps": True}, "train", "train.local_steps must be an integer"),
        (TrainConfig, {"lr": "0.1"}, "train", "train.lr must be a finite number"),
        (TrainConfig, {"lr": False}, "train", "train.lr must be a finite number"),
        (TrainConfig, {"lr": math.nan}, "train", "train.lr must be a finite number"),
        (TrainConfig, {"lr": math.inf}, "train", "train.lr must be a finite number"),
        (ModelConfig, {"name": 5}, "model", "model.name must be a string"),
        (LoRAConfig, {"train_head": "yes"}, "lora", "lora.train_head must be true or false"),
        (LoRAConfig, {"target_modules": "query"}, "lora", "lora.target_modules must be a list"),
        (LoRAConfig, {"target_modules": ["query", 1]}, "lora", "lora.target_modules[1] must be a string"),
        (Settings, {"fleet": {"rounds": "many"}}, "", "fleet.rounds"),
        (Settings, {"train": []}, "", "train must be a table"),
        (TrainConfig, [], "train", "train must be a table"),
        (TrainConfig, {"batch_size": 0}, "train", "train.batch_size"),
        (FleetConfig, {"quorum": 1.5}, "fleet", "fleet.quorum"),
    ],
)
def test_from_dict_rejects_with_the_key_named(cls: type, data: Any, where: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        from_dict(cls, data, where)
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def test_load_settings_from_toml_with_overrides(tmp_path: Path) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text(
        '[fleet]\nrounds = 3\nseed = 4\nfleet = "lab"\n\n[lora]\nr = 4\ntarget_modules = ["query"]\n'
        '\n[data]\nlabels = ["a", "b"]\n'
    )
    s = load_settings(path, {"fleet": {"rounds": 7, "seed": None}, "train": {"lr": 0.01}})
    assert s.fleet.rounds == 7  # override wins
    assert s.fleet.seed == 4  # None in overrides leaves the file's value
    assert s.fleet.fleet == "lab"
    assert s.lora.r == 4 and s.lora.target_modules == ("query",)
    assert s.train.lr == 0.01 and s.train.local_steps == TrainConfig().local_steps
    assert s.data.labels == ["a", "b"]


def test_load_settings_from_json(tmp_path: Path) -> None:
    path = tmp_path / "fleet.json"
    path.write_text(json.dumps({"fleet": {"method": "fedit", "quorum": 0.75}, "simulate": {"clients": 3}}))
    s = load_settings(path, {"simulate": {"clients": 5}})
    assert s.fleet.quorum == 0.75 and s.simulate.clients == 5
    # without a file, the dataclass defaults with the default method's own defaults (edgemole/defaults.py) on top
    expected = Settings()
    for key, value in METHOD_DEFAULTS[expected.fleet.method].items():
        section, name = key.split(".", 1)
        setattr(getattr(expected, section), name, value)
    assert load_settings(None) == expected


@pytest.mark.parametrize(
    ("name", "text", "needle"),
    [
        ("bad.toml", "[fleet\nrounds = 3\n", "is malformed"),
        ("bad2.toml", "[fleet]\nrounds = = 3\n", "is malformed"),
        ("bad.json", '{"fleet": {"rounds": 3,}}', "is malformed"),
        ("section.toml", "[fleat]\nrounds = 3\n", "unknown section 'fleat'"),
        ("key.toml", "[fleet]\nrouns = 3\n", "unknown key 'fleet.rouns'"),
        ("type.toml", '[fleet]\nrounds = "3"\n', "fleet.rounds must be an integer"),
        ("list.json", "[1, 2]", "must hold a table"),
        ("config.yaml", "fleet: {}\n", "must end in .toml or .json"),
    ],
)
def test_bad_config_files(tmp_path: Path, name: str, text: str, needle: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_config_file_and_bad_override(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "absent.toml")
    with pytest.raises(ConfigError, match="unknown key 'fleet.bogus'"):
        load_settings(None, {"fleet": {"bogus": 1}})
    path = tmp_path / "c.toml"
    path.write_text("fleet = 3\n")
    with pytest.raises(ConfigError, match="section 'fleet' must be a table"):
        load_settings(path, {"fleet": {"rounds": 2}})


def test_task_spec_round_trip_through_json() -> None:
    task = TaskSpec(
        labels=["x", "y", "z"], method="fedit", seed=11,
        model=ModelConfig(name="some/model", max_length=64),
        lora=LoRAConfig(r=4, alpha=8.0, dropout=0.0, target_modules=("query", "key", "value"),
                        train_head=False),
        train=TrainConfig(local_steps=3, batch_size=8, lr=0.01, weight_decay=0.1, eval_batch_size=32),
    )
    body = json.loads(json.dumps(task.to_body()))
    assert TaskSpec.from_body(body) == task
    # and through the wire, as the aggregator sends it
    msg = decode(encode(Message(Kind.TASK, "demo", body={"run": RUN, "task": task.to_body()})))
    assert TaskSpec.from_body(msg.body["task"]) == task


_DELETE = object()


def _task_body(**changes: Any) -> dict[str, Any]:
    body = json.loads(json.dumps(TASK_BODY))
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        target = body
        for p in parents:
            target = target[p]
        if value is _DELETE:
            del target[leaf]
        else:
            target[leaf] = value
    return body


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (_task_body(labels=["only"]), "at least 2 labels"),
        (_task_body(labels=["a", "a"]), "unique"),
        (_task_body(labels="a,b"), "task.labels must be a list"),
        (_task_body(labels=_DELETE), "labels"),
        (_task_body(seed="0"), "task.seed must be an integer"),
        (_task_body(lora__rank=8), "unknown key 'task.lora.rank'"),
        (_task_body(lora__r=0), "lora.r"),
        (_task_body(lora__alpha=-1.0), "lora.alpha"),
        (_task_body(train__lr=None), "task.train.lr must be a finite number"),
        (_task_body(train__local_steps=1.5), "task.train.local_steps must be an integer"),
        (_task_body(model__max_length=0), "model.max_length"),
        (_task_body(model="all-MiniLM-L6-v2"), "task.model must be a table"),
        (_task_body(extra=1), "unknown key 'task.extra'"),
        (None, "task must be a table"),
        ([], "task must be a table"),
    ],
)
def test_task_body_with_a_bad_field(body: Any, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        TaskSpec.from_body(body)
    assert needle in str(info.value)
