"""fastfa's Triton kernels (installed as fastfa.triton_kernels), one module per op family.

    feedback.py   the rule transform as @triton.jit functions (B = T(W) per tile, the Philox draw)
    linear.py     fastfa::triton_linear / triton_linear_backward, and the GEMM pieces conv2d.py
                  shares (gemm_configs, grouped_tile, apply_activation, activation_delta, draw_noise,
                  materialise_feedback, rows_bucket_of)
    conv2d.py     fastfa::triton_conv2d / triton_conv2d_backward (implicit GEMMs)

fastfa imports these modules on first use of the triton backend (fastfa.ops._TritonOp),
never at ``import fastfa``: Triton reads TRITON_INTERPRET when a kernel is defined.

What every op module's launchers share is here: ``launch`` (a kernel call through
torch.library.wrap_triton), ``input_precision`` (TF32 only where torch allows it) and
``unsupported_reason`` (why a call must fall back to aten, or None).
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.library import wrap_triton

from .feedback import INTERPRETED

__all__ = ["launch", "input_precision", "unsupported_reason"]


def launch(kernel, grid, *args, **kwargs) -> None:
    """``wrap_triton(kernel)[grid](*args, **kwargs)``, so torch.compile sees the kernel."""
    if INTERPRETED.value:
        # An interpreted kernel cannot be traced: it is launched as it is (as newer torch's
        # wrap_triton hands it back; torch 2.11's refuses a plain @triton.jit one), and needs
        # real data: a shape-only (fake) pass, as opcheck runs, has made its outputs already.
        if not any(isinstance(a, torch.Tensor) and is_fake(a) for a in args):
            kernel[grid](*args, **kwargs)
        return
    wrap_triton(kernel)[grid](*args, **kwargs)


def input_precision(dtype) -> str:
    """tl.dot's input_precision for fp32 operands: "tf32" only where torch's matmuls may use it."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def unsupported_reason(tensor) -> str | None:
    """Why the Triton kernels cannot run a call on ``tensor`` (its dtype and device), or None."""
    if tensor.dtype == torch.float64:
        return "fp64: the Triton kernels compute in fp32"
    if tensor.device.type == "cpu" and not INTERPRETED.value:
        return "CPU tensors need TRITON_INTERPRET=1 (Triton's interpreter)"
    if tensor.device.type not in ("cpu", "cuda"):
        return f"tensors on {tensor.device}"
    return None
