"""algos/iql_ddpgbc.py: losses against hand-computed values, invariants, run folders, determinism, learning."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import POINTMAZE, run_script

import envs
from algos import iql_ddpgbc as algo


def _constant(params, value):
    """Make an MLP output `value` everywhere: zero last-layer weights, bias = value."""
    last = dict(params[-1])
    last["w"] = jnp.zeros_like(last["w"])
    last["b"] = jnp.full_like(last["b"], value)
    return params[:-1] + [last]


def _hand_params():
    params = algo.init_params(jax.random.PRNGKey(0), obs_dim=2, goal_dim=0, action_dim=2, hidden_dims=(8,))
    params["value"] = _constant(params["value"], -3.0)
    q1 = _constant(jax.tree_util.tree_map(lambda x: x[0], params["critic"]), -2.0)
    q2 = _constant(jax.tree_util.tree_map(lambda x: x[1], params["critic"]), -4.0)
    params["critic"] = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), q1, q2)
    params["actor"] = _constant(params["actor"], math.atanh(0.5))  # mu(s) = 0.5 everywhere
    return params


BATCH = {"observations": jnp.array([[0.1, 0.2], [0.3, -0.4]]), "next_observations": jnp.array([[0.0, 0.0], [1.0, 1.0]]),
         "actions": jnp.array([[0.0, 1.0], [0.0, 1.0]]), "rewards": jnp.array([-1.0, -1.0]),
         "masks": jnp.array([1.0, 0.0])}


def test_expectile_loss_by_hand():
    diff = jnp.array([-2.0, 1.0])
    np.testing.assert_allclose(algo.expectile_loss(diff, 0.9), [0.1 * 4, 0.9 * 1], rtol=1e-6)
    np.testing.assert_allclose(algo.expectile_loss(diff, 0.5), [0.5 * 4, 0.5 * 1], rtol=1e-6)


def test_value_critic_actor_losses_by_hand():
    p = _hand_params()
    # Qbar = min(-2, -4) = -4, V = -3: diff = -1 < 0, weight 1 - 0.9.
    loss, _ = algo.value_loss(p["value"], p["critic"], BATCH, 0.9)
    np.testing.assert_allclose(loss, 0.1, rtol=1e-5)
    # targets: -1 + 0.5 * 1 * (-3) = -2.5 and -1 + 0 = -1; Q1 = -2, Q2 = -4.
    loss, _ = algo.critic_loss(p["critic"], p["value"], BATCH, 0.5)
    expected = np.mean([0.5**2, 1.0**2]) + np.mean([1.5**2, 3.0**2])
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    # -mean(Q)/mean|Q| = -(-4)/4 = 1; BC: 0.5 * ((0.5-0)^2 + (0.5-1)^2) = 0.25; alpha 2 -> 1 + 0.5.
    loss, info = algo.ddpgbc_actor_loss(p["actor"], p["critic"], BATCH, 2.0)
    np.testing.assert_allclose(loss, 1.5, rtol=1e-5)
    np.testing.assert_allclose(info["policy_mse_to_data"], 0.25, rtol=1e-5)  # mean of 0.5^2 and 0.5^2


def _tiny_state_and_data(data_dir):
    spec = envs.parse_env(POINTMAZE)
    train, _ = envs.split_dataset(envs.load_dataset(spec, str(data_dir)), seed=0)
    config = algo.Config(hidden_dims=(16,), batch_size=32)
    state = algo.init_state(jax.random.PRNGKey(0), 2, 2, 2, config)
    return config, state, envs.to_device(train)


def test_actor_loss_never_moves_value_or_critic(data_dir):
    config, state, data = _tiny_state_and_data(data_dir)
    step = jax.jit(lambda s, m: algo.update(s, data, m, config, True))
    outs = [step(state, {"value_data_size": 3000, "policy_data_size": p, "alpha": a})[0]
            for p, a in ((3000, 0.01), (500, 10.0))]
    for key in ("value", "critic"):
        for a, b in zip(jax.tree_util.tree_leaves(outs[0]["params"][key]), jax.tree_util.tree_leaves(outs[1]["params"][key])):
            np.testing.assert_array_equal(a, b)
    actor_leaves = zip(jax.tree_util.tree_leaves(outs[0]["params"]["actor"]), jax.tree_util.tree_leaves(outs[1]["params"]["actor"]))
    assert any(not np.array_equal(a, b) for a, b in actor_leaves)
    # and the actor's gradient with respect to the critic is not even part of the update
    grads = jax.grad(algo.ddpgbc_actor_loss, argnums=0, has_aux=True)(state["params"]["actor"], state["params"]["critic"],
                                                                     envs.sample_batch(jax.random.PRNGKey(1), data, 100, 8, "actor"), 1.0)[0]
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(state["params"]["actor"])


def _common(out_dir, data_dir, *extra):
    return ["--dataset-dir", str(data_dir), "--steps", "200", "--log-interval", "100", "--eval-interval", "200",
            "--hidden-dims", "32", "32", "--batch-size", "64", "--eval-episodes", "1", "--mse-samples", "256",
            "--out-dir", str(out_dir), "--no-progress", *extra]


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
    # three members are three different networks: their MSEs differ
    assert len(set(result["train_mse"]["per_member"])) == 3
    assert len(set(result["eval_mse"]["per_member"])) == 3


def test_same_seed_gives_identical_results_on_cpu(data_dir, tmp_path):
    results = []
    for name in ("a", "b"):
        config = algo.Config(env=POINTMAZE, **{k.replace("-", "_"): v for k, v in (
            ("dataset_dir", str(data_dir)), ("steps", 200), ("log_interval", 100), ("eval_interval", 200),
            ("hidden_dims", (32, 32)), ("batch_size", 64), ("eval_episodes", 1), ("mse_samples", 256),
            ("out_dir", str(tmp_path / name)), ("progress", False), ("seed", 7))})
        algo.main(config)
        results.append(json.loads((tmp_path / name / "result.json").read_text()))
    for key in ("success", "return", "train_mse", "val_mse", "eval_mse"):
        assert results[0][key] == results[1][key]


@pytest.mark.parametrize("env", ["pointmaze-medium-navigate-singletask-v0", "walker-run-random"])
def test_smoke_reward_based_envs(data_dir, tmp_path, env):
    config = algo.Config(env=env, dataset_dir=str(data_dir), steps=100, log_interval=100, eval_interval=100,
                         hidden_dims=(32,), batch_size=32, eval_episodes=1, mse_samples=128,
                         out_dir=str(tmp_path / "run"), progress=False)
    result = algo.main(config)
    assert math.isfinite(result["return"]["mean"])
    if env.startswith("walker"):  # no oracle: the MSE metrics say so instead of inventing a number
        assert result["eval_mse"]["mean"] == "n/a" and result["train_mse"]["mean"] == "n/a"
    else:
        _finite(result, ["train_mse", "val_mse", "eval_mse"])


def test_bad_inputs_exit_2_with_one_line(data_dir, tmp_path):
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
        proc = run_script("algos/iql_ddpgbc.py", *args, *extra)
        assert proc.returncode == 2, (extra, proc.stderr[-2000:])
        assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert not (out / "result.json").exists()


def test_learning_lowers_validation_mse(data_dir, tmp_path):
    config = algo.Config(env=POINTMAZE, dataset_dir=str(data_dir), steps=1500, log_interval=500, eval_interval=1500,
                         hidden_dims=(64, 64), batch_size=128, eval_episodes=1, mse_samples=512, alpha=1.0,
                         out_dir=str(tmp_path / "run"), progress=False)
    result = algo.main(config)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    initial = next(r for r in records if r["event"] == "init")["val_mse"]
    final = result["val_mse"]["mean"]
    assert final < 0.6 * initial, (initial, final)
