"""``--dynamic_dims``: one ``.om`` holding a compiled graph per input-shape gear.

The reference compiles the shapes an app will meet ahead of time: every dim written ``-1``
in ``--input_shape`` takes, gear by gear, the values listed in ``--dynamic_dims``
(``"1;2;4"`` for a dynamic batch, ``"224,224;320,320"`` for a dynamic resolution), at most
16 gears. Each gear is compiled exactly as the same model compiled statically at that
shape, so its placement, estimate and outputs are those of the static build; the ``.om``
keeps gear 0's graph at the top level (a reader that knows nothing of gears runs gear 0)
and every gear under ``graph["dynamic"]``. Weights are stored once: a tensor that differs
between gears (a folded shape constant) is kept per gear under ``<name>@gear<i>``.
The runtime picks the gear whose input shapes equal the fed arrays' shapes.
"""
from __future__ import annotations

import numpy as np

from ..errors import DoptError

MAX_GEARS = 16   # the reference's limit
FLAG = "--dynamic_dims"


def dynamic_positions(shapes: dict[str, tuple[int, ...]]) -> list[tuple[str, int]]:
    """``(input, dim index)`` of every ``-1``, in ``--input_shape`` order."""
    return [(name, i) for name, dims in shapes.items() for i, d in enumerate(dims) if d == -1]


def kind_of(shapes: dict, positions, input_format: str | None = None) -> str:
    """``batch`` (only dim 0 varies), ``resolution`` (only the spatial h, w of 4-D
    inputs) or ``dims`` (anything else the reference's ND form allows)."""
    if all(i == 0 for _n, i in positions):
        return "batch"
    per: dict[str, set[int]] = {}
    for n, i in positions:
        per.setdefault(n, set()).add(i)
    hw = {2, 3} if (input_format or "NCHW") == "NCHW" else {1, 2}
    if all(len(shapes[n]) == 4 and idx == hw for n, idx in per.items()):
        return "resolution"
    return "dims"


def parse(text: str | None, shapes: dict[str, tuple[int, ...]] | None, *,
          input_format: str | None = None) -> dict | None:
    """``{"kind", "input_shape": {name: [..-1..]}, "gears": [{"dims", "shapes"}]}`` or None.

    ``shapes``: the parsed ``--input_shape`` (``-1`` allowed). ``-1`` without
    ``--dynamic_dims`` and ``--dynamic_dims`` without ``-1`` are both errors, as in the
    reference."""
    positions = dynamic_positions(shapes or {})
    if not text:
        if positions:
            name, i = positions[0]
            raise DoptError(f"--input_shape leaves dim {i} of input '{name}' as -1, which needs "
                            f"--dynamic_dims", field="--input_shape",
                            expected="positive dims, or -1 together with --dynamic_dims",
                            hint="give the size (e.g. batch 1), or list the gears: "
                                 "--dynamic_dims \"1;2;4\"")
        return None
    if not positions:
        raise DoptError("--dynamic_dims needs -1 in --input_shape where the dims vary",
                        field=FLAG, found=repr(text),
                        expected="e.g. --input_shape \"data:-1,3,224,224\" --dynamic_dims "
                                 "\"1;2;4\"")
    entries = [e.strip() for e in text.strip().strip(";").split(";")]
    if len(entries) > MAX_GEARS:
        raise DoptError(f"--dynamic_dims lists {len(entries)} gears; the NPU model holds at most "
                        f"{MAX_GEARS}", field=FLAG, expected=f"1 to {MAX_GEARS} gears separated "
                        f"by ';'", found=str(len(entries)), hint="drop the shapes the app does "
                        "not meet, or compile two models")
    gears, seen = [], set()
    for g, entry in enumerate(entries):
        parts = [p.strip() for p in entry.split(",")]
        try:
            vals = tuple(int(p) for p in parts)
        except ValueError:
            vals = ()
        if not vals or any(v <= 0 or v > 1 << 20 for v in vals):
            raise DoptError(f"gear {g} of --dynamic_dims is not a list of positive integers",
                            field=FLAG, found=repr(entry),
                            expected="positive integers separated by ',' (one per -1)")
        if len(vals) != len(positions):
            where = ", ".join(f"{n}[{i}]" for n, i in positions)
            raise DoptError(f"gear {g} of --dynamic_dims gives {len(vals)} value(s), but "
                            f"--input_shape has {len(positions)} -1 dim(s) ({where})",
                            field=FLAG, found=repr(entry),
                            expected=f"{len(positions)} value(s) per gear, in --input_shape "
                                     f"order")
        if vals in seen:
            raise DoptError(f"gear {g} of --dynamic_dims repeats an earlier gear", field=FLAG,
                            found=repr(entry), hint="list each shape once")
        seen.add(vals)
        concrete = {n: list(d) for n, d in shapes.items()}
        for (n, i), v in zip(positions, vals):
            concrete[n][i] = v
        gears.append({"dims": list(vals), "shapes": concrete})
    return {"kind": kind_of(shapes, positions, input_format),
            "input_shape": {n: list(d) for n, d in shapes.items()}, "gears": gears}


def check_aipp(spec: dict, aipp_specs: list | None, input_names: list[str]) -> None:
    """AIPP fixes its output size, so it cannot feed an input whose resolution varies."""
    if not aipp_specs or spec["kind"] == "batch":
        return
    varying = {n for n, d in spec["input_shape"].items()
               if any(v == -1 for v in d[1:])}
    for s in aipp_specs:
        name = s["input_name"]
        if name is None:
            rank = s["related_input_rank"] or 0
            name = input_names[rank] if rank < len(input_names) else None
        if name in varying:
            raise DoptError(f"AIPP (line {s['line']}) feeds input '{name}', whose "
                            f"{spec['kind']} varies by gear; the AIPP output size is fixed",
                            field=FLAG, hint="use a dynamic batch (-1 in dim 0 only) with AIPP, "
                            "or compile one model per resolution")


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b, equal_nan=True)


def _renamed(graph: dict, rename: dict[str, str]) -> dict:
    """The gear's graph with its per-gear tensor names (kernel inputs, tensor attributes)."""
    if not rename:
        return graph
    kernels = []
    for k in graph["kernels"]:
        k = dict(k)
        k["inputs"] = [rename.get(t, t) for t in k["inputs"]]
        attrs = {}
        for name, a in k["attrs"].items():
            if a.get("kind") == "tensor" and a.get("value") in rename:
                a = {**a, "value": rename[a["value"]]}
            attrs[name] = a
        k["attrs"] = attrs
        kernels.append(k)
    return {**graph, "kernels": kernels}


def merge(spec: dict, builds: list) -> object:
    """One ``OmModel`` from ``builds`` (``(om, report)`` per gear, in gear order)."""
    from .omfile import OmModel
    base, _ = builds[0]
    tensors = dict(base.tensors)
    gears = []
    for g, ((om, report), gear) in enumerate(zip(builds, spec["gears"])):
        rename = {}
        for name, arr in om.tensors.items():
            have = tensors.get(name)
            if have is None:
                tensors[name] = arr
            elif not _same(have, arr):
                rename[name] = f"{name}@gear{g}"
                tensors[rename[name]] = arr
        graph = {k: v for k, v in _renamed(om.graph, rename).items() if k != "dynamic"}
        est = (om.meta.get("estimate") or {}).get("summary") or {}
        gears.append({"index": g, "dims": gear["dims"], "shapes": gear["shapes"],
                      "graph": None if g == 0 else graph,
                      "summary": report["summary"], "estimate": est,
                      "outputs": [{"name": o["name"], "shape": o.get("shape", [])}
                                  for o in graph["outputs"]]})
    graph = dict(base.graph)
    graph["dynamic"] = {"kind": spec["kind"], "input_shape": spec["input_shape"],
                        "gears": gears}
    meta = dict(base.meta)
    meta["gears"] = [{"dims": x["dims"], "total_ms": x["estimate"].get("total_ms"),
                      "total_text": x["estimate"].get("total_text")} for x in gears]
    return OmModel(graph, tensors, base.profile, base.quant, meta)


def gear_graphs(graph: dict) -> list[dict]:
    """Every gear's full graph (gear 0 is the top-level graph); ``[graph]`` without gears."""
    dyn = graph.get("dynamic")
    if not dyn:
        return [graph]
    top = {k: v for k, v in graph.items() if k != "dynamic"}
    return [top if x.get("graph") is None else x["graph"] for x in dyn["gears"]]


def log_lines(om) -> list[str]:
    """The reference's "Graph:" lines: each gear's input and output shapes."""
    dyn = om.graph.get("dynamic")
    if not dyn:
        return []
    out = []
    for x in dyn["gears"]:
        ins = "; ".join(f"{n}:{','.join(map(str, d))}" for n, d in x["shapes"].items())
        outs = "; ".join(f"{o['name']}:{','.join(map(str, o['shape']))}" for o in x["outputs"])
        est = x["estimate"].get("total_text", "-")
        out.append(f"Graph: gear {x['index']} dims {','.join(map(str, x['dims']))}: "
                   f"inputs {ins}; outputs {outs}; estimated {est}")
    return out


def describe(dyn: dict) -> str:
    return "; ".join("[" + ", ".join(f"{n}: {d}" for n, d in x["shapes"].items()) + "]"
                     for x in dyn["gears"])
