"""scaling.py: data-scaling sweeps over environments x scripts x value sizes x policy sizes x alphas x seeds.

    python scaling.py --preset quickstart                      # AWR vs DDPG+BC, 4 seeds, on generated pointmaze data
    python scaling.py --preset matrix --dry-run                # the paper-size grid: print the plan, run nothing
    python scaling.py --envs cube-single-play-v0 --scripts iql_ddpgbc sarsa_ddpgbc \\
        --value-sizes 100000 1000000 --policy-sizes 100000 1000000 --ddpgbc-alphas 0.03 0.3 --seeds 0 1 \\
        --steps 1000000 --sweep-dir sweeps/cube -- --hidden-dims 256 256   # flags after `--` go to every script

What it does, in order:
  1. the plan: every run of the grid, each with its run folder
     <sweep-dir>/<env>/<script>/v<value size>_p<policy size>[_a<alpha>]_s<seed>/  (bc.py: p<size>_s<seed>);
     alphas come from --awr-alphas / --ddpgbc-alphas by the script's extractor (SfBC and BC have none);
  2. datasets: a missing one is generated offline (`envs.py generate`, --generate-episodes), sizes are checked;
  3. runs: a folder with result.json is complete and skipped, never touched again; the others continue from their
     latest resume state (the scripts' --resume), or start afresh without one. `--pack K` trains up to K runs of
     one env x script (different seeds, sizes, alphas) in one vmapped process via the script's --members-file,
     still one run folder each. Processes run on a local pool
     (--workers) or as Ray tasks (--backend ray). A failed process is retried up to --retries times; its exit
     status and the last lines of its log are kept in sweep.json and listed at the end; a run that diverged (NaN,
     exit status 3) is recorded as diverged, with the step, and not retried. With `-- --track` (Weights & Biases),
     every run joins one group named after the sweep folder unless `--wandb-group` is given (docs/flags.md);
  4. <sweep-dir>/sweep.json: the command, the plan, and every run's status, rewritten atomically as runs finish.

Rerunning the same command finishes only what is missing; killing the launcher (SIGTERM, SIGINT or SIGKILL) stops
its runs (on Linux they die with it) and never leaves a half-written result.json. Exit status: 0 when every run is
complete, 1 when some failed, 2 for bad input.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

import envs
import numpy as np
import tyro
from tqdm import tqdm

from runs import (DIVERGED_EXIT, SCRIPTS, TRACKER_PACKAGES, UsageError, exit_on_usage_error, lock_folder,
                  require_tracker, write_json_atomic)

ROOT = Path(__file__).resolve().parent
LOG_TAIL_LINES = 20

# Each preset fills the flags the user did not give. Sizes are transitions; "None" in a size list means all data.
PRESETS: dict[str, dict] = {
    "quickstart": dict(  # AWR vs DDPG+BC on one IQL value function, 4 seeds: minutes on a 2-core CPU
        envs=("pointmaze-medium-navigate-v0",), scripts=("iql_awr", "iql_ddpgbc"), value_sizes=(None,),
        policy_sizes=(None,), seeds=(0, 1, 2, 3), steps=10_000, pack=4, dataset_dir="data/quickstart",
        generate_episodes=100,
        # OURS for the CPU budget: 256x256, batch 256 (the reference's 1024 costs 4x per update), 5 episodes per task
        script_args=("--hidden-dims", "256", "256", "--batch-size", "256", "--eval-episodes", "5", "--log-interval",
                     "1000", "--eval-interval", "10000")),
    "cpu-study": dict(  # the paper's claims at CPU scale, designed from a pilot (docs/results.md): ~75 min on 2 cores
        envs=("pointmaze-medium-navigate-v0",), scripts=("iql_awr", "iql_ddpgbc"),
        value_sizes=(10_000, 30_000, 100_000), policy_sizes=(10_000, 30_000, 100_000),
        awr_alphas=(10.0,), ddpgbc_alphas=(0.001,),  # each the pilot's best on its seeds (100-102), all-data cell
        seeds=(0, 1, 2, 3, 4), steps=20_000, pack=9, test_time_cell=True, online_cell=10_000,
        cell_eval_interval=5_000, dataset_dir="data/cpu-study", generate_episodes=100,
        # OURS for the CPU budget: 128x128 and batch 128 (the pilot's size), 10 episodes per task
        script_args=("--hidden-dims", "128", "128", "--batch-size", "128", "--eval-episodes", "10", "--log-interval",
                     "2500", "--eval-interval", "20000")),
    "matrix": dict(  # the paper's grid: 4 x 4 sizes, 4 seeds, each dataset's alpha grids (the table), 1M steps
        envs=("pointmaze-large-navigate-v0", "cube-single-play-v0"), scripts=tuple(SCRIPTS[:-1]),
        value_sizes=(100_000, 200_000, 500_000, 1_000_000), policy_sizes=(100_000, 200_000, 500_000, 1_000_000),
        table_alphas=True, seeds=(0, 1, 2, 3), steps=1_000_000, dataset_dir="data/matrix", generate_episodes=1_200),
    "coverage": dict(  # narrow vs high-coverage data of equal size (0.9M training transitions each), same methods
        envs=("pointmaze-large-navigate-v0", "pointmaze-large-explore-v0", "cube-single-play-v0",
              "cube-single-noisy-v0"), scripts=("iql_ddpgbc", "sarsa_ddpgbc", "bc"),
        value_sizes=(900_000,), policy_sizes=(100_000, 900_000), ddpgbc_alphas=(0.03, 0.3, 3.0),
        seeds=(0, 1, 2, 3), steps=1_000_000, dataset_dir="data/coverage"),  # official episode counts
    "testtime": dict(  # plain vs OPEX vs TTT: every run evaluates all three on the same episodes
        envs=("pointmaze-large-navigate-v0", "cube-single-play-v0"), scripts=("iql_awr", "iql_ddpgbc", "iql_sfbc"),
        seeds=(0, 1, 2, 3), steps=1_000_000, pack=4, dataset_dir="data/testtime", generate_episodes=1_000,
        script_args=("--test-time", "opex", "ttt")),
    "online": dict(  # offline-to-online: 1M offline steps, then 500k online steps, the MSEs logged every 50k
        envs=("pointmaze-large-navigate-v0", "cube-single-play-v0"), scripts=("iql_ddpgbc", "sarsa_ddpgbc", "iql_awr"),
        seeds=(0, 1, 2, 3), steps=1_000_000, online_steps=500_000, pack=4, dataset_dir="data/online",
        generate_episodes=1_000, script_args=("--eval-interval", "50000")),
}
DEFAULTS = dict(envs=("pointmaze-medium-navigate-v0",), scripts=("iql_ddpgbc",), value_sizes=(None,),
                policy_sizes=(None,), awr_alphas=(), ddpgbc_alphas=(), seeds=(0,), steps=1_000_000, online_steps=0,
                pack=1, dataset_dir=envs.DEFAULT_DATASET_DIR, generate_episodes=None, table_alphas=False,
                test_time_cell=False, online_cell=0, cell_eval_interval=None, script_args=())


@dataclasses.dataclass
class Args:
    """Launch a data-scaling sweep. Flags after a lone `--` are passed to every script (e.g. `-- --hidden-dims 256
    256`). Flags left out come from --preset, else from the defaults shown."""

    preset: Literal["quickstart", "cpu-study", "matrix", "coverage", "testtime", "online"] | None = None
    """A predefined sweep (docs/sweeps.md): quickstart (AWR vs DDPG+BC on pointmaze, 4 seeds, minutes on a CPU),
    cpu-study (the paper's claims at CPU scale: a 3 x 3 matrix, test time, offline-to-online; docs/results.md),
    matrix (paper size), coverage (narrow vs high-coverage data), testtime (plain vs OPEX vs TTT), online
    (offline-to-online)."""
    sweep_dir: str | None = None
    """Folder of the sweep's run folders and sweep.json; default sweeps/<preset or 'custom'>."""
    envs: tuple[str, ...] | None = None
    """Environments / datasets (`python envs.py list`). Default: pointmaze-medium-navigate-v0."""
    scripts: tuple[str, ...] | None = None
    """Scripts from algos/ (e.g. iql_ddpgbc crl_awr bc), or paths of script files (a fork: ../myexp/iql_myloss.py,
    named by its file name). Default: iql_ddpgbc."""
    value_sizes: tuple[int, ...] | None = None
    """Value data sizes in transitions. Default: all training data."""
    policy_sizes: tuple[int, ...] | None = None
    """Policy data sizes in transitions. Default: all training data."""
    awr_alphas: tuple[float, ...] | None = None
    """AWR inverse temperatures to sweep (empty: the script's default)."""
    ddpgbc_alphas: tuple[float, ...] | None = None
    """DDPG+BC behaviour-cloning weights to sweep (empty: the script's default)."""
    seeds: tuple[int, ...] | None = None
    """Seeds of every cell. Default: 0."""
    steps: int | None = None
    """Gradient steps of every run. Default: 1000000."""
    online_steps: int | None = None
    """Offline-to-online: environment steps (one update each) after --steps; scripts with a Q only. Default: 0."""
    dataset_dir: str | None = None
    """Folder of the datasets; a missing official one is downloaded there once, else generated when envs.py can.
    Default: ~/.ogbench/data."""
    generate_episodes: int | None = None
    """Episodes to generate for a missing dataset (given: generated, never downloaded; default: the official
    recipe's count)."""
    download: bool = True
    """Download missing official OGBench datasets before launching (--no-download, or OFFRL_NO_DOWNLOAD=1: never)."""
    pack: int | None = None
    """Runs of one env x script trained together in one vmapped process (one run folder each). Default: 1."""
    test_time_cell: bool = False
    """Runs of the largest cell (largest value and policy sizes) also evaluate OPEX and TTT (`--test-time opex ttt`,
    the same episodes), in processes of their own; bc has no Q and does not. On in the cpu-study preset."""
    online_cell: int | None = None
    """Offline-to-online beside offline-only on the largest cell: each of its runs (scripts with a Q) gets a twin
    that trains --steps minus this many steps offline, then this many online (one update per environment step), in
    a folder ending _o<N>_s<seed>; both have --steps updates, so the cell's own runs are the offline-only comparison
    (analyze.py draws them together). 0: none. Default: 0."""
    cell_eval_interval: int | None = None
    """Evaluation interval of the largest cell's runs and their online twins (a multiple of the scripts'
    --log-interval), so that their curves have points over the online phase; default: the scripts' own."""
    workers: int | None = None
    """Processes at a time (local backend). Default: the number of GPUs, else of CPU cores."""
    retries: int = 1
    """Times a failed process is started again."""
    backend: Literal["local", "ray"] = "local"
    """local: a pool of worker processes; ray: one Ray task per process (`pip install -e .[ray]`)."""
    address: str | None = None
    """Ray cluster address (e.g. 10.0.0.1:6379); default: start a local Ray instance."""
    cpus_per_process: float = 1.0
    """Ray: CPUs reserved per process."""
    gpus_per_process: float = 0.0
    """Ray: GPUs reserved per process (e.g. 1, or 0.25 to share a GPU between four processes)."""
    dry_run: bool = False
    """Print the plan (runs, processes, updates) and exit without running anything."""
    progress: bool = True
    """Show a progress bar over runs."""


@dataclasses.dataclass
class Run:
    env: str
    script: str
    value_data_size: int | None  # None: all data (bc.py: no value function at all)
    policy_data_size: int | None
    alpha: float | None  # None: the script's default, or a script without alpha
    seed: int
    folder: Path
    test_time: bool = False  # also evaluates OPEX and TTT (--test-time-cell)
    online_steps: int = 0  # the last online_steps of --steps are online (--online-cell's twins)
    eval_interval: int | None = None  # overrides the scripts' --eval-interval (--cell-eval-interval)

    @property
    def complete(self) -> bool:
        return (self.folder / "result.json").exists()

    def member(self) -> dict:
        """This run as an entry of a script's --members-file."""
        entry = {"seed": self.seed, "out_dir": str(self.folder), "policy_data_size": self.policy_data_size}
        if self.script != "bc":
            entry["value_data_size"] = self.value_data_size
        if self.alpha is not None:
            entry["alpha"] = self.alpha
        return entry

    def flags(self) -> list[str]:
        """This run as command-line flags of its script."""
        out = ["--seed", str(self.seed), "--out-dir", str(self.folder)]
        if self.policy_data_size is not None:
            out += ["--policy-data-size", str(self.policy_data_size)]
        if self.value_data_size is not None:
            out += ["--value-data-size", str(self.value_data_size)]
        if self.alpha is not None:
            out += ["--alpha", repr(self.alpha)]
        return out


def resolve(args: Args, script_args: list[str]) -> dict:
    """The sweep's settings: given flags, else the preset's, else DEFAULTS; checked (UsageError on bad input)."""
    preset = PRESETS[args.preset] if args.preset else {}
    given = {k: v for k, v in dataclasses.asdict(args).items() if v is not None}
    settings = {k: given.get(k, preset.get(k, default)) for k, default in DEFAULTS.items() if k != "script_args"}
    settings["sweep_dir"] = args.sweep_dir or f"sweeps/{args.preset or 'custom'}"
    settings["script_args"] = with_wandb_group([*preset.get("script_args", ()), *script_args], settings["sweep_dir"])
    for flag in TRACKER_PACKAGES:  # a missing package stops the sweep here, not every run with exit 2
        if switched_on(settings["script_args"], flag):
            require_tracker(flag)
    settings["download"] = args.download
    settings["test_time_cell"] = args.test_time_cell or preset.get("test_time_cell", False)
    for name in settings["envs"]:
        envs.parse_env(name)  # names the closest valid name on a typo
    settings["script_files"] = {}  # name -> file, for every script given as a path (a fork)
    for name in settings["scripts"]:
        if name.endswith(".py"):
            if not Path(name).is_file():
                raise UsageError(f"--scripts: {name} is not a file; give a path to a script, or a name from algos/")
            settings["script_files"][Path(name).stem] = str(Path(name).resolve())
        elif name not in SCRIPTS:
            raise UsageError(f"--scripts: {name} is not a script; choose from {' '.join(SCRIPTS)}, or give a script "
                             "file's path (a fork: path/to/iql_myloss.py)")
    settings["scripts"] = tuple(Path(name).stem if name.endswith(".py") else name for name in settings["scripts"])
    if len(set(settings["scripts"])) != len(settings["scripts"]):
        raise UsageError(f"--scripts names a script twice: {' '.join(settings['scripts'])}")
    for flag in ("value_sizes", "policy_sizes"):
        sizes = [s for s in settings[flag] if s is not None]
        if any(s < 1 for s in sizes) or len(set(settings[flag])) != len(settings[flag]) or not settings[flag]:
            raise UsageError(f"--{flag.replace('_', '-')} must be distinct positive transition counts, got "
                                  f"{' '.join(map(str, settings[flag]))}")
    for flag in ("awr_alphas", "ddpgbc_alphas"):
        if any(not np.isfinite(a) or a < 0 for a in settings[flag]):
            raise UsageError(f"--{flag.replace('_', '-')} must be finite and >= 0")
    if not settings["seeds"] or len(set(settings["seeds"])) != len(settings["seeds"]):
        raise UsageError("--seeds must be a non-empty list of distinct seeds")
    if settings["steps"] < 1 or settings["pack"] < 1 or args.retries < 0:
        raise UsageError("--steps and --pack must be >= 1 and --retries >= 0")
    if settings["online_steps"] < 0:
        raise UsageError(f"--online-steps must be >= 0, got {settings['online_steps']}")
    if not 0 <= settings["online_cell"] < settings["steps"]:
        raise UsageError(f"--online-cell must be in [0, --steps), got {settings['online_cell']}")
    if settings["online_cell"] and settings["online_steps"]:
        raise UsageError("--online-cell and --online-steps exclude each other: --online-steps makes every run online")
    if settings["cell_eval_interval"] is not None and settings["cell_eval_interval"] < 1:
        raise UsageError(f"--cell-eval-interval must be >= 1, got {settings['cell_eval_interval']}")
    if settings["online_steps"] and "bc" in settings["scripts"]:
        raise UsageError("--online-steps: bc has no value function to fine-tune online; drop bc from --scripts")
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    if args.generate_episodes is not None and args.generate_episodes < 1:
        raise UsageError(f"--generate-episodes must be >= 1, got {args.generate_episodes}")
    return settings


def switched_on(script_args: list[str], flag: str) -> bool:
    """Whether the scripts' flags end with `--<flag>` turned on (the last of --flag / --no-flag wins)."""
    switches = [arg for arg in script_args if arg in (f"--{flag}", f"--no-{flag}")]
    return switches[-1:] == [f"--{flag}"]


def with_wandb_group(script_args: list[str], sweep_dir: str) -> list[str]:
    """With `-- --track`, every run of the sweep joins one W&B group named after the sweep folder, unless the flags
    name one (--wandb-group); each run's tags name its cell (runs.Trackers)."""
    if not switched_on(script_args, "track") or any(arg.split("=")[0] == "--wandb-group" for arg in script_args):
        return script_args
    return [*script_args, "--wandb-group", Path(sweep_dir).resolve().name]


def table_alphas(env: str, script: str) -> tuple:
    """The alpha grid of the dataset's row of envs.HYPERPARAMETERS for the script (CRL's DDPG+BC grid is centred on
    CRL's tuned alpha, IQL's and SARSA's on GCIQL's); () for a script without one."""
    return (envs.table_entry(envs.hyperparameters(env), "alphas", script) or ((), ""))[0]


def grid_lines(env: str, scripts: list[str]) -> list[str]:
    """'awr 0.3 1 3 10', 'iql/sarsa_ddpgbc 0.03 0.3 3', 'crl_ddpgbc ...': each extractor's table grid, named by the
    value learners that share it (by the extractor alone where all of the sweep's scripts share one)."""
    lines = []
    for extractor in ("awr", "ddpgbc"):
        by_grid: dict[tuple, list[str]] = {}
        for script in scripts:
            if script.split("_")[-1] == extractor:
                by_grid.setdefault(table_alphas(env, script), []).append(script.split("_")[0])
        for grid, learners in by_grid.items():
            name = extractor if len(by_grid) == 1 else f"{'/'.join(learners)}_{extractor}"
            lines.append(f"{name} {' '.join(f'{a:g}' for a in grid)}")
    return lines


def plan(settings: dict) -> list[Run]:
    """Every run of the grid, in a stable order (env, script, value size, policy size, alpha, seed)."""
    runs = []
    size_name = lambda s: "all" if s is None else str(s)  # noqa: E731
    largest = lambda sizes: max(sizes, key=lambda s: float("inf") if s is None else s)  # noqa: E731
    test_time_cell = (largest(settings["value_sizes"]), largest(settings["policy_sizes"]))
    for env in settings["envs"]:
        for script in settings["scripts"]:
            alphas = settings.get(f"{script.split('_')[-1]}_alphas", ()) or (  # a preset may take the table's grid
                table_alphas(env, script) if settings["table_alphas"] else ()) or (None,)
            value_sizes = (None,) if script == "bc" else settings["value_sizes"]
            for value in value_sizes:
                for policy in settings["policy_sizes"]:
                    for alpha in alphas:
                        for seed in settings["seeds"]:
                            name = "" if script == "bc" else f"v{size_name(value)}_"
                            name += f"p{size_name(policy)}" + ("" if alpha is None else f"_a{alpha:g}") + f"_s{seed}"
                            folder = Path(settings["sweep_dir"]) / env / script / name
                            in_cell = script != "bc" and (value, policy) == test_time_cell
                            cell_eval = settings["cell_eval_interval"] if in_cell else None
                            runs.append(Run(env, script, value, policy, alpha, seed, folder,
                                            settings["test_time_cell"] and in_cell, eval_interval=cell_eval))
                            if in_cell and settings["online_cell"]:  # its offline-to-online twin
                                twin = folder.with_name(f"{folder.name.rsplit('_s', 1)[0]}_o{settings['online_cell']}"
                                                        f"_s{seed}")
                                runs.append(Run(env, script, value, policy, alpha, seed, twin,
                                                online_steps=settings["online_cell"], eval_interval=cell_eval))
    return runs


def prepare_datasets(settings: dict, dry_run: bool) -> list[str]:
    """Make every missing dataset once, before any run starts (unless dry_run): an official one is downloaded (unless
    --generate-episodes asks for a size of its own, or downloads are off), else generated where envs.py can (also
    when a download fails: said on stderr); then check every size fits. Returns a line per dataset."""
    lines = []
    for name in settings["envs"]:
        spec = envs.parse_env(name)
        path = envs.dataset_path(spec, settings["dataset_dir"])
        if not path.exists():
            fetch = (spec.can_download and settings["generate_episodes"] is None
                     and envs.downloads_allowed(settings["download"]))
            if not fetch and not spec.can_generate:
                envs.load_dataset(spec, settings["dataset_dir"], download=False)  # raises what to do, in one line
            if dry_run:
                lines.append(f"{name}: {path} missing; would " + ("download the official files" if fetch else
                             f"generate {settings['generate_episodes'] or 'official'} episodes"))
                continue
            try:
                if fetch:
                    envs.download_dataset(spec, settings["dataset_dir"])
            except UsageError as error:
                if not spec.can_generate:
                    raise
                print(f"{name}: {error}; generating it offline instead", file=sys.stderr)
            if not path.exists():
                envs.generate(spec, settings["dataset_dir"], num_episodes=settings["generate_episodes"])
        train, _, _ = envs.load_splits(spec, settings["dataset_dir"])
        available = len(train["actions"])
        for flag in ("value_sizes", "policy_sizes"):
            too_big = [s for s in settings[flag] if s is not None and s > available]
            if too_big:
                raise UsageError(f"--{flag.replace('_', '-')} {too_big[0]} exceeds the {available} training "
                                      f"transitions of {name} ({path}); use smaller sizes or more "
                                      "--generate-episodes in a fresh --dataset-dir")
        lines.append(f"{name}: {path} ({available} training transitions)")
    return lines


@dataclasses.dataclass
class Process:
    """One script invocation training one or more runs (its members)."""

    runs: list[Run]
    command: list[str]
    log: Path
    attempts: int = 0


def processes(pending: list[Run], settings: dict) -> list[Process]:
    """Group pending runs into script invocations: up to --pack runs of one env x script (and test-time, online and
    evaluation setting) per process."""
    out, sweep = [], Path(settings["sweep_dir"])
    groups: dict[tuple, list[Run]] = {}
    for run in pending:
        groups.setdefault((run.env, run.script, run.test_time, run.online_steps, run.eval_interval), []).append(run)
    for (env, script, test_time, online, eval_interval), runs in groups.items():
        for start in range(0, len(runs), settings["pack"]):
            members = runs[start:start + settings["pack"]]
            file = settings["script_files"].get(script, str(ROOT / "algos" / f"{script}.py"))
            base = [sys.executable, file, "--env", env, "--dataset-dir",
                    settings["dataset_dir"], "--steps", str(settings["steps"] - online), "--no-progress", "--resume"]
            if settings["online_steps"] or online:
                base += ["--online-steps", str(settings["online_steps"] or online)]
            if test_time:
                base += ["--test-time", "opex", "ttt"]
            # after the sweep's script flags, which would otherwise override it
            overrides = [] if eval_interval is None else ["--eval-interval", str(eval_interval)]
            if len(members) == 1:
                command = base + members[0].flags()
                log = members[0].folder / "output.log"
            else:
                tag = (f"{env}-{script}{'-testtime' if test_time else ''}{f'-online{online}' if online else ''}"
                       f"-{start // settings['pack']:04d}")
                members_file = sweep / "packs" / f"{tag}.json"
                command = base + ["--members-file", str(members_file)]
                log = sweep / "packs" / f"{tag}.log"
            out.append(Process(members, command + list(settings["script_args"]) + overrides, log))
    return out


def write_members_files(procs: list[Process]) -> None:
    for proc in procs:
        if "--members-file" in proc.command:
            path = Path(proc.command[proc.command.index("--members-file") + 1])
            write_json_atomic(path, [run.member() for run in proc.runs])


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _die_with_parent() -> None:
    """In the child, before exec: on Linux, be killed when the launcher dies, even by SIGKILL."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def start(proc: Process, env: dict | None = None) -> subprocess.Popen:
    proc.log.parent.mkdir(parents=True, exist_ok=True)
    with open(proc.log, "w") as log:
        log.write("$ " + shlex.join(proc.command) + "\n")
        log.flush()
        return subprocess.Popen(proc.command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                preexec_fn=_die_with_parent)


def run_command(command: list[str], log: str) -> int:
    """A process as a Ray task: run the script on the worker's machine, its output in `log`; the exit status."""
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        out.write("$ " + shlex.join(command) + "\n")
        out.flush()
        return subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT).returncode


class Sweep:
    """The plan, every run's status, and sweep.json (rewritten atomically after every change)."""

    def __init__(self, settings: dict, runs: list[Run], command: list[str]):
        self.settings, self.runs, self.path = settings, runs, Path(settings["sweep_dir"]) / "sweep.json"
        self.status = {run.folder: ("skipped" if run.complete else "pending") for run in runs}
        self.failures: dict[Path, dict] = {}
        self.started = time.time()
        self.header = {"command": command, "settings": settings, "started": time.strftime("%Y-%m-%d %H:%M:%S")}

    def mark(self, runs: list[Run], status: str, **failure) -> None:
        for run in runs:
            self.status[run.folder] = status
            if failure:
                self.failures[run.folder] = failure
            elif status == "done":
                self.failures.pop(run.folder, None)
        self.save()

    def save(self, finished: bool = False) -> None:
        entries = []
        for run in self.runs:
            entry = {k: v for k, v in dataclasses.asdict(run).items() if k != "folder"}
            entry.update(folder=str(run.folder), status=self.status[run.folder], **self.failures.get(run.folder, {}))
            entries.append(entry)
        counts = {s: sum(v == s for v in self.status.values())
                  for s in ("done", "skipped", "failed", "diverged", "pending")}
        write_json_atomic(self.path, {**self.header, "counts": counts, "finished": finished,
                                           "wall_seconds": time.time() - self.started, "runs": entries})


def finish_process(sweep: Sweep, proc: Process, returncode: int, queue: list[Process], retries: int) -> int:
    """Record a finished process: runs with result.json are done; the rest are retried or marked failed."""
    done = [run for run in proc.runs if run.complete]
    sweep.mark(done, "done")
    missing = [run for run in proc.runs if not run.complete]
    if not missing:
        return len(done)
    if returncode == DIVERGED_EXIT:  # deterministic: a retry would diverge at the same step
        for run in missing:
            failure = json.loads((run.folder / "failure.json").read_text()) if (run.folder / "failure.json"
                                                                                ).exists() else {}
            sweep.mark([run], "diverged", exit_status=returncode, log=str(proc.log), stderr_tail=log_tail(proc.log),
                       attempts=proc.attempts, diverged_at_step=failure.get("step"),
                       non_finite=failure.get("non_finite"))
        return len(done) + len(missing)
    if proc.attempts <= retries:
        queue.append(dataclasses.replace(proc, runs=missing))
        sweep.mark(missing, "pending", exit_status=returncode, log=str(proc.log), stderr_tail=log_tail(proc.log),
                   attempts=proc.attempts)
        return len(done)
    sweep.mark(missing, "failed", exit_status=returncode, log=str(proc.log), stderr_tail=log_tail(proc.log),
               attempts=proc.attempts)
    return len(done) + len(missing)


def default_workers() -> int:
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES")
    if gpus is None:
        try:
            listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
            gpus = ",".join(str(i) for i, line in enumerate(listed.splitlines()) if line.startswith("GPU"))
        except (OSError, subprocess.SubprocessError):
            gpus = ""
    count = len([g for g in gpus.split(",") if g.strip()])
    return count or os.cpu_count() or 1


def run_local(sweep: Sweep, queue: list[Process], workers: int, retries: int, bar) -> None:
    """A pool of `workers` processes, polled from this one thread (no threads: children die with the launcher)."""
    gpus = [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    running: dict[int, tuple[Process, subprocess.Popen]] = {}  # worker slot -> process
    try:
        while queue or running:
            for slot in range(workers):
                if slot not in running and queue:
                    proc = queue.pop(0)
                    proc.attempts += 1
                    env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpus[slot % len(gpus)]} if gpus else None
                    running[slot] = (proc, start(proc, env))
                    sweep.mark(proc.runs, "running")
            time.sleep(0.2)
            for slot, (proc, popen) in list(running.items()):
                if popen.poll() is not None:
                    del running[slot]
                    bar.update(finish_process(sweep, proc, popen.returncode, queue, retries))
    finally:  # SIGTERM / Ctrl-C: stop our runs; their folders stay incomplete and rerun next time
        for _, popen in running.values():
            popen.terminate()
        for proc, popen in running.values():
            popen.wait()
            sweep.mark([r for r in proc.runs if not r.complete], "pending")


def run_ray(sweep: Sweep, queue: list[Process], args: Args, retries: int, bar) -> None:
    """One Ray task per process; results land in the same folders (on a cluster: put --sweep-dir on shared disk)."""
    try:
        import ray
    except ImportError as error:
        raise UsageError("--backend ray needs Ray: pip install -e '.[ray]'") from error
    local = {} if args.address else {"include_dashboard": False}  # only a new instance takes dashboard options
    ray.init(address=args.address, log_to_driver=False, **local)
    task = ray.remote(run_command).options(num_cpus=args.cpus_per_process, num_gpus=args.gpus_per_process,
                                           max_retries=0)
    pending: dict = {}
    try:
        while queue or pending:
            while queue:
                proc = queue.pop(0)
                proc.attempts += 1
                pending[task.remote(proc.command, str(proc.log))] = proc
                sweep.mark(proc.runs, "running")
            ready, _ = ray.wait(list(pending), num_returns=1)
            proc = pending.pop(ready[0])
            try:
                returncode = ray.get(ready[0])
            except ray.exceptions.RayError as error:  # the node died, or the task was cancelled
                returncode = -1
                proc.log.parent.mkdir(parents=True, exist_ok=True)
                with open(proc.log, "a") as log:
                    log.write(f"Ray task failed: {error}\n")
            bar.update(finish_process(sweep, proc, returncode, queue, retries))
    finally:
        for ref, proc in pending.items():
            ray.cancel(ref, force=True)
            sweep.mark([r for r in proc.runs if not r.complete], "pending")
        ray.shutdown()


def describe(settings: dict, runs: list[Run], procs: list[Process], dataset_lines: list[str]) -> str:
    pending = [run for run in runs if not run.complete]
    lines = [f"sweep {settings['sweep_dir']}: {len(runs)} runs, {len(runs) - len(pending)} complete, "
             f"{len(pending)} to run in {len(procs)} process{'' if len(procs) == 1 else 'es'} "
             f"(up to {settings['pack']} runs each), "
             f"{len(pending) * (settings['steps'] + settings['online_steps']):,} member-updates"]
    lines += [f"  dataset {line}" for line in dataset_lines]
    for env in settings["envs"]:  # what the scripts take from the table for the flags the sweep leaves unset
        row = envs.hyperparameters(env)
        grids = grid_lines(env, [s for s in settings["scripts"] if settings["table_alphas"]
                                 and s.split("_")[-1] in ("awr", "ddpgbc")
                                 and not settings[f"{s.split('_')[-1]}_alphas"]])
        lines.append(f"  {env} from envs.HYPERPARAMETERS: discount {row['discount'][0]:g} ({row['discount'][1]})"
                     + (f"; alpha grids {', '.join(grids)} ({row['alphas/ddpgbc'][1]}; AWR: the paper's)" if grids
                        else ""))
    counts: dict[tuple[str, str], int] = {}
    for run in pending:
        counts[(run.env, run.script)] = counts.get((run.env, run.script), 0) + 1
    lines += [f"  {env} {script}: {count} runs to go" for (env, script), count in counts.items()]
    tested = [run for run in pending if run.test_time]
    if tested:
        lines.append(f"  test time: {len(tested)} runs of the largest cell also evaluate OPEX and TTT "
                     "(--test-time opex ttt), in processes of their own")
    twins = [run for run in pending if run.online_steps]
    if twins:
        lines.append(f"  offline-to-online: {len(twins)} runs of the largest cell train "
                     f"{settings['steps'] - settings['online_cell']:,} steps offline, then {settings['online_cell']:,} "
                     "online; the cell's own runs are their offline-only comparison")
    if settings["cell_eval_interval"]:
        lines.append(f"  the largest cell's runs evaluate every {settings['cell_eval_interval']:,} steps")
    if procs:
        lines.append("  first process: " + shlex.join(procs[0].command))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    script_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    args = tyro.cli(Args, args=argv, description=__doc__)
    settings = resolve(args, script_args)
    # one launcher per sweep folder, before it reads or writes anything there (the runs lock their own folders);
    # held until this process ends, however it ends
    lock = None if args.dry_run else lock_folder(Path(settings["sweep_dir"]), "--sweep-dir")  # noqa: F841
    runs = plan(settings)
    dataset_lines = prepare_datasets(settings, args.dry_run)
    pending = [run for run in runs if not run.complete]
    queue = processes(pending, settings)
    print(describe(settings, runs, queue, dataset_lines))
    if args.dry_run:
        return 0
    sweep = Sweep(settings, runs, [sys.executable, *sys.argv])
    sweep.save()
    write_members_files(queue)
    workers = args.workers or default_workers()

    def on_sigterm(signum, frame):  # turn SIGTERM into the same clean stop as Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    bar = tqdm(total=len(pending), desc="runs", unit="run", disable=not args.progress)
    try:
        if args.backend == "ray":
            run_ray(sweep, queue, args, args.retries, bar)
        else:
            run_local(sweep, queue, workers, args.retries, bar)
    except KeyboardInterrupt:
        sweep.save()
        print(f"stopped; rerun the same command to finish the {sum(not r.complete for r in runs)} incomplete runs",
              file=sys.stderr)
        return 130
    bar.close()
    sweep.save(finished=True)
    failed = [run for run in runs if sweep.status[run.folder] in ("failed", "diverged")]
    done = sum(status == "done" for status in sweep.status.values())
    skipped = sum(status == "skipped" for status in sweep.status.values())
    diverged = sum(status == "diverged" for status in sweep.status.values())
    print(f"done {done}, skipped (already complete) {skipped}, failed {len(failed) - diverged}, diverged {diverged}, "
          f"wall {time.time() - sweep.started:.0f} s -> {sweep.path}")
    for run in failed:
        failure = sweep.failures[run.folder]
        last = failure["stderr_tail"].splitlines()[-1] if failure["stderr_tail"] else ""
        print(f"  {sweep.status[run.folder].upper()} {run.folder} (exit {failure['exit_status']}, "
              f"{failure['attempts']} attempts; log "
              f"{failure['log']}): {last}")
    return 1 if failed else 0


if __name__ == "__main__":
    exit_on_usage_error(lambda: sys.exit(main()))
