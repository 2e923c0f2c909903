"""The suite's own setup (tests/conftest.py): without a GPU the Triton tests run Triton's
interpreter, or the run is refused with the reason; they never all skip on a summary line."""

import os
import subprocess
import sys

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))


def _pytest_without_gpu(triton_interpret, *args):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # no GPU, on any machine
    env.pop("TRITON_INTERPRET", None)
    if triton_interpret is not None:
        env["TRITON_INTERPRET"] = triton_interpret
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("value", ["0", ""])
def test_triton_interpret_off_without_a_gpu_refuses_the_run(value):
    pytest.importorskip("triton")
    result = _pytest_without_gpu(value, "--collect-only", os.path.join(TESTS, "test_triton_feedback.py"))
    assert result.returncode == pytest.ExitCode.USAGE_ERROR, result.stdout + result.stderr
    assert f"TRITON_INTERPRET={value!r} and no GPU: the Triton tests cannot run" in result.stderr, result.stderr


def test_triton_interpret_unset_without_a_gpu_runs_the_interpreter():
    pytest.importorskip("triton")
    result = _pytest_without_gpu(None, os.path.join(TESTS, "test_triton_linear.py"), "-k", "test_opcheck")
    assert result.returncode == pytest.ExitCode.OK and "1 passed" in result.stdout, result.stdout + result.stderr
