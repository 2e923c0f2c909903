"""dfa's grad_input = e B_l on the Triton backend, with B_l's tiles drawn inside the product.

B_l (K x F) is fa's drawn R for a "weight" of shape (K, F): element (k, f) is
scale * xi(seed, step 0, k * F + f) (fastfa.dfa). So linear's grad_input kernel, run with
rule fa and no stored R, computes e B_l with e as its delta (K its contraction), drawing each
B_l tile from (seed, index) as it goes and never writing B_l to memory. It reads nothing of
its weight operand for fa (only the draw), so a zero-stride placeholder of shape (K, F)
stands in for it.

It is an op, fastfa::triton_direct_feedback_product, with fastfa::direct_feedback_product's
schema: dfa's C++ join (pybind_src/direct_feedback_join.cpp) calls it through the dispatcher,
as it calls the aten and cuda backends' products.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import _backend
from . import cdiv, define_op, input_precision, launch, unsupported_reason
from .linear import _draw_arguments, _grad_input_kernel, rows_bucket_of

_FA = 1

__all__ = ["direct_feedback_product"]


def _check_product(error, rng, input_numel, scale, distribution, block_elements) -> None:
    """fastfa::direct_feedback_product's argument errors (csrc/direct_feedback.cpp), before any kernel
    runs; in Python, as the other Triton ops' checks, so that a traced call (symbolic shapes) passes."""
    if error.dim() != 2:
        raise RuntimeError(f"fastfa: error must be e as a (rows, K) matrix, got shape {tuple(error.shape)}")
    if not error.dtype.is_floating_point:
        raise RuntimeError(f"fastfa: error must be floating-point, got {error.dtype}")
    if rng.dtype != torch.int64 or rng.dim() != 1 or rng.shape[0] != 2:
        raise RuntimeError(f"fastfa: rng must be an int64 tensor [seed, step], got {rng.dtype} of shape "
                           f"{tuple(rng.shape)}")
    if input_numel < 0:
        raise RuntimeError(f"fastfa: columns (F, B_l's width) must be non-negative, got {input_numel}")
    if distribution not in (0, 1):
        raise RuntimeError(f"fastfa: distribution must be 0 (uniform) or 1 (normal), got {distribution}")
    if not math.isfinite(scale):
        raise RuntimeError(f"fastfa: scale must be finite, got {scale}")
    if block_elements <= 0:
        raise RuntimeError(f"fastfa: block_elements must be positive, got {block_elements}")


@define_op("triton_direct_feedback_product")
def direct_feedback_product(error: Tensor, rng: Tensor, input_numel: int, scale: float, distribution: int,
                            block_elements: int) -> Tensor:
    """e [rows, K] @ B_l [K, F] -> [rows, F] in e's dtype; rng the layer's int64 [seed, step].

    Where the Triton kernels cannot run on e (fp64; CPU tensors without the interpreter), the aten
    product (B_l drawn block_elements at a time), recorded as a fallback.
    """
    _check_product(error, rng, input_numel, scale, distribution, block_elements)
    reason = unsupported_reason(error)
    if reason is not None:
        _backend.record_fallback("triton_dfa_grad_input", reason, "aten")
        return torch.ops.fastfa.direct_feedback_product.default(error, rng, input_numel, scale, distribution,
                                                                block_elements)
    rows, output_width = error.shape
    error = error.contiguous()
    grad_input = error.new_empty(rows, input_numel)
    if not grad_input.numel():
        return grad_input
    # The kernel reads no weight for fa without stored R: only shape and strides matter (and the
    # expanded placeholder is no tensor descriptor's layout: pointer loads).
    placeholder = error.new_empty(1).expand(output_width, input_numel)
    rng = rng.to(error.device)
    launch(_grad_input_kernel,
           lambda meta: (cdiv(input_numel, meta["BLOCK_N"]) * cdiv(rows, meta["BLOCK_M"]),),
           error, placeholder, placeholder, rng, grad_input, rows, output_width, input_numel,
           rows_bucket_of(rows), *error.stride(), *placeholder.stride(), *placeholder.stride(),
           scale, RULE=_FA, HAS_FEEDBACK=False, DISTRIBUTION=distribution, SCALE_FROM_WEIGHT=False,
           TENSOR_DESCRIPTORS=False, INPUT_PRECISION=input_precision(error.dtype), **_draw_arguments(_FA, None, input_numel))
    return grad_input

