"""LoRA-A2's formulas (DESIGN.md 5.3): exact aggregation with a frozen factor, rank scores and selection, masks
that hold under AdamW, slices that round-trip."""

from __future__ import annotations

import pytest
import torch

from edgemole.adapters.lora.a2 import (
    active_factor,
    phase_for_round,
    rank_mask,
    rank_scores,
    reapply_mask,
    scatter_weighted_sum,
    select_ranks,
    slice_factor,
)


def test_phases_alternate_starting_with_b() -> None:
    assert [phase_for_round(t) for t in (1, 2, 3, 4)] == ["train-B", "train-A", "train-B", "train-A"]
    assert active_factor("train-B") == "lora_B" and active_factor("train-A") == "lora_A"
    with pytest.raises(ValueError):
        phase_for_round(0)
    with pytest.raises(ValueError):
        active_factor("train")


def test_frozen_factor_makes_averaging_exact() -> None:
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(3, 5, generator=gen)  # shared and frozen in a B round
    Bs = [torch.randn(4, 3, generator=gen) for _ in range(3)]
    w = torch.tensor([0.2, 0.5, 0.3])
    avg_of_products = sum(wi * (B @ A) for wi, B in zip(w, Bs, strict=True))
    product_of_avg = sum(wi * B for wi, B in zip(w, Bs, strict=True)) @ A
    assert torch.allclose(avg_of_products, product_of_avg, atol=1e-6)
    # whereas averaging both factors separately (FedIT) is not exact
    As = [torch.randn(3, 5, generator=gen) for _ in range(3)]
    fedit = sum(wi * B for wi, B in zip(w, Bs, strict=True)) @ sum(wi * a for wi, a in zip(w, As, strict=True))
    exact = sum(wi * (B @ a) for wi, B, a in zip(w, Bs, As, strict=True))
    assert not torch.allclose(fedit, exact, atol=1e-3)


def test_scores_and_global_top_k_on_a_hand_computed_case() -> None:
    A = {"m1": torch.tensor([[3.0, 4.0], [0.0, 1.0]]), "m2": torch.tensor([[1.0, 0.0], [0.0, 2.0]])}
    B = {"m1": torch.zeros(2, 2), "m2": torch.zeros(2, 2)}
    dB = {"m1": torch.tensor([[0.1, 1.0], [0.0, 0.0]]), "m2": torch.tensor([[2.0, 0.0], [0.0, 0.5]])}
    scores = rank_scores(A, B, dB, "train-B")
    # ||dB[:, i]|| * ||A[i, :]||: m1 -> (0.1 * 5, 1 * 1) = (0.5, 1.0); m2 -> (2 * 1, 0.5 * 2) = (2.0, 1.0)
    assert torch.allclose(scores["m1"], torch.tensor([0.5, 1.0]))
    assert torch.allclose(scores["m2"], torch.tensor([2.0, 1.0]))
    assert select_ranks(scores, 1) == {"m1": [], "m2": [0]}  # a module may get no rank
    assert select_ranks(scores, 3) == {"m1": [1], "m2": [0, 1]}  # tie 1.0: earlier module first
    assert select_ranks(scores, 4) == {"m1": [0, 1], "m2": [0, 1]}
    # A round: the score is zero wherever B's column is zero
    B2 = {"m1": torch.tensor([[1.0, 0.0], [1.0, 0.0]]), "m2": torch.zeros(2, 2)}
    dA = {"m1": torch.ones(2, 2), "m2": torch.ones(2, 2)}
    a_scores = rank_scores(A, B2, dA, "train-A")
    assert torch.allclose(a_scores["m1"], torch.tensor([2.0**0.5 * 2.0**0.5, 0.0]))
    assert torch.equal(a_scores["m2"], torch.zeros(2))


def test_masked_entries_do_not_move_under_adamw() -> None:
    torch.manual_seed(0)
    B = torch.nn.Parameter(torch.randn(6, 4))
    reference = B.detach().clone()
    mask = rank_mask(B.shape, [1, 3], "lora_B")
    opt = torch.optim.AdamW([B], lr=0.1, weight_decay=0.1)
    x = torch.randn(8, 4)
    for _ in range(5):
        loss = (x @ B.T).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        reapply_mask(B, mask, reference)
    assert torch.equal(B.detach()[:, [0, 2]], reference[:, [0, 2]])
    assert not torch.equal(B.detach()[:, [1, 3]], reference[:, [1, 3]])
    assert rank_mask((3, 5), [2], "lora_A").sum() == 5


def test_slices_round_trip_and_scatter_is_a_zero_filled_weighted_sum() -> None:
    B1, B2 = torch.arange(12.0).reshape(4, 3), -torch.ones(4, 3)
    s1, s2 = slice_factor(B1, [0, 2], "lora_B"), slice_factor(B2, [2], "lora_B")
    assert s1.shape == (4, 2) and s2.shape == (4, 1)
    out = scatter_weighted_sum([(s1, [0, 2], 0.25), (s2, [2], 0.75)], (4, 3), "lora_B")
    expected = torch.zeros(4, 3)
    expected[:, 0] = 0.25 * B1[:, 0]
    expected[:, 2] = 0.25 * B1[:, 2] + 0.75 * B2[:, 2]
    assert torch.allclose(out, expected)
    A = torch.arange(10.0).reshape(2, 5)
    assert torch.equal(scatter_weighted_sum([(slice_factor(A, [1], "lora_A"), [1], 1.0)], (2, 5), "lora_A")[1], A[1])
