"""Bad input is an error naming the argument and what was expected, before any kernel runs."""

import pytest
import torch

import fastfa


def test_wrong_rule_names_the_choices():
    with pytest.raises(ValueError, match=r"rule must be one of bp, fa, usf, brsf, frsf.*'nope'"):
        fastfa.nn.Linear(3, 2, rule="nope")
    with pytest.raises(TypeError, match="rule must be a str"):
        fastfa.convert(torch.nn.Linear(3, 2), 3)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(rule="usf", scale=-1.0), ValueError, "scale must be positive and finite"),
    (dict(rule="usf", scale=float("nan")), ValueError, "scale must be positive and finite"),
    (dict(rule="usf", scale="huge"), ValueError, "scale must be one of rms, xiao, xavier, kaiming"),
    (dict(rule="usf", scale=True), TypeError, "scale must be"),
    (dict(rule="fa", scale=0.1), ValueError, "option 'scale' applies to rule.s. usf, not 'fa'"),
    (dict(rule="usf", init="xavier"), ValueError, "option 'init' applies to rule.s. fa, brsf, frsf, kp, wm, sa, aa, ia, not 'usf'"),
    (dict(rule="fa", init="orthogonal"), ValueError, "init must be one of kaiming, xavier, xiao"),
    (dict(rule="brsf", seed=-3), ValueError, r"seed must be in \[0, 2\*\*63\)"),
    (dict(rule="brsf", seed=1.5), TypeError, "seed must be an int"),
    (dict(rule="bp", activation="swish"), ValueError, "activation must be None or one of relu"),
])
def test_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        fastfa.nn.Linear(3, 2, **kwargs)
    with pytest.raises(error, match=match):
        fastfa.nn.Conv2d(3, 2, 3, **kwargs)


def test_unknown_option_in_convert_and_functional():
    with pytest.raises(TypeError, match="unexpected keyword argument 'lr'"):
        fastfa.convert(torch.nn.Sequential(torch.nn.Linear(3, 2)), "usf", lr=0.1)
    with pytest.raises(TypeError, match="unknown option.s. lr"):
        fastfa.functional.linear(torch.randn(2, 3), torch.randn(4, 3), rule="usf", lr=0.1)


def test_wrong_dtype_device_and_shape():
    layer = fastfa.nn.Linear(3, 2, rule="usf")
    with pytest.raises(TypeError, match="input has dtype torch.int64; expected one of float16"):
        layer(torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="input has dtype torch.float64 but weight has torch.float32"):
        layer(torch.ones(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"input's last dimension must be in_features=3.*got input of shape \(2, 4\)"):
        layer(torch.ones(2, 4))
    with pytest.raises(TypeError, match="input must be a torch.Tensor, got list"):
        layer([1.0, 2.0, 3.0])
    conv = fastfa.nn.Conv2d(3, 4, 3, rule="usf")
    with pytest.raises(ValueError, match=r"input must have 3 channels .*got input of shape \(1, 5, 8, 8\)"):
        conv(torch.ones(1, 5, 8, 8))
    with pytest.raises(ValueError, match="input must have 3 or 4 dimensions"):
        conv(torch.ones(8, 8))
    with pytest.raises(ValueError, match=r"input's spatial size \(2, 2\) with padding \(0, 0\) is smaller than the dilated kernel"):
        conv(torch.ones(1, 3, 2, 2))


def test_functional_arguments():
    x, w = torch.randn(2, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\)"):
        fastfa.functional.linear(x, w, torch.randn(5), rule="bp")
    with pytest.raises(ValueError, match="rule 'frsf' needs feedback=R"):
        fastfa.functional.linear(x, w, rule="frsf")
    with pytest.raises(ValueError, match=r"feedback must have weight's shape \(4, 3\), got \(3, 4\)"):
        fastfa.functional.linear(x, w, rule="fa", feedback=torch.randn(3, 4))
    with pytest.raises(ValueError, match="rule 'usf' takes no feedback tensor"):
        fastfa.functional.linear(x, w, rule="usf", feedback=torch.randn(4, 3))
    with pytest.raises(ValueError, match="rule 'brsf' draws its feedback every step: pass seed="):
        fastfa.functional.linear(x, w, rule="brsf")
    with pytest.raises(ValueError, match="rule 'fa' needs feedback=R, or seed="):
        fastfa.functional.linear(x, w, rule="fa")
    with pytest.raises(ValueError, match=r"rng must be an int64 tensor of shape \(2,\)"):
        fastfa.functional.linear(x, w, rule="brsf", rng=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="padding='same' needs stride 1"):
        fastfa.functional.conv2d(torch.randn(1, 3, 5, 5), torch.randn(2, 3, 3, 3), None, 2, "same", rule="usf")
    with pytest.raises(ValueError, match="padding must be an int, a pair of ints, 'valid' or 'same'"):
        fastfa.functional.conv2d(torch.randn(1, 3, 5, 5), torch.randn(2, 3, 3, 3), None, 1, "full", rule="usf")
    with pytest.raises(ValueError, match="stride must be in"):
        fastfa.functional.conv2d(torch.randn(1, 3, 5, 5), torch.randn(2, 3, 3, 3), None, 0, rule="usf")
    with pytest.raises(ValueError, match="groups=2 must divide out_channels=3"):
        fastfa.functional.conv2d(torch.randn(1, 4, 5, 5), torch.randn(3, 2, 3, 3), groups=2, rule="usf")


def test_ops_check_their_arguments_in_cpp():
    """Calling torch.ops.fastfa directly still gets a message, never a crash."""
    w = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="rule must be an id in"):
        torch.ops.fastfa.feedback_transform(w, None, None, 12, 1.0, 0)
    with pytest.raises(RuntimeError, match="needs rng = int64 tensor"):
        torch.ops.fastfa.feedback_transform(w, None, None, 3, 1.0, 0)
    with pytest.raises(RuntimeError, match="rule 4 needs the stored feedback tensor"):
        torch.ops.fastfa.feedback_transform(w, None, None, 4, 1.0, 0)
    with pytest.raises(RuntimeError, match="feedback must have weight's shape"):
        torch.ops.fastfa.feedback_transform(w, torch.randn(3, 4), None, 4, 1.0, 0)
    with pytest.raises(RuntimeError, match="distribution must be 0 .uniform. or 1 .normal."):
        torch.ops.fastfa.feedback_transform(w, None, torch.tensor([0, 0]), 3, 1.0, 5)
    with pytest.raises(RuntimeError, match="input's last dimension must be in_features=3"):
        torch.ops.fastfa.linear(torch.randn(2, 5), w, None, None, None, 0, 1.0, 0, [0.0, 0.0, 0.0, 1.0], "none")
    with pytest.raises(RuntimeError, match="activation must be one of"):
        torch.ops.fastfa.linear(torch.randn(2, 3), w, None, None, None, 0, 1.0, 0, [0.0, 0.0, 0.0, 1.0], "swish")
    with pytest.raises(RuntimeError, match="conv2d input must have in_channels=6"):
        torch.ops.fastfa.conv2d(torch.randn(1, 4, 5, 5), torch.randn(2, 3, 3, 3), None, None, None, [1, 1], [0, 0],
                                [1, 1], 2, 0, 1.0, 0, [0.0, 0.0, 0.0, 1.0], "none")


def test_backend_selection():
    assert fastfa.backends()["aten"].usable
    with pytest.raises(ValueError, match="backend must be one of auto, cuda, triton, aten; got 'tpu'"):
        fastfa.set_backend("tpu")
    for name, status in fastfa.backends().items():
        if not status.usable:
            with pytest.raises(RuntimeError, match=f"backend '{name}' is not usable here"):
                fastfa.set_backend(name)
    with fastfa.use_backend("aten"):
        assert fastfa.get_backend() == "aten"
        fastfa.nn.Linear(3, 2)(torch.randn(1, 3))
    assert fastfa.get_backend() == "auto"
    y = fastfa.functional.linear(torch.randn(2, 3), torch.randn(4, 3), rule="usf", backend="aten")
    assert y.shape == (2, 4)
