"""fastfa.nn.MultiheadAttention: bp equals torch's for every option; every rule against the oracle
(grad_x through B for each projection) on converted TransformerEncoder / Decoder layers."""

import copy
import types
import warnings

import pytest
import torch

import fastfa
import oracle
import spec_options
from test_estimated import _options as alignment_options
from test_estimated import expected_feedback_grad

F64 = torch.float64
TOL = dict(atol=1e-10, rtol=1e-10)
E, HEADS, L, S, N = 8, 2, 5, 4, 3

# (constructor options, forward options, inputs: "self" q is k is v, "kv" k is v, "distinct")
CASES = {
    "self": ({}, {}, "self"),
    "self-batch-first": (dict(batch_first=True), {}, "self"),
    "cross": ({}, {}, "kv"),
    "distinct": ({}, {}, "distinct"),
    "kdim-vdim": (dict(kdim=6, vdim=7), {}, "distinct"),
    "kdim-vdim-batch-first": (dict(kdim=6, vdim=7, batch_first=True), dict(need_weights=False), "distinct"),
    "no-bias": (dict(bias=False), {}, "self"),
    "bias-kv-zero-attn": (dict(add_bias_kv=True, add_zero_attn=True), {}, "kv"),
    "bias-kv-masks": (dict(add_bias_kv=True, add_zero_attn=True), dict(mask="bool", padding="bool"), "kv"),
    "padding-bool": ({}, dict(padding="bool"), "self"),
    "padding-float-sdpa": ({}, dict(padding="float", need_weights=False), "kv"),
    "attn-mask-2d": ({}, dict(mask="bool"), "kv"),
    "attn-mask-3d-float": ({}, dict(mask="float3d"), "distinct"),
    "attn-mask-3d-sdpa": ({}, dict(mask="float3d", need_weights=False), "distinct"),
    "causal-sdpa": (dict(batch_first=True), dict(mask="causal", is_causal=True, need_weights=False), "self"),
    "causal-weights": ({}, dict(mask="causal", is_causal=True), "self"),
    "causal-padding": ({}, dict(mask="causal", is_causal=True, padding="bool", need_weights=False), "self"),
    "per-head-weights": ({}, dict(average_attn_weights=False), "kv"),
    "dropout-weights": (dict(dropout=0.3), {}, "self"),
    "dropout-sdpa": (dict(dropout=0.3), dict(need_weights=False), "kv"),
    "unbatched": ({}, {}, "kv"),
    "unbatched-kdim-masks": (dict(kdim=6, vdim=7), dict(mask="bool", padding="bool"), "distinct"),
}


def _inputs(case, constructor, generator):
    batch_first = constructor.get("batch_first", False)
    unbatched = case.startswith("unbatched")
    kdim, vdim = constructor.get("kdim", E), constructor.get("vdim", E)
    target_len = S if CASES[case][2] == "self" else L

    def draw(length, width):
        shape = (length, width) if unbatched else ((N, length, width) if batch_first else (length, N, width))
        return torch.randn(shape, dtype=F64, generator=generator)

    query = draw(target_len, E)
    kind = CASES[case][2]
    if kind == "self":
        return query, query, query
    key = draw(S, kdim)
    return query, key, (key if kind == "kv" else draw(S, vdim))


def _forward_options(case, generator):
    options = dict(CASES[case][1])
    target_len = S if CASES[case][2] == "self" else L
    unbatched = case.startswith("unbatched")
    mask = options.pop("mask", None)
    if mask == "bool":
        mask = torch.rand(target_len, S, generator=generator) < 0.3
        mask[:, 0] = False  # no row of the softmax all -inf (key 1 may be padding)
        options["attn_mask"] = mask
    elif mask == "float3d":
        options["attn_mask"] = torch.randn(N * HEADS, target_len, S, dtype=F64, generator=generator)
    elif mask == "causal":
        options["attn_mask"] = torch.ones(S, S, dtype=torch.bool).triu(1)
    padding = options.pop("padding", None)
    if padding is not None:
        keep = torch.ones((S,) if unbatched else (N, S), dtype=torch.bool)
        keep[..., 1] = False  # every row keeps some keys, so no softmax row is all -inf
        options["key_padding_mask"] = ~keep if padding == "bool" else torch.where(keep, 0.0, -1e4).to(F64)
    return options


def _randomized(module, generator):
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, dtype=parameter.dtype, generator=generator) * 0.5)
    return module


def _run(module, inputs, options, seed=0):
    """Output, attention weights, and the gradients of the distinct inputs and of every parameter."""
    leaves = list({id(x): x for x in inputs}.values())
    leaves = {id(x): x.detach().clone().requires_grad_(True) for x in leaves}
    args = [leaves[id(x)] for x in inputs]
    torch.manual_seed(seed)  # the same dropout masks for both modules
    output, weights = module(*args, **options)
    generator = torch.Generator().manual_seed(99)
    loss = (output * torch.randn(output.shape, dtype=F64, generator=generator)).sum()
    if weights is not None:
        loss = loss + (weights * torch.randn(weights.shape, dtype=F64, generator=generator)).sum()
    names, parameters = zip(*module.named_parameters())
    grads = torch.autograd.grad(loss, [*leaves.values(), *parameters])
    return output, weights, dict(zip([f"input{i}" for i in range(len(leaves))] + list(names), grads))


@pytest.mark.parametrize("case", list(CASES))
def test_bp_equals_torch_multihead_attention(case):
    constructor, _, _ = CASES[case]
    generator = torch.Generator().manual_seed(1)
    reference = _randomized(torch.nn.MultiheadAttention(E, HEADS, dtype=F64, **constructor), generator)
    layer = fastfa.nn.MultiheadAttention(E, HEADS, dtype=F64, rule="bp", **constructor)
    layer.load_state_dict(reference.state_dict())  # strict: torch's keys, and bp adds none
    assert layer.state_dict().keys() == reference.state_dict().keys()
    inputs = _inputs(case, constructor, generator)
    options = _forward_options(case, generator)
    for training in (True, False):
        layer.train(training), reference.train(training)
        output, weights, grads = _run(layer, inputs, options)
        expected_output, expected_weights, expected_grads = _run(reference, inputs, options)
        torch.testing.assert_close(output, expected_output, **TOL)
        if options.get("need_weights", True):
            torch.testing.assert_close(weights, expected_weights, **TOL)
        else:
            assert weights is None and expected_weights is None
        assert grads.keys() == expected_grads.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], expected_grads[name], **TOL, msg=name)


class _OracleLinear(torch.autograd.Function):
    """F.linear whose backward is the oracle's: grad_x = delta B, grad_W = delta^T x, grad_b = sum of delta."""

    @staticmethod
    def forward(ctx, x, weight, bias, B):
        ctx.save_for_backward(x, weight, bias if bias is not None else torch.empty(0), B)
        ctx.has_bias = bias is not None
        return torch._C._nn.linear(x, weight, bias)  # not the name _Oracle routes here

    @staticmethod
    def backward(ctx, grad_output):
        x, weight, bias, B = ctx.saved_tensors
        _, grad_x, grad_w, grad_b = oracle.linear(x, weight, bias if ctx.has_bias else None, B, grad_output)
        return grad_x, grad_w, grad_b if ctx.has_bias else None, None


def _key(weight):
    return weight.untyped_storage().data_ptr(), weight.storage_offset(), tuple(weight.shape)


class _Oracle:
    """Within ``with``: torch.nn.functional.linear (which torch's Linear, MultiheadAttention and its
    in-projections call by that name) on known weights (whole, or a slice, by storage) runs
    _OracleLinear with that weight's B; each call's input is recorded."""

    def __init__(self, feedback: dict):
        self.feedback, self.inputs = feedback, {}

    def linear(self, x, weight, bias=None):
        key = _key(weight)
        if key not in self.feedback:
            return self.original(x, weight, bias)
        self.inputs[key] = x.detach()
        return _OracleLinear.apply(x, weight, bias, self.feedback[key])

    def __enter__(self):
        self.original = torch.nn.functional.linear
        torch.nn.functional.linear = self.linear
        return self

    def __exit__(self, *exc):
        torch.nn.functional.linear = self.original


def _slices(module):
    """(projection, rows, stream index, stream count) of every op the converted module runs, as
    fastfa.nn.MultiheadAttention slices its packed in_proj for the inputs a layer gives it."""
    found = []
    for name, layer in module.named_modules():
        if isinstance(layer, fastfa.nn.MultiheadAttention):
            for projection in layer.projections().values():
                if projection is layer.out_proj or not layer._qkv_same_embed_dim:
                    found.append((projection, slice(None), 0, 1))
                elif name.endswith("multihead_attn"):  # a decoder's cross-attention: k is v (memory)
                    found += [(projection, slice(0, E), 0, 2), (projection, slice(E, None), 1, 2)]
                else:
                    found.append((projection, slice(None), 0, 1))
        elif type(layer) is fastfa.nn.Linear and not name.endswith("out_proj"):
            found.append((layer, slice(None), 0, 1))
    return found


def _expected_feedback(rule, projection, rows, index, count, options):
    """B of one op from the spec: the stored R / learned B's rows, or brsf's draw from the stream
    [seed, step * count + index] on the rows' shape."""
    resolved = spec_options.resolve(rule, tuple(projection.weight.shape), **options)
    weight = projection.weight.detach()[rows]
    if rule == "brsf":
        seed, step = (int(v) for v in projection.feedback_rng)
        return oracle.feedback_matrix(rule, weight, seed=seed, step=step * count + index, scale=resolved.scale,
                                      distribution=resolved.distribution)
    feedback = None if projection.feedback is None else projection.feedback.detach()[rows]
    return resolved.feedback_matrix(weight, feedback=feedback)


def _check_against_oracle(rule, converted, reference, inputs):
    options = alignment_options(rule)
    ops = _slices(converted)
    assert ops, "nothing converted"
    rngs = {id(p): None if p.feedback_rng is None else p.feedback_rng.clone() for p, *_ in ops}
    feedback, keys = {}, []
    reference_weights = dict(reference.named_parameters())
    converted_names = {id(p): n for n, p in converted.named_parameters()}
    for projection, rows, index, count in ops:
        B = _expected_feedback(rule, projection, rows, index, count, options)
        weight_name = converted_names[id(projection.weight)]
        key = _key(reference_weights[weight_name][rows])
        feedback[key] = B
        keys.append(key)
    mode = _Oracle(feedback)
    with mode:
        expected = _run(reference, inputs, {})
    got = _run(converted, inputs, {})
    assert set(mode.inputs) == set(keys), "the reference ran other projections than the converted layer"
    torch.testing.assert_close(got[0], expected[0], **TOL)
    for name, grad in expected[2].items():
        torch.testing.assert_close(got[2][name], grad, **TOL, msg=name)
    if rule not in oracle.ESTIMATED:
        return
    # B's own gradient: the spec's alignment terms for each op, on its rows of W and B.
    alignment = spec_options.alignment(rule, **options)
    for (projection, rows, index, count), key in zip(ops, keys):
        x = mode.inputs[key]
        noise = None
        if rule == "wm":
            seed, step = (int(v) for v in rngs[id(projection)])
            noise = oracle.draw(seed, step * count + index, x.shape, "normal", alignment[3], x.dtype)
        part = types.SimpleNamespace(weight=projection.weight[rows], feedback=projection.feedback[rows])
        grad_weight = got[2][converted_names[id(projection.weight)]][rows]
        expected_b = expected_feedback_grad(rule, part, x, grad_weight, alignment, noise)
        tolerance = dict(atol=1e-5, rtol=1e-5) if rule == "wm" else TOL  # float32 noise, libm's log / cos
        torch.testing.assert_close(got[2][converted_names[id(projection.feedback)]][rows], expected_b,
                                   **tolerance)


@pytest.mark.parametrize("rule", fastfa.rules.LAYER_RULES)
def test_converted_encoder_layer_against_the_oracle(rule):
    torch.manual_seed(0)
    reference = torch.nn.TransformerEncoderLayer(E, HEADS, 16, dropout=0.0, batch_first=True, dtype=F64)
    # The spec's table (aa's and ia's layer default off): the oracle's closed forms.
    converted = fastfa.convert(copy.deepcopy(reference), rule, seed=11, **alignment_options(rule),
                               **spec_options.paper(rule))
    assert type(converted.self_attn) is fastfa.nn.MultiheadAttention
    assert type(converted.linear1) is fastfa.nn.Linear
    x = torch.randn(N, L, E, dtype=F64)
    _check_against_oracle(rule, _WithGrad(converted), _WithGrad(reference), (x,))


@pytest.mark.parametrize("rule", fastfa.rules.LAYER_RULES)
def test_converted_decoder_layer_against_the_oracle(rule):
    """The decoder's cross-attention runs the packed in_proj as two ops (q from tgt, k and v from memory)."""
    torch.manual_seed(0)
    reference = torch.nn.TransformerDecoderLayer(E, HEADS, 16, dropout=0.0, dtype=F64)
    # The spec's table (aa's and ia's layer default off): the oracle's closed forms.
    converted = fastfa.convert(copy.deepcopy(reference), rule, seed=11, **alignment_options(rule),
                               **spec_options.paper(rule))
    tgt, memory = torch.randn(L, N, E, dtype=F64), torch.randn(S, N, E, dtype=F64)
    _check_against_oracle(rule, _WithGrad(converted), _WithGrad(reference), (tgt, memory))


class _WithGrad(torch.nn.Module):
    """A layer whose forward returns (output, None), as _run expects of an attention layer."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, *inputs):
        return self.inner(*inputs), None


@pytest.mark.parametrize("rule", ["fa", "brsf", "kp", "wm"])
def test_each_projection_keeps_its_state_through_state_dict(rule):
    layer = fastfa.nn.MultiheadAttention(E, HEADS, kdim=6, vdim=7, dtype=F64, rule=rule, seed=4)
    keys = set(layer.state_dict())
    torch_keys = set(torch.nn.MultiheadAttention(E, HEADS, kdim=6, vdim=7).state_dict())
    assert torch_keys <= keys
    own = {f"{name}.{state}" for name in ("q_proj", "k_proj", "v_proj", "out_proj")
           for state in ("feedback", "feedback_rng") if getattr(getattr(layer, name), state) is not None}
    assert keys - torch_keys == own and own
    seeds = {int(p.feedback_rng[0]) for p in layer.projections().values() if p.feedback_rng is not None}
    assert seeds in (set(), {4, 5, 6, 7})
    inputs = (torch.randn(L, N, E, dtype=F64), torch.randn(S, N, 6, dtype=F64), torch.randn(S, N, 7, dtype=F64))
    _run(layer, inputs, {})
    twin = fastfa.nn.MultiheadAttention(E, HEADS, kdim=6, vdim=7, dtype=F64, rule=rule, seed=99)
    twin.load_state_dict(layer.state_dict())
    for name, projection in layer.projections().items():
        other = twin.projections()[name]
        if projection.feedback_rng is not None:
            assert int(projection.feedback_rng[1]) == 1  # one step taken
            assert torch.equal(other.feedback_rng, projection.feedback_rng)
        if projection.feedback is not None:
            assert torch.equal(other.feedback, projection.feedback)
    _, _, grads = _run(layer, inputs, {})
    _, _, twin_grads = _run(twin, inputs, {})
    for name in grads:
        torch.testing.assert_close(twin_grads[name], grads[name], atol=0, rtol=0, msg=name)


def test_projections_draw_from_their_own_seeds():
    layer = fastfa.nn.MultiheadAttention(E, HEADS, dtype=F64, rule="frsf")
    assert not torch.equal(layer.in_proj.feedback[:E, :E].abs(), layer.out_proj.feedback.abs())
    assert layer.in_proj.feedback.shape == layer.in_proj_weight.shape


def test_projections_are_feedback_layers():
    layer = fastfa.nn.MultiheadAttention(E, HEADS, rule="usf")
    names = [n for n, m in layer.named_modules() if isinstance(m, fastfa.nn.FeedbackLayer)]
    assert sorted(names) == ["in_proj", "out_proj"]
    assert 0 < layer.in_proj.alignment() < 90  # the angle between s * sign(W) and W
    assert "in_proj_weight (24, 8), rule=usf" in repr(layer)


def test_deepcopy_keeps_each_copy_on_its_own_weights():
    layer = fastfa.nn.MultiheadAttention(E, HEADS, rule="usf")
    twin = copy.deepcopy(layer)
    assert twin.in_proj.weight is twin.in_proj_weight
    assert twin.in_proj.weight is not layer.in_proj_weight


@pytest.mark.parametrize("rule", ["usf", "kp"])
def test_digits_vit_converts_whole_and_trains(rule):
    from fastfa.training.models import build

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = build("vit", rule, channels=1, image_size=8, num_classes=10)
    table = fastfa.coverage(model)
    assert table.backprop == []
    assert {row.name for row in table if row.status == "no weight transport"} >= {"position", "norm"}
    torch.manual_seed(0)
    images, labels = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    with pytest.raises(ValueError, match="image size must be even"):
        build("vit", rule, channels=1, image_size=7, num_classes=10)


@pytest.mark.slow
def test_converted_encoder_layer_compiles_whole():
    """torch.compile(fullgraph=True) of a converted encoder layer: brsf's counters move on as in eager
    mode, and grad_input equals the eager twin's at every step."""
    def make():
        layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        return fastfa.convert(layer, "brsf", seed=1)

    layer, twin = make(), make()
    twin.load_state_dict(layer.state_dict())
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(2, 5, 16)
    for step in range(1, 3):
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        compiled(xa).sum().backward()
        twin(xb).sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad, atol=1e-5, rtol=1e-5)
        assert int(layer.self_attn.in_proj.feedback_rng[1]) == int(twin.self_attn.in_proj.feedback_rng[1]) == step


def test_dfa_is_refused_by_attention_with_a_clear_error():
    """Attention's projections have no e B_l path: a clear error, never bp run silently as dfa."""
    with pytest.raises(ValueError, match="MultiheadAttention: rule 'dfa' is available for fastfa.nn.Linear, Conv1d and Conv2d only"):
        fastfa.nn.MultiheadAttention(E, HEADS, rule="dfa")
    with pytest.raises(ValueError, match="exclude="):
        fastfa.convert(torch.nn.TransformerEncoderLayer(E, HEADS, 16, batch_first=True), "dfa")
