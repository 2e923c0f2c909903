"""torch.compile(fullgraph=True) over fastfa layers: no graph break, same results as eager."""

import pytest
import torch

import fastfa


class Block(torch.nn.Module):
    def __init__(self, rule):
        super().__init__()
        self.conv = fastfa.nn.Conv2d(3, 8, 3, padding=1, rule=rule, activation="relu", seed=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.conv2 = fastfa.nn.Conv2d(8, 8, 3, stride=2, padding="valid", rule=rule, seed=2)
        self.fc = fastfa.nn.Linear(8 * 3 * 3, 10, rule=rule, activation="gelu", seed=3)

    def forward(self, x):
        x = self.conv2(self.bn(self.conv(x)))
        return self.fc(x.flatten(1))


def _train_steps(model, batches):
    outputs = []
    for x in batches:
        model.zero_grad(set_to_none=True)
        y = model(x)
        y.square().mean().backward()
        outputs.append((y.detach(), [p.grad.clone() for p in model.parameters()]))
    return outputs


# Every rule through AOTAutograd; inductor (slow to compile on a CPU) on the rules with
# the most moving parts: brsf's step counter, usf's transform, fa's stored R.
CASES = [(rule, "aot_eager") for rule in fastfa.rules.LAYER_RULES] + [(rule, "inductor") for rule in ("brsf", "usf", "fa")]


@pytest.mark.parametrize("rule,backend", CASES)
def test_compile_fullgraph_matches_eager(rule, backend):
    torch._dynamo.reset()
    eager = Block(rule)
    compiled_model = Block(rule)
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, fullgraph=True, backend=backend)
    batches = [torch.randn(4, 3, 7, 7) for _ in range(3)]
    for (y, grads), (yc, grads_c) in zip(_train_steps(eager, batches), _train_steps(compiled, batches)):
        torch.testing.assert_close(yc, y, atol=1e-5, rtol=1e-5)
        for g, gc in zip(grads, grads_c):
            torch.testing.assert_close(gc, g, atol=1e-5, rtol=1e-5)
    # The brsf step counters advanced inside the compiled graph exactly as in eager.
    compiled_buffers = dict(compiled_model.named_buffers())
    for name, buffer in eager.named_buffers():
        if buffer.is_floating_point():
            torch.testing.assert_close(compiled_buffers[name], buffer, atol=1e-5, rtol=1e-5)
        else:
            assert torch.equal(compiled_buffers[name], buffer), name


def test_compile_functional_with_autocast():
    """Autocast inside a compiled function: bf16 output and fp32 gradients equal to eager's."""
    torch._dynamo.reset()
    w = torch.randn(6, 5, requires_grad=True)

    def step(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fastfa.functional.linear(x, w, rule="usf", activation="relu")

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 5)
    g = torch.randn(3, 6, dtype=torch.bfloat16)
    results = []
    for function in (step, compiled):
        w.grad = None
        xi = x.clone().requires_grad_(True)
        y = function(xi)
        y.backward(g)
        results.append((y, xi.grad, w.grad))
    for name, eager, compiled_result, dtype in zip(("output", "grad_input", "grad_weight"), *results,
                                                   (torch.bfloat16, torch.float32, torch.float32)):
        assert compiled_result.dtype == eager.dtype == dtype, name
        torch.testing.assert_close(compiled_result, eager, atol=0, rtol=0, msg=name)
