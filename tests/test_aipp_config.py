"""The AIPP config parser: the reference's full examples verbatim, every rule, a fuzz."""
from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from dopt.errors import DoptError
from dopt.npu import aipp_config as A

# The reference's examples (its chapter on the AIPP config file), verbatim, in aipp_examples/.
EXAMPLES = Path(__file__).resolve().parent / "aipp_examples"
EX_ANNOTATED = (EXAMPLES / "full_annotated.cfg").read_text("utf-8")
EX_DYNAMIC = (EXAMPLES / "full_dynamic.cfg").read_text("utf-8")
EX_STATIC = (EXAMPLES / "full_static.cfg").read_text("utf-8")
EX_MIXED = (EXAMPLES / "mixed.cfg").read_text("utf-8")


def test_static_full_example_is_static_with_every_function():
    (s,) = A.parse_text(EX_STATIC)
    assert s["mode"] == "static" and s["format"] == "AYUV444_U8"
    assert (s["src_image_size_w"], s["src_image_size_h"]) == (480, 384)
    assert s["crop"] == {"switch": True, "dynamic": False, "load_start_pos_w": 50,
                         "load_start_pos_h": 50, "crop_size_w": 150, "crop_size_h": 150}
    assert s["resize"]["resize_output_w"] == 182 and s["padding"]["top_padding_size"] == 21
    assert s["swap"]["ax_swap_switch"] and s["csc"]["matrix_r2c2"] == 359
    assert s["dtc"]["var_reci_chn_2"] == 2.0
    assert s["rotation"] == {"switch": True, "dynamic": False, "rotation_angle": 180}


def test_dynamic_full_example_is_dynamic():
    (s,) = A.parse_text(EX_DYNAMIC)
    assert s["mode"] == "dynamic" and s["format"] is None
    assert s["csc"]["output_format"] == "RGB888_U8" and s["csc"]["color_space"] == "JPEG"
    assert all(s[f]["dynamic"] for f in ("crop", "resize", "padding", "swap", "csc", "dtc"))


def test_mixed_example_is_dynamic_with_static_parts():
    (s,) = A.parse_text(EX_MIXED)
    assert s["mode"] == "dynamic" and s["crop"]["dynamic"] and not s["resize"]["dynamic"]
    assert s["padding"]["right_padding_size"] == 24


def test_annotated_example_breaks_the_dynamic_padding_rule_and_parses_once_fixed():
    with pytest.raises(DoptError) as e:
        A.parse_text(EX_ANNOTATED, file="a.cfg")
    msg = str(e.value)
    assert "line 100" in msg and "left_padding_size" in msg and "must give its sizes as 0" in msg
    fixed = EX_ANNOTATED.replace("_padding_size: 12", "_padding_size: 0")
    (s,) = A.parse_text(fixed)
    assert (s["input_name"], s["related_input_rank"], s["node_after_aipp"],
            s["input_edge_idx"]) == ("data", 0, "op_name", 0)
    assert s["max_src_image_size"] == 102400 and s["csc"]["matrix_r0c2"] == 259
    assert s["dtc"]["mean_chn_3"] == 0 and s["padding"]["padding_value_chn_3"] == 20.0
    assert s["rotation"]["rotation_angle"] == 0 and s["mode"] == "dynamic"


def test_no_function_switched_on_is_dynamic():
    (s,) = A.parse_text('aipp_op { input_para { max_src_image_size: 1000 } }')
    assert s["mode"] == "dynamic"


STATIC = """aipp_op {
    input_para {
        format: %s
        shape {
            src_image_size_w: %d
            src_image_size_h: 64
        }
    }
%s
}
"""


@pytest.mark.parametrize("fmt,w,body,needle", [
    ("YUV420SP_U8", 63, "crop_func { switch: true crop_size_w: 8 crop_size_h: 8 }", "even"),
    ("RGB888_U8", 64, "swap_func { ax_swap_switch: true }", "AX swap is not available"),
    ("YUV400_U8", 64, "swap_func { rbuv_swap_switch: true }", "RB/UV swap is not available"),
    ("YUV400_U8", 64, "csc_func { switch: true matrix_r0c0: 256 }",
     "colour-space conversion is not available from YUV400_U8"),
    ("YUV420SP_U8", 64, "csc_func { switch: true dynamic: true output_format: YUV400_U8 }",
     "from YUV420SP_U8 to YUV400_U8"),
    ("RGB888_U8", 64, "crop_func { switch: true load_start_pos_w: 60 crop_size_w: 8 "
     "crop_size_h: 8 }", "the crop window leaves the image"),
    ("RGB888_U8", 64, "resize_func { switch: true resize_output_w: 449 resize_output_h: 20 }",
     "resize output out of range"),
    ("RGB888_U8", 64, "resize_func { switch: true resize_output_w: 15 resize_output_h: 20 }",
     "resize output out of range"),
    ("RGB888_U8", 64, "padding_func { switch: true left_padding_size: 33 }", "padding too large"),
    ("RGB888_U8", 64, "rotation_func { switch: true rotation_angle: 45 }", "rotation angle"),
    ("RGB888_U8", 64, "rotation_func { switch: true rotation_angle: 90 }\n"
     "crop_func { switch: true dynamic: true crop_size_w: 8 crop_size_h: 8 }",
     "only in a static AIPP"),
    ("RGB888_U8", 64, "csc_func { switch: true }", "needs its matrix"),
    ("RGB888_U8", 64, "dtc_func { switch: true mean_chn_0: 256 }", "out of range"),
    ("RGB888_U8", 64, "dtc_func { switch: maybe }", "true or false"),
    ("RGB888_U8", 64, "dtc_func { swich: true }", "did you mean 'switch'"),
    ("RGB888_U8", 64, "crop_fnuc { switch: true }", "did you mean 'crop_func'"),
    ("RGB888_U8", 64, "dtc_func { switch: true }\ndtc_func { switch: true }", "given twice"),
    ("RGB888_U8", 64, "dtc_func { switch: true", "never closed"),
])
def test_rules_are_one_paragraph_errors_with_line_and_field(fmt, w, body, needle):
    with pytest.raises(DoptError) as e:
        A.parse_text(STATIC % (fmt, w, body), file="bad.cfg")
    msg = str(e.value)
    assert needle in msg and "bad.cfg" in msg and "line " in msg and "\n" not in msg


def test_format_enum_and_static_needs_format_and_size():
    with pytest.raises(DoptError, match="did you mean YUV420SP_U8"):
        A.parse_text(STATIC % ("YUV420SP", 64, ""))
    with pytest.raises(DoptError, match="static AIPP needs the input image format"):
        A.parse_text("aipp_op { dtc_func { switch: true } }")
    with pytest.raises(DoptError, match="needs max_src_image_size"):
        A.parse_text("aipp_op { crop_func { switch: true dynamic: true crop_size_w: 4 "
                     "crop_size_h: 4 } }")
    with pytest.raises(DoptError, match="no aipp_op"):
        A.parse_text("# nothing\n")


def test_several_ops_and_aliases():
    text = ('aipp_op { input_name: "a" input_para { format: RGB888_U8 shape { '
            'src_image_size_w: 8 src_image_size_h: 8 } } rotate_para { switch: true '
            'rotate_angle: 270 } }\n') * 2
    specs = A.parse_text(text)
    assert len(specs) == 2 and specs[1]["rotation"]["rotation_angle"] == 270


_WORDS = ["aipp_op", "input_para", "shape", "crop_func", "dtc_func", "format", "switch",
          "dynamic", "true", "crop_size_w", "src_image_size_w", "YUV420SP_U8", "{", "}", ":",
          "12", "-3", "4.5", '"data"', "#", "\n", "nan", "1e99", "99999999999999"]


@settings(max_examples=300, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(_WORDS), max_size=60), st.text(max_size=40))
def test_fuzz_never_tracebacks(words, noise):
    for text in (" ".join(words), " ".join(words) + noise,
                 EX_STATIC[: len(noise) * 10] + noise):
        try:
            specs = A.parse_text(text, file="fuzz.cfg")
        except DoptError as e:
            assert "\n" not in str(e)
        else:
            assert all(s["mode"] in ("static", "dynamic") for s in specs)
