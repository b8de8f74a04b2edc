"""Rewrites of the exported ONNX QDQ model (a ``ModelProto``, in place) before onnxruntime opens it:
fold the constant weight quantization, widen low-bit weights' integer grid, store uint8 weights.

Only imported when a model is lowered for onnxruntime (``onnx`` and ``numpy`` are optional).
"""

from __future__ import annotations

from ..errors import LoweringError

__all__ = ["fold_weight_quantization", "widen_weight_grid", "weights_to_uint8", "import_onnx"]

_FOLDABLE = ("QuantizeLinear", "Clip", "Cast")
_WIDE = 64.0  # widened weights stay within +-64: exact in 16-bit pair sums of u8 x s8 products


def import_onnx():
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise LoweringError(
            f"lower(runtime='onnxruntime') needs onnx, onnxscript and onnxruntime ({e}); "
            "install them with `pip install fxptqat[onnx]`."
        ) from e
    return onnx, onnxruntime


def _drop_unused_initializers(graph) -> None:
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)


def fold_weight_quantization(model) -> int:
    """Replace constant QuantizeLinear/Clip/Cast chains by their integer results; returns the count.

    The exported graph quantizes each float weight at run time (QuantizeLinear -> Clip to the
    restricted range -> DequantizeLinear); after folding, the int8 weight is the initializer and
    the float one is dropped, so the file holds 1 byte per weight.
    """
    onnx, _ = import_onnx()
    import numpy as np
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    values = {init.name: init for init in graph.initializer}
    opsets = {o.domain: o.version for o in model.opset_import}
    folded = 0
    for node in list(graph.node):
        if node.op_type not in _FOLDABLE or not all(i in values for i in node.input if i):
            continue
        inputs = {name: numpy_helper.to_array(values[name]) for name in node.input if name}
        evaluator = ReferenceEvaluator(onnx.helper.make_graph(
            [node], "fold", [onnx.helper.make_tensor_value_info(n, values[n].data_type, None) for n in inputs],
            [onnx.helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in node.output],
        ), opsets=opsets)
        for name, array in zip(node.output, evaluator.run(None, inputs), strict=True):
            values[name] = numpy_helper.from_array(np.asarray(array), name)
            graph.initializer.append(values[name])
        graph.node.remove(node)
        folded += 1
    _drop_unused_initializers(graph)
    return folded


def widen_weight_grid(model) -> int:
    """Store each int8 weight channel multiplied by the largest power of two k that keeps it and its
    zero point within +-64, its scale divided by k; returns how many weights changed.

    The values are the same ((w*k - z*k) * (s/k) is (w - z) * s in float: k is a power of two), but
    onnxruntime fuses DQ -> Conv/Gemm -> Q into integer kernels by rounding the float bias to int32
    at scale ``input scale * weight scale``, where the fake-quant graph (and torch's fbgemm, oneDNN
    and inductor kernels) add the bias in float. At 2-bit weights that grid is as coarse as the
    output step (the bias moved by up to 0.8 of a step per layer; found by a random draw of the
    lowering property). A b-bit weight stored in int8 leaves bits unused: spending them on the grid
    makes the bias rounding 2^(7-b) times finer. +-64 rather than the full int8 range: u8 x s8
    kernels without AVX-512 VNNI add pairs of products in 16 bits, exact up to |w| = 64 (2 x 255 x
    64 < 2^15), so a widened file is as safe on every CPU as the one it came from. Channels already
    wider (8-bit weights, 7-bit ones using their range) are left as they are. k also keeps the int32
    bias below 2**30.
    """
    onnx, _ = import_onnx()
    import numpy as np
    from onnx import numpy_helper

    graph = model.graph
    values = {init.name: init for init in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def constant_scale(node_input):
        dq = producers.get(node_input)
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[1] not in values:
            return None
        return numpy_helper.to_array(values[dq.input[1]]).astype(np.float64)

    widened = 0
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or len(node.input) < 3:
            continue
        inits = [values.get(i) for i in node.input[:3]]
        if any(i is None for i in inits) or inits[0].data_type != onnx.TensorProto.INT8:
            continue
        w, s, z = (numpy_helper.to_array(i) for i in inits)
        if s.ndim == 0:
            channels, axis = w.reshape(1, -1).astype(np.int64), None
        else:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1) % w.ndim
            channels = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1).astype(np.int64)
        zc = np.broadcast_to(z.astype(np.int64).reshape(-1), (channels.shape[0],))
        hi = np.maximum(channels.max(1), zc)
        lo = np.minimum(channels.min(1), zc)
        limit = np.full(channels.shape[0], 64.0)
        limit = np.where(hi > 0, np.minimum(limit, _WIDE / np.maximum(hi, 1)), limit)
        limit = np.where(lo < 0, np.minimum(limit, _WIDE / np.maximum(-lo, 1)), limit)
        sc = np.broadcast_to(s.astype(np.float64).reshape(-1), (channels.shape[0],))
        for user in consumers.get(node.output[0], []):  # the int32 bias onnxruntime will make
            if user.op_type not in ("Conv", "Gemm") or len(user.input) < 3 or user.input[2] not in values:
                continue
            s_in = constant_scale(user.input[0])
            bias = np.abs(numpy_helper.to_array(values[user.input[2]]).astype(np.float64)).reshape(-1)
            if s_in is None or s_in.size != 1 or bias.size != channels.shape[0] or axis != 0:
                limit[:] = 1.0
                continue
            grid = float(s_in) * sc
            with np.errstate(divide="ignore", invalid="ignore"):
                room = np.where(bias > 0, 2.0**30 * grid / bias, np.inf)
            limit = np.minimum(limit, np.where(grid > 0, room, 1.0))
        limit[(hi == 0) & (lo == 0)] = 1.0  # an all-zero channel: nothing to gain, and stays idempotent
        k = np.exp2(np.floor(np.log2(np.maximum(limit, 1.0))))
        if s.ndim == 0:
            k = np.full_like(k, k.min())
        if (k == 1).all():
            continue
        shape = [1] * w.ndim
        if axis is not None:
            shape[axis] = -1
        kw = k.reshape(shape) if axis is not None else k[0]
        new_w = (w.astype(np.int64) * kw).astype(np.int8)
        new_s = (s.astype(np.float64) / (k if s.ndim else k[0])).astype(s.dtype)
        new_z = (z.astype(np.int64) * (k if z.ndim else k[0])).astype(np.int8)
        for slot, array, init in ((0, new_w, inits[0]), (1, new_s, inits[1]), (2, new_z, inits[2])):
            name = f"{init.name}_wide_{widened}"
            graph.initializer.append(numpy_helper.from_array(np.asarray(array), name))
            node.input[slot] = name
        widened += 1
    _drop_unused_initializers(graph)
    return widened


def weights_to_uint8(model) -> int:
    """Store int8 weights that DequantizeLinear reads as uint8 with zero point 128 (the same values);
    returns how many. Without AVX-512 VNNI, onnxruntime's u8 x s8 kernels add product pairs in 16
    bits (``vpmaddubsw``) and saturate on 8-bit weights with full-range activations; its u8 x u8
    kernels do not (onnxruntime's quantization guide recommends U8U8 there)."""
    onnx, _ = import_onnx()
    import numpy as np
    from onnx import numpy_helper

    graph = model.graph
    values = {init.name: init for init in graph.initializer}
    converted = 0
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or len(node.input) < 3:
            continue
        weight, zero = values.get(node.input[0]), values.get(node.input[2])
        if weight is None or zero is None or weight.data_type != onnx.TensorProto.INT8:
            continue
        # each DequantizeLinear gets its own uint8 copies: the exporter shares equal initializers
        # (every all-zero per-channel zero point of a width is one tensor), and a reader left on
        # int8 would run the saturating kernel
        for slot, init in ((0, weight), (2, zero)):
            array = numpy_helper.to_array(init).astype(np.int16) + 128
            name = f"{init.name}_u8_{converted}"
            graph.initializer.append(numpy_helper.from_array(array.astype(np.uint8), name))
            node.input[slot] = name
        converted += 1
    _drop_unused_initializers(graph)
    return converted
