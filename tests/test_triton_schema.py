"""The triton backend's ops take the aten ops' arguments.

torch infers a triton_op's schema from the op function's annotations (torch 2.11 ignores
``schema=``), and inference writes every int as SymInt and no list length: the triton
ops' schemas equal the aten ops' up to exactly that, on every torch fastfa supports.
"""

import re

import pytest
import torch

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
