"""The house's layers hold: the import-linter contract in pyproject.toml (cli/config -> ... ->
settings -> schema) passes on the package, and fails, naming the import, on a copy of the package
with one import that climbs a layer."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = str(Path(sys.executable).parent / "lint-imports")


def lint(where: Path, package_parent: Path) -> subprocess.CompletedProcess:
    env = {"PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(package_parent)}
    return subprocess.run(
        [LINT, "--config", str(where / "pyproject.toml"), "--no-cache"],
        cwd=where,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def test_the_layers_contract_holds():
    r = lint(ROOT, ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "dmu-ray layers KEPT" in r.stdout


def test_an_import_that_climbs_a_layer_breaks_the_contract(tmp_path):
    shutil.copytree(ROOT / "dmu_ray", tmp_path / "dmu_ray", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    storage = tmp_path / "dmu_ray" / "storage.py"
    text = storage.read_text()
    storage.write_text(
        text + "\n\ndef _climb():\n    from dmu_ray.refresh.job import run_refresh  # noqa: F401\n"
    )
    r = lint(tmp_path, tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "dmu-ray layers BROKEN" in r.stdout
    assert "dmu_ray.storage -> dmu_ray.refresh.job" in r.stdout
