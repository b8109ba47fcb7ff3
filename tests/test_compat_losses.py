"""The peers' compatibility losses (issue 15): lwf, focal-distillation and contrastive (RACT) on
hand-made features, the contrastive negatives gathered across a real two-process gloo group, and
each method trained on Ray Train."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from test_train import config, digits  # noqa: F401  (the fixture)
from torch import nn

from dmu_ray.methods.losses import gather_batches, old_contrastive_loss
from dmu_ray.methods.registry import make_method
from dmu_ray.models.artifact import load_artifact, save_embedding_model
from dmu_ray.models.embedding import EmbeddingModel
from dmu_ray.models.heads import MarginHead
from dmu_ray.train.job import run_training
from dmu_ray.train.trainee import Trainee


class _Given(nn.Module):
    """A 'model' whose output is its input, normalised: hand-made features through a Trainee."""

    def forward(self, x):
        return F.normalize(x, dim=1)


def _trainee(method, dim=4, classes=4, known=(1, 1, 1, 0)):
    torch.manual_seed(0)
    old_head = MarginHead(dim, classes)
    return Trainee(
        _Given(), MarginHead(dim, classes), method, old_head=old_head, old_classes=torch.tensor(known)
    )


def _kl(p_logits, q_logits, t):
    p, q = F.softmax(p_logits / t, 1), F.softmax(q_logits / t, 1)
    return t * t * (p * (p.log() - q.log())).sum(1)


def test_lwf_distils_the_old_heads_known_classes():
    t = _trainee(make_method(name="lwf", old_model="o", compat_weight=0.5, temperature=2.0))
    torch.manual_seed(1)
    f_o = F.normalize(torch.randn(5, 4), dim=1)
    labels = torch.tensor([0, 1, 2, 3, 0])  # class 3 is unknown to the old head: still distilled
    x = torch.randn(5, 4, requires_grad=True)
    loss, stats = t(x, labels, f_o)
    f_n = F.normalize(x, dim=1)
    w = F.normalize(t.old_head.weight, dim=1)[:3] * t.old_head.s  # the known rows only
    kd = _kl(f_o @ w.T, f_n @ w.T, 2.0).mean()
    ce = F.cross_entropy(t.head(f_n, labels), labels)
    assert stats["compat"].item() == pytest.approx(kd.item(), rel=1e-5)
    assert loss.item() == pytest.approx((ce + 0.5 * kd).item(), rel=1e-5)
    with torch.no_grad():  # the unknown class's row takes no part
        t.old_head.weight[3] = torch.randn(4) * 10
    assert t(x, labels, f_o)[1]["compat"].item() == pytest.approx(kd.item(), rel=1e-5)
    assert t(f_o.clone(), labels, f_o)[1]["compat"].item() == pytest.approx(0.0, abs=1e-6)
    loss.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("distance", ["kl", "logits"])
def test_focal_distillation_weights_the_old_models_correct_samples(distance):
    m = make_method(
        name="focal-distillation", old_model="o", alpha=1.0, beta=5.0, temperature=1.5, distance=distance
    )
    t = _trainee(m)
    w = F.normalize(t.old_head.weight.detach(), dim=1)
    # old features: the first two sit on their class's row (old model right), the third on
    # another class's row (wrong), the fourth belongs to a class the old head does not know
    f_o = torch.stack([w[0], w[1], w[0], w[2]])
    labels = torch.tensor([0, 1, 2, 3])
    torch.manual_seed(2)
    x = torch.randn(4, 4, requires_grad=True)
    _, stats = t(x, labels, f_o)
    s = t.old_head.s
    student, teacher = F.normalize(x, dim=1) @ w[:3].T * s, f_o @ w[:3].T * s
    d = _kl(teacher, student, 1.5) if distance == "kl" else (student - teacher).pow(2).mean(1)
    weights = torch.tensor([6.0, 6.0, 1.0, 1.0])
    assert stats["compat"].item() == pytest.approx((weights * d).mean().item(), rel=1e-5)
    assert stats["old_correct"].item() == pytest.approx(0.5)


def _contrastive_by_hand(f_n, labels, old, new=None, tau=0.1):
    """The loss written as the loops of its formula."""
    out = []
    for i in range(len(f_n)):
        negs = [old[j] for j in range(len(old)) if labels[j] != labels[i]]
        if new is not None:
            negs += [new[j] for j in range(len(new)) if labels[j] != labels[i]]
        terms = []
        for p in range(len(old)):
            if labels[p] != labels[i]:
                continue
            sp = torch.exp(f_n[i] @ old[p] / tau)
            sn = sum((torch.exp(f_n[i] @ n / tau) for n in negs), torch.tensor(0.0))
            terms.append(-torch.log(sp / (sp + sn)))
        out.append(torch.stack(terms).mean())
    return torch.stack(out)


@pytest.mark.parametrize("new_negatives", [False, True])
def test_contrastive_loss_matches_its_formula(new_negatives):
    torch.manual_seed(3)
    f_n = F.normalize(torch.randn(6, 5, dtype=torch.float64), dim=1)
    old = F.normalize(torch.randn(6, 5, dtype=torch.float64), dim=1)
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    new = f_n if new_negatives else None
    got = old_contrastive_loss(f_n, labels, old, labels, 0.1, new)
    assert torch.allclose(got, _contrastive_by_hand(f_n, labels, old, new), rtol=1e-6)
    # pulled onto its class's old features and away from the rest: the loss is lower
    aligned = F.normalize(old + 0.01 * torch.randn_like(old), dim=1)
    assert old_contrastive_loss(aligned, labels, old, labels, 0.1, new).mean() < got.mean()


def test_contrastive_without_negatives_is_zero_with_finite_gradient():
    x = torch.randn(4, 3, requires_grad=True)
    f_n = F.normalize(x, dim=1)
    old = F.normalize(torch.randn(4, 3), dim=1)
    labels = torch.zeros(4, dtype=torch.long)  # one class: nothing to push away from
    loss = old_contrastive_loss(f_n, labels, old, labels, 0.05, f_n.detach()).mean()
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-6) and torch.isfinite(x.grad).all()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, f_n, old, labels, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        n = len(f_n) // world
        mine = slice(rank * n, (rank + 1) * n)
        old_all, labels_all, new_all = gather_batches(old[mine], labels[mine], f_n[mine])
        out[rank] = old_contrastive_loss(f_n[mine], labels[mine], old_all, labels_all, 0.1, new_all)
    finally:
        dist.destroy_process_group()


def test_contrastive_negatives_are_gathered_across_workers():
    """Two gloo processes, each with half of a batch, compute what one process computes on the
    whole batch: every worker contrasts against the global batch."""
    torch.manual_seed(4)
    f_n = F.normalize(torch.randn(8, 5), dim=1)
    old = F.normalize(torch.randn(8, 5), dim=1)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])  # each half holds one sample of every class
    whole = old_contrastive_loss(f_n, labels, old, labels, 0.1, f_n)
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(2, _free_port(), f_n, old, labels, out), nprocs=2, join=True)
    assert torch.allclose(torch.cat([out[0], out[1]]), whole, atol=1e-6)
    # the halves alone would not see the other half's negatives
    alone = old_contrastive_loss(f_n[:4], labels[:4], old[:4], labels[:4], 0.1, f_n[:4])
    assert not torch.allclose(alone, whole[:4], atol=1e-3)


@pytest.mark.slow
def test_compatibility_losses_train_on_ray_train(ray_local, tmp_path, digits):  # noqa: F811
    """Each method against an old model that was never trained (its features and classifier are
    a fixed random network, which is all the losses need; a training for it would add minutes)."""
    root = str(tmp_path)
    torch.manual_seed(0)
    old = {"model": str(tmp_path / "old.pt")}
    save_embedding_model(old["model"], EmbeddingModel("small", 32, 1), MarginHead(32, 10), {"id": "old"})
    for method in ("lwf", "focal-distillation", "contrastive"):
        out = run_training(
            config(
                method, root, digits, optim={"epochs": 1}, method={"name": method, "old_model": old["model"]}
            ),
            progress=False,
        )
        card = load_artifact(out["model"]).card
        assert card.method == method and card.old_model["uri"] == old["model"]
        m = out["metrics"]
        assert m["compat"] > 0 and torch.isfinite(torch.tensor(m["loss"])), (method, m)
        if method == "contrastive":  # 2 workers x 32: negatives come from the global batch of 64
            assert m["negatives"] > 32, m
        if method == "focal-distillation":
            assert 0.0 <= m["old_correct"] <= 1.0, m
