"""Eager PyTorch engine: the reference implementation of :class:`TrainingEngine`."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F

from edge_client.engines.base import Batch, EvalStats, TrainingEngine, TrainStats, make_optimizer
from edgemole.adapters.amole.rsea import collect_embeddings
from edgemole.config import TaskSpec
from edgemole.model import WireState, build_classifier, set_torch_threads


class EagerEngine(TrainingEngine):
    """Trains the task's LoRA adapters (and head) with AdamW in plain PyTorch."""

    name = "eager"

    def __init__(self, task: TaskSpec, threads: int | None = None) -> None:
        set_torch_threads(threads)
        self.task = task
        self.model, self.tokenizer = build_classifier(task)
        self.wire = WireState.of_model(self.model, task)

    @torch.no_grad()
    def embeddings(self, batches: Iterable[Batch], body: dict) -> dict[str, torch.Tensor]:
        if not self.wire.layers:
            return {}
        self.model.eval()

        def run() -> None:
            for batch in batches:
                self.model(batch.input_ids, batch.attention_mask)

        return collect_embeddings(self.wire.layers, self.wire.expert_sets(body), run)

    def train(self, batches: Iterator[Batch], steps: int, lr: float, weight_decay: float,
              roles: Collection[str] | None = None, *, role_lr: Mapping[str, float] | None = None,
              after_step: Callable[[], None] | None = None) -> TrainStats:
        param_roles = self.wire.parameter_roles()
        groups: dict[float, list[torch.nn.Parameter]] = {}
        for n, p in self.model.named_parameters():
            if p.requires_grad and (roles is None or param_roles[n] in roles):
                groups.setdefault(lr * (role_lr or {}).get(param_roles[n], 1.0), []).append(p)
        optimizer = make_optimizer(self.task.train.optimizer, groups, weight_decay)
        self.model.train(self.task.train.dropout)  # eval mode = no dropout; nothing else differs in training
        start, losses, samples = time.perf_counter(), [], 0
        for _ in range(steps):
            batch = next(batches)
            logits = self.model(batch.input_ids, batch.attention_mask)
            loss = F.cross_entropy(logits, batch.labels) + self.wire.auxiliary_loss()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if after_step is not None:
                after_step()
            losses.append(float(loss.detach()))
            samples += len(batch.labels)
        return TrainStats(sum(losses) / steps, steps, samples, time.perf_counter() - start, losses)

    @torch.no_grad()
    def evaluate(self, batches: Iterable[Batch]) -> EvalStats:
        self.model.eval()
        start, loss_sum, correct, n = time.perf_counter(), 0.0, 0, 0
        for batch in batches:
            logits = self.model(batch.input_ids, batch.attention_mask)
            loss_sum += float(F.cross_entropy(logits, batch.labels, reduction="sum"))
            correct += int((logits.argmax(-1) == batch.labels).sum())
            n += len(batch.labels)
        if n == 0:
            return EvalStats(0.0, 0.0, 0, 0.0)
        return EvalStats(loss_sum / n, correct / n, n, time.perf_counter() - start)
