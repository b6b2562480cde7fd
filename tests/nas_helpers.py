"""What the NASEA tests of both frameworks share: a Fashion-MNIST subset as the dataset
ships, a demo's user_module.py loaded as a module, and a demo run in full."""
import importlib.util
import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fmnist_subset(folder: Path, n: int) -> Path:
    """The first ``n`` Fashion-MNIST training images and labels, in IDX files as shipped."""
    from demos.fashion_mnist import data as fmnist
    src = fmnist.find_dir("train")
    for kind in ("images", "labels"):
        name = f"train-{kind}-idx{3 if kind == 'images' else 1}-ubyte.gz"
        fmnist.write_idx(folder / name, fmnist.read_idx(src / name)[:n])
    return folder


def load_user_module(path: Path, name: str):
    """``path`` imported as module ``name`` (not on sys.path: no later import finds it)."""
    spec = importlib.util.spec_from_file_location(name, path)
    um = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(um)
    return um


def run_full_demo(demo, out):
    """Run ``demo/run_release.sh`` (the reference's command) into ``out`` and check what a
    user gets: a complete search, every candidate within the budget, result files."""
    r = subprocess.run(["bash", str(demo / "run_release.sh"), "--no-progress", "--output",
                        str(out)], capture_output=True, text=True, timeout=7200,
                       env=dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "NASEA search complete" in r.stdout
    doc = json.loads((out / "results" / "candidates.json").read_text())
    budget = doc["scenario"]["constraint_value"]
    assert doc["pareto"] and all(c["constraint"] <= budget for c in doc["candidates"])
    # proxies after the demos' short supernet training (docs/nas.md): 0.2-0.3 at best on two
    # CPU cores; chance is 0.10
    assert max(c["accuracy"] for c in doc["candidates"]) > 0.2
    for p in doc["pareto"]:
        assert (out / "results" / f"model_arch_result_{p['pareto_index']}.py").is_file()
