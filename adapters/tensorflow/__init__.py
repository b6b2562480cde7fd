"""The TensorFlow adapter (Keras 3 and tf.compat.v1). TensorFlow's oneDNN custom ops are
switched off unless the user chose otherwise: they change float results between runs
and print a banner on every start."""
import os

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
