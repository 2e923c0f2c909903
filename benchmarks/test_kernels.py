"""pytest-benchmark suite for fastfa's CPU kernels, so regressions show in the benchmark history.

    PYTHONPATH=python python -m pytest benchmarks --benchmark-only
    PYTHONPATH=python python -m pytest benchmarks --benchmark-only --benchmark-autosave   # keep a history
    PYTHONPATH=python python -m pytest benchmarks --benchmark-only --benchmark-compare    # against the last

Kept out of tests/ (the pass/fail suite): these time, they do not check. Each group puts
fastfa's step beside torch's own (the backprop baseline) so that a slower machine shows
as both moving, a slower kernel as one. The shapes are CPU-sized.
"""

import pytest
import torch

import fastfa
from fastfa.rules import Distribution, Rule, init_distribution, sign_scale

TRANSFORM_RULES = ("usf", "brsf", "frsf", "fa")
STEP_RULES = ("bp", "usf", "brsf", "kp")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.benchmark(group="feedback_transform")
@pytest.mark.parametrize("shape", [(1024, 1024), (256, 256, 3, 3)], ids=["linear 1024x1024", "conv 256x256x3x3"])
@pytest.mark.parametrize("rule", TRANSFORM_RULES)
def test_feedback_transform(benchmark, rule, shape):
    """B = T(W) in one pass (fa: the draw of R from (seed, step), as at a layer's construction)."""
    weight = torch.randn(shape)
    distribution, scale = init_distribution("kaiming", shape)
    rng = torch.tensor([7, 3], dtype=torch.int64)
    feedback = torch.randn(shape) if rule == "frsf" else None
    if rule == "usf":
        scale = sign_scale("xiao", shape)
    rule_id = int(getattr(Rule, rule.upper()))
    benchmark(fastfa.ops.feedback_transform, weight, feedback, rng if rule in ("brsf", "fa") else None, rule_id,
              scale, int(distribution if rule in ("brsf", "fa") else Distribution.UNIFORM))


def _layer_step(module, x, grad):
    def step():
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x).backward(grad)
    return step


@pytest.mark.benchmark(group="linear step 256x1024 -> 1024")
@pytest.mark.parametrize("rule", ("torch",) + STEP_RULES)
def test_linear_step(benchmark, rule):
    module = torch.nn.Linear(1024, 1024) if rule == "torch" else fastfa.nn.Linear(1024, 1024, rule=rule)
    x = torch.randn(256, 1024, requires_grad=True)
    benchmark(_layer_step(module, x, torch.randn(256, 1024)))


@pytest.mark.benchmark(group="conv2d step 8x64x28x28 -> 64, 3x3")
@pytest.mark.parametrize("layout", ("nchw", "channels_last"))
@pytest.mark.parametrize("rule", ("torch",) + STEP_RULES)
def test_conv2d_step(benchmark, rule, layout):
    make = torch.nn.Conv2d if rule == "torch" else lambda *a, **k: fastfa.nn.Conv2d(*a, rule=rule, **k)
    module = make(64, 64, 3, padding=1)
    x = torch.randn(8, 64, 28, 28)
    grad = torch.randn(8, 64, 28, 28)
    if layout == "channels_last":
        module = module.to(memory_format=torch.channels_last)
        x, grad = x.contiguous(memory_format=torch.channels_last), grad.contiguous(memory_format=torch.channels_last)
    benchmark(_layer_step(module, x.requires_grad_(True), grad))
