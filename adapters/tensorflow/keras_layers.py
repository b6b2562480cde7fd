"""Keras 3 layers that stand in for the user's layers inside ``optimize_model``.

The Keras counterpart of the PyTorch adapter's ``modules.py`` + ``npu_edges.py``:

* :class:`QuantWrapper` holds a configured ``Conv2D`` / ``DepthwiseConv2D`` / ``Dense`` /
  ``SeparableConv2D`` (a copy, so the user's float model is untouched) and, for a
  convolution whose only consumer is a ``BatchNormalization``, that BN (the BN's place in
  the graph is taken by a ``keras.layers.Identity`` of the same name). It fake-quantizes the
  input per tensor (asymmetric, learnable range ``lo``/``hi`` with LSQ gradients), the
  weights per output channel and the bias on the int32 grid. ``SeparableConv2D`` is two
  quantized layers on the NPU (depthwise, then pointwise), so it gets two input quantizers.
* :class:`NpuFloatWrapper` holds every other such layer (and a BN that does not follow a
  convolution): untouched in training, in inference it computes what the NPU's FP16 kernel
  computes (BN folded in float32, weights, bias, input and output rounded to FP16).

A convolution asked for INT8 that the NPU runs in FP16 anyway (``dopt.npu.rules.int8_skipped``:
Cin too small for INT8 to pay; for a ``SeparableConv2D`` its pointwise half) is a part of
a :class:`QuantWrapper` without an input quantizer (``npu_fp16``): it computes that FP16
kernel in training (straight-through gradients) and in inference, and is exported as a
float layer, so neither QAT nor the fake-quant model counts on an INT8 step the compiled
model will not have.

BN folding is the usual simulated folding: in training the convolution runs with the
folded, quantized weight divided by the BN factor ``f = gamma / sigma`` so that the BN
normalizes with batch statistics (moving statistics update); in inference, or once
``freeze_bn`` is set, it is exactly the exported layer - weight ``w * f``, bias
``beta + (b - mean) * f``, int32 bias.

Inference with the NPU edges on (the default) reproduces the compiled model: the input is
rounded to FP16, quantized, the convolution runs on the integer grid (``q - o`` times the
int8 weight, exact in float32 while the accumulator stays below 2**24) plus the int32
bias, and is dequantized with ``s_d * s_w[c]`` and rounded to FP16 - the NPU's arithmetic
step for step, so the fake-quant model predicts the emulated NPU bit for bit on INT8
layers. With the edges off (export checks) inference is the float32 fake-quant that the
QDQ ONNX model computes.

Mode switches live in TensorFlow variables that Keras does not track (never saved, read
at run time, so flipping one needs no retracing of ``predict``/``fit`` functions or of the
user's own ``tf.function``): ``float_path`` (calibration and the export's reference:
the float network; observers see the inputs while collecting), ``npu_edges``,
``freeze_bn``. Calibration statistics go to the core's NumPy observers through
``tf.numpy_function``, so it works inside ``model.predict`` and ``tf.function``.
"""
from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from dopt.quant import numerics as nm

from . import fake_quant as fq

PACKAGE = "dopt"
QMIN, QMAX = fq.QMIN, fq.QMAX
W_QMAX = float(nm.W_QMAX)

# op_type strings of the configuration file: the Keras class names
QUANT_CLASSES = {"Conv2D": keras.layers.Conv2D, "DepthwiseConv2D": keras.layers.DepthwiseConv2D,
                 "Dense": keras.layers.Dense, "SeparableConv2D": keras.layers.SeparableConv2D}
CONV_CLASSES = ("Conv2D", "DepthwiseConv2D", "SeparableConv2D")


def op_type(layer) -> str | None:
    """The configuration's op_type of a quantizable layer (exact class), else None."""
    for name, cls in QUANT_CLASSES.items():
        if type(layer) is cls:
            return name
    return None


class _Switches(tf.Module):
    """Per-wrapper mode flags: TF-tracked (SavedModel export works), not Keras weights."""

    def __init__(self):
        super().__init__(name="dopt_switches")
        self.float_path = tf.Variable(False, trainable=False, name="float_path")
        self.npu_edges = tf.Variable(True, trainable=False, name="npu_edges")
        self.freeze_bn = tf.Variable(False, trainable=False, name="freeze_bn")


def _observer_factory(algorithm: str):
    from dopt.calib.loop import range_observer
    return range_observer(algorithm, default=None)


class ActRange:
    """One input quantizer: learnable ``lo``/``hi`` Keras weights and a host-side observer.

    ``initialized`` is a saved weight (like the torch buffer): a range set by calibration,
    training or the first batch survives save/load; the observer itself is host state.
    """

    def __init__(self, owner: keras.layers.Layer, prefix: str, algorithm: str):
        self.lo = owner.add_weight(name=f"{prefix}_lo", shape=(), initializer="zeros",
                                   trainable=True)
        self.hi = owner.add_weight(name=f"{prefix}_hi", shape=(), initializer="zeros",
                                   trainable=True)
        self.initialized = owner.add_weight(name=f"{prefix}_initialized", shape=(),
                                            initializer="zeros", trainable=False)
        self.algorithm = algorithm
        self.observer = None
        self.collect = False

    # -- host side (eager Python) ------------------------------------------------------
    def start(self):
        self.observer = _observer_factory(self.algorithm)()
        self.collect = True

    def finish(self) -> bool:
        """Stop collecting; set the range from the observer. False when it saw nothing."""
        self.collect = False
        obs, self.observer = self.observer, None
        if obs is None or obs.empty:
            return False
        lo, hi = obs.range()
        self.lo.assign(np.float32(lo))
        self.hi.assign(np.float32(hi))
        self.initialized.assign(1.0)
        return True

    def qparams(self) -> tuple[float, int]:
        """(scale, offset) in force: the core's exact float32 values."""
        s, o = nm.activation_qparams(np.float32(self.lo.numpy()), np.float32(self.hi.numpy()))
        return float(s), int(o)

    @property
    def is_set(self) -> bool:
        return bool(self.initialized.numpy() > 0)

    # -- graph side ----------------------------------------------------------------------
    def observe(self, x):
        """An op that feeds ``x`` to the observer when collecting (checked at run time)."""
        def host(a):
            if self.collect and self.observer is not None:
                self.observer.update(np.asarray(a, np.float32))
            return np.zeros((), np.float32)
        return tf.numpy_function(host, [x], tf.float32, stateful=True, name="dopt_observe")

    def _first_batch(self, x):
        """QAT or inference without calibration: this batch sets the range (as in torch)."""
        def host(a):
            obs = _observer_factory(self.algorithm)()
            obs.update(np.asarray(a, np.float32))
            if obs.empty:
                return np.float32(0), np.float32(0), np.float32(0)
            lo, hi = obs.range()
            return np.float32(lo), np.float32(hi), np.float32(1)

        def init():
            lo, hi, ok = tf.numpy_function(host, [x], [tf.float32, tf.float32, tf.float32],
                                           stateful=True, name="dopt_first_range")
            self.lo.assign(tf.reshape(lo, []))
            self.hi.assign(tf.reshape(hi, []))
            self.initialized.assign(tf.reshape(ok, []))
            return tf.constant(True)

        return tf.cond(tf.convert_to_tensor(self.initialized) > 0,
                       lambda: tf.constant(False), init)

    def range(self, x):
        """``(lo, hi)`` tensors to quantize ``x`` with, the range set first if it is not."""
        done = self._first_batch(x)
        with tf.control_dependencies([done]):
            return tf.identity(tf.convert_to_tensor(self.lo)), \
                tf.identity(tf.convert_to_tensor(self.hi))


def _channels_first(layer) -> bool:
    return getattr(layer, "data_format", "channels_last") == "channels_first"


def _per_out_channel(v, layer, ndim: int):
    """A per-output-channel vector shaped to broadcast against the layer's output."""
    if _channels_first(layer) and ndim > 2:
        return tf.reshape(v, [1, -1] + [1] * (ndim - 2))
    return v


def _bn_factor(bn):
    """Per-channel ``gamma / sqrt(moving_var + eps)``, written with ``rsqrt`` so that graph
    rewrites (grappler turns ``x / sqrt(y)`` into ``x * rsqrt(y)``) cannot change its bits
    between eager export and traced inference."""
    var = tf.convert_to_tensor(bn.moving_variance)
    f = tf.math.rsqrt(var + np.float32(bn.epsilon))
    if bn.scale:
        f = tf.convert_to_tensor(bn.gamma) * f
    return f


def _reshape_like_kernel(f, kernel, depthwise: bool):
    """Per-output-channel ``f`` broadcastable against a TF kernel (depthwise: ``(C, M)``)."""
    if depthwise:
        return tf.reshape(f, tf.shape(kernel)[-2:])
    return f


class _Part:
    """One NPU layer inside a wrapper: a kernel, how to apply it, its input quantizer."""

    def __init__(self, kind: str, kernel_attr: str, act: ActRange | None, last: bool,
                 name: str = ""):
        self.kind, self.kernel_attr, self.act, self.last = kind, kernel_attr, act, last
        self.name = name  # the part's node name in the exported ONNX graph
        self.npu_fp16 = False  # INT8 asked, but the NPU runs it in FP16 (narrow Cin)

    @property
    def depthwise(self) -> bool:
        return self.kind == "depthwise"


def _parts(layer, acts: list) -> list[_Part]:
    t = op_type(layer) or ("BatchNormalization" if isinstance(
        layer, keras.layers.BatchNormalization) else None)
    if t == "SeparableConv2D":
        return [_Part("depthwise", "depthwise_kernel", acts[0], False, f"{layer.name}/depthwise"),
                _Part("pointwise", "pointwise_kernel", acts[1], True, f"{layer.name}/pointwise")]
    kind = {"Conv2D": "conv", "DepthwiseConv2D": "depthwise", "Dense": "dense"}.get(t)
    if kind is None:
        return []
    return [_Part(kind, "kernel", acts[0], True, layer.name)]


def _npu_fp16_parts(layer) -> list[bool]:
    """Per part of ``layer`` (see ``_parts``): does the NPU run it in FP16 even when INT8 is
    asked? The hardware profile's rule (``dopt.npu.rules.int8_skipped``) decides."""
    from dopt.npu.profile import load_profile
    from dopt.npu.rules import int8_skipped
    profile = load_profile()
    t = op_type(layer)
    if t == "Conv2D":
        groups = int(getattr(layer, "groups", 1) or 1)
        return [int8_skipped(int(layer.kernel.shape[-2]) * groups, groups, profile)]
    if t == "SeparableConv2D":  # the depthwise half is exempt, the pointwise one is not
        return [False, int8_skipped(int(layer.pointwise_kernel.shape[-2]), 1, profile)]
    return [False]


def fp16_ste(x):
    """``fake_quant.round_fp16`` with a straight-through gradient, for training: the cast's
    own gradient would round the gradient to FP16 too and flush small ones to zero."""
    return x + tf.stop_gradient(fq.round_fp16(x) - x)


def _apply(layer, part: _Part, x, kernel):
    """``part``'s linear operation on ``x`` with another kernel (no bias, no activation)."""
    if part.kind == "conv":
        return layer.convolution_op(x, kernel)
    if part.kind == "depthwise":
        return ops.depthwise_conv(x, kernel, strides=layer.strides, padding=layer.padding,
                                  dilation_rate=layer.dilation_rate, data_format=layer.data_format)
    if part.kind == "pointwise":  # the second half of tf.nn.separable_conv2d
        return ops.conv(x, kernel, strides=1, padding="valid", data_format=layer.data_format)
    return ops.matmul(x, kernel)


class _DoptWrapper(keras.layers.Wrapper):
    """Shared by both wrappers: the inner layer, the folded BN, switches and folding."""

    def __init__(self, layer, bn=None, **kwargs):
        kwargs.setdefault("name", layer.name)
        super().__init__(layer, **kwargs)
        self.bn = bn
        self.supports_jit = False  # tf.numpy_function (observers) cannot run under XLA
        self._sw = _Switches()
        self._parts: list[_Part] = []

    # -- Keras plumbing -----------------------------------------------------------------
    def build(self, input_shape=None):
        if not self.layer.built:
            self.layer.build(input_shape)
        if self.bn is not None and not self.bn.built:
            self.bn.build(self.layer.compute_output_shape(input_shape))
        self._parts = _parts(self.layer, self._make_acts())

    def _make_acts(self) -> list:
        return [None, None]

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    def get_config(self):
        config = super().get_config()
        config["bn"] = (keras.saving.serialize_keras_object(self.bn)
                        if self.bn is not None else None)
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        layer = keras.saving.deserialize_keras_object(config.pop("layer"),
                                                      custom_objects=custom_objects)
        bn = config.pop("bn", None)
        if bn is not None:
            bn = keras.saving.deserialize_keras_object(bn, custom_objects=custom_objects)
        return cls(layer, bn=bn, **config)

    # -- weights as deployed ----------------------------------------------------------
    @property
    def bn_name(self) -> str | None:
        return self.bn.name if self.bn is not None else None

    def kernel(self, part: _Part):
        return tf.convert_to_tensor(getattr(self.layer, part.kernel_attr))

    def raw_bias(self):
        b = getattr(self.layer, "bias", None)
        return tf.convert_to_tensor(b) if b is not None else None

    def folded(self, part: _Part):
        """``(kernel, bias or None)`` of ``part`` as deployed: the BN folded into the last
        part. Differentiable (the quant loss and QAT use it)."""
        w = self.kernel(part)
        if not part.last:
            return w, None
        b = self.raw_bias()
        if self.bn is None:
            return w, b
        f = _bn_factor(self.bn)
        mean = tf.convert_to_tensor(self.bn.moving_mean)
        beta = tf.convert_to_tensor(self.bn.beta) if self.bn.center else tf.zeros_like(f)
        b0 = b if b is not None else tf.zeros_like(f)
        return w * _reshape_like_kernel(f, w, part.depthwise), beta + (b0 - mean) * f

    def _activation(self, y):
        act = getattr(self.layer, "activation", None)
        return act(y) if act is not None else y

    def _float_forward(self, x, training=False, observe=False):
        """The float layer (BN unfolded, moving statistics unless training)."""
        deps = []
        for p in self._parts:
            if observe and p.act is not None:
                deps.append(p.act.observe(x))
            with tf.control_dependencies(deps):
                x = _apply(self.layer, p, x, self.kernel(p))
        b = self.raw_bias()
        if b is not None:
            x = x + _per_out_channel(b, self.layer, len(x.shape))
        if self.bn is not None:
            x = self.bn(x, training=training)
        with tf.control_dependencies(deps):
            return tf.identity(self._activation(x))


@keras.saving.register_keras_serializable(package=PACKAGE)
class QuantWrapper(_DoptWrapper):
    """An INT8 layer: input, weight and bias fake-quant; simulated BN folding."""

    def __init__(self, layer, bn=None, algorithm: str = "minmax", **kwargs):
        super().__init__(layer, bn=bn, **kwargs)
        self.algorithm = algorithm

    def build(self, input_shape=None):
        super().build(input_shape)
        for p, fp16 in zip(self._parts, _npu_fp16_parts(self.layer)):
            p.npu_fp16 = fp16

    def _make_acts(self):
        """An input quantizer per part the NPU runs in INT8 (None for an FP16 part)."""
        prefixes = ["input", "pointwise_input"]
        return [None if fp16 else ActRange(self, prefixes[i], self.algorithm)
                for i, fp16 in enumerate(_npu_fp16_parts(self.layer))]

    def get_config(self):
        config = super().get_config()
        config["algorithm"] = self.algorithm
        return config

    @property
    def acts(self) -> list[ActRange]:
        """The input quantizers, one per INT8 part (see ``int8_parts``)."""
        return [p.act for p in self.int8_parts]

    @property
    def int8_parts(self) -> list[_Part]:
        """The parts the NPU runs in INT8 (those that get a parameter-file record)."""
        return [p for p in self._parts if not p.npu_fp16]

    @property
    def parts(self) -> list[_Part]:
        return list(self._parts)

    def call(self, inputs, training=None):
        training = bool(training)
        return tf.cond(self._sw.float_path,
                       lambda: self._float_forward(inputs, observe=True),
                       lambda: self._quant_forward(inputs, training))

    def _quant_forward(self, x, training: bool):
        if training:
            return self._fake_quant_forward(x, True)
        return tf.cond(self._sw.npu_edges, lambda: self._npu_forward(x),
                       lambda: self._fake_quant_forward(x, False))

    def quantized_params(self, part: _Part, act_scale):
        """(fake-quant kernel, fake-quant bias or None, weight scales) of ``part``."""
        w, b = self.folded(part)
        s_w = fq.weight_scales(w, depthwise=part.depthwise)
        wq = fq.fake_quant_weight(w, s_w, depthwise=part.depthwise)
        if b is not None:
            b = fq.fake_quant_bias(b, act_scale, s_w)
        return wq, b, s_w

    def _fake_quant_forward(self, x, training: bool):
        """Float32 fake-quant: what QAT trains and what the QDQ ONNX model computes."""
        for p in self._parts:
            if p.npu_fp16:
                x = self._fp16_train_step(x, p) if training else self._float_step(x, p)
                continue
            lo, hi = p.act.range(x)
            x = fq.fake_quant_activation(x, lo, hi)
            if p.last and training and self.bn is not None:
                x = tf.cond(self._sw.freeze_bn,
                            lambda x=x, p=p, lo=lo, hi=hi: self._folded_step(x, p, lo, hi),
                            lambda x=x, p=p: self._bn_train_step(x, p))
            else:
                x = self._folded_step(x, p, lo, hi)
        return self._activation(x)

    def _folded_step(self, x, p: _Part, lo, hi):
        s, _ = fq.activation_qparams(lo, hi)
        wq, bq, _ = self.quantized_params(p, s)
        y = _apply(self.layer, p, x, wq)
        if bq is not None:
            y = y + _per_out_channel(bq, self.layer, len(y.shape))
        return y

    def _float_step(self, x, p: _Part):
        """``p`` as the float32 folded layer the ONNX file holds (export checks)."""
        w, b = self.folded(p)
        y = _apply(self.layer, p, x, w)
        return y if b is None else y + _per_out_channel(b, self.layer, len(y.shape))

    def _fp16_train_step(self, x, p: _Part):
        """QAT of a part the NPU runs in FP16: that kernel with straight-through rounding;
        with a BN (not frozen), the folded weight rounded and divided back by ``f``."""
        x = fp16_ste(x)
        if p.last and self.bn is not None:
            def bn_step():
                w = self.kernel(p)
                f = _reshape_like_kernel(_bn_factor(self.bn), w, p.depthwise)
                y = _apply(self.layer, p, x, fp16_ste(w * f) / f)
                b = self.raw_bias()
                if b is not None:
                    y = y + _per_out_channel(b, self.layer, len(y.shape))
                return fp16_ste(self.bn(y, training=True))
            return tf.cond(self._sw.freeze_bn, lambda: _fp16_step(self, p, x, fp16_ste),
                           bn_step)
        return _fp16_step(self, p, x, fp16_ste)

    def _bn_train_step(self, x, p: _Part):
        """conv(x, fq(w*f)) / f, with the 1/f on the (small) weight: BN then normalizes the
        unfolded output with batch statistics and updates its moving statistics."""
        w = self.kernel(p)
        f = _reshape_like_kernel(_bn_factor(self.bn), w, p.depthwise)
        wf = w * f
        wq = fq.fake_quant_weight(wf, fq.weight_scales(wf, p.depthwise), p.depthwise) / f
        y = _apply(self.layer, p, x, wq)
        b = self.raw_bias()
        if b is not None:
            y = y + _per_out_channel(b, self.layer, len(y.shape))
        return self.bn(y, training=True)

    def _npu_forward(self, x):
        """Inference as the NPU runs it: FP16 in, integer-grid INT8 layer, FP16 out.

        A convolution the NPU runs in FP16 although INT8 was asked (Cin too small, see
        ``dopt.npu.rules.int8_skipped``) is computed as that FP16 kernel here too.
        """
        for p in self._parts:
            x = fq.round_fp16(x)
            if p.npu_fp16:
                x = _fp16_step(self, p, x)
                continue
            lo, hi = p.act.range(x)
            s, o = fq.activation_qparams(lo, hi)
            xi = tf.clip_by_value(tf.round(x / s), QMIN - o, QMAX - o)        # q - o
            w, b = self.folded(p)
            s_w = fq.weight_scales(w, depthwise=p.depthwise)
            s_k = s_w if not p.depthwise else tf.reshape(s_w, tf.shape(w)[-2:])
            wi = tf.clip_by_value(tf.round(w / s_k), -W_QMAX, W_QMAX)
            acc = _apply(self.layer, p, xi, wi)
            bs = s * s_w   # float32, as numerics.bias_scales
            if b is not None:
                bi = tf.clip_by_value(tf.round(b / bs), float(nm.INT32_MIN), float(nm.INT32_MAX))
                acc = acc + _per_out_channel(bi, self.layer, len(acc.shape))
            x = fq.round_fp16(acc * _per_out_channel(bs, self.layer, len(acc.shape)))
        return fq.round_fp16(self._activation(x))

    def quant_loss_terms(self) -> list:
        """``mean(((w - fq(w)) / s_w)^2)`` per part, in units of the step (see api)."""
        terms = []
        for p in self.int8_parts:
            w, _ = self.folded(p)
            s_w = fq.weight_scales(w, depthwise=p.depthwise)
            s = s_w if not p.depthwise else tf.reshape(s_w, tf.shape(w)[-2:])
            err = (w - fq.fake_quant_weight(tf.stop_gradient(w), s_w, p.depthwise)) / s
            terms.append(tf.reduce_mean(tf.square(err)))
        return terms


@keras.saving.register_keras_serializable(package=PACKAGE)
class NpuFloatWrapper(_DoptWrapper):
    """A layer left float: trains as is; in inference runs like the NPU's FP16 kernel."""

    @property
    def bn_only(self) -> bool:
        return isinstance(self.layer, keras.layers.BatchNormalization)

    def call(self, inputs, training=None):
        training = bool(training)
        if self.bn_only:
            if training:
                return self.layer(inputs, training=True)
            return tf.cond(self._sw.npu_edges,
                           lambda: fq.round_fp16(self.layer(fq.round_fp16(inputs),
                                                            training=False)),
                           lambda: self.layer(inputs, training=False))
        if training:
            return self._float_forward(inputs, training=True)
        return tf.cond(self._sw.npu_edges, lambda: self._fp16_forward(inputs),
                       lambda: self._float_forward(inputs))

    def _fp16_forward(self, x):
        """Folded in float32, then weights, bias, input and every output in FP16."""
        for p in self._parts:
            x = _fp16_step(self, p, x)
        return fq.round_fp16(self._activation(x))


def _fp16_step(wrapper: _DoptWrapper, p: _Part, x, rnd=fq.round_fp16):
    """One layer as the NPU's FP16 kernel: folded weights and bias cast to FP16, FP16
    input, float32 arithmetic, FP16 output. ``rnd``: the rounding (``fp16_ste`` in QAT)."""
    w, b = wrapper.folded(p)
    y = _apply(wrapper.layer, p, rnd(x), rnd(w))
    if b is not None:
        y = y + _per_out_channel(rnd(b), wrapper.layer, len(y.shape))
    return rnd(y)


def custom_objects() -> dict:
    """For ``keras.saving.load_model(..., custom_objects=...)`` (importing this module
    registers them too)."""
    return {"dopt>QuantWrapper": QuantWrapper, "dopt>NpuFloatWrapper": NpuFloatWrapper}


def wrappers(model):
    """Every dopt wrapper in ``model`` (nested Functional/Sequential models included)."""
    for layer in walk_layers(model):
        if isinstance(layer, _DoptWrapper):
            yield layer


def quant_wrappers(model):
    for layer in wrappers(model):
        if isinstance(layer, QuantWrapper):
            yield layer


def walk_layers(model):
    """Leaf layers, descending into nested Functional / Sequential models."""
    for layer in getattr(model, "layers", []):
        if isinstance(layer, keras.Model) and not isinstance(layer, _DoptWrapper):
            yield from walk_layers(layer)
        else:
            yield layer


def set_switch(model, name: str, value: bool) -> None:
    for w in wrappers(model):
        getattr(w._sw, name).assign(bool(value))
