"""The bench's peers compute the rules they claim: gradients against tests/oracle.py.

The peers (fastfa.peers) are what `fastfa bench` times fastfa against, so a wrong peer would
make a wrong claim: each is checked here on small ragged shapes in float64.
"""

import pytest
import torch

import fastfa
import oracle
import spec_options
from fastfa import peers
from test_estimated import expected_feedback_grad

F64 = torch.float64


def _layers(rule):
    """(fastfa layer, input shape): a Linear over a 3-D input and a strided, grouped Conv2d, in the spec's
    configuration (aa's and ia's layer default off: the peers compute the closed forms)."""
    paper = spec_options.paper(rule)
    return [(fastfa.nn.Linear(7, 5, rule=rule, dtype=F64, **paper), (2, 3, 7)),
            (fastfa.nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, rule=rule, dtype=F64, **paper), (3, 4, 9, 8))]


def _oracle(layer, x, B, grad_output):
    if isinstance(layer, torch.nn.Conv2d):
        return oracle.conv2d(x, layer.weight.detach(), layer.bias.detach(), B, grad_output, layer.stride,
                             layer.padding, layer.dilation, layer.groups)
    return oracle.linear(x, layer.weight.detach(), layer.bias.detach(), B, grad_output)


def _step(module, x, grad_output, seed):
    """One forward + backward from a known generator state; returns (y, grad_x)."""
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    y = module(x)
    y.backward(grad_output)
    return y.detach(), x.grad


def _peer_B(layer, peer, x_shape, seed):
    """The B the peer's step with this seed uses, from the spec with the layers' default options
    (brsf: the same torch draw)."""
    W = peer.weight.detach()
    if layer.rule == "usf":
        return spec_options.resolve("usf", tuple(W.shape)).feedback_matrix(W)
    if layer.rule == "brsf":
        torch.manual_seed(seed)
        distribution, scale = spec_options.init_distribution(None, tuple(W.shape))
        draw = torch.empty_like(W)
        draw = draw.normal_(0, scale) if distribution == "normal" else draw.uniform_(-scale, scale)
        return oracle.feedback_matrix("frsf", W, feedback=draw)
    if layer.rule in ("fa", "frsf") or layer.rule in oracle.ESTIMATED:
        return oracle.feedback_matrix(layer.rule, W, feedback=layer.feedback.detach())
    return oracle.feedback_matrix("bp", W)


# Under torch.compile: one fixed rule, the per-step draw and two estimated rules (each compile
# costs seconds on CPU).
@pytest.mark.parametrize("rule,compiled", [(rule, False) for rule in fastfa.rules.LAYER_RULES]
                         + [(rule, True) for rule in ("usf", "brsf", "kp", "ia")])
def test_peer_gradients_match_oracle(rule, compiled):
    torch.manual_seed(0)
    for layer, shape in _layers(rule):
        peer = peers.peer_of(layer)
        module = peers.compile_peer(peer, torch.device("cpu")) if compiled else peer
        x = torch.randn(shape, dtype=F64)
        with torch.no_grad():
            grad_output = torch.randn_like(layer(x))
        # Inductor draws with its own generator; fallback_random makes it use eager's, so
        # that the brsf draw can be reproduced here.
        with torch._inductor.config.patch(fallback_random=True):
            y, grad_x = _step(module, x, grad_output, seed=11)
        B = _peer_B(layer, peer, shape, seed=11)
        y_ref, grad_x_ref, grad_w_ref, grad_b_ref = _oracle(peer, x, B, grad_output)
        torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(grad_x, grad_x_ref, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(peer.weight.grad, grad_w_ref, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(peer.bias.grad, grad_b_ref, atol=1e-12, rtol=1e-12)
        if rule in oracle.ESTIMATED:
            alignment, noise = spec_options.alignment(rule), None
            if rule == "wm":   # the peer draws xi ~ N(0, sigma^2) like x, from torch's generator
                torch.manual_seed(11)
                noise = torch.randn_like(x) * alignment[3]
            expected = expected_feedback_grad(rule, peer, x, peer.weight.grad, alignment, noise)
            torch.testing.assert_close(peer.feedback.grad, expected, atol=1e-12, rtol=1e-12)
        else:
            assert peer.feedback is None or peer.feedback.grad is None


def test_peer_holds_the_fastfa_layers_state():
    torch.manual_seed(1)
    layer = fastfa.nn.Conv2d(3, 4, 3, rule="frsf", dtype=F64)
    peer = peers.peer_of(layer)
    assert torch.equal(peer.weight, layer.weight) and torch.equal(peer.bias, layer.bias)
    assert torch.equal(peer.feedback, layer.feedback)
    # Same B as the fastfa layer's next backward.
    torch.testing.assert_close(peer._feedback(), layer.feedback_weight())


def test_convert_to_peers_swaps_every_layer():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 5))
    peers.convert_to_peers(fastfa.convert(model, "usf"))
    assert isinstance(model[0], peers.PeerConv2d) and isinstance(model[3], peers.PeerLinear)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    assert model[0].weight.grad is not None


def test_peer_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="activation"):
        peers.peer_of(fastfa.nn.Linear(3, 2, rule="usf", activation="relu"))
    with pytest.raises(TypeError, match="fastfa.nn.Linear or Conv2d"):
        peers.peer_of(torch.nn.Linear(3, 2))


_biotorch_usable, _biotorch_reason = peers.biotorch_status()


@pytest.mark.skipif(not _biotorch_usable, reason=f"BioTorch: {_biotorch_reason}")
@pytest.mark.parametrize("rule", peers.biotorch_rules())
def test_biotorch_peer_gradients_match_oracle(rule):
    torch.manual_seed(2)
    # BioTorch's Linear takes 2-D inputs only.
    for layer, shape in [(fastfa.nn.Linear(7, 5, rule=rule, dtype=F64), (6, 7)),
                         (fastfa.nn.Conv2d(4, 6, 3, stride=2, padding=1, rule=rule, dtype=F64), (3, 4, 9, 8))]:
        peer = peers.biotorch_of(layer)
        x = torch.randn(shape, dtype=F64)
        with torch.no_grad():
            grad_output = torch.randn_like(layer(x))
        y, grad_x = _step(peer, x, grad_output, seed=3)
        W = peer.weight.detach()
        if rule in ("usf", "brsf"):    # BioTorch keeps the step's B in weight_backward
            B = peer.weight_backward.detach().to(F64)
            assert torch.equal(torch.sign(B), torch.sign(W))
            if rule == "usf":
                torch.testing.assert_close(B, spec_options.resolve("usf", tuple(W.shape)).feedback_matrix(W))
        else:
            B = oracle.feedback_matrix(rule, W, feedback=layer.feedback.detach())
        y_ref, grad_x_ref, grad_w_ref, grad_b_ref = _oracle(peer, x, B, grad_output)
        torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(grad_x, grad_x_ref, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(peer.weight.grad, grad_w_ref, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(peer.bias.grad, grad_b_ref, atol=1e-12, rtol=1e-12)
