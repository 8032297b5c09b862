"""What a model.onnx from elsewhere may hold, checked before onnxruntime is given it.

An export is a DVC output (models/<category>.category/<model>.export/): it travels like model.pt and
passes DVC's hash check whatever it holds. onnxruntime runs any valid graph, and a valid graph can
allocate without bound (a 1 kB `ConstantOfShape` of 28000 x 28000 floats takes 3 GB) or never
return (a `Loop` whose condition stays true). So the file is read with the `onnx` package first and
refused, with one line naming it, unless it is a graph of the kind export_onnx writes:

- opset ai.onnx 18 only, no functions, no sparse or training sections, no operator outside
  ALLOWED_OPS (the union of what the exports of every registered method and backbone contain,
  tests/test_onnx_graph.py keeps the two equal); no Loop or Scan, and an If only where its condition
  is a constant of the graph (the exporter's shape check of `squeeze`), of which only the branch
  taken is accepted;
- one input `image`, uint8 (1, S, S, 3), S at most the params schema's MAX_IMAGE_SIDE; outputs
  `score` float32 (1,) and, for models with maps, `anomaly_map` float32 (1, S, S);
- every tensor of a fixed size: each node's output shape is inferred from its inputs' shapes and
  from the constant tensors that feed it (onnx's own shape inference; small constants, such as the
  shape arithmetic of timm's "same" padding, are evaluated by onnx's reference evaluator, and only
  after their size is known), so nothing is computed to learn a size;
- within bounds: the tensors alive at once (in node order, each freed after its last reader) at
  most MAX_PEAK_BYTES, and the work (multiply-adds of MatMul, Gemm and convolutions, plus every
  element each node reads and writes) at most MAX_WORK.

The metadata (threshold, colour scale, input recipe, seed) is checked with the rules of scoring.json
(stages/deploy/record.py), and the recipe's crop against the graph's own input size.

Limits: the bounds are computed with onnx's shape inference, which must agree with what
onnxruntime's kernels do (it does for the operators allowed here); the weights themselves
(initializers, in the file or in files beside it) are not counted: they cost what the files weigh.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from stages.core.errors import PipelineError
from stages.core.params import MAX_IMAGE_SIDE
from stages.core.schema import shown
from stages.deploy.record import check_decision, check_recipe

EXPORT_OPSET = 18  # export_onnx's opset_version

# Every operator the exports of the registered methods and backbones contain (tests/test_onnx_graph.py
# exports each and asserts equality, so a new method or backbone that needs another one fails there, and
# the export stage, which loads its own file through this check, refuses it by name).
ALLOWED_OPS = frozenset({
    "Add", "ArgMax", "ArgMin", "AveragePool", "BatchNormalization", "Cast", "Ceil", "Clip", "Concat", "Constant",
    "ConstantOfShape", "Conv", "ConvTranspose", "Div", "Equal", "Exp", "Expand", "Flatten", "Gather", "Gemm",
    "GlobalAveragePool", "Identity", "If", "LeakyRelu", "MatMul", "MaxPool", "Mul", "Neg", "Pad", "Pow", "Range",
    "ReduceMax", "ReduceMean", "ReduceMin", "ReduceSum", "Relu", "Reshape", "Resize", "Shape", "Sigmoid", "Slice",
    "Softmax", "Sqrt", "Squeeze", "Sub", "Tile", "TopK", "Transpose", "Unsqueeze",
})

# The tensors alive at once, as this check counts them. PatchCore on EfficientNet-Lite0 at 224 px with
# the default bank (7,056 x 128) peaks at 22 MiB; on a WideResNet-50 at the paper's largest crop (320 px)
# with a 10% coreset of MVTec AD's largest category (391 images: 62,560 x 1,024) at 389 MiB (measured on
# such exports). 2 GiB leaves that room five times over, and refuses the 1 kB graph that asks for 3 GB.
MAX_PEAK_BYTES = 2 * 2**30
# Multiply-adds plus elements read and written: the same two exports need 1.1 G and 137 G. 2**39 (550 G:
# seconds to a minute of CPU, by the machine) bounds the time one image can take even when every tensor is
# small (a chain of large matrix products).
MAX_WORK = 2**39
# The checker's own time: the exports hold 50 to 800 nodes (a ViT-B backbone about 1,100) and evaluate
# up to 300 constants; these caps keep a crafted graph's check within seconds.
MAX_NODES = 20_000
MAX_FOLDS = 5_000
FOLD_ELEMENTS = 1 << 16  # constant tensors up to this size are evaluated while checking (shape arithmetic)
MAX_METADATA_CHARS = 1 << 16  # each metadata value (the export's are under 1 kB)
MAX_BRANCH_DEPTH = 4

OUTPUTS = (("score",), ("score", "anomaly_map"))
METADATA_KEYS = ("threshold", "colour_scale", "preprocess", "seed")
RECIPE_NOTES = ("resample", "steps")  # the recipe's words for readers, not values


class Refused(Exception):
    """Why a graph is not one export_onnx writes (becomes one PipelineError line naming the file)."""


@dataclasses.dataclass(frozen=True)
class CheckedGraph:
    side: int  # the image side the graph takes: (1, side, side, 3) uint8
    outputs: tuple[str, ...]
    peak_bytes: int
    work: int
    threshold: float
    colour_scale: dict
    preprocess: dict
    seed: int


def read_checked(path: Path) -> CheckedGraph:
    """Load `path`'s graph (not its external weights) and check it and its metadata; one line if refused."""
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.is_file():  # a FIFO would block the read
        raise PipelineError(f"{path}: not a regular file (a folder, FIFO or device), so not a readable ONNX model")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, OSError, ValueError, RuntimeError) as exc:
        reason = " ".join(str(exc).split())[:120] or type(exc).__name__
        raise PipelineError(f"{path}: not a readable ONNX model ({reason}; rerun the export stage)") from None
    try:
        side, outputs, peak, work = check_graph(model)
    except Refused as exc:
        raise PipelineError(f"{path}: refused before onnxruntime runs it: {exc}; the export stage writes "
                            "no such graph (rerun it)") from None
    except Exception as exc:  # a malformed field the checks above did not foresee: refused all the same
        reason = " ".join(str(exc).split())[:120]
        raise PipelineError(f"{path}: refused before onnxruntime runs it: it could not be checked "
                            f"({type(exc).__name__}: {reason}); rerun the export stage") from None
    return CheckedGraph(side, outputs, peak, work, **read_metadata(model, path, side))


def read_metadata(model, path: Path, side: int) -> dict:
    """threshold, colour_scale, preprocess and seed from the metadata, by scoring.json's rules."""

    def refuse(reason: str) -> PipelineError:
        return PipelineError(f"{path}: its metadata {reason}; rerun the export stage")

    meta = {}
    for entry in model.metadata_props:
        if len(entry.value) > MAX_METADATA_CHARS:
            raise refuse(f"value {shown(entry.key)} is {len(entry.value):,} characters long (the export's are "
                         f"under 1 kB; limit {MAX_METADATA_CHARS:,})")
        meta[entry.key] = entry.value
    missing = [key for key in METADATA_KEYS if key not in meta]
    if missing:
        raise refuse(f"lacks {', '.join(missing)}")
    try:
        threshold = float(meta["threshold"])
        colour_scale = json.loads(meta["colour_scale"])
        recipe = json.loads(meta["preprocess"])
    except (ValueError, RecursionError) as exc:
        raise refuse(f"is not readable ({type(exc).__name__}: {str(exc)[:80]})") from None
    if not check_decision(threshold, colour_scale):
        raise refuse(f"has no usable decision: the threshold ({shown(meta['threshold'])}) and the colour scale's "
                     f"low and high ({shown(colour_scale)}) must be finite numbers")
    if isinstance(recipe, dict):
        recipe = {key: value for key, value in recipe.items() if key not in RECIPE_NOTES}
    try:
        preprocess = check_recipe(recipe, f"{path}: its metadata preprocess")
    except PipelineError as exc:
        raise PipelineError(f"{exc}; rerun the export stage") from None
    if preprocess["crop_size"] != side:
        raise refuse(f"recipe crops {preprocess['crop_size']} px, but the graph takes {side} x {side} images")
    seed = meta["seed"]
    if not (seed.isascii() and seed.isdigit() and len(seed) <= 19):
        raise refuse(f"seed is not an integer >= 0 (got {shown(seed)})")
    return {"threshold": threshold, "colour_scale": colour_scale, "preprocess": preprocess, "seed": int(seed)}


def _static_shape(type_proto) -> tuple[int, ...] | None:
    tensor = type_proto.tensor_type
    if not type_proto.HasField("tensor_type") or not tensor.HasField("shape"):
        return None
    dims = tensor.shape.dim
    if any(not d.HasField("dim_value") or d.dim_value < 0 for d in dims):
        return None
    return tuple(d.dim_value for d in dims)


def _work(node, shapes: dict) -> int:
    """Multiply-adds of the heavy operators; the others cost what they read and write (counted by the caller)."""
    inputs = [shapes[name][1] for name in node.input if name]
    outputs = [shapes[name][1] for name in node.output if name]
    if node.op_type in ("MatMul", "Gemm") and inputs and inputs[0]:
        transposed = any(a.name == "transA" and a.i for a in node.attribute)
        depth = inputs[0][0] if transposed and node.op_type == "Gemm" else inputs[0][-1]
        return math.prod(outputs[0]) * depth
    if node.op_type == "Conv" and len(inputs) > 1:
        return math.prod(outputs[0]) * math.prod(inputs[1][1:])
    if node.op_type == "ConvTranspose" and len(inputs) > 1:
        return math.prod(inputs[0]) * math.prod(inputs[1][1:])
    return 0


class _Walk:
    """One pass over the nodes in order: each output's type and size inferred before anything is
    evaluated; small constants evaluated; If inlined by its constant condition."""

    def __init__(self, model):
        import onnx

        self.onnx = onnx
        self.opset_imports = list(model.opset_import)
        self.ir_version = model.ir_version
        self.shapes: dict[str, tuple[int, tuple[int, ...]]] = {}  # name -> (elem type, shape)
        self.values: dict[str, object] = {}  # name -> numpy array, for small constants
        self.steps: list[tuple[list[str], list[str]]] = []  # (tensors read, tensors written) in order
        self.initializers: set[str] = set()
        self.work = 0
        self.folds = 0

    def nbytes(self, name: str) -> int:
        elem, shape = self.shapes[name]
        return math.prod(shape) * self.onnx.helper.tensor_dtype_to_np_dtype(elem).itemsize

    def add_initializer(self, tensor) -> None:
        from onnx import numpy_helper

        if tensor.name in self.shapes:
            raise Refused(f"the tensor {shown(tensor.name)} is defined twice")
        self.shapes[tensor.name] = (tensor.data_type, tuple(tensor.dims))
        self.initializers.add(tensor.name)
        external = tensor.data_location == self.onnx.TensorProto.EXTERNAL
        if not external and math.prod(tensor.dims) <= FOLD_ELEMENTS:
            self.values[tensor.name] = numpy_helper.to_array(tensor)

    def run(self, nodes, depth: int = 0) -> None:
        for node in nodes:
            self.node(node, depth)

    def node(self, node, depth: int) -> None:
        onnx = self.onnx
        label = f"node {shown(node.name or node.op_type)}"
        if node.domain not in ("", "ai.onnx") or node.op_type not in ALLOWED_OPS:
            raise Refused(f"{label} is a {shown((node.domain + '.' if node.domain else '') + node.op_type)}, not an "
                          "operator the export writes (no loops, no custom operators)")
        for attribute in node.attribute:
            graph_kind = attribute.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
            if attribute.ref_attr_name or (graph_kind and node.op_type != "If"):
                raise Refused(f"{label} has an attribute {shown(attribute.name)} the export never writes")
        for name in node.input:
            if name and name not in self.shapes:
                raise Refused(f"{label} reads {shown(name)}, which no earlier node writes")
        for name in node.output:
            if name and name in self.shapes:
                raise Refused(f"{label} writes {shown(name)}, which is already written")
        if node.op_type == "If":
            self.branch(node, label, depth)
            return
        schema = onnx.defs.get_schema(node.op_type, EXPORT_OPSET, "")
        given = {name: onnx.helper.make_tensor_type_proto(*self.shapes[name]) for name in node.input if name}
        data = {name: onnx.numpy_helper.from_array(self.values[name], name)
                for name in node.input if name in self.values}
        try:
            inferred = onnx.shape_inference.infer_node_outputs(schema, node, given, data, None, self.opset_imports,
                                                              self.ir_version)
        except Exception as exc:  # onnx's InferenceError / ValidationError: the node contradicts its inputs
            raise Refused(f"{label} is not valid ({' '.join(str(exc).split())[:120]})") from None
        written = [name for name in node.output if name]
        for name in written:
            shape = _static_shape(inferred[name]) if name in inferred else None
            elem = inferred[name].tensor_type.elem_type if name in inferred else 0
            if shape is None or elem in (0, onnx.TensorProto.STRING):
                raise Refused(f"{label} writes {shown(name)}, whose size is not fixed by the graph")
            self.shapes[name] = (elem, shape)
            if self.nbytes(name) > MAX_PEAK_BYTES:
                raise Refused(f"{label} writes a {' x '.join(map(str, shape))} tensor of {self.nbytes(name):,} bytes, "
                              f"more than the limit of {MAX_PEAK_BYTES / 2**30:g} GiB for every tensor alive at once")
        self.work += _work(node, self.shapes) + sum(math.prod(self.shapes[n][1]) for n in [*node.input, *written] if n)
        if self.work > MAX_WORK:
            raise Refused(f"its work reaches {self.work:,} operations by {label}, more than the limit of "
                          f"{MAX_WORK:,} for one image")
        self.steps.append(([n for n in node.input if n], written))
        self.fold(node, written)

    def fold(self, node, written: list[str]) -> None:
        """Evaluate a node whose inputs are known constants and whose outputs are small (their sizes are
        known by now), so the shape arithmetic after it is known too."""
        import numpy as np

        if node.op_type == "Shape":
            start = next((a.i for a in node.attribute if a.name == "start"), 0)
            end = next((a.i for a in node.attribute if a.name == "end"), None)
            self.values[written[0]] = np.array(self.shapes[node.input[0]][1][start:end], dtype=np.int64)
            return
        inputs = [name for name in node.input if name]
        if not all(name in self.values for name in inputs):
            return
        if any(math.prod(self.shapes[name][1]) > FOLD_ELEMENTS for name in written):
            return
        self.folds += 1
        if self.folds > MAX_FOLDS:
            raise Refused(f"it computes more than {MAX_FOLDS:,} constants (the exports, a few hundred)")
        from onnx.reference import ReferenceEvaluator

        helper = self.onnx.helper
        graph = helper.make_graph(
            [node], "fold", [helper.make_tensor_value_info(n, self.shapes[n][0], self.shapes[n][1]) for n in inputs],
            [helper.make_tensor_value_info(n, self.shapes[n][0], self.shapes[n][1]) for n in written],
        )
        try:
            with np.errstate(all="ignore"):  # a constant 0 / 0 is the graph's business, not a warning of ours
                results = ReferenceEvaluator(helper.make_model(graph, opset_imports=self.opset_imports)).run(
                    None, {name: self.values[name] for name in inputs}
                )
        except Exception as exc:  # a constant node the reference evaluator cannot run: its value stays unknown
            raise Refused(f"node {shown(node.name or node.op_type)} fails on its constant inputs "
                          f"({' '.join(str(exc).split())[:120]})") from None
        for name, value in zip(written, results):
            value = np.asarray(value)
            if tuple(value.shape) != self.shapes[name][1]:
                raise Refused(f"node {shown(node.name or node.op_type)} computes a shape other than its inferred one")
            self.values[name] = value

    def branch(self, node, label: str, depth: int) -> None:
        condition = self.values.get(node.input[0]) if node.input else None
        if condition is None or condition.size != 1 or depth >= MAX_BRANCH_DEPTH:
            raise Refused(f"{label} is an If whose condition depends on the image (the export's do not)")
        taken = next(a.g for a in node.attribute if a.name == ("then_branch" if bool(condition.reshape(-1)[0])
                                                               else "else_branch"))
        if taken.input or taken.initializer or taken.sparse_initializer or len(taken.output) != len(node.output):
            raise Refused(f"{label} has a branch the exporter never writes")
        self.run(taken.node, depth + 1)
        for outer, inner in zip(node.output, taken.output):
            if inner.name not in self.shapes:
                raise Refused(f"{label} returns {shown(inner.name)}, which its branch never writes")
            self.shapes[outer] = self.shapes[inner.name]
            if inner.name in self.values:
                self.values[outer] = self.values[inner.name]
            self.steps.append(([inner.name], [outer]))

    def peak(self, keep: set[str]) -> int:
        """The most bytes alive at once: graph input and outputs for the whole run, every other tensor
        from the node that writes it to the last node that reads it."""
        last = {}
        for index, (read, _) in enumerate(self.steps):
            for name in read:
                last[name] = index
        alive = sum(self.nbytes(name) for name in keep if name in self.shapes and name not in self.initializers)
        peak = alive
        for index, (read, written) in enumerate(self.steps):
            alive += sum(self.nbytes(name) for name in written if name not in keep)
            peak = max(peak, alive)
            for name in {*read, *written}:
                if name not in keep and name not in self.initializers and last.get(name, index) <= index:
                    alive -= self.nbytes(name)
                    last[name] = -1  # freed once
        return peak


def check_graph(model) -> tuple[int, tuple[str, ...], int, int]:
    """(image side, output names, peak bytes, work) of a graph export_onnx could have written; Refused otherwise."""
    import onnx

    opsets = {(entry.domain or "ai.onnx"): entry.version for entry in model.opset_import}
    if opsets != {"ai.onnx": EXPORT_OPSET}:
        raise Refused(f"its opsets are {shown(opsets)} (the export writes ai.onnx {EXPORT_OPSET} alone)")
    graph = model.graph
    if model.functions or graph.sparse_initializer or model.training_info:
        raise Refused("it holds functions, sparse or training sections")
    if len(graph.node) > MAX_NODES:
        raise Refused(f"it has {len(graph.node):,} nodes (the exports, under 2,000; limit {MAX_NODES:,})")
    if [entry.name for entry in graph.input] != ["image"]:
        raise Refused(f"its inputs are {shown([entry.name for entry in graph.input])}, not ['image']")
    shape = _static_shape(graph.input[0].type)
    elem = graph.input[0].type.tensor_type.elem_type
    if (elem != onnx.TensorProto.UINT8 or shape is None or len(shape) != 4 or shape[0] != 1 or shape[3] != 3
            or shape[1] != shape[2] or not 1 <= shape[1] <= MAX_IMAGE_SIDE):
        raise Refused(f"its input is not a (1, S, S, 3) uint8 image with S <= {MAX_IMAGE_SIDE}")
    side = shape[1]
    outputs = tuple(entry.name for entry in graph.output)
    if outputs not in OUTPUTS:
        raise Refused(f"its outputs are {shown(list(outputs))}, not score (and anomaly_map)")
    walk = _Walk(model)
    walk.shapes["image"] = (elem, shape)
    for tensor in graph.initializer:
        walk.add_initializer(tensor)
    walk.run(graph.node)
    expected = {"score": (1,), "anomaly_map": (1, side, side)}
    for name in outputs:
        if walk.shapes.get(name) != (onnx.TensorProto.FLOAT, expected[name]):
            raise Refused(f"its output {name} is not float32 {expected[name]}")
    peak = walk.peak({"image", *outputs})
    if peak > MAX_PEAK_BYTES:
        raise Refused(f"its tensors alive at once take {peak:,} bytes, more than the limit of "
                      f"{MAX_PEAK_BYTES / 2**30:g} GiB")
    return side, outputs, peak, walk.work
