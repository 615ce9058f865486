"""The AMoLE layer: a frozen linear layer plus a shared LoRA expert and M routed expert slots.

    y = W0 x + (alpha/r) B_s A_s x + sum over the top-k active slots of g_i(x) (alpha/r) B_i A_i x
    g_i(x) = softmax over active slots of <A_i x, W_t x> / sqrt(r), top-k kept and renormalised

Slots have fixed shapes and an active mask, so one model (and later one exported program) serves every
expert assignment: loading a device's experts only copies weights into slots and flips mask bits.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from edgemole.adapters.lora.layer import init_lora_A


class AMoLELinear(nn.Module):
    """Wraps a frozen ``nn.Linear`` with ``slots`` routed LoRA experts, a shared expert and a router."""

    def __init__(self, base: nn.Linear, slots: int, r: int, alpha: float, dropout: float, top_k: int) -> None:
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        d_in, d_out = base.in_features, base.out_features
        self.r, self.top_k, self.scaling = r, top_k, alpha / r
        self.experts_A = nn.Parameter(torch.empty(slots, r, d_in))
        self.experts_B = nn.Parameter(torch.zeros(slots, d_out, r))
        self.shared_A = nn.Parameter(torch.empty(r, d_in))
        self.shared_B = nn.Parameter(torch.zeros(d_out, r))
        self.router = nn.Parameter(torch.empty(r, d_in))
        for t in (*self.experts_A, self.shared_A, self.router):
            init_lora_A(t)
        self.register_buffer("active", torch.ones(slots, dtype=torch.bool), persistent=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        #: (batch, tokens) mask of real tokens, set by the model before each forward; None = all tokens count
        self.token_mask: torch.Tensor | None = None
        #: load-balance loss of the last forward
        self.lb_loss: torch.Tensor = torch.zeros(())
        self._embed: list[torch.Tensor] | None = None  # [sum W_t x, sum A_i x per slot, token count]
        #: (slots,) bool mask from an exported program's input, used instead of the ``active`` buffer (a program
        #: cannot change a buffer between rounds, so the slot mask is an input there); None: the buffer
        self.slot_mask: torch.Tensor | None = None
        #: keep this forward's RSEA sums in ``batch_sums`` (an exported program returns them as outputs)
        self.emit_sums = False
        self.batch_sums: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def slots(self) -> int:
        return self.experts_A.shape[0]

    def set_active(self, count: int) -> None:
        """Slots ``0..count-1`` hold experts, the rest are off (zero weight, zero gradient)."""
        if not 1 <= count <= self.slots:
            raise ValueError(f"active slots must be in [1, {self.slots}], got {count}")
        self.active.copy_(torch.arange(self.slots) < count)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router probabilities over slots, renormalised top-k gates, and the experts' A x (routing inputs)."""
        token = F.linear(x, self.router)  # (..., r)
        ax = torch.einsum("...d,mrd->...mr", x, self.experts_A)  # (..., M, r)
        scores = (ax * token.unsqueeze(-2)).sum(-1) / math.sqrt(self.r)
        probs = torch.softmax(scores.masked_fill(~self._active(), float("-inf")), dim=-1)
        top_p, top_i = probs.topk(min(self.top_k, self.slots), dim=-1)
        gates = torch.zeros_like(probs).scatter(-1, top_i, top_p / top_p.sum(-1, keepdim=True))
        return probs, gates, ax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs, gates, ax = self.route(x)
        xd = self.dropout(x)
        ax_d = ax if isinstance(self.dropout, nn.Identity) else torch.einsum("...d,mrd->...mr", xd, self.experts_A)
        mixed = torch.einsum("...mr,...m,mor->...o", ax_d, gates, self.experts_B)
        shared = F.linear(F.linear(xd, self.shared_A), self.shared_B)
        weights = self._token_weights(x)
        self.lb_loss = load_balance_loss(probs, gates > 0, self._active(), weights)
        if self._embed is not None or self.emit_sums:
            with torch.no_grad():
                w = weights.unsqueeze(-1)
                sums = ((F.linear(x, self.router) * w).reshape(-1, self.r).sum(0),
                        (ax * w.unsqueeze(-1)).reshape(-1, self.slots, self.r).sum(0), weights.sum())
            if self._embed is not None:
                self.accumulate_embedding(*sums)
            self.batch_sums = sums if self.emit_sums else None
        return self.base(x) + self.scaling * (shared + mixed)

    def _active(self) -> torch.Tensor:
        return self.active if self.slot_mask is None else self.slot_mask

    def _token_weights(self, x: torch.Tensor) -> torch.Tensor:
        if self.token_mask is not None and self.token_mask.shape == x.shape[:-1]:
            return self.token_mask.to(x.dtype)
        return torch.ones(x.shape[:-1], dtype=x.dtype, device=x.device)

    # -- RSEA embeddings --------------------------------------------------------------------------
    def start_embedding(self) -> None:
        """Accumulate token means of W_t x and of every slot's A x over the following forwards."""
        self._embed = [torch.zeros(self.r), torch.zeros(self.slots, self.r), torch.zeros(())]

    def accumulate_embedding(self, token_sum: torch.Tensor, slot_sums: torch.Tensor, count: torch.Tensor) -> None:
        """Add one batch's sums (of W_t x, of every slot's A x, and the token count)."""
        if self._embed is None:
            raise RuntimeError("start_embedding() was not called")
        self._embed[0] += token_sum
        self._embed[1] += slot_sums
        self._embed[2] += count

    def finish_embedding(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(t, e)``: mean W_t x (r,) and mean A_i x per slot (M, r) over the real tokens seen."""
        if self._embed is None:
            raise RuntimeError("start_embedding() was not called")
        t_sum, e_sum, n = self._embed
        self._embed = None
        n = n.clamp(min=1.0)
        return t_sum / n, e_sum / n


def load_balance_loss(probs: torch.Tensor, picked: torch.Tensor, active: torch.Tensor,
                      weights: torch.Tensor) -> torch.Tensor:
    """n_c * sum_i P_i f_i over active experts: P_i mean router probability, f_i share of the top-k picks.

    ``probs`` and ``picked`` are (..., M), ``weights`` (...) marks real tokens (padding does not count).
    """
    w = weights.unsqueeze(-1)
    n_tok = weights.sum().clamp(min=1.0)
    mean_prob = (probs * w).reshape(-1, probs.shape[-1]).sum(0) / n_tok
    picks = (picked & active).to(probs.dtype) * w
    share = picks.reshape(-1, probs.shape[-1]).sum(0) / picks.sum().clamp(min=1.0)
    return active.sum() * (mean_prob * share).sum()
