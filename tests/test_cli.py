import json

import pytest
import torch

from fxptqat.cli import main


@pytest.mark.xdist_group("mnist_cnn")  # the session's trained CNN: one worker trains it for every user
def test_demo_runs_the_whole_pipeline_on_mnist(tmp_path, capsys, monkeypatch, mnist, mnist_cnn):
    """The demo at its default 4 float epochs, whose float model is the session's `mnist_cnn`: the same
    data, seed, initial weights and train_float arguments (checked here), so the 40 s of float training
    are not repeated; train_float itself is tested in test_models.py."""
    import copy

    from fxptqat.examples import demo
    from fxptqat.examples.models import ResidualCNN, accuracy

    x_train, y_train, x_test, y_test = mnist
    torch.manual_seed(0)
    initial = ResidualCNN().state_dict()
    calls = []

    def trained(model, x, y, *, epochs, seed, progress):
        assert isinstance(model, ResidualCNN) and epochs == 4 and seed == 0
        assert torch.equal(x, x_train) and torch.equal(y, y_train)
        assert all(torch.equal(v, initial[k]) for k, v in model.state_dict().items())
        calls.append(epochs)
        return copy.deepcopy(mnist_cnn)

    monkeypatch.setattr(demo, "train_float", trained)
    out = tmp_path / "demo.json"
    code = main(["demo", "--steps", "20", "--no-progress", "--json", str(out)])
    assert code == 0 and calls == [4]
    text = capsys.readouterr().out
    for expected in ("Per-node error at W4A8", "PTQAT selection", "trainable parameters",
                     "float (FP32)", "PTQ W4A8", "lowered to INT8", "INT8 vs fake-quant", "Speed"):
        assert expected in text
    result = json.loads(out.read_text())
    assert result["float_acc"] == pytest.approx(accuracy(mnist_cnn, x_test, y_test)) and result["float_acc"] > 0.95
    assert result["int8_agreement"] >= 0.99
    assert 0 < result["trainable_params"] < result["total_params"]
    assert result["parity_first_divergence"] is None


@pytest.mark.parametrize("option, message", [(["--weight-bits", "9"], "weight_bits=9 is out of range"),
                                             (["--theta", "-1"], "theta")])
def test_demo_rejects_bad_options_before_training(option, message, capsys, monkeypatch):
    from fxptqat.examples import demo

    def no_training(*args, **kwargs):
        raise AssertionError("the demo trained before checking its options")

    monkeypatch.setattr(demo, "load_mnist", no_training)
    monkeypatch.setattr(demo, "train_float", no_training)
    assert main(["demo", *option, "--no-progress"]) == 2
    assert message in capsys.readouterr().err


def test_unknown_command():
    with pytest.raises(SystemExit):
        main(["nope"])
