"""The rules' options resolved straight from learning-rules.md, without fastfa's own resolution.

What a test expects a layer to use: usf's scale s, the distribution of R (fa, brsf, frsf) and
of the estimated rules' initial B, and the estimated rules' alpha, beta, gamma, sigma. The
spec gives the formulas; the defaults it leaves open (scale "rms", init "kaiming", B starting
from the init distribution) are the README's Rules section. tests/test_spec_options.py checks
fastfa's resolution (fastfa.rules, fastfa.functional.feedback_arguments, the layers) against
this module; every other test takes its expected options from here, so an error in fastfa's
resolution cannot hide in the expected values. Like tests/oracle.py, this imports nothing
from fastfa.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import oracle

SCALES = ("rms", "xiao", "xavier", "kaiming")
INITS = ("kaiming", "xavier", "xiao")
DEFAULT_SCALE, DEFAULT_INIT = "rms", "kaiming"

#: The estimated rules' coefficients by the spec's table: the Neural-Alignment code's defaults,
#: and sigma, the std of wm's noise (default 1). A rule takes only the coefficients it has.
ALIGNMENT_DEFAULTS = {
    "kp": {"alpha": 1e-3},
    "wm": {"alpha": 1e-3, "beta": 1e-3, "sigma": 1.0},
    "sa": {"alpha": 1e-3, "beta": 2e-3},
    "aa": {"alpha": 1e-3, "beta": 2e-3},
    "ia": {"alpha": 2e-3, "beta": 1e-3, "gamma": 1e-3},
}
ESTIMATED = tuple(ALIGNMENT_DEFAULTS)
#: The alignment pipeline's switches a layer (fastfa.nn's, and so convert's) turns on unless told
#: otherwise: the README's Rules section (the spec's table has every switch off, and leaves a
#: library's defaults open). The functional API keeps every switch off.
LAYER_SWITCHES = {"aa": {"normalize_input": True}, "ia": {"normalize_input": True}}


def paper(rule) -> dict:
    """The options that give a layer the spec's table (every pipeline switch off) for ``rule``."""
    return {name: False for name in LAYER_SWITCHES.get(ALIASES.get(rule, rule), {})}
#: Rules whose R (or starting B) follows the layer's init.
DRAWN = ("fa", "brsf", "frsf") + ESTIMATED
#: Rules whose B is regenerated from (seed, step): brsf every step, wm's noise, fa without a stored R.
KEYED = ("fa", "brsf", "wm")
#: The options each rule takes, besides activation (and seed, which every rule accepts).
OPTIONS = {"bp": (), "usf": ("scale",), **{rule: ("init", "seed") for rule in ("fa", "brsf", "frsf")},
           **{rule: ("init", "seed") + tuple(defaults) for rule, defaults in ALIGNMENT_DEFAULTS.items()},
           "dfa": ("init", "seed")}  # B_l follows fa's init distributions, one seed per layer
ALIASES = {"sign_symmetry": "usf"}


def fans(shape):
    """fan_in = in (linear) or in_ch/groups*kh*kw (conv); fan_out = out or out_ch*kh*kw."""
    receptive = math.prod(shape[2:])
    return shape[1] * receptive, shape[0] * receptive


def sign_scale(scale, shape) -> float:
    """usf's s: "xiao" (Xiao et al.'s code) sqrt(2/(kh*kw*out_ch)) for conv, 1/sqrt(in) for linear;
    "xavier" and "kaiming" the std of the init BioTorch draws W from, sqrt(2/(fan_in+fan_out)) and
    1/sqrt(3*fan_in); or a number, positive and finite (anything else is refused). "rms" stays
    "rms": s = ||W|| / sqrt(numel(W)) of the W at hand, which oracle.feedback_matrix computes."""
    scale = DEFAULT_SCALE if scale is None else scale
    if scale == "rms":
        return "rms"
    if isinstance(scale, str):
        fan_in, fan_out = fans(shape)
        if fan_in == 0 or fan_out == 0:
            return 1.0  # W and B are empty: s does not matter
        if scale == "xiao":  # a conv's fan_out is kh*kw*out_ch
            return math.sqrt(2.0 / fan_out) if len(shape) >= 3 else 1.0 / math.sqrt(shape[1])
        if scale == "xavier":
            return math.sqrt(2.0 / (fan_in + fan_out))
        if scale == "kaiming":
            return 1.0 / math.sqrt(3.0 * fan_in)
        raise ValueError(f"scale {scale!r} is none of {SCALES}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be positive and finite, got {scale!r}")
    return float(scale)


def init_distribution(init, shape):
    """R's distribution as (name, scale), R = scale * xi with xi ~ U(-1, 1) ("uniform") or N(0, 1)
    ("normal"): Kaiming-uniform (torch's default init of W, std 1/sqrt(3*fan_in), so the bound is
    sqrt(3) times that), Xavier-uniform (std sqrt(2/(fan_in+fan_out))), or Xiao et al.'s normal(0, s)
    for conv and uniform(-s, s) for linear, with s usf's "xiao" scale."""
    init = DEFAULT_INIT if init is None else init
    fan_in, fan_out = fans(shape)
    if fan_in == 0 or fan_out == 0:
        return "uniform", 1.0  # R is empty
    if init == "kaiming":
        return "uniform", math.sqrt(3.0) * sign_scale("kaiming", shape)
    if init == "xavier":
        return "uniform", math.sqrt(3.0) * sign_scale("xavier", shape)
    if init == "xiao":
        return ("normal" if len(shape) >= 3 else "uniform"), sign_scale("xiao", shape)
    raise ValueError(f"init {init!r} is none of {INITS}")


def distribution_std(distribution: str, scale: float) -> float:
    """The std of R = scale * xi."""
    return scale if distribution == "normal" else scale / math.sqrt(3.0)


def alignment(rule, **given):
    """(alpha, beta, gamma, sigma) of an estimated rule's B gradient: the given ones, else the
    defaults; a term the rule does not have has coefficient 0, and sigma is 1 where no noise is drawn."""
    coefficients = {"alpha": 0.0, "beta": 0.0, "gamma": 0.0, "sigma": 1.0, **ALIGNMENT_DEFAULTS.get(rule, {})}
    coefficients.update({name: float(value) for name, value in given.items() if value is not None})
    return tuple(coefficients[name] for name in ("alpha", "beta", "gamma", "sigma"))


@dataclass(frozen=True)
class Resolved:
    """A rule with its options resolved: what the oracle needs to build B and B's gradient."""

    rule: str
    scale: float | str  # usf's s ("rms": from W), or R's scale; 1.0 where B is neither scaled nor drawn
    distribution: str  # xi's distribution, "uniform" or "normal"
    alignment: tuple  # (alpha, beta, gamma, sigma)
    seed: int | None  # the draw's key, for the rules in KEYED when a seed is given
    step: int | None

    def feedback_matrix(self, weight, feedback=None, step=None):
        """oracle.feedback_matrix for this rule and options (step overrides the resolved one)."""
        return oracle.feedback_matrix(self.rule, weight, feedback=feedback, seed=self.seed,
                                      step=self.step if step is None else step, scale=self.scale,
                                      distribution=self.distribution)


def resolve(rule, shape, **options) -> Resolved:
    """The spec's reading of a layer (of weight shape `shape`) built with `options`."""
    rule = ALIASES.get(rule, rule)
    taken = set(OPTIONS[rule]) | {"seed"}
    given = {key: value for key, value in options.items() if value is not None}
    unknown = set(given) - taken - ({"step"} if rule in KEYED else set())
    if unknown:
        raise ValueError(f"rule {rule!r} takes none of {sorted(unknown)}")
    scale, distribution = 1.0, "uniform"
    if rule == "usf":
        scale = sign_scale(given.get("scale"), shape)
    elif rule in DRAWN:
        distribution, scale = init_distribution(given.get("init"), shape)
    seed = given.get("seed") if rule in KEYED else None
    step = given.get("step", 0) if seed is not None else None
    coefficients = {key: value for key, value in given.items() if key in ALIGNMENT_DEFAULTS.get(rule, {})}
    return Resolved(rule, scale, distribution, alignment(rule, **coefficients), seed, step)


def expected_feedback(rule, layer, step=None, **options) -> torch.Tensor:
    """The B a fastfa layer built with `options` must use next, from its state: the stored R or
    learned B (layer.feedback), brsf's [seed, step] (layer.feedback_rng)."""
    resolved = resolve(rule, tuple(layer.weight.shape), **options)
    feedback = None
    if resolved.rule in ("fa", "frsf") + ESTIMATED:
        feedback = layer.feedback.detach()
    if resolved.rule == "brsf":
        seed, current = (int(v) for v in layer.feedback_rng)
        resolved = Resolved(resolved.rule, resolved.scale, resolved.distribution, resolved.alignment, seed, current)
    return resolved.feedback_matrix(layer.weight, feedback=feedback, step=step)
