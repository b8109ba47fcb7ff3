"""``unibct`` (seed 004, Zhang et al., IJCAI 2022): the compatibility target is not the old
classifier but class prototypes of old features (a Ray Data pass of the old model over this run's
training images before training), so classes the old model never saw get targets too; the old
model does not run during training.

``refinement: graph`` (default, the paper's structural prototype refinement): training starts from
plain class means; at the start of each epoch in ``refine_epochs`` the prototypes are rebuilt from
the new model's features of the previous epoch's training images (gathered from every worker):
within each class the old features are weighted by the closed-form propagation over the new
features' graph (:func:`~dmu_ray.methods.prototypes.graph_prototypes`). ``vote`` is the earlier
neighbour-vote heuristic over the old features (computed once), ``none`` plain class means.

The prototypes are scored with the old classifier's head (kind, scale, margin); an imported old
model without classifier gets a cosine softmax without margin whose scale is fitted to the old
features (:func:`~dmu_ray.methods.old_classifier.calibrated_scale`, as for BCT and DMU)."""

from __future__ import annotations

import sys
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from dmu_ray.methods.base import CompatibilityMethod, register_method

OLD_FEATURES = "unibct_old_features.npz"


@register_method
class UniBCT(CompatibilityMethod):
    """Compatibility against old-feature prototypes refined with the new model's structure."""

    name: Literal["unibct"] = "unibct"
    refinement: Literal["graph", "vote", "none"] = Field(
        default="graph", description="graph (published), vote (earlier heuristic) or none (plain means)"
    )
    refine_lambda: float = Field(default=0.5, ge=0, lt=1, description="graph: propagation lambda")
    refine_k: int | None = Field(
        default=None, ge=1, description="graph: strongest affinities kept per image (None: all in the class)"
    )
    refine_epochs: list[int] | None = Field(
        default=None,
        description="graph: epochs at whose start the prototypes are rebuilt (default: every epoch after the first)",
    )
    prototype_k: int = Field(default=10, ge=1, description="vote: neighbours in the old-feature graph")
    prototype_alpha: float = Field(
        default=0.5, ge=0, le=1, description="vote: pull of same-class neighbours per refinement step"
    )
    prototype_iters: int = Field(default=2, ge=0, description="vote: refinement steps")
    old_features = False
    #: fields of configs saved before ``refinement`` existed (translated by the validator below)
    legacy_fields: ClassVar[frozenset[str]] = frozenset({"prototype_refine"})

    @model_validator(mode="before")
    @classmethod
    def _legacy(cls, data: Any) -> Any:
        if isinstance(data, dict) and "prototype_refine" in data:
            data = dict(data)
            refine = data.pop("prototype_refine")
            data.setdefault("refinement", "vote" if refine else "none")
        return data

    def rebuilds_at(self, epoch: int) -> bool:
        if self.refinement != "graph" or epoch < 1:
            return False
        return self.refine_epochs is None or epoch in self.refine_epochs

    def prepare(self, plan: Any, progress: bool = True) -> dict[str, Any]:
        """The old model embeds this run's training images: their class means (or vote-refined
        prototypes) start training; for ``graph`` the features are kept in the run folder."""
        import io

        import numpy as np

        from dmu_ray.data.splits import split_mask
        from dmu_ray.methods.old_classifier import calibrated_scale
        from dmu_ray.methods.prototypes import refine_prototypes
        from dmu_ray.models.artifact import EMBEDDING_MODEL, load_artifact
        from dmu_ray.models.inference import embed_images
        from dmu_ray.storage import resolve, write_bytes_atomic

        cfg = plan.cfg
        d = cfg.data
        ids, labels, feats = embed_images(
            plan.train_loc.uri,
            self.old_model,
            storage=cfg.storage,
            pool=cfg.embed_pool,
            pool_field="embed_pool",
        )
        mask = split_mask(d.split, d.role, ids, labels, d.old_fraction, d.split_seed)
        protos, present = refine_prototypes(
            feats[mask],
            labels[mask],
            plan.data.num_classes,
            k=self.prototype_k,
            alpha=self.prototype_alpha,
            iters=self.prototype_iters,
            refine=self.refinement == "vote",
        )
        out = {"prototypes": protos.tolist(), "prototype_present": present.tolist()}
        fitted = ""
        if not load_artifact(self.old_model, cfg.storage, kind=EMBEDDING_MODEL).card.has_classifier:
            # no old head to take kind, scale and margin from: a cosine softmax without margin,
            # scaled to classify the old features best, as BCT's and DMU's prototype classifier
            # (dmu_ray.methods.old_classifier); the new head's margin would ask for more than
            # the old features give
            rows = np.flatnonzero(present)
            index = np.full(plan.data.num_classes, -1)
            index[rows] = np.arange(len(rows))
            scale, ce, top1 = calibrated_scale(feats[mask], index[labels[mask]], protos[rows])
            out["prototype_head"] = {"kind": "softmax", "s": scale, "m": 0.0}
            fitted = f", cosine softmax scale {scale:.3g} fitted to them (cross-entropy {ce:.3f}, top-1 {top1:.0%})"
        if self.refinement == "graph":
            buf = io.BytesIO()
            np.savez(buf, ids=ids[mask], feats=feats[mask].astype(np.float32))
            loc = resolve(plan.run_uri, cfg.storage).join(OLD_FEATURES)
            write_bytes_atomic(loc, buf.getvalue())
            out["old_features"] = loc.uri
        if progress:
            print(
                f"  unibct: {int(present.sum())} class prototypes from {int(mask.sum()):,} old features "
                f"({self.refinement}){fitted}",
                file=sys.stderr,
                flush=True,
            )
        return out

    def build(self, cfg: Any, info: dict[str, Any]):
        """``info["prototypes"]`` may be absent when a checkpoint will supply them."""
        import torch

        from dmu_ray.methods.base import pinned_sha256
        from dmu_ray.methods.trainee import Trainee
        from dmu_ray.models.artifact import EMBEDDING_MODEL, build_embedding_model, load_artifact
        from dmu_ray.models.heads import MarginHead

        old_model, old_head = build_embedding_model(
            load_artifact(
                self.old_model, cfg.storage, kind=EMBEDDING_MODEL, sha256=pinned_sha256(info, self.old_model)
            )
        )
        model, head = self.fresh_model(cfg, info)
        if old_head is not None:
            kind, s, m = old_head.kind, old_head.s, old_head.m
        else:  # an imported old model without classifier: the head prepare fitted (older runs: the new one's)
            fit = info.get("prototype_head") or {"kind": head.kind, "s": head.s, "m": head.m}
            kind, s, m = fit["kind"], fit["s"], fit["m"]
        proto_head = MarginHead(old_model.dim, info["num_classes"], kind, s, m)
        present = torch.zeros(info["num_classes"], dtype=torch.bool)
        if info.get("prototypes") is not None:
            with torch.no_grad():
                proto_head.weight.copy_(torch.tensor(info["prototypes"], dtype=torch.float32))
            present = torch.tensor(info["prototype_present"], dtype=torch.bool)
        t = Trainee(model, head, self, old_head=proto_head, old_classes=present)
        t.register_buffer("proto_rebuilds", torch.zeros((), dtype=torch.long))
        t.unibct = {"old_features_uri": info.get("old_features"), "storage": cfg.storage, "seen": None}
        return t, None

    def on_epoch_start(self, t, epoch: int) -> None:
        """Rebuild the prototypes from the last epoch's new features when this epoch is one of
        ``refine_epochs``; record this epoch's features when the next one is."""
        state = t.unibct
        if self.rebuilds_at(epoch):
            if state["seen"]:
                self._rebuild(t, state)
            else:  # resumed at this epoch: the checkpoint's prototypes stay
                print(f"  unibct: no features of epoch {epoch - 1} here; prototypes kept", file=sys.stderr)
        state["seen"] = [] if self.rebuilds_at(epoch + 1) else None

    def _rebuild(self, t, state: dict[str, Any]) -> None:
        import numpy as np
        import torch
        import torch.distributed as dist

        from dmu_ray.methods.prototypes import graph_prototypes

        local = tuple(np.concatenate([s[i] for s in state["seen"]]) for i in range(3))
        parts = [local]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, local)
        ids, labels, new = (np.concatenate([p[i] for p in parts]) for i in range(3))
        ids, first = np.unique(ids, return_index=True)  # an image seen twice counts once
        labels, new = labels[first], new[first]
        old_ids, old_feats = self._old_features(t, state)
        pos = np.clip(np.searchsorted(old_ids, ids), 0, len(old_ids) - 1)
        have = old_ids[pos] == ids
        protos, present = graph_prototypes(
            old_feats[pos[have]],
            new[have],
            labels[have],
            t.old_head.num_classes,
            lam=self.refine_lambda,
            k=self.refine_k,
        )
        with torch.no_grad():
            keep = torch.from_numpy(present).to(t.old_head.weight.device)
            rows = torch.from_numpy(protos).to(t.old_head.weight)
            t.old_head.weight[keep] = rows[keep]
            t.proto_rebuilds += 1
        state["seen"] = None

    @staticmethod
    def _old_features(t, state: dict[str, Any]):
        """The prepare pass's old features (sorted by id), read once per worker."""
        if "old" not in state:
            import io

            import numpy as np

            from dmu_ray.storage import read_bytes, resolve

            data = np.load(io.BytesIO(read_bytes(resolve(state["old_features_uri"], state["storage"]))))
            order = np.argsort(data["ids"], kind="stable")
            state["old"] = (data["ids"][order], data["feats"][order])
        return state["old"]

    def loss(self, t, x, labels, f_o):
        import torch

        from dmu_ray.methods.losses import compatibility_loss, constraint_stats, mean_one

        f_n, loss, stats = self.classify_new(t, x, labels)
        seen = getattr(t, "unibct", {}).get("seen")  # set by build (a bare Trainee has none)
        if seen is not None and t.batch_ids is not None:
            seen.append((t.batch_ids.cpu().numpy(), labels.cpu().numpy(), f_n.detach().float().cpu().numpy()))
        applies = t.old_classes[labels]
        w = mean_one(torch.ones_like(f_n[:, 0]), applies)
        compat = compatibility_loss(f_n, labels, t.old_head, w, applies)
        stats["compat"] = compat.detach()
        stats.update(constraint_stats(applies))
        if hasattr(t, "proto_rebuilds"):
            stats["proto_rebuilds"] = t.proto_rebuilds.float()
        return loss + self.compat_weight * compat, stats
