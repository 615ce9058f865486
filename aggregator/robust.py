"""Robust replacements of the weighted mean for the plain-LoRA methods (``fleet.robust``).

The bounds (aggregator/bounds.py) stop updates that are absurd; these estimators limit what updates inside the bounds
can do when a minority of devices is hostile. They cost accuracy on honest non-IID fleets (a median discards
information), so the default stays the paper methods' weighted mean. See docs/protocol.md "Robust aggregation".

- ``clip``: every update tensor scaled down to at most the round's lower-median norm of that tensor, then the
  sample-weighted mean: one device can pull the mean at most as far as a typical one.
- ``trimmed-mean:F``: per coordinate, the mean after dropping the floor(F n) lowest and highest values.
- ``median``: per coordinate, the median (the mean of the two middle values for even n).

Trimmed mean and median ignore sample weights on purpose: ``num_samples`` is the device's own claim. Everything is
computed in float64 and in a fixed order, so a resumed run aggregates exactly as the uninterrupted one.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import torch

from aggregator.strategies.base import weighted_average
from edgemole.config import check_robust


def clip_to_median(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor scaled to at most the lower median of their L2 norms (float64)."""
    xs = [t.to(torch.float64) for t in tensors]
    norms = [float(torch.linalg.vector_norm(x)) for x in xs]
    cap = statistics.median_low(sorted(norms))
    return [x if n <= cap else x * (cap / n) for x, n in zip(xs, norms, strict=True)]


def coordinate_trimmed_mean(tensors: Sequence[torch.Tensor], fraction: float) -> torch.Tensor:
    """Per coordinate, the mean of the values left after cutting floor(fraction * n) at each end (at least one
    value is always kept)."""
    n = len(tensors)
    k = min(int(fraction * n), (n - 1) // 2)
    values = torch.sort(torch.stack([t.to(torch.float64) for t in tensors]), dim=0).values
    return values[k : n - k].mean(dim=0)


def coordinate_median(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per coordinate, the median; for an even count the mean of the two middle values (torch.median would take
    the lower one, which biases towards zero-filled entries)."""
    n = len(tensors)
    values = torch.sort(torch.stack([t.to(torch.float64) for t in tensors]), dim=0).values
    return values[(n - 1) // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2


def robust_average(tensors: Sequence[torch.Tensor], weights: Sequence[float], mode: str = "none") -> torch.Tensor:
    """The aggregate of one tensor name under ``mode`` (``fleet.robust``), in the dtype of the first tensor."""
    name, fraction = check_robust(mode)
    if name == "none":
        return weighted_average(tensors, weights)
    if not tensors:
        raise ValueError("need at least one tensor")
    dtype = tensors[0].dtype
    if name == "clip":
        return weighted_average(clip_to_median(tensors), weights).to(dtype)
    if name == "median":
        return coordinate_median(tensors).to(dtype)
    return coordinate_trimmed_mean(tensors, fraction).to(dtype)


def robust_slices(current: torch.Tensor, updates: Sequence[tuple[dict[str, torch.Tensor], float]], prefix: str,
                  factor: str, mode: str) -> torch.Tensor:
    """LoRA-A2's step for one adapter under ``mode``: current + the robust aggregate of every device's zero-filled
    change of its uploaded ranks (a device that uploaded none of this adapter's ranks counts as a zero change, as in
    the mean of :func:`edgemole.adapters.lora.a2.aggregate_slices`, which ``none`` keeps using)."""
    deltas = []
    for tensors, _ in updates:
        delta = torch.zeros(current.shape, dtype=torch.float64)
        if f"{prefix}.ranks" in tensors:
            index = torch.as_tensor(tensors[f"{prefix}.ranks"].tolist(), dtype=torch.long)
            values = tensors[f"{prefix}.{factor}"].to(torch.float64)
            if factor == "lora_B":
                delta[:, index] = values - current.to(torch.float64)[:, index]
            else:
                delta[index, :] = values - current.to(torch.float64)[index, :]
        deltas.append(delta)
    if not deltas:
        return current.clone()
    change = robust_average(deltas, [w for _, w in updates], mode)
    return (current.to(torch.float64) + change).to(current.dtype)
