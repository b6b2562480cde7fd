"""NASEA with PyTorch on real Fashion-MNIST images: the weight-sharing supernet, the cost
model's latency, and the command line end to end (interrupt and resume, two workers on one
study, results runnable alone, bad inputs). A tiny skeleton, 480 images, 1 epoch, a
population of 4 over 2 generations keep it within the default test set."""
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("optuna")
pytest.importorskip("tensorboardX")
pytest.importorskip("matplotlib")
import onnx  # noqa: E402

from demos.fashion_mnist import data as fmnist  # noqa: E402
from dopt.nas.space import SearchSpace  # noqa: E402
from tests.nas_helpers import fmnist_subset, load_user_module  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "demos" / "nas_fashion_mnist"
N_IMAGES = 480

SCEN = """\
scenario:
  strategy:
    name: NASEA
    framework: PyTorch
    batch_size: 32
    epochs: 1
    constraint:
      application_type: image_classification
      constraint_type: {ctype}
      constraint_value: {cval}
    supernet:
      input_shape: (1, 28, 28)
      filters: [16, 32, 32]
      strides: [2, 2, 1]
    optimizer:
      weights_optimizer:
        type: Adam
        learning_rate: 0.004
    dataset:
      train_dir: data
      val_dir: data
    searcher:
      generation_num: 2
      pop_size: 4
  resource:
    name: pytorch_standalone
    gpu_id: 0
"""


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return env


def _nas(folder, *args, entry=("-m", "dopt", "nas")):
    return subprocess.run([sys.executable, *entry, "-c", "scen.yaml", "--no-progress", *args],
                          cwd=folder, env=_env(), capture_output=True, text=True, timeout=600)


@pytest.fixture
def nas_here(monkeypatch, capsys):
    """``dopt nas`` in this process (torch is imported already), one thread like a worker."""
    from dopt.nas.cli import main

    def run(folder, *args):
        monkeypatch.chdir(folder)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            rc = main(["-c", "scen.yaml", "--no-progress", *args])
        finally:
            torch.set_num_threads(threads)
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, rc, out, err)
    return run


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """The first 480 Fashion-MNIST training images, in IDX files as the dataset ships."""
    return fmnist_subset(tmp_path_factory.mktemp("fmnist"), N_IMAGES)


def _project(tmp_path, images, ctype="size", cval=20000):
    shutil.copytree(images, tmp_path / "data")
    um = (DEMO / "user_module.py").read_text().replace("FEATURES = 128", "FEATURES = 32")
    (tmp_path / "user_module.py").write_text(um)
    (tmp_path / "scen.yaml").write_text(SCEN.format(ctype=ctype, cval=cval))
    return tmp_path


# --- supernet ---------------------------------------------------------------------------------


def _user_nets():
    um = load_user_module(DEMO / "user_module.py", "nas_demo_um")
    um.FEATURES = 32
    return um.PreNet(), um.PostNet()


@pytest.fixture
def one_thread():
    """Small convolutions run fastest on one thread (and share the CI's cores best)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_extracted_subnet_computes_what_the_supernet_path_computes(one_thread):
    from dopt_adapters.torch.nas_supernet import Supernet, extract
    torch.manual_seed(0)
    space = SearchSpace([16, 32, 32], [2, 1, 1], in_channels=16, align=16)
    sn = Supernet(space, *_user_nets())
    for m in sn.modules():  # non-trivial BatchNorm state, so slicing mistakes show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    sn.eval()
    x = torch.randn(3, 1, 28, 28)
    rng = random.Random(0)
    kinds = set()
    for _ in range(10):
        arch = sn.sample(rng)
        kinds |= {b for b, *_ in arch}
        net = extract(sn, arch).eval()
        with torch.no_grad():
            torch.testing.assert_close(net(x), sn(x, arch), rtol=1e-4, atol=1e-5)
        # the plain network has exactly the sub-net's channels
        convs = [m for m in net.backbone.modules() if isinstance(m, torch.nn.Conv2d)]
        assert all(c.out_channels in (16, 32, 48, 64) or c.groups > 1 or
                   c.out_channels % 16 == 0 for c in convs)
    assert len(kinds) >= 4


def test_fair_paths_train_every_block_each_step_with_the_sandwich_widths():
    from dopt_adapters.torch.nas_supernet import Supernet
    space = SearchSpace([16, 32, 32, 64], [1, 2, 1, 1], in_channels=16, align=16)
    sn = Supernet(space, *_user_nets())
    rng = random.Random(0)
    for _ in range(3):
        paths = sn.fair_paths(rng)
        assert len(paths) == max(len(lay.blocks) for lay in space.layers)
        for i, lay in enumerate(space.layers):
            assert {p[i][0] for p in paths} == set(lay.blocks)  # every block, every step
            for p, want in ((paths[0], max(lay.widths)), (paths[1], min(lay.widths))):
                if p[i][0] != "identity":
                    assert p[i][2] == want  # sandwich: widest, then narrowest


def test_supernet_learns_in_a_few_steps(one_thread):
    """Fair steps on 256 real images: the mean loss over every block must fall clearly below
    chance (ln 10 = 2.30) within 40 steps (uniform single-path steps stay near 2.1 here); a
    path extracted afterwards classifies above chance after BatchNorm recalibration."""
    from dopt_adapters.torch.nas_supernet import Supernet, extract
    torch.manual_seed(0)
    x, y = fmnist.load("train", limit=320)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    space = SearchSpace([16, 32, 32], [2, 2, 1], in_channels=16, align=16)
    sn = Supernet(space, *_user_nets()).train()
    opt = torch.optim.Adam(sn.parameters(), lr=0.02)
    rng, losses = random.Random(0), []
    for step in range(40):
        idx = torch.randint(0, 256, (64,), generator=torch.Generator().manual_seed(step))
        paths = sn.fair_paths(rng)
        opt.zero_grad()
        total = 0.0
        for p, xb, yb in zip(paths, x[idx].chunk(len(paths)), y[idx].chunk(len(paths))):
            loss = torch.nn.functional.cross_entropy(sn(xb, p), yb) * len(xb) / len(idx)
            loss.backward()
            total += float(loss.detach())
        opt.step()
        losses.append(total)
    assert sum(losses[-10:]) / 10 < 2.0, losses
    net = extract(sn, sn.sample(random.Random(1))).train()
    with torch.no_grad():
        net(x[:256])
        acc = (net.eval()(x[256:]).argmax(1) == y[256:]).float().mean().item()
    assert acc > 0.15, acc  # chance is 0.10


def test_demo_budget_is_the_current_estimate_of_mobilenetv2s():
    """scen.yaml's constraint_value must follow the cost model: after a profile change run
    ``python -m demos.nas_fashion_mnist.budget --write``."""
    from demos.nas_fashion_mnist import budget
    est = budget.estimate()
    assert budget.scen_value() == budget.budget_ms(est), (
        "demos/nas_fashion_mnist/scen.yaml is stale: run "
        "python -m demos.nas_fashion_mnist.budget --write")


def test_latency_estimate_grows_with_width(tmp_path, one_thread):
    from dopt.nas.latency import estimate_onnx
    from dopt.npu.profile import load_profile
    from dopt_adapters.torch.nas_supernet import build_static
    space = SearchSpace([32, 64, 64], [2, 2, 1], in_channels=16, align=16)
    prof = load_profile("kirin9000")
    out = {}
    for narrow in (True, False):
        arch = space.uniform("conv3x3", narrow=narrow)
        net = build_static(space, arch, *_user_nets()).eval()
        net.post.fc = torch.nn.Linear(64, 10)
        p = tmp_path / f"{narrow}.onnx"
        torch.onnx.export(net, (torch.zeros(1, 1, 28, 28),), str(p), dynamo=False,
                          opset_version=13)
        out[narrow] = estimate_onnx(p, prof)
    for est in out.values():
        assert est["latency_fp16_ms"] > 0 and est["latency_int8_ms"] > 0
    assert out[False]["latency_fp16_ms"] > out[True]["latency_fp16_ms"]
    assert out[False]["npu_gmacs"] > out[True]["npu_gmacs"]


# --- command line -----------------------------------------------------------------------------


def test_interrupt_resume_and_two_workers(tmp_path, images, nas_here):
    """A run stopped after 3 evaluations, then the same command with 2 workers in a new
    process: the supernet is not trained again, nothing is evaluated twice, the study
    completes."""
    proj = _project(tmp_path, images)
    r = nas_here(proj, "--max-evals", "3")
    assert r.returncode == 0, r.stderr
    assert "running on the CPU" in r.stderr and "partial" in r.stdout
    ckpt = proj / "nas_state" / "supernet.pt"
    stamp = ckpt.stat().st_mtime_ns
    first = (proj / "results" / "candidates.csv").read_text().splitlines()
    assert len(first) == 1 + 3

    r = _nas(proj, "--workers", "2")
    assert r.returncode == 0, r.stderr
    assert "complete: 8/8 evaluations" in r.stdout, r.stdout
    assert ckpt.stat().st_mtime_ns == stamp and "resuming supernet" not in r.stderr
    import csv
    import json
    rows = list(csv.DictReader(open(proj / "results" / "candidates.csv")))
    assert [r["arch"] for r in rows[:3]] == [line.split(",")[2] for line in first[1:]]
    assert len({r["arch"] for r in rows}) == len(rows)           # no network evaluated twice
    assert {r["worker"] for r in rows} >= {"0", "1"}              # both workers evaluated
    assert all(float(r["constraint"]) <= 20000 for r in rows)     # over budget: never evaluated
    assert all(int(r["params"]) == int(float(r["constraint"])) for r in rows)
    doc = json.loads((proj / "results" / "candidates.json").read_text())
    front = doc["pareto"]
    files = sorted(p.name for p in (proj / "results").glob("model_arch_result_*.py"))
    assert files == sorted(f"model_arch_result_{r['pareto_index']}.py" for r in front)
    assert (proj / "results" / "pareto.png").stat().st_size > 1000
    events = b"".join(p.read_bytes() for p in (proj / "log_classification").iterdir())
    for tag in (b"loss", b"lr", b"pareto/accuracy", b"pareto/size", b"search/accuracy"):
        assert tag in events

    # a result rebuilds alone, as the reference: copied next to user_module.py and run
    src = (proj / "results" / "model_arch_result_0.py").read_text()
    assert f"model_param_size = {front[0]['params']}" in src and "accuracy = " in src
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(proj / "results" / "model_arch_result_0.py", alone)
    shutil.copy(proj / "user_module.py", alone)
    import runpy
    cwd = os.getcwd()
    os.chdir(alone)
    try:  # what `python3 model_arch_result_0.py` runs, without a new interpreter
        runpy.run_path(str(alone / "model_arch_result_0.py"), run_name="__main__")
    finally:
        os.chdir(cwd)
        sys.modules.pop("user_module", None)
    m = onnx.load(str(alone / "model_arch_result_0.onnx"))
    assert m.graph.output[0].name == "output"
    sd = torch.load(alone / "model_arch_result_0.pth", weights_only=True)
    assert sum(v.numel() for k, v in sd.items() if "running" not in k
               and "num_batches" not in k) == front[0]["params"]


def test_infeasible_budget_stops_at_once_naming_the_smallest_value(tmp_path, images, nas_here):
    proj = _project(tmp_path, images, cval=500)
    r = nas_here(proj)
    assert r.returncode == 2
    msg = r.stderr.strip().splitlines()[-1]
    assert "no candidate of the search space meets constraint_value 500" in msg
    assert "smallest achievable size is 2186" in msg and "line 10" in msg
    assert not (proj / "nas_state").exists() and not (proj / "results").exists()
    assert not (proj / "log_classification").exists()


def test_reference_entry_points_and_bad_inputs(tmp_path, images, nas_here):
    proj = _project(tmp_path, images)
    scen = (proj / "scen.yaml").read_text()
    (proj / "scen.yaml").write_text(scen.replace("learning_rate", "learnig_rate"))
    r = _nas(proj, entry=(str(ROOT / "dopt_so.py"),))       # python3 dopt_so.py -c scen.yaml
    assert r.returncode == 2 and "learnig_rate (line 18)" in r.stderr
    assert "did you mean 'learning_rate'" in r.stderr and "Traceback" not in r.stderr
    (proj / "scen.yaml").write_text(scen.replace("val_dir: data", "val_dir: nowhere"))
    r = _nas(proj, entry=("-m", "dopt.cli.dopt_so"))         # dopt_so -c scen.yaml
    assert r.returncode == 2 and "val_dir (line 21)" in r.stderr and "does not exist" in r.stderr
    (proj / "scen.yaml").write_text(scen)
    um = (proj / "user_module.py").read_text()
    (proj / "user_module.py").write_text(um.replace("def metrics_func", "def metric_func"))
    r = nas_here(proj)
    assert r.returncode == 2 and "UserModule has no method metrics_func" in r.stderr
    assert sorted(p.name for p in proj.iterdir()) == ["data", "scen.yaml", "user_module.py"]


@pytest.mark.slow
def test_torchrun_trains_the_supernet_in_two_processes(tmp_path, images):
    """gloo on CPUs: both processes train (data sharded, gradients averaged), then both
    search the one study; process 0 writes the results."""
    proj = _project(tmp_path, images)
    r = subprocess.run(["torchrun", "--nproc-per-node", "2", "--master-port", "29531", "-m",
                        "dopt", "nas", "-c", "scen.yaml", "--no-progress"], cwd=proj,
                       env=_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "complete: 8/8 evaluations" in r.stdout
    import csv
    rows = list(csv.DictReader(open(proj / "results" / "candidates.csv")))
    assert {row["worker"] for row in rows} == {"0", "1"}
    assert r.stderr.count("supernet epoch 1/1") == 1   # logged once, by process 0


def _seg_search(tmp_path, images, nas_here):
    seg = DEMO / "segmentation"
    shutil.copytree(images, tmp_path / "data")
    shutil.copy(seg / "user_module.py", tmp_path)
    scen = (seg / "scen.yaml").read_text()
    for a, b in (('"../../fashion_mnist/data"', "data"), ("epochs:              3", "epochs: 1"),
                 ("generation_num:    4", "generation_num: 1"), ("pop_size:          8",
                                                                  "pop_size: 2"),
                 ('constraint_type:   "latency"', "constraint_type: size"),
                 ("constraint_value:  0.5", "constraint_value:  1000000")):
        assert a in scen
        scen = scen.replace(a, b)
    (tmp_path / "scen.yaml").write_text(scen)
    r = nas_here(tmp_path)
    assert r.returncode == 0, r.stderr
    import json
    doc = json.loads((tmp_path / "results" / "candidates.json").read_text())
    assert doc["evaluated"] == 2 and all(0 <= c["accuracy"] <= 1 for c in doc["candidates"])
    assert all(c["arch"].split("|")[0].endswith(":16") for c in doc["candidates"])  # fixed
    assert (tmp_path / "log_segmentation").is_dir()
    return scen


def test_segmentation_with_feature_choose(tmp_path, images, nas_here):
    """The segmentation demo's user_module (glyphs on 56x56 canvases, mIoU): PostNet gets
    [layer 0's output, the last layer's]."""
    _seg_search(tmp_path, images, nas_here)


@pytest.mark.slow
def test_segmentation_pre_train_dir_warm_starts(tmp_path, images, nas_here):
    scen = _seg_search(tmp_path, images, nas_here)
    # a second search warm-starts from the first one's supernet through pre_train_dir
    second = tmp_path / "second"
    second.mkdir()
    shutil.copy(tmp_path / "user_module.py", second)
    assert "pre_train_dir:     data" in scen
    (second / "scen.yaml").write_text(scen.replace("pre_train_dir:     data",
                                                   f'pre_train_dir:     "{tmp_path}"'))
    shutil.copytree(images, second / "data")
    r = nas_here(second, "--max-evals", "1")
    assert r.returncode == 0, r.stderr
    assert "warm start:" in r.stderr


def test_ctrl_c_in_supernet_training_resumes_mid_epoch(tmp_path, images, nas_here):
    """Ctrl-C in step 6 of 12 (a step's paths share its batch of 32): exit 130 with the
    resume hint, a checkpoint after step 5; the same command continues from step 5 (the
    earlier steps are not trained again)."""
    proj = _project(tmp_path, images)
    scen = (proj / "scen.yaml").read_text().replace("generation_num: 2", "generation_num: 1")
    (proj / "scen.yaml").write_text(scen.replace("pop_size: 4", "pop_size: 2"))
    um = (proj / "user_module.py").read_text()
    (proj / "user_module.py").write_text(um.replace(
        "    def loss_func(self, labels, logits):\n",
        "    def loss_func(self, labels, logits):\n"
        "        import os\n"
        "        self.seen = getattr(self, 'seen', 0) + len(labels)\n"
        "        if self.seen > 5 * 32 and os.environ.get('STOP_AT_6'):\n"
        "            raise KeyboardInterrupt\n"))
    os.environ["STOP_AT_6"] = "1"
    try:
        r = nas_here(proj)
    finally:
        del os.environ["STOP_AT_6"]
    assert r.returncode == 130 and "run the same command again to resume" in r.stderr
    state = torch.load(proj / "nas_state" / "supernet.pt", weights_only=True)
    assert (state["epoch"], state["step"]) == (0, 5)
    assert not (proj / "results").exists()
    r = nas_here(proj)
    assert r.returncode == 0, r.stderr
    assert "resuming supernet training at epoch 1, step 5" in r.stderr
    assert "complete: 2/2 evaluations" in r.stdout
    assert torch.load(proj / "nas_state" / "supernet.pt", weights_only=True)["epoch"] == 1


@pytest.mark.slow
def test_demo_runs_with_the_reference_command(tmp_path):
    """demos/nas_fashion_mnist/run_release.sh (``python3 dopt_so.py -c scen.yaml``) in full:
    every evaluated candidate within the latency budget, the results rebuildable."""
    from tests.nas_helpers import run_full_demo
    run_full_demo(DEMO, tmp_path)
