"""--input_type / --output_type: the reference's type tables, the older FP16 flags and the
run-time conversions at the model's edges (dopt.npu.iotypes)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from dopt.errors import DoptError
from dopt.npu import iotypes as T


def _om(inputs=(), outputs=()):
    return SimpleNamespace(graph={"inputs": [dict(e) for e in inputs],
                                  "outputs": [dict(e) for e in outputs]})


def _entry(name, typ, **extra):
    return {"name": name, "shape": [1, 3, 8, 8], "dtype": T.TYPES[typ], **extra}


# -- parsing -----------------------------------------------------------------------------

def test_parse_types_reads_names_and_types():
    assert T.parse_types("a:FP16; b : uint8;", flag="--input_type") == {"a": "FP16", "b": "UINT8"}


def test_parse_types_keeps_colons_of_tensorflow_names():
    assert T.parse_types("out:0:fp16;scope/y:1:INT32", flag="--output_type") == {
        "out:0": "FP16", "scope/y:1": "INT32"}


@pytest.mark.parametrize("text,needle", [
    ("a:FP64", "unknown data type"), ("a:", "unknown data type"), ("a", "no :TYPE"),
    (":FP16", "no name"), ("a:FP16;a:FP32", "'a' given twice"), ("", "empty"), (" ; ", "empty"),
    ("a:FP16;;b:FP16", "empty entry"),
])
def test_parse_types_refuses_bad_entries_naming_the_flag(text, needle):
    with pytest.raises(DoptError) as e:
        T.parse_types(text, flag="--output_type")
    assert e.value.field == "--output_type" and needle in str(e.value)
    assert "FP32, FP16, UINT8, INT8, INT32, INT64" in e.value.expected


# -- the tables --------------------------------------------------------------------------

@pytest.mark.parametrize("model,asked", T.INPUT.rows)
def test_every_non_aipp_input_row_is_accepted(model, asked):
    om = _om([_entry("x", model)])
    lines = T.apply(om, {"x": asked}, None)
    e = om.graph["inputs"][0]
    assert e["io_type"] == asked and e["dtype"] == T.TYPES[model]
    assert lines == [f"input 'x' ({model} in the model): the offline model takes {asked}"]


@pytest.mark.parametrize("model,asked", T.AIPP_INPUT.rows)
def test_every_aipp_input_row_is_accepted(model, asked):
    om = _om([_entry("x", "UINT8", aipp=["x/aipp0"], model_dtype=T.TYPES[model])])
    T.apply(om, {"x": asked}, None)
    assert om.graph["inputs"][0]["io_type"] == asked


@pytest.mark.parametrize("model,asked", T.OUTPUT.rows)
def test_every_output_row_is_accepted(model, asked):
    om = _om(outputs=[_entry("y", model)])
    (line,) = T.apply(om, None, {"y": asked})
    assert om.graph["outputs"][0]["io_type"] == asked and line.startswith(f"output 'y' ({model}")


def test_a_combination_outside_the_input_table_lists_the_allowed_rows():
    om = _om([_entry("x", "FP32")])
    with pytest.raises(DoptError) as e:
        T.apply(om, {"x": "INT8"}, None)
    assert e.value.field == "--input_type" and e.value.found == "x:INT8"
    assert ("input 'x' is FP32 in the model; --input_type allows FP32:FP16 or FP32:FP32 for it "
            "(the reference's non-AIPP input table)") in str(e.value)
    assert "io_type" not in om.graph["inputs"][0]


def test_uint8_into_a_float_input_without_aipp_points_at_aipp():
    with pytest.raises(DoptError, match=r"FP32 -> UINT8 needs AIPP on this input"):
        T.apply(_om([_entry("x", "FP32")]), {"x": "UINT8"}, None)


@pytest.mark.parametrize("model,asked,allowed", [
    ("FP16", "FP32", "FP16:FP16"), ("INT32", "FP32", "INT32:INT32"), ("INT8", "UINT8", "INT8:INT8"),
    ("INT64", "INT64", "no type"),
])
def test_a_sample_of_input_pairs_outside_the_table_is_refused(model, asked, allowed):
    with pytest.raises(DoptError, match=f"allows {allowed}"):
        T.apply(_om([_entry("x", model)]), {"x": asked}, None)


@pytest.mark.parametrize("model,asked,allowed", [
    ("INT32", "FP16", "INT32:INT32"), ("UINT8", "FP16", "UINT8:UINT8"),
    ("INT64", "INT32", "INT64:INT64"), ("FP32", "INT8", "FP32:UINT8, FP32:FP32 or FP32:FP16"),
])
def test_a_sample_of_output_pairs_outside_the_table_is_refused(model, asked, allowed):
    with pytest.raises(DoptError) as e:
        T.apply(_om(outputs=[_entry("y", model)]), None, {"y": asked})
    assert e.value.field == "--output_type" and f"allows {allowed} for it" in str(e.value)
    assert "(the reference's output table)" in str(e.value)


def test_an_aipp_input_checks_the_models_own_type_against_the_aipp_table():
    om = _om([_entry("x", "UINT8", aipp=["x/aipp0"], model_dtype="float32")])
    with pytest.raises(DoptError, match=r"'x' is FP32 in the model; --input_type allows FP32:UINT8 "
                                        r"for it \(the reference's AIPP input table\)"):
        T.apply(om, {"x": "FP16"}, None)
    assert T.apply(om, {"x": "UINT8"}, None) == [
        "input 'x' (FP32 in the model): the offline model takes UINT8 frames into AIPP"]


def test_unknown_names_are_refused_listing_the_names_there_are():
    om = _om([_entry("data", "FP32"), _entry("mask", "UINT8")], [_entry("prob", "FP32")])
    with pytest.raises(DoptError) as e:
        T.apply(om, {"dat": "FP16"}, None)
    assert e.value.expected == "one of the model's inputs: data, mask" and "'data'" in e.value.hint
    with pytest.raises(DoptError, match="not an output") as e:
        T.apply(om, None, {"logits": "FP16"})
    assert "prob" in e.value.expected


def test_nothing_is_recorded_when_a_later_entry_fails():
    om = _om([_entry("a", "FP32"), _entry("b", "INT32")])
    with pytest.raises(DoptError):
        T.apply(om, {"a": "FP16", "b": "FP16"}, None)
    assert all("io_type" not in e for e in om.graph["inputs"])


def test_a_tensorflow_node_name_finds_its_first_tensor():
    om = _om([_entry("x:0", "FP32")])
    T.apply(om, {"x": "FP16"}, None)
    assert om.graph["inputs"][0]["io_type"] == "FP16"
    with pytest.raises(DoptError, match="twice"):
        T.apply(om, {"x": "FP16", "x:0": "FP32"}, None)


def test_table_markdown_renders_every_row():
    md = T.table_markdown()
    assert md.count("|:--|:--|") == 3
    assert sum(len(t.rows) for t in T.TABLES) == md.count("\n| ") - 3
    assert "| FP32 | UINT8 |" in md and "| INT64 | INT64 |" in md


# -- --input_fp16_nodes / --is_output_fp16 -------------------------------------------------

@pytest.mark.parametrize("framework", [3, 5])
@pytest.mark.parametrize("nodes,fp16,new,flag", [
    ("x", None, {"input_type": "x:FP16"}, "--input_fp16_nodes"),
    (None, "true", {"output_type": "y:FP16"}, "--is_output_fp16"),
])
def test_old_and_new_flags_conflict(framework, nodes, fp16, new, flag):
    with pytest.raises(DoptError, match="cannot be given together") as e:
        T.legacy_flags(nodes, fp16, framework=framework, outputs=["y"], **new)
    assert e.value.field == flag


def test_onnx_ignores_the_old_flags_with_a_note():
    i, o, notes = T.legacy_flags("x", "true", framework=5, input_type=None,
                                 output_type=None, outputs=["y"])
    assert i is None and o is None
    assert notes[0] == ("--input_fp16_nodes has no effect for ONNX models (as in the reference); "
                        "use --input_type name:FP16")
    assert notes[1].startswith("--is_output_fp16 has no effect for ONNX models")


def test_new_flags_pass_through_parsed():
    i, o, notes = T.legacy_flags(None, None, framework=5, input_type="x:fp16",
                                 output_type="y:UINT8", outputs=["y"])
    assert (i, o, notes) == ({"x": "FP16"}, {"y": "UINT8"}, [])


def test_tensorflow_translates_the_old_flags():
    i, o, notes = T.legacy_flags("a;b", "false, TRUE", framework=3, input_type=None,
                                 output_type=None, outputs=["p:0", "q:0"])
    assert i == {"a": "FP16", "b": "FP16"} and o == {"q:0": "FP16"} and len(notes) == 2


@pytest.mark.parametrize("nodes,fp16,needle", [
    (None, "true", "gives 1 value(s) for a model with 2 output(s)"),
    (None, "true,false,true", "gives 3 value(s)"),
    (None, "yes,no", "true/false"),
    ("a;a", None, "'a' given twice"),
    ("", None, "empty"),
])
def test_tensorflow_refuses_malformed_old_flags(nodes, fp16, needle):
    with pytest.raises(DoptError) as e:
        T.legacy_flags(nodes, fp16, framework=3, outputs=["p:0", "q:0"])
    assert needle in str(e.value)
    if fp16:
        assert "(p:0, q:0)" in e.value.expected


# -- run-time conversions ----------------------------------------------------------------

def test_fp16_output_rounds_to_nearest_even_and_overflows_to_inf():
    y = np.array([2049, 2051, 1 + 2 ** -11, 65519, 65520, -70000, 1e-8], np.float32)
    got = T.convert_output({"name": "y", "io_type": "FP16"}, y)
    assert got.dtype == np.float16
    assert got[:4].tolist() == [2048, 2052, 1.0, 65504]
    assert np.isposinf(got[4]) and np.isneginf(got[5]) and got[6] == 0


def test_uint8_output_rounds_half_to_even_and_saturates():
    y = np.array([2.5, 3.5, -3, 300, np.nan, np.inf, -np.inf, 254.6], np.float32)
    got = T.convert_output({"name": "y", "io_type": "UINT8"}, y)
    assert got.dtype == np.uint8 and got.tolist() == [2, 4, 0, 255, 0, 255, 0, 255]
    assert T.convert_output({"io_type": "UINT8"}, np.array([-5, 7], np.int8)).tolist() == [0, 7]


@pytest.mark.parametrize("io", ["FP32", "INT8", "INT32", "INT64"])
def test_other_outputs_are_a_cast(io):
    y = np.array([1, 2], np.int64 if io.startswith("INT") else np.float16)
    assert T.convert_output({"io_type": io}, y).dtype == np.dtype(T.TYPES[io])


def test_without_a_declared_type_arrays_pass_unchanged():
    a = np.arange(3, dtype=np.float64)
    assert T.convert_output({"name": "y"}, a) is a and T.check_input({"name": "x"}, a) is a


def test_check_input_wants_exactly_the_declared_dtype():
    e = {"name": "x", "dtype": "float32", "io_type": "FP16"}
    half = np.array([0.1, 65504], np.float16)
    got = T.check_input(e, half)
    assert got.dtype == np.float32 and np.array_equal(got, half.astype(np.float32))
    with pytest.raises(DoptError) as err:
        T.check_input(e, half.astype(np.float32), path="m.om")
    assert err.value.field == "x" and err.value.found == "float32"
    assert err.value.expected == "float16 array (--input_type x:FP16)"
    assert "x.astype(np.float16)" in err.value.hint and "m.om" in str(err.value)
    i8 = np.array([-1, 2], np.int8)
    assert T.check_input({"name": "m", "io_type": "INT8"}, i8).dtype == np.int8


# -- through the real compiler -----------------------------------------------------------

@pytest.fixture(scope="module")
def model(tmp_path_factory):
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    w = (np.random.default_rng(0).standard_normal((4, 3, 3, 3)) * 0.2).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("Conv", ["data", "w"], ["z"], name="conv", pads=[1] * 4,
                          kernel_shape=[3, 3])], "t",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path = tmp_path_factory.mktemp("iotypes") / "m.onnx"
    onnx.save(m, path)
    return path


def _compile(model, dest, *extra):
    from dopt.npu import omg, omfile
    assert omg.main(["--framework", "5", "--model", str(model), "--output", str(dest),
                     *extra]) == 0
    return omfile.read_om(str(dest) + ".om")


def test_apply_on_a_compiled_model(model, tmp_path, capsys):
    from dopt import runtime
    from dopt.npu import omfile
    om = _compile(model, tmp_path / "m")
    lines = T.apply(om, *T.legacy_flags(None, None, framework=5, input_type="data:FP16",
                                        output_type="z:UINT8", outputs=["z"])[:2])
    assert lines == ["input 'data' (FP32 in the model): the offline model takes FP16",
                     "output 'z' (FP32 in the model): the offline model gives UINT8, rounded "
                     "half to even and saturated to [0, 255]"]
    (i,), (o,) = om.graph["inputs"], om.graph["outputs"]
    assert (i["io_type"], i["dtype"], o["io_type"], o["dtype"]) == ("FP16", "float32",
                                                                    "UINT8", "float32")
    omfile.write_om(tmp_path / "t.om", om)           # the declared types travel in the .om
    back = omfile.read_om(str(tmp_path / "t.om"))
    assert back.graph["inputs"][0]["io_type"] == "FP16"
    assert back.graph["outputs"][0]["io_type"] == "UINT8"
    s = runtime.load(tmp_path / "t.om")
    x = (np.random.default_rng(1).random((1, 3, 8, 8)) * 4).astype(np.float16)
    got = s.run(x)["z"]                               # the session converts at both edges
    y = runtime.load(str(tmp_path / "m") + ".om").run(x.astype(np.float32))["z"]
    assert got.dtype == np.uint8
    assert np.array_equal(got, np.clip(np.rint(y), 0, 255).astype(np.uint8))


def test_omg_flags_declare_the_types_and_the_runtime_keeps_them(model, tmp_path, capsys):
    """--input_type data:FP16 --output_type z:FP16: FP16 in, FP16 out, the same numbers as the
    FP32-typed build (the NPU rounds its input to FP16 anyway)."""
    from dopt import runtime
    _compile(model, tmp_path / "t", "--input_type", "data:FP16", "--output_type", "z:FP16")
    assert "the offline model takes FP16" in capsys.readouterr().out
    _compile(model, tmp_path / "plain")
    s = runtime.load(str(tmp_path / "t") + ".om")
    x = (np.random.default_rng(2).standard_normal((2, 3, 8, 8))).astype(np.float16)
    got = s.run(x)["z"]
    want = runtime.load(str(tmp_path / "plain") + ".om").run(x.astype(np.float32))["z"]
    assert got.dtype == np.float16 and np.array_equal(got, want.astype(np.float16))
    with pytest.raises(DoptError, match=r"float16 array \(--input_type data:FP16\)"):
        s.run(x.astype(np.float32))


@pytest.mark.parametrize("extra,needle", [
    (["--input_type", "data:UINT8"], "non-AIPP input table"),
    (["--input_type", "img:FP16"], "'img'"),
    (["--output_type", "z:INT8"], "output table"),
    (["--output_type", "z:FP16", "--is_output_fp16", "true"], "--is_output_fp16"),
    (["--input_type", "data:FP8"], "unknown data type"),
], ids=["input_table", "input_name", "output_table", "legacy_conflict", "type_name"])
def test_types_outside_the_tables_exit_2_and_leave_no_om(model, tmp_path, capsys, extra, needle):
    from dopt.errors import run_cli
    from dopt.npu import omg
    rc = run_cli("dopt omg", lambda: omg.main(["--framework", "5", "--model", str(model),
                                               "--output", str(tmp_path / "m"), *extra]))
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and "\n" not in err.strip()
    assert not (tmp_path / "m.om").exists()


def test_fp16_flags_of_tensorflow_have_no_effect_for_onnx(model, tmp_path, capsys):
    om = _compile(model, tmp_path / "m", "--input_fp16_nodes", "data")
    assert "no effect for ONNX" in capsys.readouterr().out
    assert "io_type" not in om.graph["inputs"][0]


def test_apply_on_a_compiled_aipp_input(model, tmp_path):
    cfg = tmp_path / "a.cfg"
    cfg.write_text("aipp_op {\n input_para {\n  shape {\n   src_image_size_w: 8\n"
                   "   src_image_size_h: 8\n  }\n  format: RGB888_U8\n }\n}\n")
    om = _compile(model, tmp_path / "a", "--insert_op_conf", str(cfg))
    assert om.graph["inputs"][0]["model_dtype"] == "float32"
    with pytest.raises(DoptError, match="AIPP input table"):
        T.apply(om, {"data": "FP16"}, None)
    T.apply(om, {"data": "uint8"}, None)
    assert om.graph["inputs"][0]["io_type"] == "UINT8"


def test_every_dynamic_dims_gear_gets_the_declared_types():
    gear = {"inputs": [_entry("x", "FP32")], "outputs": [_entry("y", "FP32")], "kernels": []}
    om = _om([_entry("x", "FP32")], [_entry("y", "FP32")])
    om.graph["dynamic"] = {"kind": "batch", "gears": [{"index": 0, "graph": None},
                                                      {"index": 1, "graph": gear}]}
    T.apply(om, {"x": "FP16"}, {"y": "UINT8"})
    assert gear["inputs"][0]["io_type"] == "FP16" and gear["outputs"][0]["io_type"] == "UINT8"


def test_an_unknown_declared_type_in_a_file_is_a_clear_error():
    for fn in (T.check_input, T.convert_output):
        with pytest.raises(DoptError, match="recompile"):
            fn({"name": "x", "io_type": "BF16"}, np.zeros(2, np.float32), path="m.om")


def test_the_doc_tables_are_generated_from_the_module():
    from pathlib import Path
    doc = (Path(__file__).resolve().parents[1] / "docs" / "omg.md").read_text("utf-8")
    begin, end = "<!-- iotypes:begin -->\n", "\n<!-- iotypes:end -->"
    assert doc[doc.index(begin) + len(begin):doc.index(end)] == T.table_markdown().rstrip("\n")
