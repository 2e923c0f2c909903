"""`fastfa info` and `fastfa bench --quick`, run in-process through fastfa.cli.main."""

import json
import math

import pytest

import fastfa
from fastfa import cli

ROW_KEYS = {"op", "shape", "dtype", "rule", "backend", "ms", "bp_ms", "ratio", "peak_bytes", "bp_peak_bytes",
            "max_rel_err"}


def test_info_text(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert fastfa.__version__ in out
    assert "torch" in out and "triton" in out
    for name in fastfa.backends():
        assert name in out


def test_info_json(capsys):
    assert cli.main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["versions"]["fastfa"] == fastfa.__version__
    assert set(info["backends"]) == set(fastfa.backends())
    for status in info["backends"].values():
        assert isinstance(status["usable"], bool) and isinstance(status["reason"], str)
    assert isinstance(info["build_info"], dict)
    assert info["devices"]["cpu"]["model"]


def test_bench_quick(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = cli.main(["bench", "--quick", "--device", "cpu", "--rules", "bp,usf", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "ratio" in printed and str(out) in printed

    results = json.loads(out.read_text())
    assert set(results) == {"commit", "command", "device", "versions", "rows"}
    assert results["commit"] is None or len(results["commit"]) == 40
    assert results["command"].startswith("fastfa bench --quick")
    assert results["device"].startswith("cpu: ")
    assert set(results["versions"]) >= {"torch", "triton", "cuda", "fastfa"}
    assert results["versions"]["fastfa"] == fastfa.__version__

    usable = {name for name, status in fastfa.backends().items() if status.usable}
    rows = results["rows"]
    assert rows, "no rows written"
    assert {(row["op"], row["rule"]) for row in rows} == {(op, rule) for op in ("linear", "conv2d")
                                                         for rule in ("bp", "usf")}
    for row in rows:
        assert ROW_KEYS <= set(row)
        assert row["backend"] in usable
        assert row["dtype"] == "fp32"
        for key in ("ms", "bp_ms", "ratio"):
            assert isinstance(row[key], float) and math.isfinite(row[key]) and row[key] > 0, (key, row)
        assert row["peak_bytes"] is None and row["bp_peak_bytes"] is None  # CPU: no peak memory
        assert row["max_rel_err"] is not None and row["max_rel_err"] < 1e-5
        spread = row["spread"]
        assert spread["rounds"] >= 1 and len(spread["ratio"]) == 2


def test_bench_rejects_unknown_rule(tmp_path, capsys):
    assert cli.main(["bench", "--quick", "--rules", "nope", "--out", str(tmp_path / "x.json")]) == 2
    assert "nope" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("argv", [["--help"], ["bench", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 0
