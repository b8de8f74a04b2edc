"""Nothing lost: save/load in a fresh process, JSON round trips, re-applying a saved selection."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import fxptqat as fq

from helpers import make_small_net

HERE = os.path.dirname(__file__)


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    out = tmp_path_factory.mktemp("saved")
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 1, 6, 6, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(4)]
    qat = fq.prepare(make_small_net(), data[0][0], config=fq.QuantConfig(weight_bits=4))
    fq.calibrate(qat, data)
    report = fq.measure_error(qat, data)
    selection = fq.select_trainable(qat, report, policy=fq.Count(2))
    fq.finetune(qat, data, F.cross_entropy, steps=5, lr=1e-2, progress=False)
    int8 = fq.lower(qat)
    x = torch.randn(16, 1, 6, 6, generator=g)
    fq.save(qat, out / "qat.fxptqat")
    torch.save({"x": x, "fake_quant": qat(x), "int8": int8(x)}, out / "expected.pt")
    return dict(dir=out, qat=qat, report=report, selection=selection, x=x)


def test_fake_quant_and_int8_survive_save_and_load_in_a_fresh_process(finetuned):
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {HERE!r})
        from helpers import make_small_net
        import fxptqat as fq
        d = {str(finetuned["dir"])!r}
        expected = torch.load(d + "/expected.pt")
        model = make_small_net(seed=123)  # same class, other weights: the file restores them
        qat = fq.load(model, expected["x"][:2], d + "/qat.fxptqat")
        assert torch.equal(qat(expected["x"]), expected["fake_quant"]), "fake-quant differs"
        assert torch.equal(fq.lower(qat)(expected["x"]), expected["int8"]), "INT8 differs"
        print("identical")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "identical" in result.stdout


def test_load_restores_stage_selection_and_stats(finetuned, small_net):
    qat = fq.load(make_small_net(), finetuned["x"][:2], finetuned["dir"] / "qat.fxptqat")
    from fxptqat import meta

    assert meta.graph_info(qat).stage == meta.Stage.SELECTED
    trainable = {n.name for n, i in meta.quantized_nodes(qat) if i.trainable}
    assert trainable and trainable == set(finetuned["selection"].trainable)
    assert finetuned["selection"].frozen
    for name in finetuned["selection"].frozen:
        assert not any(p.requires_grad for p in qat.get_submodule(finetuned["selection"].sources[name]).parameters())
    nodes = list(meta.quantized_nodes(qat))
    assert [n.name for n, _ in nodes] == [r.name for r in finetuned["report"].rows]
    for node, info in nodes:
        assert info.isolated == finetuned["report"].row(node.name).isolated


def test_load_refuses_another_model(finetuned):
    other = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 5))
    with pytest.raises(fq.SelectionError, match="different model"):
        fq.load(other, finetuned["x"][:2], finetuned["dir"] / "qat.fxptqat")
    with pytest.raises(fq.InputError):
        fq.load(make_small_net(), finetuned["x"][:2], finetuned["dir"] / "expected.pt")


def test_saved_selection_reapplies_to_a_fresh_prepare(finetuned, small_batches):
    text = finetuned["selection"].to_json()
    selection = fq.Selection.from_json(text)
    assert selection == finetuned["selection"]
    fresh = fq.prepare(make_small_net(), small_batches[0])
    fq.calibrate(fresh, small_batches)
    again = fq.reapply_selection(fresh, selection)
    assert again.trainable == selection.trainable and again.frozen == selection.frozen
    assert again.trainable_params == selection.trainable_params


def test_saved_selection_refuses_a_different_model(finetuned, small_batches):
    selection = fq.Selection.from_json(finetuned["selection"].to_json())
    other = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 5))
    qat = fq.prepare(other, small_batches[0])
    fq.calibrate(qat, small_batches)
    with pytest.raises(fq.SelectionError, match="different model"):
        fq.reapply_selection(qat, selection)
    assert all(p.requires_grad for p in qat.parameters())  # refused before touching anything


def test_report_round_trips(finetuned):
    assert fq.ErrorReport.from_json(finetuned["report"].to_json()) == finetuned["report"]


def test_weighted_recipe_round_trips_without_its_dropped_quantizers(tmp_path):
    """quantized_ops="weighted" removes output quantizers at prepare; load() re-prepares from the
    saved recipe, so the same ones are gone and the state dict fits exactly."""
    from fxptqat.examples.models import SmallViT

    def vit():
        torch.manual_seed(0)
        return SmallViT(num_classes=5, image_size=8, patch_size=4, dim=8, depth=1, heads=2, mlp_ratio=2,
                        in_channels=1).eval()

    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(4, 1, 8, 8, generator=g),) for _ in range(2)]
    qat = fq.prepare(vit(), data[0], config=fq.QuantConfig(quantized_ops="weighted"))
    fq.calibrate(qat, data)
    fq.save(qat, tmp_path / "vit.fxptqat")
    loaded = fq.load(vit(), data[0], tmp_path / "vit.fxptqat")
    assert loaded.state_dict().keys() == qat.state_dict().keys()
    floats = [n.name for n, i in fq.meta.quantized_nodes(loaded) if i.output_quantizer is None]
    assert floats and floats == [n.name for n, i in fq.meta.quantized_nodes(qat) if i.output_quantizer is None]
    with torch.no_grad():
        assert torch.equal(loaded(data[1][0]), qat(data[1][0]))
