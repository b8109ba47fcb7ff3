"""FastFill's uncertainty loss and backfill orders, UniBCT's prototype refinement, on hand-made data."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dmu_ray.methods.fastfill import (
    BackfillScorer,
    curve_area,
    fastfill_loss,
    select_top,
    uncertainty_loss,
)
from dmu_ray.methods.prototypes import knn_graph, refine_prototypes
from dmu_ray.methods.registry import make_method
from dmu_ray.models.embedding import EmbeddingModel
from dmu_ray.models.heads import MarginHead
from dmu_ray.models.upgrade import CPU_COMPUTE_ROWS, UpgradeModule, in_row_slices
from dmu_ray.train.loop import Trainee


def test_uncertainty_loss_learns_the_log_of_each_samples_loss():
    per_sample = torch.tensor([0.01, 0.1, 1.0, 4.0])
    s = torch.zeros(4, requires_grad=True)
    opt = torch.optim.SGD([s], lr=0.05)
    for _ in range(3000):
        opt.zero_grad()
        uncertainty_loss(per_sample, s).backward()
        opt.step()
    assert torch.allclose(s.detach(), per_sample.log(), atol=0.05)


def test_fastfill_transformation_is_most_uncertain_where_it_cannot_be_right():
    """The new feature is a fixed rotation of the old one (learnable) where the old feature's first
    coordinate is <= 0, and a random vector elsewhere. On held-out samples, psi must have learnt the
    rotation and rank the unlearnable half as the more uncertain."""
    torch.manual_seed(0)
    d = 16
    rot = torch.linalg.qr(torch.randn(d, d))[0]

    def make(n):
        f_o = F.normalize(torch.randn(n, d), dim=1)
        noisy = f_o[:, 0] > 0
        return f_o, torch.where(noisy[:, None], F.normalize(torch.randn(n, d), dim=1), f_o @ rot), noisy

    f_o, f_n, _ = make(2048)
    t_o, t_n, t_noisy = make(1000)
    psi = UpgradeModule(d, d, 64, 2, uncertainty=True)
    head = MarginHead(d, 2)
    labels = torch.zeros(len(f_o), dtype=torch.long)
    opt = torch.optim.Adam(psi.parameters(), lr=3e-3)
    for _ in range(300):
        opt.zero_grad()
        loss, stats = fastfill_loss(psi, f_o, f_n, labels, head, ce_weight=0.0)
        loss.backward()
        opt.step()
    psi.eval()
    with torch.no_grad():
        y, log_var = psi.forward_with_uncertainty(t_o)
    cos = (F.normalize(y, dim=1) * t_n).sum(1)
    assert cos[~t_noisy].mean() > 0.9  # the learnable half is learnt
    lv = log_var.numpy()
    auc = (lv[t_noisy.numpy()][:, None] > lv[~t_noisy.numpy()][None, :]).mean()
    assert auc > 0.95, auc  # the unlearnable half ranks first for backfilling
    assert head.weight.grad is None  # the new classifier is not moved


def test_select_top_takes_the_highest_scores_and_breaks_ties_by_id_not_order():
    ids = np.arange(100, 200)
    scores = np.r_[np.linspace(0, 1, 90), np.full(10, 0.5)]
    mask = select_top(ids, scores, 0.3)
    assert mask.sum() == 30
    assert scores[mask].min() >= scores[~mask].max()
    perm = np.random.default_rng(0).permutation(100)
    again = select_top(ids[perm], scores[perm], 0.3)
    assert set(ids[perm][again]) == set(ids[mask])
    assert select_top(ids, scores, 0.0).sum() == 0 and select_top(ids, scores, 1.0).all()
    with pytest.raises(ValueError, match="fraction"):
        select_top(ids, scores, 1.5)


def test_backfill_scorer_policies():
    torch.manual_seed(0)
    old_head = MarginHead(3, 3, s=10.0)
    with torch.no_grad():
        old_head.weight.copy_(torch.eye(3))
    # sample 0 sits on a class axis (the old model is sure), sample 1 between all three (unsure)
    mat = np.array([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]], dtype=np.float32) / np.array(
        [[1.0], [3**0.5]], np.float32
    )
    ids = np.array([7, 8])
    psi = UpgradeModule(3, 3, 8, 1, uncertainty=True)
    y, s = BackfillScorer(["uncertainty", "random", "old-discriminativeness"], psi, old_head, seed=3)(
        ids, mat
    )
    assert np.allclose(np.linalg.norm(y, axis=1), 1.0, atol=1e-5)
    assert s["old-discriminativeness"][1] > s["old-discriminativeness"][0]
    _, s2 = BackfillScorer(["random"], psi, seed=3)(ids, mat)
    assert np.array_equal(s["random"], s2["random"])  # a hash of the id: same on every worker
    with pytest.raises(ValueError, match="uncertainty branch|trained with uncertainty"):
        BackfillScorer(["uncertainty"], UpgradeModule(3, 3, 8, 1))
    with pytest.raises(ValueError, match="old model's classifier"):
        BackfillScorer(["old-discriminativeness"], psi)


def test_curve_area():
    assert curve_area([0, 0.5, 1], [0, 1, 1]) == pytest.approx(0.75)
    assert curve_area([0, 1], [0.4, 0.4]) == pytest.approx(0.4)


def test_knn_graph_leaves_each_point_out_even_with_duplicates():
    x = np.array([[1, 0], [1, 0], [0, 1], [0.6, 0.8]], dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids, sims = knn_graph(x, 2)
    assert ids.shape == (4, 2) and all(i not in row for i, row in enumerate(ids))
    assert ids[0, 0] == 1 and ids[1, 0] == 0 and sims[0, 0] == pytest.approx(1.0)


def test_refined_prototypes_resist_features_lost_among_other_classes():
    rng = np.random.default_rng(0)
    d = 16
    e = np.eye(d)
    a = e[0] + 0.2 * rng.standard_normal((80, d))
    a_lost = e[1] + 0.2 * rng.standard_normal((30, d))  # class-0 images the old model put among class 1
    b = e[1] + 0.2 * rng.standard_normal((100, d))
    feats = np.vstack([a, a_lost, b]).astype(np.float32)
    labels = np.r_[np.zeros(110, int), np.ones(100, int)]
    refined, present = refine_prototypes(feats, labels, 3, k=10)
    plain, _ = refine_prototypes(feats, labels, 3, alpha=0.0, min_weight=1.0)
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    means = np.stack([unit[labels == c].mean(0) for c in (0, 1)])
    assert np.allclose(plain[:2], means / np.linalg.norm(means, axis=1, keepdims=True), atol=1e-5)
    assert np.allclose(refine_prototypes(feats, labels, 3, refine=False)[0], plain, atol=1e-5)
    assert present.tolist() == [True, True, False] and not refined[2].any()
    assert refined[0] @ e[0] > plain[0] @ e[0] + 0.03  # pulled back to where class 0 really is
    assert refined[1] @ e[1] > 0.98
    with pytest.raises(ValueError, match="labels must be in"):
        refine_prototypes(feats, labels, 1)


def test_trainee_fastfill_trains_only_the_transformation():
    torch.manual_seed(0)
    x, y = torch.randn(8, 1, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    new_model, new_head = EmbeddingModel("small", 8, 1), MarginHead(8, 3)
    before = {k: v.clone() for k, v in new_model.state_dict().items()}
    psi = UpgradeModule(4, 8, 16, 1, uncertainty=True)
    t = Trainee(
        new_model,
        new_head,
        make_method(name="fastfill", old_model="o", new_model="n"),
        psi=psi,
        frozen_model=True,
    )
    t.train()
    assert not new_model.training and psi.training  # BatchNorm statistics of the frozen model stay put
    opt = torch.optim.SGD([p for p in t.parameters() if p.requires_grad], lr=0.1)
    loss, stats = t(x, y, F.normalize(torch.randn(8, 4), dim=1))
    assert {"align", "transform_ce", "log_var", "psi_cos"} <= set(stats)
    loss.backward()
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in new_model.state_dict().items())
    assert psi.log_var.weight.grad is not None


def test_trainee_unibct_pulls_new_features_to_the_prototypes_of_present_classes():
    torch.manual_seed(0)
    x, y = torch.randn(6, 1, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2])
    protos = MarginHead(8, 3)
    present = torch.tensor([True, True, False])
    t = Trainee(
        EmbeddingModel("small", 8, 1),
        MarginHead(8, 3),
        make_method(name="unibct", old_model="o"),
        old_head=protos,
        old_classes=present,
    )
    loss, stats = t(x, y)  # no old features needed during training
    assert set(stats) == {"ce", "compat", "constrained"} and torch.isfinite(loss)
    loss.backward()
    assert protos.weight.grad is None


def test_uncertainty_reads_the_trunk_and_earlier_modules_still_load(tmp_path):
    """The uncertainty head sits on the transformation's last hidden layer (its loss trains the
    trunk too); a module exported with the earlier separate branch on the input still loads."""
    from dmu_ray.models.artifact import build_upgrade_module, load_artifact, save_artifact

    torch.manual_seed(0)
    psi = UpgradeModule(8, 8, 16, 2, uncertainty=True)
    assert psi.log_var.in_features == 16 and psi.config()["uncertainty_from"] == "trunk"
    _, log_var = psi.forward_with_uncertainty(F.normalize(torch.randn(4, 8), dim=1))
    log_var.sum().backward()
    assert psi.mlp[0].weight.grad.abs().sum() > 0  # the trunk learns from the uncertainty loss
    before = UpgradeModule(8, 8, 16, 2, uncertainty=True, uncertainty_from="input")
    card = {k: v for k, v in before.config().items() if k != "uncertainty_from"}  # an earlier card
    save_artifact(str(tmp_path / "old_ff.pt"), "upgrade_module", before.state_dict(), card)
    art = load_artifact(str(tmp_path / "old_ff.pt"))
    assert art.card.uncertainty_from == "input"
    loaded = build_upgrade_module(art)
    x = F.normalize(torch.randn(3, 8), dim=1)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.forward_with_uncertainty(x)[1], before.eval().forward_with_uncertainty(x)[1]
        )


def test_graph_prototypes_weigh_images_central_in_the_new_space():
    """One class: four images the new model places together and one it places apart. The row-
    normalised propagation weighs the old features of the four more; a column-normalised one
    would weigh all alike (the plain mean)."""
    from dmu_ray.methods.prototypes import _central_weights, graph_prototypes

    new = F.normalize(
        torch.tensor([[1.0, 0.1], [1.0, 0.0], [1.0, -0.1], [0.95, 0.05], [0.1, 1.0]]), dim=1
    ).numpy()
    old = np.array([[1.0, 0.0], [1.0, 0.05], [1.0, -0.05], [0.98, 0.0], [0.0, 1.0]], np.float32)
    labels = np.zeros(5, np.int64)
    w = _central_weights(new.astype(np.float64), 0.5, None)
    assert w[:4].min() > w[4]
    protos, present = graph_prototypes(old, new, labels, 2, lam=0.5)
    unit = old / np.linalg.norm(old, axis=1, keepdims=True)
    plain = unit.mean(0) / np.linalg.norm(unit.mean(0))
    assert present.tolist() == [True, False] and not protos[1].any()
    assert protos[0, 1] < plain[1]  # pulled away from the outlier's old feature
    # the column-normalised variant gives every image the same weight: the plain mean
    a = np.clip(new @ new.T, 0, None).astype(np.float64)
    np.fill_diagonal(a, 0)
    p_col = a / a.sum(0, keepdims=True)
    col_w = np.linalg.inv(np.eye(5) - 0.5 * p_col).sum(0)
    np.testing.assert_allclose(col_w, col_w[0])
    # lambda 0: the plain mean
    np.testing.assert_allclose(graph_prototypes(old, new, labels, 2, lam=0.0)[0][0], plain, atol=1e-6)


def test_unibct_rebuilds_its_prototypes_from_the_last_epochs_new_features(tmp_path):
    """Single process: the epoch before a rebuild records (id, label, new feature) of every batch;
    the next epoch starts with the graph prototypes of those and the prepare pass's old features."""
    import io

    from dmu_ray.methods.prototypes import graph_prototypes

    torch.manual_seed(0)
    ids = np.arange(12)
    labels = np.array([0, 1, 2] * 4)
    old_feats = F.normalize(torch.randn(12, 8), dim=1).numpy()
    buf = io.BytesIO()
    np.savez(buf, ids=ids[::-1], feats=old_feats[::-1])  # any order
    (tmp_path / "old.npz").write_bytes(buf.getvalue())
    m = make_method(name="unibct", old_model="o", refine_epochs=[2])
    assert [m.rebuilds_at(e) for e in range(4)] == [False, False, True, False]
    t = Trainee(
        EmbeddingModel("small", 8, 1),
        MarginHead(8, 3),
        m,
        old_head=MarginHead(8, 3),
        old_classes=torch.ones(3),
    )
    t.register_buffer("proto_rebuilds", torch.zeros((), dtype=torch.long))
    t.unibct = {"old_features_uri": str(tmp_path / "old.npz"), "storage": None, "seen": None}
    before = t.old_head.weight.detach().clone()
    m.on_epoch_start(t, 0)
    assert t.unibct["seen"] is None  # epoch 1 is not followed by a rebuild... epoch 0 neither
    m.on_epoch_start(t, 1)
    assert t.unibct["seen"] == []
    x = torch.randn(12, 1, 16, 16)
    t.eval()  # BatchNorm in eval: the recorded features are what model(x) gives now
    for lo in (0, 6):
        t(x[lo : lo + 6], torch.from_numpy(labels[lo : lo + 6]), None, torch.from_numpy(ids[lo : lo + 6]))
    with torch.no_grad():
        new = t.model(x).numpy()
    m.on_epoch_start(t, 2)
    want, _ = graph_prototypes(old_feats, new, labels, 3, lam=m.refine_lambda)
    np.testing.assert_allclose(t.old_head.weight.detach().numpy(), want, atol=1e-5)
    assert not torch.equal(t.old_head.weight, before) and int(t.proto_rebuilds) == 1
    assert t.unibct["seen"] is None


def test_backfill_scorer_scores_a_large_batch_in_slices_as_a_whole():
    """More rows than one call of psi takes on a CPU (slices, the last one short): the vectors and
    every policy's scores are those of psi and the old head over the whole batch at once."""
    torch.manual_seed(1)
    n = 2 * CPU_COMPUTE_ROWS + 123
    psi = UpgradeModule(8, 6, 16, 1, uncertainty=True).eval()
    old_head = MarginHead(8, 5, s=10.0).eval()
    mat = torch.randn(n, 8).numpy()
    y, s = BackfillScorer(["uncertainty", "old-discriminativeness"], psi, old_head)(np.arange(n), mat)
    with torch.no_grad():
        ref_y, ref_s = psi.forward_with_uncertainty(torch.from_numpy(mat))
        ref_d = 1.0 - torch.softmax(old_head(torch.from_numpy(mat)), dim=1).max(1).values
    assert y.shape == (n, 6) and s["uncertainty"].shape == s["old-discriminativeness"].shape == (n,)
    np.testing.assert_allclose(y, F.normalize(ref_y, dim=1).numpy(), atol=1e-5)
    np.testing.assert_allclose(s["uncertainty"], ref_s.numpy(), atol=1e-5)
    np.testing.assert_allclose(s["old-discriminativeness"], ref_d.numpy(), atol=1e-5)


def test_in_row_slices_writes_each_slice_into_one_output():
    x = torch.arange(30, dtype=torch.float32).reshape(10, 3)

    def fn(rows):
        return rows * 2, rows.sum(1).to(torch.float64)

    for n_rows in (None, 1, 3, 4, 10, 50):
        a, b = in_row_slices(fn, x, n_rows)
        assert torch.equal(a, x * 2) and torch.equal(b, x.sum(1).double())
    assert torch.equal(in_row_slices(lambda r: r + 1, x, 4), x + 1)  # one tensor in, one out
    assert in_row_slices(lambda r: r[:, :2], x[:0], 4).shape == (0, 2)
