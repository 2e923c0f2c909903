"""fastfa.convert: swap a model's Linear, Conv1d, Conv2d and MultiheadAttention layers for fastfa's, in place."""

from __future__ import annotations

import fnmatch
import math
import warnings

import torch

from . import nn as fnn
from .coverage import ATTENTION_PART, BACKPROP, CONVERTIBLE, coverage
from .dfa import attach as direct_feedback_attach
from .rules import RMS_SCALE, Rule, canonical_rule, weight_rms

__all__ = ["convert", "SCALE_MISMATCH_FACTOR"]

#: convert warns where a layer's fixed usf scale s and its weights' RMS differ by more than this
#: factor. B = s sign(W) carries the error back s / RMS(W) times as strong as W would (per unit of
#: alignment), and k such layers in a row multiply it k times: RetinaNet's heads, s ~2.9x RMS(W)
#: over five convolutions, diverge (issue 20). Every init torch and torchvision use matches one of
#: the fixed scales up to sqrt(3) (a uniform and a normal draw of the same bound), so 2 flags a
#: scale that does not belong to the weights, and not a model that merely used another init.
SCALE_MISMATCH_FACTOR = 2.0


def _excluded(name: str, patterns) -> bool:
    return any(name == pattern or fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _converted(layer: torch.nn.Module, rule: str, options: dict) -> torch.nn.Module:
    if type(layer) is torch.nn.MultiheadAttention:
        return _converted_attention(layer, rule, options)
    factory = dict(device=layer.weight.device, dtype=layer.weight.dtype, rule=rule, **options)
    if type(layer) is torch.nn.Linear:
        new = fnn.Linear(layer.in_features, layer.out_features, layer.bias is not None, **factory)
    else:
        kind = fnn.Conv1d if type(layer) is torch.nn.Conv1d else fnn.Conv2d
        new = kind(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                   layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode, **factory)
    # The same Parameter objects: an optimizer built before convert still updates them.
    new.weight = layer.weight
    new.bias = layer.bias
    new.train(layer.training)
    return new


def _converted_attention(layer: torch.nn.MultiheadAttention, rule: str, options: dict):
    # The projections have no activation to fuse (the attention follows them).
    options = {key: value for key, value in options.items() if key != "activation"}
    weight = layer.out_proj.weight
    new = fnn.MultiheadAttention(layer.embed_dim, layer.num_heads, layer.dropout, layer.in_proj_bias is not None,
                                 layer.bias_k is not None, layer.add_zero_attn, layer.kdim, layer.vdim,
                                 layer.batch_first, device=weight.device, dtype=weight.dtype, rule=rule, **options)
    for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias", "bias_k",
                 "bias_v"):
        setattr(new, name, getattr(layer, name))
    new.out_proj.weight, new.out_proj.bias = layer.out_proj.weight, layer.out_proj.bias
    new.train(layer.training)
    return new


def _seeds_taken(layer: torch.nn.Module) -> int:
    """How many seeds a converted layer takes (s, s + 1, ...): one per feedback state."""
    return len(layer.projections()) if isinstance(layer, fnn.MultiheadAttention) else 1


def convert(model: torch.nn.Module, rule: str, *, exclude=(), **options) -> torch.nn.Module:
    """Swap every torch.nn.Linear, Conv1d, Conv2d and MultiheadAttention of ``model`` for fastfa's, in place.

    Only those exact types are swapped (not subclasses fastfa does not know); layers named
    in ``exclude`` (qualified names such as "fc" or "layer4.1.conv2", or fnmatch patterns
    such as "layer4.*") stay as they are, and so does everything else (batch norm, pooling
    stay backprop). Weights and bias are kept (the same Parameters), with their device
    and dtype. ``options`` go to every new layer (scale, init, activation, ...); with
    ``seed=s`` the i-th converted layer gets seed s + i, so a model converts the same
    way every time (a MultiheadAttention takes one seed per projection). So TransformerEncoder /
    Decoder layers and whole nn.Transformer models convert. Modules with parameters of their
    own that convert does not know (nn.Bilinear, an LSTM, a custom module calling F.linear, a
    subclass of Linear) stay on backprop: one warning names their parameters, and
    :func:`fastfa.coverage` gives the per-module table. A warning names the usf layers whose
    fixed scale is more than SCALE_MISMATCH_FACTOR off their weights' RMS (the default scale
    "rms" never is). Xiao et al. keep the classifier on backprop (``exclude=("fc",)`` for
    a torchvision ResNet); Kunin et al. convert it too, which is the default here.

    ``"dfa"`` also hooks ``model``: each call captures e = dL/d(model output) during the
    ordinary ``loss.backward()`` and hands it to every dfa layer (fastfa.dfa), so the model
    must return a tensor and be called as ``model(x)``.

    Returns the model (a new layer if ``model`` itself is a Linear or Conv2d).
    """
    rule = canonical_rule(rule)
    if isinstance(exclude, str):
        exclude = (exclude,)
    seed = options.pop("seed", None)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    swappable = CONVERTIBLE
    replacements: dict = {}  # id(old) -> new, so a layer shared between places stays shared
    seeds_taken = 0

    def replacement(name: str, layer):
        nonlocal seeds_taken
        if id(layer) not in replacements:
            layer_seed = None if seed is None else seed + seeds_taken
            replacements[id(layer)] = _converted(layer, rule, dict(options, seed=layer_seed))
            seeds_taken += _seeds_taken(replacements[id(layer)])
        return replacements[id(layer)]

    if type(model) in swappable:
        if _excluded("", exclude):
            return model
        layer = replacement("", model)
        _warn_scale_mismatch({"": layer})
        return _with_direct_feedback(layer) if rule == "dfa" else layer
    converted = {}
    for parent_name, parent in list(model.named_modules(remove_duplicate=False)):
        # _modules, not named_children(): a layer registered twice must be seen twice.
        for child_name, child in list(parent._modules.items()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if child is not None and type(child) in swappable and not _excluded(name, exclude):
                converted[name] = replacement(name, child)
                setattr(parent, child_name, converted[name])
    _warn_unknown(model)
    _warn_scale_mismatch(converted)
    return _with_direct_feedback(model) if rule == "dfa" else model


def _warn_unknown(model: torch.nn.Module) -> None:
    """One warning naming the parameters that still carry the error back through their own weights
    in modules convert does not know (the layers it knows and the user excluded are left out)."""
    unknown = [row for row in coverage(model) if row.status == BACKPROP and type(model.get_submodule(row.name))
               not in (*CONVERTIBLE, ATTENTION_PART)]
    if unknown:
        names = ", ".join(f"{row.name}.{p}" if row.name else p for row in unknown for p in row.parameters)
        kinds = ", ".join(sorted({row.kind for row in unknown}))
        warnings.warn(f"fastfa.convert left these parameters on backprop (weight transport), in modules it does "
                      f"not know ({kinds}): {names}. fastfa.coverage(model) gives the per-module table.",
                      stacklevel=3)


def _with_direct_feedback(model: torch.nn.Module) -> torch.nn.Module:
    """dfa: the model's hooks that capture e, shared by its dfa layers (those it had already too)."""
    layers = [m for m in model.modules() if isinstance(m, fnn.FeedbackLayer) and m.rule == "dfa"]
    return direct_feedback_attach(model, layers)


def _warn_scale_mismatch(layers: dict) -> None:
    """One warning naming the usf layers whose fixed scale is off their weights' RMS (SCALE_MISMATCH_FACTOR)."""
    mismatched = []
    feedback_layers = ((f"{name}.{part}" if name and part else name or part, module)
                       for name, layer in layers.items() for part, module in layer.named_modules()
                       if isinstance(module, fnn.FeedbackLayer))  # a MultiheadAttention's projections too
    for name, layer in feedback_layers:
        if layer._spec.id != Rule.USF or layer.feedback_scale == RMS_SCALE or layer.weight.numel() == 0:
            continue
        rms = weight_rms(layer.weight)
        ratio = layer.feedback_scale / rms if rms > 0 else math.inf
        if not 1 / SCALE_MISMATCH_FACTOR <= ratio <= SCALE_MISMATCH_FACTOR:
            mismatched.append(f"{name or '(the model)'} (s = {ratio:.3g} x RMS(W))")
    if mismatched:
        warnings.warn(f"fastfa.convert: the usf scale differs from the weights' RMS by more than a factor "
                      f"{SCALE_MISMATCH_FACTOR:g} in {len(mismatched)} layer(s): {', '.join(mismatched)}. The "
                      "error sent back through them is scaled by that much per layer and can blow up or vanish; "
                      "scale=\"rms\" (the default) takes s from each layer's weights at every step.",
                      stacklevel=3)
