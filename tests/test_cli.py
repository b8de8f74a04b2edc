import json

import pytest

from fxptqat.cli import main


def test_demo_runs_the_whole_pipeline_on_mnist(tmp_path, capsys):
    out = tmp_path / "demo.json"
    code = main(["demo", "--epochs", "2", "--steps", "20", "--no-progress", "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    for expected in ("Per-node error at W4A8", "PTQAT selection", "trainable parameters",
                     "float (FP32)", "PTQ W4A8", "lowered to INT8", "INT8 vs fake-quant", "Speed"):
        assert expected in text
    result = json.loads(out.read_text())
    assert result["float_acc"] > 0.85  # two epochs on real MNIST
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
