"""Measures users compare rules by: weight alignment and gradient alignment, per layer."""

from __future__ import annotations

import contextlib
import math

import torch

from .functional import _angle_degrees
from .nn import FeedbackLayer
from .rules import rule_spec

__all__ = ["weight_alignment", "gradient_alignment", "norm_ratio", "gradient_norm_ratio", "gradient_measures"]


def _layers(model: torch.nn.Module):
    return [(name, module) for name, module in model.named_modules() if isinstance(module, FeedbackLayer)]


@torch.no_grad()
def weight_alignment(model: torch.nn.Module) -> dict:
    """{layer name: angle in degrees between its B (``feedback_weight()``) and W}."""
    return {name: layer.alignment() for name, layer in _layers(model)}


@torch.no_grad()
def norm_ratio(model: torch.nn.Module) -> dict:
    """{layer name: ||B|| / ||W||}."""
    return {name: float(layer.feedback_weight().double().norm() / layer.weight.detach().double().norm())
            for name, layer in _layers(model)}


@contextlib.contextmanager
def _preserved_state(model: torch.nn.Module):
    """Restore every parameter's .grad and every buffer (brsf / wm counters, batch-norm statistics)."""
    grads = {id(p): (p, None if p.grad is None else p.grad.clone()) for p in model.parameters()}
    buffers = [(module, name, None if buffer is None else buffer.clone())
               for module in model.modules() for name, buffer in module._buffers.items()]
    try:
        yield
    finally:
        for parameter, grad in grads.values():
            parameter.grad = grad
        for module, name, buffer in buffers:
            module._buffers[name] = buffer


def _feedback_slot(layer) -> dict:
    """Where the layer registered ``feedback``: a Parameter (estimated rules) or a buffer."""
    return layer._parameters if "feedback" in layer._parameters else layer._buffers


def _grad_inputs(model, loss_fn, inputs, target, layers) -> dict:
    """Run one forward / backward and return {layer name: the grad_input reaching it}."""
    # A fresh leaf per pass: the first layer's input is the leaf itself, whose .grad would
    # otherwise add this pass's gradient to the previous pass's.
    inputs = inputs.detach().requires_grad_(True)
    captured, handles = {}, []
    for name, layer in layers:
        def keep(module, args, name=name):
            x = args[0]
            if x.requires_grad:
                x.retain_grad()
                captured[name] = x
        handles.append(layer.register_forward_pre_hook(keep))
    try:
        loss_fn(model(inputs), target).backward()
    finally:
        for handle in handles:
            handle.remove()
    return {name: x.grad.detach().clone() for name, x in captured.items() if x.grad is not None}


def gradient_alignment(model: torch.nn.Module, loss_fn, batch) -> dict:
    """{layer name: angle in degrees between the grad_input the rule propagates and backprop's}.

    ``batch`` is (inputs, target); ``loss_fn(model(inputs), target)`` is the loss. Both
    passes see the same batch and the same weights; backprop's grad_input comes from one
    extra pass with every fastfa layer switched to ``bp``. The model's state (parameter
    gradients, B, R, step counters, batch-norm statistics) is as it was before the call.
    The first layer's input needs grad to be measured: inputs is made to require it.
    """
    return {name: angle for name, (angle, _) in gradient_measures(model, loss_fn, batch).items()}


def gradient_norm_ratio(model: torch.nn.Module, loss_fn, batch) -> dict:
    """{layer name: ||grad_input the rule propagates|| / ||backprop's||} on the same batch and weights.

    Where the angle says whether the error points the right way, this says whether it has the
    right size: a ratio that grows layer by layer towards the input is the error blowing up
    (a feedback scale too large for the weights) before the loss shows it. Same passes and
    guarantees as :func:`gradient_alignment`.
    """
    return {name: ratio for name, (_, ratio) in gradient_measures(model, loss_fn, batch).items()}


def gradient_measures(model: torch.nn.Module, loss_fn, batch) -> dict:
    """{layer name: (gradient angle in degrees, gradient norm ratio)} from one pair of passes
    (:func:`gradient_alignment`, :func:`gradient_norm_ratio`)."""
    rule_inputs, backprop_inputs = _rule_and_backprop_grad_inputs(model, loss_fn, batch)
    return {name: (_angle_degrees(rule_inputs[name], backprop_inputs[name]),
                   _norm_ratio(rule_inputs[name], backprop_inputs[name]))
            for name in rule_inputs if name in backprop_inputs}


def _norm_ratio(a: torch.Tensor, b: torch.Tensor) -> float:
    denominator = float(b.double().norm())
    return float(a.double().norm()) / denominator if denominator != 0 else math.nan


def _rule_and_backprop_grad_inputs(model, loss_fn, batch):
    inputs, target = batch
    layers = _layers(model)
    with _preserved_state(model):
        rule_inputs = _grad_inputs(model, loss_fn, inputs, target, layers)
    backprop = rule_spec("bp")
    saved = [(layer, layer._spec, layer.feedback) for _, layer in layers]
    with _preserved_state(model):
        try:
            for layer, _, _ in saved:
                layer._spec = backprop
                layer._forget_resolved()
                _feedback_slot(layer)["feedback"] = None  # bp takes no feedback tensor
            backprop_inputs = _grad_inputs(model, loss_fn, inputs, target, layers)
        finally:
            for layer, spec, feedback in saved:
                layer._spec = spec
                layer._forget_resolved()
                _feedback_slot(layer)["feedback"] = feedback
    return rule_inputs, backprop_inputs
