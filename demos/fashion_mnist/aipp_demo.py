"""AIPP demo: the Fashion-MNIST net compiled with a static AIPP, fed raw UINT8 images.

    python -m demos.fashion_mnist.aipp_demo                 # resnet8, the 10k test set
    python -m demos.fashion_mnist.aipp_demo --limit 1000

The float pipeline normalises ``(x / 255 - MEAN) / STD`` on the host; the AIPP model
takes the gray bytes as they are (``YUV400_U8``) and its DTC step does
``(x - mean - min) * var_reci`` on the NPU with ``mean + min = 255 * MEAN`` and
``var_reci = 1 / (255 * STD)``. Prints the top-1 agreement of the two.
"""
from __future__ import annotations

import argparse
import io
import tempfile
from pathlib import Path

import numpy as np

from . import data

CONFIG = """\
# Fashion-MNIST: 28x28 gray bytes in, the training normalisation done by AIPP's DTC
aipp_op {{
    input_name: "x"
    input_para {{
        format: YUV400_U8
        shape {{
            src_image_size_w: 28
            src_image_size_h: 28
        }}
    }}
    dtc_func {{
        switch: true
        mean_chn_0: {mean}
        min_chn_0: {min}
        var_reci_chn_0: {var}
    }}
}}
"""


def aipp_config() -> str:
    """The config text: DTC constants from the training normalisation."""
    shift = 255.0 * data.MEAN
    mean = int(np.floor(shift))
    return CONFIG.format(mean=mean, min=repr(round(shift - mean, 6)),
                         var=repr(round(1.0 / (255.0 * data.STD), 8)))


def raw_test_images(limit: int | None = None):
    """(uint8 N x 28 x 28 x 1 frames, labels) as the files store them."""
    d = data.find_dir("test")
    x = data.read_idx(d / data.FILES["test"][0])
    y = data.read_idx(d / data.FILES["test"][1]).astype(np.int64)
    if limit:
        x, y = x[:limit], y[:limit]
    return np.ascontiguousarray(x[..., None]), y


def export_float(model_name: str, dest: Path) -> None:
    import torch
    from .demo import build_float
    net = build_float(model_name).eval()
    buf = io.BytesIO()
    torch.onnx.export(net, (torch.zeros(1, 1, 28, 28),), buf, dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}})
    dest.write_bytes(buf.getvalue())


def run(model_name: str = "resnet8", limit: int | None = None, out_dir=None,
        quiet: bool = False) -> dict:
    from dopt import runtime
    from dopt.formats import qdq
    from dopt.npu import omg
    out = Path(out_dir or tempfile.mkdtemp(prefix="dopt_aipp_"))
    out.mkdir(parents=True, exist_ok=True)
    onnx_path, cfg = out / f"{model_name}.onnx", out / "aipp_fashion_mnist.cfg"
    export_float(model_name, onnx_path)
    cfg.write_text(aipp_config())
    args = ["--mode", "0", "--framework", "5", "--model", str(onnx_path), "--output",
            str(out / f"{model_name}_aipp"), "--input_shape", "x:1,1,28,28",
            "--insert_op_conf", str(cfg)]
    if not quiet:
        print(f"$ dopt omg {' '.join(args)}")
    if quiet:
        import contextlib
        with contextlib.redirect_stdout(io.StringIO()):
            omg.main(args)
    else:
        omg.main(args)
    frames, labels = raw_test_images(limit)
    sess = runtime.load(out / f"{model_name}_aipp.om")
    pred_aipp = sess.predict(frames, batch_size=500).argmax(1)
    xf = ((frames[..., 0].astype(np.float32) / 255.0 - data.MEAN) / data.STD)[:, None]
    ort = qdq.ort_session(str(onnx_path))
    pred_float = np.concatenate([ort.run(None, {"x": xf[i:i + 500]})[0]
                                 for i in range(0, len(xf), 500)]).argmax(1)
    res = {"images": len(labels), "agreement": 100 * float((pred_aipp == pred_float).mean()),
           "acc_aipp": 100 * float((pred_aipp == labels).mean()),
           "acc_float": 100 * float((pred_float == labels).mean()),
           "input": sess.inputs[0]}
    if not quiet:
        print(f"AIPP model (UINT8 {sess.inputs[0]['shape']} in): top-1 {res['acc_aipp']:.2f}%, "
              f"float pipeline {res['acc_float']:.2f}%, same top-1 on {res['agreement']:.2f}% "
              f"of {res['images']} test images")
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet8", choices=("resnet8", "mobilenetv2s"))
    ap.add_argument("--limit", type=int, default=None, help="first N test images")
    ap.add_argument("--out", help="folder for the .onnx, config and .om")
    a = ap.parse_args(argv)
    run(a.model, a.limit, a.out)


if __name__ == "__main__":
    main()
