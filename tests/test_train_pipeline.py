"""fastfa train's pipeline options: B's own param group / optimizer, kp's matched decay, the
documented defaults against --reference-defaults, --pipeline, and the depth study."""

import importlib.util
import json
import math

import pytest
import torch

import fastfa
import spec_options
from fastfa import training
from fastfa.training import defaults, loop

QUICK = ["--no-plot", "--threads", "1", "--eval-batch-size", "450", "--no-checkpoint"]


def _args(argv):
    return training.validate(training.parse(argv))


def test_feedback_parameters_are_the_learned_B_each_once():
    shared = fastfa.nn.Linear(4, 4, rule="ia")
    model = torch.nn.Sequential(shared, fastfa.nn.Linear(4, 3, rule="fa"), shared,
                                fastfa.nn.Conv2d(1, 2, 3, rule="kp"), torch.nn.Linear(2, 2))
    found = fastfa.feedback_parameters(model)
    assert [id(p) for p in found] == [id(shared.feedback), id(model[3].feedback)]
    assert all(isinstance(p, torch.nn.Parameter) for p in found)
    assert fastfa.feedback_parameters(torch.nn.Linear(3, 2)) == []


def test_feedback_lr_gives_B_its_own_group_and_adam_its_own_optimizer():
    args = _args(["--feedback-lr", "0.005", "--lr", "0.1"])
    model = fastfa.convert(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)), "wm", seed=0)
    (sgd,) = loop._optimizers(model, "wm", args)
    weights, feedback = sgd.param_groups
    assert feedback["lr"] == 0.005 and weights["lr"] == 0.1
    assert {id(p) for p in feedback["params"]} == {id(p) for p in fastfa.feedback_parameters(model)}
    args = _args(["--feedback-optimizer", "adam"])
    sgd, adam = loop._optimizers(model, "wm", args)
    assert isinstance(adam, torch.optim.Adam) and adam.param_groups[0]["lr"] == 1e-3
    assert {id(p) for p in adam.param_groups[0]["params"]} == {id(p) for p in fastfa.feedback_parameters(model)}
    assert not {id(p) for g in sgd.param_groups for p in g["params"]} & {id(p) for p in adam.param_groups[0]["params"]}


def test_adam_for_B_trains_and_moves_only_B(tmp_path):
    results = training.run(training.parse(["--models", "mlp", "--rules", "ia", "--epochs", "1", "--steps-per-epoch",
                                           "3", "--feedback-optimizer", "adam", "--feedback-lr", "0.01",
                                           "--out", str(tmp_path / "r.json")] + QUICK))
    assert not results["rows"][0]["diverged"]
    assert results["settings"]["feedback_optimizer"] == "adam"


def test_kp_decays_W_as_B_and_says_so(tmp_path, capsys):
    results = training.run(training.parse(["--models", "mlp", "--rules", "kp", "--epochs", "1", "--steps-per-epoch",
                                           "2", "--out", str(tmp_path / "r.json")] + QUICK))
    model = results["models"]["mlp", "kp"]
    (alpha,) = {m.alignment_options[0] for m in model.modules() if isinstance(m, fastfa.nn.FeedbackLayer)}
    assert f"W's weight decay is {2 * alpha:g}" in capsys.readouterr().err
    (optimizer,) = loop._optimizers(model, "kp", _args([]))
    assert optimizer.param_groups[0]["weight_decay"] == pytest.approx(2 * alpha)


def test_documented_defaults_and_reference_defaults():
    for rule, options in defaults.TRAINING_DEFAULTS.items():
        assert loop.rule_options(_args([]), rule) == options
        # The reference's: every switch off, also those the layers turn on by default (aa's, ia's normalize_input).
        assert loop.rule_options(_args(["--reference-defaults"]), rule) == spec_options.paper(rule)
    # What the command line gives wins; --pipeline replaces the default switches, the layers' ones too.
    assert loop.rule_options(_args(["--alpha", "0.5"]), "sa")["alpha"] == 0.5
    options = loop.rule_options(_args(["--pipeline", "center_input,reconstruction_amp"]), "aa")
    assert options.get("center_input") is True and "reconstruction_amp" not in options
    assert options["normalize_input"] is False
    options = loop.rule_options(_args(["--pipeline", "none", "--reference-defaults"]), "ia")
    assert not any(options.get(name) for name in fastfa.alignment.OPTIONS)
    model = training.models.build("mlp", "ia", channels=1, image_size=8, num_classes=10, options=options)
    assert all(m.alignment_pipeline is None for m in model.modules() if isinstance(m, fastfa.nn.FeedbackLayer))


def test_training_defaults_agree_with_the_layers_defaults():
    """fastfa train names the layers' default switches it keeps (so its record says which pipeline
    trained a run), and never contradicts them where it does not mean to."""
    for rule, switches in spec_options.LAYER_SWITCHES.items():
        trained = defaults.TRAINING_DEFAULTS.get(rule, {})
        assert {name: trained.get(name) for name in switches} == switches, rule


@pytest.mark.parametrize("argv,message", [
    (["--pipeline", "centre_input"], "--pipeline: unknown switch 'centre_input'"),
    (["--pipeline", "center_input=maybe"], "center_input is on or off"),
    (["--pipeline", "input_stddev=wide"], "input_stddev needs a number"),
    (["--depths", "1,4"], "--depths: comma-separated integers of at least 2"),
    (["--feedback-lr", "0"], "--feedback-lr must be positive"),
])
def test_bad_pipeline_options_are_refused(argv, message, capsys):
    assert training.main(argv + ["--epochs", "1"]) == 2
    assert message in capsys.readouterr().err


def test_depth_study_writes_table_record_and_plot(tmp_path, capsys):
    out = tmp_path / "depth.json"
    code = training.main(["--depths", "2,3", "--models", "mlp", "--rules", "bp,fa", "--seeds", "2", "--epochs", "1",
                          "--steps-per-epoch", "3", "--out", str(out), "--threads", "1", "--eval-batch-size", "450"])
    assert code == 0
    record = json.loads(out.read_text())
    assert [(r["depth"], r["rule"], r["seeds"]) for r in record["rows"]] == [
        (2, "bp", [0, 1]), (2, "fa", [0, 1]), (3, "bp", [0, 1]), (3, "fa", [0, 1])]
    assert len(record["runs"]) == 8
    bp = [r for r in record["rows"] if r["rule"] == "bp"]
    assert all(r["gradient_angle"] < 0.5 for r in bp)  # fp32 rounding of arccos near 1
    fa = [r for r in record["rows"] if r["rule"] == "fa"]
    assert all(r["gradient_angle"] > 10 for r in fa)
    table = capsys.readouterr().out
    assert "depth 3: test % / grad angle" in table and "mlp: rule" in table
    # The plot where matplotlib is there (the bench extra); without it the run says so and goes on.
    plotted = importlib.util.find_spec("matplotlib") is not None
    assert out.with_suffix(".png").is_file() == plotted
    assert plotted or "no plot: matplotlib is not installed" in table
    # A model of the study has depth layers with weights.
    model = training.models.build("mlp-depth-5", "bp", channels=1, image_size=8, num_classes=10)
    assert sum(isinstance(m, torch.nn.Linear) for m in model.modules()) == 5
    assert not math.isnan(record["rows"][0]["test_acc"])
