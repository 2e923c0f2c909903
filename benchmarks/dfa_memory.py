"""dfa's memory at ImageNet sizes: a converted torchvision resnet18 with K = 1000 at 224 px.

The full projections B_l of this model hold 1000 x 2.2 million floats (8.7 GB in fp32; the
largest, layer1's 64 x 56 x 56 input, alone 0.8 GB); fastfa draws them a block at a time and
never holds them. Each variant runs SGD steps in a fresh process and reports its peak resident
memory (ru_maxrss) and its time per step, next to backprop's (the unconverted model):

    python benchmarks/dfa_memory.py --batch 2 --steps 2 --out benchmarks/results/<date>-cpu-...-dfa-memory.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time


def _device_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return "cpu: " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu: " + platform.processor()


def run_one(rule: str, batch: int, steps: int, image_size: int) -> dict:
    """In this process: build, convert (unless bp), train `steps` SGD steps; peak RSS and times."""
    import torch
    import torchvision

    import fastfa

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=1000)
    if rule != "bp":
        fastfa.convert(model, rule, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, image_size, image_size)
    target = torch.randint(0, 1000, (batch,))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), target)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"rule": rule, "peak_bytes": peak, "peak_before_training_bytes": before, "step_s": times,
            "loss": float(loss), "finite_grads": all(bool(p.grad.isfinite().all()) for p in model.parameters())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rules", default="bp,dfa")
    parser.add_argument("--out")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import torch
        torch.set_num_threads(args.threads)
        print(json.dumps(run_one(args.child, args.batch, args.steps, args.image_size)))
        return
    import torch

    import fastfa
    rows = []
    for rule in args.rules.split(","):
        command = [sys.executable, __file__, "--child", rule, "--batch", str(args.batch), "--steps",
                   str(args.steps), "--image-size", str(args.image_size), "--threads", str(args.threads)]
        result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        rows.append(result)
        print(f"{rule}: peak {result['peak_bytes'] / 2**30:.2f} GiB, steps {[round(t, 2) for t in result['step_s']]} s",
              flush=True)
    bp = next((row for row in rows if row["rule"] == "bp"), None)
    record_rows = []
    for row in rows:
        record_rows.append({"op": "model:resnet18", "shape": f"{args.batch}x3x{args.image_size}x{args.image_size}, K=1000",
                            "dtype": "fp32", "rule": row["rule"], "backend": "aten",
                            "ms": 1000 * min(row["step_s"]), "bp_ms": 1000 * min(bp["step_s"]) if bp else None,
                            "ratio": min(row["step_s"]) / min(bp["step_s"]) if bp else None,
                            "peak_bytes": row["peak_bytes"], "bp_peak_bytes": bp["peak_bytes"] if bp else None,
                            "max_rel_err": None, "step_s": row["step_s"], "finite_grads": row["finite_grads"]})
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    record = {"commit": commit, "command": " ".join([sys.argv[0]] + sys.argv[1:]), "device": _device_name(),
              "versions": {"torch": torch.__version__, "fastfa": fastfa.__version__},
              "note": "peak_bytes is the process's peak resident memory (ru_maxrss), model and data included; "
                      f"one SGD step per timing, {args.threads} torch thread(s)",
              "rows": record_rows}
    if args.out:
        with open(args.out, "w") as out:
            json.dump(record, out, indent=1)
    print(json.dumps(record_rows, indent=1))


if __name__ == "__main__":
    main()
