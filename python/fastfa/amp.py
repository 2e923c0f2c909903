"""Mixed precision with loss scaling for the estimated rules (kp, wm, sa, aa, ia).

torch.amp.GradScaler multiplies the loss by S before the backward pass and divides every
gradient by S before the optimizer step. That is right for a gradient proportional to the
loss, and wrong for B's alignment terms, which the estimated rules add to B's gradient at
the same step (learning-rules.md, "Estimated feedback") but which do not come from the loss:
kp's decay 2αB, and everything wm, sa, aa and ia give B. Unscaled, those terms end up divided
by S (65536 by default): B's decay vanishes, or B stops learning, with no error.

:class:`GradScaler` is torch's, plus: the scaled loss carries S into its backward pass, and
every estimated layer multiplies the loss-independent part of B's gradient by S there, so
that the unscale divides it back to its true value with everything else. Concretely,

- ``scaler.scale(loss)`` returns the scaled loss through an identity node whose backward runs
  first in that backward pass: it writes S into one 0-d tensor per device (device to device,
  no host sync) and queues a callback that writes 1 back when the pass ends. Any other
  backward pass (an unscaled one, fastfa.metrics' probes) sees 1.
- an estimated layer's B goes through an identity node whose backward multiplies B's
  gradient by that tensor (wm, sa, aa, ia: every term of theirs is loss-independent), or, for
  kp, adds (S - 1) * 2α * B (its task term grad_W already carries S). The node sits on B
  before autocast casts it, so the product is taken in B's own dtype (fp32 under fp16
  autocast: S * the terms does not overflow fp16).

The nodes exist only once a ``fastfa.amp.GradScaler`` with ``enabled=True`` has been made in the
process; other rules (bp, fa, usf, brsf, frsf, dfa) never get one: all their gradients are
proportional to the loss. A model without estimated layers gets no carry node on its loss
either (no layer made a holder), so it pays nothing over torch's scaler. torch's own GradScaler
cannot tell the layers S: an estimated layer under fp16 autocast without a fastfa scaler warns once.
A fastfa scaler made after an estimated layer's forward pass cannot reach that graph: the loss it
scales first then warns (make the scaler before the first forward pass).
"""

from __future__ import annotations

import warnings
import weakref

import torch

from .rules import Rule

__all__ = ["GradScaler"]

#: Whether a fastfa.amp.GradScaler with enabled=True exists (or has existed) in this process:
#: only then do estimated layers put their B through the scaling node.
enabled = False
# device -> 0-d float32 tensor: S during the backward pass of a scaled loss, 1 otherwise. A
# tensor (not a Python number) so that the layers' nodes read it on the device without a host
# sync, and so that a torch.compile'd backward reads its value at run time rather than a
# constant frozen at trace time.
_holders: dict = {}
_warned = False
# id -> weakref of each B (its base tensor, for a layer's view of it) that an estimated layer used in a
# forward while no fastfa scaler existed: that graph has no node to scale B's terms, so a scaler made
# after it cannot fix its backward, and says so when the loss it scales first reaches such a B.
_before_scaler: dict = {}


def _holder(device: torch.device) -> torch.Tensor:
    holder = _holders.get(device)
    if holder is None:
        holder = torch.ones((), dtype=torch.float32, device=device)
        _holders[device] = holder
    return holder


def _write(value) -> None:
    # Through .data: the layers' nodes saved the holders for backward, and an in-place write to
    # the tensor itself would bump its version counter and fail their backward's check. The
    # holders are never part of a graph, so nothing else reads that counter.
    for holder in _holders.values():
        if isinstance(value, torch.Tensor):
            holder.data.copy_(value, non_blocking=True)
        else:
            holder.data.fill_(value)


def _end_of_backward() -> None:
    _write(1.0)


class _CarryScale(torch.autograd.Function):
    """The scaled loss unchanged; in the backward pass (where it is the first node to run, as the
    root), S written where the layers read it, and 1 written back when the pass ends."""

    @staticmethod
    def forward(ctx, scaled, scale):
        ctx.scale = scale  # not saved: GradScaler.update() changes it in place after the pass
        return scaled.view_as(scaled)

    @staticmethod
    def backward(ctx, grad):
        _write(ctx.scale)
        torch.autograd.Variable._execution_engine.queue_callback(_end_of_backward)
        return grad, None


class _ScaleAlignment(torch.autograd.Function):
    """B unchanged; its gradient's loss-independent part multiplied by S (the holder's value).

    decay None: the whole gradient (wm, sa, aa, ia). Otherwise kp's 2α (a number, or a 0-d
    tensor when a schedule drives α): the gradient is S*grad_W + 2αB, and (S - 1)*2αB is added.
    """

    @staticmethod
    def forward(ctx, feedback, holder, decay):
        if decay is None:
            ctx.save_for_backward(holder)
        elif isinstance(decay, torch.Tensor):
            ctx.save_for_backward(holder, feedback, decay)
        else:
            ctx.save_for_backward(holder, feedback)
        ctx.decay = decay if not isinstance(decay, torch.Tensor) else None
        ctx.kp = decay is not None
        return feedback.view_as(feedback)

    @staticmethod
    def backward(ctx, grad):
        holder, *rest = ctx.saved_tensors
        scale = holder.to(device=grad.device, dtype=grad.dtype)
        if not ctx.kp:
            return grad * scale, None, None
        feedback = rest[0]
        if len(rest) > 1:  # a scheduled alpha
            return grad + (scale - 1) * rest[1].to(grad.dtype) * feedback, None, None
        return torch.addcmul(grad, feedback, scale - 1, value=ctx.decay), None, None


def for_loss_scaling(feedback, spec, alignment, coefficients=None, device_type=None):
    """The B an estimated layer hands its op: wrapped by the scaling node where a fastfa GradScaler
    exists and B learns here; unchanged otherwise (and a one-time warning under fp16 autocast,
    where torch's GradScaler would silently divide B's alignment terms by S).

    alignment: the layer's [alpha, beta, gamma, sigma]; coefficients: the [alpha, beta, gamma]
    tensor a schedule writes, or None."""
    if not enabled:
        # Not while compiling: dynamo would guard on the dict's contents and recompile every step
        # that adds a B (the late-scaler warning is eager-mode help, not part of the graph).
        if isinstance(feedback, torch.Tensor) and feedback.requires_grad and not torch.compiler.is_compiling():
            base = feedback if feedback._base is None else feedback._base
            key = id(base)
            if key not in _before_scaler:  # a layer's B: once; the entry goes when B does
                _before_scaler[key] = weakref.ref(base, lambda _, key=key: _before_scaler.pop(key, None))
        _warn_without_scaler(spec, device_type)
        return feedback
    if not isinstance(feedback, torch.Tensor):
        return feedback
    # The holder is made even where this forward records no graph: a scaled loss carries S only where
    # a holder exists, and activation checkpointing runs its forward under no_grad, then again, with
    # grad, inside the backward pass (after the loss has been scaled).
    holder = _holder(feedback.device)
    if not (feedback.requires_grad and torch.is_grad_enabled()):
        return feedback
    decay = None
    if spec.id == Rule.KP:
        decay = 2.0 * (alignment[0] if coefficients is None else coefficients[0])
    return _ScaleAlignment.apply(feedback, holder, decay)


def _warn_without_scaler(spec, device_type) -> None:
    global _warned
    if _warned or device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return
    if torch.get_autocast_dtype(device_type) != torch.float16:
        return
    _warned = True
    warnings.warn(f"fastfa: a layer of the estimated rule {spec.name!r} runs under fp16 autocast. If you scale the "
                  "loss with torch.amp.GradScaler, use fastfa.amp.GradScaler instead (a drop-in subclass): torch's "
                  "divides B's alignment terms, which do not come from the loss, by the scale (65536 by default), "
                  "so B stops learning. Without loss scaling, ignore this.", stacklevel=4)


def _warn_if_made_before(scaled) -> None:
    """Once, on the first loss a fastfa scaler scales with no holder: whether its graph reaches a B that
    an estimated layer used before any fastfa scaler existed (a walk of the graph, on this path only)."""
    before = dict(_before_scaler)
    _before_scaler.clear()
    pending = [t.grad_fn for t in (scaled if isinstance(scaled, (list, tuple)) else [scaled])
               if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    seen = set()
    while pending:
        node = pending.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad: the leaf it accumulates into
        if variable is not None and id(variable) in before and before[id(variable)]() is variable:
            warnings.warn("an estimated layer (kp, wm, sa, aa, ia) ran the forward pass of this loss before any "
                          "fastfa.amp.GradScaler existed: its graph has no node to scale B's alignment terms, so "
                          "this backward divides them by the scale. Make the scaler before the first forward "
                          "pass.", stacklevel=3)
            return
        pending.extend(next_node for next_node, _ in node.next_functions)


def _carry(value, scale):
    if isinstance(value, torch.Tensor):
        return _CarryScale.apply(value, scale) if value.requires_grad else value
    if isinstance(value, (list, tuple)):
        return type(value)(_carry(v, scale) for v in value)
    return value


class GradScaler(torch.amp.GradScaler):
    """torch.amp.GradScaler (same arguments, state_dict and methods) that also scales the
    estimated rules' loss-independent B-gradient terms, so that they survive the unscale.

    ``scaler.scale(loss).backward(); scaler.step(optimizer); scaler.update()`` then gives every
    parameter, B included, the gradient that ``loss.backward()`` gives (to rounding), and skips
    the step on inf / nan as torch's does. Make it before the first forward pass: the estimated
    layers add their scaling node from then on (a forward run before has none).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self._enabled:
            global enabled
            enabled = True

    def scale(self, outputs):
        """outputs * S (a tensor, or a list / tuple of them), each carrying S into its backward pass."""
        scaled = super().scale(outputs)
        if not self._enabled:
            return scaled
        if not _holders:
            # No estimated layer has run a forward under a fastfa scaler (the forward that made this
            # loss would have made its device's holder): nothing reads S, torch's scaling is all.
            if _before_scaler:
                _warn_if_made_before(scaled)
            return scaled
        return _carry(scaled, self._scale)
