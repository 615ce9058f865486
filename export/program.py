"""The trainable ExecuTorch program a device runs: model, task head and loss in one joint forward/backward graph.

Built from :func:`edgemole.model.build_classifier`, so the program's trainable tensors carry the model's parameter
names (behind :data:`edgemole.artifact.PREFIX`) and the wire mapping of :class:`edgemole.model.WireState` applies
unchanged.

What makes the program fast (DESIGN.md section 6): every ``nn.Linear`` is traced as ``matmul + add`` instead of
``addmm`` (ExecuTorch's optimized kernels have a fast ``mm`` but no fast ``addmm``); the matmuls are lowered to
XNNPACK with weights taken as runtime tensors (``force_non_static_weights_for_f32_linear``), which also covers the
backward's matmuls against activations, and so are the permutes, batched matmuls and element-wise ops that would
otherwise run on the portable reference kernels (:func:`xnnpack_configs`). The frozen base weights are program
constants and go to the ``.ptd`` file.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from edgemole.adapters.amole.model import amole_layers, auxiliary_loss
from edgemole.artifact import IGNORE_LABEL, ProgramShape
from edgemole.config import TaskSpec
from edgemole.errors import ModelError, first_line
from edgemole.model import SequenceClassifier


class TrainableClassifier(nn.Module):
    """``(input_ids, attention_mask, labels[, slot_mask]) -> (loss, logits[, token_sums, slot_sums, counts])``.

    Loss first (what ExecuTorch differentiates): the task's cross-entropy plus, for AMoLE, the weighted
    load-balance loss, exactly as the eager engine computes it. ``slot_mask`` (modules x slots, bool) replaces the
    layers' ``active`` buffers, so one program serves every expert assignment. The AMoLE outputs are the RSEA sums
    of the batch per module (W_t x summed over real tokens, every slot's A x, the token count).
    """

    def __init__(self, model: SequenceClassifier, task: TaskSpec) -> None:
        super().__init__()
        self.model = model
        self.layers = list(amole_layers(model).values()) if task.uses_experts else []
        self.lb_weight = task.amole.load_balance_weight

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                slot_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        for i, layer in enumerate(self.layers):
            layer.slot_mask, layer.emit_sums = slot_mask[i], True
        try:
            logits = self.model(input_ids, attention_mask)
            loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_LABEL)
            if not self.layers:
                return loss, logits.detach()
            loss = loss + self.lb_weight * auxiliary_loss(dict(enumerate(self.layers)))
            sums = [layer.batch_sums for layer in self.layers]
            return (loss, logits.detach(), torch.stack([s[0] for s in sums]), torch.stack([s[1] for s in sums]),
                    torch.stack([s[2] for s in sums]))
        finally:
            for layer in self.layers:
                layer.slot_mask, layer.emit_sums, layer.batch_sums = None, False, None


class InferenceClassifier(nn.Module):
    """``(input_ids, attention_mask[, slot_mask], *trainable tensors) -> logits``: the classifier for inference,
    with the adapters (and head) as inputs. The artifact's ``predict`` method and its ONNX model are this graph, so
    a device predicts with the weights it trains, passed from the training method's memory, with no backward pass
    and no state shared between the two methods (ExecuTorch shares mutable state between methods poorly)."""

    def __init__(self, model: SequenceClassifier, task: TaskSpec, names: list[str]) -> None:
        super().__init__()
        self.model, self.names = model, names
        self.layers = list(amole_layers(model).values()) if task.uses_experts else []

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
        slot_mask, tensors = (args[0], args[1:]) if self.layers else (None, args)
        for i, layer in enumerate(self.layers):
            layer.slot_mask = slot_mask[i]
        try:
            return torch.func.functional_call(self.model, dict(zip(self.names, tensors, strict=True)),
                                              (input_ids, attention_mask), strict=False)
        finally:
            for layer in self.layers:
                layer.slot_mask = None


def example_inputs(shape: ProgramShape) -> tuple[torch.Tensor, ...]:
    """Inputs of the program's shapes (values do not matter for export)."""
    ids = torch.ones(shape.batch_size, shape.max_length, dtype=torch.long)
    mask = torch.ones(shape.batch_size, shape.max_length, dtype=torch.long)
    labels = torch.zeros(shape.batch_size, dtype=torch.long)
    if not shape.amole_modules:
        return ids, mask, labels
    return ids, mask, labels, torch.ones(len(shape.amole_modules), shape.slots, dtype=torch.bool)


@contextlib.contextmanager
def linear_as_matmul(model: nn.Module) -> Iterator[None]:
    """Trace every ``nn.Linear`` as ``x @ W^T + b`` (mm + add in the graph, forward and backward) instead of
    ``addmm``, for which the runtime has only the slow reference kernel. Parameters keep their names."""
    def forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(x, self.weight.t())
        return y if self.bias is None else y + self.bias

    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    for m in linears:
        m.forward = types.MethodType(forward, m)
    try:
        yield
    finally:
        for m in linears:
            del m.forward


def prepare_for_export(backbone: nn.Module) -> None:
    """The export-time model: inference mode (no dropout: it would be frozen into the graph) and the attention
    written out in plain ops (the fused attention's backward has no ExecuTorch kernel)."""
    backbone.eval()
    if hasattr(backbone, "set_attn_implementation"):
        backbone.set_attn_implementation("eager")
    else:
        backbone.config._attn_implementation = "eager"


def contiguous_empties(gm: torch.fx.GraphModule) -> int:
    """Replace ``empty_permuted`` (an uninitialised buffer in a given physical layout, which some backward
    formulas allocate; the runtime has no kernel for it) by a plain ``empty``: ExecuTorch tensors are contiguous
    anyway, and the buffer is written before it is read. Returns how many were replaced."""
    count = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target == torch.ops.aten.empty_permuted.default:
            node.target = torch.ops.aten.empty.memory_format
            node.args = (node.args[0],)
            count += 1
    if count:
        gm.recompile()
    return count


def export_joint(wrapper: nn.Module, backbone: nn.Module, inputs: tuple[torch.Tensor, ...],
                 what: str) -> torch.export.ExportedProgram:
    """The joint forward/backward graph of a training wrapper (loss first; gradients of every trainable tensor)
    around ``backbone``, the pretrained model inside it."""
    from torch.export.experimental import _export_forward_backward

    prepare_for_export(backbone)
    try:
        with linear_as_matmul(wrapper):
            ep = torch.export.export(wrapper, inputs, strict=False)
        joint = _export_forward_backward(ep)
        contiguous_empties(joint.graph_module)
        return joint
    except Exception as exc:  # torch.export reports unsupported code in many exception types
        first = first_line(exc)
        raise ModelError(f"cannot export {what!r} for training: {first[:300]}") from None


def export_classifier(model: SequenceClassifier, task: TaskSpec, shape: ProgramShape) -> torch.export.ExportedProgram:
    """The classification training program: :class:`TrainableClassifier` at the program's input shapes."""
    model.eval()
    return export_joint(TrainableClassifier(model, task), model.backbone, example_inputs(shape), task.model.name)


def export_inference(model: SequenceClassifier, task: TaskSpec, shape: ProgramShape,
                     params: dict[str, torch.Tensor]) -> torch.export.ExportedProgram:
    """The inference graph (:class:`InferenceClassifier`) at the program's input shapes, the trainable tensors in
    the order of ``params`` (the program's ``predict`` method)."""
    model.eval()
    prepare_for_export(model.backbone)
    wrapper = InferenceClassifier(model, task, list(params))
    ids, mask, *rest = example_inputs(shape)
    slot_mask = rest[1:]  # example_inputs gives labels, then the slot mask for AMoLE
    inputs = (ids, mask, *slot_mask, *(p.detach().clone() for p in params.values()))
    try:
        with linear_as_matmul(wrapper), torch.no_grad():
            return torch.export.export(wrapper, inputs, strict=False)
    except Exception as exc:
        first = first_line(exc)
        raise ModelError(f"cannot export {task.model.name!r} for inference: {first[:300]}") from None


def xnnpack_configs() -> list[type]:
    """The operators given to XNNPACK, measured on a 2-layer MiniLM-sized BERT with AMoLE (fedamole-a2, 16 x 32,
    one thread; step time against eager in the same run): matmuls only 2.9x, + permute 1.9x, + bmm 1.6x,
    + add, mul, sub, div, gelu 1.3x, gradients equal to eager's in every case. Softmax cannot be added: XNNPACK
    refuses the joint graph's softmax output that the backward reads again ("pass through arguments")."""
    from executorch.backends.xnnpack.partition.config import gemm_configs as gemm
    from executorch.backends.xnnpack.partition.config import generic_node_configs as node

    return [gemm.AddmmConfig, gemm.MMConfig, gemm.LinearConfig, node.PermuteConfig, node.BMMConfig, node.AddConfig,
            node.MulConfig, node.SubConfig, node.DivConfig, node.GeluConfig]


def lower(methods: torch.export.ExportedProgram | dict[str, torch.export.ExportedProgram],
          xnnpack: bool = True):  # noqa: ANN201 (ExecutorchProgramManager)
    """Edge dialect, the operators of :func:`xnnpack_configs` to XNNPACK (matmul weights as runtime tensors),
    then the ExecuTorch program with its constants (the frozen base) tagged for the external ``.ptd``. ``methods``
    is one program (its method is ``forward``) or several by method name; constants they share (the frozen base of
    ``forward`` and ``predict``) are stored once."""
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge, to_edge_transform_and_lower

    config = EdgeCompileConfig(_check_ir_validity=False)
    try:
        if xnnpack:
            from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

            partitioner = XnnpackPartitioner(configs=xnnpack_configs(), force_non_static_weights_for_f32_linear=True)
            edge = to_edge_transform_and_lower(methods, partitioner=[partitioner], compile_config=config)
        else:
            edge = to_edge(methods, compile_config=config)
        return edge.to_executorch(ExecutorchBackendConfig(external_constants=True))
    except Exception as exc:
        first = first_line(exc)
        raise ModelError(f"cannot lower the training program to ExecuTorch: {first[:300]}") from None
