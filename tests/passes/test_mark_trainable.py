import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxptqat as fq
from fxptqat import meta
from fxptqat.passes.mark_trainable import mark_trainable
from fxptqat.testing import act_bits, weight_bits

from helpers import MODELS, examples, make_small_net, property_batches, run_twice


@pytest.fixture
def qat(small_batches):
    qat = fq.prepare(make_small_net(), small_batches[0])
    fq.calibrate(qat, small_batches)
    return qat


def test_marks_trainable_and_frozen(qat):
    result = mark_trainable(qat, trainable=frozenset({"conv2"}))
    assert result.modified is True and result.graph_module is qat
    qat.graph.lint()
    conv1, conv2, fc = (qat.get_submodule(n) for n in ("conv1", "conv2", "fc"))
    assert all(p.requires_grad for p in conv2.parameters())
    assert not any(p.requires_grad for p in conv1.parameters())
    assert not any(p.requires_grad for p in fc.parameters())
    assert conv1.freeze_bn and not conv1.bn.training
    conv1.train()
    assert not conv1.bn.training  # model.train() keeps frozen BN in eval
    info = {n.name: i.trainable for n, i in meta.quantized_nodes(qat)}
    assert info == {"conv1": False, "conv2": True, "fc": False}


def test_second_run_is_a_no_op(qat):
    mark_trainable(qat, trainable=frozenset({"fc"}))
    code = qat.code
    assert mark_trainable(qat, trainable=frozenset({"fc"})).modified is False
    assert qat.code == code
    assert mark_trainable(qat, trainable=frozenset({"conv1"})).modified is True


def test_bn_stats_train_option(qat):
    mark_trainable(qat, trainable=frozenset({"conv1"}), bn_stats="train")
    assert not qat.get_submodule("conv1").freeze_bn
    mark_trainable(qat, trainable=frozenset({"conv1"}), bn_stats="frozen")
    assert qat.get_submodule("conv1").freeze_bn


def test_frozen_state_survives_training_steps(qat, small_batches):
    mark_trainable(qat, trainable=frozenset({"fc"}))
    frozen = {k: v.clone() for k, v in qat.get_submodule("conv1").state_dict().items()}
    fc_before = qat.get_submodule("fc").weight.clone()
    opt = torch.optim.SGD([p for p in qat.parameters() if p.requires_grad], lr=0.5)
    qat.train()
    for (x,) in small_batches:
        opt.zero_grad()
        qat(x).square().mean().backward()
        opt.step()
    after = qat.get_submodule("conv1").state_dict()
    assert all(torch.equal(frozen[k], after[k]) for k in frozen)  # weights, BN stats, qparams
    assert not torch.equal(fc_before, qat.get_submodule("fc").weight)


def test_unknown_node_is_refused(qat):
    with pytest.raises(fq.SelectionError, match="not quantized nodes"):
        mark_trainable(qat, trainable=frozenset({"nope"}))


def test_bad_option(qat):
    with pytest.raises(fq.ConfigError):
        mark_trainable(qat, trainable=frozenset(), bn_stats="sometimes")


@settings(max_examples=examples(5), deadline=None)
@given(MODELS, weight_bits(), act_bits(), st.sampled_from(["all", "weighted"]), st.data())
def test_property_lints_and_second_run_is_a_noop(pair, wb, ab, ops, data):
    model, (x,) = pair
    gm = fq.prepare(model, (x,), config=fq.QuantConfig(weight_bits=wb, act_bits=ab, quantized_ops=ops))
    fq.calibrate(gm, property_batches(model, x))
    names = sorted(n.name for n, _ in meta.quantized_nodes(gm))
    chosen = frozenset(data.draw(st.sets(st.sampled_from(names)), label="trainable"))
    run_twice(gm, lambda: mark_trainable(gm, trainable=chosen), modified=True)  # NodeInfo.trainable was None
    grads = [p.requires_grad for p in gm.parameters()]
    assert mark_trainable(gm, trainable=chosen).modified is False
    assert [p.requires_grad for p in gm.parameters()] == grads
