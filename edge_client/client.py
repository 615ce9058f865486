"""The edge client: waits for its assignment, trains locally, publishes its update and metrics.

All MQTT traffic is validated before use; a bad message is logged and dropped and the client keeps
serving. Work happens in the main thread while paho's thread keeps the connection alive.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import signal
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from edge_client.alternating import train_alternating
from edge_client.engines import Batch, TrainingEngine, make_engine
from edge_client.local_data import LocalData
from edgemole.adapters.amole.model import EMBEDDING_ROLE
from edgemole.adapters.amole.rsea import privatize
from edgemole.adapters.lora.a2 import TRAIN_A, TRAIN_B, active_factor, adapter_prefixes
from edgemole.adapters.lora.flex import OWN_RANK, leading_ranks, truncate_ranks
from edgemole.artifact import MANIFEST_FILE
from edgemole.config import TaskSpec
from edgemole.errors import ConfigError, EdgemoleError, ProtocolError
from edgemole.mqtt import RECONNECTED, BrokerCredentials, Inbound, Link, MqttLink, packet_limit
from edgemole.protocol import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DONE,
    Kind,
    Message,
    Topics,
    check_name,
    decode,
    encode,
    validate_assignment,
)
from edgemole.protocol.delta import (
    CAPABILITY,
    INITIAL,
    CacheMiss,
    Version,
    apply_download,
    parse_model_digest,
    remember,
    state_digest,
    versions_of,
)
from edgemole.protocol.messages import finite_number, finite_tensor
from edgemole.rng import SplitMix64

log = logging.getLogger("edgemole.client")
MAX_LOCAL_STEPS = 1_000_000


@dataclass
class ClientOptions:
    broker: str
    client_id: str
    data: str
    test_data: str | None = None
    test_fraction: float = 0.2
    text_column: str | None = None
    label_column: str | None = None
    fleet: str = "default"
    topic_prefix: str = "edgemole"
    engine: str = "eager"
    #: folder written by ``edgemole export``: the program the ExecuTorch engine trains with
    artifact: Path | None = None
    threads: int | None = None
    connect_timeout_s: float = 30.0
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    #: stay connected after a run ends and join the next one (device services); otherwise exit with 0
    keep_serving: bool = False
    #: LoRA-A2 upload rank budget r_c of this device, its own LoRA rank in FlexLoRA (None: the task's
    #: ``a2.upload_rank``)
    upload_rank: int | None = None
    #: also evaluate after local training (the ``acc_after`` metric); benchmarks that only need the received
    #: model's accuracy turn it off to save a pass over the test split
    eval_after_training: bool = True
    #: CA, client certificate, user name and password for the broker (None: an open broker)
    credentials: BrokerCredentials | None = None
    #: keep the tensors received and announce it (status ``cache: true``), so that assignments carry only what
    #: changed (docs/protocol.md 4.4.1); off: every assignment carries the whole model
    download_cache: bool = True
    #: share of the training rows held out (never trained on) to choose the deployed model (docs/deployed-model.md)
    val_fraction: float = 0.1


def batch_seed(task_seed: int, client_id: str, round_: int) -> int:
    """Per-client, per-round shuffling seed, stable across runs and machines."""
    return (task_seed * 1_000_003 + round_ * 7_919 + zlib.crc32(client_id.encode())) % (2**63)


def deploys_trained(val_acc_trained: float, val_acc_received: float) -> bool:
    """Whether a device deploys the model it kept from its last training rather than the one it received
    (docs/deployed-model.md): the more accurate on the validation split, and on a tie the trained one. Ties are the
    rule on a small validation split that both models get (nearly) all right, and there the trained model, fitted to
    the device's own data, was more often the better one on test (docs/deployed-model.md, "Why this rule")."""
    return val_acc_trained >= val_acc_received


class EdgeClient:
    """One device of the fleet."""

    def __init__(self, opts: ClientOptions, *, link: Link | None = None,
                 engine_factory: Callable[[TaskSpec], TrainingEngine] | None = None) -> None:
        """``link`` replaces the MQTT connection (``edgemole bench`` runs a fleet in memory); ``engine_factory``
        builds the engine for a task (the bench lets its in-process clients share one engine, which is safe because
        every assignment loads the whole trainable state and clients run one at a time)."""
        check_name(opts.client_id, "client id")
        if not 0 <= opts.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in [0, 1), got {opts.val_fraction}")
        self.opts = opts
        self.topics = Topics(opts.fleet, opts.topic_prefix)
        self.data = LocalData(  # read now so that a bad data file fails before connecting
            opts.data,
            test_path=opts.test_data,
            test_fraction=opts.test_fraction,
            text_column=opts.text_column,
            label_column=opts.label_column,
            seed=zlib.crc32(opts.client_id.encode()),
            val_fraction=opts.val_fraction,
        )
        self.engine: TrainingEngine | None = None
        self.task: TaskSpec | None = None
        self.run_id: str | None = None
        self.last_round = 0
        self.pending: Message | None = None
        #: (run, round, payload) of the last update sent, kept until the next round: re-sent when the connection
        #: comes back (a restarted broker may have lost it) or when that round's assignment arrives again
        self.kept: tuple[str, int, bytes] | None = None
        #: (run, round) of the latest round announcement: the round the aggregator is collecting
        self.open_round: tuple[str, int] | None = None
        self.rejected = 0
        #: download cache: the latest version received of every tensor name of the run (never the trained ones)
        self.cache: dict[str, Version] = {}
        #: the run's initial state as this device builds it from the task's seed (once per engine), and its digest;
        #: the cache starts as it, and the status names the digest while the cache holds nothing else
        self.initial: dict[str, Version] = {}
        self.initial_digest = ""
        self.cache_is_initial = False
        #: assignments that could not be rebuilt from the cache (each made the aggregator send everything again)
        self.cache_misses = 0
        #: the model this device last trained (its weights and the assignment body they belong to), kept for
        #: the choice of the deployed model; None before the first training round of a run
        self.trained: tuple[dict, dict] | None = None
        self._stop = False
        self._engine_factory = engine_factory or (lambda task: make_engine(opts.engine, task, threads=opts.threads,
                                                                          artifact=opts.artifact))
        self.link: Link = link or MqttLink(
            opts.broker,
            self.topics.device_mqtt_id(opts.client_id),
            clean_session=False,
            will=(self.topics.status(opts.client_id), self._status_payload("offline", will=True)),
            credentials=opts.credentials,
            identity=opts.client_id,  # refused when it is not the credential's name
            max_packet_bytes=packet_limit(opts.max_message_bytes),
        )

    # -- messages ------------------------------------------------------------------------------
    @functools.cached_property
    def artifact_digest(self) -> str | None:
        """The first 16 hex digits of the sha256 of the artifact's manifest.json (the status's ``artifact``): which
        program this device trains with; None with the eager engine, or when the manifest cannot be read (the engine
        then reports the broken artifact)."""
        if self.opts.engine != "executorch" or self.opts.artifact is None:
            return None
        try:
            return hashlib.sha256((Path(self.opts.artifact) / MANIFEST_FILE).read_bytes()).hexdigest()[:16]
        except OSError:
            return None

    def _status_payload(self, state: str, error: str = "", *, will: bool = False) -> bytes:
        """The status message (docs/protocol.md 4.2); ``will``: the last will, written at connect time, so without
        the device's clock (``time_unix``)."""
        body = {"state": state, "num_train": self.data.num_train, "num_test": self.data.num_test}
        body["engine"] = self.opts.engine
        if not will:
            body["time_unix"] = round(time.time(), 3)
        if self.artifact_digest is not None:
            body["artifact"] = self.artifact_digest
        if self.opts.download_cache:
            body[CAPABILITY] = True
            if self.cache_is_initial:
                body[INITIAL] = self.initial_digest
        if error:
            body["error"] = error[:500]
        if self.run_id:
            body["run"] = self.run_id
        return encode(Message(Kind.STATUS, self.opts.fleet, self.last_round, client=self.opts.client_id, body=body))

    def _publish_status(self, state: str, error: str = "") -> None:
        status = (self.topics.status(self.opts.client_id), self._status_payload(state, error))
        self.link.birth = status  # after a dropped connection the link restores this status over the will
        self.link.publish(*status, retain=True)

    def _reject(self, what: str, reason: str) -> None:
        self.rejected += 1
        log.warning("rejected %s: %s (rejected so far: %d)", what, reason, self.rejected)

    # -- main loop -----------------------------------------------------------------------------
    def run(self) -> int:
        """Serve until the aggregator announces the end of the run (or a signal arrives)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        self.start()
        try:
            while not self._stop:
                inbound = self.link.receive(0.5)
                if inbound is not None:
                    self.handle(inbound)
        finally:
            self.stop()
        return 0

    def start(self) -> None:
        """Connect, subscribe to the fleet's task, rounds and this device's assignments, and announce it online."""
        self.link.connect(self.opts.connect_timeout_s)
        self.link.subscribe(self.topics.task, self.topics.round, self.topics.assign(self.opts.client_id))
        self._publish_status("online")
        log.info("client %s online: %d train / %d test examples", self.opts.client_id,
                 self.data.num_train, self.data.num_test)

    def handle(self, inbound: Inbound) -> None:
        """Handle one inbound message (an assignment: a whole round of local work). An error the device cannot
        recover from (e.g. local labels outside the fleet's) is reported to the aggregator, then raised."""
        try:
            self._handle(inbound)
        except EdgemoleError as exc:
            self._publish_status("error", str(exc))
            raise

    def stop(self) -> None:
        """Announce this device offline and disconnect."""
        self._publish_status("offline")
        self.link.close()

    def _on_signal(self, signum: int, frame: object) -> None:
        self._stop = True

    def _handle(self, inbound: Inbound) -> None:
        if inbound.topic == RECONNECTED:
            self._on_reconnected()
            return
        mine = (self.topics.task, self.topics.round, self.topics.assign(self.opts.client_id))
        if not inbound.payload or inbound.topic not in mine:  # a cleared retained message, or broker noise
            return
        try:
            msg = decode(inbound.payload, self.opts.max_message_bytes)
            if msg.fleet != self.opts.fleet:
                raise ProtocolError(f"message for fleet {msg.fleet!r}")
        except ProtocolError as exc:
            self._reject(f"message on {inbound.topic}", str(exc))
            return
        if inbound.topic == self.topics.task and msg.kind == Kind.TASK:
            self._on_task(msg)
        elif inbound.topic == self.topics.round and msg.kind == Kind.ROUND:
            if isinstance(msg.body.get("run"), str) and msg.phase != DONE:
                self.open_round = (msg.body["run"], msg.round)
            # A retained "done" is the end of a run that finished before we connected (its retained task too):
            # it only ends our run if we took part; otherwise we wait for the next run's task.
            if msg.body.get("run") == self.run_id and msg.phase == DONE and (self.last_round or not inbound.retain):
                self._on_done(msg)
        elif inbound.topic == self.topics.assign(self.opts.client_id) and msg.kind == Kind.ASSIGN:
            self.pending = msg
            if self.engine is not None:
                self._on_assignment(msg)
        else:
            self._reject(f"message on {inbound.topic}", f"unexpected kind {msg.kind}")

    def _on_done(self, msg: Message) -> None:
        """The run is over, finished or failed (the aggregator gave up: too few devices, a round that failed):
        either way nothing more will come for it, so go idle (``keep_serving``) or end with 0."""
        if msg.body.get("failed") is True:
            log.warning("run %s failed after round %d: %s", self.run_id, self.last_round,
                        str(msg.body.get("reason", "no reason given"))[:500])
        else:
            log.info("run %s finished after round %d", self.run_id, self.last_round)
        self.kept, self.trained = None, None
        if self.opts.keep_serving:
            self.run_id, self.last_round = None, 0
            self._publish_status("online")
        else:
            self._stop = True

    def _on_reconnected(self) -> None:
        """The broker connection came back: if our last update is of the round still open, send it again (a
        restarted broker without persistence forgot it; the aggregator drops it if it already had it)."""
        if self.kept is not None and self.open_round == self.kept[:2]:
            self._publish_kept("reconnected")

    def _resend_kept(self, msg: Message) -> bool:
        """An assignment of the round this device already answered in this run (the aggregator re-sent it after a
        restart or reconnect): re-publish the kept update instead of training again or rejecting it."""
        if self.kept is None or msg.body.get("run") != self.run_id or (self.kept[0], self.kept[1]) != (
                self.run_id, msg.round):
            return False
        self._publish_kept("assignment received again")
        return True

    def _publish_kept(self, why: str) -> None:
        assert self.kept is not None
        log.info("%s: re-sending the update of round %d", why, self.kept[1])
        self.link.publish(self.topics.update(self.opts.client_id), self.kept[2])

    def _on_task(self, msg: Message) -> None:
        run = msg.body.get("run")
        try:
            task = TaskSpec.from_body(msg.body.get("task"))
        except ConfigError as exc:
            self._reject("task", str(exc))
            return
        if not isinstance(run, str) or run == self.run_id:
            return
        if self.engine is None or task != self.task:
            log.info("building %s engine for model %s with %d labels", self.opts.engine, task.model.name,
                     len(task.labels))
            try:
                engine = self._engine_factory(task)
            except EdgemoleError as exc:  # e.g. an artifact that is corrupt or does not fit this task
                self._reject("task", str(exc))
                self._publish_status("error", f"cannot train this task: {exc}")
                return
            self.engine = engine
            self.data.prepare(task.labels, self.engine.tokenizer, task.model.max_length)
            if self.opts.download_cache:  # before any training: the engine holds the task's initial state
                tensors, roles = engine.wire.initial_fleet_state()
                self.initial = versions_of(tensors, roles)
                self.initial_digest = state_digest(self.initial)
        self.task, self.run_id, self.last_round, self.trained = task, run, 0, None
        # another run's tensors are of no use; the run's initial state the device built itself saves the first download
        self.cache = dict(self.initial) if self.opts.download_cache else {}
        self.cache_is_initial = bool(self.cache)
        self._publish_status("ready")
        if self.pending is not None:
            self._on_assignment(self.pending)

    def _download(self, msg: Message) -> bool:
        """Rebuild an assignment sent by version (body ``model``, docs/protocol.md 4.4.1) into the whole model, in
        place, from the cache and the names the body implies, and remember what was received. False when it cannot
        be: on a cache miss the cache is cleared and a ``ready`` status makes the aggregator send everything; a
        malformed payload is rejected like a bad assignment."""
        if msg.body.get("run") != self.run_id or msg.client != self.opts.client_id or msg.round <= self.last_round:
            return True  # not one to apply (another run's, a stale one): the validator rejects it, nothing is cleared
        try:
            model = parse_model_digest(msg.body)
            if model is None:
                return True
            assert self.engine is not None
            names = self.engine.expected_state(msg.body)
            msg.tensors, msg.roles, digests = apply_download(self.cache, msg.tensors, msg.roles, names, model)
        except CacheMiss as exc:
            self.cache_misses += 1
            log.warning("round %d: cache miss (%s): asking for the whole model again (misses so far: %d)", msg.round,
                        exc, self.cache_misses)
            self.cache.clear()
            self.cache_is_initial = False
            self._publish_status("ready")
            return False
        except ProtocolError as exc:
            self._reject(f"assignment for round {msg.round}", str(exc))
            self._publish_status("error", f"round {msg.round}: {exc}")
            return False
        if self.opts.download_cache:
            remember(self.cache, msg.tensors, msg.roles, digests)
            if self.cache_is_initial:  # a status now would make the aggregator send everything: only the one a
                self.cache_is_initial = False  # reconnect restores stops naming the initial state
                self.link.birth = (self.topics.status(self.opts.client_id), self._status_payload("ready"))
        return True

    def _check_assignment(self, msg: Message) -> tuple[int, list[str] | None] | None:
        """Validate an assignment; its local steps and the roles to train (None: all), or None if rejected."""
        assert self.engine is not None and self.task is not None
        try:
            expected = self.engine.expected_state(msg.body)
            validate_assignment(
                msg,
                fleet=self.opts.fleet,
                run=self.run_id or "",
                client=self.opts.client_id,
                after_round=self.last_round,
                expected=expected,
            )
            if msg.phase not in ("train", "eval", TRAIN_A, TRAIN_B):
                raise ProtocolError(f"phase {msg.phase!r} is not supported by this client")
            steps = msg.body.get("local_steps", self.task.train.local_steps)
            if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= MAX_LOCAL_STEPS:
                raise ProtocolError(f"local_steps must be an integer in [1, {MAX_LOCAL_STEPS}], got {steps!r}")
            roles = msg.body.get("train_roles")
            known = {spec.role for spec in expected.values()}
            if roles is not None and (not isinstance(roles, list) or not roles  # strings first: a list in the
                                      or not all(isinstance(r, str) for r in roles)  # list is unhashable (fuzzing)
                                      or not set(roles) <= known):
                raise ProtocolError(f"train_roles must be a non-empty list of roles among {sorted(known)}")
            if msg.phase in (TRAIN_A, TRAIN_B):
                factor = active_factor(msg.phase)
                frozen = "lora_A" if factor == "lora_B" else "lora_B"
                if roles is None or factor not in roles or frozen in roles:
                    raise ProtocolError(f"a {msg.phase} round must train {factor} and not {frozen}")
        except ProtocolError as exc:
            self._reject(f"assignment for round {msg.round}", str(exc))
            # Only a newer round of our run addressed to us is a failure to report (the error status takes this device
            # out of the run): not a QoS 1 redelivery of an answered round, nor a stray or forged message of another
            # run or for another device, which would otherwise let anyone knock devices out.
            if msg.round > self.last_round and msg.body.get("run") == self.run_id and msg.client == self.opts.client_id:
                self._publish_status("error", f"round {msg.round}: {exc}")
            return None
        return steps, roles

    def _on_assignment(self, msg: Message) -> None:
        self.pending = None
        if self._resend_kept(msg):
            return
        if not self._download(msg):
            return
        checked = self._check_assignment(msg)
        if checked is None:
            return
        steps, train_roles = checked
        assert self.engine is not None and self.task is not None
        own_rank = self._own_rank(msg)
        received = msg.tensors if own_rank is None else truncate_ranks(msg.tensors, *own_rank)
        train = self.task.train
        metrics = self._deployment_metrics(received, msg.body)
        before = self.engine.evaluate(self.data.test_batches(train.eval_batch_size))
        metrics.update(acc_before=before.accuracy, loss_before=before.loss, num_test=before.samples)
        metrics["eval_s"] = metrics["eval_s"] + before.seconds
        metrics["acc_deployed"] = metrics["acc_trained"] if metrics.get("deployed_trained") else before.accuracy
        tensors: dict = {}
        roles: dict = {}
        num_samples = max(before.samples, 1)
        if msg.phase != "eval":
            # Dropout draws from torch's global generator: seeded here, a round's local work depends only on the task,
            # the device and the round, not on what else ran in this process before (bench runs many in one).
            torch.manual_seed(batch_seed(self.task.seed, self.opts.client_id, msg.round))
            if msg.phase == "train":
                stats = self.engine.train(self._batches(msg.round), steps, train.lr, train.weight_decay, train_roles)
                tensors, roles = self.engine.get_state(msg.body)
                if train_roles is not None:  # only what was trained travels back
                    tensors = {n: t for n, t in tensors.items() if roles[n] in train_roles}
                    roles = {n: roles[n] for n in tensors}
                if own_rank is not None:
                    tensors = leading_ranks(tensors, *own_rank)
                    metrics["client_rank"] = own_rank[1]
            else:
                a2 = train_alternating(self.engine, msg.body, msg.phase, lambda: self._batches(msg.round),
                                       self.task, steps, self.upload_rank(), train_roles)
                stats, tensors, roles = a2.stats, a2.tensors, a2.roles
                metrics.update(probe_s=a2.probe_s, ranks_uploaded=a2.ranks)
            metrics.update(train_loss=stats.loss, train_s=stats.seconds, steps=stats.steps)
            self.trained = (self.engine.get_state(msg.body)[0], msg.body)
            if self.opts.eval_after_training:
                after = self.engine.evaluate(self.data.test_batches(train.eval_batch_size))
                metrics.update(acc_after=after.accuracy, loss_after=after.loss,
                               eval_s=metrics["eval_s"] + after.seconds)
            embeddings = self._embeddings(msg)
            tensors.update(embeddings)
            roles.update(dict.fromkeys(embeddings, EMBEDDING_ROLE))
            num_samples = self.data.num_train
        problem = non_finite(metrics, tensors)
        if problem is not None:  # e.g. a model that diverged, or one the aggregator should never have sent
            self.last_round = msg.round
            self._reject(f"own update of round {msg.round}", problem)
            self._publish_status("error", f"round {msg.round}: {problem}; no update sent")
            return
        body = {"run": self.run_id, "num_samples": num_samples, "metrics": metrics}
        payload = encode(Message(Kind.UPDATE, self.opts.fleet, msg.round, msg.phase, self.opts.client_id,
                                 body, tensors, roles))
        assert self.run_id is not None
        self.kept = (self.run_id, msg.round, payload)  # before publishing: a reconnect during it re-sends it
        self.link.publish(self.topics.update(self.opts.client_id), payload)
        self.last_round = msg.round
        log.info("round %d %s: acc %.3f -> %s, sent %d bytes", msg.round, msg.phase, before.accuracy,
                 f"{metrics['acc_after']:.3f}" if "acc_after" in metrics else "-", len(payload))

    def _deployment_metrics(self, received: dict, body: dict) -> dict:
        """Test accuracy of the model this device kept from its last training (``acc_trained``) and of the model
        it deploys (``acc_deployed``): of the received and the kept one, the one :func:`deploys_trained` picks
        (the received one when there is no kept model or no validation split). Leaves the received model loaded,
        which is what the round trains from."""
        assert self.engine is not None and self.task is not None
        size = self.task.train.eval_batch_size
        metrics: dict = {"eval_s": 0.0}
        if self.trained is None or self.data.num_val == 0:
            self.engine.set_state(received, body)
            return metrics
        trained_state, trained_body = self.trained
        self.engine.set_state(trained_state, trained_body)
        val_trained = self.engine.evaluate(self.data.val_batches(size))
        kept = self.engine.evaluate(self.data.test_batches(size))
        self.engine.set_state(received, body)
        val_received = self.engine.evaluate(self.data.val_batches(size))
        use_trained = deploys_trained(val_trained.accuracy, val_received.accuracy)
        metrics.update(acc_trained=kept.accuracy, val_acc_trained=val_trained.accuracy,
                       val_acc_received=val_received.accuracy, deployed_trained=float(use_trained),
                       eval_s=val_trained.seconds + kept.seconds + val_received.seconds)
        return metrics

    def _batches(self, round_: int) -> Iterator[Batch]:
        assert self.task is not None
        return self.data.train_batches(self.task.train.batch_size, batch_seed(self.task.seed, self.opts.client_id,
                                                                               round_))

    def _own_rank(self, msg: Message) -> tuple[list[str], int] | None:
        """FlexLoRA: the adapters and this device's rank r_c when the assignment asks for its own leading ranks and
        r_c is below the LoRA rank (None: train and send everything)."""
        assert self.task is not None
        if not msg.body.get(OWN_RANK) or msg.phase != "train":
            return None
        k = min(self.upload_rank(), self.task.lora.r)
        return (adapter_prefixes(msg.tensors), k) if k < self.task.lora.r else None

    def upload_rank(self) -> int:
        """r_c: this device's own budget, else the task's, else the LoRA rank."""
        assert self.task is not None
        return self.opts.upload_rank or self.task.a2.upload_rank or self.task.lora.r

    def _embeddings(self, msg: Message) -> dict:
        """RSEA vectors on the aux set with the post-training weights, with DP noise when configured."""
        assert self.engine is not None and self.task is not None
        amole = self.task.amole
        if not self.task.uses_experts:
            return {}
        aux = self.data.aux_batches(amole.aux_fraction, amole.aux_max, self.task.train.eval_batch_size)
        embeddings = self.engine.embeddings(aux, msg.body)
        if amole.dp_eta > 0:
            # One generator per round, the embeddings in name order (docs/protocol.md section 10).
            rng = SplitMix64(batch_seed(self.task.seed, self.opts.client_id, msg.round) + 1)
            noisy = {k: privatize(embeddings[k], amole.dp_eta, rng) for k in sorted(embeddings)}
            embeddings = {k: noisy[k] for k in embeddings}
        return embeddings


def non_finite(metrics: dict, tensors: dict) -> str | None:
    """Why an update cannot be sent: a metric or tensor value that is NaN or Inf (JSON cannot carry the first, the
    aggregator would reject the second), else None."""
    bad = sorted(k for k, v in metrics.items() if not finite_number(v))
    if bad:
        return f"non-finite metric(s) {', '.join(bad[:5])}"
    bad = sorted(n for n, t in tensors.items() if not finite_tensor(t))
    if bad:
        return f"non-finite values in {len(bad)} tensor(s), e.g. {bad[0]!r}"
    return None


def run_client(opts: ClientOptions) -> int:
    """Entry point of ``edgemole client``."""
    if opts.test_data is not None and not Path(opts.test_data).exists():
        raise EdgemoleError(f"test data file '{opts.test_data}' does not exist")
    return EdgeClient(opts).run()
