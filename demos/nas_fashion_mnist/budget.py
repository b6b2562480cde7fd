"""The demo's latency budget: the emulated NPU's INT8 estimate of the hand-designed
MobileNetV2S (``demos/fashion_mnist/models.py``) with the current hardware profile.

    python -m demos.nas_fashion_mnist.budget            # print it
    python -m demos.nas_fashion_mnist.budget --write    # and set it in scen.yaml

``constraint_value`` in ``scen.yaml`` is a number (the reference's format), so it is
written there; run this again whenever the profile's cost model changes (the test suite
checks that ``scen.yaml`` still holds the current value). The estimate is the search's own
(``dopt.nas.latency.estimate_onnx``: the ONNX at batch 1 through ``dopt omg``'s
preparation, lowering and placement, every convolution and fully-connected layer INT8).
"""
from __future__ import annotations

import argparse
import io
import re
import tempfile
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCEN = HERE / "scen.yaml"
PROFILE = "kirin9000"  # processor_version npu_v1
DIGITS = 3  # significant digits written to scen.yaml


def estimate(model=None, input_shape=(1, 1, 28, 28), profile: str = PROFILE) -> dict:
    """``{"latency_fp16_ms", "latency_int8_ms", "npu_gmacs", "profile"}`` of ``model``
    (MobileNetV2S by default)."""
    import torch

    from demos.fashion_mnist import models
    from dopt.nas.latency import estimate_onnx
    from dopt.npu.profile import load_profile
    net = (model or models.build("mobilenetv2s")).eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(input_shape),), buf, dynamo=False, opset_version=13,
                          input_names=["input"], output_names=["output"])
    prof = load_profile(profile)
    with tempfile.TemporaryDirectory(prefix="dopt-budget-") as tmp:
        path = Path(tmp) / "model.onnx"
        path.write_bytes(buf.getvalue())
        out = estimate_onnx(path, prof)
    out["profile"] = f"{prof.name} {prof.version}"
    return out


def budget_ms(est: dict) -> float:
    return float(f"{est['latency_int8_ms']:.{DIGITS}g}")


def scen_value(path: Path = SCEN) -> float:
    m = re.search(r"^\s*constraint_value:\s*([0-9.eE+-]+)", path.read_text("utf-8"), re.M)
    return float(m.group(1))


def write_scen(est: dict, path: Path = SCEN) -> None:
    """Set ``constraint_value`` and the profile named in the header comment (atomically)."""
    from dopt.formats.fileio import atomic_path
    text = path.read_text("utf-8")
    text = re.sub(r"^(\s*constraint_value:\s*)[0-9.eE+-]+", rf"\g<1>{budget_ms(est):g}", text,
                  count=1, flags=re.M)
    text = re.sub(r"^## [0-9.]+ ms with the cost model of profile [^ ]+ [^ ]+ ",
                  f"## {budget_ms(est):g} ms with the cost model of profile {est['profile']} ",
                  text, count=1, flags=re.M)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, "utf-8")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write", action="store_true", help="set constraint_value in scen.yaml")
    a = ap.parse_args(argv)
    est = estimate()
    print(f"MobileNetV2S on {est['profile']}: estimated INT8 {est['latency_int8_ms']:.4f} ms, "
          f"FP16 {est['latency_fp16_ms']:.4f} ms -> budget {budget_ms(est):g} ms "
          f"(scen.yaml has {scen_value():g})")
    if a.write:
        write_scen(est)
        print(f"wrote constraint_value {budget_ms(est):g} to {SCEN.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
