"""Running the bench: every variant of one case in interleaved rounds, then every case in every dtype."""

from __future__ import annotations

import gc
import statistics
import sys
import time
from typing import Optional

import torch

from .. import peers
from .cases import DTYPES, Case
from .machine import device_name, git_commit, machine_state, versions
from .memory import CPU_PEAK, CUDA_PEAK, cpu_peak, cuda_peak
from .progress import Progress, log
from .timing import Runner, Settings, paired_ratio, quartiles, round_sig
from .variants import (PEER_BACKENDS, Variant, backend_context, make_input, make_module, max_rel_err, step_targets,
                       stepper, variant_specs)


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
        log("  memory: one step per variant", progress)
        for index, (rule, backend) in enumerate(all_specs):
            try:
                peaks[(rule, backend)] = cuda_peak(case, rule, backend, device, dtype, seed)
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
    inputs = [make_input(case, device, dtype, generator) for _ in range(settings.buffers)]
    grad, target = step_targets(case, reference, inputs[0], device, dtype, generator)
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
            with backend_context(backend):
                if rule is None:
                    module, eager = reference, reference
                else:
                    module, eager = make_module(case, rule, backend, device, reference, seed)
                err = None
                if rule is not None:
                    with torch.no_grad():
                        err = max_rel_err(eager(inputs[0]), ref_out)
            step, optimizer = stepper(case, module, grad, target)
            variants.append(Variant(rule, backend, module, step, max_rel_err=err, optimizer=optimizer))
        except Exception as error:
            if rule is None:
                raise
            failed(rule, backend, f"{type(error).__name__}: {error}")
            log(f"  skipped {rule}/{backend}: {type(error).__name__}: {error}", progress)
    del ref_out

    # Warm-up (and compilation for the compile peer), and the time of one call to size the rounds.
    log(f"  warm-up of {len(variants)} variants", progress)
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
                variant.peak_bytes = cpu_peak(variant, runner, [grad, target])
        except Exception as error:
            if variant.rule is None:
                raise
            failed(variant.rule, variant.backend, f"{type(error).__name__}: {error}")
            log(f"  skipped {variant.label}: {type(error).__name__}: {error}", progress)
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
    log(f"  {rounds} rounds of about {round_s * 1e3:.0f} ms", progress)

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


def _rows(case: Case, dtype_name: str, variants: list, rounds: int, device) -> list:
    base = variants[0]
    bp_ms = statistics.median(base.samples)
    bp_q = quartiles(base.samples)
    by_key = {(v.rule, v.backend): v for v in variants[1:]}
    rows = []
    for variant in variants[1:]:
        ms = statistics.median(variant.samples)
        q = quartiles(variant.samples)
        ratio, rq = paired_ratio(variant.samples, base.samples)
        row = {
            "op": case.op, "shape": case.shape, "dtype": dtype_name, "rule": variant.rule,
            "backend": variant.backend, "ms": round_sig(ms), "bp_ms": round_sig(bp_ms), "ratio": round_sig(ratio, 4),
            "peak_bytes": variant.peak_bytes, "bp_peak_bytes": base.peak_bytes,
            "max_rel_err": round_sig(variant.max_rel_err, 3),
            "spread": {"kind": "iqr over rounds", "rounds": rounds, "calls_per_round": variant.calls,
                       "bp_calls_per_round": base.calls,
                       "ms": [round_sig(q[0]), round_sig(q[1])], "bp_ms": [round_sig(bp_q[0]), round_sig(bp_q[1])],
                       "ratio": [round_sig(rq[0], 4), round_sig(rq[1], 4)],
                       "ms_min_max": [round_sig(min(variant.samples)), round_sig(max(variant.samples))],
                       "bp_ms_min_max": [round_sig(min(base.samples)), round_sig(max(base.samples))]},
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
                    r, rq2 = paired_ratio(variant.samples, other.samples)
                    row["vs_peers"][name] = {"ratio": round_sig(r, 4),
                                             "iqr": [round_sig(rq2[0], 4), round_sig(rq2[1], 4)]}
        rows.append(row)
    return rows


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
            log(f"[{index + 1}/{len(jobs)}] {case.op} {case.shape} {dtype_name} on {device}", bar)
            begin = time.perf_counter()
            case_specs = specs[case.is_model]
            if case.op == "model:encoder":  # the peers have no attention: they would convert its MLP only
                case_specs = [spec for spec in case_specs if not (spec[1] or "").startswith("peer:")]
            if case.op == "conv2d":
                # A Conv2d alone as dfa's model would project its own N x C x H x W output (K = C*H*W)
                # back onto its input: no network does that; dfa's convolutions are timed in the models.
                case_specs = [(rule, backend) for rule, backend in case_specs if rule != "dfa"]
            if PEER_BACKENDS["compile"] in (backend for _, backend in case_specs):
                torch._dynamo.reset()
            try:
                case_rows, case_errors, case_skipped = run_case(case, case_specs, device, dtype, settings, bar,
                                                                seed=index, cases_left=len(jobs) - index)
            except Exception as error:  # the baseline itself failed (say, out of memory): go on with the next
                case_rows, case_skipped = [], []
                case_errors = [f"{case.op} {case.shape}: {type(error).__name__}: {error}"]
                log(f"  failed: {type(error).__name__}: {error}", bar)
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            rows += case_rows
            errors += case_errors
            skipped += case_skipped
            log(f"  done in {time.perf_counter() - begin:.1f} s", bar)
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
