"""Backend selection: which implementation of the ops runs (aten, triton, cuda)."""

from __future__ import annotations

import contextlib
import threading
from typing import NamedTuple

import torch

from . import _C

__all__ = ["BACKENDS", "BackendStatus", "backends", "set_backend", "get_backend", "use_backend"]

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


def backends() -> dict:
    """Which backends are usable here, and why not: {name: BackendStatus(usable, reason)}."""
    return {
        "cuda": BackendStatus(False, "fastfa's fused CUDA GEMM kernels are not part of this version"),
        "triton": BackendStatus(False, "fastfa's Triton kernels are not part of this version "
                                       "(fastfa.triton_kernels is empty)"),
        "aten": _aten_status(),
    }


_state = threading.local()


def get_backend() -> str:
    """The backend chosen for this thread: "auto" (default), "aten", "triton" or "cuda"."""
    return getattr(_state, "backend", "auto")


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


def resolve(name, device: torch.device) -> str:
    """The concrete backend for one call: the per-call name, else the thread's choice."""
    chosen = get_backend() if name is None else _check_name(name)
    if device.type == "cuda" and not _C.build_info()["cuda"]:
        raise RuntimeError("fastfa was built without CUDA kernels, so it cannot run on a CUDA tensor; "
                           "reinstall on a GPU machine or with FORCE_CUDA=1 "
                           "(pip install --no-build-isolation -e .)")
    if device.type not in ("cpu", "cuda", "meta"):
        raise RuntimeError(f"fastfa runs on cpu and cuda tensors; got a tensor on {device}")
    # Only aten exists in this version; "auto" will pick the fastest usable one.
    return "aten" if chosen == "auto" else chosen
