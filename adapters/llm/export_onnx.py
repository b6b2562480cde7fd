"""Export a HuggingFace causal LM (Llama / Qwen2 style) to ONNX: ``input_ids -> logits``.

The graph is the prefill pass without a KV cache: ``input_ids [batch, seq] int64 ->
logits [batch, seq, vocab] float32`` with causal attention, traced by the legacy
TorchScript exporter (``dynamo=False``, as elsewhere in dopt). Custom replacements of the
Linear layers trace like any other module, so fake-quant modules built from
``torch.round`` / ``torch.clamp`` / ``F.linear`` export as plain Round / Clip / MatMul ops.

What makes transformers 5 traceable: with no ``attention_mask`` the model builds its mask
itself, and first checks ``position_ids`` for packed sequences with ``torch.diff``, which
the TorchScript exporter cannot export (``aten::diff``), whatever the attention
implementation. A ready 4-D mask is passed through by ``create_causal_mask`` untouched, so
the wrapper builds the additive causal mask itself from the traced sequence length (two
``arange`` and a comparison: the length stays dynamic) and the whole mask machinery,
vmap included, is skipped. The model runs with ``eager`` attention while it is traced
(restored afterwards), so attention is explicit MatMul / Softmax rather than depending on
the exporter's ``scaled_dot_product_attention`` symbolic. The check compares against the
model as the caller configured it (its own attention and mask), so it also proves the
hand-made mask equals the model's. The own mask is plain causal: models with
sliding-window or other non-full attention layers are refused.

Tied embeddings: the exporter folds ``lm_head``'s transposed weight into a new constant,
so a tied embedding would be stored twice (113 MB more for SmolLM2-135M, whose file is
539 MB without the copy); a post-pass replaces the copy by a ``Transpose`` of the embedding
initializer, which ONNX Runtime folds when it loads the file.
"""
from __future__ import annotations

import importlib
import tempfile
import warnings
from pathlib import Path

from dopt.errors import DoptError, MissingExtraError
from dopt.formats.fileio import check_output_path, staged_outputs

MAX_IR_VERSION = 10  # what the pinned ONNX Runtime loads; enough for opsets up to 21
MIN_OPSET, MAX_OPSET = 14, 21
EXTERNAL_DATA_BYTES = 1_800_000_000  # a protobuf holds at most 2 GiB: larger weights go beside
DEFAULT_RTOL = 1e-3  # of max |logit|: float32 reordering gives ~1e-6, a wrong graph ~1
CHECK_BATCH = 2
SEED = 0


def export_causal_lm(model, path, *, seq_len: int = 32, opset: int = 17, dynamic: bool = True,
                     check: bool = True, atol: float | None = None,
                     rtol: float | None = None) -> dict:
    """Write ``model`` as ONNX to ``path`` and return what was written and how close it is.

    ``seq_len`` is the traced length (and the first checked one); with ``dynamic`` the batch
    and sequence axes are symbolic and the check also runs a second length, otherwise the
    graph is fixed to ``1 x seq_len``. ``check`` runs the file in ONNX Runtime on seeded
    random tokens and compares with the model's own logits; a difference above ``atol``
    (default ``1e-3 * max |logit|``) raises DoptError. The file appears only when all of
    this succeeded (an existing file is replaced only then). Returns ``{"path", "bytes",
    "initializers", "tied_embedding_shared", "max_abs_diff", "max_rel_diff", "atol",
    "seq_lens_checked", "argmax_agreement"}`` (the check entries are None without it).
    """
    torch = _require("torch")
    _require("onnx")
    if check:
        _require("onnxruntime")
    _validate(model, seq_len, opset, atol)
    dest = Path(path)
    check_output_path(dest, field="path")
    batch = CHECK_BATCH if dynamic else 1
    vocab = model.get_input_embeddings().num_embeddings
    sample = _random_ids(torch, vocab, batch, seq_len, SEED, _device(model))
    with staged_outputs(dest.parent) as stage:
        with tempfile.TemporaryDirectory(dir=stage) as scratch:
            proto = _trace(model, sample, Path(scratch) / dest.name, opset, dynamic)
        shared = _share_tied_embedding(proto, model)
        n_init = len(proto.graph.initializer)
        files = _save(proto, stage / dest.name)
        del proto
        result = {"path": str(dest), "bytes": sum(f.stat().st_size for f in files),
                  "initializers": n_init, "tied_embedding_shared": shared,
                  "max_abs_diff": None, "max_rel_diff": None, "atol": atol,
                  "seq_lens_checked": None, "argmax_agreement": None}
        if check:
            lens = [seq_len, _second_len(seq_len)] if dynamic else [seq_len]
            result.update(_compare(model, stage / dest.name, vocab, batch, lens, atol, rtol))
            _raise_if_off(result, dest)
    return result


def _require(module: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(module, "llm", "Exporting a causal LM to ONNX") from None


def _validate(model, seq_len: int, opset: int, atol) -> None:
    if not isinstance(seq_len, int) or seq_len < 1:
        raise DoptError("the export sequence length must be a positive integer",
                        field="seq_len", found=repr(seq_len))
    if atol is not None and not atol >= 0:
        raise DoptError("the logits tolerance must be a non-negative number", field="atol",
                        found=repr(atol))
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise DoptError("unsupported ONNX opset for the LLM export", field="opset",
                        expected=f"{MIN_OPSET}..{MAX_OPSET}", found=str(opset))
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "get_input_embeddings"):
        raise DoptError("the model is not a transformers causal LM", field="model",
                        expected="a PreTrainedModel such as LlamaForCausalLM",
                        found=type(model).__name__)
    other = _non_full_attention(config)
    if other:
        raise DoptError("the export builds a plain causal mask, but the model has non-full "
                        "attention layers", field="model", found=other,
                        hint="export a model configured with full attention only")


def _non_full_attention(config) -> str | None:
    """What in ``config`` asks for other than full causal attention, or None."""
    kinds = set(getattr(config, "layer_types", None) or ()) - {"full_attention"}
    if kinds:
        return ", ".join(sorted(kinds))
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True):
        return f"sliding_window={window}"
    return None


def _device(model):
    return model.get_input_embeddings().weight.device


def _random_ids(torch, vocab: int, batch: int, length: int, seed: int, device):
    g = torch.Generator().manual_seed(seed)  # on the CPU: the same tokens on any device
    return torch.randint(0, vocab, (batch, length), generator=g, dtype=torch.long).to(device)


def _second_len(seq_len: int) -> int:
    """A different length, to prove the sequence axis really is dynamic."""
    return seq_len // 2 if seq_len > 1 else 2


def _logits_module(model):
    """``input_ids -> float32 logits`` with a hand-made 4-D causal mask (see module doc)."""
    import torch

    class LogitsOnly(torch.nn.Module):
        def __init__(self, lm, dtype):
            super().__init__()
            self.lm, self.mask_dtype = lm, dtype

        def forward(self, input_ids):
            pos = torch.arange(input_ids.shape[1], device=input_ids.device)
            future = pos[None, :] > pos[:, None]
            mask = torch.zeros(future.shape, dtype=self.mask_dtype, device=input_ids.device)
            mask = mask.masked_fill(future, torch.finfo(self.mask_dtype).min)[None, None]
            logits = self.lm(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
            return logits if logits.dtype == torch.float32 else logits.float()

    return LogitsOnly(model, model.get_input_embeddings().weight.dtype)


class _EagerAttention:
    """Switch the model to eager attention for the trace and back afterwards."""

    def __init__(self, model):
        self.model, self.before = model, model.config._attn_implementation

    def _set(self, impl):
        if hasattr(self.model, "set_attn_implementation"):
            self.model.set_attn_implementation(impl)
        else:
            self.model.config._attn_implementation = impl

    def __enter__(self):
        self._set("eager")

    def __exit__(self, *exc):
        self._set(self.before)


def _trace(model, sample, scratch_file: Path, opset: int, dynamic: bool):
    """Export through a scratch file (the exporter spills > 2 GB to files beside it)."""
    import onnx
    import torch

    axes = {"input_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}}
    was_training = model.training
    model.eval()
    try:
        with _EagerAttention(model), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(_logits_module(model), (sample,), str(scratch_file), dynamo=False,
                              opset_version=opset, input_names=["input_ids"],
                              output_names=["logits"], do_constant_folding=True,
                              dynamic_axes=axes if dynamic else None)
    except Exception as e:  # noqa: BLE001 - the exporter's errors dump whole graphs
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise DoptError("the model could not be exported to ONNX", field="model",
                        found=f"{type(e).__name__}: {first}",
                        hint="replace the module that uses the unsupported operation, or "
                             "report the model type") from e
    finally:
        model.train(was_training)
    proto = onnx.load(str(scratch_file))
    proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
    return proto


def _share_tied_embedding(proto, model) -> bool | None:
    """Replace the folded copy of a tied ``lm_head`` weight by ``Transpose(embedding)``.

    None when the model does not tie them, else whether a copy was found and removed.
    Matched by value (vocab x hidden against its transpose), not by generated names.
    """
    import numpy as np
    from onnx import helper, numpy_helper

    out = getattr(model.get_output_embeddings(), "weight", None)
    emb = model.get_input_embeddings().weight
    if out is None or out is not emb:
        return None
    shape = list(emb.shape)
    inits = proto.graph.initializer
    tables = [i for i in inits if list(i.dims) == shape]
    copies = [i for i in inits if list(i.dims) == shape[::-1]]
    for table in tables:
        t = numpy_helper.to_array(table).T
        for copy in copies:
            if copy.data_type == table.data_type and np.array_equal(numpy_helper.to_array(copy), t):
                proto.graph.node.insert(0, helper.make_node(
                    "Transpose", [table.name], [copy.name], perm=[1, 0],
                    name=f"{table.name}/TiedTranspose"))
                inits.remove(copy)
                return True
    return False


def _save(proto, file: Path) -> list[Path]:
    """Save as one file, or with the weights in ``<name>.data`` beside it when too large."""
    import onnx

    weights = sum(len(i.raw_data) for i in proto.graph.initializer)
    if weights <= EXTERNAL_DATA_BYTES:
        onnx.save_model(proto, str(file))
        return [file]
    data = file.name + ".data"
    onnx.save_model(proto, str(file), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data, size_threshold=1024)
    return [file, file.with_name(data)]


def _compare(model, file: Path, vocab: int, batch: int, lens: list[int],
             atol: float | None, rtol: float | None = None) -> dict:
    """Run the file in ONNX Runtime and the model in PyTorch on the same seeded tokens."""
    import numpy as np
    import onnxruntime as ort
    import torch

    sess = ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    diffs, peaks, agree, total = [], [], 0, 0
    was_training = model.training
    model.eval()
    try:
        for i, n in enumerate(lens):
            ids = _random_ids(torch, vocab, batch, n, SEED + 1 + i, _device(model))
            with torch.no_grad():
                ref = model(input_ids=ids, use_cache=False).logits.float().cpu().numpy()
            got = sess.run(["logits"], {"input_ids": ids.cpu().numpy()})[0]
            if got.shape != ref.shape:
                raise DoptError("the exported model returns logits of another shape",
                                field="model", expected=str(ref.shape), found=str(got.shape),
                                hint="the file was not written")
            diffs.append(np.abs(got - ref).max())
            peaks.append(np.abs(ref).max())
            agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
            total += ref.shape[0] * ref.shape[1]
    finally:
        model.train(was_training)
        del sess
    worst, peak = float(np.max(diffs)), float(np.max(peaks))  # np.max keeps a NaN
    return {"max_abs_diff": worst, "max_rel_diff": worst / peak if peak else float(worst > 0),
            "atol": (DEFAULT_RTOL if rtol is None else rtol) * peak if atol is None
            else float(atol),
            "seq_lens_checked": list(lens), "argmax_agreement": agree / total}


def _raise_if_off(result: dict, dest: Path) -> None:
    if not result["max_abs_diff"] <= result["atol"]:  # also catches NaN
        raise DoptError("the exported ONNX model does not reproduce the PyTorch logits",
                        file=str(dest), expected=f"max |onnx - torch| <= {result['atol']:.3g}",
                        found=f"{result['max_abs_diff']:.3g} ({result['max_rel_diff']:.3g} of max "
                              f"|logit|, argmax agreement "
                              f"{result['argmax_agreement']:.1%})",
                        hint="the file was not written; check custom modules for "
                             "data-dependent Python control flow, which tracing freezes")

