"""FASTFA_TRITON_AUTOTUNE: the GEMM kernels' autotune configurations as compiled for a GPU.

Under the interpreter every kernel has one small configuration whatever the variable says, so the
kernels are imported in a fresh process without TRITON_INTERPRET (no GPU is needed to define them).
"""

import os
import subprocess
import sys

import pytest

import fastfa

pytest.importorskip("triton")

SCRIPT = """
from triton.runtime.autotuner import Autotuner
import fastfa.triton_kernels.conv2d as C
import fastfa.triton_kernels.linear as L
tuned = [k for m in (L, C) for k in vars(m).values() if isinstance(k, Autotuner)]
print(len(tuned), sorted({len(k.configs) for k in tuned}),
      sorted({tuple(sorted(c.kwargs.items())) + (c.num_warps, c.num_stages) for k in tuned for c in k.configs})[:1])
"""


def _kernels_with(autotune):
    env = {key: value for key, value in os.environ.items() if key not in ("TRITON_INTERPRET", "FASTFA_TRITON_AUTOTUNE")}
    if autotune is not None:
        env["FASTFA_TRITON_AUTOTUNE"] = autotune
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(os.path.dirname(fastfa.__file__)),
                                                      env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)


def test_autotune_0_gives_every_gemm_kernel_one_configuration():
    default, single = _kernels_with(None), _kernels_with("0")
    assert default.returncode == 0 and single.returncode == 0, default.stderr[-2000:] + single.stderr[-2000:]
    count, sizes, _ = default.stdout.split(" ", 2)
    assert int(count) >= 6 and sizes == "[9]", default.stdout  # linear's and conv2d's three GEMMs, all tuned
    assert single.stdout.startswith(f"{count} [1] "), single.stdout
    # The configuration the sm_90 compile checks verify.
    assert "('BLOCK_K', 64), ('BLOCK_M', 64), ('BLOCK_N', 128), ('GROUP_M', 8), 4, 3" in single.stdout, single.stdout


def test_autotune_other_values_are_refused_by_name():
    result = _kernels_with("full")
    assert result.returncode != 0
    assert "FASTFA_TRITON_AUTOTUNE must be 1" in result.stderr and "'full'" in result.stderr, result.stderr[-2000:]
