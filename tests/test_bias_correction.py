"""QuantConfig(bias_correction=True): what is corrected and by how much, fidelity, what is left alone,
rollback, one-shot iterators, lowering parity, persistence, torch.distributed and a property over
random models."""

from __future__ import annotations

import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from hypothesis import given, settings

import fxptqat as fq
from fxptqat import meta
from fxptqat.bias_correction import MIN_VALUES, correct_bias
from fxptqat.capture.fused import output_shift, pre_activation
from fxptqat.errors import ConfigError, InputError
from fxptqat.interpreter import _weights_float
from fxptqat.testing import traceable_models

sys.path.insert(0, os.path.dirname(__file__))
from helpers import Twice, TwoCats, examples, make_small_net  # noqa: E402


class Depthwise(nn.Module):
    """MobileNet-style: conv-BN-ReLU, depthwise conv-BN-ReLU6, pointwise conv, a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.pw = nn.Conv2d(16, 24, 1)
        self.head = nn.Linear(24, 10)

    def forward(self, x):
        return self.head(self.pw(self.dw(self.stem(x))).mean((2, 3)))


def _depthwise(seed=0):
    torch.manual_seed(seed)
    model = Depthwise()
    model.train()
    with torch.no_grad():  # BatchNorm statistics of the data, as a trained model has them
        for _ in range(4):
            model(torch.randn(16, 3, 12, 12))
    return model.eval()


def _batches(n, shape, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*shape, generator=g),) for _ in range(n)]


def _calibrated(model, data, **options):
    qat = fq.prepare(model, data[0], config=fq.QuantConfig(**options))
    fq.calibrate(qat, data)
    return qat


def _bias_params(qat):
    """node name -> target of the parameter bias correction shifts, for every weighted node with one."""
    out = {}
    for node, _ in meta.quantized_nodes(qat):
        shift = output_shift(qat.get_submodule(node.target))
        if shift is not None:
            out[node.name] = f"{node.target}.{shift[0]}"
    return out


def _mean_shifts(qat, data):
    """node name -> mean over the batches of (pre-activation with float weights - with quantized
    weights) per output channel, on the inputs the quantized network gives each node; computed with
    forward pre-hooks on an eager run (independently of bias_correction's interpreter; one hook per
    module, so for graphs whose weighted nodes each call their own module, as fxptqat's capture makes them)."""
    inputs, hooks = {}, []
    nodes = {node.name: (node, info) for node, info in meta.quantized_nodes(qat)}
    for name, (node, _) in nodes.items():
        module = qat.get_submodule(node.target)
        hooks.append(module.register_forward_pre_hook(
            lambda m, args, name=name: inputs.setdefault(name, []).append(args)))
    qat.eval()
    try:
        with torch.no_grad():
            for args in data:
                qat(*args)
    finally:
        for h in hooks:
            h.remove()
    shifts = {}
    with torch.no_grad():
        for name, calls in inputs.items():
            node, info = nodes[name]
            module = qat.get_submodule(node.target)
            shift = output_shift(module)
            if shift is None:
                continue
            total, count = 0.0, 0
            for args in calls:
                q = pre_activation(module, *args)
                with _weights_float(qat.get_submodule(info.weight_quantizer)):
                    f = pre_activation(module, *args)
                diff = (f.double() - q.double()).movedim(shift[1], 0)
                total = total + diff.reshape(diff.shape[0], -1).sum(1)
                count += diff[0].numel()
            shifts[name] = (total / count, count)
    return shifts


# -- config -------------------------------------------------------------------------------------------
def test_bias_correction_must_be_a_bool():
    with pytest.raises(ConfigError, match="bias_correction must be True or False"):
        fq.QuantConfig(bias_correction="yes")
    assert fq.QuantConfig().bias_correction is False


# -- what it corrects -----------------------------------------------------------------------------------
def test_each_bias_absorbs_the_mean_shift_measured_on_the_calibrated_graph():
    data = _batches(4, (16, 3, 12, 12), seed=1)
    model = _depthwise()
    plain = _calibrated(model, data, weight_bits=4)
    expected = _mean_shifts(plain, data)
    corrected = _calibrated(model, data, weight_bits=4, bias_correction=True)
    params = _bias_params(corrected)
    assert set(params) == set(expected) == {n.name for n, _ in meta.quantized_nodes(corrected)}  # coverage: 4 nodes
    assert len(params) == 4
    for name, target in params.items():
        shift, count = expected[name]
        added = corrected.get_parameter(target) - plain.get_parameter(target)
        assert count >= MIN_VALUES  # the head too: 16 images x 4 batches
        assert float(shift.abs().max()) > 1e-4, name  # W4 rounding does shift the means
        torch.testing.assert_close(added, shift.float(), rtol=1e-5, atol=1e-7)
    # the first layer reads the model input, which the correction does not change: on it the corrected
    # layer's mean output with quantized weights is the uncorrected layer's with float weights
    stem, info = next(iter(meta.quantized_nodes(corrected)))
    inputs = []
    hook = corrected.get_submodule(stem.target).register_forward_pre_hook(lambda m, a: inputs.append(a))
    with torch.no_grad():
        for args in data:
            corrected.eval()(*args)
        hook.remove()
        before, after = plain.get_submodule(stem.target), corrected.get_submodule(stem.target)
        with _weights_float(plain.get_submodule(info.weight_quantizer)):
            f = torch.cat([pre_activation(before, *a) for a in inputs]).double().mean((0, 2, 3))
        q = torch.cat([pre_activation(after, *a) for a in inputs]).double().mean((0, 2, 3))
    assert float((f - q).abs().max()) < 0.01 * float(expected[stem.name][0].abs().max())


def test_bias_correction_brings_the_output_closer_to_float():
    # at W4 on this small net (at W8 its weight-rounding shifts are below the activations' rounding
    # noise; benchmarks/fidelity_probe.py measures W8A8 on real architectures)
    weight_bits = 4
    model = _depthwise(seed=2)
    calib, held_out = _batches(8, (16, 3, 12, 12), seed=3), _batches(4, (16, 3, 12, 12), seed=4)
    errors = {}
    for bc in (False, True):
        qat = _calibrated(model, calib, weight_bits=weight_bits, bias_correction=bc).eval()
        with torch.no_grad():
            errors[bc] = sum(float((qat(x) - model(x)).square().mean()) for (x,) in held_out)
    assert errors[True] < 0.5 * errors[False], errors


# -- what it leaves alone -------------------------------------------------------------------------------
def test_only_biases_change_and_no_parameter_is_added():
    data = _batches(4, (16, 3, 12, 12), seed=5)
    model = _depthwise()
    plain, corrected = _calibrated(model, data), _calibrated(model, data, bias_correction=True)
    assert corrected.code == plain.code
    a, b = plain.state_dict(), corrected.state_dict()
    assert a.keys() == b.keys()
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and changed <= set(_bias_params(corrected).values())
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in corrected.named_parameters()]


def test_layers_without_a_bias_are_skipped_with_the_reason():
    x = torch.randn(64, 1, 4, 4)
    qat = _calibrated(TwoCats(), [(x,)])
    params = dict(qat.named_parameters())
    done = correct_bias(qat, [(x,)])
    assert done.corrected == {}
    assert len(done.skipped) == 3 and all("no bias parameter" in why for why in done.skipped.values())
    assert dict(qat.named_parameters()).keys() == params.keys()


def test_nodes_that_call_one_module_share_one_shift():
    # fxptqat's capture splits a shared weighted module; a graph where two nodes still call one module
    # (made here by hand) gets one shift for its bias: the mean over both calls
    data = _batches(2, (64, 4), seed=12)
    qat = _calibrated(Twice(), data, weight_bits=3)
    second = next(n for n, _ in meta.quantized_nodes(qat) if n.target == "l_call1")
    second.target = "l"
    meta.update_node_info(second, source="l", weight="l.weight", weight_quantizer="l.weight_fake_quant")
    qat.recompile()
    calls = []  # module l's inputs in call order: per batch, the first node's call then the second's
    hook = qat.get_submodule("l").register_forward_pre_hook(lambda m, a: calls.append(a))
    with torch.no_grad():
        for args in data:
            qat.eval()(*args)
    hook.remove()
    assert len(calls) == 2 * len(data)
    module, quantizer = qat.get_submodule("l"), qat.get_submodule("l.weight_fake_quant")

    def shift(inputs):
        with torch.no_grad():
            q = torch.cat([pre_activation(module, *a) for a in inputs]).double()
            with _weights_float(quantizer):
                f = torch.cat([pre_activation(module, *a) for a in inputs]).double()
        return (f - q).mean(0), q.shape[0]

    (m1, c1), (m2, c2) = shift(calls[0::2]), shift(calls[1::2])
    before = qat.get_parameter("l.bias").clone()
    done = correct_bias(qat, data)
    assert done.corrected["l"] == done.corrected["l_call1"] and "h" in done.corrected
    torch.testing.assert_close(qat.get_parameter("l.bias") - before, ((m1 * c1 + m2 * c2) / (c1 + c2)).float(),
                               rtol=1e-5, atol=1e-7)
    assert float((m1 - m2).abs().max()) > 1e-4  # the two calls' shifts differ: the mean is not either one


def test_channels_with_too_few_values_are_left_alone():
    model = make_small_net()  # the Linear head sees one value per channel and image
    few = _batches(2, (8, 1, 6, 6), seed=6)  # 16 images
    qat = _calibrated(model, few, weight_bits=4)
    done = correct_bias(qat, few)
    head = [n for n, info in meta.quantized_nodes(qat) if "Linear" in info.module_type]
    assert len(head) == 1 and head[0].name in done.skipped and "16 values per channel" in done.skipped[head[0].name]
    assert len(done.corrected) == 2  # the two convs: 16 images x 36 positions
    many = _batches(MIN_VALUES // 8, (8, 1, 6, 6), seed=6)
    assert head[0].name in correct_bias(_calibrated(model, many, weight_bits=4), many).corrected


# -- how it runs ------------------------------------------------------------------------------------------
def test_a_one_shot_iterator_gives_the_same_result_as_a_list():
    data = _batches(3, (16, 3, 12, 12), seed=7)
    model = _depthwise()
    listed = _calibrated(model, data, weight_bits=4, bias_correction=True)
    qat = fq.prepare(model, data[0], config=fq.QuantConfig(weight_bits=4, bias_correction=True))
    assert fq.calibrate(qat, iter(data)) == 3
    a, b = listed.state_dict(), qat.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_failed_correction_leaves_the_graph_as_it_was():
    data = _batches(3, (16, 3, 12, 12), seed=8)

    class SecondPassBreaks:
        """Fine for calibration's pass; the bias correction pass gets a batch of the wrong shape."""

        def __init__(self):
            self.passes = 0

        def __iter__(self):
            self.passes += 1
            return iter(data if self.passes == 1 else [data[0], (torch.randn(16, 5, 12, 12),)])

    qat = fq.prepare(_depthwise(), data[0], config=fq.QuantConfig(weight_bits=4, bias_correction=True))
    before = {k: v.clone() for k, v in qat.state_dict().items()}
    with pytest.raises(InputError, match="bias correction"):
        fq.calibrate(qat, SecondPassBreaks())
    after = qat.state_dict()
    assert [k for k in before if not torch.equal(after[k], before[k])] == []
    assert meta.graph_info(qat).stage == meta.Stage.PREPARED
    fq.calibrate(qat, data)  # and it calibrates as a fresh graph does
    fresh = _calibrated(_depthwise(), data, weight_bits=4, bias_correction=True).state_dict()
    assert all(torch.equal(qat.state_dict()[k], fresh[k]) for k in fresh)


# -- after calibration -----------------------------------------------------------------------------------
def test_the_int8_lowering_computes_the_corrected_graph():
    data = _batches(4, (16, 3, 12, 12), seed=9)
    qat = _calibrated(_depthwise(), data, bias_correction=True)
    int8 = fq.lower(qat)
    parity = fq.check_parity(qat, int8, data)
    assert parity.ok and parity.coverage == 1.0 and len(parity.rows) == 4


def test_save_and_load_keep_the_corrected_biases(tmp_path):
    data = _batches(4, (16, 3, 12, 12), seed=10)
    model = _depthwise()
    qat = _calibrated(model, data, weight_bits=4, bias_correction=True)
    fq.save(qat, tmp_path / "m.fxptqat")
    loaded = fq.load(model, data[0], tmp_path / "m.fxptqat")
    assert meta.graph_info(loaded).config.bias_correction is True
    with torch.no_grad():
        for (x,) in data:
            torch.testing.assert_close(loaded.eval()(x), qat.eval()(x), rtol=0, atol=0)


# -- torch.distributed: two gloo ranks over shards == one process over all batches --------------------------
WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        data = _batches(4, (16, 3, 12, 12), seed=11)
        qat = _calibrated(_depthwise(), data[rank::WORLD], weight_bits=4, bias_correction=True)
        torch.save(qat.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ranks_get_the_correction_of_one_process_over_all_shards(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    data = _batches(4, (16, 3, 12, 12), seed=11)
    single = _calibrated(_depthwise(), data, weight_bits=4, bias_correction=True)
    plain = _calibrated(_depthwise(), data, weight_bits=4)
    targets = set(_bias_params(single).values())
    moved = [t for t in targets if not torch.equal(single.state_dict()[t], plain.state_dict()[t])]
    # coverage: all four nodes moved; the head only because the counts are summed over the ranks (32 images each)
    assert len(moved) == 4
    for state in states:
        for key, value in single.state_dict().items():
            torch.testing.assert_close(state[key], value, rtol=1e-6, atol=1e-7, msg=key)


# -- property over random models ---------------------------------------------------------------------
@settings(max_examples=examples(25), deadline=None)
@given(pair=traceable_models(max_layers=4))
def test_property_only_bias_parameters_move_by_the_measured_shift(pair):
    model, (x,) = pair
    g = torch.Generator().manual_seed(model.seed + 1)
    data = [(x,), (torch.randn(x.shape, generator=g) * 2,)]
    plain = _calibrated(model, data, weight_bits=4)
    expected = _mean_shifts(plain, data)
    corrected = _calibrated(model, data, weight_bits=4, bias_correction=True)
    assert corrected.code == plain.code
    params = _bias_params(corrected)
    a, b = plain.state_dict(), corrected.state_dict()
    assert a.keys() == b.keys()
    assert {k for k in a if not torch.equal(a[k], b[k])} <= set(params.values())
    for name, target in params.items():
        shift, count = expected[name]
        added = b[target] - a[target]
        if count < MIN_VALUES:
            assert torch.equal(added, torch.zeros_like(added))
        else:
            torch.testing.assert_close(added, shift.to(added.dtype), rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        assert torch.isfinite(corrected.eval()(x)).all()


# -- the capture's part: pre-activation outputs and where a shift goes ------------------------------------
def test_pre_activation_and_output_shift_of_each_fused_module_kind():
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(64, 8), nn.ReLU(),
                          nn.Linear(8, 3)).eval()
    x = torch.randn(16, 2, 6, 6)
    qat = _calibrated(model, [(x,)])
    kinds = {}
    inputs = {}
    for node, info in meta.quantized_nodes(qat):
        module = qat.get_submodule(node.target)
        module.register_forward_pre_hook(lambda m, a, name=node.name: inputs.setdefault(name, a))
        kinds[node.name] = (info.module_type, output_shift(module))
    with torch.no_grad():
        qat.eval()(x)
    assert sorted(kinds.values()) == [("ConvBn2d", ("bn.bias", 1)), ("ConvBnReLU2d", ("bn.bias", 1)),
                                      ("ConvReLU2d", ("bias", 1)), ("Linear", ("bias", -1)),
                                      ("LinearReLU", ("bias", -1))]
    with torch.no_grad():
        for node, _ in meta.quantized_nodes(qat):
            module = qat.get_submodule(node.target)
            pre, out = pre_activation(module, *inputs[node.name]), module(*inputs[node.name])
            if "ReLU" in kinds[node.name][0]:
                assert (pre < 0).any() and torch.equal(torch.relu(pre), out)
            else:
                assert torch.equal(pre, out)
