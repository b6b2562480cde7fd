"""LLM low-bit quantization (``Quant_INT16-4``): the reference's ``dopt.dopt_llm`` package.

``opt_main`` holds the three-stage pipeline's entry points, ``do_opt`` the simulation API,
``config`` the validation of ``config.yaml`` and ``dopt_config.json``. No framework import.
"""
