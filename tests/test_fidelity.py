"""Where the authors' reference code (OGBench impls/) decides: the table's entries per script family, the alpha grids
per value learner, and the order of the target update. Each test names the reference's setting it pins."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import ogbench
import pytest

import envs
import runs
import scaling

GCBC_SCRIPTS = ("bc", "iql_sfbc", "sarsa_sfbc", "crl_sfbc")  # GCBC, and the three that sample from a GCBC policy
TD_SCRIPTS = [f"{v}_{e}" for v in ("iql", "sarsa") for e in ("awr", "ddpgbc", "sfbc")]  # the ones with target critics


def load(script):
    return importlib.import_module(f"algos.{script}")


def test_gcbc_and_sfbc_never_draw_random_actor_goals_on_any_dataset():
    """The reference's GCBC has actor_p_randomgoal 0.0 and hyperparameters.sh never overrides it (it does for GCIQL
    and CRL: 0.5 on stitch, 1.0 on antmaze explore). So bc.py and the SfBC scripts' behaviour policies take 0.0 from
    the table on every dataset, said as the reference's in config.json's from_table, while the AWR / DDPG+BC actors
    keep the value learner's row."""
    names = envs.all_env_names()
    assert any("-stitch-" in n for n in names) and any("-explore-" in n for n in names)
    for name in names:
        for script in GCBC_SCRIPTS:
            config, filled = envs.fill_from_table(runs.make_config(load(script).Config, env=name), script)
            assert config.actor_p_randomgoal == 0.0, (name, script)
            assert filled["actor_p_randomgoal"].startswith("0.0 (reference"), (name, script, filled)
    for script in ("iql_ddpgbc", "crl_awr"):
        stitch = envs.fill_from_table(runs.make_config(load(script).Config, env="antmaze-large-stitch-v0"), script)[0]
        explore = envs.fill_from_table(runs.make_config(load(script).Config, env="antmaze-large-explore-v0"), script)[0]
        assert (stitch.actor_p_randomgoal, explore.actor_p_randomgoal) == (0.5, 1.0), script
    # a flag given on the command line still wins
    given = runs.make_config(load("bc").Config, env="antmaze-large-stitch-v0", actor_p_randomgoal=0.25)
    assert envs.fill_from_table(given, "bc")[0].actor_p_randomgoal == 0.25


@pytest.mark.parametrize("script", ["iql_ddpgbc", "sarsa_ddpgbc", "crl_ddpgbc"])
def test_each_value_learners_alpha_grid_is_centred_on_its_own_tuned_alpha(script):
    """scaling.py's DDPG+BC grid for a dataset is the script's tuned alpha (the reference's: GCIQL's for IQL and SARSA,
    CRL's for CRL) and one decade either side, on every dataset; CRL's differs from GCIQL's on cube / scene / puzzle
    play (3 vs 1), antmaze explore (0.003 vs 0.01) and antsoccer (0.3 vs 0.1)."""
    for name in envs.all_env_names():
        alpha = envs.fill_from_table(runs.make_config(load(script).Config, env=name), script)[0].alpha
        grid = scaling.table_alphas(name, script)
        assert grid == pytest.approx((alpha / 10, alpha, alpha * 10)), (name, script, grid)
    expected = {"iql_ddpgbc": 1.0, "sarsa_ddpgbc": 1.0, "crl_ddpgbc": 3.0}[script]
    assert scaling.table_alphas("cube-single-play-v0", script)[1] == expected
    assert scaling.table_alphas("antsoccer-arena-navigate-v0", script)[1] == {"crl_ddpgbc": 0.3}.get(script, 0.1)


@pytest.mark.parametrize("script", TD_SCRIPTS)
def test_targets_move_towards_the_critic_before_its_update(script):
    """The reference's target_update averages the pre-update agent's critic into the target (`self.network.params`,
    not the new network's): after one step, target = (1 - tau) * target_0 + tau * critic_0. With a large learning rate
    the post-update critic is far from critic_0, so the other order fails; with tau 0.3 (not 0.5) a reversed rate,
    0.3 * target_0 + 0.7 * critic_0, fails too (the targets sit 0.5 from the critic: 0.2 apart per entry)."""
    algo = load(script)
    config = envs.fill_from_table(runs.make_config(algo.Config, hidden_dims=(16,), batch_size=8, tau=0.3, lr=0.05,
                                                   env="walker-run-random"), script)[0]
    rng = np.random.default_rng(0)
    data = {"observations": rng.standard_normal((64, 3)), "actions": rng.uniform(-1, 1, (64, 2)),
            "next_observations": rng.standard_normal((64, 3)), "rewards": rng.standard_normal(64),
            "masks": np.ones(64)}
    data = {k: jnp.asarray(v, jnp.float32) for k, v in data.items()}
    state = algo.init_state(jax.random.PRNGKey(0), 3, 0, 2, config)
    # targets apart from the critic, so that both terms of the average show
    state["target_critic"] = jax.tree_util.tree_map(lambda t: t + 0.5, state["target_critic"])
    member = {"value_data_size": 64, "policy_data_size": 64}
    if hasattr(config, "alpha"):
        member["alpha"] = 1.0
    new, _ = jax.jit(lambda s: algo.update(s, data, member, config, False))(state)
    expected = jax.tree_util.tree_map(lambda t, p: 0.7 * t + 0.3 * p, state["target_critic"], state["params"]["critic"])
    after_update = jax.tree_util.tree_map(lambda t, p: 0.7 * t + 0.3 * p, state["target_critic"],
                                          new["params"]["critic"])
    for got, want in zip(jax.tree_util.tree_leaves(new["target_critic"]), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert any(not np.allclose(a, b, atol=1e-4) for a, b in zip(jax.tree_util.tree_leaves(expected),
                                                                   jax.tree_util.tree_leaves(after_update)))


def test_scripts_train_on_the_whole_training_file_and_validate_on_the_official_val_file(data_dir, tmp_path):
    """Where the -val file exists (every OGBench dataset, downloaded or generated) a script trains on the whole
    training file, as the reference does, and validates on the -val file; config.json says which. The training rows
    are one seeded permutation of the file's whole trajectories, so data sizes stay nested prefixes. Where there is no
    -val file (ExORL), or only the placeholder a generation of fewer than 10 episodes writes, 10% is held out."""
    from conftest import POINTMAZE

    spec = envs.parse_env(POINTMAZE)
    whole = envs.load_dataset(spec, str(data_dir))
    val_path = envs.dataset_path(spec, str(data_dir)).with_name(f"{spec.dataset_name}-val.npz")
    val_file = ogbench.load_dataset(str(val_path))
    train, val, validation = envs.load_splits(spec, str(data_dir), seed=3)
    assert validation == envs.VALIDATION_FILE
    # the same transitions as the two files (ogbench's own loader), train reordered by whole trajectories (seeded)
    key = lambda part: sorted(map(tuple, np.concatenate([part["observations"], part["actions"]], 1)))  # noqa: E731
    assert key(train) == key(whole) and key(val) == key(val_file) and len(val["actions"]) > 0
    again, _, _ = envs.load_splits(spec, str(data_dir), seed=3)
    other, _, _ = envs.load_splits(spec, str(data_dir), seed=4)
    assert np.array_equal(again["observations"], train["observations"])
    assert not np.array_equal(other["observations"], train["observations"])
    ends = np.flatnonzero(train["terminals"]) + 1
    assert np.array_equal(train["final_idxs"], np.repeat(ends - 1, np.diff(np.concatenate([[0], ends]))))
    # a script's run: all data is the whole file, config.json names the validation data
    bc = load("bc")
    out = tmp_path / "bc"
    [result] = bc.main(runs.make_config(bc.Config, env=POINTMAZE, dataset_dir=str(data_dir), steps=2, log_interval=1,
                                        eval_interval=2, hidden_dims=(8,), batch_size=4, eval_episodes=1,
                                        mse_samples=16, out_dir=str(out), progress=False))
    config = __import__("json").loads((out / "config.json").read_text())
    assert config["validation"] == envs.VALIDATION_FILE and result["policy_data_size"] == len(whole["actions"])
    # ExORL: no -val file, a 10% hold-out
    walker = envs.parse_env("walker-run-random")
    assert envs.load_splits(walker, str(data_dir))[2] == envs.VALIDATION_HOLDOUT
    # a generation of fewer than 10 episodes writes a one-row placeholder -val file: a hold-out too
    envs.generate(spec, str(tmp_path / "few"), num_episodes=3, max_episode_steps=20, seed=0, progress=False)
    few_train, few_val, few_validation = envs.load_splits(spec, str(tmp_path / "few"))
    few_whole = envs.load_dataset(spec, str(tmp_path / "few"))
    assert few_validation == envs.VALIDATION_HOLDOUT and len(few_val["actions"]) > 0
    assert key({k: np.concatenate([few_train[k], few_val[k]]) for k in few_train}) == key(few_whole)
