"""benchmarks/cuda_graph_step.py: the ResNet-18 step, eager and in a CUDA graph, at a tiny size (so it cannot rot
before a GPU runs it at 32 and 256: benchmarks/gpu_extra.sh graphstep)."""

import json
import math
import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "benchmarks"))
try:
    import cuda_graph_step
finally:
    sys.path.pop(0)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="CUDA graphs need a GPU"))]


@pytest.mark.parametrize("device", DEVICES)
def test_the_step_is_timed_per_rule_and_mode_against_torch(device, tmp_path, capsys):
    out = tmp_path / "step.json"
    code = cuda_graph_step.main(["--device", device, "--rules", "torch,brsf", "--batches", "2", "--resolution",
                                 "32", "--dtype", "fp32", "--warmup", "1", "--rounds", "1", "--out", str(out)])
    assert code == 0
    results = json.loads(out.read_text())
    modes = ["eager", "graph"] if device == "cuda" else ["eager"]
    rows = {(row["rule"], row["mode"]): row for row in results["rows"]}
    assert list(rows) == [(rule, mode) for rule in ("torch", "brsf") for mode in modes]
    for (rule, mode), row in rows.items():
        assert row["error"] is None, row["error"]
        assert row["op"] == "model:resnet18" and row["batch"] == 2 and row["rounds"] == 1
        # times on a shared machine: only their presence is checked
        assert row["ms"] > 0 and row["bp_ms"] > 0 and row["ratio"] > 0
        assert math.isfinite(row["loss"])
        # Every copy starts from torch's weights: the same forward (brsf's is W x). On a GPU fp32
        # convolutions may run in TF32 (cudnn's default, the cuda backend's fp32 kernels), through
        # 20 layers; different weights would be off by about 1.
        assert row["max_rel_err"] < (1e-4 if device == "cpu" else 5e-2), (rule, mode)
        assert (row["peak_bytes"] is not None) == (device == "cuda")
        assert (row["graph_speedup"] is not None) == (mode == "graph")
    assert rows["torch", "eager"]["ratio"] == 1.0
    assert results["device"] and results["versions"]["torch"] == torch.__version__
    assert results["command"].startswith("python benchmarks/cuda_graph_step.py --device")
    assert (results["note"] is None) == (device == "cuda")
    table = out.with_suffix(".md").read_text()
    assert "| 2 | fp32 | brsf | eager |" in table
    assert ("CUDA graphs need a GPU" in table) == (device == "cpu")
    assert "written:" in capsys.readouterr().out


@pytest.mark.parametrize("arguments, match", [
    (dict(rules=("bp", "usf")), "must include 'torch'"),
    (dict(rules=("torch", "usf2")), "rules must be 'torch' or fastfa rules .*got 'usf2'"),
    (dict(dtype="fp16"), "dtype must be one of bf16, fp32; got 'fp16'"),
    (dict(rounds=0), "warmup, rounds and calls must be at least 1"),
])
def test_bad_arguments_are_refused_before_anything_runs(arguments, match):
    with pytest.raises(ValueError, match=match):
        cuda_graph_step.measure(device="cpu", **arguments)
