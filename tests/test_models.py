"""Tests for the reference models and the float training helpers in fxptqat.examples.models."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx
from torch import nn

from fxptqat.examples.data import load_digits
from fxptqat.examples.models import ResidualCNN, SmallViT, TinyMLP, accuracy, train_float

CASES = {
    "residual_cnn": (lambda: ResidualCNN(), (3, 1, 28, 28), 10),
    "residual_cnn_rgb": (lambda: ResidualCNN(num_classes=5, width=8, in_channels=3), (2, 3, 32, 32), 5),
    "small_vit": (lambda: SmallViT(), (3, 1, 28, 28), 10),
    "small_vit_rgb": (
        lambda: SmallViT(num_classes=7, image_size=32, patch_size=8, dim=48, depth=3, heads=3, in_channels=3),
        (2, 3, 32, 32),
        7,
    ),
    "tiny_mlp": (lambda: TinyMLP(), (3, 1, 8, 8), 10),
}


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(CASES))
def test_traced_matches_eager_bit_for_bit(name):
    make, shape, classes = CASES[name]
    torch.manual_seed(0)
    model = make().eval()
    traced = torch.fx.symbolic_trace(model)
    assert isinstance(traced, torch.fx.GraphModule)
    for batch in (1, shape[0]):
        x = torch.randn(batch, *shape[1:])
        with torch.no_grad():
            eager, fx_out = model(x), traced(x)
        assert eager.shape == (batch, classes)
        assert torch.equal(eager, fx_out)
        assert torch.isfinite(eager).all()


def test_graph_structure_exposes_quantizable_patterns():
    cnn = torch.fx.symbolic_trace(ResidualCNN())
    targets = [n.target for n in cnn.graph.nodes if n.op == "call_function"]
    assert torch.cat in targets
    assert operator.add in targets  # residual ``+``
    modules = dict(cnn.named_modules())
    relus = [n for n in cnn.graph.nodes if n.op == "call_module" and isinstance(modules[n.target], nn.ReLU)]
    assert len(relus) == 9 and all(not modules[n.target].inplace for n in relus)
    depthwise = [m for m in modules.values() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert len(depthwise) == 2 and all(m.groups == m.in_channels for m in depthwise)

    vit = torch.fx.symbolic_trace(SmallViT())
    vit_targets = [n.target for n in vit.graph.nodes if n.op == "call_function"]
    assert vit_targets.count(torch.matmul) == 4 and vit_targets.count(torch.softmax) == 2
    vit_modules = dict(vit.named_modules())
    assert sum(isinstance(m, nn.Linear) for m in vit_modules.values()) == 2 * (4 + 2) + 1
    assert not any(isinstance(m, nn.MultiheadAttention) for m in vit_modules.values())


def test_residual_cnn_fuses_with_torch_ao():
    from torch.ao.quantization.quantize_fx import fuse_fx

    torch.manual_seed(0)
    model = ResidualCNN().eval()
    fused = fuse_fx(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-5)


def test_parameter_counts():
    assert 20_000 <= _n_params(ResidualCNN()) <= 40_000
    assert _n_params(ResidualCNN()) == 21_546
    assert _n_params(SmallViT()) == 19_594
    assert _n_params(TinyMLP()) == 64 * 32 + 32 + 32 * 32 + 32 + 32 * 10 + 10


def test_bad_model_arguments():
    with pytest.raises(ValueError, match="divisible"):
        SmallViT(image_size=28, patch_size=5)
    with pytest.raises(ValueError, match="divisible"):
        SmallViT(dim=30, heads=4)


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def test_train_float_is_deterministic_and_learns(digits):
    x_train, y_train, x_test, y_test = digits
    states = []
    for _ in range(2):
        torch.manual_seed(123)
        model = TinyMLP()
        before = accuracy(model, x_test, y_test)
        out = train_float(model, x_train, y_train, epochs=15, seed=5)
        assert out is model and not model.training
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    acc = accuracy(model, x_test, y_test)
    assert acc >= 0.9 and acc > before + 0.5

    torch.manual_seed(123)
    other = train_float(TinyMLP(), x_train, y_train, epochs=15, seed=6)
    assert not torch.equal(other.fc1.weight, states[0]["fc1.weight"])


def test_train_float_edge_cases(digits, capsys):
    x_train, y_train, _, _ = digits
    model = TinyMLP()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_float(model, x_train, y_train, epochs=0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    train_float(model, x_train[:100], y_train[:100], epochs=1, progress=True)
    assert "train_float" in capsys.readouterr().err
    with pytest.raises(ValueError, match="differ in length"):
        train_float(model, x_train, y_train[:-1])
    with pytest.raises(ValueError, match="epochs"):
        train_float(model, x_train, y_train, epochs=-1)


def test_accuracy_contract(digits):
    _, _, x_test, y_test = digits
    oracle = lambda x: nn.functional.one_hot(y_test[: len(x)], 10).float()  # noqa: E731
    assert accuracy(oracle, x_test, y_test, batch_size=len(x_test)) == 1.0
    assert accuracy(lambda x: torch.zeros(len(x), 10), x_test, y_test) == pytest.approx(
        (y_test == 0).float().mean().item()
    )
    model = TinyMLP().train()
    model.fc2.eval()
    acc = accuracy(model, x_test, y_test, batch_size=7)
    assert 0.0 <= acc <= 1.0
    assert model.training and model.fc1.training and not model.fc2.training  # modes restored
    with pytest.raises(ValueError, match="differ in length"):
        accuracy(model, x_test, y_test[:-1])


@pytest.mark.xdist_group("mnist_cnn")  # trained once, on the worker that runs test_pipeline_mnist.py
def test_residual_cnn_reaches_95_percent_on_mnist(mnist, mnist_cnn):
    _, _, x_test, y_test = mnist
    acc = accuracy(mnist_cnn, x_test, y_test)
    print(f"ResidualCNN MNIST: {acc:.3f} test accuracy with train_float defaults")
    assert acc >= 0.95
