"""Refresh or check requirements.lock: every package of the core install and the test extra, pinned, with hashes.

    python -m pip install uv && python .ci/lock.py     # refresh: resolve pyproject.toml again (needs PyPI)
    python .ci/lock.py --check                          # offline: does the lock still match pyproject.toml?

The lock is one pip-readable file for Python 3.10 - 3.12 on any platform (uv's universal resolution: where the newest
release of a package differs by Python version, one pin per version behind an environment marker). Its header holds
a digest of the requirements it was resolved from; --check (run by tests/test_lock.py in the suite) fails when
pyproject.toml's requirements changed since (the digest), or when a pin does not satisfy its requirement or is
missing for one of the Pythons it covers. README.md installs from it: `pip install -r requirements.lock` and then
`pip install --no-deps -e .`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the lock installs tomli there (pytest needs it)
    import tomli as tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from runs import locked_pins  # noqa: E402  (the parser config.json's record uses too)

LOCK_NAME = "requirements.lock"  # runs.REQUIREMENTS_LOCK
PYTHONS = ("3.10", "3.11", "3.12")  # the Pythons the lock is resolved for (the lowest is --python-version)
EXTRAS = ("test",)  # the core install plus these extras
REFRESH = "python .ci/lock.py"
DIGEST = re.compile(r"^# requirements digest: ([0-9a-f]{64})$", re.M)


def requirements(pyproject: Path) -> tuple[str, list[str]]:
    """requires-python and the requirement strings the lock covers, as pyproject.toml writes them."""
    project = tomllib.loads(pyproject.read_text())["project"]
    extras = project.get("optional-dependencies", {})
    return project["requires-python"], [*project["dependencies"], *(r for e in EXTRAS for r in extras.get(e, ()))]


def digest(pyproject: Path) -> str:
    """sha256 of what the lock was resolved from: any edit of a requirement or of requires-python changes it."""
    python, reqs = requirements(pyproject)
    return hashlib.sha256(json.dumps({"requires-python": python, "extras": EXTRAS, "requirements": reqs},
                                     sort_keys=True).encode()).hexdigest()


def problems(root: Path = ROOT) -> list[str]:
    """Why the lock in `root` does not match its pyproject.toml (empty: it does). Offline."""
    lock, pyproject = root / LOCK_NAME, root / "pyproject.toml"
    if not lock.exists():
        return [f"{lock} is missing: refresh it with `{REFRESH}`"]
    text, out = lock.read_text(), []
    recorded = DIGEST.search(text)
    if not recorded or recorded[1] != digest(pyproject):
        out.append(f"pyproject.toml's requirements changed since {LOCK_NAME} was resolved (its digest differs): "
                   f"refresh it with `{REFRESH}`")
    for python in PYTHONS:
        pinned = locked_pins(text, python)
        env = {"python_version": python, "python_full_version": f"{python}.0", "extra": ""}
        for line in requirements(pyproject)[1]:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            name = canonicalize_name(req.name)
            if name not in pinned:
                out.append(f"Python {python}: {req.name} is not pinned in {LOCK_NAME}")
            elif not req.specifier.contains(pinned[name], prereleases=True):
                out.append(f"Python {python}: {req.name}=={pinned[name]} does not satisfy {line!r}")
    return out


def refresh(root: Path = ROOT, uv_args: tuple[str, ...] = ()) -> None:
    """Resolve pyproject.toml again with uv (needs PyPI) and write the lock with its digest. uv keeps the versions
    the lock already pins unless pyproject.toml rules them out; `uv_args` go to uv (`--upgrade`: the newest of all)."""
    lock = root / LOCK_NAME
    subprocess.run(["uv", "pip", "compile", "pyproject.toml", *(f"--extra={e}" for e in EXTRAS), "--universal",
                    f"--python-version={PYTHONS[0]}", "--generate-hashes", "--no-header", "--quiet",
                    f"--output-file={lock}", *uv_args], cwd=root, check=True)
    header = (f"# The pinned install of offrl-bottlenecks (core + {', '.join(EXTRAS)}), Python "
              f"{PYTHONS[0]}-{PYTHONS[-1]}, any platform.\n"
              f"# Install: pip install -r {LOCK_NAME} && pip install --no-deps -e .\n"
              f"# Made by `{REFRESH}` (uv pip compile --universal --generate-hashes); do not edit by hand.\n"
              f"# requirements digest: {digest(root / 'pyproject.toml')}\n")
    lock.write_text(header + lock.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Other flags go to uv pip compile.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="check the lock against pyproject.toml (offline)")
    args, uv_args = parser.parse_known_args()
    if not args.check:
        refresh(uv_args=tuple(uv_args))
    found = problems()
    for line in found:
        print(line, file=sys.stderr)
    print(f"{LOCK_NAME}: " + ("does not match pyproject.toml" if found else "matches pyproject.toml"))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
