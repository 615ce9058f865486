"""Writing an artifact folder (format in :mod:`edgemole.artifact`): program, base weights, tokenizer, manifest.

Files are written into a temporary folder next to ``out`` and moved into place only when everything succeeded,
so a failed export never leaves a half-written artifact or overwrites a good one.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from edgemole import __version__
from edgemole.adapters.amole.model import amole_layers
from edgemole.artifact import (
    DATA_FILE,
    MANIFEST_FILE,
    METHOD,
    ONNX_FILE,
    PREDICT_METHOD,
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
from edgemole.model import WireState, build_classifier, parameter_roles
from export.causal import build_causal_lm, export_causal_lm
from export.onnx import write_onnx
from export.program import export_classifier, export_inference, lower


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not force and any(out.iterdir()):
        raise ArtifactError(f"{out} exists and is not empty (give --force to replace it)")


def _lowered(export: Callable[[], torch.export.ExportedProgram | dict[str, torch.export.ExportedProgram]],
             xnnpack: bool):  # noqa: ANN202
    with warnings.catch_warnings():  # torch.export's and ExecuTorch's internal deprecation notices
        warnings.simplefilter("ignore")
        return lower(export(), xnnpack=xnnpack)


def _write_folder(out: Path, program: object, tokenizer: object | None,
                  finish: Callable[[Path], dict[str, Any]], **fields: Any) -> Manifest:
    """Write program, base weights and tokenizer into a staging folder, let ``finish`` add its files (returning
    manifest fields), write the manifest, then move the folder into place."""
    from importlib.metadata import version

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
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging / TOKENIZER_DIR))
        extra = finish(staging)
        manifest = Manifest(
            **fields, **extra, program=file_entry(staging / PROGRAM_FILE), data=file_entry(staging / DATA_FILE),
            tokenizer=sorted(p.name for p in (staging / TOKENIZER_DIR).iterdir()) if tokenizer is not None else [],
            versions={"edgemole": __version__, "executorch": version("executorch"), "torch": torch.__version__})
        (staging / MANIFEST_FILE).write_text(manifest.to_json())
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _tensor_entries(params: dict[str, torch.Tensor], experts: bool) -> list[TensorEntry]:
    roles = parameter_roles(params, experts)
    return [TensorEntry(PREFIX + n, n, tuple(p.shape), roles[n]) for n, p in params.items()]


def write_artifact(task: TaskSpec, out: Path, batch_size: int | None = None, xnnpack: bool = True,
                   force: bool = False) -> Manifest:
    """Export the classification task's trainable program (and its ONNX inference model) to ``out``."""
    out = Path(out)
    _check_out(out, force)
    model, tokenizer = build_classifier(task)
    wire = WireState.of_model(model, task)
    shape = ProgramShape(batch_size or task.train.batch_size, task.model.max_length,
                         task.amole.slots if task.uses_experts else 0, tuple(wire.layers))
    program = _lowered(lambda: {METHOD: export_classifier(model, task, shape),
                                PREDICT_METHOD: export_inference(model, task, shape, wire.params)}, xnnpack)

    def onnx(staging: Path) -> dict[str, Any]:
        names = write_onnx(model, task, wire.params, staging / ONNX_FILE, shape.batch_size, shape.max_length)
        return {"onnx": file_entry(staging / ONNX_FILE), "onnx_inputs": names,
                "predict_method": PREDICT_METHOD, "predict_inputs": [PREFIX + n for n in wire.params]}

    return _write_folder(out, program, tokenizer, onnx, model=task.model.name, task="classify",
                         adapter=adapter_kind(task), num_labels=len(task.labels), config=program_config(task),
                         shape=shape, tensors=_tensor_entries(wire.params, bool(wire.layers)), xnnpack=xnnpack)


def write_causal_artifact(task: TaskSpec, out: Path, batch_size: int | None = None, xnnpack: bool = True,
                          force: bool = False) -> Manifest:
    """Export a causal LM's trainable program (next-token loss on the response tokens) to ``out``; the task
    gives model, adapters and shapes (its labels are not used)."""
    out = Path(out)
    _check_out(out, force)
    lm, tokenizer = build_causal_lm(task)
    params = {n: p for n, p in lm.named_parameters() if p.requires_grad}
    layers = amole_layers(lm) if task.uses_experts else {}
    shape = ProgramShape(batch_size or task.train.batch_size, task.model.max_length,
                         task.amole.slots if layers else 0, tuple(layers))
    program = _lowered(lambda: export_causal_lm(lm, task, shape), xnnpack)
    return _write_folder(out, program, tokenizer, lambda staging: {}, model=task.model.name, task="causal-lm",
                         adapter=adapter_kind(task), num_labels=0, config=program_config(task), shape=shape,
                         tensors=_tensor_entries(params, bool(layers)), xnnpack=xnnpack)
