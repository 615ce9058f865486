"""The aggregator service: announces rounds, sends assignments, collects validated updates, aggregates.

Everything inbound passes the protocol validator before it touches state; a rejected message only
increments a counter and logs one line, so a hostile or broken device cannot stop a round. A round
ends when every selected client answered, or at its deadline once a quorum answered.
"""

from __future__ import annotations

import json
import logging
import math
import random
import statistics
import time
import uuid
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from aggregator.checkpoint import load_checkpoint, save_checkpoint
from aggregator.strategies import ClientUpdate, RoundPlan, Strategy, strategy_class
from edgemole.config import FleetConfig, TaskSpec
from edgemole.errors import EdgemoleError, ProtocolError
from edgemole.model import WireState, build_classifier
from edgemole.mqtt import Inbound, Link, MqttLink
from edgemole.protocol import DONE, Kind, Message, Topics, decode, encode, validate_update

log = logging.getLogger("edgemole.aggregator")

#: status states in which a client is considered reachable
LIVE_STATES = ("online", "ready")


class RoundFailed(EdgemoleError):
    """Too few clients answered a round even after its grace period."""


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.pstdev(values) if len(values) > 1 else 0.0)


class AggregatorService:
    """Runs ``fleet.rounds`` rounds of ``fleet.method`` over MQTT and returns the run summary."""

    def __init__(
        self,
        fleet: FleetConfig,
        task: TaskSpec,
        broker: str | None = None,
        *,
        link: Link | None = None,
        checkpoint_dir: str | Path | None = None,
        resume: bool = False,
        summary_path: str | Path | None = None,
        connect_timeout_s: float = 30.0,
    ) -> None:
        self.fleet = fleet
        self.task = task
        self.topics = Topics(fleet.fleet, fleet.topic_prefix)
        self.strategy_cls = strategy_class(fleet.method)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.resume = resume
        self.summary_path = Path(summary_path) if summary_path else None
        self.connect_timeout_s = connect_timeout_s
        self.run_id = uuid.uuid4().hex[:12]
        self.status: dict[str, dict[str, Any]] = {}
        self.rejected: Counter[str] = Counter()
        self.rng = random.Random(fleet.seed)
        if link is None and broker is None:
            raise ValueError("AggregatorService needs a broker URL or a link")
        #: the transport: MQTT, or the in-memory link of ``edgemole bench``
        self.link: Link = link or MqttLink(broker or "", self.topics.mqtt_client_id("aggregator"), clean_session=False)
        #: the run's strategy once :meth:`run` built it (the bench evaluates its models after the run)
        self.strategy: Strategy | None = None
        self.records: list[dict[str, Any]] = []
        # filled while a round is open
        self._open: tuple[int, str, RoundPlan] | None = None
        self._updates: dict[str, ClientUpdate] = {}
        self._bytes_up = 0

    # -- inbound -------------------------------------------------------------------------------
    def _reject(self, reason: str, detail: str) -> None:
        self.rejected[reason] += 1
        log.warning("rejected %s: %s (%s rejected so far)", reason, detail, sum(self.rejected.values()))

    def _handle(self, inbound: Inbound) -> None:
        parsed = self.topics.parse_client_topic(inbound.topic)
        if parsed is None or not inbound.payload:
            return
        client, kind = parsed
        if kind == "status":
            self._on_status(client, inbound.payload)
        elif kind == "update":
            self._on_update(client, inbound.payload)

    def _on_status(self, client: str, payload: bytes) -> None:
        try:
            msg = decode(payload, self.fleet.max_message_bytes)
            if msg.kind != Kind.STATUS or msg.client != client or msg.fleet != self.fleet.fleet:
                raise ProtocolError("not a status message of this client and fleet")
            if msg.body.get("state") not in (*LIVE_STATES, "offline", "error"):
                raise ProtocolError(f"unknown state {msg.body.get('state')!r}")
        except ProtocolError as exc:
            self._reject("status", f"from {client}: {exc}")
            return
        self.status[client] = msg.body
        if msg.body["state"] == "error":
            log.warning("client %s reports an error: %s", client, msg.body.get("error", ""))

    def _on_update(self, client: str, payload: bytes) -> None:
        if self._open is None:
            self._reject("update", f"from {client} while no round is open")
            return
        rnd, phase, plan = self._open
        try:
            msg = decode(payload, self.fleet.max_message_bytes)
            assignment = plan.assignments.get(client)
            validate_update(
                msg,
                fleet=self.fleet.fleet,
                run=self.run_id,
                round=rnd,
                phase=phase,
                topic_client=client,
                selected=plan.assignments.keys(),
                expected=assignment.expect if assignment else {},
            )
            if client in self._updates:
                raise ProtocolError(f"duplicate update from {client} in round {rnd}")
        except ProtocolError as exc:
            self._reject("update", f"from {client}: {exc}")
            return
        self._updates[client] = ClientUpdate(client, msg.body["num_samples"], msg.tensors,
                                             dict(msg.body.get("metrics", {})))
        self._updates[client].metrics["bytes_up"] = len(payload)
        self._updates[client].metrics["params_up"] = sum(t.numel() for t in msg.tensors.values())
        self._bytes_up += len(payload)

    def _pump(self, timeout_s: float) -> None:
        """Handle inbound messages for up to ``timeout_s`` seconds."""
        end = time.monotonic() + timeout_s
        while True:
            inbound = self.link.receive(max(0.0, end - time.monotonic()))
            if inbound is None:
                return
            self._handle(inbound)
            if time.monotonic() >= end:
                return

    def ready_clients(self) -> list[str]:
        return sorted(c for c, s in self.status.items() if s.get("state") == "ready" and s.get("run") == self.run_id)

    def _live(self, client: str) -> bool:
        return self.status.get(client, {}).get("state") in LIVE_STATES

    # -- rounds --------------------------------------------------------------------------------
    def _wait_for_clients(self, needed: int) -> None:
        deadline = time.monotonic() + self.fleet.wait_clients_s
        while len(self.ready_clients()) < needed:
            if time.monotonic() > deadline:
                raise EdgemoleError(
                    f"only {len(self.ready_clients())} of the required {needed} clients were "
                    f"ready within {self.fleet.wait_clients_s:.0f} s"
                )
            self._pump(0.5)

    def _select(self, at_least: int) -> list[str]:
        ready = self.ready_clients()
        k = max(at_least, math.ceil(self.fleet.clients_per_round * len(ready)))
        return sorted(self.rng.sample(ready, k)) if k < len(ready) else ready

    def _announce(self, rnd: int, phase: str, selected: list[str], deadline_s: float,
                  hparams: dict[str, Any]) -> None:
        body = {"run": self.run_id, "deadline_unix": time.time() + deadline_s, "selected": selected,
                "hparams": hparams, "rounds": self.fleet.rounds}
        self.link.publish(self.topics.round, encode(Message(Kind.ROUND, self.fleet.fleet, rnd, phase, body=body)),
                          retain=True)

    def run_round(self, strategy: Strategy, rnd: int, evaluate: bool = False) -> dict[str, Any]:
        """One round: announce, assign, collect until done or deadline + quorum, aggregate."""
        started = time.monotonic()
        self._pump(0.0)
        selected = self.ready_clients() if evaluate else self._select(strategy.min_clients)
        if not selected:
            raise RoundFailed(f"round {rnd}: no ready client to select")
        plan = strategy.configure_evaluate(selected) if evaluate else strategy.configure_train(rnd, selected)
        self._announce(rnd, plan.phase, selected, self.fleet.round_deadline_s, plan.hparams)
        self._open, self._updates, self._bytes_up = (rnd, plan.phase, plan), {}, 0
        bytes_down = params_down = 0
        for client, assignment in plan.assignments.items():
            body = {"run": self.run_id, **plan.hparams, **assignment.body}
            payload = encode(Message(Kind.ASSIGN, self.fleet.fleet, rnd, plan.phase, client, body,
                                     assignment.tensors, {k: strategy.roles.get(k, "") for k in assignment.tensors}))
            bytes_down += self.link.publish(self.topics.assign(client), payload)
            params_down += sum(t.numel() for t in assignment.tensors.values())
        quorum = max(1, math.ceil(self.fleet.quorum * len(selected)))
        deadline = started + self.fleet.round_deadline_s
        hard_deadline = deadline + self.fleet.round_deadline_s
        while True:
            pending = [c for c in selected if c not in self._updates]
            answered = len(self._updates)
            if not pending:
                break
            now = time.monotonic()
            if answered >= quorum and (now >= deadline or not any(self._live(c) for c in pending)):
                log.info("round %d: closing with %d/%d answers (missing: %s)", rnd, answered, len(selected),
                         ", ".join(pending))
                break
            if now >= hard_deadline:
                self._open = None
                raise RoundFailed(f"round {rnd} failed: {answered} of {len(selected)} selected clients "
                                  f"answered by the deadline (quorum {quorum})")
            self._pump(min(0.5, max(0.01, (deadline if answered >= quorum else hard_deadline) - now)))
        self._open = None
        updates = [self._updates[c] for c in selected if c in self._updates]
        t0 = time.perf_counter()
        extra = {} if evaluate else strategy.aggregate(rnd, plan, updates)
        aggregate_s = time.perf_counter() - t0
        return self._record(rnd, plan.phase, selected, updates, (bytes_down, params_down), aggregate_s,
                            time.monotonic() - started, {**plan.info, **extra})

    def _record(self, rnd: int, phase: str, selected: list[str], updates: list[ClientUpdate],
                down: tuple[int, int], aggregate_s: float, wall_s: float, extra: dict[str, Any]) -> dict[str, Any]:
        """The round's record; ``down`` is what the assignments carried: (payload bytes, tensor elements)."""
        def stat(key: str) -> tuple[float | None, float | None]:
            return _mean_std([u.metrics[key] for u in updates if key in u.metrics])

        acc_before, acc_before_std = stat("acc_before")
        acc_after, acc_after_std = stat("acc_after")
        loss, _ = stat("train_loss")
        return {
            "round": rnd,
            "phase": phase,
            "selected": selected,
            "answered": [u.client for u in updates],
            "accuracy_before": acc_before,
            "accuracy_before_std": acc_before_std,
            "accuracy_after_local": acc_after,
            "accuracy_after_local_std": acc_after_std,
            "train_loss": loss,
            "bytes_up": self._bytes_up,
            "params_up": sum(u.metrics.get("params_up", 0) for u in updates),
            "bytes_down": down[0],
            "params_down": down[1],
            "train_s_max": max((u.metrics.get("train_s", 0.0) for u in updates), default=0.0),
            "client_compute_s_max": max(
                (u.metrics.get("train_s", 0.0) + u.metrics.get("eval_s", 0.0) for u in updates), default=0.0
            ),
            "aggregate_s": aggregate_s,
            "wall_s": wall_s,
            "rejected_total": sum(self.rejected.values()),
            "clients": {u.client: {"num_samples": u.num_samples, **u.metrics} for u in updates},
            **extra,
        }

    # -- whole run -----------------------------------------------------------------------------
    def _build_strategy(self) -> tuple[Strategy, int]:
        model, _ = build_classifier(self.task)
        strategy = self.strategy_cls(*WireState.of_model(model, self.task).initial_fleet_state(), self.task)
        del model
        start = 1
        if self.resume and self.checkpoint_dir:
            found = load_checkpoint(self.checkpoint_dir, method=self.fleet.method)
            if found is not None:
                state, _, done_round = found
                try:
                    strategy.load_state_dict(state)
                except ValueError as exc:
                    raise EdgemoleError(f"cannot resume from '{self.checkpoint_dir}': {exc}") from None
                start = done_round + 1
                log.info("resuming after round %d from %s", done_round, self.checkpoint_dir)
        return strategy, start

    def _emit(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        self.link.publish(self.topics.metrics, encode(Message(Kind.METRICS, self.fleet.fleet, record["round"],
                                                              record["phase"], body=record)))

    def run(self) -> dict[str, Any]:
        started = time.monotonic()
        strategy, first = self._build_strategy()
        self.strategy = strategy
        self.link.connect(self.connect_timeout_s)
        self.link.subscribe(self.topics.all_status, self.topics.all_updates)
        task_body = {"run": self.run_id, "task": self.task.to_body()}
        self.link.publish(self.topics.task, encode(Message(Kind.TASK, self.fleet.fleet, body=task_body)),
                          retain=True)
        needed = max(self.fleet.min_clients, strategy.min_clients)
        log.info("run %s: method %s, %d rounds, waiting for %d client(s)", self.run_id, self.fleet.method,
                 self.fleet.rounds, needed)
        try:
            self._wait_for_clients(needed)
            for rnd in range(first, self.fleet.rounds + 1):
                record = self.run_round(strategy, rnd)
                log.info("round %d: %d/%d answered, acc %.3f -> %.3f, up %d B, down %d B", rnd,
                         len(record["answered"]), len(record["selected"]), record["accuracy_before"] or 0.0,
                         record["accuracy_after_local"] or 0.0, record["bytes_up"], record["bytes_down"])
                self._emit(record)
                if self.checkpoint_dir:
                    save_checkpoint(self.checkpoint_dir, strategy.state_dict(), method=self.fleet.method,
                                    run=self.run_id, round_=rnd)
            final = self.run_round(strategy, self.fleet.rounds + 1, evaluate=True)
            self._emit(final)
            self._announce(self.fleet.rounds + 1, DONE, [], 0.0, {})
        finally:
            self.link.close()
        summary = self._summary(final, time.monotonic() - started)
        if self.summary_path:
            self.summary_path.write_text(json.dumps(summary, indent=2))
        return summary

    def _summary(self, final: dict[str, Any], wall_s: float) -> dict[str, Any]:
        train_rounds = [r for r in self.records if r["phase"] != "eval"]
        return {
            "run": self.run_id,
            "method": self.fleet.method,
            "fleet": asdict(self.fleet),
            "task": {**self.task.to_body(), "labels": len(self.task.labels)},
            "rounds": train_rounds,
            "final": final,
            "final_personalised_accuracy": final["accuracy_before"],
            "final_personalised_accuracy_std": final["accuracy_before_std"],
            "accuracy_curve": [r["accuracy_before"] for r in train_rounds] + [final["accuracy_before"]],
            "bytes_up_total": sum(r["bytes_up"] for r in self.records),
            "bytes_down_total": sum(r["bytes_down"] for r in self.records),
            "params_up_total": sum(r["params_up"] for r in self.records),
            "params_down_total": sum(r["params_down"] for r in self.records),
            "aggregate_s_total": sum(r["aggregate_s"] for r in self.records),
            "rounds_wall_s_total": sum(r["wall_s"] for r in self.records),
            "rejected": dict(self.rejected),
            "aggregator_wall_s": wall_s,
        }
