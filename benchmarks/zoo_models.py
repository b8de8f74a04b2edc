"""Models of the zoo benchmark: torchvision's classification architectures and a timm selection.

torchvision on PyPI is a CUDA-linked build whose C++ op registrations fail against the CPU torch
here; :func:`import_torchvision` imports it with those registrations skipped (the shim of
``shared/ENVIRONMENT.md``; benchmark-only code, never library code). timm imports torchvision, so
:func:`import_timm` goes through the shim too.

Random weights lose their signal: :func:`give_signal` re-initialises all-zero ``Linear`` weights
(torchvision's ViT head, heads of timm's "jax" init) and all-zero norm gains (residual branches
zeroed at init), then re-estimates BatchNorm statistics on a few batches (BatchNorms in train
mode, ``momentum=None``: the plain average over the batches).

The peers fxptqat's INT8 fidelity is compared with: torchao PT2E + ``X86InductorQuantizer``
(:func:`pt2e`, as ``build_pt2e`` in ``deploy.py`` but run in eager) and torch.ao's default FX
recipe (:func:`fx_default`); :func:`cosine` is the fidelity metric. At the end: what the
JSON records about the machine (``lscpu`` model name, versions, peak RSS).
"""

from __future__ import annotations

import contextlib
import copy
import math
import platform
import subprocess
from pathlib import Path

import torch
from torch import nn

# At least one per family: ViT, DeiT, ConvNeXt, EfficientNet, MobileNetV3, RegNet, ResNet variants,
# Swin, MobileViT, MLP-Mixer, GhostNet, MetaFormer (PoolFormer), EdgeNeXt, LeViT, EfficientFormer.
TIMM_MODELS = (
    "vit_tiny_patch16_224", "deit_tiny_patch16_224", "convnext_atto", "efficientnet_b0",
    "mobilenetv3_small_100", "regnety_002", "resnet18d", "resnext26ts", "seresnet18",
    "swin_tiny_patch4_window7_224", "mobilevit_xxs", "mixer_s16_224", "ghostnet_100",
    "poolformer_s12", "edgenext_xx_small", "levit_128s", "efficientformer_l1",
)
# Models whose architecture needs a larger input than the benchmark's default 64 px.
MIN_IMAGE_SIZE = {"inception_v3": 75, "maxvit_t": 224, "timm/efficientformer_l1": 224}
NUM_CLASSES = 1000


@contextlib.contextmanager
def _skip_torchvision_registrations():
    import torch.library as L

    fake, autograd = L.register_fake, L.register_autograd

    def skip(real):
        def wrapper(op, *args, **kwargs):
            if isinstance(op, str) and op.startswith("torchvision::"):
                return (lambda fn: fn) if not args else None
            return real(op, *args, **kwargs)
        return wrapper

    L.register_fake, L.register_autograd = skip(fake), skip(autograd)
    try:
        yield
    finally:
        L.register_fake, L.register_autograd = fake, autograd


def import_torchvision():
    with _skip_torchvision_registrations():
        import torchvision
    return torchvision


def import_timm():
    import_torchvision()
    import timm
    return timm


def torchvision_models() -> list[str]:
    tv = import_torchvision()
    return list(tv.models.list_models(module=tv.models))


def all_models() -> list[str]:
    """Every torchvision classification architecture, then the timm ones as ``timm/NAME``."""
    return torchvision_models() + [f"timm/{arch}" for arch in TIMM_MODELS]


def source_of(name: str) -> str:
    return "timm" if name.startswith("timm/") else "torchvision"


def image_size_for(name: str, image_size: int) -> int:
    """The input size used for ``name``: the benchmark's, raised to what the architecture needs."""
    size = max(image_size, MIN_IMAGE_SIZE.get(name, 0))
    patch = _torchvision_patch(name)
    return math.ceil(size / patch) * patch if patch else size


def _torchvision_patch(name: str) -> int | None:
    if source_of(name) == "torchvision" and name.startswith("vit_"):
        return int(name.rsplit("_", 1)[1])  # vit_b_16 -> 16
    return None


def build(name: str, image_size: int) -> tuple[nn.Module, str, int]:
    """``(model, source, image size used)``, random weights, eval mode."""
    torch.manual_seed(0)
    size = image_size_for(name, image_size)
    if source_of(name) == "timm":
        timm, arch = import_timm(), name.removeprefix("timm/")
        try:
            model = timm.create_model(arch, pretrained=False, num_classes=NUM_CLASSES, img_size=size)
        except TypeError:  # CNNs take no img_size
            model = timm.create_model(arch, pretrained=False, num_classes=NUM_CLASSES)
        return model.eval(), "timm", size
    tv = import_torchvision()
    kwargs = {"image_size": size} if _torchvision_patch(name) else {}
    return tv.models.get_model(name, weights=None, **kwargs).eval(), "torchvision", size


def inputs(batch: int, size: int, seed: int, n: int) -> list[tuple[torch.Tensor]]:
    """``n`` batches of ``torch.randn`` images, from a fixed seed."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, size, size, generator=gen),) for _ in range(n)]


def benchmark_data(batch: int, size: int, calib_batches: int) -> dict:
    """The zoo's images, from fixed seeds: ``calib`` (calibration), ``signal`` (BatchNorm
    re-estimation, :func:`give_signal`) and ``x`` (the evaluation batch), all disjoint."""
    return {"calib": inputs(batch, size, seed=1, n=calib_batches),
            "signal": inputs(batch, size, seed=2, n=calib_batches),
            "x": inputs(batch, size, seed=3, n=1)[0][0]}


# A float reference whose logit norm on one image is over this many times its median over the
# calibration and evaluation images is ill-conditioned: see :func:`logit_norm_spread`.
ILL_CONDITIONED_SPREAD = 10.0


def logit_norm_spread(model: nn.Module, batches: list[tuple[torch.Tensor]]) -> dict:
    """How evenly the float model responds to the benchmark's images: per-image L2 norm of the FP32
    logits over ``batches``, its median and max / median.

    Random-weight deep networks can be chaotic: re-estimated BatchNorms normalise the images they were
    estimated on, but on other N(0, 1) images a few channels explode and some logits come out
    thousands of times larger than the rest (random EfficientNet-B7 / V2-M / V2-L at 64 px: spreads of
    1e3-2e4; B7 105 and V2-M 37 at 224 px). A per-tensor INT8 range calibrated on such images is set by the
    exploding ones, the other images quantize to almost nothing, and every recipe's cosine to FP32
    (PT2E's included) is then a draw of which images survive, not a measure of the recipe."""
    norms = []
    with torch.no_grad():
        for args in batches:
            norms.append(logits(model(*args)).flatten(1).double().norm(dim=1))
    norms = torch.cat(norms)
    median = float(norms.median())
    spread = float(norms.max()) / median if median > 0 else float("inf")
    return {"images": int(norms.numel()), "median": round(median, 4), "max_over_median": round(spread, 2),
            "ill_conditioned": spread > ILL_CONDITIONED_SPREAD}


def give_signal(model: nn.Module, batches: list[tuple[torch.Tensor]]) -> dict:
    """Re-initialise all-zero heads and norm gains, re-estimate BatchNorm statistics; what was done."""
    gen = torch.Generator().manual_seed(0)
    linears = norms = bns = 0
    with torch.no_grad():
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if not isinstance(weight, torch.Tensor) or weight.numel() == 0 or bool(weight.any()):
                continue
            if isinstance(module, nn.Linear):
                weight.copy_(torch.randn(weight.shape, generator=gen) / math.sqrt(weight.shape[1]))
                linears += 1
            elif isinstance(module, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)):
                weight.fill_(1.0)
                norms += 1
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
                module.reset_running_stats()
                module.momentum, module.zoo_momentum = None, module.momentum
                module.train()  # only the BatchNorms: no auxiliary heads, dropout or drop-path
                bns += 1
        if bns:
            for args in batches:
                model(*args)
        for module in model.modules():
            if hasattr(module, "zoo_momentum"):
                module.momentum = module.zoo_momentum
                del module.zoo_momentum
    model.eval()
    return {"zero_linears_reinit": linears, "zero_norms_reinit": norms, "batchnorms_reestimated": bns}


# -- fidelity and the peer INT8 recipes --------------------------------------------------------------
def logits(out) -> torch.Tensor:
    while isinstance(out, (tuple, list)):
        out = out[0]
    out = torch.as_tensor(out)
    return out.dequantize() if out.is_quantized else out


def cosine(ref: torch.Tensor, out) -> dict:
    c = torch.nn.functional.cosine_similarity(ref.flatten(1).double(), logits(out).flatten(1).double(), dim=1)
    return {"cosine_mean": round(float(c.mean()), 6), "cosine_min": round(float(c.min()), 6)}


def evaluate(model, x: torch.Tensor):
    with torch.no_grad():
        return model(x)


class _FunctionalReLU(nn.Module):
    def forward(self, x):
        return torch.nn.functional.relu(x)


def unshare_relus(model: nn.Module) -> nn.Module:
    """A copy whose nn.ReLU modules call F.relu: torchvision's ResNet blocks call one ReLU module
    twice, which X86InductorQuantizer refuses; the function is the same, each call its own node."""
    model = copy.deepcopy(model)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.ReLU:
                setattr(module, name, _FunctionalReLU())
    return model


def pt2e(model, calib, x):
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    exported = torch.export.export(model, calib[0]).module()
    try:
        prepared = prepare_pt2e(exported, quantizer)
    except ValueError as e:  # "Input partition has more than one output node": a ReLU module called twice
        if "more than one output node" not in str(e):
            raise
        prepared = prepare_pt2e(torch.export.export(unshare_relus(model), calib[0]).module(), quantizer)
    for args in calib:
        evaluate(prepared, *args)
    return evaluate(convert_pt2e(prepared), x)


def fx_default(model, calib, x):
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = "x86"
    try:
        prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping("x86"), calib[0])
        for args in calib:
            evaluate(prepared, *args)
        return evaluate(convert_fx(prepared), x)
    finally:
        torch.backends.quantized.engine = previous


PEERS = {"pt2e": pt2e, "fx_default": fx_default}


# -- the machine ------------------------------------------------------------------------------------
def lscpu_model() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    importers = {"torchvision": import_torchvision, "timm": import_timm}
    for pkg in ("torchvision", "timm", "torchao", "onnxruntime", "onnx"):
        try:
            out[pkg] = (importers[pkg]() if pkg in importers else __import__(pkg)).__version__
        except Exception as e:
            out[pkg] = f"missing ({type(e).__name__})"
    return out


def fxptqat_source() -> dict:
    """Which fxptqat ran: its directory, a hash of its sources, the git commit and local edits if any."""
    import hashlib

    import fxptqat
    import fxptqat.passes  # /passes in the repository, fxptqat/passes once installed

    root, passes = (Path(m.__file__).resolve().parent for m in (fxptqat, fxptqat.passes))
    digest = hashlib.sha256()
    for f in sorted({*root.rglob("*.py"), *passes.rglob("*.py")}):
        digest.update(f.read_bytes())
    out = {"path": str(root), "sha256": digest.hexdigest()[:16], "git_head": None, "git_dirty": None}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        git = ["git", "-C", str(root)]
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode == 0:
            status = subprocess.run([*git, "status", "--porcelain", "--", str(root), str(passes)],
                                    capture_output=True, text=True, timeout=10)
            out.update(git_head=head.stdout.strip(), git_dirty=bool(status.stdout.strip()))
    return out


def peak_rss_mb() -> float | None:
    """This process's resident-set high-water mark (``VmHWM``) since :func:`reset_peak_rss`."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return None


def reset_peak_rss() -> None:
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
