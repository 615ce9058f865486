"""Bounds on what one update may weigh in an aggregate: a finite update can still be hostile.

The validator only proves an update well formed (shapes, dtypes, finite values). One device sending 1e30 (or a
norm a thousand times the fleet's) would own the averaged model, and values that large overflow to Inf on every
device in the next round. Two checks, both pure and deterministic (a resumed run must reject exactly what the
uninterrupted one rejected):

- on arrival, :func:`value_violation`: every float value within ``max_value`` in absolute value (a real adapter,
  head or RSEA embedding is orders of magnitude below the default);
- before aggregation, :func:`norm_violations`: every float tensor's L2 norm within ``factor`` times a reference,
  the larger of the norm of the tensor the aggregator sent that client under that name (if any) and the lower
  median of that name's norms over the round's updates. The median needs the whole round, so this check runs
  when the round closes; the lower median of a round is an honest update's norm while most senders are honest.

Integer tensors (LoRA-A2's ``.ranks``) are index lists, bounded by the validator, and not checked here.
"""

from __future__ import annotations

import statistics
from collections.abc import Collection, Mapping

import torch

#: default of ``fleet.max_update_value``: LoRA factors, heads and RSEA embeddings of real runs stay below ~10; a
#: value of 1e6 already makes a float32 product of two such factors (1e12 per element, summed) lose all precision
DEFAULT_MAX_UPDATE_VALUE = 1e6
#: default of ``fleet.update_norm_factor``: honest adapter and head tensors of a round stay within 2.1x of their
#: reference (tests/test_bounds.py, every method; MiniLM: 2.1x), so 10x leaves a wide margin and still stops a
#: scaled-up update
DEFAULT_NORM_FACTOR = 10.0


def _norm(t: torch.Tensor) -> float:
    """L2 norm in float64, so that values near the float32 limit do not overflow to Inf."""
    return float(torch.linalg.vector_norm(t.detach().to(torch.float64)))


def value_violation(tensors: Mapping[str, torch.Tensor], max_value: float) -> str | None:
    """The reason the first float tensor (in name order) holding a value beyond ``max_value`` fails, else None."""
    for name in sorted(tensors):
        t = tensors[name]
        if t.is_floating_point() and t.numel():
            peak = float(t.detach().abs().max())
            if not peak <= max_value:  # also catches NaN, should one ever get this far
                return f"tensor {name!r} holds |value| {peak:.3g} > max_update_value {max_value:.3g}"
    return None


def norm_ratios(updates: Mapping[str, Mapping[str, torch.Tensor]], sent: Mapping[str, Mapping[str, torch.Tensor]],
                pools: Mapping[str, str] | None = None) -> dict[str, dict[str, tuple[float, float]]]:
    """``{client: {name: (norm, reference)}}`` for every float tensor of every update (client -> tensors received):
    the reference is the larger of the norm of what ``sent[client][name]`` was (if anything) and the lower median of
    the round's norms of the tensors in ``name``'s pool: ``pools[name]``, by default the name alone (the service pools
    the RSEA embeddings of one module)."""
    pools = pools or {}
    norms = {c: {n: _norm(t) for n, t in tensors.items() if t.is_floating_point()} for c, tensors in updates.items()}
    by_pool: dict[str, list[float]] = {}
    for c in sorted(norms):
        for n, v in norms[c].items():
            by_pool.setdefault(pools.get(n, n), []).append(v)
    median = {p: statistics.median_low(sorted(vs)) for p, vs in by_pool.items()}
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for c in sorted(norms):
        given = sent.get(c, {})
        out[c] = {n: (v, max(_norm(given[n]) if n in given else 0.0, median[pools.get(n, n)]))
                  for n, v in sorted(norms[c].items())}
    return out


def norm_violations(updates: Mapping[str, Mapping[str, torch.Tensor]], sent: Mapping[str, Mapping[str, torch.Tensor]],
                    factor: float, pools: Mapping[str, str] | None = None,
                    clipped: Collection[str] = ()) -> dict[str, str]:
    """``{client: reason}`` for every update with a float tensor whose norm exceeds ``factor`` times its reference
    (:func:`norm_ratios`). A reference of zero (most senders left the tensor at zero) bounds nothing: the value cap
    still applies. Names in ``clipped`` are never a reason: :func:`clip_to_bound` scales them instead."""
    rejected: dict[str, str] = {}
    for c, per_name in norm_ratios(updates, sent, pools).items():
        for n, (norm, reference) in per_name.items():
            if n not in clipped and reference > 0 and norm > factor * reference:
                rejected[c] = (f"tensor {n!r} has norm {norm:.3g} > {factor:g} x reference {reference:.3g} "
                               "(max of the sent tensor's and the round's lower median)")
                break
    return rejected


def clip_to_bound(updates: Mapping[str, Mapping[str, torch.Tensor]], sent: Mapping[str, Mapping[str, torch.Tensor]],
                  factor: float, pools: Mapping[str, str] | None,
                  names: Collection[str]) -> dict[str, dict[str, torch.Tensor]]:
    """``{client: {name: tensor}}``: the tensors of ``names`` whose norm exceeds ``factor`` times their reference,
    scaled down to exactly that bound (same dtype). For the RSEA embeddings, whose honest spread is data-dependent
    (an expert's embedding averages the projections of the tokens routed to it: two holders' norms of one expert
    differ up to 7x, 4.7x from the median of their module's embeddings on MiniLM): clipping keeps a device's update
    and its direction, and bounds what one device does to an expert's embedding, hence to the assignment."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for c, per_name in norm_ratios(updates, sent, pools).items():
        for n, (norm, reference) in per_name.items():
            if n in names and reference > 0 and norm > factor * reference:
                t = updates[c][n]
                out.setdefault(c, {})[n] = (t.to(torch.float64) * (factor * reference / norm)).to(t.dtype)
    return out


def samples_violation(num_samples: int, phase: str, status: Mapping[str, object] | None, cap: int) -> str | None:
    """Why ``num_samples`` is out of bounds: above ``cap`` or above what the device last reported in its status
    (``num_train`` for training, ``num_test`` (at least 1) for evaluation); None when within both."""
    if num_samples > cap:
        return f"num_samples {num_samples} exceeds fleet.max_samples {cap}"
    key = "num_test" if phase == "eval" else "num_train"
    reported = (status or {}).get(key)
    if not isinstance(reported, int) or isinstance(reported, bool):
        return f"the device's status reports no integer {key}"
    limit = max(reported, 1) if phase == "eval" else reported
    if num_samples > limit:
        return f"num_samples {num_samples} exceeds the {key} {reported} in the device's status"
    return None

