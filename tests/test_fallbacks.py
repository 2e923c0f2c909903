"""The fallback record (csrc/fallbacks.cpp) and the path assertion the GPU tests make with it
(fallback_paths.expect_fallbacks), on the CPU.

The cuda backend's ops write the record from C++ (fastfa._C._record_fallback is that same C++
function); the triton backend's through fastfa._backend.record_fallback. Here the assertion
is shown to fail when a call falls back where the backend's own kernels were expected, and
when one runs them where a fallback was expected; through the C++ record directly, and
through real Triton calls under the interpreter (fp64 falls back there).
"""

import threading

import pytest
import torch
from fallback_paths import expect_fallbacks

import fastfa
from fastfa import _C

# What a cuda-backend op records when FASTFA_CUDA_FORCE_ATEN is set (csrc/cuda/fused_ops.h).
FORCED = "forced by FASTFA_CUDA_FORCE_ATEN (the environment variable sends every call to the aten path)"


@pytest.fixture(autouse=True)
def _empty_record():
    fastfa.clear_fallbacks()
    yield
    fastfa.clear_fallbacks()


def test_one_record_for_cpp_and_python_counted_in_order():
    _C._record_fallback("cuda_linear", "fp64")
    fastfa._backend.record_fallback("triton_linear", "fp64 (Triton's tensor cores)")
    _C._record_fallback("cuda_linear", "fp64")
    _C._record_fallback("cuda_linear", "fp64", "other")
    assert fastfa.last_fallbacks() == [fastfa.Fallback("cuda_linear", "aten", "fp64", 2),
                                       fastfa.Fallback("triton_linear", "aten", "fp64 (Triton's tensor cores)", 1),
                                       fastfa.Fallback("cuda_linear", "other", "fp64", 1)]
    fastfa.clear_fallbacks()
    assert fastfa.last_fallbacks() == []


def test_threads_recording_at_once_lose_no_count():
    def record():
        for _ in range(2000):
            fastfa._backend.record_fallback("triton_conv2d", "fp64")
            _C._record_fallback("cuda_conv2d", "groups > 1")

    threads = [threading.Thread(target=record) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(fastfa.last_fallbacks()) == [fastfa.Fallback("cuda_conv2d", "aten", "groups > 1", 8000),
                                               fastfa.Fallback("triton_conv2d", "aten", "fp64", 8000)]


def test_expect_fallbacks_fails_when_a_fused_call_falls_back():
    # What a cuda-backend linear call records under FASTFA_CUDA_FORCE_ATEN=1, where the test
    # expects the fused kernels.
    with pytest.raises(AssertionError, match="fell back where the backend's own kernels should have run: "
                                             "cuda_linear \\(1x\\): forced by FASTFA_CUDA_FORCE_ATEN"):
        with expect_fallbacks():
            _C._record_fallback("cuda_linear", FORCED)
    # Forced, a backward that should fall back only for B's gradient gives another reason.
    with pytest.raises(AssertionError, match="(?s)fell back where.*no fallback recorded.*B's gradient"):
        with expect_fallbacks(("cuda_linear_backward", "B's gradient")):
            _C._record_fallback("cuda_linear_backward", FORCED)
    assert fastfa.last_fallbacks() == []


def test_expect_fallbacks_fails_when_an_expected_fallback_is_missing():
    with pytest.raises(AssertionError, match="no fallback recorded where one was expected.*cuda_conv2d_backward: "
                                             "...grad_input of a strided conv2d..."):
        with expect_fallbacks(("cuda_conv2d_backward", "grad_input of a strided conv2d")):
            pass
    # One record cannot satisfy two expectations.
    with pytest.raises(AssertionError, match="no fallback recorded"):
        with expect_fallbacks(("cuda_conv2d_backward", "strided"), ("cuda_conv2d_backward", "B's gradient")):
            _C._record_fallback("cuda_conv2d_backward", "grad_input of a strided conv2d and B's gradient")


def test_expect_fallbacks_passes_when_the_paths_are_as_expected():
    with expect_fallbacks():
        pass
    with expect_fallbacks(("cuda_conv2d_backward", "strided"), ("cuda_conv2d_backward", "B's gradient")):
        _C._record_fallback("cuda_conv2d_backward", "grad_input of a strided conv2d (...)")
        _C._record_fallback("cuda_conv2d_backward", "B's gradient for wm, aa and ia (...)")
    assert fastfa.last_fallbacks() == []


def test_a_block_that_raises_is_not_masked():
    with pytest.raises(ValueError, match="from the block"):
        with expect_fallbacks(("cuda_linear", "fp64")):
            raise ValueError("from the block")


triton_usable = pytest.mark.skipif(not fastfa.backends()["triton"].usable,
                                   reason="the triton backend is not usable here")


@triton_usable
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_expect_fallbacks_through_triton_calls(dtype):
    """Real calls: fp64 falls back on the triton backend, fp32 runs its kernels. The assertion
    passes with the right expectation and fails with the other one."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(5, 6, dtype=dtype, device=device, requires_grad=True)
    w = torch.randn(4, 6, dtype=dtype, device=device, requires_grad=True)

    def call():
        fastfa.functional.linear(x, w, rule="usf", backend="triton").sum().backward()

    falls_back = [("triton_linear", "fp64"), ("triton_linear_backward", "fp64")]
    right, wrong = (falls_back, []) if dtype == torch.float64 else ([], falls_back)
    with expect_fallbacks(*right):
        call()
    failure = "fell back where" if dtype == torch.float64 else "no fallback recorded"
    with pytest.raises(AssertionError, match=failure):
        with expect_fallbacks(*wrong):
            call()


@triton_usable
def test_the_triton_status_counts_only_triton_fallbacks():
    _C._record_fallback("cuda_linear", "fp64")
    assert "fell back" not in fastfa.backends()["triton"].reason
    fastfa._backend.record_fallback("triton_linear", "fp64")
    assert "1 call(s) fell back to aten" in fastfa.backends()["triton"].reason
