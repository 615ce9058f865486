"""The ``edgemole`` command line (also ``python -m fleet``): ``simulate`` (an emulated fleet), ``bench`` (methods
compared), ``aggregator``, ``client``, ``export``, ``broker``, ``flash`` and ``fleet status``.

Every user mistake ends as one line ``error: ...`` on stderr and exit status 2. The CLI reaches into the
role packages (and into ``fleet.bench``, which imports them) only lazily, in the runner of a command.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from edgemole import __version__
from edgemole.errors import EdgemoleError


def _csv(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return items


def _int_csv(text: str) -> list[int]:
    try:
        return [int(v) for v in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _add_task_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("fleet and rounds")
    g.add_argument("--config", help="TOML or JSON config file (sections fleet, model, lora, train, data, simulate)")
    g.add_argument("--method", help="fedamole-a2 (default), fedamole, lora-a2, fedit, ffa-lora or flexlora")
    g.add_argument("--rounds", type=int, help="training rounds (default 5)")
    g.add_argument("--fleet", help="fleet name, part of every topic (default 'default')")
    g.add_argument("--topic-prefix", help="topic prefix (default 'edgemole')")
    g.add_argument("--seed", type=int, help="seed of initial weights, selection and data split (default 0)")
    g.add_argument("--min-clients", type=int, help="clients that must be ready before round 1")
    g.add_argument("--clients-per-round", type=float, help="fraction of ready clients selected per round")
    g.add_argument("--quorum", type=float, help="fraction of selected clients needed after the deadline")
    g.add_argument("--deadline", type=float, help="round deadline in seconds (default 300)")
    g.add_argument("--max-update-value", type=float, help="largest |value| an update may hold (default 1e6)")
    g.add_argument("--update-norm-factor", type=float,
                   help="reject an update tensor above this many times its reference norm (default 10)")
    g.add_argument("--max-samples", type=int, help="largest num_samples an update may claim (default 1000000)")
    g.add_argument("--robust", help="plain-LoRA aggregation: none (default), clip, trimmed-mean:F or median")
    g = p.add_argument_group("model and adapters")
    g.add_argument("--model", help="Hugging Face id or local path (default: bundled all-MiniLM-L6-v2)")
    g.add_argument("--max-length", type=int, help="tokens per example (default 32)")
    g.add_argument("--rank", type=int, help="LoRA rank r (default 8)")
    g.add_argument("--lora-alpha", type=float, help="LoRA alpha (default 16)")
    g.add_argument("--lora-dropout", type=float, help="LoRA dropout (default 0.05)")
    g.add_argument("--target-modules", type=_csv, help="comma-separated linear layer names (default query,value)")
    g.add_argument("--freeze-head", action="store_const", const=False, dest="train_head",
                   help="keep the classification head frozen (not trained, not sent)")
    g = p.add_argument_group("experts (fedamole)")
    g.add_argument("--experts", type=int, help="E: LoRA experts per module in the fleet (default 8)")
    g.add_argument("--slots", type=int, help="M: most experts one device holds per module (default 4)")
    g.add_argument("--holders", type=int, help="C: devices holding each expert per round (default 0: the smallest "
                   "C that gives every device k experts)")
    g.add_argument("--reassign-every", type=int,
                   help="rounds an expert assignment lasts (default 1: reverse selection before every round)")
    g.add_argument("--keep-bonus", type=float,
                   help="how much reverse selection favours an expert's current holders, in mean preferences "
                        "(default 0: the paper's assignment)")
    g.add_argument("--top-k", type=int, help="k: experts mixed per token, fewest a device holds (default 2)")
    g.add_argument("--dp-eta", type=float, help="differential privacy on RSEA embeddings, rate eta (0: off)")
    g = p.add_argument_group("alternating freeze and rank selection (lora-a2, fedamole-a2)")
    g.add_argument("--upload-rank", type=int,
                   help="r_c: ranks per module a device uploads (flexlora: its own LoRA rank; default: the LoRA rank)")
    g.add_argument("--b-lr-multiplier", type=float,
                   help="learning rate of B as a multiple of A's (default: the method's, else 5)")
    g.add_argument("--probe-steps", type=int, help="steps of the rank-scoring probe (default: the local steps)")
    g = p.add_argument_group("local training")
    g.add_argument("--local-steps", type=int, help="optimizer steps per round (default 10)")
    g.add_argument("--batch-size", type=int, help="batch size (default 16)")
    g.add_argument("--lr", type=float, help="learning rate (default: the method's, see edgemole/defaults.py; "
                   "else 2e-3)")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0)")
    g.add_argument("--optimizer", help="adamw (default) or sgd (the ExecuTorch runtime's own on that engine)")
    g.add_argument("--no-dropout", action="store_const", const=False, dest="dropout",
                   help="train without dropout (as exported ExecuTorch programs do)")


def _add_data_flags(p: argparse.ArgumentParser, simulate: bool) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", help="'synthetic' (default) or a CSV/JSONL/JSON file or a folder with train*/test*"
                   + ("" if simulate else "; the aggregator takes the label set from it"))
    g.add_argument("--text-column", help="text column (default: auto-detected)")
    g.add_argument("--label-column", help="label column (default: auto-detected)")
    if simulate:
        g.add_argument("--partition", help="iid | dirichlet:ALPHA | quantity:ALPHA | column:NAME (simulate's "
                       "default: column:domain for synthetic, dirichlet:0.5 otherwise; bench's: dirichlet over "
                       "--alphas)")
        g.add_argument("--test-fraction", type=float, help="share of each client's data held out for testing")
        g.add_argument("--samples-per-domain", type=int, help="size of the synthetic data set per domain")
    else:
        g.add_argument("--labels", type=_csv, help="comma-separated label set (instead of --dataset)")


def _add_credential_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("broker identity (TLS, certificate, password; also EDGEMOLE_MQTT_* variables)")
    g.add_argument("--ca-file", help="CA certificate(s) to verify an mqtts:// broker (env EDGEMOLE_MQTT_CA_FILE; "
                   "default: the system's CAs)")
    g.add_argument("--cert-file", help="client certificate for mutual TLS (env EDGEMOLE_MQTT_CERT_FILE)")
    g.add_argument("--key-file", help="key of --cert-file (env EDGEMOLE_MQTT_KEY_FILE)")
    g.add_argument("--username", help="MQTT user name (env EDGEMOLE_MQTT_USERNAME)")
    g.add_argument("--password-file", help="file holding the MQTT password (env EDGEMOLE_MQTT_PASSWORD_FILE, or the "
                   "password itself in EDGEMOLE_MQTT_PASSWORD; never a flag)")


def _credentials(a: argparse.Namespace):  # noqa: ANN202
    """The role's broker credentials from its flags and EDGEMOLE_MQTT_* (None: an open broker); checks the broker
    URL too, so that both fail before any data or model is loaded."""
    from edgemole.mqtt import BrokerCredentials, parse_broker_url

    if getattr(a, "broker", None):
        parse_broker_url(a.broker)
    return BrokerCredentials.resolve(a.ca_file, a.cert_file, a.key_file, a.username, a.password_file)


def _overrides(a: argparse.Namespace) -> dict[str, dict[str, Any]]:
    get = lambda name: getattr(a, name, None)  # noqa: E731
    return {
        "fleet": {"method": get("method"), "rounds": get("rounds"), "fleet": get("fleet"),
                  "topic_prefix": get("topic_prefix"), "seed": get("seed"), "min_clients": get("min_clients"),
                  "clients_per_round": get("clients_per_round"), "quorum": get("quorum"),
                  "round_deadline_s": get("deadline"), "max_update_value": get("max_update_value"),
                  "update_norm_factor": get("update_norm_factor"), "max_samples": get("max_samples"),
                  "robust": get("robust")},
        "model": {"name": get("model"), "max_length": get("max_length")},
        "lora": {"r": get("rank"), "alpha": get("lora_alpha"), "dropout": get("lora_dropout"),
                 "target_modules": get("target_modules"), "train_head": get("train_head")},
        "train": {"local_steps": get("local_steps"), "batch_size": get("batch_size"), "lr": get("lr"),
                  "weight_decay": get("weight_decay"), "dropout": get("dropout"),
                  "optimizer": get("optimizer")},
        "data": {"dataset": get("dataset"), "text_column": get("text_column"), "label_column": get("label_column"),
                 "partition": get("partition"), "test_fraction": get("test_fraction"),
                 "samples_per_domain": get("samples_per_domain"), "labels": get("labels")},
        "simulate": {"clients": get("clients"), "engine": get("engine"), "threads": get("threads"),
                     "upload_ranks": get("upload_ranks"), "artifact": get("artifact"),
                     "native_clients": get("native_clients")},
        "amole": {"experts": get("experts"), "slots": get("slots"), "holders": get("holders"),
                  "reassign_every": get("reassign_every"), "keep_bonus": get("keep_bonus"),
                  "top_k": get("top_k"), "dp_eta": get("dp_eta")},
        "a2": {"upload_rank": get("upload_rank"), "b_lr_multiplier": get("b_lr_multiplier"),
               "probe_steps": get("probe_steps")},
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgemole",
        description="Federated fine-tuning of language models on edge devices over MQTT.",
    )
    parser.add_argument("--version", action="version", version=f"edgemole {__version__}")
    parser.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="log level (default: INFO for aggregator and client, WARNING for simulate)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("simulate", help="run an emulated fleet: broker, aggregator and N client processes")
    p.add_argument("--clients", type=int, help="number of emulated clients (default 4)")
    p.add_argument("--broker", help="use this broker (mqtt://host:port or mqtts://host:port) instead of the embedded "
                   "amqtt one")
    p.add_argument("--secure-dir", help="a directory of 'edgemole broker init' with devices client-0..client-N-1: each "
                   "role connects with its own identity from there (default broker: its certificate listener)")
    p.add_argument("--engine", help="client training engine: eager (default) or executorch")
    p.add_argument("--artifact", help="with --engine executorch: the folder of 'edgemole export' (default: export "
                   "the task's program into the work folder first)")
    p.add_argument("--native-clients", type=int, metavar="N",
                   help="run the last N clients as the native C++ client (edgemole-device, built from devices/native "
                   "when not on PATH); they train the exported program like --engine executorch clients")
    p.add_argument("--threads", type=int, help="torch threads per client process (default: cores / clients)")
    p.add_argument("--json-out", help="write the run's results as JSON to this file")
    p.add_argument("--plot", help="write accuracy and traffic per round as a PNG to this file")
    p.add_argument("--work-dir", help="keep partitions, logs and checkpoints here (default: a temporary folder)")
    p.add_argument("--upload-ranks", type=_int_csv,
                   help="per-device upload rank budgets, e.g. 8,4,2,1, given to the clients in turn (lora-a2)")
    _add_credential_flags(p)
    _add_task_flags(p)
    _add_data_flags(p, simulate=True)

    p = sub.add_parser("export", help="write the on-device artifact: trainable ExecuTorch program, base weights, "
                       "tokenizer and manifest")
    p.add_argument("--out", required=True, help="artifact folder to write")
    p.add_argument("--task", default="classify",
                   help="classify (default) or causal-lm (a decoder; loss on the response tokens)")
    p.add_argument("--num-labels", type=int, help="classes of the head (default: the labels of --dataset/--labels)")
    p.add_argument("--no-xnnpack", action="store_true", help="portable kernels only (slower; for comparison)")
    p.add_argument("--force", action="store_true", help="replace an existing artifact folder")
    _add_task_flags(p)
    _add_data_flags(p, simulate=False)

    p = sub.add_parser("aggregator", help="run the aggregation service against a broker")
    p.add_argument("--broker", required=True, help="MQTT broker URL, e.g. mqtt://127.0.0.1:1883")
    p.add_argument("--json-out", help="write the run summary as JSON to this file")
    p.add_argument("--checkpoint-dir", help="save the aggregated state after every round here")
    p.add_argument("--resume", action="store_true", help="continue after the round of the checkpoint")
    p.add_argument("--keep-checkpoints", type=int, default=3, metavar="K",
                   help="round checkpoints to keep besides latest (default 3)")
    p.add_argument("--wait-clients", type=float, help="seconds to wait for --min-clients ready clients")
    _add_credential_flags(p)
    _add_task_flags(p)
    _add_data_flags(p, simulate=False)

    p = sub.add_parser("client", help="run one edge client (a device) against a broker")
    p.add_argument("--broker", required=True, help="MQTT broker URL, e.g. mqtt://127.0.0.1:1883")
    p.add_argument("--client-id", required=True, help="unique id of this device in the fleet")
    p.add_argument("--data", required=True, help="local data: CSV, JSONL or JSON with text and label columns")
    p.add_argument("--test-data", help="local test split (default: hold out --test-fraction of --data)")
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--text-column")
    p.add_argument("--label-column")
    p.add_argument("--fleet", default="default")
    p.add_argument("--topic-prefix", default="edgemole")
    p.add_argument("--engine", default="eager", help="training engine: eager (default) or executorch")
    p.add_argument("--artifact", help="with --engine executorch: the folder written by 'edgemole export'")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--connect-timeout", type=float, default=30.0, help="seconds to keep retrying the broker")
    p.add_argument("--upload-rank", type=int,
                   help="this device's upload rank budget r_c in lora-a2/fedamole-a2, its own LoRA rank in "
                        "flexlora (default: the task's)")
    p.add_argument("--keep-serving", action="store_true",
                   help="after a run ends, wait for the next one instead of exiting (for device services)")
    _add_credential_flags(p)

    p = sub.add_parser("broker", help="a TLS + ACL Mosquitto set-up: private CA, one credential per device")
    bsub = p.add_subparsers(dest="broker_command", required=True, metavar="ACTION")
    b = bsub.add_parser("init", help="write CA, broker certificate and config, and every identity's credential")
    b.add_argument("dir", help="directory to write (refused when not empty, unless --force)")
    b.add_argument("--fleet", required=True, help="fleet name (the ACL covers <prefix>/<fleet>/...)")
    b.add_argument("--devices", type=_csv, default=[], help="comma-separated device ids, e.g. pi-01,pi-02")
    b.add_argument("--topic-prefix", default="edgemole", help="topic prefix (default 'edgemole')")
    b.add_argument("--host", default="localhost", help="broker host name the devices use (default localhost)")
    b.add_argument("--server-names", type=_csv, default=[],
                   help="more DNS names or IP addresses of the broker for its certificate")
    b.add_argument("--bind", help="address the listeners bind to (default: all interfaces)")
    b.add_argument("--port", type=int, default=8883, help="mutual-TLS (certificate) listener port (default 8883)")
    b.add_argument("--password-port", type=int, default=8884,
                   help="TLS + user name/password listener port (default 8884)")
    b.add_argument("--max-message-bytes", type=int, help="largest edgemole message (default 16 MiB); the broker "
                   "refuses larger packets")
    b.add_argument("--device-root", default="/etc/edgemole/{id}",
                   help="where each device keeps its files, for client.env and device.json "
                   "(default /etc/edgemole/{id})")
    b.add_argument("--local-paths", action="store_true",
                   help="client.env and device.json point at the files in DIR (a fleet on this machine)")
    b.add_argument("--broker-root", help="where DIR/broker will be on the broker host (default: DIR/broker)")
    b.add_argument("--force", action="store_true", help="replace an existing directory's CA and credentials")
    for action, what in (("add-device", "credentials for one more device"),
                         ("revoke-device", "revoke a device (CRL, passwd, acl); restart the broker afterwards")):
        b = bsub.add_parser(action, help=what)
        b.add_argument("dir", help="directory written by 'edgemole broker init'")
        b.add_argument("device", help="device id")

    _add_flash_parser(sub)

    p = sub.add_parser("fleet", help="what the fleet's devices are doing")
    fsub = p.add_subparsers(dest="fleet_command", required=True, metavar="ACTION")
    f = fsub.add_parser("status", help="every device that published a status on the broker: state, last seen, "
                        "client kind, engine, artifact, last round answered")
    f.add_argument("--broker", required=True, help="MQTT broker URL, e.g. mqtt://127.0.0.1:1883")
    f.add_argument("--fleet", default="default", help="fleet name (default 'default')")
    f.add_argument("--topic-prefix", default="edgemole", help="topic prefix (default 'edgemole')")
    f.add_argument("--json", action="store_true", help="print the devices as JSON instead of a table")
    f.add_argument("--wait", type=float, default=2.0,
                   help="seconds to collect the broker's retained status messages (default 2)")
    f.add_argument("--connect-timeout", type=float, default=10.0, help="seconds to keep retrying the broker")
    _add_credential_flags(f)

    p = sub.add_parser("bench", help="compare methods over a grid of ranks, Dirichlet alphas (or one --partition) "
                       "and seeds (in memory)")
    g = p.add_argument_group("grid (also the [bench] section of --config)")
    g.add_argument("--methods", help="comma-separated methods, e.g. fedit,ffa-lora,flexlora,lora-a2,fedamole")
    g.add_argument("--ranks", help="comma-separated LoRA ranks; for lora-a2/fedamole-a2 the upload rank budgets "
                   "(their LoRA rank is --rank)")
    g.add_argument("--alphas", help="comma-separated Dirichlet label-skew alphas, e.g. 0.5,0.1,0.01 (default 0.5; "
                   "for a Dirichlet or unset --partition only)")
    g.add_argument("--seeds", help="comma-separated seeds (initial weights, partitions, selection)")
    g.add_argument("--out", help="results folder (default bench-results/); runs already there are skipped")
    g.add_argument("--global-test-size", type=int,
                   help="examples of the test split for global accuracy, a fixed subsample (default 1000; 0: all)")
    g.add_argument("--clients", type=int, help="clients per run (default 4)")
    g.add_argument("--jobs", type=int, help="runs in parallel, in worker processes (default 1)")
    g.add_argument("--threads", type=int, dest="bench_threads", metavar="THREADS",
                   help="torch threads per process (default 1)")
    _add_task_flags(p)
    _add_data_flags(p, simulate=True)
    return parser


def _add_flash_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("flash", help="put the client, the artifact, the data and the config on a device, verify "
                       "them by sha256 and start the client (adb for phones, SSH for boards)")
    tsub = p.add_subparsers(dest="flash_target", required=True, metavar="TARGET")
    targets = (
        ("android", "an Android phone over adb (native client)"),
        ("board", "a Linux board over SSH (native or Python client)"),
    )
    for name, what in targets:
        t = tsub.add_parser(name, help=what)
        if name == "android":
            t.add_argument("--serial", required=True, help="the phone's adb serial (adb devices)")
            t.add_argument("--adb", default="adb", help="the adb client to use (default: adb on PATH)")
            t.add_argument("--dir", default="/data/local/tmp/edgemole",
                           help="folder on the phone (default /data/local/tmp/edgemole)")
            t.add_argument("--native-dir", help="folder of the Android build of edgemole-device and its .so "
                           "libraries (devices/native/README.md, NDK); pushed to DIR/bin and DIR/lib")
        else:
            t.add_argument("--host", required=True, help="the board's host name or address")
            t.add_argument("--user", help="SSH user (default: ssh's)")
            t.add_argument("--port", type=int, help="SSH port (default: ssh's)")
            t.add_argument("--identity", help="SSH private key (default: ssh's keys or agent)")
            t.add_argument("--ssh-option", action="append", default=[], metavar="OPT",
                           help="one more ssh -o option, e.g. StrictHostKeyChecking=accept-new (repeatable)")
            t.add_argument("--sudo", action="store_true",
                           help="run the board's commands with 'sudo -n' (a user that may sudo without a password, "
                           "where root cannot log in)")
            t.add_argument("--dir", default="/srv/edgemole", help="folder on the board (default /srv/edgemole)")
            t.add_argument("--client", default="native", choices=("native", "python"),
                           help="native: edgemole-device (built here, or --native-dir); python: edgemole client "
                           "(edgemole installed on the board, see --python)")
            t.add_argument("--native-dir", help="folder of edgemole-device and its libraries for the board's "
                           "architecture (default: build/native here, with the executorch runtime libraries)")
            t.add_argument("--python", help="with --client python: the board's Python that has edgemole "
                           "(default /opt/edgemole/bin/python, the environment devices/raspberry-pi/provision.sh "
                           "makes)")
            t.add_argument("--service", choices=("auto", "systemd", "nohup"), default="auto",
                           help="how the client runs: a systemd unit (root, systemd running) or nohup with a PID "
                           "file (default auto: systemd where it can)")
        t.add_argument("--client-id", required=True, help="the device's id in the fleet")
        t.add_argument("--artifact", help="folder of 'edgemole export' (program.pte, base.ptd, tokenizer, "
                       "manifest; needed by the native client and by --engine executorch)")
        t.add_argument("--data", help="the device's local data file (CSV, JSONL or JSON)")
        t.add_argument("--test-data", help="the device's local test split")
        t.add_argument("--broker", help="MQTT broker URL the device connects to (default with --credentials: "
                       "its device.json's)")
        t.add_argument("--credentials", help="this device's folder of 'edgemole broker init' "
                       "(DIR/devices/<id>): CA, certificate, key, password")
        t.add_argument("--fleet", default=None, help="fleet name (default: the credentials', else 'default')")
        t.add_argument("--topic-prefix", default=None, help="topic prefix (default 'edgemole')")
        t.add_argument("--threads", type=int, help="the client's threads")
        t.add_argument("--upload-rank", type=int, help="the device's upload rank budget r_c")
        if name == "board":
            t.add_argument("--engine", default=None, help="with --client python: eager (default) or executorch")
        t.add_argument("--action", default="install", choices=("install", "start", "stop", "status"),
                       help="install (default: copy what changed, verify, restart the client), start, stop, or "
                       "status (is the client running, what is installed)")
        t.add_argument("--no-start", action="store_true", help="install but do not start the client")
        t.add_argument("--dry-run", action="store_true", help="print every action; touch nothing")
        t.add_argument("--json", action="store_true", help="print the result as JSON")


def _run_flash(a: argparse.Namespace) -> int:
    from fleet.flash import run_flash

    return run_flash(a)


def _run_fleet(a: argparse.Namespace) -> int:
    from fleet.status import fleet_status, print_status

    credentials = _credentials(a)
    if not 0 < a.wait <= 600:
        from edgemole.errors import ConfigError

        raise ConfigError("--wait must be in (0, 600] seconds")
    devices = fleet_status(a.broker, a.fleet, a.topic_prefix, credentials=credentials, wait_s=a.wait,
                           connect_timeout_s=a.connect_timeout)
    if a.json:
        print(json.dumps({"fleet": a.fleet, "devices": devices, "rejected": getattr(devices, "rejected", [])},
                         indent=2))
    else:
        print_status(a.fleet, devices)
    return 0


def _run_aggregator(a: argparse.Namespace) -> int:
    from aggregator.service import AggregatorService
    from aggregator.strategies import strategy_class
    from edgemole.config import load_settings_with_defaults
    from edgemole.data.source import task_labels

    credentials = _credentials(a)
    settings, applied = load_settings_with_defaults(a.config, _overrides(a))
    if line := applied.line():
        logging.getLogger("edgemole.aggregator").info("%s", line)
    if a.wait_clients is not None:
        settings.fleet.wait_clients_s = a.wait_clients
    strategy_class(settings.fleet.method)
    service = AggregatorService(
        settings.fleet,
        settings.task(task_labels(settings.data, settings.fleet.seed)),
        a.broker,
        checkpoint_dir=a.checkpoint_dir,
        resume=a.resume,
        summary_path=a.json_out,
        keep_checkpoints=a.keep_checkpoints,
        credentials=credentials,
    )
    summary = service.run()
    print(json.dumps({"run": summary["run"], "final_personalised_accuracy": summary["final_personalised_accuracy"],
                      "bytes_up_total": summary["bytes_up_total"], "bytes_down_total": summary["bytes_down_total"]}))
    return 0


def _run_client(a: argparse.Namespace) -> int:
    from edge_client.client import ClientOptions, run_client
    from edge_client.engines import ENGINES
    from edgemole.errors import ConfigError

    credentials = _credentials(a)
    if a.engine not in ENGINES:
        raise ConfigError(f"unknown engine {a.engine!r} (available: {', '.join(ENGINES)})")
    if not 0 <= a.test_fraction < 1:
        raise ConfigError("--test-fraction must be in [0, 1)")
    if a.upload_rank is not None and not 1 <= a.upload_rank <= 4096:
        raise ConfigError("--upload-rank must be in [1, 4096]")
    if a.artifact and a.engine != "executorch":
        raise ConfigError("--artifact is for --engine executorch")
    if a.engine == "executorch" and not a.artifact:
        raise ConfigError("--engine executorch needs --artifact DIR (written by 'edgemole export')")
    return run_client(ClientOptions(
        broker=a.broker, client_id=a.client_id, data=a.data, test_data=a.test_data, test_fraction=a.test_fraction,
        text_column=a.text_column, label_column=a.label_column, fleet=a.fleet, topic_prefix=a.topic_prefix,
        engine=a.engine, threads=a.threads, connect_timeout_s=a.connect_timeout, keep_serving=a.keep_serving,
        upload_rank=a.upload_rank, artifact=Path(a.artifact) if a.artifact else None, credentials=credentials,
    ))


def _run_export(a: argparse.Namespace) -> int:
    from rich.console import Console

    from edgemole.config import load_settings
    from edgemole.data.source import task_labels
    from edgemole.errors import ConfigError
    from export.artifact import write_artifact, write_causal_artifact

    if a.task not in ("classify", "causal-lm"):
        raise ConfigError(f"--task must be classify or causal-lm, got {a.task!r}")
    settings = load_settings(a.config, _overrides(a))
    write = write_causal_artifact if a.task == "causal-lm" else write_artifact
    if a.task == "causal-lm":
        labels = ["-", "-."]  # a language model has no classes; the task needs a placeholder label set
    elif a.num_labels is not None:
        if not 2 <= a.num_labels <= 100_000:
            raise ConfigError("--num-labels must be in [2, 100000]")
        labels = [str(i) for i in range(a.num_labels)]
    else:
        labels = task_labels(settings.data, settings.fleet.seed)
    task = settings.task(labels)
    with Console(stderr=True).status(f"exporting the {task.method} training program of {task.model.name}"):
        manifest = write(task, Path(a.out), xnnpack=not a.no_xnnpack, force=a.force)
    print(json.dumps({"out": a.out, "adapter": manifest.adapter, "methods": manifest.methods,
                      "program_bytes": manifest.program.bytes, "base_bytes": manifest.data.bytes,
                      "trainable_tensors": len(manifest.tensors), "batch_size": manifest.shape.batch_size,
                      "max_length": manifest.shape.max_length}))
    return 0


def _run_simulate(a: argparse.Namespace) -> int:
    from aggregator.strategies import strategy_class
    from edge_client.engines import ENGINES
    from edgemole.config import EXPERT_METHODS, load_settings_with_defaults
    from edgemole.errors import ConfigError
    from fleet.simulate import simulate

    if a.secure_dir:  # the fleet and prefix the directory's ACL was written for, unless given
        from edgemole.security import FleetDir

        meta = FleetDir.load(a.secure_dir).meta
        a.fleet = a.fleet or meta["fleet"]
        a.topic_prefix = a.topic_prefix or meta["prefix"]
    credentials = _credentials(a)
    settings, applied = load_settings_with_defaults(a.config, _overrides(a))
    strategy_class(settings.fleet.method)
    if line := applied.line():
        print(line, flush=True)
    if settings.fleet.method in EXPERT_METHODS:
        from aggregator.assignment import feasible_holders

        am = settings.amole
        feasible_holders(am.experts, settings.simulate.clients, am.holders, am.top_k, am.slots)
    if settings.simulate.engine not in ENGINES:
        raise ConfigError(f"unknown engine {settings.simulate.engine!r} (available: {', '.join(ENGINES)})")
    on_program = settings.simulate.engine == "executorch" or settings.simulate.native_clients > 0
    if on_program and settings.train.dropout:
        settings.train.dropout = False  # the exported program has no dropout; the whole fleet trains alike
        print("note: clients on the exported program train without dropout (train.dropout = false)",
              file=sys.stderr)
    if a.plot and not a.plot.lower().endswith(".png"):
        raise ConfigError(f"--plot file '{a.plot}' must end in .png")
    simulate(settings, broker=a.broker, json_out=a.json_out, plot_out=a.plot, work_dir=a.work_dir,
             log_level=a.log_level, credentials=credentials, secure_dir=a.secure_dir)
    return 0


def _run_broker(a: argparse.Namespace) -> int:
    from edgemole.errors import ConfigError
    from edgemole.protocol import DEFAULT_MAX_MESSAGE_BYTES
    from edgemole.security import add_device, init_broker_dir, revoke_device

    if a.broker_command == "init":
        if a.max_message_bytes is not None and not 1024 <= a.max_message_bytes <= 256 * 2**20:
            raise ConfigError("--max-message-bytes must be in [1024, 268435456]")
        if "{id}" not in a.device_root and not a.local_paths:
            raise ConfigError("--device-root must contain {id}")
        fd = init_broker_dir(a.dir, a.fleet, a.devices, host=a.host, server_names=a.server_names, bind=a.bind,
                             port=a.port, password_port=a.password_port, prefix=a.topic_prefix,
                             max_message_bytes=a.max_message_bytes or DEFAULT_MAX_MESSAGE_BYTES,
                             device_root=None if a.local_paths else a.device_root, broker_root=a.broker_root,
                             force=a.force)
        print(json.dumps({"dir": str(fd.path), "fleet": fd.meta["fleet"], "devices": fd.devices,
                          "broker_config": str(fd.broker_dir / "mosquitto.conf"), "certificate_url": fd.url(),
                          "password_url": fd.url(password=True)}))
    elif a.broker_command == "add-device":
        print(json.dumps({"device": a.device, "files": str(add_device(a.dir, a.device)),
                          "next": "reload the broker: kill -HUP <mosquitto pid> (systemctl reload mosquitto)"}))
    else:
        revoke_device(a.dir, a.device)
        print(json.dumps({"revoked": a.device,
                          "next": "restart the broker (systemctl restart mosquitto): it reads the CRL at start"}))
    return 0


def _run_bench(a: argparse.Namespace) -> int:
    from edgemole.errors import ConfigError
    from fleet.bench import bench, load_bench_settings, parse_list

    for dest, flag, instead in (("method", "--method", "--methods"), ("seed", "--seed", "--seeds"),
                                ("upload_rank", "--upload-rank", "--ranks"),
                                ("min_clients", "--min-clients", "--clients"),
                                ("deadline", "--deadline", "nothing: rounds end when every client answered")):
        if getattr(a, dest, None) is not None:
            raise ConfigError(f"bench takes {instead} instead of {flag}")
    lists = {"methods": str, "ranks": int, "alphas": float, "seeds": int}
    grid = {name: None if getattr(a, name) is None else parse_list(getattr(a, name), kind, f"--{name}")
            for name, kind in lists.items()}
    grid.update(out=a.out, global_test_size=a.global_test_size, jobs=a.jobs, threads=a.bench_threads)
    settings, cfg = load_bench_settings(a.config, _overrides(a), grid)
    bench(settings, cfg)
    return 0


#: exit status of ``simulate`` stopped by SIGTERM (128 + 15, as a shell reports a killed process)
TERMINATED_EXIT = 143


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM, so that the ``finally`` and ``with`` blocks stop the child processes
    (broker, roles, workers) and the interpreter exits normally: a process killed by the default action leaves the
    multiprocessing resource tracker to warn about leaked semaphores. A BaseException, so that no ``except
    Exception`` on the way out swallows it."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    a = parser.parse_args(argv)
    # simulate only: bench's worker pool would wait for its running runs on the way out (they end with their parent)
    if a.command == "simulate" and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    quiet = ("simulate", "bench", "export", "broker", "flash", "fleet")
    a.log_level = a.log_level or ("WARNING" if a.command in quiet else "INFO")
    logging.basicConfig(level=a.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    for noisy in ("torchao", "torch.utils._pytree"):  # optional-kernel notices from executorch's torchao
        logging.getLogger(noisy).setLevel(logging.ERROR)
    runners = {"simulate": _run_simulate, "aggregator": _run_aggregator, "client": _run_client,
               "bench": _run_bench, "export": _run_export, "broker": _run_broker, "flash": _run_flash,
               "fleet": _run_fleet}
    try:
        code = runners[a.command](a)
    except EdgemoleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        code = 130
    except Terminated:
        print("stopped by SIGTERM", file=sys.stderr)
        code = TERMINATED_EXIT
    sys.exit(code)
