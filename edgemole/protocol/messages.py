"""Encoding and decoding of edgemole messages.

Every MQTT payload is one safetensors buffer: an 8-byte little-endian header length, a JSON header,
then raw little-endian tensor bytes. The message fields travel as strings in the header's
``__metadata__`` (see docs/protocol.md). Decoding never executes anything from the payload: the header
is parsed as JSON under a size bound and tensors are read by the safetensors library.
"""

from __future__ import annotations

import json
import math
import re
import struct
import sys
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

from edgemole.errors import ProtocolError

SCHEMA_VERSION = "edgemole/1"
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
MAX_HEADER_BYTES = 1024 * 1024
MAX_ROUND = 10**9
#: dtypes allowed on the wire; anything else is rejected before any tensor is materialised.
WIRE_DTYPES: dict[str, torch.dtype] = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
}
#: Work phases of an assignment: plain training, LoRA-A2's alternating factors, evaluation only.
PHASES = ("train", "train-A", "train-B", "eval")
#: Phase of the final round announcement: the run is over and clients may exit.
DONE = "done"


class Kind(StrEnum):
    TASK = "task"
    ROUND = "round"
    ASSIGN = "assign"
    UPDATE = "update"
    STATUS = "status"
    METRICS = "metrics"


@dataclass
class Message:
    """One protocol message. ``body`` holds the kind-specific fields as JSON-compatible values."""

    kind: Kind
    fleet: str
    round: int = 0
    phase: str = ""
    client: str = ""
    body: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    roles: dict[str, str] = field(default_factory=dict)


def encode(msg: Message) -> bytes:
    """Serialise a message; tensors are made contiguous CPU copies (safetensors needs that)."""
    unknown = set(msg.roles) - set(msg.tensors)
    if unknown:
        raise ValueError(f"roles given for tensors not in the message: {sorted(unknown)}")
    metadata = {
        "schema": SCHEMA_VERSION,
        "kind": str(Kind(msg.kind)),
        "fleet": msg.fleet,
        "round": str(int(msg.round)),
        "phase": msg.phase,
        "client": msg.client,
        "body": json.dumps(msg.body, sort_keys=True, allow_nan=False, separators=(",", ":")),
        "roles": json.dumps(msg.roles, sort_keys=True, separators=(",", ":")),
    }
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in msg.tensors.items()}
    return _st_save(tensors, metadata=metadata)


def _header(payload: bytes) -> dict[str, Any]:
    if len(payload) < 8:
        raise ProtocolError(f"payload of {len(payload)} bytes is too short for a safetensors header")
    (n,) = struct.unpack("<Q", payload[:8])
    if n > MAX_HEADER_BYTES or n > len(payload) - 8:
        raise ProtocolError(f"header length {n} exceeds the payload ({len(payload)} bytes) or the limit")
    try:
        header = json.loads(payload[8 : 8 + n].decode("utf-8"), parse_float=_finite_float)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, huge integers, deep nesting
        raise ProtocolError(f"header is not valid JSON: {exc.__class__.__name__}") from None
    if not isinstance(header, dict):
        raise ProtocolError("header is not a JSON object")
    return header


def _json_field(meta: dict[str, str], key: str) -> dict[str, Any]:
    try:
        value = json.loads(meta.get(key, "{}"), parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"metadata '{key}' is not valid JSON ({str(exc)[:100]})") from None
    if not isinstance(value, dict):
        raise ProtocolError(f"metadata '{key}' is not a JSON object")
    return value


def _reject_constant(name: str) -> float:
    raise ValueError(f"non-finite number {name}")


def _finite_float(text: str) -> float:
    """JSON numbers that overflow (``1e999``) would become infinity: refuse them like ``NaN``."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} overflows")
    return value


_ROUND = re.compile(r"[0-9]{1,10}")


def decode(payload: bytes, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Message:
    """Parse and structurally check a payload; raise :class:`ProtocolError` with a one-line reason."""
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise ProtocolError(f"payload must be bytes, got {type(payload).__name__}")
    payload = bytes(payload)
    if len(payload) > max_bytes:
        raise ProtocolError(f"payload of {len(payload)} bytes exceeds the limit of {max_bytes} bytes")
    header = _header(payload)
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ProtocolError("header has no '__metadata__' object of strings")
    if meta.get("schema") != SCHEMA_VERSION:
        raise ProtocolError(f"unsupported schema {meta.get('schema')!r} (expected {SCHEMA_VERSION!r})")
    try:
        kind = Kind(meta.get("kind", ""))
    except ValueError:
        raise ProtocolError(f"unknown message kind {meta.get('kind')!r}") from None
    round_text = meta.get("round", "")
    if not _ROUND.fullmatch(round_text) or int(round_text) > MAX_ROUND:
        raise ProtocolError(f"invalid round {round_text!r}")
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        if not isinstance(dtype, str) or dtype not in WIRE_DTYPES:
            raise ProtocolError(f"tensor {name!r} has dtype {dtype!r}, not one of {sorted(WIRE_DTYPES)}")
    try:
        tensors = _st_load(payload)
    except (SafetensorError, ValueError, RuntimeError, TypeError) as exc:
        raise ProtocolError(f"tensor data is malformed: {str(exc).splitlines()[0][:200]}") from None
    roles = _json_field(meta, "roles")
    if not all(isinstance(v, str) for v in roles.values()) or set(roles) - set(tensors):
        raise ProtocolError("metadata 'roles' must map tensor names in the message to strings")
    return Message(
        kind=kind,
        fleet=meta.get("fleet", ""),
        round=int(round_text),
        phase=meta.get("phase", ""),
        client=meta.get("client", ""),
        body=_json_field(meta, "body"),
        tensors=tensors,
        roles=roles,
    )


def finite_tensor(t: torch.Tensor) -> bool:
    """True unless a floating-point tensor holds NaN or Inf (integer tensors always are finite)."""
    return not t.is_floating_point() or bool(torch.isfinite(t).all())


def finite_number(value: Any) -> bool:
    """True for an int or float that is finite as a float (bools excluded: they are not measurements; an int beyond
    the float range would overflow every later mean and JSON encoder)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return abs(value) <= sys.float_info.max if isinstance(value, int) else math.isfinite(value)


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None. Round records and run summaries mix figures computed
    from device metrics (finite one by one, but their sums may overflow) and must always encode: the message body
    with ``allow_nan=False``, JSON files as valid JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value
