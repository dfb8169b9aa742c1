"""Training throughput of JAX-CORL's single-file IQL (github.com/nissymori/JAX-CORL, algos/iql.py), measured on this
machine in this session, beside ours.

    git clone https://github.com/nissymori/JAX-CORL /tmp/jaxcorl     # tested at d747dd8ad4fc
    python3 -m venv /tmp/jaxcorl-venv && /tmp/jaxcorl-venv/bin/pip install \\
        "jax==$(.venv/bin/python -c 'import jax; print(jax.__version__)')" flax optax distrax pydantic omegaconf tqdm
    python benchmarks/jaxcorl.py --jaxcorl-dir /tmp/jaxcorl --python /tmp/jaxcorl-venv/bin/python

Ours with the same shapes (1M rows, obs 29, action 8, 2 x 256, batch 256, one member, 1000 updates per jitted chunk):
    python benchmarks/throughput.py --script iql_awr --no-goal-conditioned --obs-dim 29 --action-dim 8 \\
        --dataset-size 1000000 --hidden-dims 256 256 --batch-size 256 --members 1 --chunk 1000

iql.py is run, never copied nor edited: a subprocess of --python runs a small launcher (`python -c`, in
<jaxcorl-dir>/algos) that first puts stand-ins in sys.modules for what cannot be installed here, then runs the file:

  d4rl    qlearning_dataset(env) returns synthetic arrays shaped like antmaze (--dataset-size rows, --obs-dim,
          --action-dim; episodes of --episode-length whose next_observations chain, sparse 0/1 rewards, no terminals),
          so iql.py's own get_dataset (clipping, dones_float, reward normalisation, shuffle) runs on them
  gym     make(name) returns an environment whose episode ends at its first step (iql.py's final evaluation runs one
          step; the in-loop evaluation is never reached: eval_interval is set past the last step)
  wandb   init, log and finish do nothing

Its hyperparameters are its own defaults (IQLConfig), passed on its command line (OmegaConf key=value) only where this
benchmark needs them: batch_size, hidden_dims, data_size, n_jitted_updates, max_steps (the number of updates run, which
also sets the length of its actor's cosine learning-rate schedule), eval_interval and env_name (a name holding
"antmaze", so its antmaze reward shift applies); --extra adds more. Its network, as shipped: ReLU MLPs of
--hidden-dims, a twin-Q critic (flax vmap ensemble, no LayerNorm) and its target, a value network with LayerNorm after
each hidden activation (layer_norm=True), a Gaussian actor (state-independent log-std, distrax, no LayerNorm); one
batch per update, shared by the value, actor and critic updates, drawn on the device from the whole dataset.

Modes (--modes):

  shipped  its `__main__` body as shipped (runpy, run_name="__main__"): its Python loop over its jitted update_n_times,
           n_jitted_updates (default 8) updates per call, with a jax.random.split on the host each call and its tqdm
           bar. The launcher wraps tqdm.tqdm so that, at the boundaries of the timed windows, it waits for the loop's
           train_state (jax.block_until_ready) and reads the clock: after --warmup-calls calls (the first compiles),
           --repeats windows of --calls calls each
  scan     its IQL.update_n_times with n_jitted_updates=1, run --chunk times in one jitted lax.scan (the way our scripts
           run), timed over --repeats windows of --chunks-per-repeat chunks after one compiling chunk and one more

Prints updates/s (the median window, and each) and writes JSON (--out): JAX-CORL's commit and iql.py's sha256 (and
whether git sees it modified), the settings, updates/s, compile seconds, and the versions of jax, jaxlib, flax, optax,
distrax on the reference side and jax on ours. The scan mode also counts the matmul FLOPs of one reference update in
the reference process (benchmarks/matmul_flops.py, the counter throughput.py reports for ours) and its GFLOP/s.
iql.py sets XLA_FLAGS on import (a GPU flag); the value in effect is recorded. JAX_PLATFORMS is set to --platform
(cpu by default) for the reference process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runs.py lives at the repository root

import jax  # noqa: E402
import runs  # noqa: E402
import tyro  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

# Run by --python in <jaxcorl-dir>/algos as `python -c LAUNCHER <settings json>`. Stand-ins for d4rl, gym and wandb
# go into sys.modules before iql.py is run; iql.py itself is executed unchanged from its file.
LAUNCHER = r'''
import json, os, runpy, statistics, sys, time, types
import numpy as np
S = json.loads(sys.argv[1])

def synthetic_dataset(env=None):
    rng = np.random.default_rng(S["data_seed"])
    n, length = S["dataset_size"], S["episode_length"]
    obs = rng.standard_normal((n, S["obs_dim"]), dtype=np.float32)
    next_obs = np.empty_like(obs)
    next_obs[:-1] = obs[1:]
    ends = np.arange(length - 1, n, length)  # last step of each episode: its next state starts no other row
    next_obs[ends] = rng.standard_normal((len(ends), S["obs_dim"]), dtype=np.float32)
    next_obs[-1] = rng.standard_normal(S["obs_dim"], dtype=np.float32)
    return {"observations": obs, "next_observations": next_obs,
            "actions": rng.uniform(-1, 1, (n, S["action_dim"])).astype(np.float32),
            "rewards": (rng.random(n) < 0.01).astype(np.float32),  # sparse, antmaze-like
            "terminals": np.zeros(n, np.float32)}

class StandInEnv:
    """Episodes end at their first step: iql.py's evaluation runs, at trivial cost."""
    def reset(self):
        return np.zeros(S["obs_dim"], np.float32)
    def step(self, action):
        return np.zeros(S["obs_dim"], np.float32), 0.0, True, {}
    def get_normalized_score(self, score):
        return 0.0

gym = types.ModuleType("gym"); gym.Env = StandInEnv; gym.make = lambda name, **kwargs: StandInEnv()
d4rl = types.ModuleType("d4rl"); d4rl.qlearning_dataset = synthetic_dataset
wandb = types.ModuleType("wandb")
wandb.init = lambda *args, **kwargs: None; wandb.log = lambda *args, **kwargs: None
wandb.finish = lambda *args, **kwargs: None
sys.modules.update(gym=gym, d4rl=d4rl, wandb=wandb)

import jax, tqdm
sys.argv = ["iql.py", *S["cli"]]  # iql.py reads its config from the command line (OmegaConf.from_cli)
result = {"mode": S["mode"]}

def versions():  # None for a package this Python lacks (a stand-in iql.py needs only jax)
    from importlib.metadata import PackageNotFoundError, version
    def installed(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None
    return {name: installed(name) for name in ("jax", "jaxlib", "flax", "optax", "distrax", "numpy")}

if S["mode"] == "shipped":
    real_tqdm = tqdm.tqdm
    warmup, calls, repeats = S["warmup_calls"], S["calls"], S["repeats"]
    boundaries = [1, 2] + [warmup + 1 + r * calls for r in range(repeats + 1)]
    marks = {}

    def timed(iterable, *args, **kwargs):
        # The loop's own iterator; before call i (and after the last), wait for its train_state, then read the clock.
        def mark(i):
            jax.block_until_ready(sys._getframe(2).f_globals["train_state"])  # frames: mark, timed, iql.py
            marks[i] = time.perf_counter()
        last = 0
        for i in real_tqdm(iterable, *args, **kwargs):
            if i in boundaries:
                mark(i)
            last = i
            yield i
        if last + 1 in boundaries:
            mark(last + 1)
    tqdm.tqdm = timed
    start = time.perf_counter()
    runpy.run_path("iql.py", run_name="__main__")
    n = S["n_jitted_updates"]
    windows = [calls * n / (marks[boundaries[2 + r + 1]] - marks[boundaries[2 + r]]) for r in range(repeats)]
    result.update(updates_per_s=statistics.median(windows), windows=windows,
                  first_call_s=marks[2] - marks[1], setup_s=marks[1] - start)
elif S["mode"] == "scan":
    t0 = time.perf_counter()
    g = runpy.run_path("iql.py", run_name="jaxcorl_iql")  # its definitions and config; its __main__ body not run
    config, IQL = g["config"], g["IQL"]
    assert config.n_jitted_updates == 1
    key = jax.random.PRNGKey(config.seed)
    dataset, obs_mean, obs_std = g["get_dataset"](gym.make(config.env_name), config)
    key, subkey = jax.random.split(key)
    example = jax.tree_util.tree_map(lambda x: x[0], dataset)
    train_state = g["create_iql_train_state"](subkey, example.observations, example.actions, config)

    @jax.jit
    def chunk(train_state, dataset, key):
        def body(carry, _):
            train_state, key = carry
            key, subkey = jax.random.split(key)
            train_state, info = IQL.update_n_times(train_state, dataset, subkey, config)
            return (train_state, key), info
        (train_state, key), infos = jax.lax.scan(body, (train_state, key), None, length=S["chunk"])
        return train_state, key, jax.tree_util.tree_map(lambda x: x[-1], infos)

    setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    train_state, key, info = jax.block_until_ready(chunk(train_state, dataset, key))
    first = time.perf_counter() - t0
    train_state, key, info = jax.block_until_ready(chunk(train_state, dataset, key))  # one more, untimed
    windows = []
    for _ in range(S["repeats"]):
        t0 = time.perf_counter()
        for _ in range(S["chunks_per_repeat"]):
            train_state, key, info = chunk(train_state, dataset, key)
        jax.block_until_ready(train_state)
        windows.append(S["chunks_per_repeat"] * S["chunk"] / (time.perf_counter() - t0))
    # Matmul FLOPs per update, counted after the timing by our counter (benchmarks/matmul_flops.py: jax and numpy
    # only), the count throughput.py reports for ours: the work of one update, to compare rates per FLOP.
    sys.path.insert(0, S["benchmarks_dir"])
    from matmul_flops import count_matmul_flops
    flops = count_matmul_flops(jax.make_jaxpr(chunk)(train_state, dataset, key).jaxpr) / S["chunk"]
    result.update(updates_per_s=statistics.median(windows), windows=windows, first_call_s=first, setup_s=setup,
                  last_losses={k: float(v) for k, v in info.items()}, matmul_flops_per_update=flops,
                  gflops_per_s=statistics.median(windows) * flops / 1e9)
result.update(versions=versions(), xla_flags=os.environ.get("XLA_FLAGS"), devices=[str(d) for d in jax.devices()],
              python=sys.version.split()[0])
with open(S["result"], "w") as f:
    json.dump(result, f)
'''


@dataclasses.dataclass
class Args:
    jaxcorl_dir: str
    """A checkout of JAX-CORL (the folder holding algos/iql.py); never copied nor edited, only run."""
    python: str = sys.executable
    """The Python that runs iql.py: jax (the version ours has), flax, optax, distrax, pydantic, omegaconf, tqdm."""
    modes: tuple[str, ...] = ("shipped", "scan")
    """shipped: its __main__ loop of jitted n_jitted_updates-update calls; scan: its update in a jitted lax.scan."""
    dataset_size: int = 1_000_000
    """Rows of the synthetic dataset (iql.py's data_size too)."""
    obs_dim: int = 29
    """Observation size (antmaze's 29)."""
    action_dim: int = 8
    """Action size (antmaze's 8)."""
    episode_length: int = 1000
    """Steps per synthetic episode (next_observations chain within one)."""
    batch_size: int = 256
    """iql.py's batch_size (its default 256)."""
    hidden_dims: tuple[int, int] = (256, 256)
    """iql.py's hidden_dims (its default 256 256; it takes two)."""
    n_jitted_updates: int = 8
    """shipped: updates per jitted call (iql.py's default 8)."""
    warmup_calls: int = 20
    """shipped: calls before the first timed window (the first compiles)."""
    calls: int = 250
    """shipped: calls per timed window (x n_jitted_updates updates)."""
    chunk: int = 1000
    """scan: updates per jitted lax.scan chunk."""
    chunks_per_repeat: int = 2
    """scan: chunks per timed window."""
    repeats: int = 3
    """Timed windows per mode; updates/s is the median window."""
    env_name: str = "antmaze-large-diverse-v2"
    """iql.py's env_name: only a name here (gym and d4rl are stand-ins); "antmaze" turns on its reward shift."""
    extra: tuple[str, ...] = ()
    """More iql.py settings, as its command line takes them (key=value)."""
    platform: str = "cpu"
    """JAX_PLATFORMS for the reference process ("" leaves it as it is)."""
    jaxcorl_commit: str | None = None
    """JAX-CORL's commit, where --jaxcorl-dir is no git checkout (git rev-parse is asked otherwise)."""
    data_seed: int = 0
    """Seed of the synthetic dataset."""
    out: str = "benchmarks/results/jaxcorl-iql-cpu.json"
    """JSON written here (relative to the repository root)."""


def git(directory: Path, *command: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(directory), *command], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return done.stdout.strip()


def settings_for(args: Args, mode: str, result: Path) -> dict:
    n = args.n_jitted_updates if mode == "shipped" else 1
    calls = args.warmup_calls + args.repeats * args.calls if mode == "shipped" else (2 + args.repeats
                                                                                    * args.chunks_per_repeat)
    max_steps = calls * n if mode == "shipped" else calls * args.chunk  # updates run: the actor's schedule length
    cli = [f"env_name={args.env_name}", f"batch_size={args.batch_size}",
           f"hidden_dims=[{','.join(map(str, args.hidden_dims))}]", f"data_size={args.dataset_size}",
           f"n_jitted_updates={n}", f"max_steps={max_steps}", f"eval_interval={10 * max_steps + n}", *args.extra]
    return {"mode": mode, "cli": cli, "result": str(result), "dataset_size": args.dataset_size,
            "obs_dim": args.obs_dim, "action_dim": args.action_dim, "episode_length": args.episode_length,
            "data_seed": args.data_seed, "n_jitted_updates": n, "warmup_calls": args.warmup_calls,
            "calls": args.calls, "repeats": args.repeats, "chunk": args.chunk,
            "chunks_per_repeat": args.chunks_per_repeat, "benchmarks_dir": str(ROOT / "benchmarks")}


def main(args: Args) -> None:
    directory = Path(args.jaxcorl_dir).expanduser().resolve()
    iql = directory / "algos" / "iql.py"
    if not iql.is_file():
        sys.exit(f"{iql} not found: --jaxcorl-dir must be a checkout of JAX-CORL")
    for mode in args.modes:
        if mode not in ("shipped", "scan"):
            sys.exit(f"unknown mode {mode!r}: shipped or scan")
    if args.warmup_calls < 1 or args.calls < 1 or args.repeats < 1 or args.chunks_per_repeat < 1:
        sys.exit("--warmup-calls, --calls, --repeats and --chunks-per-repeat must be at least 1")
    commit = args.jaxcorl_commit or git(directory, "rev-parse", "HEAD") or "unknown"
    status = git(directory, "status", "--porcelain", "--", "algos/iql.py")
    env = dict(os.environ)
    if args.platform:
        env["JAX_PLATFORMS"] = args.platform
    modes = {}
    with tempfile.TemporaryDirectory(prefix="jaxcorl-") as tmp:
        for mode in args.modes:
            result = Path(tmp) / f"{mode}.json"
            settings = settings_for(args, mode, result)
            print(f"[{mode}] {args.python} -c LAUNCHER (in {directory / 'algos'}): iql.py {' '.join(settings['cli'])}",
                  flush=True)
            code = subprocess.run([args.python, "-c", LAUNCHER, json.dumps(settings)], cwd=directory / "algos",
                                  env=env).returncode
            if code != 0 or not result.exists():
                sys.exit(f"[{mode}] the reference process failed (exit {code})")
            modes[mode] = {**json.loads(result.read_text()), "iql_cli": settings["cli"]}
    reference = next(iter(modes.values()))
    if reference["versions"]["jax"] != jax.__version__:
        print(f"warning: the reference runs jax {reference['versions']['jax']}, ours is {jax.__version__}")
    print(f"\nJAX-CORL {commit} algos/iql.py, {args.dataset_size} rows, obs {args.obs_dim}, action {args.action_dim}, "
          f"batch {args.batch_size}, hidden {args.hidden_dims}, jax {reference['versions']['jax']}, "
          f"{reference['devices']}")
    for mode, m in modes.items():
        how = (f"{args.n_jitted_updates} updates per jitted call" if mode == "shipped"
               else f"{args.chunk} updates per jitted lax.scan")
        print(f"  {mode:8s} {m['updates_per_s']:9.1f} updates/s  ({how}; windows "
              f"{', '.join(f'{w:.1f}' for w in m['windows'])}; first call {m['first_call_s']:.1f} s, "
              f"setup {m['setup_s']:.1f} s)")
    flops = modes["scan"]["matmul_flops_per_update"] if "scan" in modes else None  # the scan mode counts them
    if flops is not None:
        rates = ", ".join(f"{mode} {m['updates_per_s'] * flops / 1e9:.1f}" for mode, m in modes.items())
        print(f"  {flops / 1e6:.1f} MFLOP (matmul, fwd + bwd) per update; GFLOP/s: {rates}")
    out = {
        "jaxcorl": {"repository": "nissymori/JAX-CORL", "commit": commit, "file": "algos/iql.py",
                    "sha256": hashlib.sha256(iql.read_bytes()).hexdigest(),
                    "modified": None if status is None else bool(status)},
        "settings": {k: v for k, v in dataclasses.asdict(args).items() if k not in ("out",)},
        "updates_per_s": {mode: m["updates_per_s"] for mode, m in modes.items()},
        "matmul_flops_per_update": flops,
        "modes": modes,
        "jax_version": reference["versions"]["jax"],
        "ours_jax_version": jax.__version__,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "ours": "python benchmarks/throughput.py --script iql_awr --no-goal-conditioned --obs-dim 29 --action-dim 8 "
                "--dataset-size 1000000 --hidden-dims 256 256 --batch-size 256 --members 1 --chunk 1000",
    }
    path = ROOT / args.out
    runs.write_json_atomic(path, out)
    print(f"-> {path}")


if __name__ == "__main__":
    main(tyro.cli(Args))
