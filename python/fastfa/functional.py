"""Functional form of fastfa's layers: the ordinary forward, the rule's backward.

``linear`` and ``conv2d`` check every argument (the error names it and what was
expected) before any kernel runs, apply autocast, and call one custom op per pass
(torch.ops.fastfa.linear / conv2d; their backward ops compute grad_input through the
rule's feedback B, grad_weight and grad_bias together).
"""

from __future__ import annotations

import math
import numbers

import torch

from . import _backend
from . import alignment as _alignment
from . import amp as _amp
from . import ops as _ops  # noqa: F401  (registers fake kernels and autograd)
from .rules import DEFAULT_SCALE, RULES, Distribution, Rule, init_distribution, rule_spec, sign_scale

__all__ = ["linear", "conv2d", "ACTIVATIONS", "feedback_arguments"]

#: Activations a layer can fuse: forward in the forward op's epilogue, derivative in the backward.
ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh", "silu", "tanh", "sigmoid")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_OPTIONS = ("scale", "init", "seed", "step", "rng", "alpha", "beta", "gamma", "sigma")
_ALIGNMENT = ("alpha", "beta", "gamma", "sigma")


def canonical_activation(activation) -> str:
    name = "none" if activation is None else activation
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ValueError(f"activation must be None or one of {', '.join(ACTIVATIONS[1:])}; got {activation!r}")
    return name


def _check_tensor(name: str, value, *, dims=None) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in _DTYPES:
        raise TypeError(f"{name} has dtype {value.dtype}; expected one of float16, bfloat16, float32, float64")
    if value.device.type not in ("cpu", "cuda", "meta"):
        raise RuntimeError(f"{name} is on {value.device}; fastfa runs on cpu and cuda")
    if dims is not None and value.dim() not in dims:
        raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dimensions, got shape {tuple(value.shape)}")


def _check_same(name: str, value: torch.Tensor, weight: torch.Tensor) -> None:
    if value.dtype != weight.dtype:
        raise TypeError(f"{name} has dtype {value.dtype} but weight has {weight.dtype}; they must match "
                        "(use autocast or .to() for mixed precision)")
    if value.device != weight.device:
        raise RuntimeError(f"{name} is on {value.device} but weight is on {weight.device}; they must be on one device")


def _check_layer(input, weight, bias, feedback, rng, spec) -> None:
    _check_tensor("input", input)
    _check_tensor("weight", weight)
    _check_same("input", input, weight)
    if bias is not None:
        _check_tensor("bias", bias, dims=(1,))
        _check_same("bias", bias, weight)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have shape ({weight.shape[0]},) to match weight {tuple(weight.shape)}, "
                             f"got {tuple(bias.shape)}")
    if feedback is None and spec.id == Rule.FRSF:
        raise ValueError("rule 'frsf' needs feedback=R, a tensor of weight's shape")
    if feedback is None and spec.estimates_feedback:
        raise ValueError(f"rule {spec.name!r} needs feedback=B, the learned feedback tensor of weight's shape")
    if feedback is not None:
        if spec.id not in (Rule.FA, Rule.FRSF) and not spec.estimates_feedback:
            raise ValueError(f"rule {spec.name!r} takes no feedback tensor (B is made from weight); got one")
        _check_tensor("feedback", feedback)
        _check_same("feedback", feedback, weight)
        if feedback.shape != weight.shape:
            raise ValueError(f"feedback must have weight's shape {tuple(weight.shape)}, got {tuple(feedback.shape)}")
    if rng is not None:
        if not isinstance(rng, torch.Tensor) or rng.dtype != torch.int64 or rng.shape != (2,):
            raise ValueError("rng must be an int64 tensor of shape (2,) holding [seed, step]")
        if rng.device != weight.device:
            raise RuntimeError(f"rng is on {rng.device} but weight is on {weight.device}; they must be on one device")


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not low <= int(value) < 2**63:
        raise ValueError(f"{name} must be in [{low}, 2**63), got {value}")
    return int(value)


def feedback_arguments(rule, weight_shape, device, options: dict):
    """Resolve a rule and its options into the op contract's feedback arguments.

    Returns (spec, scale, distribution, alignment, rng): alignment is [alpha, beta, gamma,
    sigma] of the estimated rules (their defaults filled in), rng None or an int64 tensor
    [seed, step] on ``device``. Options a rule does not take are refused.
    """
    spec = rule_spec(rule)
    unknown = set(options) - set(_OPTIONS)
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(sorted(unknown))}; rule options are "
                        "scale (usf), init and seed (fa, brsf, frsf and the estimated rules), step / rng (brsf, wm), "
                        "alpha / beta / gamma / sigma (kp, wm, sa, aa, ia), and the alignment pipeline's switches "
                        f"(wm, aa, ia): {', '.join(_alignment.OPTIONS)}")
    given = {key for key, value in options.items() if value is not None}
    # seed is taken by every rule (ignored where nothing is drawn), so one seed can go to a sweep.
    allowed = set(spec.options) | {"seed"}
    if spec.draws_every_step or spec.id == Rule.FA:
        allowed |= {"step", "rng", "seed"}
    refused = given - allowed
    if refused:
        takers = {"scale": "usf", "init": "fa, brsf, frsf, kp, wm, sa, aa, ia", "step": "fa, brsf, wm",
                  "rng": "fa, brsf, wm", "alpha": "kp, wm, sa, aa, ia", "beta": "wm, sa, aa, ia", "gamma": "ia",
                  "sigma": "wm"}
        raise ValueError("; ".join(f"option {key!r} applies to rule(s) {takers[key]}, not {spec.name!r}"
                                   for key in sorted(refused)))
    scale, distribution = 1.0, Distribution.UNIFORM
    if spec.id == Rule.USF:
        scale = sign_scale(DEFAULT_SCALE if options.get("scale") is None else options["scale"], weight_shape)
    elif spec.id in (Rule.FA, Rule.BRSF, Rule.FRSF) or spec.estimates_feedback:
        init = options.get("init")
        distribution, scale = init_distribution("kaiming" if init is None else init, weight_shape)
    alignment = list(spec.alignment_defaults or (0.0, 0.0, 0.0, 1.0))
    for position, name in enumerate(_ALIGNMENT):
        if options.get(name) is not None:
            alignment[position] = _check_real(name, options[name], positive=name == "sigma")
    if options.get("seed") is not None:
        _check_int("seed", options["seed"], 0)
    rng = options.get("rng")
    draws = spec.draws_every_step or spec.id == Rule.FA
    if draws and rng is None and (options.get("seed") is not None or options.get("step") is not None):
        if options.get("seed") is None:
            raise ValueError(f"rule {spec.name!r} needs seed= with step= (the draw is keyed by both)")
        seed = _check_int("seed", options["seed"], 0)
        step = options.get("step")
        if isinstance(step, torch.Tensor):
            rng = torch.stack([torch.tensor(seed, dtype=torch.int64, device=step.device), step.to(torch.int64)])
        else:
            rng = torch.tensor([seed, _check_int("step", 0 if step is None else step, 0)],
                               dtype=torch.int64, device=device)
    elif rng is not None and (options.get("seed") is not None or options.get("step") is not None):
        raise ValueError("pass either rng=[seed, step] or seed=/step=, not both")
    return spec, float(scale), int(distribution), alignment, rng


def _check_real(name: str, value, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be {'positive' if positive else 'non-negative'} and finite, got {value}")
    return value


_DTYPE_SET = frozenset(_DTYPES)
_DEVICE_TYPES = frozenset(("cpu", "cuda", "meta"))
_TAKES_FEEDBACK = frozenset(spec.id for spec in map(rule_spec, RULES)
                            if spec.id in (Rule.FA, Rule.FRSF) or spec.estimates_feedback)
_NEEDS_FEEDBACK = frozenset(spec.id for spec in map(rule_spec, RULES) if spec.id == Rule.FRSF or spec.estimates_feedback)


def _ordinary(input, weight, bias, feedback, rng, spec) -> bool:
    """Whether a call is the common case that every check of _check_layer passes, in a few
    attribute reads (the checks one by one cost a small layer more host time than its kernels);
    anything else goes through those checks, whose errors name what is wrong."""
    if not (isinstance(input, torch.Tensor) and isinstance(weight, torch.Tensor)):
        return False
    dtype, device = weight.dtype, weight.device
    if dtype not in _DTYPE_SET or device.type not in _DEVICE_TYPES or input.dtype != dtype or input.device != device:
        return False
    if bias is not None and not (isinstance(bias, torch.Tensor) and bias.dtype == dtype and bias.device == device
                                 and bias.dim() == 1 and bias.shape[0] == weight.shape[0]):
        return False
    if feedback is None:
        if spec.id in _NEEDS_FEEDBACK:
            return False
    elif not (spec.id in _TAKES_FEEDBACK and isinstance(feedback, torch.Tensor) and feedback.dtype == dtype
              and feedback.device == device and feedback.shape == weight.shape):
        return False
    return rng is None or (isinstance(rng, torch.Tensor) and rng.dtype == torch.int64 and rng.shape == (2,)
                           and rng.device == device)


def _prepare(input, weight, bias, feedback, rng, spec):
    """The checks every layer kind shares, with autocast applied in between."""
    if spec.draws_every_step and rng is None:
        raise ValueError(f"rule {spec.name!r} draws its feedback every step: pass seed= (and step=) or rng=")
    if _ordinary(input, weight, bias, feedback, rng, spec) and not _autocasting(input.device.type):
        return input, weight, bias, feedback
    _check_tensor("input", input)
    _check_tensor("weight", weight)
    input, weight, bias, feedback = _autocast(input.device.type, input, weight, bias, feedback)
    _check_layer(input, weight, bias, feedback, rng, spec)
    return input, weight, bias, feedback


def _autocasting(device_type: str) -> bool:
    return device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type)


def _autocast(device_type: str, *tensors):
    """Under autocast, the layer runs in the autocast dtype, as torch's own linear / conv2d do."""
    if _autocasting(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        return tuple(None if t is None or not t.is_floating_point() else t.to(dtype) for t in tensors)
    return tensors


def _linear(input, weight, bias, feedback, rng, spec, scale: float, distribution: int, alignment: list,
            activation: str, backend=None, pipeline=None, coefficients=None):
    """The module and functional entry: checked arguments in, one op per pass.

    pipeline (alignment.Pipeline) or coefficients (a tensor [alpha, beta, gamma] that a schedule
    sets): B's gradient from the alignment pipeline's loss (fastfa.alignment) instead of the op's."""
    if spec.estimates_feedback:  # before autocast's cast: loss scaling's node acts on B's own dtype (fastfa.amp)
        feedback = _amp.for_loss_scaling(feedback, spec, alignment, coefficients, weight.device.type)
    input, weight, bias, feedback = _prepare(input, weight, bias, feedback, rng, spec)
    if weight.dim() != 2:
        _check_tensor("weight", weight, dims=(2,))
    if input.dim() < 1 or input.shape[-1] != weight.shape[1]:
        raise ValueError(f"input's last dimension must be in_features={weight.shape[1]} "
                         f"(weight has shape {tuple(weight.shape)}), got input of shape {tuple(input.shape)}")
    name = _backend.resolve(backend, weight.device)
    if pipeline is not None or coefficients is not None:
        return _alignment.linear(input, weight, bias, feedback, rng, spec, scale, distribution, alignment, activation,
                                 name, pipeline, coefficients)
    output, _, _ = _ops.linear_op(name)(input, weight, bias, feedback, rng, int(spec.id), scale, distribution,
                                        alignment, activation)
    return output


def linear(input, weight, bias=None, *, rule, feedback=None, activation=None, backend=None, **options):
    """y = activation(input W^T + b), whose backward sends the error back through the rule's B.

    Shapes: input (*, in_features), weight and feedback (out_features, in_features),
    bias (out_features,), output (*, out_features); fp16, bf16, fp32, fp64.

    grad_input = delta B, grad_weight = delta^T input, grad_bias = sum of delta over rows,
    with delta = dL/d(pre-activation) and B as learning-rules.md defines it per rule:
    bp W; fa R (``feedback``, or regenerated from ``seed``); usf s*sign(W) (``scale``);
    brsf |R_t|*sign(W) with R_t drawn from (``seed``, ``step``) by ``init``;
    frsf |R|*sign(W) (``feedback``); kp, wm, sa, aa, ia the learned B (``feedback``, a
    tensor requiring grad, whose gradient is the rule's alignment terms with ``alpha``,
    ``beta``, ``gamma``, ``sigma``; wm draws its noise from ``seed`` and ``step``).
    """
    options, pipeline = _alignment.split_options(rule_spec(rule), options)
    spec, scale, distribution, alignment, rng = feedback_arguments(rule, tuple(weight.shape), weight.device,
                                                                   options)
    if spec.id == Rule.FA and feedback is None and rng is None:
        raise ValueError("rule 'fa' needs feedback=R, or seed= to regenerate R from (seed, step)")
    _refuse_direct_feedback(spec)
    return _linear(input, weight, bias, feedback, rng, spec, scale, distribution, alignment,
                   canonical_activation(activation), backend, pipeline)


def _refuse_direct_feedback(spec) -> None:
    if spec.direct_feedback:
        raise ValueError("rule 'dfa' has no functional form: its grad_input is e B_l with e = dL/d(model output), "
                         "which only a model converted with fastfa.convert(model, 'dfa') captures")


def _pair(name: str, value, low: int):
    values = (value, value) if isinstance(value, numbers.Integral) and not isinstance(value, bool) else value
    if not isinstance(values, (tuple, list)) or len(values) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return tuple(_check_int(name, v, low) for v in values)


def conv2d_geometry(input_shape, weight_shape, stride, padding, dilation, groups):
    """Checked (stride, padding, extra right/bottom padding, dilation, groups) for a conv2d.

    padding may be an int, a pair, "valid" or "same" (stride 1 only; an even dilated
    kernel needs one more row / column on the bottom / right, as torch pads it).
    """
    geometry = layer_geometry(weight_shape, stride, padding, dilation, groups)
    check_conv2d_input(input_shape, weight_shape, geometry)
    return geometry


def layer_geometry(weight_shape, stride, padding, dilation, groups):
    """The part of conv2d_geometry that depends on the layer only (a module's is resolved once)."""
    stride, dilation = _pair("stride", stride, 1), _pair("dilation", dilation, 1)
    groups = _check_int("groups", groups, 1)
    kernel = tuple(weight_shape[2:])
    extra = (0, 0)
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0, 0)
        elif padding == "same":
            if stride != (1, 1):
                raise ValueError(f"padding='same' needs stride 1, got stride={stride}")
            total = [d * (k - 1) for d, k in zip(dilation, kernel)]
            padding = tuple(t // 2 for t in total)
            extra = tuple(t - 2 * (t // 2) for t in total)
        else:
            raise ValueError(f"padding must be an int, a pair of ints, 'valid' or 'same'; got {padding!r}")
    else:
        padding = _pair("padding", padding, 0)
    if weight_shape[0] % groups != 0:
        raise ValueError(f"groups={groups} must divide out_channels={weight_shape[0]}")
    return stride, padding, extra, dilation, groups


def check_conv2d_input(input_shape, weight_shape, geometry) -> None:
    """The input's channels and spatial size against the layer's weight and geometry."""
    _, padding, extra, dilation, groups = geometry
    kernel = tuple(weight_shape[2:])
    in_per_group = weight_shape[1]
    if input_shape[-3] != in_per_group * groups:
        raise ValueError(f"input must have {in_per_group * groups} channels (weight {tuple(weight_shape)}, "
                         f"groups={groups}), got input of shape {tuple(input_shape)}")
    for axis, size in enumerate(input_shape[-2:]):
        span = dilation[axis] * (kernel[axis] - 1) + 1
        if size + 2 * padding[axis] + extra[axis] < span:
            raise ValueError(f"input's spatial size {tuple(input_shape[-2:])} with padding {padding} is smaller "
                             f"than the dilated kernel {kernel} (dilation {dilation})")


def _conv2d(input, weight, bias, stride, padding, dilation, groups, feedback, rng, spec, scale: float,
            distribution: int, alignment: list, activation: str, backend=None, geometry=None, pipeline=None,
            coefficients=None):
    """geometry: layer_geometry's result where the caller has resolved it already (a module);
    pipeline, coefficients: as :func:`_linear`."""
    if spec.estimates_feedback:
        feedback = _amp.for_loss_scaling(feedback, spec, alignment, coefficients, weight.device.type)
    input, weight, bias, feedback = _prepare(input, weight, bias, feedback, rng, spec)
    if input.dim() not in (3, 4):
        _check_tensor("input", input, dims=(3, 4))
    if weight.dim() != 4:
        _check_tensor("weight", weight, dims=(4,))
    if geometry is None:
        geometry = layer_geometry(weight.shape, stride, padding, dilation, groups)
    check_conv2d_input(input.shape, weight.shape, geometry)
    stride, padding, extra, dilation, groups = geometry
    unbatched = input.dim() == 3
    if unbatched:
        input = input.unsqueeze(0)
    if extra != (0, 0):
        input = torch.nn.functional.pad(input, (0, extra[1], 0, extra[0]))
    name = _backend.resolve(backend, weight.device)
    if pipeline is not None or coefficients is not None:
        output = _alignment.conv2d(input, weight, bias, feedback, rng, stride, padding, dilation, groups, spec, scale,
                                   distribution, alignment, activation, name, pipeline, coefficients)
        return output.squeeze(0) if unbatched else output
    output, _, _ = _ops.conv2d_op(name)(input, weight, bias, feedback, rng, stride, padding, dilation, groups,
                                        int(spec.id), scale, distribution, alignment, activation)
    return output.squeeze(0) if unbatched else output


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, rule, feedback=None,
           activation=None, backend=None, **options):
    """y = activation(conv2d(input, W, b, stride, padding, dilation, groups)), rule's backward.

    Shapes: input (N, C_in, H, W) or (C_in, H, W); weight and feedback
    (C_out, C_in/groups, kh, kw); bias (C_out,). NCHW or channels_last.

    grad_input is the transposed convolution of delta with B (conv2d_input(x.shape, B, delta)),
    grad_weight = conv2d_weight(x, W.shape, delta), grad_bias sums delta; B per rule as in
    :func:`linear`.
    """
    options, pipeline = _alignment.split_options(rule_spec(rule), options)
    spec, scale, distribution, alignment, rng = feedback_arguments(rule, tuple(weight.shape), weight.device,
                                                                   options)
    if spec.id == Rule.FA and feedback is None and rng is None:
        raise ValueError("rule 'fa' needs feedback=R, or seed= to regenerate R from (seed, step)")
    _refuse_direct_feedback(spec)
    return _conv2d(input, weight, bias, stride, padding, dilation, groups, feedback, rng, spec, scale,
                   distribution, alignment, canonical_activation(activation), backend, pipeline=pipeline)


def _angle_degrees(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    denominator = a.norm() * b.norm()
    cosine = float(a.dot(b) / denominator) if denominator != 0 else math.nan
    if math.isnan(cosine):  # a zero or non-finite tensor has no angle (min/max would turn NaN into 0 degrees)
        return math.nan
    return math.degrees(math.acos(max(-1.0, min(1.0, cosine))))
