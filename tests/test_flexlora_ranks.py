"""FlexLoRA with per-device ranks: truncation, inert trailing ranks, wire checks and the server's product average."""

from __future__ import annotations

import pytest
import torch

from aggregator.strategies import FlexLoRA
from aggregator.strategies.base import ClientUpdate
from aggregator.strategies.flexlora import svd_redistribute
from edgemole.adapters.lora import LoRAConfig
from edgemole.adapters.lora.flex import OWN_RANK, leading_rank_specs, leading_ranks, truncate_ranks
from edgemole.config import TaskSpec
from edgemole.errors import ProtocolError
from edgemole.protocol import Kind, Message, check_tensors, decode, encode, spec_of

ROLES = {"m.lora_A": "lora_A", "m.lora_B": "lora_B", "head.weight": "head"}


def _state(gen: torch.Generator, r: int = 4) -> dict[str, torch.Tensor]:
    return {"m.lora_A": torch.randn(r, 5, generator=gen), "m.lora_B": torch.randn(6, r, generator=gen),
            "head.weight": torch.randn(2, 6, generator=gen)}


def test_truncation_keeps_the_leading_ranks_and_zeroes_the_rest() -> None:
    state = _state(torch.Generator().manual_seed(0))
    cut = truncate_ranks(state, ["m"], 2)
    assert torch.equal(cut["m.lora_B"][:, :2], state["m.lora_B"][:, :2]) and not cut["m.lora_B"][:, 2:].any()
    assert torch.equal(cut["m.lora_A"][:2], state["m.lora_A"][:2]) and not cut["m.lora_A"][2:].any()
    assert torch.equal(cut["head.weight"], state["head.weight"])
    assert state["m.lora_B"][:, 2:].any()  # the input is not modified
    sent = leading_ranks(cut, ["m"], 2)
    assert sent["m.lora_B"].shape == (6, 2) and sent["m.lora_A"].shape == (2, 5)
    # the rank-2 view is the leading two components of the product
    assert torch.allclose(cut["m.lora_B"] @ cut["m.lora_A"], sent["m.lora_B"] @ sent["m.lora_A"])


def test_zeroed_ranks_stay_zero_under_adamw() -> None:
    """Why a device of rank r_c can share the r-slot model: its trailing ranks get no gradient and no decay."""
    gen = torch.Generator().manual_seed(1)
    cut = truncate_ranks(_state(gen), ["m"], 2)
    B = torch.nn.Parameter(cut["m.lora_B"].clone())
    A = torch.nn.Parameter(cut["m.lora_A"].clone())
    opt = torch.optim.AdamW([A, B], lr=0.1, weight_decay=0.5)
    for _ in range(5):
        x = torch.randn(3, 5, generator=gen)
        loss = ((x @ A.T @ B.T) ** 2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not B[:, 2:].any() and not A[2:].any()
    assert not torch.equal(B[:, :2], cut["m.lora_B"][:, :2])


def _update(tensors: dict[str, torch.Tensor]) -> Message:
    return Message(Kind.UPDATE, "f", 1, "train", "c0", {"run": "0" * 12, "num_samples": 1}, tensors,
                   {n: ROLES[n] for n in tensors})


def test_own_rank_updates_round_trip_and_are_checked() -> None:
    state = _state(torch.Generator().manual_seed(2))
    expect = leading_rank_specs(spec_of(state, ROLES), ["m"])
    for k in (1, 3, 4):
        msg = decode(encode(_update(leading_ranks(state, ["m"], k))))
        check_tensors(msg, expect)
        assert torch.equal(msg.tensors["m.lora_A"], state["m.lora_A"][:k])
    mismatched = {**leading_ranks(state, ["m"], 2), "m.lora_A": state["m.lora_A"][:3]}
    with pytest.raises(ProtocolError, match="same rank, got \\[2, 3\\]"):
        check_tensors(decode(encode(_update(mismatched))), expect)
    with pytest.raises(ProtocolError, match="shape"):  # above the fleet's rank
        check_tensors(_update({**state, "m.lora_A": torch.randn(5, 5), "m.lora_B": torch.randn(6, 5)}), expect)
    with pytest.raises(ProtocolError, match="missing"):
        check_tensors(_update({n: t for n, t in state.items() if n != "m.lora_B"}), expect)


def test_server_averages_products_of_different_ranks_and_redistributes_by_svd() -> None:
    gen = torch.Generator().manual_seed(3)
    task = TaskSpec(labels=["a", "b"], lora=LoRAConfig(r=4, alpha=8.0))
    flex = FlexLoRA(_state(gen), ROLES, task)
    plan = flex.configure_train(1, ["x", "y"])
    assert plan.assignments["x"].body == {OWN_RANK: True}
    ups = [ClientUpdate("x", 1, leading_ranks(_state(gen), ["m"], 1)),
           ClientUpdate("y", 3, leading_ranks(_state(gen), ["m"], 3))]
    for u in ups:
        check_tensors(_update(u.tensors), plan.assignments[u.client].expect)
    extra = flex.aggregate(1, plan, ups)
    assert extra == {"client_rank_min": 1, "client_rank_max": 3}
    avg = sum(w * 2.0 * u.tensors["m.lora_B"] @ u.tensors["m.lora_A"] for w, u in zip((0.25, 0.75), ups, strict=True))
    B, A = svd_redistribute(avg, 4, 2.0)
    got = flex.model_for("x")
    assert torch.allclose(got["m.lora_B"], B) and torch.allclose(got["m.lora_A"], A)
    assert torch.allclose(2.0 * got["m.lora_B"] @ got["m.lora_A"], avg, atol=1e-5)  # rank 1 + 3 <= 4: exact
    head = 0.25 * ups[0].tensors["head.weight"] + 0.75 * ups[1].tensors["head.weight"]
    assert torch.allclose(got["head.weight"], head)
