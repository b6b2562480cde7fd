"""PyTorch adapter: fake-quant QAT/calibration in the user's loop, ONNX + parameter export."""
