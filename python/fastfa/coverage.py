"""fastfa.coverage: which of a model's modules follow a rule, and which still carry the error
back through their own weights (backprop, weight transport)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import nn as fnn

__all__ = ["coverage", "Coverage", "ModuleCoverage", "CONVERTED", "PARAMETER_FREE", "NO_WEIGHT_TRANSPORT",
           "BACKPROP"]

CONVERTED = "converted"
PARAMETER_FREE = "parameter-free"
NO_WEIGHT_TRANSPORT = "no weight transport"
BACKPROP = "backprop"

#: Layers whose parameters get a gradient but send the error back through no weight matrix:
#: a norm's affine scale and shift act per feature, an embedding's rows are looked up, not multiplied.
_NO_TRANSPORT = (torch.nn.modules.batchnorm._NormBase, torch.nn.LayerNorm, torch.nn.GroupNorm,
                 torch.nn.RMSNorm, torch.nn.LocalResponseNorm, torch.nn.Embedding, torch.nn.EmbeddingBag)
#: What fastfa.convert swaps, by exact type (a subclass may compute something else).
CONVERTIBLE = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.MultiheadAttention)
#: torch.nn.MultiheadAttention's output projection, converted with its attention layer.
ATTENTION_PART = torch.nn.modules.linear.NonDynamicallyQuantizableLinear


@dataclass(frozen=True)
class ModuleCoverage:
    """One module: its qualified name, type, status, rule (converted only), own parameters, and why."""

    name: str
    kind: str
    status: str
    rule: str | None
    parameters: tuple
    reason: str


class Coverage(list):
    """The rows of :func:`coverage`; ``str()`` prints them as a table."""

    @property
    def backprop(self) -> list:
        """Qualified names of the parameters left on backprop."""
        return [f"{row.name}.{p}" if row.name else p for row in self if row.status == BACKPROP
                for p in row.parameters]

    def __str__(self) -> str:
        header = ("module", "type", "status", "rule", "why")
        rows = [header] + [(row.name or "(model)", row.kind, row.status, row.rule or "-", row.reason) for row in self]
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths)) + "  " + row[4]
                         for row in rows)


def _row(name: str, module: torch.nn.Module) -> ModuleCoverage | None:
    own = tuple(p for p, value in module._parameters.items() if value is not None)
    kind = f"{type(module).__module__}.{type(module).__qualname__}"
    if isinstance(module, (fnn.FeedbackLayer, fnn.MultiheadAttention)):
        return ModuleCoverage(name, kind, CONVERTED, module.rule, own, f"B per the rule {module.rule!r}")
    if not own:
        if any(True for _ in module.children()):
            return None  # a container: its children have rows
        return ModuleCoverage(name, kind, PARAMETER_FREE, None, own, "no parameters")
    if isinstance(module, _NO_TRANSPORT):
        return ModuleCoverage(name, kind, NO_WEIGHT_TRANSPORT, None, own,
                              "per-feature scale and shift or a table lookup: no weight matrix on the way back")
    if type(module) is ATTENTION_PART:
        return ModuleCoverage(name, kind, BACKPROP, None, own, "the output projection of a torch "
                              "MultiheadAttention, converted with it")
    if type(module) in CONVERTIBLE:
        return ModuleCoverage(name, kind, BACKPROP, None, own, "convertible, not converted (excluded, or "
                              "fastfa.convert not run)")
    return ModuleCoverage(name, kind, BACKPROP, None, own, "a module fastfa.convert does not know: its "
                          "parameters get torch's own gradient, the error goes back through its weights")


def coverage(model: torch.nn.Module) -> Coverage:
    """The per-module table of ``model``: each module with parameters of its own, and each leaf.

    Status: ``"converted"`` (a fastfa layer, with its rule), ``"parameter-free"``, ``"no weight
    transport"`` (norm layers' affine parameters, embeddings), or ``"backprop"`` (a Linear / Conv
    left as torch's, or a module fastfa.convert does not know: nn.Bilinear, nn.LSTM, a custom
    module calling F.linear on its own Parameter, ...), with the reason.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    table = Coverage()
    for name, module in model.named_modules():
        row = _row(name, module)
        if row is not None:
            table.append(row)
    return table
