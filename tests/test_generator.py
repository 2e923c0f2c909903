"""The counter-based generator behind brsf (and regenerated fa): Philox-4x32-10."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import fastfa
import oracle
from fastfa.rules import Distribution, Rule

# Known-answer vectors of Random123 (Salmon et al. 2011) for philox4x32_10.
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", KNOWN_ANSWERS)
def test_oracle_philox_known_answers(counter, key, expected):
    words = oracle.philox4x32_10(*(np.array([c], dtype=np.uint64) for c in counter), *key)
    assert tuple(int(w[0]) for w in words) == expected


@pytest.mark.parametrize("distribution", ["uniform", "normal"])
def test_kernel_draws_equal_oracle(distribution):
    """fa regenerating R draws scale * xi: compare the kernel's xi with the oracle's."""
    seed, step = 2**40 + 12345, 2**33 + 7  # both words of seed and step are used
    weight = torch.empty(37, 53, dtype=torch.float64)
    rng = torch.tensor([seed, step])
    dist = Distribution.UNIFORM if distribution == "uniform" else Distribution.NORMAL
    drawn = torch.ops.fastfa.feedback_transform(weight, None, rng, int(Rule.FA), 1.0, int(dist))
    expected = torch.from_numpy(oracle.unit_draw(seed, step, weight.numel(), distribution)).double().reshape(37, 53)
    if distribution == "uniform":
        assert torch.equal(drawn, expected)
    else:  # log / cos from libm: equal up to float32 rounding
        torch.testing.assert_close(drawn, expected, atol=1e-6, rtol=1e-6)
    assert abs(float(drawn.mean())) < 0.1
    assert abs(float(drawn.std()) - (1.0 if distribution == "normal" else 3 ** -0.5)) < 0.05


def test_draws_differ_across_steps_seeds_and_elements():
    w = torch.ones(64, 64)

    def draw(seed, step):
        return fastfa.ops.feedback_transform(w, None, torch.tensor([seed, step]), int(Rule.BRSF), 1.0, 0)

    a, b, c = draw(1, 0), draw(1, 1), draw(2, 0)
    assert torch.equal(a, draw(1, 0))
    assert not torch.equal(a, b) and not torch.equal(a, c)
    assert a.unique().numel() > 0.99 * a.numel()


TRITON_SCRIPT = textwrap.dedent("""
    import numpy as np, torch, triton, triton.language as tl, sys
    sys.path.insert(0, sys.argv[1])
    import oracle

    @triton.jit
    def philox_kernel(out_ptr, seed, step, n, BLOCK: tl.constexpr):
        index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        zero = tl.zeros_like(index).to(tl.uint32)
        c0 = index.to(tl.uint32)
        c2 = zero + (step & 0xFFFFFFFF).to(tl.uint32)
        c3 = zero + (step >> 32).to(tl.uint32)
        x0, _, _, _ = tl.philox(seed, c0, zero, c2, c3)
        tl.store(out_ptr + index, x0.to(tl.int32, bitcast=True), mask=index < n)

    n, seed, step = 1000, 2**40 + 99, 2**33 + 5
    out = torch.empty(n, dtype=torch.int32)
    philox_kernel[(triton.cdiv(n, 128),)](out, seed, step, n, BLOCK=128)
    index = np.arange(n, dtype=np.uint64)
    words = oracle.philox4x32_10(index, 0, step & 0xFFFFFFFF, step >> 32, seed & 0xFFFFFFFF, seed >> 32)
    expected = words[0].astype(np.uint32).view(np.int32)
    assert np.array_equal(out.numpy(), expected), (out.numpy()[:4], expected[:4])
    print("triton philox matches")
""")


def test_triton_philox_reproduces_the_same_stream():
    """A Triton kernel calling tl.philox on (block, step) counters gets the same bits as fastfa."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", TRITON_SCRIPT, os.path.dirname(__file__)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "triton philox matches" in result.stdout
