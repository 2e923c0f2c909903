"""``fastfa bench``: forward + backward time of every rule against torch's own backprop.

Each case is one layer shape. Every variant (torch's nn.Linear / nn.Conv2d, the
baseline, and fastfa's layer for each rule and usable backend) holds the same weights
and runs the same step:

    zero the parameter grads (set_to_none), out = layer(x), out.backward(grad)

with an input x that requires grad (so grad_input is computed, as in a hidden layer)
and a fixed random grad. The timing is done in interleaved rounds: each round times
the baseline and every variant once (its start rotating from round to round), so drift
in clock speed or load hits all of them alike. A time is the median over rounds; a ratio
is the median over rounds of the variant's time over the baseline's in the same round
(so drift between rounds cancels), its spread the inter-quartile range of those. On CPU a call is timed with perf_counter; on GPU with CUDA events, the
L2 cache flushed before each call and the input rotating over several buffers.

The results file has the one shape of design/gpu.md ("Evidence"):

    {"commit", "command", "device", "versions": {torch, triton, cuda, fastfa},
     "rows": [{op, shape, dtype, rule, backend, ms, bp_ms, ratio, peak_bytes,
               bp_peak_bytes, max_rel_err, spread}, ...]}
"""

from __future__ import annotations

import datetime
import gc
import json
import math
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

import fastfa

__all__ = ["Case", "default_cases", "run_bench", "format_table", "versions", "cpu_model", "device_name",
           "default_out_path", "git_commit", "DTYPES"]

#: Accepted --dtype spellings -> (torch dtype, the short name the rows use).
DTYPES = {
    "fp32": (torch.float32, "fp32"), "float32": (torch.float32, "fp32"), "float": (torch.float32, "fp32"),
    "bf16": (torch.bfloat16, "bf16"), "bfloat16": (torch.bfloat16, "bf16"),
    "fp16": (torch.float16, "fp16"), "float16": (torch.float16, "fp16"), "half": (torch.float16, "fp16"),
    "fp64": (torch.float64, "fp64"), "float64": (torch.float64, "fp64"), "double": (torch.float64, "fp64"),
}

OPS = ("linear", "conv2d")


# ----------------------------------------------------------------------------------------------------------
# Where and with what: device, versions, commit


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or platform's guess elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    name = line.split(":", 1)[1].strip()
                    if name:
                        return name
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def device_name(device: torch.device) -> str:
    """"cpu: <model>" or the GPU's name, as the results files name devices."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {cpu_model()}"


def triton_version() -> Optional[str]:
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install
        return None
    return getattr(triton, "__version__", "unknown")


def versions() -> dict:
    return {"torch": torch.__version__, "triton": triton_version(), "cuda": torch.version.cuda,
            "fastfa": fastfa.__version__}


def git_commit() -> Optional[str]:
    """HEAD of the repository that holds fastfa's sources (else of the cwd), or None."""
    for where in (Path(fastfa.__file__).resolve().parent, Path.cwd()):
        try:
            result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True,
                                    timeout=10)
        except (OSError, subprocess.SubprocessError):
            continue
        if result.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", result.stdout.strip()):
            return result.stdout.strip()
    return None


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def default_out_path(device: str, today: Optional[datetime.date] = None, cwd: Optional[Path] = None) -> Path:
    """benchmarks/results/<date>-<device>-bench.json when that folder exists here, else ./fastfa-bench-..."""
    today = today or datetime.date.today()
    cwd = Path.cwd() if cwd is None else cwd
    results = cwd / "benchmarks" / "results"
    if results.is_dir():
        return results / f"{today.isoformat()}-{slug(device)}-bench.json"
    return cwd / f"fastfa-bench-{today.isoformat()}-{slug(device)}.json"


# ----------------------------------------------------------------------------------------------------------
# Cases


@dataclass
class Case:
    """One layer shape: how to build torch's layer and fastfa's, and the input's shape."""

    op: str                       # "linear" | "conv2d"
    shape: str                    # for the table and the rows
    input_shape: tuple
    make_torch: Callable          # (device, dtype) -> torch.nn.Module
    make_fastfa: Callable         # (rule, device, dtype) -> fastfa.nn module
    channels_last: bool = False


def linear_case(batch: int, in_features: int, out_features: int) -> Case:
    return Case("linear", f"{batch}x{in_features} -> {out_features}", (batch, in_features),
                lambda device, dtype: torch.nn.Linear(in_features, out_features, device=device, dtype=dtype),
                lambda rule, device, dtype: fastfa.nn.Linear(in_features, out_features, device=device,
                                                             dtype=dtype, rule=rule))


def conv2d_case(batch: int, in_channels: int, out_channels: int, size: int, kernel: int = 3, stride: int = 1,
                padding: int = 1, channels_last: bool = False) -> Case:
    shape = (f"{batch}x{in_channels}x{size}x{size} -> {out_channels}, {kernel}x{kernel} s{stride} p{padding}"
             + (", channels_last" if channels_last else ""))
    return Case("conv2d", shape, (batch, in_channels, size, size),
                lambda device, dtype: torch.nn.Conv2d(in_channels, out_channels, kernel, stride, padding,
                                                      device=device, dtype=dtype),
                lambda rule, device, dtype: fastfa.nn.Conv2d(in_channels, out_channels, kernel, stride, padding,
                                                             device=device, dtype=dtype, rule=rule),
                channels_last=channels_last)


def default_cases(device_type: str, quick: bool = False, ops=OPS) -> list:
    """The shapes `fastfa bench` times: small ones on CPU, training-sized ones on GPU, tiny ones for --quick."""
    if quick:
        cases = [linear_case(32, 64, 48), conv2d_case(4, 8, 16, 12, channels_last=device_type == "cuda")]
    elif device_type == "cuda":
        cases = [linear_case(16, 4096, 4096), linear_case(256, 4096, 4096), linear_case(8192, 4096, 4096),
                 conv2d_case(256, 64, 64, 32, channels_last=True), conv2d_case(256, 128, 128, 16, channels_last=True)]
    else:
        cases = [linear_case(256, 1024, 1024), linear_case(32, 4096, 4096),
                 conv2d_case(32, 64, 64, 32), conv2d_case(32, 128, 128, 16)]
    return [case for case in cases if case.op in ops]


# ----------------------------------------------------------------------------------------------------------
# Timing


@dataclass
class Settings:
    """How long to time: per-call sample target, rounds, and the time budget of a case."""

    sample_s: float        # one round's sample of a variant lasts about this long (k calls)
    case_budget_s: float   # the timed rounds of one case last about this long in all
    min_rounds: int
    max_rounds: int
    warmup_calls: int
    warmup_s: float
    buffers: int           # input buffers to rotate over
    total_budget_s: Optional[float] = None   # the whole run, warm-ups included, should end within about this
    rounds: Optional[int] = None   # --repeat: exactly this many rounds
    deadline: Optional[float] = None          # perf_counter() time set by run_bench from total_budget_s


def settings_for(device_type: str, quick: bool, repeat: Optional[int]) -> Settings:
    if quick:
        return Settings(sample_s=1e-3, case_budget_s=0.25, min_rounds=3, max_rounds=7, warmup_calls=3,
                        warmup_s=0.01, buffers=2, total_budget_s=5.0, rounds=repeat)
    if device_type == "cuda":
        return Settings(sample_s=2e-3, case_budget_s=4.0, min_rounds=10, max_rounds=50, warmup_calls=10,
                        warmup_s=0.1, buffers=4, total_budget_s=240.0, rounds=repeat)
    return Settings(sample_s=0.02, case_budget_s=15.0, min_rounds=5, max_rounds=40, warmup_calls=3,
                    warmup_s=0.2, buffers=2, total_budget_s=85.0, rounds=repeat)


@dataclass
class Variant:
    rule: Optional[str]            # None: torch's own module (the backprop baseline)
    backend: Optional[str]
    module: torch.nn.Module
    calls: int = 1                 # calls per round
    samples: list = field(default_factory=list)   # ms per call, one per round
    peak_bytes: Optional[int] = None
    max_rel_err: Optional[float] = None

    @property
    def label(self) -> str:
        return "torch bp" if self.rule is None else f"{self.rule}/{self.backend}"


def _backend_context(backend: Optional[str]):
    import contextlib

    return contextlib.nullcontext() if backend is None else fastfa.use_backend(backend)


class Runner:
    """Runs and times the step of one variant on one device."""

    def __init__(self, device: torch.device, inputs: list, grad: torch.Tensor, flush: Optional[torch.Tensor]):
        self.device = device
        self.inputs = inputs
        self.grad = grad
        self.flush = flush
        self.cursor = 0

    def _next_input(self) -> torch.Tensor:
        x = self.inputs[self.cursor % len(self.inputs)]
        self.cursor += 1
        x.grad = None
        return x

    def step(self, variant: Variant) -> None:
        variant.module.zero_grad(set_to_none=True)
        x = self._next_input()
        with _backend_context(variant.backend):
            variant.module(x).backward(self.grad)

    def time_calls(self, variant: Variant, calls: int) -> list:
        """Milliseconds of each of `calls` steps."""
        module, grad = variant.module, self.grad
        with _backend_context(variant.backend):
            if self.device.type == "cuda":
                starts = [torch.cuda.Event(enable_timing=True) for _ in range(calls)]
                ends = [torch.cuda.Event(enable_timing=True) for _ in range(calls)]
                for start, end in zip(starts, ends):
                    module.zero_grad(set_to_none=True)
                    x = self._next_input()
                    if self.flush is not None:
                        self.flush.zero_()      # so that L2 holds nothing of the last call
                    start.record()
                    module(x).backward(grad)
                    end.record()
                torch.cuda.synchronize(self.device)
                return [start.elapsed_time(end) for start, end in zip(starts, ends)]
            times = []
            for _ in range(calls):
                module.zero_grad(set_to_none=True)
                x = self._next_input()
                begin = time.perf_counter()
                module(x).backward(grad)
                times.append((time.perf_counter() - begin) * 1e3)
            return times


def _quartiles(values: list) -> tuple:
    if len(values) == 1:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def _sig(value: Optional[float], digits: int = 5):
    if value is None or not math.isfinite(value):
        return value
    return float(f"{value:.{digits}g}")


def _max_rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|, in float64."""
    out, ref = out.detach().double(), ref.detach().double()
    scale = ref.abs().max().item() if ref.numel() else 0.0
    error = (out - ref).abs().max().item() if ref.numel() else 0.0
    return error / scale if scale > 0 else error


def _make_input(case: Case, device, dtype, generator) -> torch.Tensor:
    x = torch.randn(case.input_shape, device="cpu", dtype=torch.float32, generator=generator).to(device, dtype)
    if case.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_(True)


def _build(case: Case, rule: Optional[str], device, dtype, reference: Optional[torch.nn.Module]):
    module = case.make_torch(device, dtype) if rule is None else case.make_fastfa(rule, device, dtype)
    if reference is not None:
        with torch.no_grad():
            module.weight.copy_(reference.weight)
            if module.bias is not None:
                module.bias.copy_(reference.bias)
    if case.channels_last:
        module = module.to(memory_format=torch.channels_last)
    return module


def _measure_peak(case: Case, rule: Optional[str], backend: Optional[str], device, dtype, seed: int) -> int:
    """Peak bytes allocated by one step with only this variant alive (its weights, state, input, grad)."""
    generator = torch.Generator().manual_seed(seed)
    module = _build(case, rule, device, dtype, None)
    x = _make_input(case, device, dtype, generator)
    with torch.no_grad():
        out = module(x)
    grad = torch.randn(out.shape, generator=generator).to(device, dtype)
    if case.channels_last:
        grad = grad.contiguous(memory_format=torch.channels_last)
    del out
    variant = Variant(rule, backend, module)
    runner = Runner(device, [x], grad, None)
    for _ in range(2):      # library workspaces and algorithm choices are made here, not counted below
        runner.step(variant)
    module.zero_grad(set_to_none=True)
    x.grad = None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    runner.step(variant)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del runner, variant, module, x, grad
    gc.collect()
    torch.cuda.empty_cache()
    return int(peak)


def _log(message: str, progress) -> None:
    if progress is not None:
        print(message, file=progress, flush=True)


def run_case(case: Case, rules: list, backends: list, device: torch.device, dtype: torch.dtype,
             settings: Settings, progress=sys.stderr, seed: int = 0, cases_left: int = 1) -> tuple:
    """Times one case; returns (rows, errors)."""
    dtype_name = next(short for d, short in DTYPES.values() if d == dtype)
    errors = []
    specs = [(None, None)] + [(rule, backend) for backend in backends for rule in rules]

    # Peak memory first, one variant alive at a time (GPU only).
    peaks = {}
    if device.type == "cuda":
        _log("  memory: one step per variant", progress)
        for index, (rule, backend) in enumerate(specs):
            try:
                peaks[(rule, backend)] = _measure_peak(case, rule, backend, device, dtype, seed + index)
            except Exception as error:  # an OOM or an unsupported combination: reported, not fatal
                peaks[(rule, backend)] = None
                errors.append(f"{case.op} {case.shape} {rule or 'torch'}/{backend}: peak memory: {error}")
                gc.collect()
                torch.cuda.empty_cache()

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    reference = _build(case, None, device, dtype, None)
    inputs = [_make_input(case, device, dtype, generator) for _ in range(settings.buffers)]
    with torch.no_grad():
        ref_out = reference(inputs[0])
    grad = torch.randn(ref_out.shape, generator=generator).to(device, dtype)
    if case.channels_last:
        grad = grad.contiguous(memory_format=torch.channels_last)

    flush = None
    if device.type == "cuda":
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 0
        flush = torch.empty(max(256 << 20, 2 * int(l2)), dtype=torch.int8, device=device)
    runner = Runner(device, inputs, grad, flush)

    variants = [Variant(None, None, reference)]
    for rule, backend in specs[1:]:
        try:
            with _backend_context(backend):
                module = _build(case, rule, device, dtype, reference)
                with torch.no_grad():
                    err = _max_rel_err(module(inputs[0]), ref_out)
            variants.append(Variant(rule, backend, module, max_rel_err=err))
        except Exception as error:
            errors.append(f"{case.op} {case.shape} {rule}/{backend}: {type(error).__name__}: {error}")
            _log(f"  skipped {rule}/{backend}: {type(error).__name__}: {error}", progress)
    del ref_out
    for variant in variants:
        variant.peak_bytes = peaks.get((variant.rule, variant.backend))

    # Warm-up, and the time of one call to size the rounds.
    _log(f"  warm-up of {len(variants)} variants", progress)
    estimates = {}
    for variant in list(variants):
        try:
            times = []
            begin = time.perf_counter()
            while len(times) < settings.warmup_calls or time.perf_counter() - begin < settings.warmup_s:
                times += runner.time_calls(variant, 1)
                if len(times) >= 1000:
                    break
            estimates[id(variant)] = statistics.median(times[len(times) // 2:])
        except Exception as error:
            if variant.rule is None:
                raise
            errors.append(f"{case.op} {case.shape} {variant.label}: {type(error).__name__}: {error}")
            _log(f"  skipped {variant.label}: {type(error).__name__}: {error}", progress)
            variants.remove(variant)

    round_s = 0.0
    for variant in variants:
        per_call_s = max(estimates[id(variant)], 1e-6) / 1e3
        variant.calls = max(1, round(settings.sample_s / per_call_s))
        round_s += variant.calls * per_call_s
    if settings.rounds is not None:
        rounds = settings.rounds
    else:
        budget = settings.case_budget_s
        if settings.deadline is not None:   # share what is left of the whole run's budget
            budget = min(budget, (settings.deadline - time.perf_counter()) / max(cases_left, 1))
        rounds = int(min(settings.max_rounds, max(settings.min_rounds, budget // max(round_s, 1e-9))))
    _log(f"  {rounds} rounds of about {round_s * 1e3:.0f} ms "
         f"(calls per round: {', '.join(f'{v.label} {v.calls}' for v in variants)})", progress)

    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(rounds):
            shift = r % len(variants)
            for variant in variants[shift:] + variants[:shift]:
                times = runner.time_calls(variant, variant.calls)
                variant.samples.append(sum(times) / len(times))
    finally:
        if gc_was_enabled:
            gc.enable()

    base = variants[0]
    bp_ms = statistics.median(base.samples)
    bp_q = _quartiles(base.samples)
    rows = []
    for variant in variants[1:]:
        ms = statistics.median(variant.samples)
        q = _quartiles(variant.samples)
        # The ratio pairs each round's sample with the baseline's from the same round, so that
        # drift between rounds cancels: the median of the per-round ratios.
        per_round = [a / b for a, b in zip(variant.samples, base.samples)]
        ratio = statistics.median(per_round)
        rq = _quartiles(per_round)
        rows.append({
            "op": case.op, "shape": case.shape, "dtype": dtype_name, "rule": variant.rule,
            "backend": variant.backend, "ms": _sig(ms), "bp_ms": _sig(bp_ms), "ratio": _sig(ratio, 4),
            "peak_bytes": variant.peak_bytes, "bp_peak_bytes": base.peak_bytes,
            "max_rel_err": _sig(variant.max_rel_err, 3),
            "spread": {"kind": "iqr over rounds", "rounds": rounds, "calls_per_round": variant.calls,
                       "bp_calls_per_round": base.calls,
                       "ms": [_sig(q[0]), _sig(q[1])], "bp_ms": [_sig(bp_q[0]), _sig(bp_q[1])],
                       "ratio": [_sig(rq[0], 4), _sig(rq[1], 4)],
                       "ms_min_max": [_sig(min(variant.samples)), _sig(max(variant.samples))],
                       "bp_ms_min_max": [_sig(min(base.samples)), _sig(max(base.samples))]},
        })
    del variants, runner, inputs, grad, flush, reference, base
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows, errors


# ----------------------------------------------------------------------------------------------------------
# The whole run


def run_bench(*, device: torch.device, dtype: torch.dtype, rules: list, backends: list, cases: list,
              settings: Settings, command: str, progress=sys.stderr) -> tuple:
    """Times every case; returns (results dict in the results-file shape, errors)."""
    rows, errors = [], []
    if settings.total_budget_s is not None and settings.rounds is None:
        settings.deadline = time.perf_counter() + settings.total_budget_s
    for index, case in enumerate(cases):
        dtype_name = next(short for d, short in DTYPES.values() if d == dtype)
        _log(f"[{index + 1}/{len(cases)}] {case.op} {case.shape} {dtype_name} on {device}", progress)
        begin = time.perf_counter()
        try:
            case_rows, case_errors = run_case(case, rules, backends, device, dtype, settings, progress,
                                              seed=index, cases_left=len(cases) - index)
        except Exception as error:  # the baseline itself failed (say, out of memory): go on with the next
            case_rows, case_errors = [], [f"{case.op} {case.shape}: {type(error).__name__}: {error}"]
            _log(f"  failed: {type(error).__name__}: {error}", progress)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows += case_rows
        errors += case_errors
        _log(f"  done in {time.perf_counter() - begin:.1f} s", progress)
    results = {"commit": git_commit(), "command": command, "device": device_name(device),
               "versions": versions(), "rows": rows}
    return results, errors


def _format_ms(ms: float) -> str:
    return f"{ms:.3f}" if ms < 10 else f"{ms:.2f}" if ms < 100 else f"{ms:.1f}"


def format_table(rows: list) -> str:
    """The results as an aligned text table."""
    with_memory = any(row.get("peak_bytes") is not None for row in rows)
    header = ["shape", "dtype", "rule", "backend", "ms", "bp ms", "ratio", "spread (ratio IQR)", "max_rel_err"]
    if with_memory:
        header += ["peak MiB", "peak/bp"]
    lines = []
    for row in rows:
        spread = row.get("spread") or {}
        ratio_iqr = spread.get("ratio")
        cells = [row["op"] + " " + row["shape"], row["dtype"], row["rule"], row["backend"], _format_ms(row["ms"]),
                 _format_ms(row["bp_ms"]), f"{row['ratio']:.3f}",
                 f"{ratio_iqr[0]:.3f}-{ratio_iqr[1]:.3f}" if ratio_iqr else "",
                 "" if row["max_rel_err"] is None else f"{row['max_rel_err']:.1e}"]
        if with_memory:
            peak, bp_peak = row.get("peak_bytes"), row.get("bp_peak_bytes")
            cells.append("" if peak is None else f"{peak / 2**20:.1f}")
            cells.append(f"{peak / bp_peak:.3f}" if peak and bp_peak else "")
        lines.append(cells)
    widths = [max(len(header[i]), *(len(cells[i]) for cells in lines)) if lines else len(header[i])
              for i in range(len(header))]
    numeric = {"ms", "bp ms", "ratio", "max_rel_err", "peak MiB", "peak/bp"}

    def render(cells):
        return "  ".join(c.rjust(w) if h in numeric else c.ljust(w) for c, w, h in zip(cells, widths, header)).rstrip()

    out = [render(header), render(["-" * w for w in widths])]
    previous = None
    for row, cells in zip(rows, lines):
        key = (row["op"], row["shape"], row["dtype"])
        if previous is not None and key != previous:
            out.append("")
        previous = key
        out.append(render(cells))
    return "\n".join(out)


def write_results(results: dict, path: Path) -> Path:
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    return path


def command_line(argv: list) -> str:
    return shlex.join(["fastfa"] + [str(a) for a in argv])

