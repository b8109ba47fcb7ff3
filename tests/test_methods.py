"""The method losses on hand-made features: the DMU weights behave as the method says."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dmu_ray.config import OptimConfig
from dmu_ray.data.splits import old_classes, split_mask
from dmu_ray.methods.losses import compatibility_loss, discriminativeness, dmu_weights, mean_one, upgrade_loss
from dmu_ray.methods.registry import make_method
from dmu_ray.models.embedding import EmbeddingModel
from dmu_ray.models.heads import MarginHead
from dmu_ray.models.upgrade import UpgradeModule
from dmu_ray.train.loop import Trainee, lr_lambda, run_scheduler


def old_head_3_classes() -> MarginHead:
    """Old classifier whose class weights are the three axes of R^3."""
    h = MarginHead(3, 3, "arcface", s=10.0, m=0.3)
    with torch.no_grad():
        h.weight.copy_(torch.eye(3))
    return h.eval()


def test_confident_old_feature_gets_more_compat_weight_and_less_upgrade_weight():
    head = old_head_3_classes()
    labels = torch.tensor([0, 0])
    f_o = F.normalize(
        torch.tensor(
            [
                [1.0, 0.05, 0.0],  # confidently class 0: a good old feature
                [0.1, 1.0, 0.0],
            ]
        ),
        dim=1,
    )  # looks like class 1: a poor one
    for kind in ("prob", "entropy"):
        d = discriminativeness(head, f_o, labels, kind)
        assert d[0] > d[1] and ((d >= 0) & (d <= 1)).all()
    d = discriminativeness(head, f_o, labels, "prob")
    w = dmu_weights(d, torch.tensor([True, True]))
    assert w.compat[0] > w.compat[1]  # inheritance favours the good old feature
    assert w.upgrade[1] > w.upgrade[0]  # variation works hardest on the poor one
    assert torch.isclose(w.compat.mean(), torch.tensor(1.0)) and torch.isclose(
        w.upgrade.mean(), torch.tensor(1.0)
    )
    # the ablation switches make the weights uniform (BCT's undifferentiated constraint)
    flat = dmu_weights(d, torch.tensor([True, True]), selective=False, adapt_weighting=False)
    assert torch.allclose(flat.compat, torch.ones(2)) and torch.allclose(flat.upgrade, torch.ones(2))


def test_unknown_classes_are_left_out_of_compatibility():
    w = mean_one(torch.tensor([0.5, 0.9, 0.2]), torch.tensor([True, False, True]))
    assert w[1] == 0 and torch.isclose(w[[0, 2]].mean(), torch.tensor(1.0))
    head = old_head_3_classes()
    f_n = F.normalize(torch.randn(3, 3), dim=1)
    labels = torch.tensor([0, 1, 2])
    only_first = compatibility_loss(
        f_n, labels, head, torch.tensor([1.0, 0.0, 0.0]), torch.tensor([True, False, False])
    )
    ce0 = F.cross_entropy(head(f_n[:1], labels[:1]), labels[:1])
    assert torch.isclose(only_first, ce0)


def test_lambda_means_lambda_whatever_the_share_of_known_classes():
    """BCT averages the influence loss over the samples it applies to: a batch where 1 sample in
    10 is of a known class gives the same loss as that sample alone (it was 1/10 of it)."""
    head = old_head_3_classes()
    torch.manual_seed(1)
    f_n = F.normalize(torch.randn(10, 3), dim=1)
    labels = torch.tensor([0] + [2] * 9)
    applies = torch.tensor([True] + [False] * 9)
    w = mean_one(torch.ones(10), applies)
    diluted_before = (w * F.cross_entropy(head(f_n, labels), labels, reduction="none")).sum() / 10
    got = compatibility_loss(f_n, labels, head, w, applies)
    alone = F.cross_entropy(head(f_n[:1], labels[:1]), labels[:1])
    assert torch.isclose(got, alone) and torch.isclose(got, 10 * diluted_before)
    assert compatibility_loss(f_n, labels, head, torch.zeros(10), torch.zeros(10, dtype=torch.bool)) == 0


def test_d_temperature_floor_and_clip():
    """A saturated old head gives d near 0 or 1; a temperature spreads it; the floor keeps every
    known sample under the constraint; the clip stops few samples from carrying it."""
    head = MarginHead(2, 3, "softmax", s=30.0)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
    angles = torch.tensor([0.05, 0.3, 0.7, 1.2])
    f_o = torch.stack([torch.cos(angles), torch.sin(angles)], 1)  # class 0, drifting towards class 1
    labels = torch.zeros(4, dtype=torch.long)
    hot = discriminativeness(head, f_o, labels, "prob")
    warm = discriminativeness(head, f_o, labels, "prob", temperature=4.0)
    assert hot.max() > 0.99 and hot.min() < 0.01  # saturated: d says little
    assert warm.min() > hot.min() and warm.max() < hot.max() and (warm.diff() < 0).all()
    known = torch.ones(4, dtype=torch.bool)
    plain = dmu_weights(hot, known)
    assert plain.compat.min() < 0.01  # that sample has left the constraint
    floored = dmu_weights(hot, known, floor=0.2)
    assert floored.compat.min() > 0.15 and torch.isclose(floored.compat.mean(), torch.tensor(1.0))
    few = torch.tensor([1.0, 0.3, 0.01, 0.01])  # one sample would carry most of the constraint
    assert dmu_weights(few, known).compat.max() > 3
    clipped = dmu_weights(few, known, clip=1.5)
    assert torch.isclose(clipped.compat.max(), torch.tensor(1.5)) and torch.isclose(
        clipped.compat.mean(), torch.tensor(1.0)
    )
    assert (clipped.compat[few.argsort()].diff() >= 0).all()  # a higher d never gets less weight
    from dmu_ray.methods.losses import d_stats

    st = d_stats(hot, known, plain.compat)
    assert st["d_near1"] > 0 and st["d_near0"] > 0 and st["d_q10"] <= st["d_q50"] <= st["d_q90"]


def test_compatibility_loss_pulls_new_features_to_old_class_weights():
    head = old_head_3_classes()
    f = torch.tensor([[0.2, 1.0, 0.3]], requires_grad=True)
    loss = compatibility_loss(
        F.normalize(f, dim=1), torch.tensor([0]), head, torch.ones(1), torch.ones(1, dtype=torch.bool)
    )
    loss.backward()
    assert f.grad[0, 0] < 0  # descending the loss increases the class-0 component


def test_upgrade_loss_trains_psi_but_not_the_new_classifier():
    torch.manual_seed(0)
    psi = UpgradeModule(3, 3, width=8, depth=1)
    new_head = MarginHead(3, 3, "cosface", s=10, m=0.2)
    f_o = F.normalize(torch.randn(4, 3), dim=1)
    f_n = F.normalize(torch.randn(4, 3), dim=1).requires_grad_()
    loss, cos = upgrade_loss(psi, f_o, f_n, torch.tensor([0, 1, 2, 0]), new_head, torch.ones(4))
    loss.backward()
    assert new_head.weight.grad is None and f_n.grad is None
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in psi.parameters())
    assert -1 <= cos <= 1


def test_margin_heads():
    h = MarginHead(2, 2, "arcface", s=1.0, m=0.5)
    with torch.no_grad():
        h.weight.copy_(torch.eye(2))
    f = torch.tensor([[1.0, 0.0]])
    plain = h(f)
    with_margin = h(f, torch.tensor([0]))
    assert torch.isclose(plain[0, 0], torch.tensor(1.0)) and with_margin[0, 0] < plain[0, 0]
    assert with_margin[0, 1] == plain[0, 1]
    with pytest.raises(ValueError, match="unknown head"):
        MarginHead(2, 2, "sphereface")


def test_trainee_losses_per_method():
    torch.manual_seed(0)
    x, y = torch.randn(8, 1, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    f_o = F.normalize(torch.randn(8, 8), dim=1)
    old_head = MarginHead(8, 3)
    known = torch.tensor([True, True, False])
    for name, keys in [
        ("independent", {"ce"}),
        ("bct", {"ce", "compat", "constrained", "new_old_cos"}),
        (
            "dmu",
            {"ce", "compat", "constrained", "upgrade", "psi_cos", "new_old_cos", "w_max"}
            | {"old_d", "d_q10", "d_q50", "d_q90", "d_near0", "d_near1"},
        ),
    ]:
        m = make_method(name=name, old_model=None if name == "independent" else "x")
        t = Trainee(
            EmbeddingModel("small", 8, 1),
            MarginHead(8, 3),
            m,
            psi=UpgradeModule(8, 8, 16, 1) if name == "dmu" else None,
            old_head=None if name == "independent" else old_head,
            old_classes=known,
        )
        loss, stats = t(x, y, None if name == "independent" else f_o)
        assert set(stats) == keys and torch.isfinite(loss)
        loss.backward()


def test_losses_under_autocast():
    """The GPU path runs under fp16 autocast; CPU bf16 autocast exercises the same dtype mixing."""
    torch.manual_seed(0)
    old_head = MarginHead(8, 3)
    t = Trainee(
        EmbeddingModel("small", 8, 1),
        MarginHead(8, 3),
        make_method(name="dmu", old_model="x"),
        psi=UpgradeModule(8, 8, 16, 1),
        old_head=old_head,
        old_classes=torch.tensor([True, True, False]),
    )
    x, y = torch.randn(6, 1, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        f_o = EmbeddingModel("small", 8, 1)(x)
        loss, stats = t(x, y, f_o)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()


def test_lr_schedule_warms_up_then_decays_to_zero():
    f = lr_lambda(warmup_steps=10, total_steps=100)
    assert f(0) < f(5) < f(9) <= 1.0
    assert (
        f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.5, abs=0.02) and f(100) == pytest.approx(0.0)
    )


def test_resumed_schedule_follows_the_run_whatever_the_worker_count():
    optim = OptimConfig(lr=0.1, epochs=4, warmup_epochs=1)

    def lrs(steps_per_epoch: int, start_epoch: int, steps: int) -> list[float]:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=optim.lr)
        sched = run_scheduler(opt, optim, steps_per_epoch, start_epoch)
        out = []
        for _ in range(steps):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    whole = lrs(20, 0, 80)  # 2 workers, 20 steps an epoch, all 4 epochs in one go
    assert lrs(20, 2, 40) == pytest.approx(whole[40:])  # resumed at epoch 2 with 2 workers
    one_worker = lrs(40, 2, 80)  # resumed at epoch 2 with 1 worker: twice the steps an epoch
    assert one_worker[::2] == pytest.approx(whole[40:], rel=0.05) and one_worker[-1] < whole[41]


@pytest.mark.parametrize("protocol", ["extended-data", "extended-class", "open-data", "open-class"])
def test_split_protocols(protocol):
    ids = np.arange(5000)
    labels = ids % 50
    old = split_mask(protocol, "old", ids, labels, 0.3, seed=1)
    new = split_mask(protocol, "new", ids, labels, 0.3, seed=1)
    assert 0.2 < old.mean() < 0.4
    if protocol.startswith("extended"):
        assert new.all()
    else:
        assert not (old & new).any() and (old | new).all()
    if protocol.endswith("-class"):
        assert set(labels[old]).isdisjoint(set(labels[~old]))  # whole classes
        assert old_classes(protocol, 50, 0.3, 1).sum() == len(set(labels[old]))
    assert (split_mask(protocol, "old", ids, labels, 0.3, seed=1) == old).all()  # deterministic
