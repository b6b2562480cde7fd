"""No-training quantization demo: the reference tool's dopt_so flow on a Fashion-MNIST model."""
