"""Graph passes of fxptqat, installed as ``fxptqat.passes``.

Each pass is ``def name(gm, /, *, options) -> PassResult``: in place, ``modified`` honest, idempotent,
and declares in ``REQUIRES`` the graph it acts on:

``"float"`` -- the traced float graph, inside capture (``fxptqat/capture/fx.py``):
    drop_identities, drop_rank_asserts, batch_norm_modules, fold_parameter_metadata, split_shared_modules,
    insert_fake_quant (float -> QAT: the one place that calls torch.ao's ``prepare_qat_fx``).
``"qat"`` -- the annotated fake-quant graph (``NodeInfo`` on every weighted node):
    float_readers, collapse_requantize, drop_output_quantizers, fit_observers_to_clamps (all still inside capture), freeze_quantizers
    (calibration), mark_trainable (selection).
``"int8"`` -- a lowered graph (``fxptqat/lowering``): the torch.ao INT8 module or its reference graph:
    snap_weights, clamp_int_weights, float_scalar_ops, drop_noop_clamps, replace_quantized_prelu, pack_with_engine,
    explicit_ceil_pooling (on the copy of the reference graph that inductor compiles).

Passes never call passes; the library's steps compose them.
"""

GRAPHS = ("float", "qat", "int8")
