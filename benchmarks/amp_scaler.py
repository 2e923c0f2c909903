"""fastfa.amp.GradScaler against torch.amp.GradScaler: B's update error, and the host cost.

Update error: one SGD step of a small Conv2d + Linear model on each estimated rule, with torch's
scaler and with fastfa's, against the unscaled step: ||dB_scaled - dB|| / ||dB|| over every B.
torch's leaves B's alignment terms divided by S.

Host cost: one tiny Linear step, forward + scaled backward, per rule, one torch thread (the time
is the host's per-call work); fastfa / torch is the cost of carrying S into the backward pass
(the carry node on the loss, and on estimated layers the node that scales B's alignment terms).
The median of --repeats runs of --steps steps each, in alternation so that a shared machine's
load hits both alike.
Usage: python benchmarks/amp_scaler.py [--steps 500] [--repeats 7] [--rules bp,usf,fa,kp,wm,sa,aa,ia]
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


def _model(rule):
    torch.manual_seed(0)
    return torch.nn.Sequential(fastfa.nn.Conv2d(2, 3, 3, padding=1, rule=rule, seed=1), torch.nn.ReLU(),
                               torch.nn.Flatten(), fastfa.nn.Linear(48, 5, rule=rule, seed=2))


def update_error(rule: str, scale: float) -> dict:
    """{scaler name: B's update error against the unscaled step}."""
    x, target = torch.randn(4, 2, 4, 4), torch.randint(0, 5, (4,))
    start = _model(rule)
    updates = {}
    for name in ("none", "torch", "fastfa"):
        fastfa.amp.enabled = name == "fastfa"
        model = _model(rule)
        model.load_state_dict(start.state_dict())
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=1e-4)
        scaler = {"none": None, "torch": torch.amp.GradScaler("cpu", init_scale=scale),
                  "fastfa": fastfa.amp.GradScaler("cpu", init_scale=scale)}[name]
        loss = torch.nn.functional.cross_entropy(model(x), target)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
        updates[name] = torch.cat([(p - q).detach().flatten() for (key, p), q in
                                   zip(model.named_parameters(), start.parameters()) if key.endswith("feedback")])
    return {name: float((updates[name] - updates["none"]).norm() / updates["none"].norm())
            for name in ("torch", "fastfa")}


def measure(rule: str, steps: int, repeats: int, fresh: bool = True) -> dict:
    """fresh: as in a process where no estimated layer has run (no holder: a loss gets no carry node);
    otherwise as after one has (every loss a fastfa scaler scales carries S, whatever its rules)."""
    if fresh:
        fastfa.amp._holders.clear()
    else:
        fastfa.amp._holder(torch.device("cpu"))
    layer = fastfa.nn.Linear(16, 16, rule=rule, **({"seed": 0} if "seed" in fastfa.rules.rule_spec(rule).options
                                                    else {}))
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
    return {"rule": rule if fresh else f"{rule}, after an estimated layer ran", "torch_us": torch_us, "fastfa_us": fastfa_us, "ratio": fastfa_us / torch_us}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rules", default="bp,usf,fa,kp,wm,sa,aa,ia")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| rule | S | B's update error, torch GradScaler | B's update error, fastfa GradScaler |")
    print("|---|---|---|---|")
    for rule in ("kp", "wm", "sa", "aa", "ia"):
        for exponent in (10, 16):
            errors = update_error(rule, 2.0**exponent)
            print(f"| {rule} | 2^{exponent} | {errors['torch']:.3g} | {errors['fastfa']:.2g} |")
    print()
    print("| rule | torch GradScaler µs/step | fastfa GradScaler µs/step | fastfa / torch |")
    print("|---|---|---|---|")
    rows = [measure(rule, args.steps, args.repeats) for rule in args.rules.split(",")]
    rows.append(measure("bp", args.steps, args.repeats, fresh=False))
    for row in rows:
        print(f"| {row['rule']} | {row['torch_us']:.1f} | {row['fastfa_us']:.1f} | {row['ratio']:.2f} |")
