"""requirements.lock: it matches pyproject.toml (offline), the check fails when pyproject.toml changes without a
refreshed lock, and a run's config.json names the lock and every installed package that differs from its pins."""

import hashlib
import importlib.util
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

import runs

spec = importlib.util.spec_from_file_location("lock", ROOT / ".ci" / "lock.py")
lock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lock)


def copy_project(tmp_path):
    for name in ("pyproject.toml", "requirements.lock"):
        shutil.copy(ROOT / name, tmp_path / name)
    return tmp_path


def test_the_lock_matches_pyproject():
    result = subprocess.run([sys.executable, ".ci/lock.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "requirements.lock: matches pyproject.toml" in result.stdout


def test_the_lock_pins_every_requirement_for_each_python():
    text = (ROOT / "requirements.lock").read_text()
    for python in lock.PYTHONS:
        pinned = runs.locked_pins(text, python)
        assert {"jax", "jaxlib", "numpy", "mujoco", "ogbench", "pytest"} <= set(pinned), python
    # uv picks the newest release per Python where they differ: jax 0.10 needs Python >= 3.11
    assert runs.locked_pins(text, "3.10")["jax"] != runs.locked_pins(text, "3.11")["jax"]


@pytest.mark.parametrize("edit, expected", [
    (("tqdm>=4.60", "tqdm>=4.61"), "requirements changed since requirements.lock was resolved"),  # still satisfied
    (('"tqdm>=4.60",', '"tqdm>=4.60",\n    "rich>=13",'), "rich is not pinned"),
    (("jax>=0.4.30", "jax>=0.11"), "jax==0.10.2 does not satisfy 'jax>=0.11'"),
    (('requires-python = ">=3.10"', 'requires-python = ">=3.9"'), "requirements changed"),
])
def test_the_check_fails_when_pyproject_changes_without_a_refreshed_lock(tmp_path, edit, expected):
    root = copy_project(tmp_path)
    assert lock.problems(root) == []
    text = (root / "pyproject.toml").read_text()
    assert edit[0] in text
    (root / "pyproject.toml").write_text(text.replace(edit[0], edit[1]))
    found = lock.problems(root)
    assert any(expected in line for line in found), found


def test_a_missing_lock_is_a_problem(tmp_path):
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    assert lock.problems(tmp_path) == [f"{tmp_path / 'requirements.lock'} is missing: refresh it with "
                                       "`python .ci/lock.py`"]


def test_config_json_names_the_lock_and_what_differs_from_it(tmp_path):
    jax_line = "jax==0.0.1 ; python_full_version >= '3.0' \\\n    --hash=sha256:00\n"
    fake = tmp_path / "requirements.lock"
    fake.write_text("# a lock\n" + jax_line + "numpy==0.0.2 ; python_full_version < '3.0' \\\n")
    versions = runs.package_versions(fake)
    assert {"python", "jax", "jaxlib", "optax", "numpy", "mujoco", "ogbench", "dm_control"} <= set(versions)
    assert versions["lock"]["sha256"] == hashlib.sha256(fake.read_bytes()).hexdigest()
    # jax is pinned for this Python and differs; numpy's pin is for another Python and is not compared
    assert versions["lock"]["differs"] == {"jax": f"{versions['jax']} (locked 0.0.1)"}
    assert runs.package_versions(tmp_path / "absent.lock")["lock"] is None
    real = runs.package_versions()["lock"]
    assert real["file"] == "requirements.lock"
    assert real["sha256"] == hashlib.sha256((ROOT / "requirements.lock").read_bytes()).hexdigest()


def test_ci_installs_as_the_readme_says():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    install = ["python3 -m venv .venv", ". .venv/bin/activate", "pip install -r requirements.lock",
               "pip install --no-deps -e ."]
    assert " && ".join(install) + " && python envs.py generate" in readme
    lines = [line.strip() for line in ci.splitlines()]
    assert [line for line in lines if line in install] == install
