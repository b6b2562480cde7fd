"""Reference-compatible TensorFlow API (``tools_dopt/dopt_tf_py3``): ``dopt.dopt_tf.opt_main``."""
