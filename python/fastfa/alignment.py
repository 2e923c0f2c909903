"""The alignment pipeline of Kunin et al.'s code (learning-rules.md, "The alignment pipeline's options").

The estimated rules wm, aa and ia make B's gradient from alignment losses over the
layer's input x. Kunin et al.'s reference code (Neural-Alignment) computes those losses
through a pipeline of switches, all off by default; the seed paper finds the local rules
very sensitive to them. In the pipeline's order (per-sample operations act on x
reshaped to (N, -1)):

1. ``input_distribution`` ("normal" | "uniform"), ``input_stddev`` s: x replaced by noise of
   std s (wm's own noise is this with "normal" and s = sigma);
2. ``center_input`` (minus each sample's mean), ``normalize_input`` (centred, then divided by
   its L2 norm);
3. ``batch_center_backward_input``: the backward projection's input minus its batch mean;
4. r = x_f W^T, p = x_b B^T (conv: the layer's conv2d), plus the layer's bias
   (``use_bias_forward`` / ``use_bias_backward``), then the layer's activation
   (``activation_forward`` / ``activation_backward``);
5. r_rec = r B, p_rec = p W (conv: transposed convolutions);
6. ``center_forward_output`` / ``normalize_forward_output`` / ``batch_center_forward_output`` on r
   and r_rec; ``center_backward_output`` / ``normalize_backward_output`` on p and p_rec;
7. the primitives decay, amp, sparse, null on these; ia's ``reconstruction_amp``,
   ``reconstruction_reversal`` and ``use_sparse`` change which.

The layers' defaults (:data:`LAYER_DEFAULTS`): a fastfa.nn layer (Linear, Conv2d, Conv1d,
MultiheadAttention's projections, and so every layer ``fastfa.convert`` makes) of rule aa or ia
turns ``normalize_input`` on unless told otherwise. aa's and ia's B gradients are sums over
every sample and, for a convolution, every position of the input (learning-rules.md): their
size grows with the input's second moment (ia's null term with its fourth), so at the reference
coefficients B blows up on layers with large or many-position inputs (RetinaNet's FPN within
four SGD steps, benchmarks/results/2026-12-01-retinanet-stability.md; fastfa train's digits
convnet). Each sample scaled to unit norm bounds those terms whatever the layer's input. The
paper's configuration (the spec's table, every switch off) is one option away:
``normalize_input=False``. The functional API (fastfa.functional.linear / conv2d) and the ops
keep the table's closed form: they have no default to change.

With every switch off a layer runs exactly as before (the op's closed-form B gradient).
With a switch on, or with coefficients that follow a schedule (:mod:`fastfa.schedules`),
the layer's forward op runs on aten with B detached (grad_input, grad_W and grad_b as
always), and B's gradient is the autograd gradient of the pipeline's loss, handed to B
when the layer's output gets its gradient. kp and sa are refused: their terms (decay,
self) never read the input, so no switch could change them. One pipeline is the exception:
aa's and ia's default, normalize_input alone with fixed coefficients, whose gradient is the
table's with x normalised per sample: the aten op computes it in closed form
(:func:`op_alignment`), with no loss graph per step.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Optional

import torch

from . import _backend
from . import ops as _ops
from .rules import Distribution, Rule, rule_spec

__all__ = ["Pipeline", "SWITCHES", "IA_SWITCHES", "OPTIONS", "LAYER_DEFAULTS", "layer_options", "paper_options",
           "split_options", "pipeline_loss", "linear", "conv2d", "feedback_parameters"]

#: The boolean switches every rule whose loss reads the input (wm, aa, ia) takes.
SWITCHES = ("center_input", "normalize_input", "batch_center_backward_input", "use_bias_forward",
            "use_bias_backward", "activation_forward", "activation_backward", "center_forward_output",
            "normalize_forward_output", "batch_center_forward_output", "center_backward_output",
            "normalize_backward_output")
#: ia's own switches.
IA_SWITCHES = ("reconstruction_amp", "reconstruction_reversal", "use_sparse")
INPUT_DISTRIBUTIONS = ("normal", "uniform")
#: Every option name of the pipeline, as layers, convert and the functional API take them.
OPTIONS = ("input_distribution", "input_stddev") + SWITCHES + IA_SWITCHES
_READS_INPUT = frozenset({Rule.WM, Rule.AA, Rule.IA})
#: Per rule, the pipeline switches a fastfa.nn layer (and so ``fastfa.convert``) turns on unless the
#: caller passes them: aa's and ia's B gradients grow with the input's scale and positions and blow
#: up on RetinaNet at the reference coefficients (module docstring). ``normalize_input=False`` is
#: the paper's configuration (:func:`paper_options`). The coefficients stay the reference's.
LAYER_DEFAULTS = {
    "aa": {"normalize_input": True},
    "ia": {"normalize_input": True},
}
# The layer's activation (functional.ACTIVATIONS), for activation_forward / activation_backward.
_ACTIVATIONS = {
    "none": lambda z: z,
    "relu": torch.relu,
    "gelu": torch.nn.functional.gelu,
    "gelu_tanh": lambda z: torch.nn.functional.gelu(z, approximate="tanh"),
    "silu": torch.nn.functional.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """The switches of one layer's alignment loss (all off: the rule's table in learning-rules.md)."""

    input_distribution: Optional[str] = None
    input_stddev: Optional[float] = None
    center_input: bool = False
    normalize_input: bool = False
    batch_center_backward_input: bool = False
    use_bias_forward: bool = False
    use_bias_backward: bool = False
    activation_forward: bool = False
    activation_backward: bool = False
    center_forward_output: bool = False
    normalize_forward_output: bool = False
    batch_center_forward_output: bool = False
    center_backward_output: bool = False
    normalize_backward_output: bool = False
    reconstruction_amp: bool = False
    reconstruction_reversal: bool = False
    use_sparse: bool = False

    def on(self) -> dict:
        """The options that differ from off, as keyword arguments."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)
                if getattr(self, field.name) not in (None, False)}


def _rule_name(rule):
    """The canonical rule name, or None for a rule the layer will refuse itself (with its own message)."""
    try:
        return rule_spec(rule).name
    except (TypeError, ValueError):
        return None


def layer_options(rule, options: dict) -> dict:
    """``options`` with the rule's LAYER_DEFAULTS filled in where the caller gave none (absent or None)."""
    defaults = LAYER_DEFAULTS.get(_rule_name(rule), {})
    return {**options, **{name: value for name, value in defaults.items() if options.get(name) is None}}


def paper_options(rule) -> dict:
    """The options that turn the rule's LAYER_DEFAULTS off again (the spec's table, every switch off):
    ``{"normalize_input": False}`` for aa and ia, ``{}`` for every other rule (which takes no switch)."""
    return {name: False for name in LAYER_DEFAULTS.get(_rule_name(rule), {})}


def split_options(spec, options: dict):
    """(the rule's other options, Pipeline or None) from one dict of layer options.

    Refuses a pipeline option that the rule does not read (kp, sa: no loss reads x; ia's own
    switches: ia only), a non-bool switch and an unknown input distribution, naming the option.
    """
    given = {name: options[name] for name in OPTIONS if options.get(name) is not None}
    rest = {name: value for name, value in options.items() if name not in OPTIONS}
    if not given:
        return rest, None
    if spec.id not in _READS_INPUT:
        takers = "wm, aa, ia" if spec.estimates_feedback else "the estimated rules wm, aa, ia"
        raise ValueError(f"option {sorted(given)[0]!r} is a switch of the alignment pipeline, which applies to "
                         f"rule(s) {takers}, not {spec.name!r}"
                         + (" (its B gradient reads no activations)" if spec.estimates_feedback else ""))
    values = {}
    for name, value in given.items():
        if name == "input_distribution":
            if value not in INPUT_DISTRIBUTIONS:
                raise ValueError(f"input_distribution must be one of {', '.join(INPUT_DISTRIBUTIONS)} or None, "
                                 f"got {value!r}")
        elif name == "input_stddev":
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < float(value) < float("inf"):
                raise ValueError(f"input_stddev must be a positive finite number, got {value!r}")
            value = float(value)
        elif not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool (a switch of the alignment pipeline), got {type(value).__name__}")
        elif name in IA_SWITCHES and spec.id != Rule.IA:
            raise ValueError(f"option {name!r} is information alignment's own switch: it applies to rule 'ia', "
                             f"not {spec.name!r}")
        values[name] = value
    if "input_stddev" in values and spec.id == Rule.WM and options.get("sigma") is not None:
        raise ValueError("pass either sigma or input_stddev (the reference code's name for wm's noise std), not both")
    if "input_stddev" in values and spec.id != Rule.WM and "input_distribution" not in values:
        raise ValueError(f"input_stddev is the std of the noise that replaces x: rule {spec.name!r} needs "
                         "input_distribution='normal' or 'uniform' with it")
    pipeline = Pipeline(**values)
    return rest, (pipeline if pipeline.on() else None)


# --- the pipeline's steps ---------------------------------------------------------------------------


def _per_sample(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1)  # not reshape(N, -1): a zero-size batch has no -1 to infer


def _center(t: torch.Tensor) -> torch.Tensor:
    flat = _per_sample(t)
    return (flat - flat.mean(1, keepdim=True)).reshape(t.shape)


def _normalize(t: torch.Tensor) -> torch.Tensor:
    flat = _per_sample(_center(t))
    norm = flat.norm(dim=1, keepdim=True)
    # A sample that is all zeros (a dead ReLU layer's output, zero padding) stays zero instead of turning
    # into NaN that would reach B. Not a floor such as 1e-12: it underflows to 0 in fp16.
    return (flat / torch.where(norm > 0, norm, torch.ones_like(norm))).reshape(t.shape)


def _sample_outputs(t: torch.Tensor, center: bool, normalize: bool, batch_center: bool = False) -> torch.Tensor:
    if normalize:
        t = _normalize(t)
    elif center:
        t = _center(t)
    if batch_center:
        t = t - t.mean(0, keepdim=True)
    return t


def _amp(a: torch.Tensor, b: torch.Tensor, batch: int) -> torch.Tensor:
    return -(_per_sample(a) * _per_sample(b)).sum() / batch


def _squares(t: torch.Tensor, batch: int) -> torch.Tensor:
    return _per_sample(t).pow(2).sum() / batch


class _Maps:
    """project(x, M) = x M^T (conv: conv2d(x, M)); back(r, M) = r M (conv: the transposed conv2d
    of r with M, shaped like x); bias(r, b) adds b on r's feature / channel axis."""

    def __init__(self, input_shape, geometry=None):
        self.input_shape, self.geometry = input_shape, geometry

    def project(self, x, m):
        if self.geometry is None:
            return x @ m.t()
        stride, padding, dilation, groups = self.geometry
        return torch.nn.functional.conv2d(x, m, None, stride, padding, dilation, groups)

    def back(self, r, m):
        if self.geometry is None:
            return r @ m
        stride, padding, dilation, groups = self.geometry
        return torch.nn.grad.conv2d_input(self.input_shape, m, r, stride, padding, dilation, groups)

    def bias(self, r, b):
        if self.geometry is None:
            return r + b
        return r + b.view(1, -1, 1, 1)


def _noise(x, rng, distribution: str, stddev: float, rule: Rule) -> torch.Tensor:
    """Noise shaped like x. wm: the draw its switch-free path makes, from the layer's (seed, step);
    aa and ia keep no counter, so theirs comes from torch's generator."""
    if rule == Rule.WM:
        like = x.detach().contiguous()
        unit = Distribution.NORMAL if distribution == "normal" else Distribution.UNIFORM
        # U(-a, a) has std a / sqrt(3).
        scale = stddev if distribution == "normal" else stddev * 3.0 ** 0.5
        return _ops.feedback_transform(like, None, rng, int(Rule.FA), scale, int(unit))
    if distribution == "normal":
        return torch.randn_like(x) * stddev
    return (torch.rand_like(x) * 2.0 - 1.0) * (stddev * 3.0 ** 0.5)


def pipeline_loss(rule: Rule, pipeline: Pipeline, x, weight, bias, feedback, coefficients, activation, maps,
                  rng=None, sigma: float = 1.0) -> torch.Tensor:
    """The rule's alignment loss through the pipeline; only ``feedback`` (B) is differentiated.

    coefficients: (alpha, beta, gamma), numbers or 0-d tensors. kp: alpha*decay (the op adds
    grad_W); sa: alpha*decay + beta*self; wm: alpha*decay + beta*amp(r, p);
    aa: alpha*sparse(r, p) + beta*amp(r, p); ia: alpha*amp + beta*null + gamma*decay (amp(x, r_rec)
    or amp(x, p_rec) with reconstruction_amp, null of p_rec with reconstruction_reversal,
    sparse(r, p) in decay's place with use_sparse).
    """
    alpha, beta, gamma = coefficients
    x, weight = x.detach(), weight.detach()
    decay = feedback.pow(2).sum()
    # kp and sa take no switch; they come here when a schedule drives their coefficients.
    if rule == Rule.KP:  # B's task gradient grad_W comes from the op
        return alpha * decay
    if rule == Rule.SA:
        return alpha * decay - beta * (weight * feedback).sum()
    bias = None if bias is None else bias.detach()
    batch = max(x.shape[0], 1)
    distribution = pipeline.input_distribution or ("normal" if rule == Rule.WM else None)
    if distribution is not None:
        stddev = pipeline.input_stddev if pipeline.input_stddev is not None else (sigma if rule == Rule.WM else 1.0)
        x = _noise(x, rng, distribution, stddev, rule)
    x = _sample_outputs(x, pipeline.center_input, pipeline.normalize_input)
    x_forward = x
    x_backward = x - x.mean(0, keepdim=True) if pipeline.batch_center_backward_input else x
    r = maps.project(x_forward, weight)
    p = maps.project(x_backward, feedback)
    if bias is not None and pipeline.use_bias_forward:
        r = maps.bias(r, bias)
    if bias is not None and pipeline.use_bias_backward:
        p = maps.bias(p, bias)
    act = _ACTIVATIONS[activation]
    if pipeline.activation_forward:
        r = act(r)
    if pipeline.activation_backward:
        p = act(p)
    if rule == Rule.WM:
        r = _sample_outputs(r, pipeline.center_forward_output, pipeline.normalize_forward_output,
                            pipeline.batch_center_forward_output)
        p = _sample_outputs(p, pipeline.center_backward_output, pipeline.normalize_backward_output)
        return alpha * decay + beta * _amp(r, p, batch)
    if rule == Rule.AA:
        r = _sample_outputs(r, pipeline.center_forward_output, pipeline.normalize_forward_output,
                            pipeline.batch_center_forward_output)
        p = _sample_outputs(p, pipeline.center_backward_output, pipeline.normalize_backward_output)
        return alpha * _squares(p, batch) + beta * _amp(r, p, batch)
    # ia: the reconstructions come from r and p before their output steps (step 5 before step 6).
    reversal = pipeline.reconstruction_reversal
    r_rec = None if reversal else maps.back(r, feedback)
    p_rec = maps.back(p, weight) if reversal else None
    r = _sample_outputs(r, pipeline.center_forward_output, pipeline.normalize_forward_output,
                        pipeline.batch_center_forward_output)
    p = _sample_outputs(p, pipeline.center_backward_output, pipeline.normalize_backward_output)
    if reversal:
        p_rec = _sample_outputs(p_rec, pipeline.center_backward_output, pipeline.normalize_backward_output)
        reconstruction = p_rec
    else:
        r_rec = _sample_outputs(r_rec, pipeline.center_forward_output, pipeline.normalize_forward_output,
                                pipeline.batch_center_forward_output)
        reconstruction = r_rec
    amp = _amp(x_forward, reconstruction, batch) if pipeline.reconstruction_amp else _amp(r, p, batch)
    null = _squares(reconstruction, batch)
    last = _squares(p, batch) if pipeline.use_sparse else decay
    return alpha * amp + beta * null + gamma * last


class _HandGradient(torch.autograd.Function):
    """output unchanged; when the output's gradient comes back, the loss's gradient (1) goes to the
    loss, whose graph takes it to B: B's gradient is computed at the same step as W's."""

    @staticmethod
    def forward(ctx, output, loss):
        return output.clone()

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, torch.ones((), dtype=grad_output.dtype, device=grad_output.device)


def _on_aten(kind: str, backend: str, reason: str) -> str:
    if backend != "aten":
        _backend.record_fallback(kind, f"the {backend} backend has no {reason}; the layer runs on aten")
    return "aten"


def _attach(output, spec, pipeline, x, weight, bias, feedback, rng, alignment, coefficients, activation, maps):
    if not (torch.is_grad_enabled() and isinstance(feedback, torch.Tensor) and feedback.requires_grad):
        return output
    coefficients = alignment[:3] if coefficients is None else coefficients.to(feedback.dtype).unbind()
    loss = pipeline_loss(spec.id, pipeline or Pipeline(), x, weight, bias, feedback, coefficients, activation,
                         maps, rng=rng, sigma=alignment[3])
    return _HandGradient.apply(output, loss)


def _for_op(spec, feedback, alignment):
    """The feedback and alignment the forward op gets: B detached (the loss makes B's gradient), except
    kp's, whose op hands B W's task gradient, with its own decay off (alpha 0; the loss adds it)."""
    if spec.id == Rule.KP:
        return feedback, [0.0, *alignment[1:]]
    return (None if feedback is None else feedback.detach()), alignment


#: The one pipeline the aten op computes in closed form: the layers' default for aa and ia. With
#: x_hat = x normalised per sample and r = x_hat W^T, p = x_hat B^T, the loss's gradient is the
#: table's (learning-rules.md) with x_hat in x's place, so no loss graph is built per step.
_CLOSED_FORM = Pipeline(normalize_input=True)


def op_alignment(spec, pipeline, coefficients, alignment):
    """The alignment the aten op takes where it computes B's gradient itself under ``pipeline``
    ([alpha, beta, gamma, sigma, 1]: normalize_input, aa and ia with fixed coefficients), else None."""
    if coefficients is None and pipeline == _CLOSED_FORM and spec.id in (Rule.AA, Rule.IA):
        return [*alignment, 1.0]
    return None


def _reason(pipeline) -> str:
    return "alignment pipeline switch" if pipeline is not None else "alignment coefficient schedule"


def linear(input, weight, bias, feedback, rng, spec, scale, distribution, alignment, activation, backend, pipeline,
           coefficients):
    """A Linear layer whose B gradient comes from the pipeline's loss (checked arguments, as functional._linear)."""
    _on_aten("linear", backend, _reason(pipeline))
    closed_form = op_alignment(spec, pipeline, coefficients, alignment)
    if closed_form is not None:
        return _ops.linear_op("aten")(input, weight, bias, feedback, rng, int(spec.id), scale, distribution,
                                      closed_form, activation)[0]
    task_feedback, alignment_of_op = _for_op(spec, feedback, alignment)
    output, _, _ = _ops.linear_op("aten")(input, weight, bias, task_feedback, rng, int(spec.id), scale, distribution,
                                          alignment_of_op, activation)
    x = input.reshape(-1, weight.shape[1])
    return _attach(output, spec, pipeline, x, weight, bias, feedback, rng, alignment, coefficients, activation,
                   _Maps(x.shape))


def conv2d(input, weight, bias, feedback, rng, stride, padding, dilation, groups, spec, scale, distribution,
           alignment, activation, backend, pipeline, coefficients):
    """A Conv2d layer (4-D input, padding applied) whose B gradient comes from the pipeline's loss."""
    _on_aten("conv2d", backend, _reason(pipeline))
    closed_form = op_alignment(spec, pipeline, coefficients, alignment)
    if closed_form is not None:
        return _ops.conv2d_op("aten")(input, weight, bias, feedback, rng, stride, padding, dilation, groups,
                                      int(spec.id), scale, distribution, closed_form, activation)[0]
    task_feedback, alignment_of_op = _for_op(spec, feedback, alignment)
    output, _, _ = _ops.conv2d_op("aten")(input, weight, bias, task_feedback, rng, stride, padding, dilation, groups,
                                          int(spec.id), scale, distribution, alignment_of_op, activation)
    maps = _Maps(input.shape, (stride, padding, dilation, groups))
    return _attach(output, spec, pipeline, input, weight, bias, feedback, rng, alignment, coefficients, activation,
                   maps)


def feedback_parameters(model: torch.nn.Module) -> list:
    """The learned B of every estimated-rule layer of ``model`` (kp, wm, sa, aa, ia), each once.

    B is a Parameter, so these can get their own param group or optimizer, as Kunin et al.'s code
    gives B its own (``torch.optim.SGD([{"params": others}, {"params": fastfa.feedback_parameters(model),
    "lr": 1e-3}])``). The other parameters are those of ``model.parameters()`` not in this list.
    """
    from .nn import FeedbackLayer

    seen, found = set(), []
    for module in model.modules():
        feedback = getattr(module, "feedback", None) if isinstance(module, FeedbackLayer) else None
        if isinstance(feedback, torch.nn.Parameter) and id(feedback) not in seen:
            seen.add(id(feedback))
            found.append(feedback)
    return found
