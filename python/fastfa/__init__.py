"""fastfa: training neural networks without weight transport, at backprop's speed.

Layers whose forward pass is the ordinary one and whose backward pass sends the error
back through a feedback matrix B (sign-symmetric, random, or learned) instead of W.

    import fastfa
    layer = fastfa.nn.Linear(1024, 1024, rule="usf")
    model = fastfa.convert(torchvision.models.resnet18(), "usf")
"""

from __future__ import annotations

__version__ = "0.1.0"

import torch  # noqa: E402  (loads libtorch, which fastfa._C links against)

try:
    from . import _C
except ImportError as error:  # pragma: no cover - depends on the install
    raise ImportError(
        "fastfa's compiled extension fastfa._C could not be loaded "
        f"({error}). Build it with `pip install --no-build-isolation -e .` "
        "against the torch you run with.") from error

from . import functional, metrics, nn, ops, rules  # noqa: E402
from ._backend import (BackendStatus, Fallback, backends, clear_fallbacks, cuda_fused, get_backend,  # noqa: E402
                       last_fallbacks, set_backend, set_cuda_fused, use_backend)
from .convert import convert  # noqa: E402
from .coverage import coverage  # noqa: E402
from . import alignment, amp, schedules  # noqa: E402
from .alignment import feedback_parameters  # noqa: E402
from .schedules import AlignmentSchedule, CoefficientSchedule  # noqa: E402
from .rules import ALIASES, RULES  # noqa: E402


def _warn_on_torch_mismatch() -> None:
    import warnings

    built = _C.build_info()["torch_version"]
    running = torch.__version__.split("+")[0]
    if built.split(".")[:2] != running.split(".")[:2]:
        warnings.warn(f"fastfa._C was built against torch {built} but torch {running} is running; "
                      "rebuild with `pip install --no-build-isolation -e .` if ops fail to load", stacklevel=2)


_warn_on_torch_mismatch()

__all__ = ["RULES", "ALIASES", "nn", "functional", "metrics", "ops", "rules", "convert", "coverage", "backends", "BackendStatus",
           "set_backend", "get_backend", "use_backend", "set_cuda_fused", "cuda_fused", "last_fallbacks", "clear_fallbacks", "Fallback", "__version__",
           "alignment", "amp", "schedules", "feedback_parameters", "AlignmentSchedule", "CoefficientSchedule"]
