"""An exported model.onnx travels: only a graph of the kind export_onnx writes reaches onnxruntime.

Crafted graphs are built here with onnx.helper: one that allocates through ConstantOfShape (with a
constant shape, and with one computed from the input's shape), a Loop that never ends, an If on the
image; crafted metadata (NaN and infinite thresholds, strings for the colour scale, a 20000 px recipe,
a crop the graph does not take). Each is refused with one line naming the file, before an
InferenceSession exists.
"""
from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from stages.core.errors import PipelineError
from stages.deploy import onnx_graph
from stages.deploy.onnx_graph import ALLOWED_OPS, EXPORT_OPSET
from stages.deploy.onnx_model import OnnxModel

SIDE = 48
META = {"category": "carpet", "model": "crafted", "method": "patchcore", "seed": "3", "threshold": "1.5",
        "colour_scale": '{"low": 0.0, "high": 2.0}', "preprocess": '{"resize": 56, "crop_size": 48}'}


def tensor(name: str, values, dtype=np.int64):
    return numpy_helper.from_array(np.asarray(values, dtype=dtype), name)


def write_graph(folder: Path, extra_nodes=(), extra_inits=(), score_from="max", meta=None, side=SIDE) -> Path:
    """A small valid graph of the export's form (image -> score, anomaly_map), plus `extra_nodes` feeding
    the score through `score_from` (added to the image's max)."""
    nodes = [
        helper.make_node("Cast", ["image"], ["pixels"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["pixels", "channel_axis"], ["anomaly_map"], keepdims=0),
        helper.make_node("ReduceMax", ["anomaly_map", "map_axes"], ["max"], keepdims=0),
        *extra_nodes,
        helper.make_node("Add" if score_from != "max" else "Identity",
                         ["max", score_from] if score_from != "max" else ["max"], ["score"]),
    ]
    graph = helper.make_graph(
        nodes, "crafted",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, [1, side, side, 3])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, [1]),
         helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, [1, side, side])],
        [tensor("channel_axis", [3]), tensor("map_axes", [1, 2]), *extra_inits],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", EXPORT_OPSET)])
    model.ir_version = 8
    for key, value in {**META, **(meta or {})}.items():
        model.metadata_props.add(key=key, value=value)
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(folder / "model.onnx"))
    return folder / "model.onnx"


@pytest.fixture
def no_session(monkeypatch):
    """onnxruntime must never be handed a refused file: creating a session fails the test."""
    import onnxruntime

    def refuse(*args, **kwargs):
        raise AssertionError("an InferenceSession was created for a graph that should have been refused")

    monkeypatch.setattr(onnxruntime, "InferenceSession", refuse)


def refusal(path: Path) -> str:
    with pytest.raises(PipelineError) as caught:
        OnnxModel(path, "carpet", "crafted")
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    return message


def test_the_crafted_control_graph_is_accepted_and_scores(tmp_path):
    """The base of every crafted graph below is accepted: each refusal is the crafted part's."""
    path = write_graph(tmp_path / "ok")
    model = OnnxModel(path, "carpet", "crafted")
    image = np.full((1, SIDE, SIDE, 3), 200, np.uint8)
    prediction = model.score(image, ["grey.png"])
    assert prediction.image_scores.tolist() == [200.0] and prediction.anomaly_maps.shape == (1, SIDE, SIDE)
    assert model.threshold == 1.5 and model.seed == 3
    # the metadata names no mode: crop, with the default fill
    assert model.preprocess == {"resize": 56, "crop_size": 48, "mode": "crop", "pad_fill": [124, 116, 104]}
    assert model.session.get_session_options().enable_cpu_mem_arena is True  # a small peak: the arena is kept


def test_a_graph_near_the_peak_bound_runs_without_the_memory_arena(tmp_path):
    """A graph that the check accepts but whose tensors take over ARENA_MAX_PEAK_BYTES at once (a 1 x 12000 x
    12000 float tensor, 549 MiB) gets no arena: what an image needed goes back to the system after it."""
    from stages.deploy.onnx_graph import read_checked
    from stages.deploy.onnx_model import ARENA_MAX_PEAK_BYTES

    path = write_graph(tmp_path / "heavy", [
        helper.make_node("ConstantOfShape", ["heavy_shape"], ["heavy"],
                         value=numpy_helper.from_array(np.ones(1, np.float32))),
        helper.make_node("ReduceSum", ["heavy"], ["heavy_sum"], keepdims=0),
    ], [tensor("heavy_shape", [1, 12000, 12000])], score_from="heavy_sum")
    model = OnnxModel(path, "carpet", "crafted")
    assert ARENA_MAX_PEAK_BYTES < read_checked(path).peak_bytes < 2 * 2**30
    assert model.session.get_session_options().enable_cpu_mem_arena is False


def test_a_constant_of_shape_that_allocates_gigabytes_is_refused(tmp_path, no_session):
    """A 1 kB file whose ConstantOfShape makes a 1 x 28000 x 28000 float tensor (3.1 GB) scored normally."""
    path = write_graph(tmp_path / "static", [
        helper.make_node("ConstantOfShape", ["bomb_shape"], ["bomb"],
                         value=numpy_helper.from_array(np.ones(1, np.float32))),
        helper.make_node("ReduceSum", ["bomb"], ["bomb_sum"], keepdims=0),
    ], [tensor("bomb_shape", [1, 28000, 28000])], score_from="bomb_sum")
    assert path.stat().st_size < 2048
    assert "writes a 1 x 28000 x 28000 tensor of 3,136,000,000 bytes, more than the limit of 2 GiB" in refusal(path)


def test_a_bomb_whose_shape_is_computed_from_the_input_is_refused(tmp_path, no_session):
    """The same tensor with its shape computed from the image's (Shape, Gather, Mul, Concat): the shape
    arithmetic is evaluated while checking, so the size is known before anything runs."""
    path = write_graph(tmp_path / "dynamic", [
        helper.make_node("Shape", ["image"], ["image_shape"]),
        helper.make_node("Gather", ["image_shape", "one"], ["side"]),
        helper.make_node("Mul", ["side", "factor"], ["big_side"]),
        helper.make_node("Concat", ["batch", "big_side", "big_side"], ["bomb_shape"], axis=0),
        helper.make_node("ConstantOfShape", ["bomb_shape"], ["bomb"],
                         value=numpy_helper.from_array(np.ones(1, np.float32))),
        helper.make_node("ReduceSum", ["bomb"], ["bomb_sum"], keepdims=0),
    ], [tensor("one", [1]), tensor("factor", [583]), tensor("batch", [1])], score_from="bomb_sum")
    assert f"tensor of {583 * SIDE * 583 * SIDE * 4:,} bytes" in refusal(path)


def test_many_tensors_alive_at_once_are_refused(tmp_path, no_session):
    """Each tensor under the limit, all of them together over it: what is alive at once is bounded."""
    nodes, inits = [], []
    for i in range(3):
        inits.append(tensor(f"shape{i}", [1, 16000, 16000 + i]))
        nodes.append(helper.make_node("ConstantOfShape", [f"shape{i}"], [f"big{i}"],
                                      value=numpy_helper.from_array(np.ones(1, np.float32))))
    nodes += [helper.make_node("ReduceSum", [f"big{i}"], [f"sum{i}"], keepdims=0) for i in range(3)]
    nodes += [helper.make_node("Add", ["sum0", "sum1"], ["pair"]), helper.make_node("Add", ["pair", "sum2"], ["total"])]
    path = write_graph(tmp_path / "many", nodes, inits, score_from="total")
    message = refusal(path)
    assert "its tensors alive at once take" in message and "more than the limit of 2 GiB" in message


def test_a_loop_that_never_ends_is_refused(tmp_path, no_session):
    """A Loop with 2**62 iterations and a condition that stays true never returned (in the demo, the process
    then ignored SIGTERM)."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Identity", ["carried"], ["out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("carried", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("out", TensorProto.FLOAT, [])],
    )
    path = write_graph(tmp_path / "loop", [
        helper.make_node("Loop", ["trips", "forever", "max"], ["looped"], body=body),
    ], [tensor("trips", 2**62), tensor("forever", True, np.bool_)], score_from="looped")
    assert "is a 'Loop', not an operator the export writes (no loops, no custom operators)" in refusal(path)


def test_an_if_on_the_image_is_refused(tmp_path, no_session):
    """The export's one If (torch's squeeze) tests a constant shape; one whose condition is the image's is not
    the export's."""
    branch = helper.make_graph([helper.make_node("Identity", ["max"], ["chosen"])], "branch", [],
                               [helper.make_tensor_value_info("chosen", TensorProto.FLOAT, None)])
    path = write_graph(tmp_path / "if", [
        helper.make_node("Equal", ["max", "zero"], ["dark"]),
        helper.make_node("If", ["dark"], ["picked"], then_branch=branch, else_branch=branch),
    ], [tensor("zero", [0.0], np.float32)], score_from="picked")
    assert "is an If whose condition depends on the image" in refusal(path)


def test_a_graph_with_another_opset_or_input_is_refused(tmp_path, no_session):
    path = write_graph(tmp_path / "opset")
    model = onnx.load(str(path))
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(path))
    assert "its opsets are" in refusal(path)
    path = write_graph(tmp_path / "side", side=4096, meta={"preprocess": '{"resize": 4096, "crop_size": 4096}'})
    assert "its input is not a (1, S, S, 3) uint8 image with S <= 2048" in refusal(path)


@pytest.mark.parametrize("key, value, expected", [
    ("threshold", "nan", "has no usable decision: the threshold ('nan')"),
    ("threshold", "inf", "has no usable decision: the threshold ('inf')"),
    ("threshold", "-inf", "has no usable decision"),
    ("threshold", "1e999", "has no usable decision"),
    ("threshold", "abc", "is not readable (ValueError"),
    ("colour_scale", '{"low": "a", "high": "b"}', "has no usable decision"),
    ("colour_scale", '{"low": NaN, "high": Infinity}', "has no usable decision"),
    ("colour_scale", "[" * 30000 + "]" * 30000, "is not readable (RecursionError"),
    ("preprocess", '{"resize": 20000, "crop_size": 48}',
     "its metadata preprocess.resize: must be an integer in [16, 2048], got 20000"),
    ("preprocess", '{"resize": -5, "crop_size": 48}', "preprocess.resize: must be an integer in [16, 2048]"),
    ("preprocess", '{"resize": 256.9, "crop_size": 48}', "its metadata preprocess.resize: must be an integer"),
    ("preprocess", '{"resize": 256, "crop_size": 100}', "recipe crops 100 px, but the graph takes 48 x 48 images"),
    ("seed", "x", "seed is not an integer >= 0 (got 'x')"),
    ("model", "x" * 200_000, "is 200,000 characters long"),
])
def test_metadata_is_checked_as_scoring_json_is(tmp_path, no_session, key, value, expected):
    """A threshold of nan or inf marked every image normal (-inf: anomalous), with rc 0."""
    path = write_graph(tmp_path / key, meta={key: value})
    message = refusal(path)
    assert message.startswith(f"{path}: its metadata ") and expected in message, message


def test_a_failed_run_is_one_line_naming_the_image_and_the_file(tmp_path):
    path = write_graph(tmp_path / "ok")
    model = OnnxModel(path, "carpet", "crafted")
    with pytest.raises(PipelineError, match=rf"^odd\.png: {path} could not score it \(InvalidArgument: "):
        model.score(np.zeros((1, 10, 10, 3), np.uint8), ["odd.png"])


def test_a_non_finite_score_is_an_error_not_a_verdict(tmp_path):
    path = write_graph(tmp_path / "nan", [helper.make_node("Div", ["zero", "zero"], ["nan"])],
                       [tensor("zero", [0.0], np.float32)], score_from="nan")
    model = OnnxModel(path, "carpet", "crafted")
    with pytest.raises(PipelineError, match=r"^a\.png: .* gave a score or map that is not finite \(nan\)"):
        model.score(np.zeros((1, SIDE, SIDE, 3), np.uint8), ["a.png"])


def test_telemetry_is_off(tmp_path, monkeypatch):
    import onnxruntime

    calls = []
    monkeypatch.setattr(onnxruntime, "disable_telemetry_events", lambda: calls.append(True))
    OnnxModel(write_graph(tmp_path / "ok"), "carpet", "crafted")
    assert calls == [True]


def test_every_export_passes_with_room(fitted):
    """The exports of every registered method pass the check, far inside its bounds."""
    for path in sorted((fitted / "models" / "carpet.category").glob("*.export/model.onnx")):
        graph = onnx_graph.read_checked(path)
        assert graph.side == 48 and graph.peak_bytes < onnx_graph.MAX_PEAK_BYTES / 1000, path
        assert graph.work < onnx_graph.MAX_WORK / 1000, path


def exported_ops(path: Path) -> tuple[set[str], set[tuple[str, int]]]:
    model = onnx.load(str(path), load_external_data=False)
    ops = set()

    def visit(graph):
        for node in graph.node:
            ops.add(node.op_type)
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    visit(attribute.g)

    visit(model.graph)
    return ops, {(entry.domain, entry.version) for entry in model.opset_import}


def backbone_exports(folder: Path, monkeypatch) -> list[Path]:
    """Every registered backbone (random weights: the operators do not depend on them) behind a map method
    (PatchCore) and a global-embedding method (kNN), through export_onnx itself. Token backbones (ViT) are
    left out: export_onnx cannot export them today (under no_grad torch's attention takes the fused
    aten::_native_multi_head_attention, which has no ONNX form, and FeatureExtractor.as_map rounds a traced
    shape), so no export of theirs exists to take operators from; once one does, it belongs here."""
    import timm
    import torch
    import torchvision

    from stages.deploy.onnx_model import export_onnx
    from stages.deploy.overlay import ColourScale
    from stages.deploy.torch_model import FittedModel
    from stages.features import backbones
    from stages.features.backbones import BACKBONES, FeatureExtractor
    from stages.features.cache import FeatureSet
    from stages.methods.global_knn import GlobalKNN

    def random_backbone(arch, weights=None):
        if arch == "efficientnet_lite0":
            return timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
        return torchvision.models.get_model(arch, weights=None).eval()

    monkeypatch.setattr(backbones, "load_backbone", random_backbone)
    torch.manual_seed(0)
    paths = []
    for arch, spec in BACKBONES.items():
        if spec.tokens:
            continue
        side = spec.input_size or 64
        images = np.random.default_rng(0).integers(0, 256, (3, side, side, 3), dtype=np.uint8)
        extracted = FeatureExtractor(arch, random_backbone(arch), None)(images)
        features = FeatureSet(extracted.global_embeddings, extracted.feature_maps, (side, side), ["a", "b", "c"])
        # a backbone's own operators come with any method on it (the global kNN is the cheapest to export);
        # each method's operators come with the fitted project's exports (every method, on Lite0), and those
        # are the same on any backbone: PatchCore's pooling, resize and nearest-neighbour product, say
        detectors = [GlobalKNN(score={"k": 1}).fit(features)]
        for detector in detectors:
            fitted = FittedModel("carpet", f"{arch}_{detector.method}", detector,
                                 {"resize": side, "crop_size": side},
                                 {"name": arch, "arch": arch, "layers": list(spec.layers), "weights": None},
                                 1.0, ColourScale(0.0, 1.0), 0)
            path = folder / f"{arch}_{detector.method}" / "model.onnx"
            path.parent.mkdir(parents=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                export_onnx(fitted, path)
            paths.append(path)
    return paths


def test_the_allowed_operators_are_exactly_those_the_exports_write(fitted, tmp_path, monkeypatch):
    """ALLOWED_OPS is the union of the operators in the exports of every registered method (the fitted
    project's) and of every registered backbone: neither a missing operator (a new method's export would be
    refused) nor one no export uses (a door left open) can slip in silently."""
    exports = sorted((fitted / "models" / "carpet.category").glob("*.export/model.onnx"))
    exports += backbone_exports(tmp_path, monkeypatch)
    found, opsets = set(), set()
    for path in exports:
        ops, opset = exported_ops(path)
        found |= ops
        opsets |= opset
    assert opsets == {("", EXPORT_OPSET)}
    assert sorted(found - ALLOWED_OPS) == [] and sorted(ALLOWED_OPS - found) == []
    for path in exports:  # and the check accepts each of them
        onnx_graph.read_checked(path)
    shutil.rmtree(tmp_path)
