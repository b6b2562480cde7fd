"""Kernel-by-kernel agreement of the fast engine with the reference interpreter.

Each kernel of the reference is fed the fast engine's own inputs for that kernel,
so a difference is that kernel's alone and does not snowball. INT8 kernels
(Quantize, integer op, Dequantize) must match bit for bit. FP16 kernels agree
within ``FP16_ULP_BOUND`` unit in the last place, or, for results that are tiny
because of cancellation, within ``CANCEL_REL * max|output|``: float32 summation
order differs between BLAS libraries, so a float32 result next to a half-way point
rounds to either neighbour, and a near-zero sum keeps only float32's absolute
accuracy, which is many FP16 ULPs of a value that small.
"""
from __future__ import annotations

import numpy as np

from .fast import FastEngine, layer_of
from .reference import FLOAT_DTYPES, ReferenceEngine, fp16, run_kernel

FP16_ULP_BOUND = 1
CANCEL_REL = 2.0 ** -20


def fp16_ulp_distance(a, b) -> np.ndarray:
    def ordered(x):
        u = np.asarray(x, np.float32).astype(np.float16).view(np.uint16).astype(np.int32)
        return np.where(u & 0x8000, 0x8000 - u, u)
    return np.abs(ordered(a) - ordered(b))


def _as_reference(k: dict, v: np.ndarray, float_q: set) -> np.ndarray:
    """Fast-engine tensors in the reference's representation (int8 q, integer acc)."""
    if k["op"] == "Quantize":
        o = k["attrs"]["offset"]["value"]
        if layer_of(k) in float_q:
            return (v.astype(np.int32) + o).astype(np.int8)
        return (v.astype(np.int32) - 128).astype(np.int8)
    if (k["op"] or "").startswith("Quantized"):  # int64: float32(acc) may reach 2**31
        return v.astype(np.int64)
    return v


def kernel_agreement(om, feeds: dict, *, npu: bool = True) -> list[dict]:
    fast = FastEngine(om, npu=npu, debug=True)
    env = dict(feeds)
    env.update(fast.run(feeds))
    float_q = fast.float_q
    ref = ReferenceEngine(om, npu=npu)
    by_out = {t: k for k in om.graph["kernels"] for t in k["outputs"]}
    rows = []
    for k in om.graph["kernels"]:
        ins = []
        for t in k["inputs"]:
            if not t:
                ins.append(None)
            elif t in om.tensors:
                ins.append(om.tensors[t])
            else:
                v = env[t]
                if t in by_out:
                    v = _as_reference(by_out[t], v, float_q)
                if k["device"] == "npu" and t in ref.boundary:
                    v = fp16(v)
                ins.append(v)
        want = run_kernel(k, ins, opset=om.graph["opset"], npu=npu)
        if k["name"] in fast.split:  # its accumulator is carried as float32(acc)
            want = [np.float32(w).astype(np.int64) for w in want]
        for t, w, dt in zip(k["outputs"], want, k["out_dtypes"]):
            got = _as_reference(k, env[t], float_q)
            int8_kernel = k["precision"] == "int8"
            if dt in FLOAT_DTYPES and not int8_kernel or k["op"] == "Dequantize" and not npu:
                d = np.abs(got.astype(np.float64) - w)
                u = fp16_ulp_distance(got, w)
                both_nan = np.isnan(got) & np.isnan(w)  # the same NaN from the same inputs
                ok = (u <= FP16_ULP_BOUND) | (d <= CANCEL_REL * float(np.abs(w).max(initial=0))) \
                    | both_nan
                ulp = int(u.max(initial=0))
                exact = bool(np.array_equal(got.astype(np.float32), w.astype(np.float32),
                                            equal_nan=True))
                diff = float(d.max(initial=0))
                within = bool(ok.all())
            else:
                exact = bool(np.array_equal(np.asarray(got), np.asarray(w)))
                ulp = 0 if exact else None
                within = exact
                diff = 0.0 if exact else float(np.abs(np.asarray(got, np.float64) -
                                                       np.asarray(w, np.float64)).max())
            rows.append({"kernel": k["name"], "op": k["op"], "precision": k["precision"],
                         "device": k["device"], "tensor": t, "exact": exact,
                         "within_bound": within, "max_ulp": ulp,
                         "max_abs_diff": diff})
    return rows
