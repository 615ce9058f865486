"""Checks every inbound message passes before it may touch any state.

The receiver always knows what it expects (which round and phase are open, which clients were
selected, which tensors of which shapes each of them must send back), so validation compares the
message against that expectation instead of trusting anything the sender declares.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from edgemole.errors import ProtocolError
from edgemole.protocol.messages import PHASES, Kind, Message, finite_number, finite_tensor

MAX_SAMPLES = 10**9


#: role of the int64 index tensor ``<adapter>.ranks`` that says which ranks a LoRA-A2 slice holds
RANKS_ROLE = "ranks"


@dataclass(frozen=True)
class TensorSpec:
    """Expected shape, dtype and role of one named tensor.

    A ``None`` in ``shape`` is a variable dimension of size 1..``bound`` (the ranks of a LoRA-A2 slice);
    an ``optional`` tensor may be absent (an adapter of which a device selected no rank).
    """

    shape: tuple[int | None, ...]
    dtype: torch.dtype = torch.float32
    role: str = ""
    optional: bool = False
    bound: int = 0


def spec_of(tensors: Mapping[str, torch.Tensor], roles: Mapping[str, str] | None = None) -> dict[str, TensorSpec]:
    """The spec that ``tensors`` satisfy, e.g. to expect back what was sent."""
    roles = roles or {}
    return {k: TensorSpec(tuple(v.shape), v.dtype, roles.get(k, "")) for k, v in tensors.items()}


def check_tensors(msg: Message, expected: Mapping[str, TensorSpec]) -> None:
    """Exactly the expected names, each with its shape, dtype and role, and only finite values."""
    names = set(msg.tensors)
    missing = sorted(n for n, spec in expected.items() if n not in names and not spec.optional)
    extra = sorted(names - set(expected))
    if missing or extra:
        raise ProtocolError(f"tensor names differ from expected: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, spec in expected.items():
        if name not in names:
            continue
        t = msg.tensors[name]
        if not _shape_fits(tuple(t.shape), spec):
            raise ProtocolError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {_show(spec)}")
        if t.dtype != spec.dtype:
            raise ProtocolError(f"tensor {name!r} has dtype {t.dtype}, expected {spec.dtype}")
        if spec.role and msg.roles.get(name, "") != spec.role:
            raise ProtocolError(f"tensor {name!r} has role {msg.roles.get(name)!r}, expected {spec.role!r}")
        if not finite_tensor(t):
            raise ProtocolError(f"tensor {name!r} contains NaN or Inf")
    check_rank_slices(msg.tensors, expected)


def _shape_fits(shape: tuple[int, ...], spec: TensorSpec) -> bool:
    return len(shape) == len(spec.shape) and all(
        want == got if want is not None else 1 <= got <= spec.bound for got, want in zip(shape, spec.shape,
                                                                                          strict=True))


def _show(spec: TensorSpec) -> str:
    dims = ", ".join(f"1..{spec.bound}" if d is None else str(d) for d in spec.shape)
    return f"({dims})"


def check_rank_slices(tensors: Mapping[str, torch.Tensor], expected: Mapping[str, TensorSpec]) -> None:
    """Every LoRA-A2 slice comes with its ``.ranks``: as many distinct, increasing indices in [0, r) as the slice
    has ranks, and no index tensor without its slice (so that the server's scatter cannot go out of bounds).
    Variable-rank tensors of one adapter (FlexLoRA's B and A of a device's own rank) agree on their rank count."""
    counts: dict[str, set[int]] = {}
    for name, spec in expected.items():
        if None in spec.shape and spec.role != RANKS_ROLE and name in tensors:
            counts.setdefault(name.rsplit(".", 1)[0], set()).add(tensors[name].shape[spec.shape.index(None)])
    for prefix, ks in counts.items():
        if len(ks) > 1:
            raise ProtocolError(f"{prefix!r}: the factors of one adapter must have the same rank, got {sorted(ks)}")
    sliced = {n.rsplit(".", 1)[0]: n for n, spec in expected.items() if None in spec.shape and spec.role != RANKS_ROLE}
    for name, spec in expected.items():
        if spec.role != RANKS_ROLE:
            continue
        prefix = name.rsplit(".", 1)[0]
        slice_name = sliced.get(prefix)
        if (name in tensors) != (slice_name is not None and slice_name in tensors):
            raise ProtocolError(f"{prefix!r}: a rank slice and its '.ranks' must be sent together")
        if name not in tensors or slice_name is None:
            continue
        ranks = tensors[name]
        k = tensors[slice_name].shape[expected[slice_name].shape.index(None)]
        if ranks.numel() != k or (k > 1 and not bool((ranks[1:] > ranks[:-1]).all())) or \
                int(ranks.min()) < 0 or int(ranks.max()) >= spec.bound:
            raise ProtocolError(f"{name!r} must hold {k} increasing rank indices in [0, {spec.bound})")


def _check_header(msg: Message, kind: Kind, fleet: str) -> None:
    if msg.kind != kind:
        raise ProtocolError(f"expected a {kind} message, got {msg.kind}")
    if msg.fleet != fleet:
        raise ProtocolError(f"message is for fleet {msg.fleet!r}, not {fleet!r}")


def _check_run(msg: Message, run: str) -> None:
    if msg.body.get("run") != run:
        raise ProtocolError(f"message belongs to run {msg.body.get('run')!r}, not the current run {run!r}")


def validate_update(
    msg: Message,
    *,
    fleet: str,
    run: str,
    round: int,
    phase: str,
    topic_client: str,
    selected: Collection[str],
    expected: Mapping[str, TensorSpec],
) -> None:
    """Accept only an update for the open round and phase, from a selected client, with the expected tensors."""
    _check_header(msg, Kind.UPDATE, fleet)
    _check_run(msg, run)
    if msg.client != topic_client:
        raise ProtocolError(f"client field {msg.client!r} does not match topic client {topic_client!r}")
    if msg.client not in selected:
        raise ProtocolError(f"client {msg.client!r} is not selected for round {round}")
    if msg.round != round:
        raise ProtocolError(f"stale or future round {msg.round} (open round is {round})")
    if msg.phase != phase:
        raise ProtocolError(f"phase {msg.phase!r} does not match the open phase {phase!r}")
    n = msg.body.get("num_samples")
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_SAMPLES:
        raise ProtocolError(f"num_samples must be an integer in [1, {MAX_SAMPLES}], got {n!r}")
    metrics = msg.body.get("metrics", {})
    if not isinstance(metrics, dict) or not all(
        isinstance(k, str) and finite_number(v) for k, v in metrics.items()
    ):
        raise ProtocolError("metrics must be an object of finite numbers")
    check_tensors(msg, expected)


#: a status body's optional ``artifact``: the first 16 hex digits of the sha256 of the device's manifest.json
_ARTIFACT_DIGEST = re.compile(r"[0-9a-f]{16}")


def check_status_fields(body: Mapping[str, Any]) -> None:
    """The optional status fields ``time_unix`` (a finite number) and ``artifact`` (16 lower-case hex digits),
    when present (docs/protocol.md 4.2); ProtocolError otherwise."""
    if "time_unix" in body and not finite_number(body["time_unix"]):
        raise ProtocolError("'time_unix' must be a finite number")
    artifact = body.get("artifact")
    if "artifact" in body and not (isinstance(artifact, str) and _ARTIFACT_DIGEST.fullmatch(artifact)):
        raise ProtocolError("'artifact' must be 16 lower-case hex digits")


def validate_assignment(
    msg: Message, *, fleet: str, run: str, client: str, after_round: int, expected: Mapping[str, TensorSpec]
) -> None:
    """A client accepts only its own assignment of the current run, newer than its last round, shaped for
    its model."""
    _check_header(msg, Kind.ASSIGN, fleet)
    _check_run(msg, run)
    if msg.client != client:
        raise ProtocolError(f"assignment is addressed to {msg.client!r}, not {client!r}")
    if msg.round <= after_round:
        raise ProtocolError(f"stale assignment for round {msg.round} (already past round {after_round})")
    if msg.phase not in PHASES:
        raise ProtocolError(f"unknown phase {msg.phase!r} in assignment")
    check_tensors(msg, expected)
