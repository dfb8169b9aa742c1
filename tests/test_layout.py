"""The layout's promises: every command-line flag kept, SARSA = IQL with expectile 0.5 line for line, one home per
concern, and a forked script that runs on its own beside envs.py, runs.py and testtime.py."""

import contextlib
import difflib
import io
import json
import re
import shutil
import subprocess
import sys

import pytest
import tyro
from conftest import POINTMAZE, ROOT
from test_algos import SCRIPTS, load

import analyze
import runs
import scaling

EXPECTED_FLAGS = json.loads((ROOT / "tests" / "cli_flags.json").read_text())  # as --help listed them before the split


def help_flags(config_class, **kwargs) -> list[str]:
    """The flags --help lists for a tyro dataclass (in process: the same parser the command line gets)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        tyro.cli(config_class, args=["--help"], **kwargs)
    flags = set()
    for line in out.getvalue().splitlines():
        match = re.match(r"(?:│ |  )(--?[-\w]+(?:, --?[-\w]+)*)", line)  # a flag opening its row, not a mention
        if match:
            flags.update(flag.strip() for flag in match.group(1).split(","))
    return sorted(flags - {"-h", "--help"})


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_keeps_every_flag(script):
    assert help_flags(load(script).Config) == EXPECTED_FLAGS[script]


def test_scaling_and_analyze_keep_every_flag():
    assert help_flags(scaling.Args) == EXPECTED_FLAGS["scaling"]
    assert help_flags(analyze.Args) == EXPECTED_FLAGS["analyze"]


def test_help_from_the_command_line_lists_the_flattened_harness_flags():
    proc = subprocess.run([sys.executable, str(ROOT / "algos" / "bc.py"), "--help"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0 and "--log-interval" in proc.stdout and "--harness" not in proc.stdout


@pytest.mark.parametrize("extractor", ["awr", "ddpgbc", "sfbc"])
def test_sarsa_is_iql_with_the_expectile_fixed_at_one_half(extractor):
    """Every line that differs between sarsa_X.py and iql_X.py names the expectile or the script."""
    iql = (ROOT / "algos" / f"iql_{extractor}.py").read_text().splitlines()
    sarsa = (ROOT / "algos" / f"sarsa_{extractor}.py").read_text().splitlines()
    changed = [line for line in difflib.unified_diff(iql, sarsa, lineterm="", n=0)
               if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    assert changed, "the two files are identical: SARSA must fix the expectile at 0.5"
    unexplained = [line for line in changed if not re.search(r"expectile|iql|sarsa", line, re.IGNORECASE)]
    assert not unexplained, unexplained
    assert load(f"sarsa_{extractor}").EXPECTILE == 0.5 and not hasattr(load(f"sarsa_{extractor}").Config, "expectile")


def test_each_concern_has_one_home():
    """envs.py knows nothing of run folders, exit codes or test-time methods; analyze.py and scaling.py take the
    result schema and script names from runs.py instead of declaring them again."""
    env_source = (ROOT / "envs.py").read_text()
    for name in ("class RunFolder", "class Members", "def exit_on_usage_error", "class UsageError", "class TestTime",
                 "def opex_actions", "RESULT_METRICS =", "RESUME_DIR =", "def write_atomic"):
        assert name not in env_source, name
    for module in ("scaling.py", "analyze.py", "benchmarks/throughput.py"):
        source = (ROOT / module).read_text()
        for declared in ("SCRIPTS = [", "TEST_TIME_METHODS = (", "EXTRACTORS = (", "DIVERGED_EXIT = "):
            assert declared not in source, (module, declared)
    assert scaling.SCRIPTS is runs.SCRIPTS and analyze.TEST_TIME_METHODS is runs.TEST_TIME_METHODS


def test_a_forked_script_runs_from_a_folder_of_its_own(data_dir, tmp_path):
    """README's "Fork a script": one script plus envs.py, runs.py and testtime.py in a fresh folder, and it trains,
    evaluates and writes its run folder there, importing the copies beside it."""
    fork = tmp_path / "my_project"
    fork.mkdir()
    for name in ("algos/iql_awr.py", "envs.py", "runs.py", "testtime.py"):
        shutil.copy(ROOT / name, fork)
    flags = ["--env", POINTMAZE, "--dataset-dir", str(data_dir), "--steps", "50", "--log-interval", "50",
             "--hidden-dims", "16", "--batch-size", "32", "--eval-episodes", "1", "--mse-samples", "32",
             "--eval-max-steps", "50", "--out-dir", "run", "--no-progress"]
    code = ("import runpy, sys; sys.argv = ['iql_awr.py', *sys.argv[1:]]; sys.path.insert(0, '.'); "
            "runpy.run_path('iql_awr.py', run_name='__main__'); "
            "print('imported', *(sys.modules[m].__file__ for m in ('envs', 'runs', 'testtime')))")
    proc = subprocess.run([sys.executable, "-c", code, *flags], capture_output=True, text=True, cwd=fork, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    imported = proc.stdout.split("imported", 1)[1].split()
    assert all(path.startswith(str(fork)) for path in imported), imported  # the copies, not the repository's
    result = json.loads((fork / "run" / "result.json").read_text())
    assert result["script"] == "iql_awr" and result["steps"] == 50 and 0 <= result["success"]["mean"] <= 1
