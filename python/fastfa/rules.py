"""The learning rules: one table, the option names, and how B's scale is chosen.

Every rule keeps the ordinary forward pass and the ordinary weight and bias gradients;
it changes only the matrix B that carries the error back to the layer's input
(grad_input = delta B, with B shaped like W). The kernels apply the same table
(csrc/include/fastfa/feedback.h, ``feedback_transform``):

==========  =========================================  ==========================================
rule        B used by the backward pass                 sources
==========  =========================================  ==========================================
``bp``      W                                           backpropagation (the control)
``fa``      R, drawn once and fixed                     Lillicrap et al. 2016
``usf``     s * sign(W), from the current W each step   Liao et al. 2016; Xiao et al. 2018
``brsf``    abs(R_t) * sign(W), R_t drawn every step    Moskovitz et al. 2018; Sanfiz & Akrout 2021
``frsf``    abs(R) * sign(W), R drawn once and fixed    Moskovitz et al. 2018; Sanfiz & Akrout 2021
==========  =========================================  ==========================================

``dfa`` (direct feedback alignment, Nøkland 2016; Launay et al. 2020) sends the model's output
error e (N x K) straight to every layer: grad_x = e B_l with B_l (K x per-sample numel of x)
fixed and drawn from (seed, index); see fastfa.dfa.

sign(0) = 0. ``sign_symmetry`` is another name for ``usf``.

Estimated feedback: B is a trainable Parameter (``layer.feedback``) shaped like W that
sends the error back (grad_input = delta B) and gets, at the same step as W's gradient,
only the alignment terms below (r = x W^T, p = x B^T, both without bias; means over the
batch; for conv, r^T x is conv2d_weight(x, W.shape, r)):

==========  ==================================================  ============  ================================
rule        gradient of B                                       (a, b, g)     sources
==========  ==================================================  ============  ================================
``kp``      grad_W + a*2B                                       1e-3          Kolen & Pollack 1994; Akrout 2019
``wm``      a*2B - b*(1/N) r^T xi, x replaced by noise xi        1e-3, 1e-3    Akrout et al. 2019
``sa``      2a*B - b*W                                          1e-3, 2e-3    Kunin et al. 2020
``aa``      a*(2/N) p^T x - b*(1/N) r^T x                       1e-3, 2e-3    Kunin et al. 2020
``ia``      -a*(1/N) r^T x + b*(2/N) r^T (r B) + g*2B           2e-3, 1e-3,   Kunin et al. 2020
                                                                1e-3
==========  ==================================================  ============  ================================

wm's noise is N(0, sigma^2) (sigma = 1), drawn like brsf's R_t from (seed, step).
"""

from __future__ import annotations

import enum
import math
import numbers
from dataclasses import dataclass
from typing import Sequence

__all__ = ["RULES", "LAYER_RULES", "ALIASES", "Rule", "Distribution", "RuleSpec", "rule_spec", "canonical_rule",
           "SCALES", "INITS", "DEFAULT_SCALE", "RMS_SCALE", "sign_scale", "weight_rms", "init_distribution",
           "fan_in_and_fan_out"]


class Rule(enum.IntEnum):
    """Rule ids of the op contract: the ``rule`` argument of every torch.ops.fastfa op."""

    BP = 0
    FA = 1
    USF = 2
    BRSF = 3
    FRSF = 4
    KP = 5
    WM = 6
    SA = 7
    AA = 8
    IA = 9


class Distribution(enum.IntEnum):
    """The unit draw xi behind R: uniform on [-1, 1) or standard normal; R = scale * xi."""

    UNIFORM = 0
    NORMAL = 1


@dataclass(frozen=True)
class RuleSpec:
    name: str
    id: Rule
    feedback: str  # B as the spec writes it
    stores_feedback: bool  # keeps R in layer.feedback (a buffer)
    draws_every_step: bool  # needs (seed, step) state
    options: frozenset  # the options this rule takes besides `activation`
    sources: str
    estimates_feedback: bool = False  # B is a trainable Parameter in layer.feedback
    alignment_defaults: tuple = ()  # default (alpha, beta, gamma, sigma) of its B gradient
    # grad_input = e B_l from the model's output error (dfa, fastfa.dfa); its layers run the ops
    # of ``id`` (bp's) on a detached input, so the op contract has no id of its own for it.
    direct_feedback: bool = False


_SPECS = (
    RuleSpec("bp", Rule.BP, "W", False, False, frozenset(), "backpropagation"),
    RuleSpec("fa", Rule.FA, "R (fixed)", True, False, frozenset({"init", "seed"}), "Lillicrap et al. 2016"),
    RuleSpec("usf", Rule.USF, "s * sign(W)", False, False, frozenset({"scale"}),
             "Liao et al. 2016; Xiao et al. 2018"),
    RuleSpec("brsf", Rule.BRSF, "|R_t| * sign(W), R_t drawn every step", False, True,
             frozenset({"init", "seed"}), "Moskovitz et al. 2018; Sanfiz & Akrout 2021"),
    RuleSpec("frsf", Rule.FRSF, "|R| * sign(W), R fixed", True, False, frozenset({"init", "seed"}),
             "Moskovitz et al. 2018; Sanfiz & Akrout 2021"),
    RuleSpec("kp", Rule.KP, "B learned: grad_W + a*2B", True, False, frozenset({"init", "seed", "alpha"}),
             "Kolen & Pollack 1994; Akrout et al. 2019", True, (1e-3, 0.0, 0.0, 1.0)),
    RuleSpec("wm", Rule.WM, "B learned: a*2B - b*(1/N) r^T xi", True, True,
             frozenset({"init", "seed", "alpha", "beta", "sigma"}), "Akrout et al. 2019; Kunin et al. 2020", True,
             (1e-3, 1e-3, 0.0, 1.0)),
    RuleSpec("sa", Rule.SA, "B learned: 2a*B - b*W", True, False, frozenset({"init", "seed", "alpha", "beta"}),
             "Kunin et al. 2020", True, (1e-3, 2e-3, 0.0, 1.0)),
    RuleSpec("aa", Rule.AA, "B learned: a*(2/N) p^T x - b*(1/N) r^T x", True, False,
             frozenset({"init", "seed", "alpha", "beta"}), "Kunin et al. 2020", True, (1e-3, 2e-3, 0.0, 1.0)),
    RuleSpec("ia", Rule.IA, "B learned: -a*(1/N) r^T x + b*(2/N) r^T(rB) + g*2B", True, False,
             frozenset({"init", "seed", "alpha", "beta", "gamma"}), "Kunin et al. 2020", True,
             (2e-3, 1e-3, 1e-3, 1.0)),
    RuleSpec("dfa", Rule.BP, "B_l (K x F) fixed: grad_x = e B_l, e = dL/d(model output)", False, False,
             frozenset({"init", "seed"}), "Nøkland 2016; Launay et al. 2020", direct_feedback=True),
)

#: Canonical names of the rules this version implements, in the spec's order.
RULES: tuple = tuple(spec.name for spec in _SPECS)
#: The rules a layer runs on its own (grad_input = delta B): all but dfa, whose grad_input needs
#: the error at the output of a model converted with fastfa.convert(model, "dfa").
LAYER_RULES: tuple = tuple(name for name in RULES if name != "dfa")
#: Other names users know the rules by.
ALIASES = {"sign_symmetry": "usf"}
_BY_NAME = {spec.name: spec for spec in _SPECS}
#: The rules of learning-rules.md that this version does not have yet.
_PLANNED: tuple = ()

#: Choices of the usf scale s (or a positive finite float).
SCALES = ("rms", "xiao", "xavier", "kaiming")
#: usf's scale when none is given. "rms" follows the weights, so ||B|| = ||W|| whatever a model
#: initialised them with: Xiao et al.'s "xiao" matches only W drawn from their own init, and is
#: ~3x the weights of RetinaNet's heads (N(0, 0.01)), which then diverge (issue 20).
DEFAULT_SCALE = "rms"
#: The op contract's ``scale`` for "rms" (csrc/include/fastfa/feedback.h, kRmsScale): the kernels
#: take s = ||W|| / sqrt(numel(W)) from the current W, on its device, at every step.
RMS_SCALE = -1.0
#: Choices of R's init distribution.
INITS = ("kaiming", "xavier", "xiao")


def canonical_rule(rule) -> str:
    """The canonical name of ``rule`` (aliases resolved); ValueError names the choices."""
    if not isinstance(rule, str):
        raise TypeError(f"rule must be a str, one of {RULES} (or an alias in {tuple(ALIASES)}); "
                        f"got {type(rule).__name__}")
    name = ALIASES.get(rule.lower(), rule.lower())
    if name in _BY_NAME:
        return name
    if name in _PLANNED:
        raise ValueError(f"rule {rule!r} is specified in learning-rules.md but not implemented in this "
                         f"version of fastfa; available rules: {', '.join(RULES)}")
    raise ValueError(f"rule must be one of {', '.join(RULES)} (or an alias: "
                     f"{', '.join(ALIASES)}); got {rule!r}")


def rule_spec(rule) -> RuleSpec:
    return _BY_NAME[canonical_rule(rule)]


def fan_in_and_fan_out(weight_shape: Sequence[int]):
    """fan_in = in (linear) or in_ch/groups*kh*kw (conv); fan_out = out or out_ch*kh*kw."""
    receptive = math.prod(weight_shape[2:]) if len(weight_shape) > 2 else 1
    return weight_shape[1] * receptive, weight_shape[0] * receptive


def _is_conv(weight_shape) -> bool:
    # A Conv1d's weight (out, in/groups, k) takes the conv formulas too.
    return len(weight_shape) >= 3


def weight_rms(weight) -> float:
    """||W|| / sqrt(numel(W)): the s of usf's "rms" scale, and the std a fixed scale is compared with."""
    numel = max(weight.numel(), 1)
    return float(weight.detach().double().norm()) / math.sqrt(numel)


def sign_scale(scale, weight_shape: Sequence[int]) -> float:
    """The usf scale s for a weight of this shape, as the op takes it.

    ``"rms"``: ||W|| / sqrt(numel(W)) of the current W at each step, so that ||B|| = ||W||
    (returned as RMS_SCALE, which tells the kernels to reduce W themselves);
    ``"xiao"``: sqrt(2 / (kh*kw*out_ch)) for conv, 1/sqrt(in) for linear (Xiao et al.'s code);
    ``"xavier"``: sqrt(2 / (fan_in + fan_out)); ``"kaiming"``: 1/sqrt(3*fan_in) (the std of
    torch's default Kaiming-uniform init, as BioTorch); or a positive finite number.
    """
    fan_in, fan_out = fan_in_and_fan_out(weight_shape)
    if isinstance(scale, str):
        if scale == "rms":
            return RMS_SCALE
        if scale == "xiao":
            return math.sqrt(2.0 / max(fan_out, 1)) if _is_conv(weight_shape) else 1.0 / math.sqrt(max(fan_in, 1))
        if scale == "xavier":
            return math.sqrt(2.0 / max(fan_in + fan_out, 1))
        if scale == "kaiming":
            return 1.0 / math.sqrt(3.0 * max(fan_in, 1))
        raise ValueError(f"scale must be one of {', '.join(SCALES)} or a positive finite number; got {scale!r}")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be one of {', '.join(SCALES)} or a positive finite number; "
                        f"got {type(scale).__name__}")
    value = float(scale)
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"scale must be positive and finite; got {scale!r}")
    return value


def init_distribution(init, weight_shape: Sequence[int]):
    """R's distribution for a weight of this shape, as (Distribution, scale), R = scale * xi.

    ``"kaiming"``: U(-b, b), b = 1/sqrt(fan_in) (torch's default init of W);
    ``"xavier"``: U(-b, b), b = sqrt(6 / (fan_in + fan_out));
    ``"xiao"``: N(0, s^2), s = sqrt(2 / (kh*kw*out_ch)) for conv; U(-s, s), s = 1/sqrt(in) for linear.
    """
    fan_in, fan_out = fan_in_and_fan_out(weight_shape)
    if init == "kaiming":
        return Distribution.UNIFORM, 1.0 / math.sqrt(max(fan_in, 1))
    if init == "xavier":
        return Distribution.UNIFORM, math.sqrt(6.0 / max(fan_in + fan_out, 1))
    if init == "xiao":
        if _is_conv(weight_shape):
            return Distribution.NORMAL, math.sqrt(2.0 / max(fan_out, 1))
        return Distribution.UNIFORM, 1.0 / math.sqrt(max(fan_in, 1))
    raise ValueError(f"init must be one of {', '.join(INITS)}; got {init!r}")
