"""aa and ia layers: a step (forward + backward) at the layers' default (normalize_input=True, the
alignment pipeline's path) over the paper's configuration (normalize_input=False, the op's closed form).

    python benchmarks/aa_ia_default_cost.py     # a Markdown table; one torch thread, fp32, aten
"""

from __future__ import annotations

import statistics
import time

import torch

import fastfa

CASES = {
    "Linear(512,512) x 64": (lambda **options: fastfa.nn.Linear(512, 512, **options), (64, 512)),
    "Conv2d(64,64,3,p=1) on 8x64x16x16": (lambda **options: fastfa.nn.Conv2d(64, 64, 3, padding=1, **options),
                                          (8, 64, 16, 16)),
}


def step_ms(layer, x, rounds: int = 7, calls: int = 5) -> float:
    """Median ms of one forward and backward, after two warm-up calls."""
    for _ in range(2):
        layer(x).sum().backward()
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            layer(x).sum().backward()
        samples.append((time.perf_counter() - start) / calls * 1e3)
    return statistics.median(samples)


def main() -> None:
    torch.set_num_threads(1)
    print("| layer | rule | paper (ms) | default (ms) | default / paper |\n|---|---|---|---|---|")
    for name, (make, shape) in CASES.items():
        torch.manual_seed(0)
        x = torch.randn(shape)
        for rule in ("aa", "ia"):
            with fastfa.use_backend("aten"):
                torch.manual_seed(0)
                paper = step_ms(make(rule=rule, normalize_input=False), x)
                torch.manual_seed(0)
                default = step_ms(make(rule=rule), x)
            print(f"| {name} | {rule} | {paper:.2f} | {default:.2f} | {default / paper:.2f} |", flush=True)


if __name__ == "__main__":
    main()
