"""Causal language models: the trainable program of a decoder (Llama-style) with LoRA or AMoLE adapters.

The loss is next-token cross-entropy on the response tokens only: the device gives prompt and padding tokens the
label :data:`~edgemole.artifact.IGNORE_LABEL`. The language-model head stays frozen (it is the embedding matrix in
many models), so only the adapters train. Fleets train classifiers today; this program is what a device runs once
instruction tuning arrives, and what the step benchmark measures for larger models.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from edgemole.adapters.amole.model import amole_layers, auxiliary_loss, inject_amole
from edgemole.adapters.lora import inject_lora
from edgemole.artifact import IGNORE_LABEL, ProgramShape
from edgemole.config import TaskSpec
from edgemole.errors import ModelError, first_line
from edgemole.model import resolve_model_source
from export.program import export_joint


class TrainableCausalLM(nn.Module):
    """``(input_ids, attention_mask, labels[, slot_mask]) -> (loss,)``: next-token cross-entropy over the tokens
    whose label is not ignored, plus the weighted load-balance loss with AMoLE."""

    def __init__(self, lm: nn.Module, task: TaskSpec) -> None:
        super().__init__()
        self.model = lm  # the attribute name is the program's tensor-name prefix (edgemole.artifact.PREFIX)
        self.layers = list(amole_layers(lm).values()) if task.uses_experts else []
        self.lb_weight = task.amole.load_balance_weight

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                slot_mask: torch.Tensor | None = None) -> tuple[torch.Tensor]:
        for i, layer in enumerate(self.layers):
            layer.slot_mask, layer.token_mask = slot_mask[i], attention_mask
        try:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=IGNORE_LABEL)
            if self.layers:
                loss = loss + self.lb_weight * auxiliary_loss(dict(enumerate(self.layers)))
            return (loss,)
        finally:
            for layer in self.layers:
                layer.slot_mask, layer.token_mask = None, None


def build_causal_lm(task: TaskSpec) -> tuple[nn.Module, object | None]:
    """The frozen decoder with the task's adapters on its target linears (default ``q_proj, v_proj`` when the
    task keeps the encoder default), and its tokenizer when the model folder has one."""
    import dataclasses

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    source = resolve_model_source(task.model.name)
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    try:
        lm = AutoModelForCausalLM.from_pretrained(source, local_files_only=offline)
    except (OSError, ValueError, KeyError) as exc:
        first = first_line(exc)
        raise ModelError(f"cannot load causal LM '{task.model.name}': {first[:200]}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=offline)
    except (OSError, ValueError, KeyError, TypeError):
        tokenizer = None  # a bare config folder (tests, benchmarks): the device brings its own tokenizer
    for p in lm.parameters():
        p.requires_grad_(False)
    lora = task.lora
    if tuple(lora.target_modules) == ("query", "value"):
        lora = dataclasses.replace(lora, target_modules=("q_proj", "v_proj"))
    with torch.random.fork_rng():
        torch.manual_seed(task.seed)
        if task.uses_experts:
            inject_amole(lm, lora, task.amole)
        else:
            inject_lora(lm, lora)
    return lm, tokenizer


def example_lm_inputs(shape: ProgramShape) -> tuple[torch.Tensor, ...]:
    ids = torch.ones(shape.batch_size, shape.max_length, dtype=torch.long)
    labels = ids.clone()
    labels[:, : shape.max_length // 2] = IGNORE_LABEL
    inputs = (ids, torch.ones_like(ids), labels)
    if shape.amole_modules:
        inputs += (torch.ones(len(shape.amole_modules), shape.slots, dtype=torch.bool),)
    return inputs


def export_causal_lm(lm: nn.Module, task: TaskSpec, shape: ProgramShape) -> torch.export.ExportedProgram:
    return export_joint(TrainableCausalLM(lm, task), lm, example_lm_inputs(shape), task.model.name)


__all__ = ["TrainableCausalLM", "build_causal_lm", "export_causal_lm", "example_lm_inputs"]
