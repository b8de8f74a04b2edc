import pytest
import torch
import torch.nn.functional as F

import fxptqat as fq
from fxptqat.planning import plan_qat

from helpers import make_small_net


@pytest.fixture
def calibrated():
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 1, 6, 6, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(3)]
    qat = fq.prepare(make_small_net(), data[0][0])
    fq.calibrate(qat, data)
    return qat, data


@pytest.mark.parametrize("mode", ["fused", "separate"])
def test_finetune_follows_the_plans_qat_phase(calibrated, mode):
    qat, data = calibrated
    plan = plan_qat(params=1000, bits=4, tokens_per_step=8, total_steps=40, fraction=0.25, mode=mode)
    seen_lr = []
    original_step = torch.optim.Adam.step

    def spy(self, *args, **kwargs):
        seen_lr.append(self.param_groups[0]["lr"])
        return original_step(self, *args, **kwargs)

    torch.optim.Adam.step = spy
    try:
        losses = fq.finetune(qat, data, F.cross_entropy, lr=1e-2, plan=plan, progress=False)
    finally:
        torch.optim.Adam.step = original_step
    assert len(losses) == plan.qat_steps == 10
    expected = [1e-2 * plan.lr_multiplier(plan.fp_steps + i) for i in range(plan.qat_steps)]
    assert seen_lr == pytest.approx(expected)
    if mode == "fused":
        assert seen_lr[-1] < seen_lr[0]  # the cooldown runs during QAT


def test_finetune_plan_errors(calibrated):
    qat, data = calibrated
    plan = plan_qat(params=1000, bits=4, tokens_per_step=8, total_steps=40, fraction=0.25)
    with pytest.raises(fq.ConfigError, match="contradicts"):
        fq.finetune(qat, data, F.cross_entropy, steps=3, plan=plan, progress=False)
    with pytest.raises(fq.ConfigError, match="QATPlan"):
        fq.finetune(qat, data, F.cross_entropy, plan="fused", progress=False)
    with pytest.raises(fq.ConfigError, match="positive int"):
        fq.finetune(qat, data, F.cross_entropy, progress=False)
