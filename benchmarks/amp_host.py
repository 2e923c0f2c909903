"""Host cost of fastfa.amp.GradScaler: one tiny Linear step, forward + scaled backward, per rule.

Tiny shapes and one torch thread, so that the time is the host's per-call work. Each rule runs a
step with torch.amp.GradScaler and with fastfa.amp.GradScaler (same init scale); the ratio
fastfa / torch is the cost of carrying S into the backward pass (the carry node on the loss, and
on estimated layers the node that scales B's alignment terms). The median of --repeats runs of
--steps steps each, taken in alternation so that a shared machine's load hits both alike.
Usage: python benchmarks/amp_host.py [--steps 500] [--repeats 7] [--rules usf,kp,ia]
"""

import argparse
import statistics
import time

import torch

import fastfa
import fastfa.amp


def _step_time(layer, x, name, scaler, steps: int) -> float:
    # The flag a fastfa scaler sets for the process, set per run: torch's runs are then what they are
    # in a process that never made a fastfa scaler (no node on B).
    fastfa.amp.enabled = name == "fastfa"
    start = time.perf_counter()
    for _ in range(steps):
        scaler.scale(layer(x).sum()).backward()
    return (time.perf_counter() - start) / steps


def measure(rule: str, steps: int, repeats: int) -> dict:
    layer = fastfa.nn.Linear(16, 16, rule=rule, seed=0)
    x = torch.randn(4, 16)
    scalers = {"torch": torch.amp.GradScaler("cpu", init_scale=2.0**16),
               "fastfa": fastfa.amp.GradScaler("cpu", init_scale=2.0**16)}
    times = {name: [] for name in scalers}
    for name, scaler in scalers.items():
        _step_time(layer, x, name, scaler, 20)  # warm-up: the layer resolves its call, autograd caches
    for _ in range(repeats):
        for name, scaler in scalers.items():
            times[name].append(_step_time(layer, x, name, scaler, steps))
    torch_us, fastfa_us = (statistics.median(times[name]) * 1e6 for name in ("torch", "fastfa"))
    return {"rule": rule, "torch_us": torch_us, "fastfa_us": fastfa_us, "ratio": fastfa_us / torch_us}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rules", default="bp,usf,kp,wm,ia")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| rule | torch GradScaler µs/step | fastfa GradScaler µs/step | fastfa / torch |")
    print("|---|---|---|---|")
    for rule in args.rules.split(","):
        row = measure(rule, args.steps, args.repeats)
        print(f"| {row['rule']} | {row['torch_us']:.1f} | {row['fastfa_us']:.1f} | {row['ratio']:.2f} |")
