"""The core's numerics, pure NumPy: INT8/low-bit quantization, range observers, histograms,
cross-layer equalization, bias correction. Imports nothing else of dopt (an import contract)."""
