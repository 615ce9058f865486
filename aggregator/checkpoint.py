"""Aggregator checkpoints: the strategy's state after each round, written atomically with safetensors."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from edgemole.errors import EdgemoleError

LATEST = "latest.safetensors"


def save_checkpoint(directory: str | Path, state: dict[str, torch.Tensor], *, method: str, run: str,
                    round_: int) -> Path:
    """Write ``latest.safetensors`` (via a temporary file and rename, so a crash never leaves half a file)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".{LATEST}.tmp"
    tensors = {k: v.detach().contiguous() for k, v in state.items()}
    save_file(tensors, str(tmp), metadata={"method": method, "run": run, "round": str(round_)})
    final = d / LATEST
    os.replace(tmp, final)
    return final


def load_checkpoint(directory: str | Path, *, method: str) -> tuple[dict[str, torch.Tensor], str, int] | None:
    """``(state, run, round)`` from the latest checkpoint, None if there is none, error if unusable."""
    path = Path(directory) / LATEST
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as exc:
        raise EdgemoleError(f"checkpoint '{path}' is unreadable: {exc}") from None
    if meta.get("method") != method:
        raise EdgemoleError(f"checkpoint '{path}' is for method {meta.get('method')!r}, not {method!r}")
    round_text = meta.get("round", "")
    if not round_text.isdigit():
        raise EdgemoleError(f"checkpoint '{path}' has no valid round number")
    return state, meta.get("run", ""), int(round_text)
