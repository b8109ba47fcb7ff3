"""Backbones: torchvision ResNets (random init: nothing is downloaded) and a small CNN for CPUs."""

from __future__ import annotations

from torch import nn

BACKBONES = ("small", "resnet18", "resnet34", "resnet50")


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
    raise ValueError(f"unknown backbone {name!r} (choose from {', '.join(BACKBONES)})")
