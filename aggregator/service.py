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
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from aggregator.bounds import clip_to_bound, norm_violations, samples_violation, value_violation
from aggregator.checkpoint import DEFAULT_KEEP, load_for_resume, remove_stale_temporaries, save_checkpoint, task_hash
from aggregator.strategies import ClientUpdate, RoundPlan, Strategy, strategy_class
from edgemole.adapters.amole.model import EMBEDDING_ROLE
from edgemole.config import FleetConfig, TaskSpec
from edgemole.errors import EdgemoleError, ProtocolError
from edgemole.model import WireState, build_classifier
from edgemole.mqtt import RECONNECTED, BrokerCredentials, Inbound, Link, MqttLink, packet_limit
from edgemole.protocol import DONE, Kind, Message, Topics, decode, encode, validate_update
from edgemole.protocol.delta import (
    CAPABILITY,
    MODEL,
    DownloadRecord,
    Version,
    parse_initial,
    state_digest,
    versions_of,
)
from edgemole.protocol.messages import json_safe
from edgemole.protocol.validate import check_status_fields

log = logging.getLogger("edgemole.aggregator")

#: status states in which a client is considered reachable
LIVE_STATES = ("online", "ready")


class RoundFailed(EdgemoleError):
    """Too few clients answered a round even after its grace period."""


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and population std, None where undefined or where the devices' (finite) values overflow them."""
    if not values:
        return None, None
    try:
        return _finite(statistics.fmean(values)), _finite(statistics.pstdev(values) if len(values) > 1 else 0.0)
    except (OverflowError, ValueError):
        return None, None


def deployed_accuracy(metrics: dict[str, Any]) -> float:
    """A device's accuracy on the model it serves (docs/deployed-model.md): ``acc_deployed``, which both clients
    report; a record without it (an older client or run) counts as deploying what it received, ``acc_before``."""
    return metrics.get("acc_deployed", metrics["acc_before"])


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


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
        keep_checkpoints: int = DEFAULT_KEEP,
        credentials: BrokerCredentials | None = None,
    ) -> None:
        self.fleet = fleet
        self.task = task
        self.topics = Topics(fleet.fleet, fleet.topic_prefix)
        self.strategy_cls = strategy_class(fleet.method)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.resume = resume
        self.keep_checkpoints = keep_checkpoints
        if resume and self.checkpoint_dir is None:
            raise EdgemoleError("--resume needs --checkpoint-dir (the folder of the run to continue)")
        self.summary_path = Path(summary_path) if summary_path else None
        self.connect_timeout_s = connect_timeout_s
        self.run_id = uuid.uuid4().hex[:12]
        self.status: dict[str, dict[str, Any]] = {}
        self.rejected: Counter[str] = Counter()
        self.rng = random.Random(fleet.seed)
        if link is None and broker is None:
            raise ValueError("AggregatorService needs a broker URL or a link")
        #: the transport: MQTT, or the in-memory link of ``edgemole bench``
        self.link: Link = link or MqttLink(broker or "", self.topics.mqtt_client_id("aggregator"), clean_session=False,
                                           credentials=credentials, identity="aggregator",
                                           max_packet_bytes=packet_limit(fleet.max_message_bytes))
        #: the run's strategy once :meth:`run` built it (the bench evaluates its models after the run)
        self.strategy: Strategy | None = None
        self.records: list[dict[str, Any]] = []
        # filled while a round is open
        self._open: tuple[int, str, RoundPlan] | None = None
        self._updates: dict[str, ClientUpdate] = {}
        self._bytes_up = 0
        #: client -> why its update of the open round was refused by the bounds (for the round record)
        self._out_of_bounds: dict[str, str] = {}
        #: (run, round, client) of every accepted update: a re-sent one (after a reconnect) is dropped quietly
        self._accepted: set[tuple[str, int, str]] = set()
        #: updates dropped as duplicates of an accepted one, or of this run while no round was open (a resumed
        #: aggregator receives the interrupted round's queued updates before it re-opens the round)
        self.duplicates = 0
        self.early = 0
        #: what a reconnect re-publishes: the retained task and round announcement, the open round's assignments
        self._task_payload: bytes | None = None
        self._round_payload: bytes | None = None
        self._assign_payloads: dict[str, bytes] = {}
        #: the open round's assignments, whole: what a device gets again after it lost its download cache
        self._assign_messages: dict[str, Message] = {}
        #: per device, what it was last sent: devices that keep a download cache get only what they do not hold
        self._downloads = DownloadRecord()
        #: the run's initial state and its digest: a device whose status names that digest built it from the task's
        #: seed and is sent only what differs from it (docs/protocol.md 4.4.1)
        self._initial: dict[str, Version] = {}
        self._initial_digest = ""

    # -- inbound -------------------------------------------------------------------------------
    def _reject(self, reason: str, detail: str) -> None:
        self.rejected[reason] += 1
        log.warning("rejected %s: %s (%s rejected so far)", reason, detail, sum(self.rejected.values()))

    def _handle(self, inbound: Inbound) -> None:
        if inbound.topic == RECONNECTED:
            self._on_reconnected()
            return
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
            initial = parse_initial(msg.body)
            check_status_fields(msg.body)
        except ProtocolError as exc:
            self._reject("status", f"from {client}: {exc}")
            return
        self.status[client] = msg.body
        # Any status (a restart, a reconnect, a cache miss) may mean the device's cache is gone: send it everything.
        self._downloads.forget(client)
        if initial is not None and initial == self._initial_digest and msg.body.get("run") == self.run_id \
                and msg.body.get(CAPABILITY) is True:
            self._downloads.seed(client, self._initial)  # it holds the initial state, built from the task's seed
        if self._is_ready(msg.body):
            self._resend_if_outstanding(client)
        if msg.body["state"] == "error":
            log.warning("client %s reports an error: %s", client, msg.body.get("error", ""))

    def _on_update(self, client: str, payload: bytes) -> None:
        try:
            msg = decode(payload, self.fleet.max_message_bytes)
        except ProtocolError as exc:
            self._reject("update", f"from {client}: {exc}")
            return
        run = msg.body.get("run")
        if isinstance(run, str) and (run, msg.round, client) in self._accepted:  # a list would be unhashable
            self.duplicates += 1  # a device re-sent it after a reconnect or a repeated assignment: expected
            log.debug("dropped a duplicate update from %s for round %d", client, msg.round)
            return
        if self._open is None:
            if msg.body.get("run") == self.run_id:  # e.g. queued for a resumed aggregator: asked for again
                self.early += 1
                log.info("dropped an update from %s for round %d: no round open yet", client, msg.round)
            else:
                self._reject("update", f"from {client} while no round is open")
            return
        rnd, phase, plan = self._open
        try:
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
        # Well formed, but within bounds? Checked on arrival so that a forged out-of-bounds update on a device's
        # topic cannot take the place of the device's real one.
        for reason, why in (
            ("samples", samples_violation(msg.body["num_samples"], phase, self.status.get(client),
                                          self.fleet.max_samples)),
            ("bounds", value_violation(msg.tensors, self.fleet.max_update_value)),
        ):
            if why is not None:
                self._reject(reason, f"from {client} in round {rnd}: {why}")
                self._out_of_bounds[client] = why
                return
        self._accepted.add((self.run_id, rnd, client))
        self._updates[client] = ClientUpdate(client, msg.body["num_samples"], msg.tensors,
                                             dict(msg.body.get("metrics", {})))
        self._updates[client].metrics["bytes_up"] = len(payload)
        self._updates[client].metrics["params_up"] = sum(t.numel() for t in msg.tensors.values())
        self._bytes_up += len(payload)

    def _pump(self, timeout_s: float, until: Callable[[], bool] | None = None) -> None:
        """Handle inbound messages for up to ``timeout_s`` seconds, or until ``until()`` holds after one (so that a
        round closes as soon as its last update arrived, not at the end of a polling interval)."""
        end = time.monotonic() + timeout_s
        while True:
            inbound = self.link.receive(max(0.0, end - time.monotonic()))
            if inbound is None:
                return
            self._handle(inbound)
            if time.monotonic() >= end or (until is not None and until()):
                return

    def ready_clients(self) -> list[str]:
        return sorted(c for c, s in self.status.items() if s.get("state") == "ready" and s.get("run") == self.run_id)

    def _is_ready(self, status: dict[str, Any]) -> bool:
        return status.get("state") == "ready" and status.get("run") == self.run_id

    def _resend_if_outstanding(self, client: str) -> None:
        """A selected device that reports ready for this run during the open round without having answered it
        was restarted, or (re)connected, perhaps to a restarted broker that lost its assignment: send it again
        rather than wait for the round's deadline (a device that has the round's update re-sends that)."""
        if self._open is None or client in self._updates or client not in self._assign_payloads:
            return
        log.info("round %d: %s is ready again without having answered: re-sending its assignment", self._open[0],
                 client)
        self._assign_payloads[client], _ = self._assignment_payload(client, self._assign_messages[client])
        self.link.publish(self.topics.assign(client), self._assign_payloads[client])

    def _assignment_payload(self, client: str, msg: Message) -> tuple[bytes, int]:
        """An assignment as it goes on the wire, and the tensor elements it carries. A device that announced its
        download cache (status ``cache: true``) gets only what it does not hold, with the digest of the whole
        model (docs/protocol.md 4.4.1); any other device gets every tensor, as always."""
        if self.status.get(client, {}).get(CAPABILITY) is not True:
            self._downloads.forget(client)
        else:
            tensors, roles, model = self._downloads.encode(client, msg.tensors, msg.roles)
            msg = replace(msg, body={**msg.body, MODEL: model}, tensors=tensors, roles=roles)
        return encode(msg), sum(t.numel() for t in msg.tensors.values())

    def _on_reconnected(self) -> None:
        """The broker connection came back (perhaps to a restarted broker without persistence, which forgot every
        retained message and queued delivery): restore the retained task and round, re-send what is outstanding."""
        pending = [c for c in self._assign_payloads if self._open is not None and c not in self._updates]
        log.warning("reconnected to the broker: re-publishing the task and round, re-sending %d assignment(s)",
                    len(pending))
        if self._task_payload is not None:
            self.link.publish(self.topics.task, self._task_payload, retain=True)
        if self._round_payload is not None:
            self.link.publish(self.topics.round, self._round_payload, retain=True)
        for client in pending:
            self.link.publish(self.topics.assign(client), self._assign_payloads[client])

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
                  hparams: dict[str, Any], **extra: Any) -> None:
        body = {"run": self.run_id, "deadline_unix": time.time() + deadline_s, "selected": selected,
                "hparams": hparams, "rounds": self.fleet.rounds, **extra}
        self._round_payload = encode(Message(Kind.ROUND, self.fleet.fleet, rnd, phase, body=body))
        self.link.publish(self.topics.round, self._round_payload, retain=True)

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
        self._out_of_bounds = {}
        self._assign_payloads, self._assign_messages = {}, {}
        bytes_down = params_down = 0
        for client, assignment in plan.assignments.items():
            body = {"run": self.run_id, **plan.hparams, **assignment.body}
            message = Message(Kind.ASSIGN, self.fleet.fleet, rnd, plan.phase, client, body, assignment.tensors,
                              {k: strategy.roles.get(k, "") for k in assignment.tensors})
            payload, params = self._assignment_payload(client, message)
            self._assign_payloads[client], self._assign_messages[client] = payload, message  # for a re-send
            bytes_down += self.link.publish(self.topics.assign(client), payload)
            params_down += params
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
            self._pump(min(0.5, max(0.01, (deadline if answered >= quorum else hard_deadline) - now)),
                       until=lambda: all(c in self._updates for c in selected))
        self._open, self._assign_payloads, self._assign_messages = None, {}, {}
        updates = [self._updates[c] for c in selected if c in self._updates]
        t0 = time.perf_counter()
        extra: dict[str, Any] = {}
        if not evaluate:
            updates = self._within_norm_bounds(rnd, plan, updates)
            if updates:
                strategy.robust = self.fleet.robust
                extra = strategy.aggregate(rnd, plan, updates)
            else:
                log.warning("round %d: every update was refused by the bounds; the model stays as it was", rnd)
        aggregate_s = time.perf_counter() - t0
        return self._record(rnd, plan.phase, selected, updates, (bytes_down, params_down), aggregate_s,
                            time.monotonic() - started, {**plan.info, **extra, "refused": dict(self._out_of_bounds)})

    def _within_norm_bounds(self, rnd: int, plan: RoundPlan, updates: list[ClientUpdate]) -> list[ClientUpdate]:
        """The updates whose tensor norms are within ``fleet.update_norm_factor`` of their references; the others
        are rejected (counted, logged, recorded under ``refused`` in the round record). RSEA embeddings share their
        module's median and are clipped to the bound instead (aggregator/bounds.py :func:`clip_to_bound`)."""
        pools = {n: n.rsplit(".embed.", 1)[0] + ".embed" for a in plan.assignments.values()
                 for n, spec in a.expect.items() if spec.role == EMBEDDING_ROLE}
        received = {u.client: u.tensors for u in updates}
        sent = {c: a.tensors for c, a in plan.assignments.items()}
        factor = self.fleet.update_norm_factor
        refused = norm_violations(received, sent, factor, pools, clipped=pools)
        for client, why in refused.items():
            self._reject("bounds", f"from {client} in round {rnd}: {why}")
            self._out_of_bounds[client] = why
        kept = [u for u in updates if u.client not in refused]
        for client, tensors in clip_to_bound(received, sent, factor, pools, pools).items():
            if client not in refused:
                log.warning("round %d: clipped %d RSEA embedding(s) of %s to %g x their module's median norm", rnd,
                            len(tensors), client, factor)
                update = next(u for u in kept if u.client == client)
                update.tensors = {**update.tensors, **tensors}
        return kept

    def _record(self, rnd: int, phase: str, selected: list[str], updates: list[ClientUpdate],
                down: tuple[int, int], aggregate_s: float, wall_s: float, extra: dict[str, Any]) -> dict[str, Any]:
        """The round's record; ``down`` is what the assignments carried: (payload bytes, tensor elements)."""
        def stat(key: str) -> tuple[float | None, float | None]:
            return _mean_std([u.metrics[key] for u in updates if key in u.metrics])

        acc_before, acc_before_std = stat("acc_before")
        acc_after, acc_after_std = stat("acc_after")
        acc_trained, acc_trained_std = stat("acc_trained")
        acc_deployed, acc_deployed_std = _mean_std([deployed_accuracy(u.metrics) for u in updates
                                                    if "acc_before" in u.metrics])
        loss, _ = stat("train_loss")
        return json_safe({  # device metrics are finite one by one; their sums may not be
            "round": rnd,
            "phase": phase,
            "selected": selected,
            "answered": [u.client for u in updates],
            "accuracy_before": acc_before,
            "accuracy_before_std": acc_before_std,
            "accuracy_after_local": acc_after,
            "accuracy_after_local_std": acc_after_std,
            "accuracy_trained": acc_trained,
            "accuracy_trained_std": acc_trained_std,
            "accuracy_deployed": acc_deployed,
            "accuracy_deployed_std": acc_deployed_std,
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
        })

    # -- whole run -----------------------------------------------------------------------------
    def identity(self) -> dict[str, str]:
        """What a checkpoint must match to be resumed by this run: its task (hash of the task body), fleet, model."""
        return {"task": task_hash(self.task.to_body()), "fleet": self.fleet.fleet, "model": self.task.model.name}

    def _build_strategy(self) -> tuple[Strategy, int]:
        model, _ = build_classifier(self.task)
        tensors, roles = WireState.of_model(model, self.task).initial_fleet_state()
        del model
        self._initial = versions_of({n: t.clone() for n, t in tensors.items()}, roles)
        self._initial_digest = state_digest(self._initial)
        strategy = self.strategy_cls(tensors, roles, self.task)
        if self.checkpoint_dir is not None:
            remove_stale_temporaries(self.checkpoint_dir)
        if not self.resume or self.checkpoint_dir is None:
            return strategy, 1
        ckpt = load_for_resume(self.checkpoint_dir, method=self.fleet.method, identity=self.identity())
        try:
            strategy.load_state_dict(ckpt.state, ckpt.strategy_extra)
            self._restore(ckpt.service)
        except (ValueError, TypeError, KeyError) as exc:
            raise EdgemoleError(f"--resume: cannot resume from '{ckpt.path}': {exc}") from None
        # the interrupted run's id: devices still answering its open round are answered, not rejected
        self.run_id = ckpt.run or self.run_id
        log.info("resuming run %s after round %d from %s", self.run_id, ckpt.round, ckpt.path)
        return strategy, ckpt.round + 1

    def _service_state(self) -> dict[str, Any]:
        """The service's part of a checkpoint: the selection RNG and the records, so that a resumed run selects
        as the uninterrupted one would and its summary covers every round."""
        version, internal, gauss = self.rng.getstate()
        return {"rng": [version, list(internal), gauss], "records": self.records, "rejected": dict(self.rejected)}

    def _restore(self, service: dict[str, Any]) -> None:
        if "rng" in service:
            version, internal, gauss = service["rng"]
            self.rng.setstate((version, tuple(internal), gauss))
        self.records = list(service.get("records", []))
        self.rejected.update(service.get("rejected", {}))

    def _emit(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        self.link.publish(self.topics.metrics, encode(Message(Kind.METRICS, self.fleet.fleet, record["round"],
                                                              record["phase"], body=record)))

    def _announce_failure(self, exc: BaseException) -> None:
        """Tell the devices the run is over, so that none waits for ever; best effort (the broker may be the
        reason it failed)."""
        reason = str(exc) or type(exc).__name__
        log.error("run %s failed: %s", self.run_id, reason)
        try:
            self._announce(self.fleet.rounds + 1, DONE, [], 0.0, {}, failed=True, reason=reason[:500])
        except Exception as publish_exc:  # noqa: BLE001 - the original error is what the caller must see
            log.warning("could not announce the failed run: %s", publish_exc)

    def run(self) -> dict[str, Any]:
        started = time.monotonic()
        strategy, first = self._build_strategy()
        self.strategy = strategy
        self.link.connect(self.connect_timeout_s)
        self.link.subscribe(self.topics.all_status, self.topics.all_updates)
        task_body = {"run": self.run_id, "task": self.task.to_body()}
        self._task_payload = encode(Message(Kind.TASK, self.fleet.fleet, body=task_body))
        self.link.publish(self.topics.task, self._task_payload, retain=True)
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
                                    run=self.run_id, round_=rnd, identity=self.identity(),
                                    strategy_extra=strategy.extra_state(), service=self._service_state(),
                                    keep=self.keep_checkpoints)
            final = self.run_round(strategy, self.fleet.rounds + 1, evaluate=True)
            self._emit(final)
            self._announce(self.fleet.rounds + 1, DONE, [], 0.0, {})
        except Exception as exc:
            self._announce_failure(exc)
            raise
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
            # personalised accuracy is the deployed model's (docs/deployed-model.md); the received and the
            # last-trained models' are the secondary figures
            "final_personalised_accuracy": final["accuracy_deployed"],
            "final_personalised_accuracy_std": final["accuracy_deployed_std"],
            "final_received_accuracy": final["accuracy_before"],
            "final_received_accuracy_std": final["accuracy_before_std"],
            "final_trained_accuracy": final["accuracy_trained"],
            "final_trained_accuracy_std": final["accuracy_trained_std"],
            "accuracy_curve": [r["accuracy_deployed"] for r in train_rounds] + [final["accuracy_deployed"]],
            "accuracy_curve_received": [r["accuracy_before"] for r in train_rounds] + [final["accuracy_before"]],
            "bytes_up_total": sum(r["bytes_up"] for r in self.records),
            "bytes_down_total": sum(r["bytes_down"] for r in self.records),
            "params_up_total": sum(r["params_up"] for r in self.records),
            "params_down_total": sum(r["params_down"] for r in self.records),
            "aggregate_s_total": sum(r["aggregate_s"] for r in self.records),
            "rounds_wall_s_total": sum(r["wall_s"] for r in self.records),
            "rejected": dict(self.rejected),
            "duplicates": self.duplicates,
            "early": self.early,
            "aggregator_wall_s": wall_s,
        }
