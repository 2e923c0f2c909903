"""dtypes, autocast, non-contiguous and channels_last inputs, zero-size batches."""

import pytest
import torch
from conftest import assert_close

import fastfa

RULES = fastfa.RULES


def _step(layer, x, g):
    x = x.detach().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    y = layer(x)
    y.backward(g)
    return y, x.grad, layer.weight.grad, layer.bias.grad


@pytest.mark.parametrize("rule", RULES)
def test_fp16_on_cpu(rule):
    layer = fastfa.nn.Linear(12, 6, rule=rule, dtype=torch.float16)
    x = torch.randn(5, 12, dtype=torch.float16)
    y, gx, gw, gb = _step(layer, x, torch.randn(5, 6, dtype=torch.float16))
    assert y.dtype == gx.dtype == gw.dtype == gb.dtype == torch.float16
    assert torch.isfinite(gx).all() and torch.isfinite(gw).all()
    conv = fastfa.nn.Conv2d(3, 4, 3, rule=rule, dtype=torch.float16)
    y, gx, gw, gb = _step(conv, torch.randn(2, 3, 6, 6, dtype=torch.float16), torch.randn(2, 4, 4, 4, dtype=torch.float16))
    assert gx.dtype == torch.float16 and torch.isfinite(gx).all() and torch.isfinite(gw).all()


@pytest.mark.parametrize("rule", RULES)
def test_autocast_bf16(rule):
    """Under autocast the layer runs in bf16 like torch's own; parameters' grads stay fp32."""
    layer = fastfa.nn.Linear(16, 8, rule=rule)
    conv = fastfa.nn.Conv2d(3, 8, 3, padding=1, rule=rule)
    x = torch.randn(4, 16, requires_grad=True)
    xc = torch.randn(2, 3, 5, 5, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        yc = conv(xc)
        reference = torch.nn.functional.linear(x, layer.weight, layer.bias)
    assert y.dtype == reference.dtype == torch.bfloat16
    assert yc.dtype == torch.bfloat16
    (y.float().sum() + yc.float().sum()).backward()
    assert x.grad.dtype == torch.float32 and layer.weight.grad.dtype == torch.float32
    assert xc.grad.dtype == torch.float32 and conv.weight.grad.dtype == torch.float32
    assert torch.isfinite(x.grad).all() and torch.isfinite(conv.weight.grad).all()


@pytest.mark.parametrize("rule", RULES)
def test_non_contiguous_inputs(rule):
    dtype = torch.float64
    layer = fastfa.nn.Linear(6, 5, rule=rule, dtype=dtype, seed=4)
    base = torch.randn(6, 9, dtype=dtype)
    x = base.t()[::2]  # transposed and sliced
    assert not x.is_contiguous()
    g = torch.randn(5, 5, dtype=dtype).t()
    twin = fastfa.nn.Linear(6, 5, rule=rule, dtype=dtype, seed=4)
    twin.load_state_dict(layer.state_dict())
    ours = _step(layer, x, g)
    theirs = _step(twin, x.contiguous(), g.contiguous())
    for a, b in zip(ours, theirs):
        assert_close(a, b, dtype)


@pytest.mark.parametrize("rule", RULES)
def test_channels_last(rule):
    dtype = torch.float32
    layer = fastfa.nn.Conv2d(8, 6, 3, padding=1, rule=rule, seed=2)
    twin = fastfa.nn.Conv2d(8, 6, 3, padding=1, rule=rule, seed=2)
    twin.load_state_dict(layer.state_dict())
    layer = layer.to(memory_format=torch.channels_last)
    x = torch.randn(2, 8, 7, 5)
    g = torch.randn(2, 6, 7, 5)
    ours = _step(layer, x.to(memory_format=torch.channels_last), g.to(memory_format=torch.channels_last))
    theirs = _step(twin, x, g)
    for a, b in zip(ours, theirs):
        assert_close(a, b.to(a.dtype), dtype)
    # The draw is keyed by the logical index: B does not depend on W's layout.
    assert torch.equal(layer.feedback_weight(), twin.feedback_weight())


@pytest.mark.parametrize("rule", RULES)
def test_zero_size_batch(rule):
    layer = fastfa.nn.Linear(4, 3, rule=rule)
    y, gx, gw, gb = _step(layer, torch.randn(0, 4), torch.randn(0, 3))
    assert y.shape == (0, 3) and gx.shape == (0, 4)
    assert torch.equal(gw, torch.zeros(3, 4)) and torch.equal(gb, torch.zeros(3))
    conv = fastfa.nn.Conv2d(2, 3, 3, padding=1, rule=rule)
    y, gx, gw, gb = _step(conv, torch.randn(0, 2, 5, 5), torch.randn(0, 3, 5, 5))
    assert y.shape == (0, 3, 5, 5) and gx.shape == (0, 2, 5, 5)
    assert torch.equal(gw, torch.zeros_like(gw)) and torch.equal(gb, torch.zeros(3))


def test_unbatched_conv_input():
    conv = fastfa.nn.Conv2d(2, 3, 3, rule="usf")
    x = torch.randn(2, 6, 6, requires_grad=True)
    y = conv(x)
    assert y.shape == (3, 4, 4)
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_input_grad_not_needed_skips_it():
    """A first layer (input without grad) gets weight and bias gradients only."""
    layer = fastfa.nn.Linear(4, 3, rule="brsf")
    layer(torch.randn(2, 4)).sum().backward()
    assert layer.weight.grad is not None and layer.bias.grad is not None
