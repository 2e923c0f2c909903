"""The peers `fastfa bench` times fastfa against: the rules written the way existing libraries write them.

- ``autograd``: one ``torch.autograd.Function`` per layer kind. The module makes B with torch
  ops at every forward (``s * torch.sign(W)``, ``torch.abs(R) * torch.sign(W)``, a fresh
  ``uniform_`` draw for brsf), hands it to the Function, and the backward calls torch's own
  matmul / ``torch.nn.grad.conv2d_input`` / ``conv2d_weight``. The estimated rules' B gradient
  (learning-rules.md) is composed from the same calls. This is how BioTorch, the
  Neural-Alignment code and most papers' code do it; nothing is fused.
- ``compile``: the same modules under ``torch.compile`` (see :func:`compile_peer`).
- ``biotorch``: BioTorch's own layers (pip package ``biotorch``) for the rules it has
  (fa, usf, brsf, frsf), when it is installed and imports (see :func:`biotorch_status`).

A peer is built from a fastfa layer (:func:`peer_of`) so that it holds the same W, bias, R or
learned B and the same usf scale: the two compute the same rule, and only the implementation
differs. brsf's per-step draw comes from torch's generator here (from Philox in fastfa); the
distribution is the same.
"""

from __future__ import annotations

from typing import Optional

import torch

from .rules import RMS_SCALE, Distribution, canonical_rule, weight_rms

__all__ = ["PEERS", "PeerLinear", "PeerConv2d", "peer_of", "convert_to_peers", "compile_peer",
           "biotorch_status", "biotorch_rules", "biotorch_of"]

#: The peers, in the order the bench reports them.
PEERS = ("autograd", "compile", "biotorch")

_FIXED = ("bp", "fa", "usf", "brsf", "frsf")
_ESTIMATED = ("kp", "wm", "sa", "aa", "ia")


# ----------------------------------------------------------------------------------------------------------
# The estimated rules' gradient of B, from learning-rules.md, with plain torch ops.


def _feedback_gradient(rule, alignment, x, weight, feedback, grad_weight, noise, project, outer, back):
    """B's gradient: project(x, M) = x M^T (conv2d(x, M)), outer(r, x) = r^T x, back(r, M) = r M.

    Means are over the batch only (``x.shape[0]`` rows for linear after folding, N for conv).
    """
    alpha, beta, gamma, _ = alignment
    n = x.shape[0]
    if rule == "kp":
        return grad_weight + alpha * 2 * feedback
    if rule == "sa":
        return alpha * 2 * feedback - beta * weight
    if rule == "wm":
        return alpha * 2 * feedback - (beta / n) * outer(project(noise, weight), noise)
    r = project(x, weight)
    if rule == "aa":
        return (alpha * 2 / n) * outer(project(x, feedback), x) - (beta / n) * outer(r, x)
    if rule == "ia":
        return -(alpha / n) * outer(r, x) + (beta * 2 / n) * outer(r, back(r, feedback)) + gamma * 2 * feedback
    raise ValueError(f"rule {rule!r} has no gradient of B")


class _LinearFunction(torch.autograd.Function):
    """y = x W^T + b; grad_x = delta B; grad_W = delta^T x; B's gradient for the estimated rules."""

    @staticmethod
    def forward(ctx, input, weight, bias, feedback, noise, rule, alignment):
        ctx.save_for_backward(input, weight, feedback, noise)
        ctx.rule, ctx.alignment, ctx.has_bias = rule, alignment, bias is not None
        return torch.nn.functional.linear(input, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, feedback, noise = ctx.saved_tensors
        delta = grad_output.reshape(-1, weight.shape[0])
        x = input.reshape(-1, weight.shape[1])
        grad_input = grad_weight = grad_bias = grad_feedback = None
        if ctx.needs_input_grad[0]:
            grad_input = (delta @ feedback).reshape(input.shape)
        if ctx.needs_input_grad[1] or ctx.rule == "kp":
            grad_weight = delta.t() @ x
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = delta.sum(0)
        if ctx.needs_input_grad[3]:
            grad_feedback = _feedback_gradient(
                ctx.rule, ctx.alignment, x, weight, feedback, grad_weight,
                None if noise is None else noise.reshape(-1, weight.shape[1]),
                lambda a, m: a @ m.t(), lambda r, a: r.t() @ a, lambda r, m: r @ m)
        return grad_input, grad_weight if ctx.needs_input_grad[1] else None, grad_bias, grad_feedback, None, None, None


class _Conv2dFunction(torch.autograd.Function):
    """conv2d forward; grad_x = conv2d_input(x.shape, B, delta); grad_W = conv2d_weight(x, W.shape, delta)."""

    @staticmethod
    def forward(ctx, input, weight, bias, feedback, noise, geometry, rule, alignment):
        ctx.save_for_backward(input, weight, feedback, noise)
        ctx.geometry, ctx.rule, ctx.alignment, ctx.has_bias = geometry, rule, alignment, bias is not None
        return torch.nn.functional.conv2d(input, weight, bias, *geometry)

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, feedback, noise = ctx.saved_tensors
        geometry = ctx.geometry
        grad_input = grad_weight = grad_bias = grad_feedback = None
        if ctx.needs_input_grad[0]:
            grad_input = torch.nn.grad.conv2d_input(input.shape, feedback, grad_output, *geometry)
        if ctx.needs_input_grad[1] or ctx.rule == "kp":
            grad_weight = torch.nn.grad.conv2d_weight(input, weight.shape, grad_output, *geometry)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_output.sum((0, 2, 3))
        if ctx.needs_input_grad[3]:
            grad_feedback = _feedback_gradient(
                ctx.rule, ctx.alignment, input, weight, feedback, grad_weight, noise,
                lambda a, m: torch.nn.functional.conv2d(a, m, None, *geometry),
                lambda r, a: torch.nn.grad.conv2d_weight(a, weight.shape, r, *geometry),
                lambda r, m: torch.nn.grad.conv2d_input(input.shape, m, r, *geometry))
        return (grad_input, grad_weight if ctx.needs_input_grad[1] else None, grad_bias, grad_feedback,
                None, None, None, None)


class _PeerLayer:
    """What PeerLinear and PeerConv2d share: the rule's state and B made with torch ops."""

    def _setup_peer(self, rule, scale, distribution, init_scale, feedback, alignment):
        self.rule = canonical_rule(rule)
        self.sign_scale = scale            # usf's s
        self.draw_normal = distribution == Distribution.NORMAL
        self.draw_scale = init_scale       # brsf's R_t = draw_scale * xi
        self.alignment_options = tuple(alignment)
        if self.rule in _ESTIMATED:
            self.feedback = torch.nn.Parameter(feedback.detach().clone())
        elif feedback is not None:
            self.register_buffer("feedback", feedback.detach().clone())
        else:
            self.feedback = None

    def _feedback(self) -> torch.Tensor:
        """B for this step, made with torch ops (no_grad: B is a constant of the backward)."""
        if self.rule in _ESTIMATED:
            return self.feedback
        weight = self.weight.detach()
        with torch.no_grad():
            if self.rule == "bp":
                return weight
            if self.rule == "fa":
                return self.feedback
            if self.rule == "usf":
                scale = self.sign_scale
                if scale == RMS_SCALE:
                    opmath = torch.float64 if weight.dtype == torch.float64 else torch.float32
                    scale = torch.linalg.vector_norm(weight, dtype=opmath) / max(weight.numel(), 1) ** 0.5
                return (scale * torch.sign(weight)).to(weight.dtype)
            if self.rule == "frsf":
                return torch.abs(self.feedback) * torch.sign(weight)
            # brsf: a fresh R_t from R's init distribution at every step
            draw = torch.empty_like(weight)
            draw = draw.normal_(0.0, self.draw_scale) if self.draw_normal else draw.uniform_(-self.draw_scale,
                                                                                             self.draw_scale)
            return torch.abs(draw) * torch.sign(weight)

    def _noise(self, input: torch.Tensor) -> Optional[torch.Tensor]:
        # wm: x is replaced by noise xi ~ N(0, sigma^2) in B's gradient.
        if self.rule == "wm" and torch.is_grad_enabled():
            return torch.randn_like(input) * self.alignment_options[3]
        return None


class PeerLinear(_PeerLayer, torch.nn.Linear):
    """A Linear layer of the rule, written as an autograd.Function (the peer, not fastfa)."""

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, *, rule, scale=1.0,
                 distribution=Distribution.UNIFORM, init_scale=1.0, feedback=None, alignment=(0.0, 0.0, 0.0, 1.0)):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._setup_peer(rule, scale, distribution, init_scale, feedback, alignment)

    def forward(self, input):
        return _LinearFunction.apply(input, self.weight, self.bias, self._feedback(), self._noise(input), self.rule,
                                     self.alignment_options)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rule={self.rule} (autograd.Function peer)"


class PeerConv2d(_PeerLayer, torch.nn.Conv2d):
    """A Conv2d layer of the rule, written as an autograd.Function (zeros padding only)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1, bias=True,
                 device=None, dtype=None, *, rule, scale=1.0, distribution=Distribution.UNIFORM, init_scale=1.0,
                 feedback=None, alignment=(0.0, 0.0, 0.0, 1.0)):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         device=device, dtype=dtype)
        if isinstance(self.padding, str):
            raise ValueError(f"PeerConv2d takes numeric padding, got {padding!r}")
        self._setup_peer(rule, scale, distribution, init_scale, feedback, alignment)

    def forward(self, input):
        geometry = (self.stride, self.padding, self.dilation, self.groups)
        return _Conv2dFunction.apply(input, self.weight, self.bias, self._feedback(), self._noise(input), geometry,
                                     self.rule, self.alignment_options)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rule={self.rule} (autograd.Function peer)"


def _draw_parameters(layer):
    """(distribution, scale) of R for brsf's fresh draws, as the fastfa layer draws them."""
    from .rules import init_distribution

    if layer.feedback_init is None:
        return Distribution.UNIFORM, 1.0
    distribution, scale = init_distribution(layer.feedback_init, tuple(layer.weight.shape))
    return Distribution(distribution), scale


def peer_of(layer) -> torch.nn.Module:
    """The autograd.Function peer of a fastfa.nn.Linear / Conv2d: same W, bias, R or B, scale."""
    from . import nn as fnn

    if not isinstance(layer, (fnn.Linear, fnn.Conv2d)):
        raise TypeError(f"peer_of takes a fastfa.nn.Linear or Conv2d, got {type(layer).__name__}")
    distribution, init_scale = _draw_parameters(layer)
    feedback = None if layer.feedback is None else layer.feedback.detach()
    options = dict(device=layer.weight.device, dtype=layer.weight.dtype, rule=layer.rule,
                   scale=layer.feedback_scale, distribution=distribution, init_scale=init_scale, feedback=feedback,
                   alignment=layer.alignment_options)
    if layer.activation != "none":
        raise ValueError(f"the peers have no fused activation; got a layer with activation={layer.activation!r}")
    if layer.alignment_pipeline is not None:
        switches = ", ".join(f"{name}={value}" for name, value in layer.alignment_pipeline.on().items())
        raise ValueError(f"the peers compute the spec's closed forms, not the alignment pipeline; got a layer with "
                         f"{switches} (aa's and ia's layers default to normalize_input=True: pass "
                         f"normalize_input=False for the paper's configuration)")
    if isinstance(layer, fnn.Linear):
        peer = PeerLinear(layer.in_features, layer.out_features, layer.bias is not None, **options)
    else:
        if layer.padding_mode != "zeros":
            raise ValueError(f"PeerConv2d has zeros padding only; got padding_mode={layer.padding_mode!r}")
        peer = PeerConv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                          layer.dilation, layer.groups, layer.bias is not None, **options)
    with torch.no_grad():
        peer.weight.copy_(layer.weight)
        if layer.bias is not None:
            peer.bias.copy_(layer.bias)
    peer.train(layer.training)
    return peer


def convert_to_peers(model: torch.nn.Module, make=None) -> torch.nn.Module:
    """Swap every fastfa layer of a model (made by fastfa.convert) for ``make(layer)``, in place.

    ``make`` defaults to :func:`peer_of` (the autograd.Function peer); :func:`biotorch_of` gives
    BioTorch's layers. Returns the model (the new layer if ``model`` is itself a fastfa layer).
    """
    from . import nn as fnn

    make = peer_of if make is None else make
    if isinstance(model, (fnn.Linear, fnn.Conv2d)):
        return make(model)
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if isinstance(child, (fnn.Linear, fnn.Conv2d)):
                setattr(parent, name, make(child))
    return model


def compile_peer(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The peer under torch.compile: mode="max-autotune" on GPU; inductor's default mode on CPU.

    (max-autotune's choices are GEMM templates for GPUs; on CPU it would spend minutes
    benchmarking C++ templates per shape for a step that is a few oneDNN calls.)
    """
    if device.type == "cuda":
        return torch.compile(module, mode="max-autotune")
    return torch.compile(module)


# ----------------------------------------------------------------------------------------------------------
# BioTorch (pip package ``biotorch``, 2021): its own layers, when it imports.

_BIOTORCH_RULES = ("fa", "usf", "brsf", "frsf")
_biotorch_cache: dict = {}


def biotorch_status():
    """(usable, reason): whether BioTorch's layers import and run one step here."""
    if "status" in _biotorch_cache:
        return _biotorch_cache["status"]
    try:
        import importlib.metadata

        version = importlib.metadata.version("biotorch")
    except Exception:  # PackageNotFoundError
        status = (False, "not installed (pip install --no-deps biotorch)")
    else:
        try:
            import biotorch.layers.usf as usf

            layer = usf.Linear(3, 2)
            layer(torch.randn(4, 3, requires_grad=True)).sum().backward()
            status = (True, f"biotorch {version}")
        except Exception as error:  # ImportError of a dependency, or an API torch removed
            status = (False, f"biotorch {version} installed but not usable: {type(error).__name__}: {error}")
    _biotorch_cache["status"] = status
    return status


def biotorch_rules() -> tuple:
    """The rules BioTorch has layers for (bp is torch's own layer there)."""
    return _BIOTORCH_RULES


def biotorch_of(layer) -> torch.nn.Module:
    """BioTorch's layer for a fastfa layer's rule, holding the same W, bias, R and usf scale.

    BioTorch's Linear takes 2-D inputs only (it calls ``input.mm``). Its brsf draws R_t
    Xavier-uniform every step (its default init); fastfa's draw uses the layer's init.
    """
    import importlib

    from . import nn as fnn

    usable, reason = biotorch_status()
    if not usable:
        raise RuntimeError(f"BioTorch is {reason}")
    if layer.rule not in _BIOTORCH_RULES:
        raise ValueError(f"BioTorch has no {layer.rule!r} layers; it has {', '.join(_BIOTORCH_RULES)}")
    module = importlib.import_module(f"biotorch.layers.{layer.rule}")
    config = {"type": layer.rule, "options": {"constrain_weights": False, "gradient_clip": False, "init": "xavier"}}
    if isinstance(layer, fnn.Linear):
        peer = module.Linear(layer.in_features, layer.out_features, layer.bias is not None, layer_config=config)
    else:
        peer = module.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                             layer.dilation, layer.groups, layer.bias is not None, layer_config=config)
    peer = peer.to(device=layer.weight.device, dtype=layer.weight.dtype)
    with torch.no_grad():
        peer.weight.copy_(layer.weight)
        if layer.bias is not None:
            peer.bias.copy_(layer.bias)
        if layer.rule == "fa":
            peer.weight_backward.copy_(layer.feedback)
        elif layer.rule == "frsf":   # BioTorch keeps |R| and multiplies by sign(W) each step
            peer.weight_backward.copy_(layer.feedback.abs())
    if layer.rule == "usf":
        # BioTorch's usf scale is a number: "rms" is taken from W now (the same s at this step).
        rms = layer.feedback_scale == RMS_SCALE
        peer.scaling_factor = weight_rms(layer.weight) if rms else layer.feedback_scale
    peer.train(layer.training)
    return peer
