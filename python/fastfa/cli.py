"""The ``fastfa`` command (also ``python -m fastfa``).

    fastfa info [--json]     versions, devices, how fastfa._C was built, which backends are usable
    fastfa bench [...]       forward + backward time of every rule against torch's backprop
                             (``fastfa bench --help`` lists the options)
    fastfa train [...]       train models with several rules and compare them (fastfa.training)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

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


def cmd_bench(args) -> int:
    import torch

    import fastfa
    from fastfa import bench

    # Device and dtype.
    try:
        device = torch.device(args.device) if args.device else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
    except RuntimeError as error:
        print(f"fastfa bench: --device: {error}", file=sys.stderr)
        return 2
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("fastfa bench: --device cuda, but torch sees no GPU here", file=sys.stderr)
            return 2
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        print(f"fastfa bench: --device must be cpu or cuda[:N], got {args.device!r}", file=sys.stderr)
        return 2
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    if dtype_name.lower() not in bench.DTYPES:
        print(f"fastfa bench: --dtype must be one of fp32, bf16, fp16, fp64; got {dtype_name!r}", file=sys.stderr)
        return 2
    dtype = bench.DTYPES[dtype_name.lower()][0]

    # Rules, ops, backends.
    known = tuple(fastfa.RULES) + tuple(fastfa.ALIASES)
    rules = _split(args.rules) if args.rules else list(fastfa.RULES)
    unknown = [r for r in rules if r not in known]
    if unknown or not rules:
        print(f"fastfa bench: --rules: unknown {', '.join(unknown) or '(none given)'}; "
              f"choose from {', '.join(known)}", file=sys.stderr)
        return 2
    ops = _split(args.ops) if args.ops else list(bench.OPS)
    bad_ops = [o for o in ops if o not in bench.OPS]
    if bad_ops or not ops:
        print(f"fastfa bench: --ops: unknown {', '.join(bad_ops) or '(none given)'}; "
              f"choose from {', '.join(bench.OPS)}", file=sys.stderr)
        return 2
    statuses = fastfa.backends()
    if args.backends:
        backends = _split(args.backends)
        for name in backends:
            if name not in statuses:
                print(f"fastfa bench: --backends: unknown {name!r}; choose from {', '.join(statuses)}",
                      file=sys.stderr)
                return 2
            if not statuses[name].usable:
                print(f"fastfa bench: backend {name!r} is not usable here: {statuses[name].reason}",
                      file=sys.stderr)
                return 2
    else:
        backends = [name for name, status in statuses.items() if status.usable]
        for name, status in statuses.items():
            if not status.usable:
                print(f"fastfa bench: skipping backend {name}: {status.reason}", file=sys.stderr)
    if not backends:
        print("fastfa bench: no usable backend (see `fastfa info`)", file=sys.stderr)
        return 2
    if args.repeat is not None and args.repeat < 1:
        print("fastfa bench: --repeat must be at least 1", file=sys.stderr)
        return 2

    if args.threads is not None:
        if args.threads < 1:
            print("fastfa bench: --threads must be at least 1", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)

    cases = bench.default_cases(device.type, quick=args.quick, ops=ops)
    settings = bench.settings_for(device.type, args.quick, args.repeat)
    out_path = Path(args.out) if args.out else bench.default_out_path(bench.device_name(device))

    print(f"fastfa bench on {bench.device_name(device)} ({device}), {bench.DTYPES[dtype_name.lower()][1]}, "
          f"rules {', '.join(rules)}, backends {', '.join(backends)}, torch threads {torch.get_num_threads()}",
          file=sys.stderr, flush=True)
    results, errors = bench.run_bench(device=device, dtype=dtype, rules=rules, backends=backends, cases=cases,
                                      settings=settings, command=bench.command_line(args.argv),
                                      progress=sys.stderr)
    print(bench.format_table(results["rows"]))
    print("bp = torch's own module, timed in the same interleaved rounds; ms, bp ms: medians over rounds; "
          "ratio: median of the per-round ms / bp ms; spread: its inter-quartile range.")
    bench.write_results(results, out_path)
    print(f"results: {out_path}")
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
        "bench", help="forward + backward time of every rule vs torch's backprop",
        description="Time forward + backward of fastfa's Linear / Conv2d for every rule and usable backend "
                    "against torch's own nn.Linear / nn.Conv2d (backprop) in interleaved rounds, print a "
                    "table and write the results file (design/gpu.md's shape). Defaults: cuda if available, "
                    "else cpu; bf16 and channels_last on GPU, fp32 on CPU.")
    bench.add_argument("--rules", help="comma-separated rules (default: all of fastfa.RULES)")
    bench.add_argument("--ops", help="comma-separated ops: linear, conv2d (default: both)")
    bench.add_argument("--backends", help="comma-separated backends (default: every usable one)")
    bench.add_argument("--dtype", help="fp32, bf16, fp16 or fp64 (default: bf16 on GPU, fp32 on CPU)")
    bench.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    bench.add_argument("--repeat", type=int, metavar="N",
                       help="timed rounds per shape (default: as many as fit the time budget of a shape)")
    bench.add_argument("--threads", type=int, metavar="N",
                       help="torch's CPU threads (torch.set_num_threads; default: torch's own choice)")
    bench.add_argument("--quick", action="store_true", help="tiny shapes and few rounds (seconds; for tests)")
    bench.add_argument("--out", metavar="PATH",
                       help="results file (default: benchmarks/results/<date>-<device>-bench.json when that "
                            "folder exists here, else ./fastfa-bench-<date>-<device>.json)")
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
