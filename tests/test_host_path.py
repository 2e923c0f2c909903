"""The host path: autograd in C++, the module's resolved options, a step a CUDA graph can replay."""

import contextlib
import copy

import pytest
import torch

import fastfa
from fastfa import functional as F

LAYER_OPS = ("linear", "conv2d", "cuda_linear", "cuda_conv2d")


@pytest.mark.parametrize("op", LAYER_OPS)
def test_autograd_of_every_cpp_layer_op_is_registered_in_cpp(op):
    # A Python formula (torch.library.register_autograd) would be registered from Python and
    # cost a layer 100+ µs of host time per step.
    dump = torch._C._dispatch_dump(f"fastfa::{op}")
    autograd = [line for line in dump.splitlines() if line.startswith("Autograd[")]
    assert autograd, dump
    assert "csrc/autograd.cpp" in autograd[0], autograd[0]


def _direct_linear(rule, feedback, x, w, b, activation="gelu"):
    rng = torch.tensor([3, 1])
    return torch.ops.fastfa.linear(x, w, b, feedback, rng, int(fastfa.rules.rule_spec(rule).id), 0.5, 0,
                                   [0.1, 0.2, 0.3, 1.0], activation)


@pytest.mark.parametrize("rule", ["bp", "kp", "sa", "ia"])
def test_an_output_the_loss_does_not_reach_gets_zero_gradient(rule):
    # Only the pre-activation (the op's second output) reaches the loss, so autograd hands the
    # backward no gradient for the output: the backward must treat it as zeros (kp's and sa's
    # B gradient has terms that do not vanish with it).
    torch.manual_seed(0)
    leaves = [torch.randn(3, 5, dtype=torch.float64, requires_grad=True),
              torch.randn(4, 5, dtype=torch.float64, requires_grad=True),
              torch.randn(4, dtype=torch.float64, requires_grad=True)]
    feedback = torch.randn(4, 5, dtype=torch.float64, requires_grad=True) if rule != "bp" else None
    inputs = leaves + ([feedback] if feedback is not None else [])

    _, saved, _ = _direct_linear(rule, feedback, *leaves)
    unreached = torch.autograd.grad(saved.sum(), inputs, allow_unused=True)
    output, saved, _ = _direct_linear(rule, feedback, *leaves)
    zero = torch.autograd.grad((output * 0).sum() + saved.sum(), inputs, allow_unused=True)
    for got, expected in zip(unreached, zero):
        assert (got is None and expected is None) or torch.equal(got, expected)
    if rule in ("kp", "sa", "ia"):
        assert unreached[3] is not None and unreached[3].abs().sum() > 0


def _host_state(model):
    """What a CUDA graph's replay could not redo: which tensor objects the modules hold, and
    their plain attributes (a value computed on the host and stored would be frozen)."""
    state = {}
    for name, module in model.named_modules():
        for key, value in vars(module).items():
            if key in ("_parameters", "_buffers"):
                state[name, key] = {k: (id(v), v.data_ptr()) if v is not None else None for k, v in value.items()}
            elif key == "_modules":
                state[name, key] = {k: id(v) for k, v in value.items()}
            elif isinstance(value, torch.Tensor):
                state[name, key] = (id(value), value.data_ptr())
            elif not key.startswith("_resolved_"):
                state[name, key] = copy.copy(value)
    return state


def _small_model(rule):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(3 * 4 * 4, 5))
    return fastfa.convert(model, rule, seed=7)


@pytest.mark.parametrize("rule", fastfa.rules.LAYER_RULES)
def test_a_training_step_changes_no_host_side_state(rule):
    model = _small_model(rule)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, target = torch.randn(2, 2, 4, 4), torch.randint(0, 5, (2,))

    def step():
        optimizer.zero_grad(set_to_none=False)
        torch.nn.functional.cross_entropy(model(x), target).backward()
        optimizer.step()

    step()  # the first step makes the gradients and resolves the layers' options
    before = _host_state(model)
    counters = [layer.feedback_rng.clone() for layer in model.modules()
                if isinstance(layer, fastfa.nn.FeedbackLayer) and layer.feedback_rng is not None]
    step()
    assert _host_state(model) == before
    after = [layer.feedback_rng for layer in model.modules()
             if isinstance(layer, fastfa.nn.FeedbackLayer) and layer.feedback_rng is not None]
    # brsf and wm: the counter moved on, in the tensor the layer held (a replay writes there).
    assert len(after) == (2 if rule in ("brsf", "wm") else 0)
    for old, new in zip(counters, after):
        assert int(new[0]) == int(old[0]) and int(new[1]) == int(old[1]) + 1


def test_each_backward_reads_the_step_of_its_own_forward():
    # The counter moves on in place, so the forward hands its backward a copy.
    torch.manual_seed(0)
    layer = fastfa.nn.Linear(5, 4, rule="brsf", seed=11)
    x = torch.randn(3, 5)
    inputs = [x.clone().requires_grad_(True) for _ in range(2)]
    outputs = [layer(inp) for inp in inputs]  # steps 0 and 1, both before any backward
    for out in reversed(outputs):
        out.sum().backward()
    for step, inp in enumerate(inputs):
        reference = x.clone().requires_grad_(True)
        F.linear(reference, layer.weight, layer.bias, rule="brsf", seed=11, step=step).sum().backward()
        assert torch.equal(inp.grad, reference.grad)
    assert int(layer.feedback_rng[1]) == 2


def test_a_changed_option_takes_effect_on_the_next_call():
    torch.manual_seed(0)
    layer = fastfa.nn.Linear(5, 4, rule="usf")
    x = torch.randn(3, 5)
    layer(x)
    layer.activation = "relu"
    assert torch.equal(layer(x), torch.relu(torch.nn.functional.linear(x, layer.weight, layer.bias)))
    layer.feedback_scale = 2.0
    grad = torch.randn(3, 4)
    inp = x.clone().requires_grad_(True)
    layer(inp).backward(grad)
    delta = grad * (torch.nn.functional.linear(x, layer.weight, layer.bias) > 0)
    torch.testing.assert_close(inp.grad, delta @ (2.0 * torch.sign(layer.weight.detach())))


def test_a_changed_conv_geometry_takes_effect_on_the_next_call():
    torch.manual_seed(0)
    layer = fastfa.nn.Conv2d(2, 3, 3, rule="bp")
    x = torch.randn(1, 2, 6, 6)
    layer(x)
    layer.stride, layer.padding = (2, 2), (1, 1)
    expected = torch.nn.functional.conv2d(x, layer.weight, layer.bias, stride=2, padding=1)
    assert torch.equal(layer(x), expected)


_REFUSED_LINEAR = [
    (lambda: torch.ones(2, 3, dtype=torch.int64), TypeError, "input has dtype torch.int64; expected one of float16"),
    (lambda: torch.ones(2, 3, dtype=torch.float64), TypeError, "input has dtype torch.float64 but weight has"),
    (lambda: torch.ones(2, 4), ValueError, r"input's last dimension must be in_features=3.*got input of shape \(2, 4\)"),
    (lambda: [1.0, 2.0, 3.0], TypeError, "input must be a torch.Tensor, got list"),
]
_REFUSED_CONV2D = [
    (lambda: torch.ones(1, 5, 8, 8), ValueError, r"input must have 3 channels .*got input of shape \(1, 5, 8, 8\)"),
    (lambda: torch.ones(8, 8), ValueError, "input must have 3 or 4 dimensions"),
    (lambda: torch.ones(1, 3, 2, 2), ValueError, r"input's spatial size \(2, 2\) with padding \(0, 0\) is smaller"),
]


@pytest.mark.parametrize("rule", ["usf", "brsf", "kp"])
def test_a_layer_past_its_first_call_refuses_bad_input_with_the_checked_message(rule):
    # After the first call the module calls its op directly; the op's C++ checks refuse the call
    # before any kernel runs, and the module's functional checks then say what is wrong.
    layer, conv = fastfa.nn.Linear(3, 2, rule=rule, seed=0), fastfa.nn.Conv2d(3, 4, 3, rule=rule, seed=0)
    for module, good, refused in ((layer, torch.ones(2, 3), _REFUSED_LINEAR),
                                  (conv, torch.ones(1, 3, 8, 8), _REFUSED_CONV2D)):
        module(good)
        assert "_resolved_call" in vars(module)
        counter = None if module.feedback_rng is None else module.feedback_rng.clone()
        for make, error, match in refused:
            with pytest.raises(error, match=match):
                module(make())
        if counter is not None:  # a refused call leaves brsf's step where it was
            assert torch.equal(module.feedback_rng, counter)


def test_an_unbatched_input_after_a_batched_one_takes_the_checked_path():
    torch.manual_seed(0)
    conv = fastfa.nn.Conv2d(2, 3, 3, padding=1, rule="usf")
    x = torch.randn(2, 4, 4)
    conv(x.unsqueeze(0))
    torch.testing.assert_close(conv(x), torch.nn.functional.conv2d(x, conv.weight, conv.bias, padding=1))


def test_a_changed_backend_padding_mode_or_kernel_takes_effect_on_the_next_call():
    torch.manual_seed(0)
    conv = fastfa.nn.Conv2d(2, 3, 3, padding="same", rule="bp")
    x = torch.randn(1, 2, 5, 5)
    conv(x)
    conv.padding_mode = "reflect"
    expected = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect"), conv.weight,
                                          conv.bias)
    torch.testing.assert_close(conv(x), expected)
    conv.padding_mode = "zeros"
    conv(x)
    conv.weight = torch.nn.Parameter(torch.randn(3, 2, 5, 5))  # "same" now pads by 2
    torch.testing.assert_close(conv(x), torch.nn.functional.conv2d(x, conv.weight, conv.bias, padding=2))
    layer = fastfa.nn.Linear(3, 2, rule="usf")
    layer(torch.randn(2, 3))
    with fastfa.use_backend("triton"):
        layer(torch.randn(2, 3))
    assert vars(layer)["_resolved_call"].backend == "auto"  # triton's op is not called without its checks


@pytest.mark.parametrize("rule", ["usf", "kp"])
def test_the_backward_node_frees_its_tensors_and_refuses_a_second_backward(rule):
    layer = fastfa.nn.Linear(3, 2, rule=rule, seed=0, activation="relu")
    output = layer(torch.randn(4, 3, requires_grad=True))
    assert output.grad_fn.name() == "fastfa::LinearBackward"
    output.sum().backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        output.sum().backward()


@pytest.mark.parametrize("activation", ["none", "relu", "gelu"])
def test_only_the_op_outputs_the_backend_fills_carry_a_history(activation):
    # The pre-activation (gelu) and the projection (aa, ia without normalize_input) are differentiable
    # outputs; the 0-element placeholders the backend returns in their place carry no history (no
    # autograd metadata or saved copy per step), also beside a 1-D output (the placeholders' own rank).
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 5, requires_grad=True), torch.randn(3, 5, requires_grad=True), torch.randn(3)
    for rule, has_projection in (("usf", False), ("ia", True)):
        feedback = torch.randn(3, 5) if rule == "ia" else None
        output, saved, projection = torch.ops.fastfa.linear(
            x, w, b, feedback, None, int(fastfa.rules.rule_spec(rule).id), 1.0, 0, [0.1, 0.2, 0.3, 1.0], activation)
        assert output.grad_fn.name() == "fastfa::LinearBackward"
        assert saved.requires_grad == (activation == "gelu")
        assert projection.requires_grad == has_projection
        assert (saved.grad_fn is output.grad_fn) == (activation == "gelu")
        output.sum().backward()
    usf = int(fastfa.rules.rule_spec("usf").id)
    output, saved, projection = torch.ops.fastfa.linear(x[0], w, b, None, None, usf, 1.0, 0, [0.0] * 4, activation)
    assert output.dim() == saved.dim() == projection.dim() == 1
    assert output.requires_grad and not projection.requires_grad
    assert saved.requires_grad == (activation == "gelu")
    output.sum().backward()


def test_a_2d_linear_backward_reads_its_operands_as_the_reshaped_ones():
    # A 2-D input and grad_output reach the GEMMs without reshape's alias: the same bits as the same
    # rows given in 3-D (reshaped), also where a batch of one has an expanded or odd-strided row.
    torch.manual_seed(0)
    w = torch.randn(4, 6)
    wide = torch.randn(2, 12)
    for x, grad in ((torch.randn(3, 6), torch.randn(3, 4)),
                    (wide[:1, ::2], torch.ones(1, 1).expand(1, 4)),
                    (torch.randn(1, 6), torch.randn(1, 8)[:, 2:6])):
        for rule in ("bp", "usf", "frsf"):
            spec = fastfa.rules.rule_spec(rule)
            feedback = torch.randn(4, 6) if rule == "frsf" else None
            scale = fastfa.rules.RMS_SCALE if rule == "usf" else 1.0  # usf's s as the GEMM's alpha
            arguments = (feedback, None, torch.empty(0), torch.empty(0), int(spec.id), scale, 0, [0.0] * 4, "none",
                         [True, True, True, False])
            flat = torch.ops.fastfa.linear_backward(grad, x, w, *arguments)
            folded = torch.ops.fastfa.linear_backward(grad.unsqueeze(0), x.unsqueeze(0), w, *arguments)
            assert torch.equal(flat[0], folded[0].squeeze(0)) and flat[0].shape == x.shape
            for a, b in zip(flat[1:3], folded[1:3]):
                assert torch.equal(a, b)


def _training_step(model, x, target, autocast=None):
    """One SGD step (momentum: optimizer state a replay must update too). The gradients are set to
    None before each backward: under a capture the backward then allocates them from the graph's pool
    and writes them on every replay (torch.cuda.graphs' whole-network example); under cudagraph trees
    each step's are outputs of the backward's replay, overwritten by the next, never accumulated into.
    autocast: a dtype to run the forward and loss under torch.autocast in (without its weight cache,
    whose casts a capture would freeze: torch.cuda.graphs' note on autocast)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with (contextlib.nullcontext() if autocast is None
              else torch.autocast(x.device.type, dtype=autocast, cache_enabled=False)):
            loss = torch.nn.functional.cross_entropy(model(x), target)
        loss.backward()
        optimizer.step()
        return loss

    return step


def _assert_same_state(model, reference, **tolerance):
    # brsf's and wm's feedback_rng included: the counter a replay must advance on the device.
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, msg=lambda m: f"{name}: {m}", **tolerance)


# Every rule: brsf and wm advance a step counter, dfa hands the model's output error to its
# layers through hooks, fa and frsf read a stored R, the estimated rules learn B. Under bf16
# autocast every layer takes its checked path (no resolved call), as benchmarks/cuda_graph_step.py's
# default step does.
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("autocast", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("rule", fastfa.RULES)
def test_a_training_step_captured_in_a_cuda_graph_replays_as_eager_steps(rule, autocast):
    device = torch.device("cuda")
    eager, graphed = _small_model(rule).to(device), _small_model(rule).to(device)  # the same weights and seeds
    x, target = torch.randn(4, 2, 4, 4, device=device), torch.randint(0, 5, (4,), device=device)
    eager_step = _training_step(eager, x, target, autocast)
    graphed_step = _training_step(graphed, x, target, autocast)
    # Warm-up on a side stream (as torch.cuda.graphs asks), the same steps on both copies.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            eager_step()
            graphed_step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = graphed_step()  # captured, not run: the eager copy takes the same step below
    for _ in range(4):
        graph.replay()
        loss = eager_step()
        torch.cuda.synchronize()
        torch.testing.assert_close(static_loss, loss)
    _assert_same_state(graphed, eager)


# torch.compile's CUDA graphs (cudagraph trees) over the converted model, the optimizer's step
# eager: a rule that draws (brsf, wm: the counter is a new buffer each step under compile), one
# that transforms W (usf), one that learns B (kp).
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("rule", ["usf", "brsf", "wm", "kp"])
def test_a_training_step_compiled_with_reduce_overhead_replays_as_eager_steps(rule):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    device = torch.device("cuda")
    eager, compiled_model = _small_model(rule).to(device), _small_model(rule).to(device)
    x, target = torch.randn(4, 2, 4, 4, device=device), torch.randint(0, 5, (4,), device=device)
    compiled = torch.compile(compiled_model, mode="reduce-overhead", fullgraph=True)
    eager_step, compiled_step = _training_step(eager, x, target), _training_step(compiled, x, target)
    # cudagraph trees run a function once to warm up, record it on the second call and replay it
    # from the third: five steps replay three times. Inductor fuses and reorders the elementwise work
    # and reductions around fastfa's ops (fp32 rounding), and the steps carry that on (lr 0.1,
    # momentum): test_compile.py's tolerance.
    tolerance = dict(atol=1e-5, rtol=1e-5)
    try:
        for step in range(5):
            torch.compiler.cudagraph_mark_step_begin()
            loss = compiled_step()
            torch.testing.assert_close(loss, eager_step(), msg=lambda m: f"step {step}: {m}", **tolerance)
        assert counters["inductor"]["cudagraph_skips"] == 0, "torch.compile ran the step without CUDA graphs"
        _assert_same_state(compiled_model, eager, **tolerance)
    finally:
        torch._dynamo.reset()  # the compiled graphs and their CUDA-graph pools go with the test


def test_bench_host_set_reports_the_overhead_per_rule_and_layer_kind(tmp_path, capsys):
    import json

    from fastfa import cli

    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    code = cli.main(["bench", "--quick", "--device", "cpu", "--shapes", "host", "--models", "none", "--rules",
                     "bp,brsf", "--peers", "none", "--out", str(out), "--no-plot"])
    assert code == 0
    assert torch.get_num_threads() == threads  # the table's one thread is set for it alone
    printed = capsys.readouterr().out
    assert "host overhead per forward + backward step" in printed
    rows = json.loads(out.read_text())["host_overhead"]
    assert {(row["kind"], row["rule"]) for row in rows} == {
        (kind, rule) for kind in ("linear", "conv2d") for rule in ("bp", "brsf")}
    for row in rows:  # the values are times on a shared machine: only their presence is checked
        assert row["torch_us"] > 0 and row["fastfa_us"] > 0 and isinstance(row["overhead_us"], float)


@pytest.mark.filterwarnings("ignore:fastfa. a layer of the estimated rule")  # kp under fp16 without fastfa's scaler
@pytest.mark.parametrize("autocast", [None, torch.bfloat16, torch.float16], ids=["fp32", "autocast-bf16", "autocast-fp16"])
@pytest.mark.parametrize("rule", ["usf", "brsf", "kp", "wm"])
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_the_resolved_layer_call_steps_as_the_checked_path(kind, rule, autocast):
    # After the first call the module makes one call into its C++ LayerCall; it must give what
    # the checked path gives, and move brsf's counter on as that path does. Under autocast too
    # (the usual GPU training mode): the LayerCall casts the arguments as the checked path does.
    torch.manual_seed(0)
    if kind == "linear":
        layer, x = fastfa.nn.Linear(5, 4, rule=rule, seed=3, activation="gelu"), torch.randn(3, 5)
    else:
        layer, x = fastfa.nn.Conv2d(2, 3, 3, padding=1, rule=rule, seed=3), torch.randn(2, 2, 5, 5)
    checked = copy.deepcopy(layer)
    for step in range(3):
        ours, theirs = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            output = layer(ours)
            checked._forget_resolved()  # the checked path every step
            expected = checked(theirs)
        assert output.dtype == expected.dtype == (autocast or torch.float32)
        assert torch.equal(output, expected), step
        output.float().sum().backward()
        expected.float().sum().backward()
        assert isinstance(vars(layer)["_resolved_call"].layer_call, fastfa._C.LayerCall)
        assert torch.equal(ours.grad, theirs.grad), step
        for a, b in zip(layer.parameters(), checked.parameters()):
            assert torch.equal(a.grad, b.grad), step
        if layer.feedback_rng is not None:
            assert torch.equal(layer.feedback_rng, checked.feedback_rng)
            assert int(layer.feedback_rng[1]) == step + 1


@pytest.mark.filterwarnings("ignore:fastfa. a layer of the estimated rule")  # under fp16 without fastfa's scaler
@pytest.mark.parametrize("autocast", [torch.bfloat16, torch.float16], ids=["autocast-bf16", "autocast-fp16"])
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_under_autocast_the_resolved_call_hands_b_its_gradient_without_a_cast_node(kind, autocast):
    # B (an fp32 Parameter) is cast to the autocast dtype with no node of its own: the op's node
    # points at B, and the engine casts B's gradient to fp32 as the cast's node would have.
    torch.manual_seed(0)
    if kind == "linear":
        layer, x = fastfa.nn.Linear(5, 4, rule="kp"), torch.randn(3, 5, requires_grad=True)
    else:
        layer, x = fastfa.nn.Conv2d(2, 3, 3, padding=1, rule="kp"), torch.randn(2, 2, 5, 5, requires_grad=True)
    with torch.autocast("cpu", dtype=autocast):
        layer(x)
        output = layer(x)
    assert isinstance(vars(layer)["_resolved_call"].layer_call, fastfa._C.LayerCall)
    feedback_edge = output.grad_fn.next_functions[3][0]
    assert type(feedback_edge).__name__ == "AccumulateGrad" and feedback_edge.variable is layer.feedback
    output.float().sum().backward()
    assert layer.feedback.grad.dtype == torch.float32


@pytest.mark.parametrize("frozen", ["weight and bias", "all but the input"])
def test_under_autocast_b_alone_needing_a_gradient_still_gets_it(frozen):
    # Where no other argument needs a gradient the op records no node to hand B's gradient to: the
    # resolved call then casts B with its node, as the checked path does.
    torch.manual_seed(0)
    layer = fastfa.nn.Linear(5, 4, rule="kp")
    layer.weight.requires_grad_(False)
    layer.bias.requires_grad_(False)
    x = torch.randn(3, 5, requires_grad=frozen == "all but the input")
    checked = copy.deepcopy(layer)
    for step in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output = layer(x)
            checked._forget_resolved()
            expected = checked(x)
        assert torch.equal(output, expected)
        output.float().sum().backward()
        expected.float().sum().backward()
        assert torch.equal(layer.feedback.grad, checked.feedback.grad), step
    assert isinstance(vars(layer)["_resolved_call"].layer_call, fastfa._C.LayerCall)


def test_a_layer_past_its_first_call_deepcopies_and_saves(tmp_path):
    # The resolved call holds a C++ object: __getstate__ leaves it out, and the copy resolves its own.
    torch.manual_seed(0)
    layer = fastfa.nn.Linear(5, 4, rule="brsf", seed=1)
    x = torch.randn(3, 5, requires_grad=True)
    layer(x).sum().backward()
    twin = copy.deepcopy(layer)
    assert "_resolved_call" not in vars(twin)
    torch.save(layer, tmp_path / "layer.pt")
    loaded = torch.load(tmp_path / "layer.pt", weights_only=False)
    for other in (twin, loaded):
        other(x).sum()
        assert "_resolved_call" in vars(other)
        other(x).sum()
        assert int(other.feedback_rng[1]) == 3  # its own counter, not the original's
    assert int(layer.feedback_rng[1]) == 1


def test_a_torch_function_mode_or_tensor_subclass_takes_the_checked_path():
    class Recorder(torch.overrides.TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.calls += 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    layer = fastfa.nn.Linear(5, 4, rule="usf")
    x = torch.randn(3, 5)
    expected = layer(x)
    with Recorder() as mode:
        assert torch.equal(layer(x), expected)
    assert mode.calls > 0  # the mode saw the layer's work: the LayerCall would have skipped it
