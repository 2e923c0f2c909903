"""The CUDA twins: the transform kernel and the aten backend on a GPU against the CPU and the oracle.

Skipped without a CUDA device. On a GPU machine:
    pip install --no-build-isolation -e . && python -m pytest -q tests/test_cuda.py
"""

import pytest
import torch
from conftest import assert_close

import fastfa
from fastfa.rules import Distribution, Rule

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rule", list(Rule))
@pytest.mark.parametrize("distribution", list(Distribution))
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_transform_equals_cpu(rule, dtype, distribution, channels_last):
    if not fastfa._C.build_info()["cuda"]:
        pytest.fail("a GPU is visible but fastfa._C was built without CUDA: reinstall on this machine")
    weight = torch.randn(67, 33, 3, 5, dtype=dtype)
    weight[0, :4] = 0  # sign(0) = 0
    feedback = torch.randn_like(weight) if rule in (Rule.FA, Rule.FRSF) or rule >= Rule.KP else None
    rng = torch.tensor([2**40 + 3, 2**33 + 11])
    if channels_last:
        weight = weight.to(memory_format=torch.channels_last)
    cpu = torch.ops.fastfa.feedback_transform(weight, feedback, rng, int(rule), 0.37, int(distribution))
    gpu = torch.ops.fastfa.feedback_transform(weight.cuda(), None if feedback is None else feedback.cuda(),
                                              rng.cuda(), int(rule), 0.37, int(distribution))
    if distribution == Distribution.NORMAL and rule == Rule.BRSF:
        # logf / cosf differ by an ulp between glibc and CUDA's libdevice.
        torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-6, rtol=1e-5 if dtype != torch.bfloat16 else 1e-2)
    else:
        assert torch.equal(gpu.cpu(), cpu)
    # Drawn fa without stored R: the same generator, element for element.
    drawn_cpu = torch.ops.fastfa.feedback_transform(weight, None, rng, int(Rule.FA), 0.5, 0)
    drawn_gpu = torch.ops.fastfa.feedback_transform(weight.cuda(), None, rng.cuda(), int(Rule.FA), 0.5, 0)
    assert torch.equal(drawn_gpu.cpu(), drawn_cpu)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rule", fastfa.RULES)
def test_cuda_layers_match_cpu(rule, dtype):
    """The same layers on the GPU (cuBLAS / cuDNN) give the CPU's gradients up to rounding."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    for layer, shape in ((fastfa.nn.Linear(257, 129, rule=rule, seed=1), (33, 257)),
                         (fastfa.nn.Conv2d(16, 24, 3, stride=2, padding=1, groups=2, rule=rule, seed=1),
                          (5, 16, 19, 17))):
        layer = layer.double()
        x = torch.randn(shape, dtype=torch.float64)
        reference = _grads(layer, x)
        cuda_layer = _copy(layer).to(device="cuda", dtype=dtype)
        ours = _grads(cuda_layer, x.to(device="cuda", dtype=dtype))
        for a, b in zip(ours, reference):
            assert_close(a.double().cpu(), b, torch.bfloat16 if dtype != torch.float32 else torch.float32)


def _copy(layer):
    import copy

    return copy.deepcopy(layer)


def _grads(layer, x):
    x = x.clone().requires_grad_(True)
    y = layer(x)
    g = torch.ones_like(y)
    y.backward(g)
    return [y.detach(), x.grad, layer.weight.grad, layer.bias.grad]


def test_cuda_compile_fullgraph():
    model = torch.nn.Sequential(fastfa.nn.Conv2d(3, 8, 3, rule="brsf"), torch.nn.Flatten(),
                                fastfa.nn.Linear(8 * 6 * 6, 4, rule="usf")).cuda()
    compiled = torch.compile(model, fullgraph=True)
    compiled(torch.randn(2, 3, 8, 8, device="cuda")).sum().backward()
    assert int(model[0].feedback_rng[1]) == 1
