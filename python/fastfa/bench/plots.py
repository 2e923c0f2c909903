"""The results as a PNG: time and peak memory over backprop's, per sweep."""

from __future__ import annotations

from pathlib import Path


def plot_available() -> tuple:
    """(True, "") when matplotlib imports, else (False, why)."""
    try:
        import matplotlib  # noqa: F401
    except Exception as error:  # ImportError, or a broken install
        return False, f"matplotlib is not installed ({type(error).__name__}: {error}); pip install matplotlib"
    return True, ""


def write_plot(results: dict, path: Path) -> Path | None:
    """A PNG: per (group, dtype, layout), each rule's time ratio to backprop against the batch size (or
    the layer, for a fixed-batch sweep), fastfa solid and the autograd peer dashed; peak memory over
    backprop's beside it. None, and no file, where the run timed no layer (models only: their one
    step per rule is the table's)."""
    rows = [row for row in results["rows"] if not row["op"].startswith("model:")]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for row in rows:
        key = (row.get("group") or row["op"], row["dtype"], row.get("layout"))
        if key not in panels:
            panels.append(key)
    with_memory = any(row.get("peak_bytes") for row in rows)
    columns = 2 if with_memory else 1
    figure, axes = plt.subplots(max(len(panels), 1), columns, figsize=(7 * columns, 3.6 * max(len(panels), 1)),
                                squeeze=False)
    rules = []
    for row in rows:
        if row["rule"] not in rules:
            rules.append(row["rule"])
    colors = {rule: plt.get_cmap("tab10")(i % 10) for i, rule in enumerate(rules)}
    styles = {None: "-", "autograd": "--", "compile": ":", "biotorch": "-."}
    for index, (group, dtype, layout) in enumerate(panels):
        mine = [row for row in rows if (row.get("group") or row["op"]) == group and row["dtype"] == dtype
                and row.get("layout") == layout]
        shapes = []
        for row in mine:
            if row["shape"] not in shapes:
                shapes.append(row["shape"])
        batches = {row["batch"] for row in mine if row.get("batch") is not None}
        by_batch = len(batches) == len(shapes) and len(shapes) > 1
        for column, (field_name, label) in enumerate([("ratio", "time / backprop"),
                                                      ("memory", "peak memory / backprop")][:columns]):
            ax = axes[index][column]
            for rule in rules:
                for backend in sorted({row["backend"] for row in mine if row["rule"] == rule}, key=str):
                    series = [row for row in mine if row["rule"] == rule and row["backend"] == backend]
                    peer = series[0].get("peer") if series else None
                    if peer not in styles or (column == 1 and peer is not None):
                        continue
                    xs, ys = [], []
                    for row in series:
                        value = row["ratio"] if field_name == "ratio" else (
                            row["peak_bytes"] / row["bp_peak_bytes"] if row.get("peak_bytes") and
                            row.get("bp_peak_bytes") else None)
                        if value is None:
                            continue
                        xs.append(row["batch"] if by_batch else shapes.index(row["shape"]))
                        ys.append(value)
                    if xs:
                        order = sorted(range(len(xs)), key=xs.__getitem__)
                        ax.plot([xs[i] for i in order], [ys[i] for i in order], styles[peer], marker="o",
                                markersize=3, color=colors[rule],
                                label=rule if peer is None else f"{rule} ({peer})")
            ax.axhline(1.0, color="black", linewidth=0.8)
            if by_batch:
                ax.set_xscale("log", base=2)
                ax.set_xlabel("batch")
            else:
                ax.set_xticks(range(len(shapes)))
                ax.set_xticklabels([s.split(" (")[-1].rstrip(")") if " (" in s else s for s in shapes],
                                   rotation=30, ha="right", fontsize=7)
            ax.set_ylabel(label)
            ax.set_title(f"{group}, {dtype}" + (f", {layout}" if layout else ""), fontsize=9)
            ax.grid(True, alpha=0.3)
    # One legend for the figure: a colour per rule, a line style per implementation.
    from matplotlib.lines import Line2D

    present = {row.get("peer") for row in rows}
    names = {None: "fastfa", "autograd": "autograd.Function peer", "compile": "torch.compile peer",
             "biotorch": "BioTorch"}
    handles = [Line2D([0], [0], color=colors[rule], label=rule) for rule in rules]
    handles += [Line2D([0], [0], color="gray", linestyle=style, label=names[peer])
                for peer, style in styles.items() if peer in present]
    height = figure.get_figheight()
    figure.legend(handles=handles, loc="upper center", ncol=min(len(handles), 8), fontsize=7,
                  bbox_to_anchor=(0.5, 1.0 - 0.25 / height))
    machine = results.get("machine", {}).get("start", {})
    figure.suptitle(f"fastfa bench on {results['device']}, load average {machine.get('loadavg')}, "
                    f"torch threads {machine.get('torch_threads')}", fontsize=8, y=1.0 - 0.05 / height)
    figure.tight_layout(rect=(0, 0, 1, 1.0 - 0.75 / height))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
