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

import numpy as np
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


def test_a_renamed_fork_with_a_new_loss_trains_evaluates_sweeps_and_analyses(data_dir, tmp_path):
    """Issue 37's fork, as the README says: copy one script and the three modules, rename it, change its critic target
    to read the next action, and use it with no --alpha and no edit of a shared module: train, evaluate.py, a
    scaling.py sweep of 2 members x 2 value sizes, analyze.py. Every step succeeds with finite numbers."""
    fork = tmp_path / "myexp"
    fork.mkdir()
    for name in ("envs.py", "runs.py", "testtime.py"):
        shutil.copy(ROOT / name, fork)
    source = (ROOT / "algos" / "iql_ddpgbc.py").read_text()
    renamed = source.replace('SCRIPT, TABLE_ROW = "iql_ddpgbc", "iql_ddpgbc"',
                             'SCRIPT, TABLE_ROW = "iql_nextq", "iql_ddpgbc"')  # a new name; iql_ddpgbc's table row
    old_target = '    next_v = value_fn(value_params, batch["next_observations"], batch.get("goals"))\n'
    new_target = ('    s2, g = batch["next_observations"], batch.get("goals")\n'
                  '    next_q = critic_fn(critic_params, s2, g, batch["next_actions"]).min(0)  # SARSA: Q(s2, a2)\n'
                  '    next_v = 0.5 * (value_fn(value_params, s2, g) + jax.lax.stop_gradient(next_q))\n')
    assert renamed != source and source.count(old_target) == 1
    script = fork / "iql_nextq.py"
    script.write_text(renamed.replace(old_target, new_target))
    tiny = ["--hidden-dims", "16", "--batch-size", "32", "--eval-episodes", "1", "--mse-samples", "32",
            "--eval-max-steps", "50", "--log-interval", "50", "--no-progress"]
    run = fork / "run"
    proc = subprocess.run([sys.executable, str(script), "--env", POINTMAZE, "--dataset-dir", str(data_dir), "--steps",
                           "100", "--checkpoint-interval", "100", "--out-dir", str(run), *tiny],
                          capture_output=True, text=True, cwd=fork, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # its first line says which values came from the table (iql_ddpgbc's row, the script's TABLE_ROW) and from where
    assert f"iql_nextq on {POINTMAZE}, from envs.HYPERPARAMETERS: --alpha 0.003 (reference)" in proc.stderr
    config = json.loads((run / "config.json").read_text())
    assert config["config"]["alpha"] == 0.003 and config["from_table"]["alpha"].startswith("0.003")  # iql_ddpgbc's
    assert config["script_path"] == str(script.resolve())
    result = json.loads((run / "result.json").read_text())
    assert result["script"] == "iql_nextq" and all(
        np.isfinite(result[k]["mean"]) for k in ("success", "train_mse", "val_mse", "eval_mse"))
    # evaluate.py finds the fork's file from config.json and repeats the run's numbers
    proc = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), str(run), "--dataset-dir", str(data_dir)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    evaluation = json.loads(next(run.glob("eval_*.json")).read_text())
    assert evaluation["script"] == "iql_nextq"
    for key in runs.RESULT_METRICS:
        assert evaluation[key]["per_member"] == result[key]["per_member"], key
    # a sweep of the fork by its path: 2 seeds x 2 value sizes, packed, then analysed in a row and column of its own
    sweep = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, str(ROOT / "scaling.py"), "--envs", POINTMAZE, "--scripts", str(script),
                           "--value-sizes", "2000", "4000", "--seeds", "0", "1", "--steps", "100", "--pack", "4",
                           "--dataset-dir", str(data_dir), "--sweep-dir", str(sweep), "--no-progress", "--", *tiny,
                           "--eval-interval", "100"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    folders = sorted(p.parent.name for p in sweep.rglob("result.json"))
    assert folders == ["v2000_pall_s0", "v2000_pall_s1", "v4000_pall_s0", "v4000_pall_s1"]
    analyze.main(analyze.Args(sweep_dir=str(sweep), out=str(tmp_path / "analysis"), only=("table", "matrices")))
    table = (tmp_path / "analysis" / "table.md").read_text()
    assert "| env | metric | value | awr | ddpgbc | sfbc | nextq | bc |" in table
    [row] = [r for r in json.loads((tmp_path / "analysis" / "summary.json").read_text())["table"]
             if r["kind"] == "final"]
    assert row["value"] == "iql" and np.isfinite(row["nextq"]["mean"]) and row["ddpgbc"] is None
