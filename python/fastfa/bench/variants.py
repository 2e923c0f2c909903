"""Variants of a case: torch's module (the baseline), fastfa per (rule, backend), and the peers per rule."""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

import fastfa

from .. import peers
from .cases import Case


#: Peer names as they appear in the rows' "backend" field.
PEER_BACKENDS = {name: f"peer:{name}" for name in peers.PEERS}


@dataclass
class Variant:
    rule: Optional[str]            # None: torch's own module (the backprop baseline)
    backend: Optional[str]         # a fastfa backend, or "peer:<name>"
    module: torch.nn.Module
    step: Callable                 # step(x): forward, backward (and the optimizer's step for models)
    calls: int = 1                 # calls per round
    samples: list = field(default_factory=list)   # ms per call, one per round
    peak_bytes: Optional[int] = None
    max_rel_err: Optional[float] = None
    optimizer: Optional[torch.optim.Optimizer] = None

    @property
    def label(self) -> str:
        return "torch bp" if self.rule is None else f"{self.rule}/{self.backend}"

    @property
    def peer(self) -> Optional[str]:
        return self.backend[5:] if self.backend and self.backend.startswith("peer:") else None

    def zero(self) -> None:
        self.module.zero_grad(set_to_none=True)


def backend_context(backend: Optional[str]):
    if backend is None or backend.startswith("peer:"):
        return contextlib.nullcontext()
    return fastfa.use_backend(backend)


def make_input(case: Case, device, dtype, generator) -> torch.Tensor:
    x = torch.randn(case.input_shape, device="cpu", dtype=torch.float32, generator=generator).to(device, dtype)
    if case.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_(not case.is_model)


def make_module(case: Case, rule: Optional[str], backend: Optional[str], device, reference: torch.nn.Module,
                 seed: int) -> tuple:
    """(module to time, its eager form for the forward check): same weights as the reference."""
    torch.manual_seed(seed)   # fastfa.convert draws R and seeds from torch's generator
    module = copy.deepcopy(reference)
    if rule is not None:
        # The spec's table: aa's and ia's layer default (normalize_input) runs the alignment pipeline on
        # aten, which the peers do not have; the rules' own kernels are what is timed against them.
        module = fastfa.convert(module, rule, **fastfa.alignment.paper_options(rule))
        peer = backend[5:] if backend.startswith("peer:") else None
        if peer is not None:
            if peer == "biotorch":
                module = peers.convert_to_peers(module, make=peers.biotorch_of)
            else:
                module = peers.convert_to_peers(module)
    if case.channels_last:
        module = module.to(memory_format=torch.channels_last)
    eager = module
    if backend == PEER_BACKENDS["compile"]:
        module = peers.compile_peer(module, device)
    return module, eager


def stepper(case: Case, module: torch.nn.Module, grad: Optional[torch.Tensor], target: Optional[torch.Tensor]):
    """The step a variant times; a model's includes cross-entropy and SGD's update."""
    if not case.is_model:
        def step(x):
            module(x).backward(grad)
        return step, None
    # lr small enough that hundreds of steps on random data stay finite for every rule.
    optimizer = torch.optim.SGD(module.parameters(), lr=1e-4, momentum=0.9)

    def step(x):
        torch.nn.functional.cross_entropy(module(x), target).backward()
        optimizer.step()
    return step, optimizer


def max_rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|, in float64."""
    out, ref = out.detach().double(), ref.detach().double()
    scale = ref.abs().max().item() if ref.numel() else 0.0
    error = (out - ref).abs().max().item() if ref.numel() else 0.0
    return error / scale if scale > 0 else error


def variant_specs(rules: list, backends: list, peer_names: list, compile_rules: Optional[list],
                  model: bool = False, compile_models: bool = True, model_rules: Optional[list] = None) -> list:
    """[(rule, backend)]: every rule on every fastfa backend, then each peer for the rules it has.

    The compile peer gets only ``compile_rules`` (all when None), and no model unless ``compile_models``;
    a model gets only ``model_rules`` (all when None).
    """
    if model and model_rules is not None:
        rules = [rule for rule in rules if rule in model_rules]
    specs = [(rule, backend) for backend in backends for rule in rules]
    for name in peer_names:
        for rule in rules:
            if name == "biotorch" and rule not in peers.biotorch_rules():
                continue
            if rule == "dfa" and name != "biotorch":
                continue  # the autograd.Function peers are per layer; dfa's grad_input needs the model's output
            if name == "compile" and ((compile_rules is not None and rule not in compile_rules)
                                      or (model and not compile_models)):
                continue
            specs.append((rule, PEER_BACKENDS[name]))
    return specs


def step_targets(case: Case, module, x, device, dtype, generator) -> tuple:
    """(output gradient for a layer, class targets for a model)."""
    if case.is_model:
        return None, torch.randint(0, case.classes, (case.batch,), generator=generator).to(device)
    with torch.no_grad():
        out = module(x)
    grad = torch.randn(out.shape, generator=generator).to(device, dtype)
    if case.channels_last:
        grad = grad.contiguous(memory_format=torch.channels_last)
    return grad, None
