"""fastfa.convert: swap a model's Linear and Conv2d layers for fastfa's, in place."""

from __future__ import annotations

import fnmatch
import math
import warnings

import torch

from . import nn as fnn
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
    factory = dict(device=layer.weight.device, dtype=layer.weight.dtype, rule=rule, **options)
    if type(layer) is torch.nn.Linear:
        new = fnn.Linear(layer.in_features, layer.out_features, layer.bias is not None, **factory)
    else:
        new = fnn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                         layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode, **factory)
    # The same Parameter objects: an optimizer built before convert still updates them.
    new.weight = layer.weight
    new.bias = layer.bias
    new.train(layer.training)
    return new


def convert(model: torch.nn.Module, rule: str, *, exclude=(), **options) -> torch.nn.Module:
    """Swap every torch.nn.Linear and torch.nn.Conv2d of ``model`` for fastfa's, in place.

    Only those exact types are swapped (not subclasses fastfa does not know); layers named
    in ``exclude`` (qualified names such as "fc" or "layer4.1.conv2", or fnmatch patterns
    such as "layer4.*") stay as they are, and so does everything else (batch norm, pooling
    stay backprop). Weights and bias are kept (the same Parameters), with their device
    and dtype. ``options`` go to every new layer (scale, init, activation, ...); with
    ``seed=s`` the i-th converted layer gets seed s + i, so a model converts the same
    way every time. A warning names the usf layers whose fixed scale is more than
    SCALE_MISMATCH_FACTOR off their weights' RMS (the default scale "rms" never is).
    Xiao et al. keep the classifier on backprop (``exclude=("fc",)`` for
    a torchvision ResNet); Kunin et al. convert it too, which is the default here.

    Returns the model (a new layer if ``model`` itself is a Linear or Conv2d).
    """
    rule = canonical_rule(rule)
    if isinstance(exclude, str):
        exclude = (exclude,)
    seed = options.pop("seed", None)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    swappable = (torch.nn.Linear, torch.nn.Conv2d)
    replacements: dict = {}  # id(old) -> new, so a layer shared between places stays shared

    def replacement(name: str, layer):
        if id(layer) not in replacements:
            layer_seed = None if seed is None else seed + len(replacements)
            replacements[id(layer)] = _converted(layer, rule, dict(options, seed=layer_seed))
        return replacements[id(layer)]

    if type(model) in swappable:
        if _excluded("", exclude):
            return model
        layer = replacement("", model)
        _warn_scale_mismatch({"": layer})
        return layer
    converted = {}
    for parent_name, parent in list(model.named_modules(remove_duplicate=False)):
        # _modules, not named_children(): a layer registered twice must be seen twice.
        for child_name, child in list(parent._modules.items()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if child is not None and type(child) in swappable and not _excluded(name, exclude):
                converted[name] = replacement(name, child)
                setattr(parent, child_name, converted[name])
    _warn_scale_mismatch(converted)
    return model


def _warn_scale_mismatch(layers: dict) -> None:
    """One warning naming the usf layers whose fixed scale is off their weights' RMS (SCALE_MISMATCH_FACTOR)."""
    mismatched = []
    for name, layer in layers.items():
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
