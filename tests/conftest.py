import contextlib
import importlib.util
import os
import sys
import zlib

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

# Without a GPU the Triton kernels run under Triton's interpreter on CPU tensors. Triton
# reads the variable when a kernel is defined, and fastfa loads its Triton kernels only
# on first use, so setting it here, before any test runs, is early enough.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastfa  # noqa: E402


def pytest_configure(config):
    # TRITON_INTERPRET=0 on a machine without a GPU leaves the triton backend nowhere to run, and
    # every Triton test would skip on one line of pytest's summary: refuse the run, with the reason.
    triton = fastfa.backends()["triton"]
    if not torch.cuda.is_available() and importlib.util.find_spec("triton") and not triton.usable:
        raise pytest.UsageError(
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r} and no GPU: the Triton tests cannot run "
            f"({triton.reason}). Unset TRITON_INTERPRET (the tests then run Triton's interpreter on CPU "
            "tensors) or run on a GPU.")

# (atol, rtol) per dtype, relative to the oracle computed from the same inputs.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-4),
    torch.bfloat16: (3e-2, 3e-2),
    torch.float16: (3e-3, 3e-3),
}


def assert_close(actual, expected, dtype, what=""):
    atol, rtol = TOLERANCES[dtype]
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    # Scale atol by the tensor's magnitude: a sum over a fan-in rounds relative to its terms.
    scale = max(1.0, float(expected.detach().abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, atol=atol * scale, rtol=rtol, msg=lambda m: f"{what}: {m}")


@contextlib.contextmanager
def forced_triton_draw(path: str, module, monkeypatch):
    """Make the Triton grad_input draw a drawn B one way whatever the rows, through the cost model
    it asks (triton_kernels/linear.py, draws_once): "materialised" (drawn once, then read: an
    in-GEMM draw modelled ruinously slow) or "fused" (drawn in the GEMM: no identity kernel to read
    a B made once). Yields the list of B shapes `module` (linear or conv2d) materialised, so a test
    checks the path it forced is the one that ran."""
    from fastfa import _backend
    fractions = dict(_backend.AUTO_COSTS.fused_fraction)
    if path == "materialised":
        fractions.update({("triton", "brsf"): 1e-9, ("triton", "fa"): 1e-9})
    else:
        fractions[("triton", "bp")] = 0.0
    made = []
    materialise = module.materialise_feedback

    def spy(weight, *args):
        made.append(tuple(weight.shape))
        return materialise(weight, *args)

    monkeypatch.setattr(module, "materialise_feedback", spy)
    previous = _backend.auto_costs()
    _backend.set_auto_costs(_backend.AUTO_COSTS._replace(fused_fraction=fractions))
    try:
        yield made
    finally:
        _backend.set_auto_costs(previous)


def away_from_relu_kink(grad_output, preactivation, activation):
    """grad_output with zeros where relu's derivative would read a pre-activation near 0.

    relu' jumps at 0, and two backends (or a backend and the fp64 oracle) that sum a
    pre-activation in different orders may round a tiny one to opposite sides, so one
    output's whole gradient differs while both are right. No gradient flows through those
    outputs here; everything else is compared as it is. Other activations are smooth.
    """
    if activation != "relu":
        return grad_output
    z = preactivation.detach().abs()
    near = (z <= 1e-2 * z.max()).to(grad_output.device)
    return grad_output.masked_fill(near, 0)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # Fresh random inputs for every test, reproducible from the test's name: crc32, not hash(),
    # which Python salts per process.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


# --- skipped tests by category (README's Tests section) ----------------------------------------------
# The first category whose words (lower case) a skip reason contains takes it; a reason no category
# knows is printed as it is, so that a new kind of skip is seen. A module skipped whole (an
# importorskip at its top) counts once.
SKIP_CATEGORIES = (
    ("needs a GPU", ("gpu", "cuda device")),
    ("needs the CUDA toolchain or a CUDA build of fastfa._C",
     ("nvcc", "ptxas", "cuobjdump", "nvdisasm", "cutlass", "nvidia backend", "fused cuda kernels")),
    ("optional package not installed", ("biotorch", "could not import", "no module named", "matplotlib")),
    ("needs more of this machine", ("free memory", "/proc/")),
)


def skip_category(reason: str) -> str:
    text = reason.lower()
    return next((name for name, words in SKIP_CATEGORIES if any(word in text for word in words)),
                f"other: {reason}")


def pytest_terminal_summary(terminalreporter):
    skipped = terminalreporter.stats.get("skipped", [])
    if not skipped:
        return
    counts = {}
    for report in skipped:
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        category = skip_category(reason.removeprefix("Skipped: "))
        counts[category] = counts.get(category, 0) + 1
    terminalreporter.section("skipped tests by category")
    for category, count in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        terminalreporter.write_line(f"{count:6d}  {category}")
