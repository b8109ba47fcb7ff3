"""What every upgrade method is: a typed config section that also knows how to train.

A method is one class in ``dmu_ray/methods/catalog/<name>.py`` (a dash of the name an underscore
in the file name), decorated with
:func:`register_method`. The class is the method's config (pydantic, unknown keys refused, its
``name`` the discriminator of ``TrainConfig.method``) and carries its behaviour:

- traits (class variables) that the driver checks before any worker starts: does it need the old
  model, the trained new model, must the new and old dims match, does the old model run on every
  batch;
- :meth:`Method.prepare`: optional driver-side work before training (UniBCT's prototypes);
- :meth:`Method.build`: the :class:`~dmu_ray.methods.trainee.Trainee` (what is trained, what is
  frozen) and the frozen old model;
- :meth:`Method.loss`: ``(trainee, images, labels, old features) -> (loss, stats)``.

The training loop calls these; nothing outside the registry tests a method's name. This module
and the catalog import torch lazily, so loading a config stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import Field, model_validator

from dmu_ray.schema import LOCATION, StrictModel

if TYPE_CHECKING:
    import torch
    from torch import nn

    from dmu_ray.methods.trainee import Trainee

__all__ = [
    "Method",
    "CompatibilityMethod",
    "OldClassifierFields",
    "UpgradeModuleFields",
    "METHODS",
    "register_method",
]

#: Registered methods by name, in registration order.
METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: add a method to :data:`METHODS` under its ``name`` literal."""
    name = cls.model_fields["name"].default
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__}: a method needs name: Literal['...'] = '...'")
    if name in METHODS and METHODS[name] is not cls:
        raise ValueError(f"method {name!r} is registered twice ({METHODS[name].__name__}, {cls.__name__})")
    METHODS[name] = cls
    return cls


#: key of the training plan's ``info`` that maps each artefact URI the workers load to the sha256
#: the driver read (:func:`pinned_sha256`)
PINS = "artifact_sha256"


def pinned_sha256(info: dict[str, Any] | None, uri: str) -> str | None:
    """The sha256 the driver recorded for ``uri`` (``info[PINS]``), which a worker's load must
    match; None when the driver pinned nothing (a direct call outside a training run)."""
    return ((info or {}).get(PINS) or {}).get(uri)


class Method(StrictModel):
    """Base of every method. Subclasses set ``name: Literal["..."] = "..."`` and override what
    differs; the defaults describe a method that trains a new model against the frozen old one."""

    name: str
    old_model: Annotated[str | None, LOCATION] = Field(
        default=None, description="URI of the old model artefact"
    )

    #: the old model artefact must be given (and is checked against the data)
    needs_old_model: ClassVar[bool] = True
    #: the frozen old model embeds every training batch (f_o reaches the loss)
    old_features: ClassVar[bool] = True
    #: new and old vectors are compared directly, so model.dim must equal the old model's
    same_dim_as_old: ClassVar[bool] = True
    #: method.new_model (a trained new model) must be given
    needs_new_model: ClassVar[bool] = False
    #: the old model's classifier takes part in the loss (an imported model may have none)
    needs_old_classifier: ClassVar[bool] = False

    @model_validator(mode="after")
    def _needs(self) -> Method:
        if self.needs_old_model and not self.old_model:
            raise ValueError(f"method {self.name!r} needs method.old_model (the old model artefact URI)")
        return self

    # ------------------------------------------------------------------------------ driver side

    def prepare(self, plan: Any, progress: bool = True) -> dict[str, Any]:
        """Driver-side work before the workers start (runs on the Ray cluster if it needs to);
        what it returns reaches :meth:`build` as part of ``info``. Default: nothing."""
        return {}

    # ------------------------------------------------------------------------------ worker side

    def build(self, cfg: Any, info: dict[str, Any]) -> tuple[Trainee, nn.Module | None]:
        """The trainee and the frozen old model (None when :attr:`old_features` is False)."""
        raise NotImplementedError

    def loss(
        self, t: Trainee, x: torch.Tensor, labels: torch.Tensor, f_o: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss of one batch and the statistics to log (detached scalars)."""
        raise NotImplementedError

    def on_epoch_start(self, t: Trainee, epoch: int) -> None:
        """Called by each worker before every epoch (e.g. to refresh a cache kept as buffers of
        the trainee, or rebuild prototypes at configured epochs). Default: nothing."""

    # -------------------------------------------------------------------------------- helpers

    @staticmethod
    def fresh_model(cfg: Any, info: dict[str, Any]):
        """A new embedding model and margin classifier as ``cfg.model`` describes, its backbone
        loaded with ``model.pretrained``/``model.weights`` when given (unless
        ``info["init_backbone"]`` is False: a checkpoint will overwrite it anyway)."""
        from dmu_ray.models.backbones import initial_backbone_state, load_backbone_weights
        from dmu_ray.models.embedding import EmbeddingModel
        from dmu_ray.models.heads import MarginHead

        model = EmbeddingModel(cfg.model.backbone, cfg.model.dim, info["channels"])
        head = MarginHead(cfg.model.dim, info["num_classes"], cfg.model.head, cfg.model.s, cfg.model.m)
        init = initial_backbone_state(cfg.model, cfg.storage) if info.get("init_backbone", True) else None
        if init is not None:
            load_backbone_weights(model.backbone, cfg.model.backbone, *init)
        return model, head

    def frozen_old(self, cfg: Any, info: dict[str, Any] | None = None):
        """``(artefact, old model, old classifier or None)``, the model frozen: the artefact at
        ``info["old_classifier"]`` when :meth:`prepare` built a classifier for it, else
        ``old_model``. Training batches are normalised for the new model (``info["mean"]``,
        ``info["std"]``; 0.5/0.5 by default) at the data set's size; an old model whose card asks
        for other preprocessing gets its input re-normalised (and resized) on the way in."""
        from dmu_ray.models.artifact import EMBEDDING_MODEL, build_embedding_model, load_artifact
        from dmu_ray.models.embedding import Renormalized

        uri = (info or {}).get("old_classifier") or self.old_model
        art = load_artifact(uri, cfg.storage, kind=EMBEDDING_MODEL, sha256=pinned_sha256(info, uri))
        old_model, old_head = build_embedding_model(art)
        old_model.requires_grad_(False)
        pre, info = art.card.preprocessing, info or {}
        batch_mean, batch_std = info.get("mean", [0.5]), info.get("std", [0.5])
        size = None if pre.size == info.get("image_size") else pre.size
        if (pre.mean, pre.std, size) != (batch_mean, batch_std, None):
            old_model = Renormalized(old_model, pre.mean, pre.std, size, batch_mean, batch_std)
        return art, old_model, old_head

    @staticmethod
    def classify_new(t: Trainee, x: torch.Tensor, labels: torch.Tensor):
        """``(f_n, loss, stats)``: the new features and the new classifier's margin loss."""
        import torch.nn.functional as F

        f_n = t.model(x)
        ce = F.cross_entropy(t.head(f_n, labels), labels)
        return f_n, ce, {"ce": ce.detach()}

    @staticmethod
    def cosine_stat(stats: dict, f_n: torch.Tensor, f_o: torch.Tensor | None) -> None:
        """Log the mean cosine between new and old features of the same images."""
        import torch
        import torch.nn.functional as F

        if f_o is not None:
            with torch.no_grad():
                stats["new_old_cos"] = (f_n * F.normalize(f_o.float(), dim=1)).sum(1).mean()


class UpgradeModuleFields(StrictModel):
    """Fields of a method that trains an upgrade module psi (old -> new space)."""

    upgrade_width: int = Field(default=512, ge=1, description="hidden width of psi")
    upgrade_depth: int = Field(default=2, ge=1, description="hidden layers of psi")
    upgrade_in_dim: int | None = Field(
        default=None, ge=1, description="psi's input dim; must equal the old model's (checked)"
    )


class OldClassifierFields(StrictModel):
    """Fields of a method that trains against the old classifier (BCT, DMU)."""

    new_classes: Literal["extend", "exclude"] = Field(
        default="extend",
        description="classes of this run the old classifier does not know: 'extend' gives them "
        "old-space rows from the old model's class-mean features (BCT's extension, as published), "
        "'exclude' leaves their samples out of the compatibility term",
    )


class CompatibilityMethod(Method):
    """A new model trained with a compatibility term against the frozen old model and its
    classifier (BCT's recipe); subclasses define the term in :meth:`loss` and may add psi.

    With :attr:`needs_old_classifier` (and :class:`OldClassifierFields`), :meth:`prepare` builds
    the classifier rows the old model lacks from class prototypes
    (:mod:`dmu_ray.methods.old_classifier`): all of them for an imported model without
    classifier, and those of classes it never saw when ``new_classes`` is ``extend`` (BCT's
    extension)."""

    compat_weight: float = Field(default=1.0, ge=0, description="lambda of the compatibility term")

    def make_psi(self, old_dim: int, new_dim: int):
        """The upgrade module trained jointly, or None (default)."""
        return None

    def prepare(self, plan: Any, progress: bool = True) -> dict[str, Any]:
        """Old-classifier rows from prototypes where needed (see the class docstring); the
        artefact is written to the run folder and reused when the run resumes."""
        if not self.needs_old_classifier:
            return {}
        import numpy as np

        from dmu_ray.data.splits import split_mask
        from dmu_ray.methods.old_classifier import (
            build_old_classifier,
            covered_classes,
            reusable_old_classifier,
        )

        cfg, old = plan.cfg, plan.old
        covered = covered_classes(old, plan.data.num_classes)
        present = np.asarray(plan.trained_classes, dtype=bool)
        if not old.card.has_classifier:
            build = present
        elif getattr(self, "new_classes", "exclude") == "extend":
            build = present & ~covered
        else:
            return {}
        if not build.any():
            return {}
        dest = f"{plan.run_uri}/old_classifier.pt"
        if reusable_old_classifier(dest, old, build, cfg.storage) is None:
            ids, labels = plan.ids, plan.labels
            d = cfg.data
            mine = split_mask(d.split, d.role, ids, labels, d.old_fraction, d.split_seed) & build[labels]
            build_old_classifier(
                old,
                plan.train_loc.uri,
                dest,
                build=build,
                only_ids=ids[mine],
                storage=cfg.storage,
                pool=cfg.embed_pool,
                pool_field="embed_pool",
                progress=progress,
            )
        return {"old_classifier": dest}

    def build(self, cfg: Any, info: dict[str, Any]):
        import torch

        from dmu_ray.methods.old_classifier import covered_classes
        from dmu_ray.methods.trainee import Trainee

        art, old_model, old_head = self.frozen_old(cfg, info)
        model, head = self.fresh_model(cfg, info)
        old_classes = torch.from_numpy(covered_classes(art, info["num_classes"]))
        psi = self.make_psi(old_model.dim, cfg.model.dim)
        return Trainee(model, head, self, psi=psi, old_head=old_head, old_classes=old_classes), old_model
