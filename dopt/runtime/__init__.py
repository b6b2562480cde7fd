"""``dopt.runtime``: load a compiled ``.om`` and run it on the emulated NPU or the CPU.

``device="npu"`` follows the NPU numerics (FP16 rounding per op, bit-exact INT8
kernels), CPU-partition kernels in float32, data converted at partition edges as the
hardware does (FP32 -> FP16 on the way in). ``device="cpu"`` runs everything in
float32 (INT8 kernels stay integer), like choosing the CPU device in the reference's
runtime; as there, it needs FP32 weights (``--weight_data_type FP32``).

Two engines give the same answers: ``"fast"`` (one ONNX Runtime graph) and
``"reference"`` (NumPy, op by op). The batch dimension is free: N samples in one
call are N independent inferences of the compiled single-sample model.

A model compiled with AIPP (``--insert_op_conf``) takes raw UINT8 frames on those inputs:
the ``Aipp`` kernels run first (``dopt.npu.aipp``, the one implementation of the
numerics) and the engine runs the rest; a dynamic AIPP takes its run-time parameters per
call, ``session.run(frames, aipp={...})``.
"""
from __future__ import annotations

import numpy as np

from ..errors import DoptError
from ..npu.iotypes import check_input, convert_output
from ..npu.omfile import OmModel, check_graph, read_om
from .fast import FastEngine
from .reference import FLOAT_DTYPES, ReferenceEngine

DEVICES = ("npu", "cpu")
ENGINES = ("fast", "reference")


class Session:
    """A loaded model bound to a device and an engine; ``run`` is synchronous."""

    def __init__(self, om: OmModel, *, device: str = "npu", engine: str = "fast",
                 path: str | None = None, threads: int = 0):
        if device not in DEVICES:
            raise DoptError("unknown device", field="device", expected=" or ".join(DEVICES),
                            found=repr(device))
        if engine not in ENGINES:
            raise DoptError("unknown engine", field="engine", expected=" or ".join(ENGINES),
                            found=repr(engine))
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
            raise DoptError("threads must be a whole number >= 0", field="threads",
                            found=repr(threads), hint="0 lets dopt choose from the machine's cores")
        check_graph(om, path)
        self.om, self.device, self.engine_name, self.path = om, device, engine, path
        self._threads = threads
        self._per_sample = False
        self._gears: list[OmModel] | None = None
        if om.graph.get("dynamic"):   # --dynamic_dims: one session per gear, made when used
            from ..npu.gears import gear_graphs
            self._gears = [OmModel(g, om.tensors, om.profile, om.quant, om.meta)
                           for g in gear_graphs(om.graph)]
            self._gear_sessions: dict[int, Session] = {}
            self._aipp = _aipp_kernels(om)
            return
        if device == "cpu":
            half = sorted(n for n, t in om.tensors.items() if t.dtype == np.float16)
            if half:
                raise DoptError("the CPU device cannot compute with FP16 weights", file=path,
                                field=half[0], hint="compile with --weight_data_type FP32 to run "
                                "on the CPU, or use device='npu'")
        npu = device == "npu"
        self._aipp = _aipp_kernels(om)
        body = _without_aipp(om, self._aipp) if self._aipp else om
        self._engine = (FastEngine(body, npu=npu, threads=threads) if engine == "fast"
                        else ReferenceEngine(body, npu=npu))

    @property
    def inputs(self) -> list[dict]:
        """The inputs; with gears, a dim that differs between gears reads ``-1``."""
        if not self._gears:
            return self.om.graph["inputs"]
        out = []
        for i, first in enumerate(self._gears[0].graph["inputs"]):
            shapes = [g.graph["inputs"][i]["shape"] for g in self._gears]
            out.append({**first, "shape": [d if all(s[j] == d for s in shapes) else -1
                                           for j, d in enumerate(first["shape"])]})
        return out

    @property
    def gears(self) -> list[dict]:
        """``--dynamic_dims`` gears: index, dims, input shapes, output shapes, estimate."""
        dyn = self.om.graph.get("dynamic")
        return [{k: x[k] for k in ("index", "dims", "shapes", "outputs", "estimate")}
                for x in dyn["gears"]] if dyn else []

    def _gear(self, feeds) -> Session:
        """The session of the gear whose input shapes equal the fed arrays' shapes."""
        if not isinstance(feeds, dict):
            feeds = {self.inputs[0]["name"]: feeds}
        got = {k: list(np.shape(v)) for k, v in feeds.items()}
        for idx, g in enumerate(self._gears):
            if all(got.get(i["name"]) == list(i["shape"]) for i in g.graph["inputs"]):
                if idx not in self._gear_sessions:
                    self._gear_sessions[idx] = Session(g, device=self.device,
                                                       engine=self.engine_name, path=self.path,
                                                       threads=self._threads)
                return self._gear_sessions[idx]
        gears = "; ".join("[" + ", ".join(f"{i['name']}: {i['shape']}"
                                          for i in g.graph["inputs"]) + "]"
                          for g in self._gears)
        raise DoptError(f"no gear of the model takes inputs of shape {got}", file=self.path,
                        field="feeds", expected=f"one of the compiled gears: {gears}",
                        hint="pad or split the batch / resize to a gear, or recompile with that "
                             "shape in --dynamic_dims")

    @property
    def outputs(self) -> list[str]:
        return [o["name"] for o in self.om.graph["outputs"]]

    @property
    def estimate(self) -> dict | None:
        return self.om.meta.get("estimate")

    @property
    def profile(self) -> dict:
        return self.om.profile

    def prepare_feeds(self, feeds) -> dict:
        """Checked and converted inputs: names, shape (any batch), dtype."""
        if self._gears:
            return self._gear(feeds).prepare_feeds(feeds)
        if not isinstance(feeds, dict):
            if len(self.inputs) != 1:
                raise DoptError(f"the model has {len(self.inputs)} inputs: pass a dict",
                                field="feeds", expected=", ".join(i["name"] for i in self.inputs))
            feeds = {self.inputs[0]["name"]: feeds}
        names = {i["name"] for i in self.inputs}
        unknown = sorted(set(feeds) - names)
        missing = sorted(names - set(feeds))
        if unknown or missing:
            raise DoptError(f"inputs do not match the model (missing: {missing or '-'}, "
                            f"unknown: {unknown or '-'})", file=self.path, field="feeds",
                            expected=", ".join(sorted(names)))
        out = {}
        for i in self.inputs:
            a = check_input(i, np.asarray(feeds[i["name"]]), path=self.path)
            want = i["shape"]
            if i.get("aipp"):
                if a.dtype != np.uint8 or a.ndim < 2:
                    raise DoptError(f"input '{i['name']}' takes raw UINT8 frames (AIPP)",
                                    file=self.path, field=i["name"],
                                    expected=f"a uint8 array {want}",
                                    found=f"{a.dtype} {list(a.shape)}",
                                    hint="pass the camera frames as they are; AIPP converts them")
                out[i["name"]] = np.ascontiguousarray(a)
                continue
            if want and (a.ndim != len(want) or any(
                    w > 0 and d != w for d, w in zip(a.shape[1:], want[1:]))):
                raise DoptError(f"input '{i['name']}' has shape {list(a.shape)}", file=self.path,
                                field=i["name"], expected=f"{want} (any batch size)",
                                hint="resize/reshape the data to the compiled input shape")
            if i["dtype"] in FLOAT_DTYPES:
                a = a.astype(np.float32, copy=False)
            else:
                a = a.astype(i["dtype"], copy=False)
            out[i["name"]] = np.asarray(a, order="C")
        return out

    def run(self, feeds, *, aipp: dict | None = None) -> dict[str, np.ndarray]:
        """Inputs as ``{name: array}`` (or one array for single-input models).

        N samples are N independent inferences of the compiled model. A graph whose shapes
        were fixed at batch 1 (a folded ``expand`` of a class token, a reshape by
        ``batch * windows``) cannot take N at once: then the samples run one by one, and the
        session remembers it. ``aipp``: run-time parameters of a dynamic AIPP (the config's
        field names); for a model with several AIPP kernels, ``{kernel name: {...}}``."""
        if self._gears:
            return self._gear(feeds).run(feeds, aipp=aipp)
        feeds = self.prepare_feeds(feeds)
        if self._aipp or aipp:
            feeds = self._run_aipp(feeds, aipp)
        outs = self._run_batch(feeds)
        if any("io_type" in o for o in self.om.graph["outputs"]):   # --output_type
            by_name = {o["name"]: o for o in self.om.graph["outputs"]}
            outs = {k: convert_output(by_name[k], v, path=self.path) if k in by_name else v
                    for k, v in outs.items()}
        return outs

    def _run_batch(self, feeds: dict) -> dict[str, np.ndarray]:
        sizes = {len(v) for v in feeds.values() if np.ndim(v)}
        size = sizes.pop() if len(sizes) == 1 else 1
        if size == 1:
            return self._engine.run(feeds)
        if self._per_sample:
            return self._run_per_sample(feeds, size)
        try:
            outs = self._engine.run(feeds)
            if all(np.ndim(v) and len(v) == size for v in outs.values()):
                return outs
        except DoptError:
            if not all(i["shape"] and i["shape"][0] == 1 for i in self.inputs):
                raise
        self._per_sample = True
        return self._run_per_sample(feeds, size)

    @property
    def aipp(self) -> list[dict]:
        """The AIPP kernels: name, input, mode (static/dynamic) and the compiled spec."""
        return [{"kernel": k["name"], "input": k["inputs"][0], "mode": spec["mode"],
                 "spec": spec} for k, spec in self._aipp]

    def _run_aipp(self, feeds: dict, params) -> dict:
        from ..npu import aipp as A
        if params is not None and not isinstance(params, dict):
            raise DoptError("aipp= takes a dict of run-time AIPP parameters", field="aipp",
                            found=type(params).__name__)
        if params and not self._aipp:
            raise DoptError("this model has no AIPP, so it takes no aipp= parameters",
                            file=self.path, field="aipp", hint="drop aipp=")
        names = [k["name"] for k, _ in self._aipp]
        dynamic = [k["name"] for k, spec in self._aipp if spec["mode"] == "dynamic"]
        if params and len(self._aipp) > 1:
            unknown = sorted(set(params) - set(names))
            if unknown:
                raise DoptError(f"aipp= names unknown AIPP kernel(s) {unknown}", file=self.path,
                                field="aipp", expected="keys among " + ", ".join(names))
            per = params
        else:
            per = {names[0]: params} if params else {}
        for name in per:
            if name not in dynamic:
                raise DoptError(f"AIPP '{name}' is static: its parameters are baked into the "
                                f"model", file=self.path, field="aipp",
                                hint="drop aipp=, or recompile with dynamic: true")
        out = {k: v for k, v in feeds.items()}
        for k, spec in self._aipp:
            if spec["mode"] == "dynamic" and not per.get(k["name"]):
                raise DoptError(f"AIPP '{k['name']}' is dynamic: pass its run-time parameters",
                                file=self.path, field="aipp",
                                expected="session.run(frames, aipp={'format': ..., "
                                         "'src_image_size_w': ..., ...})")
            raw = feeds[k["inputs"][0]]
            y = A.run(spec, raw, k["attrs"]["channels"]["value"], per.get(k["name"]),
                      layout=k["attrs"]["layout"]["value"])
            if k["out_dtypes"][0] == "uint8":
                y = np.clip(np.rint(y.astype(np.float32)), 0, 255).astype(np.uint8)
            else:
                y = y.astype(np.float32)
            out[k["outputs"][0]] = y
        for k, _ in self._aipp:
            out.pop(k["inputs"][0], None)
        return out

    def _run_per_sample(self, feeds: dict, size: int) -> dict[str, np.ndarray]:
        parts = [self._engine.run({k: v[i:i + 1] for k, v in feeds.items()})
                 for i in range(size)]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def predict(self, x, batch_size: int = 256) -> np.ndarray:
        """First output for a large single-input array, evaluated in batches (with a dynamic
        batch, in the largest gears that fit)."""
        name = self.outputs[0]
        sizes = self._batch_gears()
        if sizes:
            chunks, i = [], 0
            while i < len(x):
                n = next((b for b in sizes if b <= len(x) - i), None)
                if n is None:
                    raise DoptError(f"{len(x) - i} sample(s) left that no batch gear "
                                    f"({', '.join(map(str, sizes))}) takes", file=self.path,
                                    field="x", hint="compile a gear of batch 1 as well, or pad")
                chunks.append(self.run(x[i:i + n])[name])
                i += n
        else:
            chunks = [self.run(x[i:i + batch_size])[name]
                      for i in range(0, len(x), batch_size)]
        return np.concatenate(chunks) if chunks else np.empty((0,))

    def _batch_gears(self) -> list[int]:
        dyn = self.om.graph.get("dynamic")
        if not dyn or dyn["kind"] != "batch":
            return []
        return sorted({x["dims"][0] for x in dyn["gears"]}, reverse=True)


def _aipp_kernels(om: OmModel) -> list:
    import json
    out = []
    for k in om.graph["kernels"]:
        if k["op"] == "Aipp":
            try:
                spec = json.loads(k["attrs"]["spec"]["value"])
            except (KeyError, TypeError, ValueError):
                raise DoptError(f"AIPP kernel '{k['name']}' has no readable spec",
                                field=k["name"], hint="recompile the model") from None
            out.append((k, spec))
    return out


def _without_aipp(om: OmModel, kernels) -> OmModel:
    """The graph the engines run: AIPP outputs become its inputs (FP16 values)."""
    g = dict(om.graph)
    names = {k["name"] for k, _ in kernels}
    raw = {k["inputs"][0] for k, _ in kernels}
    inputs = [i for i in g["inputs"] if i["name"] not in raw]
    by_input = {i["name"]: i for i in g["inputs"]}
    for k, _ in kernels:
        i = by_input[k["inputs"][0]]
        inputs.append({"name": k["outputs"][0], "shape": i["model_shape"],
                       "dtype": "uint8" if k["out_dtypes"][0] == "uint8" else "float32"})
    g["inputs"] = inputs
    g["kernels"] = [k for k in g["kernels"] if k["name"] not in names]
    return OmModel(g, om.tensors, om.profile, om.quant, om.meta)


def load(path, *, device: str = "npu", engine: str = "fast", threads: int = 0,
         verify_with=None) -> Session:
    """Load a ``.om``. ``verify_with``: a public key (PEM file); the folder holding the
    ``.om`` must then be a signed deployment (``dopt sign``) that verifies with it, or
    loading is refused naming the file that does not match."""
    if verify_with is not None:
        from pathlib import Path
        from ..deploy.signing import verify_folder
        verify_folder(Path(path).resolve().parent, verify_with)
    return Session(read_om(path), device=device, engine=engine, path=str(path), threads=threads)
