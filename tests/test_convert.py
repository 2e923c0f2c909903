"""fastfa.convert on torchvision's resnet18 and alexnet, then a few SGD steps."""

import warnings

import pytest
import torch

import fastfa

torchvision = pytest.importorskip("torchvision")


def _count(model, kind):
    return sum(type(m) is kind for m in model.modules())


def test_convert_swaps_exact_types_and_keeps_parameters():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4, 2), torch.nn.BatchNorm1d(2))
    weight = model[0].weight
    out = fastfa.convert(model, "usf")
    assert out is model
    assert type(model[0]) is fastfa.nn.Conv2d and type(model[3]) is fastfa.nn.Linear
    assert isinstance(model[0], torch.nn.Conv2d)  # still a torch Conv2d for isinstance checks
    assert model[0].weight is weight  # the same Parameter: existing optimizers keep working
    assert type(model[4]) is torch.nn.BatchNorm1d and type(model[1]) is torch.nn.ReLU


def test_convert_exclude_patterns_and_seed():
    model = torchvision.models.resnet18(num_classes=10)
    fastfa.convert(model, "frsf", exclude=("fc", "layer4.*"), seed=5)
    assert type(model.fc) is torch.nn.Linear
    assert type(model.layer4[0].conv1) is torch.nn.Conv2d
    assert type(model.layer3[0].conv1) is fastfa.nn.Conv2d
    assert type(model.conv1) is fastfa.nn.Conv2d
    twin = fastfa.convert(torchvision.models.resnet18(num_classes=10), "frsf", exclude=("fc", "layer4.*"), seed=5)
    assert torch.equal(model.layer3[0].conv1.feedback, twin.layer3[0].conv1.feedback)
    assert not torch.equal(model.layer3[0].conv1.feedback[:1, :1], model.layer3[0].conv2.feedback[:1, :1])


def test_convert_a_single_layer_returns_the_new_layer():
    layer = fastfa.convert(torch.nn.Linear(3, 2), "bp")
    assert type(layer) is fastfa.nn.Linear


def test_convert_shared_layer_stays_shared():
    shared = torch.nn.Linear(4, 4)
    model = torch.nn.Sequential(shared, torch.nn.ReLU(), shared)
    fastfa.convert(model, "usf")
    assert model[0] is model[2] and type(model[0]) is fastfa.nn.Linear


@pytest.mark.slow
@pytest.mark.parametrize("rule", fastfa.RULES)
@pytest.mark.parametrize("name,size", [("resnet18", 32), ("alexnet", 64)])
def test_converted_torchvision_model_trains(name, size, rule):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10)
    fastfa.convert(model, rule, seed=0)
    assert _count(model, torch.nn.Conv2d) == 0 and _count(model, torch.nn.Linear) == 0
    x = torch.randn(8, 3, size, size)
    target = torch.randint(0, 10, (8,))
    if name == "alexnet":
        model.eval()  # no dropout, so the loss on one batch moves smoothly
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01 if name == "resnet18" else 0.005, momentum=0.9)
    losses = []
    for _ in range(6):
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0], losses


def test_convert_warns_where_a_fixed_usf_scale_is_off_the_weights():
    """A head initialised N(0, 0.01) (RetinaNet's) is ~2.9x below Xiao et al.'s scale: named, with the fix;
    a Kaiming-normal(fan_out) layer (what that scale is the std of) is not; the default "rms" never warns."""
    def model():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Conv2d(256, 256, 3), torch.nn.Conv2d(256, 256, 3))
        torch.nn.init.normal_(net[0].weight, std=0.01)
        torch.nn.init.kaiming_normal_(net[1].weight, mode="fan_out", nonlinearity="relu")
        return net

    with pytest.warns(UserWarning, match=r"in 1 layer\(s\): 0 \(s = 2\.9\d x RMS\(W\)\)\..*scale=\"rms\"") as caught:
        fastfa.convert(model(), "usf", scale="xiao")
    assert len(caught) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastfa.convert(model(), "usf")
        fastfa.convert(model(), "fa")
