"""ExecuTorch engine: trains with the exported program through the ExecuTorch runtime, as a phone or board does.

The runtime computes loss, logits and gradients (``forward_backward``); the optimizer runs on top of the gradients
and writes the new values straight into the program's parameter memory (the runtime hands out its own tensors), so
the next step sees them. AdamW here is PyTorch's, over those tensors, so both engines run the same optimizer; a
phone runs the same update rule over the same gradients. With ``train.optimizer = "sgd"`` the runtime's own SGD
(the one the Android API ships) steps instead. Alternating freeze and rank masks work as on the eager
engine: frozen roles get no optimizer step, masked entries are put back after each step.

Inputs have the program's fixed shapes: batches are cut into chunks of its batch size and padded (rows with label
:data:`~edgemole.artifact.IGNORE_LABEL` and an all-zero attention mask, columns with padding tokens), which changes
no loss, logit or gradient of the real rows.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F

from edge_client.engines.base import Batch, EvalStats, TrainingEngine, TrainStats, make_optimizer
from edgemole.adapters.amole.layer import AMoLELinear
from edgemole.adapters.amole.rsea import collect_embeddings
from edgemole.artifact import (
    IGNORE_LABEL,
    METHOD,
    PREFIX,
    TOKENIZER_DIR,
    Manifest,
    check_task,
    read_manifest,
    verify_files,
)
from edgemole.config import TaskSpec
from edgemole.errors import ArtifactError, first_line
from edgemole.model import WireState, set_torch_threads


class SlotView:
    """An AMoLE layer's trainable tensors inside the program, with :class:`AMoLELinear`'s attributes, so that
    the shared expert loading, state and RSEA code runs on them unchanged. ``active`` is this module's row of the
    program's slot-mask input."""

    # the RSEA accumulation is AMoLELinear's own (it only uses r, slots and _embed)
    start_embedding = AMoLELinear.start_embedding
    accumulate_embedding = AMoLELinear.accumulate_embedding
    finish_embedding = AMoLELinear.finish_embedding

    def __init__(self, params: Mapping[str, torch.Tensor], module: str, active: torch.Tensor) -> None:
        self.experts_A, self.experts_B = params[f"{module}.experts_A"], params[f"{module}.experts_B"]
        self.shared_A, self.shared_B = params[f"{module}.shared_A"], params[f"{module}.shared_B"]
        self.router, self.active = params[f"{module}.router"], active
        self.r = self.shared_A.shape[0]
        self._embed: list[torch.Tensor] | None = None

    @property
    def slots(self) -> int:
        return self.experts_A.shape[0]

    set_active = AMoLELinear.set_active


def load_training_module(directory: Path, manifest: Manifest):  # noqa: ANN201 (executorch TrainingModule)
    """The runtime's training module over the program and its external base weights."""
    from executorch.extension.pybindings.portable_lib import _load_for_executorch
    from executorch.extension.training import TrainingModule

    try:
        module = _load_for_executorch(str(directory / manifest.program.file), str(directory / manifest.data.file))
    except Exception as exc:  # the runtime raises RuntimeError/ValueError with multi-line texts
        first = first_line(exc)
        raise ArtifactError(f"{directory}: the ExecuTorch runtime cannot load the program: {first[:200]}") from None
    return TrainingModule(module)


class ExecuTorchEngine(TrainingEngine):
    """Trains the task's adapters with the artifact's ExecuTorch program (``edgemole export``)."""

    name = "executorch"

    def __init__(self, task: TaskSpec, artifact: Path, threads: int | None = None) -> None:
        from transformers import AutoTokenizer

        set_torch_threads(threads)
        self.task, self.directory = task, Path(artifact)
        self.manifest = read_manifest(self.directory)
        check_task(self.manifest, task)
        verify_files(self.directory, self.manifest)
        if threads:
            from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

            _unsafe_reset_threadpool(threads)
        self.module = load_training_module(self.directory, self.manifest)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.directory / TOKENIZER_DIR))
        shape = self.manifest.shape
        self.slot_mask = torch.ones(len(shape.amole_modules), shape.slots, dtype=torch.bool)
        blank = Batch(torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.long),
                      torch.zeros(1, dtype=torch.long))
        try:
            self._run(blank)  # the runtime hands out its parameter tensors after the first call
            named = self.module.named_parameters()
        except (RuntimeError, ValueError) as exc:  # a program the runtime loads lazily and then cannot run
            first = first_line(exc)
            raise ArtifactError(f"{self.directory}: the ExecuTorch runtime cannot load the program: "
                                f"{first[:200]}") from None
        expected = {t.name: t.shape for t in self.manifest.tensors}
        if {n: tuple(t.shape) for n, t in named.items()} != expected:
            raise ArtifactError(f"{self.directory}: the program's trainable tensors differ from its manifest")
        params = {n.removeprefix(PREFIX): t for n, t in named.items()}
        if self.manifest.predict_method and sorted(self.manifest.predict_inputs) != sorted(expected):
            raise ArtifactError(f"{self.directory}: the manifest's predict inputs differ from its tensors")
        #: the inference method's tensor inputs: the training method's own parameter memory, in its order
        self._predict_params = [named[n] for n in self.manifest.predict_inputs]
        layers = {m: SlotView(params, m, self.slot_mask[i]) for i, m in enumerate(shape.amole_modules)}
        self.wire = WireState(task, params, layers)

    # -- running the program ----------------------------------------------------------------------------
    def _inputs(self, batch: Batch) -> tuple[torch.Tensor, ...]:
        shape = self.manifest.shape
        n, t = batch.input_ids.shape
        if n > shape.batch_size or t > shape.max_length:
            raise ArtifactError(f"a batch of {n} x {t} does not fit the program's {shape.batch_size} x "
                                f"{shape.max_length}")
        pad_id = getattr(self.tokenizer, "pad_token_id", None) or 0
        ids = torch.full((shape.batch_size, shape.max_length), pad_id, dtype=torch.long)
        mask = torch.zeros(shape.batch_size, shape.max_length, dtype=torch.long)
        labels = torch.full((shape.batch_size,), IGNORE_LABEL, dtype=torch.long)
        ids[:n, :t], mask[:n, :t], labels[:n] = batch.input_ids, batch.attention_mask, batch.labels
        inputs = (ids, mask, labels)
        return (*inputs, self.slot_mask.clone()) if shape.amole_modules else inputs

    def _run(self, batch: Batch) -> list[torch.Tensor]:
        return self.module.forward_backward(METHOD, self._inputs(batch))

    def _logits(self, batch: Batch) -> torch.Tensor:
        """Logits of a chunk with the current weights: the program's inference method (no backward pass), or the
        training method's logits output for an artifact exported without one."""
        if not self.manifest.predict_method:
            return self._run(batch)[1]
        ids, mask, _, *slot_mask = self._inputs(batch)
        return self.module.model.run_method(self.manifest.predict_method, (ids, mask, *slot_mask,
                                                                           *self._predict_params))[0]

    def _chunks(self, batch: Batch) -> Iterator[Batch]:
        size = self.manifest.shape.batch_size
        for i in range(0, len(batch.labels), size):
            yield Batch(batch.input_ids[i:i + size], batch.attention_mask[i:i + size], batch.labels[i:i + size])

    # -- the engine interface ---------------------------------------------------------------------------
    @torch.no_grad()
    def embeddings(self, batches: Iterable[Batch], body: dict) -> dict[str, torch.Tensor]:
        if not self.wire.layers:
            return {}
        views = list(self.wire.layers.values())

        def run() -> None:
            for batch in batches:
                for chunk in self._chunks(batch):
                    _, _, token_sums, slot_sums, counts = self._run(chunk)
                    for i, view in enumerate(views):
                        view.accumulate_embedding(token_sums[i], slot_sums[i], counts[i])

        return collect_embeddings(self.wire.layers, self.wire.expert_sets(body), run)

    def train(self, batches: Iterator[Batch], steps: int, lr: float, weight_decay: float,
              roles: Collection[str] | None = None, *, role_lr: Mapping[str, float] | None = None,
              after_step: Callable[[], None] | None = None) -> TrainStats:
        param_roles = self.wire.parameter_roles()
        groups: dict[float, dict[str, torch.Tensor]] = {}
        for n, p in self.wire.params.items():
            if roles is None or param_roles[n] in roles:
                groups.setdefault(lr * (role_lr or {}).get(param_roles[n], 1.0), {})[PREFIX + n] = p
        trained = {name: p for group in groups.values() for name, p in group.items()}
        step = self._optimizer_step(groups, weight_decay)
        start, losses, samples = time.perf_counter(), [], 0
        for _ in range(steps):
            batch = next(batches)
            if len(batch.labels) > self.manifest.shape.batch_size:
                raise ArtifactError(f"training batches of {len(batch.labels)} exceed the program's batch size "
                                    f"{self.manifest.shape.batch_size}; export with --batch-size")
            loss = self._run(batch)[0]
            step({name: grad for name, grad in self.module.named_gradients().items() if name in trained})
            if after_step is not None:
                after_step()
            losses.append(float(loss))
            samples += len(batch.labels)
        return TrainStats(sum(losses) / steps, steps, samples, time.perf_counter() - start, losses)

    def _optimizer_step(self, groups: dict[float, dict[str, torch.Tensor]],
                        weight_decay: float) -> Callable[[dict[str, torch.Tensor]], None]:
        """One update of the program's parameters from named gradients: the runtime's own SGD (one per learning
        rate), or AdamW over the runtime's tensors (the eager engine's optimizer, :func:`make_optimizer`)."""
        if self.task.train.optimizer == "sgd":
            from executorch.extension.training import get_sgd_optimizer

            sgds = [(get_sgd_optimizer(group, group_lr, 0.0, 0.0, weight_decay, False), set(group))
                    for group_lr, group in groups.items()]

            def sgd_step(grads: dict[str, torch.Tensor]) -> None:
                for sgd, names in sgds:
                    sgd.step({n: g for n, g in grads.items() if n in names})

            return sgd_step
        optimizer = make_optimizer("adamw", {group_lr: list(group.values()) for group_lr, group in groups.items()},
                                   weight_decay)
        params = {name: p for group in groups.values() for name, p in group.items()}

        def adamw_step(grads: dict[str, torch.Tensor]) -> None:
            for name, grad in grads.items():
                params[name].grad = grad
            optimizer.step()
            for p in params.values():
                p.grad = None

        return adamw_step

    def evaluate(self, batches: Iterable[Batch]) -> EvalStats:
        start, loss_sum, correct, n = time.perf_counter(), 0.0, 0, 0
        for batch in batches:
            for chunk in self._chunks(batch):
                k = len(chunk.labels)
                logits = self._logits(chunk)[:k]
                loss_sum += float(F.cross_entropy(logits, chunk.labels, reduction="sum"))
                correct += int((logits.argmax(-1) == chunk.labels).sum())
                n += k
        if n == 0:
            return EvalStats(0.0, 0.0, 0, 0.0)
        return EvalStats(loss_sum / n, correct / n, n, time.perf_counter() - start)
