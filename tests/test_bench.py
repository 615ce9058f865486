"""``edgemole bench``: the in-memory transport, wire accounting of in-memory runs, the command, its results."""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import REPO

from edgemole.errors import BrokerError, ConfigError
from edgemole.protocol import decode
from fleet.bench import (
    BenchConfig,
    _identity,
    add_result,
    defaults_lines,
    load_bench_settings,
    load_results,
    plan_runs,
    prepare_cells,
    prepare_out,
    run_one,
)
from fleet.bench_report import by_example_accuracy, summarize
from fleet.cli import main
from fleet.memory_link import MemoryBroker, MemoryLink

PNG = b"\x89PNG\r\n\x1a\n"


def _link(broker: MemoryBroker, name: str, *topics: str) -> MemoryLink:
    link = MemoryLink(broker, name)
    link.connect()
    link.subscribe(*topics)
    return link


def test_memory_link_routes_by_filter_and_keeps_retained_messages() -> None:
    broker = MemoryBroker()
    pub = _link(broker, "pub")
    pub.publish("f/round", b"r1", retain=True)
    sub = _link(broker, "sub", "f/+/status", "f/round", "g/#")
    first = sub.receive(0)
    assert (first.topic, first.payload, first.retain) == ("f/round", b"r1", True)  # retained, on subscription
    pub.publish("f/round", b"r2", retain=True)
    live = sub.receive(0)
    assert (live.payload, live.retain) == (b"r2", False)  # a live delivery never carries the flag (MQTT 3.1.1)
    for topic in ("f/a/status", "f/a/b/status", "g", "g/x/y", "h/a/status"):
        pub.publish(topic, topic.encode())
    assert [sub.receive(0).topic for _ in range(3)] == ["f/a/status", "g", "g/x/y"]
    assert sub.receive(0) is None
    pub.publish("f/round", b"", retain=True)  # an empty retained payload clears the topic...
    assert sub.receive(0).payload == b""  # ...and still reaches subscribers
    late = _link(broker, "late", "f/#")
    assert late.receive(0) is None
    assert pub.bytes_out == len(b"r1r2") + sum(len(t) for t in ("f/a/status", "f/a/b/status", "g", "g/x/y",
                                                                   "h/a/status"))
    assert sub.bytes_in == len(b"r1r2") + len(b"f/a/statusgg/x/y")
    pub.close()
    with pytest.raises(BrokerError):
        pub.publish("f/round", b"x")


def test_memory_link_lets_served_participants_work_while_one_waits() -> None:
    broker = MemoryBroker(stall_timeout_s=0.2)
    waiter = _link(broker, "aggregator", "up/#")
    order: list[str] = []
    for name in ("c1", "c2"):
        link = _link(broker, name, f"down/{name}")

        def handle(inbound, link=link, name=name) -> None:  # noqa: ANN001
            order.append(f"{name}:{inbound.payload.decode()}")
            link.publish(f"up/{name}", inbound.payload + b"!")

        link.serve(handle)
    waiter.publish("down/c1", b"a")
    waiter.publish("down/c2", b"b")
    waiter.publish("down/c1", b"c")
    started = time.monotonic()
    answers = [waiter.receive(30) for _ in range(3)]
    assert [(a.topic, a.payload) for a in answers] == [("up/c1", b"a!"), ("up/c2", b"b!"), ("up/c1", b"c!")]
    assert order == ["c1:a", "c2:b", "c1:c"]  # one message each, in turn
    assert waiter.receive(30) is None  # nobody has work: at once, not after the timeout
    assert time.monotonic() - started < 1.0
    with pytest.raises(BrokerError, match="stalled"):  # waiting on with nothing that can happen: a dead fleet
        while True:
            waiter.receive(0.01)


@pytest.fixture
def tiny_settings(tiny_model: str):  # noqa: ANN201
    return load_bench_settings(None, {
        "model": {"name": tiny_model, "max_length": 16},
        "lora": {"r": 2, "alpha": 4.0, "dropout": 0.0},
        "train": {"local_steps": 2, "batch_size": 8},
        "data": {"samples_per_domain": 20},
        "simulate": {"clients": 3},
        "fleet": {"rounds": 2},
    }, {"methods": ["fedit"], "ranks": [2], "alphas": [0.5], "seeds": [0], "global_test_size": 10})


def test_in_memory_run_counts_exactly_the_wire_payloads(tiny_settings, tmp_path: Path,  # noqa: ANN001
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    settings, cfg = tiny_settings
    (spec,) = prepare_cells(plan_runs(settings, cfg), tmp_path)
    sent: list[tuple[str, bytes]] = []
    route = MemoryBroker.route
    monkeypatch.setattr(MemoryBroker, "route", lambda self, topic, payload, retain: (
        sent.append((topic, payload)), route(self, topic, payload, retain)))
    rounds: list[int] = []
    record = run_one(spec, lambda brief: rounds.append(brief["round"]))
    assert rounds == [1, 2, 3]
    updates = [decode(p) for t, p in sent if t.endswith("/update")]
    assert len(updates) == 3 * 3  # 3 clients x (2 rounds + final evaluation)
    assert record["bytes_up"] == sum(len(p) for t, p in sent if t.endswith("/update"))
    assert record["bytes_down"] == sum(len(p) for t, p in sent if t.endswith("/assign"))
    assert record["params_up"] == sum(t.numel() for m in updates for t in m.tensors.values()) > 0
    assert record["params_down"] == sum(t.numel() for t, p in sent if t.endswith("/assign")
                                        for t in decode(p).tensors.values())
    assert len(record["accuracy_curve"]) == 3 and 0 <= record["global_accuracy"] <= 1
    assert record["global_test"]["examples"] == 10 and record["global_accuracy_std"] is None


def _bench(tmp_path: Path, tiny_model: str, capsys: pytest.CaptureFixture[str], *args: str) -> str:
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--model", tiny_model, "--clients", "4", "--rounds", "1", "--local-steps", "1",
              "--samples-per-domain", "20", "--max-length", "16", "--alphas", "0.5", "--seeds", "0,1",
              "--global-test-size", "20", "--out", str(tmp_path / "out"), *args])
    out, err = capsys.readouterr()
    assert exc.value.code == 0, err
    return out


def test_bench_writes_results_and_extends_them(tmp_path: Path, tiny_model: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = _bench(tmp_path, tiny_model, capsys, "--methods", "fedit,fedamole", "--ranks", "2")
    assert "4 to run" in out and "edgemole bench" in out
    folder = tmp_path / "out"
    runs = json.loads((folder / "results.json").read_text())["runs"]
    assert sorted((r["method"], r["seed"]) for r in runs) == [("fedamole", 0), ("fedamole", 1), ("fedit", 0),
                                                              ("fedit", 1)]
    assert all(r["bytes_up"] > 0 and r["params_up"] > 0 and len(r["accuracy_curve"]) == 2 for r in runs)
    fedamole = [r for r in runs if r["method"] == "fedamole"]
    assert all(r["global_accuracy_std"] is not None for r in fedamole)  # one model per client
    with open(folder / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 and all(0 <= float(r["personalised_accuracy_by_example"]) <= 1 for r in rows)
    with open(folder / "summary.csv") as fh:
        summary = list(csv.DictReader(fh))
    assert [(r["method"], r["seeds"]) for r in summary] == [("fedit", "2"), ("fedamole", "2")]
    md = (folder / "summary.md").read_text()
    assert "| fedit | 2 | 0.5 | 2 |" in md and "| fedamole | 2 | 0.5 | 2 |" in md and "4 clients" in md
    for png in ("accuracy_rounds.png", "accuracy_vs_bytes.png"):
        assert (folder / png).read_bytes()[:8] == PNG

    # a larger grid into the same folder runs only what is missing; an A2 method's rank is its upload budget
    out = _bench(tmp_path, tiny_model, capsys, "--methods", "fedit,lora-a2", "--ranks", "2", "--rank", "4")
    assert "2 already in" in out and "2 to run" in out
    again = json.loads((folder / "results.json").read_text())["runs"]
    assert again[:4] == runs
    a2 = [r for r in again if r["method"] == "lora-a2"]
    assert len(a2) == 2 and all(r["config"]["a2"]["upload_rank"] == 2 and r["lora_r"] == 4 for r in a2)
    assert "| lora-a2 | 2/4 | 0.5 | 2 |" in (folder / "summary.md").read_text()


def test_by_example_accuracy_weights_each_client_by_its_test_split() -> None:
    """A one-row client counts once among all test rows, not as a tenth of the mean; the deployed model's figure is
    used, the received one where a client deployed nothing else (as the aggregator's mean does)."""
    clients = {"tiny": {"acc_before": 0.0, "acc_deployed": 1.0, "num_test": 1},
               "large": {"acc_before": 0.5, "num_test": 3}, "silent": {"num_test": 0}}
    assert by_example_accuracy({"service": {"final": {"clients": clients}}}) == pytest.approx((1.0 + 1.5) / 4)
    assert by_example_accuracy({"key": "older record"}) is None
    record = {"setup": "s", "dataset": "d", "method": "fedit", "rank": 8, "lora_r": 8, "partition": "dirichlet:0.1",
              "alpha": 0.1, "personalised_accuracy": 0.9, "service": {"final": {"clients": clients}}}
    row = summarize([record])[0]
    assert row["by_example_acc_mean"] == pytest.approx(0.625) and row["personalised_acc_mean"] == 0.9


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize(("args", "needle"), [
    (["--methods", "fedmagic"], "unknown method 'fedmagic'"),
    (["--methods", ","], "--methods must not be empty"),
    (["--seeds", ""], "--seeds must not be empty"),
    (["--ranks", "0"], "bench.ranks"),
    (["--ranks", "two"], "--ranks takes comma-separated ints"),
    (["--alphas", "0.5,-1"], "bench.alphas"),
    (["--seeds", "-1"], "bench.seeds"),
    (["--jobs", "0"], "bench.jobs"),
    (["--global-test-size", "-5"], "bench.global_test_size"),
    (["--method", "fedit"], "--methods instead of --method"),
    (["--partition", "bogus"], "invalid partition 'bogus'"),
    (["--partition", "iid", "--alphas", "0.5"], "bench.alphas varies a Dirichlet partition, but data.partition is iid"),
    (["--partition", "dirichlet:0.1", "--alphas", "0.5"], "data.partition dirichlet:0.1 and bench.alphas 0.5 disagree"),
    (["--rounds", "0"], "fleet.rounds"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_bench_input_is_one_line(capsys: pytest.CaptureFixture[str], args: list[str], needle: str) -> None:
    assert needle in _one_line_error(capsys, ["bench", *args])


def test_bad_out_folder_and_results_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    afile = tmp_path / "file"
    afile.write_text("x")
    assert "is a file" in _one_line_error(capsys, ["bench", "--out", str(afile)])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "results.json").write_text("[1, 2]")
    assert "not an edgemole bench results file" in _one_line_error(capsys, ["bench", "--out", str(tmp_path / "other")])


def _add_runs(out: Path, writer: int, count: int) -> None:
    for i in range(count):
        add_result(out, {"key": f"w{writer}-{i}", "writer": writer})


def _run_side_by_side(target: Callable[..., None], args: list[tuple]) -> None:
    """Run ``target`` once per argument tuple, all in processes at once, and require every one to exit 0."""
    ctx = multiprocessing.get_context("fork")  # the targets only touch files; fork keeps the tests quick
    procs = [ctx.Process(target=target, args=a) for a in args]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0


def test_benches_sharing_a_folder_keep_each_others_runs(tmp_path: Path) -> None:
    add_result(tmp_path, {"key": "old", "writer": -1})
    add_result(tmp_path, {"key": "old", "writer": -2})  # a rerun of a run replaces it
    _run_side_by_side(_add_runs, [(tmp_path, w, 30) for w in range(4)])
    runs = load_results(tmp_path)
    assert sorted(r["key"] for r in runs) == sorted(["old"] + [f"w{w}-{i}" for w in range(4) for i in range(30)])
    assert next(r for r in runs if r["key"] == "old")["writer"] == -2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # no lock or temporary file left


def _prepare_many(out: Path, times: int) -> None:
    for _ in range(times):
        prepare_out(str(out))


def test_benches_started_side_by_side_both_pass_the_write_check(tmp_path: Path) -> None:
    _run_side_by_side(_prepare_many, [(tmp_path, 300)] * 4)  # no bench's write probe is removed by another
    assert list(tmp_path.iterdir()) == []


def test_bench_section_of_config_file(tmp_path: Path) -> None:
    path = tmp_path / "bench.toml"
    path.write_text('[bench]\nmethods = ["fedit", "lora-a2"]\nranks = [8, 1]\nalphas = [0.1]\nout = "x"\n'
                    '[fleet]\nrounds = 3\n')
    settings, cfg = load_bench_settings(path, {"fleet": {"rounds": None}}, {"seeds": [1, 2]})
    assert (cfg.methods, cfg.ranks, cfg.alphas, cfg.seeds, cfg.out) == (["fedit", "lora-a2"], [8, 1], [0.1], [1, 2],
                                                                        "x")
    assert settings.fleet.rounds == 3
    specs = plan_runs(settings, cfg)
    assert len(specs) == 2 * 2 * 2 and len({s.key for s in specs}) == 8
    by = {(s.method, s.rank, s.seed): s for s in specs}
    assert by[("lora-a2", 1, 1)].settings["a2"]["upload_rank"] == 1 and by[("lora-a2", 1, 1)].settings["lora"]["r"] == 8
    assert by[("fedit", 1, 1)].settings["lora"]["r"] == 1
    assert len({s.setup for s in specs}) == 1  # the grid's axes are not part of the setup
    path.write_text("[bench]\nmethodz = []\n")
    with pytest.raises(ConfigError, match="bench.methodz"):
        load_bench_settings(path, {}, {})
    assert BenchConfig(methods=["fedit", "fedit"]).methods == ["fedit"]


@pytest.mark.slow
def test_in_memory_run_equals_the_mqtt_fleet(tmp_path: Path, tiny_model: str) -> None:
    """Same settings, same data, no dropout: the in-memory bench and ``edgemole simulate`` (processes over MQTT)
    train the same numbers and put the same tensors on the wire."""
    import shutil

    import torch
    from transformers import BertConfig, BertModel

    model = tmp_path / "tiny-no-dropout"
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0)).save_pretrained(model)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (Path(tiny_model) / name).exists():
            shutil.copy(Path(tiny_model) / name, model / name)
    common = ["--model", str(model), "--clients", "2", "--rounds", "2", "--local-steps", "2", "--max-length", "16",
              "--samples-per-domain", "20", "--lora-dropout", "0"]
    sim = tmp_path / "sim.json"
    proc = subprocess.run([sys.executable, "-m", "fleet", "simulate", *common, "--method", "fedit", "--rank", "2",
                           "--seed", "0", "--partition", "dirichlet:0.5", "--threads", "1", "--json-out", str(sim)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "fleet", "bench", *common, "--methods", "fedit", "--ranks", "2",
                           "--seeds", "0", "--alphas", "0.5", "--out", str(tmp_path / "b")],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    mqtt = json.loads(sim.read_text())
    (mem,) = json.loads((tmp_path / "b" / "results.json").read_text())["runs"]
    assert mem["accuracy_curve"] == mqtt["accuracy_curve"]
    assert [r["train_loss"] for r in mem["service"]["rounds"]] == [r["train_loss"] for r in mqtt["rounds"]]
    assert mem["bytes_down"] == mqtt["bytes_down_total"]
    assert mem["params_up"] == mqtt["params_up_total"]
    # the same tensors; the bench's updates lack the after-training metrics (bench skips that evaluation)
    updates = 2 * 3
    assert 0 < mqtt["bytes_up_total"] - mem["bytes_up"] < 100 * updates


def test_worker_exits_when_the_bench_process_is_killed():
    """A bench worker whose parent dies (SIGKILL, no clean-up) ends instead of running on as an orphan."""
    parent_code = textwrap.dedent("""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c",
            "import time; from fleet.bench import exit_with_parent; exit_with_parent(0.05); "
            "print('ready', flush=True); time.sleep(600)"], stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "ready"
        print(child.pid, flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True)
    child_pid = int(parent.stdout.readline())
    os.kill(child_pid, 0)  # the worker is alive while its parent is
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            os.kill(child_pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(child_pid, signal.SIGKILL)
        raise AssertionError("the worker outlived its killed parent")


def test_bench_runs_a_column_partition_and_records_it(tmp_path: Path, tiny_model: str,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """``--partition column:domain`` (as simulate takes it): one partition, no alpha axis, recorded and reported."""
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--model", tiny_model, "--clients", "3", "--rounds", "1", "--local-steps", "1",
              "--samples-per-domain", "20", "--max-length", "16", "--seeds", "0", "--methods", "fedit", "--ranks", "2",
              "--partition", "column:domain", "--global-test-size", "20", "--out", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert exc.value.code == 0, err
    assert "partition column:domain" in out and "fedit defaults: train.lr=0.01" in out
    assert "fedit r2 column:domain s0 round 1 train: 3/3 clients, acc" in out  # not a terminal: a line per round
    assert "messages: 0 rejected" in out
    (run,) = json.loads((tmp_path / "out" / "results.json").read_text())["runs"]
    assert run["partition"] == "column:domain" and run["alpha"] is None
    assert run["config"]["data"]["partition"] == "column:domain"
    assert run["method_defaults"] == {"train.lr": 0.01} and run["config"]["train"]["lr"] == 0.01
    assert all(name.startswith(f"client-{i}-") for i, name in enumerate(run["data"]["clients"]))  # the domain
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "| fedit | 2 | column:domain | 1 |" in md and "partition `column:domain`" in md
    assert "| method | rank | partition |" in md


def test_config_partition_is_kept_and_alphas_apply_to_dirichlet_only(tmp_path: Path) -> None:
    path = tmp_path / "bench.toml"
    path.write_text('[data]\npartition = "dirichlet:0.1"\n[bench]\nmethods = ["fedit"]\n')
    settings, cfg = load_bench_settings(path, {}, {})
    assert [(s.partition, s.alpha) for s in plan_runs(settings, cfg)] == [("dirichlet:0.1", 0.1)]
    settings, cfg = load_bench_settings(path, {"data": {"partition": "quantity:2"}}, {})  # a flag wins
    assert [(s.partition, s.alpha) for s in plan_runs(settings, cfg)] == [("quantity:2", None)]
    settings, cfg = load_bench_settings(None, {}, {"methods": ["fedit"], "alphas": [0.5, 0.1]})  # unset: the axis
    assert [s.partition for s in plan_runs(settings, cfg)] == ["dirichlet:0.5", "dirichlet:0.1"]
    with pytest.raises(ConfigError, match="disagree"):
        plan_runs(*load_bench_settings(path, {}, {"alphas": [0.5]}))


def test_keys_of_earlier_runs_stay_and_method_defaults_decide_per_run() -> None:
    """A run whose settings equal an earlier grid's keeps its key: settings added since (at their defaults) and
    the automatic C (for methods where C = 2 ran the same fleet) leave it unchanged."""
    settings, cfg = load_bench_settings(None, {"train": {"lr": 0.005}, "simulate": {"clients": 10}},
                                        {"methods": ["fedit", "fedamole", "lora-a2"], "ranks": [8]})
    specs = {s.method: s for s in plan_runs(settings, cfg)}
    for method in ("fedit", "fedamole"):  # C=2 on 10 devices (E=8, k=2) was raised to 3, auto's C
        legacy = json.loads(json.dumps(specs[method].settings))
        legacy["amole"]["holders"] = 2
        for section, name in (("fleet", "robust"), ("fleet", "max_samples"), ("a2", "warm_start")):
            legacy[section].pop(name)  # not in records made before these settings existed
        assert _identity(legacy, cfg.global_test_size)[0] == specs[method].key
    assert specs["fedit"].method_defaults == {} and specs["fedit"].settings["train"]["lr"] == 0.005  # config wins
    assert specs["lora-a2"].method_defaults == {"a2.b_lr_multiplier": 1.0}
    assert specs["lora-a2"].settings["a2"]["b_lr_multiplier"] == 1.0
    assert len({s.setup for s in specs.values()}) == 1  # per-method values do not split the comparison
    settings, cfg = load_bench_settings(None, {"a2": {"b_lr_multiplier": 3.0}}, {"methods": ["lora-a2"]})
    (spec,) = plan_runs(settings, cfg)
    assert spec.settings["a2"]["b_lr_multiplier"] == 3.0 and spec.settings["train"]["lr"] == 0.01  # a flag wins


def test_a_bench_config_sets_a_method_its_own_values(tmp_path: Path) -> None:
    """``[bench.method_settings]`` (e.g. a data set's own rates): over the method's defaults
    and the shared sections, for that method only, dotted or nested, and in the run's record; the setup is shared."""
    path = tmp_path / "b.toml"
    path.write_text(textwrap.dedent("""
        [train]
        local_steps = 4
        [bench]
        methods = ["fedit", "lora-a2", "fedamole"]
        [bench.method_settings]
        fedit = { "train.lr" = 0.01 }
        lora-a2 = { train = { lr = 0.005, local_steps = 6 } }
    """))
    specs = {s.method: s for s in plan_runs(*load_bench_settings(path, {}, {}))}
    assert specs["fedit"].settings["train"]["lr"] == 0.01 and specs["fedit"].method_defaults == {"train.lr": 0.01}
    assert specs["lora-a2"].settings["train"] | {"lr": 0, "local_steps": 0} == specs["fedit"].settings["train"] | {
        "lr": 0, "local_steps": 0}
    assert (specs["lora-a2"].settings["train"]["lr"], specs["lora-a2"].settings["train"]["local_steps"]) == (0.005, 6)
    assert specs["lora-a2"].settings["a2"]["b_lr_multiplier"] == 1.0  # its other defaults still apply
    assert specs["fedamole"].settings["train"]["lr"] == 0.005 and specs["fedamole"].settings["train"][
        "local_steps"] == 4  # another method: untouched
    assert len({s.setup for s in specs.values()}) == 1
    assert "for this method in the bench config: train.lr=0.005 train.local_steps=6" in "\n".join(
        defaults_lines(*load_bench_settings(path, {}, {})))
    for bad, needle in (('fedit = { "lr" = 0.01 }', "not section.name"), ('fedit = { "nope.lr" = 1 }', "not section"),
                        ('nope = { "train.lr" = 0.01 }', "nope"), ('fedit = { "train.nope" = 1 }', "train.nope"),
                        ('fedit = { "train.lr" = "fast" }', "train.lr")):
        path.write_text(f"[bench]\nmethods = [\"fedit\"]\n[bench.method_settings]\n{bad}\n")
        with pytest.raises(ConfigError, match=needle):
            plan_runs(*load_bench_settings(path, {}, {}))
