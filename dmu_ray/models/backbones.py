"""Backbones: dmu-ray's own (a small CNN for CPUs, torchvision ResNets adapted to any channel
count), and any torchvision or timm architecture by name (``torchvision:NAME``, ``timm:NAME``,
built by :mod:`dmu_ray.models.sources` without its classifier). All start from random weights;
:func:`load_backbone_weights` loads pretrained ones (a library's named weights or a state-dict file)."""

from __future__ import annotations

from torch import nn

from dmu_ray.models.backbone_names import BACKBONES, LIBRARY_PREFIXES, is_library_backbone

__all__ = [
    "BACKBONES",
    "LIBRARY_PREFIXES",
    "build_backbone",
    "check_library_weights",
    "library_weights",
    "load_backbone_weights",
]


class ToRGB(nn.Module):
    """A library network (made for RGB) fed single-channel images: the channel is repeated, as
    torchvision's ``Grayscale(num_output_channels=3)`` does, so pretrained weights apply as they are."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x.expand(-1, 3, -1, -1))


class SmallCNN(nn.Module):
    """Four conv blocks (32-64-128-256 channels) and global average pooling; fits 2 CPU cores."""

    def __init__(self, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        chans = [in_channels, width, width * 2, width * 4, width * 8]
        layers: list[nn.Module] = []
        for i in range(4):
            layers += [
                nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, bias=False),
                nn.BatchNorm2d(chans[i + 1]),
                nn.ReLU(inplace=True),
            ]
            if i < 3:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_dim = chans[-1]

    def forward(self, x):
        return self.features(x)


def build_backbone(name: str, in_channels: int = 3) -> tuple[nn.Module, int]:
    """``(module, feature_dim)``: the backbone without its classifier."""
    if name == "small":
        m = SmallCNN(in_channels)
        return m, m.out_dim
    if name in ("resnet18", "resnet34", "resnet50"):
        import torchvision

        m = getattr(torchvision.models, name)(weights=None)
        if in_channels != 3:
            m.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        dim = m.fc.in_features
        m.fc = nn.Identity()
        return m, dim
    if is_library_backbone(name):
        from dmu_ray.models.sources import SOURCES, probe_dim

        prefix, _, arch = name.partition(":")
        if in_channels not in (1, 3):
            raise ValueError(
                f"backbone {name}: library networks take 1- or 3-channel images, not {in_channels}"
            )
        net = SOURCES[prefix](arch).create()
        dim = getattr(net, "num_features", None) or probe_dim(net, 3, 224, f"backbone {name}")
        return (ToRGB(net) if in_channels == 1 else net), int(dim)
    raise ValueError(
        f"unknown backbone {name!r} (choose from {', '.join(BACKBONES)}, or torchvision:NAME / timm:NAME)"
    )


def check_library_weights(name: str, pretrained: str):
    """That a library has the named weights for backbone ``name`` (``torchvision:`` or
    ``timm:``), without fetching them; returns torchvision's weights entry (None for timm).
    ``pretrained`` is ``default`` (the library's default weights for the architecture) or, for
    torchvision, a weights name such as ``ResNet50_Weights.IMAGENET1K_V2`` (for timm, put a
    pretrained tag in the architecture name: ``timm:resnet50.a1_in1k``)."""
    prefix, _, arch = name.partition(":")
    if prefix == "torchvision":
        import torchvision

        try:
            enum = torchvision.models.get_model_weights(arch)
            w = enum.DEFAULT if pretrained == "default" else torchvision.models.get_weight(pretrained)
        except (ValueError, KeyError, AttributeError) as err:
            raise ValueError(f"torchvision has no weights {pretrained!r} for {arch} ({err})") from None
        if w not in list(enum):
            raise ValueError(
                f"{pretrained} are not weights of torchvision's {arch} (those are {enum.__name__})"
            )
        return w
    if prefix == "timm":
        if pretrained != "default":
            raise ValueError(f"for a timm backbone use 'default' (a tag goes in the name: timm:{arch}.TAG)")
        import timm

        if not timm.list_pretrained(arch) and not timm.list_pretrained(f"{arch}.*"):
            raise ValueError(f"timm has no pretrained weights for {arch!r}")
        return None
    raise ValueError(f"model.pretrained needs a torchvision:NAME or timm:NAME backbone, not {name!r}")


def library_weights(name: str, pretrained: str) -> dict:
    """The state dict of a library's named weights for backbone ``name``
    (:func:`check_library_weights`), fetched by that library (a cluster with internet; cached in
    its hub folder)."""
    w = check_library_weights(name, pretrained)
    if w is not None:
        return w.get_state_dict(progress=False)
    import timm

    return timm.create_model(name.partition(":")[2], pretrained=True, num_classes=0).state_dict()


def load_backbone_weights(backbone: nn.Module, name: str, state: dict, where: str) -> None:
    """Load a state dict into a backbone built by :func:`build_backbone`; a classification layer
    in it is dropped, anything else that does not fit is an error naming keys."""
    from dmu_ray.models.sources import load_checked

    target = backbone.net if isinstance(backbone, ToRGB) else backbone
    load_checked(target, state, where, f"backbone {name}")


def initial_backbone_state(model_cfg, storage=None) -> tuple[dict, str] | None:
    """``(state dict, where it came from)`` that a new backbone starts from as ``model_cfg``
    (a ``ModelConfig``) says, or None for random weights. Library weights are fetched by the
    library; a ``weights`` file is read from its URI (local or ``s3://``)."""
    if model_cfg.pretrained:
        return library_weights(model_cfg.backbone, model_cfg.pretrained), (
            f"{model_cfg.backbone} weights {model_cfg.pretrained!r}"
        )
    if model_cfg.weights:
        from dmu_ray.models.sources import SourceError, read_state_dict
        from dmu_ray.storage import read_existing, resolve

        loc = resolve(model_cfg.weights, storage)
        data = read_existing(loc, SourceError, prefix="model.weights: ")
        return read_state_dict(data, f"model.weights {loc.uri}"), f"model.weights {loc.uri}"
    return None


def default_preprocessing(name: str, backbone: nn.Module, channels: int) -> tuple[list[float], list[float]]:
    """``(mean, std)`` a backbone expects: its library's (timm's data config, torchvision's
    ImageNet statistics) for a library network, 0.5 / 0.5 for dmu-ray's own. Single-channel
    images (repeated to RGB) get the mean of the three channels' values."""
    if not is_library_backbone(name):
        return [0.5], [0.5]
    from dmu_ray.models.sources import SOURCES

    prefix, _, arch = name.partition(":")
    net = backbone.net if isinstance(backbone, ToRGB) else backbone
    d = SOURCES[prefix](arch).defaults(net)
    mean, std = [float(x) for x in d["mean"]], [float(x) for x in d["std"]]
    if channels == 1:
        mean, std = [sum(mean) / len(mean)], [sum(std) / len(std)]
    return mean, std
