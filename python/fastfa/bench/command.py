"""`fastfa bench`: from the parsed command line (fastfa.cli) to the printed tables and written files.

``plan(args)`` checks every flag before anything runs and resolves the defaults of the device
(GPU: training-sized, bf16, channels_last; CPU: small, fp32, NCHW); ``main(args)`` runs the plan,
prints the table and summaries, and writes the results file, its CSV and the plot.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

import fastfa

from .. import peers
from . import host, plots, report, run
from .cases import DTYPES, LAYOUTS, MODELS, OPS, SHAPE_SETS, default_cases
from .machine import command_line, default_out_path, device_name, machine_state
from .timing import Settings, settings_for

__all__ = ["UsageError", "Plan", "plan", "main"]


class UsageError(ValueError):
    """A flag of `fastfa bench` that cannot be honoured; the message names the flag."""


@dataclass
class Plan:
    """What one `fastfa bench` run times, how, and where its files go."""

    device: torch.device
    dtype_names: list
    rules: list
    backends: list
    peer_names: list
    compile_rules: list
    compile_models: bool
    model_rules: list
    cases: list
    host: bool             # the host-overhead set (--shapes host)
    settings: Settings
    out_path: Path
    csv_path: Path
    plot_path: Path
    want_plot: bool

    @property
    def dtypes(self) -> list:
        return list(dict.fromkeys(DTYPES[name][0] for name in self.dtype_names))


def _split(text: str) -> list:
    return [item.strip() for item in text.split(",") if item.strip()]


def _choose(flag: str, text: Optional[str], choices, default: list) -> list:
    """The comma-separated values of --flag, each one of choices (default when the flag is absent)."""
    if text is None:
        return list(default)
    values = _split(text)
    unknown = [v for v in values if v not in choices]
    if unknown or not values:
        raise UsageError(f"--{flag}: unknown {', '.join(unknown) or '(none given)'}; "
                         f"choose from {', '.join(choices)}")
    return values


def _device(args) -> torch.device:
    try:
        device = torch.device(args.device) if args.device else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
    except RuntimeError as error:
        raise UsageError(f"--device: {error}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda, but torch sees no GPU here")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise UsageError(f"--device must be cpu or cuda[:N], got {args.device!r}")
    return device


def _backends(args, gpu: bool) -> list:
    statuses = fastfa.backends()
    if args.backends:
        backends = _split(args.backends)
        for name in backends:
            if name not in statuses:
                raise UsageError(f"--backends: unknown {name!r}; choose from {', '.join(statuses)}")
            if not statuses[name].usable:
                raise UsageError(f"backend {name!r} is not usable here: {statuses[name].reason}")
    else:
        backends = []
        for name, status in statuses.items():
            if not status.usable:
                print(f"fastfa bench: skipping backend {name}: {status.reason}", file=sys.stderr)
            elif name == "triton" and not gpu:
                # On a CPU, Triton runs only under its interpreter (TRITON_INTERPRET=1): correct, but
                # timing it says nothing about the kernels. Named in --backends, it is timed.
                print("fastfa bench: skipping backend triton on cpu (the interpreter; name it in --backends "
                      "to time it anyway)", file=sys.stderr)
            else:
                backends.append(name)
    if not backends:
        raise UsageError("no usable backend (see `fastfa info`)")
    return backends


def plan(args) -> Plan:
    """Every flag checked (UsageError) and every default resolved, before anything runs.

    Sets torch's CPU threads when --threads is given.
    """
    device = _device(args)
    gpu = device.type == "cuda"
    full = args.full
    try:
        dtype_names = _choose("dtype", args.dtype and args.dtype.lower(), tuple(DTYPES),
                              (["fp32", "bf16", "fp16"] if full else ["bf16"]) if gpu else ["fp32"])
    except UsageError as error:
        raise UsageError(f"{error} (fp32, bf16, fp16, fp64 and their torch names)") from None
    known = tuple(fastfa.RULES) + tuple(fastfa.ALIASES)
    rules = _choose("rules", args.rules, known, list(fastfa.RULES))
    ops = _choose("ops", args.ops, OPS, list(OPS))
    shapes = _choose("shapes", args.shapes, SHAPE_SETS + (host.SHAPE_SET,),
                     ["linear-sweep", "resnet18", "retinanet", "transformer", host.SHAPE_SET] if full
                     else ["default", host.SHAPE_SET])
    with_host = host.SHAPE_SET in shapes
    shapes = [name for name in shapes if name != host.SHAPE_SET]
    layouts = _choose("layouts", args.layouts, LAYOUTS, (list(LAYOUTS) if full else ["channels_last"]) if gpu
                      else ["nchw"])
    models = _choose("models", args.models if args.models != "none" else None, MODELS,
                     ["resnet18", "alexnet", "resnet50", "mlp", "encoder"] if full else ["mlp"] if args.quick else ["resnet18"])
    if args.models == "none":
        models = []
    peer_names = _choose("peers", args.peers if args.peers != "none" else None, peers.PEERS, list(peers.PEERS))
    if args.peers == "none":
        peer_names = []
    # Compiling costs seconds per rule and shape on a CPU: by default only usf (the rule a
    # newcomer asks about) gets the compile peer there, unless --full.
    compile_rules = _choose("compile-rules", args.compile_rules, known, list(fastfa.RULES) if gpu or full else ["usf"])
    # A model step of every rule and peer is minutes on a CPU: by default the models there get
    # the rule a newcomer asks about (usf) beside backprop, unless --full.
    model_rules = _choose("model-rules", args.model_rules, known,
                          list(fastfa.RULES) if gpu or full or args.quick else ["usf"])
    batches = None
    if args.batches:
        try:
            batches = [int(b) for b in _split(args.batches)]
        except ValueError:
            raise UsageError(f"--batches must be comma-separated positive integers, got {args.batches!r}") from None
        if not batches or min(batches) < 1:
            raise UsageError(f"--batches must be comma-separated positive integers, got {args.batches!r}")
        if "linear-sweep" not in shapes:
            shapes.append("linear-sweep")
    for flag, value in (("repeat", args.repeat), ("threads", args.threads), ("model-batch", args.model_batch),
                        ("model-size", args.model_size)):
        if value is not None and value < 1:
            raise UsageError(f"--{flag} must be at least 1, got {value}")
    if args.budget is not None and args.budget <= 0:
        raise UsageError(f"--budget must be a positive number of seconds, got {args.budget}")

    backends = _backends(args, gpu)
    if "biotorch" in peer_names:
        usable, reason = peers.biotorch_status()
        if not usable:
            print(f"fastfa bench: peer biotorch: {reason}", file=sys.stderr)
            if args.peers and "biotorch" in _split(args.peers):
                raise UsageError(f"--peers biotorch: {reason}")
            peer_names.remove("biotorch")
    want_plot = args.plot
    if want_plot is None:
        want_plot = plots.plot_available()[0]
    elif want_plot:
        available, why = plots.plot_available()
        if not available:
            raise UsageError(f"--plot: {why}")

    if args.threads is not None:
        torch.set_num_threads(args.threads)

    cases = default_cases(device.type, quick=args.quick, ops=ops, shapes=shapes, layouts=layouts, batches=batches,
                          models=models, model_batch=args.model_batch, model_resolution=args.model_size)
    if not cases and not with_host:
        raise UsageError("nothing to time: --ops, --shapes and --models select no case")
    settings = settings_for(device.type, args.quick, args.repeat, args.budget)
    settings.memory = not args.no_memory
    out_path = Path(args.out) if args.out else default_out_path(device_name(device))
    # Compiling a whole model takes a minute or more on a CPU: only with --full or --compile-models there.
    return Plan(device=device, dtype_names=dtype_names, rules=rules, backends=backends, peer_names=peer_names,
                compile_rules=compile_rules, compile_models=gpu or full or args.compile_models,
                model_rules=model_rules, cases=cases, host=with_host, settings=settings, out_path=out_path,
                csv_path=Path(args.csv) if args.csv else out_path.with_suffix(".csv"),
                plot_path=Path(args.plot_out) if args.plot_out else out_path.with_suffix(".png"),
                want_plot=want_plot)


def main(args) -> int:
    """`fastfa bench` with the parsed flags (fastfa.cli): 0 when every variant ran, 1 on errors, 2 on bad flags."""
    try:
        chosen = plan(args)
    except UsageError as error:
        print(f"fastfa bench: {error}", file=sys.stderr)
        return 2
    device = chosen.device
    load = machine_state()["loadavg"]
    if device.type != "cuda" and load and load[0] > (os.cpu_count() or 1) and torch.get_num_threads() > 1:
        print(f"fastfa bench: the machine is busy (load average {load[0]:.1f} on {os.cpu_count()} cores); ops on "
              f"{torch.get_num_threads()} threads then wait for descheduled threads, and times swing; "
              "--threads 1 gives steadier ratios", file=sys.stderr)
    print(f"fastfa bench on {device_name(device)} ({device}), "
          f"{', '.join(DTYPES[name][1] for name in chosen.dtype_names)}, rules {', '.join(chosen.rules)}, "
          f"backends {', '.join(chosen.backends)}, peers {', '.join(chosen.peer_names) or 'none'}, "
          f"{len(chosen.cases)} cases, torch threads {torch.get_num_threads()}, "
          f"load average {machine_state()['loadavg']}", file=sys.stderr, flush=True)
    results, errors = run.run_bench(device=device, dtypes=chosen.dtypes, rules=chosen.rules,
                                    backends=chosen.backends, cases=chosen.cases, settings=chosen.settings,
                                    command=command_line(args.argv), peer_names=chosen.peer_names,
                                    compile_rules=chosen.compile_rules, compile_models=chosen.compile_models,
                                    model_rules=chosen.model_rules, progress=sys.stderr)
    results["summary"] = report.summarize(results["rows"])
    if chosen.host:
        # The aten backend's host path (the one every CPU call takes; a GPU run times its own device).
        results["host_overhead"] = host.host_overhead_rows(
            steps=50 if args.quick else 2000, warmup=10 if args.quick else 200,
            rules=[fastfa.rules.canonical_rule(rule) for rule in chosen.rules], device=device, progress=sys.stderr)
    print(report.format_table(results["rows"]))
    print("bp = torch's own module, timed in the same interleaved rounds; ms, bp ms: medians over rounds; "
          "ratio: median of the per-round ms / bp ms; spread: its inter-quartile range; "
          f"peak: {results['peak_kind']}.")
    print()
    print(report.format_summary(results["summary"]))
    if chosen.host:
        print()
        print(host.format_host_overhead(results["host_overhead"]))
    report.write_results(results, chosen.out_path)
    report.write_csv(results, chosen.csv_path)
    print(f"results: {chosen.out_path}, {chosen.csv_path}", end="")
    if chosen.want_plot:
        try:
            plotted = plots.write_plot(results, chosen.plot_path)
            print(f", {plotted}" if plotted else " (no plot: no layer was timed)")
        except Exception as error:  # a plot that fails does not lose the results
            print()
            errors.append(f"plot: {type(error).__name__}: {error}")
    else:
        print()
    for reason in results["skipped"]:
        print(f"fastfa bench: peer skipped: {reason}", file=sys.stderr)
    for error in errors:
        print(f"fastfa bench: error: {error}", file=sys.stderr)
    return 1 if errors else 0
