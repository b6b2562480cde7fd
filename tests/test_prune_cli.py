"""``dopt prune``: the no-code path (net.py + .pth + user_module.py), its files, resume, and
one-paragraph errors with nothing written."""
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torch_pruning")

from dopt.cli.main import main  # noqa: E402

NETS = Path(__file__).resolve().parent / "prune_nets.py"
USER = '''
import torch
import torch.nn.functional as F


class UserModule:
    def __init__(self, epoch, batch_size):
        self.epoch = epoch

    def dataset_define(self, dataset_dir, is_training):
        g = torch.Generator().manual_seed(1 if is_training else 2)
        x = torch.randn(32 if is_training else 16, 3, 16, 16, generator=g)
        return torch.utils.data.TensorDataset(x, (x.mean((1, 2, 3)) > 0).long())

    def metrics_func(self, eval_dataloader, eval_function):
        hits = [(eval_function(x).argmax(1) == y).float().mean() for x, y in eval_dataloader]
        return float(torch.stack(hits).mean())

    def loss_func(self, labels, logits):
        return F.cross_entropy(logits, labels)
'''


@pytest.fixture
def files(tmp_path):
    import prune_nets
    um = tmp_path / "user_module.py"
    um.write_text(USER)
    w = tmp_path / "net.pth"
    torch.save(prune_nets.trained_like().state_dict(), w)
    return tmp_path, um, w


def _args(tmp_path, um, w, out, *extra):
    return ["prune", "--model", f"{NETS}:ResNetish", "--weights", str(w), "--input_shape",
            "1,3,16,16", "--target", "macs=0.6", "--precision", "fp16", "--user_module",
            str(um), "--dataset_dir", str(tmp_path), "--output", str(out), "--epochs", "1",
            "--batch_size", "16", "--no-progress", *extra]


def test_prune_finetune_save_and_resume(files, capsys):
    tmp_path, um, w = files
    out = tmp_path / "out"
    assert main(_args(tmp_path, um, w, out)) == 0
    report = json.loads((out / "prune_report.json").read_text())
    assert report["estimate_after"]["macs"] <= 0.6 * report["estimate_before"]["macs"]
    assert all(v % 16 == 0 for v in report["widths"].values())
    assert report["finetune"]["distill"]["temperature"] == 4.0
    assert set(report["finetune"]["last"]) >= {"loss", "kd"}
    for name in ("pruned.py", "pruned.pth", "pruned.onnx", "pruned_init.py",
                 "finetune_state.pt", "prune_plan.json"):
        assert (out / name).is_file(), name
    # the saved model reloads through its own file
    import importlib.util
    spec = importlib.util.spec_from_file_location("pruned_cli", out / "pruned.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.load()(torch.zeros(2, 3, 16, 16)).shape == (2, 10)
    # the same command resumes: no new pruning, fine-tuning already complete
    capsys.readouterr()
    assert main(_args(tmp_path, um, w, out)) == 0
    assert "resuming" in capsys.readouterr().err
    # other settings in the same folder are refused
    assert main(_args(tmp_path, um, w, out, "--importance", "bn_scale")) == 2
    assert "other settings" in capsys.readouterr().err


@pytest.mark.parametrize("change, words", [
    (("--target", "speedup=0.5"), "above 1"),
    (("--input_shape", "1,x"), "input shape"),
    (("--weights", "missing.pth"), "does not exist"),
])
def test_bad_arguments_exit_2_and_write_nothing(files, capsys, change, words):
    tmp_path, um, w = files
    out = tmp_path / "bad"
    args = _args(tmp_path, um, w, out)
    i = args.index(change[0])
    args[i + 1] = change[1] if change[0] != "--weights" else str(tmp_path / change[1])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
    assert not (out / "pruned.py").exists()


def test_weights_that_do_not_fit_and_bad_user_module(files, capsys):
    tmp_path, um, w = files
    torch.save({"conv9.weight": torch.zeros(1)}, tmp_path / "other.pth")
    args = _args(tmp_path, um, tmp_path / "other.pth", tmp_path / "o1")
    assert main(args) == 2
    assert "do not fit the model" in capsys.readouterr().err
    bad = tmp_path / "bad_um.py"
    bad.write_text("class UserModule:\n    def __init__(self, epoch, batch_size):\n"
                   "        pass\n")
    assert main(_args(tmp_path, bad, w, tmp_path / "o2")) == 2
    assert "UserModule.dataset_define" in capsys.readouterr().err
