"""The native client (devices/native, ``edgemole-device``) against the Python client, in the same run.

For MiniLM with the default expert configuration of fedamole-a2 (batch 16 x 32 tokens, no dropout), one runtime
thread per client unless stated: exports the artifact (or reuses ``--artifact``), builds the native client, then
measures

1. the training step: native client, Python client on the ExecuTorch engine, Python client on eager PyTorch, the
   same batches (a client whose every text fills 32 tokens, a ``train`` round of ``--steps`` steps; each client
   times its own step loop and reports it as ``train_s`` in the update's metrics);
2. a whole fedamole-a2 round (train-B: evaluation, probe, training, evaluation, RSEA, encoding the update) of a
   200-example BANKING77 client (160 train / 40 test), wall time from receiving the assignment to the update;
3. the step's floating-point work (FlopCounterMode on the eager model, and the analytic count) against this CPU's
   fp32 peak (nominal from lscpu, practical from a one-thread sgemm), and a Raspberry Pi 5 prediction;
4. peak resident memory of a native and of a Python client doing that round, and where the native one goes;
5. install size: the binary and the shared libraries it needs (x86-64 and, if built, aarch64) against the Python
   client's packages;
6. prediction latency of one text (``edgemole-device predict``) against the Python engines.

Clients alternate repeat by repeat, so that they see the same machine; figures are medians over ``--repeats``.
The native client runs ``edgemole-device round`` with named pipes for its task, assignment and update files: it
blocks on each pipe, so the round is timed from handing it the assignment to its opening the update pipe, without
process start or model loading, and its memory is read from /proc at those points.

    python benchmarks/native_client.py --out native-client.json      # exports the artifact first (5 minutes)
    python benchmarks/native_client.py --artifact /tmp/art --repeats 3  # exports to /tmp/art once, then reuses it
    python benchmarks/native_client.py --artifact /tmp/art --variant /tmp/other-build/edgemole-device
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import importlib.metadata as md
import json
import os
import platform
import random
import re
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BANKING77 = REPO.parent / "shared" / "datasets" / "banking77" / "train.csv"  # datasets live next to the repository
FLEET, RUN, CLIENT = "bench", "bench-run", "dev-0"
PI5_PEAK, PI5_CORES, PI5_MATMUL = 154e9, 4, 57e9  # fp32 FLOP/s: 4 x Cortex-A76 @ 2.4 GHz; best published sgemm


# -- small helpers --------------------------------------------------------------------------------------------------
def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def proc_memory(pid: int | str = "self") -> dict[str, float]:
    """VmRSS, VmHWM (the process's own peak), RssAnon (malloc'd and other anonymous memory) and RssFile (mapped
    files: code, and the artifact when memory-mapped; clean pages the kernel can drop and read again) in MiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:", "RssAnon:", "RssFile:")):
            out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return out


def smaps_breakdown(pid: int) -> dict[str, float]:
    """Resident MiB of a process by what its mappings hold."""
    cats: dict[str, float] = {}
    current = "other"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        parts = line.split()
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            path = parts[5] if len(parts) > 5 else ""
            name = Path(path).name
            if path in ("", "[heap]"):
                current = "anonymous memory (heap, malloc'd buffers)"
            elif path == "[stack]":
                current = "stack"
            elif name == "edgemole-device":
                current = "client binary (code and data)"
            elif name.startswith("libexecutorch"):
                current = "ExecuTorch runtime libraries"
            elif ".so" in name:
                current = "system shared libraries"
            elif name.endswith((".pte", ".ptd")):
                current = "artifact files (mapped)"
            else:
                current = "other"
        elif parts and parts[0] == "Rss:":
            cats[current] = cats.get(current, 0.0) + int(parts[1]) / 1024
    return dict(sorted(cats.items(), key=lambda kv: -kv[1]))


def load_average() -> float:
    return os.getloadavg()[0]


def cpu_model() -> str:
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


# -- the task, data and messages ------------------------------------------------------------------------------------
def build_task(labels: list[str], method: str):  # noqa: ANN201 (TaskSpec; edgemole is imported lazily)
    from edgemole.config import Settings

    settings = Settings()
    settings.fleet.method = method
    settings.train.dropout = False
    settings.train.batch_size, settings.model.max_length = 16, 32
    return settings.task(labels)


def banking_rows(path: Path) -> list[tuple[str, str]]:
    with open(path, newline="") as f:
        return [(r["text"], r["category"]) for r in csv.DictReader(f)]


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(rows)
    return path


def write_clients(work: Path, rows: list[tuple[str, str]], tokenizer: object) -> dict[str, list[str]]:
    """``banking``: 200 BANKING77 rows drawn with seed 0 (160 train / 40 test). ``full``: 200 texts of five
    BANKING77 questions each, so that every row fills all 32 tokens (the step's worst case; the eager engine cuts
    batches after their longest real sequence, the program always runs 32)."""
    sample = random.Random(0).sample(rows, 200)
    full = [(" ".join(rows[(7 * i + k * 1009) % len(rows)][0] for k in range(5)), rows[7 * i % len(rows)][1])
            for i in range(200)]
    short = [t for t, _ in full if sum(tokenizer(t, truncation=True, max_length=32)["attention_mask"]) < 32]
    if short:
        raise SystemExit(f"{len(short)} 'full' rows do not fill 32 tokens")
    out = {}
    for name, data in (("banking", sample), ("full", full)):
        out[name] = [str(write_csv(work / f"{name}.train.csv", data[:160])),
                     str(write_csv(work / f"{name}.test.csv", data[160:]))]
    return out


def assignment(task, wire, phase: str, rnd: int, steps: int) -> bytes:  # noqa: ANN001
    """An assignment as the aggregator would send it: every module holds M = slots of the fleet's experts (a
    rotation), tensors the fleet's initial state plus noise (B != 0, as after a few rounds)."""
    import torch

    from aggregator.strategies.lora_a2 import a2_expectation
    from edgemole.protocol import Kind, Message, encode

    slots, experts = task.amole.slots, task.amole.experts
    body: dict = {"run": RUN, "local_steps": steps,
                  "experts": {m: [(i + j) % experts for j in range(slots)] for i, m in enumerate(wire.layers)}}
    full, _ = wire.initial_fleet_state()
    spec = wire.assignment_spec(body)
    gen = torch.Generator().manual_seed(rnd)
    tensors = {n: full[n] + 0.02 * torch.randn(full[n].shape, generator=gen) for n in spec}
    roles = {n: s.role for n, s in spec.items()}
    if phase in ("train-A", "train-B"):
        body["train_roles"] = a2_expectation(tensors, roles, phase)[1]
    return encode(Message(Kind.ASSIGN, FLEET, rnd, phase, CLIENT, body, tensors, roles))


# -- step FLOPs and this CPU's peak ----------------------------------------------------------------------------------
def analytic_flops(config: object, task, batch: int, length: int, modules: int) -> dict:  # noqa: ANN001
    """Matmul FLOPs (2 per multiply-add) of one training step with a frozen base. Forward: per layer the Q, K, V,
    O and two FFN matmuls, 2T(4h^2 + 2hf) for T = B*S tokens, and the two attention products, 4BS^2h; per AMoLE
    module the M slot experts and the shared one (A: r x h, B: h x r) and the router (M x h),
    T(4rh(M+1) + 2hM). Backward: the input gradient of every base matmul (the same FLOPs as its forward) except
    layer 0's Q, K and V (the embeddings need no gradient), both operands' gradients of the attention products
    (twice their forward), and input plus weight gradients of the adapters (twice their forward). The head and
    element-wise work are left out (below 0.1%)."""
    h, f, n_layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    r, m, t = task.lora.r, task.amole.slots, batch * length
    linear = 2 * t * (4 * h * h + 2 * h * f)
    attention = 4 * batch * length * length * h
    adapters = modules * t * (4 * r * h * (m + 1) + 2 * h * m)
    forward = n_layers * (linear + attention) + adapters
    backward = n_layers * linear - 3 * 2 * t * h * h + 2 * n_layers * attention + 2 * adapters
    return {"forward": forward, "backward": backward, "total": forward + backward,
            "formula": "forward L(2T(4h^2+2hf) + 4BS^2h) + A T(4rh(M+1) + 2hM); "
                       "backward L 2T(4h^2+2hf) - 6Th^2 + 2L 4BS^2h + 2A T(4rh(M+1) + 2hM)"}


def counted_flops(engine, batch) -> dict:  # noqa: ANN001
    """FlopCounterMode over the eager model's forward and backward (base frozen, as the engine trains)."""
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    model = engine.model
    model.train(False)
    model.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as fwd:
        loss = F.cross_entropy(model(batch.input_ids, batch.attention_mask), batch.labels)
        loss = loss + engine.wire.auxiliary_loss()
    with FlopCounterMode(display=False) as bwd:
        loss.backward()
    model.zero_grad(set_to_none=True)
    return {"forward": fwd.get_total_flops(), "backward": bwd.get_total_flops(),
            "total": fwd.get_total_flops() + bwd.get_total_flops()}


def sgemm_peak(threads: int, n: int = 3072, repeats: int = 5) -> float:
    """FLOP/s of a large fp32 matmul (torch's CPU BLAS) with ``threads`` threads: this machine's practical peak."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    torch.set_num_threads(old)
    return 2 * n**3 / median(times)


def nominal_peak() -> dict:
    """fp32 FLOP/s per core from lscpu: SIMD lanes x 2 (FMA) x FMA units x clock. lscpu shows neither the FMA
    units per core nor the turbo clock in a VM: two 512-bit units (Xeon Scalable) and the nominal (TSC) clock are
    assumptions, stated in the result."""
    text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("Flags:")), [])
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    fma = 2 if "fma" in flags else 1
    units = 2
    mhz = next((float(ln.split(":")[1]) for ln in text.splitlines() if ln.startswith("CPU max MHz:")), None)
    source = "CPU max MHz"
    if mhz is None:
        bogo = next((float(ln.split(":")[1]) for ln in text.splitlines() if ln.startswith("BogoMIPS:")), 0.0)
        mhz, source = bogo / 2, "BogoMIPS / 2 (the TSC clock)"
    return {"per_core": lanes * fma * units * mhz * 1e6, "lanes": lanes, "fma_units_assumed": units,
            "clock_mhz": mhz, "clock_source": source}


# -- the native client ----------------------------------------------------------------------------------------------
def _open_writer(path: Path, proc: subprocess.Popen) -> int:
    """Open a pipe for writing once the client opens it for reading (it is then waiting for that message)."""
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            os.set_blocking(fd, True)
            return fd
        except OSError:  # ENXIO: no reader yet
            if proc.poll() is not None:
                raise RuntimeError(f"the native client exited with {proc.returncode}") from None
            time.sleep(0.001)


def _read_pipe(path: Path, proc: subprocess.Popen) -> tuple[float, bytes]:
    """Wait for the client to write the pipe; the time its first bytes arrived and everything it wrote."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    poll = select.poll()
    poll.register(fd, select.POLLIN)
    while not poll.poll(20):
        if proc.poll() is not None:
            os.close(fd)
            raise RuntimeError(f"the native client exited with {proc.returncode}")
    first, data = time.perf_counter(), bytearray()
    while True:
        try:
            chunk = os.read(fd, 1 << 20)
        except BlockingIOError:
            poll.poll(20)
            continue
        if not chunk:
            break
        data += chunk
    os.close(fd)
    return first, bytes(data)


def native_round(binary: Path, config: dict, task_payload: bytes, assign_payload: bytes, work: Path,
                 breakdown: bool = False) -> dict:
    """One ``edgemole-device round`` with pipes: start-up, engine load and round times, memory at each point."""
    from edgemole.protocol import decode

    work.mkdir(parents=True, exist_ok=True)
    cfg = work / "device.json"
    cfg.write_text(json.dumps(config))
    pipes = {k: work / f"{k}.pipe" for k in ("task", "assign", "out")}
    for p in pipes.values():
        p.unlink(missing_ok=True)
        os.mkfifo(p)
    err = open(work / "stderr.log", "w")  # noqa: SIM115 (closed below; the client logs a few lines)
    spawn = time.perf_counter()
    proc = subprocess.Popen([str(binary), "round", "--config", str(cfg), "--task", str(pipes["task"]),
                             "--assign", str(pipes["assign"]), "--out", str(pipes["out"]),
                             "--losses", str(work / "losses.json")], stderr=err)
    try:
        fd = _open_writer(pipes["task"], proc)  # data read, artifact checked, tokenizer loaded
        ready = time.perf_counter()
        mem_started = proc_memory(proc.pid)
        os.write(fd, task_payload)
        os.close(fd)
        fd = _open_writer(pipes["assign"], proc)  # program loaded, data tokenised: waiting for the assignment
        loaded = time.perf_counter()
        mem_loaded = proc_memory(proc.pid)
        smaps_loaded = smaps_breakdown(proc.pid) if breakdown else {}
        start = time.perf_counter()
        os.write(fd, assign_payload)
        os.close(fd)
        done, update = _read_pipe(pipes["out"], proc)
        mem_done = proc_memory(proc.pid)
        smaps_done = smaps_breakdown(proc.pid) if breakdown else {}
        rc = proc.wait(timeout=120)
        exited = time.perf_counter()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        err.close()
    if rc != 0:
        raise RuntimeError(f"edgemole-device round failed: {(work / 'stderr.log').read_text()[-2000:]}")
    msg = decode(update)
    return {"startup_s": ready - spawn, "load_s": loaded - ready, "round_s": done - start, "exit_s": exited - done,
            "process_s": exited - spawn, "metrics": msg.body["metrics"], "update_bytes": len(update),
            "memory": {"started": mem_started, "loaded": mem_loaded, "done": mem_done},
            "smaps": {"loaded": smaps_loaded, "done": smaps_done}}


def native_predict(binary: Path, config: dict, texts: list[str], warmup: int, work: Path) -> dict:
    """``edgemole-device predict --config FILE -`` over texts on stdin; the client's own latency_ms per text."""
    cfg = work / "predict.json"
    cfg.write_text(json.dumps(config))
    start = time.perf_counter()
    proc = subprocess.run([str(binary), "predict", "--config", str(cfg), "-"], input="\n".join(texts) + "\n",
                          capture_output=True, text=True, timeout=600, check=True)
    wall = time.perf_counter() - start
    answers = [json.loads(line) for line in proc.stdout.splitlines()]
    latency = [a["latency_ms"] for a in answers[warmup:]]
    return {"median_ms": median(latency), "latency_ms": latency, "process_s": wall, "texts": len(latency)}


# -- the Python client (a worker process per engine) ---------------------------------------------------------------
def worker(spec_path: str) -> None:
    """A Python client process: one EdgeClient per local data set on one shared engine, answering commands (one
    JSON line each) on stdin: rounds, prediction latency, exit."""
    t0 = time.perf_counter()
    spec = json.loads(Path(spec_path).read_text())
    from edge_client.client import ClientOptions, EdgeClient
    from edge_client.engines import Batch, make_engine
    from edgemole.mqtt import Inbound
    from edgemole.protocol import Topics, decode
    from fleet.memory_link import RecordingLink

    imported = time.perf_counter()
    mem_imported = proc_memory()
    engines: dict = {}

    def factory(task):  # noqa: ANN001, ANN202 (one engine for every client of this process)
        if "engine" not in engines:
            engines["engine"] = make_engine(spec["engine"], task, threads=spec["threads"],
                                            artifact=Path(spec["artifact"]))
        return engines["engine"]

    topics = Topics(FLEET)
    clients = {}
    for name, (train, test) in spec["clients"].items():
        opts = ClientOptions(broker="mqtt://127.0.0.1:1", client_id=CLIENT, data=train, test_data=test, fleet=FLEET,
                             engine=spec["engine"], artifact=Path(spec["artifact"]), threads=spec["threads"],
                             eval_after_training=spec["eval_after"][name])
        client = EdgeClient(opts, link=RecordingLink(), engine_factory=factory)
        client.handle(Inbound(topics.task, Path(spec["task"]).read_bytes(), True))
        clients[name] = client
    ready = time.perf_counter()
    print(json.dumps({"import_s": imported - t0, "load_s": ready - imported, "memory_imported": mem_imported,
                      "memory_loaded": proc_memory()}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "round":
            client = clients[cmd["client"]]
            payload = Path(cmd["assign"]).read_bytes()
            start = time.perf_counter()
            client.handle(Inbound(topics.assign(CLIENT), payload, False))
            wall = time.perf_counter() - start
            update = client.link.published[-1][1]
            client.link.published.clear()
            reply = {"round_s": wall, "metrics": decode(update).body["metrics"], "update_bytes": len(update),
                     "memory": proc_memory()}
        elif cmd["cmd"] == "predict":
            engine = engines["engine"]
            latency = []
            for text in cmd["texts"]:
                start = time.perf_counter()
                enc = engine.tokenizer(text, truncation=True, max_length=32, return_tensors="pt")
                engine.evaluate([Batch(enc["input_ids"], enc["attention_mask"], enc["input_ids"][:, 0] * 0)])
                latency.append((time.perf_counter() - start) * 1000)
            reply = {"median_ms": median(latency[cmd["warmup"]:]), "latency_ms": latency[cmd["warmup"]:]}
        else:
            print(json.dumps({"memory": proc_memory()}), flush=True)
            return
        print(json.dumps(reply), flush=True)


class Worker:
    """The parent's handle on a worker process."""

    def __init__(self, spec: dict, path: Path) -> None:
        path.write_text(json.dumps(spec))
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", str(path)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.ready = self._reply()

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"a Python worker exited with {self.proc.wait()}")
        return json.loads(line)

    def ask(self, **cmd: object) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def close(self) -> dict:
        reply = self.ask(cmd="exit")
        self.proc.wait(timeout=60)
        return reply


# -- install size ---------------------------------------------------------------------------------------------------
SYSTEM_LIBS = ("libc.so", "libm.so", "libdl.so", "libpthread.so", "librt.so", "ld-linux", "libgcc_s.so",
               "libstdc++.so", "libz.so", "libcrypto.so", "libssl.so", "linux-vdso")
APT_LIBS = ("libpaho-mqtt3cs.so", "libutf8proc.so")  # small Debian packages a board installs for the client


def stripped_size(path: Path, strip: str, tmp: Path) -> int:
    copy = tmp / ("s-" + path.name)
    shutil.copy(path, copy)
    subprocess.run([strip, "--strip-unneeded", str(copy)], check=True, capture_output=True)
    size = copy.stat().st_size
    copy.unlink()
    return size


def needed(binary: Path) -> list[str]:
    out = subprocess.run(["readelf", "-d", str(binary)], capture_output=True, text=True, check=True).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", out)


def runpath(binary: Path) -> list[str]:
    out = subprocess.run(["readelf", "-d", str(binary)], capture_output=True, text=True, check=True).stdout
    found = re.findall(r"\((?:RUNPATH|RPATH)\)\s+Library (?:runpath|rpath): \[(.+?)\]", out)
    return [p for item in found for p in item.split(":")]


def install_size(binary: Path, lib_dirs: list[str], strip: str, tmp: Path) -> dict:
    """The binary and every library it needs, directly or through another library (resolved in the binary's
    runpath, then ``lib_dirs``), raw and stripped, split into what we ship, small apt packages, and libraries a
    Debian board has anyway."""
    rows = [{"file": binary.name, "group": "ship", "bytes": binary.stat().st_size,
             "stripped": stripped_size(binary, strip, tmp)}]
    dirs = [*runpath(binary), *lib_dirs]
    todo, seen = needed(binary), set()
    while todo:
        name = todo.pop(0)
        if name in seen:
            continue
        seen.add(name)
        group = "ship" if name.startswith("libexecutorch") else "apt" if name.startswith(APT_LIBS) else \
            "system" if name.startswith(SYSTEM_LIBS) else "ship"
        path = next((Path(d) / name for d in dirs if (Path(d) / name).exists()), None)
        if path is None:
            rows.append({"file": name, "group": group, "bytes": None, "stripped": None})
            continue
        path = path.resolve()
        rows.append({"file": name, "group": group, "bytes": path.stat().st_size,
                     "stripped": min(path.stat().st_size, stripped_size(path, strip, tmp))})
        todo += needed(path)
    total = {g: sum(r["stripped"] or 0 for r in rows if r["group"] == g) for g in ("ship", "apt", "system")}
    return {"files": rows, "stripped_total": total}


def python_env_size() -> dict:
    """Bytes on disk of every distribution ``pip install -e .`` pulls (edgemole's requirements, recursively)."""
    from packaging.requirements import Requirement

    seen: dict[str, int] = {}
    todo = [Requirement(r) for r in md.requires("edgemole") or []]
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        key = req.name.lower().replace("_", "-")
        if key in seen:
            continue
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            continue
        size = 0
        for f in dist.files or []:
            with contextlib.suppress(OSError):
                size += f.size if f.size is not None else f.locate().stat().st_size
        seen[key] = size
        todo += [Requirement(r) for r in dist.requires or []]
    model = sum(v for k, v in seen.items() if k.startswith("gt-"))  # the bundled MiniLM weights
    return {"total_bytes": sum(seen.values()), "without_model_bytes": sum(seen.values()) - model,
            "packages": len(seen), "largest": dict(sorted(seen.items(), key=lambda kv: -kv[1])[:8])}


# -- the run --------------------------------------------------------------------------------------------------------
def wait_for_quiet(limit: float, patience_s: float) -> float:
    """Wait (up to ``patience_s``) for the 1-minute load average to drop below ``limit``; the load at the start."""
    deadline = time.time() + patience_s
    while load_average() > limit and time.time() < deadline:
        print(f"load average {load_average():.2f} > {limit}: waiting", file=sys.stderr)
        time.sleep(20)
    return load_average()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="fedamole-a2")
    p.add_argument("--repeats", type=int, default=5, help="rounds per client and measurement (default 5)")
    p.add_argument("--steps", type=int, default=10, help="training steps of a step-timing round (default 10)")
    p.add_argument("--thread-repeats", type=int, default=3,
                   help="repeats of the step timing with every core (0: skip)")
    p.add_argument("--artifact", help="artifact folder (exported there when missing, unless --no-export)")
    p.add_argument("--no-export", action="store_true")
    p.add_argument("--binary", help="edgemole-device to measure (default: build it in build/native-bench, "
                   "RelWithDebInfo)")
    p.add_argument("--aarch64", default=str(REPO / "build" / "native-aarch64" / "edgemole-device"))
    p.add_argument("--variant", help="another edgemole-device build (e.g. an experiment) whose round time and memory "
                   "are measured alongside, in the same round loop")
    p.add_argument("--max-load", type=float, default=1.5, help="wait for a lower load average before measuring")
    p.add_argument("--banking77", default=str(BANKING77), help="BANKING77's train.csv (text,category)")
    p.add_argument("--out", help="write the figures as JSON to this file")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker)
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    begun = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="edgemole-native-bench-"))
    if args.binary:
        binary = Path(args.binary)
    else:
        from fleet.native import build_native

        with console.status("building the native client (build/native-bench)"):
            binary = build_native(REPO / "build" / "native-bench", targets=("edgemole-device",)) / "edgemole-device"
    binary = Path(shutil.copy2(binary, work / "edgemole-device"))  # others may relink the build meanwhile
    rows = banking_rows(Path(args.banking77))
    labels = sorted({label for _, label in rows})
    task = build_task(labels, args.method)
    artifact = Path(args.artifact) if args.artifact else work / "artifact"
    export_s = None
    if not (artifact / "manifest.json").exists():
        if args.no_export:
            raise SystemExit(f"no artifact in {artifact}")
        from export.artifact import write_artifact

        with console.status(f"exporting the {args.method} program (a few minutes)"):
            start = time.perf_counter()
            write_artifact(task, artifact, force=True)
            export_s = time.perf_counter() - start
    from edge_client.engines.eager import EagerEngine
    from edgemole.artifact import read_manifest
    from edgemole.protocol import Kind, Message, encode

    manifest = read_manifest(artifact)
    eager = EagerEngine(task, threads=1)
    clients = write_clients(work, rows, eager.tokenizer)
    task_file = work / "task.st"
    task_payload = encode(Message(Kind.TASK, FLEET, body={"run": RUN, "task": task.to_body()}))
    task_file.write_bytes(task_payload)
    n_rounds = args.repeats + max(args.thread_repeats, 0) + 1
    assigns = {"full": {}, "banking": {}}
    for rnd in range(1, n_rounds + 1):
        for name, phase, steps in (("full", "train", args.steps), ("banking", "train-B", task.train.local_steps)):
            path = work / f"{name}.{rnd}.assign.st"
            path.write_bytes(assignment(task, eager.wire, phase, rnd, steps))
            assigns[name][rnd] = path

    # 3. FLOPs of a step (16 x 32, every token real) and this CPU's peak
    from edge_client.local_data import LocalData

    data = LocalData(clients["full"][0], test_path=clients["full"][1])
    data.prepare(task.labels, eager.tokenizer, 32)
    from edge_client.engines import Batch

    batch = Batch(data.train.input_ids[:16], data.train.attention_mask[:16], data.train.labels[:16])
    eager.set_state(*_state_of(assigns["full"][1]))
    counted = counted_flops(eager, batch)
    analytic = analytic_flops(eager.model.backbone.config, task, 16, 32, len(eager.wire.layers))
    del eager, data, batch
    gc.collect()
    load_before = wait_for_quiet(args.max_load, 600)
    peak = {"nominal": nominal_peak(), "sgemm_1_thread": sgemm_peak(1), "sgemm_all_threads": sgemm_peak(os.cpu_count())}

    # the Python clients: one process per engine, both data sets, one thread
    spec = {"artifact": str(artifact), "threads": 1, "task": str(task_file), "clients": clients,
            "eval_after": {"full": False, "banking": True}}
    with console.status("starting the Python clients"):
        workers = {e: Worker(dict(spec, engine=e), work / f"{e}.json") for e in ("executorch", "eager")}
    native_cfg = {"client_id": CLIENT, "fleet": FLEET, "artifact": str(artifact), "threads": 1}

    def cfg(name: str, threads: int = 1, **extra: object) -> dict:
        return dict(native_cfg, data=clients[name][0], test_data=clients[name][1], threads=threads,
                    eval_after_training=name != "full", **extra)

    # 1. the step, and 2. the whole round, alternating client by client
    steps: dict[str, list[float]] = {"native": [], "executorch": [], "eager": []}
    rounds: dict[str, list[dict]] = {"native": [], "executorch": [], "eager": []}
    variant = Path(shutil.copy2(args.variant, work / "variant-edgemole-device")) if args.variant else None
    variant_rounds: list[dict] = []
    with console.status("timing steps and rounds") as status:
        for i in range(1, args.repeats + 1):
            status.update(f"repeat {i} of {args.repeats}")
            r = native_round(binary, cfg("full"), task_payload, assigns["full"][i].read_bytes(), work / "n")
            steps["native"].append(r["metrics"]["train_s"] / r["metrics"]["steps"])
            for e, w in workers.items():
                m = w.ask(cmd="round", client="full", assign=str(assigns["full"][i]))["metrics"]
                steps[e].append(m["train_s"] / m["steps"])
            rounds["native"].append(native_round(binary, cfg("banking"), task_payload,
                                                 assigns["banking"][i].read_bytes(), work / "n", breakdown=i == 1))
            if variant:
                variant_rounds.append(native_round(variant, cfg("banking"), task_payload,
                                                   assigns["banking"][i].read_bytes(), work / "v", breakdown=i == 1))
            for e, w in workers.items():
                rounds[e].append(w.ask(cmd="round", client="banking", assign=str(assigns["banking"][i])))
    # 6. prediction latency: the native client after a round that keeps its deployed model
    texts = [t for t, _ in random.Random(1).sample(rows, 23)]
    warmup = 3
    with console.status("prediction latency"):
        state = work / "state"
        state.mkdir(exist_ok=True)
        native_round(binary, cfg("banking", state_dir=str(state)), task_payload,
                     assigns["banking"][n_rounds].read_bytes(), work / "n")
        predict = {"native": native_predict(binary, cfg("banking", state_dir=str(state)), texts, warmup, work)}
        for e, w in workers.items():
            predict[e] = w.ask(cmd="predict", texts=texts, warmup=warmup)
        exit_memory = {e: w.close()["memory"] for e, w in workers.items()}

    # 1b. the step with every core: fresh Python clients with their default threads (torch: one per core;
    # resetting the ExecuTorch thread pool inside a process that used it is unsafe)
    threads_all = os.cpu_count() or 1
    steps_all: dict[str, list[float]] = {"native": [], "executorch": [], "eager": []}
    if args.thread_repeats > 0:
        with console.status(f"timing steps with {threads_all} threads"):
            spec_all = dict(spec, threads=None, clients={"full": clients["full"]})
            workers_all = {e: Worker(dict(spec_all, engine=e), work / f"{e}-all.json") for e in ("executorch", "eager")}
            for i in range(args.repeats + 1, args.repeats + 1 + args.thread_repeats):
                r = native_round(binary, cfg("full", threads_all), task_payload, assigns["full"][i].read_bytes(),
                                 work / "n")
                steps_all["native"].append(r["metrics"]["train_s"] / r["metrics"]["steps"])
                for e, w in workers_all.items():
                    m = w.ask(cmd="round", client="full", assign=str(assigns["full"][i]))["metrics"]
                    steps_all[e].append(m["train_s"] / m["steps"])
            for w in workers_all.values():
                w.close()

    # 4. memory: a fresh Python client process doing one round (the native figures come from its rounds above)
    with console.status("memory of a Python client doing one round"):
        solo = Worker(dict(spec, engine="executorch", clients={"banking": clients["banking"]}),
                      work / "solo.json")
        solo_round = solo.ask(cmd="round", client="banking", assign=str(assigns["banking"][1]))
        solo_exit = solo.close()
    load_after = load_average()

    # 5. install size
    with console.status("install sizes"):
        arch = platform.machine()
        host = install_size(binary, [f"/lib/{arch}-linux-gnu", f"/usr/lib/{arch}-linux-gnu"], "strip", work)
        arm_binary = Path(args.aarch64)
        arm = install_size(arm_binary, ["/usr/lib/aarch64-linux-gnu", "/lib/aarch64-linux-gnu",
                                        "/usr/aarch64-linux-gnu/lib"], "aarch64-linux-gnu-strip", work) \
            if arch != "aarch64" and arm_binary.exists() and shutil.which("aarch64-linux-gnu-strip") else None
        env = python_env_size()
    planned = _planned_memory(artifact / manifest.program.file)
    predict_method = getattr(manifest, "predict_method", "")

    # figures
    med_step = {k: median(v) for k, v in steps.items()}
    med_step_all = {k: median(v) for k, v in steps_all.items()} if steps_all["native"] else {}
    flops = counted["total"]
    achieved = flops / med_step["native"]
    share_nominal = achieved / peak["nominal"]["per_core"]
    share_sgemm = achieved / peak["sgemm_1_thread"]
    pi_core = PI5_PEAK / PI5_CORES
    pi = {"step_1_thread_s": flops / (share_nominal * pi_core),
          "step_4_threads_s": flops / (share_nominal * PI5_PEAK),
          "step_4_threads_practical_s": flops / (share_sgemm * PI5_MATMUL)}
    round_keys = ("round_s", "eval_s", "probe_s", "train_s")
    med_round = {}
    for k, rs in rounds.items():
        med_round[k] = {key: median([r["round_s"] if key == "round_s" else r["metrics"][key] for r in rs])
                        for key in round_keys}
        med_round[k]["other_s"] = med_round[k]["round_s"] - sum(med_round[k][x] for x in round_keys[1:])
    nat = rounds["native"]
    native_mem = {"peak_mb": max(r["memory"]["done"]["VmHWM"] for r in nat),
                  "after_start_mb": median([r["memory"]["started"]["VmRSS"] for r in nat]),
                  "after_load_mb": median([r["memory"]["loaded"]["VmRSS"] for r in nat]),
                  "after_round_mb": median([r["memory"]["done"]["VmRSS"] for r in nat]),
                  "smaps_loaded": nat[0]["smaps"]["loaded"], "smaps_done": nat[0]["smaps"]["done"],
                  "planned_bytes": planned, "base_bytes": manifest.data.bytes,
                  "program_bytes": manifest.program.bytes}
    python_mem = {"peak_mb": solo_exit["memory"]["VmHWM"], "after_imports_mb": solo.ready["memory_imported"]["VmRSS"],
                  "after_load_mb": solo.ready["memory_loaded"]["VmRSS"],
                  "after_round_mb": solo_round["memory"]["VmRSS"],
                  "benchmark_workers_peak_mb": {e: m["VmHWM"] for e, m in exit_memory.items()}}
    result = {
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "load_before": load_before, "load_after": load_after},
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "model": task.model.name, "method": args.method,
        "labels": len(labels), "batch": 16, "length": 32, "threads": 1, "repeats": args.repeats, "steps": args.steps,
        "export_s": export_s, "step_s": steps, "median_step_s": med_step,
        "ratio_native_to_executorch": med_step["native"] / med_step["executorch"],
        "ratio_native_to_eager": med_step["native"] / med_step["eager"],
        "step_s_all_threads": steps_all, "median_step_s_all_threads": med_step_all, "all_threads": threads_all,
        "round": {k: [{"round_s": r["round_s"], "metrics": r["metrics"], "update_bytes": r["update_bytes"]}
                      for r in rs] for k, rs in rounds.items()},
        "median_round": med_round,
        "native_startup": {"process_start_to_ready_s": median([r["startup_s"] for r in nat]),
                           "engine_load_s": median([r["load_s"] for r in nat]),
                           "exit_s": median([r["exit_s"] for r in nat])},
        "python_startup": {e: w.ready for e, w in workers.items()},
        "flops": {"counted": counted, "analytic": analytic},
        "peak": peak, "achieved_flops_native": achieved, "share_of_nominal_core_peak": share_nominal,
        "share_of_sgemm_1_thread": share_sgemm,
        "share_executorch": flops / med_step["executorch"] / peak["nominal"]["per_core"],
        "share_eager": flops / med_step["eager"] / peak["nominal"]["per_core"],
        "pi5_prediction": pi, "memory": {"native": native_mem, "python_executorch": python_mem},
        "install": {arch: host, "aarch64 (cross-built)": arm, "python_env": env}, "predict": predict,
        "predict_method": predict_method,
        "variant": {"binary": args.variant, "median_round_s": median([r["round_s"] for r in variant_rounds]),
                    "memory": [r["memory"] for r in variant_rounds], "smaps": variant_rounds[0]["smaps"],
                    "metrics": [r["metrics"] for r in variant_rounds]} if variant_rounds else None,
        "wall_s": time.perf_counter() - begun,
    }

    t = Table(title=f"one training step, {task.model.name} {args.method}, 16 x 32 (every token real), 1 thread, "
                    f"median of {args.repeats} rounds of {args.steps} steps")
    for col in ("client", "step", "vs native", f"step, {threads_all} threads", "GFLOP/s", "of core peak"):
        t.add_column(col, justify="right")
    for k, label in (("native", "native (edgemole-device)"), ("executorch", "Python, ExecuTorch engine"),
                     ("eager", "Python, eager PyTorch")):
        t.add_row(label, f"{med_step[k] * 1000:.0f} ms", f"{med_step[k] / med_step['native']:.2f}x",
                  f"{med_step_all[k] * 1000:.0f} ms" if med_step_all else "-",
                  f"{flops / med_step[k] / 1e9:.1f}", f"{flops / med_step[k] / peak['nominal']['per_core']:.0%}")
    console.print(t)
    console.print(f"step work: {counted['total'] / 1e9:.2f} GFLOP counted (forward {counted['forward'] / 1e9:.2f}, "
                  f"backward {counted['backward'] / 1e9:.2f}), {analytic['total'] / 1e9:.2f} analytic; core peak "
                  f"{peak['nominal']['per_core'] / 1e9:.0f} GFLOP/s nominal, sgemm {peak['sgemm_1_thread'] / 1e9:.0f}"
                  f" GFLOP/s on 1 thread ({share_sgemm:.0%} of it); Raspberry Pi 5 PREDICTION at the same share: "
                  f"{pi['step_1_thread_s']:.2f} s (1 thread), {pi['step_4_threads_s']:.2f} s (4 threads, perfect "
                  f"scaling), {pi['step_4_threads_practical_s']:.2f} s (share of the 57 GFLOP/s sgemm)")
    t = Table(title=f"a whole {args.method} train-B round, BANKING77 client 160 train / 40 test, 1 thread, "
                    f"median of {args.repeats}")
    for col in ("client", "round", "evaluations", "probe", "training", "rest (RSEA, state, encoding)"):
        t.add_column(col, justify="right")
    for k in ("native", "executorch", "eager"):
        m = med_round[k]
        t.add_row(k, *(f"{m[x]:.2f} s" for x in ("round_s", "eval_s", "probe_s", "train_s", "other_s")))
    console.print(t)
    s = result["native_startup"]
    console.print(f"native start-up {s['process_start_to_ready_s']:.2f} s, engine load {s['engine_load_s']:.2f} s; "
                  f"Python (ExecuTorch) imports {workers['executorch'].ready['import_s']:.1f} s, load "
                  f"{workers['executorch'].ready['load_s']:.1f} s")
    t = Table(title="resident memory (MiB) of a client doing that round")
    for col in ("client", "after start", "after load", "after round", "peak (VmHWM)"):
        t.add_column(col, justify="right")
    for name, mem, first in (("native", native_mem, "after_start_mb"),
                             ("Python, ExecuTorch", python_mem, "after_imports_mb")):
        t.add_row(name, *(f"{mem[k]:.0f}" for k in (first, "after_load_mb", "after_round_mb", "peak_mb")))
    console.print(t)
    load_mb = native_mem["after_load_mb"] - native_mem["after_start_mb"]
    console.print(f"native (MiB): {native_mem['after_start_mb']:.0f} after start (code, tokenizer, data); loading "
                  f"adds {load_mb:.0f}: base weights {manifest.data.bytes / 2**20:.0f}, planned buffers " +
                  ", ".join(f"{k} {v / 2**20:.0f}" for k, v in planned.items()) + ", other "
                  f"{load_mb - (manifest.data.bytes + sum(planned.values())) / 2**20:.0f}; the round adds "
                  f"{native_mem['peak_mb'] - native_mem['after_load_mb']:.0f}. Resident after the round: " +
                  ", ".join(f"{k} {v:.0f}" for k, v in native_mem["smaps_done"].items() if v >= 0.5))
    t = Table(title="install size (stripped), besides the artifact")
    for col in ("build", "we ship", "apt (Paho, utf8proc)", "on a Debian board anyway"):
        t.add_column(col, justify="right")
    for name, inst in ((arch, host), ("aarch64 (cross-built)", arm)):
        if inst:
            tot = inst["stripped_total"]
            t.add_row(name, f"{tot['ship'] / 1e6:.1f} MB", f"{tot['apt'] / 1e6:.2f} MB",
                      f"{tot['system'] / 1e6:.1f} MB")
    console.print(t)
    console.print(f"Python client's packages: {env['total_bytes'] / 1e6:.0f} MB in {env['packages']} distributions, "
                  f"{env['without_model_bytes'] / 1e6:.0f} MB without the MiniLM package")
    how = f"the program's '{predict_method}' method" if predict_method else "the training method (no inference one)"
    t = Table(title=f"prediction latency of one text, median of {len(texts) - warmup} after {warmup} warm-up; "
                    f"ExecuTorch clients run {how}")
    for col in ("client", "latency"):
        t.add_column(col, justify="right")
    for k, v in predict.items():
        t.add_row(k, f"{v['median_ms']:.0f} ms")
    console.print(t)
    if variant_rounds:
        v = result["variant"]
        console.print(f"variant {args.variant}: round {v['median_round_s']:.2f} s (native "
                      f"{med_round['native']['round_s']:.2f} s); memory (MiB) after load "
                      f"{median([m['loaded']['VmRSS'] for m in v['memory']]):.0f}, peak "
                      f"{max(m['done']['VmHWM'] for m in v['memory']):.0f} (VmHWM), anonymous after the round "
                      f"{median([m['done']['RssAnon'] for m in v['memory']]):.0f} (native "
                      f"{median([r['memory']['done']['RssAnon'] for r in nat]):.0f}), mapped files "
                      f"{median([m['done']['RssFile'] for m in v['memory']]):.0f}: " +
                      ", ".join(f"{k} {x:.0f}" for k, x in v["smaps"]["done"].items() if x >= 0.5))
    console.print(f"load average {load_before:.2f} before, {load_after:.2f} after; {result['wall_s']:.0f} s in all")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    shutil.rmtree(work, ignore_errors=True)


def _state_of(path: Path) -> tuple[dict, dict]:
    from edgemole.protocol import decode

    msg = decode(path.read_bytes())
    return msg.tensors, msg.body


def _planned_memory(pte: Path) -> dict[str, int]:
    """Bytes of each method's planned (non-constant) buffers: the activations, gradients and outputs of a call."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    program = deserialize_pte_binary(pte.read_bytes()).program
    return {plan.name: sum(plan.non_const_buffer_sizes) for plan in program.execution_plan
            if sum(plan.non_const_buffer_sizes)}


if __name__ == "__main__":
    main()
