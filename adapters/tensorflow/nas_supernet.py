"""The weight-sharing supernet of dopt's NASEA space in Keras, and sub-net extraction.

The same design as the PyTorch adapter's: every layer holds one block per family
(``dopt.nas.sharing``) at the widest size it can be asked for, a sub-net runs on the
leading input and output channels of each weight and the centre of each kernel, and
``extract`` copies those slices into a plain functional model of ``nas_blocks``. The
supernet normalizes with batch statistics only: a sub-net's BatchNorm statistics are
estimated after extraction (the supernet's would mix paths).
"""
from __future__ import annotations

import keras
import tensorflow as tf

from dopt.nas.sharing import activate, families, group, layer_spec, unit_map
from dopt.nas.space import BLOCKS

from .nas_blocks import build_net, make_block

BN_EPSILON = 1e-3   # keras.layers.BatchNormalization's default, as the static blocks use


class SharedConvBN(keras.layers.Layer):
    """Conv + BN (+ ReLU) of the widest size that runs on its leading channels."""

    def __init__(self, cin, cout, k, stride=1, depthwise=False, act=True, **kw):
        super().__init__(**kw)
        self.stride, self.depthwise, self.act = stride, depthwise, act
        self.traced = False   # run as a traced graph (Supernet.traced)
        self.active_out, self.active_k, self.active_act, self.k_max = cout, k, act, k
        self.kernel = self.add_weight(shape=(k, k, cin, 1 if depthwise else cout),
                                      initializer="glorot_uniform", name="kernel")
        width = cin if depthwise else cout
        self.gamma = self.add_weight(shape=(width,), initializer="ones", name="gamma")
        self.beta = self.add_weight(shape=(width,), initializer="zeros", name="beta")

    def __call__(self, x, training=True):
        # built in __init__ and only ever run eagerly on tensors: Keras' call machinery
        # (input conversion, name scopes, output specs) is pure overhead here
        return self.call(x, training)

    def call(self, x, training=True):
        cin = int(x.shape[-1])
        cout = cin if self.depthwise else int(self.active_out)
        # the weights enter as tensors (read here, on the tape): a traced function given a
        # variable would keep the variable it was first traced with
        fn = _conv_bn if self.traced else _conv_bn.python_function
        return fn(x, tf.convert_to_tensor(self.kernel), tf.convert_to_tensor(self.gamma),
                  tf.convert_to_tensor(self.beta), cin, cout, int(self.active_k),
                  int(self.stride), bool(self.depthwise), bool(self.active_act))


@tf.function(reduce_retracing=True)
def _conv_bn(x, kernel, gamma, beta, cin, cout, k, stride, depthwise, act):
    """One unit on the leading channels of the shared weights, as one traced graph: the
    integers select the slice and are part of the trace key, so each (widths, kernel,
    stride) combination is traced once and reused by every unit and step (eager execution
    of the same ops is several times slower)."""
    w = kernel[:, :, :cin, :] if depthwise else kernel[:, :, :cin, :cout]
    if k != w.shape[0]:  # elastic kernel: the centre of the widest one
        o = (w.shape[0] - k) // 2
        w = w[o:o + k, o:o + k]
    if depthwise:
        y = tf.nn.depthwise_conv2d(x, w, [1, stride, stride, 1], "SAME")
    else:
        y = tf.nn.conv2d(x, w, stride, "SAME")
    mean, var = tf.nn.moments(y, axes=[0, 1, 2])
    y = tf.nn.batch_normalization(y, mean, var, beta[:cout], gamma[:cout], BN_EPSILON)
    return tf.nn.relu(y) if act else y


class Supernet:
    """PreNet + the shared blocks of every searchable layer + PostNet.

    Not a Keras model: a path is chosen per call (``arch``), which a traced graph could not
    follow; every weight is a Keras variable, listed in a fixed order by ``weights``."""

    def __init__(self, space, pre, post):
        self.space, self.align = space, space.align
        self.pre, self.post = pre, post
        self.blocks: list[dict] = []
        for i, specs in enumerate(families(space)):
            self.blocks.append({g: make_block(g, *spec, unit=SharedConvBN, shared=True,
                                              name=f"layer{i}_{g}")
                                for g, spec in specs.items()})
        self._arch = None

    @property
    def traced(self) -> bool:
        """Whether the units run as traced graphs: several times faster per step once every
        width combination is traced, which takes tens of steps; eager below that."""
        return any(u.traced for fams in self.blocks for b in fams.values() for u in _units(b))

    @traced.setter
    def traced(self, on: bool) -> None:
        for fams in self.blocks:
            for b in fams.values():
                for u in _units(b):
                    u.traced = bool(on)

    @property
    def layers(self) -> list:
        """Every Keras layer that owns weights, in a fixed order."""
        out = [self.pre]
        for fams in self.blocks:
            out += [fams[g] for g in sorted(fams)]
        return out + [self.post]

    @property
    def weights(self) -> list:
        return [w for layer in self.layers for w in layer.weights]

    @property
    def trainable_weights(self) -> list:
        return [w for layer in self.layers for w in layer.trainable_weights]

    def set_arch(self, arch) -> None:
        self._arch = arch
        for fams, (b, cin, cout, _s) in zip(self.blocks, arch):
            block = fams[group(b)]
            activate(block, b, cin, cout, self.align, _units(block))

    def __call__(self, x, arch=None, training=True):
        if arch is not None:
            self.set_arch(arch)
        x = self.pre(x, training=training)
        for fams, (b, *_) in zip(self.blocks, self._arch):
            kind = BLOCKS[b][0]
            if kind == "dwsep":  # the inverted-residual family at expansion 1
                fam = fams["ir"]
                x = fam.proj(fam.dw(x, training=training), training=training)
            elif kind == "conv":  # the basic family's first convolution alone
                x = fams["basic"].c1(x, training=training)
            else:
                x = fams[group(b)].call(x, training=training)
        return self.post(x, training=training)

    def specs(self, arch) -> list:
        return [layer_spec(b, cin, cout, s, self.align) for b, cin, cout, s in arch]


def _units(block) -> list:
    return [u for u in (getattr(block, n, None) for n in
                        ("c", "dw", "pw", "c1", "c2", "shortcut", "a", "b", "exp", "proj"))
            if isinstance(u, SharedConvBN)]


def extract(supernet: Supernet, arch, pre, post, input_shape) -> keras.Model:
    """The sub-net ``arch`` as a plain functional model carrying the supernet's weight
    slices; ``pre``/``post`` are fresh user layers that receive the supernet's weights.
    BatchNorm moving statistics start at 0 / 1 (estimate them before evaluating)."""
    net = build_net(pre, post, supernet.specs(arch), input_shape)
    pre.set_weights(supernet.pre.get_weights())
    post.set_weights(supernet.post.get_weights())
    for i, (fams, (b, *_)) in enumerate(zip(supernet.blocks, arch)):
        if BLOCKS[b][0] == "identity":
            continue
        src, names = fams[group(b)], unit_map(b)
        dst = net.get_layer(f"layer{i}")
        for attr in ("c", "dw", "pw", "c1", "c2", "shortcut", "a", "b", "exp", "proj"):
            unit = getattr(dst, attr, None)
            if unit is None or not hasattr(unit, "conv"):
                continue
            s = getattr(src, names.get(attr, attr))
            kernel = unit.conv.kernel
            kk, _, ci, co = kernel.shape
            o = (s.kernel.shape[0] - kk) // 2
            kernel.assign(s.kernel[o:o + kk, o:o + kk, :ci, :co])
            c = unit.bn.gamma.shape[0]
            unit.bn.gamma.assign(s.gamma[:c])
            unit.bn.beta.assign(s.beta[:c])
    return net
