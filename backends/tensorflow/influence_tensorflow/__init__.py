"""The TensorFlow backend: kernels traced once in ``tf.function`` (``vectorized_map`` per-sample gradients)."""
