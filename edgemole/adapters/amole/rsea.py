"""RSEA, FedAMoLE's reverse selection-based expert assignment: the embeddings and the scores.

Devices summarise how their data meets each module (``t_c = mean W_t x``, ``e_ic = mean A_i x``, r-dim
means, never raw data); the server scores every expert against every device and lets experts choose
devices (softmax over devices). These functions are the formulas; the solver lives with the aggregator.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from edgemole.adapters.amole.layer import AMoLELinear
from edgemole.adapters.amole.model import expert_embedding_name, token_embedding_name
from edgemole.rng import SplitMix64, as_rng


def expert_choice_probabilities(expert_embeds: torch.Tensor, token_embeds: torch.Tensor) -> torch.Tensor:
    """P (E x N): softmax over devices of S_ic = <e_i, t_c> / sqrt(r); row i is expert i's preference."""
    r = expert_embeds.shape[-1]
    scores = expert_embeds.to(torch.float64) @ token_embeds.to(torch.float64).T / math.sqrt(r)
    return torch.softmax(scores, dim=1)


def privatize(v: torch.Tensor, eta: float, rng: SplitMix64 | int) -> torch.Tensor:
    """Differential privacy for one embedding: add L*V per coordinate, L ~ Gamma(shape r, rate eta),
    V ~ Uniform(-1, 1), then rescale so the norm is at most the clean one.

    ``rng`` (or a :class:`SplitMix64` seeded with it) gives, per coordinate in row-major order, ``r`` uniforms
    ``u`` for L as the sum of ``-log1p(-u) / eta`` (r exponentials, summed in draw order) and then one uniform
    ``u`` for ``V = 2u - 1``; all in float64 (docs/protocol.md section 10), so the native client adds the same noise.
    """
    rng = as_rng(rng)
    r = v.shape[-1]
    clean = v.detach().to(torch.float64).reshape(-1)
    draws = rng.uniforms(clean.numel() * (r + 1))
    noise = []
    for c in range(clean.numel()):
        base = c * (r + 1)
        gamma = 0.0
        for u in draws[base : base + r]:
            gamma += -math.log1p(-u) / eta
        noise.append(gamma * (2.0 * draws[base + r] - 1.0))
    noisy = clean + torch.tensor(noise, dtype=torch.float64)
    before, now = torch.linalg.vector_norm(clean), torch.linalg.vector_norm(noisy)
    if now > before > 0:
        noisy = noisy * (before / now)
    return noisy.reshape(v.shape).to(v.dtype)


def collect_embeddings(layers: dict[str, AMoLELinear], experts: dict[str, list[int]],
                       run_forward: Callable[[], None]) -> dict[str, torch.Tensor]:
    """Run ``run_forward`` (forward passes over the aux set) and return every module's t_c and e_ic."""
    for layer in layers.values():
        layer.start_embedding()
    try:
        run_forward()
    finally:
        stats = {module: layer.finish_embedding() for module, layer in layers.items()}
    out = {}
    for module, (token, per_slot) in stats.items():
        out[token_embedding_name(module)] = token
        for slot, eid in enumerate(experts[module]):
            out[expert_embedding_name(module, eid)] = per_slot[slot]
    return out
