"""Typed model cards: what an artefact says about itself, validated when the artefact loads, and
the one compatibility check that every stage (train, embed, evaluate, refresh, backfill) uses.

Cards are pydantic models. Unknown keys are kept (``extra="allow"``: training writes metrics,
history and its config there), but every key a stage relies on is typed and checked, so a broken
card fails at load naming the artefact and the field, not deep inside a job.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "Preprocessing",
    "EmbeddingCard",
    "UpgradeCard",
    "CardError",
    "parse_card",
    "check_compatible",
]


class CardError(ValueError):
    """A card that does not validate, or artefacts that do not fit together."""


class _Card(BaseModel):
    model_config = ConfigDict(extra="allow", validate_assignment=True)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=False)


class Preprocessing(BaseModel):
    """How decoded images (floats in [0, 1], channels first) become the model's input:
    ``(x - mean) / std`` per channel (one value applies to every channel). dmu-ray's own models
    use 0.5 / 0.5."""

    model_config = ConfigDict(extra="forbid")

    mean: list[float] = Field(default_factory=lambda: [0.5], min_length=1)
    std: list[float] = Field(default_factory=lambda: [0.5], min_length=1)
    size: int | None = Field(
        default=None, ge=8, description="input side in pixels; None: the data set's image size"
    )

    @model_validator(mode="after")
    def _positive_std(self) -> Preprocessing:
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")
        return self

    def fits(self, channels: int) -> bool:
        return all(len(v) in (1, channels) for v in (self.mean, self.std))


class EmbeddingCard(_Card):
    """An embedding model (and its classifier when it has one). ``source`` says where the network
    comes from (:mod:`dmu_ray.models.sources`): ``dmu`` (trained here: ``backbone``), or an
    imported ``torchvision``/``timm`` ``architecture`` or ``torchscript`` file."""

    id: str = "model"
    source: str = "dmu"
    backbone: str | None = None
    architecture: str | None = None
    dim: int = Field(ge=1)
    in_channels: int = Field(ge=1)
    num_classes: int | None = Field(default=None, ge=1)
    head: str | None = None
    s: float = Field(default=30.0, gt=0)
    m: float = Field(default=0.3, ge=0)
    model_version: str | None = None
    imported_from: str | None = None
    preprocessing: Preprocessing = Field(default_factory=Preprocessing)
    trained_classes: list[bool] | None = None
    classifier_classes: list[bool] | None = Field(
        default=None, description="classes whose classifier rows are meaningful (None: all)"
    )
    prototype_classes: list[bool] | None = Field(
        default=None, description="classifier rows that are old-feature class means (built here)"
    )
    derived_from: str | None = Field(default=None, description="ident of the artefact this was built from")
    method: str | None = None
    epochs: int | None = None
    old_model: dict[str, Any] | None = None
    config: dict[str, Any] | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    history: list[dict[str, Any]] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> EmbeddingCard:
        if self.source == "dmu" and (self.backbone is None or self.num_classes is None or self.head is None):
            raise ValueError("a dmu-ray model needs backbone, num_classes and head")
        for name in ("trained_classes", "classifier_classes", "prototype_classes"):
            v = getattr(self, name)
            if v is not None and len(v) != self.num_classes:
                raise ValueError(f"{name} has {len(v)} entries for {self.num_classes} classes")
        if not self.preprocessing.fits(self.in_channels):
            raise ValueError(
                f"preprocessing mean/std must have 1 value or one per input channel ({self.in_channels}); "
                f"got mean {self.preprocessing.mean}, std {self.preprocessing.std}"
            )
        return self

    @property
    def version(self) -> str:
        return self.model_version or str(self.epochs if self.epochs is not None else 1)

    @property
    def has_classifier(self) -> bool:
        return self.num_classes is not None and self.head is not None


class UpgradeCard(_Card):
    """An upgrade module psi (old space -> new space), optionally with an uncertainty branch."""

    id: str = "upgrade"
    form: Literal["mlp", "linear"] = Field(
        default="mlp", description="mlp: the residual UpgradeModule; linear: y = x W + b (a fitted adapter)"
    )
    direction: Literal["gallery", "query"] = Field(
        default="gallery",
        description="gallery: old vectors -> the new space (refresh, backfill); query: new-model queries -> "
        "the old space (the old gallery and its index stay)",
    )
    fit: dict[str, Any] | None = Field(
        default=None, description="how an adapter was fitted: kind, pairs used and held out, metrics"
    )
    in_dim: int = Field(ge=1)
    out_dim: int = Field(ge=1)
    width: int = Field(ge=1)
    depth: int = Field(ge=1)
    uncertainty: bool = False
    uncertainty_from: Literal["trunk", "input"] = Field(
        default="input", description="what the uncertainty head reads (cards before it: the input)"
    )
    skip_linear: bool = Field(
        default=False, description="the skip path is a Linear even for equal dims (an mlp adapter's)"
    )
    rank: int | None = Field(
        default=None, ge=1, description="a linear adapter stored as two factors of this rank (affine rank: r)"
    )
    new_model_id: str | None = None
    new_model_version: str | None = None
    new_model: dict[str, Any] | None = Field(
        default=None, description="{uri, id}: the exact new model (ident id@sha12) whose space psi maps to"
    )
    method: str | None = None
    old_model: dict[str, Any] | None = Field(
        default=None, description="{uri, id}: the old model (ident id@sha12) whose space psi maps from"
    )


CARDS: dict[str, type[_Card]] = {"embedding_model": EmbeddingCard, "upgrade_module": UpgradeCard}


def parse_card(kind: str, card: dict[str, Any], where: str) -> EmbeddingCard | UpgradeCard:
    """The typed card of an artefact of ``kind``; errors name ``where`` and the field."""
    cls = CARDS.get(kind)
    if cls is None:
        raise CardError(f"{where}: unknown artefact kind {kind!r} (expected one of {sorted(CARDS)})")
    try:
        return cls.model_validate(card)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'card'}: {e['msg']}" for e in err.errors())
        raise CardError(f"{where}: its card does not validate ({problems})") from None


def check_compatible(
    *,
    old: EmbeddingCard | None = None,
    new: EmbeddingCard | None = None,
    psi: UpgradeCard | None = None,
    gallery_dim: int | None = None,
    gallery_role: str = "old",
    channels: int | None = None,
    num_classes: int | None = None,
    names: dict[str, str] | None = None,
) -> None:
    """Raise :class:`CardError` unless the given pieces fit together: psi maps the old model's dim
    to the new model's (and was trained towards that new model, when its card says so); a gallery
    of ``gallery_role`` (``old``: in the old/psi-input space; ``new``: in the new/psi-output
    space) has the right dim; the models take ``channels``-channel images and know
    ``num_classes`` classes. ``names`` maps a role to how to call it in messages (a config field
    or a URI)."""
    n = {"old": "the old model", "new": "the new model", "psi": "the upgrade module", **(names or {})}
    if old is not None and psi is not None and psi.in_dim != old.dim:
        raise CardError(f"{n['psi']} takes {psi.in_dim}-d input but {n['old']} embeds in {old.dim} dims")
    if new is not None and psi is not None:
        if psi.out_dim != new.dim:
            raise CardError(
                f"{n['psi']} outputs {psi.out_dim}-d vectors but {n['new']} embeds in {new.dim} dims"
            )
        if psi.new_model_id is not None and psi.new_model_id != new.id:
            raise CardError(
                f"{n['psi']} was trained towards model {psi.new_model_id!r}, but {n['new']} is {new.id!r}: "
                "upgraded and new vectors would live in different spaces"
            )
    if gallery_dim is not None:
        want = None
        if gallery_role == "old":
            want = psi.in_dim if psi is not None else (old.dim if old is not None else None)
        else:
            want = psi.out_dim if psi is not None else (new.dim if new is not None else None)
        if want is not None and gallery_dim != want:
            holder = n["psi"] if psi is not None else n[gallery_role]
            raise CardError(
                f"the gallery holds {gallery_dim}-d vectors but {holder} "
                f"{'takes' if gallery_role == 'old' and psi is not None else 'works in'} {want}-d"
            )
    for role, card in (("old", old), ("new", new)):
        if card is None:
            continue
        if channels is not None and card.in_channels != channels:
            raise CardError(f"{n[role]} takes {card.in_channels}-channel images, the images have {channels}")
        if num_classes is not None and card.num_classes is not None and card.num_classes != num_classes:
            raise CardError(f"{n[role]} has {card.num_classes} classes, the data {num_classes}")


def check_adapter_source(card: UpgradeCard, space: str, where: str, what: str) -> None:
    """Raise :class:`CardError` when the module records the space it was fitted from
    (``old_model.id``) and ``what`` (of ``space``) is of another: an adapter fitted on one
    model's vectors maps no other model's."""
    from dmu_ray.lineage import same_space

    fitted = (card.old_model or {}).get("id")
    if fitted and not same_space(str(fitted), space):
        raise CardError(
            f"{where} maps vectors of {fitted} (what it was fitted on), but {what} is of {space}; fit an "
            "adapter on that model's vectors"
        )


def refuse_query_adapter(card: UpgradeCard, where: str) -> None:
    """Raise :class:`CardError` for a query-side adapter (new-model queries -> the old space) given
    where a gallery-side module is needed (old vectors -> the new space)."""
    if card.direction == "query":
        raise CardError(
            f"{where} is a query-side adapter (it maps new-model queries into the old space, "
            f"{card.in_dim}-d -> {card.out_dim}-d); refreshing a gallery needs a gallery-side one "
            "(direction: gallery): fit one, or map queries with this one and keep the old gallery"
        )
