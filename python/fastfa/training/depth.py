"""``fastfa train --depths 2,4,8,12``: test accuracy and gradient alignment against depth, per rule.

Kunin et al. (2020) report that the local rules' gap to backprop widens with depth. This
trains the depth study's MLPs (and convnets, with --models convnet) of each depth, for each
rule and --seeds seeds, with fastfa train's settings, and writes one row per (model, depth,
rule): the mean and spread over seeds of the final test accuracy and of the gradient angle
(the mean over layers of the angle between the grad_input a rule propagates and backprop's),
as a JSON record, a table and a plot.
"""

from __future__ import annotations

import copy
import math
import statistics
from pathlib import Path

from .. import bench
from . import data as data_module
from .loop import default_out_path, setup_context, train_one
from .models import deep_name
from .report import Progress, write_json

__all__ = ["run", "summarize", "format_depth_table", "write_depth_plot"]


def _mean_angle(angles) -> float:
    values = [v for v in (angles or {}).values() if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def summarize(runs: list) -> list:
    """One row per (model, depth, rule) from the per-seed runs: mean and sample std over seeds."""
    groups: dict = {}
    for run in runs:
        groups.setdefault((run["model"], run["depth"], run["rule"]), []).append(run)
    rows = []
    for (model, depth, rule), chosen in groups.items():
        row = {"model": model, "depth": depth, "rule": rule, "seeds": [r["seed"] for r in chosen],
               "diverged": sum(bool(r["diverged"]) for r in chosen)}
        for key in ("test_acc", "gradient_angle", "weight_angle"):
            values = [r[key] for r in chosen if r[key] is not None and not math.isnan(r[key])]
            row[key] = statistics.fmean(values) if values else math.nan
            row[key + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def format_depth_table(rows: list) -> str:
    """Test accuracy % and gradient angle (degrees), mean ± std over seeds, one column per depth."""
    depths = sorted({row["depth"] for row in rows})
    lines = []
    for model in dict.fromkeys(row["model"] for row in rows):
        header = [f"{model}: rule"] + [f"depth {d}: test % / grad angle" for d in depths]
        table = [header]
        for rule in dict.fromkeys(row["rule"] for row in rows if row["model"] == model):
            cells = [rule]
            for depth in depths:
                row = next((r for r in rows if (r["model"], r["rule"], r["depth"]) == (model, rule, depth)), None)
                if row is None:
                    cells.append("-")
                    continue
                cell = (f"{100 * row['test_acc']:.1f}±{100 * row['test_acc_std']:.1f} / "
                        f"{row['gradient_angle']:.0f}±{row['gradient_angle_std']:.0f}")
                cells.append(cell + (f" ({row['diverged']} diverged)" if row["diverged"] else ""))
            table.append(cells)
        widths = [max(len(line[i]) for line in table) for i in range(len(header))]
        lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
                  for line in table]
        lines.append("")
    return "\n".join(lines).rstrip()


def write_depth_plot(results: dict, path: Path):
    """Per model: test accuracy and gradient angle against depth, one line per rule, error bars over seeds."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plot: matplotlib is not installed (pip install matplotlib)"
    rows = results["rows"]
    models = list(dict.fromkeys(row["model"] for row in rows))
    figure, axes = plt.subplots(len(models), 2, figsize=(12, 4.5 * len(models)), squeeze=False)
    for m, model in enumerate(models):
        accuracy, gradient = axes[m]
        for rule in dict.fromkeys(row["rule"] for row in rows if row["model"] == model):
            chosen = sorted((r for r in rows if r["model"] == model and r["rule"] == rule), key=lambda r: r["depth"])
            depths = [r["depth"] for r in chosen]
            style = dict(marker="o", capsize=3, label=rule, linestyle="--" if rule in ("wm", "ia") else "-")
            accuracy.errorbar(depths, [100 * r["test_acc"] for r in chosen],
                              yerr=[100 * r["test_acc_std"] for r in chosen], **style)
            gradient.errorbar(depths, [r["gradient_angle"] for r in chosen],
                              yerr=[r["gradient_angle_std"] for r in chosen], **style)
        seeds = len(rows[0]["seeds"]) if rows else 0
        accuracy.set(title=f"{model}: final test accuracy ({seeds} seeds)", xlabel="depth (layers with weights)",
                     ylabel="%")
        gradient.set(title=f"{model}: angle(grad_input, backprop's), mean over layers", xlabel="depth",
                     ylabel="degrees")
        for axis in (accuracy, gradient):
            axis.set_xticks(sorted({r["depth"] for r in rows}))
            axis.grid(alpha=0.3)
        accuracy.legend(fontsize=8, ncol=2)
    figure.suptitle(f"fastfa train --depths on {results['settings']['dataset']} ({results['device']})", fontsize=11)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def run(args, *, on_step=None, progress=None) -> dict:
    """Every (model, depth, rule, seed) of the study, one after the other; the results (also written)."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    context = setup_context(args.device)
    if context.distributed:
        raise ValueError("--depths runs in one process (many small models); start it without torchrun")
    kinds = [m for m in args.models if m in ("mlp", "convnet")]
    if not kinds:
        raise ValueError("--depths trains the depth study's mlp and convnet: pass --models mlp and/or convnet")
    dataset = data_module.load(args.data, image_size=args.image_size, seed=args.seed, workers=args.workers)
    progress = progress or Progress()
    device_label = bench.device_name(context.device)
    out = Path(args.out) if args.out else default_out_path(dataset.name + "-depth", device_label)
    seeds = list(range(args.seed, args.seed + args.seeds))
    progress.line(f"fastfa train --depths {','.join(map(str, args.depths))} on {device_label}: {dataset.name}, "
                  f"models {', '.join(kinds)}, rules {', '.join(args.rules)}, seeds {seeds}")
    runs = []
    for kind in kinds:
        for depth in args.depths:
            for rule in args.rules:
                for seed in seeds:
                    run_args = copy.copy(args)
                    run_args.seed, run_args.checkpoint_dir, run_args.resume = seed, None, False
                    record, _ = train_one(run_args, context, dataset, deep_name(kind, depth), rule,
                                          progress=progress, on_step=on_step)
                    last = record["epochs"][-1] if record["epochs"] else {}
                    runs.append({"model": kind, "depth": depth, "rule": rule, "seed": seed,
                                 "test_acc": record["test_acc"], "diverged": record["diverged"],
                                 "gradient_angle": _mean_angle(last.get("gradient_alignment")),
                                 "weight_angle": _mean_angle(last.get("weight_alignment")),
                                 "options": record["options"], "epochs": record["epochs"]})
    rows = summarize(runs)
    results = {"commit": bench.git_commit(), "command": bench.command_line(getattr(args, "argv", None) or ["train"]),
               "device": device_label, "versions": bench.versions(),
               "settings": {"dataset": dataset.name, "depths": args.depths, "seeds": seeds, "models": kinds,
                            "rules": args.rules, **{key: getattr(args, key, None) for key in (
                                "epochs", "batch_size", "lr", "momentum", "weight_decay", "schedule", "classifier",
                                "reference_defaults", "pipeline", "feedback_lr", "feedback_optimizer")}},
               "rows": rows, "runs": runs}
    print(format_depth_table(rows))
    write_json(results, out)
    print(f"results: {out}")
    if not args.no_plot:
        plot = write_depth_plot(results, out.with_suffix(".png"))
        print(f"plot: {plot}" if isinstance(plot, Path) else plot)
    return results
