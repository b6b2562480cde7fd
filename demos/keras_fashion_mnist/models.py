"""The two Fashion-MNIST networks of the PyTorch demo, written in Keras 3 (NHWC).

``resnet8`` and ``mobilenetv2s`` have exactly the layers of ``demos/fashion_mnist/models.py``
so one set of trained weights serves both frameworks: :func:`load_torch_weights` copies
a PyTorch state dict (read with ``weights_only=True``) into the Keras model. Stride-2
convolutions pad explicitly (``ZeroPadding2D(1)`` + ``valid``) because Keras ``same``
padding pads bottom/right only and would shift the sampling grid against PyTorch's.
"""
from __future__ import annotations

import numpy as np

EPS = 1e-5  # PyTorch BatchNorm2d default


def _keras():
    import keras
    return keras


def _conv(x, cout, k, stride, name, groups=1):
    keras = _keras()
    pad = "same" if stride == 1 else "valid"
    if stride != 1 and k > 1:
        x = keras.layers.ZeroPadding2D(k // 2, name=f"{name}_pad")(x)
    if groups > 1:
        return keras.layers.DepthwiseConv2D(k, stride, padding=pad, use_bias=False,
                                            name=name)(x)
    return keras.layers.Conv2D(cout, k, stride, padding=pad, use_bias=False, name=name)(x)


def _bn(x, name):
    return _keras().layers.BatchNormalization(epsilon=EPS, momentum=0.9, name=name)(x)


def conv_bn(x, cout, k=3, s=1, groups=1, act="relu", name="c"):
    keras = _keras()
    x = _bn(_conv(x, cout, k, s, f"{name}.0", groups), f"{name}.1")
    if act == "relu":
        x = keras.layers.ReLU(name=f"{name}.2")(x)
    elif act == "relu6":
        x = keras.layers.ReLU(6.0, name=f"{name}.2")(x)
    return x


def resnet8(num_classes=10):
    keras = _keras()
    inp = keras.Input((28, 28, 1), name="input")
    x = conv_bn(inp, 16, name="stem")
    for name, cin, cout, stride in (("layer1", 16, 16, 1), ("layer2", 16, 32, 2),
                                    ("layer3", 32, 64, 2)):
        y = keras.layers.ReLU(name=f"{name}.relu1")(_bn(_conv(x, cout, 3, stride, f"{name}.conv1"),
                                                        f"{name}.bn1"))
        y = _bn(_conv(y, cout, 3, 1, f"{name}.conv2"), f"{name}.bn2")
        idt = x
        if stride != 1 or cin != cout:
            idt = _bn(_conv(x, cout, 1, stride, f"{name}.down.0"), f"{name}.down.1")
        x = keras.layers.ReLU(name=f"{name}.relu")(keras.layers.Add(name=f"{name}.add")([y, idt]))
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    out = keras.layers.Dense(num_classes, name="fc")(x)
    return keras.Model(inp, out, name="resnet8")


MBV2_CFG = [(1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 2, 2), (4, 64, 2, 1)]


def mobilenetv2s(num_classes=10):
    keras = _keras()
    inp = keras.Input((28, 28, 1), name="input")
    x = conv_bn(inp, 16, 3, 1, act="relu6", name="features.0")
    cin, idx = 16, 1
    for t, c, n, s in MBV2_CFG:
        for i in range(n):
            stride = s if i == 0 else 1
            hid, pre, j = cin * t, f"features.{idx}.block", 0
            y = x
            if t != 1:
                y = conv_bn(y, hid, 1, act="relu6", name=f"{pre}.{j}")
                j += 1
            y = conv_bn(y, hid, 3, stride, groups=hid, act="relu6", name=f"{pre}.{j}")
            y = conv_bn(y, c, 1, act=None, name=f"{pre}.{j + 1}")
            x = keras.layers.Add(name=f"features.{idx}.add")([x, y]) \
                if stride == 1 and cin == c else y
            cin, idx = c, idx + 1
    x = conv_bn(x, 128, 1, act="relu6", name=f"features.{idx}")
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    out = keras.layers.Dense(num_classes, name="classifier")(x)
    return keras.Model(inp, out, name="mobilenetv2s")


BUILDERS = {"resnet8": resnet8, "mobilenetv2s": mobilenetv2s}


def build(name: str):
    return BUILDERS[name]()


def load_torch_weights(model, pth_path) -> None:
    """Copy a PyTorch state dict of the same network into the Keras model (by layer name)."""
    import torch
    sd = {k: v.numpy() for k, v in torch.load(pth_path, map_location="cpu",
                                              weights_only=True).items()}
    used = set()
    for layer in model.layers:
        cls = type(layer).__name__
        n = layer.name
        if cls in ("Conv2D", "DepthwiseConv2D"):
            w = sd[f"{n}.weight"]  # O, I/groups, kh, kw
            k = (np.transpose(w, (2, 3, 0, 1)) if cls == "DepthwiseConv2D"   # kh, kw, C, 1
                 else np.transpose(w, (2, 3, 1, 0)))                          # kh, kw, I, O
            layer.set_weights([k])
            used.add(f"{n}.weight")
        elif cls == "BatchNormalization":
            layer.set_weights([sd[f"{n}.{p}"] for p in ("weight", "bias", "running_mean",
                                                         "running_var")])
            used |= {f"{n}.{p}" for p in ("weight", "bias", "running_mean", "running_var")}
        elif cls == "Dense":
            layer.set_weights([sd[f"{n}.weight"].T, sd[f"{n}.bias"]])
            used |= {f"{n}.weight", f"{n}.bias"}
    left = [k for k in sd if k not in used and not k.endswith("num_batches_tracked")]
    if left:
        raise ValueError(f"PyTorch parameters not placed in the Keras model: {left[:5]}")
