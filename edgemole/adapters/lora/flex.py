"""FlexLoRA's per-device ranks (DESIGN.md 5.4), shared by the device and the aggregator.

The server hands out the rank-r SVD of the averaged product with its components in decreasing order of singular
value, so a device of rank r_c < r keeps the best rank-r_c approximation by keeping the leading r_c ranks and
zeroing the rest. Zeroed ranks are inert under training (their gradients are exactly zero: column i of dB is
G A[i, :]^T and row i of dA is B[:, i]^T G), so the device trains and sends only ``B[:, :r_c]`` and ``A[:r_c, :]``
and the server multiplies what it receives. Every device shares one model with r slots; a device of lower rank
simply leaves its trailing slots empty.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from edgemole.protocol import TensorSpec

#: assignment body field: train and send only this device's own leading ranks (its ``--upload-rank``)
OWN_RANK = "own_rank"


def truncate_ranks(state: Mapping[str, torch.Tensor], prefixes: Sequence[str], k: int) -> dict[str, torch.Tensor]:
    """``state`` with ranks k.. of every adapter zeroed: the device's rank-k view of the global adapters."""
    out = dict(state)
    for p in prefixes:
        B, A = state[f"{p}.lora_B"].clone(), state[f"{p}.lora_A"].clone()
        B[:, k:] = 0
        A[k:, :] = 0
        out[f"{p}.lora_B"], out[f"{p}.lora_A"] = B, A
    return out


def leading_ranks(state: Mapping[str, torch.Tensor], prefixes: Sequence[str], k: int) -> dict[str, torch.Tensor]:
    """``state`` with both factors of every adapter cut to their first k ranks: what a device of rank k sends."""
    out = dict(state)
    for p in prefixes:
        out[f"{p}.lora_B"] = state[f"{p}.lora_B"][:, :k].clone()
        out[f"{p}.lora_A"] = state[f"{p}.lora_A"][:k, :].clone()
    return out


def leading_rank_specs(full: Mapping[str, TensorSpec], prefixes: Sequence[str]) -> dict[str, TensorSpec]:
    """The server's expectation of :func:`leading_ranks`' output: both factors with a rank dimension of 1..r (the
    validator also requires B's and A's rank counts of one adapter to agree)."""
    specs = dict(full)
    for p in prefixes:
        b, a = full[f"{p}.lora_B"], full[f"{p}.lora_A"]
        r = a.shape[0]
        specs[f"{p}.lora_B"] = TensorSpec((b.shape[0], None), b.dtype, b.role, bound=r)
        specs[f"{p}.lora_A"] = TensorSpec((None, a.shape[1]), a.dtype, a.role, bound=r)
    return specs
