"""``fastfa bench``: time and peak memory of every rule, backend and peer against torch's backprop.

Each case is a layer shape (forward + backward) or a model (one SGD training step). Every
variant holds the same weights and runs the same step: torch's own module (the backprop
baseline), fastfa's layer or converted model for each rule and usable backend, and the
peers (fastfa.peers: each rule as a torch.autograd.Function, the same under torch.compile,
and BioTorch's layers). A layer's step is

    zero the parameter grads (set_to_none), out = layer(x), out.backward(grad)

with an input x that requires grad (so grad_input is computed, as in a hidden layer) and a
fixed random grad; a model's is cross-entropy on random targets, backward, SGD's step.
The timing is done in interleaved rounds: each round times the baseline and every variant
once (its start rotating from round to round), so drift in clock speed or load hits all of
them alike. A time is the median over rounds; a ratio is the median over rounds of the
variant's time over the baseline's in the same round (so drift between rounds cancels), its
spread the inter-quartile range of those. On CPU a call is timed with perf_counter; on GPU
with CUDA events, the L2 cache flushed before each call and the input rotating over several
buffers. Peak memory: see CUDA_PEAK and CPU_PEAK.

The results file has the one shape of design/gpu.md ("Evidence"), with fields added:

    {"commit", "command", "device", "versions": {torch, triton, cuda, fastfa},
     "rows": [{op, shape, dtype, rule, backend, ms, bp_ms, ratio, peak_bytes,
               bp_peak_bytes, max_rel_err, spread,
               group, batch, layout, peer, peak_kind, vs_peers}, ...],
     "machine": {"start": {loadavg, cpu_count, torch_threads}, "end": {...}},
     "seconds", "peers", "peak_kind"}

The package, one concern a module: cases (the shapes and models), variants (the modules timed
and their steps), timing (settings, timed calls, statistics over rounds), memory (peak bytes),
progress, run (a case's rounds and the whole run), report (tables, summary, JSON and CSV),
plots (the PNG), host (the host overhead on tiny shapes), machine (device, versions, commit,
load) and command (`fastfa bench` from its parsed flags: ``main``).
"""

from __future__ import annotations

from .cases import DTYPES, LAYOUTS, MODELS, OPS, SHAPE_SETS, Case, default_cases
from .command import main
from .machine import command_line, cpu_model, default_out_path, device_name, git_commit, slug, versions
from .plots import plot_available, write_plot
from .report import CSV_COLUMNS, format_summary, format_table, summarize, write_csv, write_results
from .run import run_bench

__all__ = ["Case", "default_cases", "run_bench", "format_table", "format_summary", "summarize", "versions",
           "cpu_model", "device_name", "default_out_path", "git_commit", "write_results", "write_csv", "write_plot",
           "DTYPES", "OPS", "MODELS", "SHAPE_SETS", "LAYOUTS", "CSV_COLUMNS", "plot_available", "slug", "main"]
