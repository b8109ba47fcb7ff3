"""Model sources (issue 19) and `dmu-ray model import` (issue 12, first part): a deployed model
that dmu-ray did not train becomes an artefact that embeds exactly as the model does, from
torchvision / timm architectures plus a state dict, or a TorchScript file, local or on S3. The
weights are files the tests write; nothing is downloaded."""

import numpy as np
import pytest
import torch
import torchvision
from test_cli_gallery import run as cli
from torch import nn

from dmu_ray.data.images import DecodeBatch
from dmu_ray.data.importers import import_digits
from dmu_ray.evaluate.embed import embed_to_gallery
from dmu_ray.gallery import Gallery, embedding_matrix
from dmu_ray.models.artifact import build_embedding_model, load_artifact
from dmu_ray.models.sources import SOURCES, SourceError, import_model_artifact


class TinyNet(nn.Module):
    """A small 1-channel embedding network, as a deployed model might be (no classifier)."""

    def __init__(self, dim: int = 6) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def test_sources_are_registered_by_prefix():
    assert {"torchvision", "timm", "torchscript", "export", "onnx"} <= set(SOURCES)


def _onnx(net: nn.Module, path, batch_axis: bool = True) -> None:
    """``net`` written as ONNX (torch's TorchScript-based exporter: it needs only the onnx package)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net,
            (torch.zeros(2, 1, 16, 16),),
            str(path),
            dynamo=False,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}} if batch_axis else None,
        )


def test_an_onnx_model_imports_and_embeds_a_gallery_on_ray_data(tmp_path):
    """Issue 37: an ONNX model (dynamic batch) imports through the CLI, is kept byte for byte, and
    embeds with onnxruntime as the network does, also on Ray Data's actors (`dmu-ray embed`, as a
    user runs it); one exported with a fixed batch, and a file that is not ONNX, are refused
    naming the fix."""
    torch.manual_seed(3)
    tiny = TinyNet(dim=5).eval()
    _onnx(tiny, tmp_path / "tiny.onnx")
    r = cli(
        "model", "import", str(tmp_path / "tiny.onnx"), str(tmp_path / "tiny.pt"), "--id", "prod-onnx",
        "--channels", "1", "--size", "16", "--mean", "0.5", "--std", "0.25",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "onnx as 'prod-onnx', 5-d embeddings" in r.stdout, r.stdout + r.stderr
    art = load_artifact(str(tmp_path / "tiny.pt"))
    assert art.card.source == "onnx"
    assert bytes(art.state_dict["onnx"].numpy().tobytes()) == (tmp_path / "tiny.onnx").read_bytes()
    model, _ = build_embedding_model(art)
    xs = torch.randn(7, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(xs), nn.functional.normalize(tiny(xs), dim=1), atol=1e-5, rtol=1e-5)

    data = tmp_path / "digits"
    import_digits(str(data), image_size=16)
    r = cli("embed", "--images", str(data / "query"), "--model", str(tmp_path / "tiny.pt"),
            "--output", str(tmp_path / "g"), "--dtype", "float32", "--quiet")  # fmt: skip
    assert r.returncode == 0, r.stderr
    m = Gallery.open(str(tmp_path / "g")).manifest
    assert m.model.model_id == "prod-onnx" and m.model.dim == 5
    import pyarrow.parquet as pq

    t = Gallery.open(str(tmp_path / "g")).read()
    imgs = pq.read_table(str(data / "query")).sort_by("id")
    x = DecodeBatch(16, 1, mean=(0.5,), std=(0.25,))(imgs)["image"]
    with torch.no_grad():
        want = nn.functional.normalize(tiny(torch.from_numpy(x)), dim=1).numpy()
    order = np.argsort(t.column("id").to_numpy())
    np.testing.assert_allclose(embedding_matrix(t.column("embedding"))[order], want, atol=1e-5)

    _onnx(tiny, tmp_path / "static.onnx", batch_axis=False)
    r = cli("model", "import", str(tmp_path / "static.onnx"), str(tmp_path / "s.pt"), "--id", "x",
            "--channels", "1", "--size", "16", "--mean", "0.5", "--std", "0.5")  # fmt: skip
    assert r.returncode == 2 and "batches of exactly 2; export it with a dynamic batch axis" in r.stderr, (
        r.stderr
    )
    (tmp_path / "not.onnx").write_bytes(b"\x08\x07 not a model")
    r = cli("model", "import", str(tmp_path / "not.onnx"), str(tmp_path / "n.pt"), "--id", "x",
            "--channels", "1", "--size", "16", "--mean", "0.5", "--std", "0.5")  # fmt: skip
    assert r.returncode == 2 and "not an ONNX model" in r.stderr and "not.onnx" in r.stderr, r.stderr


def test_safetensors_weights_and_a_torch_export_program_import_as_deployed(tmp_path):
    """Issue 37: today's formats. A timm architecture's weights as safetensors embed as the same
    weights saved by torch; a torch.export program (.pt2, dynamic batch) embeds as the network it
    was exported from, through the CLI, without a warning; a static-batch program is refused
    naming the fix."""
    from safetensors.torch import save_file
    from test_cli_gallery import run as cli

    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None).eval()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "r18.safetensors"))
    torch.save(net.state_dict(), tmp_path / "r18.pt")
    x = torch.randn(2, 3, 64, 64)
    got = {}
    for name in ("r18.safetensors", "r18.pt"):
        dest = str(tmp_path / f"{name}.artefact")
        import_model_artifact("timm:resnet18", dest, model_id="v1", weights=str(tmp_path / name))
        model, _ = build_embedding_model(load_artifact(dest))
        with torch.no_grad():
            got[name] = model(x)
    torch.testing.assert_close(got["r18.safetensors"], got["r18.pt"], rtol=0, atol=0)
    (tmp_path / "bad.safetensors").write_bytes((10).to_bytes(8, "little") + b"{ not json")
    with pytest.raises(SourceError, match="bad.safetensors: damaged safetensors file"):
        import_model_artifact(
            "timm:resnet18", str(tmp_path / "b.pt"), model_id="v1", weights=str(tmp_path / "bad.safetensors")
        )

    tiny = TinyNet().eval()
    program = torch.export.export(
        tiny, (torch.randn(2, 1, 16, 16),), dynamic_shapes={"x": {0: torch.export.Dim("batch")}}
    )
    torch.export.save(program, str(tmp_path / "tiny.pt2"))
    r = cli(
        "model", "import", str(tmp_path / "tiny.pt2"), str(tmp_path / "tiny.pt"), "--id", "prod-v1",
        "--channels", "1", "--size", "16", "--mean", "0.5", "--std", "0.25",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "export as 'prod-v1', 6-d embeddings" in r.stdout and "Warning" not in r.stderr, (
        r.stdout + r.stderr
    )
    art = load_artifact(str(tmp_path / "tiny.pt"))
    assert art.card.source == "export"
    model, _ = build_embedding_model(art)
    model.eval()  # an exported program refuses eval(); the artefact's model takes it
    xs = torch.randn(5, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(xs), nn.functional.normalize(tiny(xs), dim=1))
    static = torch.export.export(tiny, (torch.randn(1, 1, 16, 16),))
    torch.export.save(static, str(tmp_path / "static.pt2"))
    r = cli("model", "import", str(tmp_path / "static.pt2"), str(tmp_path / "s.pt"), "--id", "x",
            "--channels", "1", "--size", "16", "--mean", "0.5", "--std", "0.5")  # fmt: skip
    assert r.returncode == 2 and "dynamic batch dimension" in r.stderr, r.stderr


def test_torchvision_and_timm_state_dicts_embed_as_the_network(tmp_path):
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None).eval()
    torch.save(net.state_dict(), tmp_path / "r18.pt")  # as deployed: classifier weights included
    x = torch.randn(3, 3, 64, 64)
    net.fc = nn.Identity()
    with torch.no_grad():
        want = nn.functional.normalize(net(x), dim=1)
    for source in ("torchvision:resnet18", "timm:resnet18"):
        dest = str(tmp_path / f"{source.split(':')[0]}.pt")
        card = import_model_artifact(source, dest, model_id="prod-v1", weights=str(tmp_path / "r18.pt"))
        assert (card.dim, card.source, card.architecture, card.has_classifier) == (
            512,
            source[:-9],
            "resnet18",
            False,
        )
        assert (
            card.preprocessing.mean == pytest.approx([0.485, 0.456, 0.406]) and card.preprocessing.size == 224
        )
        model, head = build_embedding_model(load_artifact(dest))
        with torch.no_grad():
            torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-5)
        assert head is None
    with pytest.raises(
        SourceError, match=r"r18\.pt: the state dict does not fit torchvision:resnet34: .* missing"
    ):
        import_model_artifact(
            "torchvision:resnet34", str(tmp_path / "x.pt"), model_id="x", weights=str(tmp_path / "r18.pt")
        )
    with pytest.raises(SourceError, match="torchvision has no model 'resnet-nope'"):
        import_model_artifact(
            "torchvision:resnet-nope", str(tmp_path / "x.pt"), model_id="x", weights=str(tmp_path / "r18.pt")
        )
    (tmp_path / "junk.pt").write_bytes(b"not a state dict")
    with pytest.raises(SourceError, match=r"junk\.pt: not a state dict"):
        import_model_artifact(
            "timm:resnet18", str(tmp_path / "x.pt"), model_id="x", weights=str(tmp_path / "junk.pt")
        )


def test_torchscript_from_s3_with_the_cli_and_bad_models(s3, tmp_path):
    torch.manual_seed(0)
    scripted = torch.jit.script(TinyNet().eval())
    scripted.save(str(tmp_path / "tiny.pt"))
    s3.client().upload_file(str(tmp_path / "tiny.pt"), s3.bucket, "models/tiny.pt")
    dest = f"s3://{s3.bucket}/artefacts/old.pt"
    r = cli(
        "model", "import", f"s3://{s3.bucket}/models/tiny.pt", dest, "--id", "prod-v1",
        "--channels", "1", "--size", "16", "--mean", "0.5", "--std", "0.25", "--endpoint-url", s3.endpoint,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "6-d embeddings" in r.stdout and "no classifier" in r.stdout
    assert "FutureWarning" not in r.stderr  # torch's TorchScript deprecation is not the user's concern
    art = load_artifact(dest, s3.storage)
    assert art.card.source == "torchscript" and art.card.preprocessing.std == [0.25]
    # an artefact already there is not replaced silently: galleries name its bytes
    again = ("model", "import", f"s3://{s3.bucket}/models/tiny.pt", dest, "--id", "prod-v2", "--channels", "1",
             "--size", "16", "--mean", "0.5", "--std", "0.25", "--endpoint-url", s3.endpoint)  # fmt: skip
    r = cli(*again)
    assert r.returncode == 2 and "already exists" in r.stderr and "--overwrite" in r.stderr, r.stderr
    assert load_artifact(dest, s3.storage).sha256 == art.sha256
    r = cli(*again, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert load_artifact(dest, s3.storage).card.id == "prod-v2"
    model, _ = build_embedding_model(art)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), nn.functional.normalize(scripted(x), dim=1))

    (tmp_path / "junk.pt").write_bytes(b"\x00" * 64)
    r = cli("model", "import", str(tmp_path / "junk.pt"), str(tmp_path / "a.pt"), "--id", "x")
    assert (
        r.returncode == 2 and "junk.pt: not a TorchScript model" in r.stderr and "Traceback" not in r.stderr
    )

    class Map(nn.Module):  # outputs a feature map, not (n, d) embeddings
        def forward(self, x):
            return x * 2

    torch.jit.script(Map()).save(str(tmp_path / "map.pt"))
    r = cli("model", "import", str(tmp_path / "map.pt"), str(tmp_path / "a.pt"), "--id", "x", "--size", "16")
    assert r.returncode == 2 and "not an (n, d) matrix" in r.stderr, r.stderr


def test_a_scripted_torchvision_model_imports_as_deployed(tmp_path):
    """A torchvision ResNet as production ships it: classifier cut, scripted."""
    torch.manual_seed(3)
    net = torchvision.models.resnet18(weights=None)
    net.fc = nn.Identity()
    net.eval()
    torch.jit.script(net).save(str(tmp_path / "r18.ts"))
    card = import_model_artifact(str(tmp_path / "r18.ts"), str(tmp_path / "old.pt"), model_id="r18", size=64)
    assert card.dim == 512 and card.source == "torchscript" and not card.has_classifier
    model, head = build_embedding_model(load_artifact(str(tmp_path / "old.pt")))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), nn.functional.normalize(net(x), dim=1))
    assert head is None


def test_an_imported_model_embeds_a_gallery_as_in_production(ray_local, tmp_path):
    """Ray Data embeds with the card's preprocessing and input size: the same vectors as the
    scripted network on images prepared the same way by hand."""
    torch.manual_seed(1)
    scripted = torch.jit.script(TinyNet().eval())
    scripted.save(str(tmp_path / "tiny.pt"))
    import_model_artifact(
        str(tmp_path / "tiny.pt"),
        str(tmp_path / "old.pt"),
        model_id="prod-v1",
        channels=1,
        size=24,
        mean=[0.3],
        std=[0.2],
    )
    data = tmp_path / "digits"
    import_digits(str(data), image_size=16)
    m = embed_to_gallery(str(data / "query"), str(tmp_path / "old.pt"), str(tmp_path / "g"), dtype="float32")
    assert m.model.model_id == "prod-v1" and m.model.dim == 6
    t = Gallery.open(str(tmp_path / "g")).read()
    import pyarrow.parquet as pq

    imgs = pq.read_table(str(data / "query")).sort_by("id")
    x = DecodeBatch(16, 1, mean=(0.3,), std=(0.2,), out_size=24)(imgs)["image"]
    assert x.shape[-1] == 24
    with torch.no_grad():
        want = nn.functional.normalize(scripted(torch.from_numpy(x)), dim=1).numpy()
    order = np.argsort(t.column("id").to_numpy())
    np.testing.assert_allclose(embedding_matrix(t.column("embedding"))[order], want, atol=1e-5)


def test_an_imported_old_model_trains_l2(ray_local, tmp_path):
    from test_train import config

    from dmu_ray.train.job import run_training

    torch.manual_seed(2)
    torch.jit.script(TinyNet(dim=32).eval()).save(str(tmp_path / "deployed.pt"))
    old = str(tmp_path / "old.pt")
    import_model_artifact(
        str(tmp_path / "deployed.pt"), old, model_id="prod-v1", channels=1, size=24, mean=[0.4], std=[0.3]
    )
    data = tmp_path / "digits"
    import_digits(str(data), image_size=16)
    out = run_training(
        config(
            "l2",
            str(tmp_path / "runs"),
            str(data),
            optim={"epochs": 1},
            method={"name": "l2", "old_model": old},
        ),
        progress=False,
    )
    card = load_artifact(out["model"]).card
    assert (
        card.method == "l2" and card.old_model["id"].startswith("prod-v1@") and out["metrics"]["compat"] > 0
    )
    # l2 on Ray Train (this was also test_registries' own l2 run): the old model by its URI, no psi
    assert card.old_model["uri"] == load_artifact(old).uri and "upgrade_module" not in out
