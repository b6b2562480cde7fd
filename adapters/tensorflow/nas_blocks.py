"""Blocks of dopt's NASEA search space in Keras 3 (channels_last).

This file imports keras and numpy only: its text is copied into every
``model_arch_result_N.py`` the search writes, so a result rebuilds without dopt installed.
Each layer is described by ``(kind, cin, hidden, cout, kernel, stride)``; ``unit`` builds a
conv + BN (+ ReLU), so the supernet reuses the same block code with weight-sharing units of
the widest size. Convolutions use "same" padding, as Keras layers do.
"""
import keras
import numpy as np


class ConvBN(keras.layers.Layer):
    """Conv (no bias) + BatchNorm (+ ReLU): one NPU kernel once BN folds and ReLU fuses."""

    def __init__(self, cin, cout, k, stride=1, depthwise=False, act=True, **kw):
        super().__init__(**kw)
        self.depthwise, self.act = depthwise, act
        if depthwise:
            self.conv = keras.layers.DepthwiseConv2D(k, stride, padding="same", use_bias=False,
                                                     name="conv")
        else:
            self.conv = keras.layers.Conv2D(cout, k, stride, padding="same", use_bias=False,
                                            name="conv")
        self.bn = keras.layers.BatchNormalization(name="bn")

    def call(self, x, training=False):
        y = self.bn(self.conv(x), training=training)
        return keras.ops.relu(y) if self.act else y


def _same(block, x, y):
    """Whether the shortcut is the input itself: fixed when the block is built for one
    shape, checked per call in the supernet."""
    if block.same is not None:
        return block.same
    return block.stride == 1 and x.shape[-1] == y.shape[-1]


class PlainConv(keras.layers.Layer):
    """kxk convolution."""
    WIDTHS = {"c": "cout"}

    def __init__(self, cin, hid, cout, k, stride, unit=ConvBN, shared=False, **kw):
        super().__init__(**kw)
        self.c = unit(cin, cout, k, stride, name="c")

    def call(self, x, training=False):
        return self.c(x, training=training)


class DepthwiseSeparable(keras.layers.Layer):
    """Depthwise kxk + pointwise 1x1 (MobileNetV1)."""
    WIDTHS = {"pw": "cout"}

    def __init__(self, cin, hid, cout, k, stride, unit=ConvBN, shared=False, **kw):
        super().__init__(**kw)
        self.dw = unit(cin, cin, k, stride, depthwise=True, name="dw")
        self.pw = unit(cin, cout, 1, 1, name="pw")

    def call(self, x, training=False):
        return self.pw(self.dw(x, training=training), training=training)


class BasicResidual(keras.layers.Layer):
    """Two kxk convolutions with a shortcut (ResNet basic block)."""
    WIDTHS = {"c1": "cout", "c2": "cout", "shortcut": "cout"}

    def __init__(self, cin, hid, cout, k, stride, unit=ConvBN, shared=False, **kw):
        super().__init__(**kw)
        self.stride = stride
        self.same = None if shared else stride == 1 and cin == cout
        self.c1 = unit(cin, cout, k, stride, name="c1")
        self.c2 = unit(cout, cout, k, 1, act=False, name="c2")
        self.shortcut = unit(cin, cout, 1, stride, act=False, name="shortcut") \
            if shared or stride != 1 or cin != cout else None

    def call(self, x, training=False):
        y = self.c2(self.c1(x, training=training), training=training)
        s = x if _same(self, x, y) else self.shortcut(x, training=training)
        return keras.ops.relu(y + s)


class Bottleneck(keras.layers.Layer):
    """1x1 reduce, kxk, 1x1 expand, with a shortcut (ResNet bottleneck)."""
    WIDTHS = {"a": "hid", "b": "hid", "c": "cout", "shortcut": "cout"}

    def __init__(self, cin, hid, cout, k, stride, unit=ConvBN, shared=False, **kw):
        super().__init__(**kw)
        self.stride = stride
        self.same = None if shared else stride == 1 and cin == cout
        self.a = unit(cin, hid, 1, 1, name="a")
        self.b = unit(hid, hid, k, stride, name="b")
        self.c = unit(hid, cout, 1, 1, act=False, name="c")
        self.shortcut = unit(cin, cout, 1, stride, act=False, name="shortcut") \
            if shared or stride != 1 or cin != cout else None

    def call(self, x, training=False):
        y = self.c(self.b(self.a(x, training=training), training=training), training=training)
        s = x if _same(self, x, y) else self.shortcut(x, training=training)
        return keras.ops.relu(y + s)


class InvertedResidual(keras.layers.Layer):
    """1x1 expand, depthwise kxk, 1x1 project; residual where shapes allow (MobileNetV2)."""
    WIDTHS = {"exp": "hid", "proj": "cout"}

    def __init__(self, cin, hid, cout, k, stride, unit=ConvBN, shared=False, **kw):
        super().__init__(**kw)
        self.stride = stride
        self.same = None if shared else stride == 1 and cin == cout
        self.exp = unit(cin, hid, 1, 1, name="exp")
        self.dw = unit(hid, hid, k, stride, depthwise=True, name="dw")
        self.proj = unit(hid, cout, 1, 1, act=False, name="proj")

    def call(self, x, training=False):
        y = self.proj(self.dw(self.exp(x, training=training), training=training),
                      training=training)
        return x + y if _same(self, x, y) else y


class Identity(keras.layers.Layer):
    """No layer (stride 1 only); the width stays the input's."""
    WIDTHS: dict = {}

    def __init__(self, cin=0, hid=0, cout=0, k=0, stride=1, unit=ConvBN, shared=False, **kw):
        super().__init__(**kw)

    def call(self, x, training=False):
        return x


KINDS = {"conv": PlainConv, "dwsep": DepthwiseSeparable, "basic": BasicResidual,
         "bottleneck": Bottleneck, "ir": InvertedResidual, "identity": Identity}


def make_block(kind, cin, hid, cout, k, stride, unit=ConvBN, shared=False, name=None):
    return KINDS[kind](cin, hid, cout, k, stride, unit=unit, shared=shared, name=name)


def build_net(pre, post, layers, input_shape, name="searched_net"):
    """The user's PreNet, the searched layers, the user's PostNet as one functional model
    (``input_shape``: height, width, channels, without the batch)."""
    inputs = keras.Input(shape=tuple(input_shape), name="input")
    x = pre(inputs)
    for i, spec in enumerate(layers):
        x = make_block(*spec, name=f"layer{i}")(x)
    return keras.Model(inputs, post(x), name=name)


def load_weights_npz(model, path):
    """Weights saved by the search, in the order of ``model.weights`` (no pickle)."""
    with np.load(path, allow_pickle=False) as z:
        arrays = [z[f"w{i}"] for i in range(len(z.files))]
    if len(arrays) != len(model.weights):
        raise ValueError(f"{path}: {len(arrays)} arrays for {len(model.weights)} weights")
    for v, a in zip(model.weights, arrays):
        if tuple(v.shape) != a.shape:
            raise ValueError(f"{path}: {v.path} is {tuple(v.shape)}, the file has {a.shape}")
        v.assign(a)
