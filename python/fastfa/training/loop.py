"""The training loop of ``fastfa train``: one run per (model, rule), DDP, AMP, checkpoints, exact resume.

Distributed runs start under torchrun (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT in
the environment): one process per device, gloo on the CPU and nccl on GPUs, the model
wrapped in DistributedDataParallel. Why that equals one process on the combined batch:

- every rank builds the model from the same seed and DDP broadcasts rank 0's parameters
  and buffers at the start, so W, R, the learned B and every ``feedback_rng = [seed,
  step]`` agree; each forward advances every rank's counter by one, so brsf's R_t and
  wm's noise are the same draw on every rank at every step (DDP also re-broadcasts
  buffers before each forward, which changes nothing while they agree);
- the learned B of kp, wm, sa, aa, ia is a Parameter whose gradient the backward op
  writes, so DDP's reducer averages it with W's gradients;
- the loss is a mean over the local batch and every rank has batch_size / world samples,
  so the averaged gradient is the combined batch's; the estimated rules' alignment terms
  are batch means too.

Batch norm is the exception (its statistics are per rank); the small models have none.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import math
import os
import statistics
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from .. import amp as fastfa_amp
from .. import metrics
from ..alignment import OPTIONS as PIPELINE_OPTIONS
from ..alignment import feedback_parameters, paper_options
from ..nn import FeedbackLayer
from ..rules import rule_spec
from . import data as data_module
from . import defaults as defaults_module
from . import models as models_module
from .report import Progress, format_table, write_json, write_plot

__all__ = ["Context", "run", "train_one", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = 1
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
PARAM_DTYPES = {"fp32": torch.float32, "fp64": torch.float64}
# Settings a checkpoint must share with the run that resumes it (anything else would not continue it).
_RESUME_KEYS = ("model", "rule", "dataset", "train_size", "batch_size", "epochs", "steps_per_epoch", "lr",
                "momentum", "weight_decay", "schedule", "classifier", "dropout", "seed", "amp", "dtype",
                "image_size", "rule_options", "feedback_lr", "feedback_optimizer")
RULE_OPTIONS = ("scale", "init", "alpha", "beta", "gamma", "sigma")


@dataclasses.dataclass
class Context:
    """Where this process runs and what it is in a distributed run."""

    device: torch.device
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_context(device_name: Optional[str]) -> Context:
    """Reads torchrun's environment; joins the process group when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    if device_name:
        device = torch.device(device_name)
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda, but torch sees no GPU here")
        if device.index is None:
            device = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ValueError(f"--device must be cpu or cuda[:N], got {device_name!r}")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Context(device=device, rank=rank, world=world, local_rank=local_rank)


def _settings(args, dataset, model_name: str, rule: str, steps: int) -> dict:
    return {"model": model_name, "rule": rule, "dataset": dataset.name, "train_size": dataset.train_size,
            "image_size": dataset.image_size, "batch_size": args.batch_size, "epochs": args.epochs,
            "steps_per_epoch": steps, "lr": args.lr, "momentum": args.momentum, "weight_decay": args.weight_decay,
            "schedule": args.schedule, "classifier": args.classifier, "dropout": args.dropout, "seed": args.seed,
            "amp": args.amp, "dtype": args.dtype, "rule_options": rule_options(args, rule),
            "feedback_lr": getattr(args, "feedback_lr", None),
            "feedback_optimizer": getattr(args, "feedback_optimizer", "sgd")}


def rule_options(args, rule: str) -> dict:
    """This rule's options: fastfa train's documented defaults (training.defaults; the reference's
    with --reference-defaults), then the options given on the command line that this rule takes
    (the others go to other rules). --pipeline's switches replace the default ones. Where the
    reference's or --pipeline's switches leave a layer default (alignment.LAYER_DEFAULTS: aa's and
    ia's normalize_input) unnamed, it is passed as off, so that the layers do not turn it on."""
    taken = rule_spec(rule).options
    reference = getattr(args, "reference_defaults", False)
    options = {} if reference else dict(defaults_module.TRAINING_DEFAULTS.get(rule, {}))
    pipeline = getattr(args, "pipeline", None)
    if pipeline is not None:
        options = {name: value for name, value in options.items() if name not in PIPELINE_OPTIONS}
        options.update(defaults_module.pipeline_for(rule, pipeline))
    if reference or pipeline is not None:
        options = {**paper_options(rule), **options}
    options.update({name: getattr(args, name) for name in RULE_OPTIONS
                    if getattr(args, name, None) is not None and name in taken})
    return options


def kp_weight_decay(model, weight_decay: float) -> float:
    """kp: W decays with 2*alpha as well, as B does, so that B - W shrinks (Akrout et al. 2019)."""
    alphas = {m.alignment_options[0] for m in model.modules() if isinstance(m, FeedbackLayer)}
    return weight_decay + 2 * max(alphas, default=0.0)


def _parameter_groups(model, rule: str, weight_decay: float, feedback_lr=None) -> tuple:
    """(W and biases with the user's weight decay, the learned B without: its decay is in the rule).

    B's group has lr ``feedback_lr`` where given (fastfa.feedback_parameters: its own param group).
    """
    learned = feedback_parameters(model)
    feedback = {id(p) for p in learned}
    weights = [p for p in model.parameters() if id(p) not in feedback]
    decay = kp_weight_decay(model, weight_decay) if rule == "kp" else weight_decay
    groups = [{"params": weights, "weight_decay": decay}]
    feedback_groups = []
    if learned:
        feedback_groups.append({"params": learned, "weight_decay": 0.0,
                                **({} if feedback_lr is None else {"lr": feedback_lr})})
    return groups, feedback_groups


def _optimizers(model, rule: str, args) -> list:
    """SGD over W and biases (and B, in its own group, with --feedback-optimizer sgd); Adam over B alone
    with --feedback-optimizer adam (lr --feedback-lr, default 1e-3)."""
    groups, feedback_groups = _parameter_groups(model, rule, args.weight_decay, getattr(args, "feedback_lr", None))
    if getattr(args, "feedback_optimizer", "sgd") == "adam" and feedback_groups:
        feedback_groups[0].setdefault("lr", 1e-3)
        return [torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum), torch.optim.Adam(feedback_groups)]
    return [torch.optim.SGD(groups + feedback_groups, lr=args.lr, momentum=args.momentum)]


def _rng_state(context: Context) -> dict:
    state = {"torch": torch.get_rng_state()}
    if context.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(context.device)
    return state


def _set_rng_state(state: dict, context: Context) -> None:
    torch.set_rng_state(state["torch"])
    if context.device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], context.device)


def _seed_process(seed: int, context: Context) -> None:
    # Dropout draws differ between ranks (as they would between the halves of one batch) but
    # are fixed by (seed, rank).
    torch.manual_seed(seed * 1_000_003 + 1 + context.rank)
    if context.device.type == "cuda":
        torch.cuda.manual_seed(seed * 1_000_003 + 1 + context.rank)


def _gather(obj, context: Context) -> list:
    if not context.distributed:
        return [obj]
    gathered = [None] * context.world
    dist.all_gather_object(gathered, obj)
    return gathered


def _all_reduce(tensor: torch.Tensor, context: Context) -> torch.Tensor:
    if context.distributed:
        dist.all_reduce(tensor)
    return tensor


@dataclasses.dataclass
class _State:
    """Where a run is: the next (epoch, step), the current epoch's running sums, the history."""

    epoch: int = 0
    step: int = 0
    sums: list = dataclasses.field(default_factory=lambda: [0.0, 0.0, 0.0])  # loss * n, correct, n (this rank)
    seconds: float = 0.0  # training time spent on the current epoch so far
    steps_timed: int = 0
    history: list = dataclasses.field(default_factory=list)
    finished: bool = False
    diverged: bool = False


class _Checkpoint:
    """One file per run: model (W, B, R, [seed, step] counters), optimizer, scheduler, scaler,
    every rank's RNG state, the data position and the history so far. Written by rank 0 to a
    temporary file and renamed, so a kill during the write leaves the previous checkpoint."""

    def __init__(self, path: Optional[Path], context: Context, extra=((), ())):
        self.path, self.context = path, context
        # (optimizers, schedulers) besides the first: B's own, with --feedback-optimizer adam.
        self.extra = extra

    def save(self, settings, model, optimizer, scheduler, scaler, state: _State) -> None:
        if self.path is None:
            return
        # What differs between ranks: the RNG (dropout) and the running sums of the epoch so far.
        ranks = _gather({"rng": _rng_state(self.context), "sums": list(state.sums)}, self.context)
        if self.context.main:
            payload = {"format": CHECKPOINT_FORMAT, "settings": settings, "model": model.state_dict(),
                       "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                       "feedback_optimizer": [o.state_dict() for o in self.extra[0]],
                       "feedback_scheduler": [s.state_dict() for s in self.extra[1]],
                       "scaler": scaler.state_dict(), "ranks": ranks, "world": self.context.world,
                       "state": dataclasses.asdict(state)}
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.path.with_suffix(".tmp")
            torch.save(payload, temporary)
            os.replace(temporary, self.path)
        if self.context.distributed:
            dist.barrier()

    def load(self, settings, model, optimizer, scheduler, scaler) -> _State:
        try:
            payload = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as error:  # a truncated or foreign file: say which one
            raise RuntimeError(f"--resume: cannot read checkpoint {self.path}: {error}") from error
        if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
            raise RuntimeError(f"--resume: {self.path} is not a fastfa train checkpoint (format "
                               f"{CHECKPOINT_FORMAT})")
        saved = payload["settings"]
        changed = [f"{key}: checkpoint {saved.get(key)!r}, now {settings[key]!r}" for key in _RESUME_KEYS
                   if saved.get(key) != settings[key]]
        if changed:
            raise ValueError(f"--resume: {self.path} was written with other settings ({'; '.join(changed)}); "
                             "resume with the same ones, or drop --resume to start afresh")
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        for each, state in zip(self.extra[0], payload.get("feedback_optimizer", [])):
            each.load_state_dict(state)
        for each, state in zip(self.extra[1], payload.get("feedback_scheduler", [])):
            each.load_state_dict(state)
        scaler.load_state_dict(payload["scaler"])
        state = _State(**payload["state"])
        if payload["world"] == self.context.world:
            _set_rng_state(payload["ranks"][self.context.rank]["rng"], self.context)
            state.sums = payload["ranks"][self.context.rank]["sums"]
        else:
            if state.step:
                raise ValueError(f"--resume: {self.path} was saved mid-epoch by {payload['world']} processes; "
                                 f"resume it with {payload['world']} (the epoch's running sums are per process)")
            if self.context.main:
                warnings.warn(f"{self.path} was saved by {payload['world']} processes and is resumed by "
                              f"{self.context.world}: the data order is the same, dropout draws are not",
                              stacklevel=2)
            _seed_process(saved["seed"] + 7919 * (state.epoch + 1), self.context)
        return state


def _loss(output, target):
    return torch.nn.functional.cross_entropy(output.float(), target)


@torch.no_grad()
def _evaluate(model, dataset, args, context: Context) -> tuple:
    """(test loss, test accuracy) over the whole test set, every rank counting its share."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=context.device)
    with _autocast(args, context):
        for inputs, targets in dataset.test_batches(batch_size=args.eval_batch_size, rank=context.rank,
                                                    world=context.world, device=context.device,
                                                    dtype=PARAM_DTYPES[args.dtype],
                                                    channels_last=args.channels_last):
            output = model(inputs)
            sums += torch.stack([torch.nn.functional.cross_entropy(output.float(), targets, reduction="sum")
                                 .double(), (output.argmax(1) == targets).sum().double(),
                                 torch.tensor(float(len(targets)), dtype=torch.float64, device=context.device)])
    model.train()
    loss, correct, count = _all_reduce(sums, context).tolist()
    return loss / max(count, 1), correct / max(count, 1)


def _alignment(model, probe) -> tuple:
    """Per-layer angles and gradient norm ratios (rule's grad_input over backprop's) on the probe
    batch, in eval mode (no dropout draws, batch norm's running statistics), in full precision,
    leaving the model and the RNG as they were."""
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            weight = metrics.weight_alignment(model)
            measures = metrics.gradient_measures(model, _loss, probe)
    finally:
        model.train()
    return (weight, {name: angle for name, (angle, _) in measures.items()},
            {name: ratio for name, (_, ratio) in measures.items()})


def _norm_ratio_text(ratios) -> str:
    """Each layer's grad_input norm over backprop's, in the model's order: an error that blows up
    shows as ratios growing towards the input side, before the loss does."""
    if not ratios:
        return ""
    return "  grad norm / bp per layer: " + " ".join(f"{value:.3g}" for value in ratios.values())


def _autocast(args, context: Context):
    if args.amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(context.device.type, dtype=AMP_DTYPES[args.amp])


def _synchronize(context: Context) -> None:
    if context.device.type == "cuda":
        torch.cuda.synchronize(context.device)


def train_one(args, context: Context, dataset, model_name: str, rule: str, *, progress: Progress,
              on_step: Optional[Callable] = None) -> tuple:
    """Train one (model, rule) for args.epochs from scratch or from its checkpoint: (its record, the model)."""
    tag = f"{model_name}/{rule}"
    full_steps = data_module.steps_per_epoch(dataset.train_size, args.batch_size)
    steps = min(full_steps, args.steps_per_epoch) if args.steps_per_epoch else full_steps
    if steps < 1:
        raise ValueError(f"--batch-size {args.batch_size} is larger than the training set "
                         f"({dataset.train_size} samples)")
    settings = _settings(args, dataset, model_name, rule, steps)
    dtype = PARAM_DTYPES[args.dtype]
    model = models_module.build(model_name, rule, channels=dataset.channels, image_size=dataset.image_size,
                                num_classes=dataset.num_classes, classifier=args.classifier, dropout=args.dropout,
                                seed=args.seed, options=rule_options(args, rule)).to(device=context.device,
                                                                                     dtype=dtype)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizers = _optimizers(model, rule, args)
    optimizer = optimizers[0]
    if args.schedule == "cosine":
        schedulers = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=steps * args.epochs) for o in optimizers]
    else:
        schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lambda _: 1.0) for o in optimizers]
    scheduler = schedulers[0]
    if rule == "kp":
        progress.line(f"{tag}: W's weight decay is {optimizer.param_groups[0]['weight_decay']:g} = --weight-decay "
                      f"{args.weight_decay:g} + 2*alpha, the decay B gets (Akrout et al. 2019)")
    # fp16's range needs loss scaling (its gradients underflow); bf16 has fp32's range and does not.
    # fastfa's scaler also scales the estimated rules' B terms that do not come from the loss, which
    # torch's would divide by the scale (fastfa.amp).
    scaler = fastfa_amp.GradScaler(context.device.type, enabled=args.amp == "fp16")

    path = Path(args.checkpoint_dir) / f"{model_name}-{rule}.pt" if args.checkpoint_dir else None
    checkpoint = _Checkpoint(path, context, (optimizers[1:], schedulers[1:]))
    if args.resume and path is not None and path.is_file():
        state = checkpoint.load(settings, model, optimizer, scheduler, scaler)
        progress.line(f"{tag}: resumed from {path} at epoch {state.epoch + 1}, step {state.step}"
                      + (" (finished)" if state.finished else ""))
    else:
        state = _State()
        _seed_process(args.seed, context)

    net = model
    if context.distributed:
        device_ids = [context.device.index] if context.device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if args.compile:
        net = torch.compile(net)
    probe = None
    if context.main and not args.no_alignment:
        inputs, targets = next(iter(dataset.test_batches(batch_size=args.eval_batch_size, rank=0, world=1,
                                                         device=context.device, dtype=dtype,
                                                         channels_last=args.channels_last)))
        probe = (inputs[:args.probe_size], targets[:args.probe_size])

    global_step = state.epoch * steps + state.step
    while not state.finished and state.epoch < args.epochs:
        epoch = state.epoch
        sums = torch.tensor(state.sums, dtype=torch.float64, device=context.device)
        _synchronize(context)
        started = time.perf_counter()
        timed = 0
        batches = dataset.train_batches(seed=args.seed, epoch=epoch, start_step=state.step,
                                        batch_size=args.batch_size, rank=context.rank, world=context.world,
                                        device=context.device, dtype=dtype, channels_last=args.channels_last)
        for step, inputs, targets in batches:
            if step >= steps:
                break
            with _autocast(args, context):
                output = net(inputs)
                loss = _loss(output, targets)
            scaler.scale(loss).backward()
            for each in optimizers:
                scaler.step(each)
            scaler.update()
            for each, each_scheduler in zip(optimizers, schedulers):
                each.zero_grad(set_to_none=True)
                each_scheduler.step()
            with torch.no_grad():
                sums += torch.stack([loss.detach().double() * len(targets),
                                     (output.argmax(1) == targets).sum().double(),
                                     torch.tensor(float(len(targets)), dtype=torch.float64, device=context.device)])
            timed += 1
            global_step += 1
            state.step = step + 1
            if progress.live:
                progress.update(tag, epoch, args.epochs, state.step, steps, loss.detach())
            if args.save_every and state.step % args.save_every == 0 and state.step < steps:
                _synchronize(context)
                state.sums = sums.tolist()
                state.seconds += time.perf_counter() - started
                state.steps_timed += timed
                checkpoint.save(settings, model, optimizer, scheduler, scaler, state)
                started, timed = time.perf_counter(), 0
            if on_step is not None:
                on_step(tag, global_step)
        _synchronize(context)
        seconds = state.seconds + time.perf_counter() - started
        steps_timed = state.steps_timed + timed
        loss_sum, correct, count = _all_reduce(sums, context).tolist()
        test_loss, test_acc = _evaluate(model, dataset, args, context)
        record = {"epoch": epoch + 1, "step": global_step, "train_loss": loss_sum / max(count, 1),
                  "train_acc": correct / max(count, 1), "test_loss": test_loss, "test_acc": test_acc,
                  "ms_per_step": 1000 * seconds / max(steps_timed, 1), "lr": scheduler.get_last_lr()[0]}
        if probe is not None:
            if all(torch.isfinite(p).all() for p in model.parameters()):
                (record["weight_alignment"], record["gradient_alignment"],
                 record["gradient_norm_ratio"]) = _alignment(model, probe)
            else:  # a diverged model has no meaningful angles
                for key in ("weight_alignment", "gradient_alignment", "gradient_norm_ratio"):
                    record[key] = None
        state = dataclasses.replace(state, epoch=epoch + 1, step=0, sums=[0.0, 0.0, 0.0], seconds=0.0,
                                    steps_timed=0, history=state.history + [record])
        if not math.isfinite(record["train_loss"]):
            state.diverged = True
        state.finished = state.diverged or state.epoch >= args.epochs
        checkpoint.save(settings, model, optimizer, scheduler, scaler, state)
        progress.line(f"{tag}  epoch {epoch + 1}/{args.epochs}  loss {record['train_loss']:.4f}  "
                      f"train {100 * record['train_acc']:.1f}%  test {100 * test_acc:.1f}%  "
                      f"{record['ms_per_step']:.2f} ms/step" + ("  DIVERGED (loss is not finite)"
                                                                if state.diverged else "")
                      + _norm_ratio_text(record.get("gradient_norm_ratio")))
    history = state.history
    test = [e["test_acc"] for e in history]
    timed_epochs = [e["ms_per_step"] for e in history]
    return {"op": f"model:{model_name}", "model": model_name, "rule": rule, "dataset": dataset.name,
            "dtype": args.dtype if args.amp == "none" else f"{args.amp} autocast ({args.dtype} weights)",
            "classifier": args.classifier, "options": rule_options(args, rule), "test_acc": test[-1] if test else None,
            "best_test_acc": max(test) if test else None,
            # The median over epochs: the first carries the warm-up (allocations, oneDNN / cuDNN plans).
            "ms_per_step": statistics.median(timed_epochs) if timed_epochs else None,
            "diverged": state.diverged, "epochs": history}, model


def default_out_path(dataset_name: str, device_label: str, cwd: Optional[Path] = None) -> Path:
    """benchmarks/results/<date>-<device>-train-<dataset>.json when that folder exists, else ./fastfa-train-..."""
    from ..bench import slug

    today = datetime.date.today().isoformat()
    cwd = Path.cwd() if cwd is None else cwd
    name = f"{today}-{slug(device_label)}-train-{slug(dataset_name)}"
    results = cwd / "benchmarks" / "results"
    return results / f"{name}.json" if results.is_dir() else cwd / f"fastfa-{name}.json"


def run(args, *, on_step: Optional[Callable] = None, progress: Optional[Progress] = None) -> dict:
    """Every (model, rule) of args, one after the other; the results dict (also written by rank 0),
    with the trained models under "models" ({(model, rule): module}, not written).

    ``on_step(tag, global_step)`` is called after every optimizer step ("convnet/usf", 1, 2, ...).
    """
    from .. import bench

    if args.threads:
        torch.set_num_threads(args.threads)
    context = setup_context(args.device)
    try:
        if args.batch_size % context.world:
            raise ValueError(f"--batch-size {args.batch_size} (the global batch) must be divisible by the "
                             f"number of processes ({context.world})")
        dataset = data_module.load(args.data, image_size=args.image_size, seed=args.seed, workers=args.workers)
        progress = progress or Progress(enabled=context.main)
        device_label = bench.device_name(context.device)
        out = Path(args.out) if args.out else default_out_path(dataset.name, device_label)
        if args.checkpoint_dir is None and not args.no_checkpoint:
            args.checkpoint_dir = str(out.with_suffix("")) + "-checkpoints"
        load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
        progress.line(f"fastfa train on {device_label} ({context.device}, {context.world} process"
                      f"{'es' if context.world > 1 else ''}, {torch.get_num_threads()} threads): {dataset.name} "
                      f"({dataset.train_size} train / {dataset.test_size} test images, "
                      f"{dataset.image_size}x{dataset.image_size}), models {', '.join(args.models)}, "
                      f"rules {', '.join(args.rules)}")
        rows, models = [], {}
        for model_name in args.models:
            for rule in args.rules:
                row, models[model_name, rule] = train_one(args, context, dataset, model_name, rule,
                                                          progress=progress, on_step=on_step)
                rows.append(row)
        results = {
            "commit": bench.git_commit(), "command": bench.command_line(getattr(args, "argv", None) or ["train"]),
            "device": device_label, "versions": bench.versions(),
            "machine": {"processes": context.world, "torch_threads": torch.get_num_threads(),
                        "logical_cores": os.cpu_count(), "load_average_before": load_before,
                        "load_average_after": os.getloadavg() if hasattr(os, "getloadavg") else None},
            "settings": {"dataset": dataset.name, "train_size": dataset.train_size, "test_size": dataset.test_size,
                         "image_size": dataset.image_size, **{key: getattr(args, key) for key in (
                             "models", "rules", "epochs", "batch_size", "steps_per_epoch", "lr", "momentum",
                             "weight_decay", "schedule", "classifier", "dropout", "seed", "amp", "dtype",
                             "channels_last", "compile", *RULE_OPTIONS)},
                         **{key: getattr(args, key, None) for key in ("pipeline", "reference_defaults", "feedback_lr",
                                                                      "feedback_optimizer")}},
            "rows": rows,
        }
        if context.main:
            print(format_table(rows))
            write_json(results, out)
            print(f"results: {out}")
            if not args.no_plot:
                plot = write_plot(results, out.with_suffix(".png"))
                print(f"plot: {plot}" if isinstance(plot, Path) else plot)
        results["models"] = models
        return results
    finally:
        if context.distributed and dist.is_initialized():
            dist.destroy_process_group()
