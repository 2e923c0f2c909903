"""Direct feedback alignment (``dfa``): the model's output error sent straight to every layer.

learning-rules.md, "Direct feedback alignment" (Nøkland 2016; Launay et al. 2020):

    e      = dL/d(model output)            N x K   (or N x T x K: per-token outputs; an output
                                                    (N, *O) is flattened, K = prod(O))
    layer l with input x of shape (N, *S), F = prod(S)
    B_l    : K x F, fixed, element (k, f) = scale * xi(seed_l, step 0, index k * F + f)
    grad_x = reshape(e B_l, x.shape)       (per token: grad_x[n, t] = e[n, t] B_l, F = x.shape[-1])
    grad_W, grad_b from the delta that reaches the layer's output, as for every rule

B_l is fa's drawn R for a K x F matrix: the same Philox generator, keyed by the layer's seed
and the element's row-major index, with fa's ``init`` distributions taken with fan_in = K and
fan_out = F (B_l maps e, K wide, to x, F wide). It is never stored: the aten backend draws it
a block of columns at a time (a small B_l, at most CACHE_ELEMENTS, is kept on the layer) and the
Triton and cuda kernels draw its tiles inside the product, so a ResNet layer's K x C x H x W
matrix (3.2 GB in fp32 at ImageNet sizes) costs no memory.

How e reaches the layers. ``fastfa.convert(model, "dfa")`` puts a forward pre-hook and a
forward hook on the model. Each call of the model opens a *pass*; every dfa layer that runs
in it computes its output with the bp ops on a detached input (so its backward computes
grad_W and grad_b only, never delta W or delta B) and joins the input back through
:class:`_DirectFeedback`, whose backward is grad_x = e B_l; on plain CPU and CUDA tensors outside
torch.compile, the C++ node of pybind_src/direct_feedback_join.cpp instead, which calls the
chosen backend's product through the dispatcher (no Python in the backward on aten and cuda).
The forward hook registers a hook on the model's output tensor that stores e in the pass. Autograd runs a tensor's hooks before
anything that produced it, so e is stored before any layer's backward reads it.
"""

from __future__ import annotations

import functools
import math

import torch

from . import _C, _backend, functional, ops
from .rules import init_distribution, rule_spec

__all__ = ["attach", "direct_feedback", "feedback_weight", "DirectFeedbackContext"]

#: The aten backend draws B_l in blocks of at most this many elements (16 MiB in fp32), so the
#: projection's memory stays small whatever K x F is.
BLOCK_ELEMENTS = 1 << 22


def distribution_for(init: str, output_width: int, input_numel: int):
    """(Distribution, scale) of B_l's entries: fa's ``init`` with fan_in = K, fan_out = F."""
    # init_distribution reads a linear weight (out, in) as fan_out = out, fan_in = in.
    return init_distribution(init, (input_numel, output_width))


def direct_feedback(rng: torch.Tensor, rows: int, columns: int, column_begin: int, column_count: int,
                    scale: float, distribution: int, dtype: torch.dtype) -> torch.Tensor:
    """Columns [column_begin, column_begin + column_count) of B_l (rows x columns), on rng's device.

    rng is the layer's int64 [seed, step]; element (k, f) is keyed by k * columns + f, so a
    block is exactly the matching slice of the whole B_l. Drawn on rng's device (a CPU or CUDA
    kernel).
    """
    return torch.ops.fastfa.direct_feedback(rng, rows, columns, column_begin, column_count, scale, distribution,
                                            dtype)


class _Layout:
    """How one layer call meets the model's output: B_l's shape and how e's rows map to x's."""

    __slots__ = ("output_width", "input_numel", "input_shape", "scale", "distribution", "key")

    def __init__(self, output_width, input_numel, input_shape, scale, distribution, key):
        self.output_width, self.input_numel, self.input_shape = output_width, input_numel, input_shape
        self.scale, self.distribution = scale, distribution
        self.key = key  # (input shape, output shape, init) it was made for: reused while they hold


class _Pass:
    """One call of a converted model: the layer calls in it, and e once the backward reaches the output."""

    __slots__ = ("calls", "error", "native")

    def __init__(self):
        self.calls = []  # (_Call, input shape) in the order the layers ran
        self.error = None
        self.native = _C.DirectFeedbackPass()  # e for the C++ joins' backward


class _Call:
    """One dfa layer's call inside a pass: what its backward needs to project e."""

    __slots__ = ("layer", "record", "layout", "joined", "projection", "dtype", "backend")

    def __init__(self, layer, record: _Pass):
        self.layer, self.record, self.layout = layer, record, None
        self.joined = False  # linked into the autograd graph: its backward will need e
        self.projection = None  # a C++ join's _C.DirectFeedbackProjection, filled when the model's forward returns
        self.dtype = None  # the layer input's dtype: e B_l's
        self.backend = None  # a C++ join's product backend (product_backend), chosen in its forward


def _layout(layer, input_shape, output: torch.Tensor) -> _Layout:
    """B_l's shape for this input and model output (learning-rules.md: per sample, or per token);
    the layer's last one where the shapes and init are the same (every step of a training loop)."""
    key = (input_shape, output.shape, layer.feedback_init)
    previous = layer.__dict__.get("_direct_feedback_layout")
    if previous is not None and previous.key == key:
        return previous
    if output.dim() == 3 and len(input_shape) == 3 and tuple(input_shape[:2]) == tuple(output.shape[:2]):
        # per-token: grad_x[n, t] = e[n, t] B_l
        output_width, input_numel = output.shape[-1], input_shape[-1]
    elif len(input_shape) >= 1 and input_shape[0] == output.shape[0]:
        # per sample; an output with more axes (a conv's N x C x H x W) is e flattened, K = C*H*W
        output_width, input_numel = math.prod(output.shape[1:]), math.prod(input_shape[1:])
    else:
        raise RuntimeError(
            f"dfa: a layer's input of shape {tuple(input_shape)} does not match the model's output of shape "
            f"{tuple(output.shape)}: dfa needs an output (N, ...) with the layer's input (N, ...) (K and F the "
            f"per-sample numels), or an output (N, T, K) with the layer's input (N, T, F) (per-token)")
    distribution, scale = distribution_for(layer.feedback_init, output_width, input_numel)
    return _Layout(output_width, input_numel, tuple(input_shape), scale, int(distribution), key)


class _DirectFeedback(torch.autograd.Function):
    """output = the bp layer's output computed from a detached input; grad_x = e B_l.

    forward(output, input, call) returns output unchanged and links input into the graph;
    backward passes grad_output on to the bp op (grad_W, grad_b) and returns e B_l for input.
    """

    @staticmethod
    def forward(ctx, output, input, call):
        ctx.call = call
        ctx.input_dtype = input.dtype
        # Its data under a new history, not a view of it (an op's output may itself be a view,
        # and autograd forbids in-place ops on views made in a Function): so an in-place op after
        # the layer (ReLU(inplace=True)) is allowed, as after torch's own layers.
        return output.detach()

    @staticmethod
    def backward(ctx, grad_output):
        call = ctx.call
        grad_input = None
        if ctx.needs_input_grad[1]:
            error = call.record.error
            if error is None:
                raise RuntimeError(_missing_error(type(call.layer).__name__))
            grad_input = project(call.layer, error, call.layout, ctx.input_dtype)
        return grad_output, grad_input, None


@functools.cache
def _missing_error(layer_kind: str) -> str:
    return (f"dfa: the backward reached a dfa layer ({layer_kind}) but not the converted model's output: dfa needs "
            "e = dL/d(model output), so compute the loss from the output the converted model returned (a backward "
            "from an intermediate tensor has no e)")


#: A B_l of at most this many elements (256 KiB in fp32) is kept on its layer between backward
#: passes instead of drawn again: for the small layers of an MLP the draw cost more than the
#: product itself. Larger ones are drawn every time, never stored (the point of dfa's draw).
CACHE_ELEMENTS = 1 << 16


def project(layer, error: torch.Tensor, layout: _Layout, dtype: torch.dtype) -> torch.Tensor:
    """grad_x = reshape(e B_l, x's shape), with B_l drawn, never stored whole when large."""
    rows = error.reshape(-1, layout.output_width).to(dtype)
    backend = product_backend(rows.device)
    if backend == "aten" and _small(layout):
        return torch.mm(rows, _cached_feedback(layer, layout, rows.dtype)).reshape(layout.input_shape)
    product = _PRODUCTS[backend]()(rows, layer.feedback_rng, layout.input_numel, layout.scale, layout.distribution,
                                   BLOCK_ELEMENTS)
    return product.reshape(layout.input_shape)


def _small(layout: _Layout) -> bool:
    """Whether B_l is small enough to keep on its layer (aten's product)."""
    return layout.output_width * layout.input_numel <= min(CACHE_ELEMENTS, BLOCK_ELEMENTS)


def _triton_product():
    from .triton_kernels import direct_feedback  # registers fastfa::triton_direct_feedback_product
    return direct_feedback.direct_feedback_product


#: e B_l's op per backend, one schema (error, rng, columns, scale, distribution, block_elements):
#: aten draws B_l by blocks, then ATen's GEMM; cuda is drawn fa's fused GEMM and triton linear's
#: grad_input kernel, both drawing B_l's tiles inside the product (what they do not cover, e.g.
#: fp64, takes aten's, recorded). The C++ join numbers them as _PRODUCT_BACKENDS does.
_PRODUCTS = {"aten": lambda: torch.ops.fastfa.direct_feedback_product,
             "cuda": lambda: torch.ops.fastfa.cuda_direct_feedback_product,
             "triton": _triton_product}
_PRODUCT_BACKENDS = {"aten": 0, "cuda": 1, "triton": 2}


def product_backend(device: torch.device) -> str:
    """The backend of e B_l on device: the thread's backend; under "auto" on a GPU, a fused kernel."""
    backend = _backend.resolve(None, device)
    if device.type == "cuda" and _backend.get_backend() == "auto":
        backend = _auto_gpu_backend()
    return backend


@functools.cache
def _auto_gpu_backend() -> str:
    """e B_l's backend under "auto" on a GPU: a fused kernel draws B_l inside the product, where
    aten writes and reads every block of it. Looked up once (the statuses cost more than a small
    layer's backward, and what was built and installed does not change in a process)."""
    statuses = _backend.backends()
    return next((name for name in ("cuda", "triton") if statuses[name].usable), "aten")


def _cached_feedback(layer, layout: _Layout, dtype: torch.dtype) -> torch.Tensor:
    """The layer's small B_l, drawn once per (seed tensor and its version, shape, init, dtype)."""
    rng = layer.feedback_rng
    # The rng tensor itself (kept alive here, so never confused with a new one at its address)
    # and its version: load_state_dict writes new seeds in place, which bumps the version.
    key = (rng._version, layout.output_width, layout.input_numel, layout.scale, layout.distribution, dtype)
    cached = layer.__dict__.get("_direct_feedback_cache")
    if cached is None or cached[0] is not rng or cached[1] != key:
        block = direct_feedback(rng, layout.output_width, layout.input_numel, 0, layout.input_numel, layout.scale,
                                layout.distribution, dtype)
        cached = (rng, key, block)
        layer.__dict__["_direct_feedback_cache"] = cached
    return cached[2]


class DirectFeedbackContext:
    """Per converted model: the pass of the model call now running (None outside a call)."""

    def __init__(self):
        self.current = None
        self.handles = []
        self._outer = []  # a model called inside its own forward resumes the outer pass after

    def open(self, module, args):
        self._outer.append(self.current)
        self.current = _Pass()

    def close(self, module, args, output):
        record, self.current = self.current, self._outer.pop()
        # Only a call linked into the graph needs e; a forward without grad (evaluation) is
        # refused nothing, whatever the model returns.
        needs_error = any(call.joined for call, _ in record.calls)
        if not isinstance(output, torch.Tensor) or output.dim() < 1:
            if needs_error:
                raise TypeError(
                    "dfa: the converted model must return a tensor (N, ...) (its output, whose gradient "
                    f"e = dL/d(output) every dfa layer receives); {type(module).__name__} returned "
                    + (f"a tensor of shape {tuple(output.shape)}" if isinstance(output, torch.Tensor)
                       else type(output).__name__))
            return
        for call, input_shape in record.calls:
            try:
                call.layout = _layout(call.layer, input_shape, output)
            except RuntimeError:
                if needs_error:
                    raise
                continue
            call.layer.__dict__["_direct_feedback_layout"] = call.layout
            if call.projection is not None:
                _set_projection(call)
        if needs_error and output.requires_grad:
            if all(call.projection is not None for call, _ in record.calls if call.joined):
                _C.direct_feedback_capture(output, record.native)  # only C++ joins: no Python in the backward
                return

            def keep_error(grad, record=record):
                record.error = record.native.error = grad.detach()
            output.register_hook(keep_error)


def _set_projection(call: _Call) -> None:
    """What a C++ join's backward reads: B_l's shape, its backend, and on aten the small B_l itself
    (as project's aten path)."""
    layer, layout = call.layer, call.layout
    cached = _cached_feedback(layer, layout, call.dtype) if call.backend == "aten" and _small(layout) else None
    call.projection.set(cached, layer.feedback_rng, layout.output_width, layout.input_numel, layout.scale,
                        layout.distribution, BLOCK_ELEMENTS, list(layout.input_shape),
                        _PRODUCT_BACKENDS[call.backend])


_BACKPROP = rule_spec("bp")
#: Where a dfa layer keeps its resolved bp op call (fastfa.nn's FeedbackLayer._resolve_call), apart
#: from the layer's own: that one would skip the join below.
RESOLVED_CALL = "_resolved_direct_feedback_call"


def _bp_arguments(layer) -> tuple:
    """(rule, scale, distribution, alignment, activation) of the bp op a dfa layer's forward runs."""
    _, scale, distribution, alignment, activation = layer._op_options()
    return int(_BACKPROP.id), scale, distribution, alignment, activation


def linear_forward(layer, input: torch.Tensor) -> torch.Tensor:
    """A dfa fastfa.nn.Linear's forward: bp's op on the detached input, joined through e B_l.
    The op call is resolved once (a LayerCall, as every rule's layer), after a checked call."""
    weight, bias, detached = layer.weight, layer.bias, input.detach()
    call = layer._call(weight, slot=RESOLVED_CALL)
    output = None if call is None else layer._fast_forward(call, detached, weight, bias)
    if output is None:
        arguments = _bp_arguments(layer)
        output = functional._linear(detached, weight, bias, None, None, _BACKPROP, *arguments[1:])
        layer._resolve_call(weight, ops.linear_op, arguments, slot=RESOLVED_CALL, spec=_BACKPROP)
    return _join(layer, input, output)


def conv2d_forward(layer, input: torch.Tensor) -> torch.Tensor:
    """A dfa fastfa.nn.Conv2d's forward: as torch.nn.Conv2d's (padding modes pad first) on the
    detached input; B_l maps e to the layer's own input, before any padding. A batched input with
    zero padding and an even "same" padding takes the resolved op call, as fastfa.nn.Conv2d's."""
    weight, bias, detached = layer.weight, layer.bias, input.detach()
    key = (layer.stride, layer.padding, layer.dilation, layer.groups, layer.padding_mode)
    if isinstance(layer.padding, str):
        key += (weight.shape,)
    call = layer._call(weight, key, slot=RESOLVED_CALL)
    output = None if call is None else layer._fast_forward(call, detached, weight, bias)
    if output is not None:
        return _join(layer, input, output)
    padded, padding = detached, layer.padding
    if layer.padding_mode != "zeros":
        padded = torch.nn.functional.pad(padded, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
        padding = (0, 0)
    arguments = _bp_arguments(layer)
    output = functional._conv2d(padded, weight, bias, layer.stride, padding, layer.dilation, layer.groups, None, None,
                                _BACKPROP, *arguments[1:], geometry=layer._geometry(padding))
    if layer.padding_mode == "zeros" and input.dim() == 4:
        stride, padding, extra, dilation, groups = layer._geometry(layer.padding)
        if extra == (0, 0):
            layer._resolve_call(weight, ops.conv2d_op, (stride, padding, dilation, groups, *arguments), key,
                                slot=RESOLVED_CALL, spec=_BACKPROP)
    return _join(layer, input, output)


def conv1d_forward(layer, input: torch.Tensor) -> torch.Tensor:
    """A dfa fastfa.nn.Conv1d's forward: its conv2d over a unit height, as bp (padding modes pad
    first), on the detached input; B_l maps e to the layer's own (C_in, L) input, before padding."""
    padded, padding = input.detach(), layer.padding
    if layer.padding_mode != "zeros":
        padded = torch.nn.functional.pad(padded, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
        padding = (0,)
    if not isinstance(padding, str):
        padding = (0, padding[0])
    _, scale, distribution, alignment, activation = layer._op_options()
    output = functional._conv2d(padded.unsqueeze(-2), layer.weight.unsqueeze(2), layer.bias, (1, layer.stride[0]),
                                padding, (1, layer.dilation[0]), layer.groups, None, None, _BACKPROP, scale,
                                distribution, alignment, activation)
    return _join(layer, input, output.squeeze(-2))


def _join(layer, input: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """Inside a dfa layer's forward: link input to output through e B_l (see the module docstring)."""
    context = layer.__dict__.get("_direct_feedback_context")
    record = None if context is None else context.current
    if record is None:
        raise RuntimeError(
            f"dfa: a dfa {type(layer).__name__} ran outside a converted model's call: its grad_input is "
            "e = dL/d(model output) times B_l, which only a model converted with fastfa.convert(model, 'dfa') "
            "and called as model(x) provides")
    call = _Call(layer, record)
    record.calls.append((call, tuple(input.shape)))
    if not (torch.is_grad_enabled() and input.requires_grad):
        return output
    call.joined = True
    if _joins_in_cpp(input, output):
        call.projection, call.dtype = _C.DirectFeedbackProjection(), input.dtype
        call.backend = product_backend(input.device)
        if call.backend == "triton":
            _triton_product()  # its op, which the node looks up in the dispatcher, registered
        arguments = (output, input, record.native, call.projection, _missing_error(type(layer).__name__))
        if torch._C._is_torch_function_mode_enabled():
            # The mode sees the join as one call (as it saw the Python Function's detach).
            return torch.overrides.handle_torch_function(_native_join, (output, input), *arguments)
        return _C.direct_feedback_join(*arguments)
    return _DirectFeedback.apply(output, input, call)


def _native_join(output, input, native_pass, projection, missing_error):
    """The C++ join (pybind_src/direct_feedback_join.cpp): output with a new history whose node sends
    grad_output on to output and reshape(e B_l, input's shape) to input."""
    return _C.direct_feedback_join(output, input, native_pass, projection, missing_error)


def _joins_in_cpp(input: torch.Tensor, output: torch.Tensor) -> bool:
    """Whether the join can be the C++ node (no Python Function in the backward): plain CPU and CUDA
    tensors, on every backend, outside torch.compile (which traces the Python Function). A tensor
    subclass keeps the Python Function (its __torch_function__ sees the join's detach)."""
    return (type(input) is torch.Tensor and type(output) is torch.Tensor and input.device.type in ("cpu", "cuda")
            and not torch.compiler.is_compiling())


def attach(model: torch.nn.Module, layers) -> torch.nn.Module:
    """Give ``model`` the hooks that capture e, and each dfa layer in ``layers`` the model's context."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    context = model.__dict__.get("_direct_feedback_context")
    if context is None:
        context = DirectFeedbackContext()
        context.handles = [model.register_forward_pre_hook(context.open),
                           model.register_forward_hook(context.close)]
        model.__dict__["_direct_feedback_context"] = context
    for layer in layers:
        layer.__dict__["_direct_feedback_context"] = context
    return model


@torch.no_grad()
def feedback_weight(layer) -> torch.Tensor:
    """B_l (K x F) of the layer's last forward, materialised."""
    layout = layer.__dict__.get("_direct_feedback_layout")
    if layout is None:
        raise RuntimeError("dfa: B_l's shape (K x F) is known once the converted model has run forward: "
                           "call model(x) first")
    return direct_feedback(layer.feedback_rng, layout.output_width, layout.input_numel, 0, layout.input_numel,
                           layout.scale, layout.distribution, layer.weight.dtype)

