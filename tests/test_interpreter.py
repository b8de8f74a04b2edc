"""The error recorder: streamed, one pass, nothing kept but running sums."""

import gc
import weakref

import torch

import fxptqat as fq
from fxptqat.stats import RunningError

from helpers import make_small_net


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


def test_one_pass_over_the_batches():
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 1, 6, 6, generator=g),) for _ in range(3)]
    qat = _calibrated(data)
    calls = []
    original = qat.forward

    class Counting:
        def __iter__(self):
            for batch in data:
                calls.append(1)
                yield batch

    report = fq.measure_error(qat, Counting())
    assert len(calls) == 3 and report.batches == 3
    assert qat.forward == original


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
