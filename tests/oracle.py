"""The test oracle: plain PyTorch and NumPy written straight from learning-rules.md.

Nothing here imports fastfa's kernels. The generator is Philox-4x32-10 as Salmon et
al. define it (and Triton's tl.philox runs it), keyed by the seed, with counter
(block lo, block hi, step lo, step hi), block = element index // 4; the unit draw turns
its words into U(-1, 1) or N(0, 1) as the spec's "counter-based generator" note describes.
"""

from __future__ import annotations

import math

import numpy as np
import torch

ROUND_A, ROUND_B = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
KEY_A, KEY_B = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
MASK = np.uint64(0xFFFFFFFF)


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox-4x32-10 on uint64 arrays holding 32-bit words (products fit in 64 bits)."""
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) & MASK for c in (c0, c1, c2, c3))
    k0, k1 = np.uint64(k0) & MASK, np.uint64(k1) & MASK
    for _ in range(10):
        product_b, product_a = ROUND_B * c2, ROUND_A * c0
        c0, c1, c2, c3 = ((product_b >> np.uint64(32)) ^ c1 ^ k0, product_b & MASK,
                          (product_a >> np.uint64(32)) ^ c3 ^ k1, product_a & MASK)
        k0, k1 = (k0 + KEY_A) & MASK, (k1 + KEY_B) & MASK
    return c0, c1, c2, c3


def unit_uniform(bits) -> np.ndarray:
    """[0, 1) from 32 random bits: the signed value folded to non-negative, times 2^-31."""
    value = np.asarray(bits, dtype=np.uint64).astype(np.uint32).view(np.int32)
    value = np.where(value < 0, ~value, value)
    return value.astype(np.float32) * np.float32(4.6566127342e-10)


def unit_draw(seed: int, step: int, numel: int, distribution: str) -> np.ndarray:
    """xi for elements 0..numel-1 (row-major index in W's shape), float32.

    Element i takes word i % 4 of the Philox block at counter (i // 4, step); normal draws
    are Box-Muller on the word pairs (0, 1) and (2, 3): cos for the even element, sin for the odd.
    """
    block = np.arange((numel + 3) // 4, dtype=np.uint64)
    words = philox4x32_10(block & MASK, block >> np.uint64(32), np.uint64(step) & MASK,
                          np.uint64(step) >> np.uint64(32), np.uint64(seed) & MASK, np.uint64(seed) >> np.uint64(32))
    uniform = [unit_uniform(w) for w in words]
    if distribution == "uniform":
        xi = np.stack([np.float32(2.0) * u - np.float32(1.0) for u in uniform], axis=1)
    else:
        normals = []
        for u1, u2 in ((uniform[0], uniform[1]), (uniform[2], uniform[3])):
            radius = np.sqrt(np.float32(-2.0) * np.log(np.maximum(np.float32(1e-7), u1)))
            angle = np.float32(6.283185307179586) * u2
            normals += [radius * np.cos(angle), radius * np.sin(angle)]
        xi = np.stack(normals, axis=1)
    return xi.reshape(-1)[:numel].astype(np.float32)


def draw(seed: int, step: int, shape, distribution: str, scale: float, dtype=torch.float64) -> torch.Tensor:
    """R = scale * xi with W's shape."""
    xi = torch.from_numpy(unit_draw(seed, step, math.prod(shape), distribution)).reshape(shape)
    return _in_opmath(xi, dtype) * scale


def _in_opmath(t: torch.Tensor, dtype) -> torch.Tensor:
    return t.to(torch.float64 if dtype == torch.float64 else torch.float32)


def rms(w: torch.Tensor) -> torch.Tensor:
    """usf's "rms" scale ||W|| / sqrt(numel(W)), so that ||s sign(W)|| = ||W|| (W without zeros)."""
    return torch.linalg.vector_norm(w) / math.sqrt(max(w.numel(), 1))


def feedback_matrix(rule: str, weight: torch.Tensor, *, feedback=None, seed=None, step=None, scale=1.0,
                    distribution="uniform") -> torch.Tensor:
    """B per learning-rules.md; computed in float64 for fp64 weights, float32 otherwise, then rounded.
    usf's scale is a number or "rms" (taken from this W)."""
    w = _in_opmath(weight.detach(), weight.dtype)
    sign = torch.sign(w)  # sign(0) = 0
    if rule == "bp":
        b = w
    elif rule == "fa":
        b = _in_opmath(feedback, weight.dtype) if feedback is not None else draw(
            seed, step, weight.shape, distribution, scale, weight.dtype)
    elif rule == "usf":
        b = (rms(w) if scale == "rms" else scale) * sign
    elif rule == "brsf":
        b = draw(seed, step, weight.shape, distribution, scale, weight.dtype).abs() * sign
    elif rule == "frsf":
        b = _in_opmath(feedback, weight.dtype).abs() * sign
    elif rule in ESTIMATED:
        b = _in_opmath(feedback, weight.dtype)  # the learned B
    else:
        raise ValueError(rule)
    return b.to(weight.dtype)


ESTIMATED = ("kp", "wm", "sa", "aa", "ia")

ACTIVATIONS = {
    "none": lambda z: z,
    "relu": torch.relu,
    "gelu": torch.nn.functional.gelu,
    "gelu_tanh": lambda z: torch.nn.functional.gelu(z, approximate="tanh"),
    "silu": torch.nn.functional.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}


def _delta(z: torch.Tensor, activation: str, grad_output: torch.Tensor):
    """y = act(z) and delta = dL/dz given dL/dy."""
    z = z.detach().requires_grad_(True)
    with torch.enable_grad():
        y = ACTIVATIONS[activation](z)
        (delta,) = torch.autograd.grad(y, z, grad_output)
    return y.detach(), delta


def linear(x, weight, bias, B, grad_output, activation="none"):
    """Forward and the three gradients of a Linear layer with feedback B (leading dims folded)."""
    z = torch.nn.functional.linear(x, weight, bias)
    y, delta = _delta(z, activation, grad_output)
    delta2 = delta.reshape(-1, weight.shape[0])
    x2 = x.reshape(-1, weight.shape[1])
    grad_x = (delta2 @ B).reshape(x.shape)  # grad_x = delta B
    grad_w = delta2.t() @ x2  # grad_W = delta^T x
    grad_b = delta2.sum(0) if bias is not None else None
    return y, grad_x, grad_w, grad_b


def conv2d(x, weight, bias, B, grad_output, stride=1, padding=0, dilation=1, groups=1, activation="none"):
    """Forward and gradients of a Conv2d with feedback B: grad_x = conv2d_input(x.shape, B, delta)."""
    z = torch.nn.functional.conv2d(x, weight, bias, stride, padding, dilation, groups)
    y, delta = _delta(z, activation, grad_output)
    grad_x = torch.nn.grad.conv2d_input(x.shape, B, delta, stride, padding, dilation, groups)
    grad_w = torch.nn.grad.conv2d_weight(x, weight.shape, delta, stride, padding, dilation, groups)
    grad_b = delta.sum((0, 2, 3)) if bias is not None else None
    return y, grad_x, grad_w, grad_b


# --- the alignment pipeline (learning-rules.md, "The alignment pipeline's options") -------------------


def _rows(t):
    return t.reshape(t.shape[0], -1)


def _center_rows(t):
    return (_rows(t) - _rows(t).mean(dim=1, keepdim=True)).reshape(t.shape)


def _normalize_rows(t):
    centered = _rows(_center_rows(t))
    return (centered / torch.linalg.vector_norm(centered, dim=1, keepdim=True)).reshape(t.shape)


def _output_step(t, center, normalize, batch_center=False):
    """Step 6 (and step 2 for the input): per sample, then over the batch."""
    if normalize:
        t = _normalize_rows(t)
    elif center:
        t = _center_rows(t)
    if batch_center:
        t = t - t.mean(dim=0, keepdim=True)
    return t


def alignment_pipeline_gradient(rule, x, weight, bias, B, *, alpha, beta, gamma=0.0, activation="none",
                                conv=None, noise=None, **switches):
    """B's gradient from the pipeline's loss, by autograd of the loss as the spec writes it (fp64).

    conv: None (linear; x is (N, in)) or (stride, padding, dilation, groups). noise: the tensor that
    replaces x (steps 1), or None. switches: the spec's switch names, True where on.
    """
    on = lambda name: bool(switches.get(name, False))  # noqa: E731
    unknown = set(switches) - {"center_input", "normalize_input", "batch_center_backward_input", "use_bias_forward",
                               "use_bias_backward", "activation_forward", "activation_backward",
                               "center_forward_output", "normalize_forward_output", "batch_center_forward_output",
                               "center_backward_output", "normalize_backward_output", "reconstruction_amp",
                               "reconstruction_reversal", "use_sparse"}
    assert not unknown, unknown
    w = weight.detach().double()
    b = None if bias is None else bias.detach().double()
    fb = B.detach().double().requires_grad_(True)
    x = (x if noise is None else noise).detach().double()
    n = x.shape[0]
    if conv is None:
        forward_map = lambda t, m: t @ m.t()  # noqa: E731
        back_map = lambda t, m: t @ m  # noqa: E731
        add_bias = lambda t: t + b  # noqa: E731
    else:
        stride, padding, dilation, groups = conv
        forward_map = lambda t, m: torch.nn.functional.conv2d(t, m, None, stride, padding, dilation, groups)  # noqa
        back_map = lambda t, m: torch.nn.grad.conv2d_input(x.shape, m, t, stride, padding, dilation, groups)  # noqa
        add_bias = lambda t: t + b[None, :, None, None]  # noqa: E731
    with torch.enable_grad():
        x = _output_step(x, on("center_input"), on("normalize_input"))  # step 2
        x_f = x  # step 3
        x_b = x - x.mean(dim=0, keepdim=True) if on("batch_center_backward_input") else x
        r, p = forward_map(x_f, w), forward_map(x_b, fb)  # step 4
        if on("use_bias_forward"):
            r = add_bias(r)
        if on("use_bias_backward"):
            p = add_bias(p)
        if on("activation_forward"):
            r = ACTIVATIONS[activation](r)
        if on("activation_backward"):
            p = ACTIVATIONS[activation](p)
        r_rec, p_rec = back_map(r, fb), back_map(p, w)  # step 5
        forward_out = dict(center=on("center_forward_output"), normalize=on("normalize_forward_output"),
                           batch_center=on("batch_center_forward_output"))
        backward_out = dict(center=on("center_backward_output"), normalize=on("normalize_backward_output"))
        r, r_rec = _output_step(r, **forward_out), _output_step(r_rec, **forward_out)  # step 6
        p, p_rec = _output_step(p, **backward_out), _output_step(p_rec, **backward_out)

        def amp(u, v):
            return -(_rows(u) * _rows(v)).sum() / n

        def mean_square(u):
            return (_rows(u) ** 2).sum() / n

        decay = (fb ** 2).sum()
        if rule == "wm":
            loss = alpha * decay + beta * amp(r, p)
        elif rule == "aa":
            loss = alpha * mean_square(p) + beta * amp(r, p)
        elif rule == "ia":
            reconstruction = p_rec if on("reconstruction_reversal") else r_rec
            first = amp(x_f, reconstruction) if on("reconstruction_amp") else amp(r, p)
            last = mean_square(p) if on("use_sparse") else decay
            loss = alpha * first + beta * mean_square(reconstruction) + gamma * last
        else:
            raise ValueError(rule)
        (gradient,) = torch.autograd.grad(loss, fb)
    return gradient
