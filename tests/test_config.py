from pathlib import Path

import pytest

from dmu_ray.config import ConfigError, RefreshConfig, StorageConfig, load_config

GOOD = """
source: s3://bucket/old
output: s3://bucket/new
module: s3://bucket/runs/r1/upgrade.pt
dtype: float16
pool: {min_actors: 1, max_actors: 4, num_cpus: 0.5}
storage: {endpoint_url: "http://127.0.0.1:9000", secret_access_key: hunter2, access_key_id: AKIA}
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "job.yaml"
    p.write_text(text)
    return p


def test_valid_config_loads(tmp_path):
    cfg = load_config(RefreshConfig, write(tmp_path, GOOD))
    assert cfg.pool.max_actors == 4 and cfg.dtype == "float16"
    assert cfg.storage.secret_access_key.get_secret_value() == "hunter2"
    assert "hunter2" not in repr(cfg) and "hunter2" not in str(cfg.model_dump())


@pytest.mark.parametrize(
    "text, field, words",
    [
        (GOOD + "colour: blue\n", "colour", "unknown key"),
        (GOOD.replace("num_cpus: 0.5", "num_cpus: lots"), "pool.num_cpus", "number"),
        (GOOD.replace("module: s3://bucket/runs/r1/upgrade.pt\n", ""), "module", "required field is missing"),
        (GOOD.replace("dtype: float16", "dtype: int8"), "dtype", "float16"),
        (GOOD.replace("max_actors: 4", "max_actors: 0"), "pool.max_actors", "greater than or equal to 1"),
        (
            GOOD.replace("min_actors: 1, max_actors: 4", "min_actors: 3, max_actors: 2"),
            "pool.max_actors",
            "min_actors",
        ),
        (GOOD.replace('"http://127.0.0.1:9000"', "127.0.0.1:9000"), "storage.endpoint_url", "http://"),
        (GOOD + "storage: {regoin: eu-west-1}\n", "storage.regoin", "unknown key"),
    ],
    ids=[
        "unknown-key",
        "wrong-type",
        "missing",
        "bad-literal",
        "bound",
        "cross-field",
        "endpoint",
        "nested-unknown",
    ],
)
def test_bad_config_names_file_and_field(tmp_path, text, field, words):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as ei:
        load_config(RefreshConfig, p)
    msg = str(ei.value)
    assert str(p) in msg
    assert f"  {field}: " in msg
    assert words in msg


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(RefreshConfig, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(RefreshConfig, write(tmp_path, "a: [1, 2\n"))
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(RefreshConfig, write(tmp_path, "- 1\n- 2\n"))


def test_storage_secrets_never_printed():
    s = StorageConfig(access_key_id="AKIAXXX", secret_access_key="topsecret")
    assert "topsecret" not in repr(s) and "AKIAXXX" not in repr(s)


def test_every_lifecycle_variant_can_be_asked_for():
    from dmu_ray.lifecycle import VARIANTS, LifecycleConfig, _train_cfg, variant_method

    lc = LifecycleConfig(methods=list(VARIANTS))
    assert lc.methods == list(VARIANTS)
    for name in VARIANTS:  # what the demo builds for each variant validates (e.g. no DMU field on BCT)
        cfg = _train_cfg(lc, f"{name}-s0", "new", variant_method(lc, name, "old.pt"), 1)
        assert cfg.method.name == VARIANTS[name]["name"], name


def test_a_refused_section_is_echoed_by_its_keys_not_cut_mid_string():
    """A check over a whole section (its input is the mapping) names the section's keys; a long
    value is cut at a whole width with an ellipsis, never mid-string without a mark."""
    from dmu_ray.adapters.config import AdapterFitConfig
    from dmu_ray.settings import parse_config

    data = {
        "old_gallery": "s3://acme/a/very/long/prefix/of/the/old/gallery/that/goes/on/and/on",
        "new_gallery": "s3://acme/b",
        "output": "out/x",
        "adapter": "procrustes",
        "ridge": 1.0,
    }
    with pytest.raises(ConfigError) as err:
        parse_config(AdapterFitConfig, data, "a.yaml")
    msg = str(err.value)
    assert "ridge and rank are options of adapter: affine" in msg
    assert "(got a section with old_gallery, new_gallery, output, adapter, ridge)" in msg
    with pytest.raises(ConfigError) as err:
        parse_config(AdapterFitConfig, {**data, "ridge": "x" * 200, "adapter": "affine"}, "a.yaml")
    assert "(got '" + "x" * 76 + "...)" in str(err.value)
    # ridge: auto (the affine fits' default), a number, nothing for procrustes or an mlp not started at affine
    assert (
        parse_config(AdapterFitConfig, {**data, "ridge": "auto", "adapter": "affine"}, "a.yaml").ridge
        == "auto"
    )
    assert (
        parse_config(AdapterFitConfig, {**data, "ridge": None, "adapter": "affine"}, "a.yaml").ridge_choice
        == "auto"
    )
    assert (
        parse_config(AdapterFitConfig, {**data, "ridge": 0.5, "adapter": "mlp"}, "a.yaml").ridge_choice == 0.5
    )
    for bad, words in (
        ({"ridge": 0}, "ridge and rank are options of adapter: affine"),
        ({"ridge": -1, "adapter": "affine"}, "ridge"),
        ({"ridge": 1.0, "adapter": "mlp", "mlp": {"init": "procrustes"}}, "here mlp.init is procrustes"),
        ({"tune": 1.5, "adapter": "affine"}, "tune"),
    ):
        with pytest.raises(ConfigError, match=words):
            parse_config(AdapterFitConfig, {**data, **bad}, "a.yaml")
    assert parse_config(AdapterFitConfig, {**data, "ridge": None}, "a.yaml").ridge_choice is None
