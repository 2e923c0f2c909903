"""The custom ops' Python half: fake (shape) kernels and autograd formulas.

The schemas and the CPU / CUDA kernels are declared once in C++
(pybind_src/ops_registration.cpp). Each layer kind has one forward op and one
backward op; the forward op takes the feedback description too, so that its
autograd formula can hand it to the backward op:

    torch.ops.fastfa.linear(input, weight, bias, feedback, rng, rule, scale, distribution, alignment,
                            activation) -> (output, activation_saved, projection)
    torch.ops.fastfa.linear_backward(grad_output, input, weight, feedback, rng, activation_saved, projection,
                                     rule, scale, distribution, alignment, activation, output_mask)
        -> (grad_input, grad_weight, grad_bias, grad_feedback)   # masked-out gradients come back empty
    torch.ops.fastfa.conv2d / conv2d_backward       # the same, with stride, padding, dilation, groups
    torch.ops.fastfa.feedback_transform(weight, feedback, rng, rule, scale, distribution) -> B

projection is r = x W^T (conv2d(x, W)) without bias, kept only for the rules whose B
gradient needs it (aa, ia; empty with normalize_input, where the backward recomputes it from the
normalised x); alignment is [alpha, beta, gamma, sigma], or on aten
[alpha, beta, gamma, sigma, normalize_input] (aa / ia: B's gradient from x normalised per sample).

Other backends register ops with the same schemas under their own names
(fastfa::cuda_linear / cuda_linear_backward, fastfa::triton_linear / triton_linear_backward, ...).
Each forward op's autograd calls its own backward op, in C++ (csrc/autograd.cpp: no Python on a
training step's path), the Triton ops' too on CPU and CUDA tensors, the devices their kernels run
on. The Triton ops are defined in Python (torch.library.triton_op, which registers torch.library's
autograd wrapper for every device); register_linear_autograd / register_conv2d_autograd give that
wrapper its formula, which serves the devices the C++ kernels are not registered for (there the
Triton ops hand the call to the aten ops).
"""

from __future__ import annotations

import importlib

import torch
from torch._prims_common import suggest_memory_format

from . import _backend
from . import _C  # noqa: F401  (loading the extension registers torch.ops.fastfa)
from .rules import Rule

__all__ = ["linear_op", "conv2d_op", "feedback_transform", "register_linear_autograd", "register_conv2d_autograd"]

# relu, tanh and sigmoid differentiate from their output (which autograd keeps anyway);
# gelu and silu need the pre-activation, which the forward op returns as its second output.
_DERIVATIVE_FROM_OUTPUT = frozenset({"relu", "tanh", "sigmoid"})
_DERIVATIVE_FROM_INPUT = frozenset({"gelu", "gelu_tanh", "silu"})


def feedback_transform(weight, feedback, rng, rule: int, scale: float, distribution: int) -> torch.Tensor:
    """B = T(W) materialised: weight (and feedback) shaped like W, rng int64 [seed, step] or None."""
    return torch.ops.fastfa.feedback_transform(weight, feedback, rng, rule, scale, distribution)


def _check_one_device(weight, **tensors):
    """The real kernels refuse tensors on two devices; so do the fake ones (a meta tensor
    among cpu ones would otherwise send the call here and come back unchecked)."""
    for name, tensor in tensors.items():
        torch._check(tensor is None or tensor.device == weight.device,
                     lambda: f"fastfa: {name} is on {tensor.device} but weight is on {weight.device}")


@torch.library.register_fake("fastfa::feedback_transform")
def _feedback_transform_fake(weight, feedback, rng, rule, scale, distribution):
    _check_one_device(weight, feedback=feedback, rng=rng)
    return weight.new_empty(weight.shape).contiguous(memory_format=suggest_memory_format(weight))


_SAVES_PROJECTION = frozenset({int(Rule.AA), int(Rule.IA)})


def _saves_projection(rule, alignment) -> bool:
    """aa / ia keep r = x W^T for B's gradient, unless the aten op's normalize_input (a fifth alignment
    value) recomputes it from the normalised x (saves_projection in csrc/aten_backend.cpp)."""
    return rule in _SAVES_PROJECTION and not (len(alignment) == 5 and alignment[4] != 0)


def _forward_outputs(output, activation, rule, alignment):
    saved = torch.empty_like(output) if activation in _DERIVATIVE_FROM_INPUT else output.new_empty(0)
    projection = torch.empty_like(output) if _saves_projection(rule, alignment) else output.new_empty(0)
    return torch.empty_like(output), saved, projection


@torch.library.register_fake("fastfa::linear")
def _linear_fake(input, weight, bias, feedback, rng, rule, scale, distribution, alignment, activation):
    _check_one_device(weight, input=input, bias=bias, feedback=feedback, rng=rng)
    torch._check(input.shape[-1] == weight.shape[1], lambda: "fastfa: input's last dimension must be in_features")
    return _forward_outputs(torch.nn.functional.linear(input, weight, bias), activation, rule, alignment)


@torch.library.register_fake("fastfa::conv2d")
def _conv2d_fake(input, weight, bias, feedback, rng, stride, padding, dilation, groups, rule, scale,
                 distribution, alignment, activation):
    _check_one_device(weight, input=input, bias=bias, feedback=feedback, rng=rng)
    output = torch.ops.aten.convolution(input, weight, bias, stride, padding, dilation, False, [0, 0], groups)
    return _forward_outputs(output, activation, rule, alignment)


def _estimates(rule) -> bool:
    return rule >= int(Rule.KP)


def _masked(gradients, output_mask, input, weight, feedback, rule):
    grad_input, grad_weight, grad_bias = gradients
    if output_mask[3] and _estimates(rule):  # in B's own layout (in_layout_of in C++)
        grad_feedback = feedback.new_empty(feedback.shape).contiguous(memory_format=suggest_memory_format(feedback))
    else:
        grad_feedback = weight.new_empty(0)
    return (grad_input if output_mask[0] else input.new_empty(0),
            grad_weight if output_mask[1] else weight.new_empty(0),
            grad_bias if output_mask[2] else weight.new_empty(0),
            grad_feedback)


@torch.library.register_fake("fastfa::linear_backward")
def _linear_backward_fake(grad_output, input, weight, feedback, rng, activation_saved, projection, rule, scale,
                          distribution, alignment, activation, output_mask):
    _check_one_device(weight, grad_output=grad_output, input=input, feedback=feedback, rng=rng)
    return _masked((input.new_empty(input.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape[0])),
                   output_mask, input, weight, feedback, rule)


def _backward_filter(weight, feedback, rng, rule, scale, distribution, output_mask):
    """The filter the aten backward hands to convolution_backward (see conv2d_backward in C++)."""
    if not output_mask[0] or rule == Rule.BP:
        return weight
    if (rule == Rule.FA and feedback is not None) or _estimates(rule):
        return feedback
    return _feedback_transform_fake(weight, feedback, rng, rule, scale, distribution)


@torch.library.register_fake("fastfa::conv2d_backward")
def _conv2d_backward_fake(grad_output, input, weight, feedback, rng, activation_saved, projection, stride, padding,
                          dilation, groups, rule, scale, distribution, alignment, activation, output_mask):
    _check_one_device(weight, grad_output=grad_output, input=input, feedback=feedback, rng=rng)
    filter = _backward_filter(weight, feedback, rng, rule, scale, distribution, output_mask)
    gradients = torch.ops.aten.convolution_backward(
        grad_output, input, filter, [weight.shape[0]] if output_mask[2] else None, stride, padding, dilation,
        False, [0, 0], groups, output_mask[:3])
    return _masked(gradients, output_mask, input, weight, feedback, rule)


def _activation_for_backward(output, activation_saved, activation):
    return output if activation in _DERIVATIVE_FROM_OUTPUT else activation_saved


def _linear_setup_context(ctx, inputs, output):
    input, weight, bias, feedback, rng, rule, scale, distribution, alignment, activation = inputs
    ctx.save_for_backward(input, weight, feedback, rng, _activation_for_backward(output[0], output[1], activation),
                          output[2])
    ctx.feedback_args = (rule, scale, distribution, alignment, activation)
    ctx.has_bias = bias is not None


def _output_mask(ctx):
    return [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2],
            ctx.needs_input_grad[3]]


def _gradients(gradients, mask, inputs: int):
    """The backward op's outputs as autograd wants them: None where not needed, then None per non-tensor input."""
    return tuple(g if needed else None for g, needed in zip(gradients, mask)) + (None,) * (inputs - 4)


def linear_backward_formula(backward_op):
    """The autograd formula of a linear forward op that hands its saved tensors to ``backward_op``
    (each backend's forward op calls its own backward op, with the same schema)."""

    def backward(ctx, grad_output, _grad_activation_saved, _grad_projection):
        input, weight, feedback, rng, activation_saved, projection = ctx.saved_tensors
        mask = _output_mask(ctx)
        gradients = backward_op(grad_output, input, weight, feedback, rng, activation_saved, projection,
                                *ctx.feedback_args, mask)
        return _gradients(gradients, mask, 10)

    return backward


def _conv2d_setup_context(ctx, inputs, output):
    (input, weight, bias, feedback, rng, stride, padding, dilation, groups, rule, scale, distribution, alignment,
     activation) = inputs
    ctx.save_for_backward(input, weight, feedback, rng, _activation_for_backward(output[0], output[1], activation),
                          output[2])
    ctx.geometry = (stride, padding, dilation, groups)
    ctx.feedback_args = (rule, scale, distribution, alignment, activation)
    ctx.has_bias = bias is not None


def conv2d_backward_formula(backward_op):
    """The autograd formula of a conv2d forward op that hands its saved tensors to ``backward_op``."""

    def backward(ctx, grad_output, _grad_activation_saved, _grad_projection):
        input, weight, feedback, rng, activation_saved, projection = ctx.saved_tensors
        mask = _output_mask(ctx)
        gradients = backward_op(grad_output, input, weight, feedback, rng, activation_saved, projection,
                                *ctx.geometry, *ctx.feedback_args, mask)
        return _gradients(gradients, mask, 14)

    return backward


def register_linear_autograd(forward_name: str, backward_op) -> None:
    """torch.library's Python autograd for a linear forward op with fastfa::linear's schema, e.g.
    "fastfa::triton_linear" (on CPU and CUDA tensors, csrc/autograd.cpp's C++ kernel runs instead)."""
    torch.library.register_autograd(forward_name, linear_backward_formula(backward_op),
                                    setup_context=_linear_setup_context)


def register_conv2d_autograd(forward_name: str, backward_op) -> None:
    """torch.library's Python autograd for a conv2d forward op with fastfa::conv2d's schema, e.g.
    "fastfa::triton_conv2d" (on CPU and CUDA tensors, csrc/autograd.cpp's C++ kernel runs instead)."""
    torch.library.register_autograd(forward_name, conv2d_backward_formula(backward_op),
                                    setup_context=_conv2d_setup_context)




class _TritonOp:
    """A Triton op, defined on first use: importing its module imports triton, which reads
    TRITON_INTERPRET when the kernels are defined, so fastfa's own import must not do it."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name
        self.op = None

    def __call__(self):
        if self.op is None:
            importlib.import_module(f"fastfa.triton_kernels.{self.module}")
            self.op = getattr(torch.ops.fastfa, self.name)
        return self.op


# Forward op per backend (each forward op's autograd formula calls its own backward op).
# The overloads themselves: a packet's call resolves the overload on every call.
_LINEAR_OPS = {"aten": lambda: torch.ops.fastfa.linear.default, "triton": _TritonOp("linear", "triton_linear")}
_CONV2D_OPS = {"aten": lambda: torch.ops.fastfa.conv2d.default, "triton": _TritonOp("conv2d", "triton_conv2d")}


def _op_for(table: dict, kind: str, backend: str):
    load = table.get(backend)
    if load is None:
        _backend.record_fallback(kind, f"the {backend} backend has no {kind} op in this version")
        load = table["aten"]
    return load()


def linear_op(backend: str):
    """The forward op of ``backend`` for Linear (aten's where that backend has none, recorded)."""
    return _op_for(_LINEAR_OPS, "linear", backend)


def conv2d_op(backend: str):
    """The forward op of ``backend`` for Conv2d (aten's where that backend has none, recorded)."""
    return _op_for(_CONV2D_OPS, "conv2d", backend)


# The cuda backend's ops (pybind_src/ops_registration.cpp) have the aten ops' schemas, so the same
# fakes apply (their autograd is in C++, as the aten ops').
for _op, _fake in (("cuda_linear", _linear_fake), ("cuda_linear_backward", _linear_backward_fake),
                   ("cuda_conv2d", _conv2d_fake), ("cuda_conv2d_backward", _conv2d_backward_fake)):
    torch.library.register_fake(f"fastfa::{_op}", _fake)
_LINEAR_OPS["cuda"] = lambda: torch.ops.fastfa.cuda_linear.default
_CONV2D_OPS["cuda"] = lambda: torch.ops.fastfa.cuda_conv2d.default


def _direct_feedback_product_fake(error, rng, columns, scale, distribution, block_elements):
    # dfa's e B_l (fastfa.dfa): rows x columns in e's dtype, on e's device.
    return error.new_empty((error.shape[0], columns))


for _op in ("direct_feedback_product", "cuda_direct_feedback_product"):
    torch.library.register_fake(f"fastfa::{_op}", _direct_feedback_product_fake)
