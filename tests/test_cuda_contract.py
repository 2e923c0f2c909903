"""The cuda backend's op contract, checked without a GPU: the same schemas as the aten ops,
shape (fake) kernels, a reason in fastfa.backends() wherever it is not usable, and the
fallback reasons that the GPU tests expect."""

import pathlib
import re

import pytest
import test_cuda
import test_fallbacks
import torch

import fastfa
from fastfa.rules import Rule

CUDA_SOURCES = pathlib.Path(__file__).resolve().parent.parent / "csrc" / "cuda"

OPS = ("linear", "linear_backward", "conv2d", "conv2d_backward")


@pytest.mark.parametrize("op", OPS)
def test_cuda_ops_have_the_aten_ops_schemas(op):
    aten, cuda = (getattr(torch.ops.fastfa, name).default._schema for name in (op, f"cuda_{op}"))
    assert str(cuda).startswith(f"fastfa::cuda_{op}(")
    assert str(cuda).replace("fastfa::cuda_", "fastfa::", 1) == str(aten)


def test_cuda_linear_fake_kernels_give_the_aten_shapes():
    x = torch.empty(3, 5, 7, device="meta", dtype=torch.bfloat16)
    w = torch.empty(4, 7, device="meta", dtype=torch.bfloat16)
    b = torch.empty(4, device="meta", dtype=torch.bfloat16)
    args = (None, None, int(Rule.AA), 1.0, 0, [0.0, 0.0, 0.0, 1.0], "gelu")
    for op in ("linear", "cuda_linear"):
        out, saved, projection = getattr(torch.ops.fastfa, op)(x, w, b, *args)
        assert out.shape == saved.shape == projection.shape == (3, 5, 4)
    grads = torch.ops.fastfa.cuda_linear_backward(torch.empty(3, 5, 4, device="meta", dtype=torch.bfloat16), x, w,
                                                  None, None, x.new_empty(0), x.new_empty(0), int(Rule.USF), 1.0, 0,
                                                  [0.0, 0.0, 0.0, 1.0], "none", [True, True, True, False])
    assert [tuple(g.shape) for g in grads] == [(3, 5, 7), (4, 7), (4,), (0,)]


def test_cuda_backend_status_says_why():
    status = fastfa.backends()["cuda"]
    assert status.reason
    if not status.usable:
        with pytest.raises(RuntimeError, match="backend 'cuda' is not usable here"):
            fastfa.functional.linear(torch.randn(2, 3), torch.randn(4, 3), rule="usf", backend="cuda")
    else:
        with pytest.raises(RuntimeError, match="backend 'cuda' runs on CUDA tensors"):
            fastfa.functional.linear(torch.randn(2, 3), torch.randn(4, 3), rule="usf", backend="cuda")
    # "auto" on CPU tensors is aten (on a GPU: the cuda backend's per-pass choice, test_auto_dispatch.py).
    assert fastfa._backend.resolve(None, torch.device("cpu")) == "aten"


@pytest.mark.parametrize("fragment", sorted(test_cuda.REASONS.values()) + [test_fallbacks.FORCED])
def test_the_reasons_the_gpu_tests_expect_are_the_ops_reasons(fragment):
    """test_cuda.py matches the cuda backend's fallback records by fragments of their reasons
    (and test_fallbacks by the forced one, whole): each must be in a string that csrc/cuda's
    ops can record, or the GPU tests would fail on wording alone."""
    literals = []
    for source in ("fused_ops.h", "linear_cuda.cu", "conv_cuda.cu"):
        text = (CUDA_SOURCES / source).read_text()
        # Adjacent C++ string literals are one string, as the compiler joins them.
        for run in re.finditer(r'(?:"(?:[^"\\]|\\.)*"\s*)+', text):
            literals.append("".join(re.findall(r'"((?:[^"\\]|\\.)*)"', run.group(0))))
    assert any(fragment in literal for literal in literals), f"no string in csrc/cuda contains {fragment!r}"
