"""Writing an artifact folder (format in :mod:`edgemole.artifact`): program, base weights, tokenizer, manifest.

Files are written into a temporary folder next to ``out`` and moved into place only when everything succeeded,
so a failed export never leaves a half-written artifact or overwrites a good one.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path

from edgemole import __version__
from edgemole.artifact import (
    DATA_FILE,
    MANIFEST_FILE,
    ONNX_FILE,
    PREFIX,
    PROGRAM_FILE,
    TOKENIZER_DIR,
    Manifest,
    ProgramShape,
    TensorEntry,
    adapter_kind,
    file_entry,
    program_config,
)
from edgemole.config import TaskSpec
from edgemole.errors import ArtifactError
from edgemole.model import WireState, build_classifier
from export.onnx import write_onnx
from export.program import export_joint, lower


def write_artifact(task: TaskSpec, out: Path, batch_size: int | None = None, xnnpack: bool = True,
                   force: bool = False) -> Manifest:
    """Export the task's trainable program to ``out`` and return its manifest."""
    from importlib.metadata import version

    import torch

    out = Path(out)
    if out.exists() and not force and any(out.iterdir()):
        raise ArtifactError(f"{out} exists and is not empty (give --force to replace it)")
    model, tokenizer = build_classifier(task)
    wire = WireState.of_model(model, task)
    roles = wire.parameter_roles()
    tensors = [TensorEntry(PREFIX + n, n, tuple(p.shape), roles[n]) for n, p in wire.params.items()]
    shape = ProgramShape(batch_size or task.train.batch_size, task.model.max_length,
                         task.amole.slots if task.uses_experts else 0, tuple(wire.layers))
    with warnings.catch_warnings():  # torch.export's and ExecuTorch's internal deprecation notices
        warnings.simplefilter("ignore")
        program = lower(export_joint(model, task, shape), xnnpack=xnnpack)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (staging / PROGRAM_FILE).write_bytes(program.buffer)
        data_dir = staging / "data"
        data_dir.mkdir()
        program.write_tensor_data_to_file(str(data_dir))
        written = sorted(data_dir.glob("*.ptd"))
        if len(written) != 1:
            raise ArtifactError(f"expected one external weight file from ExecuTorch, got {[p.name for p in written]}")
        written[0].rename(staging / DATA_FILE)
        shutil.rmtree(data_dir)
        tokenizer.save_pretrained(str(staging / TOKENIZER_DIR))
        onnx_inputs = write_onnx(model, task, wire.params, staging / ONNX_FILE, shape.batch_size, shape.max_length)
        manifest = Manifest(
            model=task.model.name, task="classify", adapter=adapter_kind(task), num_labels=len(task.labels),
            config=program_config(task), shape=shape, program=file_entry(staging / PROGRAM_FILE),
            data=file_entry(staging / DATA_FILE), tensors=tensors,
            tokenizer=sorted(p.name for p in (staging / TOKENIZER_DIR).iterdir()), xnnpack=xnnpack,
            onnx=file_entry(staging / ONNX_FILE), onnx_inputs=onnx_inputs,
            versions={"edgemole": __version__, "executorch": version("executorch"), "torch": torch.__version__})
        (staging / MANIFEST_FILE).write_text(manifest.to_json())
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return manifest
