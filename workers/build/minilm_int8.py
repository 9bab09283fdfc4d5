"""The minilm int8 rewrite: per-token int8 activations, SmoothQuant, GPTQ weights.

Every MatMul with a constant weight becomes a com.microsoft ``MatMulIntegerToFloat`` on an
input quantized per row (token), so a sentence's embedding does not depend on its
batch-mates; the word embeddings become uint8 blocks (``GatherBlockQuantized``).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from workers.build.minilm_eval import BuildError


@dataclass(frozen=True)
class InputPlan:
    """How the input of one kind of MatMul is quantized."""

    outliers: int = 0  # channels with the largest calibrated |x| kept in fp32 (LLM.int8)
    center: bool = False  # subtract the calibrated per-channel mean (folded into the bias)
    shift: float = 0.0  # add this so the input is >= 0, then use uint8's full 0..255
    alpha: float = 0.5  # SmoothQuant migration strength


# Weights use -63..63 (7 bits, ORT's reduce_range): on x86 CPUs without VNNI, ORT's u8s8
# kernels add pairs of uint8 x int8 products in 16 bits, and 255 * 127 * 2 overflows
# (saturates) where 255 * 63 * 2 does not. With full-range weights nearest-neighbour
# agreement fell to 0.95 on an AVX2-only EPYC (0.97+ on a VNNI CPU); the artifact must be
# right on whatever CPU serves it.
WEIGHT_LEVELS = 63
GELU_SHIFT = 0.17  # erf-GELU's minimum is -0.16997
# fp32 outlier channels for qkv and ffn_out only: those for ffn_in (4) cost ~6% of the speed
# (an fp32 [tokens, 1536] MatMul and Add per layer) for a mean cosine of 0.99981 instead of
# 0.99977; nearest-neighbour agreement is decided by ~14 near-tied held-out sentences and
# moves by +-0.01 with any rounding change either way (see minilm.OPTIONS_EXPLORED).
PLANS = {"qkv": InputPlan(4, center=True), "attn_out": InputPlan(),
         "ffn_in": InputPlan(0, center=True), "ffn_out": InputPlan(8, shift=GELU_SHIFT)}
EMBEDDING_BLOCK = 128
FLOAT = 1  # onnx.TensorProto.FLOAT
OPSET = 21  # QuantizeLinear with a [tokens, 1] scale (blocked) is ~35% faster than per-axis


def _kind(matmul: str) -> str:
    for marker, kind in (("/attention/self/", "qkv"), ("/attention/output/dense/", "attn_out"),
                         ("/intermediate/dense/", "ffn_in"), ("/output/dense/", "ffn_out")):
        if marker in matmul:
            return kind
    raise BuildError(f"unexpected MatMul {matmul!r} in the minilm graph")


def gptq(w: np.ndarray, hessian: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Round ``w`` (K, N) to int8 row by row, pushing each row's error onto the rows left.

    GPTQ with act-order: the calibration Hessian X^T X says how to compensate so X @ W
    changes least; rows with the largest activations go first.
    """
    order = np.argsort(-np.diag(hessian))
    w = w[order].astype(np.float64)
    h = hessian[np.ix_(order, order)]
    h = h + 0.01 * np.mean(np.diag(h)) * np.eye(len(h))
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    q = np.empty_like(w)
    for k in range(len(w)):
        q[k] = np.clip(np.round(w[k] / scale), -WEIGHT_LEVELS, WEIGHT_LEVELS)
        err = (w[k] - q[k] * scale) / u[k, k]
        w[k + 1:] -= np.outer(u[k, k + 1:], err)
    return q[np.argsort(order)].astype(np.int8)


def capture(path: Path, feeds: list[dict[str, np.ndarray]], names: list[str]) -> dict[str, Any]:
    """The value of each named tensor for every real (unpadded) token of ``feeds``."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    for name in names:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    values: dict[str, list[np.ndarray]] = defaultdict(list)
    for feed in feeds:
        real = feed["attention_mask"].astype(bool)
        for name, value in zip(names, session.run(names, feed), strict=True):
            values[name].append(value[real])
    return {name: np.concatenate(v) for name, v in values.items()}


class _Graph:
    """Appends nodes and constants to an ONNX graph with short names, and builds once the
    tensors every per-token quantization shares (zero points, output shapes)."""

    def __init__(self, graph: Any) -> None:
        from onnx import helper, numpy_helper

        self.graph, self.helper, self.numpy_helper = graph, helper, numpy_helper
        self.nodes: list[Any] = []
        self.shared: dict[Any, str] = {}

    def const(self, name: str, value: Any) -> str:
        self.graph.initializer.append(self.numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], output: str, **attrs: Any) -> str:
        domain = "com.microsoft" if op in ("MatMulIntegerToFloat", "GatherBlockQuantized") else ""
        self.nodes.append(self.helper.make_node(op, inputs, [output], name=output, domain=domain,
                                                **attrs))
        return output

    def lead(self) -> str:
        """[batch, sequence]: the shape of the first graph input, shared by every hidden state."""
        if "lead" not in self.shared:
            self.shared["lead"] = self.node("Shape", [self.graph.input[0].name], "q8_lead")
        return self.shared["lead"]

    def zeros(self, zero: int) -> str:
        """[tokens, 1] of uint8 ``zero``: the zero point of a per-token QuantizeLinear."""
        if "rows" not in self.shared:
            tokens = self.node("ReduceProd", [self.lead()], "q8_tokens", keepdims=1)
            self.shared["rows"] = self.node("Concat", [tokens, self.const("q8_1", np.array([1]))],
                                            "q8_rows", axis=0)
        if zero not in self.shared:
            value = self.numpy_helper.from_array(np.array([zero], np.uint8))
            self.shared[zero] = self.node("ConstantOfShape", [self.shared["rows"]],
                                          f"q8_zeros{zero}", value=value)
        return self.shared[zero]

    def shape(self, n: int) -> str:
        """[batch, sequence, n]."""
        if ("shape", n) not in self.shared:
            self.shared[("shape", n)] = self.node(
                "Concat", [self.lead(), self.const(f"q8_n{n}", np.array([n]))], f"q8_shape{n}",
                axis=0)
        return self.shared[("shape", n)]


def _smoothing(plan: InputPlan, acts: np.ndarray, weights: list[np.ndarray]
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per input channel: kept in int8 (not an outlier), SmoothQuant factor, offset."""
    k = acts.shape[1]
    keep = np.ones(k, bool)
    keep[np.argsort(-np.abs(acts).max(0))[:plan.outliers]] = False
    amax_w = np.max([np.abs(w).max(1) for w in weights], axis=0)
    smooth = np.clip(np.maximum(np.abs(acts).max(0), 1e-5) ** plan.alpha
                     / np.maximum(amax_w, 1e-5) ** (1 - plan.alpha), 1e-2, 1e2)
    offset = np.full(k, -plan.shift) if plan.shift else acts.mean(0) if plan.center else np.zeros(k)
    return keep, smooth, np.where(keep, offset, 0.0)


def _quantize_input(g: _Graph, x: str, plan: InputPlan, acts: np.ndarray,
                    weights: list[np.ndarray]) -> dict[str, Any]:
    """Nodes that smooth, offset and quantize ``x`` per token; what its MatMuls need."""
    k = acts.shape[1]
    if plan.shift and acts.min() < -plan.shift:
        raise BuildError(f"{x} goes down to {acts.min():.3f}, below -{plan.shift}: not a GELU")
    keep, smooth, offset = _smoothing(plan, acts, weights)
    p = "q8" + x.replace("/", "_")
    rows = g.node("Reshape", [x, g.const(p + "_2d", np.array([-1, k]))], p + "_x2")
    src = g.node("Sub", [rows, g.const(p + "_off", offset.astype(np.float32))], p + "_x0") \
        if offset.any() else rows
    xs = g.node("Mul", [src, g.const(p + "_inv", np.where(keep, 1 / smooth, 0).astype(np.float32))],
                p + "_xs")
    axes = g.const(p + "_ax", np.array([1]))
    if plan.shift:  # the input is >= 0 now: scale to 0..255 with zero point 0
        amax, levels, zero = g.node("ReduceMax", [xs, axes], p + "_am"), 255, 0
    else:  # symmetric: -127..127 around 128
        absx = g.node("Abs", [xs], p + "_abs")
        amax, levels, zero = g.node("ReduceMax", [absx, axes], p + "_am"), 127, 128
    scale = g.node("Max", [g.node("Mul", [amax, g.const(p + "_k", np.float32(1 / levels))],
                                  p + "_s0"), g.const(p + "_eps", np.float32(1e-30))], p + "_s")
    hidden = (acts[:, keep] - offset[keep]) / smooth[keep]
    inputs = {  # one block of k per row: QuantizeLinear takes the [tokens, 1] scale as it is
        "q": g.node("QuantizeLinear", [xs, scale, g.zeros(zero)], p + "_q", axis=1, block_size=k),
        "row_scale": scale, "zero": g.const(p + "_zp", np.uint8(zero)),
        "one": g.const(p + "_one", np.float32(1)),
        "keep": keep, "smooth": smooth, "offset": offset, "hessian": hidden.T @ hidden,
    }
    if plan.outliers:
        inputs["xo"] = g.node("Gather", [rows, g.const(p + "_oi", np.flatnonzero(~keep))],
                              p + "_xo", axis=1)
    return inputs


def _quantize_matmul(g: _Graph, node: Any, w: np.ndarray, bias: np.ndarray, output: str,
                     q: dict[str, Any]) -> None:
    """int8 MatMul on the quantized input, fp32 for the outlier rows, then the bias (with the
    offset's share): the bias Add's ``output``, [batch, sequence, n].

    The bias is added before the Reshape on purpose: ORT's BiasGelu (Add + Gelu fused) is
    slower on this CPU than Add and Gelu apart.
    """
    keep, name = q["keep"], "q8" + node.name.replace("/", "_")
    wk = w[keep] * q["smooth"][keep, None]
    scale = np.maximum(np.abs(wk).max(0), 1e-12) / WEIGHT_LEVELS
    wq = np.zeros(w.shape, np.int8)
    wq[keep] = gptq(wk, q["hessian"], scale)
    y = g.node("MatMulIntegerToFloat", [q["q"], g.const(name + "_w", wq), q["one"],
                                        g.const(name + "_ws", scale.astype(np.float32)),
                                        q["zero"]], name + "_f")
    y = g.node("Mul", [y, q["row_scale"]], name + "_y")
    if "xo" in q:  # fp16 on disk; ORT folds the Cast once at load
        wo = g.node("Cast", [g.const(name + "_wo", w[~keep].astype(np.float16))], name + "_wo32",
                    to=FLOAT)
        y = g.node("Add", [y, g.node("MatMul", [q["xo"], wo], name + "_yo")], name + "_ya")
    b = g.const(name + "_b", (bias + q["offset"][keep] @ w[keep]).astype(np.float32))
    g.node("Reshape", [g.node("Add", [y, b], name + "_yb"), g.shape(w.shape[1])], output)


def _quantize_embedding(g: _Graph, node: Any, table: np.ndarray) -> None:
    """Word embeddings as uint8 blocks of EMBEDDING_BLOCK with one scale each."""
    v, h = table.shape
    blocks = table.reshape(v, h // EMBEDDING_BLOCK, EMBEDDING_BLOCK)
    scales = np.maximum(np.abs(blocks).max(2), 1e-12) / 127
    data = (np.round(blocks / scales[:, :, None]) + 128).astype(np.uint8).reshape(v, h)
    p = "q8" + node.name.replace("/", "_")
    g.node("GatherBlockQuantized",
           [g.const(p + "_d", data), node.input[1], g.const(p + "_s", scales.astype(np.float32)),
            g.const(p + "_z", np.full(scales.shape, 128, np.uint8))], node.output[0],
           bits=8, block_size=EMBEDDING_BLOCK, gather_axis=0, quantize_axis=1)


def untranspose_keys(graph: Any) -> int:
    """Q @ K^T with K laid out [batch, head, sequence, dim] and ``transB``: the exported
    graph transposes K with perm (0, 2, 3, 1), which moves the innermost axis and costs
    ORT ~6% of the int8 model's time; (0, 2, 1, 3) copies rows of 32 floats instead."""
    from onnx import helper

    producer = {o: n for n in graph.node for o in n.output}
    changed = 0
    for n in graph.node:
        t = producer.get(n.input[1]) if n.op_type == "MatMul" else None
        perm = next((list(a.ints) for a in t.attribute if a.name == "perm"), None) if t else None
        if t is None or t.op_type != "Transpose" or perm != [0, 2, 3, 1]:
            continue
        t.attribute[0].ints[:] = [0, 2, 1, 3]
        n.CopyFrom(helper.make_node("FusedMatMul", list(n.input), list(n.output), name=n.name,
                                    domain="com.microsoft", transB=1))
        changed += 1
    return changed


def _to_opset(model: Any, version: int) -> None:
    """Raise the default opset to ``version`` (>= 18): reductions take ``axes`` as an input."""
    from onnx import numpy_helper

    for n in model.graph.node:
        axes = next((a for a in n.attribute if a.name == "axes"), None)
        if n.domain in ("", "ai.onnx") and n.op_type.startswith("Reduce") and axes is not None:
            name = n.output[0] + "_axes"
            model.graph.initializer.append(
                numpy_helper.from_array(np.array(list(axes.ints), np.int64), name))
            n.attribute.remove(axes)
            n.input.append(name)
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = max(opset.version, version)


def _bias(node: Any, consumers: dict[str, list[Any]], inits: dict[str, Any]) -> tuple[Any, str]:
    """The Add that follows MatMul ``node`` with a constant bias, and that bias's name."""
    add = consumers[node.output[0]]
    bias = next((i for i in add[0].input if i in inits), None) if len(add) == 1 else None
    if add[0].op_type != "Add" or bias is None:
        raise BuildError(f"{node.name} is not followed by a bias Add; cannot fold offsets")
    return add[0], bias


def quantize_int8(src: Path, dst: Path, calibration: list[dict[str, np.ndarray]],
                  plans: dict[str, InputPlan] = PLANS) -> None:
    """Per-token int8: every row (token) gets its own activation scale, so a sentence's
    embedding does not depend on its batch-mates (dynamic int8 uses one scale per batch).

    Inputs are smoothed (SmoothQuant), centred or shifted into uint8's range, a few outlier
    channels stay fp32, and weights are rounded with GPTQ, all fitted on ``calibration``.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    consumers: dict[str, list[Any]] = defaultdict(list)
    groups: dict[str, list[Any]] = defaultdict(list)
    for n in graph.node:
        for i in n.input:
            consumers[i].append(n)
        if n.op_type == "MatMul" and n.input[1] in inits:
            groups[n.input[0]].append(n)
    acts = capture(src, calibration, list(groups))
    array = numpy_helper.to_array
    g, done = _Graph(graph), {}
    dropped: set[str] = set()
    skip: set[str] = set()
    for n in graph.node:
        if n.name in skip:
            continue
        if n.op_type == "MatMul" and n.input[1] in inits:
            x = n.input[0]
            if x not in done:
                done[x] = _quantize_input(g, x, plans[_kind(n.name)], acts[x].astype(np.float64),
                                          [array(inits[m.input[1]]) for m in groups[x]])
            add, bias = _bias(n, consumers, inits)
            _quantize_matmul(g, n, array(inits[n.input[1]]).astype(np.float64),
                             array(inits[bias]).astype(np.float64), add.output[0], done[x])
            skip.add(add.name)
            dropped.update((n.input[1], bias))
        elif n.op_type == "Gather" and n.input[0] in inits and "word_embeddings" in n.name:
            _quantize_embedding(g, n, array(inits[n.input[0]]))
            dropped.add(n.input[0])
        else:
            g.nodes.append(n)
    del graph.node[:]
    graph.node.extend(g.nodes)
    kept = [i for i in graph.initializer if i.name not in dropped]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    untranspose_keys(graph)
    _to_opset(model, OPSET)
    model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(dst))
