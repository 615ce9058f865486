"""ONNX inference model with the adapters as inputs: one file serves every device's personalised model.

A device (or a server answering for it) feeds its current adapter tensors next to the tokens, so a new round or a
new expert set needs no new export. The graph is checked against the eager model with onnxruntime before it is
written. Its inputs have the training program's fixed shapes (pad as for the program); dynamic batch and sequence
dimensions do not export yet (torch.export specialises them in the encoder).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

from edgemole.artifact import PREFIX
from edgemole.config import TaskSpec
from edgemole.errors import ArtifactError, first_line
from edgemole.model import SequenceClassifier
from export.program import InferenceClassifier

#: largest difference between onnxruntime's and the eager model's logits that passes the check
TOLERANCE = 1e-4


def onnx_input_name(param: str) -> str:
    """ONNX input name of a trainable tensor (graph input names stay plain identifiers)."""
    return (PREFIX + param).replace(".", "__")


def write_onnx(model: SequenceClassifier, task: TaskSpec, params: dict[str, torch.Tensor], out: Path,
               batch_size: int, max_length: int) -> list[str]:
    """Export, check against the eager model with onnxruntime, write ``out``; returns the input names."""
    import onnxruntime as ort

    model.eval()
    names = list(params)
    wrapper = InferenceClassifier(model, task, names)
    layers = wrapper.layers
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 5000, (batch_size, max_length), generator=gen)
    mask = torch.ones(batch_size, max_length, dtype=torch.long)
    mask[0, max_length // 2:] = 0
    extra = [torch.ones(len(layers), layers[0].slots, dtype=torch.bool)] if layers else []
    tensors = [p.detach().clone() + 0.01 * torch.randn(p.shape, generator=gen) for p in params.values()]
    inputs = (ids, mask, *extra, *tensors)
    input_names = ["input_ids", "attention_mask", *(["slot_mask"] if layers else []), *map(onnx_input_name, names)]
    # onnxscript's constant folding logs the folds it skips as warnings; they are not problems of the model
    logging.getLogger("onnxscript.optimizer._constant_folding").setLevel(logging.ERROR)
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(wrapper, inputs, dynamo=True, input_names=input_names,
                                        output_names=["logits"], verbose=False)
            program.save(str(out))
            expected = wrapper(*inputs)
    except Exception as exc:
        first = first_line(exc)
        raise ArtifactError(f"cannot export the ONNX inference model: {first[:300]}") from None
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    feed = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs, strict=True)}
    got = torch.from_numpy(session.run(None, feed)[0])
    diff = float((got - expected).abs().max())
    if diff > TOLERANCE:
        raise ArtifactError(f"the ONNX model's logits differ from the eager model's by {diff:.2e} "
                            f"(> {TOLERANCE:g})")
    return input_names
