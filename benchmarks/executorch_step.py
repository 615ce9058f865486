"""One on-device training step: the ExecuTorch engine against the eager engine, in the same run.

For the task's model and method (default: MiniLM with the default AMoLE expert configuration of fedamole-a2),
batch 16 x 32 tokens, one thread each: exports the training program (or reuses ``--artifact``), checks that the
program's gradients equal eager PyTorch's on one batch, then times ``--repeats`` training steps (forward, backward,
AdamW update) alternating between the engines, so that both see the same machine state; reports medians and their
ratio, the ``.pte`` and ``.ptd`` sizes and each engine's peak memory (a separate process per engine). ``--profile``
adds where the program's time goes per operator family (ETDump + Inspector).

    python benchmarks/executorch_step.py                               # MiniLM, fedamole-a2, 20 repeats
    python benchmarks/executorch_step.py --method fedit --json-out step.json --profile
    python benchmarks/executorch_step.py --artifact /tmp/art --no-export  # reuse an exported program
    python benchmarks/executorch_step.py --causal-lm                  # plus a ~100M-parameter Llama-style decoder
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from edge_client.engines import Batch
from edge_client.engines.eager import EagerEngine
from edge_client.engines.executorch import ExecuTorchEngine
from edgemole.artifact import PREFIX, read_manifest
from edgemole.config import Settings, TaskSpec
from edgemole.data import make_synthetic


def build_task(args: argparse.Namespace) -> TaskSpec:
    settings = Settings()
    settings.fleet.method = args.method
    settings.model.max_length = args.length
    settings.train.batch_size = args.batch
    settings.train.dropout = False
    if args.model:
        settings.model.name = args.model
    return settings.task(make_synthetic(n_per_domain=200).label_names())


def fixed_batch(task: TaskSpec, tokenizer: object, seed: int = 0) -> Batch:
    """A full batch: every sequence ``max_length`` real tokens (the worst case of a round)."""
    g = torch.Generator().manual_seed(seed)
    n, t = task.train.batch_size, task.model.max_length
    ids = torch.randint(1000, 20000, (n, t), generator=g)
    return Batch(ids, torch.ones(n, t, dtype=torch.long), torch.randint(0, len(task.labels), (n,), generator=g))


def repeat(batch: Batch) -> Iterator[Batch]:
    while True:
        yield batch


def assignment(engine: EagerEngine | ExecuTorchEngine) -> tuple[dict[str, torch.Tensor], dict]:
    """The fleet's initial state cut to a device holding the first M experts of every module, B made non-zero
    (as after a few rounds) so that every factor has a gradient."""
    body = {"experts": {m: list(range(layer.slots)) for m, layer in engine.wire.layers.items()}} \
        if engine.wire.layers else {}
    full, _ = engine.wire.initial_fleet_state()
    g = torch.Generator().manual_seed(1)
    return {n: full[n] + 0.01 * torch.randn(full[n].shape, generator=g) for n in engine.expected_state(body)}, body


def gradient_check(eager: EagerEngine, et: ExecuTorchEngine, batch: Batch) -> dict[str, float]:
    """Max relative difference of every gradient (program vs eager), and the loss of each."""
    model = eager.model
    model.train(False)
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(batch.input_ids, batch.attention_mask), batch.labels) + eager.wire.auxiliary_loss()
    loss.backward()
    et_loss = float(et._run(batch)[0])  # noqa: SLF001 (the engine's own program call)
    grads = et.module.named_gradients()
    worst = 0.0
    for name, p in model.named_parameters():
        if p.requires_grad:
            g = grads[PREFIX + name]
            worst = max(worst, float((g - p.grad).abs().max() / p.grad.abs().max().clamp(min=1e-12)))
    model.zero_grad(set_to_none=True)
    return {"max_rel_grad_diff": worst, "eager_loss": float(loss), "executorch_loss": et_loss}


def profile(et: ExecuTorchEngine, batch: Batch, steps: int, directory: Path) -> list[dict]:
    """Time per operator family inside the program over ``steps`` forward/backward calls (ETDump)."""
    from executorch.devtools import Inspector
    from executorch.extension.pybindings.portable_lib import _load_for_executorch
    from executorch.extension.training import TrainingModule

    m = et.manifest
    module = _load_for_executorch(str(et.directory / m.program.file), str(et.directory / m.data.file),
                                  enable_etdump=True)
    inputs = et._inputs(batch)  # noqa: SLF001
    trainer = TrainingModule(module)
    for _ in range(steps):
        trainer.forward_backward("forward", inputs)
    path = directory / "step.etdump"
    module.write_etdump_result_to_file(str(path))
    families: dict[str, float] = {}
    for block in Inspector(etdump_path=str(path)).event_blocks:
        for event in block.events:
            if event.perf_data is None or event.name in ("OPERATOR_CALL", "Method::execute", "Method::init",
                                                         "Program::load_method"):
                continue
            name = event.name.removeprefix("native_call_").split(".")[0]
            if event.is_delegated_op or "DELEGATE" in event.name.upper():
                name = "XNNPACK delegate (matmuls, permutes, bmm, element-wise)"
            families[name] = families.get(name, 0.0) + sum(event.perf_data.raw)
    total = sum(families.values()) or 1.0
    rows = [{"op": k, "ms_per_step": v / steps, "share": v / total} for k, v in families.items()]
    return sorted(rows, key=lambda r: -r["ms_per_step"])


def worker(args: argparse.Namespace) -> None:
    """Child process: a few steps of one engine; prints its peak resident memory."""
    task = build_task(args)
    engine = EagerEngine(task, threads=args.threads) if args.worker == "eager" else \
        ExecuTorchEngine(task, Path(args.artifact), threads=args.threads)
    engine.set_state(*assignment(engine))
    batch = fixed_batch(task, engine.tokenizer)
    engine.train(repeat(batch), 3, 1e-3, 0.0)
    # VmHWM: this process's own peak (ru_maxrss would report the parent's peak, inherited through fork)
    peak_kb = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                   if line.startswith("VmHWM:"))
    print(json.dumps({"peak_rss_mb": peak_kb / 1024}))


def causal_lm_step(args: argparse.Namespace, console: Console, work: Path) -> dict:
    """The same comparison for a randomly initialised Llama-style decoder of about 100M parameters (LoRA on q/v,
    loss on the second half of each sequence); program and eager model start from the same weights."""
    import dataclasses

    from transformers import LlamaConfig, LlamaForCausalLM

    from export.artifact import write_causal_artifact
    from export.causal import TrainableCausalLM, build_causal_lm

    folder = work / "llama-100m"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
                         num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=512)
    LlamaForCausalLM(config).save_pretrained(folder)
    settings = Settings()
    settings.fleet.method, settings.model.name = "lora-a2", str(folder)
    settings.model.max_length, settings.train.batch_size, settings.train.dropout = args.length, args.batch, False
    task = settings.task(["-", "-."])
    with console.status("exporting the ~100M causal LM"):
        start = time.perf_counter()
        manifest = write_causal_artifact(task, work / "llama-artifact", force=True)
        export_s = time.perf_counter() - start
    lm, _ = build_causal_lm(dataclasses.replace(task))
    lm.eval()
    wrapper = TrainableCausalLM(lm, task)
    from executorch.extension.pybindings.portable_lib import _load_for_executorch, _unsafe_reset_threadpool
    from executorch.extension.training import TrainingModule

    _unsafe_reset_threadpool(args.threads)
    torch.set_num_threads(args.threads)
    d = work / "llama-artifact"
    trainer = TrainingModule(_load_for_executorch(str(d / manifest.program.file), str(d / manifest.data.file)))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 32000, (args.batch, args.length), generator=g)
    labels = ids.clone()
    labels[:, : args.length // 2] = -100
    inputs = (ids, torch.ones_like(ids), labels)
    trainer.forward_backward("forward", inputs)
    program_params = trainer.named_parameters()
    eager_params = [p for p in lm.parameters() if p.requires_grad]
    optimizers = {"eager": torch.optim.AdamW(eager_params, lr=1e-4),
                  "executorch": torch.optim.AdamW(list(program_params.values()), lr=1e-4)}

    def eager_step() -> None:
        optimizers["eager"].zero_grad(set_to_none=True)
        wrapper(*inputs)[0].backward()
        optimizers["eager"].step()

    def program_step() -> None:
        trainer.forward_backward("forward", inputs)
        for name, grad in trainer.named_gradients().items():
            program_params[name].grad = grad
        optimizers["executorch"].step()

    times: dict[str, list[float]] = {"eager": [], "executorch": []}
    for i in range(args.warmup + max(3, args.repeats // 4)):
        for name, step in (("eager", eager_step), ("executorch", program_step)):
            start = time.perf_counter()
            step()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
    medians = {k: statistics.median(v) for k, v in times.items()}
    params = sum(p.numel() for p in lm.parameters())
    return {"parameters": params, "median_step_s": medians, "ratio_executorch_to_eager":
            medians["executorch"] / medians["eager"], "step_s": times, "pte_bytes": manifest.program.bytes,
            "ptd_bytes": manifest.data.bytes, "export_s": export_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="fedamole-a2")
    p.add_argument("--model", help="model id or path (default: bundled all-MiniLM-L6-v2)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--length", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--artifact", help="artifact folder (exported there unless --no-export)")
    p.add_argument("--no-export", action="store_true", help="use --artifact as it is")
    p.add_argument("--profile", action="store_true", help="also time the program per operator family (ETDump)")
    p.add_argument("--causal-lm", action="store_true", help="also time a ~100M-parameter Llama-style decoder")
    p.add_argument("--json-out")
    p.add_argument("--worker", choices=["eager", "executorch"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    console = Console()
    task = build_task(args)
    work = Path(tempfile.mkdtemp(prefix="edgemole-step-"))
    artifact = Path(args.artifact) if args.artifact else work / "artifact"
    export_s = None
    if not args.no_export:
        from export.artifact import write_artifact

        with console.status(f"exporting the {args.method} program"):
            start = time.perf_counter()
            write_artifact(task, artifact, force=True)
            export_s = time.perf_counter() - start
    manifest = read_manifest(artifact)
    eager = EagerEngine(task, threads=args.threads)
    et = ExecuTorchEngine(task, artifact, threads=args.threads)
    state, body = assignment(eager)
    for engine in (eager, et):
        engine.set_state(state, body)
    batch = fixed_batch(task, eager.tokenizer)
    check = gradient_check(eager, et, batch)
    times: dict[str, list[float]] = {"eager": [], "executorch": []}
    for i in range(args.warmup + args.repeats):
        for name, engine in (("eager", eager), ("executorch", et)):
            stats = engine.train(repeat(batch), 1, 1e-3, 0.0)
            if i >= args.warmup:
                times[name].append(stats.seconds)
    medians = {k: statistics.median(v) for k, v in times.items()}
    memory = {}
    for name in ("eager", "executorch"):
        out = subprocess.run([sys.executable, __file__, "--worker", name, "--artifact", str(artifact),
                              "--method", args.method, "--batch", str(args.batch), "--length", str(args.length),
                              "--threads", str(args.threads), *(["--model", args.model] if args.model else [])],
                             capture_output=True, text=True, check=True)
        memory[name] = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"]
    ops = profile(et, batch, 5, work) if args.profile else []
    causal = causal_lm_step(args, console, work) if args.causal_lm else None
    result = {
        "model": task.model.name, "method": args.method, "adapter": manifest.adapter, "batch": args.batch,
        "length": args.length, "threads": args.threads, "repeats": args.repeats,
        "median_step_s": medians, "ratio_executorch_to_eager": medians["executorch"] / medians["eager"],
        "step_s": times, "gradient_check": check, "pte_bytes": manifest.program.bytes,
        "ptd_bytes": manifest.data.bytes, "export_s": export_s, "peak_rss_mb": memory, "xnnpack": manifest.xnnpack,
        "profile": ops, "causal_lm": causal,
    }
    table = Table(title=f"one training step, {task.model.name} {args.method}, {args.batch} x {args.length}, "
                        f"{args.threads} thread(s), median of {args.repeats}")
    for col in ("engine", "median step", "peak memory"):
        table.add_column(col, justify="right")
    for name in ("eager", "executorch"):
        table.add_row(name, f"{medians[name] * 1000:.0f} ms", f"{memory[name]:.0f} MB")
    console.print(table)
    console.print(f"ratio executorch / eager: {result['ratio_executorch_to_eager']:.2f}x; max relative gradient "
                  f"difference {check['max_rel_grad_diff']:.1e}; .pte {manifest.program.bytes / 1e6:.2f} MB, "
                  f".ptd {manifest.data.bytes / 1e6:.1f} MB" + (f"; export {export_s:.0f} s" if export_s else ""))
    if ops:
        t = Table(title="where the program's time goes (ETDump)")
        for col in ("operator family", "ms per step", "share"):
            t.add_column(col, justify="right")
        for row in ops[:15]:
            t.add_row(row["op"], f"{row['ms_per_step']:.1f}", f"{row['share']:.1%}")
        console.print(t)
    if causal:
        console.print(f"causal LM, {causal['parameters'] / 1e6:.0f}M parameters, LoRA r8 on q/v: eager "
                      f"{causal['median_step_s']['eager'] * 1000:.0f} ms, executorch "
                      f"{causal['median_step_s']['executorch'] * 1000:.0f} ms per step "
                      f"({causal['ratio_executorch_to_eager']:.2f}x); .pte {causal['pte_bytes'] / 1e6:.2f} MB, "
                      f".ptd {causal['ptd_bytes'] / 1e6:.0f} MB; export {causal['export_s']:.0f} s")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
