"""2-process gloo on CPU: calibrate / measure_error reduce across ranks; DDP fine-tuning of a PTQAT graph."""

import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fxptqat as fq

sys.path.insert(0, os.path.dirname(__file__))
from helpers import make_small_net  # noqa: E402

WORLD = 2


def _shards():
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(8, 1, 6, 6, generator=g) * (1 + i),) for i in range(4)]  # ranges differ per batch
    return data, [data[0::2], data[1::2]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        _, shards = _shards()
        qat = fq.prepare(make_small_net(), shards[rank][0], config=fq.QuantConfig(weight_bits=4))
        fq.calibrate(qat, shards[rank])
        report = fq.measure_error(qat, shards[rank])
        selection = fq.select_trainable(qat, report, policy=fq.Count(1))
        frozen = {k: v.clone() for k, v in qat.get_submodule(selection.sources[selection.frozen[0]]).state_dict().items()}
        ddp = torch.nn.parallel.DistributedDataParallel(qat)
        opt = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=0.1)
        qat.train()
        torch.manual_seed(rank)  # different data per rank: gradients must be averaged to stay in sync
        for _ in range(3):
            opt.zero_grad()
            ddp(torch.randn(8, 1, 6, 6)).square().mean().backward()
            opt.step()
        qat.eval()
        torch.save(
            {
                "qparams": {k: v for k, v in qat.state_dict().items() if k.endswith(("scale", "zero_point"))},
                "report": report.to_json(),
                "state": qat.state_dict(),
                "frozen_before": frozen,
                "frozen_name": selection.sources[selection.frozen[0]],
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ddp"))
    mp.spawn(_worker, args=(_free_port(), out), nprocs=WORLD, join=True)
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


def _single_process():
    data, _ = _shards()
    qat = fq.prepare(make_small_net(), data[0], config=fq.QuantConfig(weight_bits=4))
    fq.calibrate(qat, data)
    return qat, fq.measure_error(qat, data)


def test_ranks_get_the_quantizer_parameters_of_one_process_over_all_shards(ranks):
    qat, _ = _single_process()
    single = {k: v for k, v in qat.state_dict().items() if k.endswith(("scale", "zero_point"))}
    for r in ranks:
        assert r["qparams"].keys() == single.keys()
        for k in single:
            assert torch.equal(r["qparams"][k], single[k]), k


def test_ranks_get_the_report_of_one_process(ranks):
    _, single = _single_process()
    for r in ranks:
        report = fq.ErrorReport.from_json(r["report"])
        assert report.samples == single.samples and report.batches == single.batches
        for a, b in zip(report.rows, single.rows, strict=True):
            assert a.name == b.name
            for mode in ("isolated", "propagated"):
                x, y = a.stats(mode), b.stats(mode)
                assert x.count == y.count
                assert x.mse == pytest.approx(y.mse, rel=1e-9, abs=1e-15)
                assert x.cosine == pytest.approx(y.cosine, rel=1e-9)
                assert x.max_abs == y.max_abs


def test_ddp_finetuning_keeps_ranks_in_sync_and_frozen_layers_fixed(ranks):
    a, b = ranks[0]["state"], ranks[1]["state"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # trainable weights averaged; buffers identical
    for r in ranks:
        name = r["frozen_name"]
        for k, v in r["frozen_before"].items():
            assert torch.equal(r["state"][f"{name}.{k}"], v), (name, k)
