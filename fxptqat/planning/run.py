"""Running a QATPlan: float training, then prepare + calibrate at the planned step, then QAT."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable

import torch
import torch.fx as fx
import torch.nn as nn

from .. import meta
from ..api import calibrate, measure_error, prepare, select_trainable
from ..config import QuantConfig, check_finite
from ..errors import ConfigError, InputError
from ..fake_quantize import FakeQuantize
from ..selection import Selection
from ..training import cycle, make_optimizer, progress_bar, train_steps
from .fraction import _int, _positive
from .schedule import QATPlan

log = logging.getLogger(__name__)

# -- running a plan --------------------------------------------------------------------------------
WEIGHT_SCALES = ("track", "frozen")


@dataclasses.dataclass(frozen=True)
class PlanRun:
    """What :func:`train_with_plan` returns: the QAT graph (calibrated, quantizers frozen), the
    training loss and LR of every step, how many parameters kept their optimizer state, and the
    selection the QAT phase trained (``None`` without ``policy``: every parameter trained)."""

    qat: fx.GraphModule
    losses: tuple[float, ...]
    lrs: tuple[float, ...]
    switch_step: int
    carried_state: int
    selection: Selection | None = None


def _weight_quantizers(qat: fx.GraphModule) -> list[tuple[nn.Parameter, FakeQuantize]]:
    return [(qat.get_parameter(info.weight), qat.get_submodule(info.weight_quantizer))
            for _, info in meta.quantized_nodes(qat)]


def _observe_weights(quantizers, *, freeze: bool) -> None:
    """Max-abs scale tracking: each forward re-measures the weights; ``freeze`` fixes the final scales."""
    with torch.no_grad():
        for weight, wfq in quantizers:
            wfq.reset_statistics()
            if freeze:
                wfq.observe(weight)
                wfq.freeze()
            elif wfq.frozen:
                wfq.enable_observer(True)  # observe + fake-quant: forward sets the scale from this step's weights


def train_with_plan(
    model: nn.Module,
    example_inputs,
    loader: Iterable,
    loss_fn: Callable,
    plan: QATPlan,
    *,
    config: QuantConfig | None = None,
    lr: float = 1e-3,
    optimizer: str = "adamw",
    weight_decay: float = 0.0,
    calib_batches: int = 4,
    weight_scales: str = "track",
    max_grad_norm: float | None = None,
    progress: bool = False,
    compile: bool = False,
    policy=None,
) -> PlanRun:
    """Train ``model`` in float for ``plan.fp_steps``, then switch fake-quant on and train the QAT graph.

    Each batch is ``(*inputs, target)``; the loader is cycled. ``model`` itself is trained in place
    during the FP phase. At the switch step, ``fxptqat.prepare(model, example_inputs, config=config)``
    and ``fxptqat.calibrate`` on the next ``calib_batches`` batches (not counted as steps) give the
    QAT graph; a new optimizer over its parameters takes over the optimizer state of every parameter
    whose qualified name and shape are unchanged, and the LR schedule continues at ``plan.fp_steps``.
    weight_scales: "track" re-measures each weight quantizer's max-abs scale before every QAT step
        (standard QAT); "frozen" keeps the scales calibration fixed (fxptqat's PTQAT semantics).
        Activation quantizers (``act_bits=8``) stay as calibration fixed them.
    With ``plan.qat_steps == 0`` the result is the PTQ graph of the fully trained model.
    compile: both phases train through ``torch.compile(..., backend="fxptqat")`` (the float phase
        compiles with inductor unchanged, the QAT phase with fake-quant fused; :mod:`fxptqat.backend`).
    policy: a selection policy (``fxptqat.Threshold``, ``Count``, ``Adaptive``... anything with a
        ``choose(rows)`` method) makes the QAT phase PTQAT-style: after calibration,
        ``fxptqat.measure_error`` on the same calibration batches and ``fxptqat.select_trainable``
        with this policy; only the selected nodes' parameters train (and keep their optimizer state),
        every other parameter (frozen nodes, LayerNorm, embeddings: ``select_trainable``'s defaults)
        keeps its value at the switch bit for bit, and with ``weight_scales="track"`` only the
        trained nodes' weight scales are re-measured (frozen nodes keep the calibrated scales). The
        selection is returned as ``PlanRun.selection``; a selection with nothing to train skips the
        QAT phase (the PTQ graph at the switch step; ``losses`` then cover the FP steps only).
        ``None`` (default): every parameter trains.
        Checked before any training step (a non-policy raises ``ConfigError``, the model untouched).
    """
    owner = "train_with_plan()"
    if not isinstance(plan, QATPlan):
        raise ConfigError(f"{owner}: plan must be a QATPlan (fxptqat.planning.plan_qat), got {type(plan).__name__}.")
    if not isinstance(model, nn.Module):
        raise InputError(f"{owner}: model must be a torch.nn.Module, got {type(model).__name__}.")
    if weight_scales not in WEIGHT_SCALES:
        raise ConfigError(f"{owner}: weight_scales={weight_scales!r}; choose one of {WEIGHT_SCALES}.")
    if not isinstance(compile, bool):
        raise ConfigError(f"{owner}: compile must be True or False, got {compile!r}.")
    if policy is not None and (isinstance(policy, type) or not callable(getattr(policy, "choose", None))):
        raise ConfigError(f"{owner}: policy {policy!r} has no choose(rows) method; use fxptqat.Threshold, Fraction, "
                          "Count, Random, AllLayers, NoLayers or Adaptive (or None to train every parameter).")
    lr = _positive(owner, "lr", lr)
    weight_decay = check_finite(owner, "weight_decay", weight_decay, minimum=0.0)
    _int(owner, "calib_batches", calib_batches, 1)
    if max_grad_norm is not None:
        max_grad_norm = _positive(owner, "max_grad_norm", max_grad_norm)
    stream = cycle(loader, owner)
    losses: list[float] = []
    lrs: list[float] = []
    bar = progress_bar(total=plan.total_steps, desc="FP", enabled=progress, leave=False)

    def run_phase(net: nn.Module, opt, sched, steps: int, quantizers) -> None:
        before = (lambda: _observe_weights(quantizers, freeze=False)) if quantizers else None
        train_steps(net, stream, loss_fn, opt, steps, owner=owner, scheduler=sched, before_step=before,
                    max_grad_norm=max_grad_norm, losses=losses, lrs=lrs, bar=bar, compile=compile)

    was_training = model.training
    try:
        opt = make_optimizer(optimizer, [p for p in model.parameters() if p.requires_grad], lr=lr,
                             weight_decay=weight_decay, owner=owner)
        run_phase(model, opt, plan.scheduler(opt), plan.fp_steps, [])
        model.eval()
        qat = prepare(model, example_inputs, config=config)
        calib = [next(stream) for _ in range(calib_batches)]
        calibrate(qat, calib)
        selection = None
        if policy is not None:
            selection = select_trainable(qat, measure_error(qat, calib), policy=policy)
            log.info("QAT phase trains %d of %d quantized nodes (%s)", len(selection.trainable),
                     len(selection.trainable) + len(selection.frozen), selection.policy)
        log.info("QAT switched on at step %d of %d", plan.fp_steps, plan.total_steps)
        bar.set_description("QAT")
        quantizers = _weight_quantizers(qat) if weight_scales == "track" else []
        if selection is not None:  # frozen nodes keep the scales calibration fixed
            quantizers = [(w, q) for w, q in quantizers if w.requires_grad]
        names = {n: p for n, p in model.named_parameters()}
        new_params = [(n, p) for n, p in qat.named_parameters() if p.requires_grad]
        carried = 0
        trains = bool(new_params) or selection is None  # without a policy: as before (torch refuses no params)
        if not trains and plan.qat_steps:
            log.warning("%s: the policy selected no parameter to train; the QAT phase is skipped (PTQ graph at "
                        "step %d)", owner, plan.fp_steps)
        if trains:
            qat_opt = make_optimizer(optimizer, [p for _, p in new_params], lr=lr, weight_decay=weight_decay,
                                     owner=owner)
            for name, p in new_params:
                old = names.get(name)
                if old is not None and old.shape == p.shape and old in opt.state:
                    qat_opt.state[p] = {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[old].items()}
                    carried += 1
        if plan.qat_steps and trains:
            run_phase(qat, qat_opt, plan.scheduler(qat_opt, start_step=plan.fp_steps), plan.qat_steps, quantizers)
            if quantizers:
                _observe_weights(quantizers, freeze=True)
    finally:
        bar.close()
        model.train(was_training)
    qat.eval()
    return PlanRun(qat=qat, losses=tuple(losses), lrs=tuple(lrs), switch_step=plan.fp_steps, carried_state=carried,
                   selection=selection)
