"""Backend selection: which implementation of the ops runs (aten, triton, cuda).

A backend kernel that does not support a call's configuration (a dtype, a device, a
shape) hands the call to aten and says so: it is counted in one record shared by every
backend (csrc/fallbacks.cpp), which the cuda backend's C++ ops write directly (with a
warning) and the triton backend's ops through ``record_fallback`` (which also logs at
debug level on the "fastfa" logger). ``fastfa.last_fallbacks()`` returns what fell back
since the last ``fastfa.clear_fallbacks()``. Never a silently different result.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import threading
from typing import NamedTuple

import torch

from . import _C
from .rules import canonical_rule, rule_spec

__all__ = ["BACKENDS", "BackendStatus", "Fallback", "backends", "set_backend", "get_backend", "use_backend",
           "last_fallbacks", "clear_fallbacks", "record_fallback", "AUTO_COSTS", "AutoCosts", "PassPlan", "auto_plan",
           "auto_costs", "set_auto_costs", "set_cuda_fused", "cuda_fused"]

logger = logging.getLogger("fastfa")

#: Every backend fastfa knows, fastest first where each is usable.
BACKENDS = ("cuda", "triton", "aten")


class BackendStatus(NamedTuple):
    usable: bool
    reason: str


def _aten_status() -> BackendStatus:
    info = _C.build_info()
    devices = ["cpu"]
    if info["cuda"]:
        if torch.cuda.is_available():
            devices.append("cuda")
            where = "cpu and cuda"
        else:
            where = "cpu (built with CUDA for " + info["cuda_arch_list"].replace("_", ";") + ", but no GPU visible)"
    else:
        where = "cpu (built without CUDA: reinstall with FORCE_CUDA=1 for GPUs)"
    return BackendStatus(True, f"fastfa's transform kernel + ATen GEMM/convolution on {where}")


def triton_interpreted() -> bool:
    """TRITON_INTERPRET=1: Triton kernels run on CPU tensors through Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_status() -> BackendStatus:
    # find_spec, not import: importing triton here would fix its TRITON_INTERPRET choice
    # before a test suite or user has set it.
    if importlib.util.find_spec("triton") is None:
        return BackendStatus(False, "triton is not installed (pip install triton)")
    where = []
    if triton_interpreted():
        where.append("cpu through Triton's interpreter (TRITON_INTERPRET=1: CPU tensors, for testing, slow)")
    elif torch.cuda.is_available():
        where.append("cuda")
    if not where:
        return BackendStatus(False, "no CUDA GPU is visible (set TRITON_INTERPRET=1 to run the Triton kernels on "
                                    "CPU tensors through Triton's interpreter, for testing)")
    fallen = sum(record.count for record in last_fallbacks() if record.op.startswith("triton_"))
    note = f"; {fallen} call(s) fell back to aten (see fastfa.last_fallbacks())" if fallen else ""
    return BackendStatus(True, "fastfa's Triton kernels (the transform fused into the GEMM tile loads) on "
                               f"{' and '.join(where)}; unsupported configurations fall back to aten{note}")


def _cuda_arches(info) -> list:
    return [a for a in info["cuda_arch_list"].split("_") if a]


def _runs_here(arches, major: int, minor: int) -> bool:
    """Whether the binary has code this GPU runs: a cubin of the same major and no higher
    minor (sm_90a only on sm_90 itself), or PTX of a no newer architecture (JIT-compiled)."""
    for arch in arches:
        version, ptx = arch.split("+")[0], arch.endswith("+PTX")
        arch_major, arch_minor = (int(part) for part in version.rstrip("a").split("."))
        if version.endswith("a"):
            if (arch_major, arch_minor) == (major, minor):
                return True
        elif (arch_major == major and arch_minor <= minor) or (ptx and (arch_major, arch_minor) <= (major, minor)):
            return True
    return False


def _cuda_status() -> BackendStatus:
    info = _C.build_info()
    if not info["cuda"]:
        return BackendStatus(False, "fastfa was built without CUDA: reinstall on a GPU machine or with FORCE_CUDA=1")
    if not info.get("fused_cuda"):
        return BackendStatus(False, "fastfa was built without the fused kernels (the CUTLASS / CuTe headers were "
                                    "missing at build time): pip install nvidia-cutlass==4.2.0.0 and rebuild")
    arches = _cuda_arches(info)
    if not torch.cuda.is_available():
        return BackendStatus(False, f"fused kernels built for {';'.join(arches)}, but no GPU is visible")
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return BackendStatus(False, f"the fused kernels need the tensor cores of compute capability 8.0 or later; "
                                    f"this GPU is {major}.{minor}")
    if not _runs_here(arches, major, minor):
        return BackendStatus(False, f"fastfa was built for {';'.join(arches)}, which has no code for this GPU "
                                    f"({major}.{minor}): rebuild with TORCH_CUDA_ARCH_LIST={major}.{minor}"
                                    + ("a" if (major, minor) == (9, 0) else ""))
    path = "wgmma" if (major, minor) == (9, 0) and "9.0a" in [a.split("+")[0] for a in arches] else "mma.sync"
    return BackendStatus(True, f"fastfa's fused tensor-core GEMMs ({path}) for linear and conv2d (implicit GEMMs), "
                               "fp16 / bf16 / tf32; fp64, fp32 while torch.backends.cuda.matmul.allow_tf32 is False, "
                               "grouped conv2d and a strided conv2d's grad_input run the aten path on the GPU "
                               "(warned, and listed by fastfa.last_fallbacks()), as does B's gradient for wm, aa "
                               "and ia")


def backends() -> dict:
    """Which backends are usable here, and why not: {name: BackendStatus(usable, reason)}."""
    return {
        "cuda": _cuda_status(),
        "triton": _triton_status(),
        "aten": _aten_status(),
    }


class Fallback(NamedTuple):
    op: str  # e.g. "triton_linear"
    backend: str  # the backend that ran instead: "aten"
    reason: str
    count: int  # how many calls fell back for this (op, reason) since the last clear_fallbacks()


def record_fallback(op: str, reason: str, backend: str = "aten") -> None:
    """Called by a backend's op when it hands a call to ``backend``: a debug log and a record."""
    logger.debug("fastfa: %s fell back to %s: %s", op, backend, reason)
    _C._record_fallback(op, reason, backend)


def last_fallbacks() -> list:
    """The calls that fell back to another backend since the last clear_fallbacks(), as
    ``Fallback(op, backend, reason, count)`` records, in the order first seen. The cuda
    backend's ops are named ``cuda_<op>``, the triton backend's ``triton_<op>``; a backward
    that runs only part of its work on aten (a strided conv2d's grad_input, B's gradient for
    wm, aa, ia on cuda) is listed with the part in its reason."""
    return [Fallback(*record) for record in _C._fallbacks()]


def clear_fallbacks() -> None:
    _C._clear_fallbacks()


class _ThreadState(threading.local):
    # A class attribute as the default: every layer's forward reads it, and getattr with a
    # default pays for a caught AttributeError on each thread that never set one (0.4 µs).
    backend = "auto"


_state = _ThreadState()


def get_backend() -> str:
    """The backend chosen for this thread: "auto" (default), "aten", "triton" or "cuda"."""
    return _state.backend


def _check_name(name) -> str:
    if not isinstance(name, str) or name not in BACKENDS + ("auto",):
        raise ValueError(f"backend must be one of auto, {', '.join(BACKENDS)}; got {name!r}")
    if name != "auto":
        status = backends()[name]
        if not status.usable:
            raise RuntimeError(f"backend {name!r} is not usable here: {status.reason}")
    return name


def set_backend(name: str) -> None:
    """Select the backend for every following call on this thread ("auto" picks the fastest usable)."""
    _state.backend = _check_name(name)


@contextlib.contextmanager
def use_backend(name: str):
    """``with fastfa.use_backend("aten"): ...`` selects a backend for a block of code."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        _state.backend = previous


_BUILT_WITH_CUDA = bool(_C.build_info()["cuda"])
# "auto" on a GPU: the cuda backend where it is usable (its passes take the vendor GEMM /
# convolution, grad_input the fused kernel where auto_plan's model says it pays), else aten.
# Decided once per device: backends() is too slow for every call.
_auto_gpu_backend: dict = {}


def _auto_on(device: torch.device) -> str:
    index = device.index if device.index is not None else torch.cuda.current_device()
    chosen = _auto_gpu_backend.get(index)
    if chosen is None:
        with torch.cuda.device(index):
            chosen = "cuda" if _cuda_status().usable else "aten"
        _auto_gpu_backend[index] = chosen
    return chosen


def resolve(name, device: torch.device) -> str:
    """The concrete backend for one call: the per-call name, else the thread's choice."""
    chosen = get_backend() if name is None else _check_name(name)
    if chosen == "auto" and device.type == "cpu":  # a module's every call: nothing to check
        return "aten"
    if device.type == "cuda" and not _BUILT_WITH_CUDA:
        raise RuntimeError("fastfa was built without CUDA kernels, so it cannot run on a CUDA tensor; "
                           "reinstall on a GPU machine or with FORCE_CUDA=1 "
                           "(pip install --no-build-isolation -e .)")
    if device.type not in ("cpu", "cuda", "meta"):
        raise RuntimeError(f"fastfa runs on cpu and cuda tensors; got a tensor on {device}")
    if chosen == "cuda" and device.type == "cpu":
        raise RuntimeError("backend 'cuda' runs on CUDA tensors; this call's tensors are on cpu "
                           "(use backend 'aten' or 'auto' for them)")
    if chosen == "auto":
        return _auto_on(device) if device.type == "cuda" else "aten"
    return chosen


def set_cuda_fused(fused: bool) -> None:
    """Run every pass of the cuda backend on fastfa's fused kernels (True), or only grad_input
    where the cost model says the fused kernel pays, the forward and grad_weight on the vendor
    GEMM / convolution (False, the default). Process-wide; FASTFA_CUDA_FUSED=1 in the environment
    starts a process with True. For timing both ways (benchmarks/auto_dispatch.py) and tests."""
    if not isinstance(fused, bool):
        raise TypeError(f"fused must be a bool; got {fused!r}")
    _C._set_cuda_fused(fused)


def cuda_fused() -> bool:
    """Whether every pass of the cuda backend runs on the fused kernels (set_cuda_fused)."""
    return _C._cuda_fused()


# ---- "auto" on a GPU: a cost model per pass ----------------------------------------------
#
# For each pass of a layer's step the model compares the modelled times of the paths that can
# run it: the vendor GEMM (cuBLAS through aten), after fastfa's transform kernel where grad_input
# needs B = T(W) materialised, or a fused kernel (cuda, triton) that applies the transform in its
# tile loads. The forward and grad_weight have no transform to fuse, so they take the vendor GEMM
# unless a fused kernel is measured faster; grad_input with B used as it is (bp, a stored fa R,
# the estimated rules' B) too. The model itself is C++ (csrc/dispatch.cpp, fastfa/dispatch.h:
# its formulas, and its constants' defaults with their sources), the one the cuda ops run per
# call; auto_plan asks it through _C._auto_plan, so there is one model. The constants are issue
# 18's estimates and design/gpu.md's measured ceilings, not yet calibrated by a GPU run of the
# fused kernels (README: "auto" on a GPU).
#
#   vendor GEMM      2 rows in out / (peak FLOP/s of the dtype)
#   transform        launch + bytes of W read (+ R for frsf; none for drawn fa) and B written / bandwidth
#   fused            vendor GEMM time / (its fraction of the vendor GEMM's speed: rule, backend)
#                    (a cuda conv2d in NCHW: the fraction times nchw_factor, for its gathers)
#
# so a fused grad_input pays below a row count: rows < transform / (2 in out / peak) /
# (1 / fraction - 1); above it the transform's one pass over W is the smaller cost. A drawn B
# (brsf, drawn fa) on a fused kernel is drawn in the GEMM (fraction(rule): every CTA along M
# draws its tiles again) or once by the transform kernel, then read by the identity kernel
# (transform + vendor GEMM / fraction(bp)), whichever is modelled faster: once above
# rows = transform / (2 in out / peak) / (1 / fraction(rule) - 1 / fraction(bp)), each backend
# on its own fractions ((cuda, bp) and (triton, bp): the identity kernels). The cuda ops ask it
# per call in C++; the Triton backend's Linear and Conv2d through triton_draw_once_rows (the row
# count from which the model draws once, by bisection on the model in C++; about a microsecond, so
# kept per (rule, W's size, dtype) until set_auto_costs changes the constants), which they compare
# with the call's rows. The default
# fractions of the drawn rules put both crossovers of a 4096x4096 bf16 / fp16 layer at 256 rows,
# the fixed threshold both backends had before the model decided it.


class AutoCosts(NamedTuple):
    peak_tflops: dict  # dense tensor-core TFLOP/s the vendor GEMM reaches, per dtype
    bandwidth_tbs: float  # device memory, bytes read + written per second / 1e12
    launch_us: float  # one more kernel (the transform) on the stream
    fused_fraction: dict  # {(backend, rule): a fused grad_input's speed over the vendor GEMM's}; (cuda, bp),
    #                       (triton, bp): the identity kernels, which read a drawn B the transform kernel made once
    nchw_factor: float  # the cuda implicit GEMM's fraction in NCHW (element gathers) over channels_last's


#: The dtypes the model has a peak for, and the name of each peak among the C++ constants.
_PEAK_FIELDS = {torch.bfloat16: "peak_tflops_bf16", torch.float16: "peak_tflops_fp16",
                torch.float32: "peak_tflops_fp32"}
#: The fused grad_input kernels the model knows: (backend, rule), each a C++ constant "<backend>_<rule>".
_FRACTION_KEYS = (("cuda", "usf"), ("cuda", "brsf"), ("cuda", "frsf"), ("cuda", "fa"), ("cuda", "bp"),
                  ("triton", "usf"), ("triton", "brsf"), ("triton", "frsf"), ("triton", "fa"), ("triton", "bp"))
_FUSED_BACKENDS = ("cuda", "triton")


def _from_fields(fields: dict) -> AutoCosts:
    return AutoCosts(peak_tflops={dtype: fields[name] for dtype, name in _PEAK_FIELDS.items()},
                     bandwidth_tbs=fields["bandwidth_tbs"], launch_us=fields["launch_us"],
                     fused_fraction={key: fields["_".join(key)] for key in _FRACTION_KEYS},
                     nchw_factor=fields["nchw_factor"])


def _to_fields(costs: AutoCosts) -> dict:
    """The C++ model's constants (fastfa/dispatch.h's AutoCosts, by name); what AutoCosts leaves
    out is 0: no such peak or fused kernel. A key the model has no constant for is refused."""
    if not isinstance(costs, AutoCosts):
        raise TypeError(f"costs must be a fastfa._backend.AutoCosts; got {type(costs).__name__}")
    unknown = [str(dtype) for dtype in costs.peak_tflops if dtype not in _PEAK_FIELDS]
    unknown += [repr(key) for key in costs.fused_fraction if key not in _FRACTION_KEYS]
    if unknown:
        raise ValueError(f"costs has constants the model does not use: {', '.join(unknown)} (peak_tflops: "
                         f"{', '.join(map(str, _PEAK_FIELDS))}; fused_fraction: "
                         f"{', '.join(map(repr, _FRACTION_KEYS))})")
    fields = {name: float(costs.peak_tflops.get(dtype, 0.0)) for dtype, name in _PEAK_FIELDS.items()}
    fields.update({"_".join(key): float(costs.fused_fraction.get(key, 0.0)) for key in _FRACTION_KEYS})
    fields.update(bandwidth_tbs=float(costs.bandwidth_tbs), launch_us=float(costs.launch_us),
                  nchw_factor=float(costs.nchw_factor))
    return fields


#: The model's built-in constants (fastfa/dispatch.h): issue 18's estimates, uncalibrated.
AUTO_COSTS = _from_fields(_C._auto_costs(defaults=True))

#: Rules whose grad_input needs B = T(W) made from W (or drawn): the only pass with a transform.
TRANSFORMED_RULES = ("usf", "brsf", "frsf", "fa")


class PassPlan(NamedTuple):
    forward: str
    grad_input: str
    grad_weight: str
    grad_input_ms: dict  # the modelled time of each candidate path for grad_input, in ms
    # For a drawn B (brsf, drawn fa) on the cuda fused kernel: "in_gemm" (every CTA along M draws
    # its tiles) or "once" (the transform kernel draws B, the identity kernel reads it), and the
    # modelled time of each way, in ms; None and {} where B is not drawn. triton_*: the same for
    # the Triton backend's grad_input, which draws as triton_draw says.
    cuda_draw: str | None = None
    cuda_draw_ms: dict = {}
    triton_draw: str | None = None
    triton_draw_ms: dict = {}


def auto_plan(rule: str, rows: int, in_features: int, out_features: int, dtype: torch.dtype, *,
              fused=("cuda", "triton"), drawn: bool = True, nchw: bool = False, distribution: str = "uniform",
              costs: AutoCosts | None = None) -> PassPlan:
    """The path each pass of a layer's step takes on a GPU by the cost model: "aten" (the vendor
    GEMM, after the transform kernel where needed) or a fused backend among `fused` (those usable
    here: "cuda", "triton"). A linear layer: rows of the batch, W in_features x out_features. A
    conv2d: rows = the output's pixels (N H_out W_out), in_features = in_channels / groups x kh x kw,
    out_features = out_channels (the same FLOPs and W's size), `nchw` for a contiguous (not
    channels_last) input. `drawn`: for fa, whether R is drawn from (seed, step) rather than stored
    (a stored R is used as it is); `distribution` ("uniform" or "normal") of a drawn B: the fused
    kernels draw only uniformly in the GEMM. `costs`: the model's constants, auto_costs() by default.

    The model is the cuda ops' own (csrc/dispatch.cpp, through _C._auto_plan): "auto" realises it
    through the cuda backend (resolve), whose forward and grad_weight always take the vendor path,
    whose grad_input takes the fused kernel exactly where this plan says "cuda", and whose fused
    kernel draws a drawn B as ``cuda_draw`` says; the triton backend's grad_input draws it as
    ``triton_draw`` says (rows: a conv2d's input pixels there, the rows of its grad_input GEMM).
    Triton's grad_input is modelled, but "auto" does not pick the triton backend, whose forward and
    grad_weight are its own fused kernels, until a GPU run shows them faster."""
    for name, value in (("rows", rows), ("in_features", in_features), ("out_features", out_features)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative int; got {value!r}")
    if isinstance(fused, str) or not set(fused) <= set(_FUSED_BACKENDS):
        raise ValueError(f"fused must be a tuple of fused backends among {', '.join(_FUSED_BACKENDS)}; got {fused!r}")
    if distribution not in ("uniform", "normal"):
        raise ValueError(f"distribution must be 'uniform' or 'normal'; got {distribution!r}")
    costs = _auto_costs if costs is None else costs
    if dtype not in _PEAK_FIELDS or not costs.peak_tflops.get(dtype):
        raise ValueError(f"dtype must be one of {', '.join(str(d) for d in _PEAK_FIELDS if costs.peak_tflops.get(d))}; "
                         f"got {dtype}")
    name = canonical_rule(rule)
    model = _C._auto_plan(int(rule_spec(name).id), rows, in_features * out_features, dtype, nchw=nchw,
                          stored_feedback=name == "fa" and not drawn, uniform=distribution == "uniform",
                          fields=None if costs is _auto_costs else _to_fields(costs))
    times = {"aten": model["vendor"] * 1e3}
    for backend in fused:
        if model[backend] != float("inf"):
            times[backend] = model[backend] * 1e3
    grad_input = min(times, key=lambda path: (times[path], path != "aten"))
    if not model["draws"]:
        return PassPlan("aten", grad_input, "aten", times)
    draws = {}
    for backend in _FUSED_BACKENDS:
        draw_ms = {way: model[f"{backend}_draw_{way}"] * 1e3 for way in ("in_gemm", "once")}
        draws[backend + "_draw"] = "once" if model[backend + "_draws_once"] else "in_gemm"
        draws[backend + "_draw_ms"] = {way: ms for way, ms in draw_ms.items() if ms != float("inf")}
    return PassPlan("aten", grad_input, "aten", times, **draws)


_auto_costs = AUTO_COSTS
# triton_draw_once_rows's answers on the constants in use: {(rule, W's size, dtype): rows}.
_triton_draw_once = {}


def triton_draw_once_rows(rule: int, weight_numel: int, dtype: torch.dtype) -> int:
    """The row count from which the model has the Triton backend's grad_input draw a drawn B once
    (brsf, fa without R; see above): _C._triton_draw_once_rows, asked once per (rule, W's size,
    dtype) while the constants stay, as a layer asks it on every step."""
    key = (rule, weight_numel, dtype)
    rows = _triton_draw_once.get(key)
    if rows is None:
        rows = _triton_draw_once[key] = _C._triton_draw_once_rows(rule, weight_numel, dtype)
    return rows


def set_auto_costs(costs: AutoCosts) -> None:
    """Replace the cost model's constants (a calibration: benchmarks/fit_auto_costs.py prints
    one), for auto_plan and the cuda ops alike: both run the one model in C++."""
    global _auto_costs
    _C._set_auto_costs(_to_fields(costs))
    _triton_draw_once.clear()
    _auto_costs = costs


def auto_costs() -> AutoCosts:
    """The cost model's constants in use (AUTO_COSTS, issue 18's estimates, until set_auto_costs)."""
    return _auto_costs
