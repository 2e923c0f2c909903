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


def cmd_bench(args) -> int:
    from fastfa import bench

    return bench.main(args)


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
