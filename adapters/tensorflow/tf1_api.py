"""The reference's TensorFlow 1 session API: quantization inside the user's ``tf.compat.v1`` graph.

``optimize_model`` rewrites ``sess.graph`` (the default graph of the reference) in place,
rerouting the *inputs* of every configured ``Conv2D`` / ``DepthwiseConv2dNative`` /
``MatMul`` with ``Operation._update_input`` (no graph_editor, no re-import): the user's
ops, variables and Python tensor handles stay valid, so the user's ``Saver``, optimizer and
``sess.run(output)`` keep working. What each op reads depends on a mode computed from the
reference's two placeholders and the calibration switch:

* float (``quant_flag <= 0``): the original tensors - the float graph, bit for bit;
* quantized (``quant_flag > 0``): activation fake-quant with a learnable per-tensor range
  (variables ``<op>/dopt_act/lo|hi``), per-output-channel fake-quant of the weight with an
  inference-mode ``FusedBatchNorm`` folded in, int32 bias fake-quant; a folded BatchNorm is
  bypassed (its consumers read the folded result);
* calibrating (``set_calibrate_state(sess, True)``): float, and each quantized op's input is
  observed (a ``tf.numpy_function`` feeding the core's range observers).

On the quantized path with ``is_train_flag`` false (inference) the graph also reproduces the
NPU's FP16 data, as the PyTorch and Keras adapters do in eval mode: INT8 ops read FP16
inputs and write FP16 outputs, and the quantizable ops left float run as FP16 kernels
(BatchNorm folded, FP16 input, weight, bias and output). That is what makes the fake-quant
graph predict the compiled model.

Activations (and the BatchNorm bypass) go through raw TF1 ``Switch``/``Merge`` pairs, so the
path not taken costs nothing forward or backward; weights and biases, which are small, are
computed both ways and selected with ``tf.where``.

"Ranges update with training" (``is_train_flag``) means: the range variables are trainable
and get LSQ gradients through the fake-quant, so the user's optimizer learns them; with
``is_train_flag`` false their gradient is zero. A range that has never been set (no
calibration) is initialised from the first quantized batch's min/max, in the graph.

A float checkpoint lacks the dopt variables, so the restore op of a ``Saver`` built after
``optimize_model`` would fail on it. ``optimize_model`` gives the session (that one object
only) a narrow fallback: a Saver restore whose checkpoint lacks *only* dopt variables (and
their optimizer slots) restores the other variables and initializes the missing dopt ones.
See docs/tensorflow_v1.md.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import warnings
import weakref
from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf

from dopt.calib.loop import range_observer, resolve_algorithm
from dopt.formats.strategy_config import FLOAT, INT8, check_against_model, load_config, write_config
from dopt.errors import DoptError
from dopt.formats.param_file import TF_OP_TYPES

from . import fake_quant as fq

v1 = tf.compat.v1
log = logging.getLogger("dopt.tensorflow")

QUANT_OP_TYPES = TF_OP_TYPES  # the parameter file's TF op types
STRATEGIES = {t: (FLOAT, INT8) for t in QUANT_OP_TYPES}
FBN_TYPES = ("FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3")
BIAS_TYPES = ("BiasAdd", "Add", "AddV2")
_READ_TYPES = ("Identity", "ReadVariableOp")
_VAR_TYPES = ("VarHandleOp", "VariableV2", "Variable")
ACT_SCOPE = "dopt_act"
_GRAD_SCOPE = re.compile(r"^(.*/)?gradients(_\d+)?/")


# --------------------------------------------------------------------------- graph analysis

def variable_source(t: tf.Tensor):
    """The variable op a tensor reads (through Identity / ReadVariableOp), else None."""
    op = t.op
    for _ in range(8):
        if op.type in _VAR_TYPES:
            return op
        if op.type not in _READ_TYPES or not op.inputs:
            return None
        op = op.inputs[0].op
    return None


def _consumers(t: tf.Tensor):
    return [c for c in t.consumers()]


@dataclass
class Layer:
    """A quantizable op and the pattern around it (all names are graph op names)."""

    name: str
    op_type: str
    depthwise: bool
    transpose_b: bool
    bias: tuple[str, int] | None = None   # (bias op, index of its bias input)
    bn: str | None = None                 # inference-mode FusedBatchNorm folded into it
    bn_training: str | None = None        # training-mode FusedBatchNorm (cannot fold)
    bn_dangling: str | None = None        # foldable BN whose output nothing in the graph reads

    @property
    def tail(self) -> str:
        """The op whose output 0 is the layer's result before the BatchNorm."""
        return self.bias[0] if self.bias else self.name


def _channels_last(op) -> bool:
    if op.type == "MatMul":
        return True
    return op.get_attr("data_format") in (b"NHWC", "NHWC")


def _bias_of(op) -> tuple[str, int] | None:
    """``(bias op, input index)`` when the op's only consumer adds a per-channel bias variable."""
    out = op.outputs[0]
    cons = _consumers(out)
    if len(cons) != 1 or cons[0].type not in BIAS_TYPES or len(cons[0].inputs) != 2:
        return None
    c = cons[0]
    if c.type == "BiasAdd":
        if c.inputs[0] is not out or c.get_attr("data_format") != (
                b"NHWC" if op.type == "MatMul" else op.get_attr("data_format")):
            return None
        idx = 1
    else:  # Add: a rank-1 operand broadcasts over the last axis only
        if not _channels_last(op):
            return None
        idx = 1 if c.inputs[0] is out else 0
        if c.inputs[1 - idx] is not out:
            return None
    b = c.inputs[idx]
    if variable_source(b) is None or b.shape.rank != 1 or b.dtype != tf.float32:
        return None
    return c.name, idx


def _analyse(op) -> Layer:
    depthwise = op.type == "DepthwiseConv2dNative"
    tb = bool(op.get_attr("transpose_b")) if op.type == "MatMul" else False
    layer = Layer(op.name, op.type, depthwise, tb, bias=_bias_of(op))
    if op.type == "MatMul":
        return layer
    tail = op.graph.get_operation_by_name(layer.tail).outputs[0]
    cons = _consumers(tail)
    if len(cons) != 1 or cons[0].type not in FBN_TYPES or cons[0].inputs[0] is not tail:
        return layer
    bn = cons[0]
    if bn.get_attr("is_training"):
        layer.bn_training = bn.name
        return layer
    if bn.get_attr("data_format") != op.get_attr("data_format"):
        return layer
    if any(_consumers(o) for o in bn.outputs[1:]):
        return layer
    if not _consumers(bn.outputs[0]):
        layer.bn_dangling = bn.name
    layer.bn = bn.name
    return layer


def _backprop(name: str) -> bool:
    """Ops that ``tf.gradients`` / optimizers created (``gradients/``, ``gradients_1/``)."""
    return _GRAD_SCOPE.match(name) is not None


def find_layers(graph: tf.Graph) -> dict[str, Layer]:
    """Quantizable ops in creation (topological) order: weight input read from a variable
    (gradient ops, which also multiply by weights, are not layers)."""
    out = {}
    for op in graph.get_operations():
        if op.type in QUANT_OP_TYPES and len(op.inputs) >= 2 and not _backprop(op.name) \
                and variable_source(op.inputs[1]) is not None \
                and op.inputs[1].dtype == tf.float32:
            out[op.name] = _analyse(op)
    return out


def quantizable_layers(graph: tf.Graph) -> dict[str, str]:
    return {k: v.op_type for k, v in find_layers(graph).items()}


# --------------------------------------------------------------------------- the quant math

def layer_tensors(graph: tf.Graph, layer: Layer) -> dict:
    """The float tensors a layer's quantization reads, taken before any rerouting."""
    op = graph.get_operation_by_name(layer.name)
    t = {"x": op.inputs[0], "w": op.inputs[1], "b": None, "bn": None}
    if layer.bias:
        bop, idx = layer.bias
        t["b"] = graph.get_operation_by_name(bop).inputs[idx]
    if layer.bn:
        bn = graph.get_operation_by_name(layer.bn)
        t["bn"] = tuple(bn.inputs[1:5]) + (np.float32(bn.get_attr("epsilon")),)
    return t


def folded(layer: Layer, t: dict):
    """``(w, b)`` as deployed, in the weight's *logical* layout (output channel last):
    BatchNorm folded when the layer has one; ``b`` None when the layer has no bias and no BN."""
    w, b = t["w"], t["b"]
    if layer.transpose_b:
        w = tf.transpose(w)
    if t["bn"] is None:
        return w, b
    gamma, beta, mean, var, eps = t["bn"]
    f = gamma * tf.math.rsqrt(var + eps)
    if layer.depthwise:
        w = w * tf.reshape(f, tf.shape(w)[-2:])
    else:
        w = w * f
    b0 = b if b is not None else tf.zeros_like(f)
    return w, beta + (b0 - mean) * f


def quant_params(layer: Layer, t: dict, lo, hi) -> dict:
    """The layer's quantized tensors: ``dict(w, b, wq, bq, s_w, scale, offset)``.

    ``w``/``wq`` in the logical layout; ``bq`` None without a bias. One definition serves
    the quantized path (inside its ``tf.cond`` branches) and the export (outside).
    """
    w, b = folded(layer, t)
    s_w = fq.weight_scales(w, layer.depthwise)
    wq = fq.fake_quant_weight(w, s_w, layer.depthwise)
    scale, offset = fq.activation_qparams(lo, hi)
    bq = None if b is None else fq.fake_quant_bias(b, scale, s_w)
    return {"w": w, "b": b, "wq": wq, "bq": bq, "s_w": s_w, "scale": scale, "offset": offset}


# --------------------------------------------------------------------------- state per graph

@dataclass
class _LayerState:
    layer: Layer
    tensors: dict
    algorithm: str
    factory: object
    lo: object
    hi: object
    initialized: object
    lo_ph: object
    hi_ph: object
    assign_range: object
    observer: object = None


@dataclass
class _State:
    config: str
    quant_flag: object
    is_train_flag: object
    quant: object = None     # bool tensor: the quantized path is active
    layers: dict = field(default_factory=dict)        # quantized: name -> _LayerState
    all_layers: dict = field(default_factory=dict)    # every quantizable op: name -> Layer
    fp16_tensors: dict = field(default_factory=dict)  # float ops rewritten: name -> tensors
    calibrating_py: bool = False
    quant_loss: object = None
    var_keys: set = field(default_factory=set)
    restored: bool = False
    warned_reinit: bool = False
    fallback_savers: dict = field(default_factory=dict)


_STATES: "weakref.WeakKeyDictionary[tf.Graph, _State]" = weakref.WeakKeyDictionary()


def is_quantized(graph) -> bool:
    """True once ``optimize_model`` has rewritten ``graph``."""
    return graph in _STATES


def state_of(graph, what: str) -> _State:
    st = _STATES.get(graph)
    if st is None:
        raise DoptError(f"{what} needs a session whose graph went through optimize_model",
                        hint="call optimize_model(sess, config_file, is_train_flag, quant_flag) "
                             "first, in the same graph")
    return st


def _check_sess(sess, what: str) -> tf.Graph:
    g = getattr(sess, "graph", None)
    if not isinstance(g, tf.Graph) or not callable(getattr(sess, "run", None)):
        raise DoptError(f"{what} expects a tf.compat.v1.Session", found=type(sess).__name__,
                        hint="pass the session whose graph holds the float model")
    return g


# --------------------------------------------------------------------------- public API

def generate_config_file(sess, dst_path):
    """Write the reference JSON listing every quantizable op of ``sess.graph`` as float."""
    g = _check_sess(sess, "generate_config_file")
    if is_quantized(g):
        raise DoptError("generate_config_file was given a graph already rewritten by "
                        "optimize_model", hint="generate the configuration from the float graph")
    layers = quantizable_layers(g)
    if not layers:
        raise DoptError("the graph has no quantizable op",
                        expected="a Conv2D, DepthwiseConv2dNative or MatMul whose weight "
                                 "input reads a variable",
                        hint="build the model with tf.compat.v1.get_variable + tf.nn ops "
                             "(see docs/tensorflow_v1.md)")
    hints = {t: [INT8] for t in QUANT_OP_TYPES if t in layers.values()}
    return write_config(dst_path, layers, hints)


def optimize_model(sess, config_file, is_train_flag, quant_flag):
    """Insert fake-quant for the configured ops into ``sess.graph`` (in place).

    Returns that graph (the reference returns nothing; ignoring the result is fine).
    """
    g = _check_sess(sess, "optimize_model")
    for t, name, dtype in ((is_train_flag, "is_train_flag", tf.bool),
                           (quant_flag, "quant_flag", tf.int32)):
        if not isinstance(t, tf.Tensor) or t.dtype != dtype:
            raise DoptError(f"optimize_model: {name} must be a tf.{dtype.name} placeholder "
                            "tensor", found=repr(t), hint=f"{name} = tf.compat.v1.placeholder("
                            f"tf.{dtype.name})" + (", name='is_train')" if dtype == tf.bool
                                                   else ")"))
        if t.graph is not g:
            raise DoptError(f"optimize_model: {name} belongs to another graph than the "
                            "session's", hint="create the placeholders in the session's graph")
    if is_quantized(g):
        raise DoptError("optimize_model was already applied to this graph",
                        hint="build the float graph afresh (new tf.Graph) for another run")
    cfg = load_config(config_file)
    all_layers = find_layers(g)
    check_against_model(cfg, {k: v.op_type for k, v in all_layers.items()}, STRATEGIES,
                        resolve_algorithm)
    wanted = set(cfg.quantized_layers())
    order = [n for n in all_layers if n in wanted]
    for name in order:
        layer = all_layers[name]
        if layer.bn_training:
            raise DoptError(f"op '{name}' is followed by FusedBatchNorm '{layer.bn_training}' "
                            "in training mode, which cannot be folded", file=cfg.path,
                            field=f"layer_strategy.{name}",
                            hint="build the graph for quantization with is_training=False in "
                                 "tf.compat.v1.nn.fused_batch_norm (BN statistics are frozen "
                                 "during QAT), or leave this op float")
        if layer.bn_dangling:
            raise DoptError(f"the output of BatchNorm '{layer.bn_dangling}' after op '{name}' "
                            "has no consumer in the graph, so the folded result could not be "
                            "routed to what you fetch", file=cfg.path,
                            field=f"layer_strategy.{name}",
                            hint="fetch a tf.identity(...) of it instead of the BatchNorm "
                                 "output itself")
    with g.as_default(), g.name_scope(None), _v1_conds():
        st = _build(g, cfg, all_layers, order, is_train_flag, quant_flag)
    # nothing runs here: the dopt variables are initialized by the user's
    # global_variables_initializer() (or by the float-restore fallback)
    _STATES[g] = st
    _install_restore_fallback(sess, st)
    log.info("dopt: %d of %d quantizable ops quantized", len(order), len(all_layers))
    return g


@contextlib.contextmanager
def _v1_conds():
    """Build our ``tf.cond``s (range initialisation, observation: scalar work) as TF1 conds.

    TF 2.21 builds functional (v2) conds by default; in a TF1 graph their gradients need
    every intermediate as an extra output (``output_all_intermediates``), which trips TF's
    type inference and costs optional-value ops at every step. A TF1 cond is a Switch/Merge
    pair like the activation path. The global switch is restored at once, so the user's own
    conds are untouched.
    """
    from tensorflow.python.ops import control_flow_util as cfu
    old = cfu.ENABLE_CONTROL_FLOW_V2
    cfu.ENABLE_CONTROL_FLOW_V2 = False
    try:
        yield
    finally:
        cfu.ENABLE_CONTROL_FLOW_V2 = old


def _dopt_variables(st: _State):
    out = []
    for ls in st.layers.values():
        out += [ls.lo, ls.hi, ls.initialized]
    return out


def _build(g, cfg, all_layers, order, is_train_flag, quant_flag) -> _State:
    st = _State(str(cfg.path), quant_flag, is_train_flag, all_layers=all_layers)
    with tf.name_scope("dopt/"):
        q_on = tf.reshape(tf.greater(quant_flag, 0), [], name="quant_on")
        # the calibration switch is Python state (set_calibrate_state), read once per run
        calib = tf.reshape(tf.numpy_function(lambda: np.bool_(st.calibrating_py), [], tf.bool,
                                             stateful=True), [], name="calibrating")
        quant = tf.logical_and(q_on, tf.logical_not(calib), name="quantized_path")
        is_train = tf.reshape(is_train_flag, [])
        train = tf.cast(is_train, tf.float32, name="ranges_learn")
        # quantized path, not training: the NPU's FP16 data at every conv / matmul edge
        npu = tf.logical_and(quant, tf.logical_not(is_train), name="npu_numerics")
    st.quant = quant
    flags = _Flags(quant, calib, train, npu)
    for name in order:
        layer = all_layers[name]
        alg = cfg.range_algorithm(name)
        st.layers[name] = _rewrite(g, layer, alg, range_observer(alg, default=None), st, flags)
    for name, layer in all_layers.items():
        if name not in st.layers and not layer.bn_training:
            st.fp16_tensors[name] = _rewrite_fp16(g, layer, flags)
    st.var_keys = {v.op.name for v in _dopt_variables(st)}
    return st


@dataclass
class _Flags:
    quant: object   # quantized path
    calib: object   # calibrating (float forward + observation)
    train: object   # float32 is_train_flag: range gradients on/off
    npu: object     # quantized path and not training: emulate the NPU's FP16 edges


def _consumer_slots(t):
    return [(c, i) for c in _consumers(t) for i, inp in enumerate(c.inputs) if inp is t]


def _rewrite(g, layer: Layer, alg, factory, st: _State, fl: _Flags) -> _LayerState:
    """An op set to Quant_INT8-8."""
    quant = fl.quant
    with tf.name_scope(f"{layer.name}/{ACT_SCOPE}/"):
        lo = v1.Variable(0.0, name="lo", use_resource=True, trainable=True)
        hi = v1.Variable(0.0, name="hi", use_resource=True, trainable=True)
        initialized = v1.Variable(False, name="initialized", use_resource=True,
                                  trainable=False)
        lo_ph = v1.placeholder(tf.float32, [], name="lo_value")
        hi_ph = v1.placeholder(tf.float32, [], name="hi_value")
        assign_range = tf.group(lo.assign(lo_ph, read_value=False),
                                hi.assign(hi_ph, read_value=False),
                                initialized.assign(True, read_value=False), name="set_range")
    t = layer_tensors(g, layer)
    ls = _LayerState(layer, t, alg, factory, lo, hi, initialized, lo_ph, hi_ph, assign_range,
                     factory())
    x, w, b = t["x"], t["w"], t["b"]

    def read_range():
        return lo.read_value(), hi.read_value()

    def init_range():
        # QAT without calibration: the first quantized batch sets the range (min/max)
        xs = tf.stop_gradient(x)
        x_lo, x_hi = tf.reduce_min(xs), tf.reduce_max(xs)
        with tf.control_dependencies([lo.assign(x_lo), hi.assign(x_hi),
                                      initialized.assign(True)]):
            return tf.identity(x_lo), tf.identity(x_hi)

    def observe():
        seen = tf.numpy_function(lambda a: _observe(st, ls, a), [x], tf.bool, stateful=True)
        return tf.identity(seen)

    with tf.name_scope(f"{layer.name}/dopt_quant/"):
        out_slots = _out_slots(g, layer)
        # scalar work: TF1 conds (see _v1_conds)
        need_init = tf.logical_and(quant, tf.logical_not(initialized.read_value()))
        r_lo, r_hi = tf.cond(need_init, init_range, read_range, name="range")
        seen = tf.cond(fl.calib, observe, lambda: tf.constant(False), name="observe")
        with tf.control_dependencies([seen]):
            x_in = tf.identity(x)
        # The ranges enter the quantized side through a Switch too, so their gradient is a
        # live zero on the float path (a dead one would stop the user's train op).
        (_, lo_q), (_, hi_q) = _switch(r_lo, quant), _switch(r_hi, quant)
        # value exactly (lo, hi); gradient only when is_train_flag is true
        g_lo = tf.stop_gradient(lo_q) + (lo_q - tf.stop_gradient(lo_q)) * fl.train
        g_hi = tf.stop_gradient(hi_q) + (hi_q - tf.stop_gradient(hi_q)) * fl.train
        x_sel = _select(quant, x_in, lambda xq: fq.fake_quant_activation(
            _select(fl.npu, xq, fq.round_fp16, x.shape), g_lo, g_hi), x.shape, "input")
        # weights and bias are small: both forms computed, one selected
        q = quant_params(layer, t, r_lo, r_hi)
        wq = tf.transpose(q["wq"]) if layer.transpose_b else q["wq"]
        _reroute(g, layer, quant, x_sel, tf.where(quant, wq, w, name="weight"),
                 None if b is None else tf.where(quant, q["bq"], b, name="bias"),
                 q["bq"], fl, out_slots)
    return ls


def _rewrite_fp16(g, layer: Layer, fl: _Flags) -> dict:
    """A quantizable op left float: on the quantized path in inference (``fl.npu``) it runs as
    the NPU's FP16 kernel - BatchNorm folded, FP16 input, weight, bias and output."""
    t_all = layer_tensors(g, layer)   # what the export folds, taken before rerouting
    t = t_all
    if layer.bn_dangling:   # its BatchNorm output is fetched directly: leave the BN in place
        layer = dataclasses.replace(layer, bn=None, bn_dangling=None)
        t = {**t_all, "bn": None}
    x, w, b = t["x"], t["w"], t["b"]
    with tf.name_scope(f"{layer.name}/dopt_fp16/"):
        out_slots = _out_slots(g, layer)
        x_sel = _select(fl.npu, x, fq.round_fp16, x.shape, "input")
        wf, bf = folded(layer, t)
        w16 = fq.round_fp16(tf.transpose(wf) if layer.transpose_b else wf)
        b16 = None if bf is None else fq.round_fp16(bf)
        _reroute(g, layer, fl.npu, x_sel, tf.where(fl.npu, w16, w, name="weight"),
                 None if b is None else tf.where(fl.npu, b16, b, name="bias"), b16, fl,
                 out_slots)
    return t_all


def _out_slots(g, layer: Layer):
    """Where the layer's result (the BatchNorm's output when it has one) is read."""
    last = g.get_operation_by_name(layer.bn or layer.tail).outputs[0]
    return last, _consumer_slots(last)


def _reroute(g, layer: Layer, pred, x_sel, w_sel, b_sel, b_fold, fl: _Flags, out_slots):
    """Point the op (and its bias op) at the selected inputs; with ``pred`` true a folded
    BatchNorm is bypassed; on the NPU path the result is rounded to FP16."""
    op = g.get_operation_by_name(layer.name)
    op._update_input(0, x_sel)
    op._update_input(1, w_sel)
    if b_sel is not None:
        g.get_operation_by_name(layer.bias[0])._update_input(layer.bias[1], b_sel)
    last, slots = out_slots
    y = last
    if layer.bn:
        # the folded layer's result replaces the BatchNorm's output where ``pred`` holds; the
        # BatchNorm then runs neither forward nor backward. Its parameters enter through
        # Switches so that their gradients stay live (they also reach the folded weight).
        bn = g.get_operation_by_name(layer.bn)
        tail = g.get_operation_by_name(layer.tail).outputs[0]
        t_f, t_q = _switch(tail, pred)
        bn._update_input(0, t_f)
        for i in range(1, 5):
            bn._update_input(i, _switch(bn.inputs[i], pred)[0])
        if b_sel is None:
            fmt = op.get_attr("data_format")
            # a Switch for the folded bias too, as for the ranges
            t_q = tf.nn.bias_add(t_q, _switch(b_fold, pred)[1], data_format=fmt.decode()
                                 if isinstance(fmt, bytes) else fmt)
        y = _merge([bn.outputs[0], t_q], last.shape, "output")
    y = _select(fl.npu, y, fq.round_fp16, last.shape, "output_fp16")
    for c, i in slots:
        c._update_input(i, y)


def _select(pred, t, fn, shape, name=None):
    """``fn(t)`` where ``pred`` holds, else ``t``; only the side taken runs (both directions)."""
    t_f, t_t = _switch(t, pred)
    return _merge([t_f, fn(t_t)], shape, name or "select")


def _switch(t, pred):
    """``(output_false, output_true)`` of a raw TF1 Switch."""
    from tensorflow.python.ops import control_flow_ops
    return control_flow_ops.switch(t, pred)


def _merge(ts, shape, name):
    from tensorflow.python.ops import control_flow_ops
    out = control_flow_ops.merge(ts, name=name)[0]
    out.set_shape(shape)
    return out


def _observe(st: _State, ls: _LayerState, a):
    if st.calibrating_py:
        ls.observer.update(a)
    return np.bool_(True)


def set_calibrate_state(sess, mode):
    """``True``: forward passes run float and observe each quantized op's input;
    ``False``: the observed ranges are written into the range variables."""
    g = _check_sess(sess, "set_calibrate_state")
    st = state_of(g, "set_calibrate_state")
    mode = bool(mode)
    if mode:
        for ls in st.layers.values():
            ls.observer = ls.factory()
        st.calibrating_py = True
        return
    was = st.calibrating_py
    st.calibrating_py = False
    if not was:
        return
    empty = []
    for name, ls in st.layers.items():
        if ls.observer.empty:
            empty.append(name)
            continue
        lo, hi = ls.observer.range()
        sess.run(ls.assign_range, {ls.lo_ph: np.float32(lo), ls.hi_ph: np.float32(hi)})
    if empty:
        warnings.warn("dopt: no calibration data reached op(s) " + ", ".join(empty) +
                      " (run forward passes between set_calibrate_state(sess, True) and "
                      "set_calibrate_state(sess, False)); their ranges stay unset",
                      stacklevel=2)


def get_quant_loss(sess):
    """Scalar tensor: mean squared weight rounding error in units of the quantization step.

    Per quantized op ``mean(((w - fq(w)) / s_w)^2)`` (in [0, 0.25]) on the deployed (BN
    folded) weight, averaged over ops; its gradient pulls weights towards their grid
    points. 0 on the float path and when nothing is quantized. Add it to the task loss with
    a small weight (the reference suggests about 1:20).
    """
    g = _check_sess(sess, "get_quant_loss")
    st = state_of(g, "get_quant_loss")
    if st.quant_loss is not None:
        return st.quant_loss
    with g.as_default(), g.name_scope(None), tf.name_scope("dopt/quant_loss/"):
        if not st.layers:
            st.quant_loss = tf.constant(0.0, name="value")
            return st.quant_loss
        terms = []
        for ls in st.layers.values():
            w, _b = folded(ls.layer, ls.tensors)
            s_w = fq.weight_scales(w, ls.layer.depthwise)
            wq = tf.stop_gradient(fq.fake_quant_weight(w, s_w, ls.layer.depthwise))
            s = tf.reshape(s_w, tf.shape(w)[-2:]) if ls.layer.depthwise else s_w
            terms.append(tf.reduce_mean(tf.square((w - wq) / s)))
        loss = tf.add_n(terms) / float(len(terms))
        st.quant_loss = tf.where(st.quant, loss, tf.zeros_like(loss), name="value")
    return st.quant_loss


# --------------------------------------------------------------------------- restore fallback

def _restore_ops(graph, fetch: str):
    """RestoreV2 ops feeding the Saver restore op named ``fetch``."""
    try:
        op = graph.get_operation_by_name(fetch.split(":")[0])
    except (KeyError, ValueError):
        return []
    seen, todo, found = set(), [(op, 0)], []
    while todo:
        o, d = todo.pop()
        if o.name in seen or d > 6:
            continue
        seen.add(o.name)
        if o.type == "RestoreV2":
            found.append(o)
            continue
        todo += [(c, d + 1) for c in o.control_inputs]
        todo += [(t.op, d + 1) for t in o.inputs]
    return found


def _float_restore(sess, run, st: _State, fetches, feed_dict) -> bool:
    """Restore a float checkpoint that lacks only dopt variables; False if not that case."""
    from tensorflow.python.framework import tensor_util
    if not isinstance(fetches, str) or not isinstance(feed_dict, dict) or len(feed_dict) != 1:
        return False
    path = next(iter(feed_dict.values()))
    path = path.decode() if isinstance(path, bytes) else path
    if not isinstance(path, str):
        return False
    keys = set()
    for r in _restore_ops(sess.graph, fetches):
        names = tensor_util.constant_value(r.inputs[1])
        if names is None:
            return False
        keys |= {n.decode() if isinstance(n, bytes) else str(n) for n in names.ravel()}
    if not keys:
        return False
    try:
        have = {k for k, _ in tf.train.list_variables(path)}
    except (tf.errors.OpError, ValueError):
        return False
    missing = keys - have
    if not missing or not all(_is_dopt_key(st, k) for k in missing):
        return False
    wanted = keys - missing
    by_name = {v.op.name: v for v in sess.graph.get_collection(v1.GraphKeys.GLOBAL_VARIABLES)}
    if not wanted <= set(by_name):
        return False
    sig = (fetches, frozenset(wanted))
    saver = st.fallback_savers.get(sig)
    if saver is None:
        try:
            with sess.graph.as_default():
                saver = v1.train.Saver({k: by_name[k] for k in sorted(wanted)},
                                       name="dopt_float_restore")
        except RuntimeError:  # finalized graph
            return False
        st.fallback_savers[sig] = saver
    run(saver.saver_def.restore_op_name, {saver.saver_def.filename_tensor_name: path})
    _init_missing(sess, run, st)
    log.info("dopt: %s is a float checkpoint (no dopt range variables): restored the other "
             "%d variables; ranges come from calibration or the first quantized batch",
             path, len(wanted))
    return True


def _init_missing(sess, run, st: _State) -> None:
    """Initialize dopt variables (and their optimizer slots) nothing has initialized yet, so
    a float restore alone leaves a runnable session."""
    g = sess.graph
    ours = [v for v in g.get_collection(v1.GraphKeys.GLOBAL_VARIABLES)
            if _is_dopt_key(st, v.op.name)]
    if not ours:
        return
    key = ("init", frozenset(v.op.name for v in ours))
    ops = st.fallback_savers.get(key)
    if ops is None:
        with g.as_default():
            ops = ({v.op.name: v1.is_variable_initialized(v) for v in ours},
                   {v.op.name: v.initializer for v in ours})
        st.fallback_savers[key] = ops
    done = run(ops[0])
    todo = [ops[1][k] for k, ok in done.items() if not ok]
    if todo:
        run(todo)


def _is_dopt_key(st: _State, key: str) -> bool:
    """A dopt variable, or an optimizer slot of one (slots are named ``<variable>/<slot>``)."""
    return key in st.var_keys or any(key.startswith(k + "/") for k in st.var_keys)


def _install_restore_fallback(sess, st: _State) -> None:
    """Wrap this session's ``run`` (instance attribute; nothing global is touched)."""
    run = sess.run

    def dopt_run(fetches, feed_dict=None, options=None, run_metadata=None):
        if st.restored and not st.warned_reinit and isinstance(fetches, tf.Operation):
            _warn_reinit(st, fetches)
        restore = isinstance(fetches, str) and isinstance(feed_dict, dict) \
            and len(feed_dict) == 1 and bool(_restore_ops(sess.graph, fetches))
        if restore and _float_restore(sess, run, st, fetches, feed_dict):
            st.restored = True
            return None
        out = run(fetches, feed_dict, options, run_metadata)
        st.restored = st.restored or restore
        return out

    dopt_run.__wrapped__ = run
    sess.run = dopt_run


def _warn_reinit(st: _State, op: tf.Operation) -> None:
    """The reference runs global_variables_initializer() after restoring: say what it does."""
    if op.type != "NoOp":
        return
    user_inits = {v.initializer.name for v in op.graph.get_collection(
        v1.GraphKeys.GLOBAL_VARIABLES) if not _is_dopt_key(st, v.op.name)}
    if user_inits & {c.name for c in op.control_inputs}:
        st.warned_reinit = True
        warnings.warn("dopt: a variables initializer ran after saver.restore(...): it resets "
                      "the restored weights to their initial values. Run "
                      "tf.compat.v1.global_variables_initializer() before saver.restore "
                      "(docs/tensorflow_v1.md)", stacklevel=3)
