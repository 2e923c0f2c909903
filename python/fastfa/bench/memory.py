"""Peak memory of one step of a variant: CUDA_PEAK on a GPU, CPU_PEAK on a CPU."""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import threading

import torch

from .cases import Case
from .timing import Runner
from .variants import Variant, backend_context, make_input, make_module, step_targets, stepper


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


def cpu_peak(variant: Variant, runner: Runner, extra: list) -> int:
    """CPU_PEAK for one step of the variant."""
    from torch.profiler import ProfilerActivity, profile

    variant.zero()
    x = runner.next_input()
    live = _live_bytes(variant, [x] + extra)
    result = {}

    def one_step():
        try:
            with backend_context(variant.backend), profile(activities=[ProfilerActivity.CPU],
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


def cuda_peak(case: Case, rule, backend, device, dtype, seed: int) -> int:
    """CUDA_PEAK: a fresh copy of the variant, two steps to settle workspaces, then one measured."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    reference = case.make_reference(device, dtype)
    module, eager = make_module(case, rule, backend, device, reference, seed)
    del reference
    x = make_input(case, device, dtype, generator)
    # The eager module gives the output's shape (a compiled one would compile an inference graph).
    grad, target = step_targets(case, eager, x, device, dtype, generator)
    del eager
    step, optimizer = stepper(case, module, grad, target)
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
