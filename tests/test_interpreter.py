"""The error recorder: streamed, one pass, nothing kept but running sums."""

import gc
import weakref

import torch

import fxptqat as fq
from fxptqat.fake_quantize import FakeQuantize
from fxptqat.stats import RunningError

from helpers import make_small_net, same_state, state_of


def _calibrated(batches):
    qat = fq.prepare(make_small_net(), batches[0])
    fq.calibrate(qat, batches)
    return qat


def test_measure_error_keeps_no_batch_alive():
    g = torch.Generator().manual_seed(0)
    qat = _calibrated([(torch.randn(8, 1, 6, 6, generator=g),)])
    refs = []

    def stream(n):
        for _ in range(n):
            x = torch.randn(8, 1, 6, 6, generator=g)
            refs.append(weakref.ref(x))
            yield (x,)

    report = fq.measure_error(qat, stream(50))
    gc.collect()
    assert report.batches == 50 and report.samples == 400
    assert sum(r() is not None for r in refs) == 0  # every batch (and what hung on it) was freed


def _switches(qat):
    """Every quantizer's on/off state: the flags fxptqat's FakeQuantize reads, the buffers torch.ao reads."""
    return [
        (name, m._fake_quant, m._observe, int(m.fake_quant_enabled[0]), int(m.observer_enabled[0]))
        for name, m in qat.named_modules()
        if isinstance(m, FakeQuantize)
    ]


def test_one_pass_over_the_batches_and_the_graph_is_left_as_it_was():
    """The recorder runs the float and the quantized network side by side (weight quantizers switched
    off for the float path, the model in eval mode): none of that may outlive the call."""
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 1, 6, 6, generator=g),) for _ in range(3)]
    qat = _calibrated(data)
    (x,) = data[0]
    with torch.no_grad():
        out = qat(x)
    qat.train()  # as during fine-tuning: measuring must not leave it in eval mode
    forward, code, state, switches = type(qat).forward, qat.code, state_of(qat), _switches(qat)
    training = [m.training for m in qat.modules()]
    grads = [p.requires_grad for p in qat.parameters()]
    calls = []

    class Counting:
        def __iter__(self):
            for batch in data:
                calls.append(1)
                yield batch

    report = fq.measure_error(qat, Counting())
    assert len(calls) == 3 and report.batches == 3
    assert type(qat).forward is forward and "forward" not in vars(qat) and qat.code == code
    assert same_state(qat, state)  # weights, BN statistics, scales and zero points
    assert switches and _switches(qat) == switches
    assert [m.training for m in qat.modules()] == training and qat.training
    assert [p.requires_grad for p in qat.parameters()] == grads
    with torch.no_grad():
        assert torch.equal(qat.eval()(x), out)


def test_isolated_equals_propagated_where_inputs_are_float():
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 1, 6, 6, generator=g),) for _ in range(2)]
    qat = _calibrated(data)
    qat.activation_post_process_0.enable_fake_quant(False)  # the network input stays float
    report = fq.measure_error(qat, data)
    first, second = report.rows[0], report.rows[1]
    assert first.isolated == first.propagated  # same float input into the same quantized node
    assert second.isolated != second.propagated  # downstream, quantization error has propagated


def test_running_error_matches_direct_computation():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(1000, generator=g)
    q = ref + 0.05 * torch.randn(1000, generator=g)
    run = RunningError()
    for a, b in zip(q.split(100), ref.split(100), strict=True):
        run.update(a, b)
    stats = run.result()
    mse = float(((q - ref) ** 2).mean())
    assert abs(stats.mse - mse) < 1e-9
    assert abs(stats.cosine - float(torch.nn.functional.cosine_similarity(q, ref, dim=0))) < 1e-6
    assert abs(stats.sqnr_db - 10 * torch.log10((ref**2).sum() / ((q - ref) ** 2).sum()).item()) < 1e-4


class _CountFakeQuant(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.per_channel = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.fake_quantize_per_channel_affine:
            self.per_channel += 1
        return func(*args, **(kwargs or {}))


def _weight_quantizers(qat):
    from fxptqat import meta

    return [qat.get_submodule(info.weight_quantizer) for _, info in meta.quantized_nodes(qat)]


def test_weights_are_fake_quantized_once_per_call_with_identical_results():
    """measure_error fake-quantizes each weight once for all batches and both quantized paths; the
    numbers equal those of a recorder that quantizes them on every call, bit for bit."""
    from fxptqat.interpreter import ErrorRecorder

    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 1, 6, 6, generator=g),) for _ in range(3)]
    qat = _calibrated(data)
    weights = _weight_quantizers(qat)
    assert len(weights) >= 2
    with _CountFakeQuant() as counted:
        report = fq.measure_error(qat, data)
    assert counted.per_channel == len(weights)  # once per weight, not 2 x 3 batches
    assert all("forward" not in vars(q) for q in weights)  # the patch is gone

    plain = ErrorRecorder(qat.eval())  # no weights_once(): every call quantizes again
    with torch.no_grad(), _CountFakeQuant() as counted:
        for (x,) in data:
            plain.run(x)
    assert counted.per_channel == 2 * 3 * len(weights)
    for row in report.rows:
        assert row.isolated == plain.isolated[row.name].result()
        assert row.propagated == plain.propagated[row.name].result()


def test_weight_cache_steps_aside_for_observers_and_grad():
    """A quantizer whose observer is on must see every call, and a call with grad enabled must build
    its own graph: neither is served from the cache; the patch is removed even after an error."""
    from fxptqat.interpreter import _weights_once

    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 1, 6, 6, generator=g),)]
    qat = _calibrated(data).eval()
    from fxptqat import meta

    _, info = next(iter(meta.quantized_nodes(qat)))
    q = qat.get_submodule(info.weight_quantizer)
    w = torch.randn_like(qat.get_parameter(info.weight))
    with torch.no_grad(), _weights_once([q]):
        first = q(w)
        assert q(w * 2) is first  # cached: within the block the weight input never changes
    with torch.no_grad(), _weights_once([q]):
        q.enable_observer(True)
        assert q(w) is not q(w)
        q.enable_observer(False)
    with _weights_once([q]):
        assert q(w) is not q(w)  # grad mode: no cache
    try:
        with _weights_once([q]):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert "forward" not in vars(q)


def test_sum_squares_is_float64_accurate_at_every_length():
    from fxptqat.stats import sum_squares

    g = torch.Generator().manual_seed(0)
    for n in (0, 1, 511, 512, 513, 4097, 300_001):
        x = torch.randn(n, generator=g) * 3 + 1
        exact = float((x.double() * x.double()).sum())
        # each float32 product is rounded (<= 6e-8 of itself); the summation adds next to nothing:
        # over many products those roundings average out, where a float32 sum stays ~5e-8 off
        bound = 1e-7 if n < 100_000 else 5e-9
        assert abs(sum_squares(x) - exact) <= bound * max(exact, 1.0), n
    half = torch.randn(1000, generator=g).half()
    assert abs(sum_squares(half) - float((half.double() ** 2).sum())) < 1e-9 * 1000
