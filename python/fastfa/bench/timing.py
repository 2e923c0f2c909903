"""Timing: how long to time (Settings), the timed calls (Runner), and the statistics over rounds."""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Optional

import torch

from .variants import Variant, backend_context


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
        with backend_context(variant.backend):
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


def quartiles(values: list) -> tuple:
    if len(values) == 1:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def round_sig(value: Optional[float], digits: int = 5):
    if value is None or not math.isfinite(value):
        return value
    return float(f"{value:.{digits}g}")


def paired_ratio(samples: list, base: list) -> tuple:
    """Median and quartiles over rounds of samples[r] / base[r]: drift between rounds cancels."""
    per_round = [a / b for a, b in zip(samples, base)]
    return statistics.median(per_round), quartiles(per_round)
