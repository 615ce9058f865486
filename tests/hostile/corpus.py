"""The hostile-input corpus: one builder per entry of ``manifest.json``.

Most messages can only be hostile against a live run (the right run id, the open round, the victim's tensor
shapes), so the corpus is a generator: :func:`build` turns an entry into (topic, payload, retain) from a
:class:`Context` taken from the run when the victim's assignment is seen. ``manifest.json`` says for every entry the
topic, the identity that publishes it, the expected outcome and what stops it; tests/test_hostile_corpus.py runs the
entries marked ``plain_broker`` against a live fleet through an anonymous Mosquitto.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from aggregator.strategies.lora_a2 import a2_expectation
from edgemole.adapters.amole.model import EMBEDDING_ROLE, expert_embedding_name, token_embedding_name
from edgemole.config import A2_METHODS, TaskSpec
from edgemole.protocol import DONE, RANKS_ROLE, SCHEMA_VERSION, Kind, Message, TensorSpec, Topics, encode, spec_of

MANIFEST = Path(__file__).with_name("manifest.json")


def manifest() -> list[dict[str, Any]]:
    return json.loads(MANIFEST.read_text())["entries"]


@dataclass
class Context:
    """What the attacker learnt from the run by listening (an anonymous broker lets it read everything)."""

    topics: Topics
    method: str
    run: str
    round: int
    phase: str
    victim: str
    other: str
    assign: Message
    """the victim's assignment of the open round"""
    replay: bytes
    """the victim's real update of an earlier round, as published"""
    other_replay: bytes
    """another device's real update of an earlier round"""
    num_train: int
    max_message_bytes: int
    task: TaskSpec


def expectation(method: str, assign: Message) -> dict[str, TensorSpec]:
    """What the aggregator expects back for ``assign`` (as the strategies compute it)."""
    if method in A2_METHODS and assign.phase != "eval":
        expect = a2_expectation(assign.tensors, assign.roles, assign.phase)[0]
    else:
        expect = spec_of(assign.tensors, assign.roles)
    for module, ids in (assign.body.get("experts") or {}).items():
        r = assign.tensors[f"{module}.router"].shape[0]
        expect[token_embedding_name(module)] = TensorSpec((r,), role=EMBEDDING_ROLE)
        expect.update({expert_embedding_name(module, e): TensorSpec((r,), role=EMBEDDING_ROLE) for e in ids})
    return expect


def conforming(ctx: Context) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors (and roles) that pass the victim's expectation: every rank of every slice, small values."""
    gen = torch.Generator().manual_seed(7)
    tensors, roles = {}, {}
    for name, spec in expectation(ctx.method, ctx.assign).items():
        shape = tuple(spec.bound if d is None else d for d in spec.shape)
        if spec.role == RANKS_ROLE:
            tensors[name] = torch.arange(spec.bound, dtype=torch.int64)
        else:
            tensors[name] = (0.01 * torch.randn(shape, generator=gen)).to(spec.dtype)
        roles[name] = spec.role
    return tensors, roles


def _update(ctx: Context, tensors: dict[str, torch.Tensor] | None = None, roles: dict[str, str] | None = None,
            **fields: Any) -> bytes:
    """An update from the victim for the open round, with ``fields`` replacing message fields or body entries."""
    good, good_roles = conforming(ctx)
    body = {"run": ctx.run, "num_samples": ctx.num_train, "metrics": {"acc_before": 0.5}}
    header = {"round": ctx.round, "phase": ctx.phase, "client": ctx.victim, "fleet": ctx.topics.fleet}
    for key, value in fields.items():
        (header if key in header else body)[key] = value
    return encode(Message(Kind.UPDATE, header["fleet"], header["round"], header["phase"], header["client"], body,
                          good if tensors is None else tensors, good_roles if roles is None else roles))


def _first_float(tensors: dict[str, torch.Tensor]) -> str:
    return next(n for n, t in sorted(tensors.items()) if t.is_floating_point() and t.numel() > 1)


def _with(ctx: Context, change: Callable[[dict[str, torch.Tensor], dict[str, str]], None]) -> bytes:
    tensors, roles = conforming(ctx)
    change(tensors, roles)
    return _update(ctx, tensors, roles)


def _poke(value: float) -> Callable[[dict[str, torch.Tensor], dict[str, str]], None]:
    def change(tensors: dict[str, torch.Tensor], roles: dict[str, str]) -> None:
        tensors[_first_float(tensors)].view(-1)[0] = value
    return change


def _every_float(change: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict[str, torch.Tensor],
                                                                              dict[str, str]], None]:
    def apply(tensors: dict[str, torch.Tensor], roles: dict[str, str]) -> None:
        for name in [n for n, v in tensors.items() if v.is_floating_point()]:
            tensors[name] = change(tensors[name])
    return apply


def _first(change: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict[str, torch.Tensor], dict[str, str]],
                                                                        None]:
    def apply(tensors: dict[str, torch.Tensor], roles: dict[str, str]) -> None:
        name = _first_float(tensors)
        tensors[name] = change(tensors[name])
    return apply


def _extra(tensors: dict[str, torch.Tensor], roles: dict[str, str]) -> None:
    tensors["backdoor.weight"] = torch.zeros(2)


def _wrong_role(tensors: dict[str, torch.Tensor], roles: dict[str, str]) -> None:
    name = _first_float(tensors)
    roles[name] = "head" if roles[name] != "head" else "lora_A"


def _drop_first(tensors: dict[str, torch.Tensor], roles: dict[str, str]) -> None:
    name = _first_float(tensors)
    del tensors[name], roles[name]


def _bad_ranks(tensors: dict[str, torch.Tensor], roles: dict[str, str]) -> None:
    """Decreasing rank indices for the first slice (A2 methods); a ``.ranks`` without a slice otherwise."""
    ranks = sorted(n for n, r in roles.items() if r == RANKS_ROLE)
    if ranks:
        tensors[ranks[0]] = torch.flip(tensors[ranks[0]], [0])
    else:
        tensors["x.ranks"], roles["x.ranks"] = torch.tensor([9]), RANKS_ROLE


def _raw(meta: dict[str, str], header_extra: dict[str, Any] | None = None, data: bytes = b"") -> bytes:
    header = json.dumps({"__metadata__": meta, **(header_extra or {})}).encode()
    return struct.pack("<Q", len(header)) + header + data


def _meta(ctx: Context, kind: str = "update", **over: str) -> dict[str, str]:
    return {"schema": SCHEMA_VERSION, "kind": kind, "fleet": ctx.topics.fleet, "round": str(ctx.round),
            "phase": ctx.phase, "client": ctx.victim, "body": json.dumps({"run": ctx.run, "num_samples": 1}),
            "roles": "{}", **over}


def _status(ctx: Context, client: str, fleet: str | None = None, **body: Any) -> bytes:
    return encode(Message(Kind.STATUS, fleet or ctx.topics.fleet, ctx.round, client=client,
                          body={"state": "ready", "run": ctx.run, "num_train": ctx.num_train, "num_test": 20, **body}))


def _control(ctx: Context, kind: Kind, body: dict[str, Any], *, fleet: str | None = None, round_: int | None = None,
             phase: str = "", client: str = "", tensors: dict[str, torch.Tensor] | None = None,
             roles: dict[str, str] | None = None) -> bytes:
    return encode(Message(kind, fleet or ctx.topics.fleet, ctx.round if round_ is None else round_, phase, client,
                          body, tensors or {}, roles or {}))


def _assign(ctx: Context, **over: Any) -> bytes:
    """The victim's own assignment, changed: ``run``/body entries or message fields."""
    msg = replace(ctx.assign, body=dict(ctx.assign.body))
    for key, value in over.items():
        if key in ("round", "phase", "client", "fleet"):
            msg = replace(msg, **{key: value})
        elif key == "scale":
            msg = replace(msg, tensors={k: v * value if v.is_floating_point() else v for k, v in msg.tensors.items()})
        else:
            msg.body[key] = value
    return encode(msg)


def _task(ctx: Context, run: str, **over: Any) -> bytes:
    body = ctx.task.to_body()
    body.update(over)
    return _control(ctx, Kind.TASK, {"run": run, "task": body}, round_=0)


Build = Callable[[Context], bytes]

#: name -> payload builder; the topic comes from the manifest
BUILDERS: dict[str, Build] = {
    # transport and structure (the original 31-kind battery, reproduced)
    "garbage": lambda ctx: bytes(range(256)) * 2,
    "empty-header": lambda ctx: b"\x00" * 7,
    "header-length-lies": lambda ctx: struct.pack("<Q", 2**40) + b"{}",
    "header-not-json": lambda ctx: struct.pack("<Q", 5) + b"{nope",
    "header-not-object": lambda ctx: struct.pack("<Q", 2) + b"[]",
    "no-metadata": lambda ctx: struct.pack("<Q", 2) + b"{}",
    "wrong-schema": lambda ctx: _raw(_meta(ctx, schema="edgemole/0")),
    "unknown-kind": lambda ctx: _raw(_meta(ctx, kind="exploit")),
    "bad-round-field": lambda ctx: _raw(_meta(ctx, round="-1")),
    "nan-in-json-body": lambda ctx: _raw(_meta(ctx, body='{"run": NaN}')),
    "deep-json-body": lambda ctx: _raw(_meta(ctx, body="[" * 100_000 + "]" * 100_000)),
    "unsupported-dtype": lambda ctx: _raw(_meta(ctx), {"x": {"dtype": "F64", "shape": [1], "data_offsets": [0, 8]}},
                                          b"\0" * 8),
    "truncated-tensor-data": lambda ctx: encode(Message(Kind.UPDATE, ctx.topics.fleet, ctx.round, ctx.phase,
                                                        ctx.victim, {"run": ctx.run, "num_samples": 1},
                                                        {"x": torch.zeros(64)}))[:-100],
    "roles-for-missing-tensor": lambda ctx: _raw(_meta(ctx, roles='{"ghost": "lora_A"}')),
    "nan-tensor": lambda ctx: _with(ctx, _poke(float("nan"))),
    "inf-tensor": lambda ctx: _with(ctx, _poke(float("inf"))),
    "wrong-shape": lambda ctx: _with(ctx, _first(lambda v: torch.zeros(3, 3))),
    "wrong-dtype": lambda ctx: _with(ctx, _first(lambda v: v.half())),
    "missing-tensor": lambda ctx: _with(ctx, _drop_first),
    "extra-tensor": lambda ctx: _with(ctx, _extra),
    "wrong-role": lambda ctx: _with(ctx, _wrong_role),
    "bad-rank-indices": lambda ctx: _with(ctx, _bad_ranks),
    "stale-round": lambda ctx: _update(ctx, round=ctx.round - 1),
    "future-round": lambda ctx: _update(ctx, round=ctx.round + 1),
    "wrong-phase": lambda ctx: _update(ctx, phase="eval" if ctx.phase != "eval" else "train"),
    "wrong-fleet": lambda ctx: _update(ctx, fleet="otherfleet"),
    "wrong-run": lambda ctx: _update(ctx, run="0123456789ab"),
    "no-run": lambda ctx: _update(ctx, run=None),
    "client-field-mismatch": lambda ctx: _update(ctx, client=ctx.other),
    "unselected-client": lambda ctx: _update(ctx, client="intruder"),
    "num-samples-zero": lambda ctx: _update(ctx, num_samples=0),
    "num-samples-not-integer": lambda ctx: _update(ctx, num_samples="many"),
    "num-samples-bool": lambda ctx: _update(ctx, num_samples=True),
    "metrics-not-numbers": lambda ctx: _update(ctx, metrics={"acc_before": "high"}),
    "metrics-huge-integer": lambda ctx: _update(ctx, metrics={"acc_before": 10**400}),
    "oversize": lambda ctx: b"\0" * (ctx.max_message_bytes + 1024),
    "status-garbage": lambda ctx: b"not safetensors",
    "status-wrong-fleet": lambda ctx: _status(ctx, ctx.victim, fleet="otherfleet"),
    "status-unknown-state": lambda ctx: _status(ctx, ctx.victim, state="pwned"),
    "status-client-mismatch": lambda ctx: _status(ctx, ctx.other),
    # new: bounds
    "huge-finite-values": lambda ctx: _with(ctx, _every_float(lambda v: torch.full_like(v, 1e30))),
    "one-huge-value": lambda ctx: _with(ctx, _poke(3e38)),
    "huge-num-samples": lambda ctx: _update(ctx, num_samples=10**9),
    "num-samples-above-status": lambda ctx: _update(ctx, num_samples=ctx.num_train + 1),
    "scaled-update-within-cap": lambda ctx: _with(ctx, _every_float(lambda v: v * 1e4)),
    # new: identity
    "impersonation-huge-values": lambda ctx: BUILDERS["huge-finite-values"](ctx),
    "impersonation-plausible": lambda ctx: _update(ctx),
    "replay-own-old-update": lambda ctx: ctx.replay,
    "replay-other-device-update": lambda ctx: ctx.other_replay,
    "status-impersonation-offline": lambda ctx: _status(ctx, ctx.victim, state="offline"),
    "status-fake-ready-device": lambda ctx: _status(ctx, "ghost"),
    # new: forged control messages
    "task-garbage": lambda ctx: b"\xff" * 64,
    "task-wrong-fleet": lambda ctx: _control(ctx, Kind.TASK, {"run": "feedfeedfeed", "task": ctx.task.to_body()},
                                             fleet="otherfleet", round_=0),
    "task-invalid-spec": lambda ctx: _control(ctx, Kind.TASK, {"run": "feedfeedfeed", "task": {"labels": ["a"]}},
                                              round_=0),
    "task-same-run-changed": lambda ctx: _task(ctx, ctx.run, seed=99),
    "task-new-run": lambda ctx: _task(ctx, "feedfeedfeed"),
    "round-garbage": lambda ctx: b"\x00" * 9 + b"garbage",
    "round-wrong-kind": lambda ctx: _status(ctx, ctx.victim),
    "done-other-run": lambda ctx: _control(ctx, Kind.ROUND, {"run": "0123456789ab"}, round_=ctx.round + 1,
                                           phase=DONE),
    "done-this-run": lambda ctx: _control(ctx, Kind.ROUND, {"run": ctx.run}, round_=ctx.round + 1, phase=DONE),
    "assign-garbage": lambda ctx: b"\x08" + b"\x00" * 7 + b"{}" * 4,
    "assign-wrong-run": lambda ctx: _assign(ctx, run="0123456789ab", round=ctx.round + 1),
    "assign-stale-round": lambda ctx: _assign(ctx, round=ctx.round - 1),
    "assign-for-other-device": lambda ctx: _assign(ctx, round=ctx.round + 1),
    "assign-wrong-fleet": lambda ctx: _assign(ctx, fleet="otherfleet", round=ctx.round + 1),
    "assign-wrong-kind": lambda ctx: _update(ctx),
    "assign-this-run-next-round": lambda ctx: _assign(ctx, round=ctx.round + 1),
    "assign-this-run-huge-values": lambda ctx: _assign(ctx, round=ctx.round + 1, scale=1e30),
    "wrong-topic-level": lambda ctx: _update(ctx),
}


def topic(ctx: Context, entry: dict[str, Any]) -> str:
    """The MQTT topic of an entry: ``update:victim``, ``status:other``, ``assign:victim``, ``task``, ``round``, or
    ``raw:<suffix under the fleet base>``."""
    where = entry["topic"]
    if where in ("task", "round"):
        return getattr(ctx.topics, where)
    kind, _, who = where.partition(":")
    if kind == "raw":
        return f"{ctx.topics.base}/{who.replace('VICTIM', ctx.victim)}"
    client = {"victim": ctx.victim, "other": ctx.other}.get(who, who)
    return {"update": ctx.topics.update, "status": ctx.topics.status, "assign": ctx.topics.assign}[kind](client)


def build(ctx: Context, entry: dict[str, Any]) -> tuple[str, bytes, bool]:
    """(topic, payload, retain) of one manifest entry."""
    return topic(ctx, entry), BUILDERS[entry["name"]](ctx), bool(entry.get("retain", False))
