"""Schedules for the estimated rules' alpha, beta, gamma over training steps.

Kunin et al.'s reference code lets the alignment coefficients follow a schedule. Here a
schedule writes [alpha, beta, gamma] into each layer's ``alignment_coefficients`` tensor (a
buffer, in place), and the layer reads its coefficients from that tensor: changing them
between steps changes a tensor's values, not a constant of a compiled graph, so
torch.compile recompiles nothing. A scheduled layer computes B's gradient through the
alignment pipeline's path (fastfa.alignment: on aten, the loss's autograd gradient).

    schedule = fastfa.AlignmentSchedule(model, alpha=fastfa.CoefficientSchedule("cosine", 1e-3, 0.0, steps))
    for batch in data:
        loss(model(batch)).backward(); optimizer.step(); optimizer.zero_grad()
        schedule.step()
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence

import torch

__all__ = ["KINDS", "CoefficientSchedule", "AlignmentSchedule"]

#: The shapes a coefficient can follow over steps.
KINDS = ("constant", "linear", "cosine", "step")
_NAMES = ("alpha", "beta", "gamma")


def _real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


class CoefficientSchedule:
    """One coefficient as a function of the step t = 0, 1, 2, ...

    ``constant``: start. ``linear``: start + (end - start) * min(t, steps) / steps.
    ``cosine``: end + (start - end) * (1 + cos(pi * min(t, steps) / steps)) / 2.
    ``step``: start * factor ** (number of milestones <= t).
    """

    def __init__(self, kind: str, start: float, end: Optional[float] = None, steps: Optional[int] = None, *,
                 milestones: Sequence[int] = (), factor: float = 0.1):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        self.kind, self.start = kind, _real("start", start)
        self.end = self.start if end is None else _real("end", end)
        if kind in ("linear", "cosine"):
            if end is None:
                raise ValueError(f"a {kind} schedule needs end=")
            if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
                raise ValueError(f"a {kind} schedule needs steps= a positive int, got {steps!r}")
        self.steps = steps
        if kind == "step":
            if any(isinstance(m, bool) or not isinstance(m, numbers.Integral) or m < 0 for m in milestones):
                raise ValueError(f"milestones must be non-negative ints, got {milestones!r}")
        self.milestones = tuple(sorted(int(m) for m in milestones))
        self.factor = _real("factor", factor)
        if any(self(t) < 0 for t in (0, self.steps or 0, *self.milestones)):
            raise ValueError(f"the {kind} schedule from {start} gives a negative coefficient; coefficients are "
                             "non-negative")

    def __call__(self, step: int) -> float:
        if self.kind == "constant":
            return self.start
        if self.kind == "step":
            return self.start * self.factor ** sum(1 for m in self.milestones if m <= step)
        progress = min(max(step, 0), self.steps) / self.steps
        if self.kind == "linear":
            return self.start + (self.end - self.start) * progress
        return self.end + (self.start - self.end) * (1 + math.cos(math.pi * progress)) / 2

    def __repr__(self) -> str:
        return (f"CoefficientSchedule({self.kind!r}, {self.start:g}, {self.end:g}, {self.steps}"
                + (f", milestones={self.milestones}, factor={self.factor:g}" if self.kind == "step" else "") + ")")


class AlignmentSchedule:
    """Drives alpha / beta / gamma of every estimated-rule layer of ``model`` over steps.

    Each of alpha, beta, gamma: a :class:`CoefficientSchedule`, a number (constant), or None
    (each layer keeps its own value). ``step()`` after each optimizer step moves to the next
    step; ``state_dict()`` / ``load_state_dict()`` save and restore the step. ``detach()``
    hands the layers back to their fixed coefficients (the op's own path).
    """

    def __init__(self, model: torch.nn.Module, *, alpha=None, beta=None, gamma=None):
        from .nn import FeedbackLayer

        self.schedules = {}
        for name, value in zip(_NAMES, (alpha, beta, gamma)):
            if value is None or isinstance(value, CoefficientSchedule):
                self.schedules[name] = value
            else:
                value = _real(name, value)
                if value < 0:
                    raise ValueError(f"{name} must be non-negative, got {value}")
                self.schedules[name] = CoefficientSchedule("constant", value)
        self.layers = [m for m in model.modules() if isinstance(m, FeedbackLayer) and m._spec.estimates_feedback]
        if not self.layers:
            raise ValueError("the model has no layer of an estimated rule (kp, wm, sa, aa, ia) to schedule")
        self.last_step = 0
        for layer in self.layers:
            layer.alignment_coefficients = torch.tensor(self._values(layer, 0), dtype=layer.weight.dtype,
                                                        device=layer.weight.device)
            layer.__dict__.pop("_resolved_call", None)  # a call resolved before would skip the coefficients

    def _values(self, layer, step: int) -> list:
        return [layer.alignment_options[i] if self.schedules[name] is None else self.schedules[name](step)
                for i, name in enumerate(_NAMES)]

    @torch.no_grad()
    def step(self) -> None:
        self.last_step += 1
        for layer in self.layers:
            # In place: a compiled model reads this buffer as an input (and a CUDA graph's copy of it).
            layer.alignment_coefficients.copy_(torch.tensor(self._values(layer, self.last_step), dtype=torch.float64))

    def current(self) -> dict:
        """{name: value} of the scheduled coefficients at the current step."""
        return {name: s(self.last_step) for name, s in self.schedules.items() if s is not None}

    def detach(self) -> None:
        for layer in self.layers:
            layer.alignment_coefficients = None

    def state_dict(self) -> dict:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        self.last_step = int(state["last_step"]) - 1
        self.step()
