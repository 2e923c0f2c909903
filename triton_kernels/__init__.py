"""fastfa's Triton kernels (installed as fastfa.triton_kernels), one module per op family.

    feedback.py   the rule transform as @triton.jit functions (B = T(W) per tile, the Philox draw)
    linear.py     fastfa::triton_linear / triton_linear_backward, and the GEMM pieces conv2d.py
                  shares (gemm_configs, grouped_tile, apply_activation, activation_delta, draw_noise,
                  materialise_feedback, rows_bucket_of)
    conv2d.py     fastfa::triton_conv2d / triton_conv2d_backward (implicit GEMMs)

fastfa imports these modules on first use of the triton backend (fastfa.ops._TritonOp),
never at ``import fastfa``: Triton reads TRITON_INTERPRET when a kernel is defined.

What every op module's launchers share is here: ``define_op`` (an op defined by
torch.library.triton_op, with CPU and CUDA kernels that skip its per-call wrappers), ``launch`` (a
kernel call through torch.library.wrap_triton), ``cdiv`` (grid sizes), ``input_precision`` (TF32
only where torch allows it) and ``unsupported_reason`` (why a call must fall back to aten, or None);
for kernels that load through tensor descriptors (TMA), ``tma_ready`` (whether a tensor meets TMA's
layout rules) and ``set_scratch_allocator`` (the memory their descriptors are written to).
"""

from __future__ import annotations

import threading

import torch
import triton
from torch._subclasses.fake_tensor import is_fake
from torch.library import triton_op, wrap_triton

from .feedback import INTERPRETED

__all__ = ["launch", "cdiv", "input_precision", "unsupported_reason", "define_op", "tma_ready",
           "set_scratch_allocator"]


class _Eager(threading.local):
    # True while an op's eager kernel runs (define_op): real tensors, nothing tracing.
    value = False


_eager = _Eager()


def launch(kernel, grid, *args, **kwargs) -> None:
    """``wrap_triton(kernel)[grid](*args, **kwargs)``, so torch.compile sees the kernel; in an
    op's eager kernel (real tensors) the kernel is launched as it is."""
    if _eager.value:
        kernel[grid](*args, **kwargs)
        return
    if INTERPRETED.value:
        # An interpreted kernel cannot be traced: it is launched as it is (as newer torch's
        # wrap_triton hands it back; torch 2.11's refuses a plain @triton.jit one), and needs
        # real data: a shape-only (fake) pass, as opcheck runs, has made its outputs already.
        if not any(isinstance(a, torch.Tensor) and is_fake(a) for a in args):
            kernel[grid](*args, **kwargs)
        return
    wrap_triton(kernel)[grid](*args, **kwargs)


# Kept alive: a Library's registrations last as long as it does.
_LIBRARY = torch.library.Library("fastfa", "IMPL")


def define_op(name: str):
    """Decorator: ``torch.library.triton_op(f"fastfa::{name}", mutates_args=())``, with the function
    also registered as the op's own CPU and CUDA kernel, in place of torch.library's for these calls
    (issue 14: host time per layer step).

    triton_op serves every device through custom_op's CompositeExplicitAutograd kernel, whose every
    call goes through three Python wrappers (backend_impl, a torch._dynamo.disable made on the fly,
    triton_op's backend_fn with a context manager) and checks in Python that no output aliases an
    input; about 10 µs a call on a small CPU, as much as the op's own Python
    (benchmarks/results/2026-12-01-triton-host-python.md). The dispatcher takes a
    kernel registered for a device's key before the alias key's, so these serve CPU and CUDA tensors:
    one torch.compiler.disable wrapper (Dynamo must not trace the kernel's frames, which a graph
    break's eager code would enter) and the flag that makes ``launch`` launch directly (what
    backend_fn's set_wrap_triton_enabled(False) does for wrap_triton). The aliasing check is left to
    opcheck (test_opcheck in tests/test_triton_linear.py, test_triton_conv2d.py): each op returns
    tensors it made. torch.compile does not reach
    these kernels: it traces the op into its Triton kernels through triton_op's FunctionalTensorMode
    rule, and runs ``fn`` on fake tensors as its fake kernel, as before."""

    def define(fn):
        op = triton_op(f"fastfa::{name}", fn, mutates_args=())

        def kernel(*args, **kwargs):
            previous = _eager.value
            _eager.value = True
            try:
                return fn(*args, **kwargs)
            finally:
                _eager.value = previous

        kernel = torch.compiler.disable(kernel)
        for key in ("CPU", "CUDA"):
            _LIBRARY.impl(name, kernel, key)
        return op

    return define


def cdiv(numerator, denominator):
    """ceil(numerator / denominator), for launch grids: what triton.cdiv computes, without its
    constexpr_function wrapper (Triton 3.6 and later: microseconds a call, two or three per
    launch). Sizes torch.compile traces symbolically divide as well."""
    return (numerator + denominator - 1) // denominator


def input_precision(dtype) -> str:
    """tl.dot's input_precision for fp32 operands: "tf32" only where torch's matmuls may use it."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def unsupported_reason(tensor) -> str | None:
    """Why the Triton kernels cannot run a call on ``tensor`` (its dtype and device), or None."""
    if tensor.dtype == torch.float64:
        return "fp64: the Triton kernels compute in fp32"
    # is_cuda / is_cpu, not device.type, which builds a string on each call (0.7 µs); a fake
    # tensor answers them for the device it stands for.
    if tensor.is_cuda:
        return None
    if tensor.is_cpu:
        return None if INTERPRETED.value else "CPU tensors need TRITON_INTERPRET=1 (Triton's interpreter)"
    return f"tensors on {tensor.device}"


def tma_ready(tensor) -> bool:
    """Whether a 2-D tensor can be read through a tensor descriptor (Hopper's TMA): its last stride 1,
    the other stride and its address multiples of 16 bytes. Its rows must not repeat or overlap
    either (an expanded gradient's stride 0), which TMA's descriptors are not documented to allow.
    A fake tensor (torch.compile's tracing) has no address: its storage offset stands for it, as
    torch's allocators align every storage."""
    size = tensor.element_size()
    if (tensor.dim() != 2 or tensor.stride(1) != 1 or tensor.stride(0) < tensor.shape[1]
            or tensor.stride(0) * size % 16):
        return False
    if is_fake(tensor):
        return tensor.storage_offset() * size % 16 == 0
    return tensor.data_ptr() % 16 == 0


def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def set_scratch_allocator() -> None:
    """Sets Triton's allocator (torch's caching allocator) where none is set in this context.

    A kernel that makes tensor descriptors (tl.make_tensor_descriptor) writes each program's TMA
    descriptor to scratch memory, which Triton's launcher asks that allocator for. It is a context
    variable: the autograd engine runs the backward in threads of its own, whose context starts
    without one. A compiled graph sets its own: torch's inductor does before every launch
    (pytorch/pytorch#155358, torch 2.8 and newer). triton.runtime._allocation is the same in
    triton 3.6 and 3.8; an allocator the user set is kept.
    """
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch)
