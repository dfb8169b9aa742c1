"""evaluate.py: a trained run looked at again (HARNESS: no algorithm here). Evaluate a run folder's checkpoint, load it
as a policy in a notebook, draw a pointmaze policy's trajectories over its data, film its episodes.

    python evaluate.py RUN_DIR                                 # the latest checkpoint -> RUN_DIR/eval_<step>.json
    python evaluate.py RUN_DIR --step 200000 --test-time opex ttt
    python evaluate.py RUN_DIR --trajectories                  # pointmaze -> RUN_DIR/trajectories_<step>.png
    python evaluate.py RUN_DIR --capture-video                 # -> RUN_DIR/videos/step_<step>/task<k>_episode<j>.gif

    import evaluate
    policy = evaluate.load_policy("RUN_DIR")                   # policy(observation, goal=None) -> action (numpy)

A run folder holds all it needs: config.json (every flag of the run and the script's name) and checkpoints/ (every
script writes them with --checkpoint-interval N). The evaluation is the run's own: the same members and seeds,
evaluation tasks and episodes, oracle-MSE states, SfBC candidates and test-time keys. So at a step the run evaluated
(every --eval-interval, and the last step), eval_<step>.json holds the numbers of metrics.jsonl's "eval" records of
that step (tests/test_evaluate.py checks it for every script). Exceptions, none from the checkpoint: the arm pose of a
manipulation goal, which OGBench draws unseeded (envs.Evaluator); and TTT in a folder that scaling.py --pack trained
beside others, whose process stepped fewer episodes per member at once: the same numbers up to float rounding, or,
with --ttt-reset never (one copy shared by the episodes stepped together), other numbers.

Every script's `act(params, obs, goals, key, **flags)` takes its extra arguments under their flag names (SfBC's
num_samples, bc's obs_transform ...): that is how this file binds them from config.json without knowing the script.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import inspect
import itertools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal

import envs  # sets MUJOCO_GL before anything imports mujoco
import jax
import jax.numpy as jnp
import numpy as np
import runs
import testtime
import tyro

ACT_ARGUMENTS = ("params", "obs", "goals", "key")  # the first four arguments of every script's act
ROOT = Path(__file__).resolve().parent  # algos/ is here


# ----------------------------------------------------------------------------------------------------------------
# Loading a checkpoint
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Checkpoint:
    """One checkpoint of a run folder: the script's module, its Config as the run had it (config.json), every
    member's parameters (leaves with a leading member axis) and SfBC's action key (runs.CHECKPOINT_ACTION_*)."""

    run_dir: Path
    module: object
    config: object
    spec: envs.EnvSpec
    step: int
    params: dict
    seeds: list[int]
    action_seed: int
    action_calls: int

    @property
    def act(self) -> Callable:
        """The script's act for one member, with its extra arguments bound to the run's flags."""
        flags = runs.flat_flags(self.config)
        extra = [name for name in inspect.signature(self.module.act).parameters if name not in ACT_ARGUMENTS]
        return functools.partial(self.module.act, **{name: flags[name] for name in extra})

    def policy(self) -> Callable:
        """The batched policy the run evaluated with: obs [M, N, d], goals [M, N, d] | None -> actions [M, N, a]. Its
        action keys continue SfBC's count from this step's evaluation (the other scripts ignore the key)."""
        batched_act = jax.jit(jax.vmap(self.act, in_axes=(0, 0, 0, None)))
        calls = itertools.count(self.action_calls)

        def policy(obs, goals):
            key = jax.random.fold_in(jax.random.PRNGKey(self.action_seed), next(calls))
            return batched_act(self.params, obs, goals, key)

        return policy


def checkpoint_steps(run_dir: str | Path) -> list[int]:
    """The steps of a run folder's checkpoints, in order."""
    return sorted(int(p.stem.split("_")[1]) for p in (Path(run_dir) / runs.CHECKPOINT_DIR).glob("step_*.npz"))


def load_script(name: str, path: str | Path | None = None):
    """The module of the script file at `path` (a forked script: config.json's script_path, or --script) when that
    file exists and is not algos/<name>.py beside this file; else of algos/<name>.py (importable from a notebook in
    any folder; a run folder moved from another checkout finds its script here)."""
    if path is not None and Path(path).is_file() and Path(path).resolve() != ROOT / "algos" / f"{name}.py":
        module_spec = importlib.util.spec_from_file_location(name, path)  # a forked script, run from its own file
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        module_spec.loader.exec_module(module)
        return module
    if name not in runs.SCRIPTS:
        where = f"was trained from {path}, which does not exist here" if path else "records no script file"
        raise runs.UsageError(f"config.json names the script {name!r}, which is not in algos/ "
                              f"({', '.join(runs.SCRIPTS)}) and {where}; give its file with --script PATH")
    if str(ROOT) not in sys.path:
        sys.path.append(str(ROOT))
    return importlib.import_module(f"algos.{name}")


def load_config(module, flags: dict):
    """The script's Config from config.json's flat flags (JSON lists back to tuples); nothing is run or written."""
    harness_class = {f.name: f for f in dataclasses.fields(module.Config)}["harness"].default_factory
    names = {f.name for f in dataclasses.fields(module.Config)} | {f.name for f in dataclasses.fields(harness_class)}
    kept = {k: tuple(v) if isinstance(v, list) else v for k, v in flags.items() if k in names and k != "harness"}
    return runs.make_config(module.Config, **{**kept, "members_file": None, "resume": False, "progress": False})


def load_checkpoint(run_dir: str | Path, step: int | None = None, script: str | Path | None = None) -> Checkpoint:
    """A run folder's checkpoint at `step` (default: the latest), checked leaf by leaf against the script's networks
    and loaded bit for bit. `script`: the script's file (default: the one config.json records, else algos/)."""
    run_dir = Path(run_dir)
    try:
        saved = json.loads((run_dir / "config.json").read_text())
        flags = saved["config"]
    except (OSError, ValueError, KeyError) as error:
        raise runs.UsageError(f"{run_dir} is not a run folder (no readable config.json): {error}") from error
    steps = checkpoint_steps(run_dir)
    if not steps:
        raise runs.UsageError(f"{run_dir} has no checkpoints; train with --checkpoint-interval N (a multiple of "
                              "--log-interval) to write them")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise runs.UsageError(f"{run_dir} has no checkpoint at --step {step}; it has {', '.join(map(str, steps))}")
    module = load_script(flags["script"], script or saved.get("script_path"))
    config = load_config(module, flags)
    spec = envs.parse_env(config.env)
    obs_dim, action_dim = envs.env_dims(spec)
    goal_dim = obs_dim if spec.goal_conditioned else 0
    template = jax.eval_shape(lambda key: module.init_state(key, obs_dim, goal_dim, action_dim, config)["params"],
                              jax.random.PRNGKey(0))
    path = run_dir / runs.CHECKPOINT_DIR / f"step_{step:08d}.npz"
    with np.load(path) as arrays:
        stored = {k: arrays[k] for k in arrays.files}
    seeds = list(range(config.seed, config.seed + config.num_seeds))
    expected = {jax.tree_util.keystr(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(template)}
    names = {k for k in stored if not k.startswith("__")}
    bad = sorted(names ^ expected.keys()) + sorted(
        k for k in names & expected.keys()
        if stored[k].shape != (len(seeds), *expected[k].shape) or stored[k].dtype != expected[k].dtype)
    if bad:
        raise runs.UsageError(f"{path} does not hold {flags['script']}'s networks for {len(seeds)} member(s) with "
                              f"this config.json (first mismatch: {bad[0]}); was the folder's config changed?")
    params = jax.tree_util.tree_map_with_path(lambda p, _: jnp.asarray(stored[jax.tree_util.keystr(p)]), template)
    return Checkpoint(run_dir, module, config, spec, step, params, seeds,
                      int(stored.get(runs.CHECKPOINT_ACTION_SEED, config.seed)),
                      int(stored.get(runs.CHECKPOINT_ACTION_CALLS, 0)))


def load_policy(run_dir: str | Path, step: int | None = None, member: int = 0) -> Callable:
    """For notebooks: one member's policy from a run folder's checkpoint, `policy(observation, goal=None) -> action`
    on numpy arrays, one state [d] or a batch [N, d] (goal: for goal-conditioned environments). SfBC draws fresh
    candidates on every call."""
    checkpoint = load_checkpoint(run_dir, step)
    if not 0 <= member < len(checkpoint.seeds):
        raise runs.UsageError(f"member {member} is out of range: {run_dir} has {len(checkpoint.seeds)} member(s)")
    params = jax.tree_util.tree_map(lambda x: x[member], checkpoint.params)
    act, calls = jax.jit(checkpoint.act), itertools.count()

    def policy(observation, goal=None):
        key = jax.random.fold_in(jax.random.PRNGKey(checkpoint.seeds[member]), next(calls))
        goal = None if goal is None else jnp.asarray(goal, jnp.float32)
        return np.asarray(act(params, jnp.asarray(observation, jnp.float32), goal, key))

    return policy


# ----------------------------------------------------------------------------------------------------------------
# Evaluating it
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Evaluation:
    """What one evaluation of a checkpoint gives: per-member metric arrays (the names of metrics.jsonl's "eval"
    records), the plain episodes (envs.Evaluator.evaluate's rollout), the probe that measured their oracle MSEs,
    and the training split (for coverage)."""

    metrics: dict[str, np.ndarray]
    rollout: dict
    probe: envs.OracleProbe
    train: dict[str, np.ndarray]
    policy_data_size: int


def evaluate_checkpoint(checkpoint: Checkpoint, test_time: tuple[str, ...] = (), eval_episodes: int | None = None,
                        eval_envs: int | None = None, dataset_dir: str | None = None, download: bool = True,
                        recorder: VideoRecorder | None = None) -> Evaluation:
    """Evaluate every member of `checkpoint` as its run did: the plain episodes, the train / val MSE, then each
    test-time method on the same episodes (the order of the scripts' evaluate, which SfBC's key count depends on)."""
    config, spec = checkpoint.config, checkpoint.spec
    if test_time and not hasattr(checkpoint.module, "q_value"):
        raise runs.UsageError(f"--test-time needs a script with a Q function, and {checkpoint.module.SCRIPT} has "
                              "none (OPEX and TTT climb Q)")
    harness = dataclasses.replace(config.harness, eval_episodes=eval_episodes or config.harness.eval_episodes,
                                  eval_envs=eval_envs or config.harness.eval_envs,
                                  **({"test_time": tuple(test_time)} if test_time else {}))
    train, val, _ = envs.load_splits(spec, dataset_dir or config.dataset_dir, config.split_seed, download)
    size = runs.resolve_data_size(config.policy_data_size, len(train["actions"]), "--policy-data-size")
    probe = envs.OracleProbe(spec, train, val, [size] * len(checkpoint.seeds), harness.mse_samples, config.split_seed)
    evaluator = envs.Evaluator(spec, len(checkpoint.seeds), harness.eval_episodes, harness.eval_envs,
                               recorder.size if recorder else None, harness.eval_max_steps)
    policy = checkpoint.policy()
    rollout = evaluator.evaluate(recorder.wrap(policy, evaluator) if recorder else policy, checkpoint.seeds)
    metrics = {**envs.rollout_metrics(rollout, probe), **probe.train_val(policy)}
    if test_time:
        module = checkpoint.module
        methods = testtime.Methods(harness, evaluator, probe, checkpoint.act, module.q_value, module.mean_action)
        metrics.update(methods.metrics(checkpoint.params, checkpoint.seeds, checkpoint.step))
    evaluator.close()
    return Evaluation(metrics, rollout, probe, train, size)


def evaluation_file(checkpoint: Checkpoint, evaluation: Evaluation, test_time: tuple[str, ...]) -> dict:
    """eval_<step>.json's content: which checkpoint and seeds, then per metric its per-member values, mean and std
    (as in result.json)."""
    per_member = {k: np.asarray(v).tolist() for k, v in evaluation.metrics.items()}
    return {"run_dir": str(checkpoint.run_dir), "script": checkpoint.module.SCRIPT, "env": checkpoint.config.env,
            "step": checkpoint.step, "seeds": checkpoint.seeds, "test_time": list(test_time),
            "episodes_per_task": int(np.sum(evaluation.rollout["tasks"] == evaluation.rollout["tasks"][0])),
            **runs.summarize(per_member)}


def evaluation_line(result: dict, path: Path) -> str:
    def fmt(key):
        return f"{result[key]['mean']:.4f}" if key in result else "n/a"

    methods = "".join(f" | {m}: success {fmt(m + '_success')}, eval MSE {fmt(m + '_eval_mse')}"
                      for m in result["test_time"])
    return (f"step {result['step']}: success {fmt('success')} (return {fmt('return')}) | train MSE {fmt('train_mse')}"
            f" | val MSE {fmt('val_mse')} | eval MSE {fmt('eval_mse')}{methods} | over {len(result['seeds'])} "
            f"seed(s) -> {path}")


# ----------------------------------------------------------------------------------------------------------------
# Pictures of behaviour: pointmaze trajectories over the data, and videos
# ----------------------------------------------------------------------------------------------------------------
def trajectory_figure(checkpoint: Checkpoint, evaluation: Evaluation, member: int = 0):
    """A pointmaze policy's evaluation episodes, one panel per task, over the maze (walls dark) and the coverage of
    the policy's training data (grey, darker = more transitions): each step coloured by its squared error to the
    oracle's action, the start a circle, the goal a star. Where the colour turns bright off the grey is where the
    policy fails to generalize beyond its data (the paper's B3). Returns the matplotlib Figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection
    from matplotlib.colors import LogNorm, Normalize
    from matplotlib.patches import Rectangle

    spec, rollout = checkpoint.spec, evaluation.rollout
    maze_map, unit, off_x, off_y = envs.maze_geometry(spec)
    rows, cols = maze_map.shape
    x_edges = np.linspace(-off_x - unit / 2, (cols - 0.5) * unit - off_x, 4 * cols + 1)
    y_edges = np.linspace(-off_y - unit / 2, (rows - 0.5) * unit - off_y, 4 * rows + 1)
    xy = evaluation.train["observations"][:evaluation.policy_data_size, :2]
    coverage = np.histogram2d(xy[:, 0], xy[:, 1], bins=(x_edges, y_edges))[0].T
    episodes = {t: np.nonzero(rollout["tasks"] == t)[0] for t in np.unique(rollout["tasks"])}
    if rollout["goals"] is None:  # singletask: one fixed goal for every episode
        goals = [envs.task_goal(spec)] * len(rollout["tasks"])
    else:
        goals = list(rollout["goals"][member])
    errors, drawn = evaluation.probe.step_errors(rollout), {}  # the terms of eval_mse, per step
    for e in np.concatenate(list(episodes.values())):
        valid = rollout["valid"][member, e]
        drawn[e] = rollout["observations"][member, e][valid], errors[member, e][valid]
    norm = Normalize(0.0, max(1e-6, errors[member][rollout["valid"][member]].max(initial=0.0)))  # every panel's scale
    figure, axes = plt.subplots(1, len(episodes), figsize=(3.6 * len(episodes) + 1.2, 3.8), squeeze=False)
    for ax, (task, es) in zip(axes[0], episodes.items()):
        ax.pcolormesh(x_edges, y_edges, np.ma.masked_equal(coverage, 0), cmap="Greys", alpha=0.45,
                      norm=LogNorm(1, max(2, coverage.max())))
        for i, j in np.argwhere(maze_map == 1):
            ax.add_patch(Rectangle((j * unit - off_x - unit / 2, i * unit - off_y - unit / 2), unit, unit,
                                   color="#3b3b3b", zorder=1))
        for e in es:
            observations, errors = drawn[e]
            points = observations[:, :2]
            segments = np.stack([points[:-1], points[1:]], axis=1)
            line = LineCollection(segments, cmap="plasma", norm=norm, linewidths=1.8, zorder=3)
            line.set_array(errors[:-1])  # a segment takes the colour of the action that started it
            line.set_gid(f"episode {e}")  # which evaluation episode (rollout index) this line draws
            ax.add_collection(line)
            ax.plot(*points[0], "o", color="white", markeredgecolor="black", markersize=5, zorder=4)
            ax.plot(*goals[e][:2], "*", color="#19c219", markeredgecolor="black", markersize=13,
                    zorder=5)
        successes = rollout["success"][member, es]
        ax.set_title(f"task {task}: success {int(successes.sum())}/{len(es)}", fontsize=10)
        ax.set_xlim(x_edges[0], x_edges[-1])
        ax.set_ylim(y_edges[0], y_edges[-1])
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    figure.colorbar(plt.cm.ScalarMappable(norm=norm, cmap="plasma"), ax=axes[0].tolist(), shrink=0.85,
                    label="squared error to the oracle's action")
    marks = [plt.Line2D([], [], linestyle="", marker="o", color="white", markeredgecolor="black", markersize=6,
                        label="an episode's start"),
             plt.Line2D([], [], linestyle="", marker="*", color="#19c219", markeredgecolor="black", markersize=12,
                        label="its goal")]
    figure.legend(handles=marks, loc="lower center", ncols=2, fontsize=9, frameon=False)
    figure.suptitle(f"{checkpoint.module.SCRIPT} on {checkpoint.config.env}, step {checkpoint.step}, seed "
                    f"{checkpoint.seeds[member]} (grey: the policy's training data)", fontsize=11)
    return figure


class VideoRecorder:
    """Films `episodes` evaluation episodes per task of one member: wraps the batched policy so that, before each
    action, the environments of the chosen episodes draw a frame (every `stride`-th step)."""

    def __init__(self, spec: envs.EnvSpec, member: int, episodes: int, size: int, stride: int):
        self.spec, self.member, self.episodes, self.size, self.stride = spec, member, episodes, size, stride
        self.frames: dict[int, list[np.ndarray]] = {}  # episode index -> frames
        self.tasks: dict[int, int] = {}

    def wrap(self, policy: Callable, evaluator: envs.Evaluator) -> Callable:
        chosen = {e for t in np.unique(evaluator.tasks) for e in np.nonzero(evaluator.tasks == t)[0][:self.episodes]}
        seen: dict[int, int] = {}

        def recording(obs, goals):
            for j in range(evaluator.wave):
                e = evaluator.wave_index * evaluator.wave + j
                if e in chosen and evaluator.alive[self.member, j]:
                    if seen.get(e, 0) % self.stride == 0:
                        frame = envs.render_frame(self.spec, evaluator.envs[self.member][j], self.size)
                        self.frames.setdefault(e, []).append(np.asarray(frame, np.uint8))
                        self.tasks[e] = int(evaluator.tasks[e])
                    seen[e] = seen.get(e, 0) + 1
            return policy(obs, goals)

        return recording

    def write(self, folder: Path, video_format: str, fps: int) -> list[Path]:
        """One file per filmed episode, task<k>_episode<j>.<format>; returns their paths."""
        paths = []
        for e in sorted(self.frames):
            task_episodes = sorted(k for k, t in self.tasks.items() if t == self.tasks[e])
            path = folder / f"task{self.tasks[e]}_episode{task_episodes.index(e)}.{video_format}"
            write_video(path, self.frames[e], fps)
            paths.append(path)
        return paths


def write_video(path: Path, frames: list[np.ndarray], fps: int) -> None:
    """GIF with Pillow (matplotlib's own dependency); MP4 with imageio and imageio-ffmpeg (the `video` extra)."""
    if path.suffix == ".gif":
        from PIL import Image

        images = [Image.fromarray(frame) for frame in frames]
        runs.write_atomic(path, lambda f: images[0].save(f, format="GIF", save_all=True, append_images=images[1:],
                                                         duration=max(1, round(1000 / fps)), loop=0), binary=True)
    else:
        import imageio.v2 as imageio

        runs.write_atomic(path, lambda f: imageio.mimwrite(f, frames, format="mp4", fps=fps), binary=True)


OFFSCREEN_GL_HELP = ("install an offscreen OpenGL backend for MuJoCo: EGL (Debian / Ubuntu: apt-get install libegl1 "
                     "libgl1-mesa-dri; then MUJOCO_GL=egl, the default where EGL works) or OSMesa (apt-get "
                     "install libosmesa6; then MUJOCO_GL=osmesa)")


def check_video(spec: envs.EnvSpec, video_format: str, size: int) -> None:
    """Before any evaluation: the chosen format's writer is installed and MuJoCo can draw offscreen (one frame of a
    fresh environment), else a UsageError (exit 2) saying what to install."""
    if video_format == "mp4":
        try:
            import imageio  # noqa: F401
            import imageio_ffmpeg  # noqa: F401
        except ImportError:
            raise runs.UsageError('--video-format mp4 needs imageio and imageio-ffmpeg: pip install -e ".[video]" '
                                  "(or use --video-format gif, which needs nothing more)") from None
    try:
        env = envs.make_env(spec, size)
        envs.reset_env(spec, env, 1, 0)
        frame = np.asarray(envs.render_frame(spec, env, size))
        env.close()
    except Exception as error:  # noqa: BLE001  (MuJoCo's GL start-up fails in many library-specific ways)
        raise runs.UsageError(f"--capture-video: MuJoCo cannot draw offscreen with MUJOCO_GL="
                              f"{os.environ.get('MUJOCO_GL', '')} ({type(error).__name__}: {error}); "
                              f"{OFFSCREEN_GL_HELP}") from None
    if frame.shape != (size, size, 3):
        raise runs.UsageError(f"--capture-video: MuJoCo drew a frame of shape {frame.shape}, not ({size}, {size}, 3); "
                              f"{OFFSCREEN_GL_HELP}")


# ----------------------------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Args:
    """Evaluate a run folder's checkpoint as the run did (the same seeds and episodes), and look at its behaviour."""

    run_dir: tyro.conf.Positional[Annotated[str, tyro.conf.arg(metavar="RUN_DIR")]]
    """A run folder (holding config.json and checkpoints/)."""
    script: str | None = None
    """The script file that trained it; default: the file config.json records (a forked script too), else algos/."""
    step: int | None = None
    """The checkpoint's step; default: the latest."""
    test_time: tuple[Literal["opex", "ttt"], ...] = ()
    """Test-time methods evaluated beside the plain policy on the same episodes, with the run's --opex-* / --ttt-*."""
    eval_episodes: int | None = None
    """Episodes per evaluation task; default: the run's."""
    eval_envs: int | None = None
    """Environments stepped at once; default: the run's (the same numbers either way, see envs.Evaluator)."""
    dataset_dir: str | None = None
    """Folder holding the run's dataset (for the train / val MSE and the coverage); default: the run's."""
    download: bool = True
    """Download a missing official dataset (--no-download, or OFFRL_NO_DOWNLOAD=1, forbids it)."""
    trajectories: bool = False
    """Pointmaze: draw the evaluation episodes over the maze and the data's coverage -> trajectories_<step>.png."""
    member: int = 0
    """Whose episodes the figure and the videos show (members are the run's seeds, in order)."""
    capture_video: bool = False
    """Film evaluation episodes -> videos/step_<step>/task<k>_episode<j>.<format> (needs EGL or OSMesa)."""
    video_format: Literal["gif", "mp4"] = "gif"
    """gif (Pillow, always installed) or mp4 (pip install -e ".[video]")."""
    video_episodes: int = 1
    """Episodes filmed per evaluation task."""
    video_size: int = 256
    """Frame width and height in pixels."""
    video_stride: int = 1
    """Film every n-th environment step (software GL draws about 5 frames per second at 200 x 200 on one core)."""
    video_fps: int = 30
    """Frames per second of the written videos."""


def main(args: Args) -> dict:
    runs.check([(args.step is None or args.step >= 0, f"--step must be >= 0, got {args.step}"),
                (args.eval_episodes is None or args.eval_episodes >= 1, "--eval-episodes must be >= 1"),
                (args.eval_envs is None or args.eval_envs >= 1, "--eval-envs must be >= 1"),
                (args.video_episodes >= 1, "--video-episodes must be >= 1"),
                (args.video_size >= 16, "--video-size must be >= 16"),
                (args.video_stride >= 1, "--video-stride must be >= 1"),
                (args.video_fps >= 1, "--video-fps must be >= 1")])
    checkpoint = load_checkpoint(args.run_dir, args.step, args.script)
    spec, run_dir = checkpoint.spec, checkpoint.run_dir
    runs.check([(0 <= args.member < len(checkpoint.seeds),
                 f"--member {args.member} is out of range: the run has {len(checkpoint.seeds)} member(s)"),
                (not args.trajectories or (spec.kind == "pointmaze" and spec.has_oracle),
                 f"--trajectories draws pointmaze mazes coloured by the oracle's error, and {spec.name} is not one "
                 "with an oracle; use --capture-video to look at it")])
    recorder = None
    if args.capture_video:
        check_video(spec, args.video_format, args.video_size)
        recorder = VideoRecorder(spec, args.member, args.video_episodes, args.video_size, args.video_stride)
    evaluation = evaluate_checkpoint(checkpoint, args.test_time, args.eval_episodes, args.eval_envs, args.dataset_dir,
                                     args.download, recorder)
    result = evaluation_file(checkpoint, evaluation, args.test_time)
    path = run_dir / runs.EVAL_FILE.format(checkpoint.step)
    runs.write_json_atomic(path, result)
    print(evaluation_line(result, path))
    if args.trajectories:
        figure = trajectory_figure(checkpoint, evaluation, args.member)
        figure_path = run_dir / runs.TRAJECTORY_FILE.format(checkpoint.step)
        runs.write_atomic(figure_path, lambda f: figure.savefig(f, format="png", dpi=110, bbox_inches="tight"),
                          binary=True)
        print(f"trajectories -> {figure_path}")
    if recorder:
        paths = recorder.write(run_dir / runs.VIDEO_DIR.format(checkpoint.step), args.video_format, args.video_fps)
        print(f"{len(paths)} video(s) -> {paths[0].parent}" if paths else "no episode was filmed")
    return result


if __name__ == "__main__":
    runs.exit_on_usage_error(lambda: main(tyro.cli(Args)))
