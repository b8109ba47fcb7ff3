"""Exported model artefacts: one file (``torch.save`` of state dict + JSON-able card) at a URI.

Training exports them; refresh and evaluate load them by URI (local or ``s3://``). Loading uses
``weights_only=True``: an artefact holds tensors and plain data, never pickled code. The card is
validated on save and on load (:mod:`dmu_ray.models.card`) and reaches callers typed.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Any

import torch

from dmu_ray.models.card import CardError, EmbeddingCard, UpgradeCard, parse_card
from dmu_ray.models.upgrade import UpgradeModule
from dmu_ray.settings import StorageConfig
from dmu_ray.storage import read_existing, resolve, write_bytes_atomic

FORMAT = "dmu-ray.artifact/1"
UPGRADE_MODULE = "upgrade_module"


class ArtifactError(ValueError):
    """An artefact that cannot be loaded or is not what the caller needs."""


@dataclass
class Artifact:
    """A loaded artefact: its kind, card, weights, and the sha256 of the file."""

    kind: str
    card: EmbeddingCard | UpgradeCard
    state_dict: dict[str, torch.Tensor]
    sha256: str
    uri: str

    @property
    def ident(self) -> str:
        """A stable id: the card's ``id`` when set, plus a short content hash."""
        return f"{self.card.id}@{self.sha256[:12]}"


def save_artifact(
    uri: str,
    kind: str,
    state_dict: dict[str, torch.Tensor],
    card: dict[str, Any],
    storage: StorageConfig | None = None,
) -> str:
    """Write an artefact atomically (its card validated first); returns its sha256."""
    card = parse_card(kind, card, uri).to_dict()
    buf = io.BytesIO()
    cpu_state = {k: v.detach().cpu() for k, v in state_dict.items()}
    torch.save({"format": FORMAT, "kind": kind, "card": card, "state_dict": cpu_state}, buf)
    return write_bytes_atomic(resolve(uri, storage), buf.getvalue())


def load_artifact(
    uri: str, storage: StorageConfig | None = None, *, kind: str | None = None, sha256: str | None = None
) -> Artifact:
    """Load an artefact; with ``kind``, refuse one of another kind; with ``sha256`` (what the
    driver checked), refuse a file with other bytes: a worker must load what the driver recorded."""
    loc = resolve(uri, storage)
    data = read_existing(loc, ArtifactError, "artefact")
    if sha256 is not None:
        found = hashlib.sha256(data).hexdigest()
        if found != sha256:
            raise ArtifactError(
                f"{loc.uri}: sha256 {found[:12]} here, but the driver checked {sha256[:12]}: this process "
                "reads another file than the driver did (a file changed during the job, or a path that "
                "names another file on this node); give every node the same file, e.g. on shared "
                "storage or s3://"
            )
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a bad file
        raise ArtifactError(f"{loc.uri}: not a dmu-ray artefact ({type(err).__name__}: {err})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ArtifactError(
            f"{loc.uri}: not a dmu-ray artefact (format {obj.get('format') if isinstance(obj, dict) else None!r})"
        )
    if kind is not None and obj["kind"] != kind:
        raise ArtifactError(f"{loc.uri}: is a {obj['kind']!r} artefact, expected {kind!r}")
    try:
        card = parse_card(obj["kind"], dict(obj["card"]), loc.uri)
    except CardError as err:
        raise ArtifactError(str(err)) from None
    return Artifact(obj["kind"], card, obj["state_dict"], hashlib.sha256(data).hexdigest(), loc.uri)


def artifact_sha256(uri: str, storage: StorageConfig | None = None) -> str:
    """The sha256 of the artefact file at ``uri`` (what :func:`load_artifact` checks with ``sha256``)."""
    return hashlib.sha256(read_existing(resolve(uri, storage), ArtifactError, "artefact")).hexdigest()


def save_upgrade_module(
    uri: str, module, card: dict[str, Any] | None = None, storage: StorageConfig | None = None
) -> str:
    """Export an upgrade module with its shape in the card."""
    return save_artifact(
        uri, UPGRADE_MODULE, module.state_dict(), {**(card or {}), **module.config()}, storage
    )


def build_upgrade_module(art: Artifact):
    """The module of an upgrade artefact, weights loaded, in eval mode: an :class:`UpgradeModule`,
    or a :class:`~dmu_ray.models.linear_map.LinearMap` for a fitted linear adapter."""
    c = art.card
    if c.form == "linear":
        from dmu_ray.models.linear_map import LinearMap

        try:
            m = LinearMap.of_rank(c.in_dim, c.out_dim, c.rank)
            m.load_state_dict(art.state_dict)
        except (AttributeError, RuntimeError) as err:
            raise ArtifactError(f"{art.uri}: linear adapter does not load ({err})") from None
        return m.eval()
    try:
        m = UpgradeModule(
            c.in_dim,
            c.out_dim,
            c.width,
            c.depth,
            uncertainty=c.uncertainty,
            uncertainty_from=c.uncertainty_from,
            skip_linear=c.skip_linear,
        )
        m.load_state_dict(art.state_dict)
    except (AttributeError, RuntimeError) as err:
        raise ArtifactError(f"{art.uri}: upgrade module does not load ({err})") from None
    return m.eval()


EMBEDDING_MODEL = "embedding_model"


def save_embedding_model(
    uri: str,
    model: torch.nn.Module,
    head: torch.nn.Module,
    card: dict[str, Any],
    storage: StorageConfig | None = None,
) -> str:
    """Export an embedding model with its classifier (``classifier.*``; BCT/DMU use the old one)."""
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    state.update({f"classifier.{k}": v for k, v in head.state_dict().items()})
    card = {
        **card,
        **model.config(),
        "num_classes": head.num_classes,
        "head": head.kind,
        "s": head.s,
        "m": head.m,
    }
    return save_artifact(uri, EMBEDDING_MODEL, state, card, storage)


def build_embedding_model(art: Artifact):
    """``(model, classifier)`` of an artefact, weights loaded, in eval mode: dmu-ray's own
    ``EmbeddingModel`` or an imported network (any model source) as an
    :class:`~dmu_ray.models.sources.ImportedEmbedding`, and its ``MarginHead`` (None when it has
    no classifier)."""
    from dmu_ray.models.embedding import EmbeddingModel
    from dmu_ray.models.heads import MarginHead

    c = art.card
    if c.source != "dmu":
        from dmu_ray.models.sources import SOURCES, ImportedEmbedding, SourceError

        if c.source not in SOURCES:
            raise ArtifactError(f"{art.uri}: unknown model source {c.source!r} (known: {', '.join(SOURCES)})")
        try:
            net = SOURCES[c.source](c.architecture or "").from_artifact(art.state_dict)
        except (SourceError, RuntimeError, KeyError) as err:
            raise ArtifactError(f"{art.uri}: imported model does not load ({err})") from None
        model = ImportedEmbedding(net, c.dim, c.in_channels).eval()
    else:
        try:
            model = EmbeddingModel(c.backbone, c.dim, c.in_channels)
            model.load_state_dict({k[6:]: v for k, v in art.state_dict.items() if k.startswith("model.")})
        except (AttributeError, RuntimeError, ValueError) as err:
            raise ArtifactError(f"{art.uri}: embedding model does not load ({err})") from None
    if not c.has_classifier:  # an imported model without one (methods/old_classifier.py builds one)
        return model, None
    try:
        head = MarginHead(c.dim, c.num_classes, c.head, c.s, c.m)
        head.load_state_dict({k[11:]: v for k, v in art.state_dict.items() if k.startswith("classifier.")})
    except (AttributeError, RuntimeError, ValueError) as err:
        raise ArtifactError(f"{art.uri}: classifier does not load ({err})") from None
    return model.eval(), head.eval()
