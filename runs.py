"""runs.py: a run's life, the same for every script in algos/ (HARNESS: a reader of an algorithm may skip this file).

Sections, top to bottom:
  1. names      what scaling.py and analyze.py read: script names, result.json's metrics, test-time method names
  2. errors     UsageError (exit 2, one line naming the flag or file) and Diverged (exit 3); atomic file writes
  3. flags      `Harness` / `QHarness`: the flags every script shares for running it (not for its algorithm), nested
                in each script's Config and flattened on the command line, with their validation
  4. folders    config.json / metrics.jsonl / result.json / checkpoints / resume states of one run folder
  5. trackers   `Trackers`: --track (Weights & Biases) and --tensorboard, per member copies of metrics.jsonl's records;
                their packages are imported only when a flag asks
  6. members    who trains in one vmapped program and which run folder each member writes to
  7. the loop   `Run`: progress bar, logging, the NaN guard, evaluations when due, checkpoints, resume states, and
                result.json at the end

Nothing here knows an environment or a loss: a script hands `Run` its metrics and its `evaluate(step)`.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import importlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Annotated, Literal

import jax
import jax.numpy as jnp
import numpy as np
import tyro
from tqdm import tqdm

# ----------------------------------------------------------------------------------------------------------------
# 1. Names, declared once: scaling.py and analyze.py import them
# ----------------------------------------------------------------------------------------------------------------
VALUE_LEARNERS = ("iql", "sarsa", "crl")
EXTRACTORS = ("awr", "ddpgbc", "sfbc")
SCRIPTS = tuple(f"{v}_{e}" for v in VALUE_LEARNERS for e in EXTRACTORS) + ("bc",)  # the files in algos/
TEST_TIME_METHODS = ("opex", "ttt")  # --test-time; result.json lists the ones a run evaluated under "test_time"
RESULT_METRICS = ("success", "return", "train_mse", "val_mse", "eval_mse")  # per member in result.json
TASK_SUCCESS = re.compile(r"task([0-9]+)_success")  # per member in result.json too: one per evaluation task
MEMBER_FIELDS = ("value_data_size", "policy_data_size", "alpha")  # what a member may vary besides its seed
RESUME_DIR = "resume"  # inside a run folder: state_<step>.npz, the whole training state; removed on completion
CHECKPOINT_DIR = "checkpoints"  # inside a run folder: step_<step>.npz, the members' parameters (--checkpoint-interval)
CHECKPOINT_ACTION_SEED, CHECKPOINT_ACTION_CALLS = "__action_seed__", "__action_calls__"  # beside them: SfBC's key
# What evaluate.py writes into a run folder for a checkpoint's step (analyze.py links them): {} is the step
EVAL_FILE, TRAJECTORY_FILE, VIDEO_DIR = "eval_{:08d}.json", "trajectories_{:08d}.png", "videos/step_{:08d}"
USAGE_EXIT, DIVERGED_EXIT = 2, 3  # exit status for bad input, and for a loss or parameter that became NaN / inf


def task_success_keys(keys) -> list[str]:
    """The per-task success names among `keys` (task1_success, task2_success, ...), in task order."""
    return sorted({k for k in keys if TASK_SUCCESS.fullmatch(k)}, key=lambda k: int(TASK_SUCCESS.fullmatch(k)[1]))


# ----------------------------------------------------------------------------------------------------------------
# 2. Errors, exit codes and atomic writes
# ----------------------------------------------------------------------------------------------------------------
class UsageError(Exception):
    """Bad input from the user: the message is one line naming the problem and the fix (exit status 2)."""


class Diverged(Exception):
    """A loss or a parameter became NaN / inf; failure.json says where (exit status 3)."""


def exit_on_usage_error(main: Callable[[], None]) -> None:
    """Run `main`; turn a UsageError into a one-line message on stderr and exit status 2, Diverged into exit 3. Open
    trackers (--track, --tensorboard) are closed however `main` ends."""
    status = 1  # an unexpected exception (a bug, Ctrl-C) propagates with this status for the trackers
    try:
        main()
        status = 0
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        status = USAGE_EXIT
    except Diverged as error:
        print(f"diverged: {error}", file=sys.stderr)
        status = DIVERGED_EXIT
    finally:
        Trackers.close_all(status)
    if status:
        sys.exit(status)


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it; set it straight back
    os.umask(mask)
    return mask


def fsync_path(path: Path) -> None:
    """Flush to the disk a file's bytes, or a folder's entries (the names created, renamed or removed in it). A file
    system that cannot sync a folder (EINVAL: some network and FUSE ones) is left as it is."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as error:
        if not (error.errno in (errno.EINVAL, errno.ENOTSUP) and os.path.isdir(path)):
            raise
    finally:
        os.close(fd)


def replace_durably(src: Path, dst: Path) -> None:
    """`os.replace(src, dst)` that holds against a power cut, not only a killed process: what `src` holds reaches
    the disk before the rename (a file's bytes; for a folder, the bytes of each file in it and its own entries, one
    level deep, as the dataset folders are), and the folder receiving `dst` records the rename after it. After a
    crash at any moment `dst` is the old one or the whole new one. (`write_atomic` syncs its own file as it writes.)"""
    src = Path(src)
    if src.is_dir():
        for child in src.iterdir():
            if child.is_file():
                fsync_path(child)
    fsync_path(src)
    os.replace(src, dst)
    fsync_path(Path(dst).parent)


def write_atomic(path: Path, write: Callable, binary: bool = False) -> None:
    """`write(file)` into a temporary file in the same folder, then rename it to `path`: a reader sees the old file
    or the whole new one, never half of one, after a killed process and after a power cut alike (the file is synced
    to the disk before the rename, the folder after it). A failed write (a full disk) removes the temporary file and
    raises a UsageError naming the file."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's file is private (0600); the result gets an ordinary file's mode
    except OSError as error:
        raise UsageError(f"cannot write {path}: {error.strerror}; free space or choose a writable folder") from error
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on the disk before the rename makes them the file
        os.replace(tmp, path)
        fsync_path(path.parent)  # and so is the rename
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)  # already renamed where only the folder's sync failed
        if isinstance(error, OSError):
            raise UsageError(f"cannot write {path}: {error.strerror or error}; free space or choose a writable "
                             "folder, then rerun (scripts: with --resume)") from error
        raise


def write_npz_atomic(path: Path, arrays: dict[str, np.ndarray], compress: bool = True) -> None:
    write_atomic(path, lambda f: (np.savez_compressed if compress else np.savez)(f, **arrays), binary=True)


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


def check(checks: list[tuple[bool, str]]) -> None:
    """Raise a UsageError with the message of the first check that failed: [(ok, "--flag must be ..."), ...]."""
    for ok, message in checks:
        if not ok:
            raise UsageError(message)


# ----------------------------------------------------------------------------------------------------------------
# 3. The shared harness flags
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Harness:
    """Flags for running a script, not for its algorithm: logging, evaluation, run folders, resume, test hooks."""

    log_interval: int = 5_000
    """Steps per jitted training chunk; metrics are logged once per chunk."""
    eval_interval: int = 100_000
    """Steps between evaluations (a multiple of --log-interval); the last step is always evaluated."""
    eval_episodes: int | None = None
    """Evaluation episodes per evaluation task; default: the table in envs.py (the reference's 50; 10 for one task)."""
    eval_envs: int | None = None
    """Environments stepped at once by an evaluation, all members together (at least one per member); more episodes
    run in later waves (same results). Default: 16 for cube, scene and puzzle (up to ~160 MB each), 256 otherwise."""
    eval_max_steps: int | None = None
    """Cut every evaluation episode at this many steps (an episode still running then counts as a failure); default:
    the environment's own time limit, as the reference evaluates. For quick checks, not for reported numbers."""
    download: bool = True
    """Download a missing official OGBench dataset on first use (--no-download, or OFFRL_NO_DOWNLOAD=1, forbids it)."""
    mse_samples: int = 2048
    """States sampled once from the policy subset and from the validation split for the train / val MSE."""
    checkpoint_interval: int = 0
    """Steps between parameter checkpoints in <out-dir>/checkpoints (0: none)."""
    out_dir: str | None = None
    """Run folder; default runs/<env>/<script>/<time>_s<seed>."""
    members_file: str | None = None
    """JSON list of members to train together, one run folder each (scaling.py --pack writes it)."""
    resume: bool = False
    """Continue from the run folder's latest resume state if it has one (scaling.py always asks)."""
    resume_interval: int | None = None
    """Steps between resume states (the whole training state, deleted at the end); default --eval-interval."""
    debug_poison_step: int = 0
    """Test hook: the chunk ending at this step reports NaN losses and parameters (0: off), to exercise the NaN
    guard."""
    progress: bool = True
    """Show a progress bar."""
    track: bool = False
    """Send metrics and config to Weights & Biases, one W&B run per member (pip install -e ".[track]")."""
    wandb_project: str = "offrl-bottlenecks"
    """W&B project of --track."""
    wandb_entity: str | None = None
    """W&B entity (user or team) of --track; default: your default entity."""
    wandb_group: str | None = None
    """W&B group of --track's runs; scaling.py sets the sweep folder's name unless given."""
    tensorboard: bool = False
    """Write TensorBoard event files into the run folder, tensorboard/member<m>/ (pip install -e ".[tensorboard]")."""

    def validate(self, steps: int) -> None:
        """Reject bad harness flags with a one-line UsageError naming the flag (`steps`: the script's --steps)."""
        interval = self.resume_interval
        check([
            (self.log_interval >= 1 and steps % self.log_interval == 0,
             f"--steps {steps} must be a positive multiple of --log-interval {self.log_interval}: give "
             f"--log-interval {math.gcd(steps, self.log_interval) or 1} (and an --eval-interval that is a multiple of "
             "it), or --steps a multiple of it"),
            (self.eval_interval >= 1 and self.eval_interval % self.log_interval == 0,
             "--eval-interval must be a positive multiple of --log-interval"),
            (self.checkpoint_interval >= 0 and self.checkpoint_interval % self.log_interval == 0,
             "--checkpoint-interval must be 0 or a multiple of --log-interval"),
            (self.mse_samples >= 1, "--mse-samples must be >= 1"),
            (self.eval_episodes is None or self.eval_episodes >= 1, f"--eval-episodes must be >= 1, got "
                                                                     f"{self.eval_episodes}"),
            (self.eval_envs is None or self.eval_envs >= 1, f"--eval-envs must be >= 1, got {self.eval_envs}"),
            (self.eval_max_steps is None or self.eval_max_steps >= 1,
             f"--eval-max-steps must be >= 1, got {self.eval_max_steps}"),
            (interval is None or (interval >= 0 and interval % self.log_interval == 0),
             f"--resume-interval must be 0 or a multiple of --log-interval {self.log_interval}"),
            (self.debug_poison_step >= 0 and self.debug_poison_step % self.log_interval == 0,
             f"--debug-poison-step must be 0 or a multiple of --log-interval {self.log_interval}"),
        ])
        for flag in TRACKER_PACKAGES:  # a missing package fails here, before any data is loaded or trained on
            if getattr(self, flag):
                require_tracker(flag)


@dataclasses.dataclass
class QHarness(Harness):
    """The harness of a script with a Q function: adds test-time improvement (testtime.py) and offline-to-online."""

    test_time: tuple[Literal["opex", "ttt"], ...] = ()
    """Test-time methods evaluated beside the plain policy on the same episodes at each evaluation (e.g. opex ttt)."""
    opex_beta: float = 0.1
    """OPEX step size: a <- clip(a + beta * dQ/da); with --opex-normalize, the step length in action units."""
    opex_steps: int = 1
    """OPEX gradient steps per action (>= 1)."""
    opex_normalize: bool = True
    """Divide OPEX's action gradient by its norm per state (OURS: makes beta independent of the scale of Q)."""
    ttt_steps_per_env_step: int = 1
    """TTT: Adam steps on the policy copy after every environment step."""
    ttt_lr: float = 1e-4
    """TTT: learning rate of the policy copy (0 gives plain evaluation)."""
    ttt_batch_size: int = 64
    """TTT: visited states per gradient step, drawn from the copy's buffer."""
    ttt_alpha: float = 1.0
    """TTT: weight of staying near the pre-trained policy's actions (DDPG+BC's alpha; larger changes less)."""
    ttt_reset: Literal["episode", "never"] = "episode"
    """TTT: a fresh policy copy per evaluation episode, or one per member shared by its lockstep episodes."""
    online_steps: int = 0
    """Offline-to-online: environment steps after the --steps offline updates, one update each (0: offline only)."""
    online_noise: float = 0.1
    """Offline-to-online: std of the Gaussian noise added to the policy's actions while collecting (OURS)."""

    def validate(self, steps: int) -> None:
        super().validate(steps)
        check([
            (len(set(self.test_time)) == len(self.test_time),
             f"--test-time lists a method twice: {' '.join(self.test_time)}"),
            (self.opex_steps >= 1, f"--opex-steps must be >= 1, got {self.opex_steps}"),
            (self.opex_beta >= 0, f"--opex-beta must be >= 0, got {self.opex_beta}"),
            (self.ttt_steps_per_env_step >= 1,
             f"--ttt-steps-per-env-step must be >= 1, got {self.ttt_steps_per_env_step}"),
            (self.ttt_lr >= 0, f"--ttt-lr must be >= 0, got {self.ttt_lr}"),
            (self.ttt_batch_size >= 1, f"--ttt-batch-size must be >= 1, got {self.ttt_batch_size}"),
            (self.ttt_alpha >= 0, f"--ttt-alpha must be >= 0, got {self.ttt_alpha}"),
            (self.online_steps >= 0, f"--online-steps must be >= 0, got {self.online_steps}"),
            (self.online_steps % self.log_interval == 0,
             f"--online-steps {self.online_steps} must be a multiple of --log-interval {self.log_interval}"),
            (self.online_noise >= 0, f"--online-noise must be >= 0, got {self.online_noise}"),
        ])


# How a script's Config nests the harness: `harness: runs.QHarnessFlags = dataclasses.field(default_factory=...)`;
# tyro's empty name drops the prefix, so the flags read --log-interval, not --harness.log-interval.
HarnessFlags = Annotated[Harness, tyro.conf.arg(name="")]
QHarnessFlags = Annotated[QHarness, tyro.conf.arg(name="")]


def over_members(chunk: Callable) -> Callable:
    """`chunk(state, data, *per_member)` for every member at once: state and the per-member arguments (member fields,
    online rows) carry a leading member axis, `data` (the dataset) is shared. On an accelerator the members run side
    by side (`jax.vmap`: batched matmuls fill the device). On a CPU they run one after another inside the same
    compiled program (`lax.map`): XLA:CPU runs a batched matmul slower per member than one member's plain matmul
    (iql_awr, 2 x 256, batch 256: 1.2x faster at one member, 1.5x at 16; docs/speed.md). Either way one program
    trains every member, and a rerun on the same machine gives the same bits."""
    if jax.default_backend() != "cpu":
        return lambda state, data, *per_member: jax.vmap(chunk, in_axes=(0, None) + (0,) * len(per_member))(
            state, data, *per_member)

    def one_after_another(state, data, *per_member):
        return jax.lax.map(lambda xs: chunk(xs[0], data, *xs[1:]), (state, *per_member))

    return one_after_another


def flat_flags(config) -> dict:
    """A script's Config as one flat dict of flag names (the harness's fields beside the algorithm's), as config.json
    stores it and as the command line spells it."""
    flags = dataclasses.asdict(config)
    return {**{k: v for k, v in flags.items() if k != "harness"}, **flags.get("harness", {})}


def make_config(config_class, **flags):
    """A script's Config from flat flag names (`log_interval=...` goes into the nested harness), for tests and
    notebooks: `make_config(iql_ddpgbc.Config, env=..., steps=..., log_interval=...)`."""
    harness_class = {f.name: f for f in dataclasses.fields(config_class)}["harness"].default_factory
    names = {f.name for f in dataclasses.fields(harness_class)}
    harness = harness_class(**{k: v for k, v in flags.items() if k in names})
    return config_class(**{k: v for k, v in flags.items() if k not in names}, harness=harness)


def resolve_data_size(size: int | None, available: int, flag: str) -> int:
    """The data size a flag asks for: all `available` training transitions when omitted, else a checked prefix."""
    size = available if size is None else size
    if not 1 <= size <= available:
        raise UsageError(f"{flag} {size} is out of range: the training split of this dataset has {available} "
                         f"transitions; choose a size in [1, {available}] or generate more episodes")
    return size


# ----------------------------------------------------------------------------------------------------------------
# 4. Run folders
# ----------------------------------------------------------------------------------------------------------------
REQUIREMENTS_LOCK = Path(__file__).resolve().parent / "requirements.lock"  # the README installs from it
LOCK_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.-]*)==([^\s;\\]+)\s*(?:;\s*(.+?))?\s*\\?$")


def locked_pins(lock_text: str, python: str | None = None) -> dict[str, str]:
    """{canonical name: version} of a requirements.lock's pins that apply to `python` ("3.11"; None: this
    interpreter). .ci/lock.py checks the lock with it too."""
    from packaging.markers import Marker
    from packaging.utils import canonicalize_name

    env = None if python is None else {"python_version": python, "python_full_version": f"{python}.0"}
    out = {}
    for line in lock_text.splitlines():
        match = LOCK_PIN.match(line)
        if match and (match[3] is None or Marker(match[3]).evaluate(env)):
            out[canonicalize_name(match[1])] = match[2]
    return out


def package_versions(lock: Path = REQUIREMENTS_LOCK) -> dict:
    """Versions of the packages a result depends on, and the lock's sha256 with the installed packages that differ
    from its pins ({} where the install is the lock's: the same numbers on the same CPU family), stored in
    config.json. A copied script without the lock beside it records "lock": null."""
    out = {"python": sys.version.split()[0]}
    for name in ("jax", "jaxlib", "optax", "numpy", "ogbench", "mujoco", "dm_control", "gymnasium", "tyro"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    if not lock.exists():
        return {**out, "lock": None}
    text, differ = lock.read_text(), {}
    for name, pinned in locked_pins(text).items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            installed = "absent"
        if installed != pinned:
            differ[name] = f"{installed} (locked {pinned})"
    return {**out, "lock": {"file": lock.name, "sha256": hashlib.sha256(text.encode()).hexdigest(),
                            "differs": differ}}


LOCK_FILE = ".lock"  # in a run folder and a sweep folder: holds the writing process's PID


def lock_folder(path: Path, what: str):
    """Make `path` this process's alone: an exclusive OS lock on <path>/.lock, held while the returned handle is
    open (keep a reference) and released by the OS when the process dies, however it dies (SIGKILL included). A
    folder another live process holds raises a UsageError naming that process, before anything is written."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        handle = open(path / LOCK_FILE, "a+")
    except OSError as error:
        raise UsageError(f"cannot write to {what} {path}: {error.strerror}; choose a writable folder") from error
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise UsageError(f"{path} is being written by another process (PID {holder}); wait for it to end or stop "
                         f"it, or choose another {what}") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def _step_of(line: str) -> int | None:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return None


def resume_steps(path: Path) -> list[int]:
    """Steps of the complete resume states in a run folder (temporary files are never named state_*.npz); [] also when
    a finishing run removes the folder while it is being listed (a reader of a live sweep, tests/test_scaling.py)."""
    try:
        return sorted(int(p.stem.split("_")[1]) for p in (Path(path) / RESUME_DIR).glob("state_*.npz"))
    except FileNotFoundError:
        return []


def flatten_tree(tree) -> dict[str, np.ndarray]:
    """A pytree as flat numpy arrays keyed by their tree path (how checkpoints and resume states store it)."""
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


class RunFolder:
    """config.json (every flag and package versions), metrics.jsonl (one object per member per log event),
    result.json (written last, atomically: a folder with it is complete), checkpoints/ if asked, resume/ states
    while the run is in progress, failure.json if it diverged.

    `resume_step`: continue an interrupted run from that resume state (metrics after it are dropped); None: start
    afresh, forgetting anything an earlier attempt left in the folder. `seeds`: the folder's members' seeds, for the
    trackers (--track, --tensorboard: section 5), which get every record metrics.jsonl gets."""

    def __init__(self, path: str, config: dict, resume_step: int | None = None, from_table: dict | None = None,
                 seeds: list[int] | None = None, validation: str = "", script_path: str | None = None):
        self.path = Path(path)  # locked by the caller (Members), which holds the lock for the process's life
        if (self.path / "result.json").exists():
            raise UsageError(f"{self.path} already holds a complete run (result.json); choose another --out-dir")
        config = json.loads(json.dumps(config))  # as config.json will hold it (tuples become lists)
        metrics = self.path / "metrics.jsonl"
        if resume_step is not None:
            saved = json.loads((self.path / "config.json").read_text())["config"]
            free = {"resume", "progress", "members_file", "out_dir", "debug_poison_step",  # may change on resume
                    "track", "wandb_project", "wandb_entity", "wandb_group", "tensorboard"}
            changed = sorted(k for k in set(config) | set(saved) if k not in free and config.get(k) != saved.get(k))
            if changed:
                raise UsageError(f"--resume: {self.path} was started with other values of {', '.join(changed)}; "
                                 "resume with the same flags or choose another --out-dir")
            # the lines up to the resume state, byte for byte (a line cut by the kill is dropped)
            kept = [line for line in metrics.read_text().splitlines(keepends=True)
                    if line.endswith("\n") and _step_of(line) is not None and _step_of(line) <= resume_step]
            write_atomic(metrics, lambda f: f.writelines(kept))
        else:
            kept = None
            shutil.rmtree(self.path / RESUME_DIR, ignore_errors=True)
        (self.path / "failure.json").unlink(missing_ok=True)  # an earlier attempt's, if any
        # from_table: which flags the user left unset and the dataset's row of envs.HYPERPARAMETERS filled, from where
        # validation: where the validation MSE's states come from (envs.load_splits: the -val file or a hold-out)
        # script_path: the file that trained it, so that evaluate.py finds a forked script too
        write_json_atomic(self.path / "config.json", dict(config=config, from_table=from_table or {},
                                                          validation=validation, versions=package_versions(),
                                                          script_path=script_path))
        self._metrics = open(metrics, "a" if resume_step is not None else "w")
        self.trackers = Trackers(self.path, config, seeds or [], kept and [json.loads(line) for line in kept])

    def log(self, records: list[dict]) -> None:
        try:
            self._metrics.write("".join(json.dumps(record) + "\n" for record in records))
            self._metrics.flush()
        except OSError as error:  # a full disk: the folder stays incomplete (no result.json) and resumable
            raise UsageError(f"cannot write {self.path / 'metrics.jsonl'}: {error.strerror}; free space, then "
                             "rerun with --resume") from error
        self.trackers.log(records)

    def checkpoint(self, step: int, params, extra: dict) -> None:
        """Save a parameter pytree as flat .npz arrays keyed by their tree path, plus `extra` scalars (names start with
        "__", so no tree path can take them)."""
        write_npz_atomic(self.path / CHECKPOINT_DIR / f"step_{step:08d}.npz",
                         {**flatten_tree(params), **{k: np.asarray(v) for k, v in extra.items()}})

    def save_resume(self, step: int, arrays: dict[str, np.ndarray]) -> None:
        """Write resume/state_<step>.npz atomically, then drop all but the two newest states."""
        write_npz_atomic(self.path / RESUME_DIR / f"state_{step:08d}.npz", arrays, compress=False)
        for old in resume_steps(self.path)[:-2]:
            (self.path / RESUME_DIR / f"state_{old:08d}.npz").unlink(missing_ok=True)

    def fail(self, failure: dict) -> None:
        self._metrics.close()
        self.trackers.close(DIVERGED_EXIT)
        write_json_atomic(self.path / "failure.json", failure)

    def finish(self, result: dict) -> None:
        self._metrics.close()
        self.trackers.close(0)
        write_json_atomic(self.path / "result.json", result)
        shutil.rmtree(self.path / RESUME_DIR, ignore_errors=True)  # complete: nothing left to resume


# ----------------------------------------------------------------------------------------------------------------
# 5. Trackers: optional copies of metrics.jsonl in Weights & Biases (--track) and TensorBoard (--tensorboard)
# ----------------------------------------------------------------------------------------------------------------
TRACKER_PACKAGES = {"track": "wandb", "tensorboard": "tensorboard"}  # flag -> the package it needs (and its extra)
NOT_METRICS = ("event", "member", "seed", "step")  # a record's fields that say whose and when, not what


def require_tracker(flag: str):
    """The package `--<flag>` needs, imported now (never when the flag is off); a UsageError naming the flag and the
    install command when it is missing."""
    package = TRACKER_PACKAGES[flag]
    try:
        return importlib.import_module(package)
    except ImportError as error:
        raise UsageError(f'--{flag} needs {package}: pip install -e ".[{flag}]"') from error


class Trackers:
    """One run folder's trackers, per member, each sent every record metrics.jsonl gets: its numeric fields under
    metrics.jsonl's names, at the record's step.

    --track: one W&B run per member, named <folder name>-m<member>, config = the folder's flags (config.json) plus the
    member and its seed, group --wandb-group, tags the script, the env and the cell's sizes and alpha; files under
    <folder>/wandb/ (WANDB_MODE=offline works as W&B documents it). The run ids are kept in <folder>/wandb.json, so
    --resume continues the same W&B runs. --tensorboard: one event folder per member, <folder>/tensorboard/member<m>/.
    A tracker that --resume starts afresh (no id or event folder from an earlier attempt) is first sent the records up
    to the resume state (`kept`; None: not a resume)."""

    _open: list[Trackers] = []  # what exit_on_usage_error closes, however a run ends

    def __init__(self, path: Path, config: dict, seeds: list[int], kept: list[dict] | None):
        self.sinks: list[tuple[int, Callable, Callable]] = []  # (member, send(step, metrics), close(exit status))
        replay = []
        if config.get("track") or config.get("tensorboard"):
            Trackers._open.append(self)  # before the first tracker starts: one that fails to start closes the others
        if config.get("track"):
            wandb = require_tracker("track")
            saved = path / "wandb.json"
            ids = json.loads(saved.read_text())["run_ids"] if kept is not None and saved.exists() else []
            tags = [config.get("script"), config.get("env"),
                    *(f"{k}={config[k]}" for k in MEMBER_FIELDS if config.get(k) is not None)]
            started = []
            for m, seed in enumerate(seeds):
                try:
                    run = wandb.init(project=config["wandb_project"], entity=config["wandb_entity"],
                                     group=config["wandb_group"], name=f"{path.name}-m{m}", tags=[t for t in tags if t],
                                     config={**config, "member": m, "seed": seed}, dir=str(path),
                                     id=ids[m] if m < len(ids) else None, resume="allow", reinit="create_new")
                except wandb.errors.Error as error:  # e.g. not logged in: before any training
                    raise UsageError(f"--track: {str(error).splitlines()[0]}; run `wandb login`, or set "
                                     "WANDB_MODE=offline and `wandb sync` the run folder's wandb/ later") from error
                started.append(run)
                self.sinks.append((m, lambda step, metrics, run=run: run.log(metrics, step=step),
                                   lambda status, run=run: run.finish(exit_code=status)))
                if m >= len(ids):
                    replay.append(self.sinks[-1])
            write_json_atomic(saved, {"run_ids": [run.id for run in started]})
        if config.get("tensorboard"):
            require_tracker("tensorboard")
            from tensorboard.compat.proto.event_pb2 import Event
            from tensorboard.compat.proto.summary_pb2 import Summary
            from tensorboard.summary.writer.event_file_writer import EventFileWriter

            if kept is None:  # a fresh start forgets an earlier attempt's events, as it does its metrics.jsonl
                shutil.rmtree(path / "tensorboard", ignore_errors=True)
            for m in range(len(seeds)):
                folder = path / "tensorboard" / f"member{m}"
                fresh = not folder.exists()
                writer = EventFileWriter(str(folder))

                def send(step, metrics, writer=writer):
                    values = [Summary.Value(tag=k, simple_value=v) for k, v in metrics.items()]
                    writer.add_event(Event(wall_time=time.time(), step=step, summary=Summary(value=values)))
                    writer.flush()

                self.sinks.append((m, send, lambda status, writer=writer: writer.close()))
                if fresh:
                    replay.append(self.sinks[-1])
        self.log(kept or [], replay)

    def log(self, records: list[dict], sinks: list | None = None) -> None:
        """Every record's numeric fields, merged per member and step (a step's train and eval records: one row)."""
        rows: dict[tuple[int, int], dict] = {}
        for r in records:
            metrics = {k: v for k, v in r.items() if k not in NOT_METRICS and type(v) in (int, float)}
            rows.setdefault((r["member"], r["step"]), {}).update(metrics)
        for member, send, _ in self.sinks if sinks is None else sinks:
            for (m, step), metrics in rows.items():
                if m == member and metrics:
                    send(step, metrics)

    def close(self, status: int) -> None:
        """Finish every tracker (W&B: with the run's exit status) once."""
        sinks, self.sinks = self.sinks, []
        for _, _, close in sinks:
            close(status)
        if self in Trackers._open:
            Trackers._open.remove(self)

    @classmethod
    def close_all(cls, status: int) -> None:
        for trackers in list(cls._open):
            trackers.close(status)


# ----------------------------------------------------------------------------------------------------------------
# 6. Members: who trains in this process, and where each one writes
# ----------------------------------------------------------------------------------------------------------------
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


class Members:
    """Who trains in this process (one vmapped program) and which run folder each member writes to.

    Default: `--num-seeds` seeds of the flags' setting, all in one run folder (per-member numbers, mean and std).
    With `--members-file` (what `scaling.py --pack` writes): a JSON list of members, each {"seed", "out_dir"} plus any
    of MEMBER_FIELDS the script has (the flags fill the rest); members sharing an out_dir must share a setting. Each
    run folder's config.json holds the flags of the equivalent standalone run, so a packed folder reads like any other.

    `seeds`, `settings` (per member, sizes resolved to transition counts) and `arrays` (the per-member fields the
    jitted update takes) describe the members; `log`, `checkpoint` and `finish` route per-member data to the folders.
    `train_size`: transitions in the training split (the largest data size); `from_table`: the flags filled from the
    dataset's row of envs.HYPERPARAMETERS (config.json records them); `validation`: which validation data the
    script uses (envs.load_splits; config.json records it too).
    """

    def __init__(self, config, script: str, train_size: int, from_table: dict | None = None, validation: str = ""):
        flags = flat_flags(config)
        fields = [f for f in MEMBER_FIELDS if f in flags]
        if flags.get("members_file"):
            entries = read_members_file(flags["members_file"], script, fields)
        else:
            out_dir = flags["out_dir"] or f"runs/{flags['env']}/{script}/{time.strftime('%Y%m%d-%H%M%S')}_s" \
                                          f"{flags['seed']}"
            entries = [{"seed": flags["seed"] + i, "out_dir": out_dir} for i in range(flags["num_seeds"])]
        self.seeds = [entry["seed"] for entry in entries]
        self.test_time = list(flags.get("test_time", ()))  # result.json lists the test-time methods evaluated
        self.online_steps = flags.get("online_steps", 0)  # and the online steps after offline training
        self.settings = []
        for entry in entries:
            setting = {f: entry.get(f, flags[f]) for f in fields}
            for f in fields:
                if f.endswith("_data_size"):
                    setting[f] = resolve_data_size(setting[f], train_size, "--" + f.replace("_", "-"))
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
        # one writer per folder: every folder is locked before any is read or written (a packed process writes several)
        self._locks = [lock_folder(Path(out_dir), "--out-dir") for out_dir in groups]
        # --resume: the latest resume state every folder has (a packed process may have died between folders)
        self.resume_step = None
        if flags.get("resume"):
            common = set.intersection(*(set(resume_steps(Path(d))) for d in groups))
            self.resume_step = max(common) if common else None
        source = getattr(sys.modules.get(type(config).__module__), "__file__", None)  # the script's own file
        script_path = str(Path(source).resolve()) if source else None
        self.folders = [(RunFolder(out_dir, standalone[out_dir], self.resume_step, from_table,
                                   [self.seeds[m] for m in ms], validation, script_path), ms)
                        for out_dir, ms in groups.items()]
        self._last_finite: list[dict] = []

    def keys(self):
        """One PRNG key per member, from its seed: [M, 2]."""
        return jax.vmap(jax.random.PRNGKey)(jnp.asarray(self.seeds))

    def log(self, records: list[dict]) -> None:
        """Each record goes to its member's folder, renumbered to the member's index inside that folder."""
        for folder, ms in self.folders:
            folder.log([{**r, "member": ms.index(r["member"])} for r in records if r["member"] in ms])

    def checkpoint(self, step: int, params, extra: dict) -> None:
        for folder, ms in self.folders:
            rows = np.asarray(ms)
            folder.checkpoint(step, jax.tree_util.tree_map(lambda x, rows=rows: x[rows], params), extra)

    def save_resume(self, states, progress: Progress) -> None:
        """Every folder's resume state: its members' rows of the training state, and the loop's `progress`."""
        arrays = flatten_tree(jax.device_get(states))
        for folder, ms in self.folders:
            mine = {k: v[np.asarray(ms)] for k, v in arrays.items()}
            mine["__progress__"] = np.asarray(json.dumps(progress.for_members(ms)))
            folder.save_resume(progress.step, mine)

    def restore(self, states, progress: Progress):
        """(states, progress) as saved at `resume_step` by every folder, or the arguments unchanged without one."""
        if self.resume_step is None:
            return states, progress
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


# ----------------------------------------------------------------------------------------------------------------
# 7. The loop's bookkeeping
# ----------------------------------------------------------------------------------------------------------------
class Run(Members):
    """The host side of a script's training loop, so that the loop reads as five lines:

        states = run.resume(states, lambda: probe.train_val(policy))   # --resume, and the step-0 MSEs
        for step in run.chunks():                                       # progress bar, chunk timing
            states, infos = train_chunk(states, device_data, run.arrays, None)
            run.record(step, infos, states, evaluate)                   # log, NaN guard, evaluate, checkpoints
        return run.finish()                                             # result.json per run folder

    `evaluate(step)` returns per-member metric arrays ({"success": [M], ...}); `run.progress` is what a resume state
    restores (SfBC's policy counts its sampling keys there)."""

    def __init__(self, config, script: str, train_size: int, from_table: dict | None = None, validation: str = ""):
        super().__init__(config, script, train_size, from_table, validation)
        self.config, self.harness, self.script = config, config.harness, script
        if from_table:  # the values this run takes from the per-dataset table, and where each comes from
            print(f"{script} on {config.env}, from envs.HYPERPARAMETERS: "
                  + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in from_table.items()), file=sys.stderr)
        self.total_steps = config.steps + self.online_steps
        interval = self.harness.resume_interval
        self.resume_interval = self.harness.eval_interval if interval is None else interval
        self.progress = Progress.start(len(self.seeds))
        self._start = self._chunk_start = time.time()
        self._bar = None

    def resume(self, states, init_metrics: Callable[[], dict]):
        """Continue bit for bit from the latest resume state (device state, loop progress, metrics.jsonl up to it) if
        --resume found one, and say so (a "resume" record in metrics.jsonl, a line on stderr); else log the step-0
        metrics. Returns the states to train on."""
        states, self.progress = self.restore(states, self.progress)
        where = ", ".join(str(folder.path) for folder, _ in self.folders)
        if self.progress.step:
            self.log(member_records("resume", self.progress.step, self.seeds, {}))
            print(f"resumed from step {self.progress.step} of {self.total_steps} in {where}", file=sys.stderr)
        else:
            if self.harness.resume:
                print(f"--resume: no resume state in {where}; starting from step 0", file=sys.stderr)
            self.log(member_records("init", 0, self.seeds, init_metrics()))
        return states

    def chunks(self) -> Iterator[int]:
        """The step reached at the end of each chunk still to train, with a progress bar."""
        h = self.harness
        self._bar = tqdm(total=self.total_steps, initial=self.progress.step, desc=f"{self.script} {self.config.env}",
                         disable=not h.progress, unit="step")
        self._start = time.time() - self.progress.seconds
        for step in range(self.progress.step + h.log_interval, self.total_steps + 1, h.log_interval):
            self._chunk_start = time.time()
            yield step
            self._bar.update(h.log_interval)
        self._bar.close()

    def record(self, step: int, infos: dict, states, evaluate: Callable[[int], dict]) -> None:
        """After a chunk: log its metrics (the chunk's only host transfer), stop on NaN / inf (exit 3), evaluate when
        due, write checkpoints and resume states when due."""
        h, progress = self.harness, self.progress
        action_calls_at_eval = progress.action_calls
        if step == h.debug_poison_step:  # test hook --debug-poison-step: as if this chunk diverged (NaN losses, params)
            infos, states = jax.tree_util.tree_map(
                lambda x: x * np.nan if jnp.issubdtype(x.dtype, jnp.floating) else x, (infos, states))
        infos = jax.device_get(infos)
        records = member_records("train", step, self.seeds, infos, seconds=time.time() - self._start,
                                 updates_per_second=h.log_interval / (time.time() - self._chunk_start))
        self.check_finite(step, records, states["params"])
        if step % h.eval_interval == 0 or step in (self.config.steps, self.total_steps):
            progress.last_eval = member_records("eval", step, self.seeds, evaluate(step))
            progress.best_success = np.maximum(progress.best_success, [r["success"] for r in progress.last_eval]
                                               ).tolist()
            records += progress.last_eval
            self._bar.set_postfix(success=f"{np.mean([r['success'] for r in progress.last_eval]):.2f}")
        self.log(records)
        if h.checkpoint_interval and step % h.checkpoint_interval == 0:
            # SfBC draws its candidates with fold_in(PRNGKey(--seed), calls so far): with the count at this step's
            # evaluation, evaluate.py draws the same candidates again (the other scripts' policies ignore the key).
            self.checkpoint(step, states["params"], {CHECKPOINT_ACTION_SEED: self.config.seed,
                                                     CHECKPOINT_ACTION_CALLS: action_calls_at_eval})
        progress.step, progress.seconds = step, time.time() - self._start
        if resume_due(step, self.resume_interval, self.config.steps, self.total_steps):
            self.save_resume(states, progress)

    def finish(self) -> list[dict]:
        """result.json in every run folder (the last evaluation, best success seen); returns them."""
        header = {"env": self.config.env, "script": self.script, "steps": self.config.steps,
                  "wall_seconds": time.time() - self._start}
        return super().finish(header, self.progress.last_eval, self.progress.best_success)


def resume_due(step: int, resume_interval: int, offline_steps: int, total_steps: int) -> bool:
    """Whether a resume state is written after `step`: every `resume_interval` steps (0: never) before the last, and at
    the end of the offline phase when an online phase follows. None during the online phase: the environments' state
    is not saved, so an interrupted online phase is collected again from the offline end, with the same result."""
    if not resume_interval:
        return False
    return (step % resume_interval == 0 and step < offline_steps) or step == offline_steps < total_steps


def member_records(event: str, step: int, seeds: list[int], metrics: dict, **shared) -> list[dict]:
    """One metrics.jsonl record per member: `metrics` maps names to per-member arrays; `shared` is common to all."""
    return [{"event": event, "step": step, "member": m, "seed": seed, **{k: float(v[m]) for k, v in metrics.items()},
             **shared} for m, seed in enumerate(seeds)]


def final_result(header: dict, last_eval: list[dict], best_success: np.ndarray) -> dict:
    """result.json's content: `header` (env, script, sizes, ...) plus, per metric of the last evaluation, the numbers
    per member with their mean and std ("n/a" where the environment has no oracle), and the best success seen."""
    # With --test-time, the same episodes' numbers under OPEX / TTT sit beside the plain ones (opex_success, ...).
    testtime = [f"{m}_{k}" for m in TEST_TIME_METHODS for k in RESULT_METRICS
                if last_eval and f"{m}_{k}" in last_eval[0]]
    # ... and with several evaluation tasks each task's success (task1_success ...): analyze.py's bootstrap strata
    tasks = task_success_keys(last_eval[0] if last_eval else {})
    per_member = {k: [r.get(k, "n/a") for r in last_eval] for k in (*RESULT_METRICS, *testtime, *tasks)}
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
