"""How ``basemodel/mnist.pb`` was made: a small Keras CNN trained on the shipped Fashion-MNIST
training subset, frozen into a TF1-style GraphDef with the input ``input`` (NHWC,
1x28x28x1 per image) and the output ``output`` (10 logits) - the shape of the reference
tool's ``tensorflow_mnist/basemodel/mnist.pb``. Re-run: ``python -m demos.tf_no_training.train_basemodel``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def build():
    import keras
    inp = keras.Input((28, 28, 1), name="input")
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="conv1")(inp)
    x = keras.layers.MaxPooling2D(name="pool1")(x)
    x = keras.layers.Conv2D(64, 3, padding="same", activation="relu", name="conv2")(x)
    x = keras.layers.MaxPooling2D(name="pool2")(x)
    x = keras.layers.Conv2D(64, 3, padding="same", activation="relu", name="conv3")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.Dense(64, activation="relu", name="fc1")(x)
    out = keras.layers.Dense(10, name="fc2")(x)
    return keras.Model(inp, out, name="mnist")


def freeze(model):
    """A frozen GraphDef whose input node is ``input`` and whose output node is ``output``."""
    import tensorflow as tf
    from dopt_adapters.tensorflow.convert import frozen_from_keras
    fr = frozen_from_keras(model)
    gd = tf.compat.v1.GraphDef()
    gd.CopyFrom(fr.graph_def)
    out = gd.node.add()
    out.name, out.op = "output", "Identity"
    out.input.append(fr.outputs[0].rsplit(":", 1)[0])
    out.attr["T"].type = tf.float32.as_datatype_enum
    return tf.compat.v1.graph_util.extract_sub_graph(gd, ["output"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--out", default=str(HERE / "basemodel" / "mnist.pb"))
    a = ap.parse_args(argv)
    import keras
    from demos.fashion_mnist import data
    keras.utils.set_random_seed(0)
    x, y = data.load("train")
    xt, yt = data.load("test")
    x, xt = np.transpose(x, (0, 2, 3, 1)), np.transpose(xt, (0, 2, 3, 1))
    m = build()
    m.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
              metrics=["accuracy"])
    m.fit(x, y, batch_size=64, epochs=a.epochs, verbose=2)
    print("float test top-1:", m.evaluate(xt, yt, verbose=0)[1])
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_bytes(freeze(m).SerializeToString())
    print("wrote", a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
