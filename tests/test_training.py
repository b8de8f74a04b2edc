"""fxptqat.training: the one step loop, its helpers, and the import layering around it."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxptqat as fq
from fxptqat.planning import plan_qat
from fxptqat.training import QATSchedule, cycle, make_optimizer, train_steps

ROOT = Path(__file__).resolve().parents[1]


def _data(n=3):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 3, generator=g), torch.randint(0, 2, (4,), generator=g)) for _ in range(n)]


def test_train_steps_order_clipping_lrs_and_losses():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = make_optimizer("sgd", model.parameters(), lr=0.1, owner="t")
    calls, lrs, norms = [], [], []
    opt.register_step_pre_hook(lambda *_: norms.append(
        float(torch.cat([p.grad.flatten() for p in model.parameters()]).norm())))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (t + 1))
    model.eval()
    losses = train_steps(model, cycle(_data(), "t"), F.cross_entropy, opt, 5, owner="t", scheduler=sched,
                         before_step=lambda: calls.append(model.training), max_grad_norm=1e-3, lrs=lrs)
    assert len(losses) == 5 and calls == [True] * 5  # train mode, hook before every forward
    assert lrs == pytest.approx([0.1 / (t + 1) for t in range(5)])  # recorded before the scheduler steps
    assert max(norms) <= 1e-3 * (1 + 1e-5)  # clipped before the optimizer step


def test_train_steps_continues_a_loss_list_and_numbers_steps_in_errors():
    model = nn.Linear(3, 2)
    opt = make_optimizer("adam", model.parameters(), lr=1e-3, owner="t")
    losses = train_steps(model, cycle(_data(), "t"), F.cross_entropy, opt, 2, owner="t")
    with pytest.raises(fq.CalibrationError, match="owner: loss became nan at step 2"):
        train_steps(model, cycle(_data(), "t"), lambda out, y: out.sum() * float("nan"), opt, 1,
                    owner="owner", losses=losses)


def test_cycle_restarts_only_when_asked_and_rejects_an_empty_loader():
    passes = []

    class Loader:
        def __iter__(self):
            passes.append(1)
            return iter([1, 2])

    stream = cycle(Loader(), "t")
    assert [next(stream) for _ in range(4)] == [1, 2, 1, 2] and len(passes) == 2
    with pytest.raises(fq.InputError, match="t: the loader yielded no batch"):
        next(cycle([], "t"))


def test_make_optimizer_kinds_and_message():
    params = [nn.Parameter(torch.zeros(1))]
    assert isinstance(make_optimizer("adamw", params, lr=1.0, owner="t"), torch.optim.AdamW)
    with pytest.raises(fq.ConfigError, match=r"choose 'adam' or 'sgd'\."):
        make_optimizer("adamw", params, lr=1.0, owner="t", choices=("adam", "sgd"))
    with pytest.raises(fq.ConfigError, match=r"choose 'adamw', 'adam' or 'sgd'\."):
        make_optimizer("lion", params, lr=1.0, owner="t")


def test_a_qat_plan_is_a_qat_schedule():
    assert isinstance(plan_qat(params=1000, bits=4, tokens_per_step=8, total_steps=40, fraction=0.25), QATSchedule)
    assert not isinstance("fused", QATSchedule)


@pytest.mark.parametrize("first", ["fxptqat.planning", "fxptqat.finetune", "fxptqat.planning.run", "fxptqat.training"])
def test_no_import_cycle_and_the_library_imports_no_examples(first):
    code = (
        f"import sys, {first}, fxptqat, fxptqat.planning\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('mlxtend', 'sklearn')"
        " or m.startswith('fxptqat.examples'))\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_the_core_never_imports_planning():
    package = ROOT / "fxptqat"
    core = [p for p in package.rglob("*.py")
            if p.name != "cli.py" and p.relative_to(package).parts[0] not in ("planning", "examples")]
    offenders = [p.name for p in core if "planning" in "".join(
        line for line in p.read_text().splitlines(keepends=True) if line.lstrip().startswith(("from ", "import ")))]
    assert not offenders


def test_import_fxptqat_needs_no_numpy_onnx_or_examples_deps():
    # numpy is not a declared dependency: only the onnxruntime lowering (lazily) and the examples use it
    code = ("import sys\n"
            "for name in ('numpy', 'onnx', 'onnxruntime', 'mlxtend', 'sklearn'):\n"
            "    sys.modules[name] = None\n"
            "import fxptqat, fxptqat.planning, fxptqat.passes, fxptqat.testing, fxptqat.lowering\n"
            "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]
