"""Fashion-MNIST end-to-end demo: float model -> calibration -> QAT -> deployable files."""
