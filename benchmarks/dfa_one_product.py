"""dfa's e B_l: one product per layer (today) against one product for all layers, [B_1 | B_2 | ...].

Issue 15 asks whether e [B_1 | B_2 | ...], computed once when e arrives and sliced per layer,
pays over one product per layer. This times both on the CPU (aten, fp32, one thread) for the
layer shapes of an MLP (784 inputs, then hidden layers of 256) and of ``fastfa train``'s digits
convnet, at K = 10 and 1000 and batches 1..256, and checks that every layer's slice of the one
product equals its own product bit for bit.

- A B_l of at most fastfa.dfa.CACHE_ELEMENTS is kept on its layer: per layer that is one GEMM
  (e @ B_l) per layer; the one product is one GEMM against the concatenation (kept too), then a
  view per layer.
- A larger B_l is drawn at every backward: per layer, fastfa::direct_feedback_product (draw,
  GEMM); one product draws every layer's B_l into one K x sum(F) buffer (one draw per layer: the
  layers' seeds differ), then one GEMM. Both draw the same elements.

Each variant is the same sequence of op calls the backward makes, from Python (the C++ node pays
less per call than Python does, so the per-call savings shown here are an upper bound). Next to
it: the whole dfa training step of the same model (fastfa.convert, SGD), for the share the
products take.

    python benchmarks/dfa_one_product.py --out benchmarks/results/<date>-dfa-one-product.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

import fastfa
from fastfa import dfa


def _mlp(layers: int, classes: int) -> torch.nn.Module:
    widths = [784] + [256] * (layers - 1) + [classes]
    modules = []
    for index in range(layers):
        modules += [torch.nn.Linear(widths[index], widths[index + 1]), torch.nn.ReLU()]
    return torch.nn.Sequential(*modules[:-1])


def _convnet(classes: int) -> torch.nn.Module:
    # fastfa.training.models' digits convnet (8x8 images, no dropout), K classes
    from fastfa.training.models import _convnet as build
    return build(1, 8, classes, 0.0)


CASES = {
    "mlp-4": (lambda classes: _mlp(4, classes), (784,)),
    "mlp-8": (lambda classes: _mlp(8, classes), (784,)),
    "digits-convnet": (_convnet, (1, 8, 8)),
}


def _layer_inputs(name: str, width: int) -> list[int]:
    """F of each converted layer (the per-sample numel of its input), in module order."""
    build, sample = CASES[name]
    model, sizes = build(width), []
    hooks = [m.register_forward_pre_hook(lambda m, a: sizes.append(a[0][0].numel()))
             for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    model(torch.zeros(1, *sample))
    for hook in hooks:
        hook.remove()
    return sizes


def _time(function, repeats: int, rounds: int) -> float:
    """The least over rounds of the mean µs per call (the round least disturbed by other load)."""
    per_round = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            function()
        per_round.append((time.perf_counter() - start) / repeats * 1e6)
    return min(per_round)


def products(inputs: list[int], width: int, rows: int, repeats: int, rounds: int) -> dict:
    torch.manual_seed(0)
    error = torch.randn(rows, width)
    rngs = [torch.tensor([100 + index, 0], dtype=torch.int64) for index in range(len(inputs))]
    scales = [dfa.distribution_for("xavier", width, numel) for numel in inputs]
    cached = all(width * numel <= min(dfa.CACHE_ELEMENTS, dfa.BLOCK_ELEMENTS) for numel in inputs)

    def draw(index, numel):
        distribution, scale = scales[index]
        return torch.ops.fastfa.direct_feedback(rngs[index], width, numel, 0, numel, scale, int(distribution),
                                                torch.float32)

    offsets, total = [], 0
    for numel in inputs:
        offsets.append(total)
        total += numel
    if cached:
        feedback = [draw(index, numel) for index, numel in enumerate(inputs)]
        concatenated = torch.cat(feedback, 1)

        def per_layer():
            return [torch.mm(error.reshape(-1, width), b) for b in feedback]

        def one():
            out = torch.mm(error.reshape(-1, width), concatenated)
            return [out.narrow(1, offset, numel) for offset, numel in zip(offsets, inputs)]
    else:
        def per_layer():
            return [torch.ops.fastfa.direct_feedback_product(error.reshape(-1, width), rngs[index], numel,
                                                             scales[index][1], int(scales[index][0]),
                                                             dfa.BLOCK_ELEMENTS)
                    for index, numel in enumerate(inputs)]

        def one():
            drawn = torch.cat([draw(index, numel) for index, numel in enumerate(inputs)], 1)
            out = torch.mm(error.reshape(-1, width), drawn)
            return [out.narrow(1, offset, numel) for offset, numel in zip(offsets, inputs)]

    equal = all(torch.equal(a, b) for a, b in zip(per_layer(), one()))
    per_layer_us, one_us = [], []
    for _ in range(2):  # interleaved, so a load change hits both
        per_layer_us.append(_time(per_layer, repeats, rounds))
        one_us.append(_time(one, repeats, rounds))
    row = {"cached": cached, "equal_bitwise": equal, "per_layer_us": min(per_layer_us), "one_us": min(one_us),
           "extra_bytes": 4 * rows * (total - max(inputs))}
    if not cached:
        # The parts: the draws (the same elements either way), and the GEMMs alone on drawn B_l's:
        # a one-product that drew straight into the concatenation would save at most the difference.
        feedback = [draw(index, numel) for index, numel in enumerate(inputs)]
        concatenated = torch.cat(feedback, 1)
        row["draws_us"] = _time(lambda: [draw(index, numel) for index, numel in enumerate(inputs)], repeats, rounds)
        row["per_layer_gemms_us"] = _time(lambda: [torch.mm(error, b) for b in feedback], repeats, rounds)
        row["one_gemm_us"] = _time(lambda: torch.mm(error, concatenated), repeats, rounds)
    return row


def step(name: str, width: int, rows: int, repeats: int, rounds: int) -> float:
    """µs of one dfa SGD step of the model (fastfa.convert, today's per-layer products)."""
    build, sample = CASES[name]
    torch.manual_seed(0)
    model = fastfa.convert(build(width), "dfa", seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, target = torch.randn(rows, *sample), torch.randint(0, width, (rows,))

    def one_step():
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), target).backward()
        optimizer.step()
    one_step()
    return _time(one_step, repeats, rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--widths", default="10,1000")
    parser.add_argument("--batches", default="1,8,64,256")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.cases.split(","):
        for width in map(int, args.widths.split(",")):
            inputs = _layer_inputs(name, width)
            for batch in map(int, args.batches.split(",")):
                drawn = width * max(inputs) > dfa.CACHE_ELEMENTS
                repeats = 3 if drawn else (200 if batch <= 64 else 50)
                row = {"case": name, "layer_inputs": inputs, "K": width, "batch": batch,
                       **products(inputs, width, batch, repeats, args.rounds)}
                row["step_us"] = step(name, width, batch, max(1, repeats // 4), args.rounds)
                row["one_over_per_layer"] = row["one_us"] / row["per_layer_us"]
                row["saving_of_step"] = (row["per_layer_us"] - row["one_us"]) / row["step_us"]
                rows.append(row)
                print(f"{name:15s} K={width:5d} N={batch:4d} {'cached' if row['cached'] else 'drawn '} "
                      f"per-layer {row['per_layer_us']:9.1f} µs  one {row['one_us']:9.1f} µs  "
                      f"ratio {row['one_over_per_layer']:.2f}  step {row['step_us']:10.1f} µs  "
                      f"saving {100 * row['saving_of_step']:+.1f}% of the step  bitwise {row['equal_bitwise']}"
                      + ("" if row["cached"] else f"  draws {row['draws_us']:.1f} µs, GEMMs per layer "
                         f"{row['per_layer_gemms_us']:.1f} µs, one {row['one_gemm_us']:.1f} µs"), flush=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    with open("/proc/loadavg") as load:
        loadavg = load.read().split()[:3]
    record = {"commit": commit, "command": " ".join([sys.argv[0]] + sys.argv[1:]), "threads": args.threads,
              "torch": torch.__version__, "loadavg_at_end": loadavg, "rows": rows}
    if args.out:
        with open(args.out, "w") as out:
            json.dump(record, out, indent=1)


if __name__ == "__main__":
    main()
