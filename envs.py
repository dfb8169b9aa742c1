"""envs.py: the world every script in algos/ stands on.

Sections, top to bottom:
  1. names      parse an environment name (OGBench dataset names, ExORL-style dm_control tasks)
  2. datasets   load a file from --dataset-dir, or generate one offline with OGBench's official recipe
  3. splits     10% of whole trajectories held out; the rest in one seeded trajectory order (nested prefixes)
  4. sampling   batches and OGBench-style goals, drawn on device inside jit
  5. oracles    the noiseless scripted expert's action for any (state, goal): pointmaze, cube-single
  6. rollouts   lockstep evaluation of a batched policy on the environment's evaluation tasks, and the
                train / validation / evaluation MSE against the oracle (OracleProbe)
  6b. test time OPEX and TTT: test-time policy improvement for any script with a Q function (TestTime)
  7. run folders config.json / metrics.jsonl / result.json / checkpoints, written atomically; result summary
  8. CLI        `python envs.py generate ...`, `python envs.py list`

Bad input raises `UsageError` with one line naming the problem and the fix; every entry point turns it
into exit status 2.
"""

from __future__ import annotations

import os

# No display anywhere: MuJoCo must never try to open a window (set before mujoco is imported).
os.environ.setdefault("MUJOCO_GL", "egl")

import dataclasses
import difflib
import glob
import itertools
import json
import math
import sys
import shutil
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Annotated, Callable, Literal

import numpy as np
import tyro

DEFAULT_DATASET_DIR = "~/.ogbench/data"  # the same folder ogbench itself uses for its downloads


class UsageError(Exception):
    """Bad input from the user: the message is one line naming the problem and the fix (exit status 2)."""


class Diverged(Exception):
    """A loss or a parameter became NaN / inf; failure.json says where (exit status 3)."""


def exit_on_usage_error(main: Callable[[], None]) -> None:
    """Run `main`; turn a UsageError into a one-line message on stderr and exit status 2, Diverged into exit 3."""
    try:
        main()
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except Diverged as error:
        print(f"diverged: {error}", file=sys.stderr)
        sys.exit(3)


# ----------------------------------------------------------------------------------------------------------------
# 1. Names
# ----------------------------------------------------------------------------------------------------------------
# OGBench names a dataset `<env>-<dataset type>-v0` (goal-conditioned) or
# `<env>-<dataset type>-singletask[-task<k>]-v0` (one fixed task, rewards relabelled). dm_control tasks are named
# `<domain>-<task>[-<exorl algo>]`; without the algo suffix the ExORL RND data is used, as in the paper.

_OGBENCH_DATASET_TYPES = {
    "pointmaze": ("navigate", "stitch", "explore"),  # explore: OURS for pointmaze (OGBench has it for antmaze)
    "antmaze": ("navigate", "stitch", "explore"),
    "humanoidmaze": ("navigate", "stitch"),
    "antsoccer": ("navigate", "stitch"),
    "cube": ("play", "noisy"),
    "scene": ("play", "noisy"),
    "puzzle": ("play", "noisy"),
}
_OGBENCH_ENVS = {
    "pointmaze": ("medium", "large", "giant", "teleport"),
    "antmaze": ("medium", "large", "giant", "teleport"),
    "humanoidmaze": ("medium", "large", "giant"),
    "antsoccer": ("arena", "medium"),
    "cube": ("single", "double", "triple", "quadruple"),
    "scene": (None,),
    "puzzle": ("3x3", "4x4", "4x5", "4x6"),
}
DMC_TASKS = (
    "walker-stand", "walker-walk", "walker-run", "cheetah-run", "quadruped-walk", "quadruped-run", "hopper-hop",
)
DEFAULT_EXORL_ALGO = "rnd"


@dataclasses.dataclass(frozen=True)
class EnvSpec:
    """What a name means. `name` is what the user typed; everything else is derived from it."""

    name: str
    family: Literal["ogbench", "dmc"]
    goal_conditioned: bool
    env_id: str  # gymnasium id (ogbench) or "<domain>-<task>" (dmc)
    dataset_name: str  # file stem in --dataset-dir (ogbench) or "<domain>/<algo>" (dmc, ExORL layout)
    kind: str  # pointmaze, cube, walker, ...
    dataset_type: str  # navigate, play, rnd, random, ...

    @property
    def has_oracle(self) -> bool:
        """True where a noiseless scripted expert labels any state, so the three MSE metrics exist."""
        return self.kind == "pointmaze" or self.env_id.startswith("cube-single")

    @property
    def can_generate(self) -> bool:
        """True where `envs.py generate` can make the dataset offline."""
        if self.family == "dmc":
            return self.dataset_type == "random"
        return self.kind == "pointmaze" or self.kind == "cube"


def all_env_names() -> list[str]:
    """Every name `parse_env` accepts (singletask variants shown without their optional -task<k>)."""
    names = []
    for kind, sizes in _OGBENCH_ENVS.items():
        for size in sizes:
            base = kind if size is None else f"{kind}-{size}"
            for dataset_type in _OGBENCH_DATASET_TYPES[kind]:
                if dataset_type == "explore" and kind == "antmaze" and size not in ("medium", "large"):
                    continue  # OGBench has explore data for antmaze-medium and -large only
                names.append(f"{base}-{dataset_type}-v0")
                names.append(f"{base}-{dataset_type}-singletask-v0")
    names += list(DMC_TASKS) + [f"{task}-random" for task in DMC_TASKS]
    return names


def parse_env(name: str) -> EnvSpec:
    """Parse an environment name; raise UsageError naming the closest valid names."""
    parts = name.split("-")
    if parts[-1] == "v0" and parts[0] in _OGBENCH_ENVS:
        kind = parts[0]
        singletask = "singletask" in parts
        core = parts[: parts.index("singletask")] if singletask else parts[:-1]
        task_suffix = parts[parts.index("singletask") + 1 : -1] if singletask else []
        dataset_type = core[-1] if len(core) >= 2 else ""
        env_base = "-".join(core[:-1])
        valid_base = any(env_base == (kind if s is None else f"{kind}-{s}") for s in _OGBENCH_ENVS[kind])
        valid_task = task_suffix == [] or (len(task_suffix) == 1
                                           and task_suffix[0] in [f"task{k}" for k in range(1, 6)])
        if valid_base and dataset_type in _OGBENCH_DATASET_TYPES[kind] and valid_task:
            env_id = "-".join([env_base] + (["singletask"] + task_suffix if singletask else []) + ["v0"])
            return EnvSpec(name, "ogbench", not singletask, env_id, f"{env_base}-{dataset_type}-v0", kind, dataset_type)
    if len(parts) in (2, 3) and "-".join(parts[:2]) in DMC_TASKS:
        algo = parts[2] if len(parts) == 3 else DEFAULT_EXORL_ALGO
        return EnvSpec(name, "dmc", False, "-".join(parts[:2]), f"{parts[0]}/{algo}", parts[0], algo)
    close = difflib.get_close_matches(name, all_env_names(), n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else "run `python envs.py list` for valid names"
    raise UsageError(f"unknown environment '{name}' (--env): {hint}")


# ----------------------------------------------------------------------------------------------------------------
# 2. Datasets
# ----------------------------------------------------------------------------------------------------------------
# In memory, a dataset is a dict of numpy arrays, one row per transition, trajectories contiguous:
#   observations, actions, next_observations, rewards, masks (0 where the episode truly ends), terminals (1 on the
#   last transition of each trajectory). Goal-conditioned datasets carry rewards/masks of zero: they are computed
#   from the sampled goal at training time.

TRANSITION_KEYS = ("observations", "actions", "next_observations", "rewards", "masks", "terminals")


def dataset_path(spec: EnvSpec, dataset_dir: str) -> Path:
    """Where the dataset of `spec` lives: an OGBench .npz file or an ExORL `buffer/` folder."""
    root = Path(os.path.expanduser(dataset_dir))
    if spec.family == "ogbench":
        return root / f"{spec.dataset_name}.npz"
    return root / spec.dataset_name / "buffer"


def _missing_dataset_message(spec: EnvSpec, path: Path, dataset_dir: str) -> str:
    if spec.can_generate:
        name = spec.dataset_name if spec.family == "ogbench" else spec.name
        return (f"no dataset at {path} (--dataset-dir): generate it offline with "
                f"`python envs.py generate {name} --dataset-dir {dataset_dir}`")
    if spec.family == "dmc":
        return (f"no ExORL episodes at {path} (--dataset-dir): download ExORL's '{spec.dataset_type}' data for "
                f"'{spec.kind}' into {path.parent}, or use `{spec.env_id}-random`, which `envs.py generate` makes "
                "offline")
    return (f"no dataset at {path} (--dataset-dir): '{spec.dataset_name}' needs trained experts to generate; "
            f"place the official OGBench files {spec.dataset_name}.npz and {spec.dataset_name}-val.npz there")


def load_dataset(spec: EnvSpec, dataset_dir: str = DEFAULT_DATASET_DIR) -> dict[str, np.ndarray]:
    """Load the whole dataset of `spec` (the official -val file, if any, is not used: splits are ours)."""
    path = dataset_path(spec, dataset_dir)
    if not path.exists():
        raise UsageError(_missing_dataset_message(spec, path, dataset_dir))
    if spec.family == "ogbench":
        return _load_ogbench(spec, path)
    return _load_exorl(spec, path)


def _load_ogbench(spec: EnvSpec, path: Path) -> dict[str, np.ndarray]:
    import ogbench

    check_dataset_file(path, ("qpos",) if not spec.goal_conditioned else ())
    try:
        raw = ogbench.load_dataset(str(path), add_info=not spec.goal_conditioned)
    except Exception as error:  # a foreign file the checks above let through: name it instead of a traceback
        raise UsageError(f"cannot read dataset {path}: {type(error).__name__}: {error}; regenerate or re-download "
                         "it") from error
    data = {k: raw[k] for k in ("observations", "actions", "next_observations")}
    data["terminals"] = raw["terminals"].astype(np.float32)
    if spec.goal_conditioned:
        data["rewards"] = np.zeros(len(data["actions"]), np.float32)
        data["masks"] = np.ones(len(data["actions"]), np.float32)
    else:
        from ogbench.relabel_utils import relabel_dataset

        relabel_dataset(spec.env_id, make_env(spec), raw)  # sets the task, then rewards/masks from qpos
        data["rewards"], data["masks"] = raw["rewards"], raw["masks"]
    return data


def check_dataset_file(path: Path, extra_keys: tuple[str, ...] = ()) -> None:
    """An OGBench-format .npz must be readable and hold float observations [N, d], float actions [N, a] and
    terminals [N] (plus `extra_keys` [N, ...]); otherwise a UsageError names the key and the expected shape."""
    try:
        with np.load(path) as arrays:
            shapes = {k: (arrays[k].shape, arrays[k].dtype) for k in arrays.files}
    except Exception as error:  # truncated, not a zip, pickled objects ...
        raise UsageError(f"cannot read dataset {path} ({type(error).__name__}: {error}); the file is damaged: "
                         "regenerate or re-download it") from error
    expected = {"observations": "float [N, obs_dim]", "actions": "float [N, action_dim]", "terminals": "[N]",
                **{k: "float [N, ...]" for k in extra_keys}}
    for key, shape in expected.items():
        if key not in shapes:
            raise UsageError(f"dataset {path} has no key '{key}' (expected {shape}); it has {sorted(shapes)}")
    n = shapes["observations"][0][0] if shapes["observations"][0] else None
    for key, shape in expected.items():
        dims, dtype = shapes[key]
        numeric = np.issubdtype(dtype, np.number) or np.issubdtype(dtype, np.bool_)
        floats = np.issubdtype(dtype, np.floating)
        wrong_rank = len(dims) != (1 if key == "terminals" else 2) and key in ("observations", "actions", "terminals")
        if wrong_rank or not dims or dims[0] != n or not numeric or (shape.startswith("float") and not floats):
            raise UsageError(f"dataset {path}: key '{key}' has shape {dims} and dtype {dtype}, expected {shape} with "
                             f"N = {n}; regenerate or re-download it")


def _dmc_env(spec: EnvSpec, seed: int = 0):
    from dm_control import suite

    domain, task = spec.env_id.split("-")
    return suite.load(domain, task, task_kwargs={"random": seed})


def _flat_obs(observation) -> np.ndarray:
    # ExORL flattens dm_control's ordered observation dict in its own order.
    return np.concatenate([np.asarray(v, np.float32).ravel() for v in observation.values()])


def _load_exorl(spec: EnvSpec, path: Path) -> dict[str, np.ndarray]:
    files = sorted(glob.glob(str(path / "*.npz")))
    if not files:
        raise UsageError(f"no episode files (*.npz) in {path}: expected ExORL's layout "
                         f"<dataset-dir>/{spec.dataset_name}/buffer/*.npz")
    env = _dmc_env(spec)
    chunks = {k: [] for k in TRANSITION_KEYS}
    state_size = len(env.physics.get_state())
    for file in files:
        try:
            with np.load(file) as episode:
                missing = [k for k in ("observation", "action", "physics") if k not in episode]
                if missing:
                    raise UsageError(f"ExORL episode {file} lacks key(s) {missing}; expected observation [T+1, d], "
                                     f"action [T+1, a], physics [T+1, {state_size}]")
                obs, act, physics = episode["observation"], episode["action"], episode["physics"]
        except UsageError:
            raise
        except Exception as error:  # truncated or not an .npz at all (zipfile.BadZipFile, OSError, ...)
            raise UsageError(f"cannot read ExORL episode {file} ({type(error).__name__}); the file is damaged: "
                             "re-download it") from error
        expected = {"observation": (len(obs), None), "action": (len(obs), None), "physics": (len(obs), state_size)}
        for key, array in (("observation", obs), ("action", act), ("physics", physics)):
            length, width = expected[key]
            if array.ndim != 2 or len(array) != length or len(array) < 2 or (width and array.shape[1] != width):
                raise UsageError(f"ExORL episode {file}: key '{key}' has shape {array.shape}, expected "
                                 f"[T+1, {width or 'd'}] with T+1 = {length} >= 2 rows like 'observation'")
        # ExORL episodes start with a dummy step: observation[0] is the reset state, action[0] is a placeholder.
        # Transition t (1..T) is (observation[t-1], action[t], reward(physics[t]), observation[t]).
        rewards = np.empty(len(physics) - 1, np.float32)
        for t in range(1, len(physics)):
            with env.physics.reset_context():
                env.physics.set_state(physics[t])
            rewards[t - 1] = env.task.get_reward(env.physics)
        length = len(obs) - 1
        chunks["observations"].append(obs[:-1].astype(np.float32))
        chunks["actions"].append(act[1:].astype(np.float32))
        chunks["next_observations"].append(obs[1:].astype(np.float32))
        chunks["rewards"].append(rewards)
        chunks["masks"].append(np.ones(length, np.float32))  # dm_control never terminates; a time limit is no end
        chunks["terminals"].append(np.eye(1, length, length - 1, dtype=np.float32)[0])
    return {k: np.concatenate(v) for k, v in chunks.items()}


def write_atomic(path: Path, write: Callable, binary: bool = False) -> None:
    """`write(file)` into a temporary file in the same folder, then rename it to `path`: a reader sees the old file
    or the whole new one, never half of one. A failed write (a full disk) removes the temporary file and raises a
    UsageError naming the file."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise UsageError(f"cannot write {path}: {error.strerror}; free space or choose a writable folder") from error
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException as error:
        os.unlink(tmp)
        if isinstance(error, OSError):
            raise UsageError(f"cannot write {path}: {error.strerror or error}; free space or choose a writable "
                             "folder, then rerun (scripts: with --resume)") from error
        raise


def _write_npz_atomic(path: Path, arrays: dict[str, np.ndarray], compress: bool = True) -> None:
    write_atomic(path, lambda f: (np.savez_compressed if compress else np.savez)(f, **arrays), binary=True)


# Official recipes (OGBench data_gen_scripts/commands.sh): episodes, steps per episode, noise.
def official_recipe(spec: EnvSpec) -> dict:
    """The official generation settings for `spec`'s dataset (num_episodes, max_episode_steps, noise knobs)."""
    if spec.kind == "pointmaze":
        size = spec.env_id.split("-")[1]
        if spec.dataset_type == "explore":
            # OURS: OGBench's antmaze explore recipe (a random direction every 10 steps, noise 1.0, 501 steps) for
            # the point mass, with 2000 episodes so it holds as many transitions as navigate (1M): the
            # high-coverage counterpart of navigate for equal-size comparisons.
            return dict(num_episodes=2000, max_episode_steps=501, noise=1.0)
        if spec.dataset_type == "stitch":
            return dict(num_episodes=5000, max_episode_steps=201, noise=0.5)
        if size == "giant":
            return dict(num_episodes=500, max_episode_steps=2001, noise=0.5)
        return dict(num_episodes=1000, max_episode_steps=1001, noise=0.5)
    if spec.kind == "cube":
        episodes = {"single": 1000, "double": 1000, "triple": 3000, "quadruple": 5000}[spec.env_id.split("-")[1]]
        p_random = 0.1 if spec.dataset_type == "noisy" else 0.0
        return dict(num_episodes=episodes, max_episode_steps=1001, noise=0.1, p_random_action=p_random)
    if spec.family == "dmc":
        return dict(num_episodes=100, max_episode_steps=1000)
    raise UsageError(f"'{spec.name}' cannot be generated offline (it needs trained expert policies); "
                     f"place the official OGBench file in --dataset-dir")


def generate(spec: EnvSpec, dataset_dir: str, num_episodes: int | None = None, max_episode_steps: int | None = None,
             seed: int = 0, progress: bool = True) -> Path:
    """Generate `spec`'s dataset offline with the official recipe, in the official file format; return its path.

    OGBench files: `<name>.npz` (num_episodes episodes) and `<name>-val.npz` (num_episodes // 10 more), keys
    observations, actions, terminals, qpos, qvel; a `<name>.json` beside them records how they were made.
    dm_control (`<domain>-<task>-random`): uniformly random actions, ExORL episode files in `<domain>/random/buffer`.
    """
    if not spec.can_generate:
        official_recipe(spec)  # raises the explanation for OGBench names
        raise UsageError(f"'{spec.name}' uses ExORL's '{spec.dataset_type}' data, which needs an exploration agent; "
                         f"download it, or generate `{spec.env_id}-random` instead")
    recipe = official_recipe(spec)
    if num_episodes is not None:
        recipe["num_episodes"] = num_episodes
    if max_episode_steps is not None:
        recipe["max_episode_steps"] = max_episode_steps
    if recipe["num_episodes"] < 1 or recipe["max_episode_steps"] < 2:
        raise UsageError("--num-episodes must be >= 1 and --max-episode-steps >= 2")
    from tqdm import trange

    if spec.family == "dmc":
        return _generate_dmc_random(spec, dataset_dir, recipe, seed, progress)
    np.random.seed(seed)  # the official recipes draw from numpy's global generator
    collect = _collect_pointmaze_episode if spec.kind == "pointmaze" else _collect_cube_episode
    env, state = _generation_env(spec, recipe, seed)
    num_train, num_val = recipe["num_episodes"], recipe["num_episodes"] // 10
    episodes = [collect(env, state, spec, recipe)
                for _ in trange(num_train + num_val, desc=f"generate {spec.dataset_name}", disable=not progress)]

    def stack(eps):
        out = {}
        for key in eps[0]:
            dtype = bool if key == "terminals" else np.float32
            out[key] = np.concatenate([e[key] for e in eps]).astype(dtype) if eps else np.zeros((0,), dtype)
        return out

    path = dataset_path(spec, dataset_dir)
    meta = dict(dataset=spec.dataset_name, recipe=recipe, seed=seed, train_episodes=num_train, val_episodes=num_val,
                generator="offrl-bottlenecks envs.py (OGBench data_gen_scripts recipe)")
    if num_val:
        _write_npz_atomic(path.with_name(f"{spec.dataset_name}-val.npz"), stack(episodes[num_train:]))
    else:  # ogbench's loader wants a -val file beside the training file; an empty one keeps it happy
        first = {k: v[:1] for k, v in stack(episodes).items()}
        _write_npz_atomic(path.with_name(f"{spec.dataset_name}-val.npz"), first)
    path.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    _write_npz_atomic(path, stack(episodes[:num_train]))  # written last: its presence means the set is complete
    return path


def _generation_env(spec: EnvSpec, recipe: dict, seed: int):
    import gymnasium
    import ogbench  # noqa: F401  (registers the environments)

    gc_id = spec.env_id.replace("-singletask", "").split("-task")[0]
    if spec.kind == "pointmaze":
        env = gymnasium.make(gc_id, terminate_at_goal=False, max_episode_steps=recipe["max_episode_steps"])
        env.action_space.seed(seed)
        maze_map = env.unwrapped.maze_map
        free = [(i, j) for i in range(maze_map.shape[0]) for j in range(maze_map.shape[1]) if maze_map[i, j] == 0]

        def is_hallway(i, j):
            vertical = (maze_map[i - 1, j] == 0 and maze_map[i + 1, j] == 0
                        and maze_map[i, j - 1] == 1 and maze_map[i, j + 1] == 1)
            horizontal = (maze_map[i, j - 1] == 0 and maze_map[i, j + 1] == 0
                          and maze_map[i - 1, j] == 1 and maze_map[i + 1, j] == 1)
            return vertical or horizontal

        return env, dict(all_cells=free, vertex_cells=[c for c in free if not is_hallway(*c)])
    from ogbench.manipspace.oracles.markov.cube_markov import CubeMarkovOracle
    from ogbench.manipspace.oracles.plan.cube_plan import CubePlanOracle

    env = gymnasium.make(gc_id, terminate_at_goal=False, mode="data_collection",
                         max_episode_steps=recipe["max_episode_steps"])
    env.reset(seed=seed)
    env.action_space.seed(seed)
    if spec.dataset_type == "play":  # non-Markovian plan oracle with smoothed noise
        oracle = CubePlanOracle(env=env, noise=recipe["noise"], noise_smoothing=0.5)
    else:  # Markovian closed-loop oracle; Gaussian noise added per step below
        oracle = CubeMarkovOracle(env=env, min_norm=0.4)
    return env, dict(oracle=oracle)


def _bfs(maze_map: np.ndarray, start: tuple[int, int]) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Moves from `start` to every cell through free cells (-1: unreachable or wall), and the cells in the order
    BFS discovers them (neighbours tried up, left, down, right, as OGBench does)."""
    dist = np.full(maze_map.shape, -1, np.int64)
    dist[start] = 0
    queue, order = deque([start]), []
    while queue:
        i, j = queue.popleft()
        for di, dj in ((-1, 0), (0, -1), (1, 0), (0, 1)):
            ni, nj = i + di, j + dj
            inside = 0 <= ni < maze_map.shape[0] and 0 <= nj < maze_map.shape[1]
            if inside and maze_map[ni, nj] == 0 and dist[ni, nj] < 0:
                dist[ni, nj] = dist[i, j] + 1
                queue.append((ni, nj))
                order.append((ni, nj))
    return dist, order


def _collect_pointmaze_episode(env, state, spec, recipe):
    all_cells, vertex_cells = state["all_cells"], state["vertex_cells"]
    init_ij = all_cells[np.random.randint(len(all_cells))]
    if spec.dataset_type == "stitch":  # a goal exactly 4 cells away
        dist, order = _bfs(env.unwrapped.maze_map, init_ij)
        adjacent = [c for c in order if dist[c] == 4]  # in discovery order, so the same index draws the same cell
        goal_ij = adjacent[np.random.randint(len(adjacent))] if adjacent else init_ij
    else:
        goal_ij = vertex_cells[np.random.randint(len(vertex_cells))]
    ob, _ = env.reset(options=dict(task_info=dict(init_ij=init_ij, goal_ij=goal_ij)))
    episode = {k: [] for k in ("observations", "actions", "terminals", "qpos", "qvel")}
    done, step = False, 0
    while not done:
        if spec.dataset_type == "explore":  # a random direction, redrawn every 10 steps; the goal is ignored
            if step % 10 == 0:
                direction = np.random.randn(2)
                direction = direction / (np.linalg.norm(direction) + 1e-6)
        else:
            xy = env.unwrapped.get_xy()
            subgoal_xy, _ = env.unwrapped.get_oracle_subgoal(xy, env.unwrapped.cur_goal_xy)
            direction = (subgoal_xy - xy) / (np.linalg.norm(subgoal_xy - xy) + 1e-6)
        action = np.clip(direction + np.random.normal(0, recipe["noise"], 2), -1, 1)
        step += 1
        next_ob, _, terminated, truncated, info = env.step(action)
        done = terminated or truncated
        if info["success"] and spec.dataset_type == "navigate":  # navigate: a new goal each time one is reached
            env.unwrapped.set_goal(vertex_cells[np.random.randint(len(vertex_cells))])
        for key, value in (("observations", ob), ("actions", action), ("terminals", done),
                           ("qpos", info["prev_qpos"]), ("qvel", info["prev_qvel"])):
            episode[key].append(value)
        ob = next_ob
    return {k: np.asarray(v) for k, v in episode.items()}


def _collect_cube_episode(env, state, spec, recipe):
    oracle = state["oracle"]
    ob, info = env.reset()
    p_stack = {"single": 0.0}.get(spec.env_id.split("-")[1])
    if p_stack is None:
        low, high = {"double": (0.0, 0.25), "triple": (0.05, 0.35), "quadruple": (0.1, 0.5)}[spec.env_id.split("-")[1]]
        p_stack = np.random.uniform(low, high)
    markov = spec.dataset_type == "noisy"
    xi = np.random.uniform(0, recipe["noise"]) if markov else 0.0  # this episode's noise level
    oracle.reset(ob, info)
    episode = {k: [] for k in ("observations", "actions", "terminals", "qpos", "qvel")}
    done = False
    while not done:
        if np.random.rand() < recipe["p_random_action"]:
            action = env.action_space.sample()
        else:
            action = np.array(oracle.select_action(ob, info))
            if markov:
                action = action + np.random.normal(0, [xi, xi, xi, xi * 3, xi * 10], action.shape)
        action = np.clip(action, -1, 1)
        next_ob, _, terminated, truncated, info = env.step(action)
        done = terminated or truncated
        if oracle.done:  # the current sub-task is finished: set a new target
            agent_ob, agent_info = env.unwrapped.set_new_target(p_stack=p_stack)
            oracle.reset(agent_ob, agent_info)
        for key, value in (("observations", ob), ("actions", action), ("terminals", done),
                           ("qpos", info["prev_qpos"]), ("qvel", info["prev_qvel"])):
            episode[key].append(value)
        ob = next_ob
    return {k: np.asarray(v) for k, v in episode.items()}


def _generate_dmc_random(spec: EnvSpec, dataset_dir: str, recipe: dict, seed: int, progress: bool) -> Path:
    from tqdm import trange

    env = _dmc_env(spec, seed)
    spec_a = env.action_spec()
    rng = np.random.default_rng(seed)
    folder = dataset_path(spec, dataset_dir)
    for episode_index in trange(recipe["num_episodes"], desc=f"generate {spec.dataset_name}", disable=not progress):
        time_step = env.reset()
        # ExORL layout: a dummy first entry (reset observation, zero action, zero reward, discount 1).
        episode = dict(observation=[_flat_obs(time_step.observation)], action=[np.zeros(spec_a.shape, np.float32)],
                       reward=[np.zeros(1, np.float32)], discount=[np.ones(1, np.float32)],
                       physics=[env.physics.get_state().copy()])
        for _ in range(recipe["max_episode_steps"]):
            action = rng.uniform(spec_a.minimum, spec_a.maximum, spec_a.shape).astype(np.float32)
            time_step = env.step(action)
            episode["observation"].append(_flat_obs(time_step.observation))
            episode["action"].append(action)
            episode["reward"].append(np.array([time_step.reward or 0.0], np.float32))
            episode["discount"].append(np.array([time_step.discount], np.float32))
            episode["physics"].append(env.physics.get_state().copy())
            if time_step.last():
                break
        length = len(episode["action"]) - 1
        _write_npz_atomic(folder / f"episode_{episode_index:06d}_{length}.npz",
                          {k: np.asarray(v) for k, v in episode.items()})
    return folder


# ----------------------------------------------------------------------------------------------------------------
# 3. Splits and nested subsets
# ----------------------------------------------------------------------------------------------------------------

def trajectory_bounds(terminals: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) index pairs, end exclusive, of the trajectories marked by `terminals` (1 on each last row)."""
    ends = np.flatnonzero(terminals > 0) + 1
    if len(ends) == 0 or ends[-1] != len(terminals):
        ends = np.append(ends, len(terminals))
    starts = np.concatenate([[0], ends[:-1]])
    return list(zip(starts.tolist(), ends.tolist()))


def split_dataset(data: dict[str, np.ndarray], seed: int, val_fraction: float = 0.1):
    """Hold out `val_fraction` of whole trajectories (seeded); order the rest by one seeded permutation.

    Returns (train, val). Every array of `train` follows the permuted trajectory order, so the first N rows are the
    subset of size N and a larger subset always contains a smaller one. Both carry `final_idxs`: for each row, the row
    of its trajectory's last transition (the goal samplers stay inside a trajectory with it).
    """
    bounds = trajectory_bounds(data["terminals"])
    order = np.random.default_rng(seed).permutation(len(bounds))
    num_val = int(round(val_fraction * len(bounds))) if len(bounds) > 1 else 0
    num_val = min(max(num_val, 1 if len(bounds) > 1 and val_fraction > 0 else 0), len(bounds) - 1)

    def gather(trajectory_ids):
        rows = (np.concatenate([np.arange(*bounds[t]) for t in trajectory_ids]) if len(trajectory_ids)
                else np.zeros(0, int))
        part = {k: v[rows] for k, v in data.items()}
        lengths = [bounds[t][1] - bounds[t][0] for t in trajectory_ids]
        ends = np.cumsum(lengths, dtype=np.int64)
        part["final_idxs"] = np.repeat(ends - 1, lengths).astype(np.int32)
        part["terminals"] = np.zeros(len(rows), np.float32)
        part["terminals"][ends - 1] = 1.0
        return part

    return gather(order[num_val:]), gather(order[:num_val])


def check_data_size(size: int, train: dict[str, np.ndarray], flag: str) -> None:
    """A data size must be positive and no larger than the training split."""
    available = len(train["actions"])
    if not 1 <= size <= available:
        raise UsageError(f"{flag} {size} is out of range: the training split of this dataset has {available} "
                         f"transitions; choose a size in [1, {available}] or generate more episodes")


def resolve_data_size(size: int | None, train: dict[str, np.ndarray], flag: str) -> int:
    """The data size a flag asks for: all training transitions when omitted, else a checked prefix length."""
    size = len(train["actions"]) if size is None else size
    check_data_size(size, train, flag)
    return size


# ----------------------------------------------------------------------------------------------------------------
# 4. Sampling on device
# ----------------------------------------------------------------------------------------------------------------
# OGBench's goal distributions. Value goals: 20% the current state (reward 0, episode ends), 50% a future state of
# the same trajectory at a geometric offset, 30% a random state of the subset. Actor goals: a uniformly drawn future
# state of the same trajectory. Reward is 0 at the goal and -1 elsewhere. Sizes are traced, so one compiled program
# serves every subset size.

@dataclasses.dataclass(frozen=True)
class GoalConfig:
    """OGBench's goal-sampling probabilities (value goals) and the geometric offset's discount."""

    p_current: float = 0.2
    p_trajectory: float = 0.5
    p_random: float = 0.3
    discount: float = 0.99


def to_device(part: dict[str, np.ndarray]):
    """Move a split onto the accelerator once (pass it into jitted functions as an argument, never close over it)."""
    import jax.numpy as jnp

    return {k: jnp.asarray(v) for k, v in part.items()}


def sample_batch(key, data, data_size, batch_size: int, goals: Literal["none", "value", "actor"],
                 goal_config: GoalConfig = GoalConfig(), online=None):
    """Draw `batch_size` transitions from the first `data_size` rows (a traced int), with goals if asked.

    For goal-conditioned data, `goals="value"` adds `goals`, `rewards` and `masks` from OGBench's value-goal mixture;
    `goals="actor"` adds `goals` drawn from the future of each trajectory. Goals never leave the subset: a trajectory
    cut by the subset boundary is treated as ending there.

    `online` (offline-to-online, one member's `OnlineBuffer.device()` rows): its first `online["size"]` rows count as
    rows data_size, data_size + 1, ... of the same data, so a batch is drawn uniformly from the subset and the online
    rows together, and goals stay inside whichever trajectory (offline or online) a row belongs to.
    """
    import jax
    import jax.numpy as jnp

    k_idx, k_kind, k_geom, k_uniform, k_random = jax.random.split(key, 5)
    total = data_size if online is None else data_size + online["size"]
    idxs = jax.random.randint(k_idx, (batch_size,), 0, total)

    def rows(name, row_idxs):
        if online is None:
            return data[name][row_idxs]
        offline = data[name][jnp.minimum(row_idxs, data_size - 1)]
        own = online[name][jnp.clip(row_idxs - data_size, 0, online[name].shape[0] - 1)]
        is_online = (row_idxs >= data_size).reshape(-1, *([1] * (offline.ndim - 1)))
        return jnp.where(is_online, own, offline)

    batch = {k: rows(k, idxs) for k in ("observations", "actions", "next_observations", "rewards", "masks")}
    if goals == "none":
        return batch
    final = jnp.minimum(data["final_idxs"][jnp.minimum(idxs, data_size - 1)], data_size - 1)
    if online is not None:  # an online row's trajectory ends at its episode's last row (the newest row, if open)
        final = jnp.where(idxs >= data_size, data_size + rows("final_idxs", idxs), final)
    uniform = jax.random.uniform(k_uniform, (batch_size,))
    if goals == "actor":
        # Uniformly among the strict future (the last state itself when there is none).
        future = jnp.minimum(idxs + 1 + jnp.floor(uniform * (final - idxs)).astype(jnp.int32), final)
        batch["goals"] = rows("observations", future)
        return batch
    offset = jnp.ceil(jnp.log1p(-jax.random.uniform(k_geom, (batch_size,))) / jnp.log(goal_config.discount))
    geometric = jnp.minimum(idxs + jnp.maximum(offset.astype(jnp.int32), 1), final)
    random_goal = jax.random.randint(k_random, (batch_size,), 0, total)
    u = jax.random.uniform(k_kind, (batch_size,))
    goal_idxs = jnp.where(u < goal_config.p_current, idxs,
                          jnp.where(u < goal_config.p_current + goal_config.p_trajectory, geometric, random_goal))
    success = (goal_idxs == idxs).astype(jnp.float32)
    batch["goals"] = rows("observations", goal_idxs)
    batch["rewards"] = success - 1.0
    batch["masks"] = 1.0 - success
    return batch


def fixed_goal_states(part: dict[str, np.ndarray], data_size: int, count: int, seed: int):
    """A fixed sample of (row, actor goal) pairs from the first `data_size` rows, for the MSE metrics (host side)."""
    rng = np.random.default_rng(seed)
    rows = np.floor(rng.uniform(size=count) * data_size).astype(np.int64)
    final = np.minimum(part["final_idxs"][rows], data_size - 1)
    goal_rows = np.minimum(rows + 1 + np.floor(rng.uniform(size=count) * (final - rows)).astype(np.int64), final)
    return part["observations"][rows], part["observations"][goal_rows]


# ----------------------------------------------------------------------------------------------------------------
# 5. Oracles: the noiseless expert's action for any state and goal
# ----------------------------------------------------------------------------------------------------------------

def make_oracle(spec: EnvSpec) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """Return `oracle(observations [N, d], goals [N, d]) -> actions [N, a]`, deterministic, vectorised (numpy)."""
    if spec.kind == "pointmaze":
        return _pointmaze_oracle(spec)
    if spec.env_id.startswith("cube-single"):
        return _cube_single_oracle
    raise UsageError(f"'{spec.name}' has no scripted oracle; the MSE metrics exist for pointmaze and cube-single only")


def _pointmaze_oracle(spec: EnvSpec):
    """Unit vector toward the next cell on a shortest BFS path to the goal's cell; inside the goal's cell, toward the
    goal itself. (OGBench's data oracle aims at the goal cell's centre instead, which can miss a goal placed with
    noise up to a cell quarter away from the centre: we label the truly optimal direction.)"""
    import gymnasium
    import ogbench  # noqa: F401

    maze = gymnasium.make(spec.env_id.replace("-singletask", "").split("-task")[0]).unwrapped
    maze_map, unit, off_x, off_y = np.asarray(maze.maze_map), maze._maze_unit, maze._offset_x, maze._offset_y
    height, width = maze_map.shape
    # steps[g, c]: BFS moves from cell c to goal cell g (big where unreachable), for every pair of cells.
    steps = np.full((height * width, height * width), 10**6, np.int64)
    for i, j in np.argwhere(maze_map == 0):
        dist = _bfs(maze_map, (i, j))[0].ravel()
        steps[i * width + j] = np.where(dist >= 0, dist, 10**6)
    moves = np.array([(-1, 0), (0, -1), (1, 0), (0, 1)])  # the official tie-breaking order

    def cell(xy):
        i = np.clip(np.floor((xy[:, 1] + off_y + 0.5 * unit) / unit).astype(np.int64), 0, height - 1)
        j = np.clip(np.floor((xy[:, 0] + off_x + 0.5 * unit) / unit).astype(np.int64), 0, width - 1)
        return i, j

    def oracle(observations, goals):
        xy, goal_xy = np.asarray(observations)[:, :2], np.asarray(goals)[:, :2]
        (i, j), (gi, gj) = cell(xy), cell(goal_xy)
        goal_cell = gi * width + gj
        best_i, best_j = i.copy(), j.copy()
        best = steps[goal_cell, i * width + j]
        for di, dj in moves:  # first neighbour with the strictly smallest distance, as OGBench breaks ties
            ni, nj = np.clip(i + di, 0, height - 1), np.clip(j + dj, 0, width - 1)
            d = steps[goal_cell, ni * width + nj]
            better = d < best
            best, best_i, best_j = np.where(better, d, best), np.where(better, ni, best_i), np.where(better, nj, best_j)
        target = np.stack([best_j * unit - off_x, best_i * unit - off_y], axis=-1).astype(np.float64)
        in_goal_cell = (i == gi) & (j == gj)
        target = np.where(in_goal_cell[:, None], goal_xy, target)
        direction = target - xy
        return (direction / (np.linalg.norm(direction, axis=-1, keepdims=True) + 1e-6)).astype(np.float32)

    return oracle


def _cube_single_oracle(observations, goals, min_norm: float = 0.4):
    """OGBench's CubeMarkovOracle rebuilt from the observation and goal alone (no privileged info, no memory).

    Observation layout (28-d): arm joints 0:6, joint velocities 6:12, effector xyz (scaled) 12:15, effector yaw
    cos/sin 15:17, gripper opening 17, gripper contact 18, cube xyz (scaled) 19:22, cube quaternion 22:26, cube yaw
    cos/sin 26:28. Positions are stored as (xyz - [0.425, 0, 0]) * 10. Once the cube is released on its target, the
    official oracle turns to a random yaw and moves to a random resting pose; without memory we rise straight up
    without turning and then hold still (zero motion, gripper open). Before that, the actions are the official ones.
    """
    obs, goal = np.asarray(observations, np.float64), np.asarray(goals, np.float64)
    center = np.array([0.425, 0.0, 0.0])
    effector = obs[:, 12:15] / 10.0 + center
    effector_yaw = np.arctan2(obs[:, 16], obs[:, 15])
    contact = obs[:, 18]
    block = obs[:, 19:22] / 10.0 + center
    target = goal[:, 19:22] / 10.0 + center

    def shortest_yaw(reference, yaw):  # the cube looks the same every quarter turn
        candidates = yaw[:, None] + 2 * np.pi * np.arange(-4, 5)[None, :] / 4
        return candidates[np.arange(len(yaw)), np.argmin(np.abs(reference[:, None] - candidates), axis=1)]

    block_yaw = shortest_yaw(effector_yaw, np.arctan2(obs[:, 27], obs[:, 26]))
    target_yaw = shortest_yaw(effector_yaw, np.arctan2(goal[:, 27], goal[:, 26]))

    def shape(diff):  # at least `min_norm` long, so the arm never creeps
        norm = np.linalg.norm(diff, axis=-1, keepdims=True)
        return np.where(norm >= min_norm, diff, diff / (norm + 1e-6) * min_norm)

    above_offset, above_threshold = np.array([0, 0, 0.18]), 0.16
    closed, opened, above = contact > 0.5, contact < 0.1, effector[:, 2] > above_threshold
    xy_aligned = np.linalg.norm(block[:, :2] - effector[:, :2], axis=-1) <= 0.04
    pos_aligned = np.linalg.norm(block - effector, axis=-1) <= 0.02
    target_xy_aligned = np.linalg.norm(target[:, :2] - block[:, :2], axis=-1) <= 0.04
    target_aligned = np.linalg.norm(target - block, axis=-1) <= 0.02
    lift = np.stack([block[:, 0], block[:, 1], np.full(len(block), above_offset[2] * 2)], -1)
    lift_open = np.stack([block[:, 0], block[:, 1], np.full(len(block), above_threshold * 2)], -1)
    # (condition, position target, yaw error, gripper) per phase, first match wins, as in the official if-chain.
    phases = [
        (~target_aligned & ~xy_aligned, block + above_offset, block_yaw - effector_yaw, -1.0),  # above the cube
        (~target_aligned & ~pos_aligned, block, block_yaw - effector_yaw, -1.0),  # down to the cube
        (~target_aligned & ~closed, block, block_yaw - effector_yaw, 1.0),  # grasp
        (~target_aligned & ~above & ~target_xy_aligned, lift, target_yaw - block_yaw, 1.0),  # lift
        (~target_aligned & ~target_xy_aligned, target + above_offset, target_yaw - block_yaw, 1.0),  # carry
        (~target_aligned, target, target_yaw - block_yaw, 1.0),  # lower onto the target
        (~opened, target, target_yaw - block_yaw, -1.0),  # release
        (~above, lift_open, np.zeros(len(obs)), -1.0),  # back up
    ]
    action = np.zeros((len(obs), 5))
    action[:, 4] = -1.0  # done: hold still, gripper open
    assigned = np.zeros(len(obs), bool)
    for condition, position, yaw_error, gripper in phases:
        take = condition & ~assigned
        action[take, :3] = shape(position - effector)[take] * 5.0
        action[take, 3] = (yaw_error * 3.0)[take]
        action[take, 4] = gripper
        assigned |= take
    return np.clip(action, -1, 1).astype(np.float32)


def task_goal(spec: EnvSpec) -> np.ndarray | None:
    """The fixed goal observation of a singletask environment (what the oracle aims at); None otherwise."""
    if spec.family != "ogbench" or spec.goal_conditioned:
        return None
    env = make_env(spec)
    _, info = env.reset(seed=0)
    return np.asarray(info["goal"], np.float32)


# ----------------------------------------------------------------------------------------------------------------
# 6. Environments and lockstep evaluation
# ----------------------------------------------------------------------------------------------------------------

def make_env(spec: EnvSpec):
    """One environment instance: a gymnasium env (OGBench) or a dm_control suite env."""
    if spec.family == "dmc":
        return _dmc_env(spec)
    import gymnasium
    import ogbench  # noqa: F401

    return gymnasium.make(spec.env_id)


def env_dims(spec: EnvSpec) -> tuple[int, int]:
    """(observation dim, action dim) of `spec`'s environment."""
    env = make_env(spec)
    if spec.family == "dmc":
        return len(_flat_obs(env.reset().observation)), env.action_spec().shape[0]
    return env.observation_space.shape[0], env.action_space.shape[0]


def num_eval_tasks(spec: EnvSpec) -> int:
    """OGBench goal-conditioned environments have 5 evaluation tasks; the others one."""
    return 5 if spec.goal_conditioned else 1


class Evaluator:
    """Steps `num_members * episodes` environments in lockstep; the policy is called once per step for all of them.

    `evaluate(policy, seeds)` runs `episodes_per_task` episodes of every evaluation task for every member; member m's
    start states and goals come from `seeds[m]` alone (numpy's and each env's generator are reseeded from it), so a
    member meets the same episodes whether it trains alone or packed with others.
    """

    def __init__(self, spec: EnvSpec, num_members: int, episodes_per_task: int):
        if episodes_per_task < 1:
            raise UsageError(f"--eval-episodes must be >= 1, got {episodes_per_task}")
        self.spec, self.num_members = spec, num_members
        self.tasks = np.repeat(np.arange(1, num_eval_tasks(spec) + 1), episodes_per_task)
        self.envs = [[make_env(spec) for _ in self.tasks] for _ in range(num_members)]
        self.max_steps = 1000 if spec.family == "dmc" else self.envs[0][0].spec.max_episode_steps

    def evaluate(self, policy: Callable[[np.ndarray, np.ndarray | None], np.ndarray], seeds: list[int]) -> dict:
        """Returns success [M, E], return [M, E], and the visited states: observations [M, E, T, d], goals
        [M, E, d] (None without goals), actions [M, E, T, a], valid [M, E, T] (False after an episode ended)."""
        M, E, T = self.num_members, len(self.tasks), self.max_steps
        obs, goals = [], []
        if len(seeds) != M:
            raise ValueError(f"{len(seeds)} seeds for {M} members")
        for m, seed in enumerate(seeds):
            np.random.seed(seed)  # OGBench draws start and goal noise from numpy's global generator
            for e, task in enumerate(self.tasks):
                o, g = reset_env(self.spec, self.envs[m][e], task, seed * 10007 + e)
                obs.append(o)
                goals.append(g)
        obs = np.asarray(obs, np.float32).reshape(M, E, -1)
        goals = None if goals[0] is None else np.asarray(goals, np.float32).reshape(M, E, -1)
        visited = np.zeros((M, E, T, obs.shape[-1]), np.float32)
        actions_taken, valid = None, np.zeros((M, E, T), bool)
        alive, success, returns = np.ones((M, E), bool), np.zeros((M, E)), np.zeros((M, E))
        for t in range(T):
            actions = np.asarray(policy(obs, goals))
            if actions_taken is None:
                actions_taken = np.zeros((M, E, T, actions.shape[-1]), np.float32)
            visited[:, :, t], actions_taken[:, :, t], valid[:, :, t] = obs, actions, alive
            for m, e in zip(*np.nonzero(alive)):
                o, reward, terminated, truncated, succeeded = step_env(self.spec, self.envs[m][e], actions[m, e])
                obs[m, e] = o
                returns[m, e] += reward
                success[m, e] = max(success[m, e], succeeded)
                alive[m, e] = not (terminated or truncated)
            if not alive.any():
                break
        return dict(success=success, returns=returns, observations=visited, goals=goals, actions=actions_taken,
                    valid=valid)


def reset_env(spec: EnvSpec, env, task: int, seed: int):
    """Start an episode of evaluation task `task` (goal-conditioned envs) -> (observation, goal or None)."""
    if spec.family == "dmc":
        env.task.random.seed(seed)
        return _flat_obs(env.reset().observation), None
    ob, info = env.reset(seed=seed, options=dict(task_id=int(task)) if spec.goal_conditioned else None)
    return ob, (info["goal"] if spec.goal_conditioned else None)


def step_env(spec: EnvSpec, env, action):
    """-> (observation, reward, terminated, truncated, success). dm_control episodes only ever end by the time limit
    (truncated); OGBench episodes terminate at the goal."""
    if spec.family == "dmc":
        time_step = env.step(action)
        return _flat_obs(time_step.observation), float(time_step.reward or 0.0), False, time_step.last(), 0.0
    ob, reward, terminated, truncated, info = env.step(action)
    return ob, float(reward), bool(terminated), bool(truncated), float(info.get("success", 0.0))


class OracleProbe:
    """The paper's generalization metrics: mean squared error between the policy's action and the oracle's action
    (averaged over action dimensions) on three state distributions, per member:

      train_mse  `samples` states drawn once from the policy's data subset, goals from their trajectory's future
      val_mse    `samples` states drawn once from the held-out trajectories
      eval_mse   every state the policy visited in an evaluation, with that episode's goal

    Without an oracle (dm_control, or OGBench environments other than pointmaze and cube-single) every method returns
    an empty dict and the run reports "n/a". `policy(obs [M, N, d], goals [M, N, d] | None) -> [M, N, a]` is the same
    batched callable the Evaluator steps the environments with. Member m's training states come from its own policy
    subset (`policy_data_sizes[m]`), so packed members of different sizes are each measured on their own data.
    """

    def __init__(self, spec: EnvSpec, train: dict[str, np.ndarray], val: dict[str, np.ndarray],
                 policy_data_sizes: list[int], samples: int, seed: int):
        self.spec, self.sets = spec, {}
        if not spec.has_oracle:
            return
        self.oracle, self.task_goal = make_oracle(spec), task_goal(spec)
        labelled = {}  # one labelled set per distinct size, shared by the members of that size
        for size in sorted(set(policy_data_sizes)):
            labelled[size] = self._labelled(train, size, samples, seed + 1)
        self.sets["train"] = tuple(None if labelled[policy_data_sizes[0]][i] is None else
                                   np.stack([labelled[size][i] for size in policy_data_sizes]) for i in range(3))
        if len(val["actions"]):
            self.sets["val"] = tuple(None if x is None else np.broadcast_to(x, (len(policy_data_sizes), *x.shape))
                                     for x in self._labelled(val, len(val["actions"]), samples, seed + 2))

    def _labelled(self, part, size, samples, seed):
        """(observations, policy goals or None for a reward-based task, oracle actions), labelled once on the host."""
        obs, goals = fixed_goal_states(part, size, samples, seed)
        oracle_goals = goals if self.spec.goal_conditioned else self._task_goals(len(obs))
        return obs, goals if self.spec.goal_conditioned else None, self.oracle(obs, oracle_goals)

    def _task_goals(self, count: int) -> np.ndarray:
        return np.broadcast_to(self.task_goal, (count, self.task_goal.shape[0]))

    def train_val(self, policy) -> dict[str, np.ndarray]:
        """{"train_mse": [M], "val_mse": [M]} (the keys that exist) for the policy's current parameters."""
        out = {}
        for name, (obs, goals, labels) in self.sets.items():
            actions = np.asarray(policy(obs, goals))
            out[f"{name}_mse"] = ((actions - labels) ** 2).mean((1, 2))
        return out

    def eval(self, rollout: dict) -> dict[str, np.ndarray]:
        """{"eval_mse": [M]} over the valid steps of an `Evaluator.evaluate` rollout."""
        if not self.spec.has_oracle:
            return {}
        valid, observations = rollout["valid"], rollout["observations"]
        M, E = valid.shape[:2]
        goals = rollout["goals"] if self.spec.goal_conditioned else self._task_goals(M * E).reshape(M, E, -1)
        goals = np.broadcast_to(goals[:, :, None, :], observations.shape)
        labels = self.oracle(observations[valid], goals[valid])
        errors = ((rollout["actions"][valid] - labels) ** 2).mean(-1)
        member_of_row = np.nonzero(valid)[0]
        return {"eval_mse": np.bincount(member_of_row, errors, M) / np.bincount(member_of_row, minlength=M)}


def rollout_metrics(rollout: dict, probe: OracleProbe, prefix: str = "") -> dict[str, np.ndarray]:
    """Per-member success, return and evaluation MSE of an `Evaluator.evaluate` rollout, names prefixed."""
    metrics = {"success": rollout["success"].mean(1), "return": rollout["returns"].mean(1), **probe.eval(rollout)}
    return {prefix + k: v for k, v in metrics.items()}


# ----------------------------------------------------------------------------------------------------------------
# 6b. Test-time policy improvement: OPEX and TTT (the paper's remedies for poor test-time generalization)
# ----------------------------------------------------------------------------------------------------------------
# A script with a Q function hands TestTime three single-member functions: its action rule `act(params, obs, goals,
# key)`, the Q its extractor maximises `q_value(params, obs, goals, actions) -> [N]`, and its policy's mean
# `mean_action(actor_params, obs, goals)`. Evaluation then runs the same episodes plainly and once per test-time
# method asked for, and logs them side by side (`success`, `opex_success`, `ttt_success`; `_return`, `_eval_mse`).

TEST_TIME_METHODS = ("opex", "ttt")


def check_test_time_flags(config) -> None:
    """The test-time flags every script with a Q function shares (tyro checks the method names)."""
    checks = [
        (len(set(config.test_time)) == len(config.test_time), f"--test-time lists a method twice: "
                                                              f"{' '.join(config.test_time)}"),
        (config.opex_steps >= 1, f"--opex-steps must be >= 1, got {config.opex_steps}"),
        (config.opex_beta >= 0, f"--opex-beta must be >= 0, got {config.opex_beta}"),
        (config.ttt_steps_per_env_step >= 1,
         f"--ttt-steps-per-env-step must be >= 1, got {config.ttt_steps_per_env_step}"),
        (config.ttt_lr >= 0, f"--ttt-lr must be >= 0, got {config.ttt_lr}"),
        (config.ttt_batch_size >= 1, f"--ttt-batch-size must be >= 1, got {config.ttt_batch_size}"),
        (config.ttt_alpha >= 0, f"--ttt-alpha must be >= 0, got {config.ttt_alpha}"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)


def opex_actions(q_of_actions: Callable, actions, beta: float, steps: int, normalize: bool):
    """OPEX: `steps` moves up the frozen Q, a <- clip(a + beta * g, -1, 1) with g = dQ(s, a)/da, divided by its norm
    per state when `normalize` (then beta is the step length in action units). No parameter changes."""
    import jax
    import jax.numpy as jnp

    def move(a, _):
        g = jax.grad(lambda a: q_of_actions(a).sum())(a)  # states are independent: the sum's gradient is per state
        if normalize:
            g = g / (jnp.linalg.norm(g, axis=-1, keepdims=True) + 1e-8)
        return jnp.clip(a + beta * g, -1.0, 1.0), None

    return jax.lax.scan(move, actions, None, length=steps)[0]


def ttt_loss(actor_params, anchor_actions, params, obs, goals, q_value: Callable, mean_action: Callable,
             alpha: float):
    """TTT's DDPG+BC objective on visited states: raise the (normalised, frozen) Q of the policy's action and stay
    near the pre-trained policy's action there: -Q(s, mu(s)) / stopgrad(E|Q|) + alpha/2 ||mu(s) - mu_0(s)||^2."""
    import jax
    import jax.numpy as jnp

    mu = mean_action(actor_params, obs, goals)
    q = q_value(params, obs, goals, mu)
    q_loss = -q.mean() / jax.lax.stop_gradient(jnp.abs(q).mean() + 1e-8)
    return q_loss + alpha * 0.5 * ((mu - anchor_actions) ** 2).sum(-1).mean()


class TestTime:
    """One test-time `method` ("opex" or "ttt") for one script: `policy(params, seeds, step)` returns the batched
    callable the Evaluator steps the environments with (obs [M, E, d], goals [M, E, g] | None -> actions [M, E, a]).

    opex  act with the script's rule, then `opex_actions` on the frozen Q (SfBC: from the chosen candidate).
    ttt   a copy of the actor per episode (`--ttt-reset episode`) or one per member shared by its episodes, which
          run in lockstep (`never`: kept for the whole evaluation). At every environment step the visited state
          is written to the copy's fixed-size device buffer, the copy takes `--ttt-steps-per-env-step` Adam steps
          of `ttt_loss` on `--ttt-batch-size` states drawn from its buffer, and then acts. The trained parameters
          are never modified: each evaluation starts from fresh copies.
    Keys derive from (member seed, training step) only, so a member's test-time episodes do not depend on packing.
    """

    def __init__(self, config, evaluator: Evaluator, method: str, act: Callable, q_value: Callable,
                 mean_action: Callable):
        import jax
        import jax.numpy as jnp
        import optax

        self.method = method
        episodes = len(evaluator.tasks)
        self.copies = episodes if config.ttt_reset == "episode" else 1
        self.per_copy = episodes // self.copies  # environments each copy acts in
        self.slots = evaluator.max_steps * self.per_copy  # buffer rows per copy: every state it can visit
        optimizer = optax.adam(config.ttt_lr)

        def opex_act(params, obs, goals, key):
            actions = act(params, obs, goals, key)
            return opex_actions(lambda a: q_value(params, obs, goals, a), actions, config.opex_beta,
                                config.opex_steps, config.opex_normalize)

        def ttt_step(carry, params, obs, goals, key):
            """One environment step of one member: store the visited states, train every copy, act."""
            # Acting uses `key` itself as OPEX does, so with one copy SfBC draws the candidates the plain rule draws.
            k_train = jax.random.fold_in(key, 1)
            k_act = key[None] if self.copies == 1 else jax.random.split(key, self.copies)
            split = lambda x: None if x is None else x.reshape(self.copies, self.per_copy, -1)  # noqa: E731
            obs_c, goals_c = split(obs), split(goals)
            store = lambda buffer, new: jax.lax.dynamic_update_slice(buffer, new, (0, carry["filled"], 0))  # noqa
            buffers = {"obs": store(carry["obs"], obs_c), "goals": None if goals is None else store(carry["goals"],
                                                                                                  goals_c)}
            filled = carry["filled"] + self.per_copy

            def train_copy(actor, opt_state, buffer_obs, buffer_goals, key):
                def gradient_step(inner, key):
                    actor, opt_state = inner
                    rows = jax.random.randint(key, (config.ttt_batch_size,), 0, filled)
                    s, g = buffer_obs[rows], None if buffer_goals is None else buffer_goals[rows]
                    anchor = mean_action(params["actor"], s, g)  # the pre-trained policy's actions on those states
                    grads = jax.grad(ttt_loss)(actor, anchor, params, s, g, q_value, mean_action, config.ttt_alpha)
                    updates, opt_state = optimizer.update(grads, opt_state, actor)
                    return (optax.apply_updates(actor, updates), opt_state), None

                keys = jax.random.split(key, config.ttt_steps_per_env_step)
                return jax.lax.scan(gradient_step, (actor, opt_state), keys)[0]

            actors, opt_states = jax.vmap(train_copy)(carry["actor"], carry["opt_state"], buffers["obs"],
                                                      buffers["goals"], jax.random.split(k_train, self.copies))
            actions = jax.vmap(lambda actor, o, g, k: act({**params, "actor": actor}, o, g, k))(
                actors, obs_c, goals_c, k_act)
            carry = {"actor": actors, "opt_state": opt_states, **buffers, "filled": filled}
            return carry, actions.reshape(obs.shape[0], -1)

        def ttt_init(params, obs_dim, goal_dim):
            actors = jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (self.copies, *x.shape)), params["actor"])
            actors = jax.tree_util.tree_map(jnp.copy, actors)
            return {"actor": actors, "opt_state": jax.vmap(optimizer.init)(actors),
                    "obs": jnp.zeros((self.copies, self.slots, obs_dim)),
                    "goals": None if goal_dim is None else jnp.zeros((self.copies, self.slots, goal_dim)),
                    "filled": jnp.zeros((), jnp.int32)}

        self._opex = jax.jit(jax.vmap(opex_act))
        self._ttt_step = jax.jit(jax.vmap(ttt_step), donate_argnums=(0,))
        self._ttt_init = jax.jit(jax.vmap(ttt_init, in_axes=(0, None, None)), static_argnums=(1, 2))

    def policy(self, params, seeds: list[int], step: int) -> Callable:
        """A fresh test-time policy for one evaluation of the members' current `params` ([M]-stacked pytree)."""
        import jax
        import jax.numpy as jnp

        keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.PRNGKey(s), step))(jnp.asarray(seeds))
        calls = itertools.count()
        carry = None

        def step_keys():
            return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, next(calls))

        def policy(obs, goals):
            nonlocal carry
            if self.method == "opex":
                return self._opex(params, obs, goals, step_keys())
            if carry is None:
                carry = self._ttt_init(params, obs.shape[-1], None if goals is None else goals.shape[-1])
            carry, actions = self._ttt_step(carry, params, obs, goals, step_keys())
            return actions

        return policy


# ----------------------------------------------------------------------------------------------------------------
# 6c. Offline-to-online fine-tuning (the paper's check of what online data changes: mainly the evaluation MSE)
# ----------------------------------------------------------------------------------------------------------------
# With --online-steps N, after its --steps offline updates a script alternates N / --log-interval times: collect
# --log-interval environment steps with the current policy plus Gaussian noise (one environment per member, all
# members in lockstep), then take --log-interval updates (one update per environment step) on the member's offline
# subsets and its online rows together (`sample_batch(..., online=...)`). Value and policy keep training on the same
# schedule; evaluations and the train / val / eval MSEs go on as offline.

def check_online_flags(config) -> None:
    """The offline-to-online flags every script with a Q function shares."""
    checks = [
        (config.online_steps >= 0, f"--online-steps must be >= 0, got {config.online_steps}"),
        (config.online_steps % config.log_interval == 0,
         f"--online-steps {config.online_steps} must be a multiple of --log-interval {config.log_interval}"),
        (config.online_noise >= 0, f"--online-noise must be >= 0, got {config.online_noise}"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)


class OnlineBuffer:
    """Each member's environment and its online transitions, in fixed-size host arrays of `capacity` rows.

    `collect(policy, steps)` steps every member's environment `steps` times in lockstep (`policy` is the batched
    callable the Evaluator uses; its action plus N(0, noise^2), clipped to [-1, 1]) and returns `device()`: the rows
    as [M, capacity, ...] device arrays for the jitted update, with `size` (rows filled) and `final_idxs` (each row's
    episode end; the newest row for an episode still running, as for a trajectory cut by a subset boundary).
    Goal-conditioned episodes use a random evaluation task each; their rewards and masks are relabelled from the
    sampled goals like the offline rows. Otherwise mask = 0 only where the environment terminated (OGBench
    singletask: at the goal), never at a time limit. Each member's noise, tasks and start states come from its seed
    alone, so a member collects the same transitions alone or packed.
    """

    def __init__(self, spec: EnvSpec, seeds: list[int], capacity: int, noise: float):
        self.spec, self.seeds, self.capacity, self.noise = spec, list(seeds), capacity, noise
        M = len(self.seeds)
        self.envs = [make_env(spec) for _ in self.seeds]
        self.rngs = [np.random.default_rng([seed, 20240]) for seed in self.seeds]  # noise and task draws
        self.size, self.arrays = 0, None
        self.started = np.zeros(M, np.int64)  # episodes started per member (their reset seeds)
        self.episode_start = np.zeros(M, np.int64)  # row where each member's running episode began
        self.episode_return, self.episode_success = np.zeros(M), np.zeros(M)
        self.finished_returns: list[list[float]] = [[] for _ in self.seeds]
        self.finished_successes: list[list[float]] = [[] for _ in self.seeds]
        self.obs, self.goals = [None] * M, [None] * M
        for m in range(M):
            self._reset(m, 0)

    def _reset(self, m: int, start_row: int) -> None:
        seed, episode = self.seeds[m], int(self.started[m])
        np.random.seed(np.random.SeedSequence([seed, episode, 1]).generate_state(1)[0])  # OGBench's global draws
        task = int(self.rngs[m].integers(1, num_eval_tasks(self.spec) + 1))
        self.obs[m], self.goals[m] = reset_env(self.spec, self.envs[m], task, seed * 10007 + 500_000 + episode)
        self.started[m] += 1
        self.episode_start[m], self.episode_return[m], self.episode_success[m] = start_row, 0.0, 0.0

    def _allocate(self, obs_dim: int, action_dim: int) -> None:
        M, C = len(self.seeds), self.capacity
        self.arrays = {"observations": np.zeros((M, C, obs_dim), np.float32),
                       "actions": np.zeros((M, C, action_dim), np.float32),
                       "next_observations": np.zeros((M, C, obs_dim), np.float32),
                       "rewards": np.zeros((M, C), np.float32), "masks": np.ones((M, C), np.float32),
                       "final_idxs": np.zeros((M, C), np.int32)}

    def collect(self, policy: Callable, steps: int) -> dict:
        if self.size + steps > self.capacity:
            raise ValueError(f"online buffer full: {self.size} + {steps} rows > capacity {self.capacity}")
        goal_conditioned = self.spec.goal_conditioned
        for _ in range(steps):
            obs = np.asarray(self.obs, np.float32)[:, None]
            goals = np.asarray(self.goals, np.float32)[:, None] if goal_conditioned else None
            actions = np.asarray(policy(obs, goals))[:, 0]
            if self.arrays is None:
                self._allocate(obs.shape[-1], actions.shape[-1])
            row = self.size
            for m, rng in enumerate(self.rngs):
                action = np.clip(actions[m] + self.noise * rng.standard_normal(actions.shape[-1]), -1.0, 1.0)
                next_obs, reward, terminated, truncated, success = step_env(self.spec, self.envs[m], action)
                a = self.arrays
                a["observations"][m, row], a["actions"][m, row], a["next_observations"][m, row] = obs[m, 0], action, \
                    next_obs
                a["rewards"][m, row], a["masks"][m, row] = reward, 0.0 if terminated else 1.0
                self.obs[m] = next_obs
                self.episode_return[m] += reward
                self.episode_success[m] = max(self.episode_success[m], success)
                if terminated or truncated:
                    a["final_idxs"][m, self.episode_start[m]:row + 1] = row
                    self.finished_returns[m].append(float(self.episode_return[m]))
                    self.finished_successes[m].append(float(self.episode_success[m]))
                    self._reset(m, row + 1)
            self.size = row + 1
        for m in range(len(self.seeds)):  # running episodes end, for now, at the newest row
            self.arrays["final_idxs"][m, self.episode_start[m]:self.size] = self.size - 1
        return self.device()

    def device(self) -> dict:
        import jax.numpy as jnp

        return {**{k: jnp.asarray(v) for k, v in self.arrays.items()},
                "size": jnp.full(len(self.seeds), self.size, jnp.int32)}

    def metrics(self) -> dict[str, np.ndarray]:
        """Per member: online transitions so far, finished episodes, and (once every member finished one) the mean
        return and success rate of its finished online episodes."""
        out = {"online_transitions": np.full(len(self.seeds), self.size),
               "online_episodes": np.asarray([len(r) for r in self.finished_returns])}
        if all(self.finished_returns):
            out["online_return"] = np.asarray([np.mean(r) for r in self.finished_returns])
            out["online_success"] = np.asarray([np.mean(s) for s in self.finished_successes])
        return out


# ----------------------------------------------------------------------------------------------------------------
# 7. Run folders
# ----------------------------------------------------------------------------------------------------------------

def package_versions() -> dict[str, str]:
    """Versions of the packages a result depends on (stored in config.json)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for name in ("jax", "jaxlib", "optax", "numpy", "ogbench", "mujoco", "dm_control", "gymnasium", "tyro"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON through a temporary file and a rename: the file is either absent or complete."""
    write_atomic(Path(path), lambda f: json.dump(obj, f, indent=1))


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl's records; a line cut short by a kill mid-write (always the last one) is skipped."""
    records = []
    if Path(path).exists():
        for line in Path(path).read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


RESUME_DIR = "resume"  # inside a run folder: state_<step>.npz, the whole training state; removed on completion


def resume_steps(path: Path) -> list[int]:
    """Steps of the complete resume states in a run folder (temporary files are never named state_*.npz)."""
    return sorted(int(p.stem.split("_")[1]) for p in (Path(path) / RESUME_DIR).glob("state_*.npz"))


class RunFolder:
    """config.json (every flag and package versions), metrics.jsonl (one object per member per log event),
    result.json (written last, atomically: a folder with it is complete), checkpoints/ if asked, resume/ states
    while the run is in progress, failure.json if it diverged.

    `resume_step`: continue an interrupted run from that resume state (metrics after it are dropped); None: start
    afresh, forgetting anything an earlier attempt left in the folder."""

    def __init__(self, path: str, config: dict, resume_step: int | None = None):
        self.path = Path(path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as error:
            raise UsageError(f"cannot write to --out-dir {self.path}: {error.strerror}; choose a writable "
                             "folder") from error
        if (self.path / "result.json").exists():
            raise UsageError(f"{self.path} already holds a complete run (result.json); choose another --out-dir")
        config = json.loads(json.dumps(config))  # as config.json will hold it (tuples become lists)
        metrics = self.path / "metrics.jsonl"
        if resume_step is not None:
            saved = json.loads((self.path / "config.json").read_text())["config"]
            free = {"resume", "progress", "members_file", "out_dir", "debug_poison_step"}  # may change on resume
            changed = sorted(k for k in set(config) | set(saved) if k not in free and config.get(k) != saved.get(k))
            if changed:
                raise UsageError(f"--resume: {self.path} was started with other values of {', '.join(changed)}; "
                                 "resume with the same flags or choose another --out-dir")
            kept = [r for r in read_metrics(metrics) if r["step"] <= resume_step]
            write_atomic(metrics, lambda f: f.writelines(json.dumps(r) + "\n" for r in kept))
        else:
            shutil.rmtree(self.path / RESUME_DIR, ignore_errors=True)
        (self.path / "failure.json").unlink(missing_ok=True)  # an earlier attempt's, if any
        write_json_atomic(self.path / "config.json", dict(config=config, versions=package_versions()))
        self._metrics = open(metrics, "a" if resume_step is not None else "w")

    def log(self, records: list[dict]) -> None:
        try:
            self._metrics.write("".join(json.dumps(record) + "\n" for record in records))
            self._metrics.flush()
        except OSError as error:  # a full disk: the folder stays incomplete (no result.json) and resumable
            raise UsageError(f"cannot write {self.path / 'metrics.jsonl'}: {error.strerror}; free space, then "
                             "rerun with --resume") from error

    def checkpoint(self, step: int, params) -> None:
        """Save a parameter pytree as flat .npz arrays keyed by their tree path."""
        import jax

        leaves = jax.tree_util.tree_leaves_with_path(params)
        flat = {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}
        _write_npz_atomic(self.path / "checkpoints" / f"step_{step:08d}.npz", flat)

    def save_resume(self, step: int, arrays: dict[str, np.ndarray]) -> None:
        """Write resume/state_<step>.npz atomically, then drop all but the two newest states."""
        _write_npz_atomic(self.path / RESUME_DIR / f"state_{step:08d}.npz", arrays, compress=False)
        for old in resume_steps(self.path)[:-2]:
            (self.path / RESUME_DIR / f"state_{old:08d}.npz").unlink(missing_ok=True)

    def fail(self, failure: dict) -> None:
        self._metrics.close()
        write_json_atomic(self.path / "failure.json", failure)

    def finish(self, result: dict) -> None:
        self._metrics.close()
        write_json_atomic(self.path / "result.json", result)
        shutil.rmtree(self.path / RESUME_DIR, ignore_errors=True)  # complete: nothing left to resume


MEMBER_FIELDS = ("value_data_size", "policy_data_size", "alpha")  # what a member may vary besides its seed


class Members:
    """Who trains in this process (one vmapped program) and which run folder each member writes to.

    Default: `--num-seeds` seeds of the flags' setting, all in one run folder (per-member numbers, mean and std).
    With `--members-file` (what `scaling.py --pack` writes): a JSON list of members, each {"seed", "out_dir"} plus any
    of MEMBER_FIELDS the script has (the flags fill the rest); members sharing an out_dir must share a setting. Each
    run folder's config.json holds the flags of the equivalent standalone run, so a packed folder reads like any other.

    `seeds`, `settings` (per member, sizes resolved to transition counts) and `arrays` (the per-member fields the
    jitted update takes) describe the members; `log`, `checkpoint` and `finish` route per-member data to the folders.
    """

    def __init__(self, config, script: str, train: dict[str, np.ndarray]):
        flags = dataclasses.asdict(config)
        check_run_flags(config)
        fields = [f for f in MEMBER_FIELDS if f in flags]
        if flags.get("members_file"):
            entries = read_members_file(flags["members_file"], script, fields)
        else:
            out_dir = config.out_dir or f"runs/{config.env}/{script}/{time.strftime('%Y%m%d-%H%M%S')}_s{config.seed}"
            entries = [{"seed": config.seed + i, "out_dir": out_dir} for i in range(config.num_seeds)]
        self.seeds = [entry["seed"] for entry in entries]
        self.test_time = list(flags.get("test_time", ()))  # result.json lists the test-time methods evaluated
        self.online_steps = flags.get("online_steps", 0)  # and the online steps after offline training
        self.settings = []
        for entry in entries:
            setting = {f: entry.get(f, flags[f]) for f in fields}
            for f in fields:
                if f.endswith("_data_size"):
                    setting[f] = resolve_data_size(setting[f], train, "--" + f.replace("_", "-"))
            self.settings.append(setting)
        self.arrays = {f: np.asarray([s[f] for s in self.settings], np.float32 if f == "alpha" else np.int32)
                       for f in fields}
        groups: dict[str, list[int]] = {}
        for m, entry in enumerate(entries):
            groups.setdefault(entry["out_dir"], []).append(m)
        standalone = {}
        for out_dir, ms in groups.items():
            if any(self.settings[m] != self.settings[ms[0]] for m in ms):
                raise UsageError(f"members sharing out_dir {out_dir} have different settings; give each its own")
            standalone[out_dir] = {**flags, **self.settings[ms[0]], "seed": self.seeds[ms[0]], "num_seeds": len(ms),
                                   "out_dir": out_dir, "script": script}
        # --resume: the latest resume state every folder has (a packed process may have died between folders)
        self.resume_step = None
        if flags.get("resume"):
            common = set.intersection(*(set(resume_steps(Path(d))) for d in groups))
            self.resume_step = max(common) if common else None
        self.folders = [(RunFolder(out_dir, standalone[out_dir], self.resume_step), ms)
                        for out_dir, ms in groups.items()]
        self._last_finite: list[dict] = []

    def log(self, records: list[dict]) -> None:
        """Each record goes to its member's folder, renumbered to the member's index inside that folder."""
        for folder, ms in self.folders:
            folder.log([{**r, "member": ms.index(r["member"])} for r in records if r["member"] in ms])

    def checkpoint(self, step: int, params) -> None:
        import jax

        for folder, ms in self.folders:
            rows = np.asarray(ms)
            folder.checkpoint(step, jax.tree_util.tree_map(lambda x, rows=rows: x[rows], params))

    def save_resume(self, states, progress: Progress) -> None:
        """Every folder's resume state: its members' rows of the training state, and the loop's `progress`."""
        import jax

        leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(states))
        for folder, ms in self.folders:
            rows = np.asarray(ms)
            arrays = {jax.tree_util.keystr(path): np.asarray(leaf)[rows] for path, leaf in leaves}
            arrays["__progress__"] = np.asarray(json.dumps(progress.for_members(ms)))
            folder.save_resume(progress.step, arrays)

    def restore(self, states, progress: Progress):
        """(states, progress) as saved at `resume_step` by every folder, or the arguments unchanged without one."""
        if self.resume_step is None:
            return states, progress
        import jax

        saved = []
        for folder, ms in self.folders:
            with np.load(folder.path / RESUME_DIR / f"state_{self.resume_step:08d}.npz") as arrays:
                saved.append(({k: arrays[k] for k in arrays.files}, ms))

        def leaf(path, template):
            out = np.array(template)
            for arrays, ms in saved:
                out[np.asarray(ms)] = arrays[jax.tree_util.keystr(path)]
            return out

        states = jax.device_put(jax.tree_util.tree_map_with_path(leaf, jax.device_get(states)))
        parts = [(Progress(**json.loads(str(arrays["__progress__"]))), ms) for arrays, ms in saved]
        return states, Progress.merge(parts, len(self.seeds))

    def check_finite(self, step: int, records: list[dict], params) -> None:
        """Stop the run (Diverged: exit status 3) when a logged loss or a parameter is NaN / inf: every folder gets
        failure.json with the step, what was non-finite and the last finite metrics; resume states stay intact."""
        import jax
        import jax.numpy as jnp

        bad = sorted({k for r in records for k, v in r.items() if isinstance(v, float) and not np.isfinite(v)})
        if not all(bool(jnp.isfinite(leaf).all()) for leaf in jax.tree_util.tree_leaves(params)):
            bad.append("parameters")
        if not bad:
            self._last_finite = records
            return
        for folder, ms in self.folders:
            folder.fail({"step": step, "non_finite": bad, "last_finite_metrics": [
                {**r, "member": ms.index(r["member"])} for r in self._last_finite if r["member"] in ms]})
        where = ", ".join(str(folder.path) for folder, _ in self.folders)
        raise Diverged(f"non-finite {', '.join(bad)} in the chunk ending at step {step}; failure.json in {where}; "
                       "the last good resume state is kept")

    def finish(self, header: dict, last_eval: list[dict], best_success: np.ndarray) -> list[dict]:
        """Write every folder's result.json (`header` plus its seeds and setting) and print its line; returns them."""
        results = []
        for folder, ms in self.folders:
            setting = {f: self.settings[ms[0]].get(f) for f in MEMBER_FIELDS}
            head = {**{k: header[k] for k in ("env", "script", "steps")}, "test_time": self.test_time,
                    "online_steps": self.online_steps}
            result = final_result({**head, "seeds": [self.seeds[m] for m in ms], **setting,
                                   **{k: v for k, v in header.items() if k not in head}},
                                  [{**last_eval[m], "member": i} for i, m in enumerate(ms)],
                                  np.asarray(best_success)[ms])
            folder.finish(result)
            print(result_line(result, str(folder.path)))
            results.append(result)
        return results


@dataclasses.dataclass
class Progress:
    """What a training loop carries on the host between chunks; saved with the resume state."""

    step: int = 0  # updates done
    seconds: float = 0.0  # training wall time so far
    best_success: list[float] = dataclasses.field(default_factory=list)  # per member
    last_eval: list[dict] = dataclasses.field(default_factory=list)  # per member: the last evaluation's records
    action_calls: int = 0  # SfBC: sampling keys drawn so far (its candidates depend on it)

    @classmethod
    def start(cls, num_members: int) -> Progress:
        return cls(best_success=[-math.inf] * num_members)

    def for_members(self, ms: list[int]) -> dict:
        return {**dataclasses.asdict(self), "best_success": [self.best_success[m] for m in ms],
                "last_eval": [self.last_eval[m] for m in ms] if self.last_eval else []}

    @classmethod
    def merge(cls, parts: list[tuple[Progress, list[int]]], num_members: int) -> Progress:
        merged = dataclasses.replace(parts[0][0], best_success=[0.0] * num_members,
                                     last_eval=[{}] * num_members if parts[0][0].last_eval else [])
        for part, ms in parts:
            for i, m in enumerate(ms):
                merged.best_success[m] = part.best_success[i]
                if merged.last_eval:
                    merged.last_eval[m] = {**part.last_eval[i], "member": m}
        return merged


def check_run_flags(config) -> None:
    """The flags every script shares for resuming and the NaN-guard test hook."""
    interval = config.resume_interval
    if interval is not None and (interval < 0 or interval % config.log_interval):
        raise UsageError(f"--resume-interval must be 0 or a multiple of --log-interval {config.log_interval}")
    if config.debug_poison_step < 0 or config.debug_poison_step % config.log_interval:
        raise UsageError(f"--debug-poison-step must be 0 or a multiple of --log-interval {config.log_interval}")
    if hasattr(config, "test_time"):
        check_test_time_flags(config)
    if hasattr(config, "online_steps"):
        check_online_flags(config)


def resume_due(step: int, resume_interval: int, offline_steps: int, total_steps: int) -> bool:
    """Whether a resume state is written after `step`: every `resume_interval` steps (0: never) before the last, and at
    the end of the offline phase when an online phase follows. None during the online phase: the environments' state
    is not saved, so an interrupted online phase is collected again from the offline end, with the same result."""
    if not resume_interval:
        return False
    return (step % resume_interval == 0 and step < offline_steps) or step == offline_steps < total_steps


def poison(device_data: dict) -> dict:
    """The NaN-guard test hook: the same data with NaN observations (every loss that reads them turns NaN)."""
    return {**device_data, "observations": device_data["observations"] * float("nan")}


def read_members_file(path: str, script: str, fields: list[str]) -> list[dict]:
    """Parse and check a --members-file: a non-empty JSON list of {"seed": int, "out_dir": str, <field>: number}."""
    try:
        entries = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot read --members-file {path}: {error}; scaling.py --pack writes it") from error
    if not isinstance(entries, list) or not entries:
        raise UsageError(f"--members-file {path} must hold a non-empty JSON list of members")
    for i, entry in enumerate(entries):
        allowed = {"seed", "out_dir", *fields}
        if not isinstance(entry, dict) or not {"seed", "out_dir"} <= entry.keys() or entry.keys() - allowed:
            raise UsageError(f"--members-file {path}: member {i} must have 'seed' and 'out_dir' and may have "
                             f"{', '.join(fields)} ({script} has no others); got {entry!r}")
        if not isinstance(entry["seed"], int) or not isinstance(entry["out_dir"], str):
            raise UsageError(f"--members-file {path}: member {i} needs an integer seed and a string out_dir")
        if "alpha" in entry and not (isinstance(entry["alpha"], (int, float)) and entry["alpha"] >= 0):
            raise UsageError(f"--members-file {path}: member {i} has alpha {entry['alpha']!r}; it must be >= 0")
    return entries


def member_records(event: str, step: int, seeds: list[int], metrics: dict, **shared) -> list[dict]:
    """One metrics.jsonl record per member: `metrics` maps names to per-member arrays; `shared` is common to all."""
    return [{"event": event, "step": step, "member": m, "seed": seed, **{k: float(v[m]) for k, v in metrics.items()},
             **shared} for m, seed in enumerate(seeds)]


RESULT_METRICS = ("success", "return", "train_mse", "val_mse", "eval_mse")


def final_result(header: dict, last_eval: list[dict], best_success: np.ndarray) -> dict:
    """result.json's content: `header` (env, script, sizes, ...) plus, per metric of the last evaluation, the numbers
    per member with their mean and std ("n/a" where the environment has no oracle), and the best success seen."""
    # With --test-time, the same episodes' numbers under OPEX / TTT sit beside the plain ones (opex_success, ...).
    testtime = [f"{m}_{k}" for m in TEST_TIME_METHODS for k in RESULT_METRICS
                if last_eval and f"{m}_{k}" in last_eval[0]]
    per_member = {k: [r.get(k, "n/a") for r in last_eval] for k in (*RESULT_METRICS, *testtime)}
    per_member["best_success"] = np.asarray(best_success).tolist()
    return {**header, **summarize(per_member)}


def result_line(result: dict, out_dir: str) -> str:
    """The one line a script prints at the end."""
    mean = lambda k: result.get(k, {}).get("mean", "n/a")  # noqa: E731  (no eval MSE without an oracle)
    fmt = lambda k: "n/a" if mean(k) == "n/a" else f"{mean(k):.4f}"  # noqa: E731
    testtime = "".join(f" | {m}: success {fmt(m + '_success')} (return {fmt(m + '_return')}), eval MSE "
                       f"{fmt(m + '_eval_mse')}" for m in result.get("test_time", ()))
    return (f"final success {fmt('success')} (return {fmt('return')}) | train MSE {fmt('train_mse')} | "
            f"val MSE {fmt('val_mse')} | eval MSE {fmt('eval_mse')}{testtime} | over {len(result['seeds'])} "
            f"seed(s) -> {out_dir}/result.json")


def summarize(per_member: dict[str, list[float]]) -> dict:
    """Per-member numbers plus their mean and std over members (NaN-free lists only; 'n/a' passes through)."""
    out = {}
    for key, values in per_member.items():
        if any(isinstance(v, str) for v in values):
            out[key] = dict(per_member=values, mean="n/a", std="n/a")
        else:
            arr = np.asarray(values, np.float64)
            out[key] = dict(per_member=arr.tolist(), mean=float(arr.mean()), std=float(arr.std()))
    return out


# ----------------------------------------------------------------------------------------------------------------
# 8. Command line
# ----------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class GenerateArgs:
    """Generate a dataset offline with OGBench's official recipe (pointmaze-*, cube-*) or random dm_control data."""

    env: tyro.conf.Positional[Annotated[str, tyro.conf.arg(metavar="ENV")]]
    """Dataset name, e.g. pointmaze-medium-navigate-v0, cube-single-noisy-v0, walker-run-random."""
    dataset_dir: str = DEFAULT_DATASET_DIR
    """Folder to write into (files are named as OGBench names them, so its loader reads them)."""
    num_episodes: int | None = None
    """Training episodes (the official count when omitted); a further 10% is written to the -val file."""
    max_episode_steps: int | None = None
    """Steps per episode (the official length when omitted)."""
    seed: int = 0
    """Seed of numpy's generator and the environment's."""
    force: bool = False
    """Overwrite an existing dataset."""


def _generate_cli(args: GenerateArgs) -> None:
    spec = parse_env(args.env)
    path = dataset_path(spec, args.dataset_dir)
    if path.exists() and not args.force:
        raise UsageError(f"{path} already exists; pass --force to overwrite it")
    written = generate(spec, args.dataset_dir, args.num_episodes, args.max_episode_steps, args.seed)
    data = load_dataset(spec, args.dataset_dir)
    num_trajectories = len(trajectory_bounds(data["terminals"]))
    print(f"wrote {written}: {len(data['actions'])} transitions in {num_trajectories} trajectories")


@dataclasses.dataclass
class ListArgs:
    """List every environment name the scripts accept, and whether its data can be generated offline."""

    generatable_only: bool = False
    """Only names whose dataset `envs.py generate` can make."""


def _list_cli(args: ListArgs) -> None:
    for name in all_env_names():
        spec = parse_env(name)
        if args.generatable_only and not spec.can_generate:
            continue
        notes = ["goal-conditioned" if spec.goal_conditioned else "reward-based", "oracle" if spec.has_oracle else "",
                 "generate offline" if spec.can_generate else "download"]
        print(f"{name:48s} {', '.join(n for n in notes if n)}")


if __name__ == "__main__":
    from typing import Union

    def main():
        args = tyro.cli(Union[Annotated[GenerateArgs, tyro.conf.subcommand("generate")],
                              Annotated[ListArgs, tyro.conf.subcommand("list")]])
        (_generate_cli if isinstance(args, GenerateArgs) else _list_cli)(args)

    exit_on_usage_error(main)
