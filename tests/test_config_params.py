"""Reference JSON config and the parameter-file schema, without any framework."""
import json

import pytest

from dopt import DoptError
from dopt.formats import param_file as P
from dopt.formats.strategy_config import load_config, parse_input_shape


def test_parse_input_shape():
    assert parse_input_shape("x:1,3,224,224") == {"x": (1, 3, 224, 224)}
    assert parse_input_shape("a:1,3;b:2") == {"a": (1, 3), "b": (2,)}
    assert parse_input_shape("input:0:1,224,224,3") == {"input:0": (1, 224, 224, 3)}
    assert parse_input_shape("x:-1,3,8,8", allow_dynamic=True) == {"x": (-1, 3, 8, 8)}


@pytest.mark.parametrize("bad", ["", "x", "x:", ":1,2", "x:1,,2", "x:1;x:2", "x:-1,2", "x:1.5",
                                 "x:99999999"])
def test_bad_input_shape(bad):
    with pytest.raises(DoptError) as e:
        parse_input_shape(bad)
    assert "input_shape" in str(e.value) and "\n" not in str(e.value)


def test_reference_example_with_comment_keys_loads(tmp_path):
    p = tmp_path / "c.json"
    conv = "<class 'torch.nn.modules.conv.Conv2d'>"
    p.write_text(json.dumps({
        f"quant_strategy_for op '{conv}'": ["Quant_INT8-8"],
        "input_shape": "x:1,3,224,224",
        "layer_strategy": {
            "conv1/Conv2D": {"op_type": conv, "quant_strategy": "Quant_INT8-8"},
            "conv2/Conv2D": {"op_type": conv, "//": "comment", "quant_strategy": "float"}}}))
    cfg = load_config(p)
    assert cfg.quantized_layers() == ["conv1/Conv2D"]
    assert cfg.input_shapes == {"x": (1, 3, 224, 224)}
    assert cfg.range_algorithm("conv1/Conv2D") == "minmax"


@pytest.mark.parametrize("doc,field", [
    ([], None), ({"layer_strategy": []}, "layer_strategy"),
    ({"layer_strategy": {"a": 3}}, "layer_strategy.a"),
    ({"layer_strategy": {"a": {"quant_strategy": "float"}}}, "layer_strategy.a.op_type"),
    ({"layer_strategy": {}, "input_shape": 5}, "input_shape"),
])
def test_bad_config_structure(tmp_path, doc, field):
    p = tmp_path / "c.json"
    p.write_text(json.dumps(doc))
    with pytest.raises(DoptError) as e:
        load_config(p)
    assert str(p) in str(e.value)
    if field:
        assert field in str(e.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(DoptError, match="does not exist"):
        load_config(tmp_path / "nope.json")


def _doc():
    d = P.new_params({"name": "dopt"}, "m.onnx")
    d["layers"]["conv1"] = {
        "op_type": "Conv", "strategy": "Quant_INT8-8", "source_layer": "conv1",
        "input": {"tensor": "x", "bits": 8, "scale": 0.0123456789, "offset": -7},
        "weight": {"tensor": "conv1.weight", "bits": 8, "per_channel": True, "symmetric": True,
                   "scales": [0.1, 0.2]},
        "bias": None, "folded_bn": "bn1"}
    return d


def test_params_round_trip_and_validation(tmp_path):
    d = _doc()
    P.write_params(tmp_path / "p.json", d)
    assert P.read_params(tmp_path / "p.json") == d
    graph = {"conv1": {"op_type": "Conv", "weight_shape": [2, 3, 3, 3]}}
    P.validate_params(d, graph=graph, expected_layers={"conv1"})
    with pytest.raises(DoptError, match="without a record: conv2"):
        P.validate_params(d, graph=graph, expected_layers={"conv1", "conv2"})
    with pytest.raises(DoptError, match="not quantized: conv1"):
        P.validate_params(d, expected_layers=set())
    with pytest.raises(DoptError, match="which the model does not have"):
        P.validate_params(d, graph={})
    with pytest.raises(DoptError, match="3 output channels"):
        P.validate_params(d, graph={"conv1": {"op_type": "Conv", "weight_shape": [3, 3, 3, 3]}})


@pytest.mark.parametrize("path,value,match", [
    (("input", "scale"), 0.0, "degenerate"), (("input", "scale"), float("nan"), "degenerate"),
    (("input", "offset"), 200, "offset out of range"), (("weight", "scales"), [], "non-empty"),
    (("weight", "scales"), [0.1, float("inf")], "degenerate"), (("input", "bits"), 4, "8-bit"),
    (("strategy",), "Quant_INT4-4", "unsupported strategy"),
])
def test_params_rejects_bad_records(path, value, match):
    d = _doc()
    rec = d["layers"]["conv1"]
    for k in path[:-1]:
        rec = rec[k]
    rec[path[-1]] = value
    with pytest.raises(DoptError, match=match):
        P.validate_params(d, file="p.json")


def test_params_duplicate_keys_and_bad_json(tmp_path):
    p = tmp_path / "p.json"
    text = json.dumps(_doc())
    p.write_text(text.replace('"layers": {', '"layers": {"conv1": {}, ', 1))
    with pytest.raises(DoptError, match="duplicate key"):
        P.read_params(p)
    p.write_text(text[:-10])
    with pytest.raises(DoptError, match="line 1 column"):
        P.read_params(p)
    p.write_text(json.dumps(dict(_doc(), version=99)))
    with pytest.raises(DoptError, match="unsupported parameter file version"):
        P.read_params(p)


def test_write_params_is_atomic_on_invalid(tmp_path):
    d = _doc()
    d["layers"]["conv1"]["input"]["scale"] = -1.0
    with pytest.raises(DoptError):
        P.write_params(tmp_path / "p.json", d)
    assert list(tmp_path.iterdir()) == []
