"""The ExecuTorch artifact and engine: manifest, parity with the eager engine, bad artifacts."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import TINY_AMOLE, tiny_task

from edge_client.alternating import train_alternating
from edge_client.engines import Batch
from edge_client.engines.eager import EagerEngine
from edge_client.engines.executorch import ExecuTorchEngine
from edgemole.adapters.lora.a2 import active_factor
from edgemole.artifact import DATA_FILE, MANIFEST_FILE, PREFIX, PROGRAM_FILE, read_manifest, verify_files
from edgemole.errors import ArtifactError
from edgemole.model import WireState, build_classifier

STEPS = 5


def _batches(seed: int = 2) -> Iterator[Batch]:
    """Batches of varying length with padded rows: what local data gives the engines."""
    g = torch.Generator().manual_seed(seed)
    while True:
        t = int(torch.randint(6, 17, (1,), generator=g))
        mask = torch.ones(8, t, dtype=torch.long)
        mask[:3, t - 3:] = 0
        yield Batch(torch.randint(5, 900, (8, t), generator=g), mask, torch.randint(0, 4, (8,), generator=g))


def _engines(task, artifact: Path) -> tuple[EagerEngine, ExecuTorchEngine]:  # noqa: ANN001
    return EagerEngine(task, threads=1), ExecuTorchEngine(task, artifact, threads=1)


def _start(eager: EagerEngine, experts: bool) -> tuple[dict[str, torch.Tensor], dict]:
    """A shared random starting point (B != 0, so that every factor has gradients) and the assignment body."""
    body = {"experts": {m: [0, 1, 3] for m in eager.wire.layers}} if experts else {}
    full, _ = eager.wire.initial_fleet_state()
    spec = eager.expected_state(body)
    gen = torch.Generator().manual_seed(7)
    return {n: full[n] + 0.05 * torch.randn(full[n].shape, generator=gen) for n in spec}, body


def test_manifest_describes_the_program(tiny_model: str, tiny_artifacts: dict[str, Path]) -> None:
    for kind, method in (("lora", "fedit"), ("amole", "fedamole-a2")):
        directory = tiny_artifacts[kind]
        manifest = read_manifest(directory)
        verify_files(directory, manifest)
        task = tiny_task(tiny_model, method, TINY_AMOLE)
        model, _ = build_classifier(task)
        wire = WireState.of_model(model, task)
        roles = wire.parameter_roles()
        assert {t.name: (t.shape, t.role) for t in manifest.tensors} == {
            PREFIX + n: (tuple(p.shape), roles[n]) for n, p in wire.params.items()}
        assert manifest.adapter == kind and task.method in manifest.methods
        assert manifest.shape.batch_size == task.train.batch_size and manifest.shape.max_length == 16
        assert manifest.shape.amole_modules == tuple(wire.layers)
        # the frozen base lives in the .ptd; the program holds only the graph and the trainable tensors
        base = sum(p.numel() * 4 for n, p in model.named_parameters() if not p.requires_grad)
        assert manifest.data.bytes >= base > 4 * manifest.program.bytes
        engine = ExecuTorchEngine(task, directory, threads=1)  # loads, and checks the program against the manifest
        assert set(engine.wire.params) == set(wire.params)


@pytest.mark.parametrize("method, optimizer", [("fedit", "adamw"), ("fedamole", "adamw"), ("fedit", "sgd")])
def test_plain_training_matches_the_eager_engine(tiny_model: str, tiny_artifacts: dict[str, Path],
                                                 method: str, optimizer: str) -> None:
    """AdamW over the runtime's gradients, and the runtime's own SGD against PyTorch's, match the eager engine."""
    task = tiny_task(tiny_model, method, TINY_AMOLE, weight_decay=0.01, optimizer=optimizer)
    eager, et = _engines(task, tiny_artifacts["amole" if task.uses_experts else "lora"])
    state, body = _start(eager, task.uses_experts)
    for engine in (eager, et):
        engine.set_state(state, body)
    lr = 0.5 if optimizer == "sgd" else 0.01  # SGD moves the tensors visibly only with a large step
    a, b = eager.train(_batches(), STEPS, lr, 0.01), et.train(_batches(), STEPS, lr, 0.01)
    assert len(b.losses) == STEPS
    assert torch.allclose(torch.tensor(a.losses), torch.tensor(b.losses), rtol=1e-5, atol=1e-6)
    sa, sb = eager.get_state(body)[0], et.get_state(body)[0]
    for n in sa:
        assert torch.allclose(sa[n], sb[n], atol=2e-5), n
        assert not torch.equal(sa[n], state[n]), n  # every tensor moved
    batches = [next(_batches(5)) for _ in range(3)]
    ea, eb = eager.evaluate(batches), et.evaluate(batches)
    assert ea.samples == eb.samples == 24 and ea.accuracy == eb.accuracy
    assert abs(ea.loss - eb.loss) < 1e-5
    if task.uses_experts:
        ma, mb = eager.embeddings(batches, body), et.embeddings(batches, body)
        assert set(ma) == set(mb) and all(torch.allclose(ma[k], mb[k], atol=1e-5) for k in ma)


@pytest.mark.parametrize("method", ["lora-a2", "fedamole-a2"])
def test_alternating_rounds_match_the_eager_engine(tiny_model: str, tiny_artifacts: dict[str, Path],
                                                   method: str) -> None:
    """Both phases of a LoRA-A2 round (probe, rank selection, masked retraining) give the same upload."""
    task = tiny_task(tiny_model, method, TINY_AMOLE, weight_decay=0.01)
    eager, et = _engines(task, tiny_artifacts["amole" if task.uses_experts else "lora"])
    state, body = _start(eager, task.uses_experts)
    for phase in ("train-B", "train-A"):
        roles = [active_factor(phase), "head"] + (["router"] if task.uses_experts and phase == "train-A" else [])
        results = []
        for engine in (eager, et):
            engine.set_state(state, body)
            results.append(train_alternating(engine, body, phase, _batches, task, STEPS, 1, roles))
        a, b = results
        assert a.selection == b.selection
        assert torch.allclose(torch.tensor(a.stats.losses), torch.tensor(b.stats.losses), rtol=1e-5, atol=1e-6)
        assert set(a.tensors) == set(b.tensors) and a.roles == b.roles
        for n in a.tensors:
            assert torch.allclose(a.tensors[n].float(), b.tensors[n].float(), atol=2e-5), (phase, n)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite_manifest(directory: Path, **fields: object) -> None:
    path = directory / MANIFEST_FILE
    raw = json.loads(path.read_text())
    raw.update(fields)
    path.write_text(json.dumps(raw))


def _damage(kind: str, d: Path) -> None:
    if kind == "truncated base":
        data = (d / DATA_FILE).read_bytes()
        (d / DATA_FILE).write_bytes(data[: len(data) // 2])
    elif kind == "corrupt program":
        data = bytearray((d / PROGRAM_FILE).read_bytes())
        data[100:140] = b"\xff" * 40
        (d / PROGRAM_FILE).write_bytes(bytes(data))
    elif kind == "program not loadable":  # hashes updated, so the runtime itself must refuse it
        (d / PROGRAM_FILE).write_bytes(b"not a program" * 10)
        raw = json.loads((d / MANIFEST_FILE).read_text())
        from edgemole.artifact import file_entry

        raw["program"] = file_entry(d / PROGRAM_FILE).__dict__
        (d / MANIFEST_FILE).write_text(json.dumps(raw))
    elif kind == "other format version":
        _rewrite_manifest(d, format_version=99)
    elif kind == "not json":
        (d / MANIFEST_FILE).write_text("{broken")
    elif kind == "no manifest":
        (d / MANIFEST_FILE).unlink()
    elif kind == "base of another model":
        data = bytearray((d / DATA_FILE).read_bytes())
        data[-8:] = b"\x00" * 8
        (d / DATA_FILE).write_bytes(bytes(data))


@pytest.mark.parametrize("kind, message", [
    ("truncated base", "corrupt, truncated or from another export"),
    ("corrupt program", "corrupt, truncated or from another export"),
    ("base of another model", "corrupt, truncated or from another export"),
    ("program not loadable", "runtime cannot load the program"),
    ("other format version", "format version 99"),
    ("not json", "not valid JSON"),
    ("no manifest", "no manifest.json"),
])
def test_bad_artifacts_are_rejected_with_one_line(tiny_model: str, tiny_artifacts: dict[str, Path],
                                                  tmp_path: Path, kind: str, message: str) -> None:
    d = _copy(tiny_artifacts["lora"], tmp_path / "art")
    _damage(kind, d)
    with pytest.raises(ArtifactError, match=message) as err:
        ExecuTorchEngine(tiny_task(tiny_model), d)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("change, message", [
    ({"method": "fedamole"}, "serves fedit, ffa-lora, flexlora, lora-a2, not 'fedamole'"),
    ({"rank": 8}, "adapter settings"),
    ({"dropout": True}, "--no-dropout"),
    ({"max_length": 64}, "at most 16 tokens"),
    ({"labels": 3}, "labels"),
    ({"batch": 32}, "training batches of at most 8"),
])
def test_artifact_that_does_not_fit_the_task_is_refused(tiny_model: str, tiny_artifacts: dict[str, Path],
                                                        change: dict, message: str) -> None:
    task = tiny_task(tiny_model, change.get("method", "fedit"), TINY_AMOLE)
    if "rank" in change:
        task = dataclasses.replace(task, lora=dataclasses.replace(task.lora, r=change["rank"]))
    if "dropout" in change:
        task = dataclasses.replace(task, train=dataclasses.replace(task.train, dropout=True))
    if "max_length" in change:
        task = dataclasses.replace(task, model=dataclasses.replace(task.model, max_length=change["max_length"]))
    if "batch" in change:
        task = dataclasses.replace(task, train=dataclasses.replace(task.train, batch_size=change["batch"]))
    if "labels" in change:
        task = dataclasses.replace(task, labels=["a", "b", "c"])
    with pytest.raises(ArtifactError, match=message):
        ExecuTorchEngine(task, tiny_artifacts["lora"])


def test_export_never_overwrites_without_force(tiny_model: str, tmp_path: Path) -> None:
    from export.artifact import write_artifact

    out = tmp_path / "art"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="exists and is not empty"):
        write_artifact(tiny_task(tiny_model), out)
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("kind, method", [("lora", "fedit"), ("amole", "fedamole-a2")])
def test_onnx_inference_model_equals_the_eager_model(tiny_model: str, tiny_artifacts: dict[str, Path], kind: str,
                                                     method: str) -> None:
    """The ONNX model takes a device's adapters as inputs: fed a personalised state, onnxruntime gives the eager
    model's logits."""
    import onnxruntime as ort

    from export.onnx import onnx_input_name

    task = tiny_task(tiny_model, method, TINY_AMOLE)
    manifest = read_manifest(tiny_artifacts[kind])
    eager = EagerEngine(task, threads=1)
    state, body = _start(eager, task.uses_experts)
    if task.uses_experts:  # a device holding two of three slots
        body = {"experts": {m: [1, 2] for m in eager.wire.layers}}
        state = {n: state.get(n, torch.zeros(s.shape)) for n, s in eager.expected_state(body).items()}
    eager.set_state(state, body)
    batch = next(_batches(9))
    n, t = batch.input_ids.shape
    ids = torch.zeros(manifest.shape.batch_size, manifest.shape.max_length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    ids[:n, :t], mask[:n, :t] = batch.input_ids, batch.attention_mask
    eager.model.eval()
    with torch.no_grad():
        expected = eager.model(batch.input_ids, batch.attention_mask)
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    if task.uses_experts:
        feed["slot_mask"] = torch.stack([layer.active for layer in eager.wire.layers.values()]).numpy()
    feed.update({onnx_input_name(name): p.detach().numpy() for name, p in eager.wire.params.items()})
    session = ort.InferenceSession(str(tiny_artifacts[kind] / manifest.onnx.file))
    assert [i.name for i in session.get_inputs()] == manifest.onnx_inputs
    got = torch.from_numpy(session.run(None, feed)[0])[:n]
    assert torch.allclose(got, expected, atol=1e-4)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A randomly initialised 2-layer Llama-style decoder (no tokenizer: a bare config folder)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
                     ).save_pretrained(out)
    return str(out)


@pytest.mark.parametrize("method", ["lora-a2", "fedamole-a2"])
def test_causal_lm_program_trains_on_response_tokens_like_eager(tiny_llama: str, tmp_path: Path,
                                                                method: str) -> None:
    """Export through the CLI; the program's loss and gradients equal eager PyTorch's, and prompt tokens count
    for nothing."""
    from executorch.extension.pybindings.portable_lib import _load_for_executorch
    from executorch.extension.training import TrainingModule

    from export.causal import TrainableCausalLM, build_causal_lm
    from fleet.cli import main

    out = tmp_path / "lm"
    with pytest.raises(SystemExit) as exc:
        main(["export", "--task", "causal-lm", "--out", str(out), "--model", tiny_llama, "--method", method,
              "--max-length", "12", "--batch-size", "2", "--rank", "4", "--lora-alpha", "8", "--slots", "3",
              "--experts", "4"])
    assert exc.value.code == 0
    manifest = read_manifest(out)
    verify_files(out, manifest)
    assert manifest.task == "causal-lm" and manifest.num_labels == 0
    assert all(".q_proj." in t.name or ".v_proj." in t.name for t in manifest.tensors)
    task = tiny_task(tiny_llama, method, {"experts": 4, "slots": 3, "holders": 2, "top_k": 2})
    task = dataclasses.replace(task, model=dataclasses.replace(task.model, max_length=12),
                               lora=dataclasses.replace(task.lora, r=4), train=dataclasses.replace(task.train,
                                                                                                     batch_size=2))
    lm, _ = build_causal_lm(task)
    wrapper = TrainableCausalLM(lm, task)
    lm.eval()
    trainer = TrainingModule(_load_for_executorch(str(out / manifest.program.file), str(out / manifest.data.file)))
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 256, (2, 12), generator=g)
    labels = ids.clone()
    labels[:, :6] = -100  # the prompt
    inputs = (ids, torch.ones_like(ids), labels)
    if task.uses_experts:
        inputs += (torch.tensor([[True, True, False]] * len(wrapper.layers)),)
    got = trainer.forward_backward("forward", inputs)[0]
    params = trainer.named_parameters()
    with torch.no_grad():  # the program's (seeded) initial adapters, B made non-zero in both
        for name, p in lm.named_parameters():
            if p.requires_grad:
                p.copy_(params[PREFIX + name] + 0.01)
                params[PREFIX + name].copy_(p)
    got = trainer.forward_backward("forward", inputs)[0]
    expected = wrapper(*inputs)[0]
    expected.backward()
    assert torch.allclose(got, expected.detach(), atol=1e-5)
    grads = trainer.named_gradients()
    for name, p in lm.named_parameters():
        if p.requires_grad:
            assert torch.allclose(grads[PREFIX + name], p.grad, atol=1e-5, rtol=1e-4), name
    other = ids.clone()
    other[:, :5] = (ids[:, :5] + 1) % 256  # change prompt tokens that are never predicted...
    assert not torch.isclose(trainer.forward_backward("forward", (other, *inputs[1:]))[0], got)  # ...context moves
    labels2 = labels.clone()
    labels2[:, :6] = 0  # ...but labels of the prompt are ignored only when -100
    assert not torch.isclose(trainer.forward_backward("forward", (ids, inputs[1], labels2, *inputs[3:]))[0], got)


def test_assignment_that_does_not_fit_the_slots_is_rejected(tiny_model: str, tiny_artifacts: dict[str, Path]) -> None:
    from edgemole.errors import ProtocolError

    task = tiny_task(tiny_model, "fedamole-a2", TINY_AMOLE)
    et = ExecuTorchEngine(task, tiny_artifacts["amole"], threads=1)
    modules = list(et.wire.layers)
    with pytest.raises(ProtocolError, match="must be 1 to 3 distinct ids"):
        et.expected_state({"experts": {m: [0, 1, 2, 3] for m in modules}})  # 4 experts, 3 slots
    with pytest.raises(ProtocolError, match="exactly this model's AMoLE modules"):
        et.expected_state({"experts": {modules[0]: [0, 1]}})
    before = et.get_state({"experts": {m: [0, 1] for m in modules}})[0]
    assert all(torch.equal(v, et.get_state({"experts": {m: [0, 1] for m in modules}})[0][k]) for k, v in before.items())


@pytest.mark.parametrize("method", ["fedit", "fedamole-a2"])
def test_predict_method_gives_the_training_methods_logits(tiny_model: str, tiny_artifacts: dict[str, Path],
                                                          method: str) -> None:
    """The artifact's inference method, fed the training method's own parameter memory, predicts what the joint
    graph computes (after training moved the weights), without a backward pass."""
    task = tiny_task(tiny_model, method, TINY_AMOLE)
    directory = tiny_artifacts["amole" if task.uses_experts else "lora"]
    manifest = read_manifest(directory)
    assert manifest.predict_method == "predict"
    assert manifest.predict_inputs == [t.name for t in manifest.tensors]
    eager, et = _engines(task, directory)
    state, body = _start(eager, task.uses_experts)
    et.set_state(state, body)
    et.train(_batches(), 2, 0.01, 0.0)  # the inference method must see the trained weights
    for batch in [next(_batches(9)) for _ in range(2)]:
        trained = et._run(batch)[1][: len(batch.labels)]
        predicted = et._logits(batch)[: len(batch.labels)]
        assert torch.allclose(predicted, trained, atol=1e-5)
