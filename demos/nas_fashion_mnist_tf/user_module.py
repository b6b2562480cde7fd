"""The developer interface of the NASEA Fashion-MNIST demo for TensorFlow (the reference's
``UserModule``, ``PreNet`` and ``PostNet``, tf.keras only).

``dataset_dir`` holds the Fashion-MNIST IDX files (``train-images-idx3-ubyte.gz`` ...). The
search never sees the test set: the last sixth of the training images is the validation
split (``is_training=False``); the test set is for final numbers only.
"""
import gzip
import struct
from pathlib import Path

import numpy as np
import tensorflow as tf

MEAN, STD = 0.2860, 0.3530
NUM_CLASSES = 10
MAX_ITEMS = 1 << 20


def read_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read(16 + 28 * 28 * MAX_ITEMS)
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08 or not 1 <= ndim <= 3:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    if int(np.prod(dims)) != len(data) - 4 - 4 * ndim:
        raise ValueError(f"{path}: IDX header dims {dims} do not match the file size")
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


class UserModule:
    def __init__(self, epoch, batch_size):
        self.epoch, self.batch_size = epoch, batch_size
        self.steps_per_epoch = 1

    def build_dataset_search(self, dataset_dir, is_training):
        folder = Path(dataset_dir)
        x = read_idx(folder / "train-images-idx3-ubyte.gz")
        y = read_idx(folder / "train-labels-idx1-ubyte.gz").astype(np.int64)
        x = ((x.astype(np.float32) / 255.0 - MEAN) / STD)[..., None]   # N x 28 x 28 x 1
        n_val = len(x) // 6
        sl = slice(0, len(x) - n_val) if is_training else slice(len(x) - n_val, None)
        x, y = x[sl], y[sl]
        ds = tf.data.Dataset.from_tensor_slices((x, y))
        if is_training:
            ds = ds.shuffle(len(x), seed=0, reshuffle_each_iteration=True)
            self.steps_per_epoch = max(1, len(x) // self.batch_size)
        return ds.batch(self.batch_size, drop_remainder=is_training), len(x)

    def lr_scheduler(self, lr_init, global_step):
        """Cosine decay to zero over the whole supernet training."""
        total = max(1, self.epoch * self.steps_per_epoch)
        t = tf.minimum(tf.cast(global_step, tf.float32) / total, 1.0)
        return lr_init * 0.5 * (1.0 + tf.cos(np.pi * t))

    def metrics_op(self, inputs, outputs):
        """Top-1 accuracy: ``inputs`` the labels, ``outputs`` the logits."""
        hits = tf.equal(tf.argmax(outputs, axis=-1), tf.cast(inputs, tf.int64))
        return tf.reduce_mean(tf.cast(hits, tf.float32))

    def loss_op(self, labels, logits):
        return tf.reduce_mean(tf.keras.losses.sparse_categorical_crossentropy(
            labels, logits, from_logits=True))


class PreNet(tf.keras.layers.Layer):
    """The stem: 3x3 convolution to 16 channels (MobileNetV2S's)."""

    def __init__(self):
        super().__init__()
        self.conv = tf.keras.layers.Conv2D(16, 3, padding="same", use_bias=False)
        self.bn = tf.keras.layers.BatchNormalization()

    def call(self, inputs, training=True):
        return tf.nn.relu(self.bn(self.conv(inputs), training=training))


class PostNet(tf.keras.layers.Layer):
    """Global average pooling and the classifier."""

    def __init__(self):
        super().__init__()
        self.pool = tf.keras.layers.GlobalAveragePooling2D()
        self.fc = tf.keras.layers.Dense(NUM_CLASSES)

    def call(self, inputs, training=True):
        return self.fc(self.pool(inputs))
