"""Loss scaling (fastfa.amp.GradScaler) with the estimated rules: a scaled step equals an unscaled one.

torch.amp.GradScaler multiplies the loss by S and divides every gradient by S. The estimated
rules' B gets terms that do not come from the loss (kp's decay 2αB; all of wm's, sa's, aa's and
ia's), which torch's scaler therefore divides by S. fastfa's scaler has the layers multiply those
terms by S in the backward, so the unscale gives them back. In fp32 on the CPU with S a power of
two, scaling the loss is exact, so the scaled and unscaled steps agree to rounding.
"""

import copy
import warnings

import pytest
import torch

import fastfa
import fastfa.amp
from fastfa.rules import LAYER_RULES, rule_spec

ESTIMATED = ("kp", "wm", "sa", "aa", "ia")
OTHERS = tuple(rule for rule in LAYER_RULES if not rule_spec(rule).estimates_feedback)
SCALES = (2.0**10, 2.0**16)


@pytest.fixture(autouse=True)
def _no_scaler_left_behind(monkeypatch):
    """A fastfa GradScaler switches the estimated layers' scaling node on for the process: off again
    after each test here, so that the other test files run as they would alone."""
    monkeypatch.setattr(fastfa.amp, "enabled", False)
    monkeypatch.setattr(fastfa.amp, "_holders", {})
    monkeypatch.setattr(fastfa.amp, "_before_scaler", {})


class Net(torch.nn.Module):
    """A conv layer, a hidden linear layer and a classifier, all on the rule: B's terms of every
    layer kind, and a grad_input that goes through B twice."""

    def __init__(self, rule, **options):
        super().__init__()
        self.conv = fastfa.nn.Conv2d(2, 3, 3, padding=1, rule=rule, seed=1, **options)
        self.hidden = fastfa.nn.Linear(3 * 4 * 4, 8, rule=rule, seed=2, activation="relu", **options)
        self.out = fastfa.nn.Linear(8, 5, rule=rule, seed=3, **options)

    def forward(self, x):
        return self.out(self.hidden(torch.relu(self.conv(x)).flatten(1)))


def _loss(model, x, target):
    return torch.nn.functional.cross_entropy(model(x), target)


def _train(model, batches, scaler=None, steps_per_update=1, momentum=0.9):
    """SGD with momentum (B's update depends on its gradient's history too); with a scaler, torch's
    recipe: scale(loss).backward(), step, update. Returns the parameters after the steps."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum, weight_decay=1e-4)
    for index, (x, target) in enumerate(batches):
        loss = _loss(model, x, target) / steps_per_update
        # gradient accumulation: several backward passes into one step
        _step(loss, optimizer, scaler, take_step=(index + 1) % steps_per_update == 0)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _step(loss, optimizer, scaler=None, take_step=True):
    """Backward, then (unless `take_step` is false) one optimiser step: plainly, or with torch's
    recipe (scale(loss).backward(), step, update) when there is a scaler."""
    (loss if scaler is None else scaler.scale(loss)).backward()
    if not take_step:
        return
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
    optimizer.zero_grad(set_to_none=True)


def _batches(count=3):
    return [(torch.randn(4, 2, 4, 4), torch.randint(0, 5, (4,))) for _ in range(count)]


def _assert_same(ours, reference, message=""):
    assert ours.keys() == reference.keys()
    for name in reference:
        # Scaling by a power of two is exact; kp's (S - 1) * 2αB added to S*grad_W + 2αB rounds once.
        torch.testing.assert_close(ours[name], reference[name], rtol=2e-6, atol=1e-7, msg=f"{message} {name}")


def _pair(rule, scale, steps_per_update=1, **options):
    batches = _batches(3 * steps_per_update)
    reference_model = Net(rule, **options)
    model = Net(rule, **options)
    model.load_state_dict(reference_model.state_dict())
    scaler = fastfa.amp.GradScaler("cpu", init_scale=scale)  # before the first forward pass
    reference = _train(reference_model, batches, steps_per_update=steps_per_update)
    ours = _train(model, batches, scaler, steps_per_update=steps_per_update)
    return ours, reference, scaler


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("rule", ESTIMATED)
def test_scaled_steps_equal_unscaled_steps(rule, scale):
    ours, reference, scaler = _pair(rule, scale)
    _assert_same(ours, reference, f"{rule} at S={scale:g}:")
    assert scaler.get_scale() == scale  # no inf / nan: the scale never backed off


@pytest.mark.parametrize("rule", ("kp", "wm"))
def test_gradient_accumulation(rule):
    """Two scaled backward passes into one step: each carries S, and B's terms of both survive."""
    ours, reference, _ = _pair(rule, 2.0**12, steps_per_update=2)
    _assert_same(ours, reference, rule)


def test_torch_scaler_divides_the_alignment_terms_by_the_scale():
    """The defect this module fixes, as torch's own GradScaler still shows it (and the reason for
    the fp16 warning): B's update differs from the unscaled step by its whole alignment term."""
    batches = _batches(1)
    reference_model, model = Net("sa"), Net("sa")
    model.load_state_dict(reference_model.state_dict())
    fastfa.amp.GradScaler("cpu")  # the layers scale B's terms, but torch's scaler does not carry S
    reference = _train(reference_model, batches, momentum=0.0)
    ours = _train(model, batches, torch.amp.GradScaler("cpu", init_scale=2.0**16), momentum=0.0)
    torch.testing.assert_close(ours["hidden.weight"], reference["hidden.weight"])
    assert not torch.allclose(ours["hidden.feedback"], reference["hidden.feedback"], rtol=1e-6, atol=1e-8)


def test_unscaled_backward_after_a_scaled_one_is_not_scaled():
    """S is in effect for the scaled loss's backward pass only (fastfa.metrics' probes, a validation
    gradient or a plain loss.backward() in between see none of it)."""
    model = Net("ia")
    x, target = _batches(1)[0]
    scaler = fastfa.amp.GradScaler("cpu", init_scale=2.0**16)
    scaler.scale(_loss(model, x, target)).backward()
    scaled = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    _loss(model, x, target).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(scaled[name], p.grad * 2.0**16, rtol=1e-6, atol=0, msg=name)


def test_functional_form_with_a_user_held_feedback():
    """fastfa.functional with the caller's own B tensor gets the same treatment as a layer."""
    weight = torch.randn(4, 6, requires_grad=True)
    x = torch.randn(5, 6)
    gradients = []
    for scale in (None, 2.0**16):
        scaler = None if scale is None else fastfa.amp.GradScaler("cpu", init_scale=scale)
        feedback = torch.randn(4, 6, generator=torch.Generator().manual_seed(0)).requires_grad_()
        output = fastfa.functional.linear(x, weight, rule="kp", feedback=feedback, alpha=0.1)
        loss = output.square().sum()
        if scaler is None:
            loss.backward()
        else:
            scaler.scale(loss).backward()
            feedback.grad /= scale
        gradients.append(feedback.grad)
    torch.testing.assert_close(gradients[1], gradients[0], rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("rule,options", [
    ("wm", {"normalize_input": True}),  # the alignment pipeline's path: B's gradient from autograd
    ("ia", {"use_sparse": True, "center_forward_output": True}),
])
def test_alignment_pipeline(rule, options):
    ours, reference, _ = _pair(rule, 2.0**16, **options)
    _assert_same(ours, reference, rule)


@pytest.mark.parametrize("rule", ("kp", "aa"))
def test_scheduled_coefficients(rule):
    """A schedule drives alpha, beta, gamma as a tensor (kp's decay then comes from the pipeline's loss)."""
    results = []
    batches = _batches(3)
    reference_model = Net(rule)
    for scaler in (None, fastfa.amp.GradScaler("cpu", init_scale=2.0**16)):
        model = Net(rule)
        model.load_state_dict(reference_model.state_dict())
        schedule = fastfa.AlignmentSchedule(model, alpha=fastfa.CoefficientSchedule("linear", 0.05, 0.01, 3))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for x, target in batches:
            _step(_loss(model, x, target), optimizer, scaler)
            schedule.step()
        results.append({name: p.detach().clone() for name, p in model.named_parameters()})
    _assert_same(results[1], results[0], rule)


@pytest.mark.parametrize("rule", ("kp", "wm"))
def test_attention_and_conv1d(rule):
    """The attention layer's packed projection (B's row blocks as separate uses) and Conv1d."""
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = fastfa.nn.Conv1d(4, 4, 3, padding=1, rule=rule, seed=5)
            self.attention = fastfa.nn.MultiheadAttention(4, 2, rule=rule, seed=6, batch_first=True)

        def forward(self, x):
            x = self.conv(x).transpose(1, 2)
            return self.attention(x, x[:, :2], x[:, :2], need_weights=False)[0].square().mean()

    inputs = [torch.randn(2, 4, 5) for _ in range(2)]
    reference_model, model = Model(), Model()
    model.load_state_dict(reference_model.state_dict())
    scaler = fastfa.amp.GradScaler("cpu", init_scale=2.0**16)
    for current, current_scaler in ((reference_model, None), (model, scaler)):
        optimizer = torch.optim.SGD(current.parameters(), lr=0.1)
        for x in inputs:
            _step(current(x), optimizer, current_scaler)
    _assert_same(dict(model.named_parameters()), dict(reference_model.named_parameters()), rule)


@pytest.mark.parametrize("rule", ("kp", "ia"))
def test_inf_skips_the_step_and_backs_off(rule):
    """An overflowing step is skipped for every parameter, B included, and the scale halves; the
    next step then equals the unscaled step from the same parameters."""
    model = Net(rule)
    scaler = fastfa.amp.GradScaler("cpu", init_scale=2.0**16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=1e-4)  # _train's, without momentum
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    x, target = _batches(1)[0]
    for poison in (float("inf"), float("nan")):
        _step(_loss(model, x, target) * poison, optimizer, scaler)
        for name, p in model.named_parameters():
            assert torch.equal(p, before[name]), (poison, name)
    assert scaler.get_scale() == 2.0**14
    reference_model = Net(rule)
    reference_model.load_state_dict(model.state_dict())
    reference = _train(reference_model, [(x, target)], momentum=0.0)
    _step(_loss(model, x, target), optimizer, scaler)
    _assert_same({name: p.detach() for name, p in model.named_parameters()}, reference, rule)


def test_state_dict_round_trips():
    """The scaler's state_dict is torch's: it loads into a fresh fastfa scaler (and into torch's and
    back), and training resumed from it goes on exactly as without the interruption."""
    batches = _batches(4)
    model = Net("kp")
    resumed_model = Net("kp")
    resumed_model.load_state_dict(model.state_dict())
    scaler = fastfa.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for x, target in batches[:2]:
        _step(_loss(model, x, target), optimizer, scaler)
    state = scaler.state_dict()
    assert state["scale"] == 2.0**18 and state["_growth_tracker"] == 0
    through_torch = torch.amp.GradScaler("cpu")
    through_torch.load_state_dict(state)
    restored = fastfa.amp.GradScaler("cpu")
    restored.load_state_dict(through_torch.state_dict())
    assert restored.state_dict() == state
    resumed_model.load_state_dict(model.state_dict())
    resumed_optimizer = torch.optim.SGD(resumed_model.parameters(), lr=0.1, momentum=0.9)
    resumed_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # not the same momentum tensors
    for current, current_scaler, current_optimizer in ((model, scaler, optimizer),
                                                       (resumed_model, restored, resumed_optimizer)):
        for x, target in batches[2:]:
            _step(_loss(current, x, target), current_optimizer, current_scaler)
    for (name, p), q in zip(model.named_parameters(), resumed_model.parameters()):
        assert torch.equal(p, q), name
    assert restored.state_dict() == scaler.state_dict()


def test_disabled_scaler_is_torchs():
    scaler = fastfa.amp.GradScaler("cpu", enabled=False)
    loss = torch.ones((), requires_grad=True) * 3
    assert scaler.scale(loss) is loss


def test_scale_takes_lists_and_tuples():
    scaler = fastfa.amp.GradScaler("cpu", init_scale=4.0)
    layer = fastfa.nn.Linear(3, 1, rule="sa")
    x = torch.randn(2, 3)
    a, b = layer(x).sum(), layer(x).square().sum()
    scaled = scaler.scale([a, b])
    assert isinstance(scaled, list) and all(type(t.grad_fn).__name__ == "_CarryScaleBackward" for t in scaled)
    torch.testing.assert_close(torch.stack(scaled).detach(), torch.stack([a, b]).detach() * 4)
    pair = scaler.scale((a, b))
    assert isinstance(pair, tuple)
    torch.autograd.backward(list(pair))
    reference = fastfa.nn.Linear(3, 1, rule="sa")
    reference.load_state_dict(layer.state_dict())
    torch.autograd.backward([reference(x).sum(), reference(x).square().sum()])
    torch.testing.assert_close(layer.feedback.grad, reference.feedback.grad * 4)
    torch.testing.assert_close(layer.weight.grad, reference.weight.grad * 4)


@pytest.mark.parametrize("rule", OTHERS)
def test_other_rules_get_no_scaling_node(rule, monkeypatch):
    """bp, fa, usf, brsf, frsf: every gradient is loss-proportional, so their layers never call into
    fastfa.amp, on the checked path nor on the resolved per-call path."""
    fastfa.amp.GradScaler("cpu")

    def refuse(*args, **kwargs):
        raise AssertionError(f"rule {rule!r} reached fastfa.amp")

    monkeypatch.setattr(fastfa.amp, "for_loss_scaling", refuse)
    options = {"seed": 4} if "seed" in rule_spec(rule).options else {}
    layers = [fastfa.nn.Linear(6, 3, rule=rule, **options), fastfa.nn.Conv2d(2, 3, 3, rule=rule, **options)]
    scaler = fastfa.amp.GradScaler("cpu", init_scale=2.0**8)
    for _ in range(2):  # the first call takes the checked path, the second the resolved one
        loss = layers[0](torch.randn(2, 6)).sum() + layers[1](torch.randn(1, 2, 4, 4)).sum()
        scaled = scaler.scale(loss)
        assert type(scaled.grad_fn).__name__ == "MulBackward0"  # torch's scaling alone: no carry node either
        scaled.backward()


def test_torch_scaler_under_fp16_autocast_warns_once(monkeypatch):
    monkeypatch.setattr(fastfa.amp, "enabled", False)
    monkeypatch.setattr(fastfa.amp, "_warned", False)
    layer = fastfa.nn.Linear(6, 3, rule="aa")
    with torch.autocast("cpu", dtype=torch.float16):
        with pytest.warns(UserWarning, match="use fastfa.amp.GradScaler instead"):
            layer(torch.randn(2, 6))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            layer(torch.randn(2, 6))  # once
    monkeypatch.setattr(fastfa.amp, "_warned", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 needs no loss scaling
            layer(torch.randn(2, 6))
        fastfa.nn.Linear(6, 3, rule="usf")(torch.randn(2, 6))


@pytest.mark.parametrize("rule", ("kp", "ia"))
def test_compiled_model(rule):
    """torch.compile(fullgraph=True): the compiled backward reads S at run time (a tensor, not a
    constant frozen when the graph was traced), from the first compiled step on (no eager step
    before it made the holder)."""
    torch._dynamo.reset()
    batches = _batches(2)
    reference_model, model = Net(rule), Net(rule)
    model.load_state_dict(reference_model.state_dict())
    scaler = fastfa.amp.GradScaler("cpu", init_scale=2.0**16)
    ours = _train(torch.compile(model, fullgraph=True, backend="aot_eager"), batches, scaler)
    reference = _train(reference_model, batches)
    _assert_same({name.removeprefix("_orig_mod."): p for name, p in ours.items()}, reference, rule)


# --- fp16 autocast, the case loss scaling exists for (on the CPU, and on CUDA where there is a GPU) --


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (fp16 autocast on cuda)")])])
@pytest.mark.parametrize("rule", ESTIMATED)
def test_fp16_autocast(rule, device):
    """Under fp16 autocast, one step with fastfa's scaler moves B as the unscaled fp16 step does; torch's
    scaler leaves B's alignment terms divided by S (65536)."""
    device = torch.device(device)
    fastfa.amp.GradScaler(device.type)
    batches = [(x.to(device), t.to(device)) for x, t in _batches(1)]
    start = Net(rule).to(device)
    results = {}
    for name in ("none", "fastfa", "torch"):
        model = Net(rule).to(device)
        model.load_state_dict(start.state_dict())
        scaler = {"none": None, "fastfa": fastfa.amp.GradScaler(device.type),
                  "torch": torch.amp.GradScaler(device.type)}[name]
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        x, target = batches[0]
        with torch.autocast(device.type, dtype=torch.float16):
            loss = _loss(model, x, target)
        _step(loss, optimizer, scaler)
        assert scaler is None or scaler.get_scale() == 2.0**16  # no overflow: the step was taken
        results[name] = {n: (p.detach() - q.detach()).float() for (n, p), q in
                         zip(model.named_parameters(), start.parameters())}
    for key, step in results["none"].items():
        torch.testing.assert_close(results["fastfa"][key], step, rtol=2e-2, atol=1e-5, msg=f"{rule} {key}")
    feedback = [key for key in results["none"] if key.endswith("feedback")]
    assert any(not torch.allclose(results["torch"][key], results["none"][key], rtol=2e-2, atol=1e-5)
               for key in feedback)


@pytest.mark.parametrize("reentrant", (False, True))
def test_activation_checkpointing(reentrant):
    """torch.utils.checkpoint recomputes the forward inside the backward pass (reentrant: in a nested
    backward of its own): the recomputed layers' B still gets S."""
    class Checkpointed(Net):
        def forward(self, x):
            return torch.utils.checkpoint.checkpoint(super().forward, x, use_reentrant=reentrant)

    batches = [(x.requires_grad_(), target) for x, target in _batches(2)]
    reference_model, model = Net("ia"), Checkpointed("ia")
    model.load_state_dict(reference_model.state_dict())
    scaler = fastfa.amp.GradScaler("cpu", init_scale=2.0**16)
    _assert_same(_train(model, batches, scaler), _train(reference_model, batches), f"reentrant={reentrant}")


def test_scaler_made_after_the_forward_pass_warns():
    """The forward pass made no node on B (no fastfa scaler yet): that step cannot be fixed, so say so."""
    model = Net("sa")
    x, target = _batches(1)[0]
    loss = _loss(model, x, target)
    scaler = fastfa.amp.GradScaler("cpu")
    with pytest.warns(UserWarning, match="Make the scaler before the first forward pass"):
        scaler.scale(loss).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scaler.scale(_loss(model, x, target)).backward()  # the next forward has the node: no warning


def test_no_warning_for_a_loss_without_those_layers(monkeypatch):
    """An estimated layer ran before the scaler, but the loss scaled is another model's: no warning."""
    _loss(Net("kp"), *_batches(1)[0])
    scaler = fastfa.amp.GradScaler("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scaler.scale(_loss(Net("usf"), *_batches(1)[0])).backward()
