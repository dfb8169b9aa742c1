"""envs.py: generated files, loaders, splits, on-device sampling, oracles, evaluation, bad input."""

import math
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import gymnasium
import jax
import jax.numpy as jnp
import numpy as np
import ogbench
import pytest
from conftest import POINTMAZE, ROOT, run_in_process

import envs
import runs
import scaling


# ---------------------------------------------------------------- generated files in the official format
@pytest.mark.parametrize("name, obs_dim, action_dim", [(POINTMAZE, 2, 2), ("cube-single-noisy-v0", 28, 5)])
def test_generated_files_load_through_ogbench(data_dir, name, obs_dim, action_dim):
    path = data_dir / f"{name}.npz"
    with np.load(path) as raw:
        assert set(raw.files) == {"observations", "actions", "terminals", "qpos", "qvel"}
        assert raw["observations"].dtype == np.float32 and raw["actions"].dtype == np.float32
        assert raw["terminals"].dtype == bool
        assert raw["observations"].shape[1] == obs_dim and raw["actions"].shape[1] == action_dim
        assert np.abs(raw["actions"]).max() <= 1.0
    assert (data_dir / f"{name}-val.npz").exists()
    # OGBench's own loader, given the path, reads both files (it never downloads when dataset_path is given).
    env, train, val = ogbench.make_env_and_datasets(name, dataset_path=str(path))
    assert set(train) == {"observations", "actions", "terminals", "next_observations"}
    assert train["observations"].shape[1] == env.observation_space.shape[0] == obs_dim
    assert len(val["actions"]) > 0


@pytest.mark.parametrize("name,buttons", [("scene-play-v0", 2), ("scene-noisy-v0", 2), ("puzzle-3x3-play-v0", 9)])
def test_scene_and_puzzle_generate_offline_in_the_official_format(tmp_path, name, buttons):
    """generate_manipspace.py's recipe: its keys (button_states as int64, as the official files), episode lengths,
    the official loader, and the singletask relabelling that reads button_states."""
    spec = envs.parse_env(name)
    path = envs.generate(spec, str(tmp_path), num_episodes=2, max_episode_steps=80, seed=0, progress=False)
    env = gymnasium.make(spec.env_id)
    with np.load(path) as raw:
        assert set(raw.files) == {"observations", "actions", "terminals", "qpos", "qvel", "button_states"}
        assert {k: raw[k].dtype for k in raw.files} == dict(observations=np.float32, actions=np.float32,
                                                            terminals=bool, qpos=np.float32, qvel=np.float32,
                                                            button_states=np.int64)
        assert raw["observations"].shape == (160, env.observation_space.shape[0]) and raw["actions"].shape[1] == 5
        assert raw["qpos"].shape[1] == env.unwrapped._model.nq and raw["button_states"].shape == (160, buttons)
        assert np.flatnonzero(raw["terminals"]).tolist() == [79, 159] and np.abs(raw["actions"]).max() <= 1.0
        assert set(np.unique(raw["button_states"])) <= {0, 1}
        if spec.kind == "puzzle":  # every sub-task is a press: the states change within 80 steps
            assert (np.diff(raw["button_states"], axis=0) != 0).any()
    _, train, val = ogbench.make_env_and_datasets(name, dataset_path=str(path))
    assert len(train["actions"]) == 2 * 79 and len(val["actions"]) >= 1  # ogbench drops each episode's last row
    singletask = envs.load_dataset(envs.parse_env(name.replace("-v0", "-singletask-task2-v0")), str(tmp_path))
    assert singletask["rewards"].max() <= 0 and singletask["rewards"].min() < 0  # relabelled per task
    kind = spec.kind
    recipe = envs.official_recipe(spec)
    assert recipe["p_random_action"] == {"play": 0.0, "noisy": {"scene": 0.1, "puzzle": 0.2}[kind]}[spec.dataset_type]
    assert envs.official_recipe(envs.parse_env("puzzle-4x6-noisy-v0"))["num_episodes"] == 5000


def lights_out_presses(start: np.ndarray, goal: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """The buttons whose presses turn `start` into `goal` on OGBench's puzzle (a press toggles the button and its four
    neighbours): the solution of a linear system over GF(2), by Gauss-Jordan elimination."""
    n = rows * cols
    system = np.zeros((n, n + 1), np.uint8)
    for button in range(n):
        x, y = divmod(button, cols)
        for dx, dy in ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)):
            if 0 <= x + dx < rows and 0 <= y + dy < cols:
                system[(x + dx) * cols + y + dy, button] = 1
    system[:, n] = start != goal
    pivots = []
    for column in range(n):
        row = next((r for r in range(len(pivots), n) if system[r, column]), None)
        if row is None:
            continue
        system[[len(pivots), row]] = system[[row, len(pivots)]]
        for r in range(n):
            if r != len(pivots) and system[r, column]:
                system[r] ^= system[len(pivots)]
        pivots.append(column)
    assert not system[len(pivots):, n].any(), "no set of presses reaches the goal"
    return np.array([column for r, column in enumerate(pivots) if system[r, n]], int)


@pytest.mark.parametrize("name", ["puzzle-3x3-play-v0", "puzzle-4x4-play-v0"])
def test_the_noiseless_puzzle_oracle_solves_the_evaluation_tasks_closed_loop(name):
    """The Markov button oracle that generates puzzle data, told which button to press next (a lights-out solution
    of the task's start and goal), solves every evaluation task in the evaluation environment."""
    from ogbench.manipspace.oracles.markov.button_markov import ButtonMarkovOracle

    spec = envs.parse_env(name)
    env = envs.make_env(spec)
    puzzle = env.unwrapped
    np.random.seed(0)  # the oracle draws its resting poses from numpy's global generator, as in generation
    for task in range(1, envs.num_eval_tasks(spec) + 1):
        ob, info = env.reset(seed=task, options=dict(task_id=task))
        start, goal = puzzle.cur_task_info["init_button_states"], puzzle.cur_task_info["goal_button_states"]
        presses = lights_out_presses(start, goal, puzzle._num_rows, puzzle._num_cols)
        oracle = ButtonMarkovOracle(env=env, min_norm=0.4, gripper_always_closed=True)
        for button in presses:
            state = 1 - info[f"privileged/button_{button}_state"]
            oracle.reset(ob, info)
            while not oracle.done:  # the fields data collection's info carries about its target, as of this step
                target = {"privileged/target_button": button, "privileged/target_button_state": state,
                          "privileged/target_button_top_pos": puzzle._data.site_xpos[puzzle._button_site_ids[button]]}
                ob, _, _, _, info = env.step(oracle.select_action(ob, {**info, **target}))
        assert len(presses) > 0 and info["success"], f"task {task}"


SCENE_DRAWER_OPEN = -0.16  # the scene's drawer and window positions, as its data collection sets them


def scene_plan(scene, info) -> list[tuple[str, object]]:
    """The sub-tasks, in an order that works, taking the scene from its state to the task's goal: unlock (button 0
    locks the drawer, button 1 the window) what must move, open the drawer for a cube that goes in, move the cube,
    the drawer and the window, then set the locks as the goal has them."""
    goal = scene.cur_task_info["goal"]
    locks = [info["privileged/button_0_state"], info["privileged/button_1_state"]]
    drawer, window = info["privileged/drawer_pos"][0], info["privileged/window_pos"][0]
    block, block_goal = info["privileged/block_0_pos"], scene._data.mocap_pos[scene._cube_target_mocap_ids[0]]
    into_drawer = scene._is_in_drawer(block_goal) and not scene._is_in_drawer(block)
    moves = lambda position, target: abs(position - target) > 0.02  # noqa: E731
    plan = []

    def press(button, state):
        if locks[button] != state:
            plan.append(("button", button))
            locks[button] = state

    if into_drawer or moves(drawer, goal["drawer_pos"]):
        press(0, 1)
    if moves(window, goal["window_pos"]):
        press(1, 1)
    if into_drawer and moves(drawer, SCENE_DRAWER_OPEN):
        plan.append(("drawer", SCENE_DRAWER_OPEN))
        drawer = SCENE_DRAWER_OPEN
    if into_drawer or np.linalg.norm(block - block_goal) > 0.02:  # target: the goal where the drawer will carry it
        plan.append(("cube", goal["drawer_pos"] - SCENE_DRAWER_OPEN if into_drawer else 0.0))  # y shift (+ opens)
    if moves(drawer, goal["drawer_pos"]):
        plan.append(("drawer", goal["drawer_pos"]))
    if moves(window, goal["window_pos"]):
        plan.append(("window", goal["window_pos"]))
    for button in (0, 1):
        press(button, goal["button_states"][button])
    return plan


def scene_target_info(scene, part: str, target, button_state) -> dict:
    """The fields about the current target that the scene's info carries in data collection, as of this step."""
    from ogbench.manipspace import lie

    if part == "button":
        return {"privileged/target_button": target, "privileged/target_button_state": button_state,
                "privileged/target_button_top_pos": scene._data.site_xpos[scene._button_site_ids[target]].copy()}
    if part == "cube":  # `target`: how far (y) the open drawer sits from where the goal has it
        mocap = scene._cube_target_mocap_ids[0]
        yaw = lie.SO3(wxyz=scene._data.mocap_quat[mocap]).compute_yaw_radians()
        return {"privileged/target_block": 0, "privileged/target_block_yaw": np.array([yaw]),
                "privileged/target_block_pos": scene._data.mocap_pos[mocap] + [0, target, 0]}
    site = scene._drawer_target_site_id if part == "drawer" else scene._window_target_site_id
    return {f"privileged/target_{part}_handle_pos": scene._data.site_xpos[site].copy(),
            f"privileged/target_{part}_pos": np.array([target])}


def test_the_noiseless_scene_oracles_solve_the_evaluation_tasks_closed_loop():
    """The Markov oracles that generate scene-noisy data (cube, button, drawer, window), each run until it says it is
    done and told only its target (the fields data collection's info carries), solve the five evaluation tasks in the
    evaluation environment within its time limit: tasks 1-3 every time; the two that put the cube in the drawer in
    most episodes, as the official cube oracle lands within the 4 cm success radius most times, not always (7 of 8
    episodes each, measured over 8 seeds). Three seeded episodes per task."""
    import mujoco
    from ogbench.manipspace.oracles.markov.button_markov import ButtonMarkovOracle
    from ogbench.manipspace.oracles.markov.cube_markov import CubeMarkovOracle
    from ogbench.manipspace.oracles.markov.drawer_markov import DrawerMarkovOracle
    from ogbench.manipspace.oracles.markov.window_markov import WindowMarkovOracle

    spec = envs.parse_env("scene-play-v0")
    env = envs.make_env(spec)
    scene = env.unwrapped
    oracles = dict(cube=CubeMarkovOracle(env=env, min_norm=0.4, max_step=300), button=ButtonMarkovOracle(env=env,
                   min_norm=0.4), drawer=DrawerMarkovOracle(env=env, min_norm=0.4),
                   window=WindowMarkovOracle(env=env, min_norm=0.4))
    np.random.seed(0)  # the oracles' resting poses; the environment's own generator is seeded per episode
    solved = {}
    for task in range(1, envs.num_eval_tasks(spec) + 1):
        for seed in range(3):
            ob, info = env.reset(seed=seed, options=dict(task_id=task))
            goal_sites = {part: scene._model.site(f"{part}_handle_center_target").pos.copy()
                          for part in ("drawer", "window")}
            plan, steps = scene_plan(scene, info), 0
            for part, target in plan:
                if part in ("drawer", "window"):  # the target handle site marks where the part should go
                    scene._model.site(f"{part}_handle_center_target").pos[1 if part == "drawer" else 0] = target
                    mujoco.mj_kinematics(scene._model, scene._data)
                state = 1 - info[f"privileged/button_{target}_state"] if part == "button" else None
                oracle = oracles[part]
                oracle.reset(ob, info)
                while not oracle.done:
                    told = scene_target_info(scene, part, target, state)
                    ob, _, _, _, info = env.step(oracle.select_action(ob, {**info, **told}))
                    steps += 1
            for part, position in goal_sites.items():
                scene._model.site(f"{part}_handle_center_target").pos[:] = position
            assert steps < env.spec.max_episode_steps, (task, plan, steps)
            solved.setdefault(task, []).append(bool(info["success"]))
    assert all(solved[task] == [True] * 3 for task in (1, 2, 3)), solved
    assert all(sum(solved[task]) >= 2 for task in (4, 5)), solved


def test_generation_sizes_follow_the_knobs(data_dir):
    with np.load(data_dir / f"{POINTMAZE}.npz") as raw:
        assert len(raw["actions"]) == 30 * 200 and raw["terminals"].sum() == 30
    with np.load(data_dir / f"{POINTMAZE}-val.npz") as raw:
        assert len(raw["actions"]) == 3 * 200
    assert envs.official_recipe(envs.parse_env("pointmaze-giant-stitch-v0")) == dict(
        num_episodes=5000, max_episode_steps=201, noise=0.5)
    assert envs.official_recipe(envs.parse_env("cube-single-noisy-v0"))["p_random_action"] == 0.1


def action_spread(data) -> float:
    """Mean over maze cells (4x4 units, >= 10 states) of the mean resultant length of the action directions there:
    near 1 when every state of a cell takes the same direction, near 0 when directions cover the circle."""
    unit = data["actions"] / (np.linalg.norm(data["actions"], axis=-1, keepdims=True) + 1e-8)
    cells = np.floor(data["observations"][:, :2] / 4).astype(int)
    _, cell_of_row = np.unique(cells, axis=0, return_inverse=True)
    lengths = [np.linalg.norm(unit[cell_of_row.ravel() == c].mean(0)) for c in np.unique(cell_of_row)
               if (cell_of_row.ravel() == c).sum() >= 10]
    return float(np.mean(lengths))


def test_pointmaze_explore_is_the_high_coverage_counterpart_of_navigate(tmp_path):
    navigate, explore = (envs.parse_env(f"pointmaze-medium-{t}-v0") for t in ("navigate", "explore"))
    recipe = envs.official_recipe(explore)
    assert recipe == dict(num_episodes=2000, max_episode_steps=501, noise=1.0)
    sizes = [r["num_episodes"] * (r["max_episode_steps"] - 1) for r in map(envs.official_recipe, (navigate, explore))]
    assert sizes == [1_000_000, 1_000_000]  # equal size at the official counts
    data = {}
    for spec in (navigate, explore):
        envs.generate(spec, str(tmp_path), num_episodes=8, max_episode_steps=250, seed=0, progress=False)
        data[spec.dataset_type] = envs.load_dataset(spec, str(tmp_path))
    assert len(data["explore"]["actions"]) == len(data["navigate"]["actions"])
    # the same states are visited with every action direction, not only the way to a goal (measured: 0.39 vs 0.17)
    assert action_spread(data["explore"]) < 0.6 * action_spread(data["navigate"])
    assert "pointmaze-large-explore-v0" in envs.all_env_names()


def test_interrupted_generation_leaves_no_file(tmp_path, monkeypatch):
    calls = []

    def dying_collect(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    real = envs._collect_pointmaze_episode
    monkeypatch.setattr(envs, "_collect_pointmaze_episode", dying_collect)
    with pytest.raises(KeyboardInterrupt):
        envs.generate(envs.parse_env(POINTMAZE), str(tmp_path), num_episodes=5, max_episode_steps=20, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_generation_is_seeded(tmp_path):
    spec = envs.parse_env(POINTMAZE)
    a = envs.generate(spec, str(tmp_path / "a"), num_episodes=2, max_episode_steps=30, seed=3, progress=False)
    b = envs.generate(spec, str(tmp_path / "b"), num_episodes=2, max_episode_steps=30, seed=3, progress=False)
    with np.load(a) as x, np.load(b) as y:  # every key: qvel's first row of an episode comes from the env's generator
        assert x.files == y.files and all(np.array_equal(x[k], y[k]) for k in x.files)


# ---------------------------------------------------------------- ExORL layout and reward relabelling
def test_exorl_folder_loads_and_relabels_rewards_from_physics(data_dir):
    spec = envs.parse_env("walker-run-random")
    data = envs.load_dataset(spec, str(data_dir))
    assert len(data["actions"]) == 3 * 40 and data["terminals"].sum() == 3
    files = sorted((data_dir / "walker" / "random" / "buffer").glob("*.npz"))
    stored = np.concatenate([np.load(f)["reward"][1:, 0] for f in files])
    # Rewards recomputed from the stored physics state equal what the environment paid while collecting.
    np.testing.assert_allclose(data["rewards"], stored, rtol=1e-5, atol=1e-6)
    # The same buffer serves another task of the domain with different rewards.
    walk = envs.load_dataset(envs.parse_env("walker-walk-random"), str(data_dir))
    assert np.array_equal(walk["observations"], data["observations"])
    assert not np.allclose(walk["rewards"], data["rewards"])


# ---------------------------------------------------------------- splits and subsets
def _toy_dataset(lengths):
    ids = np.concatenate([np.full(n, i, np.float32) for i, n in enumerate(lengths)])
    terminals = np.concatenate([np.eye(1, n, n - 1)[0] for n in lengths]).astype(np.float32)
    step = np.concatenate([np.arange(n, dtype=np.float32) for n in lengths])
    obs = np.stack([ids, step], -1)
    return dict(observations=obs, next_observations=obs + [0, 1], actions=np.zeros((len(ids), 1), np.float32),
                rewards=np.zeros(len(ids), np.float32), masks=np.ones(len(ids), np.float32), terminals=terminals)


def test_split_is_disjoint_by_trajectory_and_seeded():
    data = _toy_dataset([5, 7, 3, 9, 4, 6, 8, 2, 5, 7, 6, 4, 3, 5, 8, 9, 2, 6, 7, 5])
    train, val = envs.split_dataset(data, seed=0)
    train_ids, val_ids = set(train["observations"][:, 0]), set(val["observations"][:, 0])
    assert len(val_ids) == 2 and not train_ids & val_ids and len(train_ids | val_ids) == 20
    # Each trajectory stays whole and in order; final_idxs points at its last row.
    for part in (train, val):
        for row, final in enumerate(part["final_idxs"]):
            assert part["observations"][final, 0] == part["observations"][row, 0]
            assert part["terminals"][final] == 1
    again, _ = envs.split_dataset(data, seed=0)
    other, _ = envs.split_dataset(data, seed=1)
    assert np.array_equal(again["observations"], train["observations"])
    assert not np.array_equal(other["observations"], train["observations"])


def test_sampling_respects_the_subset_and_trajectories():
    data = _toy_dataset([50] * 40)
    train, _ = envs.split_dataset(data, seed=0)
    device = envs.to_device(train)
    for size in (30, 120, 1000):  # 120 cuts a trajectory in the middle
        for goals in ("value", "actor"):
            sample = jax.jit(envs.sample_batch, static_argnums=(3, 4))
            batch = sample(jax.random.PRNGKey(size), device, size, 4096, goals)
            rows = {tuple(o) for o in np.asarray(train["observations"][:size])}
            assert all(tuple(o) in rows for o in np.asarray(batch["observations"]))
            assert all(tuple(g) in rows for g in np.asarray(batch["goals"]))
            obs, goal = np.asarray(batch["observations"]), np.asarray(batch["goals"])
            same_trajectory = obs[:, 0] == goal[:, 0]
            if goals == "actor":  # future states of the same trajectory
                assert same_trajectory.all() and (goal[:, 1] >= obs[:, 1]).all()
            else:  # reward 0 and mask 0 exactly when the goal is the current state
                at_goal = (obs == goal).all(-1)
                np.testing.assert_array_equal(np.asarray(batch["rewards"]), at_goal - 1.0)
                np.testing.assert_array_equal(np.asarray(batch["masks"]), 1.0 - at_goal)
                # the shares of current, trajectory and random goals: pinned by the tests of goal distributions below


# ---------------------------------------------------------------- goal distributions, pinned to 4 standard errors
# Synthetic rows whose observation is their own row number (online row j: ONLINE_ID + j), so a batch says which row
# each sample and each goal came from. Each check compares a share or a mean over ~GOAL_SAMPLES samples with its exact
# expectation given the rows drawn, within 4 standard errors: a wrong probability or discount moves it by tens of
# standard errors, while a correct sampler fails any one check for about one key in 16,000.
ONLINE_ID = 1_000_000  # above every offline row; float32 holds these integers exactly
GOAL_SAMPLES = 200_000


def indexed_rows(lengths, data_size=None, online_lengths=(), spare=7):
    """Offline trajectories of `lengths`, of which `data_size` rows form the subset, and, if `online_lengths`, one
    member's online rows in OnlineBuffer.device()'s format (the last episode still running: it ends at the newest
    row; `spare` unfilled rows after it). Returns (data, online or None, data_size, final): final[r] is the last row
    of row r's trajectory as sample_batch must see it (cut at the subset's end), with rows numbered as sample_batch
    numbers them, online row j being row data_size + j."""
    def columns(ids, ends):
        obs = np.asarray(ids, np.float32)[:, None]
        return {"observations": obs, "next_observations": obs + 0.5, "actions": obs.copy(),
                "rewards": np.zeros(len(ids), np.float32), "masks": np.ones(len(ids), np.float32),
                "final_idxs": np.asarray(ends, np.int32)}

    ends = np.repeat(np.cumsum(lengths) - 1, lengths)
    data_size = len(ends) if data_size is None else data_size
    final = np.minimum(ends[:data_size], data_size - 1)
    data = envs.to_device(columns(np.arange(len(ends)), ends))
    if not online_lengths:
        return data, None, data_size, final
    online_ends = np.repeat(np.cumsum(online_lengths) - 1, online_lengths)
    size = len(online_ends)
    online = envs.to_device(columns(ONLINE_ID + np.arange(size + spare), np.append(online_ends, np.zeros(spare))))
    online["size"] = jnp.asarray(size, jnp.int32)
    return data, online, data_size, np.concatenate([final, data_size + online_ends])


def sample_rows(data, online, data_size, goals, key=0, **kwargs):
    """(rows, goal rows, batch) of one batch of GOAL_SAMPLES, rows numbered as in `indexed_rows`."""
    batch = envs.sample_batch(jax.random.PRNGKey(key), data, data_size, GOAL_SAMPLES, goals, online=online, **kwargs)

    def row_numbers(ids):
        ids = np.asarray(ids[:, 0], np.int64)
        assert np.all((ids < data_size) | (ids >= ONLINE_ID))  # never a row past the subset
        return np.where(ids >= ONLINE_ID, data_size + ids - ONLINE_ID, ids)

    return row_numbers(batch["observations"]), row_numbers(batch["goals"]), batch


def assert_share(observed: np.ndarray, expected: np.ndarray, what: str):
    """The share of True in `observed` is the mean of the per-sample probabilities `expected`, within 4 standard
    errors (of a binomial at their mean: an upper bound for samples of unequal probabilities)."""
    p = float(np.mean(expected))
    se = math.sqrt(max(p * (1 - p), 1e-12) / len(observed))
    assert abs(observed.mean() - p) < 4 * se, f"{what}: {observed.mean():.5f}, expected {p:.5f} +- {4 * se:.5f}"


# offline: 1000 trajectories of 20 rows, the subset cutting the last one after 10 rows; online: a short offline subset
# and 500 online episodes of 20 rows (the last still running), so that most rows drawn are online rows.
SHORT_TRAJECTORIES = {"offline": dict(lengths=[20] * 1000, data_size=19_990),
                      "online": dict(lengths=[20] * 50, online_lengths=[20] * 500)}


@pytest.mark.parametrize("part", ["offline", "online"])
@pytest.mark.parametrize("discount", [0.99, 0.9])
def test_geometric_value_goals_are_a_geometric_number_of_steps_ahead(part, discount):
    """A value goal from the trajectory sits K steps ahead of its row, K ~ Geometric(1 - discount) on {1, 2, ...}:
    mean 1 / (1 - discount), median ceil(log 0.5 / log discount), P(K <= k) = 1 - discount^k; for offline and online
    rows alike."""
    # One long trajectory (offline), or a short offline subset then a long online episode that is still running.
    layout = dict(lengths=[100_000]) if part == "offline" else dict(lengths=[300], online_lengths=[60_000])
    data, online, data_size, final = indexed_rows(**layout)
    config = envs.GoalConfig(p_current=0.0, p_trajectory=1.0, p_random=0.0, discount=discount)  # CRL's positives
    rows, goals, _ = sample_rows(data, online, data_size, "value", goal_config=config)
    # Where the trajectory's end is `reach` or more steps away it never caps the offset (P(K > reach) < 1e-12), so the
    # offsets of those rows are plain geometric draws (the row's position is drawn independently of K).
    reach = math.ceil(math.log(1e-12) / math.log(discount))
    kept = (final[rows] - rows >= reach) & ((rows >= data_size) if part == "online" else True)
    offsets = goals[kept] - rows[kept]
    n = len(offsets)
    assert n > 0.9 * GOAL_SAMPLES
    mean, std = 1 / (1 - discount), math.sqrt(discount) / (1 - discount)
    assert abs(offsets.mean() - mean) < 4 * std / math.sqrt(n), (offsets.mean(), mean, 4 * std / math.sqrt(n))
    median = math.ceil(math.log(0.5) / math.log(discount))  # 69 at 0.99, 7 at 0.9
    assert 1 - discount ** (median - 1) < 0.5 <= 1 - discount**median  # what makes it the median
    # The sample median itself is not pinned at 0.99: P(K <= 69) = 0.5002, a fraction of a standard error from 0.5.
    # The distribution function either side of it is, and so are its first step and its tail.
    for k in (1, median - 1, median, 3 * median):
        assert_share(offsets <= k, np.full(n, 1 - discount**k), f"P(offset <= {k})")


@pytest.mark.parametrize("part", ["offline", "online"])
@pytest.mark.parametrize("p_current, p_trajectory, p_random", [(0.2, 0.5, 0.3), (0.45, 0.15, 0.4), (0.0, 1.0, 0.0)])
def test_value_goals_are_current_trajectory_or_random_with_the_configured_probabilities(part, p_current,
                                                                                        p_trajectory, p_random):
    """Each value goal is the row itself (reward 0, mask 0) with probability p_current, a later row of the same
    trajectory with p_trajectory (the row itself at a trajectory's last row, which has no later one), and any row of
    the subset and the online rows with p_random; for offline and online rows alike."""
    data, online, data_size, final = indexed_rows(**SHORT_TRAJECTORIES[part])
    config = envs.GoalConfig(p_current=p_current, p_trajectory=p_trajectory, p_random=p_random, discount=0.9)
    rows, goals, batch = sample_rows(data, online, data_size, "value", goal_config=config)
    at_goal = goals == rows
    np.testing.assert_array_equal(np.asarray(batch["rewards"]), at_goal - 1.0)
    np.testing.assert_array_equal(np.asarray(batch["masks"]), 1.0 - at_goal)
    if part == "online":
        online_rows = rows >= data_size
        assert online_rows.mean() > 0.85
        rows, goals, at_goal = rows[online_rows], goals[online_rows], at_goal[online_rows]
    ahead, total = final[rows] - rows, len(final)  # rows to the trajectory's end; rows a random goal comes from
    if part == "online":  # random goals come from the subset and the online rows together; the others stay online
        assert_share(goals < data_size, np.full(len(rows), p_random * data_size / total), "offline goals")
    later = (goals > rows) & (goals <= final[rows])
    # A random goal lands on the row itself with probability 1 / total and later in its trajectory with ahead / total:
    # both are in the expectations, exactly.
    expected_current = p_current + p_trajectory * (ahead == 0) + p_random / total
    expected_later = p_trajectory * (ahead > 0) + p_random * ahead / total
    assert_share(at_goal, expected_current, "current")
    assert_share(later, expected_later, "later in the trajectory")
    assert_share(~at_goal & ~later, 1 - expected_current - expected_later, "elsewhere")


@pytest.mark.parametrize("part", ["offline", "online"])
@pytest.mark.parametrize("actor_p_random", [0.0, 0.3, 1.0])
def test_actor_goals_are_uniform_future_states_or_with_actor_p_random_any_row(part, actor_p_random):
    """--actor-p-randomgoal: that share of actor goals is any row of the subset and the online rows; the others are
    drawn uniformly from the row's strict future in its own trajectory (the row itself at the trajectory's last row);
    for offline and online rows alike."""
    data, online, data_size, final = indexed_rows(**SHORT_TRAJECTORIES[part])
    rows, goals, _ = sample_rows(data, online, data_size, "actor", actor_p_random=actor_p_random)
    if part == "online":
        online_rows = rows >= data_size
        assert online_rows.mean() > 0.85
        rows, goals = rows[online_rows], goals[online_rows]
    ahead, total = final[rows] - rows, len(final)
    if part == "online":  # random goals come from the subset and the online rows together; the others stay online
        assert_share(goals < data_size, np.full(len(rows), actor_p_random * data_size / total), "offline goals")
    future = (goals > rows) & (goals <= final[rows]) | (goals == rows) & (ahead == 0)
    # A random goal falls in the row's future by chance with probability max(ahead, 1) / total: in the expectation.
    assert_share(~future, actor_p_random * (1 - np.maximum(ahead, 1) / total), "not the row's future")
    if actor_p_random == 0:  # every goal is the future, uniform over the `ahead` rows after its row: mean (ahead+1)/2
        assert future.all()
        offsets, ahead = (goals - rows)[ahead > 0], ahead[ahead > 0]
        se = math.sqrt(np.sum((ahead.astype(float) ** 2 - 1) / 12)) / len(ahead)
        assert abs(offsets.mean() - np.mean((ahead + 1) / 2)) < 4 * se, (offsets.mean(), np.mean((ahead + 1) / 2))


def test_subsets_are_nested_prefixes(data_dir):
    spec = envs.parse_env(POINTMAZE)
    train, _ = envs.split_dataset(envs.load_dataset(spec, str(data_dir)), seed=0)
    small = envs.fixed_goal_states(train, 500, 256, seed=0)[0]
    prefix = {tuple(o) for o in train["observations"][:500]}
    assert all(tuple(o) in prefix for o in small)
    with pytest.raises(runs.UsageError, match="--value-data-size 999999 is out of range"):
        runs.resolve_data_size(999999, len(train["actions"]), "--value-data-size")


# ---------------------------------------------------------------- oracles
def test_pointmaze_oracle_matches_ogbench_subgoal_and_is_deterministic():
    spec = envs.parse_env(POINTMAZE)
    oracle = envs.make_oracle(spec)
    maze = gymnasium.make("pointmaze-medium-v0").unwrapped
    rng = np.random.default_rng(0)
    free = np.argwhere(maze.maze_map == 0)
    cells = free[rng.integers(len(free), size=(200, 2))]
    xy = np.array([maze.ij_to_xy(c) for c in cells[:, 0]]) + rng.uniform(-1.5, 1.5, (200, 2))
    goal = np.array([maze.ij_to_xy(c) for c in cells[:, 1]])
    labels = oracle(xy, goal)
    np.testing.assert_array_equal(labels, oracle(xy, goal))
    for k in range(200):
        if tuple(cells[k, 0]) == tuple(cells[k, 1]):
            continue  # inside the goal's cell we aim at the goal itself (documented difference)
        subgoal, _ = maze.get_oracle_subgoal(xy[k], goal[k])
        direction = (subgoal - xy[k]) / (np.linalg.norm(subgoal - xy[k]) + 1e-6)
        np.testing.assert_allclose(labels[k], direction, atol=1e-5)


def test_cube_oracle_matches_ogbench_markov_oracle():
    from ogbench.manipspace.oracles.markov.cube_markov import CubeMarkovOracle

    env = gymnasium.make("cube-single-v0", terminate_at_goal=False, mode="data_collection", max_episode_steps=300)
    ob, info = env.reset(seed=1)
    official = CubeMarkovOracle(env=env, min_norm=0.4)
    official.reset(ob, info)
    compared = 0
    for _ in range(250):
        goal = np.zeros(28)  # a goal observation carries the target cube pose at 19:22 and its yaw at 26:28
        goal[19:22] = (info["privileged/target_block_pos"] - [0.425, 0, 0]) * 10
        goal[26:28] = np.cos(info["privileged/target_block_yaw"][0]), np.sin(info["privileged/target_block_yaw"][0])
        ours = envs.make_oracle(envs.parse_env("cube-single-play-v0"))(ob[None], goal[None])[0]
        theirs = official.select_action(ob, info)
        block, target = info["privileged/block_0_pos"], info["privileged/target_block_pos"]
        released = np.linalg.norm(block - target) <= 0.02 and info["proprio/gripper_contact"][0] < 0.1
        if not released:  # once released, the official oracle turns to a random resting pose; ours does not
            np.testing.assert_allclose(ours, theirs, atol=1e-4)
            compared += 1
        ob, _, _, _, info = env.step(theirs)
        if official.done:
            break
    assert compared > 30  # steps checked before the cube was placed (47 with this seed)


def preset_oracle_envs() -> list[str]:
    """One dataset name per environment with an oracle among every scaling.py preset (each maze size they use)."""
    by_env = {}
    for name in sorted({n for preset in scaling.PRESETS.values() for n in preset.get("envs", ())}):
        if envs.parse_env(name).has_oracle:
            by_env.setdefault(envs.parse_env(name).env_id, name)
    return sorted(by_env.values())


def oracle_policy(spec):
    """The oracle as an Evaluator's policy: obs [M, N, d] and goals [M, N, g] (None: the singletask goal) -> actions."""
    oracle, fixed = envs.make_oracle(spec), envs.task_goal(spec)

    def policy(obs, goals):
        flat = obs.reshape(-1, obs.shape[-1])
        g = goals.reshape(len(flat), -1) if goals is not None else np.broadcast_to(fixed, (len(flat), len(fixed)))
        return oracle(flat, g).reshape(*obs.shape[:2], -1)

    return policy


@pytest.mark.parametrize("name", [*preset_oracle_envs(), "pointmaze-medium-navigate-singletask-v0"])
def test_oracle_solves_evaluation_tasks_closed_loop(name):
    spec = envs.parse_env(name)
    evaluator = envs.Evaluator(spec, num_members=1, episodes_per_task=1)
    out = evaluator.evaluate(oracle_policy(spec), seeds=[0])
    assert out["success"].shape == (1, envs.num_eval_tasks(spec))
    assert out["success"].all()
    assert out["valid"][0].sum() > 0
    if out["goals"] is not None:
        assert out["observations"].shape[-1] == out["goals"].shape[-1]


@pytest.mark.parametrize("name,members,episodes,max_envs", [(POINTMAZE, 2, 2, 6), ("cube-single-play-v0", 1, 1, 2)])
def test_evaluation_in_waves_gives_the_numbers_of_one_wave(name, members, episodes, max_envs):
    """Fewer environments than episodes (a manipulation env holds ~160 MB): the episodes run in waves on reused
    environments, the last wave padded, with the same starts, goals, actions and results as all at once."""
    spec = envs.parse_env(name)
    oracle = oracle_policy(spec)
    calls = []

    def policy(obs, goals):
        calls.append(obs.shape[:2])
        return oracle(obs, goals)

    waves = envs.Evaluator(spec, members, episodes, max_envs)
    total = members * episodes * envs.num_eval_tasks(spec)
    assert waves.wave == max_envs // members and waves.waves > 1 and len(waves.envs[0]) == waves.wave
    assert total % max_envs != 0  # the last wave is padded
    split = waves.evaluate(policy, seeds=list(range(3, 3 + members)))
    assert set(calls) == {(members, waves.wave)} and waves.alive is None
    at_once = envs.Evaluator(spec, members, episodes, max_envs=total).evaluate(policy, list(range(3, 3 + members)))
    assert at_once["success"].mean() >= 0.5  # the oracle solves them: the episodes really ran
    for key in ("success", "returns", "tasks", "valid"):
        np.testing.assert_array_equal(split[key], at_once[key], err_msg=key)
    # OGBench's manipulation goals: the cube is placed from the seed, the arm moved by two steps of actions drawn
    # from an action space OGBench builds anew (unseeded) at each access, so only the cube's part is reproducible
    seeded = slice(0, None) if spec.kind == "pointmaze" else slice(18, None)
    np.testing.assert_array_equal(split["goals"][..., seeded], at_once["goals"][..., seeded])
    for key in ("observations", "actions"):  # at every step an episode ran (after it ended: not meaningful)
        np.testing.assert_array_equal(split[key][split["valid"]], at_once[key][at_once["valid"]], err_msg=key)
    with pytest.raises(runs.UsageError, match="--eval-envs"):
        envs.Evaluator(spec, members, episodes, max_envs=0)


def test_eval_max_steps_cuts_every_episode_and_counts_a_running_one_as_failed():
    """--eval-max-steps: the oracle, which solves every task within the time limit, cut at 5 steps (far too few to
    cross the maze): every episode runs exactly 5 steps and none succeeds; a cut beyond the limit is the limit."""
    spec = envs.parse_env(POINTMAZE)
    cut = envs.Evaluator(spec, 2, 1, max_steps=5)
    out = cut.evaluate(oracle_policy(spec), seeds=[0, 1])
    assert cut.max_steps == 5 and out["valid"].shape == (2, envs.num_eval_tasks(spec), 5)
    assert out["valid"].all() and not out["success"].any()
    limit = envs.Evaluator(spec, 1, 1).max_steps
    assert envs.Evaluator(spec, 1, 1, max_steps=10 * limit).max_steps == limit
    with pytest.raises(runs.UsageError, match="--eval-max-steps must be >= 1"):
        envs.Evaluator(spec, 1, 1, max_steps=0)


# ---------------------------------------------------------------- names and bad input
def test_teleport_mazes_are_not_offered_for_the_mse_metrics(capsys):
    """pointmaze-teleport's BFS waypoints ignore the teleporters, so its oracle's labels are not optimal actions."""
    for name in ("pointmaze-teleport-navigate-v0", "pointmaze-teleport-stitch-v0"):
        spec = envs.parse_env(name)
        assert not spec.has_oracle and spec.can_generate
        with pytest.raises(runs.UsageError, match="teleport"):
            envs.make_oracle(spec)
    assert envs.parse_env("pointmaze-large-navigate-v0").has_oracle
    envs._list_cli(envs.ListArgs())
    listed = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "oracle" not in listed["pointmaze-teleport-navigate-v0"]
    assert "oracle" in listed["pointmaze-medium-navigate-v0"]
    assert "download" in listed["walker-run"] and "download" not in listed["walker-run-random"]  # ExORL's / ours


def test_geometric_goals_need_a_discount_below_one():
    """At discount 1 the geometric offset ceil(log u / log 1) is -inf, and every value goal would be the next state."""
    for discount in (1.0, 0.0, 1.5):
        with pytest.raises(runs.UsageError, match="--discount must be in"):
            envs.GoalConfig(discount=discount)
    assert envs.GoalConfig(discount=0.995).discount == 0.995


def test_the_table_fills_only_the_flags_left_unset():
    from algos import bc, crl_ddpgbc, iql_ddpgbc

    config, filled = envs.fill_from_table(runs.make_config(iql_ddpgbc.Config, env="cube-single-play-v0"), "iql_ddpgbc")
    assert (config.alpha, config.discount, config.harness.eval_episodes) == (1.0, 0.99, 50)
    assert config.actor_p_randomgoal == 0
    assert filled == {"alpha": "1.0 (reference)", "discount": "0.99 (reference)", "eval_episodes": "50 (reference)",
                      "actor_p_randomgoal": "0.0 (reference)"}
    config, filled = envs.fill_from_table(runs.make_config(iql_ddpgbc.Config, env="cube-single-play-v0", alpha=0.2,
                                                           eval_episodes=3), "iql_ddpgbc")
    assert (config.alpha, config.harness.eval_episodes) == (0.2, 3) and not {"alpha", "eval_episodes"} & set(filled)
    # CRL's own tuned alpha; a giant maze's discount; stitch data's half-random actor goals, never for BC (GCBC's 0.0)
    fill = lambda module, env, script: envs.fill_from_table(runs.make_config(module.Config, env=env), script)[0]  # noqa
    assert fill(crl_ddpgbc, "cube-single-play-v0", "crl_ddpgbc").alpha == 3
    giant = envs.fill_from_table(runs.make_config(iql_ddpgbc.Config, env="pointmaze-giant-stitch-v0"), "iql_ddpgbc")[0]
    assert (giant.alpha, giant.discount, giant.actor_p_randomgoal) == (0.003, 0.995, 0.5)
    assert fill(bc, "antmaze-large-explore-v0", "bc").actor_p_randomgoal == 0


def test_a_flag_the_table_cannot_fill_is_a_usage_error_never_a_silent_none(data_dir, tmp_path):
    from algos import iql_ddpgbc

    config = runs.make_config(iql_ddpgbc.Config, env="pointmaze-medium-navigate-v0")
    message = ("--alpha is unset and envs.HYPERPARAMETERS has no alpha/iql_newloss / alpha/newloss / alpha entry for "
               "pointmaze-medium-navigate-v0: give --alpha, or set the script's TABLE_ROW to the script whose entries "
               'it inherits (e.g. TABLE_ROW = "iql_ddpgbc")')
    with pytest.raises(runs.UsageError) as caught:
        envs.fill_from_table(config, "iql_newloss")
    assert str(caught.value) == message
    # given on the command line: no lookup, no error; a renamed copy that keeps TABLE_ROW takes its original's row
    assert envs.fill_from_table(runs.make_config(iql_ddpgbc.Config, alpha=0.5), "iql_newloss")[0].alpha == 0.5
    assert iql_ddpgbc.TABLE_ROW == iql_ddpgbc.SCRIPT == "iql_ddpgbc"
    assert envs.fill_from_table(config, iql_ddpgbc.TABLE_ROW)[0].alpha == 0.003
    # every script's own name finds every flag it has, on every kind of dataset
    from test_algos import SCRIPTS, load

    for script in SCRIPTS:
        for env in ("pointmaze-medium-navigate-v0", "cube-single-noisy-v0", "walker-run-random"):
            module = load(script)
            if script.startswith("crl") and not envs.parse_env(env).goal_conditioned:
                continue
            filled = envs.fill_from_table(runs.make_config(module.Config, env=env), module.TABLE_ROW)[0]
            assert None not in [getattr(filled, f, 0) for f in envs.TABLE_FLAGS], (script, env)
    # a copy with a new name and no --alpha exits 2 before it trains: the error, not "diverged" at step 100
    source = (ROOT / "algos" / "iql_ddpgbc.py").read_text().replace(
        'SCRIPT, TABLE_ROW = "iql_ddpgbc", "iql_ddpgbc"', 'SCRIPT, TABLE_ROW = "iql_newloss", "iql_newloss"')
    (tmp_path / "iql_newloss.py").write_text(source)
    proc = subprocess.run([sys.executable, str(tmp_path / "iql_newloss.py"), "--dataset-dir", str(data_dir),
                           "--steps", "10", "--log-interval", "10", "--out-dir", str(tmp_path / "run")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == runs.USAGE_EXIT and proc.stderr.strip().endswith(message), proc.stderr[-2000:]


def test_env_names():
    gc = envs.parse_env("cube-single-play-v0")
    assert gc.goal_conditioned and gc.env_id == "cube-single-v0" and gc.has_oracle
    st = envs.parse_env("pointmaze-large-stitch-singletask-task3-v0")
    assert not st.goal_conditioned and st.env_id == "pointmaze-large-singletask-task3-v0"
    assert st.dataset_name == "pointmaze-large-stitch-v0"
    walker = envs.parse_env("walker-run")
    assert walker.family == "dmc" and walker.dataset_name == "walker/rnd" and not walker.has_oracle
    for name in envs.all_env_names():
        assert envs.parse_env(name).name == name
    with pytest.raises(runs.UsageError, match="did you mean pointmaze-medium-navigate-v0"):
        envs.parse_env("pointmaze-meduim-navigate-v0")


def test_cli_bad_inputs_exit_2_with_one_line(tmp_path, capsys):
    cases = [
        (["generate", "pointmaze-mediun-navigate-v0"], "unknown environment"),
        (["generate", "antmaze-large-navigate-v0", "--dataset-dir", str(tmp_path)], "needs trained expert"),
        (["generate", "walker-run", "--dataset-dir", str(tmp_path)], "generate `walker-run-random`"),
    ]
    for args, message in cases:
        code, stderr = run_in_process("envs.py", args, capsys)
        assert code == 2, stderr
        assert message in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- downloads (on loopback: no network at test time)
class DatasetServer:
    """An HTTP server on 127.0.0.1 serving official-format files from a folder, as OGBench's and ExORL's servers do
    (with "Range: bytes=N-" requests answered 206); `mode` makes it misbehave: "ok", "drop" (half of each body, then
    the connection closes), "404", "garbage"."""

    def __init__(self, folder: Path):
        import http.server
        import threading

        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                server.requests.append(self.path)
                server.ranges.append(self.headers.get("Range"))
                path = folder / self.path.lstrip("/")
                if server.mode == "404" or not path.exists():
                    self.send_error(404)
                    return
                body = path.read_bytes() if server.mode != "garbage" else b"not a zip file " * 2000
                start = int(self.headers["Range"][len("bytes="):-1]) if self.headers.get("Range") else 0
                if start >= len(body) > 0:
                    self.send_error(416)
                    return
                self.send_response(206 if start else 200)  # ranges "bytes=N-" only, as a resuming client asks
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                body = body[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[:len(body) // 2] if server.mode == "drop" else body)
                if server.mode == "drop":
                    self.wfile.flush()
                    self.connection.shutdown(2)  # the connection goes away half way through the body

            def log_message(self, *args):
                pass

        self.mode, self.requests, self.ranges = "ok", [], []
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def serve(folder: Path, url_variable: str, monkeypatch):
    """Downloads allowed, from a DatasetServer on `folder` that `url_variable` points at; closed afterwards (unless a
    test closed it to play "no network")."""
    server = DatasetServer(folder)
    monkeypatch.delenv(envs.NO_DOWNLOAD_VARIABLE, raising=False)
    monkeypatch.setenv(url_variable, server.url)
    yield server
    if server.mode != "no network":
        server.close()


@pytest.fixture
def dataset_server(data_dir, monkeypatch):
    """OGBench's server, holding the session's small pointmaze files."""
    yield from serve(data_dir, envs.DATASET_URL_VARIABLE, monkeypatch)


def leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def test_a_missing_official_dataset_downloads_on_first_use(dataset_server, data_dir, tmp_path, capsys):
    spec = envs.parse_env(POINTMAZE)
    data = envs.load_dataset(spec, str(tmp_path / "data"))  # what every script calls
    expected = envs.load_dataset(spec, str(data_dir))
    assert all(np.array_equal(data[k], expected[k]) for k in expected)
    assert leftovers(tmp_path / "data") == [f"{POINTMAZE}-val.npz", f"{POINTMAZE}.npz"]  # no staging left
    assert sorted(dataset_server.requests) == [f"/{POINTMAZE}-val.npz", f"/{POINTMAZE}.npz"]
    envs.load_dataset(spec, str(tmp_path / "data"))  # there now: no second download
    assert len(dataset_server.requests) == 2
    assert envs.DATASET_URL_VARIABLE and ogbench.utils.DATASET_URL.startswith("https://")  # restored
    # the CLI and scaling.py (before any run starts) take the same path; a sweep's generate_episodes never downloads
    code, _ = run_in_process("envs.py", ["download", POINTMAZE, "--dataset-dir", str(tmp_path / "cli")], capsys)
    assert code == 0 and leftovers(tmp_path / "cli") == [f"{POINTMAZE}-val.npz", f"{POINTMAZE}.npz"]
    settings = {"envs": (POINTMAZE,), "dataset_dir": str(tmp_path / "sweep"), "generate_episodes": None,
                "download": True, "value_sizes": (None,), "policy_sizes": (None,)}
    [line] = scaling.prepare_datasets(settings, dry_run=False)
    assert "training transitions" in line and len(dataset_server.requests) == 6


@pytest.mark.parametrize("mode,message", [("drop", "damaged"), ("404", "HTTP 404"), ("garbage", "damaged"),
                                          ("no network", "cannot download")])
def test_a_failed_download_leaves_nothing_behind_and_says_what_to_do(dataset_server, tmp_path, monkeypatch, mode,
                                                                     message):
    dataset_server.mode = mode
    if mode == "no network":  # nothing listens there: the connection is refused
        dataset_server.close()
        monkeypatch.setenv(envs.DATASET_URL_VARIABLE, dataset_server.url)
    with pytest.raises(runs.UsageError, match=message) as error:
        envs.load_dataset(envs.parse_env(POINTMAZE), str(tmp_path / "data"))
    assert "python envs.py generate" in str(error.value) and "\n" not in str(error.value)
    assert leftovers(tmp_path / "data") == []  # nothing that loads, no staging folder, no temporary file
    assert dataset_server.requests or mode == "no network"  # it did try


def test_downloads_are_off_with_the_flag_or_the_variable(dataset_server, tmp_path, monkeypatch):
    spec = envs.parse_env("antmaze-large-navigate-v0")  # official, and not generatable here
    with pytest.raises(runs.UsageError, match="downloads are off"):
        envs.load_dataset(spec, str(tmp_path), download=False)  # --no-download
    monkeypatch.setenv(envs.NO_DOWNLOAD_VARIABLE, "1")
    with pytest.raises(runs.UsageError, match="downloads are off"):
        envs.load_dataset(spec, str(tmp_path))
    assert dataset_server.requests == [] and leftovers(tmp_path) == []
    assert not envs.parse_env("pointmaze-medium-explore-v0").can_download  # OURS: nothing to download


@pytest.fixture
def exorl_server(data_dir, tmp_path, monkeypatch):
    """ExORL's server on loopback: `walker/rnd.zip` holds the session's walker episodes under buffer/ (and a video
    under video/, which is not unpacked), as ExORL's archives do."""
    served = tmp_path / "served"
    (served / "walker").mkdir(parents=True)
    with zipfile.ZipFile(served / "walker" / "rnd.zip", "w") as archive:
        for episode in sorted((data_dir / "walker" / "random" / "buffer").glob("*.npz")):
            archive.write(episode, f"buffer/{episode.name}")
        archive.writestr("video/episode_0.mp4", b"a video")
    yield from serve(served, envs.EXORL_URL_VARIABLE, monkeypatch)


def unfinished(folder: Path) -> list[str]:
    return [p for p in leftovers(folder) if ".part" in p or ".download-" in p]


def test_exorl_data_downloads_on_first_use_and_a_dropped_download_continues_where_it_stopped(exorl_server, data_dir,
                                                                                              tmp_path, capsys):
    spec = envs.parse_env("walker-run")  # the paper's: ExORL's RND data
    target = tmp_path / "data"
    exorl_server.mode = "drop"
    with pytest.raises(runs.UsageError, match="rerun to continue from byte") as error:
        envs.load_dataset(spec, str(target))  # what every script calls
    assert "\n" not in str(error.value) and not envs.dataset_path(spec, str(target)).exists()  # nothing that loads
    half = (target / "walker" / ".rnd.zip.part").stat().st_size
    assert half == (tmp_path / "served" / "walker" / "rnd.zip").stat().st_size // 2
    exorl_server.mode = "ok"
    code, _ = run_in_process("envs.py", ["download", "walker", "--dataset-dir", str(target)], capsys)
    assert code == 0
    assert exorl_server.requests == ["/walker/rnd.zip"] * 2 and exorl_server.ranges == [None, f"bytes={half}-"]
    data = envs.load_dataset(spec, str(target))
    expected = envs.load_dataset(envs.parse_env("walker-run-random"), str(data_dir))  # the same episodes
    assert all(np.array_equal(data[k], expected[k]) for k in expected) and len(data["actions"]) == 3 * 40
    assert unfinished(target) == [] and not (target / "walker" / "rnd" / "video").exists()
    code, _ = run_in_process("envs.py", ["download", "walker-walk", "--dataset-dir", str(target)], capsys)
    assert code == 0 and len(exorl_server.requests) == 2  # one domain, one archive: there already


@pytest.mark.parametrize("mode,message", [("404", "HTTP 404"), ("garbage", "damaged"),
                                          ("no network", "cannot download")])
def test_a_failed_exorl_download_leaves_nothing_that_loads(exorl_server, tmp_path, monkeypatch, mode, message):
    exorl_server.mode = mode
    if mode == "no network":
        exorl_server.close()
    with pytest.raises(runs.UsageError, match=message) as error:
        envs.load_dataset(envs.parse_env("walker-run"), str(tmp_path / "data"))
    assert "walker-run-random" in str(error.value) or "by hand" in str(error.value)
    assert unfinished(tmp_path / "data") == [] and not (tmp_path / "data" / "walker" / "rnd").exists()
    monkeypatch.setenv(envs.NO_DOWNLOAD_VARIABLE, "1")
    with pytest.raises(runs.UsageError, match="downloads are off.*envs.py download walker"):
        envs.load_dataset(envs.parse_env("walker-run"), str(tmp_path / "data"))


def test_a_staging_folder_left_by_a_killed_download_is_removed_by_the_next_download(tmp_path):
    import subprocess

    ended = subprocess.Popen(["true"])
    ended.wait()  # its PID now names no process, as a SIGKILLed download's
    stale = tmp_path / f".download-{POINTMAZE}-{ended.pid}-x1"
    stale.mkdir()
    (stale / f"{POINTMAZE}.npz").write_bytes(b"half a file")
    live = tmp_path / f".download-{POINTMAZE}-{os.getppid()}-x2"  # a download still running elsewhere
    live.mkdir()
    fresh = envs._staging_folder(tmp_path, POINTMAZE)
    assert not stale.exists() and live.exists() and fresh.name.startswith(f".download-{POINTMAZE}-{os.getpid()}-")
