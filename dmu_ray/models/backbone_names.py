"""Names of backbones, torch-free so that configs validate them without importing torch."""

from __future__ import annotations

#: dmu-ray's own backbones (``dmu_ray.models.backbones``)
BACKBONES = ("small", "resnet18", "resnet34", "resnet50")
#: prefixes of backbones named by a model library (``timm:convnext_tiny``)
LIBRARY_PREFIXES = ("torchvision", "timm")


def is_library_backbone(name: str) -> bool:
    """``torchvision:NAME`` or ``timm:NAME``."""
    prefix, colon, arch = name.partition(":")
    return bool(colon) and prefix in LIBRARY_PREFIXES and bool(arch)
