"""Issue 20's RetinaNet table: does every rule train RetinaNet after ``fastfa.convert`` with default options?

torchvision's retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=5,
min_size=128, max_size=128), the model of the sign-symmetry seed's COCO experiment; two random
128 px images with one box each; 6 SGD steps (lr 0.01, momentum 0.9), fp32 on the CPU. One row
per rule with the defaults, one for the unconverted model (torch's own backprop), the rows
of the issue's table that set an option (usf with the paper's scale "xiao", usf with "kaiming"),
and aa and ia in the paper's configuration (normalize_input=False, against the layers' default).
dfa's row says why it is refused (RetinaNet in training returns a dict of losses, no output tensor).

    python benchmarks/retinanet_stability.py --out benchmarks/results/<date>-retinanet-stability.md
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time

import torch
import torchvision

import fastfa

STEPS, LR, MOMENTUM = 6, 0.01, 0.9


def data(seed: int = 0):
    """Two random 128 px images, one box and label each (the same for every row)."""
    generator = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, 128, 128, generator=generator) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 70.0, 90.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[40.0, 30.0, 110.0, 100.0]]), "labels": torch.tensor([3])}]
    return images, targets


def model(seed: int = 0):
    torch.manual_seed(seed)
    return torchvision.models.detection.retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=5,
                                                               min_size=128, max_size=128)


def losses(rule, options, steps: int = STEPS, seed: int = 0) -> list:
    """The total loss (classification + box regression) at each of ``steps`` SGD steps."""
    net = model(seed)
    if rule is not None:
        fastfa.convert(net, rule, seed=seed, **options)
    net.train()
    optimizer = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM)
    images, targets = data(seed)
    curve = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = sum(net(images, targets).values())
        curve.append(float(loss.detach()))
        if not math.isfinite(curve[-1]):
            curve += [math.nan] * (steps - len(curve))
            break
        loss.backward()
        optimizer.step()
    return curve


ROWS = [("torch (unconverted), bp", None, {})] + [(f"{rule} (defaults)", rule, {}) for rule in fastfa.RULES] + [
    ("usf, scale=\"xiao\" (Xiao et al.'s scale)", "usf", {"scale": "xiao"}),
    ("usf, scale=\"kaiming\"", "usf", {"scale": "kaiming"}),
    ("aa, normalize_input=False (the paper's configuration)", "aa", {"normalize_input": False}),
    ("ia, normalize_input=False (the paper's configuration)", "ia", {"normalize_input": False}),
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the Markdown table here as well as to stdout")
    parser.add_argument("--rows", help="comma-separated indices of the rows to run, 0 the unconverted model "
                                       "(default: every row); runs on a shared machine can be split and joined")
    args = parser.parse_args(argv)
    wanted = None if args.rows is None else {int(index) for index in args.rows.split(",")}
    torch.set_num_threads(max(1, torch.get_num_threads()))
    lines = ["| rule | loss at steps 1..6 | step 6 / step 1 |", "|---|---|---|"]
    start = time.time()
    for index, (label, rule, options) in enumerate(ROWS):
        if wanted is not None and index not in wanted:
            continue
        try:
            with fastfa.use_backend("aten"):
                curve = losses(rule, options)
        except TypeError as error:  # dfa: the model's output is not a tensor
            lines.append(f"| {label} | refused: {error} | |")
            print(lines[-1], flush=True)
            continue
        text = ", ".join(f"{value:.4g}" for value in curve)
        ratio = curve[-1] / curve[0] if math.isfinite(curve[-1]) else math.nan
        lines.append(f"| {label} | {text} | {ratio:.3f} |")
        print(lines[-1], flush=True)
    header = (f"# RetinaNet stability after fastfa.convert with default options (issue 20)\n\n"
              f"`python benchmarks/retinanet_stability.py`: torchvision {torchvision.__version__}, torch "
              f"{torch.__version__}, fastfa {fastfa.__version__}, {platform.processor() or platform.machine()}, "
              f"{torch.get_num_threads()} threads, {time.time() - start:.0f} s. retinanet_resnet50_fpn(weights=None, "
              f"weights_backbone=None, num_classes=5, min_size=128, max_size=128), two random 128 px images "
              f"with one box each, {STEPS} SGD steps (lr {LR}, momentum {MOMENTUM}), fp32, CPU, aten backend; "
              f"loss = classification + box regression, before each step's update.\n\n")
    text = header + "\n".join(lines) + "\n"
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
