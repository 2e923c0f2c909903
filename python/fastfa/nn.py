"""Drop-in layers: torch.nn.Linear / torch.nn.Conv2d whose backward follows a learning rule.

The modules subclass torch's, so ``weight`` and ``bias`` are the usual Parameters,
isinstance checks hold and the parent's state_dict keys are unchanged. The rule's own
state is added to the state_dict: ``feedback`` (R for fa and frsf, a buffer; the learned
B for kp, wm, sa, aa, ia, a Parameter) and ``feedback_rng`` (int64 [seed, step], for brsf
and wm), so that saving and loading a model reproduces the next backward pass exactly.
"""

from __future__ import annotations

import torch

from . import functional as F
from .ops import feedback_transform
from .rules import RMS_SCALE, Distribution, Rule

__all__ = ["Linear", "Conv2d", "FeedbackLayer"]


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

    return property(get, set)


class FeedbackLayer:
    """What fastfa.nn.Linear and fastfa.nn.Conv2d share: the rule, its state, its measures."""

    rule: str
    activation = _op_option("activation")
    feedback_scale = _op_option("feedback_scale")
    feedback_distribution = _op_option("feedback_distribution")
    alignment_options = _op_option("alignment_options")

    def _op_options(self) -> tuple:
        """(rule, scale, distribution, alignment, activation) as the op takes them, resolved once."""
        options = self.__dict__.get("_resolved_op_options")
        if options is None:
            options = (int(self._spec.id), float(self.feedback_scale), int(self.feedback_distribution),
                       self.alignment_options, self.activation)
            self.__dict__["_resolved_op_options"] = options
        return options

    def _setup_feedback(self, rule, activation, scale, init, seed, alignment_options) -> None:
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
        self.feedback_init = ("kaiming" if init is None else init) if "init" in spec.options else None
        needs_seed = spec.stores_feedback or spec.draws_every_step
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
        if spec.draws_every_step:
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
        frsf: |R|*sign(W); kp, wm, sa, aa, ia: the learned B.
        """
        feedback = None if self.feedback is None else self.feedback.detach()
        return feedback_transform(self.weight.detach(), feedback, self.feedback_rng, *self._feedback_op_args())

    @torch.no_grad()
    def alignment(self) -> float:
        """The angle in degrees between B (``feedback_weight()``) and W, flattened."""
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
        return text


class Linear(FeedbackLayer, torch.nn.Linear):
    """y = activation(x W^T + b) whose backward uses the rule's feedback B instead of W.

    Args: as torch.nn.Linear, plus keyword-only ``rule`` (one of fastfa.RULES, default
    "usf"), ``activation`` (None, "relu", "gelu", "gelu_tanh", "silu", "tanh", "sigmoid"),
    ``scale`` (usf: "rms" default, ||W||/sqrt(numel) at each step; "xiao", Xiao et al.'s; "xavier",
    "kaiming" or a number), ``init`` (R's
    distribution for fa, brsf, frsf, and B's start for the estimated rules: "kaiming"
    default, "xavier", "xiao"), ``seed``, and ``alpha`` / ``beta`` / ``gamma`` / ``sigma``
    for the estimated rules kp, wm, sa, aa, ia (defaults in fastfa.rules).
    Input (*, in_features) -> output (*, out_features).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 rule: str = "usf", activation=None, scale=None, init=None, seed=None, alpha=None, beta=None,
                 gamma=None, sigma=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._setup_feedback(rule, activation, scale, init, seed,
                             dict(alpha=alpha, beta=beta, gamma=gamma, sigma=sigma))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        _, scale, distribution, alignment, activation = self._op_options()
        output = F._linear(input, self.weight, self.bias, self.feedback, self._step_rng(), self._spec, scale,
                           distribution, alignment, activation)
        self._advance_rng()
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

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None, *,
                 rule: str = "usf", activation=None, scale=None, init=None, seed=None, alpha=None, beta=None,
                 gamma=None, sigma=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device=device, dtype=dtype)
        self._setup_feedback(rule, activation, scale, init, seed,
                             dict(alpha=alpha, beta=beta, gamma=gamma, sigma=sigma))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        padding = self.padding
        if self.padding_mode != "zeros":
            # As torch.nn.Conv2d: pad by the mode, then a convolution without padding.
            input = torch.nn.functional.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = (0, 0)
        _, scale, distribution, alignment, activation = self._op_options()
        output = F._conv2d(input, self.weight, self.bias, self.stride, padding, self.dilation, self.groups,
                           self.feedback, self._step_rng(), self._spec, scale, distribution, alignment,
                           activation, geometry=self._geometry(padding))
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
