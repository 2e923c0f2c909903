"""What ``fastfa train`` shows: the progress line, the table comparing rules, the JSON record, the plot."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

__all__ = ["Progress", "format_table", "write_json", "write_plot"]


class Progress:
    """One status line on stderr, redrawn in place on a terminal; epoch summaries on their own lines.

    Off a terminal (a log file, CI) only the summaries are written, so logs stay readable.
    """

    def __init__(self, stream=None, enabled: bool = True, interval: float = 0.2):
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled
        self.live = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.interval = interval
        self._last = 0.0
        self._width = 0

    def update(self, tag: str, epoch: int, epochs: int, step: int, steps: int, loss=None) -> None:
        """``loss`` may be a tensor: it is read (a device sync) only when the line is redrawn."""
        if not self.live:
            return
        now = time.monotonic()
        if now - self._last < self.interval and step < steps:
            return
        self._last = now
        filled = int(20 * step / max(steps, 1))
        text = f"{tag}  epoch {epoch + 1}/{epochs} [{'#' * filled}{'.' * (20 - filled)}] {step}/{steps}"
        if loss is not None:
            text += f"  loss {float(loss):.4f}"
        self.stream.write("\r" + text.ljust(self._width))
        self._width = len(text)
        self.stream.flush()

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        if self.live and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self._width = 0
        self.stream.write(text + "\n")
        self.stream.flush()


def _mean(values) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def _fmt(value, digits: int = 1, percent: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * value:.{digits}f}" if percent else f"{value:.{digits}f}"


def format_table(rows: list) -> str:
    """One line per (model, rule): final and best test accuracy, train accuracy, time, mean angles."""
    header = ("model", "rule", "test acc %", "best %", "train acc %", "test loss", "ms/step", "W angle",
              "grad angle", "")
    lines = [header]
    for row in rows:
        last = row["epochs"][-1] if row["epochs"] else {}
        lines.append((row["model"], row["rule"], _fmt(row.get("test_acc"), percent=True),
                      _fmt(row.get("best_test_acc"), percent=True), _fmt(last.get("train_acc"), percent=True),
                      _fmt(last.get("test_loss"), 3), _fmt(row.get("ms_per_step"), 2),
                      _fmt(_mean((last.get("weight_alignment") or {}).values())),
                      _fmt(_mean((last.get("gradient_alignment") or {}).values())),
                      "diverged" if row.get("diverged") else ""))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
           .rstrip() for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths).rstrip())
    return "\n".join(out)


def _strict(value):
    """NaN and infinities (a diverged run's loss) as null: the record stays standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _strict(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(item) for item in value]
    return value


def write_json(results: dict, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(_strict(results), f, indent=1, allow_nan=False)
        f.write("\n")
    return path


def write_plot(results: dict, path: Path):
    """Per model: test accuracy per epoch for every rule, and the final per-layer weight and
    gradient alignment angles. Returns the path, or a sentence saying why there is no plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plot: matplotlib is not installed (pip install matplotlib)"
    rows = results["rows"]
    models = list(dict.fromkeys(row["model"] for row in rows))
    figure, axes = plt.subplots(len(models), 3, figsize=(16, 4.2 * len(models)), squeeze=False)
    for m, model in enumerate(models):
        chosen = [row for row in rows if row["model"] == model]
        accuracy, weight, gradient = axes[m]
        for row in chosen:
            epochs = [e["epoch"] for e in row["epochs"]]
            line, = accuracy.plot(epochs, [100 * e["test_acc"] for e in row["epochs"]], marker=".",
                                  label=row["rule"] + (" (diverged)" if row.get("diverged") else ""))
            # The last epoch with angles (a diverged run has none at its end).
            measured = [e for e in row["epochs"] if e.get("weight_alignment")]
            last = measured[-1] if measured else {}
            for axis, key in ((weight, "weight_alignment"), (gradient, "gradient_alignment")):
                angles = last.get(key) or {}
                if angles:
                    axis.plot(range(len(angles)), list(angles.values()), marker="o", color=line.get_color(),
                              label=row["rule"])
                    axis.set_xticks(range(len(angles)), list(angles), rotation=45, fontsize=7)
        accuracy.set(title=f"{model}: test accuracy", xlabel="epoch", ylabel="%")
        accuracy.grid(alpha=0.3)
        accuracy.legend(fontsize=8, ncol=2)
        weight.set(title=f"{model}: angle(B, W) per layer, last epoch", ylabel="degrees", xlabel="layer")
        gradient.set(title=f"{model}: angle(grad_input, backprop's), last epoch", ylabel="degrees", xlabel="layer")
        for axis in (weight, gradient):
            axis.set_ylim(bottom=0)
            axis.grid(alpha=0.3)
    figure.suptitle(f"fastfa train on {results['settings']['dataset']} ({results['device']})", fontsize=11)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
