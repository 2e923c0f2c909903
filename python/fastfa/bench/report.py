"""The results as a printed table and summary, and as the JSON results file and its CSV."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from .. import peers
from .timing import round_sig


def _format_ms(ms: float) -> str:
    return f"{ms:.3f}" if ms < 10 else f"{ms:.2f}" if ms < 100 else f"{ms:.1f}"


def format_table(rows: list) -> str:
    """The results as an aligned text table."""
    with_memory = any(row.get("peak_bytes") is not None for row in rows)
    header = ["shape", "dtype", "rule", "backend", "ms", "bp ms", "ratio", "spread (ratio IQR)", "max_rel_err"]
    if with_memory:
        header += ["peak MiB", "peak/bp"]
    lines = []
    for row in rows:
        spread = row.get("spread") or {}
        ratio_iqr = spread.get("ratio")
        cells = [row["op"] + " " + row["shape"], row["dtype"], row["rule"], row["backend"], _format_ms(row["ms"]),
                 _format_ms(row["bp_ms"]), f"{row['ratio']:.3f}",
                 f"{ratio_iqr[0]:.3f}-{ratio_iqr[1]:.3f}" if ratio_iqr else "",
                 "" if row["max_rel_err"] is None else f"{row['max_rel_err']:.1e}"]
        if with_memory:
            peak, bp_peak = row.get("peak_bytes"), row.get("bp_peak_bytes")
            cells.append("" if peak is None else f"{peak / 2**20:.1f}")
            cells.append(f"{peak / bp_peak:.3f}" if peak and bp_peak else "")
        lines.append(cells)
    widths = [max(len(header[i]), *(len(cells[i]) for cells in lines)) if lines else len(header[i])
              for i in range(len(header))]
    numeric = {"ms", "bp ms", "ratio", "max_rel_err", "peak MiB", "peak/bp"}

    def render(cells):
        return "  ".join(c.rjust(w) if h in numeric else c.ljust(w) for c, w, h in zip(cells, widths, header)).rstrip()

    out = [render(header), render(["-" * w for w in widths])]
    previous = None
    for row, cells in zip(rows, lines):
        key = (row["op"], row["shape"], row["dtype"])
        if previous is not None and key != previous:
            out.append("")
        previous = key
        out.append(render(cells))
    return "\n".join(out)


def _geomean(values: list) -> Optional[float]:
    values = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def summarize(rows: list) -> list:
    """Per rule and backend (fastfa's and the peers'): the geometric mean of the ratios to backprop
    over the layer cases, the model steps' ratios, and fastfa's geometric-mean ratio to each peer."""
    keys = []
    for row in rows:
        if (row["rule"], row["backend"]) not in keys:
            keys.append((row["rule"], row["backend"]))
    summary = []
    for rule, backend in keys:
        mine = [row for row in rows if row["rule"] == rule and row["backend"] == backend]
        layers = [row for row in mine if not row["op"].startswith("model:")]
        entry = {"rule": rule, "backend": backend, "layers": len(layers),
                 "layer_ratio": round_sig(_geomean([row["ratio"] for row in layers]), 4),
                 "models": {row["op"][6:] + (f" {row['dtype']}" if row["dtype"] != "fp32" else ""): row["ratio"]
                            for row in mine if row["op"].startswith("model:")}}
        vs = {}
        for name in peers.PEERS:
            ratios = [row["vs_peers"][name]["ratio"] for row in layers if name in (row.get("vs_peers") or {})]
            model_ratios = {row["op"][6:]: row["vs_peers"][name]["ratio"] for row in mine
                            if row["op"].startswith("model:") and name in (row.get("vs_peers") or {})}
            if ratios or model_ratios:
                vs[name] = {"layer_ratio": round_sig(_geomean(ratios), 4), "layers": len(ratios),
                            "models": model_ratios}
        if vs:
            entry["vs_peers"] = vs
        summary.append(entry)
    return summary


def format_summary(summary: list) -> str:
    """The newcomer's answer: each rule's time as a multiple of backprop's, and of the peers'."""
    lines = ["time / backprop's (geometric mean over the layer shapes; model: one SGD step), and fastfa's time / "
             "each peer's for the same rule (below 1: fastfa is faster)"]
    header = ["rule", "backend", "layers", "models", "fastfa/autograd", "fastfa/compile", "fastfa/biotorch"]
    table = []
    for entry in summary:
        vs = entry.get("vs_peers", {})

        def peer_cell(name):
            if name not in vs:
                return ""
            cell = "" if vs[name]["layer_ratio"] is None else f"{vs[name]['layer_ratio']:.2f}"
            models = ", ".join(f"{k} {v:.2f}" for k, v in vs[name]["models"].items())
            return cell + (f" ({models})" if models else "")

        table.append([entry["rule"], entry["backend"],
                      "" if entry["layer_ratio"] is None else f"{entry['layer_ratio']:.3f}",
                      ", ".join(f"{k} {v:.3f}" for k, v in entry["models"].items()),
                      peer_cell("autograd"), peer_cell("compile"), peer_cell("biotorch")])
    widths = [max(len(header[i]), *(len(r[i]) for r in table)) if table else len(header[i])
              for i in range(len(header))]
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]
    return "\n".join(lines)


def write_results(results: dict, path: Path) -> Path:
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    return path


CSV_COLUMNS = ("op", "group", "shape", "batch", "layout", "dtype", "rule", "backend", "peer", "ms", "bp_ms",
               "ratio", "ratio_q1", "ratio_q3", "rounds", "peak_bytes", "bp_peak_bytes", "max_rel_err",
               "vs_autograd", "vs_compile", "vs_biotorch")


def write_csv(results: dict, path: Path) -> Path:
    """One line per row of the results file, flat (the spread's ratio IQR and the peer ratios as columns)."""
    import csv

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in results["rows"]:
            spread = row.get("spread") or {}
            vs = row.get("vs_peers") or {}
            flat = {key: row.get(key) for key in CSV_COLUMNS if key in row}
            flat.update(ratio_q1=(spread.get("ratio") or [None, None])[0],
                        ratio_q3=(spread.get("ratio") or [None, None])[1], rounds=spread.get("rounds"),
                        **{f"vs_{name}": vs[name]["ratio"] for name in vs})
            writer.writerow({key: "" if flat.get(key) is None else flat[key] for key in CSV_COLUMNS})
    return path
