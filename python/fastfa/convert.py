"""fastfa.convert: swap a model's Linear and Conv2d layers for fastfa's, in place."""

from __future__ import annotations

import fnmatch

import torch

from . import nn as fnn
from .dfa import attach as direct_feedback_attach
from .rules import canonical_rule

__all__ = ["convert"]


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
    way every time. Xiao et al. keep the classifier on backprop (``exclude=("fc",)`` for
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
    swappable = (torch.nn.Linear, torch.nn.Conv2d)
    replacements: dict = {}  # id(old) -> new, so a layer shared between places stays shared

    def replacement(name: str, layer):
        if id(layer) not in replacements:
            layer_seed = None if seed is None else seed + len(replacements)
            replacements[id(layer)] = _converted(layer, rule, dict(options, seed=layer_seed))
        return replacements[id(layer)]

    if type(model) in swappable:
        model = model if _excluded("", exclude) else replacement("", model)
        return _with_direct_feedback(model) if rule == "dfa" else model
    for parent_name, parent in list(model.named_modules(remove_duplicate=False)):
        # _modules, not named_children(): a layer registered twice must be seen twice.
        for child_name, child in list(parent._modules.items()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if child is not None and type(child) in swappable and not _excluded(name, exclude):
                setattr(parent, child_name, replacement(name, child))
    return _with_direct_feedback(model) if rule == "dfa" else model


def _with_direct_feedback(model: torch.nn.Module) -> torch.nn.Module:
    """dfa: the model's hooks that capture e, shared by its dfa layers (those it had already too)."""
    layers = [m for m in model.modules() if isinstance(m, fnn.FeedbackLayer) and m.rule == "dfa"]
    return direct_feedback_attach(model, layers)
