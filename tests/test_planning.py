import copy
import itertools
import json
import math

import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

import fxptqat as fq
from fxptqat.cli import main
from fxptqat.errors import ConfigError, InputError
from fxptqat.planning import (
    PAPER_A,
    LawParams,
    LossRecord,
    QATPlan,
    ScalingLaw,
    optimal_qat_fraction,
    plan_qat,
    tokens_per_parameter_byte,
    train_with_plan,
)

# A law with every term switched on; magnitudes in the range of LM losses (nats/token).
TRUTH = LawParams(E=1.7, A=400, alpha=0.34, C=410, beta=0.28, theta=0.5, kappa=1.0, phi=20, chi=0.8, psi=0.1,
                  omega=0.3, lam=30, mu=0.7, nu=0.05, xi=0.4, rho=0.2)


def synthetic_records(law, *, noise=0.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    records = []
    for n, d, f, b in itertools.product((1e7, 1e8, 1e9), (1e9, 1e10, 1e11), (0.1, 0.4, 0.8), (2, 4, 8)):
        loss = law.predict(n, d * (1 - f), d * f, b) * (1 + noise * float(torch.randn((), generator=gen)))
        records.append(LossRecord(params=n, fp_tokens=d * (1 - f), qat_tokens=d * f, bits=b, loss=loss))
    return records


# -- the tokens-per-parameter-byte predictor -------------------------------------------------------
def test_worked_example_of_the_paper():
    s = tokens_per_parameter_byte(100e9, 86e6, 4)
    assert s == pytest.approx(2325.58, abs=0.01)
    assert optimal_qat_fraction(100e9, 86e6, 4) == pytest.approx(0.42, abs=0.005)
    assert optimal_qat_fraction(100e9, 86e6, 4) == pytest.approx(math.exp(-PAPER_A / math.log(s)))


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), -float("inf"), True, "1e9", None])
@pytest.mark.parametrize("position", range(3))
def test_non_positive_or_non_finite_inputs_raise_value_error(bad, position):
    args = [100e9, 86e6, 4]
    args[position] = bad
    for fn in (tokens_per_parameter_byte, optimal_qat_fraction):
        with pytest.raises(ValueError) as info:
            fn(*args)
        assert isinstance(info.value, ConfigError)
        assert ("tokens", "params", "bits")[position] in str(info.value)


def test_at_most_one_token_per_parameter_byte_plans_no_qat():
    # S = 1 exactly and below: ln S <= 0, the formula is undefined; the continuous limit is 0
    assert optimal_qat_fraction(43e6, 86e6, 4) == 0.0
    assert optimal_qat_fraction(1e6, 86e6, 4) == 0.0
    assert 0 < optimal_qat_fraction(44e6, 86e6, 4) < 1e-3


@given(tokens=st.floats(1e3, 1e15), params=st.floats(1e3, 1e12), bits=st.floats(1, 16), grow=st.floats(1.0, 1e3))
def test_fraction_is_in_unit_interval_and_grows_with_tokens(tokens, params, bits, grow):
    f = optimal_qat_fraction(tokens, params, bits)
    assert 0.0 <= f <= 1.0
    assert optimal_qat_fraction(tokens * grow, params, bits) >= f
    # S is what matters: scaling N*B and D together leaves f unchanged
    assert optimal_qat_fraction(tokens * 2, params, bits * 2) == pytest.approx(f)


# -- the loss law ----------------------------------------------------------------------------------
def test_law_params_are_validated():
    with pytest.raises(ConfigError, match="Did you mean 'kappa'"):
        LawParams(kapa=1.0)
    with pytest.raises(ConfigError, match="xi must be >= 0"):
        LawParams(xi=-0.1)
    with pytest.raises(ConfigError, match="keyword options only"):
        LawParams(1.0)
    with pytest.raises(ConfigError, match="sfp_sign"):
        ScalingLaw(TRUTH, sfp_sign=0)


def test_predict_matches_the_formula_and_broadcasts():
    p, law = TRUTH, ScalingLaw(TRUTH)
    n, d_fp, d_qat, b = 1e8, 6e9, 4e9, 4
    byte = n * b / 8
    s_fp, s_qat = d_fp / byte, d_qat / byte
    expected = (p.E + p.A / n**p.alpha + p.C / (d_fp + d_qat) ** p.beta + p.theta * 2 ** (-p.kappa * b)
                + p.phi * 2 ** (-p.chi * b) / (n**p.psi * s_qat**p.omega)
                + p.lam * 2 ** (-p.mu * b) / (n**p.nu * s_fp**p.xi * s_qat**p.rho))
    assert isinstance(law.predict(n, d_fp, d_qat, b), float)
    assert law.predict(n, d_fp, d_qat, b) == pytest.approx(expected, rel=1e-12)
    flipped = ScalingLaw(TRUTH, sfp_sign=-1).predict(n, d_fp, d_qat, b)
    assert flipped == pytest.approx(expected - p.lam * 2 ** (-p.mu * b) / (n**p.nu * s_fp**p.xi * s_qat**p.rho)
                                    + p.lam * 2 ** (-p.mu * b) * s_fp**p.xi / (n**p.nu * s_qat**p.rho), rel=1e-12)
    grid = law.predict(n, torch.tensor([6e9, 5e9]), torch.tensor([4e9, 5e9]), b)
    assert grid.shape == (2,) and float(grid[0]) == pytest.approx(expected)
    base = p.E + p.A / n**p.alpha + p.C / (d_fp + d_qat) ** p.beta
    assert law.penalty(n, d_fp, d_qat, b) == pytest.approx(expected - base, rel=1e-9)


def test_zero_token_phases():
    law = ScalingLaw(TRUTH)
    assert law.predict(1e8, 1e10, 0.0, 4) == math.inf  # no QAT: S_qat = 0
    assert law.predict(1e8, 0.0, 1e10, 4) == math.inf  # QAT from scratch diverges with sign +1
    assert math.isfinite(ScalingLaw(TRUTH, sfp_sign=-1).predict(1e8, 0.0, 1e10, 4))


def test_fit_recovers_the_parameters_of_synthetic_records():
    law = ScalingLaw(TRUTH)
    fit = ScalingLaw.fit(synthetic_records(law), restarts=8, adam_steps=1000, refine=2, seed=0)
    assert fit.fit_info.fixed == {}
    assert fit.fit_info.r2 > 0.999999
    for name in TRUTH.__dataclass_fields__:
        assert getattr(fit.params, name) == pytest.approx(getattr(TRUTH, name), rel=1e-3), name


def test_fit_with_noise_predicts_held_out_points_and_the_optimal_fraction():
    law = ScalingLaw(TRUTH)
    fit = ScalingLaw.fit(synthetic_records(law, noise=0.003), restarts=8, adam_steps=1000, refine=1, seed=0)
    assert fit.fit_info.r2 > 0.99
    for n, d, b in ((3e7, 3e9, 3), (3e8, 3e10, 6), (1e9, 1e11, 2)):  # points the fit never saw
        for f in (0.2, 0.5):
            assert fit.predict(n, d * (1 - f), d * f, b) == pytest.approx(law.predict(n, d * (1 - f), d * f, b),
                                                                           rel=0.01)
        assert fit.optimal_fraction(n, d, b) == pytest.approx(law.optimal_fraction(n, d, b), abs=0.08)


def test_fit_pins_what_the_records_cannot_identify():
    law = ScalingLaw(TRUTH)
    records = [r for r in synthetic_records(law) if r.params == 1e8 and r.bits == 4]
    fit = ScalingLaw.fit(records, restarts=8, adam_steps=300, refine=1, fixed={"rho": 0.2})
    assert set(fit.fit_info.fixed) == {"A", "alpha", "psi", "nu", "theta", "kappa", "chi", "mu", "rho"}
    assert fit.params.A == 0 and fit.params.theta == 0 and fit.params.rho == 0.2
    assert fit.fit_info.rmse < 0.01  # the absorbed terms are constants here: the fit stays exact
    with pytest.raises(ConfigError, match="unknown parameter 'rh'"):
        ScalingLaw.fit(records, fixed={"rh": 0.2})
    with pytest.raises(ConfigError, match="fp_tokens=0"):
        ScalingLaw.fit([LossRecord(params=1e8, fp_tokens=0, qat_tokens=1e9, bits=4, loss=3.0)])
    with pytest.raises(ConfigError, match="LossRecord"):
        ScalingLaw.fit([{"params": 1e8}])
    with pytest.raises(ConfigError, match="restarts"):
        ScalingLaw.fit(records, restarts=0)


def test_optimal_fraction_has_the_closed_form_of_a_pure_interaction_penalty():
    # with only the S_fp x S_qat term, loss ~ (1-f)^-xi f^-rho: minimum at f = rho / (rho + xi)
    law = ScalingLaw(LawParams(E=2.0, lam=1.0, xi=0.3, rho=0.2))
    assert law.optimal_fraction(1e8, 1e10, 4) == pytest.approx(0.2 / 0.5, abs=1e-3)
    # the other sign: the penalty falls monotonically in f, so all-QAT wins (documented)
    assert ScalingLaw(law.params, sfp_sign=-1).optimal_fraction(1e8, 1e10, 4) == 1.0


def test_optimal_fraction_of_the_full_law_grows_with_tokens():
    law = ScalingLaw(TRUTH)  # xi + rho > omega: the interaction term fades faster with S
    fractions = [law.optimal_fraction(1e8, d, 4) for d in (1e9, 1e10, 1e11, 1e12)]
    assert fractions == sorted(fractions) and fractions[0] < fractions[-1]
    grid = torch.linspace(0, 1, 2001, dtype=torch.float64)
    losses = law.predict(1e8, (1 - grid) * 1e10, grid * 1e10, 4)
    assert law.optimal_fraction(1e8, 1e10, 4) == pytest.approx(float(grid[torch.argmin(losses)]))


def test_best_bits_under_a_memory_budget():
    law = ScalingLaw(TRUTH)
    options = law.compare_bits(50e6, 1e10, bits=(2, 3, 4, 8))
    assert [o.loss for o in options] == sorted(o.loss for o in options)
    for o in options:
        assert o.params == pytest.approx(50e6 * 8 / o.bits)
        assert o.loss == pytest.approx(law.predict(o.params, (1 - o.fraction) * 1e10, o.fraction * 1e10, o.bits))
    assert law.best_bits(50e6, 1e10, bits=(2, 3, 4, 8)) == options[0]
    # no quantization penalty: more (smaller) parameters always win; a huge one: the widest bits win
    free = ScalingLaw(LawParams(E=1.7, A=400, alpha=0.34, C=410, beta=0.28))
    assert free.best_bits(50e6, 1e10, bits=(2, 4, 8)).bits == 2
    costly = ScalingLaw(LawParams(E=1.7, A=400, alpha=0.34, theta=50.0, kappa=1.0))
    assert costly.best_bits(50e6, 1e10, bits=(2, 4, 8), fraction=0.5).bits == 8


# -- the plan and its schedule ---------------------------------------------------------------------
def test_plan_splits_steps_by_the_predicted_fraction():
    plan = plan_qat(params=86e6, bits=4, tokens_per_step=4e6, tokens=100e9)
    assert plan.total_steps == 25_000 and plan.fp_steps + plan.qat_steps == plan.total_steps
    assert plan.S == pytest.approx(2325.58, abs=0.01)
    assert plan.fraction == pytest.approx(0.42, abs=0.005)
    assert plan.fraction == pytest.approx(plan.predicted_fraction, abs=1e-4)  # rounded to whole steps
    assert plan.qat_starts_at(plan.fp_steps) and not plan.qat_starts_at(plan.fp_steps - 1)
    assert plan.is_qat(plan.fp_steps) and not plan.is_qat(plan.fp_steps - 1)
    tiny = plan_qat(params=1e6, bits=4, tokens_per_step=100, total_steps=10, fraction=0.01)
    assert tiny.qat_steps == 1  # a positive fraction gets at least one QAT step
    none = plan_qat(params=1e6, bits=4, tokens_per_step=100, total_steps=10, fraction=0.0)
    assert none.qat_steps == 0 and not any(none.qat_starts_at(s) for s in range(10))


def test_plan_rejects_bad_options():
    with pytest.raises(ConfigError, match="exactly one of total_steps or tokens"):
        plan_qat(params=1e6, bits=4, tokens_per_step=1e3)
    with pytest.raises(ConfigError, match="exactly one"):
        plan_qat(params=1e6, bits=4, tokens_per_step=1e3, total_steps=10, tokens=1e4)
    with pytest.raises(ConfigError, match="fraction must be in"):
        plan_qat(params=1e6, bits=4, tokens_per_step=1e3, total_steps=10, fraction=1.5)
    with pytest.raises(ConfigError, match="'separate'"):
        plan_qat(params=1e6, bits=4, tokens_per_step=1e3, total_steps=10, mode="fussed")
    with pytest.raises(ConfigError, match="warmup is a share"):
        plan_qat(params=1e6, bits=4, tokens_per_step=1e3, total_steps=10, warmup=5)
    with pytest.raises(ConfigError, match="Did you mean 'qat_steps'"):
        QATPlan(total_steps=10, qat_step=2, tokens_per_step=1, params=1, bits=4)
    with pytest.raises(ConfigError, match="exceeds total_steps"):
        QATPlan(total_steps=10, qat_steps=12, tokens_per_step=1, params=1, bits=4)
    with pytest.raises(ValueError, match="params must be > 0"):
        plan_qat(params=0, bits=4, tokens_per_step=1e3, total_steps=10)


def _lrs(plan):
    return [plan.lr_multiplier(t) for t in range(plan.total_steps)]


def test_fused_schedule_keeps_fp_at_the_stable_lr_and_decays_during_qat():
    plan = plan_qat(params=1e5, bits=4, tokens_per_step=1, total_steps=100, fraction=0.3, mode="fused",
                    warmup=0.1, cooldown=0.2, min_lr_ratio=0.1)
    lr = _lrs(plan)
    assert lr[:10] == pytest.approx([(t + 1) / 10 for t in range(10)])
    assert lr[10:80] == [1.0] * 70  # through the switch at step 70: no FP cooldown
    assert lr[80:] == sorted(lr[80:], reverse=True) and lr[-1] == pytest.approx(0.1)
    short = plan_qat(params=1e5, bits=4, tokens_per_step=1, total_steps=100, fraction=0.1, mode="fused",
                     warmup=0.1, cooldown=0.2)
    assert _lrs(short)[:90][-1] == 1.0 and _lrs(short)[90] < 1.0  # decay cut to the QAT phase


def test_separate_schedule_cools_down_each_phase():
    plan = plan_qat(params=1e5, bits=4, tokens_per_step=1, total_steps=100, fraction=0.3, mode="separate",
                    warmup=0.1, cooldown=0.2)
    lr = _lrs(plan)
    assert lr[50:70] == pytest.approx([1 - (t + 1) / 20 for t in range(20)])  # FP decays to 0 by step 69
    assert plan.qat_warmup_steps == 10
    assert lr[70:80] == pytest.approx([(t + 1) / 10 for t in range(10)])  # QAT re-warms
    assert lr[80:] == pytest.approx([1 - (t + 1) / 20 for t in range(20)])
    scaled = plan_qat(params=1e5, bits=4, tokens_per_step=1, total_steps=100, fraction=0.3, mode="separate",
                      qat_lr_ratio=0.5, qat_warmup=0.0)
    assert scaled.lr_multiplier(70) == 0.5


@given(total=st.integers(1, 300), fraction=st.floats(0, 1), mode=st.sampled_from(["fused", "separate"]),
       warmup=st.floats(0, 1), cooldown=st.floats(0, 1), end=st.floats(0, 1))
def test_schedule_stays_in_range(total, fraction, mode, warmup, cooldown, end):
    plan = plan_qat(params=1e5, bits=4, tokens_per_step=1, total_steps=total, fraction=fraction, mode=mode,
                    warmup=warmup, cooldown=cooldown, min_lr_ratio=end)
    assert plan.fp_steps + plan.qat_steps == total
    assert all(min(0.0, end) <= m <= max(1.0, end) + 1e-12 and math.isfinite(m) for m in _lrs(plan))
    assert plan.describe()


def test_scheduler_follows_the_plan_and_resumes_at_a_step():
    plan = plan_qat(params=1e5, bits=4, tokens_per_step=1, total_steps=40, fraction=0.5, mode="separate",
                    warmup=0.1, cooldown=0.25)
    w = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([w], lr=0.1)
    sched = plan.scheduler(opt)
    seen = []
    for _ in range(40):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.1 * m for m in _lrs(plan)])
    opt2 = torch.optim.SGD([w], lr=0.1)
    sched2 = plan.scheduler(opt2, start_step=plan.fp_steps)
    resumed = []
    for _ in range(plan.qat_steps):
        resumed.append(opt2.param_groups[0]["lr"])
        opt2.step()
        sched2.step()
    assert resumed == pytest.approx(seen[plan.fp_steps:])


# -- running a plan --------------------------------------------------------------------------------
class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _data(n_batches=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_batches * 16, 8, generator=gen)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return [(x[i:i + 16], y[i:i + 16]) for i in range(0, len(x), 16)]


def _plan(total=30, fraction=0.4, mode="fused"):
    return plan_qat(params=400, bits=4, tokens_per_step=16, total_steps=total, fraction=fraction, mode=mode,
                    warmup=0.1, cooldown=0.3)


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")  # torch.ao's own lowering
@pytest.mark.parametrize("mode", ["fused", "separate"])
def test_train_with_plan_switches_fake_quant_on_at_the_planned_step(mode):
    torch.manual_seed(0)
    model, plan = TinyNet(), _plan(mode=mode)
    config = fq.QuantConfig(weight_bits=4, act_bits=8)
    run = train_with_plan(model, (torch.randn(2, 8),), _data(), nn.functional.cross_entropy, plan, config=config,
                          lr=0.01)
    assert len(run.losses) == len(run.lrs) == plan.total_steps and run.switch_step == plan.fp_steps == 18
    assert run.lrs == pytest.approx([0.01 * plan.lr_multiplier(t) for t in range(plan.total_steps)])
    assert run.carried_state == 4  # both layers' weight and bias kept their Adam moments
    quantizers = [m for m in run.qat.modules() if isinstance(m, fq.FakeQuantize)]
    assert quantizers and all(q.frozen for q in quantizers)
    assert not run.qat.training
    # the float model holds the FP phase's weights; QAT moved the graph's weights on from there
    assert not torch.equal(model.fc1.weight, run.qat.fc1.weight)
    # tracked weight scales: the final scale is the final weights' max-abs / 7 per output channel
    wfq = run.qat.fc1.weight_fake_quant
    expected = run.qat.fc1.weight.detach().abs().amax(dim=1) / 7
    assert torch.allclose(wfq.scale, expected, rtol=1e-5)
    int8 = fq.lower(run.qat)  # the result goes on through the pipeline
    parity = fq.check_parity(run.qat, int8, [b[0] for b in _data(2, seed=1)])
    assert parity.first_divergence is None


def test_frozen_weight_scales_keep_the_calibrated_scale():
    torch.manual_seed(0)
    model, plan = TinyNet(), _plan()
    run = train_with_plan(model, (torch.randn(2, 8),), _data(), nn.functional.cross_entropy, plan,
                          config=fq.QuantConfig(weight_bits=4, act_bits=None), lr=0.01, weight_scales="frozen")
    at_switch = model.fc1.weight.detach().abs().amax(dim=1) / 7  # model = weights at the switch step
    assert torch.allclose(run.qat.fc1.weight_fake_quant.scale, at_switch, rtol=1e-5)


def test_a_plan_without_qat_gives_the_ptq_graph():
    torch.manual_seed(0)
    model = TinyNet()
    run = train_with_plan(model, (torch.randn(2, 8),), _data(), nn.functional.cross_entropy,
                          _plan(total=12, fraction=0.0), config=fq.QuantConfig(weight_bits=4, act_bits=None))
    assert len(run.losses) == 12 and run.switch_step == 12
    assert torch.equal(model.fc1.weight, run.qat.fc1.weight)  # calibrated, never trained


def test_train_with_plan_rejects_bad_arguments():
    model, data, loss = TinyNet(), _data(), nn.functional.cross_entropy
    example = (torch.randn(2, 8),)
    with pytest.raises(ConfigError, match="plan must be a QATPlan"):
        train_with_plan(model, example, data, loss, {"fp_steps": 3})
    with pytest.raises(ConfigError, match="weight_scales"):
        train_with_plan(model, example, data, loss, _plan(), weight_scales="tracked")
    with pytest.raises(ConfigError, match="optimizer"):
        train_with_plan(model, example, data, loss, _plan(), optimizer="lion")
    with pytest.raises(InputError, match="no batch"):
        train_with_plan(model, example, [], loss, _plan())


def test_train_with_plan_policy_trains_only_the_selected_nodes():
    torch.manual_seed(0)
    model, plan = TinyNet(), _plan()
    run = train_with_plan(model, (torch.randn(2, 8),), _data(), nn.functional.cross_entropy, plan,
                          config=fq.QuantConfig(weight_bits=4, act_bits=8), lr=0.01, policy=fq.Count(1))
    sel = run.selection
    assert isinstance(sel, fq.Selection) and len(sel.trainable) == 1 and len(sel.frozen) == 1
    assert sel.policy == repr(fq.Count(1))
    trained, frozen = sel.sources[sel.trainable[0]], sel.sources[sel.frozen[0]]
    assert {trained, frozen} == {"fc1", "fc2"}
    assert len(run.losses) == plan.total_steps and run.switch_step == plan.fp_steps
    assert run.carried_state == 2  # the trained layer's weight and bias kept their Adam moments
    # `model` holds the weights at the switch step: the frozen layer kept them bit for bit, the trained moved on
    for name in ("weight", "bias"):
        assert torch.equal(getattr(model.get_submodule(frozen), name), getattr(run.qat.get_submodule(frozen), name))
        assert not torch.equal(getattr(model.get_submodule(trained), name),
                               getattr(run.qat.get_submodule(trained), name))
    assert not any(p.requires_grad for p in run.qat.get_submodule(frozen).parameters())
    # tracked scales: the trained layer's follow its final weights; the frozen layer's are calibration's
    for name in (trained, frozen):
        module = run.qat.get_submodule(name)
        assert torch.allclose(module.weight_fake_quant.scale, module.weight.detach().abs().amax(dim=1) / 7, rtol=1e-5)
    assert all(q.frozen for q in run.qat.modules() if isinstance(q, fq.FakeQuantize))


def test_train_with_plan_policy_all_layers_equals_no_policy_and_none_skips_qat():
    """TinyNet has no parameter outside its quantized nodes, so AllLayers() trains what policy=None trains."""
    torch.manual_seed(0)
    model = TinyNet()
    config = fq.QuantConfig(weight_bits=4, act_bits=None)
    runs = {}
    for policy in (None, fq.AllLayers(), fq.NoLayers()):
        runs[repr(policy)] = train_with_plan(copy.deepcopy(model), (torch.randn(2, 8),), _data(),
                                             nn.functional.cross_entropy, _plan(), config=config, lr=0.01,
                                             policy=policy)
    plain, every, nothing = runs["None"], runs["AllLayers()"], runs["NoLayers()"]
    assert plain.selection is None and len(every.selection.trainable) == 2
    assert every.losses == plain.losses and every.carried_state == plain.carried_state == 4
    assert torch.equal(every.qat.fc1.weight, plain.qat.fc1.weight)
    # nothing selected: the QAT phase is skipped, the result is the PTQ graph at the switch step
    assert nothing.selection.trainable == () and len(nothing.losses) == _plan().fp_steps
    assert nothing.losses == plain.losses[: _plan().fp_steps] and nothing.carried_state == 0
    assert not torch.equal(nothing.qat.fc1.weight, plain.qat.fc1.weight)


@pytest.mark.parametrize("policy", ["threshold", 0.01, fq.Threshold, object()])
def test_train_with_plan_rejects_a_non_policy_before_training(policy):
    torch.manual_seed(0)
    model = TinyNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="policy .* has no choose"):
        train_with_plan(model, (torch.randn(2, 8),), _data(), nn.functional.cross_entropy, _plan(), policy=policy)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# -- command line ----------------------------------------------------------------------------------
def test_cli_plan_prints_the_worked_example(capsys, tmp_path):
    out = tmp_path / "plan.json"
    assert main(["plan", "--params", "86e6", "--tokens", "100e9", "--bits", "4", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "2326" in text and "0.420" in text and "5.803e+10" in text and "4.197e+10" in text
    numbers = json.loads(out.read_text())
    assert numbers["f_star"] == pytest.approx(0.42, abs=0.005)


def test_cli_plan_with_steps_prints_the_schedule(capsys):
    assert main(["plan", "--params", "86e6", "--steps", "25e3", "--tokens-per-step", "4e6", "--bits", "4",
                 "--mode", "separate", "--cooldown", "0.1"]) == 0
    text = capsys.readouterr().out
    assert "14,507" in text and "10,493" in text and "LR (separate)" in text and "2,500" in text


@pytest.mark.parametrize("argv, message", [
    (["--params", "-1", "--tokens", "1e9", "--bits", "4"], "params must be > 0"),
    (["--params", "1e6", "--bits", "4"], "give --tokens"),
    (["--params", "1e6", "--steps", "10", "--bits", "4"], "needs --tokens-per-step"),
    (["--params", "1e6", "--tokens", "1e9", "--bits", "4", "--fraction", "2"], "fraction must be in"),
])
def test_cli_plan_errors(argv, message, capsys):
    assert main(["plan", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.xdist_group("planning_compiled")  # one worker: the second reuses the first's FP-phase kernels
@pytest.mark.parametrize("weight_scales", ["frozen", "track"])
def test_train_with_plan_compiled_follows_eager(weight_scales):
    """compile=True: both phases through backend="fxptqat", the same losses as eager. With frozen
    scales the QAT phase is one graph; tracked scales run torch.ao's observers, which Dynamo does
    not trace (graph breaks around them, still the same losses)."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model, plan = TinyNet(), _plan()
    config = fq.QuantConfig(weight_bits=4, act_bits=8)
    runs = []
    for compiled in (False, True):
        torch._dynamo.reset()
        counters.clear()
        runs.append(train_with_plan(copy.deepcopy(model), (torch.randn(2, 8),), _data(), nn.functional.cross_entropy,
                                    plan, config=config, lr=0.01, compile=compiled, weight_scales=weight_scales))
    assert runs[1].losses == pytest.approx(runs[0].losses, rel=1e-4, abs=1e-5)
    assert counters["fxptqat"]["fused_graphs"] >= 1
    if weight_scales == "frozen":
        assert counters["fxptqat"]["graphs"] == 2, dict(counters["fxptqat"])  # FP phase, QAT phase
    with pytest.raises(ConfigError, match="compile must be True or False"):
        train_with_plan(model, (torch.randn(2, 8),), _data(), nn.functional.cross_entropy, plan, compile=1)
