"""envs.py: environments and data, the world every script in algos/ stands on.

Sections, top to bottom:
  1. names      parse an environment name (OGBench dataset names, ExORL-style dm_control tasks)
  1b. table     per-dataset hyperparameters (alpha, discount, evaluation episodes, actor goals) and their sources
  2. datasets   load a file from --dataset-dir, download an official one on first use (OGBench's files, ExORL's
                archives), or generate one offline with OGBench's official recipe
  3. splits     the whole training file in one seeded trajectory order (nested prefixes); validation on the
                official -val file (ExORL: 10% of trajectories held out)
  4. sampling   batches and OGBench-style goals, drawn on device inside jit
  5. oracles    the noiseless scripted expert's action for any (state, goal): pointmaze, cube-single
  6. rollouts   lockstep evaluation of a batched policy on the environment's evaluation tasks, and the
                train / validation / evaluation MSE against the oracle (OracleProbe)
  7. online     the offline-to-online buffer: each member's environment and the transitions it collects
  8. CLI        `python envs.py generate ...`, `python envs.py download ...`, `python envs.py list`

Run folders, exit codes and the result schema live in runs.py; OPEX and TTT in testtime.py. Bad input raises
`runs.UsageError` with one line naming the problem and the fix; every entry point turns it into exit status 2.
"""

from __future__ import annotations

import os
import sys


def _choose_gl() -> None:
    """Set MUJOCO_GL before anything imports mujoco or dm_control: the one place the project chooses it. No display
    anywhere, so MuJoCo must never try to open a window. A MUJOCO_GL already set (by the user) stands. Otherwise
    `egl` where dm_control's EGL backend imports, which loads libEGL and opens a headless EGL display (a library
    that is listed by ldconfig but missing, broken, or without a driver fails here, not later); else `disable`:
    drawing is off (nothing here needs it but evaluate.py --capture-video, which then exits 2 saying what to install)
    rather than failing every import of dm_control. Child processes inherit the choice and do not probe again."""
    if "MUJOCO_GL" in os.environ:
        return
    os.environ["MUJOCO_GL"] = "egl"
    platform = os.environ.get("PYOPENGL_PLATFORM")  # dm_control's EGL backend sets it to egl
    try:
        import dm_control._render  # noqa: F401  (imports the backend MUJOCO_GL names)
    except Exception:  # noqa: BLE001  (ImportError, OSError, or PyOpenGL's AttributeError on a library that won't load)
        os.environ["MUJOCO_GL"] = "disable"
        if platform is None:
            os.environ.pop("PYOPENGL_PLATFORM", None)
        for name in [m for m in sys.modules if m == "dm_control._render" or m.startswith("dm_control._render.")]:
            del sys.modules[name]  # imported again below, with MUJOCO_GL=disable


_choose_gl()

import dataclasses  # noqa: E402
import difflib  # noqa: E402
import fnmatch  # noqa: E402
import glob  # noqa: E402
import http.client  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import urllib.error  # noqa: E402
import urllib.request  # noqa: E402
import zipfile  # noqa: E402
from collections import deque  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Annotated, Callable, Literal, Union  # noqa: E402

import gymnasium  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import ogbench  # noqa: E402  (registers the OGBench environments with gymnasium)
import ogbench.utils  # noqa: E402  (its downloader and the address it downloads from)
import tyro  # noqa: E402
from dm_control import suite  # noqa: E402
from ogbench.manipspace.oracles.markov.button_markov import ButtonMarkovOracle  # noqa: E402
from ogbench.manipspace.oracles.markov.cube_markov import CubeMarkovOracle  # noqa: E402
from ogbench.manipspace.oracles.markov.drawer_markov import DrawerMarkovOracle  # noqa: E402
from ogbench.manipspace.oracles.markov.window_markov import WindowMarkovOracle  # noqa: E402
from ogbench.manipspace.oracles.plan.button_plan import ButtonPlanOracle  # noqa: E402
from ogbench.manipspace.oracles.plan.cube_plan import CubePlanOracle  # noqa: E402
from ogbench.manipspace.oracles.plan.drawer_plan import DrawerPlanOracle  # noqa: E402
from ogbench.manipspace.oracles.plan.window_plan import WindowPlanOracle  # noqa: E402
from ogbench.relabel_utils import relabel_dataset  # noqa: E402
from tqdm import tqdm, trange  # noqa: E402

import runs  # noqa: E402
from runs import UsageError, exit_on_usage_error, replace_durably, write_atomic, write_npz_atomic  # noqa: E402

DEFAULT_DATASET_DIR = "~/.ogbench/data"  # the same folder ogbench itself uses for its downloads


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
MANIPSPACE_KINDS = ("cube", "scene", "puzzle")  # OGBench's manipulation suite: scripted oracles generate all three


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
        """True where a noiseless scripted expert labels any state optimally, so the three MSE metrics exist. Not for
        pointmaze-teleport: its BFS waypoints ignore the teleporters, so its labels are not the optimal actions."""
        return (self.kind == "pointmaze" and "teleport" not in self.env_id) or self.env_id.startswith("cube-single")

    @property
    def can_download(self) -> bool:
        """True for the official OGBench datasets, which `ogbench` downloads (pointmaze explore data is OURS), and
        ExORL's exploration data (its `random` data is generated here instead, with the same layout)."""
        if self.family == "dmc":
            return self.dataset_type != "random"
        return not (self.kind == "pointmaze" and self.dataset_type == "explore")

    @property
    def can_generate(self) -> bool:
        """True where `envs.py generate` can make the dataset offline."""
        if self.family == "dmc":
            return self.dataset_type == "random"
        return self.kind in ("pointmaze",) + MANIPSPACE_KINDS


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
# 1b. Per-dataset hyperparameters: one table, read by every script (for the flags a user leaves unset) and scaling.py
# ----------------------------------------------------------------------------------------------------------------
# Rows apply to every dataset name matching their pattern (fnmatch); a later matching row overrides an earlier one.
# Each entry is (value, source). "reference": OGBench impls/hyperparameters.sh, GCIQL's row for IQL and SARSA (the
# same losses), CRL's for CRL (the authors' tuned DDPG+BC alphas; 50 evaluation episodes per task); "paper": PAPER.md;
# "OURS": neither says. Keys: "discount", "eval_episodes", "actor_p_randomgoal" (the share of actor goals drawn at
# random from the subset, the rest from the same trajectory's future), "alpha" (the default), and "alphas" (the grid
# scaling.py sweeps when not given one). A key may name a script family after a slash, and the most specific name
# wins whatever the rows' order: "<key>/<script>" (alpha/crl_ddpgbc), then "<key>/<extractor>" (actor_p_randomgoal/bc,
# alphas/ddpgbc), then "<key>" (see table_entry).
_REF, _OURS = "reference", "OURS"


def _ddpgbc(gciql: float, crl: float) -> dict[str, tuple]:
    """The reference's tuned DDPG+BC alphas (GCIQL's for IQL and SARSA, CRL's for CRL), and the grids scaling.py sweeps:
    each value learner's tuned alpha and one decade either side (OURS; the paper sweeps 0.003 .. 10 in all)."""
    def grid(alpha):
        return tuple(float(f"{alpha * f:.6g}") for f in (0.1, 1.0, 10.0))

    source = "OURS: the reference's tuned alpha of that value learner and one decade either side"
    return {"alpha/iql_ddpgbc": (gciql, _REF), "alpha/sarsa_ddpgbc": (gciql, _REF), "alpha/crl_ddpgbc": (crl, _REF),
            "alphas/ddpgbc": (grid(gciql), source), "alphas/crl_ddpgbc": (grid(crl), source)}


# GCBC (bc.py, and the behaviour policy SfBC samples its candidates from) never draws random actor goals in the
# reference: its config has actor_p_randomgoal 0.0 and hyperparameters.sh overrides it for GCIQL and CRL only.
_GCBC_GOALS = {"actor_p_randomgoal/bc": (0.0, "reference: GCBC's, never overridden"),
               "actor_p_randomgoal/sfbc": (0.0, "reference: GCBC's, the policy SfBC samples from")}

HYPERPARAMETERS: tuple[tuple[str, dict[str, tuple]], ...] = (
    ("*", {"discount": (0.99, _REF), "eval_episodes": (50, _REF), "actor_p_randomgoal": (0.0, _REF), **_GCBC_GOALS,
           **_ddpgbc(0.3, 0.1), "alphas/awr": ((0.3, 1.0, 3.0, 10.0), "paper"),
           "alpha/iql_awr": (3.0, "OURS: in the paper's AWR grid"), "alpha/sarsa_awr": (3.0, _OURS),
           "alpha/crl_awr": (3.0, _OURS)}),
    ("pointmaze-*", _ddpgbc(0.003, 0.03)),
    ("antmaze-*", _ddpgbc(0.3, 0.1)),
    ("antmaze-*-explore-*", {**_ddpgbc(0.01, 0.003), "actor_p_randomgoal": (1.0, _REF)}),
    ("pointmaze-*-explore-*", {"actor_p_randomgoal": (1.0, "OURS: as the reference's antmaze explore")}),
    ("humanoidmaze-*", {**_ddpgbc(0.1, 0.1), "discount": (0.995, _REF)}),
    ("*-giant-*", {"discount": (0.995, _REF)}),
    ("antsoccer-*", _ddpgbc(0.1, 0.3)),
    ("*-stitch-*", {"actor_p_randomgoal": (0.5, _REF)}),
    ("cube-*-play-*", _ddpgbc(1.0, 3.0)),
    ("cube-*-noisy-*", _ddpgbc(0.03, 0.1)),
    ("scene-play-*", _ddpgbc(1.0, 3.0)),
    ("scene-noisy-*", _ddpgbc(0.03, 0.1)),
    ("puzzle-*-play-*", _ddpgbc(1.0, 3.0)),
    ("puzzle-*-noisy-*", _ddpgbc(0.03, 0.1)),
    ("*-singletask*", {"eval_episodes": (10, "OURS: one task; the reference's table has no singletask rows")}),
    *((f"{domain}-*", {"eval_episodes": (10, "OURS: one task, 1000-step episodes; not in the reference")})
      for domain in sorted({task.split("-")[0] for task in DMC_TASKS})),
)
TABLE_FLAGS = ("alpha", "discount", "eval_episodes", "actor_p_randomgoal")  # flags the table fills when left unset


def hyperparameters(name: str) -> dict[str, tuple]:
    """The table's entries for dataset `name`: {key: (value, source)}, later matching rows overriding earlier ones."""
    entries: dict[str, tuple] = {}
    for pattern, row in HYPERPARAMETERS:
        if fnmatch.fnmatch(name, pattern):
            entries.update(row)
    return entries


def table_keys(key: str, script: str) -> tuple[str, ...]:
    """The table entries that can give `key` to `script`, in order: "<key>/<script>", "<key>/<extractor>" (bc for
    bc.py), "<key>"."""
    return tuple(dict.fromkeys((f"{key}/{script}", f"{key}/{script.split('_')[-1]}", key)))


def table_entry(entries: dict[str, tuple], key: str, script: str) -> tuple | None:
    """The (value, source) of `key` for `script` among a dataset's entries: the first of `table_keys` it has; None
    where the table has none."""
    return next((entries[name] for name in table_keys(key, script) if name in entries), None)


def fill_from_table(config, script: str):
    """`config` with every flag of TABLE_FLAGS it has and the user left unset (None) taken from the table row of its
    --env for `script` (a script's TABLE_ROW: a renamed copy keeps its original's entries); returns (config,
    {flag: "value (source)"}) so that config.json can say which values came from the table. A flag still unset after
    the lookup is a UsageError naming the flag and the fix: never a silent None (an alpha of NaN downstream)."""
    flags, entries = runs.flat_flags(config), hyperparameters(config.env)
    filled = {}
    for flag in TABLE_FLAGS:
        if flag not in flags or flags[flag] is not None:
            continue
        entry = table_entry(entries, flag, script)
        if entry is None:
            raise runs.UsageError(
                f"--{flag.replace('_', '-')} is unset and envs.HYPERPARAMETERS has no "
                f"{' / '.join(table_keys(flag, script))} entry for "
                f"{config.env}: give --{flag.replace('_', '-')}, or set the script's TABLE_ROW to the script whose "
                "entries it inherits (e.g. TABLE_ROW = \"iql_ddpgbc\")")
        flags[flag], source = entry
        filled[flag] = f"{flags[flag]} ({source})"
    return runs.make_config(type(config), **flags), filled


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


# Downloads (official OGBench datasets and ExORL archives, on first use). The variables are read when a download is
# due, never at import.
NO_DOWNLOAD_VARIABLE = "OFFRL_NO_DOWNLOAD"  # set to anything but "" or "0": no download, whatever the flags (clusters)
DATASET_URL_VARIABLE = "OGBENCH_DATASET_URL"  # a mirror of OGBench's dataset server instead of its own address
EXORL_URL = "https://dl.fbaipublicfiles.com/exorl"  # ExORL's download.sh fetches <EXORL_URL>/<domain>/<algo>.zip
EXORL_URL_VARIABLE = "EXORL_DATASET_URL"  # a mirror of ExORL's server instead of its own address


def downloads_allowed(download: bool = True) -> bool:
    """Whether a missing official dataset may be downloaded: the --download flag, unless OFFRL_NO_DOWNLOAD is set."""
    return download and os.environ.get(NO_DOWNLOAD_VARIABLE, "") in ("", "0")


def _generate_instead(spec: EnvSpec, dataset_dir: str) -> str:
    """The offline alternative to a download, for an error message ("" where envs.py cannot generate the data)."""
    if not spec.can_generate:
        return ""
    return f"generate it offline with `python envs.py generate {spec.dataset_name} --dataset-dir {dataset_dir}`, or "


def download_dataset(spec: EnvSpec, dataset_dir: str) -> Path:
    """Download `spec`'s official dataset into `dataset_dir` (OGBench's two files, or ExORL's episodes) and return
    `dataset_path(spec, dataset_dir)`; raise UsageError (one line: what failed and what to do) where it cannot."""
    if not spec.can_download:
        name = spec.dataset_name if spec.family == "ogbench" else spec.name
        raise UsageError(f"'{spec.name}' has no official dataset to download; generate it offline with "
                         f"`python envs.py generate {name} --dataset-dir {dataset_dir}`")  # every such name can
    if spec.family == "dmc":
        return _download_exorl(spec, dataset_dir)
    return _download_ogbench(spec, dataset_dir)


def _staging_folder(parent: Path, name: str) -> Path:
    """A fresh hidden folder in `parent` for the download of `name`, named with this process's PID; folders a dead
    process left (a SIGKILLed download) are removed first. Nothing in one loads: only renames out of it do."""
    for stale in parent.glob(f".download-{name.replace('/', '-')}-*"):
        try:
            pid = int(stale.name.rsplit("-", 2)[-2])
            os.kill(pid, 0)  # raises where no such process lives
        except ProcessLookupError:
            shutil.rmtree(stale, ignore_errors=True)
        except (ValueError, PermissionError):
            pass  # not ours to judge: a name of another shape, or a live process of another user
    return Path(tempfile.mkdtemp(dir=parent, prefix=f".download-{name.replace('/', '-')}-{os.getpid()}-"))


def _download_ogbench(spec: EnvSpec, dataset_dir: str) -> Path:
    """Download an official OGBench dataset (the training and -val files) with `ogbench`'s own downloader (its
    progress bar), from OGBench's address or $OGBENCH_DATASET_URL, into a staging folder beside its place; check both
    files; then move the -val file and, last, the training file into place, each by a rename: a download stopped at
    any byte leaves nothing that loads, and a training file means a complete set. Returns the training file's path."""
    path = dataset_path(spec, dataset_dir)
    base = (os.environ.get(DATASET_URL_VARIABLE) or ogbench.utils.DATASET_URL).rstrip("/")
    names = (f"{spec.dataset_name}-val.npz", f"{spec.dataset_name}.npz")  # the training file moves in last
    instead = _generate_instead(spec, dataset_dir)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = _staging_folder(path.parent, spec.dataset_name)
    except OSError as error:
        raise UsageError(f"cannot write to --dataset-dir {path.parent}: {error.strerror}; choose a writable "
                         "folder") from error
    original = ogbench.utils.DATASET_URL
    try:
        ogbench.utils.DATASET_URL = base  # read by ogbench's downloader at each call; restored below
        ogbench.utils.download_datasets([spec.dataset_name], str(staging))
        for name in names:
            try:
                check_dataset_file(staging / name, ("qpos",) if not spec.goal_conditioned else ())
            except UsageError as error:
                raise UsageError(f"the download of {name} from {base} is damaged ({error}); rerun to download it "
                                 f"again, {instead}place {names[1]} and {names[0]} in {path.parent} by hand") from None
        for name in names:
            replace_durably(staging / name, path.parent / name)  # ogbench's downloader wrote it without a sync
    except (OSError, http.client.HTTPException) as error:  # no network, 404, a dropped connection, a full disk
        reason = getattr(error, "reason", None) or getattr(error, "strerror", None) or f"{type(error).__name__}"
        code = f"HTTP {error.code} " if hasattr(error, "code") else ""
        raise UsageError(f"cannot download {spec.dataset_name} from {base} ({code}{reason}); {instead}place "
                         f"{names[1]} and {names[0]} in {path.parent} by hand, or point ${DATASET_URL_VARIABLE} "
                         "at a mirror") from error
    finally:
        ogbench.utils.DATASET_URL = original
        shutil.rmtree(staging, ignore_errors=True)
    return path


def _download_exorl(spec: EnvSpec, dataset_dir: str) -> Path:
    """Download ExORL's `<domain>/<algo>.zip` (episodes under buffer/, videos under video/) from its address or
    $EXORL_DATASET_URL. The bytes go to `<domain>/.<algo>.zip.part`, which a rerun continues where it stopped (an HTTP
    Range request); the whole archive is then CRC-checked, its buffer/*.npz unpacked into a staging folder, and the
    folder renamed into place last: a download stopped at any byte leaves nothing that loads. Videos are skipped."""
    path = dataset_path(spec, dataset_dir)  # <dataset-dir>/<domain>/<algo>/buffer
    domain_folder = path.parent.parent
    base = (os.environ.get(EXORL_URL_VARIABLE) or EXORL_URL).rstrip("/")
    url = f"{base}/{spec.kind}/{spec.dataset_type}.zip"
    part = domain_folder / f".{spec.dataset_type}.zip.part"
    lock = runs.lock_folder(domain_folder, "--dataset-dir")  # one writer of the .part file at a time
    try:
        _fetch_resumable(url, part, f"download {spec.dataset_name}")
        staging = _staging_folder(domain_folder, spec.dataset_name)
        try:
            with zipfile.ZipFile(part) as archive:
                episodes = [m for m in archive.namelist() if m.endswith(".npz") and Path(m).parent.name == "buffer"]
                damaged = archive.testzip()
                if damaged is not None or not episodes:
                    raise zipfile.BadZipFile(f"bad CRC in {damaged}" if damaged else "no buffer/*.npz in it")
                (staging / "buffer").mkdir()
                for member in episodes:
                    with archive.open(member) as source, open(staging / "buffer" / Path(member).name, "wb") as out:
                        shutil.copyfileobj(source, out, 1 << 20)
            path.parent.mkdir(parents=True, exist_ok=True)
            replace_durably(staging / "buffer", path)  # its episodes, the folder, then the rename reach the disk
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        part.unlink()
    except zipfile.BadZipFile as error:
        part.unlink(missing_ok=True)  # a complete but wrong archive: resuming it cannot help
        raise UsageError(f"the download of {url} is damaged ({error}); rerun to download it again, or unpack "
                         f"ExORL's {spec.dataset_type}.zip into {path.parent} by hand (episodes under buffer/)"
                         ) from None
    except (OSError, http.client.HTTPException) as error:  # no network, 404, a dropped connection, a full disk
        reason = getattr(error, "reason", None) or getattr(error, "strerror", None) or f"{type(error).__name__}"
        code = f"HTTP {error.code} " if hasattr(error, "code") else ""
        kept = f"; rerun to continue from byte {part.stat().st_size:,}" if part.exists() else ""
        raise UsageError(f"cannot download {url} ({code}{reason}){kept}; or unpack ExORL's {spec.dataset_type}.zip "
                         f"into {path.parent} by hand, or point ${EXORL_URL_VARIABLE} at a mirror") from error
    finally:
        lock.close()
    return path


def _fetch_resumable(url: str, part: Path, description: str) -> None:
    """Append `url`'s bytes to `part`, asking only for those it lacks; raise http.client.IncompleteRead when the
    connection ends before the last byte (the bytes so far stay for the next call)."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as error:
        if error.code == 416 and have:  # nothing past the bytes we hold: the part is whole
            return
        raise
    with response:
        if response.status != 206:  # the server ignored the range and sends the whole file
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        with open(part, "ab" if have else "wb") as out, tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                                             desc=description) as bar:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                bar.update(len(chunk))
    if total is not None and part.stat().st_size < total:
        raise http.client.IncompleteRead(b"", total - part.stat().st_size)


def _missing_dataset_message(spec: EnvSpec, path: Path, dataset_dir: str) -> str:
    if spec.family == "dmc" and spec.can_download:  # downloads are off (--no-download or $OFFRL_NO_DOWNLOAD)
        return (f"no ExORL episodes at {path} (--dataset-dir) and downloads are off (--no-download or "
                f"${NO_DOWNLOAD_VARIABLE}): allow the download (`python envs.py download {spec.kind}` for the RND "
                f"data), unpack ExORL's {spec.dataset_type}.zip into {path.parent} by hand, or use "
                f"`{spec.env_id}-random`, which `envs.py generate` makes offline")
    if spec.can_download:  # downloads are off (--no-download or $OFFRL_NO_DOWNLOAD)
        instead = _generate_instead(spec, dataset_dir)
        return (f"no dataset at {path} (--dataset-dir) and downloads are off (--no-download or "
                f"${NO_DOWNLOAD_VARIABLE}): {instead}allow the download, or place the official files "
                f"{spec.dataset_name}.npz and {spec.dataset_name}-val.npz there")
    if spec.can_generate:
        name = spec.dataset_name if spec.family == "ogbench" else spec.name
        return (f"no dataset at {path} (--dataset-dir): generate it offline with "
                f"`python envs.py generate {name} --dataset-dir {dataset_dir}`")
    return (f"no dataset at {path} (--dataset-dir): '{spec.dataset_name}' needs trained experts to generate; "
            f"place the official OGBench files {spec.dataset_name}.npz and {spec.dataset_name}-val.npz there")


def load_dataset(spec: EnvSpec, dataset_dir: str = DEFAULT_DATASET_DIR,
                 download: bool = True) -> dict[str, np.ndarray]:
    """Load the whole training file of `spec` (load_splits adds the validation data). A missing official OGBench
    dataset is downloaded first where `downloads_allowed(download)`."""
    path = dataset_path(spec, dataset_dir)
    if not path.exists() and spec.can_download and downloads_allowed(download):
        download_dataset(spec, dataset_dir)
    if not path.exists():
        raise UsageError(_missing_dataset_message(spec, path, dataset_dir))
    if spec.family == "ogbench":
        return _load_ogbench(spec, path)
    return _load_exorl(spec, path)


def _load_ogbench(spec: EnvSpec, path: Path) -> dict[str, np.ndarray]:
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
    if spec.kind in MANIPSPACE_KINDS:
        size = spec.env_id.split("-")[1] if spec.kind != "scene" else None
        episodes = {"single": 1000, "double": 1000, "triple": 3000, "quadruple": 5000,  # cube
                    "3x3": 1000, "4x4": 1000, "4x5": 3000, "4x6": 5000, None: 1000}[size]  # puzzle, scene
        p_random = {"cube": 0.1, "scene": 0.1, "puzzle": 0.2}[spec.kind] if spec.dataset_type == "noisy" else 0.0
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
                         f"download it (`python envs.py download {spec.name}`), or generate `{spec.env_id}-random`")
    recipe = official_recipe(spec)
    if num_episodes is not None:
        recipe["num_episodes"] = num_episodes
    if max_episode_steps is not None:
        recipe["max_episode_steps"] = max_episode_steps
    if recipe["num_episodes"] < 1 or recipe["max_episode_steps"] < 2:
        raise UsageError("--num-episodes must be >= 1 and --max-episode-steps >= 2")

    if spec.family == "dmc":
        return _generate_dmc_random(spec, dataset_dir, recipe, seed, progress)
    np.random.seed(seed)  # the official recipes draw from numpy's global generator
    collect = _collect_pointmaze_episode if spec.kind == "pointmaze" else _collect_manipspace_episode
    env, state = _generation_env(spec, recipe, seed)
    num_train, num_val = recipe["num_episodes"], recipe["num_episodes"] // 10
    episodes = [collect(env, state, spec, recipe)
                for _ in trange(num_train + num_val, desc=f"generate {spec.dataset_name}", disable=not progress)]

    def stack(eps):
        out = {}
        for key in eps[0]:
            dtype = {"terminals": bool, "button_states": np.int64}.get(key, np.float32)  # the official dtypes
            out[key] = np.concatenate([e[key] for e in eps]).astype(dtype) if eps else np.zeros((0,), dtype)
        return out

    path = dataset_path(spec, dataset_dir)
    meta = dict(dataset=spec.dataset_name, recipe=recipe, seed=seed, train_episodes=num_train, val_episodes=num_val,
                generator="offrl-bottlenecks envs.py (OGBench data_gen_scripts recipe)")
    # ogbench's loader wants a -val file beside the training file; without validation episodes a one-row one
    val = stack(episodes[num_train:]) if num_val else {k: v[:1] for k, v in stack(episodes).items()}
    # The set is staged whole (each file through its own temporary file) before any file of an earlier set is
    # replaced, so a failed write leaves that set as it was; the training file goes last: it marks a complete set.
    files = [(path.with_name(f"{spec.dataset_name}-val.npz"), lambda f: np.savez_compressed(f, **val)),
             (path.with_suffix(".json"), lambda f: f.write(json.dumps(meta, indent=1).encode())),
             (path, lambda f: np.savez_compressed(f, **stack(episodes[:num_train])))]
    staged = []
    try:
        for final, write in files:
            staged.append((final.with_name(f".{final.name}.staged"), final))
            write_atomic(staged[-1][0], write, binary=True)
        for temporary, final in staged:
            replace_durably(temporary, final)  # each rename on the disk before the next: the training file last
    except BaseException as error:
        for temporary, _ in staged:
            Path(temporary).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise UsageError(f"cannot write {path}: {error.strerror or error}; free space or choose a writable "
                             "folder") from error
        raise
    return path


def _generation_env(spec: EnvSpec, recipe: dict, seed: int):
    gc_id = spec.env_id.replace("-singletask", "").split("-task")[0]
    if spec.kind == "pointmaze":
        env = gymnasium.make(gc_id, terminate_at_goal=False, max_episode_steps=recipe["max_episode_steps"])
        # The environment's own generator draws each episode's initial velocity (stored as qvel); seeded without a
        # reset, which would draw from numpy's global generator and change every episode after it.
        env.unwrapped.np_random = np.random.default_rng(seed)
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

    env = gymnasium.make(gc_id, terminate_at_goal=False, mode="data_collection",
                         max_episode_steps=recipe["max_episode_steps"])
    env.reset(seed=seed)
    env.action_space.seed(seed)
    # One oracle per sub-task the environment sets ("privileged/target_task"): play data follows non-Markovian plan
    # oracles with smoothed noise, noisy data Markovian closed-loop oracles with Gaussian noise added per step.
    if spec.dataset_type == "play":
        plan = dict(env=env, noise=recipe["noise"], noise_smoothing=0.5)
        oracles = {"cube": dict(cube=CubePlanOracle(**plan)),
                   "scene": dict(cube=CubePlanOracle(**plan), button=ButtonPlanOracle(**plan),
                                 drawer=DrawerPlanOracle(**plan), window=WindowPlanOracle(**plan)),
                   "puzzle": dict(button=ButtonPlanOracle(**plan, gripper_always_closed=True))}[spec.kind]
    else:
        markov = dict(env=env, min_norm=0.4)
        oracles = {"cube": dict(cube=CubeMarkovOracle(**markov)),
                   "scene": dict(cube=CubeMarkovOracle(**markov, max_step=100), button=ButtonMarkovOracle(**markov),
                                 drawer=DrawerMarkovOracle(**markov), window=WindowMarkovOracle(**markov)),
                   "puzzle": dict(button=ButtonMarkovOracle(**markov, gripper_always_closed=True))}[spec.kind]
    return env, dict(oracles=oracles)


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


def _collect_manipspace_episode(env, state, spec, recipe):
    """One episode of OGBench's generate_manipspace.py: whenever the oracle of the current sub-task is done, the
    environment sets a new random target (and sub-task). A scene episode in which the cube leaves the view (too far
    right, or too far left outside the drawer) is thrown away and collected again, as the official script does."""
    size, markov = spec.env_id.split("-")[1], spec.dataset_type == "noisy"
    keys = ("observations", "actions", "terminals", "qpos", "qvel") + (
        ("button_states",) if hasattr(env.unwrapped, "_cur_button_states") else ())  # scene, puzzle
    while True:
        ob, info = env.reset()
        if spec.kind == "cube":
            low, high = {"single": (0.0, 0.0), "double": (0.0, 0.25), "triple": (0.05, 0.35),
                         "quadruple": (0.1, 0.5)}[size]
            p_stack = np.random.uniform(low, high) if high > 0 else 0.0  # no draw for single, as the official order
        else:
            p_stack = 0.5
        xi = np.random.uniform(0, recipe["noise"]) if markov else 0.0  # this episode's noise level
        oracle = state["oracles"][info["privileged/target_task"]]
        oracle.reset(ob, info)
        episode = {k: [] for k in keys}
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
                oracle = state["oracles"][agent_info["privileged/target_task"]]
                oracle.reset(agent_ob, agent_info)
            for key, value in (("observations", ob), ("actions", action), ("terminals", done),
                               ("qpos", info["prev_qpos"]), ("qvel", info["prev_qvel"]),
                               ("button_states", info.get("prev_button_states"))):
                if key in episode:
                    episode[key].append(value)
            ob = next_ob
        episode = {k: np.asarray(v) for k, v in episode.items()}
        if spec.kind != "scene":
            return episode
        block = episode["qpos"][:, 14:17]
        too_far_right = (block[:, 1] >= 0.29).any()
        lost_left = ((block[:, 1] <= -0.3) & ((block[:, 2] < 0.06) | (block[:, 2] > 0.08))).any()
        if not (too_far_right or lost_left):
            return episode


def _generate_dmc_random(spec: EnvSpec, dataset_dir: str, recipe: dict, seed: int, progress: bool) -> Path:
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
        write_npz_atomic(folder / f"episode_{episode_index:06d}_{length}.npz",
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
    train_ids, val_ids = split_trajectory_ids(len(bounds), seed, val_fraction)

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

    return gather(train_ids), gather(val_ids)


VALIDATION_FILE = "the official -val file"  # config.json's "validation": where the validation MSE's states come from
VALIDATION_HOLDOUT = "10% of the training file's trajectories, held out (OURS: no -val file)"


def validation_file(spec: EnvSpec, dataset_dir: str) -> Path | None:
    """The official `<dataset>-val.npz` beside an OGBench training file, if it holds a whole episode (a generated set
    of fewer than 10 episodes has a one-row placeholder there, for ogbench's loader); else None."""
    if spec.family != "ogbench":
        return None
    path = dataset_path(spec, dataset_dir).with_name(f"{spec.dataset_name}-val.npz")
    if not path.exists():
        return None
    check_dataset_file(path)
    with np.load(path) as arrays:
        return path if np.asarray(arrays["terminals"]).any() else None


def load_splits(spec: EnvSpec, dataset_dir: str = DEFAULT_DATASET_DIR, seed: int = 0,
                download: bool = True) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], str]:
    """(train, val, validation): what every script trains and validates on. Where the official -val file exists
    (every OGBench dataset, downloaded or generated), train is the whole training file and val that file, as the
    reference's; elsewhere (ExORL) 10% of the training file's trajectories are held out (OURS). Either way train's
    rows follow one seeded permutation of whole trajectories (nested subsets: split_dataset); `validation` says which
    (VALIDATION_FILE or VALIDATION_HOLDOUT; config.json records it)."""
    data = load_dataset(spec, dataset_dir, download=download)
    path = validation_file(spec, dataset_dir)
    if path is None:
        return (*split_dataset(data, seed), VALIDATION_HOLDOUT)
    train, _ = split_dataset(data, seed, val_fraction=0.0)
    val, _ = split_dataset(_load_ogbench(spec, path), seed, val_fraction=0.0)
    return train, val, VALIDATION_FILE


def split_trajectory_ids(num_trajectories: int, seed: int, val_fraction: float = 0.1):
    """split_dataset's choice of trajectories: (training ids in their permuted order, held-out ids). Also used to
    hand another implementation the same training trajectories (benchmarks/parity.py)."""
    order = np.random.default_rng(seed).permutation(num_trajectories)
    num_val = int(round(val_fraction * num_trajectories)) if num_trajectories > 1 else 0
    num_val = min(max(num_val, 1 if num_trajectories > 1 and val_fraction > 0 else 0), num_trajectories - 1)
    return order[num_val:], order[:num_val]



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

    def __post_init__(self):
        # ceil(log(u) / log(discount)) is an offset only for 0 < discount < 1: at 1 every goal would be the next state.
        if not 0 < self.discount < 1:
            raise UsageError(f"--discount must be in (0, 1) for geometric goal sampling, got {self.discount}")


def to_device(part: dict[str, np.ndarray]):
    """Move a split onto the accelerator once (pass it into jitted functions as an argument, never close over it)."""
    return {k: jnp.asarray(v) for k, v in part.items()}


def sample_batch(key, data, data_size, batch_size: int, goals: Literal["none", "value", "actor"],
                 goal_config: GoalConfig = GoalConfig(), online=None, actor_p_random: float = 0.0):
    """Draw `batch_size` transitions from the first `data_size` rows (a traced int), with goals if asked. Every batch
    holds observations, actions, next_observations, rewards, masks and next_actions (the action of the next row of the
    same trajectory inside the subset; a trajectory's last row there repeats its own action).

    For goal-conditioned data, `goals="value"` adds `goals`, `rewards` and `masks` from OGBench's value-goal mixture;
    `goals="actor"` adds `goals` drawn from the future of each trajectory, or with probability `actor_p_random`
    (--actor-p-randomgoal) from the whole subset. Goals never leave the subset: a trajectory cut by the subset
    boundary is treated as ending there.

    `online` (offline-to-online, one member's `OnlineBuffer.device()` rows): its first `online["size"]` rows count as
    rows data_size, data_size + 1, ... of the same data, so a batch is drawn uniformly from the subset and the online
    rows together, and goals stay inside whichever trajectory (offline or online) a row belongs to.
    """

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
    # each row's trajectory end inside the subset (a hand-made dict without final_idxs: one trajectory)
    final = jnp.minimum(data["final_idxs"][jnp.minimum(idxs, data_size - 1)] if "final_idxs" in data
                        else jnp.full_like(idxs, data_size - 1), data_size - 1)
    if online is not None:  # an online row's trajectory ends at its episode's last row (the newest row, if open)
        final = jnp.where(idxs >= data_size, data_size + rows("final_idxs", idxs), final)
    # a' for SARSA-style targets: the next row's action in the same trajectory and subset (at its last row, its own)
    batch["next_actions"] = rows("actions", jnp.minimum(idxs + 1, final))
    if goals == "none":
        return batch
    uniform = jax.random.uniform(k_uniform, (batch_size,))
    if goals == "actor":
        # Uniformly among the strict future (the last state itself when there is none), or with probability
        # `actor_p_random` a random state of the subset (OGBench's actor_p_randomgoal).
        future = jnp.minimum(idxs + 1 + jnp.floor(uniform * (final - idxs)).astype(jnp.int32), final)
        random_goal = jax.random.randint(k_random, (batch_size,), 0, total)
        goal_idxs = jnp.where(jax.random.uniform(k_kind, (batch_size,)) < actor_p_random, random_goal, future)
        batch["goals"] = rows("observations", goal_idxs)
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
    if not spec.has_oracle:
        raise UsageError(f"'{spec.name}' has no optimal scripted oracle; the MSE metrics exist for pointmaze (but "
                         "teleport, whose waypoints ignore the teleporters) and cube-single only")
    return _pointmaze_oracle(spec) if spec.kind == "pointmaze" else _cube_single_oracle


def maze_geometry(spec: EnvSpec) -> tuple[np.ndarray, float, float, float]:
    """A pointmaze's (maze_map [rows, cols] with 1 = wall, cell size, x offset, y offset): cell (i, j) is centred at
    x = j * size - x offset, y = i * size - y offset."""
    maze = gymnasium.make(spec.env_id.replace("-singletask", "").split("-task")[0]).unwrapped
    return np.asarray(maze.maze_map), maze._maze_unit, maze._offset_x, maze._offset_y


def _pointmaze_oracle(spec: EnvSpec):
    """Unit vector toward the next cell on a shortest BFS path to the goal's cell; inside the goal's cell, toward the
    goal itself. (OGBench's data oracle aims at the goal cell's centre instead, which can miss a goal placed with
    noise up to a cell quarter away from the centre: we label the truly optimal direction.)"""

    maze_map, unit, off_x, off_y = maze_geometry(spec)
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

def make_env(spec: EnvSpec, render_size: int | None = None):
    """One environment instance: a gymnasium env (OGBench) or a dm_control suite env; `render_size`: an OGBench env
    that renders square RGB frames of that many pixels (`render_frame`; dm_control envs always can)."""
    if spec.family == "dmc":
        return _dmc_env(spec)
    if render_size:
        return gymnasium.make(spec.env_id, render_mode="rgb_array", width=render_size, height=render_size)
    return gymnasium.make(spec.env_id)


def render_frame(spec: EnvSpec, env, size: int) -> np.ndarray:
    """The environment's current state as an RGB image [size, size, 3] (uint8), drawn offscreen by MuJoCo (MUJOCO_GL:
    egl or osmesa); OGBench envs come from `make_env(spec, render_size=size)`."""
    if spec.family == "dmc":
        return env.physics.render(height=size, width=size, camera_id=0)
    return np.asarray(env.render())


def env_dims(spec: EnvSpec) -> tuple[int, int]:
    """(observation dim, action dim) of `spec`'s environment."""
    env = make_env(spec)
    if spec.family == "dmc":
        return len(_flat_obs(env.reset().observation)), env.action_spec().shape[0]
    return env.observation_space.shape[0], env.action_space.shape[0]


def num_eval_tasks(spec: EnvSpec) -> int:
    """OGBench goal-conditioned environments have 5 evaluation tasks; the others one."""
    return 5 if spec.goal_conditioned else 1


# Environments stepped at once by one evaluation, all members together (--eval-envs): a manipulation env holds 35-165
# MB (cube-single 163 MB measured on this CPU), so 250 cube episodes at once take 40 GB; a maze or dm_control env 1-2.
EVAL_ENVS = {"cube": 16, "scene": 16, "puzzle": 16}
EVAL_ENVS_OTHERWISE = 256


def default_eval_envs(spec: EnvSpec) -> int:
    return EVAL_ENVS.get(spec.kind, EVAL_ENVS_OTHERWISE)


class Evaluator:
    """Runs `episodes_per_task` episodes of every evaluation task for every member, in waves: each wave steps `wave`
    episodes per member (at most `max_envs` environments in all, default `default_eval_envs`, but at least one per
    member) in lockstep, and the policy is called once per step for all of them with obs [M, wave, d]; a last,
    shorter wave is padded with copies that are never stepped. `render_size`: environments that also draw frames
    (`render_frame`), for evaluate.py's videos; while `evaluate` runs, slot j of wave `wave_index` is episode
    wave_index * wave + j. `max_steps` (--eval-max-steps) cuts every episode there, a running one counting as a
    failure; default: the environment's own time limit.

    Member m's start states and goals come from `seeds[m]` alone (each env is reseeded per episode; numpy's global
    generator, from which OGBench draws start and goal noise, runs one stream per member across its resets), so a
    member meets the same episodes whether it trains alone or packed, and whatever the wave size. One exception,
    OGBench's own: a manipulation goal's arm pose (its proprioceptive part) follows two settling steps of actions
    drawn from an action space OGBench builds anew, unseeded, at each access; the objects' part is seeded.
    """

    def __init__(self, spec: EnvSpec, num_members: int, episodes_per_task: int, max_envs: int | None = None,
                 render_size: int | None = None, max_steps: int | None = None):
        if episodes_per_task < 1:
            raise UsageError(f"--eval-episodes must be >= 1, got {episodes_per_task}")
        max_envs = default_eval_envs(spec) if max_envs is None else max_envs
        if max_envs < 1:
            raise UsageError(f"--eval-envs must be >= 1, got {max_envs}")
        if max_steps is not None and max_steps < 1:
            raise UsageError(f"--eval-max-steps must be >= 1, got {max_steps}")
        self.spec, self.num_members = spec, num_members
        self.tasks = np.repeat(np.arange(1, num_eval_tasks(spec) + 1), episodes_per_task)
        self.wave = max(1, min(len(self.tasks), max_envs // num_members))  # episodes per member per wave
        self.waves = -(-len(self.tasks) // self.wave)
        self.envs = [[make_env(spec, render_size) for _ in range(self.wave)] for _ in range(num_members)]
        time_limit = 1000 if spec.family == "dmc" else self.envs[0][0].spec.max_episode_steps
        self.max_steps = time_limit if max_steps is None else min(max_steps, time_limit)  # --eval-max-steps cuts
        self.alive = None  # during `evaluate`: [M, wave], the episodes of this wave still running at the current step
        self.wave_index = None  # during `evaluate`: which wave runs (a test-time method may start afresh at each)

    def evaluate(self, policy: Callable[[np.ndarray, np.ndarray | None], np.ndarray], seeds: list[int]) -> dict:
        """Returns success [M, E], return [M, E], tasks [E] (each episode's task), and the visited states: observations
        [M, E, T, d], goals [M, E, d] (None without goals), actions [M, E, T, a], valid [M, E, T] (False after an
        episode ended)."""
        M, E, T, W = self.num_members, len(self.tasks), self.max_steps, self.wave
        if len(seeds) != M:
            raise ValueError(f"{len(seeds)} seeds for {M} members")
        streams = []  # numpy's global generator, one stream per member, continued across its waves
        for seed in seeds:
            np.random.seed(seed)
            streams.append(np.random.get_state())
        visited = goals_all = actions_taken = None
        valid = np.zeros((M, E, T), bool)
        success, returns = np.zeros((M, E)), np.zeros((M, E))
        for w in range(self.waves):
            episodes = list(range(w * W, min((w + 1) * W, E)))
            obs, goals = [], []
            for m, seed in enumerate(seeds):
                np.random.set_state(streams[m])
                for j in range(W):  # padding slots (past the last episode) repeat the last one and never step
                    if j < len(episodes):
                        e = episodes[j]
                        o, g = reset_env(self.spec, self.envs[m][j], self.tasks[e], seed * 10007 + e)
                    obs.append(o)
                    goals.append(g)
                streams[m] = np.random.get_state()
            obs = np.asarray(obs, np.float32).reshape(M, W, -1)
            goals = None if goals[0] is None else np.asarray(goals, np.float32).reshape(M, W, -1)
            if visited is None:
                visited = np.zeros((M, E, T, obs.shape[-1]), np.float32)
                goals_all = None if goals is None else np.zeros((M, E, goals.shape[-1]), np.float32)
            if goals is not None:
                goals_all[:, episodes] = goals[:, :len(episodes)]
            alive = np.zeros((M, W), bool)
            alive[:, :len(episodes)] = True
            self.wave_index = w
            for t in range(T):
                self.alive = alive  # which episodes are running at this step: what a test-time learner may train on
                actions = np.asarray(policy(obs, goals))
                if actions_taken is None:
                    actions_taken = np.zeros((M, E, T, actions.shape[-1]), np.float32)
                n = len(episodes)
                visited[:, episodes, t], actions_taken[:, episodes, t] = obs[:, :n], actions[:, :n]
                valid[:, episodes, t] = alive[:, :n]
                for m, j in zip(*np.nonzero(alive)):
                    o, reward, terminated, truncated, succeeded = step_env(self.spec, self.envs[m][j], actions[m, j])
                    e = episodes[j]
                    obs[m, j] = o
                    returns[m, e] += reward
                    success[m, e] = max(success[m, e], succeeded)
                    alive[m, j] = not (terminated or truncated)
                if not alive.any():
                    break
        self.alive = self.wave_index = None
        return dict(success=success, returns=returns, tasks=self.tasks, observations=visited, goals=goals_all,
                    actions=actions_taken, valid=valid)

    def close(self) -> None:
        """Release the environments (and their offscreen renderers, if any) now rather than at interpreter exit."""
        for env in (env for row in self.envs for env in row):
            if hasattr(env, "close"):
                env.close()


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

    def step_errors(self, rollout: dict) -> np.ndarray:
        """[M, E, T]: each valid step's squared error to the oracle's action, averaged over action dimensions (the
        terms of eval_mse; 0 after an episode ended), for an `Evaluator.evaluate` rollout of an env with an oracle."""
        valid, observations = rollout["valid"], rollout["observations"]
        M, E = valid.shape[:2]
        goals = rollout["goals"] if self.spec.goal_conditioned else self._task_goals(M * E).reshape(M, E, -1)
        goals = np.broadcast_to(goals[:, :, None, :], observations.shape)
        errors = np.zeros(valid.shape)
        errors[valid] = ((rollout["actions"][valid] - self.oracle(observations[valid], goals[valid])) ** 2).mean(-1)
        return errors

    def eval(self, rollout: dict) -> dict[str, np.ndarray]:
        """{"eval_mse": [M]} over the valid steps of an `Evaluator.evaluate` rollout."""
        if not self.spec.has_oracle:
            return {}
        valid = rollout["valid"]
        member_of_row = np.nonzero(valid)[0]
        return {"eval_mse": np.bincount(member_of_row, self.step_errors(rollout)[valid], valid.shape[0])
                / np.bincount(member_of_row, minlength=valid.shape[0])}


def rollout_metrics(rollout: dict, probe: OracleProbe, prefix: str = "") -> dict[str, np.ndarray]:
    """Per-member success, return and evaluation MSE of an `Evaluator.evaluate` rollout, names prefixed; with several
    evaluation tasks also each task's success (`task<k>_success`, OGBench's per-task numbers)."""
    metrics = {"success": rollout["success"].mean(1), "return": rollout["returns"].mean(1), **probe.eval(rollout)}
    tasks = np.unique(rollout["tasks"])
    if len(tasks) > 1:
        metrics.update({f"task{t}_success": rollout["success"][:, rollout["tasks"] == t].mean(1) for t in tasks})
    return {prefix + k: v for k, v in metrics.items()}


def evaluate(evaluator: Evaluator, probe: OracleProbe, policy: Callable, seeds: list[int]) -> dict[str, np.ndarray]:
    """One evaluation of a batched policy, per member: success, return and evaluation MSE on the evaluation tasks,
    then the train / validation MSE (in this order: SfBC's policy draws fresh candidates on every call)."""
    return {**rollout_metrics(evaluator.evaluate(policy, seeds), probe), **probe.train_val(policy)}


# ----------------------------------------------------------------------------------------------------------------
# 7. Offline-to-online fine-tuning (the paper's check of what online data changes: mainly the evaluation MSE)
# ----------------------------------------------------------------------------------------------------------------
# With --online-steps N, after its --steps offline updates a script alternates N / --log-interval times: collect
# --log-interval environment steps with the current policy plus Gaussian noise (one environment per member, all
# members in lockstep), then take --log-interval updates (one update per environment step) on the member's offline
# subsets and its online rows together (`sample_batch(..., online=...)`). Value and policy keep training on the same
# schedule; evaluations and the train / val / eval MSEs go on as offline.

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
# 8. Command line
# ----------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class GenerateArgs:
    """Generate a dataset offline with OGBench's official recipe (pointmaze-*, cube-*, scene-*, puzzle-*) or random
    dm_control data."""
    env: tyro.conf.Positional[Annotated[str, tyro.conf.arg(metavar="ENV")]]
    """Dataset name, e.g. pointmaze-medium-navigate-v0, cube-single-noisy-v0, scene-play-v0, walker-run-random."""
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
        ways = [way for way, ok in (("download", spec.can_download), ("generate offline", spec.can_generate)) if ok]
        notes = ["goal-conditioned" if spec.goal_conditioned else "reward-based",
                 " or ".join(ways) if ways else "files placed by hand",
                 "oracle: MSE metrics" if spec.has_oracle else ""]
        print(f"{name:48s} {', '.join(n for n in notes if n)}")


@dataclasses.dataclass
class DownloadArgs:
    """Download official datasets into --dataset-dir, as a script does on first use: OGBench's training and -val
    files, or ExORL's episodes (a domain name such as `walker` means its RND data, the paper's); a dataset already
    there is left alone. An ExORL download stopped part way continues where it stopped when rerun."""
    envs: tyro.conf.Positional[Annotated[tuple[str, ...], tyro.conf.arg(metavar="ENV")]]
    """Dataset names, e.g. antmaze-large-navigate-v0 cube-double-play-v0, or ExORL domains (walker, cheetah,
    quadruped) and tasks with an ExORL algorithm (walker-run-proto)."""
    dataset_dir: str = DEFAULT_DATASET_DIR
    """Folder to download into (ogbench's own default)."""


def _download_spec(name: str) -> EnvSpec:
    """parse_env, and a bare dm_control domain (`walker`) for its first task: ExORL's data is per domain."""
    first_task = {}
    for task in DMC_TASKS:
        first_task.setdefault(task.split("-")[0], task)
    return parse_env(first_task.get(name, name))


def _download_cli(args: DownloadArgs) -> None:
    specs = [_download_spec(name) for name in args.envs]
    for spec in specs:
        if not spec.can_download:
            download_dataset(spec, args.dataset_dir)  # raises what to do instead, before anything is fetched
    if not downloads_allowed():
        raise UsageError(f"downloads are off (${NO_DOWNLOAD_VARIABLE} is set); unset it to download")
    for spec in specs:
        path = dataset_path(spec, args.dataset_dir)
        if path.exists():
            print(f"{path}: there already")
            continue
        written = download_dataset(spec, args.dataset_dir)
        files = [written] if written.is_file() else sorted(written.glob("*.npz"))
        episodes = "" if written.is_file() else f"{len(files):,} episodes, "
        print(f"{written}: downloaded ({episodes}{sum(f.stat().st_size for f in files):,} bytes)")


def main(argv: list[str] | None = None) -> None:
    """`python envs.py generate|download|list ...` (`argv`: the arguments, default sys.argv[1:])."""
    args = tyro.cli(Union[Annotated[GenerateArgs, tyro.conf.subcommand("generate")],
                          Annotated[DownloadArgs, tyro.conf.subcommand("download")],
                          Annotated[ListArgs, tyro.conf.subcommand("list")]], args=argv)
    {GenerateArgs: _generate_cli, DownloadArgs: _download_cli, ListArgs: _list_cli}[type(args)](args)


if __name__ == "__main__":
    exit_on_usage_error(main)
