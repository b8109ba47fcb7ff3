"""Pretrained new backbones (issue 12 part 3): a torchvision or timm architecture by name, started
from a weights file by URI (local or S3) or from the library's named weights. The weights are
files the tests save themselves; nothing is downloaded."""

import io

import numpy as np
import pytest
import torch
import torchvision
from test_train import config

from dmu_ray.config import ConfigError
from dmu_ray.data.importers import import_digits
from dmu_ray.methods.base import Method
from dmu_ray.models.artifact import build_embedding_model, load_artifact
from dmu_ray.models.sources import IMAGENET
from dmu_ray.train.job import plan_training, run_training


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "digits"
    import_digits(str(path), image_size=16)
    return str(path)


@pytest.fixture(scope="module")
def r18_weights(tmp_path_factory):
    torch.manual_seed(5)
    net = torchvision.models.resnet18(weights=None)  # as saved by a user: classifier included
    path = tmp_path_factory.mktemp("w") / "r18.pt"
    torch.save({"state_dict": net.state_dict(), "epoch": 90}, path)  # a training checkpoint around it
    return str(path), net.state_dict()


def test_a_library_backbone_starts_from_a_weights_file(tmp_path, digits, r18_weights):
    path, state = r18_weights
    cfg = config("p", str(tmp_path), digits, model={"backbone": "torchvision:resnet18", "weights": path})
    plan = plan_training(cfg)
    mean = sum(IMAGENET[0]) / 3  # 1-channel digits: the grey value of ImageNet's statistics
    assert plan.mean == pytest.approx([mean]) and plan.std == pytest.approx([sum(IMAGENET[1]) / 3])
    model, _ = Method.fresh_model(cfg, plan.info())
    torch.testing.assert_close(model.backbone.net.conv1.weight, state["conv1.weight"])
    assert model(torch.zeros(3, 1, 16, 16)).shape == (3, 32)
    model, _ = Method.fresh_model(cfg, {**plan.info(), "init_backbone": False})
    assert not torch.equal(model.backbone.net.conv1.weight, state["conv1.weight"])
    # timm by name, weights from a file too
    import timm

    t = timm.create_model("resnet18", pretrained=False, num_classes=0)
    torch.save(t.state_dict(), tmp_path / "timm18.pt")
    cfg = config(
        "t",
        str(tmp_path),
        digits,
        model={"backbone": "timm:resnet18", "weights": str(tmp_path / "timm18.pt")},
    )
    model, _ = Method.fresh_model(cfg, plan_training(cfg).info())
    torch.testing.assert_close(model.backbone.net.conv1.weight, t.conv1.weight)


def test_bad_backbone_weights_fail_at_plan_time_naming_the_field(tmp_path, digits):
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), tmp_path / "r34.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a state dict")
    bad = {
        "r34.pt": r"model\.weights .*r34\.pt: the state dict does not fit backbone torchvision:resnet18: .*unexpected",
        "junk.pt": r"model\.weights .*junk\.pt: not a state dict",
        "none.pt": r"model\.weights: .*none\.pt: no such file",
    }
    for name, msg in bad.items():
        cfg = config(
            "b",
            str(tmp_path),
            digits,
            model={"backbone": "torchvision:resnet18", "weights": str(tmp_path / name)},
        )
        with pytest.raises(ConfigError, match=msg):
            plan_training(cfg)
    for pretrained, msg in (
        ("ResNet50_Weights.IMAGENET1K_V2", r"model\.pretrained: .*not weights of torchvision's resnet18"),
        ("Nope_Weights.X", r"model\.pretrained: torchvision has no weights"),
    ):
        cfg = config(
            "b", str(tmp_path), digits, model={"backbone": "torchvision:resnet18", "pretrained": pretrained}
        )
        with pytest.raises(ConfigError, match=msg):
            plan_training(cfg)
    # names that exist pass the plan (the weights themselves are fetched on the workers)
    for pretrained in ("default", "ResNet18_Weights.IMAGENET1K_V1"):
        plan_training(
            config(
                "b",
                str(tmp_path),
                digits,
                model={"backbone": "torchvision:resnet18", "pretrained": pretrained},
            )
        )
    with pytest.raises(ConfigError, match=r"model\.backbone: .*does not run on the data's 16x16 images"):
        plan_training(config("b", str(tmp_path), digits, model={"backbone": "torchvision:vit_b_16"}))
    with pytest.raises(ValueError, match="needs a torchvision:/timm: backbone"):
        config("b", str(tmp_path), digits, model={"backbone": "small", "pretrained": "default"})


def test_training_from_a_weights_file_on_s3(ray_local, s3, tmp_path, digits, r18_weights):
    """Two Ray Train workers fine-tune from the weights file on S3 at a tiny LR: the exported
    backbone is still the file's, and the card records the input normalisation used."""
    path, state = r18_weights
    buf = io.BytesIO()
    torch.save(state, buf)
    s3.client().put_object(Bucket=s3.bucket, Key="weights/r18.pt", Body=buf.getvalue())
    cfg = config(
        "ft",
        str(tmp_path / "runs"),
        digits,
        s3.storage.model_dump(),
        model={"backbone": "torchvision:resnet18", "weights": f"s3://{s3.bucket}/weights/r18.pt"},
        optim={"epochs": 1, "lr": 1e-7, "weight_decay": 0.0},
    )
    out = run_training(cfg, progress=False)
    art = load_artifact(out["model"])
    assert art.card.backbone == "torchvision:resnet18"
    assert art.card.preprocessing.mean == pytest.approx([sum(IMAGENET[0]) / 3])
    model, _ = build_embedding_model(art)
    np.testing.assert_allclose(
        model.backbone.net.conv1.weight.detach().numpy(), state["conv1.weight"].numpy(), atol=1e-4
    )
