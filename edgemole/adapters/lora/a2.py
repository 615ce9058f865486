"""LoRA-A2's math (arXiv 2410.22815, DESIGN.md 5.3): alternating factors and adaptive rank selection.

One function per formula, called by both the device (scores, selection, masks, slicing) and the aggregator
(scatter of the slices), so the two sides cannot drift apart. Module names key every dict; A is (r, d_in),
B is (d_out, r); "rank i" is column i of B and row i of A.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

from edgemole.protocol import RANKS_ROLE, TensorSpec

TRAIN_B, TRAIN_A = "train-B", "train-A"


def phase_for_round(rnd: int, warm_start: bool = False) -> str:
    """Odd rounds train B with A frozen, even rounds train A with B frozen (B starts at zero, so B first); with
    ``warm_start`` round 1 trains both factors (phase ``train``) and the alternation starts in round 2."""
    if rnd < 1:
        raise ValueError("rounds are numbered from 1")
    if warm_start:
        return "train" if rnd == 1 else phase_for_round(rnd - 1)
    return TRAIN_B if rnd % 2 == 1 else TRAIN_A


def active_factor(phase: str) -> str:
    """``lora_B`` or ``lora_A``: the only factor a device trains and uploads in ``phase``."""
    if phase not in (TRAIN_A, TRAIN_B):
        raise ValueError(f"not an alternating phase: {phase!r}")
    return "lora_B" if phase == TRAIN_B else "lora_A"


def rank_scores(A: Mapping[str, torch.Tensor], B: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor],
                phase: str) -> dict[str, torch.Tensor]:
    """Importance of every rank of every module after a probe pass from the global weights.

    B round: S_i = ||dB[:, i]|| * ||A[i, :]||; A round: S_i = ||B[:, i]|| * ||dA[i, :]|| (zero where B[:, i] = 0).
    ``delta`` holds the probe's change of the active factor per module.
    """
    scores = {}
    for m in A:
        if active_factor(phase) == "lora_B":
            scores[m] = delta[m].norm(dim=0) * A[m].norm(dim=1)
        else:
            scores[m] = B[m].norm(dim=0) * delta[m].norm(dim=1)
    return scores


def select_ranks(scores: Mapping[str, torch.Tensor], budget: int) -> dict[str, list[int]]:
    """The device's top ``budget`` (module, rank) pairs over all modules; a module may get none.

    ``budget`` is r_c times the number of modules (the device's upload rank budget). Ties are broken by module
    order, then rank index, so both sides of a test agree.
    """
    pairs = [(float(s), -k, -i, m, i) for k, (m, row) in enumerate(scores.items()) for i, s in enumerate(row)]
    if budget < 0:
        raise ValueError("budget must be >= 0")
    chosen = sorted(pairs, reverse=True)[:budget]
    selection: dict[str, list[int]] = {m: [] for m in scores}
    for *_, m, i in chosen:
        selection[m].append(i)
    return {m: sorted(ranks) for m, ranks in selection.items()}


def rank_mask(shape: Sequence[int], ranks: Sequence[int], factor: str) -> torch.Tensor:
    """Boolean mask of the entries of factor ``lora_A`` (rows) or ``lora_B`` (columns) that may change."""
    mask = torch.zeros(tuple(shape), dtype=torch.bool)
    index = torch.as_tensor(list(ranks), dtype=torch.long)
    if factor == "lora_B":
        mask[:, index] = True
    elif factor == "lora_A":
        mask[index, :] = True
    else:
        raise ValueError(f"unknown factor {factor!r}")
    return mask


@torch.no_grad()
def reapply_mask(param: torch.Tensor, mask: torch.Tensor, reference: torch.Tensor) -> None:
    """Put every entry outside ``mask`` back to ``reference`` (call after each optimizer step: AdamW's decay and
    momentum would move them otherwise)."""
    param.copy_(torch.where(mask, param, reference))


def slice_factor(t: torch.Tensor, ranks: Sequence[int], factor: str) -> torch.Tensor:
    """The selected columns of B (d_out, k) or rows of A (k, d_in): what crosses the wire."""
    index = torch.as_tensor(list(ranks), dtype=torch.long)
    return t[:, index].clone() if factor == "lora_B" else t[index, :].clone()


def scatter_weighted_sum(slices: Sequence[tuple[torch.Tensor, Sequence[int], float]], shape: Sequence[int],
                         factor: str) -> torch.Tensor:
    """sum_c w_c * zero-filled(slice_c): the server's LoRA-A2 aggregation of one module's active factor."""
    out = torch.zeros(tuple(shape), dtype=torch.float64)
    for values, ranks, weight in slices:
        index = torch.as_tensor(list(ranks), dtype=torch.long)
        if factor == "lora_B":
            out[:, index] += weight * values.to(torch.float64)
        else:
            out[index, :] += weight * values.to(torch.float64)
    return out.to(slices[0][0].dtype if slices else torch.float32)


# -- the adapters of a wire state and their slices on the wire -----------------------------------------
def adapter_prefixes(names: Iterable[str]) -> list[str]:
    """Prefixes ``p`` with both ``p.lora_A`` and ``p.lora_B`` among ``names``: every LoRA of a wire state (one per
    module for plain LoRA; each held expert and the shared expert of every module for AMoLE)."""
    names = set(names)
    return sorted(n[: -len(".lora_A")] for n in names
                  if n.endswith(".lora_A") and n[: -len(".lora_A")] + ".lora_B" in names)


def ranks_name(prefix: str) -> str:
    return f"{prefix}.ranks"


def factor_deltas(before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor], prefixes: Sequence[str],
                  phase: str) -> dict[str, torch.Tensor]:
    """The probe's change of the active factor of every adapter (the input of :func:`rank_scores`)."""
    factor = active_factor(phase)
    return {p: after[f"{p}.{factor}"] - before[f"{p}.{factor}"] for p in prefixes}


def score_state(state: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor],
                phase: str) -> dict[str, torch.Tensor]:
    """:func:`rank_scores` of every adapter of a wire state (the weights the probe started from)."""
    A = {p: state[f"{p}.lora_A"] for p in delta}
    B = {p: state[f"{p}.lora_B"] for p in delta}
    return rank_scores(A, B, delta, phase)


def selection_masks(state: Mapping[str, torch.Tensor], selection: Mapping[str, Sequence[int]],
                    phase: str) -> dict[str, torch.Tensor]:
    """Wire name -> mask of the entries training may change: the selected ranks of the active factor
    (an adapter with no selected rank is entirely frozen)."""
    factor = active_factor(phase)
    return {f"{p}.{factor}": rank_mask(state[f"{p}.{factor}"].shape, ranks, factor)
            for p, ranks in selection.items()}


def encode_slices(state: Mapping[str, torch.Tensor], selection: Mapping[str, Sequence[int]],
                  phase: str) -> dict[str, torch.Tensor]:
    """What a device uploads for its adapters: ``p.<factor>`` sliced to the selected ranks and ``p.ranks``
    (int64, increasing); adapters without a selected rank send nothing."""
    factor = active_factor(phase)
    out = {}
    for p, ranks in selection.items():
        if ranks:
            out[f"{p}.{factor}"] = slice_factor(state[f"{p}.{factor}"], ranks, factor)
            out[ranks_name(p)] = torch.as_tensor(sorted(ranks), dtype=torch.int64)
    return out


def slice_specs(full: Mapping[str, TensorSpec], prefixes: Sequence[str], phase: str) -> dict[str, TensorSpec]:
    """The server's expectation of :func:`encode_slices`' output: optional slices with a variable rank
    dimension of at most r, each with its optional index tensor."""
    factor = active_factor(phase)
    specs = {}
    for p in prefixes:
        spec = full[f"{p}.{factor}"]
        d_out_or_r, r_or_d_in = spec.shape
        r = r_or_d_in if factor == "lora_B" else d_out_or_r
        shape = (d_out_or_r, None) if factor == "lora_B" else (None, r_or_d_in)
        specs[f"{p}.{factor}"] = TensorSpec(shape, spec.dtype, spec.role, optional=True, bound=r)
        specs[ranks_name(p)] = TensorSpec((None,), torch.int64, RANKS_ROLE, optional=True, bound=r)
    return specs


def aggregate_slices(current: torch.Tensor, updates: Sequence[tuple[Mapping[str, torch.Tensor], float]],
                     prefix: str, phase: str) -> torch.Tensor:
    """LoRA-A2's server step for one adapter: current + sum_c w_c * zero-filled(slice_c - current's slice).

    ``updates`` are (validated update tensors, normalised weight) of every device that had the adapter this
    round; a device that selected none of its ranks contributes zero. Equals the weighted average of the full
    factors when unselected ranks stayed at the global value, which masked training guarantees.
    """
    factor = active_factor(phase)
    deltas = []
    for tensors, weight in updates:
        if ranks_name(prefix) in tensors:
            ranks = tensors[ranks_name(prefix)].tolist()
            deltas.append((tensors[f"{prefix}.{factor}"] - slice_factor(current, ranks, factor), ranks, weight))
    if not deltas:
        return current.clone()
    return (current.to(torch.float64) + scatter_weighted_sum(deltas, current.shape, factor).double()).to(
        current.dtype)
