"""`dopt deploy` demo: the shipped Fashion-MNIST network to a signed, gated NPU build."""
