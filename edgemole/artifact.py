"""The on-device artifact's format, shared by the exporter that writes it and the engine that trains with it.

An artifact is a folder::

    manifest.json   what is inside, with the sha256 of each file (this module's :class:`Manifest`)
    program.pte     the trainable ExecuTorch program (joint forward/backward, trainable tensors included)
    base.ptd        the frozen base weights, so that a new round or a new adapter never re-flashes the base
    inference.onnx  the classifier for inference, adapters as inputs (checked against onnxruntime at export)
    tokenizer/      the model's tokenizer files

Everything a device needs to check before it trains is in the manifest: the program's fixed input shapes, the
adapter configuration baked into the graph (and so which methods and tasks it can serve), and every trainable
tensor's name, shape and wire role.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgemole.config import EXPERT_METHODS, TaskSpec
from edgemole.errors import ArtifactError

FORMAT = "edgemole-artifact"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
PROGRAM_FILE = "program.pte"
DATA_FILE = "base.ptd"
ONNX_FILE = "inference.onnx"
TOKENIZER_DIR = "tokenizer"
#: prefix of the program's trainable tensor names: ``<PREFIX><model parameter name>``
PREFIX = "model."
#: the joint forward/backward method of the program
METHOD = "forward"
#: the inference method: logits from the inputs and the trainable tensors (in the manifest's ``predict_inputs``
#: order), with no backward pass
PREDICT_METHOD = "predict"
#: label of padding rows that fill a batch up to the program's fixed batch size (cross-entropy ignores it)
IGNORE_LABEL = -100
#: methods an artifact serves, by its adapter kind
LORA_METHODS = ("fedit", "ffa-lora", "flexlora", "lora-a2")


@dataclass(frozen=True)
class ProgramShape:
    """The fixed input shapes the program is exported for; smaller batches are padded up to them."""

    batch_size: int
    max_length: int
    slots: int = 0
    amole_modules: tuple[str, ...] = ()


@dataclass(frozen=True)
class TensorEntry:
    """One trainable tensor of the program: its name there, the model parameter it is, shape and role."""

    name: str
    param: str
    shape: tuple[int, ...]
    role: str


@dataclass(frozen=True)
class FileEntry:
    file: str
    sha256: str
    bytes: int


@dataclass
class Manifest:
    model: str
    task: str
    adapter: str
    num_labels: int
    config: dict[str, Any]
    shape: ProgramShape
    program: FileEntry
    data: FileEntry
    tensors: list[TensorEntry]
    tokenizer: list[str] = field(default_factory=list)
    #: the ONNX inference model (adapters as inputs) and its input names, in order
    onnx: FileEntry | None = None
    onnx_inputs: list[str] = field(default_factory=list)
    #: the program's inference method and the trainable tensors it takes after the token inputs, in order ("" and []
    #: in artifacts exported before it existed: evaluation then runs the training method)
    predict_method: str = ""
    predict_inputs: list[str] = field(default_factory=list)
    xnnpack: bool = True
    versions: dict[str, str] = field(default_factory=dict)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @property
    def methods(self) -> list[str]:
        return list(EXPERT_METHODS if self.adapter == "amole" else LORA_METHODS)

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "methods": self.methods}, indent=2) + "\n"


def adapter_kind(task: TaskSpec) -> str:
    return "amole" if task.uses_experts else "lora"


def program_config(task: TaskSpec) -> dict[str, Any]:
    """The task settings an exported program bakes into its graph; a task must match them to use it."""
    lora = task.lora
    out: dict[str, Any] = {"r": lora.r, "alpha": lora.alpha, "target_modules": list(lora.target_modules),
                           "train_head": lora.train_head}
    if task.uses_experts:
        out.update(slots=task.amole.slots, top_k=task.amole.top_k,
                   load_balance_weight=task.amole.load_balance_weight)
    return out


def file_entry(path: Path) -> FileEntry:
    data = path.read_bytes()
    return FileEntry(path.name, hashlib.sha256(data).hexdigest(), len(data))


def read_manifest(directory: Path) -> Manifest:
    """Parse and check ``manifest.json`` of an artifact folder (format, version, fields); one-line errors."""
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise ArtifactError(f"{directory}: no {MANIFEST_FILE} (not an artifact folder written by 'edgemole export')")
    try:
        raw = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not an edgemole artifact manifest (format {FORMAT!r} expected)")
    if raw.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: format version {raw.get('format_version')!r}, this edgemole reads "
                            f"{FORMAT_VERSION}; export the artifact again with this version")
    try:
        return Manifest(
            model=str(raw["model"]), task=str(raw["task"]), adapter=str(raw["adapter"]),
            num_labels=int(raw["num_labels"]), config=dict(raw["config"]),
            shape=ProgramShape(int(raw["shape"]["batch_size"]), int(raw["shape"]["max_length"]),
                               int(raw["shape"]["slots"]), tuple(raw["shape"]["amole_modules"])),
            program=FileEntry(**raw["program"]), data=FileEntry(**raw["data"]),
            tensors=[TensorEntry(t["name"], t["param"], tuple(t["shape"]), t["role"]) for t in raw["tensors"]],
            tokenizer=list(raw.get("tokenizer", [])), xnnpack=bool(raw.get("xnnpack", True)),
            onnx=FileEntry(**raw["onnx"]) if raw.get("onnx") else None, onnx_inputs=list(raw.get("onnx_inputs", [])),
            predict_method=str(raw.get("predict_method", "")), predict_inputs=list(raw.get("predict_inputs", [])),
            versions=dict(raw.get("versions", {})))
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{path}: missing or malformed field ({type(exc).__name__}: {exc})") from None


def verify_files(directory: Path, manifest: Manifest) -> None:
    """The program and base files exist and hash to what the manifest says (nothing truncated or swapped)."""
    for entry in (manifest.program, manifest.data):
        path = Path(directory) / entry.file
        if not path.is_file():
            raise ArtifactError(f"{path}: missing")
        got = file_entry(path)
        if got.bytes != entry.bytes or got.sha256 != entry.sha256:
            raise ArtifactError(f"{path}: {got.bytes} bytes with sha256 {got.sha256[:12]}..., the manifest says "
                                f"{entry.bytes} bytes, {entry.sha256[:12]}... (corrupt, truncated or from another "
                                "export)")


def check_task(manifest: Manifest, task: TaskSpec) -> None:
    """The task can run on this program: same base model, label count, baked adapter settings, a method the
    adapter kind serves, and sequences no longer than the program's."""
    if manifest.task != "classify":
        raise ArtifactError(f"the artifact is a {manifest.task} program; the fleet's task is classification")
    problems = []
    if manifest.model != task.model.name:
        problems.append(f"model {manifest.model!r}, the task's is {task.model.name!r}")
    if manifest.num_labels != len(task.labels):
        problems.append(f"{manifest.num_labels} labels, the task has {len(task.labels)}")
    if task.method not in manifest.methods:
        problems.append(f"a {manifest.adapter} program, which serves {', '.join(manifest.methods)}, not "
                        f"{task.method!r}")
    elif manifest.config != program_config(task):
        problems.append(f"adapter settings {manifest.config}, the task's are {program_config(task)}")
    if task.train.dropout:
        problems.append("no dropout, the task trains with dropout (run the fleet with --no-dropout, "
                        "train.dropout = false)")
    if task.train.batch_size > manifest.shape.batch_size:
        problems.append(f"training batches of at most {manifest.shape.batch_size}, the task's are "
                        f"{task.train.batch_size} (export with --batch-size)")
    if task.model.max_length > manifest.shape.max_length:
        problems.append(f"sequences of at most {manifest.shape.max_length} tokens, the task's are "
                        f"{task.model.max_length}")
    if problems:
        raise ArtifactError("the artifact does not fit the task: it has " + "; ".join(problems))
