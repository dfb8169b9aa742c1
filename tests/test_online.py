"""Offline-to-online fine-tuning (--online-steps): the samplers treat a member's online rows as rows after its subset,
the buffer stores consistent transitions that do not depend on packing, every Q script trains value and policy on
its online rows, whole runs log on schedule with their offline phase untouched, and a run killed in the online phase
resumes to the uninterrupted numbers."""

import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import POINTMAZE, ROOT
from test_algos import Q_SCRIPTS, load, member
from test_reliability import SMALL, comparable, resumed_at, train_steps

import envs
import runs

OFFSET = 10_000  # online row j carries the id OFFSET + j in observation feature 0 (offline row i carries i)


def indexed_data(data_dir, data_size=200, capacity=50, filled=30, episode_end=11):
    """The pointmaze training split with row ids in observation / action feature 0, and one member's online rows:
    episode A = rows 0..episode_end (finished), episode B = the rest of the filled rows (still running)."""
    train, _ = envs.split_dataset(envs.load_dataset(envs.parse_env(POINTMAZE), str(data_dir)), seed=0)
    train = {k: v.copy() for k, v in train.items()}
    ids = np.arange(len(train["actions"]), dtype=np.float32)
    train["observations"][:, 0] = train["actions"][:, 0] = ids
    train["next_observations"][:, 0] = ids + 0.5
    online = {"observations": np.zeros((capacity, 2), np.float32), "actions": np.zeros((capacity, 2), np.float32),
              "rewards": np.zeros(capacity, np.float32), "masks": np.ones(capacity, np.float32)}
    online["observations"][:, 0] = online["actions"][:, 0] = OFFSET + np.arange(capacity)
    online["next_observations"] = online["observations"] + np.float32(0.5)
    online["final_idxs"] = np.where(np.arange(capacity) <= episode_end, episode_end, filled - 1).astype(np.int32)
    online = {k: jnp.asarray(v) for k, v in online.items()}
    online["size"] = jnp.asarray(filled, jnp.int32)
    return envs.to_device(train), online, data_size


def test_online_rows_follow_the_subset_and_goals_stay_inside_their_episode(data_dir):
    data, online, data_size = indexed_data(data_dir)
    filled, episode_end = int(online["size"]), 11
    for goals in ("actor", "value"):
        batch = envs.sample_batch(jax.random.PRNGKey(1), data, data_size, 40_000, goals, online=online)
        ids = np.asarray(batch["observations"][:, 0])
        is_online = ids >= OFFSET
        # every key of a row comes from that same row; never an unfilled online row or a row past the subset
        np.testing.assert_array_equal(np.asarray(batch["actions"][:, 0]), ids)
        np.testing.assert_array_equal(np.asarray(batch["next_observations"][:, 0]), ids + 0.5)
        assert ids[~is_online].max() < data_size and ids[is_online].max() < OFFSET + filled
        # uniform over the subset and the online rows: 30 of 230 rows are online (4 standard errors: 0.007)
        assert abs(is_online.mean() - filled / (data_size + filled)) < 0.007
        row, goal = ids[is_online] - OFFSET, np.asarray(batch["goals"][:, 0])[is_online]
        final = np.where(row <= episode_end, episode_end, filled - 1)
        if goals == "actor":  # the strict future of the same online episode (the last row itself at its end)
            assert (goal >= OFFSET).all()
            goal_row = goal - OFFSET
            assert ((goal_row > row) | (row == final)).all() and (goal_row <= final).all()
            assert (goal_row[row < episode_end] <= episode_end).all()  # episode A's goals never cross into B
        else:  # the current state, a future state of the same episode, or a random row of subset and online rows
            same_episode = (goal >= OFFSET + row) & (goal <= OFFSET + final)
            assert ((goal < data_size) | ((goal >= OFFSET) & (goal < OFFSET + filled))).all()
            assert 0.65 < same_episode.mean() < 0.8  # 20% current + 50% geometric + a few random hits


def test_next_actions_are_the_next_row_of_the_same_trajectory_subset_and_online_episode(data_dir):
    data, online, data_size = indexed_data(data_dir)
    final_offline = np.minimum(np.asarray(data["final_idxs"]), data_size - 1)
    assert (final_offline[:data_size] < data_size - 1).any()  # trajectories end inside the subset, and one is cut
    filled, episode_end = int(online["size"]), 11
    for with_online in (None, online):
        for goals in ("none", "actor", "value"):
            batch = envs.sample_batch(jax.random.PRNGKey(5), data, data_size, 20_000, goals, online=with_online)
            ids = np.asarray(batch["observations"][:, 0]).astype(np.int64)
            nxt = np.asarray(batch["next_actions"][:, 0]).astype(np.int64)
            offline = ids < OFFSET
            expected = np.minimum(ids[offline] + 1, final_offline[ids[offline]])
            np.testing.assert_array_equal(nxt[offline], expected)
            assert (nxt[offline] == ids[offline]).any() and (nxt[offline] == ids[offline] + 1).mean() > 0.9
            row = ids[~offline] - OFFSET
            final = np.where(row <= episode_end, episode_end, filled - 1)
            np.testing.assert_array_equal(nxt[~offline] - OFFSET, np.minimum(row + 1, final))
            assert with_online is None or (~offline).any()


def test_empty_online_rows_sample_exactly_the_offline_batch(data_dir):
    data, online, data_size = indexed_data(data_dir)
    online = {**online, "size": jnp.asarray(0, jnp.int32)}
    for goals in ("none", "actor", "value"):
        key = jax.random.PRNGKey(3)
        plain = envs.sample_batch(key, data, data_size, 512, goals)
        with_empty = envs.sample_batch(key, data, data_size, 512, goals, online=online)
        assert plain.keys() == with_empty.keys()
        for k in plain:
            np.testing.assert_array_equal(np.asarray(plain[k]), np.asarray(with_empty[k]), err_msg=k)


def reactive_policy(obs, goals):
    """A deterministic policy that depends on the state: [M, 1, d] -> [M, 1, 5] (cube's action size)."""
    return np.tanh(obs[..., :5] * 0.3 - 0.2)


def test_buffer_stores_consistent_transitions_the_same_alone_or_packed():
    spec = envs.parse_env("cube-single-noisy-singletask-v0")  # 200-step episodes, rewards from the env
    packed = envs.OnlineBuffer(spec, [0, 1], capacity=260, noise=0.1)
    first = packed.collect(reactive_policy, 120)
    assert int(first["size"][0]) == 120 and (np.asarray(first["final_idxs"][:, :120]) == 119).all()
    rows = packed.collect(reactive_policy, 140)
    obs, next_obs = np.asarray(rows["observations"]), np.asarray(rows["next_observations"])
    final = np.asarray(rows["final_idxs"])
    assert np.asarray(rows["size"]).tolist() == [260, 260]
    # one finished 200-step episode (no success with this policy), then a running one ending at the newest row
    assert (final[:, :200] == 199).all() and (final[:, 200:] == 259).all()
    inside = np.ones(259, bool)
    inside[199] = False  # the episode boundary: the next row is a new episode's first state
    np.testing.assert_array_equal(obs[:, 1:][:, inside], next_obs[:, :-1][:, inside])
    assert not np.allclose(obs[:, 200], next_obs[:, 199])
    actions = np.asarray(rows["actions"])
    assert np.abs(actions).max() <= 1.0 and not np.allclose(actions, reactive_policy(obs, None))  # noise added
    assert (np.asarray(rows["masks"]) == 1.0).all() and set(np.unique(np.asarray(rows["rewards"]))) <= {-1.0, 0.0}
    metrics = packed.metrics()
    assert metrics["online_transitions"].tolist() == [260, 260] and metrics["online_episodes"].tolist() == [1, 1]
    assert metrics["online_return"][0] == float(np.asarray(rows["rewards"])[0, :200].sum())
    # member 1 (seed 1) collects exactly the same transitions when it runs alone
    alone = envs.OnlineBuffer(spec, [1], capacity=260, noise=0.1)
    alone.collect(reactive_policy, 120)
    alone_rows = alone.collect(reactive_policy, 140)
    for k in ("observations", "actions", "next_observations", "rewards", "masks", "final_idxs"):
        np.testing.assert_array_equal(np.asarray(alone_rows[k])[0], np.asarray(rows[k])[1], err_msg=k)
    with pytest.raises(ValueError, match="online buffer full"):
        packed.collect(reactive_policy, 1)


def online_config(script, env, data_dir, out_dir, **overrides):
    flags = {"env": env, "dataset_dir": str(data_dir), "steps": 100, "log_interval": 50, "eval_interval": 100,
             "hidden_dims": (32,), "batch_size": 32, "eval_episodes": 1, "mse_samples": 64, "out_dir": str(out_dir),
             "eval_max_steps": 50, "progress": False}
    return runs.make_config(load(script).Config, **{**flags, **overrides})


def without_timing(records):
    return [{k: v for k, v in r.items() if k not in ("seconds", "updates_per_second")} for r in records]


@pytest.mark.parametrize("script", Q_SCRIPTS)
def test_every_q_script_trains_value_and_policy_on_its_online_rows(script, data_dir, monkeypatch):
    data, online, data_size = indexed_data(data_dir)
    seen, original = {"value": [], "actor": []}, envs.sample_batch

    def recording(key, data, data_size, batch_size, goals, *args, **kwargs):
        batch = original(key, data, data_size, batch_size, goals, *args, **kwargs)
        jax.debug.callback(lambda ids, g=goals: seen[g].append(np.asarray(ids)), batch["observations"][:, 0])
        return batch

    monkeypatch.setattr(envs, "sample_batch", recording)
    algo = load(script)
    config = envs.fill_from_table(algo.Config(hidden_dims=(16,), batch_size=64), script)[0]
    state = algo.init_state(jax.random.PRNGKey(0), 2, 2, 2, config)
    step = jax.jit(lambda s: algo.update(s, data, member(script, data_size, data_size), config, True, online))
    for _ in range(6):
        state, info = step(state)
    jax.effects_barrier()  # every debug callback has run
    for kind in ("value", "actor"):  # both batches draw from the subset and from the filled online rows
        ids = np.concatenate(seen[kind])
        assert 0 < (ids >= OFFSET).mean() < 0.5 and ids[ids >= OFFSET].max() < OFFSET + int(online["size"])
        assert ids[ids < OFFSET].max() < data_size
    assert all(np.isfinite(np.asarray(v)).all() for v in info.values())


# End to end: goal-conditioned (SfBC, whose key counter the online phase advances; CRL), singletask and dm_control.
@pytest.mark.parametrize("script,env", [("iql_sfbc", POINTMAZE), ("crl_ddpgbc", POINTMAZE),
                                        ("iql_ddpgbc", "cube-single-noisy-singletask-v0"),
                                        ("sarsa_awr", "walker-run-random")])
def test_online_runs_end_to_end_and_log_the_mses_on_schedule(script, env, data_dir, tmp_path):
    [result] = load(script).main(online_config(script, env, data_dir, tmp_path / "online", online_steps=100))
    assert result["online_steps"] == 100 and result["steps"] == 100
    records = runs.read_metrics(tmp_path / "online" / "metrics.jsonl")
    online = [r for r in records if r["event"] == "train" and r["step"] > 100]
    assert [(r["step"], r["online_transitions"]) for r in online] == [(150, 50.0), (200, 100.0)]
    assert all(np.isfinite(v) for r in online for v in r.values() if isinstance(v, float))
    evals = [r for r in records if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [100, 200]  # the offline end (online step 0) and the last step
    if env == POINTMAZE:
        assert all({"train_mse", "val_mse", "eval_mse"} <= set(r) for r in evals)
    if script == "iql_sfbc":  # its actions use a key counter that the online phase advances: the offline part
        [plain] = load(script).main(online_config(script, env, data_dir, tmp_path / "plain"))  # must not change
        offline = without_timing([r for r in records if r["step"] <= 100])
        assert offline == without_timing(runs.read_metrics(tmp_path / "plain" / "metrics.jsonl"))
        assert plain["online_steps"] == 0


@pytest.mark.slow
def test_a_run_killed_while_online_resumes_to_the_uninterrupted_numbers(data_dir, tmp_path):
    args = [*SMALL, "--dataset-dir", str(data_dir), "--steps", "100", "--eval-interval", "100", "--online-steps",
            "400"]
    straight = subprocess.run([sys.executable, str(ROOT / "algos/iql_ddpgbc.py"), *args, "--out-dir",
                               str(tmp_path / "straight")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = tmp_path / "killed"
    command = [sys.executable, str(ROOT / "algos/iql_ddpgbc.py"), *args, "--out-dir", str(killed), "--resume"]
    child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while max(train_steps(killed), default=0) < 200 and child.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    child.kill()
    child.wait(timeout=60)
    assert not (killed / "result.json").exists(), "the run finished before it could be killed in its online phase"
    assert runs.resume_steps(killed) == [100]  # the offline end only: no state is saved while online
    resumed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from step 100 of 500" in resumed.stderr and resumed_at(killed) == [100]
    assert comparable(killed) == comparable(tmp_path / "straight")
