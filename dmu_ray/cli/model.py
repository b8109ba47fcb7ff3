"""``dmu-ray model import``: a model dmu-ray did not train, as an artefact."""

from __future__ import annotations

import argparse

from dmu_ray.cli.common import (
    _storage,
    _storage_args,
)


def _floats(text: str | None) -> list[float] | None:
    return [float(v) for v in text.split(",")] if text else None


def _cmd_model_import(ns: argparse.Namespace) -> int:
    from dmu_ray.models.sources import import_model_artifact

    card = import_model_artifact(
        ns.source,
        ns.dest,
        model_id=ns.id,
        weights=ns.weights,
        pretrained=ns.pretrained,
        channels=ns.channels,
        size=ns.size,
        mean=_floats(ns.mean),
        std=_floats(ns.std),
        version=ns.model_version,
        storage=_storage(ns),
        overwrite=ns.overwrite,
    )
    p = card.preprocessing
    print(
        f"wrote {ns.dest}: {card.source}{':' + card.architecture if card.architecture else ''} as {card.id!r}, "
        f"{card.dim}-d embeddings, input {card.in_channels}x{p.size or 'data set size'}, mean {p.mean}, std {p.std}, "
        "no classifier"
    )
    return 0


def add_parser(sub) -> None:
    """Add this group's commands to the ``dmu-ray`` sub-parsers ``sub``."""
    mod = sub.add_parser(
        "model",
        help="import a model dmu-ray did not train (torchvision, timm, TorchScript, torch.export, ONNX)",
    )
    msub = mod.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    mim = msub.add_parser(
        "import",
        help="turn a deployed model into an artefact every command loads",
        description="Build the model (its classification layer removed), load its weights, probe its output "
        "dim on a dummy batch, record its preprocessing, and write an artefact that train, embed, evaluate, "
        "refresh and backfill load by URI. Preprocessing: --mean/--std/--size, else the model's own "
        "(timm's data config; ImageNet's for torchvision and TorchScript).",
    )
    mim.add_argument(
        "source",
        help="torchvision:NAME or timm:NAME (with --weights or --pretrained), a TorchScript file (an optional "
        "torchscript: prefix), a torch.export program (.pt2, or an export: prefix) or an ONNX model (.onnx, or "
        "an onnx: prefix; run by onnxruntime, never trained); files local or s3://",
    )
    mim.add_argument(
        "dest", help="artefact URI to write, e.g. out/models/old.pt or s3://bucket/models/old.pt"
    )
    mim.add_argument("--id", required=True, help="model id recorded in the card and in galleries it embeds")
    mim.add_argument("--model-version", default="1", help="version recorded in the card (default 1)")
    mim.add_argument(
        "--weights", help="torchvision/timm: a safetensors file or a torch.save'd state dict (local or s3://)"
    )
    mim.add_argument(
        "--pretrained",
        help="torchvision: a weights name (e.g. ResNet18_Weights.IMAGENET1K_V1), fetched by torchvision",
    )
    mim.add_argument("--channels", type=int, default=3, help="input channels (default 3)")
    mim.add_argument("--size", type=int, help="input side in pixels (default: the model's own)")
    mim.add_argument("--mean", help="per-channel mean, comma-separated (default: the model's own)")
    mim.add_argument("--std", help="per-channel std, comma-separated (default: the model's own)")
    mim.add_argument("--overwrite", action="store_true", help="replace an artefact already at DEST")
    _storage_args(mim)
    mim.set_defaults(func=_cmd_model_import)
