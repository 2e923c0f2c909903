"""``fastfa train``: the reference training program that compares learning rules.

    fastfa train                                   # digits, convnet and mlp, every rule (a few minutes on a CPU)
    fastfa train --models resnet18 --data ~/cifar-10-batches-py --rules bp,usf,brsf --amp bf16
    torchrun --nproc_per_node 8 -m fastfa train --models resnet50 --data /imagenet --batch-size 1024 ...

Per epoch: training loss and accuracy, test loss and accuracy, time per step, and per layer
the angle between B and W and between the grad_input the rule propagates and backprop's.
At the end: a table comparing the rules, a JSON record and a PNG plot. A checkpoint per
run and epoch (``--save-every`` for more often); ``--resume`` continues exactly.
"""

from __future__ import annotations

import argparse
import sys

from ..alignment import OPTIONS as PIPELINE_OPTIONS
from ..rules import ALIASES, RULES, SCALES, canonical_rule
from .models import MODELS

__all__ = ["add_arguments", "main", "cmd_train", "run", "parse"]

DESCRIPTION = (
    "Train models with one or several learning rules and compare them: per epoch the loss, train and test "
    "accuracy, time per step and the per-layer weight and gradient alignment angles; at the end a table, a JSON "
    "record and a PNG plot. Default: scikit-learn's digits (no download), a small convnet and an MLP, every rule. "
    "Under torchrun it trains with DistributedDataParallel (gloo on CPU, nccl on GPU).")


def _list(text: str) -> list:
    return [item.strip() for item in text.split(",") if item.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``fastfa train`` (cli.py's subcommand and :func:`main` share them)."""
    what = parser.add_argument_group("what to train")
    what.add_argument("--models", default="convnet,mlp",
                      help=f"comma-separated models: {', '.join(MODELS)} (default: convnet,mlp)")
    what.add_argument("--rules", default=",".join(RULES),
                      help=f"comma-separated learning rules (default: all of {', '.join(RULES)})")
    what.add_argument("--classifier", choices=("rule", "bp"), default="rule",
                      help="the last Linear layer: 'rule' converts it too (Lillicrap et al., Kunin et al.; "
                           "default), 'bp' keeps it on backprop (Xiao et al.)")
    what.add_argument("--data", metavar="DIR",
                      help="CIFAR-10's python batches (data_batch_1..5, test_batch) or an ImageFolder in "
                           "ImageNet's layout (DIR/train/<class>/..., DIR/val/<class>/...); default: digits")
    what.add_argument("--image-size", type=int, metavar="N",
                      help="resize images to NxN (default: 8 digits, 32 CIFAR-10, 224 ImageFolder)")
    what.add_argument("--dropout", type=float, default=0.0, help="dropout of convnet, mlp and vit (default 0)")

    options = parser.add_argument_group("rule options (each goes to the rules that take it; default: fastfa's)")
    options.add_argument("--scale", help="usf's scale: rms (default), xiao, xavier, kaiming or a positive number")
    options.add_argument("--init", choices=("kaiming", "xavier", "xiao"),
                         help="R's distribution (fa, brsf, frsf) and B's start (kp, wm, sa, aa, ia)")
    for name, rules in (("alpha", "kp, wm, sa, aa, ia"), ("beta", "wm, sa, aa, ia"), ("gamma", "ia"),
                        ("sigma", "wm's noise std")):
        options.add_argument(f"--{name}", type=float, help=f"{name} of the estimated rules ({rules})")
    options.add_argument("--pipeline", metavar="SWITCH[=VALUE],...",
                         help="switches of the alignment pipeline for wm, aa, ia (ia's own ones for ia only), e.g. "
                              "normalize_input,center_forward_output,input_distribution=normal; 'none' for none "
                              f"(names: {', '.join(PIPELINE_OPTIONS)})")
    options.add_argument("--reference-defaults", action="store_true",
                         help="the estimated rules at the reference code's alpha, beta, gamma and no switches "
                              "(fastfa.rules); default: fastfa train's documented defaults that train "
                              "(fastfa.training.defaults)")

    how = parser.add_argument_group("how to train")
    how.add_argument("--epochs", type=int, default=20, help="epochs per run (default 20)")
    how.add_argument("--batch-size", type=int, default=32,
                     help="global batch size, split over the processes of a distributed run (default 32)")
    how.add_argument("--steps-per-epoch", type=int, metavar="N",
                     help="at most N steps per epoch (default: the whole training set)")
    how.add_argument("--lr", type=float, default=0.02, help="SGD learning rate (default 0.02)")
    how.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    how.add_argument("--feedback-lr", type=float, metavar="LR",
                     help="learning rate of the learned B (kp, wm, sa, aa, ia) in its own param group "
                          "(fastfa.feedback_parameters; default: --lr)")
    how.add_argument("--feedback-optimizer", choices=("sgd", "adam"), default="sgd",
                     help="optimizer of the learned B: sgd (with --momentum, default) or adam")
    how.add_argument("--weight-decay", type=float, default=0.0,
                     help="weight decay of W and biases (default 0; kp adds 2*alpha, as B decays)")
    how.add_argument("--schedule", choices=("cosine", "constant"), default="cosine",
                     help="learning-rate schedule over all steps (default cosine)")
    how.add_argument("--seed", type=int, default=0, help="seed of weights, feedback, data order (default 0)")
    how.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none",
                     help="autocast precision (fp16 with a GradScaler); default none")
    how.add_argument("--dtype", choices=("fp32", "fp64"), default="fp32", help="weights' dtype (default fp32)")
    how.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    how.add_argument("--compile", action="store_true", help="torch.compile the model")
    how.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available; torchrun: cuda:LOCAL_RANK)")
    how.add_argument("--threads", type=int, metavar="N", help="torch's CPU threads (torch.set_num_threads)")
    how.add_argument("--workers", type=int, default=4, help="DataLoader workers for an ImageFolder (default 4)")
    how.add_argument("--eval-batch-size", type=int, default=500, help="test batch size (default 500)")

    study = parser.add_argument_group("depth study")
    study.add_argument("--depths", metavar="D,D,...",
                       help="train MLPs (and convnets) of these depths (layers with weights) for every rule and "
                            "write a table and a plot of test accuracy and gradient alignment against depth, "
                            "e.g. 2,4,8,12; with --seeds")
    study.add_argument("--seeds", type=int, default=3, help="seeds per point of the depth study (default 3)")

    measure = parser.add_argument_group("measures and outputs")
    measure.add_argument("--no-alignment", action="store_true", help="skip the per-layer alignment angles")
    measure.add_argument("--probe-size", type=int, default=128,
                         help="test images the gradient alignment is measured on (default 128)")
    measure.add_argument("--out", metavar="PATH",
                         help="JSON record; the plot goes next to it as .png (default: benchmarks/results/"
                              "<date>-<device>-train-<dataset>.json when that folder exists, else ./fastfa-...)")
    measure.add_argument("--no-plot", action="store_true", help="no PNG plot")
    measure.add_argument("--checkpoint-dir", metavar="DIR",
                         help="one checkpoint per run, written every epoch (default: <out>-checkpoints/)")
    measure.add_argument("--no-checkpoint", action="store_true", help="write no checkpoints")
    measure.add_argument("--save-every", type=int, metavar="STEPS",
                         help="also checkpoint every STEPS steps within an epoch")
    measure.add_argument("--resume", action="store_true",
                         help="continue every run from its checkpoint in --checkpoint-dir (finished runs are "
                              "reported from theirs; runs without one start afresh)")


def _positive(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value}")


def validate(args) -> argparse.Namespace:
    """Check and normalise parsed options; ValueError names the option and what it expects."""
    models = _list(args.models) if isinstance(args.models, str) else list(args.models)
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        raise ValueError(f"--models: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(MODELS)}")
    rules = _list(args.rules) if isinstance(args.rules, str) else list(args.rules)
    known = tuple(RULES) + tuple(ALIASES)
    bad = [r for r in rules if r.lower() not in known]
    if bad or not rules:
        raise ValueError(f"--rules: unknown {', '.join(bad) or '(none given)'}; choose from {', '.join(known)}")
    args.models = list(dict.fromkeys(models))
    args.rules = list(dict.fromkeys(canonical_rule(r) for r in rules))
    _positive("--epochs", args.epochs)
    _positive("--batch-size", args.batch_size)
    _positive("--eval-batch-size", args.eval_batch_size)
    _positive("--probe-size", args.probe_size)
    _positive("--steps-per-epoch", args.steps_per_epoch, allow_none=True)
    _positive("--save-every", args.save_every, allow_none=True)
    _positive("--image-size", args.image_size, allow_none=True)
    _positive("--threads", args.threads, allow_none=True)
    if args.workers < 0:
        raise ValueError(f"--workers must be 0 or more, got {args.workers}")
    if not (args.lr > 0 and args.lr < float("inf")):
        raise ValueError(f"--lr must be positive and finite, got {args.lr}")
    if not 0 <= args.momentum < 1:
        raise ValueError(f"--momentum must be in [0, 1), got {args.momentum}")
    if not 0 <= args.weight_decay < float("inf"):
        raise ValueError(f"--weight-decay must be non-negative and finite, got {args.weight_decay}")
    if not 0 <= args.dropout < 1:
        raise ValueError(f"--dropout must be in [0, 1), got {args.dropout}")
    if isinstance(args.scale, str) and args.scale not in SCALES:
        try:
            args.scale = float(args.scale)
        except ValueError:
            raise ValueError(f"--scale must be one of {', '.join(SCALES)} or a positive number, "
                             f"got {args.scale!r}") from None
    if isinstance(args.scale, float) and not 0 < args.scale < float("inf"):
        raise ValueError(f"--scale must be positive and finite, got {args.scale}")
    for name in ("alpha", "beta", "gamma"):
        value = getattr(args, name)
        if value is not None and not 0 <= value < float("inf"):
            raise ValueError(f"--{name} must be non-negative and finite, got {value}")
    if args.sigma is not None and not 0 < args.sigma < float("inf"):
        raise ValueError(f"--sigma must be positive and finite, got {args.sigma}")
    if args.feedback_lr is not None and not 0 < args.feedback_lr < float("inf"):
        raise ValueError(f"--feedback-lr must be positive and finite, got {args.feedback_lr}")
    args.pipeline = parse_pipeline(args.pipeline)
    args.depths = parse_depths(args.depths)
    if args.depths and args.seeds < 1:
        raise ValueError(f"--seeds must be a positive integer, got {args.seeds}")
    if args.seed < 0:
        raise ValueError(f"--seed must be non-negative, got {args.seed}")
    if args.resume and args.no_checkpoint:
        raise ValueError("--resume needs checkpoints; drop --no-checkpoint")
    if args.resume and args.checkpoint_dir is None and args.out is None:
        # The default folder is named after the default results file, which carries today's date.
        raise ValueError("--resume needs --checkpoint-dir DIR (or the --out of the run to resume)")
    return args


def parse_pipeline(text) -> dict:
    """--pipeline's switches as options: "a,b=normal" -> {"a": True, "b": "normal"}; ValueError names a bad one."""
    if text is None or isinstance(text, dict):
        return text
    switches = {}
    for item in _list(text):
        if item == "none":
            continue
        name, _, value = item.partition("=")
        if name not in PIPELINE_OPTIONS:
            raise ValueError(f"--pipeline: unknown switch {name!r}; choose from {', '.join(PIPELINE_OPTIONS)}")
        if name == "input_distribution":
            switches[name] = value
        elif name == "input_stddev":
            try:
                switches[name] = float(value)
            except ValueError:
                raise ValueError(f"--pipeline: input_stddev needs a number, got {value!r}") from None
        elif value in ("", "true", "1", "on"):
            switches[name] = True
        elif value not in ("false", "0", "off"):
            raise ValueError(f"--pipeline: {name} is on or off (name, name=on, name=off), got {value!r}")
    return switches


def parse_depths(text):
    if text is None or isinstance(text, list):
        return text
    try:
        depths = [int(item) for item in _list(text)]
    except ValueError:
        raise ValueError(f"--depths: comma-separated integers of at least 2, got {text!r}") from None
    if not depths or min(depths) < 2:
        raise ValueError(f"--depths: comma-separated integers of at least 2, got {text!r}")
    return depths


def parse(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fastfa train", description=DESCRIPTION)
    add_arguments(parser)
    args = parser.parse_args(argv)
    args.argv = ["train"] + list(argv)
    return args


def cmd_train(args, *, on_step=None) -> int:
    """The handler of ``fastfa train``: 0 when every run finished (a diverged run is a result, marked in the
    table), 2 on bad options."""
    from . import depth
    from .loop import run

    try:
        validate(args)
        (depth.run if args.depths else run)(args, on_step=on_step)
    except ValueError as error:
        print(f"fastfa train: {error}", file=sys.stderr)
        return 2
    return 0


def main(argv=None, *, on_step=None) -> int:
    """``fastfa train`` with these arguments (sys.argv by default); ``on_step(tag, step)`` after each step."""
    return cmd_train(parse(sys.argv[1:] if argv is None else argv), on_step=on_step)


def run(args, **kwargs):
    """:func:`fastfa.training.loop.run` on validated options (for code that builds ``args`` itself)."""
    from .loop import run as run_loop

    return run_loop(validate(args), **kwargs)
