"""algos/iql_ddpgbc.py, the first script, through its command line: run folders, seeds, determinism, bad input,
learning. (Losses and invariants of every script: test_algos.py.)"""

import json
import math

import numpy as np
import pytest
from conftest import POINTMAZE, run_in_process, run_script

import runs

from algos import iql_ddpgbc as algo


def _common(out_dir, data_dir, *extra):
    return ["--dataset-dir", str(data_dir), "--steps", "200", "--log-interval", "100", "--eval-interval", "200",
            "--hidden-dims", "32", "32", "--batch-size", "64", "--eval-episodes", "1", "--mse-samples", "256",
            "--eval-max-steps", "50", "--out-dir", str(out_dir), "--no-progress", *extra]


def _finite(result, keys):
    for key in keys:
        for v in result[key]["per_member"]:
            assert math.isfinite(v), (key, v)


def test_smoke_cli_three_seeds_writes_a_complete_run_folder(data_dir, tmp_path):
    out = tmp_path / "run"
    proc = run_script("algos/iql_ddpgbc.py", "--env", POINTMAZE, "--num-seeds", "3", "--value-data-size", "3000",
                      *_common(out, data_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "final success" in proc.stdout and "eval MSE" in proc.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["num_seeds"] == 3 and config["versions"]["jax"] != "absent"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["event"] for r in records} == {"init", "train", "eval"}
    assert all(r["updates_per_second"] > 0 for r in records if r["event"] == "train")
    result = json.loads((out / "result.json").read_text())
    assert result["seeds"] == [0, 1, 2] and result["value_data_size"] == 3000
    _finite(result, ["success", "return", "train_mse", "val_mse", "eval_mse"])
    # each evaluation task's success per member (analyze.py's bootstrap strata), and the overall success their mean
    tasks = [f"task{t}_success" for t in range(1, 6)]
    assert [k for k in result if k.startswith("task")] == tasks
    assert np.allclose(np.mean([result[k]["per_member"] for k in tasks], 0), result["success"]["per_member"])
    # three members are three different networks: their MSEs differ
    assert len(set(result["train_mse"]["per_member"])) == 3
    assert len(set(result["eval_mse"]["per_member"])) == 3


@pytest.mark.parametrize("env", ["pointmaze-medium-navigate-singletask-v0", "walker-run-random"])
def test_smoke_reward_based_envs(data_dir, tmp_path, env):
    config = runs.make_config(algo.Config, env=env, dataset_dir=str(data_dir), steps=100, log_interval=100,
                              eval_interval=100, hidden_dims=(32,), batch_size=32, eval_episodes=1, mse_samples=128,
                              eval_max_steps=50, out_dir=str(tmp_path / "run"), progress=False)
    [result] = algo.main(config)
    assert math.isfinite(result["return"]["mean"])
    # the flags left unset came from the dataset's row of the table, and config.json says so (the given ones did not)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    alpha = 0.003 if env.startswith("pointmaze") else 0.3  # the reference's tuned pointmaze alpha; GCIQL's default
    assert saved["from_table"] == {"alpha": f"{alpha} (reference)", "discount": "0.99 (reference)",
                                   "actor_p_randomgoal": "0.0 (reference)"}
    assert saved["config"]["alpha"] == alpha and saved["config"]["eval_episodes"] == 1
    if env.startswith("walker"):  # no oracle: the MSE metrics say so instead of inventing a number
        assert result["eval_mse"]["mean"] == "n/a" and result["train_mse"]["mean"] == "n/a"
    else:
        _finite(result, ["train_mse", "val_mse", "eval_mse"])


def test_bad_inputs_exit_2_with_one_line(data_dir, tmp_path, capsys):
    cases = [
        (["--env", "pointmaze-medium-navigat-v0"], "did you mean pointmaze-medium-navigate-v0"),
        (["--env", "cube-double-play-v0"], "python envs.py generate cube-double-play-v0"),
        (["--env", POINTMAZE, "--value-data-size", "10000000"], "--value-data-size 10000000 is out of range"),
        (["--env", POINTMAZE, "--policy-data-size", "0"], "--policy-data-size 0 is out of range"),
        (["--env", POINTMAZE, "--steps", "150"], "multiple of --log-interval"),
        (["--env", POINTMAZE, "--expectile", "1.5"], "--expectile must be in (0, 1)"),
    ]
    for extra, message in cases:
        out = tmp_path / "bad"
        args = _common(out, data_dir)
        args = [a for a in args]  # the case's flags come last and win
        code, stderr = run_in_process("algos/iql_ddpgbc.py", [*args, *extra], capsys)
        assert code == 2, (extra, stderr[-2000:])
        assert message in stderr and len(stderr.strip().splitlines()) == 1, stderr
        assert not (out / "result.json").exists()


def test_learning_lowers_validation_mse(data_dir, tmp_path):
    # 3000 steps: the reference's actor starts from a 0.01-scaled output layer and learns more slowly at first
    config = runs.make_config(algo.Config, env=POINTMAZE, dataset_dir=str(data_dir), steps=3000, log_interval=1000,
                              eval_interval=3000, hidden_dims=(64, 64), batch_size=128, eval_episodes=1,
                              mse_samples=512, eval_max_steps=50, alpha=1.0, out_dir=str(tmp_path / "run"),
                              progress=False)
    [result] = algo.main(config)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    initial = next(r for r in records if r["event"] == "init")["val_mse"]
    final = result["val_mse"]["mean"]
    assert final < 0.6 * initial, (initial, final)
