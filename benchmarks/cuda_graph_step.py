"""One ResNet-18 training step per rule, eager and captured whole in a CUDA graph, against torch's.

The step: zero the gradients (set_to_none), cross-entropy of torchvision's resnet18 (1000 classes,
channels_last) on a static input and target, backward, SGD's step (lr 1e-4, momentum 0.9, as
`fastfa bench`'s model step). Each rule is the same reference model through fastfa.convert;
"torch" is the reference itself, plain backprop, every ratio's denominator. Each (rule, mode)
has its own copy of the model and optimizer, all starting from the same weights:

- eager: the step called from Python, as a training loop does;
- graph: the whole step captured once in a torch.cuda.CUDAGraph (after warm-up steps on a side
  stream, as torch.cuda.graphs asks; the gradients set to None before the capture, so that the
  backward allocates them from the graph's pool) and replayed. SGD needs no `capturable`; brsf's
  and wm's step counters advance on the device in place, so a replay advances them too.

Timing: interleaved rounds (each round times every (rule, mode) once, the start rotating), CUDA
events around `--calls` steps that follow one untimed lead-in step of the same variant without a
synchronisation, so a window measures the pipelined steady state of training (the host running
ahead of the GPU where it can), not a step from an idle device. The L2 cache is not flushed: a
training loop rereads the same weights every step. A time is the median over rounds; a ratio the
median over rounds of the variant's time over torch's in the same round and mode (drift cancels);
`graph_speedup` the same of the variant's eager time over its graph time. Peak memory: the
variant's parameters, buffers and optimizer state plus the peak that one step (eager) or the
capture (graph: a replay reuses the pool the capture allocated) adds over what was allocated
before it. `max_rel_err`: the variant's forward output before any step against torch's, same input.
bf16 (the default) is torch.autocast with cache_enabled=False (cached casts do not survive a
graph's capture; each weight is cast once per step either way); fp32 runs without autocast.

    python benchmarks/cuda_graph_step.py                         # GPU: batch 32 and 256, 224 px, bf16
    python benchmarks/cuda_graph_step.py --rules torch,bp,usf --batches 256 --dtype fp32 --budget 30

Writes benchmarks/results/<date>-<device>-cuda-graph-step.json (design/gpu.md's shape, rows with
"mode") and a .md table beside it. `--budget` (seconds) bounds the run: before each batch's rounds
they are cut to that batch's share of what is left of it (never under 3). Setting up (building,
warming up, capturing) counts against it but is not cut, so a run may overshoot by about the last
batch's set-up and 3 rounds. Without a GPU it is a rehearsal: batch 2 at 32 px, eager only
(graphs need a GPU), perf_counter instead of events, no peak memory: its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import math
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

import fastfa
from fastfa.bench import device_name, git_commit, slug, versions

GPU = torch.cuda.is_available()
DEFAULT_RULES = ("torch", "bp", "fa", "usf", "frsf", "brsf", "kp")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
MIN_ROUNDS = 3
CLASSES = 1000


@dataclass
class Variant:
    """One (rule, mode): its model copy, and `run`, one step (eager) or one replay (graph)."""

    rule: str
    mode: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    run: Callable[[], None] = None
    loss: Callable[[], torch.Tensor] = None   # the last step's loss
    samples: list = field(default_factory=list)
    step_ms: float = math.nan                 # one step during set-up: the rounds' cost estimate
    peak_bytes: Optional[int] = None
    max_rel_err: Optional[float] = None
    error: Optional[str] = None
    graph: Optional[object] = None            # the captured graph, which holds its memory pool


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype, cache_enabled=False)


def make_step(model, optimizer, x, target, device, dtype) -> Callable[[], torch.Tensor]:
    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, dtype):
            loss = torch.nn.functional.cross_entropy(model(x), target)
        loss.backward()
        optimizer.step()
        return loss
    return step


def state_bytes(variant: Variant) -> int:
    """Parameters, buffers and optimizer state, each storage once."""
    tensors = [*variant.model.parameters(), *variant.model.buffers()]
    tensors += [value for state in variant.optimizer.state.values() for value in state.values()
                if isinstance(value, torch.Tensor)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prepare(variant: Variant, step, device, warmup: int) -> None:
    """Warm up, then make `variant.run`: the step itself (eager) or the replay of its capture (graph)."""
    if variant.mode == "graph":
        return capture(variant, step, device, warmup)
    for _ in range(warmup):
        step()
    synchronize(device)
    variant.optimizer.zero_grad(set_to_none=True)  # so that the step's peak counts its gradients
    if device.type == "cuda":
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    begin = time.perf_counter()
    last = [step()]
    synchronize(device)
    variant.step_ms = (time.perf_counter() - begin) * 1e3
    if device.type == "cuda":
        variant.peak_bytes = torch.cuda.max_memory_allocated(device) - before + state_bytes(variant)

    def run():
        last[0] = step()
    variant.run, variant.loss = run, lambda: last[0]


def capture(variant: Variant, step, device, warmup: int) -> None:
    """The whole step in a CUDA graph: warm-up on a side stream (torch.cuda.graphs: lazy
    initialisations, and fastfa resolving each layer's call, happen outside the capture), then one
    capture with the gradients set to None, so that the backward allocates them from the graph's pool."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    synchronize(device)
    variant.optimizer.zero_grad(set_to_none=True)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()  # recorded, not run
    synchronize(device)
    variant.peak_bytes = torch.cuda.max_memory_allocated(device) - before + state_bytes(variant)
    begin = time.perf_counter()
    graph.replay()
    synchronize(device)
    variant.step_ms = (time.perf_counter() - begin) * 1e3
    variant.graph, variant.run, variant.loss = graph, graph.replay, lambda: static_loss


def max_rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    scale = ref.abs().max().item()
    return (out - ref).abs().max().item() / scale if scale > 0 else (out - ref).abs().max().item()


def time_round(variants: list, device: torch.device, calls: int) -> list:
    """ms per step of each variant, one window each, in the order given."""
    if device.type == "cuda":
        events = []
        for variant in variants:
            variant.run()  # the lead-in: the window below starts with the host already ahead
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                variant.run()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) / calls for start, end in events]
    times = []
    for variant in variants:
        variant.run()
        begin = time.perf_counter()
        for _ in range(calls):
            variant.run()
        times.append((time.perf_counter() - begin) * 1e3 / calls)
    return times


def quartiles(values: list) -> list:
    if len(values) < 2:
        return [values[0], values[0]] if values else [None, None]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return [q[0], q[2]]


def paired(samples: list, base: list) -> tuple:
    """Median and quartiles over rounds of samples[r] / base[r]."""
    per_round = [a / b for a, b in zip(samples, base)]
    return statistics.median(per_round), quartiles(per_round)


def rounds_for(variants: list, seconds: float, rounds: int, calls: int) -> int:
    """`rounds`, cut to what fits in `seconds` at the set-up's step times (not under MIN_ROUNDS)."""
    round_ms = sum(v.step_ms for v in variants) * (calls + 1)  # + the lead-in step
    if not math.isfinite(round_ms) or round_ms <= 0:
        return rounds
    return min(rounds, max(MIN_ROUNDS, int(seconds * 1e3 / round_ms)))


def measure_batch(reference: torch.nn.Module, rules: list, batch: int, resolution: int, dtype: torch.dtype,
                  device: torch.device, modes: list, warmup: int, rounds: int, calls: int, seconds: float,
                  log=print) -> list:
    """Rows of every (rule, mode) at one batch size."""
    generator = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 3, resolution, resolution, generator=generator).to(device)
    x = x.contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, CLASSES, (batch,), generator=generator).to(device)
    with torch.no_grad(), autocast(device, dtype):
        expected = reference(x).float()
    variants = []
    for rule in rules:
        for mode in modes:
            torch.manual_seed(0)  # fastfa.convert draws R and the seeds from torch's generator
            model = copy.deepcopy(reference)
            if rule != "torch":
                model = fastfa.convert(model, rule, **fastfa.alignment.paper_options(rule))
            model = model.to(memory_format=torch.channels_last)
            variant = Variant(rule, mode, model, torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9))
            try:
                with torch.no_grad(), autocast(device, dtype):
                    variant.max_rel_err = max_rel_err(model(x).float(), expected)
                prepare(variant, make_step(model, variant.optimizer, x, target, device, dtype), device, warmup)
            except Exception as error:  # noqa: BLE001  a rule that cannot be captured is a result, not the end
                variant.error = f"{type(error).__name__}: {error}"
                with contextlib.suppress(Exception):  # the error is the result; a sync may raise it again
                    synchronize(device)
            log(f"batch {batch} {rule} {mode}: set up, {variant.step_ms:.3f} ms"
                + (f"; error: {variant.error}" if variant.error else ""))
            variants.append(variant)
    live = [v for v in variants if v.error is None]
    count = rounds_for(live, seconds, rounds, calls)
    for r in range(count):
        order = live[r % len(live):] + live[:r % len(live)] if live else []
        for variant, ms in zip(order, time_round(order, device, calls)):
            variant.samples.append(ms)
    log(f"batch {batch}: {count} rounds")
    backend = fastfa._backend.resolve(None, device)  # what "auto" chose here
    base = {v.mode: v for v in live if v.rule == "torch"}
    eager = {v.rule: v for v in live if v.mode == "eager"}
    layout = f"{batch}x3x{resolution}x{resolution}, channels_last"
    rows = []
    for variant in variants:
        baseline = base.get(variant.mode)
        row = {"op": "model:resnet18", "shape": layout, "dtype": "bf16" if dtype == torch.bfloat16 else "fp32",
               "rule": variant.rule, "backend": "torch" if variant.rule == "torch" else backend,
               "mode": variant.mode, "batch": batch, "rounds": len(variant.samples),
               "ms": statistics.median(variant.samples) if variant.samples else None,
               "bp_ms": statistics.median(baseline.samples) if baseline and baseline.samples else None,
               "ratio": None, "spread": None, "graph_speedup": None,
               "peak_bytes": variant.peak_bytes, "bp_peak_bytes": baseline.peak_bytes if baseline else None,
               "max_rel_err": variant.max_rel_err, "error": variant.error, "loss": None}
        if variant.samples and baseline and baseline.samples:
            row["ratio"], row["spread"] = paired(variant.samples, baseline.samples)
        if variant.mode == "graph" and variant.samples and variant.rule in eager:
            row["graph_speedup"] = paired(eager[variant.rule].samples, variant.samples)[0]
        if variant.error is None:
            row["loss"] = float(variant.loss().detach().float())  # the last step's: not finite, the rule diverged
        rows.append(row)
    return rows


def measure(rules=DEFAULT_RULES, batches=None, resolution=None, dtype="bf16", device=None, warmup=2, rounds=10,
            calls=1, budget_s=60.0, backend="auto", log=print) -> dict:
    """The results (design/gpu.md's shape): every (rule, mode) at every batch size."""
    device = torch.device(device or ("cuda" if GPU else "cpu"))
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    unknown = [rule for rule in rules if rule != "torch" and rule not in fastfa.RULES]
    if unknown:
        raise ValueError(f"rules must be 'torch' or fastfa rules ({', '.join(fastfa.RULES)}); got {unknown[0]!r}")
    if "torch" not in rules:
        raise ValueError("rules must include 'torch': every ratio is over its step")
    if warmup < 1 or rounds < 1 or calls < 1:
        raise ValueError(f"warmup, rounds and calls must be at least 1; got {warmup}, {rounds}, {calls}")
    cuda = device.type == "cuda"
    batches = list(batches or ((32, 256) if cuda else (2,)))
    resolution = resolution or (224 if cuda else 32)
    modes = ["eager", "graph"] if cuda else ["eager"]
    import torchvision

    torch.manual_seed(0)
    reference = torchvision.models.resnet18(num_classes=CLASSES).to(device).to(memory_format=torch.channels_last)
    begin, rows = time.perf_counter(), []
    with fastfa.use_backend(backend):
        for index, batch in enumerate(batches):
            left = budget_s - (time.perf_counter() - begin)
            rows += measure_batch(reference, list(rules), batch, resolution, DTYPES[dtype], device, modes, warmup,
                                  rounds, calls, left / (len(batches) - index), log)
    return {"commit": git_commit(), "command": None, "device": device_name(device),  # main names the command
            "versions": versions(), "rows": rows, "seconds": round(time.perf_counter() - begin, 1),
            "settings": {"warmup": warmup, "rounds": rounds, "calls": calls, "budget_s": budget_s,
                         "backend": backend, "resolution": resolution},
            "note": None if cuda else "a rehearsal on the CPU: eager only (CUDA graphs need a GPU), tiny shape; "
                                      "its numbers mean nothing"}


def _fmt(value, digits=3, suffix=""):
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def _cell(text: Optional[str], limit: int = 300) -> str:
    """An error message as one table cell (the JSON keeps it whole)."""
    if not text:
        return ""
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= limit else text[:limit] + " ..."


def markdown(results: dict) -> str:
    lines = [f"# ResNet-18 training step, eager and in a CUDA graph: {results['device']}", "",
             f"commit {results['commit']}; `{results['command']}`; torch {results['versions']['torch']}, "
             f"cuda {results['versions']['cuda']}; {results['seconds']} s", ""]
    if results["note"]:
        lines += [f"**{results['note']}**", ""]
    lines += ["Ratios: the rule's step over torch's (plain backprop) in the same mode, median over rounds; "
              "graph speedup: the rule's eager step over its graph replay.", "",
              "| batch | dtype | rule | mode | ms | ratio to torch | graph speedup | peak MiB | rounds | note |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for row in results["rows"]:
        peak = None if row["peak_bytes"] is None else row["peak_bytes"] / 2 ** 20
        lines.append(f"| {row['batch']} | {row['dtype']} | {row['rule']} | {row['mode']} | {_fmt(row['ms'])} | "
                     f"{_fmt(row['ratio'])} | {_fmt(row['graph_speedup'], 2, 'x')} | {_fmt(peak, 0)} | "
                     f"{row['rounds']} | {_cell(row['error'])} |")
    return "\n".join(lines) + "\n"


def write(results: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    out.with_suffix(".md").write_text(markdown(results))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", default=",".join(DEFAULT_RULES), help="'torch' (the baseline) and fastfa rules")
    parser.add_argument("--batches", help="default 32,256 on a GPU, 2 on a CPU")
    parser.add_argument("--resolution", type=int, help="image side in pixels; default 224 on a GPU, 32 on a CPU")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="bf16: autocast; fp32: none")
    parser.add_argument("--device", help="default cuda if available, else cpu")
    parser.add_argument("--backend", default="auto", help="fastfa's backend (fastfa.use_backend)")
    parser.add_argument("--warmup", type=int, default=2, help="steps before a variant is timed or captured")
    parser.add_argument("--rounds", type=int, default=10, help="at most; --budget may cut them")
    parser.add_argument("--calls", type=int, default=1, help="timed steps per variant per round")
    parser.add_argument("--budget", type=float, default=60.0, help="seconds for the whole run; cuts rounds")
    parser.add_argument("--out", help="results JSON (and .md beside it); default benchmarks/results/"
                                      "<date>-<device>-cuda-graph-step.json")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")] if args.batches else None
    results = measure(args.rules.split(","), batches, args.resolution, args.dtype, args.device, args.warmup,
                      args.rounds, args.calls, args.budget, args.backend)
    results["command"] = shlex.join(["python", "benchmarks/cuda_graph_step.py",
                                     *(sys.argv[1:] if argv is None else argv)])
    out = Path(args.out) if args.out else (Path(__file__).resolve().parent / "results" /
                                           f"{datetime.date.today().isoformat()}-{slug(results['device'])}"
                                           "-cuda-graph-step.json")
    write(results, out)
    print(markdown(results))
    print(f"written: {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
