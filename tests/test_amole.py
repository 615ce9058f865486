"""AMoLE layer, RSEA formulas, the device's wire state and the FedAMoLE strategy (DESIGN.md 5.1, 5.2)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from edgemole.adapters.amole.config import AMoLEConfig
from edgemole.adapters.amole.layer import AMoLELinear, load_balance_loss
from edgemole.adapters.amole.model import expert_name, token_embedding_name
from edgemole.adapters.amole.rsea import expert_choice_probabilities, privatize
from edgemole.adapters.lora import LoRAConfig
from edgemole.config import ModelConfig, TaskSpec, TrainConfig
from edgemole.errors import ConfigError, ProtocolError
from edgemole.model import WireState, build_classifier
from edgemole.rng import SplitMix64


def _tiny_layer(slots: int = 2, top_k: int = 2) -> AMoLELinear:
    base = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.eye(2))
    layer = AMoLELinear(base, slots=slots, r=2, alpha=2.0, dropout=0.0, top_k=top_k)  # scaling 1
    with torch.no_grad():
        layer.router.copy_(torch.eye(2))
        layer.shared_A.copy_(torch.eye(2))
        layer.shared_B.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
        layer.experts_A.copy_(torch.stack([torch.eye(2), torch.tensor([[0.0, 1.0], [1.0, 0.0]])]))
        layer.experts_B.copy_(torch.stack([torch.eye(2), 2 * torch.eye(2)]))
    return layer


def test_layer_output_matches_hand_computation() -> None:
    layer = _tiny_layer()
    x = torch.tensor([[1.0, 2.0]])
    # W_t x = (1, 2); A_0 x = (1, 2) -> score 5/sqrt2; A_1 x = (2, 1) -> score 4/sqrt2
    s0, s1 = 5 / math.sqrt(2), 4 / math.sqrt(2)
    g0 = math.exp(s0) / (math.exp(s0) + math.exp(s1))
    g1 = 1 - g0
    # base (1, 2) + shared B_s A_s x = (1, 0) + g0 * (1, 2) + g1 * 2 * (2, 1)
    expected = torch.tensor([[1 + 1 + g0 * 1 + g1 * 4, 2 + 0 + g0 * 2 + g1 * 2]])
    assert torch.allclose(layer(x), expected, atol=1e-6)


def test_inactive_slots_get_zero_weight_and_zero_gradient() -> None:
    layer = _tiny_layer(slots=2, top_k=2)
    layer.set_active(1)
    x = torch.tensor([[1.0, 2.0], [-1.0, 0.5]])
    probs, gates, _ = layer.route(x)
    assert torch.equal(probs[:, 1], torch.zeros(2)) and torch.equal(gates[:, 1], torch.zeros(2))
    assert torch.allclose(gates[:, 0], torch.ones(2))
    # with one active expert: y = x + shared + B_0 A_0 x exactly
    expected = x + torch.stack([x[:, 0], torch.zeros(2)], 1) + x
    y = layer(x)
    assert torch.allclose(y, expected, atol=1e-6)
    y.pow(2).sum().backward()
    assert torch.count_nonzero(layer.experts_A.grad[1]) == 0 and torch.count_nonzero(layer.experts_B.grad[1]) == 0
    assert torch.count_nonzero(layer.experts_B.grad[0]) > 0 and torch.count_nonzero(layer.router.grad) == 0
    with pytest.raises(ValueError):
        layer.set_active(0)


def test_top_k_keeps_the_best_and_renormalises() -> None:
    layer = _tiny_layer(slots=2, top_k=1)
    with torch.no_grad():
        layer.router.copy_(torch.diag(torch.tensor([1.0, -1.0])))
    x = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
    probs, gates, _ = layer.route(x)
    # W_t x = (x1, -x2): expert 0 scores x1^2 - x2^2 (+3, -3), expert 1 scores 0 -> first token expert 0, second 1
    assert torch.equal(gates, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert torch.allclose(probs[0], torch.softmax(torch.tensor([3.0, 0.0]) / math.sqrt(2), 0))


def test_load_balance_loss_on_a_tiny_case() -> None:
    probs = torch.tensor([[0.7, 0.2, 0.1, 0.0], [0.1, 0.6, 0.3, 0.0], [0.5, 0.4, 0.1, 0.0]])
    picked = torch.tensor([[True, True, False, False], [False, True, True, False], [True, True, False, False]])
    active = torch.tensor([True, True, True, False])
    weights = torch.tensor([1.0, 1.0, 0.0])  # the third token is padding
    # P = mean over the 2 real tokens = (0.4, 0.4, 0.2); picks among real tokens: e0 1, e1 2, e2 1 of 4 -> f
    expected = 3 * (0.4 * 0.25 + 0.4 * 0.5 + 0.2 * 0.25)
    assert torch.isclose(load_balance_loss(probs, picked, active, weights), torch.tensor(expected))


def test_rsea_probabilities_on_a_tiny_case() -> None:
    e = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    t = torch.tensor([[1.0, 1.0], [3.0, 0.0], [0.0, 0.0]])
    p = expert_choice_probabilities(e, t)
    s0 = torch.tensor([1.0, 3.0, 0.0]) / math.sqrt(2)
    s1 = torch.tensor([2.0, 0.0, 0.0]) / math.sqrt(2)
    assert torch.allclose(p[0], torch.softmax(s0.double(), 0)) and torch.allclose(p[1], torch.softmax(s1.double(), 0))
    assert torch.allclose(p.sum(1), torch.ones(2, dtype=torch.float64))  # experts choose among devices


def test_dp_noise_changes_the_vector_but_never_grows_its_norm() -> None:
    gen = SplitMix64(0)
    v = torch.tensor([0.5, -1.0, 2.0, 0.0])
    for eta in (0.5, 5.0, 50.0):
        noisy = privatize(v, eta, gen)
        assert not torch.equal(noisy, v)
        assert torch.linalg.vector_norm(noisy) <= torch.linalg.vector_norm(v) + 1e-6
    # more privacy (small eta) means more noise
    far = torch.stack([privatize(v, 0.1, gen) - v for _ in range(50)]).norm(dim=1).mean()
    near = torch.stack([privatize(v, 100.0, gen) - v for _ in range(50)]).norm(dim=1).mean()
    assert far > near


def _task(model: str, **amole: object) -> TaskSpec:
    return TaskSpec(labels=["a", "b", "c"], method="fedamole", model=ModelConfig(name=model, max_length=8),
                    lora=LoRAConfig(r=2, alpha=4.0, dropout=0.0), train=TrainConfig(),
                    amole=AMoLEConfig(**{"experts": 4, "slots": 3, "holders": 2, **amole}))


def test_wire_state_loads_experts_into_slots_and_sends_them_back(tiny_model: str) -> None:
    model, _ = build_classifier(_task(tiny_model))
    wire = WireState.of_model(model, _task(tiny_model))
    fleet, roles = wire.initial_fleet_state()
    modules = sorted(wire.layers)
    assert len(modules) == 4 and sum(n.endswith(".router") for n in fleet) == 4
    assert sum(".expert." in n for n in fleet) == 4 * 4 * 2 and roles[f"{modules[0]}.router"] == "router"
    body = {"experts": {m: [3, 1] for m in modules}}
    spec = wire.assignment_spec(body)
    assert expert_name(modules[0], 3, "lora_A") in spec and expert_name(modules[0], 0, "lora_A") not in spec
    tensors = {n: torch.randn(s.shape) for n, s in spec.items()}
    wire.load(tensors, body)
    layer = wire.layers[modules[0]]
    assert layer.active.tolist() == [True, True, False]
    assert torch.equal(layer.experts_A[0], tensors[expert_name(modules[0], 1, "lora_A")])  # id order -> slots
    back, back_roles = wire.state(body)
    assert set(back) == set(spec) and all(torch.equal(back[n], tensors[n]) for n in spec)
    assert back_roles[expert_name(modules[0], 3, "lora_B")] == "lora_B"
    for bad in ({"experts": {m: [] for m in modules}}, {"experts": {m: [1, 1] for m in modules}},
                {"experts": {m: [0, 1, 2, 3] for m in modules}}, {"experts": {m: [9] for m in modules}},
                {"experts": {modules[0]: [1]}}, {"experts": "all"}, {}):
        with pytest.raises(ProtocolError):
            wire.assignment_spec(bad)


def test_fedamole_strategy_averages_experts_over_holders_only(tiny_model: str) -> None:
    from aggregator.strategies import ClientUpdate, FedAMoLE

    task = _task(tiny_model, experts=4, slots=3, holders=2)
    model, _ = build_classifier(task)
    strategy = FedAMoLE(*WireState.of_model(model, task).initial_fleet_state(), task)
    clients = ["a", "b", "c", "d"]
    plan = strategy.configure_train(1, clients)
    sets = plan.info["experts"]
    for m in strategy.modules:  # constraints: each expert exactly C holders, each client in [k, M]
        holders = [sum(e in sets[c][m] for c in clients) for e in range(4)]
        assert holders == [2, 2, 2, 2] and all(2 <= len(sets[c][m]) <= 3 for c in clients)
    m0 = strategy.modules[0]
    updates = []
    for i, c in enumerate(clients):
        spec = plan.assignments[c].expect
        assert token_embedding_name(m0) in spec
        tensors = {n: torch.full(s.shape, float(i)) for n, s in spec.items()}
        updates.append(ClientUpdate(c, 10 * (i + 1), tensors))
    strategy.aggregate(1, plan, updates)
    for e in range(4):
        holders = [i for i, c in enumerate(clients) if e in sets[c][m0]]
        value = strategy.state[expert_name(m0, e, "lora_A")]
        assert torch.allclose(value, torch.full_like(value, sum(holders) / len(holders)))  # unweighted
    shared = strategy.state[f"{m0}.shared.lora_A"]
    assert torch.allclose(shared, torch.full_like(shared, 1.5))
    assert torch.allclose(strategy.expert_embed[m0][0], torch.full((2,), float(
        sum(i for i, c in enumerate(clients) if 0 in sets[c][m0]) / 2)))
    nxt = strategy.configure_train(2, clients).info["experts"]
    assert all(2 <= len(nxt[c][m]) <= 3 for c in clients for m in strategy.modules)
    with pytest.raises(ConfigError):
        strategy.configure_train(3, ["a"])  # one device cannot hold 4 experts x C >= 1 with at most 3 slots


def test_amole_wraps_a_llama_style_decoder(tmp_path, tiny_model: str) -> None:  # noqa: ANN001
    """Decoder families work too: AMoLE on q_proj/v_proj of a tiny randomly initialised Llama."""
    import shutil
    from pathlib import Path

    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaModel(config).save_pretrained(tmp_path)
    for f in Path(tiny_model).glob("*"):
        if "token" in f.name or f.name == "vocab.txt" or f.name == "special_tokens_map.json":
            shutil.copy(f, tmp_path / f.name)
    task = TaskSpec(labels=["a", "b"], method="fedamole", model=ModelConfig(name=str(tmp_path), max_length=8),
                    lora=LoRAConfig(r=2, alpha=4.0, dropout=0.0, target_modules=("q_proj", "v_proj")),
                    amole=AMoLEConfig(experts=4, slots=2, holders=2))
    model, tokenizer = build_classifier(task)
    wire = WireState.of_model(model, task)
    assert len(wire.layers) == 4 and all(m.endswith(("q_proj", "v_proj")) for m in wire.layers)
    enc = tokenizer(["hello there", "a b c"], padding="max_length", max_length=8, return_tensors="pt")
    model(enc["input_ids"], enc["attention_mask"]).sum().backward()
    layer = next(iter(wire.layers.values()))
    assert layer.router.grad is not None and layer.base.weight.grad is None


def test_fedamole_needs_enough_devices_to_hold_every_expert(tiny_model: str) -> None:
    from aggregator.strategies import FedAMoLE

    task = _task(tiny_model, experts=4, slots=3, holders=2)
    model, _ = build_classifier(task)
    strategy = FedAMoLE(*WireState.of_model(model, task).initial_fleet_state(), task)
    assert strategy.min_clients == 2  # ceil(E / M): the aggregator waits for (and selects) at least this many
    sets = strategy.configure_train(1, ["a", "b"]).info["experts"]  # C lowered to 1 with a warning, still valid
    for m in strategy.modules:
        assert sorted(e for c in "ab" for e in sets[c][m]) == [0, 1, 2, 3]


@pytest.mark.parametrize("method", ["fedamole", "fedamole-a2"])
def test_reassign_every_keeps_expert_sets_within_a_period(tiny_model: str, method: str) -> None:
    """``amole.reassign_every = 2``: round 2 keeps round 1's sets (the same holders train both factors in
    fedamole-a2), round 3 assigns anew, the final evaluation keeps the sets of the last round trained (those the
    devices trained and serve), and other devices force a new assignment."""
    from aggregator.strategies import strategy_class

    task = _task(tiny_model, experts=4, slots=3, holders=2, reassign_every=2)
    task.method = method
    model, _ = build_classifier(task)
    strategy = strategy_class(method)(*WireState.of_model(model, task).initial_fleet_state(), task)
    calls = []
    assign = strategy.assign
    strategy.assign = lambda clients: calls.append(tuple(clients)) or assign(clients)  # type: ignore[method-assign]
    clients = ["a", "b", "c", "d"]
    first = strategy.configure_train(1, clients).info["experts"]
    assert strategy.configure_train(2, clients).info["experts"] == first and len(calls) == 1
    assert strategy.configure_evaluate(clients).info["experts"] == first and len(calls) == 1
    strategy.configure_train(3, clients)
    assert len(calls) == 2
    fewer = strategy.configure_train(4, clients[:3]).info["experts"]  # a device dropped out mid-period
    assert len(calls) == 3 and set(fewer) == set(clients[:3])
    strategy.configure_evaluate(clients)  # not the devices of the last round: their sets cannot be kept
    assert len(calls) == 4
    for m in strategy.modules:
        assert sorted(e for c in fewer for e in fewer[c][m]) == [0, 0, 1, 1, 2, 2, 3, 3]
    with pytest.raises(ConfigError):
        AMoLEConfig(reassign_every=0)


def test_keep_bonus_keeps_experts_with_their_holders(tiny_model: str) -> None:
    """``amole.keep_bonus``: 0 is the paper's reverse selection (here it moves experts); a large bonus keeps every
    (expert, device) pair of the latest assignment, and a new device still gets a feasible set."""
    from aggregator.strategies import strategy_class

    def moved(bonus: float) -> int:
        task = _task(tiny_model, experts=4, slots=3, holders=2)
        task.amole.keep_bonus = bonus
        model, _ = build_classifier(task)
        strategy = strategy_class("fedamole")(*WireState.of_model(model, task).initial_fleet_state(), task)
        clients = ["a", "b", "c", "d"]
        first = strategy.configure_train(1, clients).info["experts"]
        gen = torch.Generator().manual_seed(7)
        for m in strategy.modules:  # embeddings that disagree with the random first assignment
            strategy.expert_embed[m] = torch.randn(4, strategy.r, generator=gen) * 5
            strategy.embedded[m][:] = True
            for c in clients:
                strategy.token_embed.setdefault(c, {})[m] = torch.randn(strategy.r, generator=gen) * 5
        second = strategy.configure_train(2, clients).info["experts"]
        return sum(len(set(first[c][m]) ^ set(second[c][m])) for c in clients for m in strategy.modules)

    assert moved(0.0) > 0
    assert moved(1000.0) == 0
    with pytest.raises(ConfigError):
        AMoLEConfig(keep_bonus=-1)
