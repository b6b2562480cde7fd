"""Public networks nobody here wrote, for the compatibility suite.

* the ONNX Model Zoo architectures that ship inside the ``onnx`` wheel
  (``onnx/backend/test/data/light``: AlexNet, DenseNet-121, Inception v1/v2, ResNet-50,
  ShuffleNet, SqueezeNet, VGG-19, ZFNet-512; opset 9, weights reduced by the wheel);
* torchvision's classification architectures (``torchvision.models``), random weights,
  BatchNorm statistics re-estimated on random data so activations have realistic ranges,
  exported with ``torch.onnx.export`` at opset 17.

torchvision on PyPI is a CUDA build whose C++ operators (``torchvision::nms`` & co.) do not
load beside the CPU build of torch, and its package ``__init__`` registers fake kernels for
them, so ``import torchvision`` fails ("operator torchvision::nms does not exist"). The
model definitions are plain Python and need none of those operators:
``torchvision_models_module()`` imports ``torchvision.models`` under a package object that
skips that ``__init__``. torchvision is also kept off the environment's import path: with
it importable, transformers imports it (and fails the same way), which breaks the LLM path.
Install it into its own folder, ``pip install --no-deps --target .compat/torchvision
torchvision==0.28.0`` (the release paired with torch 2.13.0), or point
``DOPT_TORCHVISION_PATH`` at such a folder.
"""
from __future__ import annotations

import importlib.util
import io
import os
import sys
import types
import warnings
from pathlib import Path

OPSET = 17
TORCHVISION_DIR = Path(__file__).resolve().parents[1] / ".compat" / "torchvision"

# one variant per architecture family (the smallest); ``all_variants=True`` takes every one
FAMILIES = ["alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "efficientnet_v2_s",
            "googlenet", "inception_v3", "maxvit_t", "mnasnet0_5", "mobilenet_v2",
            "mobilenet_v3_large", "mobilenet_v3_small", "regnet_x_400mf", "regnet_y_400mf",
            "resnet18", "resnext50_32x4d", "shufflenet_v2_x0_5", "squeezenet1_0",
            "squeezenet1_1", "swin_t", "swin_v2_t", "vgg11", "vit_b_16", "wide_resnet50_2"]
# the input size each family needs (others take 224)
INPUT_SIZE = {"inception_v3": 299}


def zoo_dir() -> Path:
    import onnx
    return Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def zoo_models() -> dict[str, Path]:
    """``{name: path}`` of the Model Zoo networks in the installed ``onnx`` wheel."""
    d = zoo_dir()
    return {p.stem.removeprefix("light_"): p for p in sorted(d.glob("light_*.onnx"))}


def torchvision_models_module():
    """``torchvision.models`` without ``torchvision/__init__`` (see the module docstring)."""
    if "torchvision.models" in sys.modules:
        return sys.modules["torchvision.models"]
    folder = Path(os.environ.get("DOPT_TORCHVISION_PATH", TORCHVISION_DIR))
    if (folder / "torchvision").is_dir() and str(folder) not in sys.path:
        sys.path.append(str(folder))
    spec = importlib.util.find_spec("torchvision")
    if spec is None:
        raise ImportError("torchvision is not installed: pip install --no-deps --target "
                          ".compat/torchvision torchvision==0.28.0")
    if "torchvision" not in sys.modules:
        pkg = types.ModuleType("torchvision")
        pkg.__path__ = list(spec.submodule_search_locations)
        pkg.__spec__ = spec
        pkg.__file__ = spec.origin
        sys.modules["torchvision"] = pkg
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torchvision.models as models
    return models


def torchvision_names(all_variants: bool = False) -> list[str]:
    models = torchvision_models_module()
    names = models.list_models(module=models)
    return names if all_variants else [n for n in FAMILIES if n in names]


def build_torchvision(name: str, seed: int = 0, bn_batches: int = 4, batch: int = 4):
    """Random weights, BatchNorm statistics re-estimated on random data; eval mode."""
    import torch
    models = torchvision_models_module()
    torch.manual_seed(seed)
    kw = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") \
        else {}
    m = models.get_model(name, weights=None, **kw)
    size = INPUT_SIZE.get(name, 224)
    # a weight the architecture initializes to zero (ViT's classification head) makes the
    # output zero for every input and the comparison empty: give it fan-in-scaled values
    with torch.no_grad():
        for mod in m.modules():
            w = getattr(mod, "weight", None)
            if isinstance(w, torch.nn.Parameter) and w.dim() >= 2 and not w.any():
                w.normal_(0.0, w[0].numel() ** -0.5, generator=torch.Generator().manual_seed(seed))
    bns = [x for x in m.modules() if isinstance(x, torch.nn.modules.batchnorm._BatchNorm)]
    if bns:
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None          # cumulative average over the batches below
        m.train()
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for _ in range(bn_batches):
                m(torch.randn(batch, 3, size, size, generator=g))
    return m.eval(), (1, 3, size, size)


def export_torchvision(name: str, path: Path | None = None, seed: int = 0):
    """The architecture as a user exports it (opset 17, dynamic batch); ModelProto or path."""
    import onnx
    import torch
    model, shape = build_torchvision(name, seed)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(shape),), buf, opset_version=OPSET,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}}, dynamo=False)
    m = onnx.load_from_string(buf.getvalue())
    if path is not None:
        tmp = Path(str(path) + ".tmp")
        onnx.save(m, str(tmp))
        os.replace(tmp, path)
    return m, shape
