"""Models for ``fastfa train``: three small ones for digits, torchvision's, all converted by fastfa.convert."""

from __future__ import annotations

import torch

from ..convert import convert

__all__ = ["SMALL_MODELS", "TORCHVISION_MODELS", "MODELS", "build", "classifier_name", "deep_name"]

SMALL_MODELS = ("convnet", "mlp", "vit")
TORCHVISION_MODELS = ("resnet18", "alexnet", "resnet50")
MODELS = SMALL_MODELS + TORCHVISION_MODELS
# AlexNet's stem (11x11 stride 4, then three 3x3 stride-2 pools) needs at least this many pixels.
_MIN_IMAGE_SIZE = {"alexnet": 63}


def _convnet(channels: int, image_size: int, num_classes: int, dropout: float) -> torch.nn.Module:
    """Two 3x3 conv layers with 2x2 max pooling, then two linear layers.

    No batch norm: its statistics are per process, so a DDP run would not equal one
    process on the combined batch, and the comparison would mix in BN's own effect.
    """
    pooled = image_size // 4
    return torch.nn.Sequential(
        torch.nn.Conv2d(channels, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Dropout(dropout),
        torch.nn.Linear(64 * pooled * pooled, 128), torch.nn.ReLU(), torch.nn.Dropout(dropout),
        torch.nn.Linear(128, num_classes))


def _mlp(channels: int, image_size: int, num_classes: int, dropout: float) -> torch.nn.Module:
    """Three linear layers (two hidden layers of 256 ReLU units)."""
    return torch.nn.Sequential(
        torch.nn.Flatten(),
        torch.nn.Linear(channels * image_size * image_size, 256), torch.nn.ReLU(), torch.nn.Dropout(dropout),
        torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Dropout(dropout),
        torch.nn.Linear(256, num_classes))


class _ViT(torch.nn.Module):
    """A small vision transformer: 2x2 patches (16 tokens on digits' 8x8 images) embedded by a
    strided conv, learned position embeddings, pre-norm encoder layers, mean over the tokens,
    then a linear classifier. No class token: its Parameter would sit outside any layer the
    rules know; the positions are an nn.Embedding, which transports no weight.
    """

    def __init__(self, channels: int, image_size: int, num_classes: int, dropout: float, *, patch: int = 2,
                 width: int = 32, depth: int = 2, heads: int = 4, hidden: int = 64):
        super().__init__()
        self.patches = torch.nn.Conv2d(channels, width, patch, stride=patch)
        self.position = torch.nn.Embedding((image_size // patch) ** 2, width)
        layer = torch.nn.TransformerEncoderLayer(width, heads, hidden, dropout, activation="gelu", batch_first=True,
                                                 norm_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.patches(images).flatten(2).transpose(1, 2) + self.position.weight
        return self.head(self.norm(self.encoder(tokens)).mean(1))
def deep_name(kind: str, depth: int) -> str:
    """The depth study's model names: "mlp-depth-8", "convnet-depth-4"."""
    return f"{kind}-depth-{depth}"


def _parse_deep(name: str):
    kind, _, depth = name.partition("-depth-")
    if kind in SMALL_MODELS and depth.isdigit() and int(depth) >= 2:
        return kind, int(depth)
    return None


def _deep(kind: str, depth: int, channels: int, image_size: int, num_classes: int) -> torch.nn.Module:
    """The depth study's models: ``depth`` layers with weights, ReLU between them, He-normal W.

    mlp: depth - 1 hidden layers of 128 units. convnet: depth - 1 3x3 conv layers of 32 channels (2x2
    max pooling after the first two), then the classifier. W is He-normal (Kaiming, fan_in, ReLU) so
    that backprop's signal neither vanishes nor explodes with depth; torch's default init shrinks it
    by about sqrt(6) per ReLU layer, which would make depth a test of the init, not of the rules.
    """
    layers = []
    if kind == "mlp":
        width, features = 128, channels * image_size * image_size
        layers.append(torch.nn.Flatten())
        for _ in range(depth - 1):
            layers += [torch.nn.Linear(features, width), torch.nn.ReLU()]
            features = width
        layers.append(torch.nn.Linear(features, num_classes))
    else:
        size, in_channels = image_size, channels
        for index in range(depth - 1):
            layers += [torch.nn.Conv2d(in_channels, 32, 3, padding=1), torch.nn.ReLU()]
            in_channels = 32
            if index < 2 and size >= 2:
                layers.append(torch.nn.MaxPool2d(2))
                size //= 2
        layers += [torch.nn.Flatten(), torch.nn.Linear(32 * size * size, num_classes)]
    model = torch.nn.Sequential(*layers)
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            torch.nn.init.zeros_(module.bias)
    return model


def _torchvision(name: str, channels: int, num_classes: int) -> torch.nn.Module:
    try:
        import torchvision
    except ImportError as error:
        raise RuntimeError(f"--models {name} needs torchvision: pip install torchvision") from error
    model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    if channels != 3:
        # Grey images (digits): the stem takes `channels` inputs, with the stem's geometry otherwise unchanged.
        parent, attribute = (model.features, "0") if name == "alexnet" else (model, "conv1")
        stem = getattr(parent, attribute)
        setattr(parent, attribute, torch.nn.Conv2d(channels, stem.out_channels, stem.kernel_size, stem.stride,
                                                   stem.padding, stem.dilation, stem.groups, stem.bias is not None))
    return model


def classifier_name(model: torch.nn.Module) -> str:
    """The qualified name of the model's last Linear layer (its classifier)."""
    names = [name for name, module in model.named_modules() if type(module) is torch.nn.Linear]
    if not names:
        raise ValueError("the model has no torch.nn.Linear classifier")
    return names[-1]


def build(name: str, rule: str, *, channels: int, image_size: int, num_classes: int, classifier: str = "rule",
          dropout: float = 0.0, seed: int = 0, options: dict | None = None) -> torch.nn.Module:
    """A fresh model with its Linear and Conv2d layers converted to ``rule``.

    W is drawn from ``seed`` alone, so every rule starts from the same weights; the
    rule's own draws (R, B's start, brsf / wm seeds) come from seed too, layer by layer.
    ``classifier="bp"`` keeps the last Linear on backprop (Xiao et al. 2018);
    ``"rule"`` converts it too (Lillicrap et al. 2016, Kunin et al. 2020).
    """
    deep = _parse_deep(name)
    if name not in MODELS and deep is None:
        raise ValueError(f"--models: unknown model {name!r}; choose from {', '.join(MODELS)}")
    if classifier not in ("bp", "rule"):
        raise ValueError(f"--classifier must be bp or rule, got {classifier!r}")
    if image_size < _MIN_IMAGE_SIZE.get(name, 1):
        raise ValueError(f"--models {name} needs images of at least {_MIN_IMAGE_SIZE[name]} pixels, these are "
                         f"{image_size}x{image_size}; pass --image-size {_MIN_IMAGE_SIZE[name] + 1} or more")
    if name == "convnet" and image_size < 4:
        raise ValueError(f"--models convnet needs images of at least 4 pixels, got {image_size}")
    if name == "vit" and (image_size < 2 or image_size % 2):
        raise ValueError(f"--models vit cuts 2x2 patches: the image size must be even, got {image_size}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if deep is not None:
            model = _deep(*deep, channels, image_size, num_classes)
        elif name == "convnet":
            model = _convnet(channels, image_size, num_classes, dropout)
        elif name == "mlp":
            model = _mlp(channels, image_size, num_classes, dropout)
        elif name == "vit":
            model = _ViT(channels, image_size, num_classes, dropout)
        else:
            model = _torchvision(name, channels, num_classes)
        exclude = (classifier_name(model),) if classifier == "bp" else ()
        return convert(model, rule, exclude=exclude, seed=seed, **(options or {}))
