"""Shared fixtures: tiny datasets generated offline once per session (no network anywhere)."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# MUJOCO_GL is envs.py's to choose (egl where EGL works, else disable; imported below), not the suite's.
# Nothing at test time touches the network: no dataset is downloaded (the download tests serve files on loopback).
os.environ["OFFRL_NO_DOWNLOAD"] = "1"
# One JAX compilation cache for the suite's processes (both workers and every script they start): most tests compile
# the same small programs, and a cached program is the same executable, so no number changes. Kept between runs in
# .pytest_cache (git-ignored); set JAX_COMPILATION_CACHE_DIR to use another folder.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(ROOT / ".pytest_cache" / "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

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


def run_in_process(entry: str, args: list[str], capsys) -> tuple[int, str]:
    """(exit status, stderr) of an entry point called in this process as its `__main__` calls it: the same code as
    `run_script` without a JAX start-up each (`capsys`: pytest's fixture). One subprocess per entry point, in
    tests/test_reliability.py, proves the path from the exception to the process's exit status."""
    import importlib

    import tyro

    import runs

    if entry == "envs.py":
        call = lambda: envs.main(args)  # noqa: E731
    elif entry == "scaling.py":
        scaling = importlib.import_module("scaling")
        call = lambda: sys.exit(scaling.main(args))  # noqa: E731
    elif entry == "analyze.py":
        analyze = importlib.import_module("analyze")
        call = lambda: analyze.main(tyro.cli(analyze.Args, args=args))  # noqa: E731
    elif entry == "evaluate.py":
        evaluate = importlib.import_module("evaluate")
        call = lambda: evaluate.main(tyro.cli(evaluate.Args, args=args))  # noqa: E731
    else:
        module = importlib.import_module(entry[:-3].replace("/", "."))
        call = lambda: module.main(tyro.cli(module.Config, args=args))  # noqa: E731
    capsys.readouterr()
    try:
        runs.exit_on_usage_error(call)
        code = 0
    except SystemExit as stop:  # the exception (and any folder lock its frames hold) is released with this block
        code = stop.code
    return code, capsys.readouterr().err
