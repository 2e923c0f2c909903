"""`fastfa train`: DDP equals one process on the combined batch, resume equals no interruption, AMP, the CLI."""

import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastfa import cli, training

ROOT = Path(__file__).resolve().parents[1]
# Children import the fastfa of this checkout, as the test process does.
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "python"), os.environ.get("PYTHONPATH", "")]),
       "OMP_NUM_THREADS": "1"}
QUICK = ["--no-plot", "--threads", "1", "--eval-batch-size", "450"]


def _final_state(checkpoint_dir, model, rule) -> dict:
    return torch.load(Path(checkpoint_dir) / f"{model}-{rule}.pt", weights_only=True)


def _run(argv) -> dict:
    """In-process run; the results dict with the trained models."""
    return training.run(training.parse(argv))


# fp64 so that the only difference between one process and two, the order in which the halves'
# gradients are summed, stays near 1e-16: a rank drawing another R_t, or a B whose gradient is
# not all-reduced, moves the parameters by far more than the tolerance.
DDP_ARGS = ["--models", "convnet", "--rules", "bp,brsf,kp,dfa", "--dtype", "fp64", "--epochs", "2",
            "--steps-per-epoch", "4", "--batch-size", "32", "--no-alignment"] + QUICK


def test_two_process_ddp_equals_one_process_on_the_combined_batch(tmp_path):
    two = tmp_path / "two"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "fastfa", "train", *DDP_ARGS, "--out", str(two / "r.json"), "--checkpoint-dir", str(two)]
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    record = json.loads((two / "r.json").read_text())
    assert record["machine"]["processes"] == 2

    one = tmp_path / "one"
    results = _run(DDP_ARGS + ["--out", str(one / "r.json"), "--checkpoint-dir", str(one)])
    assert results["machine"]["processes"] == 1
    for rule in ("bp", "brsf", "kp", "dfa"):
        distributed = _final_state(two, "convnet", rule)["model"]
        single = results["models"]["convnet", rule].state_dict()
        initial = training.models.build("convnet", rule, channels=1, image_size=8, num_classes=10).double()
        assert set(distributed) == set(single)
        for key, value in single.items():
            if value.dtype == torch.int64:  # brsf's [seed, step]: 8 steps on both; dfa's B_l stays at step 0
                assert torch.equal(distributed[key], value), (rule, key)
                assert int(value[1]) == (0 if rule == "dfa" else 8)
                continue
            torch.testing.assert_close(distributed[key], value, rtol=1e-10, atol=1e-12, msg=f"{rule} {key}")
            # Training moved every tensor far beyond that tolerance (R of fa / frsf excepted: none here).
            assert (value - initial.state_dict()[key]).abs().max() > 1e-4, (rule, key)
    # kp's B is a Parameter: DDP averaged its gradient (B moved identically on both ranks).
    kp = results["models"]["convnet", "kp"].state_dict()
    assert "3.feedback" in kp and "8.feedback" in kp


KILLER = """
import os, sys
from fastfa import training
tag, step = sys.argv[1], int(sys.argv[2])
def kill(run, global_step):
    if run == tag and global_step == step:
        os._exit(17)  # no clean-up, as a killed job
sys.exit(training.main(sys.argv[3:], on_step=kill))
"""


def test_resume_after_a_kill_continues_exactly(tmp_path):
    # Dropout: the RNG states must come back too. 3 epochs of 8 steps, a checkpoint every 3 steps.
    argv = ["--models", "mlp", "--rules", "brsf,kp", "--dropout", "0.2", "--epochs", "3", "--steps-per-epoch", "8",
            "--batch-size", "32", "--save-every", "3", "--probe-size", "32"] + QUICK
    straight = tmp_path / "straight"
    reference = _run(argv + ["--out", str(straight / "r.json"), "--checkpoint-dir", str(straight)])

    killed = tmp_path / "killed"
    resumed = argv + ["--out", str(killed / "r.json"), "--checkpoint-dir", str(killed)]
    # kp killed mid-epoch 2 (step 13; last checkpoint at step 11), then at the start of epoch 3
    # (step 17; last checkpoint the end of epoch 2); brsf finished before the first kill.
    for tag, step in (("mlp/kp", 13), ("mlp/kp", 17)):
        extra = ["--resume"] if (killed / "mlp-brsf.pt").exists() else []
        done = subprocess.run([sys.executable, "-c", KILLER, tag, str(step), *resumed, *extra], env=ENV,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 17, done.stderr[-3000:]
        state = _final_state(killed, "mlp", "kp")["state"]
        assert (state["epoch"], state["step"]) == ((1, 3) if step == 13 else (2, 0))
    results = _run(resumed + ["--resume"])
    for rule in ("brsf", "kp"):
        ours, theirs = results["models"]["mlp", rule].state_dict(), reference["models"]["mlp", rule].state_dict()
        for key in theirs:
            assert torch.equal(ours[key], theirs[key]), (rule, key)
    for ours, theirs in zip(results["rows"], reference["rows"]):
        for a, b in zip(ours["epochs"], theirs["epochs"]):
            for key in ("train_loss", "train_acc", "test_loss", "test_acc", "weight_alignment",
                        "gradient_alignment"):
                assert a[key] == b[key], (ours["rule"], a["epoch"], key)
    # Another run's checkpoint is refused with the setting that differs.
    assert cli.main(["train", *resumed, "--resume", "--lr", "0.5"]) == 2


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_runs_on_the_cpu(tmp_path, amp):
    # fastfa train's own alpha for kp (0.02): under fp16, fastfa.amp.GradScaler keeps kp's decay of B, which
    # torch's GradScaler divided by the loss scale (that moved B 30% from the fp32 run; tests/test_amp.py).
    argv = ["--models", "convnet,mlp", "--rules", "usf,kp", "--epochs", "2", "--steps-per-epoch", "20", "--lr", "0.05",
            "--no-checkpoint"] + QUICK
    full = _run(argv + ["--out", str(tmp_path / "fp32.json")])
    mixed = _run(argv + ["--amp", amp, "--channels-last", "--out", str(tmp_path / f"{amp}.json")])
    for key, model in mixed["models"].items():
        assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast keeps fp32 weights
        reference = full["models"][key].state_dict()
        state = model.state_dict()
        # Trained in lower precision: not fp32's result, but near it after 40 steps.
        floats = [k for k in reference if state[k].is_floating_point()]
        assert any(not torch.equal(state[k], reference[k]) for k in floats)
        for k in floats:
            assert (state[k] - reference[k]).norm() < 0.2 * reference[k].norm(), (key, k)
    for ours, theirs in zip(mixed["rows"], full["rows"]):
        assert ours["dtype"] == f"{amp} autocast (fp32 weights)"
        assert all(math.isfinite(e["train_loss"]) for e in ours["epochs"])
        assert ours["epochs"][-1]["train_loss"] < ours["epochs"][0]["train_loss"]  # it learns
        assert abs(ours["test_acc"] - theirs["test_acc"]) < 0.1, (ours["model"], ours["rule"])


def test_cli_writes_the_record_and_plot(tmp_path, capsys):
    out = tmp_path / "r.json"
    code = cli.main(["train", "--models", "mlp,convnet", "--rules", "bp,sign_symmetry,fa", "--epochs", "2",
                     "--steps-per-epoch", "5", "--classifier", "bp", "--scale", "kaiming", "--out", str(out),
                     "--threads", "1"])
    assert code == 0
    printed = capsys.readouterr()
    assert "test acc %" in printed.out and str(out) in printed.out
    assert "mlp/usf  epoch 2/2" in printed.err
    record = json.loads(out.read_text())
    assert set(record) >= {"commit", "command", "device", "versions", "rows", "settings", "machine"}
    assert record["command"].startswith("fastfa train --models mlp,convnet")
    assert [(r["model"], r["rule"]) for r in record["rows"]] == [(m, r) for m in ("mlp", "convnet")
                                                                 for r in ("bp", "usf", "fa")]
    for row in record["rows"]:
        assert row["options"] == ({"scale": "kaiming"} if row["rule"] == "usf" else {})  # only usf takes a scale
        assert len(row["epochs"]) == 2 and 0 <= row["test_acc"] <= 1 and row["ms_per_step"] > 0
        last = row["epochs"][-1]
        # --classifier bp: the last Linear is torch's, so it has no angles.
        layers = ("1", "4") if row["model"] == "mlp" else ("0", "3", "8")
        assert tuple(last["weight_alignment"]) == layers and tuple(last["gradient_alignment"]) == layers
        assert tuple(last["gradient_norm_ratio"]) == layers and all(v > 0 for v in last["gradient_norm_ratio"].values())
        if row["rule"] == "bp":
            assert max(last["weight_alignment"].values()) < 1e-3  # acos near 1 rounds to ~1e-5 degrees
        if row["rule"] == "fa":
            assert min(last["weight_alignment"].values()) > 45  # R stays far from W
    try:
        import matplotlib  # noqa: F401
        assert out.with_suffix(".png").stat().st_size > 10_000
    except ImportError:
        assert "no plot: matplotlib is not installed" in printed.out
    assert (tmp_path / "r-checkpoints" / "convnet-fa.pt").is_file()


@pytest.mark.parametrize("argv, message", [
    (["--models", "vgg"], "--models: unknown vgg; choose from convnet, mlp, vit, resnet18"),
    (["--rules", "bp,dfb"], "--rules: unknown dfb"),
    (["--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
    (["--lr", "-1"], "--lr must be positive and finite"),
    (["--dropout", "1"], "--dropout must be in [0, 1)"),
    (["--data", "/nonexistent/folder"], "--data: '/nonexistent/folder' is not a folder"),
    (["--resume", "--no-checkpoint"], "--resume needs checkpoints; drop --no-checkpoint"),
    (["--scale", "huge"], "--scale must be one of rms, xiao, xavier, kaiming or a positive number, got 'huge'"),
    (["--sigma", "0"], "--sigma must be positive and finite, got 0.0"),
    (["--models", "alexnet"], "--models alexnet needs images of at least 63 pixels"),
    (["--batch-size", "5000"], "--batch-size 5000 is larger than the training set"),
])
def test_bad_arguments_are_refused_with_a_clear_error(tmp_path, capsys, argv, message):
    code = cli.main(["train", "--epochs", "1", "--no-plot", "--out", str(tmp_path / "r.json"), *argv])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_bad_choice_is_refused_by_the_parser(capsys):
    # Without --out the default checkpoint folder is named after today's date: --resume must name one.
    assert cli.main(["train", "--resume"]) == 2
    assert "--resume needs --checkpoint-dir DIR" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--amp", "fp8"])
    assert exit_info.value.code == 2
    assert "--amp" in capsys.readouterr().err


def test_cifar_batches_and_image_folder_with_a_torchvision_model(tmp_path):
    cifar = tmp_path / "cifar-10-batches-py"
    cifar.mkdir()
    generator = torch.Generator().manual_seed(0)
    for name, count in (("data_batch_1", 48), ("data_batch_2", 16), ("test_batch", 20)):
        batch = {b"data": torch.randint(0, 256, (count, 3072), generator=generator, dtype=torch.uint8).numpy(),
                 b"labels": torch.randint(0, 10, (count,), generator=generator).tolist()}
        (cifar / name).write_bytes(pickle.dumps(batch))
    results = _run(["--data", str(tmp_path), "--models", "convnet", "--rules", "brsf", "--epochs", "1",
                    "--batch-size", "16", "--no-checkpoint", "--out", str(tmp_path / "c.json")] + QUICK)
    assert results["settings"]["dataset"] == "cifar10" and results["settings"]["train_size"] == 64
    assert results["rows"][0]["epochs"][0]["step"] == 4

    from PIL import Image

    for split, count in (("train", 6), ("val", 2)):
        for label in ("cat", "dog"):
            folder = tmp_path / "images" / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = torch.randint(0, 256, (20, 24, 3), generator=generator, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{i}.png")
    argv = ["--data", str(tmp_path / "images"), "--models", "resnet18", "--rules", "usf", "--classifier", "bp",
            "--image-size", "16", "--workers", "0", "--epochs", "1", "--batch-size", "4", "--no-checkpoint",
            "--out", str(tmp_path / "i.json")] + QUICK
    first, second = _run(argv), _run(argv)
    model = first["models"]["resnet18", "usf"]
    assert type(model.fc) is torch.nn.Linear and model.conv1.rule == "usf"
    assert first["rows"][0]["epochs"][0]["step"] == 3
    # The augmentation is keyed by (seed, epoch, image): two runs train identically.
    for key, value in model.state_dict().items():
        assert torch.equal(value, second["models"]["resnet18", "usf"].state_dict()[key]), key


def test_progress_line_redraws_on_a_terminal_and_stays_quiet_in_logs():
    import io

    from fastfa.training.report import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal, log = Terminal(), io.StringIO()
    for stream in (terminal, log):
        progress = Progress(stream=stream)
        progress.update("mlp/usf", 0, 2, 5, 10, torch.tensor(1.5))
        progress.line("mlp/usf  epoch 1/2  done")
    assert terminal.getvalue().startswith("\rmlp/usf  epoch 1/2 [##########..........] 5/10  loss 1.5000\r")
    assert terminal.getvalue().endswith("\rmlp/usf  epoch 1/2  done\n")
    assert log.getvalue() == "mlp/usf  epoch 1/2  done\n"  # no carriage returns in a log file
