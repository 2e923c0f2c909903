"""fastfa.convert on transformers and on models with modules it does not know; fastfa.coverage."""

import warnings

import pytest
import torch

import fastfa
from fastfa.coverage import BACKPROP, CONVERTED, NO_WEIGHT_TRANSPORT, PARAMETER_FREE


def _converts_silently(model, rule="usf", **options):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fastfa.convert(model, rule, **options)


def _status(table):
    return {row.name: row.status for row in table}


def test_transformer_encoder_converts_whole_and_silently():
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    model = _converts_silently(torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False))
    for block in model.layers:
        assert type(block.self_attn) is fastfa.nn.MultiheadAttention
        assert type(block.linear1) is fastfa.nn.Linear and type(block.linear2) is fastfa.nn.Linear
    table = fastfa.coverage(model)
    status = _status(table)
    assert status["layers.0.self_attn"] == CONVERTED
    assert status["layers.0.self_attn.in_proj"] == CONVERTED
    assert status["layers.1.linear2"] == CONVERTED
    assert status["layers.0.norm1"] == NO_WEIGHT_TRANSPORT
    assert status["layers.0.dropout"] == PARAMETER_FREE
    assert table.backprop == []
    assert {row.rule for row in table if row.status == CONVERTED} == {"usf"}


def test_nn_transformer_converts_whole():
    model = _converts_silently(torch.nn.Transformer(16, 2, 1, 1, 32, batch_first=True), "frsf", seed=3)
    kinds = {type(m) for m in model.modules()}
    assert torch.nn.Linear not in kinds and torch.nn.MultiheadAttention not in kinds
    assert fastfa.coverage(model).backprop == []
    # one seed per feedback state, none shared: s, s + 1, ... across the model
    seeds = [int(m.feedback_rng[0]) for m in model.modules() if getattr(m, "feedback_rng", None) is not None]
    feedback = [m.feedback for m in model.modules() if isinstance(m, fastfa.nn.FeedbackLayer)]
    assert seeds == [] and len(feedback) == 4 + 6  # encoder: in_proj, out_proj, 2 Linear; decoder: 2 attentions
    firsts = {tuple(b.flatten()[:4].tolist()) for b in feedback}
    assert len(firsts) == len(feedback)


class _Custom(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.kernel = torch.nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        return torch.nn.functional.linear(x, self.kernel)


class _MyLinear(torch.nn.Linear):
    pass


class _Mixed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.custom = _Custom()
        self.bilinear = torch.nn.Bilinear(4, 4, 4)
        self.mine = _MyLinear(4, 4)
        self.norm = torch.nn.LayerNorm(4)
        self.fc = torch.nn.Linear(4, 3)
        self.head = torch.nn.Linear(3, 2)
        self.conv = torch.nn.Conv1d(4, 4, 1)

    def forward(self, tokens):
        x = self.embed(tokens)
        x = self.norm(self.mine(self.bilinear(self.custom(x), x)))
        x = self.conv(x.transpose(1, 2)).transpose(1, 2)
        return self.head(self.fc(x))


def test_unknown_weighted_modules_warn_once_by_name():
    model = _Mixed()
    with pytest.warns(UserWarning) as caught:
        fastfa.convert(model, "usf", exclude=("head",))
    mine = [w for w in caught if "fastfa.convert left" in str(w.message)]
    assert len(mine) == 1
    message = str(mine[0].message)
    for name in ("custom.kernel", "bilinear.weight", "bilinear.bias", "mine.weight", "mine.bias"):
        assert name in message
    for name in ("embed", "norm", "fc", "head", "conv"):  # known, or excluded on purpose
        assert f"{name}." not in message
    assert mine[0].filename == __file__  # points at the caller's line
    assert type(model.conv) is fastfa.nn.Conv1d and type(model.fc) is fastfa.nn.Linear
    table = fastfa.coverage(model)
    status = _status(table)
    assert status == {"embed": NO_WEIGHT_TRANSPORT, "custom": BACKPROP, "bilinear": BACKPROP, "mine": BACKPROP,
                      "norm": NO_WEIGHT_TRANSPORT, "fc": CONVERTED, "head": BACKPROP, "conv": CONVERTED}
    reasons = {row.name: row.reason for row in table}
    assert "does not know" in reasons["custom"] and "not converted" in reasons["head"]
    assert table.backprop == ["custom.kernel", "bilinear.weight", "bilinear.bias", "mine.weight", "mine.bias",
                              "head.weight", "head.bias"]
    text = str(table)
    assert text.splitlines()[0].split()[:4] == ["module", "type", "status", "rule"]
    assert "torch.nn.modules.linear.Bilinear" in text and "usf" in text
    model(torch.randint(0, 10, (2, 5))).sum().backward()  # the half-converted model still runs


def test_excluded_attention_is_backprop_and_not_warned():
    model = torch.nn.TransformerEncoderLayer(8, 2, 16)
    _converts_silently(model, "fa", exclude=("self_attn",))
    status = _status(fastfa.coverage(model))
    assert status["self_attn"] == BACKPROP and status["self_attn.out_proj"] == BACKPROP
    assert status["linear1"] == CONVERTED


def test_converted_conv1d_and_attention_keep_parameters():
    attention = torch.nn.MultiheadAttention(8, 2, kdim=5, vdim=6, add_bias_kv=True, batch_first=True)
    model = torch.nn.ModuleDict({"attn": attention, "conv": torch.nn.Conv1d(3, 4, 3, padding="same",
                                                                            padding_mode="circular")})
    parameters = dict(model.named_parameters())
    _converts_silently(model, "usf")
    assert type(model["attn"]) is fastfa.nn.MultiheadAttention and type(model["conv"]) is fastfa.nn.Conv1d
    assert dict(model.named_parameters()).keys() == parameters.keys()
    for name, parameter in model.named_parameters():
        assert parameter is parameters[name], name  # an optimizer built before convert keeps working
    assert model["attn"].batch_first and model["attn"].kdim == 5 and model["attn"].bias_k is not None
    assert model["conv"].padding == "same" and model["conv"].padding_mode == "circular"


def test_coverage_refuses_a_non_module():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        fastfa.coverage([torch.nn.Linear(2, 2)])
