"""Aggregator checkpoints: everything the next round needs, after each round, written so that a crash never loses
or corrupts one.

A checkpoint is one safetensors file: the strategy's tensors; in the metadata (strings) the method, run id,
round and the identity of what it belongs to (task hash, fleet, model); and the non-tensor state as JSON in two
byte tensors (the strategy's, e.g. FedAMoLE's expert sets and numpy RNG; the service's selection RNG and round
records, which grow with the run and would outgrow safetensors' 100 MB header limit in the metadata). Files are
written to a temporary file in the same folder, fsynced, renamed, and the folder fsynced: after a power cut either
the old or the new file is there, whole. ``round-NNNNNN.safetensors`` keeps the last K rounds; ``latest.safetensors``
is the newest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_bytes

from edgemole.errors import EdgemoleError

log = logging.getLogger("edgemole.aggregator")

LATEST = "latest.safetensors"
TMP_PREFIX = ".ckpt-"
TMP_SUFFIX = ".tmp"
ROUND_FILE = re.compile(r"^round-(\d{6,})\.safetensors$")
FORMAT = "2"
DEFAULT_KEEP = 3
#: names of the byte tensors that hold the JSON state (not strategy tensors)
STRATEGY_JSON = "__edgemole__.strategy"
SERVICE_JSON = "__edgemole__.service"


def task_hash(task_body: dict[str, Any]) -> str:
    """A stable hash of a task's body: a checkpoint of another task (labels, model, LoRA, seed...) is refused."""
    return hashlib.sha256(json.dumps(task_body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


@dataclass
class Checkpoint:
    """What one checkpoint file holds."""

    state: dict[str, torch.Tensor]
    method: str
    run: str
    round: int
    path: Path
    identity: dict[str, str] = field(default_factory=dict)
    """task hash, fleet and model name of the run that wrote it (empty for a checkpoint of format 1)"""
    strategy_extra: dict[str, Any] = field(default_factory=dict)
    service: dict[str, Any] = field(default_factory=dict)


def round_path(directory: Path, round_: int) -> Path:
    return directory / f"round-{round_:06d}.safetensors"


def remove_stale_temporaries(directory: str | Path) -> int:
    """Delete temporary files a crash left behind (before this change they piled up to gigabytes); their count."""
    d = Path(directory)
    if not d.is_dir():
        return 0
    removed = 0
    for p in d.iterdir():
        if (p.name.startswith(TMP_PREFIX) and p.name.endswith(TMP_SUFFIX)) or p.name == f".{LATEST}.tmp":
            with contextlib.suppress(OSError):
                p.unlink()
                removed += 1
    if removed:
        log.info("removed %d stale temporary checkpoint file(s) from %s", removed, d)
    return removed


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    """Temporary file in the same folder, fsync, rename over ``path``, fsync of the folder."""
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def save_checkpoint(directory: str | Path, state: dict[str, torch.Tensor], *, method: str, run: str, round_: int,
                    identity: dict[str, str] | None = None, strategy_extra: dict[str, Any] | None = None,
                    service: dict[str, Any] | None = None, keep: int = DEFAULT_KEEP) -> Path:
    """Write round ``round_``'s checkpoint and ``latest``, atomically; keep the newest ``keep`` round files."""
    if keep < 1:
        raise EdgemoleError(f"checkpoints to keep must be >= 1, got {keep}")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}
    for name, value in ((STRATEGY_JSON, strategy_extra), (SERVICE_JSON, service)):
        tensors[name] = torch.frombuffer(bytearray(json.dumps(value or {}).encode()), dtype=torch.uint8)
    meta = {"format": FORMAT, "method": method, "run": run, "round": str(round_), **(identity or {})}
    data = save_bytes(tensors, metadata=meta)
    numbered = round_path(d, round_)
    _atomic_write(numbered, data)
    _atomic_write(d / LATEST, data)
    rounds = sorted((int(m.group(1)), p) for p in d.iterdir() if (m := ROUND_FILE.match(p.name)))
    for _, old in rounds[:-keep]:
        with contextlib.suppress(OSError):
            old.unlink()
    return d / LATEST


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read one checkpoint file; a one-line error if it is unreadable or incomplete."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as exc:
        raise EdgemoleError(f"checkpoint '{path}' is unreadable: {exc}") from None
    round_text = meta.get("round", "")
    if not round_text.isdigit():
        raise EdgemoleError(f"checkpoint '{path}' has no valid round number")
    try:
        strategy_extra, service = (json.loads(bytes(state.pop(k).numpy()).decode()) if k in state else {}
                                   for k in (STRATEGY_JSON, SERVICE_JSON))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise EdgemoleError(f"checkpoint '{path}' has corrupt metadata") from None
    identity = {k: meta[k] for k in ("task", "fleet", "model") if k in meta}
    return Checkpoint(state, meta.get("method", ""), meta.get("run", ""), int(round_text), path, identity,
                      strategy_extra, service)


def load_checkpoint(directory: str | Path, *, method: str) -> tuple[dict[str, torch.Tensor], str, int] | None:
    """``(state, run, round)`` from the latest checkpoint, None if there is none, error if unusable."""
    path = Path(directory) / LATEST
    if not path.exists():
        return None
    ckpt = read_checkpoint(path)
    if ckpt.method != method:
        raise EdgemoleError(f"checkpoint '{path}' is for method {ckpt.method!r}, not {method!r}")
    return ckpt.state, ckpt.run, ckpt.round


def load_for_resume(directory: str | Path, *, method: str, identity: dict[str, str]) -> Checkpoint:
    """The latest checkpoint of this very run set-up; a one-line error when there is none or it belongs to another
    method, task, model or fleet (resuming those would silently train something else)."""
    d = Path(directory)
    path = d / LATEST
    if not path.exists():
        raise EdgemoleError(f"--resume: no checkpoint in '{d}' (expected {LATEST}; start without --resume)")
    ckpt = read_checkpoint(path)
    if ckpt.method != method:
        raise EdgemoleError(f"--resume: checkpoint '{path}' is for method {ckpt.method!r}, not {method!r}")
    names = {"fleet": "fleet", "model": "model", "task": "task (labels, model or training settings differ)"}
    for key, what in names.items():
        theirs = ckpt.identity.get(key)
        if theirs != identity.get(key):
            raise EdgemoleError(f"--resume: checkpoint '{path}' is of another {what}: {theirs!r}, this run "
                                f"{identity.get(key)!r}")
    return ckpt
