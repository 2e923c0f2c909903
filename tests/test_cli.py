"""`fastfa info` and `fastfa bench --quick` (layers, models, peers, JSON / CSV / plot, flag checks), in-process."""

import csv
import json
import math
import os

import pytest
import torch

import fastfa
from fastfa import bench, cli, peers

@pytest.fixture(autouse=True)
def _one_thread():
    """The bench runs on one thread here (--threads 1 would set it): on a busy machine, ops on
    several threads wait for descheduled ones, and the tests' time swings tenfold. Restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


ROW_KEYS = {"op", "shape", "dtype", "rule", "backend", "ms", "bp_ms", "ratio", "peak_bytes", "bp_peak_bytes",
            "max_rel_err", "spread", "group", "batch", "layout", "peer", "peak_kind"}


def test_info_text(capsys):
    """One line per version, build flag and backend, each with this process's value."""
    assert cli.main(["info"]) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert lines[0][:2] == ["fastfa", fastfa.__version__]
    assert ["torch", torch.__version__] in lines
    for key, value in fastfa._C.build_info().items():
        assert [key, *str(value).split()] in lines, key
    for name, status in fastfa.backends().items():
        assert [name, "yes" if status.usable else "no", *status.reason.split()] in lines, name


def test_info_json(capsys):
    assert cli.main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["versions"]["fastfa"] == fastfa.__version__
    assert info["versions"]["torch"] == torch.__version__
    assert info["backends"] == {name: {"usable": status.usable, "reason": status.reason}
                                for name, status in fastfa.backends().items()}
    assert info["build_info"] == json.loads(json.dumps(fastfa._C.build_info(), default=str))
    assert info["devices"]["cpu"]["model"] and info["devices"]["cpu"]["logical_cores"] == os.cpu_count()
    assert info["devices"]["cuda_available"] == torch.cuda.is_available()


def _check_files(results, out, csv_path, plotted):
    """The CSV holds the JSON's rows column for column; the plot is a PNG image when asked for."""
    with open(csv_path, newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(results["rows"]) and tuple(table[0]) == bench.CSV_COLUMNS
    for line, row in zip(table, results["rows"]):
        for key in set(bench.CSV_COLUMNS) & set(row):
            value = row[key]
            if value is None:
                assert line[key] == "", key
            elif isinstance(value, float):
                assert float(line[key]) == value, key
            else:
                assert line[key] == str(value), key
        assert (float(line["ratio_q1"]), float(line["ratio_q3"])) == tuple(row["spread"]["ratio"])
    png = out.with_suffix(".png")
    assert png.exists() == plotted
    if plotted:
        import matplotlib.image

        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        height, width = matplotlib.image.imread(png).shape[:2]
        assert height > 100 and width > 100


def _check_printed(printed, rows):
    """Every row is a line of the printed table: its layer, rule, backend and ratio."""
    lines = [line.split() for line in printed.splitlines()]
    for row in rows:
        cells = [row["op"], *row["shape"].split(), row["dtype"], row["rule"], row["backend"]]
        # then ms and bp ms, then the ratio
        ratio = f"{row['ratio']:.3f}"
        assert any(line[:len(cells)] == cells and line[len(cells) + 2] == ratio for line in lines), cells


def _check_common(results, out):
    assert {"commit", "command", "device", "versions", "rows"} <= set(results)
    assert results["commit"] is None or len(results["commit"]) == 40
    assert results["command"].startswith("fastfa bench --quick")
    assert results["device"].startswith("cpu: ")
    assert set(results["versions"]) >= {"torch", "triton", "cuda", "fastfa"}
    assert results["versions"]["fastfa"] == fastfa.__version__
    machine = results["machine"]["start"]
    assert len(machine["loadavg"]) == 3 and machine["cpu_count"] >= 1


def test_bench_quick(tmp_path, capsys):
    """Layers and a model, fastfa and the autograd and BioTorch peers (BioTorch where it is
    installed: pip install --no-deps biotorch), with CPU peak memory."""
    out = tmp_path / "bench.json"
    named = "autograd,biotorch" if peers.biotorch_status()[0] else "autograd"
    code = cli.main(["bench", "--quick", "--device", "cpu", "--rules", "bp,usf,kp", "--peers", named,
                     "--out", str(out), "--no-plot"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "ratio" in printed and str(out) in printed and "fastfa/autograd" in printed

    results = json.loads(out.read_text())
    _check_common(results, out)
    usable = {name for name, status in fastfa.backends().items() if status.usable and name != "triton"}
    rows = results["rows"]
    fastfa_rows = [row for row in rows if row["peer"] is None]
    assert {(row["op"], row["rule"]) for row in fastfa_rows} == {
        (op, rule) for op in ("linear", "conv2d", "model:mlp") for rule in ("bp", "usf", "kp")}
    biotorch = peers.biotorch_status()[0]
    for row in rows:
        assert ROW_KEYS <= set(row)
        assert row["backend"] in usable or row["backend"] in ("peer:autograd", "peer:biotorch")
        assert row["dtype"] == "fp32"
        for key in ("ms", "bp_ms", "ratio"):
            assert isinstance(row[key], float) and math.isfinite(row[key]) and row[key] > 0, (key, row)
        # CPU peak memory: at least the parameters and the input are counted.
        assert row["peak_bytes"] > 0 and row["bp_peak_bytes"] > 0 and row["peak_kind"].startswith("cpu:")
        assert row["max_rel_err"] is not None and row["max_rel_err"] < 1e-5
        assert row["spread"]["rounds"] >= 1 and len(row["spread"]["ratio"]) == 2
        # medians lie within their rounds' quartiles and extremes
        assert row["spread"]["ratio"][0] <= row["ratio"] <= row["spread"]["ratio"][1], row
        assert row["spread"]["ms_min_max"][0] <= row["ms"] <= row["spread"]["ms_min_max"][1], row
        if row["peer"] is None:
            assert "autograd" in row["vs_peers"]
            assert ("biotorch" in row["vs_peers"]) == (biotorch and row["rule"] == "usf")
    assert any(row["backend"] == "peer:biotorch" for row in rows) == biotorch
    # The kp layer holds B beside W: more live bytes than backprop's layer.
    kp = next(row for row in fastfa_rows if row["op"] == "linear" and row["rule"] == "kp")
    assert kp["peak_bytes"] > kp["bp_peak_bytes"]
    assert [entry["rule"] for entry in results["summary"]][:3] == ["bp", "usf", "kp"]
    _check_printed(printed, rows)
    _check_files(results, out, out.with_suffix(".csv"), plotted=False)


def test_bench_compile_peer_and_plot(tmp_path, capsys):
    out = tmp_path / "r.json"
    plotted = bench.plot_available()[0]
    code = cli.main(["bench", "--quick", "--device", "cpu", "--ops", "linear", "--rules", "usf",
                     "--peers", "compile", "--batches", "8,32", "--out", str(out), "--csv", str(tmp_path / "t.csv")]
                    + (["--plot"] if plotted else []))
    assert code == 0, capsys.readouterr().err
    results = json.loads(out.read_text())
    rows = results["rows"]
    assert {(row["batch"], row["backend"]) for row in rows} >= {(8, "peer:compile"), (32, "peer:compile")}
    assert all("compile" in row["vs_peers"] for row in rows if row["peer"] is None)
    _check_printed(capsys.readouterr().out, rows)
    _check_files(results, out, tmp_path / "t.csv", plotted)


@pytest.mark.skipif(not peers.biotorch_status()[0], reason=f"BioTorch: {peers.biotorch_status()[1]}")
def test_bench_skips_a_failing_peer_without_failing_the_run(tmp_path, capsys):
    """BioTorch's brsf draws R_t in float32 whatever W's dtype, so its bf16 backward fails: skipped, reported."""
    out = tmp_path / "b.json"
    code = cli.main(["bench", "--quick", "--device", "cpu", "--dtype", "bf16", "--ops", "linear",
                     "--rules", "brsf,usf", "--peers", "biotorch", "--no-plot", "--out", str(out)])
    assert code == 0
    results = json.loads(out.read_text())
    assert len(results["skipped"]) == 1 and "brsf/peer:biotorch" in results["skipped"][0]
    assert "peer skipped" in capsys.readouterr().err
    assert {(row["rule"], row["backend"]) for row in results["rows"]} == {
        ("brsf", "aten"), ("usf", "aten"), ("usf", "peer:biotorch")}


def test_bench_plot_of_a_models_only_run(tmp_path):
    """A run that timed only models has no layer to plot: no file, and no error (it used to fail the run)."""
    results = {"rows": [{"op": "model:resnet18", "rule": "usf", "dtype": "fp32", "shape": "4x3x64x64"}]}
    assert bench.write_plot(results, tmp_path / "p.png") is None
    assert not (tmp_path / "p.png").exists()


def test_bench_plot_without_matplotlib(tmp_path, capsys, monkeypatch):
    """--plot without matplotlib is refused before anything runs; without --plot the run goes on."""
    monkeypatch.setattr(bench.plots, "plot_available", lambda: (False, "matplotlib is not installed (test)"))
    assert cli.main(["bench", "--quick", "--plot", "--out", str(tmp_path / "x.json")]) == 2
    assert "matplotlib is not installed" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_bench_cases_cover_the_sweep():
    cuda = bench.default_cases("cuda", shapes=bench.SHAPE_SETS[1:], layouts=bench.LAYOUTS,
                               models=bench.MODELS)
    linear = [case.batch for case in cuda if case.op == "linear" and case.group.startswith("linear ")]
    assert linear == [2 ** k for k in range(14)]   # 1..8192 for a 4096x4096 Linear
    transformer = {(case.group, case.shape) for case in cuda if case.op == "linear"}
    assert ("vit-b/16 64x197 qkv", "12608x768 -> 2304") in transformer
    assert ("gpt2-small 8x1024 mlp down", "8192x3072 -> 768") in transformer
    assert len([case for case in cuda if case.group.startswith(("vit-b/16", "gpt2-small"))]) == 8
    groups = {case.group for case in cuda}
    assert "resnet18 conv @224px" in groups and "retinanet head @800px" in groups
    assert {case.layout for case in cuda if case.op == "conv2d"} == set(bench.LAYOUTS)
    assert {case.op for case in cuda if case.is_model} == {f"model:{name}" for name in bench.MODELS}
    cpu = bench.default_cases("cpu")
    assert {case.op for case in cpu} == {"linear", "conv2d", "model:resnet18"}


def test_bench_refuses_a_named_peer_that_cannot_run(tmp_path, capsys, monkeypatch):
    """Asked for by name, a missing peer is an error that says how to install it, not a silent skip."""
    monkeypatch.setattr(peers, "biotorch_status", lambda: (False, "not installed (pip install --no-deps biotorch)"))
    out = tmp_path / "x.json"
    assert cli.main(["bench", "--quick", "--peers", "autograd,biotorch", "--out", str(out), "--no-plot"]) == 2
    assert "pip install --no-deps biotorch" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("argv,message", [
    (["--rules", "nope"], "nope"),
    (["--ops", "matmul"], "--ops"),
    (["--dtype", "int8"], "--dtype"),
    (["--layouts", "nhwc"], "--layouts"),
    (["--peers", "tinydfa"], "--peers"),
    (["--models", "vgg"], "--models"),
    (["--shapes", "huge"], "--shapes"),
    (["--batches", "0,4"], "--batches"),
    (["--batches", "x"], "--batches"),
    (["--repeat", "0"], "--repeat"),
    (["--model-batch", "0"], "--model-batch"),
    (["--budget", "-1"], "--budget"),
    (["--backends", "opencl"], "opencl"),
    (["--device", "tpu"], "--device"),
    (["--rules", ""], "--rules"),
])
def test_bench_rejects_bad_flags(argv, message, tmp_path, capsys):
    out = tmp_path / "x.json"
    assert cli.main(["bench", "--quick", "--out", str(out)] + argv) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_bench_skips_triton_on_cpu_unless_named(monkeypatch, capsys):
    """Triton on a CPU is its interpreter: not timed unless --backends names it."""
    statuses = dict(fastfa.backends())
    statuses["triton"] = fastfa.BackendStatus(True, "interpreter (TRITON_INTERPRET=1)")
    monkeypatch.setattr(fastfa, "backends", lambda: statuses)
    seen = {}

    def fake_run(**kwargs):
        seen.update(kwargs)
        raise SystemExit(0)
    monkeypatch.setattr(bench.run, "run_bench", fake_run)
    with pytest.raises(SystemExit):
        cli.main(["bench", "--quick", "--device", "cpu", "--no-plot"])
    assert "triton" not in seen["backends"] and "aten" in seen["backends"]
    assert "skipping backend triton" in capsys.readouterr().err


@pytest.mark.parametrize("argv,names", [(["--help"], ["info", "bench", "train"]),
                                        (["bench", "--help"], ["--rules", "--ops", "--peers", "--out", "--csv",
                                                               "--plot", "--quick", "--full", "--device"])])
def test_help(argv, names, capsys):
    """Help exits 0 and names the commands (or bench's flags)."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert printed.startswith("usage: fastfa")
    for name in names:
        assert name in printed, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (the CUDA twin of test_bench_quick)")
def test_bench_quick_cuda(tmp_path):
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--quick", "--device", "cuda", "--rules", "bp,usf", "--peers", "autograd,compile",
                     "--out", str(out), "--no-plot"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(row["peak_bytes"] > 0 and row["peak_kind"].startswith("cuda:") for row in rows)
    assert {row["backend"] for row in rows} >= {"peer:autograd", "peer:compile"}
