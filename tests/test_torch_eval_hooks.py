"""The eval-mode emulation hooks are registered only while they may act (npu_edges.EvalHooks):
a training forward runs without them, an eval forward with them, values unchanged."""
import copy

import pytest

torch = pytest.importorskip("torch")

from dopt.dopt_torch.opt_main import optimize_model, set_calibrate_state  # noqa: E402
from dopt_adapters.torch.npu_edges import npu_numerics  # noqa: E402

from tests.test_torch_adapter import calibrated, write_cfg  # noqa: E402
from tests.tiny_net import build  # noqa: E402


def hooked(model) -> int:
    """Forward hooks on the model's submodules (the model's own are always there)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks)
               for m in model.modules() if m is not model)


def x(n=4, seed=0):
    return torch.randn(n, 20, 16, 16, generator=torch.Generator().manual_seed(seed))


def run_eval(model, seed=0):
    """One forward of ``model`` in eval mode, without gradients."""
    model.eval()
    with torch.no_grad():
        return model(x(seed=seed))


def test_training_forward_runs_without_the_eval_hooks(tmp_path):
    q, _ = calibrated(tmp_path)
    run_eval(q)
    n_eval = hooked(q)
    assert n_eval > 10
    q.train()
    q(x()).sum().backward()
    assert hooked(q) == 0
    run_eval(q)
    assert hooked(q) == n_eval


def test_eval_output_after_a_training_forward_is_the_emulated_one(tmp_path):
    """A model whose last forward was a training one (hooks removed) gives, in eval, the
    output of one that only ever ran in eval; with npu_numerics(False) the plain one."""
    q, _ = calibrated(tmp_path)
    expected = run_eval(q, seed=1)
    r, _ = calibrated(tmp_path)
    r.train()
    with torch.no_grad():
        r(x())
    assert hooked(r) == 0
    r.load_state_dict(q.state_dict())
    assert torch.equal(run_eval(r, seed=1), expected)
    with npu_numerics(False):
        plain = run_eval(r, seed=1)
        assert hooked(r) == 0
    assert not torch.equal(plain, expected)


def test_a_module_left_in_eval_inside_a_training_model_keeps_its_hooks(tmp_path):
    """A BatchNorm put in eval mode by the user's loop (frozen statistics) in a training
    model: the hooks stay registered, as they always were."""
    model = build()
    cfg = write_cfg(tmp_path, model, shape="x:1,3,16,16")
    q = optimize_model(model, str(cfg))
    set_calibrate_state(q, True)
    with torch.no_grad():
        q(torch.randn(8, 3, 16, 16))
    set_calibrate_state(q, False)
    q.train()
    q(torch.randn(2, 3, 16, 16))
    assert hooked(q) == 0
    bn = next(m for m in q.modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn.eval()
    q(torch.randn(2, 3, 16, 16))
    assert hooked(q) > 0


def test_calibration_runs_without_the_eval_hooks(tmp_path):
    q, _ = calibrated(tmp_path)
    set_calibrate_state(q, True)         # eval mode, emulation off: the float network
    with torch.no_grad():
        q(x())
    assert hooked(q) == 0
    set_calibrate_state(q, False)


def test_a_deep_copy_has_its_own_hooks(tmp_path):
    q, _ = calibrated(tmp_path)
    q.train()
    q(x())
    c = copy.deepcopy(q)
    out = run_eval(c, seed=2)
    assert hooked(c) > 0 and hooked(q) == 0    # the copy's own modules, not the original's
    assert torch.equal(run_eval(q, seed=2), out)


def test_a_deep_copy_made_while_the_hooks_are_registered_removes_its_own(tmp_path):
    q, _ = calibrated(tmp_path)
    run_eval(q)
    n = hooked(q)
    c = copy.deepcopy(q)
    assert hooked(c) == n
    c.train()
    c(x())
    assert hooked(c) == 0 and hooked(q) == n
    q.train()
    q(x())
    run_eval(c)
    assert hooked(q) == 0 and hooked(c) == n
