"""Drop-in layers: torch.nn.Linear / Conv1d / Conv2d / MultiheadAttention whose backward follows a learning rule.

The modules subclass torch's, so ``weight`` and ``bias`` are the usual Parameters,
isinstance checks hold and the parent's state_dict keys are unchanged. The rule's own
state is added to the state_dict: ``feedback`` (R for fa and frsf, a buffer; the learned
B for kp, wm, sa, aa, ia, a Parameter) and ``feedback_rng`` (int64 [seed, step], for brsf
and wm; [seed, 0] for dfa's B_l), so that saving and loading a model reproduces the next backward pass exactly.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from . import _C, _backend
from . import amp as _amp
from . import dfa as _dfa
from . import functional as F
from . import ops as _ops
from .alignment import OPTIONS as PIPELINE_OPTIONS
from .alignment import layer_options, op_alignment, split_options
from .ops import feedback_transform
from .rules import RMS_SCALE, Distribution, Rule, rule_spec

__all__ = ["Linear", "Conv1d", "Conv2d", "MultiheadAttention", "FeedbackLayer"]


def _fresh_seed() -> int:
    # From torch's generator, so torch.manual_seed makes models reproducible.
    return int(torch.randint(0, 2**62, (), dtype=torch.int64).item())


def _op_option(name: str) -> property:
    """A rule option the op reads every call: kept resolved (FeedbackLayer._op_options) until it is set."""
    stored = "_" + name

    def get(self):
        return self.__dict__[stored]

    def set(self, value):
        self.__dict__[stored] = value
        self.__dict__.pop("_resolved_op_options", None)
        self.__dict__.pop("_resolved_call", None)
        self.__dict__.pop(_dfa.RESOLVED_CALL, None)

    return property(get, set)


# The backends whose ops check every argument in C++ before any kernel runs (csrc/aten_backend.cpp,
# csrc/cuda): a module may call them without functional's checks, which then only explain a refusal.
_CHECKED_IN_CPP = frozenset(("aten", "cuda"))


def _member(module: torch.nn.Module, name: str):
    """``module.<name>`` for a parameter or buffer, as nn.Module.__getattr__ finds it, without that
    Python call (0.6 µs, four times per forward); anything else (a parametrization's property) by getattr."""
    parameters = module._parameters
    if name in parameters:
        return parameters[name]
    buffers = module._buffers
    if name in buffers:
        return buffers[name]
    return getattr(module, name)


class _ResolvedCall(NamedTuple):
    """A layer's forward op call for one backend and device: the C++ LayerCall, which keeps the op and
    its static arguments, and what decides whether it still applies and which tensors it takes."""

    backend: str  # the thread's choice it was resolved under (_backend.get_backend())
    device: torch.device  # weight's device
    layer_call: object  # fastfa._C.LayerCall: the op and its static arguments, called with the tensors
    takes_feedback: bool  # whether the rule reads a stored feedback tensor
    draws: bool  # whether the rule reads [seed, step] (brsf, wm)
    key: tuple  # what else the arguments were resolved from (conv2d's geometry)


class FeedbackLayer:
    """What fastfa.nn.Linear and fastfa.nn.Conv2d share: the rule, its state, its measures."""

    _takes_direct_feedback = False  # dfa's e B_l (fastfa.dfa): Linear, Conv1d and Conv2d

    @property
    def _layer_kind(self) -> str:
        return f"fastfa.nn.{type(self).__name__}"

    rule: str
    activation = _op_option("activation")
    feedback_scale = _op_option("feedback_scale")
    feedback_distribution = _op_option("feedback_distribution")
    alignment_options = _op_option("alignment_options")
    # A resolved call of aa / ia may compute the pipeline's normalize_input in the op (alignment.op_alignment).
    alignment_pipeline = _op_option("alignment_pipeline")

    def _forget_resolved(self) -> None:
        """Drop the arguments resolved for the op: after ``_spec`` is swapped (fastfa.metrics runs
        a backprop pass through the same layers), the next call resolves them again."""
        self.__dict__.pop("_resolved_op_options", None)
        self.__dict__.pop("_resolved_call", None)
        self.__dict__.pop(_dfa.RESOLVED_CALL, None)

    def _op_options(self) -> tuple:
        """(rule, scale, distribution, alignment, activation) as the op takes them, resolved once."""
        options = self.__dict__.get("_resolved_op_options")
        if options is None:
            options = (int(self._spec.id), float(self.feedback_scale), int(self.feedback_distribution),
                       self.alignment_options, self.activation)
            self.__dict__["_resolved_op_options"] = options
        return options

    def _call(self, weight, key=(), slot="_resolved_call"):
        """The resolved call for this forward, or None where it must take functional's checked path:
        the first call, a changed backend, device or option, torch.compile (which traces the checked path), a torch function mode (the LayerCall enters
        the dispatcher below it), a backend that does not check in C++."""
        call = self.__dict__.get(slot)
        if (call is None or call.backend != _backend.get_backend() or call.device != weight.device
                or call.key != key or torch.compiler.is_compiling()
                or torch._C._is_torch_function_mode_enabled()):
            return None
        return call

    def _resolve_call(self, weight, op_for, arguments: tuple, key=(), slot="_resolved_call", spec=None) -> None:
        """After a call that took the checked path: remember its op and arguments for the next ones.
        slot, spec: where to keep it and the rule it runs (dfa's layers keep their bp call apart)."""
        if torch.compiler.is_compiling():
            return
        backend = _backend.get_backend()
        name = _backend.resolve(None, weight.device)
        if self.alignment_pipeline is not None or self.alignment_coefficients is not None:
            # The alignment pipeline and scheduled coefficients run through functional's aten path,
            # except the pipeline the aten op computes in closed form (aa's and ia's default).
            closed_form = op_alignment(self._spec, self.alignment_pipeline, self.alignment_coefficients,
                                       self.alignment_options)
            if closed_form is None or name != "aten":
                return
            arguments = (*arguments[:-2], closed_form, arguments[-1])
        if name not in _CHECKED_IN_CPP:
            return
        spec, op = spec or self._spec, op_for(name)
        make = _C.LayerCall.linear if op_for is _ops.linear_op else _C.LayerCall.conv2d
        self.__dict__[slot] = _ResolvedCall(
            backend, weight.device, make(op._name, *arguments, draws=spec.draws_every_step),
            takes_feedback=spec.id in F._TAKES_FEEDBACK, draws=spec.draws_every_step, key=key)

    def _fast_forward(self, call, input, weight, bias):
        """One call into the resolved LayerCall (which advances brsf's and wm's [seed, step] in place,
        as _step_rng and _advance_rng do); None where the op refused the call, so that the checked
        path can say why (the C++ checks run before any kernel, so nothing has changed)."""
        feedback = _member(self, "feedback")
        if (feedback is not None and not call.takes_feedback) or type(input) is not torch.Tensor:
            return None  # a Tensor subclass's __torch_function__ runs on the checked path
        # Autocast itself is the LayerCall's (it casts as functional does); here only fastfa.amp's
        # loss-scaling node on B, or its warning under fp16 autocast without a fastfa scaler.
        if self._spec.estimates_feedback:
            if _amp.enabled:
                feedback = _amp.for_loss_scaling(feedback, self._spec, self.alignment_options)
            elif torch._C._is_any_autocast_enabled():
                _amp._warn_without_scaler(self._spec, weight.device.type)
        try:
            return call.layer_call(input, weight, bias, feedback, _member(self, "feedback_rng") if call.draws else None)
        except (RuntimeError, TypeError, ValueError):
            return None

    def __getstate__(self):
        # The resolved call holds a C++ object that neither pickles nor deepcopies; the next
        # forward resolves it again (deepcopy, torch.save of a whole module).
        state = super().__getstate__()
        return {key: value for key, value in state.items() if not key.startswith("_resolved_")}

    def _setup_feedback(self, rule, activation, scale, init, seed, alignment_options) -> None:
        # aa and ia layers normalise their alignment input unless told otherwise (alignment.LAYER_DEFAULTS).
        alignment_options = layer_options(rule, alignment_options)
        unknown = sorted(set(alignment_options) - {"alpha", "beta", "gamma", "sigma", *PIPELINE_OPTIONS})
        if unknown:
            raise TypeError(f"{self._layer_kind}() got an unexpected keyword argument {unknown[0]!r}; the "
                            f"alignment pipeline's switches are {', '.join(PIPELINE_OPTIONS)}")
        if rule_spec(rule).direct_feedback and not self._takes_direct_feedback:
            # Attention's projections have no e B_l path yet: refuse rather than run bp silently.
            raise ValueError(f"{self._layer_kind}: rule 'dfa' is available for fastfa.nn.Linear, Conv1d and Conv2d "
                             "only; use another rule here, or keep this layer on backprop (convert's exclude=)")
        alignment_options, pipeline = split_options(rule_spec(rule), alignment_options)
        #: The alignment pipeline's switches (fastfa.alignment.Pipeline), None when all are off.
        self.alignment_pipeline = pipeline
        # [alpha, beta, gamma] as a tensor while a schedule (fastfa.schedules) drives them, else None.
        self.register_buffer("alignment_coefficients", None, persistent=False)
        options = {"scale": scale, "init": init, "seed": seed, **alignment_options}
        spec, feedback_scale, distribution, alignment, _ = F.feedback_arguments(
            rule, tuple(self.weight.shape), self.weight.device, options)
        #: [alpha, beta, gamma, sigma] of the estimated rules' B gradient.
        self.alignment_options = alignment
        self._spec = spec
        self.rule = spec.name
        self.activation = F.canonical_activation(activation)
        self.feedback_scale = feedback_scale
        self.feedback_distribution = Distribution(distribution)
        # R's init distribution, for the rules that draw R (fa, brsf, frsf).
        # dfa defaults to xavier, as BioTorch's dfa: B_l's scale then shrinks with the width F of
        # the layer's input (with kaiming's 1/sqrt(K) alone, AlexNet's wide layers diverge).
        default_init = "xavier" if spec.direct_feedback else "kaiming"
        self.feedback_init = (default_init if init is None else init) if "init" in spec.options else None
        needs_seed = spec.stores_feedback or spec.draws_every_step or spec.direct_feedback
        seed = (_fresh_seed() if seed is None else seed) if needs_seed else None
        if spec.stores_feedback:
            # R is drawn once, from (seed, step 0), by the same generator brsf uses each step,
            # so the same seed gives the same R on every device.
            rng = torch.tensor([seed, 0], dtype=torch.int64, device=self.weight.device)
            with torch.no_grad():
                feedback = feedback_transform(self.weight.detach(), None, rng, int(Rule.FA), feedback_scale,
                                              int(distribution))
            if spec.estimates_feedback:
                # B learns: a Parameter, so optimizers, schedules, clipping, GradScaler and DDP
                # treat it like W. It starts as a random R from the init distribution.
                self.feedback = torch.nn.Parameter(feedback)
            else:
                self.register_buffer("feedback", feedback)
            # The stored R carries its scale; the op's scale applies only to drawn feedback.
            self.feedback_scale = 1.0
        else:
            self.register_buffer("feedback", None)
        if spec.draws_every_step or spec.direct_feedback:
            # dfa: B_l is drawn from [seed, step 0] whenever a backward needs it; its step never moves.
            self.register_buffer("feedback_rng", torch.tensor([seed, 0], dtype=torch.int64,
                                                              device=self.weight.device))
        else:
            self.register_buffer("feedback_rng", None)

    def _step_rng(self):
        """The [seed, step] this forward's backward reads: a copy of the layer's counter where
        the forward records a backward, so the counter can move on in place (_advance_rng)
        while the copy is never written again, even if another forward runs before that
        backward. (Under torch.compile the counter itself: it moves on out of place there.)"""
        rng = self.feedback_rng
        if rng is None or not torch.is_grad_enabled() or torch.compiler.is_compiling():
            return rng
        return rng.clone()

    def _advance_rng(self) -> None:
        """After a forward whose backward will read [seed, step]: the layer's counter moves on.

        In place, on the counter's device: a captured CUDA graph's replay advances it too (a
        new tensor assigned from the host would be frozen into the graph); and after the op,
        so that a refused call leaves the counter as it was. Under torch.compile, out of place
        (the compiled module's wrapper applies the new buffer each call): inductor may hand the
        backward the mutated counter where the forward saved a copy of it.
        """
        rng = self.feedback_rng
        if rng is None or not torch.is_grad_enabled():
            return
        if torch.compiler.is_compiling():
            self.feedback_rng = torch.cat([rng[:1], rng[1:] + 1])
        else:
            rng.select(0, 1).add_(1)

    def _state_problems(self, state_dict, prefix: str, strict: bool) -> list:
        """What is wrong with this layer's entries of state_dict, before anything is copied."""
        own = {**self._parameters,
               **{k: v for k, v in self._buffers.items() if k not in self._non_persistent_buffers_set}}
        own = {name: value for name, value in own.items() if value is not None}
        problems = []
        for name, current in own.items():
            value = state_dict.get(prefix + name)
            if value is None:
                if strict:
                    problems.append(f'Missing key(s) in state_dict: "{prefix + name}"')
                continue
            if not isinstance(value, torch.Tensor) or value.shape != current.shape:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                problems.append(f"size mismatch for {prefix + name}: got {shape}, this {self.rule} layer has "
                                f"{tuple(current.shape)}")
            elif name == "feedback_rng" and value.dtype != torch.int64:
                problems.append(f"{prefix + name} must be int64 [seed, step], got {value.dtype}")
        if strict:
            problems += [f'Unexpected key(s) in state_dict: "{key}"' for key in state_dict
                         if key.startswith(prefix) and "." not in key[len(prefix):] and key[len(prefix):] not in own]
        return problems

    def _refuse(self, problems) -> None:
        if problems:
            raise RuntimeError(f"Error(s) in loading state_dict for {type(self).__name__}: " + "; ".join(problems))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        # A refused state_dict leaves the layer as it was: torch would copy weight and bias
        # before it reports a missing or bad feedback.
        self._refuse(self._state_problems(state_dict, "", strict))
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Inside a model (torch passes strict=True here whatever the caller asked, and checks
        # keys afterwards): refuse a bad shape, or a non-integer [seed, step] that a copy would
        # silently truncate, before this layer's tensors are touched.
        self._refuse(self._state_problems(state_dict, prefix, strict=False))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _feedback_op_args(self):
        return self._op_options()[:3]

    @torch.no_grad()
    def feedback_weight(self) -> torch.Tensor:
        """The B that the next backward pass will use, materialised (shape of weight).

        bp: W; fa: R; usf: s*sign(W); brsf: |R_t|*sign(W) for the coming step's draw;
        frsf: |R|*sign(W); kp, wm, sa, aa, ia: the learned B; dfa: B_l (K x F, not W's shape)
        of the last forward through the converted model.
        """
        if self._spec.direct_feedback:
            return _dfa.feedback_weight(self)
        feedback = None if self.feedback is None else self.feedback.detach()
        return feedback_transform(self.weight.detach(), feedback, self.feedback_rng, *self._feedback_op_args())

    @torch.no_grad()
    def alignment(self) -> float:
        """The angle in degrees between B (``feedback_weight()``) and W, flattened.

        NaN for dfa: B_l (K x F) is not shaped like W, so there is no angle between them.
        """
        if self._spec.direct_feedback:
            return math.nan
        return F._angle_degrees(self.feedback_weight(), self.weight)

    def _feedback_repr(self) -> str:
        text = f"rule={self.rule}"
        if self.activation != "none":
            text += f", activation={self.activation}"
        if self._spec.id == Rule.USF:
            text += ", scale=rms" if self.feedback_scale == RMS_SCALE else f", scale={self.feedback_scale:.4g}"
        if self.feedback_init is not None:
            text += f", init={self.feedback_init}"
        if self._spec.estimates_feedback:
            names = ("alpha", "beta", "gamma", "sigma")
            text += "".join(f", {name}={value:g}" for name, value in zip(names, self.alignment_options)
                            if name in self._spec.options)
        if self.alignment_pipeline is not None:
            text += "".join(f", {name}={value}" for name, value in self.alignment_pipeline.on().items())
        return text


class Linear(FeedbackLayer, torch.nn.Linear):
    """y = activation(x W^T + b) whose backward uses the rule's feedback B instead of W.

    Args: as torch.nn.Linear, plus keyword-only ``rule`` (one of fastfa.RULES, default
    "usf"), ``activation`` (None, "relu", "gelu", "gelu_tanh", "silu", "tanh", "sigmoid"),
    ``scale`` (usf: "rms" default, ||W||/sqrt(numel) at each step; "xiao", Xiao et al.'s; "xavier",
    "kaiming" or a number), ``init`` (R's
    distribution for fa, brsf, frsf, and B's start for the estimated rules: "kaiming"
    default, "xavier", "xiao"), ``seed``, and ``alpha`` / ``beta`` / ``gamma`` / ``sigma``
    for the estimated rules kp, wm, sa, aa, ia (defaults in fastfa.rules), and for wm, aa, ia
    the alignment pipeline's switches (fastfa.alignment.OPTIONS). aa and ia layers default to
    ``normalize_input=True`` (fastfa.alignment.LAYER_DEFAULTS: their B blows up on large inputs
    otherwise); ``normalize_input=False`` is the paper's configuration.
    Input (*, in_features) -> output (*, out_features).
    """

    _takes_direct_feedback = True

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 rule: str = "usf", activation=None, scale=None, init=None, seed=None, alpha=None, beta=None,
                 gamma=None, sigma=None, **pipeline):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._setup_feedback(rule, activation, scale, init, seed,
                             dict(alpha=alpha, beta=beta, gamma=gamma, sigma=sigma, **pipeline))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        weight, bias = _member(self, "weight"), _member(self, "bias")
        call = self._call(weight)
        if call is not None:
            output = self._fast_forward(call, input, weight, bias)
            if output is not None:
                return output
        if self._spec.direct_feedback:
            return _dfa.linear_forward(self, input)
        options = self._op_options()
        _, scale, distribution, alignment, activation = options
        output = F._linear(input, weight, bias, self.feedback, self._step_rng(), self._spec, scale,
                           distribution, alignment, activation, pipeline=self.alignment_pipeline,
                           coefficients=self.alignment_coefficients)
        self._advance_rng()
        self._resolve_call(weight, _ops.linear_op, options)
        return output

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._feedback_repr()}"


class Conv2d(FeedbackLayer, torch.nn.Conv2d):
    """conv2d whose backward sends the error through the rule's feedback B instead of W.

    Args: as torch.nn.Conv2d (stride, padding including "same" / "valid", dilation,
    groups, bias, padding_mode "zeros" / "reflect" / "replicate" / "circular"), plus the
    keyword-only ``rule``, ``activation``, ``scale``, ``init``, ``seed`` of :class:`Linear`.
    Input (N, C_in, H, W) or (C_in, H, W), NCHW or channels_last.
    """

    _takes_direct_feedback = True

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None, *,
                 rule: str = "usf", activation=None, scale=None, init=None, seed=None, alpha=None, beta=None,
                 gamma=None, sigma=None, **pipeline):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device=device, dtype=dtype)
        self._setup_feedback(rule, activation, scale, init, seed,
                             dict(alpha=alpha, beta=beta, gamma=gamma, sigma=sigma, **pipeline))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self._spec.direct_feedback:
            return _dfa.conv2d_forward(self, input)
        weight, bias = _member(self, "weight"), _member(self, "bias")
        # The arguments are resolved from these (tuples, replaced when set): "same" padding from
        # the kernel's size too.
        key = (self.stride, self.padding, self.dilation, self.groups, self.padding_mode)
        if isinstance(self.padding, str):
            key += (weight.shape,)
        call = self._call(weight, key)
        if call is not None:
            output = self._fast_forward(call, input, weight, bias)
            if output is not None:
                return output
        output = self._checked_forward(input)
        if self.padding_mode == "zeros" and input.dim() == 4:
            # The op pads evenly: another mode, or "same" padding's extra row / column, and an
            # unbatched input keep taking the checked path, which pads and batches.
            stride, padding, extra, dilation, groups = self._geometry(self.padding)
            if extra == (0, 0):
                self._resolve_call(weight, _ops.conv2d_op, (stride, padding, dilation, groups, *self._op_options()),
                                   key)
        return output

    def _checked_forward(self, input: torch.Tensor) -> torch.Tensor:
        padding = self.padding
        if self.padding_mode != "zeros":
            # As torch.nn.Conv2d: pad by the mode, then a convolution without padding.
            input = torch.nn.functional.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = (0, 0)
        _, scale, distribution, alignment, activation = self._op_options()
        output = F._conv2d(input, self.weight, self.bias, self.stride, padding, self.dilation, self.groups,
                           self.feedback, self._step_rng(), self._spec, scale, distribution, alignment,
                           activation, geometry=self._geometry(padding), pipeline=self.alignment_pipeline,
                           coefficients=self.alignment_coefficients)
        self._advance_rng()
        return output

    def _geometry(self, padding):
        """The checked geometry (functional.layer_geometry), resolved again only when the layer's
        stride, padding, dilation, groups or weight shape change."""
        key = (self.stride, padding, self.dilation, self.groups, self.weight.shape)
        cached = self.__dict__.get("_resolved_geometry")
        if cached is None or cached[0] != key:
            cached = (key, F.layer_geometry(self.weight.shape, self.stride, padding, self.dilation, self.groups))
            self.__dict__["_resolved_geometry"] = cached
        return cached[1]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._feedback_repr()}"


class Conv1d(FeedbackLayer, torch.nn.Conv1d):
    """conv1d whose backward sends the error through the rule's feedback B instead of W.

    Args: as torch.nn.Conv1d (stride, padding including "same" / "valid", dilation, groups,
    bias, padding_mode), plus the keyword-only options of :class:`Linear` (the alignment pipeline's
    switches and their defaults too). Input (N, C_in, L)
    or (C_in, L). It runs as a Conv2d over a unit height, so every backend's conv2d op (and
    its rule) serves it; weight and feedback keep torch's Conv1d shape (C_out, C_in/groups, k).
    """

    _takes_direct_feedback = True

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None, *,
                 rule: str = "usf", activation=None, scale=None, init=None, seed=None, alpha=None, beta=None,
                 gamma=None, sigma=None, **pipeline):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device=device, dtype=dtype)
        self._setup_feedback(rule, activation, scale, init, seed,
                             dict(alpha=alpha, beta=beta, gamma=gamma, sigma=sigma, **pipeline))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not isinstance(input, torch.Tensor) or input.dim() not in (2, 3):
            shape = tuple(input.shape) if isinstance(input, torch.Tensor) else type(input).__name__
            raise ValueError(f"input must be (N, C_in, L) or (C_in, L) for Conv1d, got {shape}")
        if input.shape[-2] != self.in_channels:
            raise ValueError(f"input must have in_channels={self.in_channels} channels, got input of shape "
                             f"{tuple(input.shape)}")
        if self._spec.direct_feedback:
            return _dfa.conv1d_forward(self, input)
        padding = self.padding
        if self.padding_mode != "zeros":
            input = torch.nn.functional.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = (0,)
        if not isinstance(padding, str):
            padding = (0, padding[0])
        feedback = None if self.feedback is None else self.feedback.unsqueeze(2)
        _, scale, distribution, alignment, activation = self._op_options()
        output = F._conv2d(input.unsqueeze(-2), self.weight.unsqueeze(2), self.bias, (1, self.stride[0]), padding,
                           (1, self.dilation[0]), self.groups, feedback, self._step_rng(), self._spec, scale,
                           distribution, alignment, activation, pipeline=self.alignment_pipeline,
                           coefficients=self.alignment_coefficients)
        self._advance_rng()
        return output.squeeze(-2)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._feedback_repr()}"


def _stream(rng, index: int, count: int):
    """[seed, step * count + index]: projection slice `index` of `count` run as separate ops (packed
    weights with distinct inputs) draws from its own stream at every step, so that brsf's R_t or
    wm's noise is not the same pattern for q, k and v."""
    if rng is None or count == 1:
        return rng
    return rng * rng.new_tensor([1, count]) + rng.new_tensor([0, index])


class _Projection(FeedbackLayer, torch.nn.Module):
    """The rule's state (R or B, [seed, step]) for one input projection of a MultiheadAttention.

    The weight stays the attention layer's own Parameter (in_proj_weight or q/k/v_proj_weight),
    so torch's state_dict keys are unchanged; this adds ``<name>.feedback`` and
    ``<name>.feedback_rng``, and metrics see the projection as a FeedbackLayer.
    """

    _layer_kind = "fastfa.nn.MultiheadAttention"

    def __init__(self, owner: torch.nn.Module, weight_name: str, rule: str, scale, init, seed, alignment_options):
        super().__init__()
        # Not a submodule (the attention layer owns this one): read, never registered.
        self.__dict__["_owner"] = owner
        self.weight_name = weight_name
        self._setup_feedback(rule, None, scale, init, seed, alignment_options)

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.__dict__["_owner"], self.weight_name)

    def project(self, input, rows: slice, bias, rng):
        """input W[rows]^T + bias through the rule, B[rows] on the way back."""
        weight, feedback = self.weight, self.feedback
        if rows != slice(None):
            weight = weight[rows]
            feedback = None if feedback is None else feedback[rows]
        _, scale, distribution, alignment, activation = self._op_options()
        return F._linear(input, weight, bias, feedback, rng, self._spec, scale, distribution, alignment, activation,
                         pipeline=self.alignment_pipeline, coefficients=self.alignment_coefficients)

    def extra_repr(self) -> str:
        return f"{self.weight_name} {tuple(self.weight.shape)}, {self._feedback_repr()}"


class MultiheadAttention(torch.nn.MultiheadAttention):
    """torch.nn.MultiheadAttention whose q / k / v and output projections follow a learning rule.

    Args: as torch.nn.MultiheadAttention, plus the keyword-only ``rule``, ``scale``, ``init``,
    ``seed``, ``alpha`` / ``beta`` / ``gamma`` / ``sigma`` and the alignment pipeline's switches
    of :class:`Linear` (no activation), for every projection.
    The packed in_proj_weight is one projection with one feedback state (``in_proj``); with
    kdim or vdim other than embed_dim, ``q_proj``, ``k_proj`` and ``v_proj`` each have their
    own; ``out_proj`` is a fastfa :class:`Linear`. With ``seed=s`` they get s, s + 1, ...
    in that order (out_proj last). Where query, key and value are not one tensor, the packed
    in_proj runs as one op per row block (q, then k and v together when key is value): each
    uses its rows of W and of B, and brsf's R_t or wm's noise comes from the block's own stream
    [seed, step * blocks + block]. The forward takes torch's arguments and returns what
    torch's returns; the attention itself is torch's (scaled_dot_product_attention when no
    weights are asked for), so only the projections' backward changes.
    """

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False,
                 kdim=None, vdim=None, batch_first=False, device=None, dtype=None, *, rule: str = "usf", scale=None,
                 init=None, seed=None, alpha=None, beta=None, gamma=None, sigma=None, **pipeline):
        super().__init__(embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim, batch_first,
                         device=device, dtype=dtype)
        alignment = dict(alpha=alpha, beta=beta, gamma=gamma, sigma=sigma, **pipeline)
        names = ("in_proj",) if self._qkv_same_embed_dim else ("q_proj", "k_proj", "v_proj")
        for offset, name in enumerate(names):
            setattr(self, name, _Projection(self, name + "_weight", rule, scale, init,
                                            None if seed is None else seed + offset, alignment))
        out_proj = Linear(embed_dim, embed_dim, bias, device=device, dtype=dtype, rule=rule, scale=scale,
                          init=init, seed=None if seed is None else seed + len(names), **alignment)
        # torch's initialisation of the output projection, kept.
        out_proj.weight, out_proj.bias = self.out_proj.weight, self.out_proj.bias
        self.out_proj = out_proj
        self.rule = out_proj.rule

    def projections(self) -> dict:
        """{name: layer} of the rule's layers: in_proj or q/k/v_proj, and out_proj."""
        names = ("in_proj",) if self._qkv_same_embed_dim else ("q_proj", "k_proj", "v_proj")
        return {**{name: getattr(self, name) for name in names}, "out_proj": self.out_proj}

    def forward(self, query, key, value, key_padding_mask=None, need_weights: bool = True, attn_mask=None,
                average_attn_weights: bool = True, is_causal: bool = False):
        # Which inputs are one tensor decides how the packed in_proj runs: read before any reshaping.
        self_attention, shared_kv = query is key and key is value, key is value
        is_batched = query.dim() == 3
        key_padding_mask = torch.nn.functional._canonical_mask(
            mask=key_padding_mask, mask_name="key_padding_mask",
            other_type=torch.nn.functional._none_or_dtype(attn_mask), other_name="attn_mask",
            target_type=query.dtype)
        attn_mask = torch.nn.functional._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None,
                                                        other_name="", target_type=query.dtype, check_other=False)
        if self.batch_first and is_batched:
            query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        output, weights = self._attend(query, key, value, key_padding_mask, need_weights, attn_mask,
                                       average_attn_weights, is_causal, self_attention, shared_kv)
        if self.batch_first and is_batched:
            output = output.transpose(1, 0)
        return output, weights

    def _project(self, query, key, value, self_attention: bool, shared_kv: bool):
        """q, k, v of shape (length, batch, embed_dim), each projection through the rule."""
        E = self.embed_dim
        biases = (None,) * 3 if self.in_proj_bias is None else self.in_proj_bias.split(E)
        if not self._qkv_same_embed_dim:
            outputs = []
            for projection, input, bias in zip((self.q_proj, self.k_proj, self.v_proj), (query, key, value), biases):
                outputs.append(projection.project(input, slice(None), bias, projection._step_rng()))
                projection._advance_rng()
            return outputs
        projection, rng = self.in_proj, self.in_proj._step_rng()
        if self_attention:
            packed = projection.project(query, slice(None), self.in_proj_bias, rng)
            outputs = packed.unflatten(-1, (3, E)).movedim(-2, 0).contiguous().unbind(0)
        elif shared_kv:
            kv_bias = None if self.in_proj_bias is None else self.in_proj_bias[E:]
            q = projection.project(query, slice(0, E), biases[0], _stream(rng, 0, 2))
            kv = projection.project(key, slice(E, None), kv_bias, _stream(rng, 1, 2))
            outputs = (q, *kv.unflatten(-1, (2, E)).movedim(-2, 0).contiguous().unbind(0))
        else:
            outputs = tuple(projection.project(input, slice(i * E, (i + 1) * E), bias, _stream(rng, i, 3))
                            for i, (input, bias) in enumerate(zip((query, key, value), biases)))
        projection._advance_rng()
        return outputs

    def _attend(self, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
                is_causal, self_attention, shared_kv):
        """torch.nn.functional.multi_head_attention_forward's computation, the projections through the rule."""
        functional = torch.nn.functional
        is_batched = functional._mha_shape_check(query, key, value, key_padding_mask, attn_mask, self.num_heads)
        if not is_batched:
            query, key, value = (x.unsqueeze(1) for x in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        tgt_len, bsz, embed_dim = query.shape
        if embed_dim != self.embed_dim:
            raise ValueError(f"query's embedding dimension must be embed_dim={self.embed_dim}, got {embed_dim}")
        if key.shape[:2] != value.shape[:2]:
            raise ValueError(f"key's sequence and batch dimensions {tuple(key.shape[:2])} must match value's "
                             f"{tuple(value.shape[:2])}")
        if is_causal and attn_mask is None:
            raise RuntimeError("is_causal=True needs attn_mask (the causal mask), as torch's MultiheadAttention "
                               "does: nn.Transformer.generate_square_subsequent_mask makes one")
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # scaled_dot_product_attention applies the causal mask itself
        elif key_padding_mask is not None:
            is_causal = False
        num_heads, head_dim = self.num_heads, self.head_dim
        q, k, v = self._project(query, key, value, self_attention, shared_kv)
        src_len = key.shape[0]
        if attn_mask is not None:
            expected = (tgt_len, src_len) if attn_mask.dim() == 2 else (bsz * num_heads, tgt_len, src_len)
            if attn_mask.dim() not in (2, 3) or attn_mask.shape != expected:
                raise RuntimeError(f"attn_mask must have shape {(tgt_len, src_len)} or "
                                   f"{(bsz * num_heads, tgt_len, src_len)}, got {tuple(attn_mask.shape)}")
            if attn_mask.dim() == 2:
                attn_mask = attn_mask.unsqueeze(0)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.repeat(1, bsz, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, bsz, 1)])
            attn_mask = None if attn_mask is None else functional.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else functional.pad(key_padding_mask, (0, 1))
        q = q.view(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
        k = k.view(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
        v = v.view(v.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
        if self.add_zero_attn:
            zeros = torch.zeros((bsz * num_heads, 1, head_dim), dtype=k.dtype, device=k.device)
            k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros], dim=1)
            attn_mask = None if attn_mask is None else functional.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else functional.pad(key_padding_mask, (0, 1))
        src_len = k.size(1)
        if key_padding_mask is not None:
            functional._check_key_padding_mask(key_padding_mask, src_len, bsz)
            key_padding_mask = (key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, num_heads, -1, -1)
                                .reshape(bsz * num_heads, 1, src_len))
            attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
        dropout_p = self.dropout if self.training else 0.0
        if need_weights:
            q_scaled = q * math.sqrt(1.0 / float(head_dim))
            if attn_mask is not None:
                weights = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
            else:
                weights = torch.bmm(q_scaled, k.transpose(-2, -1))
            weights = functional.softmax(weights, dim=-1)
            if dropout_p > 0.0:
                weights = functional.dropout(weights, p=dropout_p)
            output = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
            weights = weights.view(bsz, num_heads, tgt_len, src_len)
            if average_attn_weights:
                weights = weights.mean(dim=1)
        else:
            if attn_mask is not None:
                attn_mask = (attn_mask.unsqueeze(0) if attn_mask.size(0) == 1
                             else attn_mask.view(bsz, num_heads, -1, src_len))
            q, k, v = (t.view(bsz, num_heads, -1, head_dim) for t in (q, k, v))
            output = functional.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
            output = output.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
            weights = None
        output = self.out_proj(output).view(tgt_len, bsz, embed_dim)
        if not is_batched:
            output = output.squeeze(1)
            weights = None if weights is None else weights.squeeze(0)
        return output, weights
