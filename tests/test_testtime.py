"""Test-time policy improvement (--test-time opex / ttt) in every script with a Q function: OPEX climbs the frozen Q,
TTT adapts only a copy of the policy, lr 0 is plain evaluation, bad values exit 2."""

import functools
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import POINTMAZE, run_in_process, run_script
from test_algos import Q_SCRIPTS, load

import runs
import testtime

OBS_DIM, ACTION_DIM, MEMBERS, EPISODES = 4, 2, 2, 3


def setup(script, method, goal_conditioned=True, **flags):
    """A script's Config, its stacked parameters for MEMBERS members, and a TestTime over EPISODES lockstep
    episodes of at most 6 steps (all TestTime reads of an Evaluator)."""
    module = load(script)
    config = runs.make_config(module.Config, hidden_dims=(16,), **flags)
    goal_dim = OBS_DIM if goal_conditioned else 0
    states = jax.vmap(lambda k: module.init_state(k, OBS_DIM, goal_dim, ACTION_DIM, config))(
        jax.vmap(jax.random.PRNGKey)(jnp.arange(MEMBERS)))
    evaluator = types.SimpleNamespace(tasks=np.arange(EPISODES), max_steps=6, wave=EPISODES, waves=1, wave_index=0)
    act = functools.partial(module.act, num_samples=config.num_samples) if script.endswith("sfbc") else module.act
    return module, config, states["params"], testtime.TestTime(config.harness, evaluator, method, act, module.q_value,
                                                               module.mean_action)


def random_states(seed, goal_conditioned=True):
    rng = np.random.default_rng(seed)
    obs = rng.normal(size=(MEMBERS, EPISODES, OBS_DIM)).astype(np.float32)
    goals = rng.normal(size=(MEMBERS, EPISODES, OBS_DIM)).astype(np.float32) if goal_conditioned else None
    return obs, goals


def q_of(module, params, obs, goals, actions):
    """The Q the script's extractor maximises (min over its critics), per member and state."""
    return jax.vmap(lambda p, o, g, a: module.critic_fn(p["critic"], o, g, a).min(0))(params, obs, goals, actions)


@pytest.mark.parametrize("script", Q_SCRIPTS)
def test_opex_raises_q_at_the_chosen_action_and_beta_0_changes_nothing(script):
    module, _, params, plain = setup(script, "opex", opex_beta=0.0)
    *_, opex = setup(script, "opex", opex_beta=0.01, opex_steps=2)  # small steps: the first-order regime
    obs, goals = random_states(0)
    # The same keys for both: SfBC's candidates (and so OPEX's starting action) are the same.
    before = np.asarray(plain.policy(params, [0, 1], step=7)(obs, goals))
    after = np.asarray(opex.policy(params, [0, 1], step=7)(obs, goals))
    if not script.endswith("sfbc"):  # beta 0 is the policy's own action (the mean for AWR)
        mean = jax.vmap(lambda p, o, g: load(script).actor_fn(p["actor"], o, g))(params, obs, goals)
        np.testing.assert_allclose(before, np.asarray(mean[0] if isinstance(mean, tuple) else mean), rtol=1e-6)
    q_before, q_after = q_of(module, params, obs, goals, before), q_of(module, params, obs, goals, after)
    assert float(q_after.mean()) > float(q_before.mean())
    # where OPEX could move the action (not held at the box's edge by the clip), it moved up Q
    moved = np.abs(after - before).max(-1) > 1e-6
    assert moved.mean() >= 0.5 and float((q_after > q_before)[moved].mean()) >= 0.8, (q_before, q_after, moved)
    assert np.abs(after).max() <= 1.0 and not np.array_equal(after, before)


# Every script once, the two reset modes alternating (so SfBC, AWR and DDPG+BC each meet both).
@pytest.mark.parametrize("script,reset", [(s, "never" if i % 2 else "episode") for i, s in enumerate(Q_SCRIPTS)])
def test_ttt_adapts_only_its_copy_and_lr_0_acts_as_the_trained_policy(script, reset):
    goal_conditioned = script.startswith("crl") or reset == "never"  # IQL / SARSA also run without goals
    module, _, params, frozen = setup(script, "ttt", goal_conditioned, ttt_lr=0.0, ttt_reset=reset)
    *_, ttt = setup(script, "ttt", goal_conditioned, ttt_lr=1e-2, ttt_steps_per_env_step=3, ttt_batch_size=8,
                    ttt_reset=reset)
    saved = jax.tree_util.tree_map(np.array, params)
    policies = {"frozen": frozen.policy(params, [0, 1], step=5), "ttt": ttt.policy(params, [0, 1], step=5),
                "opex0": setup(script, "opex", goal_conditioned, opex_beta=0.0)[3].policy(params, [0, 1], 5)}
    actions = {name: [] for name in policies}
    for t in range(4):
        obs, goals = random_states(t, goal_conditioned)
        for name, policy in policies.items():
            actions[name].append(np.asarray(policy(obs, goals)))
    # lr 0: the copy stays the trained policy, so it acts as the plain rule does (SfBC: the same candidates are drawn
    # with one copy; one copy per episode samples each episode's candidates apart)
    if not (script.endswith("sfbc") and reset == "episode"):
        np.testing.assert_allclose(actions["frozen"], actions["opex0"], rtol=1e-5, atol=1e-6)
    assert not np.allclose(actions["ttt"][-1], actions["frozen"][-1], atol=1e-4)  # training moved the copy ...
    if not script.endswith("sfbc"):  # ... up the frozen Q at the states it trained on last (SfBC acts by sampling
        obs, goals = random_states(3, goal_conditioned)  # around the mean TTT moves; ttt_loss is the same code)
        q_ttt, q_frozen = (q_of(module, params, obs, goals, actions[name][-1]) for name in ("ttt", "frozen"))
        assert float(q_ttt.mean()) > float(q_frozen.mean()), (q_ttt, q_frozen)
    jax.tree_util.tree_map(np.testing.assert_array_equal, saved, jax.tree_util.tree_map(np.array, params))


@pytest.mark.slow
def test_ttt_never_touches_the_trained_parameters_and_lr_0_equals_plain_evaluation(data_dir, tmp_path):
    """Whole runs of iql_ddpgbc: the checkpoints of a run evaluated with OPEX and TTT equal those of a plain run (TTT
    trains a copy), and so do its plain numbers; with --ttt-lr 0 TTT's numbers equal the plain ones (up to float
    rounding: TTT acts through its own jitted program). The evaluations run in waves of 2 episodes per member (the
    last one padded), and give the numbers of one wave of all episodes (up to float rounding: the shapes differ)."""
    common = ["--env", POINTMAZE, "--dataset-dir", str(data_dir), "--steps", "100", "--log-interval", "50",
              "--eval-interval", "100", "--hidden-dims", "16", "--batch-size", "32", "--eval-episodes", "1",
              "--mse-samples", "64", "--num-seeds", "2", "--checkpoint-interval", "100", "--no-progress",
              "--eval-envs", "4", "--eval-max-steps", "50"]
    variants = {"plain": [], "one-wave": ["--eval-envs", "10"],
                "lr0-never": ["--test-time", "ttt", "--ttt-lr", "0", "--ttt-reset", "never"],
            "lr0-episode": ["--test-time", "ttt", "--ttt-lr", "0"],
            "both": ["--test-time", "opex", "ttt", "--ttt-lr", "0.01", "--ttt-steps-per-env-step", "2"]}
    results = {}
    for name, extra in variants.items():
        proc = run_script("algos/iql_ddpgbc.py", *common, "--out-dir", str(tmp_path / name), *extra)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[name] = json.loads((tmp_path / name / "result.json").read_text())
    checkpoint = lambda name: np.load(tmp_path / name / "checkpoints" / "step_00000100.npz")  # noqa: E731
    for name in ("lr0-never", "both"):
        with checkpoint("plain") as a, checkpoint(name) as b:
            assert a.files == b.files and all(np.array_equal(a[k], b[k]) for k in a.files)
        for key in runs.RESULT_METRICS:  # the plain evaluation beside it is untouched too
            assert results[name][key] == results["plain"][key], key
    assert results["plain"]["test_time"] == [] and results["both"]["test_time"] == ["opex", "ttt"]
    # Waves of 2 episodes per member or all 5 at once, and TTT's frozen copy against the plain rule, run programs of
    # other shapes (or another jit) than the plain evaluation: the same numbers up to float rounding (exact equality
    # is kept above, where the same training program ran).
    same_up_to_rounding = lambda a, b: np.testing.assert_allclose(a["per_member"], b["per_member"], rtol=1e-6,  # noqa
                                                                  atol=1e-9)
    for key in runs.RESULT_METRICS:
        same_up_to_rounding(results["one-wave"][key], results["plain"][key])
    assert not any(k.startswith(("opex_", "ttt_")) for k in results["plain"])
    for key in ("success", "return", "eval_mse"):
        same_up_to_rounding(results["lr0-never"]["ttt_" + key], results["plain"][key])
        # one copy per episode acts on one state at a time: the same actions up to matmul rounding
        np.testing.assert_allclose(results["lr0-episode"]["ttt_" + key]["per_member"],
                                   results["plain"][key]["per_member"], rtol=1e-4, atol=1e-5)
    for method in ("opex", "ttt"):  # both methods acted, each differently from the plain policy
        assert results["both"][method + "_eval_mse"]["per_member"] != results["plain"]["eval_mse"]["per_member"]
    assert results["both"]["opex_eval_mse"] != results["both"]["ttt_eval_mse"]
    records = [r for r in runs.read_metrics(tmp_path / "both" / "metrics.jsonl") if r["event"] == "eval"]
    assert all({f"{m}_{k}" for m in ("opex", "ttt") for k in ("success", "return", "eval_mse")} <= set(r)
               for r in records)


def test_bad_test_time_flags_exit_2(data_dir, tmp_path, capsys):
    common = ["--env", POINTMAZE, "--dataset-dir", str(data_dir), "--out-dir", str(tmp_path / "bad"), "--no-progress"]
    cases = [("iql_ddpgbc", ["--opex-steps", "0"], "--opex-steps must be >= 1"),
             ("sarsa_awr", ["--opex-beta", "-0.1"], "--opex-beta must be >= 0"),
             ("crl_sfbc", ["--ttt-steps-per-env-step", "0"], "--ttt-steps-per-env-step must be >= 1"),
             ("iql_sfbc", ["--ttt-lr", "-1"], "--ttt-lr must be >= 0"),
             ("crl_ddpgbc", ["--ttt-batch-size", "0"], "--ttt-batch-size must be >= 1"),
             ("iql_awr", ["--ttt-alpha", "-1"], "--ttt-alpha must be >= 0"),
             ("iql_ddpgbc", ["--test-time", "magic"], "invalid choice 'magic'"),
             ("sarsa_sfbc", ["--ttt-reset", "sometimes"], "invalid choice 'sometimes'"),
             ("crl_awr", ["--test-time", "opex", "opex"], "--test-time lists a method twice")]
    for script, extra, message in cases:
        code, stderr = run_in_process(f"algos/{script}.py", [*common, *extra], capsys)
        assert code == 2 and message in stderr, (script, stderr[-1500:])
        assert not (tmp_path / "bad").exists() or not list((tmp_path / "bad").rglob("result.json"))


@pytest.mark.parametrize("script", ["iql_ddpgbc", "crl_awr"])
def test_ttt_shared_buffer_takes_only_states_of_running_episodes(script):
    """--ttt-reset never: one copy per member learns from its lockstep episodes. An episode that ended keeps being
    passed to the policy (its frozen last state), and must not enter the copy's buffer: here those states are NaN, so
    a single one drawn into a TTT batch would turn the copy's parameters, hence every action, into NaN."""
    module, _, params, ttt = setup(script, "ttt", ttt_lr=1e-2, ttt_steps_per_env_step=2, ttt_batch_size=8,
                                   ttt_reset="never")
    alive = np.ones((MEMBERS, EPISODES), bool)
    alive[:, 0] = False  # episode 0 of every member has ended
    ttt.evaluator.alive = alive
    policy = ttt.policy(params, [0, 1], step=3)
    for t in range(5):
        obs, goals = random_states(t)
        obs[:, 0] = np.nan
        actions = np.asarray(policy(obs, goals))
        assert np.isfinite(actions[:, 1:]).all(), (t, actions)  # the running episodes act on a finite copy
    # and with every episode ended, the copy still has rows to draw (the last stored ones), never an empty draw
    rows = testtime.sample_visited(jax.random.PRNGKey(0), jnp.zeros(6, bool), 4, 100)
    assert set(np.asarray(rows).tolist()) <= {0, 1, 2, 3}
    rows = testtime.sample_visited(jax.random.PRNGKey(0), jnp.array([0, 1, 0, 1, 0, 0], bool), 4, 100)
    assert set(np.asarray(rows).tolist()) == {1, 3}
