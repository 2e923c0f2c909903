"""``fastfa bench``: time and peak memory of every rule, backend and peer against torch's backprop.

Each case is a layer shape (forward + backward) or a model (one SGD training step). Every
variant holds the same weights and runs the same step: torch's own module (the backprop
baseline), fastfa's layer or converted model for each rule and usable backend, and the
peers (fastfa.peers: each rule as a torch.autograd.Function, the same under torch.compile,
and BioTorch's layers). A layer's step is

    zero the parameter grads (set_to_none), out = layer(x), out.backward(grad)

with an input x that requires grad (so grad_input is computed, as in a hidden layer) and a
fixed random grad; a model's is cross-entropy on random targets, backward, SGD's step.
The timing is done in interleaved rounds: each round times the baseline and every variant
once (its start rotating from round to round), so drift in clock speed or load hits all of
them alike. A time is the median over rounds; a ratio is the median over rounds of the
variant's time over the baseline's in the same round (so drift between rounds cancels), its
spread the inter-quartile range of those. On CPU a call is timed with perf_counter; on GPU
with CUDA events, the L2 cache flushed before each call and the input rotating over several
buffers. Peak memory: see CUDA_PEAK and CPU_PEAK.

The results file has the one shape of design/gpu.md ("Evidence"), with fields added:

    {"commit", "command", "device", "versions": {torch, triton, cuda, fastfa},
     "rows": [{op, shape, dtype, rule, backend, ms, bp_ms, ratio, peak_bytes,
               bp_peak_bytes, max_rel_err, spread,
               group, batch, layout, peer, peak_kind, vs_peers}, ...],
     "machine": {"start": {loadavg, cpu_count, torch_threads}, "end": {...}},
     "seconds", "peers", "peak_kind"}
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import gc
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

import fastfa

from . import peers

__all__ = ["Case", "default_cases", "run_bench", "format_table", "format_summary", "summarize", "versions",
           "cpu_model", "device_name", "default_out_path", "git_commit", "write_results", "write_csv", "write_plot",
           "DTYPES", "OPS", "MODELS", "SHAPE_SETS", "LAYOUTS"]

#: Accepted --dtype spellings -> (torch dtype, the short name the rows use).
DTYPES = {
    "fp32": (torch.float32, "fp32"), "float32": (torch.float32, "fp32"), "float": (torch.float32, "fp32"),
    "bf16": (torch.bfloat16, "bf16"), "bfloat16": (torch.bfloat16, "bf16"),
    "fp16": (torch.float16, "fp16"), "float16": (torch.float16, "fp16"), "half": (torch.float16, "fp16"),
    "fp64": (torch.float64, "fp64"), "float64": (torch.float64, "fp64"), "double": (torch.float64, "fp64"),
}

#: --ops: the layer kinds, and "model" for the model-level training steps.
OPS = ("linear", "conv2d", "model")


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
# Cases: one layer shape or one model, and how to build torch's module (the backprop baseline)


@dataclass
class Case:
    """One thing to time: a layer shape (fwd + bwd) or a model (one SGD training step).

    ``make_reference(device, dtype)`` builds torch's own module; every variant is made from
    a deep copy of it (fastfa.convert, the peers), so all hold the same weights.
    """

    op: str                       # "linear" | "conv2d" | "model:<name>"
    shape: str                    # for the table and the rows
    input_shape: tuple
    make_reference: Callable      # (device, dtype) -> torch.nn.Module
    group: str = ""               # the sweep it belongs to: "linear 4096", "resnet18 conv", ...
    layout: Optional[str] = None  # "nchw" | "channels_last" for conv and models; None for linear
    classes: int = 0              # models: a training step on cross-entropy over this many classes

    @property
    def batch(self) -> int:
        return self.input_shape[0]

    @property
    def channels_last(self) -> bool:
        return self.layout == "channels_last"

    @property
    def is_model(self) -> bool:
        return self.op.startswith("model:")


LAYOUTS = ("nchw", "channels_last")


def linear_case(batch: int, in_features: int, out_features: int, group: str = "") -> Case:
    return Case("linear", f"{batch}x{in_features} -> {out_features}", (batch, in_features),
                lambda device, dtype: torch.nn.Linear(in_features, out_features, device=device, dtype=dtype),
                group=group or f"linear {in_features}->{out_features}")


def conv2d_case(batch: int, in_channels: int, out_channels: int, size: int, kernel: int = 3, stride: int = 1,
                padding: int = 1, channels_last: bool = False, group: str = "conv2d", name: str = "") -> Case:
    layout = "channels_last" if channels_last else "nchw"
    shape = (f"{batch}x{in_channels}x{size}x{size} -> {out_channels}, {kernel}x{kernel} s{stride} p{padding}"
             + (", channels_last" if channels_last else "") + (f" ({name})" if name else ""))
    return Case("conv2d", shape, (batch, in_channels, size, size),
                lambda device, dtype: torch.nn.Conv2d(in_channels, out_channels, kernel, stride, padding,
                                                      device=device, dtype=dtype),
                group=group, layout=layout)


def resnet18_conv_cases(batch: int, resolution: int, channels_last: bool) -> list:
    """The distinct convolutions of torchvision's ResNet-18 at this input resolution (224: ImageNet)."""
    r = resolution
    specs = [("conv1", 3, 64, r, 7, 2, 3), ("layer1", 64, 64, r // 4, 3, 1, 1),
             ("layer2.0.conv1", 64, 128, r // 4, 3, 2, 1), ("layer2.0.downsample", 64, 128, r // 4, 1, 2, 0),
             ("layer2", 128, 128, r // 8, 3, 1, 1),
             ("layer3.0.conv1", 128, 256, r // 8, 3, 2, 1), ("layer3.0.downsample", 128, 256, r // 8, 1, 2, 0),
             ("layer3", 256, 256, r // 16, 3, 1, 1),
             ("layer4.0.conv1", 256, 512, r // 16, 3, 2, 1), ("layer4.0.downsample", 256, 512, r // 16, 1, 2, 0),
             ("layer4", 512, 512, r // 32, 3, 1, 1)]
    return [conv2d_case(batch, cin, cout, max(size, 1), kernel, stride, padding, channels_last,
                        group=f"resnet18 conv @{r}px", name=name)
            for name, cin, cout, size, kernel, stride, padding in specs]


def retinanet_head_cases(batch: int, image: int, channels_last: bool) -> list:
    """RetinaNet's head (torchvision retinanet_resnet50_fpn): 256->256 3x3 on FPN levels P3..P7,
    and the classification (9 anchors x 91 classes) and box (9 x 4) convolutions on P3."""
    levels = [max(1, math.ceil(image / stride)) for stride in (8, 16, 32, 64, 128)]
    cases = [conv2d_case(batch, 256, 256, size, 3, 1, 1, channels_last, group=f"retinanet head @{image}px",
                         name=f"P{level}") for level, size in zip(range(3, 8), levels)]
    cases += [conv2d_case(batch, 256, 9 * 91, levels[0], 3, 1, 1, channels_last,
                          group=f"retinanet head @{image}px", name="P3 cls_logits"),
              conv2d_case(batch, 256, 9 * 4, levels[0], 3, 1, 1, channels_last,
                          group=f"retinanet head @{image}px", name="P3 bbox_reg")]
    return cases


class MLPBlock(torch.nn.Module):
    """A transformer's MLP block: LayerNorm, Linear(d -> 4d), GELU, Linear(4d -> d), residual."""

    def __init__(self, width: int, classes: int):
        super().__init__()
        self.norm = torch.nn.LayerNorm(width)
        self.up = torch.nn.Linear(width, 4 * width)
        self.down = torch.nn.Linear(4 * width, width)
        self.head = torch.nn.Linear(width, classes)

    def forward(self, x):
        return self.head(x + self.down(torch.nn.functional.gelu(self.up(self.norm(x)))))


MODELS = ("resnet18", "alexnet", "resnet50", "mlp")


def model_case(name: str, batch: int, resolution: int, channels_last: bool, width: int = 512) -> Case:
    """One SGD training step of a torchvision model (1000 classes) or of an MLP block."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {', '.join(MODELS)}; got {name!r}")
    if name == "mlp":
        return Case("model:mlp", f"{batch}x{width}, width {width} -> {4 * width} -> {width}", (batch, width),
                    lambda device, dtype: MLPBlock(width, 1000).to(device, dtype), group="model", classes=1000)

    def make(device, dtype):
        import torchvision

        return getattr(torchvision.models, name)(num_classes=1000).to(device, dtype)

    layout = "channels_last" if channels_last else "nchw"
    return Case(f"model:{name}", f"{batch}x3x{resolution}x{resolution}" + (", channels_last" if channels_last else ""),
                (batch, 3, resolution, resolution), make, group="model", layout=layout, classes=1000)


#: Named shape sets for --shapes.
SHAPE_SETS = ("default", "linear-sweep", "resnet18", "retinanet")


@dataclass
class Sizes:
    """The per-device sizes of the sweep (the CPU's are scaled down to finish in minutes)."""

    linear_batches: tuple
    linear_width: int
    conv_batch: int
    resnet_resolution: int
    retinanet_batch: int
    retinanet_image: int
    model_batch: int
    model_resolution: int
    mlp_width: int


def sizes_for(device_type: str) -> Sizes:
    if device_type == "cuda":
        return Sizes(linear_batches=tuple(2 ** k for k in range(14)), linear_width=4096, conv_batch=64,
                     resnet_resolution=224, retinanet_batch=4, retinanet_image=800, model_batch=64,
                     model_resolution=224, mlp_width=1024)
    return Sizes(linear_batches=(1, 4, 16, 64, 256), linear_width=4096, conv_batch=2, resnet_resolution=112,
                 retinanet_batch=1, retinanet_image=256, model_batch=4, model_resolution=64, mlp_width=512)


def default_cases(device_type: str, quick: bool = False, ops=OPS, shapes=("default",), layouts=None,
                  batches=None, models=("resnet18",), model_batch=None, model_resolution=None) -> list:
    """The cases `fastfa bench` times.

    ``shapes``: "default" (a few representative layers: what a plain `fastfa bench` times),
    "linear-sweep" (4096x4096 Linear over the device's batch sizes, or ``batches``),
    "resnet18" (its distinct convolutions), "retinanet" (its head's). ``layouts`` apply to
    conv and models (default: channels_last on GPU, NCHW on CPU). ``models`` are timed when
    "model" is in ``ops``.
    """
    sizes = sizes_for(device_type)
    if layouts is None:
        layouts = ("channels_last",) if device_type == "cuda" else ("nchw",)
    cases = []
    if quick:
        cases += [linear_case(b, 64, 48) for b in (batches or (32,))]
        cases += [conv2d_case(4, 8, 16, 12, channels_last=layout == "channels_last") for layout in layouts]
        model_cases = [Case("model:mlp", "8x32, width 32 -> 128 -> 32", (8, 32),
                            lambda device, dtype: MLPBlock(32, 10).to(device, dtype), group="model", classes=10)
                       for name in models if name == "mlp"]
        model_cases += [model_case(name, model_batch or 2, model_resolution or 32, layout == "channels_last")
                        for name in models if name != "mlp" for layout in layouts]
    else:
        for shape_set in shapes:
            if shape_set == "default":
                if device_type == "cuda":
                    cases += [linear_case(b, 4096, 4096, group="linear 4096->4096") for b in (16, 256, 8192)]
                    cases += [conv2d_case(256, 64, 64, 32, channels_last=layout == "channels_last", group="conv2d")
                              for layout in layouts]
                    cases += [conv2d_case(256, 128, 128, 16, channels_last=layout == "channels_last",
                                          group="conv2d") for layout in layouts]
                else:
                    # One memory-bound Linear (a 16 MiB weight, 16 rows), one compute-bound one, a
                    # ResNet-18 layer1 convolution and a RetinaNet head convolution, at CPU sizes.
                    cases += [linear_case(16, 2048, 2048, group="linear 2048->2048"),
                              linear_case(256, 1024, 1024, group="linear 1024->1024")]
                    for layout in layouts:
                        cases += [conv2d_case(2, 64, 64, 56, channels_last=layout == "channels_last",
                                              group="conv2d", name="resnet18 layer1"),
                                  conv2d_case(2, 256, 256, 16, channels_last=layout == "channels_last",
                                              group="conv2d", name="retinanet head P4 @128px")]
            elif shape_set == "linear-sweep":
                width = sizes.linear_width
                cases += [linear_case(b, width, width, group=f"linear {width}->{width}")
                          for b in (batches or sizes.linear_batches)]
            elif shape_set == "resnet18":
                for layout in layouts:
                    cases += resnet18_conv_cases(sizes.conv_batch, sizes.resnet_resolution, layout == "channels_last")
            elif shape_set == "retinanet":
                for layout in layouts:
                    cases += retinanet_head_cases(sizes.retinanet_batch, sizes.retinanet_image,
                                                  layout == "channels_last")
            else:
                raise ValueError(f"shapes must be among {', '.join(SHAPE_SETS)}; got {shape_set!r}")
        model_cases = []
        for name in models:
            if name == "mlp":
                model_cases.append(model_case("mlp", (model_batch or sizes.model_batch) * 32, 0, False,
                                              width=sizes.mlp_width))
            else:
                model_cases += [model_case(name, model_batch or sizes.model_batch,
                                           model_resolution or sizes.model_resolution, layout == "channels_last")
                                for layout in layouts]
    cases = [case for case in cases if case.op in ops]
    if "model" in ops:
        cases += model_cases
    return cases


# ----------------------------------------------------------------------------------------------------------
# Variants: torch's module (the baseline), fastfa per (rule, backend), and the peers per rule

#: Peer names as they appear in the rows' "backend" field.
PEER_BACKENDS = {name: f"peer:{name}" for name in peers.PEERS}


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
    memory: bool = True    # measure peak memory


def settings_for(device_type: str, quick: bool, repeat: Optional[int], total_budget_s: Optional[float] = None
                 ) -> Settings:
    if quick:
        settings = Settings(sample_s=1e-3, case_budget_s=0.25, min_rounds=3, max_rounds=7, warmup_calls=3,
                            warmup_s=0.01, buffers=2, total_budget_s=5.0, rounds=repeat)
    elif device_type == "cuda":
        settings = Settings(sample_s=2e-3, case_budget_s=4.0, min_rounds=10, max_rounds=50, warmup_calls=10,
                            warmup_s=0.1, buffers=4, total_budget_s=240.0, rounds=repeat)
    else:
        settings = Settings(sample_s=0.02, case_budget_s=15.0, min_rounds=5, max_rounds=40, warmup_calls=2,
                            warmup_s=0.1, buffers=2, total_budget_s=45.0, rounds=repeat)
    if total_budget_s is not None:
        settings.total_budget_s = total_budget_s
    return settings


@dataclass
class Variant:
    rule: Optional[str]            # None: torch's own module (the backprop baseline)
    backend: Optional[str]         # a fastfa backend, or "peer:<name>"
    module: torch.nn.Module
    step: Callable                 # step(x): forward, backward (and the optimizer's step for models)
    calls: int = 1                 # calls per round
    samples: list = field(default_factory=list)   # ms per call, one per round
    peak_bytes: Optional[int] = None
    max_rel_err: Optional[float] = None
    optimizer: Optional[torch.optim.Optimizer] = None

    @property
    def label(self) -> str:
        return "torch bp" if self.rule is None else f"{self.rule}/{self.backend}"

    @property
    def peer(self) -> Optional[str]:
        return self.backend[5:] if self.backend and self.backend.startswith("peer:") else None

    def zero(self) -> None:
        self.module.zero_grad(set_to_none=True)


def _backend_context(backend: Optional[str]):
    if backend is None or backend.startswith("peer:"):
        return contextlib.nullcontext()
    return fastfa.use_backend(backend)


def _make_input(case: Case, device, dtype, generator) -> torch.Tensor:
    x = torch.randn(case.input_shape, device="cpu", dtype=torch.float32, generator=generator).to(device, dtype)
    if case.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_(not case.is_model)


def _make_module(case: Case, rule: Optional[str], backend: Optional[str], device, reference: torch.nn.Module,
                 seed: int) -> tuple:
    """(module to time, its eager form for the forward check): same weights as the reference."""
    torch.manual_seed(seed)   # fastfa.convert draws R and seeds from torch's generator
    module = copy.deepcopy(reference)
    if rule is not None:
        module = fastfa.convert(module, rule)
        peer = backend[5:] if backend.startswith("peer:") else None
        if peer is not None:
            if peer == "biotorch":
                module = peers.convert_to_peers(module, make=peers.biotorch_of)
            else:
                module = peers.convert_to_peers(module)
    if case.channels_last:
        module = module.to(memory_format=torch.channels_last)
    eager = module
    if backend == PEER_BACKENDS["compile"]:
        module = peers.compile_peer(module, device)
    return module, eager


def _stepper(case: Case, module: torch.nn.Module, grad: Optional[torch.Tensor], target: Optional[torch.Tensor]):
    """The step a variant times; a model's includes cross-entropy and SGD's update."""
    if not case.is_model:
        def step(x):
            module(x).backward(grad)
        return step, None
    # lr small enough that hundreds of steps on random data stay finite for every rule.
    optimizer = torch.optim.SGD(module.parameters(), lr=1e-4, momentum=0.9)

    def step(x):
        torch.nn.functional.cross_entropy(module(x), target).backward()
        optimizer.step()
    return step, optimizer


def _max_rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|, in float64."""
    out, ref = out.detach().double(), ref.detach().double()
    scale = ref.abs().max().item() if ref.numel() else 0.0
    error = (out - ref).abs().max().item() if ref.numel() else 0.0
    return error / scale if scale > 0 else error


def variant_specs(rules: list, backends: list, peer_names: list, compile_rules: Optional[list],
                  model: bool = False, compile_models: bool = True, model_rules: Optional[list] = None) -> list:
    """[(rule, backend)]: every rule on every fastfa backend, then each peer for the rules it has.

    The compile peer gets only ``compile_rules`` (all when None), and no model unless ``compile_models``;
    a model gets only ``model_rules`` (all when None).
    """
    if model and model_rules is not None:
        rules = [rule for rule in rules if rule in model_rules]
    specs = [(rule, backend) for backend in backends for rule in rules]
    for name in peer_names:
        for rule in rules:
            if name == "biotorch" and rule not in peers.biotorch_rules():
                continue
            if name == "compile" and ((compile_rules is not None and rule not in compile_rules)
                                      or (model and not compile_models)):
                continue
            specs.append((rule, PEER_BACKENDS[name]))
    return specs


# ----------------------------------------------------------------------------------------------------------
# Timing


class Runner:
    """Runs and times the steps of the variants of one case on one device."""

    def __init__(self, device: torch.device, inputs: list, flush: Optional[torch.Tensor]):
        self.device = device
        self.inputs = inputs
        self.flush = flush
        self.cursor = 0

    def next_input(self) -> torch.Tensor:
        x = self.inputs[self.cursor % len(self.inputs)]
        self.cursor += 1
        x.grad = None
        return x

    def time_calls(self, variant: Variant, calls: int) -> list:
        """Milliseconds of each of `calls` steps."""
        try:
            return self._time_calls(variant, calls)
        finally:
            variant.zero()   # the gradients of every variant alive at once would double the memory

    def _time_calls(self, variant: Variant, calls: int) -> list:
        with _backend_context(variant.backend):
            if self.device.type == "cuda":
                starts = [torch.cuda.Event(enable_timing=True) for _ in range(calls)]
                ends = [torch.cuda.Event(enable_timing=True) for _ in range(calls)]
                for start, end in zip(starts, ends):
                    variant.zero()
                    x = self.next_input()
                    if self.flush is not None:
                        self.flush.zero_()      # so that L2 holds nothing of the last call
                    start.record()
                    variant.step(x)
                    end.record()
                torch.cuda.synchronize(self.device)
                return [start.elapsed_time(end) for start, end in zip(starts, ends)]
            times = []
            for _ in range(calls):
                variant.zero()
                x = self.next_input()
                begin = time.perf_counter()
                variant.step(x)
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


# ----------------------------------------------------------------------------------------------------------
# Peak memory

CUDA_PEAK = "cuda: torch.cuda.max_memory_allocated over one step, only this variant alive"
CPU_PEAK = ("cpu: bytes of the variant's live tensors at the step's start (parameters, buffers, optimizer "
            "state, input, output gradient) + the peak of torch.profiler's allocator events over one step, "
            "run in a fresh thread so that per-thread workspaces are counted")


def _storage_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor):
            continue
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in seen or storage.nbytes() == 0:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


def _live_bytes(variant: Variant, extra: list) -> int:
    tensors = list(variant.module.parameters()) + list(variant.module.buffers()) + list(extra)
    if variant.optimizer is not None:
        for state in variant.optimizer.state.values():
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return _storage_bytes(tensors)


@contextlib.contextmanager
def _quiet_stderr():
    """The profiler's C++ side logs each start and stop on fd 2; keep the terminal readable."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _cpu_peak(variant: Variant, runner: Runner, extra: list) -> int:
    """CPU_PEAK for one step of the variant."""
    from torch.profiler import ProfilerActivity, profile

    variant.zero()
    x = runner.next_input()
    live = _live_bytes(variant, [x] + extra)
    result = {}

    def one_step():
        try:
            with _backend_context(variant.backend), profile(activities=[ProfilerActivity.CPU],
                                                            profile_memory=True) as prof:
                variant.step(x)
            events = [e for e in prof.profiler.kineto_results.events()
                      if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")]
            events.sort(key=lambda e: e.start_ns())
            running = peak = 0
            for event in events:
                running += event.nbytes()
                peak = max(peak, running)
            result["peak"] = peak
        except Exception as error:  # reported by the caller
            result["error"] = error

    with _quiet_stderr():
        thread = threading.Thread(target=one_step)
        thread.start()
        thread.join()
    if "error" in result:
        raise result["error"]
    return live + result["peak"]


def _cuda_peak(case: Case, rule, backend, device, dtype, seed: int) -> int:
    """CUDA_PEAK: a fresh copy of the variant, two steps to settle workspaces, then one measured."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    reference = case.make_reference(device, dtype)
    module, eager = _make_module(case, rule, backend, device, reference, seed)
    del reference
    x = _make_input(case, device, dtype, generator)
    # The eager module gives the output's shape (a compiled one would compile an inference graph).
    grad, target = _step_targets(case, eager, x, device, dtype, generator)
    del eager
    step, optimizer = _stepper(case, module, grad, target)
    variant = Variant(rule, backend, module, step, optimizer=optimizer)
    runner = Runner(device, [x], None)
    for _ in range(2):      # library workspaces, algorithm choices and optimizer state are made here
        runner.time_calls(variant, 1)
    variant.zero()
    x.grad = None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    runner.time_calls(variant, 1)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del runner, variant, module, x, grad, target, step, optimizer
    gc.collect()
    torch.cuda.empty_cache()
    return int(peak)


def _step_targets(case: Case, module, x, device, dtype, generator) -> tuple:
    """(output gradient for a layer, class targets for a model)."""
    if case.is_model:
        return None, torch.randint(0, case.classes, (case.batch,), generator=generator).to(device)
    with torch.no_grad():
        out = module(x)
    grad = torch.randn(out.shape, generator=generator).to(device, dtype)
    if case.channels_last:
        grad = grad.contiguous(memory_format=torch.channels_last)
    return grad, None


def _log(message: str, progress) -> None:
    if progress is not None:
        progress.log(message)


class Progress:
    """A progress bar on a terminal (one line redrawn), plain log lines elsewhere."""

    def __init__(self, stream, total: int):
        self.stream = stream
        self.total = max(total, 1)
        self.done = 0
        self.begin = time.perf_counter()
        self.tty = bool(stream is not None and getattr(stream, "isatty", lambda: False)())
        self.status = ""

    def log(self, message: str) -> None:
        if self.stream is None:
            return
        if self.tty:
            self.stream.write("\r\033[K")
        print(message, file=self.stream, flush=True)
        self.draw()

    def advance(self, status: str = "", steps: int = 1) -> None:
        self.done = min(self.total, self.done + steps)
        self.status = status
        self.draw()

    def draw(self) -> None:
        if not self.tty or self.stream is None:
            return
        width = 30
        filled = int(width * self.done / self.total)
        elapsed = time.perf_counter() - self.begin
        self.stream.write(f"\r\033[K[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                          f"{elapsed:4.0f} s  {self.status}"[:200])
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self.stream is not None:
            self.stream.write("\r\033[K")
            self.stream.flush()


# ----------------------------------------------------------------------------------------------------------
# One case


def run_case(case: Case, specs: list, device: torch.device, dtype: torch.dtype, settings: Settings,
             progress: Optional[Progress] = None, seed: int = 0, cases_left: int = 1) -> tuple:
    """Times one case for the baseline and every (rule, backend) in specs; returns (rows, errors, skipped).

    A fastfa variant that fails is an error; a peer that fails (BioTorch has no bf16 brsf, say) is
    skipped with its reason: a limit of that library, not of the run.
    """
    dtype_name = next(short for d, short in DTYPES.values() if d == dtype)
    errors, skipped = [], []
    where = f"{case.op} {case.shape} {dtype_name}"

    def failed(rule, backend, message):
        (skipped if backend and backend.startswith("peer:") else errors).append(
            f"{where} {rule or 'torch'}/{backend}: {message}")
    all_specs = [(None, None)] + list(specs)

    # Peak memory on GPU first, one variant alive at a time.
    peaks = {}
    if device.type == "cuda" and settings.memory:
        _log("  memory: one step per variant", progress)
        for index, (rule, backend) in enumerate(all_specs):
            try:
                peaks[(rule, backend)] = _cuda_peak(case, rule, backend, device, dtype, seed)
            except Exception as error:  # an OOM or an unsupported combination: reported, not fatal
                peaks[(rule, backend)] = None
                failed(rule, backend, f"peak memory: {type(error).__name__}: {error}")
                gc.collect()
                torch.cuda.empty_cache()

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    reference = case.make_reference(device, dtype)
    if case.channels_last:
        reference = reference.to(memory_format=torch.channels_last)
    inputs = [_make_input(case, device, dtype, generator) for _ in range(settings.buffers)]
    grad, target = _step_targets(case, reference, inputs[0], device, dtype, generator)
    with torch.no_grad():
        ref_out = reference(inputs[0])

    flush = None
    if device.type == "cuda":
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 0
        flush = torch.empty(max(256 << 20, 2 * int(l2)), dtype=torch.int8, device=device)
    runner = Runner(device, inputs, flush)

    variants = []
    for rule, backend in all_specs:
        try:
            with _backend_context(backend):
                if rule is None:
                    module, eager = reference, reference
                else:
                    module, eager = _make_module(case, rule, backend, device, reference, seed)
                err = None
                if rule is not None:
                    with torch.no_grad():
                        err = _max_rel_err(eager(inputs[0]), ref_out)
            step, optimizer = _stepper(case, module, grad, target)
            variants.append(Variant(rule, backend, module, step, max_rel_err=err, optimizer=optimizer))
        except Exception as error:
            if rule is None:
                raise
            failed(rule, backend, f"{type(error).__name__}: {error}")
            _log(f"  skipped {rule}/{backend}: {type(error).__name__}: {error}", progress)
    del ref_out

    # Warm-up (and compilation for the compile peer), and the time of one call to size the rounds.
    _log(f"  warm-up of {len(variants)} variants", progress)
    estimates = {}
    for variant in list(variants):
        if progress is not None:
            progress.status = f"{where}: warm-up {variant.label}"
            progress.draw()
        try:
            times = []
            begin = time.perf_counter()
            while len(times) < settings.warmup_calls or time.perf_counter() - begin < settings.warmup_s:
                times += runner.time_calls(variant, 1)
                if len(times) >= 1000:
                    break
            estimates[id(variant)] = statistics.median(times[len(times) // 2:])
            if device.type == "cpu" and settings.memory:
                variant.peak_bytes = _cpu_peak(variant, runner, [grad, target])
        except Exception as error:
            if variant.rule is None:
                raise
            failed(variant.rule, variant.backend, f"{type(error).__name__}: {error}")
            _log(f"  skipped {variant.label}: {type(error).__name__}: {error}", progress)
            variants.remove(variant)
    for variant in variants:
        if device.type == "cuda":
            variant.peak_bytes = peaks.get((variant.rule, variant.backend))

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
    _log(f"  {rounds} rounds of about {round_s * 1e3:.0f} ms", progress)

    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(rounds):
            if progress is not None:
                progress.status = f"{where}: round {r + 1}/{rounds}"
                progress.draw()
            shift = r % len(variants)
            for variant in variants[shift:] + variants[:shift]:
                times = runner.time_calls(variant, variant.calls)
                variant.samples.append(sum(times) / len(times))
    finally:
        if gc_was_enabled:
            gc.enable()

    rows = _rows(case, dtype_name, variants, rounds, device)
    del variants, runner, inputs, grad, target, flush, reference
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows, errors, skipped


def _paired_ratio(samples: list, base: list) -> tuple:
    """Median and quartiles over rounds of samples[r] / base[r]: drift between rounds cancels."""
    per_round = [a / b for a, b in zip(samples, base)]
    return statistics.median(per_round), _quartiles(per_round)


def _rows(case: Case, dtype_name: str, variants: list, rounds: int, device) -> list:
    base = variants[0]
    bp_ms = statistics.median(base.samples)
    bp_q = _quartiles(base.samples)
    by_key = {(v.rule, v.backend): v for v in variants[1:]}
    rows = []
    for variant in variants[1:]:
        ms = statistics.median(variant.samples)
        q = _quartiles(variant.samples)
        ratio, rq = _paired_ratio(variant.samples, base.samples)
        row = {
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
            # Fields added to design/gpu.md's shape:
            "group": case.group, "batch": case.batch, "layout": case.layout, "peer": variant.peer,
            "peak_kind": None if variant.peak_bytes is None else (CUDA_PEAK if device.type == "cuda" else CPU_PEAK),
        }
        if variant.peer is None:
            # fastfa's time over each peer's for the same rule, paired by round (below 1: fastfa is faster).
            row["vs_peers"] = {}
            for name, backend in PEER_BACKENDS.items():
                other = by_key.get((variant.rule, backend))
                if other is not None:
                    r, rq2 = _paired_ratio(variant.samples, other.samples)
                    row["vs_peers"][name] = {"ratio": _sig(r, 4), "iqr": [_sig(rq2[0], 4), _sig(rq2[1], 4)]}
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------------------
# The whole run


def machine_state() -> dict:
    """What else the machine was doing: its load averages, cores and torch's threads."""
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load = None
    return {"loadavg": load, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def run_bench(*, device: torch.device, dtypes, rules: list, backends: list, cases: list, settings: Settings,
              command: str, peer_names=(), compile_rules=None, compile_models=True, model_rules=None,
              progress=sys.stderr) -> tuple:
    """Times every case in every dtype; returns (results dict in the results-file shape, errors)."""
    if isinstance(dtypes, torch.dtype):
        dtypes = [dtypes]
    rows, errors, skipped = [], [], []
    start_state = machine_state()
    begin_run = time.perf_counter()
    specs = {model: variant_specs(rules, backends, list(peer_names), compile_rules, model, compile_models,
                                  model_rules)
             for model in (False, True)}
    bar = Progress(progress, len(cases) * len(dtypes)) if progress is not None else None
    if settings.total_budget_s is not None and settings.rounds is None:
        settings.deadline = time.perf_counter() + settings.total_budget_s
    jobs = [(case, dtype) for dtype in dtypes for case in cases]
    # Each case compiles its own peers; the same forward code compiles once per rule and shape.
    dynamo = torch._dynamo.config
    with dynamo.patch(recompile_limit=max(dynamo.recompile_limit, 4 * len(specs[False]) + 8),
                      fail_on_recompile_limit_hit=True):
        for index, (case, dtype) in enumerate(jobs):
            dtype_name = next(short for d, short in DTYPES.values() if d == dtype)
            _log(f"[{index + 1}/{len(jobs)}] {case.op} {case.shape} {dtype_name} on {device}", bar)
            begin = time.perf_counter()
            case_specs = specs[case.is_model]
            if PEER_BACKENDS["compile"] in (backend for _, backend in case_specs):
                torch._dynamo.reset()
            try:
                case_rows, case_errors, case_skipped = run_case(case, case_specs, device, dtype, settings, bar,
                                                                seed=index, cases_left=len(jobs) - index)
            except Exception as error:  # the baseline itself failed (say, out of memory): go on with the next
                case_rows, case_skipped = [], []
                case_errors = [f"{case.op} {case.shape}: {type(error).__name__}: {error}"]
                _log(f"  failed: {type(error).__name__}: {error}", bar)
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            rows += case_rows
            errors += case_errors
            skipped += case_skipped
            _log(f"  done in {time.perf_counter() - begin:.1f} s", bar)
            if bar is not None:
                bar.advance(f"{case.op} {case.shape}")
    if bar is not None:
        bar.close()
    status = peers.biotorch_status()
    results = {"commit": git_commit(), "command": command, "device": device_name(device),
               "versions": versions(), "rows": rows,
               # Fields added to design/gpu.md's shape:
               "machine": {"start": start_state, "end": machine_state()},
               "seconds": round(time.perf_counter() - begin_run, 1),
               "peers": {"autograd": "torch.autograd.Function per layer kind (fastfa.peers)",
                         "compile": "the autograd peer under torch.compile"
                                    + (' (mode="max-autotune")' if device.type == "cuda" else " (default mode)"),
                         "biotorch": status[1] if status[0] else f"not usable: {status[1]}"},
               "peak_kind": CUDA_PEAK if device.type == "cuda" else CPU_PEAK,
               "skipped": skipped}
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


def _geomean(values: list) -> Optional[float]:
    values = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def summarize(rows: list) -> list:
    """Per rule and backend (fastfa's and the peers'): the geometric mean of the ratios to backprop
    over the layer cases, the model steps' ratios, and fastfa's geometric-mean ratio to each peer."""
    keys = []
    for row in rows:
        if (row["rule"], row["backend"]) not in keys:
            keys.append((row["rule"], row["backend"]))
    summary = []
    for rule, backend in keys:
        mine = [row for row in rows if row["rule"] == rule and row["backend"] == backend]
        layers = [row for row in mine if not row["op"].startswith("model:")]
        entry = {"rule": rule, "backend": backend, "layers": len(layers),
                 "layer_ratio": _sig(_geomean([row["ratio"] for row in layers]), 4),
                 "models": {row["op"][6:] + (f" {row['dtype']}" if row["dtype"] != "fp32" else ""): row["ratio"]
                            for row in mine if row["op"].startswith("model:")}}
        vs = {}
        for name in peers.PEERS:
            ratios = [row["vs_peers"][name]["ratio"] for row in layers if name in (row.get("vs_peers") or {})]
            model_ratios = {row["op"][6:]: row["vs_peers"][name]["ratio"] for row in mine
                            if row["op"].startswith("model:") and name in (row.get("vs_peers") or {})}
            if ratios or model_ratios:
                vs[name] = {"layer_ratio": _sig(_geomean(ratios), 4), "layers": len(ratios), "models": model_ratios}
        if vs:
            entry["vs_peers"] = vs
        summary.append(entry)
    return summary


def format_summary(summary: list) -> str:
    """The newcomer's answer: each rule's time as a multiple of backprop's, and of the peers'."""
    lines = ["time / backprop's (geometric mean over the layer shapes; model: one SGD step), and fastfa's time / "
             "each peer's for the same rule (below 1: fastfa is faster)"]
    header = ["rule", "backend", "layers", "models", "fastfa/autograd", "fastfa/compile", "fastfa/biotorch"]
    table = []
    for entry in summary:
        vs = entry.get("vs_peers", {})

        def peer_cell(name):
            if name not in vs:
                return ""
            cell = "" if vs[name]["layer_ratio"] is None else f"{vs[name]['layer_ratio']:.2f}"
            models = ", ".join(f"{k} {v:.2f}" for k, v in vs[name]["models"].items())
            return cell + (f" ({models})" if models else "")

        table.append([entry["rule"], entry["backend"],
                      "" if entry["layer_ratio"] is None else f"{entry['layer_ratio']:.3f}",
                      ", ".join(f"{k} {v:.3f}" for k, v in entry["models"].items()),
                      peer_cell("autograd"), peer_cell("compile"), peer_cell("biotorch")])
    widths = [max(len(header[i]), *(len(r[i]) for r in table)) if table else len(header[i])
              for i in range(len(header))]
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]
    return "\n".join(lines)


def write_results(results: dict, path: Path) -> Path:
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    return path


CSV_COLUMNS = ("op", "group", "shape", "batch", "layout", "dtype", "rule", "backend", "peer", "ms", "bp_ms",
               "ratio", "ratio_q1", "ratio_q3", "rounds", "peak_bytes", "bp_peak_bytes", "max_rel_err",
               "vs_autograd", "vs_compile", "vs_biotorch")


def write_csv(results: dict, path: Path) -> Path:
    """One line per row of the results file, flat (the spread's ratio IQR and the peer ratios as columns)."""
    import csv

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in results["rows"]:
            spread = row.get("spread") or {}
            vs = row.get("vs_peers") or {}
            flat = {key: row.get(key) for key in CSV_COLUMNS if key in row}
            flat.update(ratio_q1=(spread.get("ratio") or [None, None])[0],
                        ratio_q3=(spread.get("ratio") or [None, None])[1], rounds=spread.get("rounds"),
                        **{f"vs_{name}": vs[name]["ratio"] for name in vs})
            writer.writerow({key: "" if flat.get(key) is None else flat[key] for key in CSV_COLUMNS})
    return path


def plot_available() -> tuple:
    """(True, "") when matplotlib imports, else (False, why)."""
    try:
        import matplotlib  # noqa: F401
    except Exception as error:  # ImportError, or a broken install
        return False, f"matplotlib is not installed ({type(error).__name__}: {error}); pip install matplotlib"
    return True, ""


def write_plot(results: dict, path: Path) -> Path:
    """A PNG: per (group, dtype, layout), each rule's time ratio to backprop against the batch size (or
    the layer, for a fixed-batch sweep), fastfa solid and the autograd peer dashed; peak memory over
    backprop's beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in results["rows"] if not row["op"].startswith("model:")]
    panels = []
    for row in rows:
        key = (row.get("group") or row["op"], row["dtype"], row.get("layout"))
        if key not in panels:
            panels.append(key)
    with_memory = any(row.get("peak_bytes") for row in rows)
    columns = 2 if with_memory else 1
    figure, axes = plt.subplots(max(len(panels), 1), columns, figsize=(7 * columns, 3.6 * max(len(panels), 1)),
                                squeeze=False)
    rules = []
    for row in rows:
        if row["rule"] not in rules:
            rules.append(row["rule"])
    colors = {rule: plt.get_cmap("tab10")(i % 10) for i, rule in enumerate(rules)}
    styles = {None: "-", "autograd": "--", "compile": ":", "biotorch": "-."}
    for index, (group, dtype, layout) in enumerate(panels):
        mine = [row for row in rows if (row.get("group") or row["op"]) == group and row["dtype"] == dtype
                and row.get("layout") == layout]
        shapes = []
        for row in mine:
            if row["shape"] not in shapes:
                shapes.append(row["shape"])
        batches = {row["batch"] for row in mine if row.get("batch") is not None}
        by_batch = len(batches) == len(shapes) and len(shapes) > 1
        for column, (field_name, label) in enumerate([("ratio", "time / backprop"),
                                                      ("memory", "peak memory / backprop")][:columns]):
            ax = axes[index][column]
            for rule in rules:
                for backend in sorted({row["backend"] for row in mine if row["rule"] == rule}, key=str):
                    series = [row for row in mine if row["rule"] == rule and row["backend"] == backend]
                    peer = series[0].get("peer") if series else None
                    if peer not in styles or (column == 1 and peer is not None):
                        continue
                    xs, ys = [], []
                    for row in series:
                        value = row["ratio"] if field_name == "ratio" else (
                            row["peak_bytes"] / row["bp_peak_bytes"] if row.get("peak_bytes") and
                            row.get("bp_peak_bytes") else None)
                        if value is None:
                            continue
                        xs.append(row["batch"] if by_batch else shapes.index(row["shape"]))
                        ys.append(value)
                    if xs:
                        order = sorted(range(len(xs)), key=xs.__getitem__)
                        ax.plot([xs[i] for i in order], [ys[i] for i in order], styles[peer], marker="o",
                                markersize=3, color=colors[rule],
                                label=rule if peer is None else f"{rule} ({peer})")
            ax.axhline(1.0, color="black", linewidth=0.8)
            if by_batch:
                ax.set_xscale("log", base=2)
                ax.set_xlabel("batch")
            else:
                ax.set_xticks(range(len(shapes)))
                ax.set_xticklabels([s.split(" (")[-1].rstrip(")") if " (" in s else s for s in shapes],
                                   rotation=30, ha="right", fontsize=7)
            ax.set_ylabel(label)
            ax.set_title(f"{group}, {dtype}" + (f", {layout}" if layout else ""), fontsize=9)
            ax.grid(True, alpha=0.3)
    # One legend for the figure: a colour per rule, a line style per implementation.
    from matplotlib.lines import Line2D

    present = {row.get("peer") for row in rows}
    names = {None: "fastfa", "autograd": "autograd.Function peer", "compile": "torch.compile peer",
             "biotorch": "BioTorch"}
    handles = [Line2D([0], [0], color=colors[rule], label=rule) for rule in rules]
    handles += [Line2D([0], [0], color="gray", linestyle=style, label=names[peer])
                for peer, style in styles.items() if peer in present]
    height = figure.get_figheight()
    figure.legend(handles=handles, loc="upper center", ncol=min(len(handles), 8), fontsize=7,
                  bbox_to_anchor=(0.5, 1.0 - 0.25 / height))
    machine = results.get("machine", {}).get("start", {})
    figure.suptitle(f"fastfa bench on {results['device']}, load average {machine.get('loadavg')}, "
                    f"torch threads {machine.get('torch_threads')}", fontsize=8, y=1.0 - 0.05 / height)
    figure.tight_layout(rect=(0, 0, 1, 1.0 - 0.75 / height))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def command_line(argv: list) -> str:
    return shlex.join(["fastfa"] + [str(a) for a in argv])
