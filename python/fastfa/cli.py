"""The ``fastfa`` command (also ``python -m fastfa``).

    fastfa info [--json]     versions, devices, how fastfa._C was built, which backends are usable
    fastfa bench [...]       time and peak memory of every rule (layers and models) against torch's
                             backprop and the peers (``fastfa bench --help`` lists the options)
    fastfa train [...]       train models with several rules and compare them (fastfa.training)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path
from typing import Optional

__all__ = ["main", "collect_info"]


# ----------------------------------------------------------------------------------------------------------
# fastfa info


def collect_info() -> dict:
    """Everything `fastfa info` reports, as a JSON-ready dict."""
    import torch

    import fastfa
    from fastfa import bench

    cuda_available = torch.cuda.is_available()
    gpus = []
    if cuda_available:
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            gpus.append({"index": index, "name": props.name,
                         "capability": f"{props.major}.{props.minor}",
                         "memory_bytes": int(props.total_memory),
                         "multiprocessors": int(props.multi_processor_count)})
    try:
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    except Exception:  # pragma: no cover - depends on the install
        cudnn = None
    versions = bench.versions()
    versions["python"] = platform.python_version()
    versions["cudnn"] = cudnn
    return {
        "fastfa": {"version": fastfa.__version__, "path": str(Path(fastfa.__file__).resolve().parent)},
        "versions": versions,
        "devices": {
            "cpu": {"model": bench.cpu_model(), "logical_cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads()},
            "cuda_available": cuda_available,
            "gpus": gpus,
        },
        "build_info": fastfa._C.build_info(),
        "backends": {name: {"usable": bool(status.usable), "reason": status.reason}
                     for name, status in fastfa.backends().items()},
    }


def format_info(info: dict) -> str:
    v = info["versions"]
    lines = [
        f"fastfa {info['fastfa']['version']}  ({info['fastfa']['path']})",
        "",
        "versions",
        f"  python  {v['python']}",
        f"  torch   {v['torch']}",
        f"  triton  {v['triton'] if v['triton'] else 'not installed (the triton backend needs it)'}",
        f"  CUDA    {v['cuda'] or 'none (this torch is a CPU-only build)'}"
        + ("" if not v["cuda"] else " (the CUDA torch was built with)"),
        f"  cuDNN   {v['cudnn'] if v['cudnn'] else 'n/a'}",
        "",
        "devices",
        f"  cpu     {info['devices']['cpu']['model']} ({info['devices']['cpu']['logical_cores']} logical cores, "
        f"torch uses {info['devices']['cpu']['torch_threads']} threads)",
    ]
    if info["devices"]["gpus"]:
        for gpu in info["devices"]["gpus"]:
            lines.append(f"  cuda:{gpu['index']}  {gpu['name']} (sm_{gpu['capability'].replace('.', '')}, "
                         f"{gpu['memory_bytes'] / 2**30:.1f} GiB, {gpu['multiprocessors']} SMs)")
    else:
        lines.append("  gpu     none visible (torch.cuda.is_available() is False)")
    lines += ["", "build (fastfa._C.build_info())"]
    build = info["build_info"]
    width = max((len(k) for k in build), default=0)
    lines += [f"  {key.ljust(width)}  {value}" for key, value in build.items()]
    lines += ["", "backends"]
    width = max((len(k) for k in info["backends"]), default=0)
    for name, status in info["backends"].items():
        lines.append(f"  {name.ljust(width)}  {'yes' if status['usable'] else 'no '}  {status['reason']}")
    return "\n".join(lines)


def cmd_info(args) -> int:
    info = collect_info()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        print(format_info(info))
    return 0


# ----------------------------------------------------------------------------------------------------------
# fastfa bench


def _split(text: str) -> list:
    return [item.strip() for item in text.split(",") if item.strip()]


def _bench_error(message: str) -> int:
    print(f"fastfa bench: {message}", file=sys.stderr)
    return 2


def _choose(flag: str, text: Optional[str], choices, default: list):
    """The comma-separated values of --flag, each one of choices; (values, None) or (None, error)."""
    if text is None:
        return list(default), None
    values = _split(text)
    unknown = [v for v in values if v not in choices]
    if unknown or not values:
        return None, (f"--{flag}: unknown {', '.join(unknown) or '(none given)'}; "
                      f"choose from {', '.join(choices)}")
    return values, None


def cmd_bench(args) -> int:
    import torch

    import fastfa
    from fastfa import bench, host_overhead, peers

    # Device.
    try:
        device = torch.device(args.device) if args.device else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
    except RuntimeError as error:
        return _bench_error(f"--device: {error}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return _bench_error("--device cuda, but torch sees no GPU here")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        return _bench_error(f"--device must be cpu or cuda[:N], got {args.device!r}")
    gpu = device.type == "cuda"

    # What to time: every check before anything runs.
    full = args.full
    dtype_names, error = _choose("dtype", args.dtype and args.dtype.lower(), tuple(bench.DTYPES),
                                 (["fp32", "bf16", "fp16"] if full else ["bf16"]) if gpu else ["fp32"])
    if error:
        return _bench_error(error + " (fp32, bf16, fp16, fp64 and their torch names)")
    dtypes = list(dict.fromkeys(bench.DTYPES[name][0] for name in dtype_names))
    known = tuple(fastfa.RULES) + tuple(fastfa.ALIASES)
    rules, error = _choose("rules", args.rules, known, list(fastfa.RULES))
    if error:
        return _bench_error(error)
    ops, error = _choose("ops", args.ops, bench.OPS, list(bench.OPS))
    if error:
        return _bench_error(error)
    shapes, error = _choose("shapes", args.shapes, bench.SHAPE_SETS + (host_overhead.SHAPE_SET,),
                            ["linear-sweep", "resnet18", "retinanet", host_overhead.SHAPE_SET] if full
                            else ["default", host_overhead.SHAPE_SET])
    if error:
        return _bench_error(error)
    host = host_overhead.SHAPE_SET in shapes
    shapes = [name for name in shapes if name != host_overhead.SHAPE_SET]
    layouts, error = _choose("layouts", args.layouts, bench.LAYOUTS,
                             (list(bench.LAYOUTS) if full else ["channels_last"]) if gpu else ["nchw"])
    if error:
        return _bench_error(error)
    models, error = _choose("models", args.models if args.models != "none" else None, bench.MODELS,
                            ["resnet18", "alexnet", "resnet50", "mlp"] if full else
                            ["mlp"] if args.quick else ["resnet18"])
    if error:
        return _bench_error(error)
    if args.models == "none":
        models = []
    peer_names, error = _choose("peers", args.peers if args.peers != "none" else None, peers.PEERS,
                                list(peers.PEERS))
    if error:
        return _bench_error(error)
    if args.peers == "none":
        peer_names = []
    # Compiling costs seconds per rule and shape on a CPU: by default only usf (the rule a
    # newcomer asks about) gets the compile peer there, unless --full.
    compile_rules, error = _choose("compile-rules", args.compile_rules, known,
                                   list(fastfa.RULES) if gpu or full else ["usf"])
    if error:
        return _bench_error(error)
    # A model step of every rule and peer is minutes on a CPU: by default the models there get
    # the rule a newcomer asks about (usf) beside backprop, unless --full.
    model_rules, error = _choose("model-rules", args.model_rules, known,
                                 list(fastfa.RULES) if gpu or full or args.quick else ["usf"])
    if error:
        return _bench_error(error)
    batches = None
    if args.batches:
        try:
            batches = [int(b) for b in _split(args.batches)]
        except ValueError:
            return _bench_error(f"--batches must be comma-separated positive integers, got {args.batches!r}")
        if not batches or min(batches) < 1:
            return _bench_error(f"--batches must be comma-separated positive integers, got {args.batches!r}")
        if "linear-sweep" not in shapes:
            shapes.append("linear-sweep")
    for flag, value in (("repeat", args.repeat), ("threads", args.threads), ("model-batch", args.model_batch),
                        ("model-size", args.model_size)):
        if value is not None and value < 1:
            return _bench_error(f"--{flag} must be at least 1, got {value}")
    if args.budget is not None and args.budget <= 0:
        return _bench_error(f"--budget must be a positive number of seconds, got {args.budget}")

    statuses = fastfa.backends()
    if args.backends:
        backends = _split(args.backends)
        for name in backends:
            if name not in statuses:
                return _bench_error(f"--backends: unknown {name!r}; choose from {', '.join(statuses)}")
            if not statuses[name].usable:
                return _bench_error(f"backend {name!r} is not usable here: {statuses[name].reason}")
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
        return _bench_error("no usable backend (see `fastfa info`)")
    if "biotorch" in peer_names:
        usable, reason = peers.biotorch_status()
        if not usable:
            print(f"fastfa bench: peer biotorch: {reason}", file=sys.stderr)
            if args.peers and "biotorch" in _split(args.peers):
                return _bench_error(f"--peers biotorch: {reason}")
            peer_names.remove("biotorch")
    want_plot = args.plot
    if want_plot is None:
        want_plot = bench.plot_available()[0]
    elif want_plot:
        available, why = bench.plot_available()
        if not available:
            return _bench_error(f"--plot: {why}")

    if args.threads is not None:
        torch.set_num_threads(args.threads)

    cases = bench.default_cases(device.type, quick=args.quick, ops=ops, shapes=shapes, layouts=layouts,
                                batches=batches, models=models, model_batch=args.model_batch,
                                model_resolution=args.model_size)
    if not cases and not host:
        return _bench_error("nothing to time: --ops, --shapes and --models select no case")
    settings = bench.settings_for(device.type, args.quick, args.repeat, args.budget)
    settings.memory = not args.no_memory
    out_path = Path(args.out) if args.out else bench.default_out_path(bench.device_name(device))
    csv_path = Path(args.csv) if args.csv else out_path.with_suffix(".csv")
    plot_path = Path(args.plot_out) if args.plot_out else out_path.with_suffix(".png")

    load = bench.machine_state()["loadavg"]
    if not gpu and load and load[0] > (os.cpu_count() or 1) and torch.get_num_threads() > 1:
        print(f"fastfa bench: the machine is busy (load average {load[0]:.1f} on {os.cpu_count()} cores); ops on "
              f"{torch.get_num_threads()} threads then wait for descheduled threads, and times swing; "
              "--threads 1 gives steadier ratios", file=sys.stderr)
    print(f"fastfa bench on {bench.device_name(device)} ({device}), "
          f"{', '.join(bench.DTYPES[name][1] for name in dtype_names)}, rules {', '.join(rules)}, "
          f"backends {', '.join(backends)}, peers {', '.join(peer_names) or 'none'}, {len(cases)} cases, "
          f"torch threads {torch.get_num_threads()}, load average {bench.machine_state()['loadavg']}",
          file=sys.stderr, flush=True)
    # Compiling a whole model takes a minute or more on a CPU: only with --full or --compile-models there.
    compile_models = gpu or full or args.compile_models
    results, errors = bench.run_bench(device=device, dtypes=dtypes, rules=rules, backends=backends, cases=cases,
                                      settings=settings, command=bench.command_line(args.argv),
                                      peer_names=peer_names, compile_rules=compile_rules,
                                      compile_models=compile_models, model_rules=model_rules,
                                      progress=sys.stderr)
    results["summary"] = bench.summarize(results["rows"])
    if host:
        # The aten backend's host path (the one every CPU call takes; a GPU run times its own device).
        results["host_overhead"] = host_overhead.host_overhead_rows(
            steps=50 if args.quick else 2000, warmup=10 if args.quick else 200,
            rules=[fastfa.rules.canonical_rule(rule) for rule in rules], device=device, progress=sys.stderr)
    print(bench.format_table(results["rows"]))
    print("bp = torch's own module, timed in the same interleaved rounds; ms, bp ms: medians over rounds; "
          "ratio: median of the per-round ms / bp ms; spread: its inter-quartile range; "
          f"peak: {results['peak_kind']}.")
    print()
    print(bench.format_summary(results["summary"]))
    if host:
        print()
        print(host_overhead.format_host_overhead(results["host_overhead"]))
    bench.write_results(results, out_path)
    bench.write_csv(results, csv_path)
    print(f"results: {out_path}, {csv_path}", end="")
    if want_plot:
        try:
            print(f", {bench.write_plot(results, plot_path)}")
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


# ----------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastfa", description="fastfa: training without weight transport.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    info = commands.add_parser("info", help="versions, devices, build flags and backends",
                               description="Print fastfa's, torch's, triton's and CUDA's versions, the devices "
                                           "here, how fastfa._C was built, and which backends are usable.")
    info.add_argument("--json", action="store_true", help="print it as JSON")
    info.set_defaults(handler=cmd_info)

    bench = commands.add_parser(
        "bench", help="time and memory of every rule vs torch's backprop and the peers",
        description="Time forward + backward of fastfa's Linear / Conv2d (and one SGD step of converted models) "
                    "for every rule and usable backend against torch's own modules (backprop) and the peers "
                    "(autograd.Function, torch.compile, BioTorch) in interleaved rounds, with peak memory; print a "
                    "table and a summary, and write the results as JSON (design/gpu.md's shape), CSV and a PNG "
                    "plot. Defaults: cuda if available, else cpu; on GPU bf16, channels_last and training-sized "
                    "shapes; on CPU fp32, NCHW and small shapes, under two minutes. --full: the whole sweep "
                    "(the CPU's scaled down).")
    bench.add_argument("--rules", help="comma-separated rules (default: all of fastfa.RULES)")
    bench.add_argument("--ops", help="comma-separated: linear, conv2d, model (default: all three)")
    bench.add_argument("--shapes", help="comma-separated shape sets: default (a few representative layers), "
                                        "linear-sweep (4096x4096 over the batch sizes), resnet18, retinanet "
                                        "(their convolutions), host (tiny layers: the host time per step over "
                                        "torch's own layer, in µs); --full: the last four")
    bench.add_argument("--batches", help="batch sizes of the linear sweep (implies --shapes linear-sweep; "
                                         "default 1..8192 on GPU, 1,4,16,64,256 on CPU)")
    bench.add_argument("--backends", help="comma-separated backends (default: every usable one; triton is "
                                          "timed on CPU only when named here)")
    bench.add_argument("--dtype", "--dtypes", dest="dtype",
                       help="comma-separated fp32, bf16, fp16, fp64 (default: bf16 on GPU, fp32 on CPU; "
                            "--full on GPU: fp32,bf16,fp16)")
    bench.add_argument("--layouts", help="comma-separated nchw, channels_last for conv and models "
                                         "(default: channels_last on GPU, nchw on CPU; --full on GPU: both)")
    bench.add_argument("--peers", help="comma-separated autograd, compile, biotorch, or none (default: all; "
                                       "biotorch when it is installed)")
    bench.add_argument("--compile-rules", help="rules that get the torch.compile peer (default: all on GPU or "
                                               "with --full, usf on CPU: each compile costs seconds there)")
    bench.add_argument("--compile-models", action="store_true",
                       help="give the models the torch.compile peer on CPU too (default: only on GPU or with "
                            "--full; compiling a model takes a minute or more on a CPU)")
    bench.add_argument("--models", help="comma-separated resnet18, alexnet, resnet50, mlp, or none, timed with "
                                        "--ops model (default: resnet18; --quick: mlp; --full: all four)")
    bench.add_argument("--model-rules", help="rules timed on the models (default: all on GPU or with --full, "
                                             "usf on CPU)")
    bench.add_argument("--model-batch", type=int, metavar="N", help="models' batch (default: 64 on GPU, 4 on CPU)")
    bench.add_argument("--model-size", type=int, metavar="PX",
                       help="models' input resolution (default: 224 on GPU, 64 on CPU)")
    bench.add_argument("--full", action="store_true",
                       help="the whole sweep: linear-sweep, resnet18 and retinanet convolutions, every model "
                            "(and on GPU every dtype and layout)")
    bench.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    bench.add_argument("--repeat", type=int, metavar="N",
                       help="timed rounds per case (default: as many as fit the time budget)")
    bench.add_argument("--budget", type=float, metavar="S",
                       help="seconds the timed rounds of the whole run aim at (default: 45 on CPU, 240 on GPU; "
                            "each case still gets its minimum rounds)")
    bench.add_argument("--threads", type=int, metavar="N",
                       help="torch's CPU threads (torch.set_num_threads; default: torch's own choice)")
    bench.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    bench.add_argument("--quick", action="store_true", help="tiny shapes and few rounds (seconds; for tests)")
    bench.add_argument("--out", metavar="PATH",
                       help="results file (default: benchmarks/results/<date>-<device>-bench.json when that "
                            "folder exists here, else ./fastfa-bench-<date>-<device>.json)")
    bench.add_argument("--csv", metavar="PATH", help="CSV file (default: the results file's name with .csv)")
    plot = bench.add_mutually_exclusive_group()
    plot.add_argument("--plot", dest="plot", action="store_true", default=None,
                      help="write the PNG plot (default: when matplotlib is installed)")
    plot.add_argument("--no-plot", dest="plot", action="store_false", help="do not write the plot")
    bench.add_argument("--plot-out", metavar="PATH", help="PNG file (default: the results file's name with .png)")
    bench.set_defaults(handler=cmd_bench)

    from fastfa import training

    train = commands.add_parser("train", help="train models with several rules and compare them",
                                description=training.DESCRIPTION)
    training.add_arguments(train)
    train.set_defaults(handler=training.cmd_train)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 2
    args.argv = argv
    return args.handler(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
