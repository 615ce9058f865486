"""LoRA-A2's formulas (DESIGN.md 5.3): exact aggregation with a frozen factor, rank scores and selection, masks
that hold under AdamW, slices that round-trip."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from edgemole.adapters.lora.a2 import (
    active_factor,
    adapter_prefixes,
    aggregate_slices,
    encode_slices,
    phase_for_round,
    rank_mask,
    rank_scores,
    reapply_mask,
    scatter_weighted_sum,
    select_ranks,
    slice_factor,
    slice_specs,
)
from edgemole.errors import ProtocolError
from edgemole.protocol import RANKS_ROLE, Kind, Message, check_tensors, decode, encode, spec_of


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


# -- the wire: slices with their indices, validated and aggregated ------------------------------------------
def _update(tensors: dict[str, torch.Tensor], roles: dict[str, str]) -> Message:
    return decode(encode(Message(Kind.UPDATE, "f", 1, "train-B", "c", {"run": "r", "num_samples": 5},
                                 tensors, roles)))


def test_slices_with_indices_round_trip_over_the_wire_and_aggregate_exactly() -> None:
    gen = torch.Generator().manual_seed(0)
    state = {"m1.lora_A": torch.randn(3, 5, generator=gen), "m1.lora_B": torch.randn(4, 3, generator=gen),
             "m2.lora_A": torch.randn(3, 5, generator=gen), "m2.lora_B": torch.randn(4, 3, generator=gen),
             "head.weight": torch.randn(2, 4, generator=gen)}
    prefixes = adapter_prefixes(state)
    assert prefixes == ["m1", "m2"]
    # two devices trained B from the global state; each changed only its selected columns
    selections = [{"m1": [0, 2], "m2": []}, {"m1": [2], "m2": [1]}]
    weights = [0.25, 0.75]
    trained = []
    for sel in selections:
        t = {k: v.clone() for k, v in state.items()}
        for p, ranks in sel.items():
            t[f"{p}.lora_B"][:, ranks] += torch.randn(4, len(ranks), generator=gen)
        trained.append(t)
    specs = slice_specs(spec_of(state, {k: k.rsplit(".", 1)[-1] for k in state}), prefixes, "train-B")
    received = []
    for t, sel in zip(trained, selections, strict=True):
        wire = encode_slices(t, sel, "train-B")
        assert "m2.lora_B" not in wire if not sel["m2"] else wire["m2.lora_B"].shape == (4, len(sel["m2"]))
        roles = {n: RANKS_ROLE if n.endswith(".ranks") else "lora_B" for n in wire}
        msg = _update(wire, roles)
        check_tensors(msg, specs)  # optional, variable-rank slices pass the validator
        received.append(msg.tensors)
    for p in prefixes:  # zero-filled weighted sum of changes == weighted average of the full trained factors
        got = aggregate_slices(state[f"{p}.lora_B"], list(zip(received, weights, strict=True)), p, "train-B")
        want = sum(w * t[f"{p}.lora_B"] for w, t in zip(weights, trained, strict=True))
        assert torch.allclose(got, want, atol=1e-6), p


@pytest.mark.parametrize("bad, why", [
    ({"m1.lora_B": torch.zeros(4, 2)}, "sent together"),  # slice without indices
    ({"m1.ranks": torch.tensor([0])}, "sent together"),  # indices without slice
    ({"m1.lora_B": torch.zeros(4, 2), "m1.ranks": torch.tensor([0])}, "increasing rank indices"),  # count differs
    ({"m1.lora_B": torch.zeros(4, 2), "m1.ranks": torch.tensor([2, 1])}, "increasing rank indices"),
    ({"m1.lora_B": torch.zeros(4, 2), "m1.ranks": torch.tensor([1, 1])}, "increasing rank indices"),
    ({"m1.lora_B": torch.zeros(4, 1), "m1.ranks": torch.tensor([3])}, "increasing rank indices"),  # out of range
    ({"m1.lora_B": torch.zeros(4, 1), "m1.ranks": torch.tensor([-1])}, "increasing rank indices"),
    ({"m1.lora_B": torch.zeros(4, 4), "m1.ranks": torch.tensor([0, 1, 2, 3])}, "shape"),  # more than r ranks
    ({"m1.lora_B": torch.zeros(5, 1), "m1.ranks": torch.tensor([0])}, "shape"),
    ({"m1.lora_B": torch.zeros(4, 1), "m1.ranks": torch.tensor([0.0])}, "dtype"),
    ({"m1.lora_A": torch.zeros(1, 5), "m1.ranks": torch.tensor([0])}, "unexpected"),  # the frozen factor
])
def test_bad_rank_slices_are_rejected(bad: dict, why: str) -> None:
    state = {"m1.lora_A": torch.zeros(3, 5), "m1.lora_B": torch.zeros(4, 3)}
    specs = slice_specs(spec_of(state, {"m1.lora_A": "lora_A", "m1.lora_B": "lora_B"}), ["m1"], "train-B")
    roles = {n: RANKS_ROLE if n.endswith(".ranks") else n.rsplit(".", 1)[-1] for n in bad}
    with pytest.raises(ProtocolError, match=why):
        check_tensors(_update(bad, roles), specs)


def test_lora_a2_strategy_alternates_and_adds_weighted_slice_changes() -> None:
    from aggregator.strategies import ClientUpdate, strategy_class
    from edgemole.config import TaskSpec

    task = TaskSpec(labels=["a", "b"], method="lora-a2")
    state = {"m.lora_A": torch.randn(2, 3), "m.lora_B": torch.zeros(4, 2), "head.weight": torch.zeros(2, 4)}
    roles = {"m.lora_A": "lora_A", "m.lora_B": "lora_B", "head.weight": "head"}
    strategy = strategy_class("lora-a2")(state, roles, task)
    plans = [strategy.configure_train(t, ["c0", "c1"]) for t in (1, 2)]
    assert [p.phase for p in plans] == ["train-B", "train-A"]
    assert plans[0].assignments["c0"].body["train_roles"] == ["lora_B", "head"]
    assert plans[1].assignments["c0"].body["train_roles"] == ["lora_A", "head"]
    assert set(plans[0].assignments["c0"].expect) == {"m.lora_B", "m.ranks", "head.weight"}
    updates = [ClientUpdate("c0", 10, {"m.lora_B": torch.ones(4, 1), "m.ranks": torch.tensor([1]),
                                       "head.weight": torch.ones(2, 4)}),
               ClientUpdate("c1", 30, {"head.weight": torch.zeros(2, 4)})]  # c1 selected no rank of m
    strategy.aggregate(1, plans[0], updates)
    B = strategy.model_for("c0")["m.lora_B"]
    assert torch.allclose(B[:, 1], torch.full((4,), 0.25)) and torch.equal(B[:, 0], torch.zeros(4))
    assert torch.equal(strategy.model_for("c0")["m.lora_A"], state["m.lora_A"])  # frozen in a B round
    assert torch.allclose(strategy.model_for("c0")["head.weight"], torch.full((2, 4), 0.25))


@pytest.mark.parametrize("phase", ["train-B", "train-A"])
def test_device_round_moves_only_selected_ranks_of_the_active_factor(tiny_model: str, phase: str) -> None:
    from edge_client.alternating import train_alternating
    from edge_client.engines import Batch
    from edge_client.engines.eager import EagerEngine
    from edgemole.adapters.lora.config import A2Config, LoRAConfig
    from edgemole.config import ModelConfig, TaskSpec, TrainConfig

    task = TaskSpec(labels=["a", "b", "c"], method="lora-a2", model=ModelConfig(tiny_model, 8),
                    lora=LoRAConfig(r=4, dropout=0.0), train=TrainConfig(lr=0.05, weight_decay=0.1),
                    a2=A2Config(probe_steps=2))
    engine = EagerEngine(task, threads=1)
    state, _ = engine.get_state({})
    gen = torch.Generator().manual_seed(1)
    state = {n: torch.randn(t.shape, generator=gen) * 0.1 for n, t in state.items()}  # B != 0 for A scores
    engine.set_state(state, {})

    def batches() -> Iterator[Batch]:
        g = torch.Generator().manual_seed(2)
        while True:
            yield Batch(torch.randint(5, 90, (4, 8), generator=g), torch.ones(4, 8, dtype=torch.long),
                        torch.randint(0, 3, (4,), generator=g))

    result = train_alternating(engine, {}, phase, batches, task, steps=4, upload_rank=1,
                               train_roles=[active_factor(phase), "head"])
    trained, _ = engine.get_state({})
    factor = active_factor(phase)
    frozen = "lora_A" if factor == "lora_B" else "lora_B"
    prefixes = adapter_prefixes(state)
    assert result.ranks == len(prefixes)  # budget r_c x modules = 1 x modules
    for p in prefixes:
        assert torch.equal(trained[f"{p}.{frozen}"], state[f"{p}.{frozen}"])
        mask = rank_mask(state[f"{p}.{factor}"].shape, result.selection[p], factor)
        moved = trained[f"{p}.{factor}"] != state[f"{p}.{factor}"]
        assert not bool((moved & ~mask).any()), p  # AdamW with weight decay moved nothing outside the mask
        if result.selection[p]:
            assert bool(moved.any())
            assert torch.equal(result.tensors[f"{p}.{factor}"],
                               slice_factor(trained[f"{p}.{factor}"], result.selection[p], factor))
        else:
            assert f"{p}.{factor}" not in result.tensors
    assert {result.roles[n] for n in result.tensors} == {factor, "ranks", "head"}
