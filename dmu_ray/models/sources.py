"""Model sources: where an embedding model's network comes from, chosen by a prefix.

``dmu`` is dmu-ray's own (backbone + embedding head + classifier, trained by ``dmu-ray train``);
``torchvision:<arch>`` and ``timm:<arch>`` build an architecture by name (without its
classification layer) and load a state dict (``torch.save``d or safetensors); ``torchscript`` loads
a scripted model and ``export`` a ``torch.export`` program (``.pt2``) as deployed.
Each source turns a spec into the network, its output dim (probed with a dummy batch) and its
preprocessing, resolved as timm does it: explicit overrides, then the model's own values, then
defaults. The network and the bytes needed to rebuild it go into an ordinary artefact
(:func:`import_model`), which every command then loads by URI like a trained one.

Adding a source is one class here with ``@register_source`` and a test.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from dmu_ray.models.card import EmbeddingCard, Preprocessing

__all__ = [
    "SOURCES",
    "ModelSource",
    "ImportedEmbedding",
    "parse_source",
    "import_model",
    "load_checked",
    "read_state_dict",
    "SourceError",
]

IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])

#: Registered sources by prefix.
SOURCES: dict[str, type[ModelSource]] = {}


class SourceError(ValueError):
    """A model that cannot be imported; the message says which file or name, and why."""


def register_source(cls: type[ModelSource]) -> type[ModelSource]:
    SOURCES[cls.prefix] = cls
    return cls


def parse_source(spec: str) -> tuple[str, str]:
    """``"torchvision:resnet18"`` -> ``("torchvision", "resnet18")``; ``"torchscript"`` -> ``("torchscript", "")``."""
    prefix, _, name = spec.partition(":")
    if prefix not in SOURCES:
        raise SourceError(
            f"unknown model source {spec!r}: use one of {', '.join(f'{p}:...' for p in SOURCES)}"
        )
    if SOURCES[prefix].needs_name and not name:
        raise SourceError(f"model source {prefix!r} needs an architecture name, e.g. {prefix}:resnet18")
    return prefix, name


class ImportedEmbedding(nn.Module):
    """A network imported as it is deployed, made to look like dmu-ray's models: images in,
    unit-norm (n, dim) embeddings out (retrieval compares cosines)."""

    def __init__(self, net: nn.Module, dim: int, in_channels: int) -> None:
        super().__init__()
        self.net, self.dim, self.in_channels = net, dim, in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.net(x).float().flatten(1), dim=1)


@dataclass
class ModelSource:
    """A way to build an imported network (subclasses register with :func:`register_source`)."""

    name: str
    prefix: ClassVar[str] = ""
    needs_name: ClassVar[bool] = True

    def create(self) -> nn.Module:
        """The network, without its classification layer, random weights."""
        raise NotImplementedError

    def defaults(self, net: nn.Module) -> dict[str, Any]:
        """The model's own preprocessing (``mean``, ``std``, ``size``), where it knows it."""
        return {"mean": IMAGENET[0], "std": IMAGENET[1], "size": 224}

    def load(self, net: nn.Module, state: dict[str, torch.Tensor], where: str) -> nn.Module:
        """Load a state dict (:func:`load_checked`)."""
        return load_checked(net, state, where, f"{self.prefix}:{self.name}")

    def to_artifact(self, net: nn.Module) -> dict[str, torch.Tensor]:
        return {f"net.{k}": v.detach().cpu() for k, v in net.state_dict().items()}

    def from_artifact(self, state: dict[str, torch.Tensor]) -> nn.Module:
        net = self.create()
        net.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("net.")})
        return net


def is_safetensors(data: bytes) -> bool:
    """Whether ``data`` is a safetensors file: a little-endian u64 header length, then its JSON."""
    if len(data) < 10:
        return False
    n = int.from_bytes(data[:8], "little")
    return 1 < n <= len(data) - 8 and data[8:9] == b"{"


def read_state_dict(data: bytes, where: str) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file or a ``torch.save``d one (or a training checkpoint
    holding one under ``state_dict`` or ``model``, loaded with ``weights_only``); anything else is
    an error naming ``where``."""
    if is_safetensors(data):
        from safetensors.torch import load as load_safetensors

        try:
            return load_safetensors(data)
        except Exception as err:  # a header that looks right over a damaged body
            raise SourceError(
                f"{where}: damaged safetensors file ({type(err).__name__}: {str(err)[:200]})"
            ) from None
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a file that is not a state dict
        raise SourceError(f"{where}: not a state dict ({type(err).__name__}: {str(err)[:200]})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]  # a training checkpoint around the state dict
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SourceError(f"{where}: not a state dict of tensors")
    return state


def load_checked(net: nn.Module, state: dict[str, torch.Tensor], where: str, what: str) -> nn.Module:
    """Load a state dict into ``net`` (``what`` names it in errors): keys of a classification
    layer the network no longer has are dropped, a ``module.`` prefix (saved from DDP) is
    removed, anything else that does not fit is an error naming keys."""
    own = net.state_dict()
    state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DDP
    extra = [k for k in state if k not in own]
    missing = [k for k in own if k not in state]
    head_like = [k for k in extra if k.split(".")[0] in ("fc", "classifier", "head", "heads", "last_linear")]
    extra = [k for k in extra if k not in head_like]
    shape = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if extra or missing or shape:
        parts = []
        for kind, keys in (("unexpected", extra), ("missing", missing), ("wrong shape", shape)):
            if keys:
                parts.append(f"{len(keys)} {kind} (e.g. {', '.join(keys[:3])})")
        raise SourceError(f"{where}: the state dict does not fit {what}: " + "; ".join(parts))
    net.load_state_dict({k: v for k, v in state.items() if k in own})
    return net


@register_source
class TorchvisionSource(ModelSource):
    """An architecture from ``torchvision.models`` by name; its classifier replaced by identity."""

    prefix: ClassVar[str] = "torchvision"

    def create(self) -> nn.Module:
        import torchvision

        try:
            net = torchvision.models.get_model(self.name, weights=None)
        except ValueError:
            raise SourceError(f"torchvision has no model {self.name!r}") from None
        for attr in ("fc", "classifier", "heads", "head"):
            if isinstance(getattr(net, attr, None), nn.Module):
                setattr(net, attr, nn.Identity())
                break
        return net

    def pretrained(self, weights: str) -> dict[str, torch.Tensor]:
        """The state dict of torchvision's named weights (downloaded by torchvision, on a
        cluster with internet; cached by torch hub)."""
        import torchvision

        w = torchvision.models.get_weight(weights)
        return w.get_state_dict(progress=False)


@register_source
class TimmSource(ModelSource):
    """An architecture from timm by name, built with ``num_classes=0`` (timm's own way to drop
    the classifier); preprocessing from ``timm.data.resolve_model_data_config``."""

    prefix: ClassVar[str] = "timm"

    def create(self) -> nn.Module:
        import timm

        try:
            return timm.create_model(self.name, pretrained=False, num_classes=0)
        except RuntimeError as err:
            raise SourceError(f"timm cannot build {self.name!r} ({err})") from None

    def defaults(self, net: nn.Module) -> dict[str, Any]:
        import timm.data

        c = timm.data.resolve_model_data_config(net)
        return {"mean": list(c["mean"]), "std": list(c["std"]), "size": int(c["input_size"][-1])}


@register_source
class TorchScriptSource(ModelSource):
    """A TorchScript file, kept byte for byte in the artefact (``torchscript`` tensor)."""

    prefix: ClassVar[str] = "torchscript"
    needs_name: ClassVar[bool] = False
    data: bytes = b""

    def create(self) -> nn.Module:
        import warnings

        try:
            with warnings.catch_warnings():  # torch deprecates TorchScript; the user's file still loads
                warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated", category=FutureWarning)
                return torch.jit.load(io.BytesIO(self.data), map_location="cpu")
        except Exception as err:  # torch raises several types for a file that is not TorchScript
            raise SourceError(f"not a TorchScript model ({type(err).__name__}: {str(err)[:200]})") from None

    def defaults(self, net: nn.Module) -> dict[str, Any]:
        return {"mean": IMAGENET[0], "std": IMAGENET[1], "size": None}

    def to_artifact(self, net: nn.Module) -> dict[str, torch.Tensor]:
        return {"torchscript": torch.frombuffer(bytearray(self.data), dtype=torch.uint8)}

    def from_artifact(self, state: dict[str, torch.Tensor]) -> nn.Module:
        self.data = bytes(state["torchscript"].numpy().tobytes())
        return self.create()


class _Program(nn.Module):
    """An exported program's module, which runs as it was exported: ``train()``/``eval()`` (which
    torch refuses on it) only set this wrapper's flag."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.program = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.program(x)

    def train(self, mode: bool = True) -> _Program:
        self.training = mode
        return self


@register_source
class ExportSource(TorchScriptSource):
    """A ``torch.export`` program (``.pt2``, what ``torch.export.save`` writes), kept byte for
    byte in the artefact (``program`` tensor) and run as its ``.module()``. Export it with a
    dynamic batch dimension (``dynamic_shapes``): dmu-ray embeds batches of any size. Its weights
    are the program's constants to dmu-ray: it serves as an old model (frozen), not as a new model
    to train."""

    prefix: ClassVar[str] = "export"

    def create(self) -> nn.Module:
        try:
            program = torch.export.load(io.BytesIO(self.data))
        except Exception as err:  # torch raises several types for a file that is not a program
            raise SourceError(
                f"not a torch.export program ({type(err).__name__}: {str(err)[:200]})"
            ) from None
        return _Program(program.module())

    def to_artifact(self, net: nn.Module) -> dict[str, torch.Tensor]:
        return {"program": torch.frombuffer(bytearray(self.data), dtype=torch.uint8)}

    def from_artifact(self, state: dict[str, torch.Tensor]) -> nn.Module:
        self.data = bytes(state["program"].numpy().tobytes())
        return self.create()


@register_source
class OnnxSource(TorchScriptSource):
    """An ONNX model (``.onnx``, served by onnxruntime / Triton), kept byte for byte in the
    artefact (``onnx`` tensor) and run with onnxruntime (:class:`~dmu_ray.models.onnx_model.OnnxModel`): it embeds, it is
    not trained through. Export it with a dynamic batch axis (``dynamic_axes``)."""

    prefix: ClassVar[str] = "onnx"

    def create(self) -> nn.Module:
        try:
            from dmu_ray.models.onnx_model import OnnxModel

            net = OnnxModel(self.data)
        except ImportError:  # pragma: no cover - onnxruntime is a dependency
            raise SourceError("ONNX models need onnxruntime (pip install onnxruntime)") from None
        except Exception as err:  # onnxruntime raises its own types for a file that is not ONNX
            raise SourceError(f"not an ONNX model ({type(err).__name__}: {str(err)[:200]})") from None
        batch = net.session.get_inputs()[0].shape[0]
        if isinstance(batch, int):  # a fixed batch: dmu-ray embeds batches of every size
            raise SourceError(
                f"the ONNX model takes batches of exactly {batch}; export it with a dynamic batch axis, "
                "e.g. torch.onnx.export(model, (x,), f, input_names=['x'], dynamic_axes={'x': {0: 'batch'}})"
            )
        return net

    def to_artifact(self, net: nn.Module) -> dict[str, torch.Tensor]:
        return {"onnx": torch.frombuffer(bytearray(self.data), dtype=torch.uint8)}

    def from_artifact(self, state: dict[str, torch.Tensor]) -> nn.Module:
        self.data = bytes(state["onnx"].numpy().tobytes())
        return self.create()


#: sources whose file is the model itself (no architecture name, no separate weights)
FILE_SOURCES = ("torchscript", "export", "onnx")


def source_of(card: EmbeddingCard) -> ModelSource:
    return SOURCES[card.source](card.architecture or "")


def probe_dim(net: nn.Module, channels: int, size: int, where: str) -> int:
    """The output dim of ``net`` on a dummy batch; anything but an (n, d) output is an error."""
    net.eval()
    try:
        with torch.no_grad():
            out = net(torch.zeros(2, channels, size, size))
    except Exception as err:  # a model that cannot run on such input
        raise SourceError(
            f"{where}: the model does not run on a (2, {channels}, {size}, {size}) batch "
            f"({type(err).__name__}: {str(err)[:200]}); check --channels/--size"
        ) from None
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise SourceError(f"{where}: the model outputs {shape}, not an (n, d) matrix of embeddings")
    return int(out.shape[1])


def import_model(
    spec: str,
    *,
    model_id: str,
    weights: bytes | None = None,
    pretrained: str | None = None,
    where: str = "<model>",
    channels: int = 3,
    size: int | None = None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    version: str = "1",
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Build, load and probe a model of ``spec`` (``torchvision:NAME``, ``timm:NAME`` or
    ``torchscript`` with ``weights`` the file's bytes); returns the artefact's state dict and card.
    ``weights`` for torchvision/timm is a ``torch.save``d state dict (``weights_only`` loading);
    ``pretrained`` names torchvision's weights instead (fetched by torchvision)."""
    prefix, name = parse_source(spec)
    src = SOURCES[prefix](name)
    if prefix in FILE_SOURCES:
        if weights is None:
            raise SourceError(f"a {prefix} import needs the model file")
        src.data = weights
        try:
            net = src.create()
        except SourceError as err:
            raise SourceError(f"{where}: {err}") from None
    else:
        net = src.create()
        if weights is not None:
            net = src.load(net, read_state_dict(weights, where), where)
        elif pretrained is not None:
            if prefix != "torchvision":
                raise SourceError("--pretrained names torchvision weights; for timm pass a weights file")
            net = src.load(net, src.pretrained(pretrained), pretrained)
        else:
            raise SourceError(f"{spec}: give the model's weights (a state dict file) or --pretrained")
    own = src.defaults(net)
    pre = Preprocessing(
        mean=mean if mean is not None else own["mean"],
        std=std if std is not None else own["std"],
        size=size if size is not None else own["size"],
    )
    if not pre.fits(channels):
        given = "given" if mean is not None and std is not None else "the source's defaults"
        raise SourceError(
            f"--channels {channels}, but the mean/std ({given}: mean {pre.mean}, std {pre.std}) need one "
            f"value, or one per channel: give --mean and --std with {channels} comma-separated value(s) each, "
            f"e.g. --mean {','.join(['0.5'] * channels)} --std {','.join(['0.5'] * channels)}"
        )
    try:
        dim = probe_dim(net, channels, pre.size or 224, where)
    except SourceError as err:
        if prefix == "onnx":
            raise SourceError(
                f"{err}; an ONNX model must be exported with a dynamic batch axis, e.g. torch.onnx.export(model, "
                "(x,), f, input_names=['x'], dynamic_axes={'x': {0: 'batch'}})"
            ) from None
        if prefix != "export":
            raise
        raise SourceError(
            f"{err}; a torch.export program must be exported with a dynamic batch dimension, e.g. "
            "torch.export.export(model, (x,), dynamic_shapes={'x': {0: torch.export.Dim('batch')}})"
        ) from None
    card = EmbeddingCard(
        id=model_id,
        source=prefix,
        architecture=name or None,
        dim=dim,
        in_channels=channels,
        preprocessing=pre,
        model_version=version,
        imported_from=where,
    )
    return src.to_artifact(net), card.to_dict()


def import_model_artifact(
    source: str,
    dest: str,
    *,
    model_id: str,
    weights: str | None = None,
    pretrained: str | None = None,
    channels: int = 3,
    size: int | None = None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    version: str = "1",
    storage: Any = None,
    overwrite: bool = False,
) -> EmbeddingCard:
    """``dmu-ray model import``: ``source`` is ``torchvision:NAME`` or ``timm:NAME`` (with
    ``weights``, a state dict file, or ``pretrained``), or the URI of a TorchScript file (an
    optional ``torchscript:`` prefix), a torch.export program (``.pt2`` or ``export:``) or an ONNX
    model (``.onnx`` or ``onnx:``); local paths and ``s3://`` work for every file. Writes the
    artefact to ``dest`` and returns its card; a file already at ``dest`` is refused (before any
    work) unless ``overwrite``: galleries and runs name artefacts by their bytes."""
    from dmu_ray.models.artifact import EMBEDDING_MODEL, load_artifact, save_artifact
    from dmu_ray.storage import read_existing, resolve

    if not overwrite and resolve(dest, storage).exists():
        raise SourceError(
            f"{resolve(dest, storage).uri} already exists; galleries embedded with it name its sha256: write "
            "the import to a new file, or pass --overwrite to replace it"
        )

    def fetch(uri: str) -> bytes:
        return read_existing(resolve(uri, storage), SourceError)

    prefix = source.partition(":")[0]
    if prefix in ("torchvision", "timm"):
        spec, data, where = source, fetch(weights) if weights else None, weights or pretrained or source
    else:
        kind = (
            prefix
            if prefix in FILE_SOURCES
            else "export"
            if source.endswith(".pt2")
            else "onnx"
            if source.endswith(".onnx")
            else "torchscript"
        )
        uri = source.removeprefix(f"{kind}:")
        spec, data, where = kind, fetch(uri), resolve(uri, storage).uri
        if weights:
            raise SourceError(
                f"--weights is for torchvision:/timm: sources; a {kind} file holds its own weights"
            )
    state, card = import_model(
        spec,
        model_id=model_id,
        weights=data,
        pretrained=pretrained,
        where=where,
        channels=channels,
        size=size,
        mean=mean,
        std=std,
        version=version,
    )
    save_artifact(dest, EMBEDDING_MODEL, state, card, storage)
    art = load_artifact(dest, storage, kind=EMBEDDING_MODEL)
    from dmu_ray.models.artifact import build_embedding_model

    build_embedding_model(art)  # what was written loads back
    return art.card
