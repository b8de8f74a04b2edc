"""The ONNX exporter's graph optimization, without the cost of one rule that cannot apply.

``torch.onnx.export(..., optimize=True)`` runs onnxscript's optimizer (constant folding plus about
46 rewrite rules, twice) and then its fusions. On DenseNet-121 (5,091 ONNX nodes) that took 42 s
of a 117 s lowering at one thread, and 33 s of it was one rule: ``SlicesSplit``, which rewrites
``Slice(x), Slice(x)`` into ``Split(x)``. Its two-output pattern goes through onnxscript's generic
multi-output matcher, whose cost per attempt grows with the graph (8,776 attempts, 3.7 ms each).

The rule can only match where one value feeds two ``Slice`` nodes, and none of the rules that run
before it in a rewrite step creates a ``Slice``. :func:`optimize` runs the same pipeline as
onnxscript's ``optimize_ir`` + ``onnx_fusions.fuse`` (what the exporter calls), and leaves that rule
out of a rewrite step only when the graph has no such pair at that step (a graph that has one when
exported goes through ``program.optimize()`` itself): the result is the same model. It uses onnxscript internals (the default rule tuple, the constant-folding pass), so it runs
only on the onnxscript versions it was checked against (``tests/test_lowering_onnx.py`` compares the
two models node by node); on any other version, or if those internals moved, it calls the
exporter's own ``program.optimize()``.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

# onnxscript versions (major.minor) whose optimize_ir pass list this module reproduces
CHECKED_VERSIONS = ("0.7",)
SKIPPED_RULE = "SlicesSplit"


def _has_slice_pair(model) -> bool:
    """Whether some value in ``model`` (its graph, subgraphs or functions) is the data input of two or
    more Slice nodes."""
    seen: set[int] = set()
    nodes = [*model.graph.all_nodes()]
    for function in model.functions.values():
        nodes.extend(function.all_nodes())
    for node in nodes:
        if node.op_type == "Slice" and node.domain in ("", "ai.onnx") and node.inputs and node.inputs[0] is not None:
            key = id(node.inputs[0])
            if key in seen:
                return True
            seen.add(key)
    return False


def _pipeline():
    """The pass objects of onnxscript's ``optimize_ir`` with a rewrite step that skips SlicesSplit
    when it cannot match; raises ImportError/AttributeError when the internals are not as checked."""
    import onnx_ir as ir
    import onnx_ir.passes.common as common
    import onnxscript
    from onnxscript import rewriter
    from onnxscript.optimizer import _constant_folding
    from onnxscript.rewriter import onnx_fusions, pattern

    if ".".join(onnxscript.__version__.split(".")[:2]) not in CHECKED_VERSIONS:
        raise ImportError(f"onnxscript {onnxscript.__version__} is not one of {CHECKED_VERSIONS}")
    everything = tuple(rewriter._DEFAULT_REWRITE_RULES)
    without = tuple(r for r in everything if getattr(r, "name", None) != SKIPPED_RULE)
    if len(without) != len(everything) - 1:
        raise AttributeError(f"onnxscript's default rules do not hold exactly one {SKIPPED_RULE}")
    full, reduced = pattern.RewriteRuleSet(list(everything)), pattern.RewriteRuleSet(list(without))

    class Rewrite(ir.passes.InPlacePass):
        def call(self, model):
            rules = full if _has_slice_pair(model) else reduced
            return ir.passes.PassResult(model, bool(rules.apply_to_model(model)))

    passes = ir.passes.Sequential(
        common.InlinePass(),
        ir.passes.PassManager(
            [
                _constant_folding.FoldConstantsPass(
                    shape_inference=True,
                    input_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
                    output_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT,
                    should_fold=lambda node: None,
                ),
                Rewrite(),
                common.RemoveUnusedNodesPass(),
                common.RemoveUnusedFunctionsPass(),
                common.RemoveUnusedOpsetsPass(),
            ],
            steps=2,
            early_stop=True,
        ),
        common.RemoveUnusedNodesPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.LiftSubgraphInitializersToMainGraphPass(),
        common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(),
        common.OutputFixPass(),
        common.NameFixPass(),
    )
    return passes, onnx_fusions.fuse


def optimize(program) -> str:
    """Optimize a ``torch.onnx.ONNXProgram`` exported with ``optimize=False`` in place, the same way
    ``program.optimize()`` does; returns which path ran: ``"fast"``, or ``"exporter"`` (an onnxscript
    version this module was not checked against, or a graph where one value feeds two Slices: a ViT's
    q/k/v split has three; there the rule can match and the exporter's own code runs)."""
    try:
        passes, fuse = _pipeline()
    except (ImportError, AttributeError, TypeError) as e:
        log.info("ONNX optimization through the exporter (%s)", e)
        program.optimize()
        return "exporter"
    if _has_slice_pair(program.model):  # the rule may apply: nothing to save, the exporter's own code runs
        program.optimize()
        return "exporter"
    passes(program.model)
    fuse(program.model)
    return "fast"
