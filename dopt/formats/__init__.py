"""File formats dopt reads and writes: the per-layer strategy config (JSON), the quantization
parameter file, the ONNX QDQ writer, export checks and atomic file I/O."""
