"""dopt.distill: the settings and schedule (core) and the PyTorch loss a user drops into
their own loop (KL at temperature T, feature MSE through 1x1 adapters, frozen teacher)."""
import copy

import pytest

from dopt.distill import DistillConfig, make_config
from dopt.errors import DoptError


def test_schedules_move_the_distillation_weights():
    c = make_config(kd_weight=2.0, feature_weight=1.0, schedule="linear", final=0.0,
                    features={"a": "b"})
    assert c.weights(0.0) == {"ce": 1.0, "kd": 2.0, "feature": 1.0}
    assert c.weights(0.5)["kd"] == pytest.approx(1.0)
    assert c.weights(1.0)["kd"] == pytest.approx(0.0)
    cos = make_config(schedule="cosine", final=0.5)
    assert cos.factor(0) == pytest.approx(1.0) and cos.factor(1) == pytest.approx(0.5)
    assert cos.factor(0.5) == pytest.approx(0.75)
    assert make_config().factor(0.7) == 1.0
    assert cos.factor(7) == cos.factor(1)   # progress is clamped


@pytest.mark.parametrize("settings, field", [
    ({"temperature": 0}, "temperature"), ({"kd_weight": -1}, "kd_weight"),
    ({"schedule": "step"}, "schedule"), ({"features": {"a": 3}}, "features"),
    ({"features": {"a": "b"}}, "feature_weight"), ({"kd_weight": 0}, "kd_weight"),
    ({"temprature": 2}, "temprature"), ({"temperature": float("nan")}, "temperature")])
def test_bad_settings_name_the_field(settings, field):
    with pytest.raises(DoptError) as ei:
        make_config(**settings)
    assert f"field '{field}'" in str(ei.value)


torch = pytest.importorskip("torch")
F = torch.nn.functional


def _nets():
    from prune_nets import ResNetish
    torch.manual_seed(0)
    teacher = ResNetish().eval()
    student = copy.deepcopy(teacher)
    with torch.no_grad():   # a narrower-looking student: perturbed weights
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return teacher, student


def test_logit_term_is_t_squared_kl_and_zero_for_the_teacher_itself():
    import dopt.distill
    teacher, student = _nets()
    kd = dopt.distill.loss(teacher, student, temperature=3.0, ce_weight=0.0)
    x = torch.randn(6, 3, 16, 16)
    s_logits = student(x)
    got = kd(s_logits, x)
    t = teacher(x).detach()
    want = 9.0 * F.kl_div(F.log_softmax(s_logits / 3, 1), F.softmax(t / 3, 1),
                          reduction="batchmean")
    assert torch.allclose(got, want, rtol=1e-5)
    assert float(kd(teacher(x), x)) == pytest.approx(0.0, abs=1e-6)
    labels = torch.randint(0, 10, (6,))
    kd_ce = dopt.distill.loss(teacher, student, temperature=3.0)
    assert torch.allclose(kd_ce(s_logits, x, labels), got + F.cross_entropy(s_logits, labels),
                          rtol=1e-5)
    assert set(kd_ce.last) == {"ce", "kd"}


def test_teacher_is_frozen_and_gradients_reach_student_and_adapters():
    from dopt_adapters.torch.distill import DistillationLoss
    teacher, _ = _nets()
    from prune_nets import trained_like
    import dopt.prune as P
    student = trained_like(seed=1)
    P.prune(student, (1, 3, 16, 16), "macs=0.6", precision="fp16")   # a real pruned student
    assert student.stem[1].num_features < teacher.stem[1].num_features
    kd = DistillationLoss(teacher, student, temperature=4.0, feature_weight=1.0,
                          features={"stem": "stem"}, schedule="linear", final=0.0)
    assert len(list(kd.parameters())) == 1            # the 1x1 adapter: widths differ
    assert all(not p.requires_grad for p in teacher.parameters())
    assert not teacher.training
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    student.train()
    loss = kd(student(x), x, y, progress=0.0)
    loss.backward()
    assert student.conv1.weight.grad.abs().sum() > 0
    assert kd.adapters["0"].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert set(kd.last) == {"ce", "kd", "feature"}
    # at the end of a linear schedule to 0 only the cross-entropy is left
    end = kd(student(x), x, y, progress=1.0)
    assert float(end) == pytest.approx(float(F.cross_entropy(student(x), y)), rel=1e-5)
    kd.remove()


def test_distillation_fine_tunes_towards_the_teacher():
    """A few steps of the loss in an ordinary loop bring the student's outputs closer."""
    from dopt_adapters.torch.distill import DistillationLoss
    teacher, student = _nets()
    kd = DistillationLoss(teacher, student, temperature=2.0, ce_weight=0.0)
    x = torch.randn(16, 3, 16, 16)
    student.eval()   # BatchNorm fixed: only the weights move
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    first = float(kd(student(x), x))
    for _ in range(10):
        loss = kd(student(x), x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(kd(student(x), x)) < 0.5 * first


def test_bad_feature_layers_are_named():
    from dopt_adapters.torch.distill import DistillationLoss
    teacher, student = _nets()
    with pytest.raises(DoptError, match="no layer 'layer9'"):
        DistillationLoss(teacher, student, features={"layer9": "bn1"}, feature_weight=1.0)
    with pytest.raises(DoptError, match="inputs"):
        DistillationLoss(teacher, student)(student(torch.randn(2, 3, 16, 16)))
    with pytest.raises(DoptError, match="either"):
        DistillationLoss(teacher, student, DistillConfig(), temperature=2.0)
