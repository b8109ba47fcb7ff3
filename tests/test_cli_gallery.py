"""The ``dmu-ray gallery`` commands, run as a user runs them: the installed console script."""

import json
import shutil
import subprocess

import numpy as np
import pytest

#: a safety net only (a command here takes seconds to a minute or two); generous for a busy 2-core box
CLI_TIMEOUT_S = 900


def run(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("dmu-ray")
    assert exe, "the dmu-ray console script is not installed (pip install -e '.[dev]')"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=CLI_TIMEOUT_S)


def test_import_then_inspect_on_s3(s3, tmp_path):
    np.save(tmp_path / "v.npy", np.random.default_rng(0).standard_normal((2100, 24)).astype(np.float32))
    uri = f"s3://{s3.bucket}/cli/gal"
    r = run(
        "gallery",
        "import",
        str(tmp_path / "v.npy"),
        uri,
        "--model-id",
        "old-r18",
        "--dtype",
        "float16",
        "--normalize",
        "--rows-per-file",
        "1000",
        "--endpoint-url",
        s3.endpoint,
    )
    assert r.returncode == 0, r.stderr
    assert "2,100 rows in 3 file(s)" in r.stdout
    r = run("gallery", "inspect", uri, "--endpoint-url", s3.endpoint)
    assert r.returncode == 0, r.stderr
    assert "rows: 2100" in r.stdout and "dim: 24" in r.stdout and "model_id=old-r18" in r.stdout
    assert "part-00002.parquet" in r.stdout
    info = json.loads(run("gallery", "inspect", uri, "--json", "--endpoint-url", s3.endpoint).stdout)
    assert info["rows"] == 2100 and info["dtype"] == "float16" and info["files"] == 3
    r = run("gallery", "validate", uri, "--endpoint-url", s3.endpoint)
    assert r.returncode == 0 and ": OK" in r.stdout, r.stdout + r.stderr
    # stderr is a pipe here, as in a log file: one line per progress update, none run together
    updates = [line for line in r.stderr.splitlines() if "checked" in line]
    assert len(updates) == 3 and "\r" not in r.stderr, r.stderr
    assert all(line.count("checked") == 1 for line in updates), r.stderr
    # credentials (from the AWS chain) never show up
    assert "testing" not in r.stdout + r.stderr


def test_validate_fails_on_a_damaged_gallery(s3, tmp_path):
    np.save(tmp_path / "v.npy", np.ones((50, 4), np.float32))
    uri = f"s3://{s3.bucket}/cli/damaged"
    assert (
        run(
            "gallery",
            "import",
            str(tmp_path / "v.npy"),
            uri,
            "--model-id",
            "m",
            "--endpoint-url",
            s3.endpoint,
        ).returncode
        == 0
    )
    s3.client().put_object(Bucket=s3.bucket, Key="cli/damaged/part-00000.parquet", Body=b"not parquet")
    r = run("gallery", "validate", uri, "--endpoint-url", s3.endpoint)
    assert r.returncode == 1
    assert "part-00000.parquet" in r.stdout and "problem:" in r.stdout


@pytest.mark.parametrize(
    "args, words",
    [
        (["gallery", "inspect", "/nonexistent/gal"], "does not exist"),
        (["gallery", "import", "/nonexistent.npy", "/tmp/x", "--model-id", "m"], "no such file"),
        (["gallery", "inspect", "gs://bucket/x"], "unsupported URI scheme"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(args, words):
    r = run(*args)
    assert r.returncode == 2 and words in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
