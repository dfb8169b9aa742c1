"""Training throughput of one algos/ script, measured against this device's matmul peak and the per-step style.

    python benchmarks/throughput.py --script iql_ddpgbc --hidden-dims 256 256 --members 1 4 16 64

Prints a table and writes JSON (--out). Every number is measured in this one run on this device:

  matmul peak        GFLOP/s of a jitted float32 N x N @ N x N product (N = --matmul-size): what the device can do
  FLOPs per update   matmul FLOPs (forward and backward) of one member's update, counted from the jaxpr of the
                     script's update: each dot_general contributes 2 x (output elements) x (contracted length);
                     elementwise work, LayerNorm and sampling are not counted: "efficiency" is matmul FLOP/s over peak
  compile            seconds to trace and compile the jitted chunk (--chunk updates in one lax.scan, vmapped)
  K members          member-updates/s with K members vmapped in one program, the median of --repeats chunks,
                     the process's peak memory after its warm-up chunk (K in increasing order), and the achieved
                     FLOP/s and its share of the peak (the best of one peak measurement per round)
  reference          the same update written the way per-step codebases write it: every step, numpy draws the rows
                     of a value batch and a policy batch and gathers all their arrays on the host, they are copied
                     to the device, and one jitted update runs (its on-device resampling of those 2 x batch rows is
                     a gather of the same cost as ours), with the script's own (textbook) MLP; updates/s over
                     --reference-steps steps: ours at K = 1 / this is what the jitted chunk and on-device sampling buy

Everything is compiled first, then timed in --repeats rounds, each timing every K, the reference and the peak once,
so that a drift in the machine's speed moves all of a round's numbers alike.

The data is synthetic, shaped like pointmaze (--obs-dim, --action-dim, trajectories of --trajectory-length), since
throughput depends on shapes only.
"""

from __future__ import annotations

import dataclasses
import importlib
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # envs.py and algos/ live at the repository root

import envs  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import runs  # noqa: E402
import tyro  # noqa: E402
from tqdm import tqdm  # noqa: E402
from matmul_flops import count_matmul_flops  # noqa: E402

SCRIPTS = runs.SCRIPTS


@dataclasses.dataclass
class ChunkShape:
    """What a measured chunk is: the script, its sizes and the synthetic data it trains on (throughput.py and
    op_profile.py share these flags)."""

    script: str = "iql_ddpgbc"
    """Script in algos/ to measure (its update, exactly as it trains)."""
    hidden_dims: tuple[int, ...] = (256, 256)
    """Hidden layer widths of every MLP."""
    batch_size: int = 256
    """Transitions per batch (value batch and policy batch alike)."""
    members: tuple[int, ...] = (1, 4, 16, 64)
    """Numbers K of vmapped members to measure."""
    chunk: int = 1000
    """Updates per jitted lax.scan chunk."""
    goal_conditioned: bool = True
    """Goal-conditioned data and losses (CRL requires it)."""
    obs_dim: int = 2
    """Observation width of the synthetic data (pointmaze: 2)."""
    action_dim: int = 2
    """Action width of the synthetic data (pointmaze: 2)."""
    dataset_size: int = 100_000
    """Transitions of synthetic data on the device."""
    trajectory_length: int = 200
    """Length of each synthetic trajectory (goals are sampled from a trajectory's future)."""


@dataclasses.dataclass
class Args(ChunkShape):
    repeats: int = 3
    """Timing rounds; each times one chunk of every K and --reference-steps of each reference; medians are reported."""
    reference_steps: int = 300
    """Steps per round of each per-step reference (after 20 warm-up steps); 0 skips them."""
    matmul_size: int = 2048
    """N of the N x N x N float32 product that measures the device's matmul peak."""
    out: str | None = None
    """JSON file to write (default: benchmarks/results/<script>-<device>-<widths>.json)."""
    progress: bool = True
    """Show a progress bar over the timing rounds."""


def matmul_peak(size: int, repeats: int = 10) -> float:
    """GFLOP/s of a jitted float32 size^3 matrix product, best of `repeats` timed calls after a warm-up."""
    a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (size, size), jnp.float32)
    product = jax.jit(jnp.matmul)
    product(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        product(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def synthetic_split(args: ChunkShape) -> dict[str, np.ndarray]:
    """A training split shaped like envs.split_dataset's output: random states, trajectories of fixed length."""
    rng = np.random.default_rng(0)
    n = args.dataset_size
    terminals = np.zeros(n, np.float32)
    terminals[args.trajectory_length - 1::args.trajectory_length] = 1.0
    terminals[-1] = 1.0
    data = {"observations": rng.normal(size=(n, args.obs_dim)).astype(np.float32),
            "next_observations": rng.normal(size=(n, args.obs_dim)).astype(np.float32),
            "actions": rng.uniform(-1, 1, size=(n, args.action_dim)).astype(np.float32),
            "rewards": -np.ones(n, np.float32), "masks": np.ones(n, np.float32), "terminals": terminals}
    train, _ = envs.split_dataset(data, seed=0, val_fraction=0.0)
    return train


def member_fields(algo, count: int, size: int) -> dict:
    fields = {"policy_data_size": jnp.full(count, size, jnp.int32)}
    if hasattr(algo.Config, "value_data_size"):
        fields["value_data_size"] = jnp.full(count, size, jnp.int32)
    if hasattr(algo.Config, "alpha"):
        fields["alpha"] = jnp.full(count, 0.3, jnp.float32)
    return fields


def peak_memory_mb() -> float:
    """Peak memory so far: the device's peak bytes where it reports them (GPU), else the process's peak RSS."""
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def compile_chunk(algo, config, args: ChunkShape, data, count: int) -> tuple[Callable, tuple, float]:
    """The script's own jitted chunk for `count` members, compiled: (the compiled chunk, its arguments: fresh
    states, the members' fields and online rows where the script takes them, seconds to compile)."""
    gc, dims = args.goal_conditioned, (args.obs_dim, args.obs_dim if args.goal_conditioned else 0, args.action_dim)
    states = jax.vmap(lambda k: algo.init_state(k, *dims, config))(jax.random.split(jax.random.PRNGKey(0), count))
    fields = member_fields(algo, count, args.dataset_size)
    online = () if args.script == "bc" else (None,)  # the Q scripts' chunk also takes online rows: none here
    start = time.perf_counter()
    compiled = algo.make_train_chunk(config, gc).lower(states, data, fields, *online).compile()
    return compiled, (states, fields, online), time.perf_counter() - start


def prepare_members(algo, config, args: Args, data, count: int) -> tuple[dict, Callable[[], float]]:
    """Compile and warm up the chunk of `count` vmapped members; returns the row so far and a timer of one chunk."""
    compiled, (states, fields, online), compile_seconds = compile_chunk(algo, config, args, data, count)
    states, infos = compiled(states, data, fields, *online)  # warm-up
    jax.block_until_ready(infos)

    def timed_chunk() -> float:
        nonlocal states
        start = time.perf_counter()
        states, infos = compiled(states, data, fields, *online)
        jax.block_until_ready(infos)
        return time.perf_counter() - start

    return {"members": count, "compile_seconds": compile_seconds, "peak_memory_mb": peak_memory_mb()}, timed_chunk


def prepare_reference(algo, config, args: Args, train: dict[str, np.ndarray]) -> Callable[[], float]:
    """One jitted update per Python call on batches gathered on the host with numpy, compiled and warmed up; returns a
    timer of --reference-steps steps."""
    gc, dims = args.goal_conditioned, (args.obs_dim, args.obs_dim if args.goal_conditioned else 0, args.action_dim)
    state = algo.init_state(jax.random.PRNGKey(0), *dims, config)
    rows = 2 * args.batch_size
    fields = {k: v[0] for k, v in member_fields(algo, 1, rows).items()}
    step = jax.jit(lambda s, d, m: algo.update(s, d, m, config, gc), donate_argnums=(0,))
    rng = np.random.default_rng(0)
    keys = [k for k in envs.TRANSITION_KEYS if k in train]

    def one_step(state):
        idx = rng.integers(0, len(train["actions"]), rows)
        mini = {k: train[k][idx] for k in keys}  # the host gather of every array, as a replay buffer does
        if gc:  # goals from the future of each row's trajectory, drawn and gathered on the host too
            goal_rows = np.minimum(idx + rng.geometric(1 - config.discount, rows), train["final_idxs"][idx])
            mini["goals"] = train["observations"][goal_rows]
        mini["final_idxs"] = np.arange(rows, dtype=np.int32)
        return step(state, jax.device_put(mini), fields)

    for _ in range(20):  # the first call traces and compiles the step
        state, info = one_step(state)
    jax.block_until_ready(info)

    def timed_steps() -> float:
        nonlocal state
        start = time.perf_counter()
        for _ in range(args.reference_steps):
            state, info = one_step(state)
        jax.block_until_ready(info)
        return time.perf_counter() - start

    return timed_steps


def run(args: Args) -> dict:
    if args.script not in SCRIPTS:
        raise runs.UsageError(f"--script {args.script} is not one of {', '.join(SCRIPTS)}")
    if args.script.startswith("crl") and not args.goal_conditioned:
        raise runs.UsageError("CRL scripts need goals: drop --no-goal-conditioned")
    if min(args.members) < 1 or args.chunk < 1 or args.repeats < 1 or args.reference_steps < 0:
        raise runs.UsageError("--members, --chunk and --repeats must be >= 1 and --reference-steps >= 0")
    algo = importlib.import_module(f"algos.{args.script}")
    config, _ = envs.fill_from_table(runs.make_config(algo.Config, hidden_dims=args.hidden_dims,
                                                      batch_size=args.batch_size, log_interval=args.chunk), args.script)
    train = synthetic_split(args)
    data = envs.to_device(train)
    device = jax.devices()[0]

    dims = (args.obs_dim, args.obs_dim if args.goal_conditioned else 0, args.action_dim)
    state = algo.init_state(jax.random.PRNGKey(0), *dims, config)
    fields = {k: v[0] for k, v in member_fields(algo, 1, args.dataset_size).items()}
    jaxpr = jax.make_jaxpr(lambda s: algo.update(s, data, fields, config, args.goal_conditioned))(state)
    flops_per_update = count_matmul_flops(jaxpr.jaxpr)

    # Compile and warm up everything first (memory is read after each K, in increasing K), then time in rounds: each
    # round times one chunk of every K, the reference and the matmul peak, so a drift in the machine's speed (on a
    # shared VM we saw 30% within minutes) moves every number of a round alike, and the ratios stay true.
    rows, timers = [], {}
    for count in sorted(args.members):
        row, timers[count] = prepare_members(algo, config, args, data, count)
        rows.append(row)
    if args.reference_steps:
        timers["reference"] = prepare_reference(algo, config, args, train)
    seconds = {name: [] for name in timers}
    peaks = []
    for _ in tqdm(range(args.repeats), desc="timing rounds", disable=not args.progress):
        peaks.append(matmul_peak(args.matmul_size))
        for name, timer in timers.items():
            seconds[name].append(timer())
    peak = max(peaks)
    for row in rows:
        row["chunk_seconds"] = statistics.median(seconds[row["members"]])
        row["member_updates_per_second"] = row["members"] * args.chunk / row["chunk_seconds"]
        row["achieved_gflops"] = row["member_updates_per_second"] * flops_per_update / 1e9
        row["share_of_matmul_peak"] = row["achieved_gflops"] / peak
    reference = args.reference_steps / statistics.median(seconds["reference"]) if "reference" in seconds else None
    single = next((r for r in rows if r["members"] == 1), None)
    return {"script": args.script, "device": f"{device.platform}: {device.device_kind}",
            "date": time.strftime("%Y-%m-%d"),
            "hidden_dims": list(args.hidden_dims), "batch_size": args.batch_size, "chunk": args.chunk,
            "repeats": args.repeats, "jax": jax.__version__, "matmul_peak_gflops": peak,
            "matmul_peak_gflops_per_round": peaks, "matmul_size": args.matmul_size,
            "matmul_flops_per_update": flops_per_update, "members": rows,
            "reference_updates_per_second": reference,
            "speedup_over_reference": (single["member_updates_per_second"] / reference
                                       if single and reference else None)}


def report(result: dict) -> str:
    lines = [f"{result['script']} on {result['device']}, hidden {result['hidden_dims']}, batch {result['batch_size']}, "
             f"chunk {result['chunk']}, jax {result['jax']}",
             f"matmul peak {result['matmul_peak_gflops']:.1f} GFLOP/s (float32 {result['matmul_size']}^3, best of "
             f"{', '.join(f'{p:.0f}' for p in result['matmul_peak_gflops_per_round'])} in {result['repeats']} "
             f"interleaved timing rounds); "
             f"{result['matmul_flops_per_update'] / 1e6:.1f} MFLOP (matmul, fwd + bwd) per update",
             "",
             "| K members | compile s | member-updates/s | x K=1 per member | GFLOP/s | share of peak | peak MB |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    base = next((r["member_updates_per_second"] for r in result["members"] if r["members"] == 1), None)
    for r in result["members"]:
        ratio = f"{r['member_updates_per_second'] / base:.2f}" if base else "-"
        lines.append(f"| {r['members']} | {r['compile_seconds']:.2f} | {r['member_updates_per_second']:.0f} | "
                     f"{ratio} | {r['achieved_gflops']:.1f} | {r['share_of_matmul_peak']:.0%} | "
                     f"{r['peak_memory_mb']:.0f} |")
    if result["reference_updates_per_second"]:
        lines += ["", f"per-step reference (host numpy batches, one jitted update per call): "
                      f"{result['reference_updates_per_second']:.0f} updates/s"]
        if result["speedup_over_reference"]:
            lines.append(f"ours (K=1) / reference: {result['speedup_over_reference']:.2f}x")
    return "\n".join(lines)


def main(args: Args) -> dict:
    result = run(args)
    print(report(result))
    widths = "x".join(map(str, args.hidden_dims))
    out = Path(args.out or f"benchmarks/results/{args.script}-{jax.devices()[0].platform}-{widths}.json")
    runs.write_json_atomic(out, result)
    print(f"-> {out}")
    return result


if __name__ == "__main__":
    runs.exit_on_usage_error(lambda: main(tyro.cli(Args)))
