"""LLM adapter (W4 weight quantization of HuggingFace causal LMs).

Importing this package imports neither torch nor transformers: ``data`` needs only the
standard library (plus the text packages it reads), ``hf_model`` and ``perplexity``
import torch/transformers inside their functions and raise a DoptError naming the extra.
"""
