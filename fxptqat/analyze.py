"""``fxptqat analyze``: prepare -> calibrate -> measure_error -> selection -> (lower + parity) ->
(task-level sensitivity) on a user's model, written as report.html, report.json and PNG plots.

The user's file defines a function returning ``(model, example_inputs, batches)`` or
``(model, example_inputs, batches, evaluate)`` (or a dict with those keys); ``evaluate(model) ->
float`` scores a model on the user's task (higher is better).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch.fx as fx

from . import api, meta, report_html
from .config import QuantConfig
from .errors import ConfigError, FxptqatError, InputError
from .fake_quantize import is_quantizer
from .selection import Adaptive, AllLayers, Count, Fraction, NoLayers, Threshold
from .training import progress_bar

__all__ = ["Analysis", "analyze", "load_function", "parse_bits", "parse_policy", "sensitivity"]


@dataclasses.dataclass(frozen=True)
class Analysis:
    report: object  # ErrorReport
    selection: object  # Selection
    parity: object | None  # ParityReport when lowered
    sensitivity: dict | None  # node -> {"only": score drop, "all_but": score gain}
    timings: dict
    files: dict  # what was written: name -> path


def parse_bits(text: str) -> dict:
    """``W4A8`` -> weight_bits=4, act_bits=8; ``W4`` (or ``W4AF``) -> weight-only."""
    m = re.fullmatch(r"[Ww](\d)(?:[Aa](\d+|[Ff]))?", text.strip())
    if m is None:
        raise ConfigError(f"--bits {text!r}: write W<weight bits>A<activation bits>, e.g. W4A8, W8A8, or W4 "
                          "(weight-only).")
    act = m.group(2)
    return {"weight_bits": int(m.group(1)), "act_bits": None if act in (None, "F", "f") else int(act)}


_POLICIES = {"threshold": Threshold, "adaptive": Adaptive, "fraction": Fraction, "count": Count,
             "all": AllLayers, "none": NoLayers}


def parse_policy(text: str):
    """``threshold`` / ``threshold=0.01`` / ``adaptive`` / ``fraction=0.5`` / ``count=3`` / ``all`` / ``none``."""
    name, _, value = text.strip().lower().partition("=")
    cls = _POLICIES.get(name)
    if cls is None:
        raise ConfigError(f"--policy {text!r}: choose one of threshold[=THETA], adaptive, fraction=F, count=N, "
                          "all, none.")
    if not value:
        if cls in (Fraction, Count):
            raise ConfigError(f"--policy {name} needs a value, e.g. {name}={'0.5' if cls is Fraction else '3'}.")
        return cls()
    try:
        number = int(value) if cls is Count else float(value)
    except ValueError as e:
        raise ConfigError(f"--policy {text!r}: {value!r} is not a number.") from e
    if cls in (Adaptive, AllLayers, NoLayers):
        raise ConfigError(f"--policy {name} takes no value.")
    return cls(number)


def load_function(spec: str) -> Callable:
    """``path/to/file.py:function`` -> the function (the file is imported as a fresh module)."""
    path, sep, name = spec.rpartition(":")
    if not sep or not path or not name.isidentifier():
        raise InputError(f"{spec!r}: give the model as PATH.py:FUNCTION, e.g. models/mine.py:build.")
    file = Path(path)
    if not file.is_file():
        raise InputError(f"{path}: no such file.")
    module_spec = importlib.util.spec_from_file_location(f"fxptqat_user_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    sys.path.insert(0, str(file.resolve().parent))
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        raise InputError(f"{path}: importing it raised {type(e).__name__}: {e}") from e
    finally:
        sys.path.remove(str(file.resolve().parent))
    fn = getattr(module, name, None)
    if not callable(fn):
        defined = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise InputError(f"{path} has no function {name!r} (it defines {defined[:10]}).")
    return fn


def unpack(result) -> tuple:
    """(model, example_inputs, batches, evaluate or None) from what the user's function returned."""
    if isinstance(result, dict):
        missing = [k for k in ("model", "example_inputs", "batches") if k not in result]
        if missing:
            raise InputError(f"the function returned a dict without {missing}; it needs model, example_inputs, "
                             "batches and optionally evaluate.")
        result = (result["model"], result["example_inputs"], result["batches"], result.get("evaluate"))
    if not isinstance(result, (tuple, list)) or len(result) not in (3, 4):
        raise InputError(f"the function returned {type(result).__name__}; return (model, example_inputs, batches) "
                         "or (model, example_inputs, batches, evaluate).")
    model, example_inputs, batches, *rest = result
    evaluate = rest[0] if rest else None
    if evaluate is not None and not callable(evaluate):
        raise InputError(f"evaluate must be a function model -> score, got {type(evaluate).__name__}.")
    return model, example_inputs, batches, evaluate


def _score(evaluate: Callable, model) -> float:
    try:
        value = float(evaluate(model))
    except Exception as e:
        raise InputError(f"evaluate(model) raised {type(e).__name__}: {e}") from e
    return value


def sensitivity(qat: fx.GraphModule, evaluate: Callable, *, progress: bool = False) -> dict:
    """Task-level sensitivity of every weighted node of a calibrated graph: the score drop with only
    this node quantized (its weights and output quantizer) against float, and the score gained with
    all but this node quantized against everything quantized. 2 evaluations per node plus 2; nodes
    that share their quantizers share the evaluations (cached by the set of quantizers switched)."""
    quantizers = {name: m for name, m in qat.named_modules() if is_quantizer(m) and hasattr(m, "enable_fake_quant")}
    saved = {name: bool(m.fake_quant_enabled[0]) for name, m in quantizers.items()}
    own = {node.name: {q for q in (info.weight_quantizer, info.output_quantizer_module) if q in quantizers}
           for node, info in meta.quantized_nodes(qat)}
    cache: dict[frozenset, float] = {}
    was_training = qat.training
    qat.eval()

    def score(enabled: frozenset) -> float:
        if enabled not in cache:
            for name, m in quantizers.items():
                m.enable_fake_quant(name in enabled)
            cache[enabled] = _score(evaluate, qat)
        return cache[enabled]

    everything = frozenset(quantizers)
    bar = progress_bar(total=len(own), desc="sensitivity", enabled=progress)
    try:
        float_score, quant_score = score(frozenset()), score(everything)
        out = {}
        for node, mine in own.items():
            out[node] = {"only": float_score - score(frozenset(mine)),
                         "all_but": score(everything - mine) - quant_score}
            bar.update(1)
    finally:
        bar.close()
        for name, m in quantizers.items():
            m.enable_fake_quant(saved[name])
        qat.train(was_training)
    return out


def _progress(batches: Iterable, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(batches, desc=desc, disable=not enabled, leave=False, file=sys.stderr)


def analyze(model, example_inputs, batches, *, config: QuantConfig, policy, out_dir, lower: str | None = None,
            evaluate: Callable | None = None, progress: bool = False, title: str | None = None) -> Analysis:
    """Run the analysis and write ``out_dir/report.html``, ``report.json`` and the PNG plots."""
    batches = list(batches)
    if not batches:
        raise InputError("the batches are empty; give at least one calibration batch.")
    timings = {}

    def timed(name, fn, *args, **kwargs):
        start = time.perf_counter()
        value = fn(*args, **kwargs)
        timings[name] = round(time.perf_counter() - start, 3)
        return value

    qat = timed("prepare", api.prepare, model, example_inputs, config=config)
    timed("calibrate", api.calibrate, qat, _progress(batches, "calibrate", progress))
    report = timed("measure_error", api.measure_error, qat, _progress(batches, "measure_error", progress))
    sens = timed("sensitivity", sensitivity, qat, evaluate, progress=progress) if evaluate is not None else None
    selection = timed("select_trainable", api.select_trainable, qat, report, policy=policy)
    parity = None
    if lower is not None:
        options = {} if lower == "torch" else {"example_inputs": batches[0] if isinstance(batches[0], tuple)
                                               else (batches[0],)}
        lowered = timed(f"lower_{lower}", api.lower, qat, runtime=lower, **options)
        parity = timed("check_parity", api.check_parity, qat, lowered, _progress(batches, "check_parity", progress))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_dict = {k: (repr(v) if not isinstance(v, (int, float, str, bool, type(None))) else v)
                   for k, v in dataclasses.asdict(config).items()}
    images = report.plots(selection=selection, parity=parity, sensitivity=sens, policy=policy)
    files = {}
    for name, data in images.items():
        (out / name).write_bytes(data)
        files[name] = str(out / name)
    (out / "report.html").write_text(report_html.render_html(
        report, selection=selection, policy=policy, parity=parity, sensitivity=sens, config=config_dict,
        timings=timings, title=title or "fxptqat sensitivity report", images=images), encoding="utf-8")
    files["report.html"] = str(out / "report.html")
    doc = {"report": json.loads(report.to_json()), "selection": json.loads(selection.to_json()),
           "policy": repr(policy), "config": config_dict, "timings_s": timings, "sensitivity": sens,
           "parity": None if parity is None else {
               "ok": parity.ok, "coverage": parity.coverage, "first_divergence": parity.first_divergence,
               "rows": [dataclasses.asdict(r) for r in parity.rows], "not_compared": list(parity.not_compared)}}
    (out / "report.json").write_text(json.dumps(doc, indent=1, default=str), encoding="utf-8")
    files["report.json"] = str(out / "report.json")
    return Analysis(report=report, selection=selection, parity=parity, sensitivity=sens, timings=timings, files=files)


def run_cli(spec: str, *, bits: str, policy: str, out: str, lower: str | None, progress: bool) -> Analysis:
    config = QuantConfig(**parse_bits(bits))
    chosen = parse_policy(policy)
    fn = load_function(spec)
    try:
        result = fn()
    except FxptqatError:
        raise
    except Exception as e:
        raise InputError(f"{spec}: calling it raised {type(e).__name__}: {e}") from e
    model, example_inputs, batches, evaluate = unpack(result)
    return analyze(model, example_inputs, batches, config=config, policy=chosen, out_dir=out, lower=lower,
                   evaluate=evaluate, progress=progress, title=f"fxptqat analyze {spec} ({bits})")
