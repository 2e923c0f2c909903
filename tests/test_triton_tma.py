"""The Triton grad_input's tensor-descriptor (TMA) path against its pointer path and the oracle (issue 18).

triton_kernels/linear.py's _grad_input_kernel loads delta, W and the stored tensor either raw
through tensor descriptors (Hopper's TMA, the transform after the load) or through masked
pointer loads: one kernel body, TENSOR_DESCRIPTORS chosen per call by _tensor_descriptors
(FASTFA_TRITON_TMA, the operands' layouts). Triton's interpreter runs tensor descriptors
(triton 3.6 and 3.8), so without a GPU the descriptor path runs here under FASTFA_TRITON_TMA=1
on CPU tensors; on a GPU with TMA it is the default ("auto"), and the pointer path is
FASTFA_TRITON_TMA=0. The sm_90 compile check (no GPU needed) reads the machine code.
"""

import json
import textwrap

import pytest
import torch

import fastfa
from conftest import assert_close
from fastfa.rules import Rule

pytest.importorskip("triton")
from fastfa.triton_kernels import feedback as fb  # noqa: E402
from fastfa.triton_kernels import linear  # noqa: E402
import triton_sm90  # noqa: E402

pytestmark = pytest.mark.skipif(not fastfa.backends()["triton"].usable, reason="the triton backend is not usable here")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TMA_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9
# Where the descriptor path is taken: FASTFA_TRITON_TMA=1 under the interpreter, the default on a GPU with TMA.
DESCRIPTORS_ON = "1" if fb.INTERPRETED.value else "auto"
# (rule, stored tensor, distribution, scale): every rule; fa with a stored R and drawn (both
# distributions); usf with a given scale and with "rms" (s from W, read by the kernel).
CASES = [("bp", False, 0, 1.0), ("fa", True, 0, 1.0), ("fa", False, 0, 0.3), ("fa", False, 1, 0.3),
         ("usf", False, 0, 0.21), ("usf", False, 0, fb.RMS_SCALE), ("brsf", False, 0, 0.4), ("brsf", False, 1, 0.4),
         ("frsf", True, 0, 1.0), ("kp", True, 0, 1.0), ("wm", True, 0, 1.0), ("sa", True, 0, 1.0),
         ("aa", True, 0, 1.0), ("ia", True, 0, 1.0)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (rows, out_features, in_features): ragged against the interpreter's 16 x 32 x 16 blocks and a GPU's
# 64 x 128 x 64, with every row 16-byte aligned in every dtype (multiples of 8 elements), as TMA needs.
SHAPES = [(21, 24, 40)] + ([(1000, 520, 776)] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def _on_device():
    fastfa.clear_fallbacks()
    with torch.device(DEVICE):
        yield
    assert not fastfa.last_fallbacks(), fastfa.last_fallbacks()
    fastfa.clear_fallbacks()


@pytest.fixture
def chosen(monkeypatch):
    """The TENSOR_DESCRIPTORS of every grad_input launch, in order."""
    choices = []
    choose = linear._tensor_descriptors

    def spy(*args):
        choices.append(choose(*args))
        return choices[-1]

    monkeypatch.setattr(linear, "_tensor_descriptors", spy)
    return choices


def _grad_input(delta, w, feedback, rng, rule_id, scale, distribution):
    args = (delta, torch.randn(delta.shape[0], w.shape[1], dtype=w.dtype), w, feedback, rng, torch.empty(0),
            torch.empty(0), rule_id, scale, distribution, [0.0, 0.0, 0.0, 1.0], "none", [True, False, False, False])
    return torch.ops.fastfa.triton_linear_backward(*args)[0]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("rule,stored,distribution,scale", CASES,
                         ids=[f"{r}-{'stored' if s else 'drawn' if r in ('fa', 'brsf') else ''}{d}-{c}"
                              for r, s, d, c in CASES])
@pytest.mark.skipif(torch.cuda.is_available() and not TMA_GPU, reason="this GPU has no TMA (sm_90 and newer do)")
def test_grad_input_through_descriptors_matches_the_pointer_path_and_the_oracle(rule, stored, distribution, scale,
                                                                              dtype, shape, chosen, monkeypatch):
    """grad_input = delta B with delta, W and the stored tensor loaded through tensor descriptors:
    the same as with pointer loads (bit for bit under the interpreter, which sums in the same order),
    and delta B from the aten backend's B (feedback_transform), in fp64, within the dtype's tolerance."""
    rows, out_features, in_features = shape
    w = torch.randn(out_features, in_features, dtype=dtype) / out_features ** 0.5
    w[1, :4] = 0  # sign(0) = 0
    feedback = torch.randn(out_features, in_features, dtype=dtype) / out_features ** 0.5 if stored else None
    rng = torch.tensor([2**41 + 7, 2**32 + 9])
    rule_id = int(Rule[rule.upper()])
    delta = torch.randn(rows, out_features, dtype=dtype)
    results = {}
    for mode in (DESCRIPTORS_ON, "0"):
        monkeypatch.setenv("FASTFA_TRITON_TMA", mode)
        results[mode] = _grad_input(delta, w, feedback, rng, rule_id, scale, distribution)
    assert chosen == [True, False], chosen
    through_descriptors, through_pointers = results[DESCRIPTORS_ON], results["0"]
    if fb.INTERPRETED.value:
        assert torch.equal(through_descriptors, through_pointers)
    else:  # the compiled paths may order a tile's products differently
        assert_close(through_descriptors, through_pointers, dtype, f"{rule} {dtype}: descriptors vs pointers")
    b = torch.ops.fastfa.feedback_transform(w.cpu(), feedback.cpu() if stored else None, rng.cpu(), rule_id, scale,
                                            distribution)
    expected = delta.cpu().double() @ b.double()
    assert_close(through_descriptors.cpu(), expected.to(dtype), dtype, f"{rule} {dtype}")


def test_descriptors_only_where_the_layouts_allow(monkeypatch):
    """TMA reads a 2-D tensor whose last stride is 1 and whose other stride and address are multiples
    of 16 bytes; every other layout takes the pointer loads, and a rule's unread operand does not count."""
    monkeypatch.setenv("FASTFA_TRITON_TMA", "1")
    delta, w = torch.randn(7, 24, dtype=torch.bfloat16), torch.randn(24, 40, dtype=torch.bfloat16)
    choose = linear._tensor_descriptors
    bp, kp = int(Rule.BP), int(Rule.KP)
    assert choose(delta, w, w, bp, False) == (fb.INTERPRETED.value or TMA_GPU)
    assert not choose(delta, torch.randn(40, 24, dtype=w.dtype).t(), w, bp, False)  # W's last stride is not 1
    assert choose(delta, torch.randn(40, 24, dtype=w.dtype).t(), w, kp, True) == choose(delta, w, w, bp, False)
    assert not choose(delta, w, torch.randn(40, 24, dtype=w.dtype).t(), kp, True)  # nor the stored B's
    assert not choose(torch.randn(7, 21, dtype=w.dtype), w[:21], w[:21], bp, False)  # rows of 42 bytes
    assert not choose(torch.randn(7, 40, dtype=w.dtype)[:, 1:25], w, w, bp, False)  # 2 bytes past an aligned address
    assert choose(torch.randn(7, 32, dtype=w.dtype)[:, 8:], w, w, bp, False) == choose(delta, w, w, bp, False)
    assert not choose(torch.randn(1, 24, dtype=w.dtype).expand(7, 24), w, w, bp, False)  # one row, repeated
    monkeypatch.setenv("FASTFA_TRITON_TMA", "0")
    assert not choose(delta, w, w, bp, False)
    monkeypatch.setenv("FASTFA_TRITON_TMA", "auto")
    assert choose(delta, w, w, bp, False) == TMA_GPU  # never under the interpreter
    monkeypatch.setenv("FASTFA_TRITON_TMA", "yes")
    with pytest.raises(ValueError, match="FASTFA_TRITON_TMA must be auto"):
        choose(delta, w, w, bp, False)


SM90_SCRIPT = textwrap.dedent(r"""
    import json
    import re
    import fastfa.triton_kernels.linear as L
    from triton_sm90 import autotuned_config, compile_for_sm90, machine_code

    TILE = autotuned_config(L._grad_input_kernel, 64, 128)  # compiled as the autotuner compiles it on a GPU
    # (rule, stored tensor, SCALE_FROM_WEIGHT): every rule, fa stored and drawn, usf's "rms" scale.
    cases = [(0, False, False), (1, True, False), (1, False, False), (2, False, False), (2, False, True),
             (3, False, False), (4, True, False)] + [(rule, True, False) for rule in range(5, 10)]
    report = {}
    for dtype, precision, rules in (("bf16", "ieee", cases), ("fp16", "ieee", cases[3:4]), ("fp32", "tf32", cases[3:4])):
        for rule, stored, from_weight in rules:
            draws = rule == 3 or (rule == 1 and not stored)
            kernel = compile_for_sm90(L._grad_input_kernel, dtype,
                                      dict(RULE=rule, HAS_FEEDBACK=stored, DISTRIBUTION=0, DRAWS=draws,
                                           DRAWS_BY_FOUR=draws, SCALE_FROM_WEIGHT=from_weight,
                                           TENSOR_DESCRIPTORS=True, INPUT_PRECISION=precision),
                                      floats=("scale",), config=TILE,
                                      types={"scale": "*fp32"} if from_weight else None)
            sass, registers = machine_code(kernel)
            mma = re.findall(r"wgmma\.mma_async[^;]*;", kernel.asm["ptx"])
            report[f"{dtype} rule {rule}{' stored' if stored else ''}{' rms' if from_weight else ''}"] = dict(
                opcodes={op: sass.opcodes[op] for op in ("UTMALDG", "LDG", "HGMMA", "LDL", "STL")},
                registers=registers, register_operand=bool(mma) and all(re.search(r"\}\s*,\s*\{", m) for m in mma))
    print("sass: " + json.dumps(report))
""")


@pytest.fixture(scope="module")
def sm90_descriptor_sass():
    last = triton_sm90.run_without_interpreter(SM90_SCRIPT).strip().splitlines()[-1]
    assert last.startswith("sass: "), last
    return json.loads(last[len("sass: "):])


def test_sm90_descriptor_path_loads_through_tma_into_tensor_cores_without_spills(sm90_descriptor_sass):
    """Compiled for Hopper at the autotuner's 64 x 128 x 64 tile (no GPU needed), for every rule (bf16;
    usf in fp16 and tf32 too): the operands load through TMA (UTMALDG), and no global load remains
    but the draw's [seed, step] and usf's "rms" scale; the GEMM is wgmma (HGMMA), with the transformed
    B^T tile as its register operand where there is a transform (bp and the stored-B rules read
    their tile from shared memory); and no register spills (LDL / STL)."""
    assert len(sm90_descriptor_sass) == 14, sorted(sm90_descriptor_sass)
    for what, found in sm90_descriptor_sass.items():
        opcodes = found["opcodes"]
        assert opcodes["UTMALDG"] > 0 and opcodes["HGMMA"] > 0, (what, found)
        assert opcodes["LDG"] <= 2, (what, found)
        assert opcodes["LDL"] + opcodes["STL"] == 0, (what, found)
        transforms = any(f"rule {rule}" in what for rule in (2, 3, 4)) or what.endswith("rule 1")
        assert found["register_operand"] == transforms, (what, found)


@pytest.mark.parametrize("tracing_mode", ["fake", "symbolic"])
def test_the_choice_traces_with_fake_and_symbolic_shapes(tracing_mode, chosen, monkeypatch):
    """torch.compile traces the op's Python body with fake tensors, which have no address: the
    layout check reads their storage offset instead, and symbolic sizes guard on their alignment."""
    from torch.fx.experimental.proxy_tensor import make_fx

    monkeypatch.setenv("FASTFA_TRITON_TMA", DESCRIPTORS_ON)

    def grad_input(delta, x, w):
        return torch.ops.fastfa.triton_linear_backward(delta, x, w, None, None, torch.empty(0), torch.empty(0),
                                                       int(Rule.USF), 0.5, 0, [0.0, 0.0, 0.0, 1.0], "none",
                                                       [True, False, False, False])[0]

    w = torch.randn(24, 40, dtype=torch.bfloat16)
    make_fx(grad_input, tracing_mode=tracing_mode)(torch.randn(21, 24, dtype=w.dtype),
                                                   torch.randn(21, 40, dtype=w.dtype), w)
    assert chosen == [fb.INTERPRETED.value or TMA_GPU], chosen
