"""ONNX adapter: calibration in ONNX Runtime, QDQ model and parameter file out."""
