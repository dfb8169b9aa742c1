"""Shared fixtures: tiny datasets generated offline once per session (no network anywhere)."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MUJOCO_GL", "egl")

import envs  # noqa: E402

POINTMAZE = "pointmaze-medium-navigate-v0"


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """One folder holding a small pointmaze dataset (30 + 3 episodes of 200 steps), a tiny cube-single-noisy one
    and a tiny random-walker ExORL buffer."""
    root = tmp_path_factory.mktemp("datasets")
    envs.generate(envs.parse_env(POINTMAZE), str(root), num_episodes=30, max_episode_steps=200, seed=0, progress=False)
    envs.generate(envs.parse_env("cube-single-noisy-v0"), str(root), num_episodes=2, max_episode_steps=60, seed=0,
                  progress=False)
    envs.generate(envs.parse_env("walker-run-random"), str(root), num_episodes=3, max_episode_steps=40, seed=0,
                  progress=False)
    return root


def run_script(script: str, *args: str, timeout: int = 600):
    """Run a repository script as a user would; returns the CompletedProcess."""
    import subprocess

    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
