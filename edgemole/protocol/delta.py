"""Download by version (docs/protocol.md section 4.4.1): an assignment carries only what its device does not hold.

Content-addressed, so that no version counter has to survive a restart. Every tensor of the model travels in one of
three ways. Whole: the tensor under its name, as without a cache. Kept (the device holds that digest under that
name): nothing. Patched (the device holds an older version of the same shape, and only some slices along the rank
axis changed, as after a LoRA-A2 round): the changed slices, under a name that lists their indices. The assignment
names no tensor it does not carry: the device knows the model's names from the assignment body (the tensors section
7.2 expects), and the body's ``model`` is one digest of the whole model (:func:`state_digest`), which the device
checks after rebuilding, so each round proves the rebuilt model bit-identical to the one the aggregator meant. A
tensor missing from the cache, or a rebuilt model that does not match, is a :class:`CacheMiss`: the device clears
its cache and asks for everything.

Both sides call this module only: the aggregator through :class:`DownloadRecord`, the device through
:func:`apply_download` and :func:`remember`.
"""

from __future__ import annotations

import hashlib
import re
import weakref
from collections.abc import Iterable, Mapping, MutableMapping
from itertools import pairwise
from typing import Any, NamedTuple

import torch

from edgemole.adapters.amole.model import ROUTER_ROLE
from edgemole.errors import ProtocolError
from edgemole.protocol.messages import WIRE_DTYPES

#: assignment body field of an assignment sent by version: the :func:`state_digest` of the device's whole model
MODEL = "model"
#: status body field by which a device announces that it keeps a download cache
CAPABILITY = "cache"
#: status body field by which a device announces that its cache holds exactly the run's initial state (the digest of
#: :func:`state_digest` over it), which it built itself from the task's seed: the first assignment then carries nothing
#: that the device could compute
INITIAL = "initial"
#: a patch of tensor ``<name>`` travels as one payload tensor named ``<name>@<i0>,<i1>,...``: the changed slices,
#: and in the name their indices along the rank axis (``@`` never occurs in a model's tensor names). It carries no
#: role: the patched tensor keeps the role the device holds it with (a patch is only sent against a held version of
#: the same role). One header entry per patch: a separate index tensor was, on fedamole-a2's 20 Newsgroups runs, more
#: than half of the bytes beyond the values (docs/protocol.md 4.4.1)
PATCH_MARK = "@"
#: rank axis of a tensor by its role: rows of A and of a router (r, d_in), columns of B (d_out, r)
RANK_AXIS = {"lora_A": 0, ROUTER_ROLE: 0, "lora_B": 1}

_DTYPE_NAMES = {dtype: name for name, dtype in WIRE_DTYPES.items()}
_DIGEST = re.compile(r"[0-9a-f]{16}")
#: a patch's slice indices in its name: canonical decimal (no sign, no leading zero), comma-separated
_INDEX_TEXT = re.compile(r"(0|[1-9][0-9]{0,8})(,(0|[1-9][0-9]{0,8}))*")


class CacheMiss(ProtocolError):
    """The device cannot rebuild an assignment from its cache and the payload (a tensor it does not hold, or a
    result whose digest differs): it clears its cache and reports ``ready``, and the aggregator sends everything."""


class Version(NamedTuple):
    """One tensor as last sent (aggregator) or received (device) under a name."""

    tensor: torch.Tensor
    role: str
    digest: str


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 over ``<DTYPE>;<d0>,<d1>,...;`` (wire dtype name, shape) then the raw little-endian bytes, row-major;
    the first 16 hex digits. Equal digests mean bit-identical tensors (``-0.0`` and ``0.0`` differ)."""
    t = t.detach().to("cpu").contiguous()
    if t.dtype not in _DTYPE_NAMES:
        raise ProtocolError(f"dtype {t.dtype} cannot travel on the wire")
    h = hashlib.sha256(f"{_DTYPE_NAMES[t.dtype]};{','.join(map(str, t.shape))};".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # torch's layout is the host's: little-endian
    return h.hexdigest()[:16]


def versions_of(tensors: Mapping[str, torch.Tensor], roles: Mapping[str, str]) -> dict[str, Version]:
    """Each tensor as a :class:`Version` under its name (sharing the tensors: callers must not change them)."""
    return {n: Version(t, roles.get(n, ""), tensor_digest(t)) for n, t in tensors.items()}


def state_digest(versions: Mapping[str, Version]) -> str:
    """One digest of a whole state: sha256 over ``<name>\t<role>\t<tensor digest>\n`` by name; 16 hex digits."""
    return _model_digest({n: v.digest for n, v in versions.items()}, {n: v.role for n, v in versions.items()})


def parse_initial(body: Mapping[str, Any]) -> str | None:
    """A status body's ``initial`` digest (None when absent); ProtocolError when it is not 16 hex digits."""
    digest = body.get(INITIAL)
    if digest is not None and not (isinstance(digest, str) and _DIGEST.fullmatch(digest)):
        raise ProtocolError(f"'{INITIAL}' must be 16 lower-case hex digits")
    return digest


def rank_axis(role: str, t: torch.Tensor) -> int | None:
    """The axis along which a tensor of this role is patched, None for a tensor that only travels whole."""
    axis = RANK_AXIS.get(role)
    return axis if axis is not None and t.dim() == 2 and t.shape[axis] > 0 else None


def changed_slices(old: torch.Tensor, new: torch.Tensor, axis: int) -> list[int]:
    """Indices along ``axis`` of the slices whose bits differ (so ``-0.0`` after ``0.0`` counts as a change)."""
    def rows(t: torch.Tensor) -> torch.Tensor:
        return t.movedim(axis, 0).contiguous().view(torch.uint8).reshape(t.shape[axis], -1)
    return torch.nonzero((rows(old) != rows(new)).any(dim=1)).flatten().tolist()


def patch_name(name: str, index: list[int]) -> str:
    """The payload name of a patch of ``name`` at the (increasing) slice indices ``index``."""
    return f"{name}{PATCH_MARK}{','.join(map(str, index))}"


def split_payload_name(name: str) -> tuple[str, list[int] | None]:
    """A payload tensor's model name and, for a patch, its slice indices (None for a tensor sent whole). Form and
    order of the indices are checked here, their range against the held tensor in :func:`apply_download`."""
    base, mark, text = name.partition(PATCH_MARK)
    if not mark:
        return name, None
    if not _INDEX_TEXT.fullmatch(text):
        raise ProtocolError(f"payload tensor {name!r}: a patch's name must end in '{PATCH_MARK}' and its slice "
                            "indices, e.g. '@1,5'")
    index = [int(i) for i in text.split(",")]
    if any(b <= a for a, b in pairwise(index)):
        raise ProtocolError(f"payload tensor {name!r}: a patch's slice indices must be increasing")
    return base, index


def patch_pays(t: torch.Tensor, axis: int, changed: list[int]) -> bool:
    """A patch of the slices ``changed`` is sent only when it is smaller than the whole tensor: its slices plus the
    indices in its name (its header entry is otherwise the whole tensor's)."""
    n = t.shape[axis]
    slice_bytes = t.numel() // n * t.element_size()
    return 0 < len(changed) < n and len(changed) * slice_bytes + len(patch_name("", changed)) < n * slice_bytes


def encode_download(tensors: Mapping[str, torch.Tensor], roles: Mapping[str, str],
                    held: Mapping[str, Version]) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """What an assignment carries to a device that holds ``held``: (payload tensors, their roles, the model's
    :func:`state_digest`).

    A tensor whose digest and role the device holds under its name is kept (not sent); one of which the device holds
    an older version of the same shape, dtype and role is patched when :func:`patch_pays`; any other is sent whole."""
    payload, payload_roles, digests = _plan(tensors, roles, held)
    return payload, payload_roles, _model_digest(digests, roles)


def _model_digest(digests: Mapping[str, str], roles: Mapping[str, str]) -> str:
    """:func:`state_digest` from the tensor digests already computed."""
    lines = "".join(f"{n}\t{roles.get(n, '')}\t{d}\n" for n, d in sorted(digests.items()))
    return hashlib.sha256(lines.encode()).hexdigest()[:16]


def _plan(tensors: Mapping[str, torch.Tensor], roles: Mapping[str, str],
          held: Mapping[str, Version]) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, str]]:
    """:func:`encode_download` with the digest of each of ``tensors``."""
    payload: dict[str, torch.Tensor] = {}
    payload_roles: dict[str, str] = {}
    digests: dict[str, str] = {}
    for name, t in tensors.items():
        role = roles.get(name, "")
        digest = digests[name] = tensor_digest(t)
        old = held.get(name)
        if old is not None and old.role == role and old.digest == digest:
            continue
        axis = rank_axis(role, t)
        if old is not None and axis is not None and old.role == role and old.tensor.shape == t.shape \
                and old.tensor.dtype == t.dtype:
            changed = changed_slices(old.tensor, t, axis)
            if patch_pays(t, axis, changed):
                payload[patch_name(name, changed)] = t.index_select(axis, torch.as_tensor(changed, dtype=torch.int64))
                continue
        payload[name], payload_roles[name] = t, role
    return payload, payload_roles, digests


def parse_model_digest(body: Mapping[str, Any]) -> str | None:
    """An assignment body's ``model`` digest (None when the assignment carries every tensor whole, without it)."""
    digest = body.get(MODEL)
    if digest is not None and not (isinstance(digest, str) and _DIGEST.fullmatch(digest)):
        raise ProtocolError(f"'{MODEL}' must be 16 lower-case hex digits")
    return digest


def apply_download(cache: Mapping[str, Version], tensors: Mapping[str, torch.Tensor], roles: Mapping[str, str],
                   names: Iterable[str], model: str) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, str]]:
    """The whole model (tensors, roles and tensor digests, by name: the digests for :func:`remember`) from the
    device's ``cache`` and an assignment's payload: the tensors ``names`` (the model's, as the assignment body implies
    them), each sent whole, patched or kept; never shares storage with the cache. Raises :class:`CacheMiss` when a
    kept or patched tensor is not held, or the rebuilt model's :func:`state_digest` is not ``model``, and
    :class:`ProtocolError` for a malformed payload."""
    names = set(names)
    patches: dict[str, tuple[torch.Tensor, list[int]]] = {}
    for name, t in tensors.items():
        base, index = split_payload_name(name)
        if base not in names or (index is not None and (base in tensors or base in patches)):
            raise ProtocolError(f"payload tensor {name!r}: a tensor of the model must travel once, either whole or "
                                "as one patch")
        if index is not None:
            if name in roles:
                raise ProtocolError(f"payload tensor {name!r}: a patch carries no role (the patched tensor keeps "
                                    "the role it is held with)")
            patches[base] = (t, index)
    out: dict[str, torch.Tensor] = {}
    out_roles: dict[str, str] = {}
    for name in sorted(names):
        if name in tensors:
            out[name], out_roles[name] = tensors[name], roles.get(name, "")
        elif name in patches:
            old = cache.get(name)
            if old is None:
                raise CacheMiss(f"patch of {name!r}: no held version")
            out[name], out_roles[name] = _patched(old, name, *patches[name]), old.role
        elif name in cache:
            out[name], out_roles[name] = cache[name].tensor.clone(), cache[name].role
        else:
            raise CacheMiss(f"tensor {name!r} is neither sent nor held")
    digests = {n: tensor_digest(t) for n, t in out.items()}
    if _model_digest(digests, out_roles) != model:
        raise CacheMiss(f"the rebuilt model does not match its digest {model}")
    return out, out_roles, digests


def _patched(old: Version, name: str, patch: torch.Tensor, index: list[int]) -> torch.Tensor:
    """The held version of ``name`` with the patch's slices written at ``index`` (increasing, as
    :func:`split_payload_name` checked) along its held role's rank axis."""
    axis = rank_axis(old.role, old.tensor)
    if axis is None:
        raise ProtocolError(f"patch of {name!r}: its held role {old.role!r} has no rank axis")
    n, k = old.tensor.shape[axis], len(index)
    if index[-1] >= n:
        raise ProtocolError(f"patch of {name!r}: slice index {index[-1]} is not below the held size {n}")
    expected = tuple(k if d == axis else s for d, s in enumerate(old.tensor.shape))
    if tuple(patch.shape) != expected or patch.dtype != old.tensor.dtype:
        raise ProtocolError(f"patch of {name!r} has shape {tuple(patch.shape)} {patch.dtype}, expected {expected} "
                            f"{old.tensor.dtype}")
    return old.tensor.clone().index_copy_(axis, torch.as_tensor(index, dtype=torch.int64), patch)


def remember(held: MutableMapping[str, Version], tensors: Mapping[str, torch.Tensor], roles: Mapping[str, str],
             digests: Mapping[str, str] | None = None, pool: MutableMapping[str, torch.Tensor] | None = None) -> None:
    """After a download of the model ``tensors``: what the device holds under each of its names (private copies:
    later in-place changes of the sender's or the trainer's tensors must not change a held version). Names not in
    the model stay held (an expert may come back). ``pool`` shares one copy per digest between devices."""
    for name, t in tensors.items():
        digest = digests[name] if digests is not None else tensor_digest(t)
        old = held.get(name)
        if old is not None and old.digest == digest and old.role == roles.get(name, ""):
            continue
        tensor = pool.get(digest) if pool is not None else None
        if tensor is None:
            tensor = t.detach().to("cpu").clone()
            if pool is not None:
                pool[digest] = tensor
        held[name] = Version(tensor, roles.get(name, ""), digest)


class DownloadRecord:
    """The aggregator's side: per device of the run, the version of every tensor it was last sent, by name.

    Not checkpointed: after a restart every device gets everything once. A device's record is forgotten whenever it
    publishes a status (it restarted, reconnected or missed its cache), so that its next assignment is whole."""

    def __init__(self) -> None:
        self._held: dict[str, dict[str, Version]] = {}
        #: one copy per digest for all devices (the shared expert, the head and routers are the same for many)
        self._pool: MutableMapping[str, torch.Tensor] = weakref.WeakValueDictionary()

    def encode(self, client: str, tensors: Mapping[str, torch.Tensor],
               roles: Mapping[str, str]) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
        """:func:`encode_download` against what ``client`` holds, which then becomes ``tensors``."""
        held = self._held.setdefault(client, {})
        payload, payload_roles, digests = _plan(tensors, roles, held)
        remember(held, tensors, roles, digests, self._pool)
        return payload, payload_roles, _model_digest(digests, roles)

    def forget(self, client: str) -> None:
        self._held.pop(client, None)

    def seed(self, client: str, versions: Mapping[str, Version]) -> None:
        """``client`` holds ``versions`` (the run's initial state, which it built itself)."""
        self._held[client] = dict(versions)

    def holds(self, client: str) -> dict[str, Version]:
        return dict(self._held.get(client, {}))
