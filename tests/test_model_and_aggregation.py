"""Units: LoRA layer and injection, the classifier, the eager engine, FedIT and checkpoints."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from aggregator.checkpoint import load_checkpoint, save_checkpoint
from aggregator.strategies import ClientUpdate, FedIT, strategy_class, weighted_average
from edge_client.engines import Batch, make_engine
from edgemole.adapters.lora import LoRAConfig, LoRALinear, inject_lora
from edgemole.config import ModelConfig, TaskSpec, TrainConfig
from edgemole.errors import ConfigError, EdgemoleError, ModelError
from edgemole.model import build_classifier, load_backbone, resolve_model_source, trainable_state


def test_weighted_average_matches_formula_and_rejects_bad_weights() -> None:
    a, b, c = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -2.0]), torch.tensor([0.5, 0.5])
    got = weighted_average([a, b, c], [1, 3, 4])
    assert torch.allclose(got, (1 * a + 3 * b + 4 * c) / 8)
    assert torch.equal(weighted_average([a, b, c], [1, 3, 4]), weighted_average([c, b, a], [4, 3, 1]))
    with pytest.raises(ValueError):
        weighted_average([a], [0])
    with pytest.raises(ValueError):
        weighted_average([a, b], [1])


def test_fedit_averages_every_tensor_by_samples() -> None:
    init = {"m.lora_A": torch.zeros(2, 3), "m.lora_B": torch.zeros(4, 2)}
    roles = {"m.lora_A": "lora_A", "m.lora_B": "lora_B"}
    fedit = FedIT(init, roles, TaskSpec(labels=["a", "b"]))
    plan = fedit.configure_train(1, ["x", "y"])
    assert plan.phase == "train" and set(plan.assignments) == {"x", "y"}
    assert plan.assignments["x"].expect["m.lora_B"].shape == (4, 2)
    assert plan.assignments["x"].expect["m.lora_B"].role == "lora_B"
    ux = ClientUpdate("x", 10, {k: torch.ones_like(v) for k, v in init.items()})
    uy = ClientUpdate("y", 30, {k: torch.full_like(v, 5.0) for k, v in init.items()})
    fedit.aggregate(1, plan, [ux, uy])
    for value in fedit.model_for("anyone").values():
        assert torch.allclose(value, torch.full_like(value, (10 * 1 + 30 * 5) / 40))
    with pytest.raises(ValueError):
        fedit.load_state_dict({"other": torch.zeros(1)})
    assert strategy_class("fedit") is FedIT
    with pytest.raises(ConfigError, match="available: fedamole, fedamole-a2, fedit, ffa-lora, flexlora, lora-a2"):
        strategy_class("fedavg-magic")


def test_checkpoint_round_trip_and_refusals(tmp_path) -> None:  # noqa: ANN001
    state = {"w": torch.arange(6.0).reshape(2, 3)}
    save_checkpoint(tmp_path, state, method="fedit", run="r1", round_=4)
    loaded, run, rnd = load_checkpoint(tmp_path, method="fedit")
    assert torch.equal(loaded["w"], state["w"]) and run == "r1" and rnd == 4
    with pytest.raises(EdgemoleError, match="method 'fedit'"):
        load_checkpoint(tmp_path, method="lora-a2")
    (tmp_path / "latest.safetensors").write_bytes(b"garbage")
    with pytest.raises(EdgemoleError, match="unreadable"):
        load_checkpoint(tmp_path, method="fedit")
    assert load_checkpoint(tmp_path / "empty", method="fedit") is None


def test_lora_layer_starts_as_base_and_trains_only_factors() -> None:
    torch.manual_seed(0)
    base = nn.Linear(6, 4)
    layer = LoRALinear(base, r=2, alpha=4.0, dropout=0.0)
    x = torch.randn(5, 6)
    assert torch.equal(layer(x), base(x))
    with torch.no_grad():
        layer.lora_B.fill_(0.1)
    expected = base(x) + 2.0 * (x @ layer.lora_A.T @ layer.lora_B.T)
    assert torch.allclose(layer(x), expected, atol=1e-6)
    layer(x).sum().backward()
    assert base.weight.grad is None and layer.lora_A.grad is not None and layer.lora_B.grad is not None


def test_inject_lora_names_the_available_layers_when_nothing_matches() -> None:
    model = nn.Sequential()
    model.add_module("query", nn.Linear(3, 3))
    model.add_module("proj", nn.Linear(3, 3))
    assert inject_lora(model, LoRAConfig(r=1, target_modules=("query",))) == ["query"]
    assert isinstance(model.query, LoRALinear) and isinstance(model.proj, nn.Linear)
    with pytest.raises(ModelError, match="proj"):
        inject_lora(model, LoRAConfig(r=1, target_modules=("q_proj",)))


def test_model_sources() -> None:
    assert resolve_model_source("all-MiniLM-L6-v2").endswith("model")
    assert resolve_model_source("/some/path") == "/some/path"
    with pytest.raises(ModelError, match="cannot load model '/does/not/exist'"):
        load_backbone("/does/not/exist")


def test_hub_id_offline_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="cannot load model 'nobody/no-such-model'"):
        load_backbone("nobody/no-such-model")


def _task(model: str, **lora: object) -> TaskSpec:
    return TaskSpec(labels=["a", "b", "c"], model=ModelConfig(name=model, max_length=8),
                    lora=LoRAConfig(r=2, alpha=4.0, dropout=0.0, **lora), train=TrainConfig())


def test_classifier_trainable_tensors(tiny_model: str) -> None:
    model, _ = build_classifier(_task(tiny_model))
    state = trainable_state(model)
    assert set(state) >= {"head.weight", "head.bias"}
    assert sum(n.endswith("lora_A") for n in state) == 4  # 2 layers x (query, value)
    frozen, _ = build_classifier(_task(tiny_model, train_head=False))
    assert not any(n.startswith("head.") for n in trainable_state(frozen))
    # same seed -> same initial adapters everywhere (aggregator and clients agree)
    again, _ = build_classifier(_task(tiny_model))
    assert all(torch.equal(v, trainable_state(again)[k]) for k, v in state.items())


def test_eager_engine_trains_and_evaluates_without_side_effects(tiny_model: str) -> None:
    engine = make_engine("eager", _task(tiny_model), threads=1)
    enc = engine.tokenizer(["book a doctor", "block my card", "cancel the flight", "my grades"] * 2,
                           padding="max_length", max_length=8, truncation=True, return_tensors="pt")
    batch = Batch(enc["input_ids"], enc["attention_mask"], torch.tensor([0, 1, 2, 0] * 2))
    before, roles = engine.get_state({})
    assert roles["head.weight"] == "head" and set(roles) == set(before)
    assert set(engine.expected_state({})) == set(before)
    ev = engine.evaluate([batch])
    assert all(torch.equal(v, engine.get_state({})[0][k]) for k, v in before.items())
    assert ev.samples == 8 and 0 <= ev.accuracy <= 1
    stats = engine.train(iter([batch] * 40), steps=40, lr=0.05, weight_decay=0.0)
    assert stats.steps == 40 and stats.samples == 320
    assert engine.evaluate([batch]).loss < ev.loss
    engine.set_state(before, {})
    assert all(torch.equal(v, engine.get_state({})[0][k]) for k, v in before.items())
    assert engine.embeddings([batch], {}) == {}
    with pytest.raises(ConfigError, match="unknown engine"):
        make_engine("warp", _task(tiny_model))


def test_training_only_some_roles_leaves_the_others_untouched(tiny_model: str) -> None:
    engine = make_engine("eager", _task(tiny_model), threads=1)
    enc = engine.tokenizer(["book a doctor", "block my card"] * 4, padding="max_length", max_length=8,
                           truncation=True, return_tensors="pt")
    batch = Batch(enc["input_ids"], enc["attention_mask"], torch.tensor([0, 1] * 4))
    before, roles = engine.get_state({})
    engine.train(iter([batch] * 5), steps=5, lr=0.05, weight_decay=0.1, roles=["lora_B"])
    after, _ = engine.get_state({})
    for name, value in before.items():
        moved = not torch.equal(value, after[name])
        assert moved == (roles[name] == "lora_B"), name


def test_ffa_lora_trains_b_only_and_keeps_a_frozen() -> None:
    from aggregator.strategies import FFALoRA

    init = {"m.lora_A": torch.randn(2, 3), "m.lora_B": torch.zeros(4, 2), "head.weight": torch.zeros(2, 4)}
    roles = {"m.lora_A": "lora_A", "m.lora_B": "lora_B", "head.weight": "head"}
    ffa = FFALoRA(init, roles, TaskSpec(labels=["a", "b"]))
    plan = ffa.configure_train(1, ["x", "y"])
    assert set(plan.assignments["x"].tensors) == set(init)  # devices get A (to use it), send back only B, head
    assert set(plan.assignments["x"].expect) == {"m.lora_B", "head.weight"}
    assert plan.assignments["x"].body == {"train_roles": ["lora_B", "head"]}
    ffa.aggregate(1, plan, [ClientUpdate("x", 1, {"m.lora_B": torch.ones(4, 2), "head.weight": torch.ones(2, 4)}),
                            ClientUpdate("y", 3, {"m.lora_B": torch.zeros(4, 2), "head.weight": torch.ones(2, 4)})])
    state = ffa.model_for("x")
    assert torch.equal(state["m.lora_A"], init["m.lora_A"])
    assert torch.allclose(state["m.lora_B"], torch.full((4, 2), 0.25))


def test_flexlora_svd_reconstructs_the_averaged_product_at_full_rank() -> None:
    from aggregator.strategies import FlexLoRA
    from aggregator.strategies.flexlora import svd_redistribute
    from edgemole.adapters.lora import LoRAConfig as Lora

    gen = torch.Generator().manual_seed(0)
    W = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    B, A = svd_redistribute(W, 4, 2.0)
    assert torch.allclose(2.0 * B @ A, W, atol=1e-10)  # full rank: exact
    B1, A1 = svd_redistribute(W, 1, 2.0)
    S = torch.linalg.svdvals(W)
    assert torch.isclose(torch.linalg.matrix_norm(W - 2.0 * B1 @ A1), S[1:].norm())  # best rank-1 (Eckart-Young)
    task = TaskSpec(labels=["a", "b"], lora=Lora(r=2, alpha=4.0))
    init = {"m.lora_A": torch.randn(2, 3, generator=gen), "m.lora_B": torch.zeros(4, 2)}
    flex = FlexLoRA(init, {"m.lora_A": "lora_A", "m.lora_B": "lora_B"}, task)
    plan = flex.configure_train(1, ["x", "y"])
    ups = [ClientUpdate(c, n, {"m.lora_A": torch.randn(2, 3, generator=gen),
                               "m.lora_B": torch.randn(4, 2, generator=gen)}) for c, n in (("x", 1), ("y", 3))]
    flex.aggregate(1, plan, ups)
    avg = sum(w * 2.0 * u.tensors["m.lora_B"] @ u.tensors["m.lora_A"] for w, u in zip((0.25, 0.75), ups, strict=True))
    got = flex.model_for("x")
    # the average of two rank-2 products has rank up to 3 > r = 2: the result is its best rank-2 approximation
    approx = 2.0 * got["m.lora_B"] @ got["m.lora_A"]
    assert torch.isclose(torch.linalg.matrix_norm(avg - approx), torch.linalg.svdvals(avg)[2:].norm(), atol=1e-5)
