"""The triton backend's ops take the aten ops' arguments.

torch infers a triton_op's schema from the op function's annotations (torch 2.11 ignores
``schema=``), and inference writes every int as SymInt and no list length: the triton
ops' schemas equal the aten ops' up to exactly that, on every torch fastfa supports.
"""

import re

import pytest
import torch

from fastfa.rules import Rule

pytest.importorskip("triton")
# Registers the fastfa::triton_* ops; a broken module fails here, never skips.
from fastfa.triton_kernels import conv2d, linear  # noqa: E402, F401

OPS = ("linear", "linear_backward", "conv2d", "conv2d_backward")


def _arguments_and_returns(schema) -> str:
    # Inference cannot write int (it writes SymInt) or a fixed length (int[2] -> SymInt[]).
    text = str(schema)
    return re.sub(r"\[\d+\]", "[]", text[text.index("("):].replace("SymInt", "int"))


@pytest.mark.parametrize("op", OPS)
def test_triton_ops_take_the_aten_ops_arguments(op):
    aten, triton = (getattr(torch.ops.fastfa, name).default._schema for name in (op, f"triton_{op}"))
    assert str(triton).startswith(f"fastfa::triton_{op}(")
    assert _arguments_and_returns(triton) == _arguments_and_returns(aten)


def _layer_arguments(kind, dtype):
    """A small layer call (input, weight, bias, feedback, rng, [geometry,] rule, scale, distribution,
    alignment, activation): usf, whose B is a transform of W, with gelu (the pre-activation saved)."""
    if kind == "linear":
        tensors, geometry = [torch.randn(3, 7, dtype=dtype), torch.randn(5, 7, dtype=dtype)], []
    else:
        tensors, geometry = [torch.randn(2, 3, 5, 6, dtype=dtype), torch.randn(4, 3, 3, 3, dtype=dtype)], \
            [[1, 2], [1, 0], [1, 1], 1]
    bias = torch.randn(tensors[1].shape[0], dtype=dtype)
    return [*tensors, bias, None, None, *geometry, int(Rule.USF), 1.0, 0, [0.0, 0.0, 0.0, 1.0], "gelu"]


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_triton_ops_autograd_is_the_cpp_node(kind, dtype):
    """On CPU (and CUDA) tensors a Triton forward op's autograd is csrc/autograd.cpp's node, not
    torch.library's Python wrapper, across the schema difference (SymInt, bool[]); its gradients
    are the aten op's, the fp64 call's through the aten ops it falls back to."""
    arguments = _layer_arguments(kind, dtype)
    gradients = {}
    for op in (kind, f"triton_{kind}"):
        leaves = [tensor.clone().requires_grad_() for tensor in arguments[:3]]
        outputs = getattr(torch.ops.fastfa, op)(*leaves, *arguments[3:])
        if op.startswith("triton"):
            assert outputs[0].grad_fn.name() == f"fastfa::Triton{kind.capitalize()}Backward"
            assert outputs[1].grad_fn is outputs[0].grad_fn  # one node for the three outputs
        outputs[0].square().sum().backward()
        gradients[op] = [leaf.grad for leaf in leaves]
    tolerance = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else {}
    for aten, triton in zip(gradients[kind], gradients[f"triton_{kind}"]):
        torch.testing.assert_close(triton, aten, **tolerance)


@pytest.mark.parametrize("op", [*OPS, "direct_feedback_product"])
def test_triton_ops_have_their_own_cpu_and_cuda_kernels(op):
    """triton_kernels.define_op registers each op's function as its CPU and CUDA kernel, so a call on
    those devices skips custom_op's per-call Python wrappers (issue 14); torch.library's kernel for
    every device stays (CompositeExplicitAutograd), as does the fake kernel torch.compile traces."""
    from fastfa.triton_kernels import direct_feedback  # noqa: F401
    name = f"fastfa::triton_{op}"
    for key in ("CPU", "CUDA", "CompositeExplicitAutograd", "Meta"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, key), (name, key)
