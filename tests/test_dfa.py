"""dfa (direct feedback alignment) against the oracle: plain PyTorch from learning-rules.md.

The oracle replaces each converted layer by an autograd.Function written from the spec:
grad_x = reshape(e B_l, x.shape) with e = dL/d(model output) captured by a hook on the output,
B_l (K x F) drawn by tests/oracle.py's own Philox from (seed, step 0, index k * F + f) with the
init distribution of tests/spec_options.py (fan_in = K, fan_out = F), and grad_W / grad_b from
the delta that reaches the layer. Nothing of fastfa's is used to build the expected values.
dfa's default init is xavier (as BioTorch's dfa); kaiming and xiao are checked too.
"""

import contextlib
import copy
import math

import pytest
import torch

import fastfa
import oracle
from fastfa import peers
import spec_options
from conftest import assert_close

SEED = 1234


def oracle_feedback(seed, output_width, input_numel, init, dtype):
    """B_l (K x F) in the op-math type of dtype."""
    distribution, scale = spec_options.init_distribution(init, (input_numel, output_width))
    return oracle.draw(seed, 0, (output_width, input_numel), distribution, scale, dtype)


class _Error:
    """e = dL/d(model output), stored by a hook on the oracle model's output."""
    value = None


class _OracleLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, layer, seed, init, error):
        ctx.layer, ctx.seed, ctx.init, ctx.error, ctx.has_bias = layer, seed, init, error, bias is not None
        ctx.input_shape = x.shape
        if isinstance(layer, (torch.nn.Conv1d, torch.nn.Conv2d)):
            padded = _padded(x, layer)
            ctx.save_for_backward(padded, weight)
            conv = torch.nn.functional.conv1d if isinstance(layer, torch.nn.Conv1d) else torch.nn.functional.conv2d
            return conv(padded, weight, bias, layer.stride, 0, layer.dilation, layer.groups)
        ctx.save_for_backward(x, weight)
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, delta):
        x, weight = ctx.saved_tensors
        layer, e = ctx.layer, ctx.error.value
        shape = ctx.input_shape
        per_token = e.dim() == 3 and len(shape) == 3 and shape[:2] == e.shape[:2]
        output_width = e.shape[-1] if per_token else math.prod(e.shape[1:])
        input_numel = shape[-1] if per_token else math.prod(shape[1:])
        b = oracle_feedback(ctx.seed, output_width, input_numel, ctx.init, x.dtype).to(x.device)
        # B_l maps e onto the layer's own input, before any padding.
        grad_x = (e.reshape(-1, output_width).to(b.dtype) @ b).to(x.dtype).reshape(shape)
        if isinstance(layer, (torch.nn.Conv1d, torch.nn.Conv2d)):
            grad_weight = (torch.nn.grad.conv1d_weight if isinstance(layer, torch.nn.Conv1d)
                           else torch.nn.grad.conv2d_weight)
            grad_w = grad_weight(x, weight.shape, delta, layer.stride, 0, layer.dilation, layer.groups)
            grad_b = delta.sum([0, *range(2, delta.dim())])
        else:
            d2, x2 = delta.reshape(-1, weight.shape[0]), x.reshape(-1, weight.shape[1])
            grad_w, grad_b = d2.t() @ x2, d2.sum(0)
        return grad_x, grad_w, grad_b if ctx.has_bias else None, None, None, None, None


def _padded(x, layer):
    """x padded as torch.nn.Conv1d / Conv2d pads it (its padding mode; "same": the extra row / column
    of an even total at the bottom / right), so the oracle's convolution itself has no padding."""
    if layer.padding == "same":
        totals = [d * (k - 1) for d, k in zip(layer.dilation, layer.kernel_size)]
        pads = [(t // 2, t - t // 2) for t in totals]
    elif layer.padding == "valid":
        pads = [(0, 0)] * len(layer.kernel_size)
    else:
        pads = [(p, p) for p in layer.padding]
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    # F.pad takes the last dimension's (before, after) first.
    return torch.nn.functional.pad(x, [p for pair in reversed(pads) for p in pair], mode=mode)


def oracle_model(model, seed, init="xavier"):
    """A copy of the torch model whose Linear / Conv1d / Conv2d layers follow the spec's dfa; the i-th
    layer (module order, as fastfa.convert numbers them) gets seed + i."""
    model = copy.deepcopy(model)
    error = _Error()
    layers = [m for m in model.modules() if type(m) in (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)]
    for i, layer in enumerate(layers):
        layer.forward = (lambda x, layer=layer, s=seed + i:
                         _OracleLayer.apply(x, layer.weight, layer.bias, layer, s, init, error))

    def keep(module, args, output):
        output.register_hook(lambda grad: setattr(error, "value", grad))
    model.register_forward_hook(keep)
    return model, layers


class MLP(torch.nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.fc1 = torch.nn.Linear(12, 16, dtype=dtype)
        self.fc2 = torch.nn.Linear(16, 10, dtype=dtype)
        self.fc3 = torch.nn.Linear(10, 5, dtype=dtype)

    def forward(self, x):
        return self.fc3(torch.tanh(self.fc2(torch.relu(self.fc1(x)))))


class ConvNet(torch.nn.Module):
    """Batch norm, pooling and a residual connection around a converted conv."""

    def __init__(self, dtype):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 4, 3, padding=1, dtype=dtype)
        self.bn1 = torch.nn.BatchNorm2d(4, dtype=dtype)
        self.conv2 = torch.nn.Conv2d(4, 4, 3, padding=1, bias=False, dtype=dtype)
        self.bn2 = torch.nn.BatchNorm2d(4, dtype=dtype)
        self.conv3 = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1, dtype=dtype)
        self.pool = torch.nn.MaxPool2d(2)
        self.fc = torch.nn.Linear(6 * 2 * 2, 5, dtype=dtype)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(h + self.bn2(self.conv2(h)))
        h = self.pool(torch.relu(self.conv3(h)))
        return self.fc(h.flatten(1))


def _grad_inputs(model, layers):
    """Record the gradient reaching each layer's input (each input has one use in these models,
    or, for conv2, the residual's too: both models see the same sum)."""
    captured = {}

    def keep(module, args, index):
        x = args[0]
        if x.requires_grad:
            x.register_hook(lambda grad: captured.__setitem__(index, grad))
    for index, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda m, a, index=index: keep(m, a, index))
    return captured


def _run(model, layers, x, target):
    captured = _grad_inputs(model, layers)
    x = x.clone().requires_grad_(True)
    output = model(x)
    loss = torch.nn.functional.cross_entropy(output.float(), target)
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    return output, x.grad, captured, grads


def _fastfa_layers(model):
    return [m for m in model.modules() if isinstance(m, fastfa.nn.FeedbackLayer)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("network,shape", [(MLP, (6, 12)), (ConvNet, (4, 3, 8, 8))])
def test_every_gradient_matches_the_oracle(network, shape, dtype):
    torch.manual_seed(0)
    model = network(dtype)
    expected_model, expected_layers = oracle_model(model, SEED)
    converted = fastfa.convert(copy.deepcopy(model), "dfa", seed=SEED)
    layers = _fastfa_layers(converted)
    assert len(layers) == len(expected_layers) and all(layer.rule == "dfa" for layer in layers)
    x = torch.randn(shape, dtype=torch.float64).to(dtype)
    target = torch.randint(0, 5, (shape[0],))
    output, grad_x, grad_inputs, grads = _run(converted, layers, x, target)
    expected_output, expected_grad_x, expected_grad_inputs, expected_grads = _run(
        expected_model, expected_layers, x, target)
    assert_close(output, expected_output, dtype, "output")
    assert_close(grad_x, expected_grad_x, dtype, "model input's grad (first layer's e B_1)")
    assert sorted(grad_inputs) == sorted(expected_grad_inputs) == list(range(len(layers)))
    for index in grad_inputs:
        assert_close(grad_inputs[index], expected_grad_inputs[index], dtype, f"layer {index}'s grad_input")
    assert set(grads) == set(expected_grads)
    for name in grads:
        assert_close(grads[name], expected_grads[name], dtype, f"{name}.grad")


def test_feedback_weight_is_the_oracle_draw_and_never_changes():
    torch.manual_seed(0)
    model = fastfa.convert(ConvNet(torch.float64), "dfa", seed=SEED, init="xavier")
    with pytest.raises(RuntimeError, match="known once the converted model has run forward"):
        model.conv2.feedback_weight()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    model(x).sum().backward()
    for index, (name, numel) in enumerate([("conv1", 3 * 8 * 8), ("conv2", 4 * 8 * 8), ("conv3", 4 * 8 * 8),
                                           ("fc", 24)]):
        layer = getattr(model, name)
        b = layer.feedback_weight()
        assert b.shape == (5, numel)
        # The same draws; the scale sqrt(6 / (K + F)) may round differently in its last bit.
        torch.testing.assert_close(b, oracle_feedback(SEED + index, 5, numel, "xavier", torch.float64),
                                   rtol=1e-15, atol=0)
        assert int(layer.feedback_rng[1]) == 0  # B_l is fixed: the step never moves


def test_per_token_outputs():
    """e (N, T, K) and x (N, T, F): grad_x[n, t] = e[n, t] B_l with B_l K x F."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, 9, dtype=torch.float64), torch.nn.GELU(),
                                torch.nn.Linear(9, 4, dtype=torch.float64))
    expected_model, expected_layers = oracle_model(model, SEED, init="kaiming")
    converted = fastfa.convert(copy.deepcopy(model), "dfa", seed=SEED, init="kaiming")
    x = torch.randn(3, 5, 7, dtype=torch.float64)
    grads = []
    for net in (converted, expected_model):
        inputs = x.clone().requires_grad_(True)
        net(inputs).pow(2).sum().backward()
        grads.append([inputs.grad] + [p.grad for p in net.parameters()])
    for actual, expected in zip(*grads):
        assert_close(actual, expected, torch.float64)
    assert converted[0].feedback_weight().shape == (4, 7)


def test_an_output_with_more_axes_is_flattened():
    """A model whose output is (N, C, H, W) (a converted Conv2d alone): e flattened, K = C*H*W."""
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 4, 3, padding=1, dtype=torch.float64)
    expected_model, _ = oracle_model(torch.nn.Sequential(model), SEED)
    converted = fastfa.convert(copy.deepcopy(model), "dfa", seed=SEED)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    inputs = [x.clone().requires_grad_(True) for _ in range(2)]
    for net, inp in zip((converted, expected_model), inputs):
        net(inp).square().sum().backward()
    assert_close(inputs[0].grad, inputs[1].grad, torch.float64, "grad_input")
    assert_close(converted.weight.grad, expected_model[0].weight.grad, torch.float64, "grad_weight")
    assert converted.feedback_weight().shape == (4 * 5 * 5, 3 * 5 * 5)


def test_a_large_projection_is_drawn_block_by_block(monkeypatch):
    """Above BLOCK_ELEMENTS the aten backend draws B_l a block of columns at a time: same result."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1, dtype=torch.float64), torch.nn.Flatten(),
                                torch.nn.Linear(3 * 6 * 6, 7, dtype=torch.float64))
    expected_model, _ = oracle_model(model, SEED, init="xiao")
    converted = fastfa.convert(copy.deepcopy(model), "dfa", seed=SEED, init="xiao")
    monkeypatch.setattr(fastfa.dfa, "BLOCK_ELEMENTS", 7 * 5)  # 5 columns per block, ragged last block
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64)
    for net in (converted, expected_model):
        net.zero_grad()
    inputs = [x.clone().requires_grad_(True) for _ in range(2)]
    converted(inputs[0]).sum().backward()
    expected_model(inputs[1]).sum().backward()
    assert_close(inputs[0].grad, inputs[1].grad, torch.float64, "grad_input")
    for p, q in zip(converted.parameters(), expected_model.parameters()):
        assert_close(p.grad, q.grad, torch.float64)


@pytest.mark.parametrize("options", [dict(stride=2, padding=1, dilation=1, groups=1),
                                     dict(stride=1, padding="same", dilation=2, groups=2),
                                     dict(stride=(2, 1), padding=(0, 2), dilation=1, groups=1,
                                          padding_mode="reflect"),
                                     dict(stride=1, padding=1, dilation=1, groups=4, padding_mode="circular")])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_conv2d_options(options, dtype):
    """Every Conv2d option: grad_W from the delta through the layer's geometry, grad_x = e B_l
    onto the layer's own input (before a padding mode's padding)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, dtype=dtype, **options), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.LazyLinear(3, dtype=dtype))
    model(torch.randn(1, 4, 7, 6, dtype=dtype))  # materialise the lazy layer
    model[3] = torch.nn.Linear(model[3].in_features, 3, dtype=dtype)
    expected_model, _ = oracle_model(model, SEED)
    converted = fastfa.convert(copy.deepcopy(model), "dfa", seed=SEED)
    x = torch.randn(2, 4, 7, 6, dtype=dtype)
    inputs = [x.clone().requires_grad_(True) for _ in range(2)]
    for net, inp in zip((converted, expected_model), inputs):
        net(inp).square().sum().backward()
    assert_close(inputs[0].grad, inputs[1].grad, dtype, "grad_input")
    for (name, p), q in zip(converted.named_parameters(), expected_model.parameters()):
        assert_close(p.grad, q.grad, dtype, name)


@pytest.mark.parametrize("options", [dict(kernel_size=3, stride=2, padding=1),
                                     dict(kernel_size=4, padding="same", dilation=2, groups=2),
                                     dict(kernel_size=5, padding="valid", stride=3),
                                     dict(kernel_size=3, padding=2, padding_mode="reflect", bias=False),
                                     dict(kernel_size=3, padding=1, stride=2, padding_mode="circular")])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_conv1d_against_the_oracle(options, dtype):
    """fastfa.nn.Conv1d with dfa: grad_x = e B_l onto the layer's own (C_in, L) input (before a
    padding mode's padding), grad_W and grad_b from the delta through the layer's geometry."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv1d(4, 4, dtype=dtype, **options), torch.nn.ReLU(),
                                torch.nn.Conv1d(4, 3, 3, padding=1, dtype=dtype), torch.nn.Flatten(),
                                torch.nn.LazyLinear(5, dtype=dtype))
    model(torch.randn(1, 4, 17, dtype=dtype))  # materialise the lazy layer
    model[4] = torch.nn.Linear(model[4].in_features, 5, dtype=dtype)
    expected_model, expected_layers = oracle_model(model, SEED)
    converted = fastfa.convert(copy.deepcopy(model), "dfa", seed=SEED)
    layers = _fastfa_layers(converted)
    assert [type(layer) for layer in layers] == [fastfa.nn.Conv1d, fastfa.nn.Conv1d, fastfa.nn.Linear]
    x = torch.randn(3, 4, 17, dtype=torch.float64).to(dtype)
    target = torch.randint(0, 5, (3,))
    output, grad_x, grad_inputs, grads = _run(converted, layers, x, target)
    expected = _run(expected_model, expected_layers, x, target)
    assert_close(output, expected[0], dtype, "output")
    assert_close(grad_x, expected[1], dtype, "model input's grad (first layer's e B_1)")
    for index in grad_inputs:
        assert_close(grad_inputs[index], expected[2][index], dtype, f"layer {index}'s grad_input")
    for name in grads:
        assert_close(grads[name], expected[3][name], dtype, f"{name}.grad")
    assert converted[0].feedback_weight().shape == (5, 4 * 17)


def test_unbatched_conv1d():
    """A (C_in, L) input: the model's output (K,) and x's (C_in, L) share no batch axis, so dfa
    refuses it with the layout error, as for the other layers; batched it runs."""
    layer = fastfa.convert(torch.nn.Conv1d(2, 3, 3, dtype=torch.float64), "dfa", seed=SEED)
    with pytest.raises(RuntimeError, match="does not match the model's output"):
        layer(torch.randn(2, 9, dtype=torch.float64, requires_grad=True))
    x = torch.randn(4, 2, 9, dtype=torch.float64, requires_grad=True)
    layer(x).square().sum().backward()
    assert x.grad.shape == x.shape and layer.weight.grad is not None


def test_exclude_keeps_layers_on_backprop():
    torch.manual_seed(0)
    model = fastfa.convert(MLP(torch.float64), "dfa", exclude=("fc3",), seed=SEED)
    assert type(model.fc3) is torch.nn.Linear and model.fc1.rule == model.fc2.rule == "dfa"
    x = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    model(x).sum().backward()
    assert model.fc1.weight.grad is not None and x.grad is not None


def test_state_dict_holds_the_seeds_and_reproduces_the_backward():
    torch.manual_seed(0)
    model = fastfa.convert(MLP(torch.float64), "dfa")
    state = model.state_dict()
    assert {key for key in state if "feedback" in key} == {"fc1.feedback_rng", "fc2.feedback_rng", "fc3.feedback_rng"}
    other = fastfa.convert(MLP(torch.float64), "dfa")
    assert int(other.fc1.feedback_rng[0]) != int(model.fc1.feedback_rng[0])
    other.load_state_dict(state)
    x = torch.randn(4, 12, dtype=torch.float64)
    for net in (model, other):
        net(x.clone().requires_grad_(True)).square().sum().backward()
    for p, q in zip(model.parameters(), other.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
    for name in ("fc1", "fc2", "fc3"):
        torch.testing.assert_close(getattr(model, name).feedback_weight(), getattr(other, name).feedback_weight(),
                                   rtol=0, atol=0)


def test_errors_are_clear():
    torch.manual_seed(0)
    layer = fastfa.nn.Linear(3, 2, rule="dfa")
    with pytest.raises(RuntimeError, match="outside a converted model"):
        layer(torch.randn(4, 3))
    with pytest.raises(ValueError, match="dfa"):
        fastfa.functional.linear(torch.randn(4, 3), layer.weight, rule="dfa")
    with pytest.raises(ValueError, match="dfa"):
        fastfa.functional.conv2d(torch.randn(1, 1, 3, 3), torch.randn(1, 1, 2, 2), rule="dfa")

    class TupleOutput(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x), x
    with pytest.raises(TypeError, match="must return a tensor"):
        fastfa.convert(TupleOutput(), "dfa")(torch.randn(4, 3, requires_grad=True))
    with torch.no_grad():  # evaluation: no backward will need e
        fastfa.convert(TupleOutput(), "dfa")(torch.randn(4, 3, requires_grad=True))

    model = fastfa.convert(MLP(torch.float32), "dfa")
    with pytest.raises(RuntimeError, match="outside a converted model"):
        model.fc1(torch.randn(4, 12))  # a submodule called alone has no model output
    x = torch.randn(4, 12, requires_grad=True)
    hidden = {}
    model.fc2.register_forward_hook(lambda m, a, out: hidden.__setitem__("h", out))
    model(x)
    with pytest.raises(RuntimeError, match="not the converted model's output"):
        hidden["h"].sum().backward()  # a backward that skipped the output: no e, never a zero gradient

    with pytest.raises(ValueError, match="option 'scale'"):
        fastfa.nn.Linear(3, 2, rule="dfa", scale="xiao")

    class Pooled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x).mean(0, keepdim=True)  # one output row for the whole batch
    with pytest.raises(RuntimeError, match="does not match the model's output"):
        fastfa.convert(Pooled(), "dfa")(torch.randn(4, 3, requires_grad=True))


def test_inplace_activation_after_a_dfa_layer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.ReLU(inplace=True), torch.nn.Linear(6, 3))
    expected_model, _ = oracle_model(model, SEED)
    converted = fastfa.convert(copy.deepcopy(model), "dfa", seed=SEED)
    x = torch.randn(4, 5)
    converted(x).sum().backward()
    expected_model(x).sum().backward()
    for p, q in zip(converted.parameters(), expected_model.parameters()):
        assert_close(p.grad, q.grad, torch.float32)


_biotorch_usable, _biotorch_reason = peers.biotorch_status()


@pytest.mark.skipif(not _biotorch_usable, reason=f"BioTorch: {_biotorch_reason}")
def test_equals_biotorch_dfa_linear_layers():
    """BioTorch's dfa Linear (0.0.16) with the same W, bias and B (its weight_backward, K x in, is
    our B_l), fed e = dL/d(output) the way its BioModule does, gives the same gradients."""
    import biotorch.layers.dfa as biotorch_dfa

    torch.manual_seed(0)
    model = MLP(torch.float32)
    converted = fastfa.convert(copy.deepcopy(model), "dfa", seed=SEED)
    x, target = torch.randn(8, 12), torch.randint(0, 5, (8,))
    torch.nn.functional.cross_entropy(converted(x), target).backward()

    biotorch_layers = []
    for name in ("fc1", "fc2", "fc3"):
        layer = getattr(converted, name)
        peer = biotorch_dfa.Linear(layer.in_features, layer.out_features, 5, True, layer_config={"type": "dfa"})
        with torch.no_grad():
            peer.weight.copy_(layer.weight)
            peer.bias.copy_(layer.bias)
            peer.weight_backward.copy_(layer.feedback_weight())
        biotorch_layers.append(peer)
    fc1, fc2, fc3 = biotorch_layers
    output = fc3(torch.tanh(fc2(torch.relu(fc1(x)))))
    loss = torch.nn.functional.cross_entropy(output, target)
    (error,) = torch.autograd.grad(loss, output, retain_graph=True)
    for peer in biotorch_layers:
        peer.loss_gradient = error
    loss.backward()
    for name, peer in zip(("fc1", "fc2", "fc3"), biotorch_layers):
        layer = getattr(converted, name)
        torch.testing.assert_close(layer.weight.grad, peer.weight.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.bias.grad, peer.bias.grad, rtol=1e-5, atol=1e-6)


class _RecordBackwardOps(torch.utils._python_dispatch.TorchDispatchMode):
    """The fastfa backward ops a backward calls, with their output_mask."""

    def __init__(self):
        super().__init__()
        self.masks = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.name().startswith("fastfa::") and func.name().endswith("_backward"):
            self.masks.append((func.name(), list(args[-1])))
        return func(*args, **(kwargs or {}))


def test_a_dfa_layer_never_multiplies_its_delta_by_a_matrix():
    """Its backward op is asked for grad_W and grad_b only (output_mask[0] False): grad_input is e B_l."""
    torch.manual_seed(0)
    model = fastfa.convert(ConvNet(torch.float32), "dfa")
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    loss = model(x).sum()
    with _RecordBackwardOps() as recorder:
        loss.backward()
    assert sorted(name for name, _ in recorder.masks) == ["fastfa::conv2d_backward"] * 3 + ["fastfa::linear_backward"]
    assert all(not mask[0] and mask[1] for _, mask in recorder.masks)
    assert x.grad is not None


@pytest.mark.parametrize("distribution", ["uniform", "normal"])
@pytest.mark.parametrize("input_numel", [37, 40])  # ragged, and a multiple of 4 (four draws per Philox call)
def test_triton_draws_equal_atens_element_for_element(input_numel, distribution):
    """With e = I (K x K) the Triton product e B_l is B_l itself, drawn tile by tile inside the kernel."""
    pytest.importorskip("triton")
    from fastfa.triton_kernels.direct_feedback import direct_feedback_product

    output_width, scale = 6, 0.37
    rng = torch.tensor([SEED, 0], dtype=torch.int64)
    kind = 0 if distribution == "uniform" else 1
    drawn = direct_feedback_product(torch.eye(output_width), rng, input_numel, scale, kind, fastfa.dfa.BLOCK_ELEMENTS)
    expected = torch.ops.fastfa.direct_feedback(rng, output_width, input_numel, 0, input_numel, scale, kind,
                                                torch.float32)
    if distribution == "uniform":
        torch.testing.assert_close(drawn, expected, rtol=0, atol=0)
    else:  # log / sin / cos of two math libraries: a few ulps
        torch.testing.assert_close(drawn, expected, rtol=1e-6, atol=1e-6)
    reference = oracle.draw(SEED, 0, (output_width, input_numel), distribution, scale, torch.float32)
    torch.testing.assert_close(drawn, reference, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_backend_matches_the_oracle(dtype):
    pytest.importorskip("triton")
    torch.manual_seed(0)
    model = MLP(dtype)
    expected_model, expected_layers = oracle_model(model, SEED)
    converted = fastfa.convert(copy.deepcopy(model), "dfa", seed=SEED)
    x, target = torch.randn(6, 12).to(dtype), torch.randint(0, 5, (6,))
    fastfa.clear_fallbacks()
    with fastfa.use_backend("triton"):
        output, grad_x, grad_inputs, grads = _run(converted, _fastfa_layers(converted), x, target)
    assert not [f for f in fastfa.last_fallbacks() if "dfa" in f.op]
    # The C++ join, calling fastfa::triton_direct_feedback_product through the dispatcher.
    assert output.grad_fn.name() == "fastfa::DirectFeedbackBackward"
    _, expected_grad_x, expected_grad_inputs, expected_grads = _run(expected_model, expected_layers, x, target)
    assert_close(grad_x, expected_grad_x, dtype, "grad_input")
    for index in expected_grad_inputs:
        assert_close(grad_inputs[index], expected_grad_inputs[index], dtype, f"layer {index}'s grad_input")
    for name in grads:
        assert_close(grads[name], expected_grads[name], dtype, f"{name}.grad")


def test_gradient_alignment_measures_dfa_against_backprop():
    """fastfa.metrics.gradient_alignment per layer: the angle between e B_l and backprop's grad_input
    on the same batch and weights (the first layer's included: each pass starts from a fresh input)."""
    torch.manual_seed(0)
    base = MLP(torch.float64)
    model = fastfa.convert(copy.deepcopy(base), "dfa", seed=SEED)
    x, target = torch.randn(8, 12, dtype=torch.float64), torch.randint(0, 5, (8,))
    angles = fastfa.metrics.gradient_alignment(model, torch.nn.functional.cross_entropy, (x, target))
    captured = []
    for net in (model, base):
        inputs = x.clone().requires_grad_(True)
        torch.nn.functional.cross_entropy(net(inputs), target).backward()
        captured.append(inputs.grad.flatten())
    cosine = torch.nn.functional.cosine_similarity(*captured, dim=0)
    assert set(angles) == {"fc1", "fc2", "fc3"}
    assert angles["fc1"] == pytest.approx(math.degrees(math.acos(float(cosine))), abs=1e-9)
    assert all(0.0 <= angle <= 180.0 for angle in angles.values())


_needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@_needs_cuda
@pytest.mark.parametrize("distribution", [0, 1], ids=["uniform", "normal"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_cuda_draw_equals_the_cpu_draw(distribution, dtype):
    """fastfa::direct_feedback on the GPU (the aten backend's blocks there) is the CPU's B_l,
    block by block: the same keys k * F + f, a ragged block at an odd column offset included."""
    rng = torch.tensor([SEED, 0], dtype=torch.int64)
    for begin, count in ((0, 37), (5, 19), (36, 1)):
        cpu = torch.ops.fastfa.direct_feedback(rng, 6, 37, begin, count, 0.37, distribution, dtype)
        gpu = torch.ops.fastfa.direct_feedback(rng.cuda(), 6, 37, begin, count, 0.37, distribution, dtype)
        if distribution == 0:
            torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=0)
        else:  # log / sin / cos of two math libraries: a few ulps
            torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-6, atol=1e-6)


@_needs_cuda
@pytest.mark.parametrize("shape", [(37, 10, 300), (130, 70, 136), (1, 1000, 4099)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("distribution", [0, 1], ids=["uniform", "normal"])
def test_cuda_backend_product_matches_the_draws(shape, dtype, distribution):
    """fastfa::cuda_direct_feedback_product against e B_l in fp64 with the CPU's B_l (rounded to
    the operand type, as every fused kernel rounds B); fp64 and a normal init take aten's blocks,
    recorded, every other call the fused kernel, which records nothing."""
    rows, width, numel = shape
    torch.manual_seed(0)
    error = torch.randn(rows, width, dtype=torch.float64).to(dtype)
    rng = torch.tensor([SEED, 0], dtype=torch.int64)
    b = torch.ops.fastfa.direct_feedback(rng, width, numel, 0, numel, 0.05, distribution, dtype)
    expected = (error.double() @ b.double()).to(dtype)
    fastfa.clear_fallbacks()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 runs the fused kernel through tf32
    try:
        got = torch.ops.fastfa.cuda_direct_feedback_product(error.cuda(), rng.cuda(), numel, 0.05, distribution,
                                                           fastfa.dfa.BLOCK_ELEMENTS)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    reasons = [f.reason for f in fastfa.last_fallbacks() if f.op == "cuda_dfa_grad_input"]
    if dtype == torch.float64:
        assert reasons and "fp64" in reasons[0]
    elif distribution == 1:
        assert reasons and "normal init" in reasons[0]
    else:
        assert not reasons, reasons
    if dtype == torch.float32:  # tf32 operands (fused, or cuBLAS under allow_tf32): 10-bit mantissas
        scale = float(expected.abs().max())
        torch.testing.assert_close(got.cpu(), expected, rtol=1e-2, atol=1e-2 * scale)
    else:
        assert_close(got.cpu(), expected, dtype, "e B_l")


@_needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_backend_model_matches_the_oracle(dtype):
    """A converted ConvNet on the GPU with the cuda backend: e B_l by the fused kernel, the layers'
    own products by the cuda backend's ops; every gradient equals the oracle's."""
    torch.manual_seed(0)
    model = ConvNet(dtype).cuda()
    expected_model, expected_layers = oracle_model(model, SEED)
    converted = fastfa.convert(copy.deepcopy(model), "dfa", seed=SEED)
    x, target = torch.randn(4, 3, 8, 8, device="cuda").to(dtype), torch.randint(0, 5, (4,), device="cuda")
    fastfa.clear_fallbacks()
    with fastfa.use_backend("cuda"):
        _, grad_x, grad_inputs, grads = _run(converted, _fastfa_layers(converted), x, target)
    assert not [f for f in fastfa.last_fallbacks() if "dfa" in f.op]
    _, expected_grad_x, expected_grad_inputs, expected_grads = _run(expected_model, expected_layers, x, target)
    assert_close(grad_x, expected_grad_x, dtype, "grad_input")
    for index in expected_grad_inputs:
        assert_close(grad_inputs[index], expected_grad_inputs[index], dtype, f"layer {index}'s grad_input")
    for name in grads:
        assert_close(grads[name], expected_grads[name], dtype, f"{name}.grad")


@pytest.mark.parametrize("backend,dtype", [("aten", torch.float32), ("triton", torch.float32),
                                           ("triton", torch.float64)])
def test_cpp_join_equals_the_python_function(monkeypatch, backend, dtype):
    """The C++ join (no Python Function in the backward) gives the Python Function's gradients
    exactly, for a small cached B_l and one drawn by blocks (K x F above CACHE_ELEMENTS), on aten;
    on triton (its product called through the dispatcher; fp64 falls back to aten's, recorded)."""
    from fastfa import dfa
    if backend == "triton":
        pytest.importorskip("triton")
    width = 300 if backend == "aten" else 24  # the interpreter's kernels: small

    def gradients():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, width), torch.nn.ReLU(inplace=True),
                                    torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, width))
        model = fastfa.convert(model.to(dtype), "dfa", seed=3)
        x = torch.randn(4, 8, dtype=dtype, requires_grad=True)
        fastfa.clear_fallbacks()
        with fastfa.use_backend(backend):
            for _ in range(2):  # the checked first call, then the resolved one
                model.zero_grad(set_to_none=True)
                x.grad = None
                output = model(x)
                output.pow(2).sum().backward()
        fallbacks = [f.op for f in fastfa.last_fallbacks() if "dfa" in f.op]
        return output.grad_fn.name(), fallbacks, [p.grad for p in model.parameters()] + [x.grad]

    if backend == "aten":
        assert width * width > dfa.CACHE_ELEMENTS
    node, fallbacks, native = gradients()
    assert node == "fastfa::DirectFeedbackBackward"
    assert fallbacks == (["triton_dfa_grad_input"] if backend == "triton" and dtype == torch.float64 else [])
    monkeypatch.setattr(dfa, "_joins_in_cpp", lambda input, output: False)
    node, _, python = gradients()
    assert node == "_DirectFeedbackBackward"
    for got, expected in zip(native, python):
        assert torch.equal(got, expected)


def test_cpp_join_under_a_torch_function_mode():
    """Under a torch function mode (torch.device(...) is one) the join is the C++ node too, seen by
    the mode as one call, and the gradients are those without the mode."""
    from fastfa import dfa

    class Recorder(torch.overrides.TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.functions = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.functions.append(func)
            return func(*args, **(kwargs or {}))

    def gradients(mode):
        torch.manual_seed(0)
        model = fastfa.convert(ConvNet(torch.float32), "dfa", seed=SEED)
        x = torch.randn(2, 3, 8, 8, requires_grad=True)
        with mode:
            output = model(x)
            output.sum().backward()
        return output.grad_fn.name(), [p.grad for p in model.parameters()] + [x.grad]

    expected_node, expected = gradients(contextlib.nullcontext())
    recorder = Recorder()
    node, got = gradients(recorder)
    assert node == expected_node == "fastfa::DirectFeedbackBackward"
    assert recorder.functions.count(dfa._native_join) == 4  # one per converted layer
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


def test_triton_product_op():
    """fastfa::triton_direct_feedback_product (what the C++ join calls on triton): opcheck, and
    the product's argument errors before any kernel runs."""
    pytest.importorskip("triton")
    from fastfa.triton_kernels import direct_feedback  # noqa: F401  (registers the op)
    op = torch.ops.fastfa.triton_direct_feedback_product.default
    rng = torch.tensor([SEED, 0], dtype=torch.int64)
    # As test_triton_linear's opcheck: an interpreted kernel cannot be traced (no aot_dispatch tests).
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(op, (torch.randn(5, 6), rng, 37, 0.3, 0, fastfa.dfa.BLOCK_ELEMENTS), test_utils=utils)
    with pytest.raises(RuntimeError, match="error must be e as a"):
        op(torch.randn(5, 6, 1), rng, 37, 0.3, 0, fastfa.dfa.BLOCK_ELEMENTS)
    with pytest.raises(RuntimeError, match="block_elements must be positive"):
        op(torch.randn(5, 6), rng, 37, 0.3, 0, 0)
