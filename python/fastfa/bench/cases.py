"""Cases: one layer shape or one model, and how to build torch's module (the backprop baseline)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch


#: Accepted --dtype spellings -> (torch dtype, the short name the rows use).
DTYPES = {
    "fp32": (torch.float32, "fp32"), "float32": (torch.float32, "fp32"), "float": (torch.float32, "fp32"),
    "bf16": (torch.bfloat16, "bf16"), "bfloat16": (torch.bfloat16, "bf16"),
    "fp16": (torch.float16, "fp16"), "float16": (torch.float16, "fp16"), "half": (torch.float16, "fp16"),
    "fp64": (torch.float64, "fp64"), "float64": (torch.float64, "fp64"), "double": (torch.float64, "fp64"),
}

#: --ops: the layer kinds, and "model" for the model-level training steps.
OPS = ("linear", "conv2d", "model")


@dataclass
class Case:
    """One thing to time: a layer shape (fwd + bwd) or a model (one SGD training step).

    ``make_reference(device, dtype)`` builds torch's own module; every variant is made from
    a deep copy of it (fastfa.convert, the peers), so all hold the same weights.
    """

    op: str                       # "linear" | "conv2d" | "model:<name>"
    shape: str                    # for the table and the rows
    input_shape: tuple
    make_reference: Callable      # (device, dtype) -> torch.nn.Module
    group: str = ""               # the sweep it belongs to: "linear 4096", "resnet18 conv", ...
    layout: Optional[str] = None  # "nchw" | "channels_last" for conv and models; None for linear
    classes: int = 0              # models: a training step on cross-entropy over this many classes

    @property
    def batch(self) -> int:
        return self.input_shape[0]

    @property
    def channels_last(self) -> bool:
        return self.layout == "channels_last"

    @property
    def is_model(self) -> bool:
        return self.op.startswith("model:")


LAYOUTS = ("nchw", "channels_last")


def linear_case(batch: int, in_features: int, out_features: int, group: str = "") -> Case:
    return Case("linear", f"{batch}x{in_features} -> {out_features}", (batch, in_features),
                lambda device, dtype: torch.nn.Linear(in_features, out_features, device=device, dtype=dtype),
                group=group or f"linear {in_features}->{out_features}")


def conv2d_case(batch: int, in_channels: int, out_channels: int, size: int, kernel: int = 3, stride: int = 1,
                padding: int = 1, channels_last: bool = False, group: str = "conv2d", name: str = "") -> Case:
    layout = "channels_last" if channels_last else "nchw"
    shape = (f"{batch}x{in_channels}x{size}x{size} -> {out_channels}, {kernel}x{kernel} s{stride} p{padding}"
             + (", channels_last" if channels_last else "") + (f" ({name})" if name else ""))
    return Case("conv2d", shape, (batch, in_channels, size, size),
                lambda device, dtype: torch.nn.Conv2d(in_channels, out_channels, kernel, stride, padding,
                                                      device=device, dtype=dtype),
                group=group, layout=layout)


def resnet18_conv_cases(batch: int, resolution: int, channels_last: bool) -> list:
    """The distinct convolutions of torchvision's ResNet-18 at this input resolution (224: ImageNet)."""
    r = resolution
    specs = [("conv1", 3, 64, r, 7, 2, 3), ("layer1", 64, 64, r // 4, 3, 1, 1),
             ("layer2.0.conv1", 64, 128, r // 4, 3, 2, 1), ("layer2.0.downsample", 64, 128, r // 4, 1, 2, 0),
             ("layer2", 128, 128, r // 8, 3, 1, 1),
             ("layer3.0.conv1", 128, 256, r // 8, 3, 2, 1), ("layer3.0.downsample", 128, 256, r // 8, 1, 2, 0),
             ("layer3", 256, 256, r // 16, 3, 1, 1),
             ("layer4.0.conv1", 256, 512, r // 16, 3, 2, 1), ("layer4.0.downsample", 256, 512, r // 16, 1, 2, 0),
             ("layer4", 512, 512, r // 32, 3, 1, 1)]
    return [conv2d_case(batch, cin, cout, max(size, 1), kernel, stride, padding, channels_last,
                        group=f"resnet18 conv @{r}px", name=name)
            for name, cin, cout, size, kernel, stride, padding in specs]


def retinanet_head_cases(batch: int, image: int, channels_last: bool) -> list:
    """RetinaNet's head (torchvision retinanet_resnet50_fpn): 256->256 3x3 on FPN levels P3..P7,
    and the classification (9 anchors x 91 classes) and box (9 x 4) convolutions on P3."""
    levels = [max(1, math.ceil(image / stride)) for stride in (8, 16, 32, 64, 128)]
    cases = [conv2d_case(batch, 256, 256, size, 3, 1, 1, channels_last, group=f"retinanet head @{image}px",
                         name=f"P{level}") for level, size in zip(range(3, 8), levels)]
    cases += [conv2d_case(batch, 256, 9 * 91, levels[0], 3, 1, 1, channels_last,
                          group=f"retinanet head @{image}px", name="P3 cls_logits"),
              conv2d_case(batch, 256, 9 * 4, levels[0], 3, 1, 1, channels_last,
                          group=f"retinanet head @{image}px", name="P3 bbox_reg")]
    return cases


class MLPBlock(torch.nn.Module):
    """A transformer's MLP block: LayerNorm, Linear(d -> 4d), GELU, Linear(4d -> d), residual."""

    def __init__(self, width: int, classes: int):
        super().__init__()
        self.norm = torch.nn.LayerNorm(width)
        self.up = torch.nn.Linear(width, 4 * width)
        self.down = torch.nn.Linear(4 * width, width)
        self.head = torch.nn.Linear(width, classes)

    def forward(self, x):
        return self.head(x + self.down(torch.nn.functional.gelu(self.up(self.norm(x)))))


MODELS = ("resnet18", "alexnet", "resnet50", "mlp")


def model_case(name: str, batch: int, resolution: int, channels_last: bool, width: int = 512) -> Case:
    """One SGD training step of a torchvision model (1000 classes) or of an MLP block."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {', '.join(MODELS)}; got {name!r}")
    if name == "mlp":
        return Case("model:mlp", f"{batch}x{width}, width {width} -> {4 * width} -> {width}", (batch, width),
                    lambda device, dtype: MLPBlock(width, 1000).to(device, dtype), group="model", classes=1000)

    def make(device, dtype):
        import torchvision

        return getattr(torchvision.models, name)(num_classes=1000).to(device, dtype)

    layout = "channels_last" if channels_last else "nchw"
    return Case(f"model:{name}", f"{batch}x3x{resolution}x{resolution}" + (", channels_last" if channels_last else ""),
                (batch, 3, resolution, resolution), make, group="model", layout=layout, classes=1000)


#: Named shape sets for --shapes.
SHAPE_SETS = ("default", "linear-sweep", "resnet18", "retinanet")


@dataclass
class Sizes:
    """The per-device sizes of the sweep (the CPU's are scaled down to finish in minutes)."""

    linear_batches: tuple
    linear_width: int
    conv_batch: int
    resnet_resolution: int
    retinanet_batch: int
    retinanet_image: int
    model_batch: int
    model_resolution: int
    mlp_width: int


def sizes_for(device_type: str) -> Sizes:
    if device_type == "cuda":
        return Sizes(linear_batches=tuple(2 ** k for k in range(14)), linear_width=4096, conv_batch=64,
                     resnet_resolution=224, retinanet_batch=4, retinanet_image=800, model_batch=64,
                     model_resolution=224, mlp_width=1024)
    return Sizes(linear_batches=(1, 4, 16, 64, 256), linear_width=4096, conv_batch=2, resnet_resolution=112,
                 retinanet_batch=1, retinanet_image=256, model_batch=4, model_resolution=64, mlp_width=512)


def default_cases(device_type: str, quick: bool = False, ops=OPS, shapes=("default",), layouts=None,
                  batches=None, models=("resnet18",), model_batch=None, model_resolution=None) -> list:
    """The cases `fastfa bench` times.

    ``shapes``: "default" (a few representative layers: what a plain `fastfa bench` times),
    "linear-sweep" (4096x4096 Linear over the device's batch sizes, or ``batches``),
    "resnet18" (its distinct convolutions), "retinanet" (its head's). ``layouts`` apply to
    conv and models (default: channels_last on GPU, NCHW on CPU). ``models`` are timed when
    "model" is in ``ops``.
    """
    sizes = sizes_for(device_type)
    if layouts is None:
        layouts = ("channels_last",) if device_type == "cuda" else ("nchw",)
    cases = []
    if quick:
        cases += [linear_case(b, 64, 48) for b in (batches or (32,))]
        cases += [conv2d_case(4, 8, 16, 12, channels_last=layout == "channels_last") for layout in layouts]
        model_cases = [Case("model:mlp", "8x32, width 32 -> 128 -> 32", (8, 32),
                            lambda device, dtype: MLPBlock(32, 10).to(device, dtype), group="model", classes=10)
                       for name in models if name == "mlp"]
        model_cases += [model_case(name, model_batch or 2, model_resolution or 32, layout == "channels_last")
                        for name in models if name != "mlp" for layout in layouts]
    else:
        for shape_set in shapes:
            if shape_set == "default":
                if device_type == "cuda":
                    cases += [linear_case(b, 4096, 4096, group="linear 4096->4096") for b in (16, 256, 8192)]
                    cases += [conv2d_case(256, 64, 64, 32, channels_last=layout == "channels_last", group="conv2d")
                              for layout in layouts]
                    cases += [conv2d_case(256, 128, 128, 16, channels_last=layout == "channels_last",
                                          group="conv2d") for layout in layouts]
                else:
                    # One memory-bound Linear (a 16 MiB weight, 16 rows), one compute-bound one, a
                    # ResNet-18 layer1 convolution and a RetinaNet head convolution, at CPU sizes.
                    cases += [linear_case(16, 2048, 2048, group="linear 2048->2048"),
                              linear_case(256, 1024, 1024, group="linear 1024->1024")]
                    for layout in layouts:
                        cases += [conv2d_case(2, 64, 64, 56, channels_last=layout == "channels_last",
                                              group="conv2d", name="resnet18 layer1"),
                                  conv2d_case(2, 256, 256, 16, channels_last=layout == "channels_last",
                                              group="conv2d", name="retinanet head P4 @128px")]
            elif shape_set == "linear-sweep":
                width = sizes.linear_width
                cases += [linear_case(b, width, width, group=f"linear {width}->{width}")
                          for b in (batches or sizes.linear_batches)]
            elif shape_set == "resnet18":
                for layout in layouts:
                    cases += resnet18_conv_cases(sizes.conv_batch, sizes.resnet_resolution, layout == "channels_last")
            elif shape_set == "retinanet":
                for layout in layouts:
                    cases += retinanet_head_cases(sizes.retinanet_batch, sizes.retinanet_image,
                                                  layout == "channels_last")
            else:
                raise ValueError(f"shapes must be among {', '.join(SHAPE_SETS)}; got {shape_set!r}")
        model_cases = []
        for name in models:
            if name == "mlp":
                model_cases.append(model_case("mlp", (model_batch or sizes.model_batch) * 32, 0, False,
                                              width=sizes.mlp_width))
            else:
                model_cases += [model_case(name, model_batch or sizes.model_batch,
                                           model_resolution or sizes.model_resolution, layout == "channels_last")
                                for layout in layouts]
    cases = [case for case in cases if case.op in ops]
    if "model" in ops:
        cases += model_cases
    return cases
