"""benchmarks/throughput.py: the FLOP count by hand, a tiny end-to-end run, bad input. (Speed itself is measured by
running the benchmark, never asserted in a test.)"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import POINTMAZE, ROOT, run_script

sys.path.insert(0, str(ROOT / "benchmarks"))
import envs  # noqa: E402
import runs  # noqa: E402
import matmul_flops  # noqa: E402
import throughput  # noqa: E402


def flops(fn, *args):
    return matmul_flops.count_matmul_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def test_matmul_flops_are_counted_by_hand_through_grad_scan_and_vmap():
    x, w = jnp.ones((8, 16)), jnp.ones((16, 4))
    one = 2 * 8 * 4 * 16  # output elements x contracted length x 2
    assert flops(jnp.matmul, x, w) == one
    # backward of a product: one more product per differentiated input
    assert flops(jax.grad(lambda w: (x @ w).sum()), w) == 2 * one
    assert flops(jax.grad(lambda x, w: (x @ w).sum(), argnums=(0, 1)), x, w) == 3 * one
    # a scan repeats its body; a vmap over 3 members triples the work; jit adds nothing
    assert flops(lambda w: jax.lax.scan(lambda c, _: (c, x @ w), 0.0, None, length=5)[1], w) == 5 * one
    assert flops(jax.vmap(lambda w: x @ w), jnp.ones((3, 16, 4))) == 3 * one
    assert flops(jax.jit(jnp.matmul), x, w) == one


def test_tiny_benchmark_writes_every_number(tmp_path):
    out = tmp_path / "bench.json"
    args = throughput.Args(script="iql_awr", hidden_dims=(16,), batch_size=16, members=(1, 2), chunk=5, repeats=1,
                           reference_steps=5, dataset_size=2000, matmul_size=64, out=str(out))
    result = throughput.main(args)
    assert json.loads(out.read_text()) == result
    assert result["matmul_peak_gflops"] > 0 and result["reference_updates_per_second"] > 0
    assert [r["members"] for r in result["members"]] == [1, 2]
    for row in result["members"]:
        assert row["member_updates_per_second"] > 0 and row["compile_seconds"] > 0 and row["peak_memory_mb"] > 0
        assert 0 < row["share_of_matmul_peak"]
    # the count scales with the batch: every matmul of an update is batch x width x width
    doubled = throughput.run(throughput.Args(**{**args.__dict__, "batch_size": 32, "members": (1,),
                                                "reference_steps": 0}))
    assert doubled["matmul_flops_per_update"] == 2 * result["matmul_flops_per_update"]
    assert doubled["reference_updates_per_second"] is None


# A stand-in for JAX-CORL's algos/iql.py with the names benchmarks/jaxcorl.py's launcher reads (config, IQL,
# get_dataset, create_iql_train_state; a __main__ loop over tqdm holding `train_state`): a linear regression whose
# update is two known products, x @ w and its gradient's x.T @ residual.
STAND_IN_IQL = """
import sys
from typing import NamedTuple

import d4rl, gym, jax, tqdm, wandb
import jax.numpy as jnp

class Config(NamedTuple):
    batch_size: int
    n_jitted_updates: int
    max_steps: int
    env_name: str
    seed: int = 0

given = dict(arg.split("=", 1) for arg in sys.argv[1:])
config = Config(*(int(given[k]) for k in ("batch_size", "n_jitted_updates", "max_steps")), given["env_name"])

class Transition(NamedTuple):
    observations: jax.Array
    actions: jax.Array

def get_dataset(env, config):
    data = d4rl.qlearning_dataset(env)
    return Transition(jnp.asarray(data["observations"]), jnp.asarray(data["actions"])), 0.0, 1.0

def create_iql_train_state(key, observation, action, config):
    return jnp.zeros((observation.shape[-1], action.shape[-1]))

class IQL:
    @staticmethod
    def update_n_times(w, dataset, rng, config):
        for _ in range(config.n_jitted_updates):
            rng, key = jax.random.split(rng)
            rows = jax.random.randint(key, (config.batch_size,), 0, len(dataset.observations))
            x, y = dataset.observations[rows], dataset.actions[rows]
            grad = jax.grad(lambda w: ((x @ w - y) ** 2).mean())(w)
            w = w - 0.01 * grad
        return w, {"grad_norm": (grad ** 2).sum()}

if __name__ == "__main__":
    wandb.init()
    rng = jax.random.PRNGKey(0)
    dataset, _, _ = get_dataset(gym.make("stand-in"), config)
    train_state = create_iql_train_state(rng, dataset.observations[0], dataset.actions[0], config)
    update_fn = jax.jit(IQL.update_n_times, static_argnums=(3,))
    for i in tqdm.tqdm(range(1, config.max_steps // config.n_jitted_updates + 1)):
        rng, key = jax.random.split(rng)
        train_state, info = update_fn(train_state, dataset, key, config)
    wandb.finish()
"""


def test_jaxcorl_launcher_times_both_modes_and_counts_the_reference_update(tmp_path):
    """benchmarks/jaxcorl.py against a stand-in iql.py (the real one needs the network): both modes run through the
    launcher's stand-ins for d4rl, gym and wandb, and the matmul FLOPs it counts in the reference process are the
    stand-in update's, by hand."""
    import hashlib

    import jaxcorl

    (tmp_path / "algos").mkdir()
    (tmp_path / "algos" / "iql.py").write_text(STAND_IN_IQL)
    out = tmp_path / "jaxcorl.json"
    args = jaxcorl.Args(jaxcorl_dir=str(tmp_path), python=sys.executable, dataset_size=500, obs_dim=5, action_dim=3,
                        episode_length=50, batch_size=16, n_jitted_updates=4, warmup_calls=2, calls=3, repeats=2,
                        chunk=10, chunks_per_repeat=1, jaxcorl_commit="stand-in", out=str(out))
    jaxcorl.main(args)
    result = json.loads(out.read_text())
    assert result["jaxcorl"]["commit"] == "stand-in"
    assert result["jaxcorl"]["sha256"] == hashlib.sha256(STAND_IN_IQL.encode()).hexdigest()
    assert set(result["updates_per_s"]) == {"shipped", "scan"}
    for mode in ("shipped", "scan"):
        assert result["updates_per_s"][mode] > 0 and len(result["modes"][mode]["windows"]) == 2
    assert "batch_size=16" in result["modes"]["scan"]["iql_cli"]
    assert "n_jitted_updates=1" in result["modes"]["scan"]["iql_cli"]  # the scan mode runs one update per step
    flops = 2 * (2 * 16 * 5 * 3)  # x @ w, then x.T @ residual: 2 x batch x obs x action each
    assert result["matmul_flops_per_update"] == flops == result["modes"]["scan"]["matmul_flops_per_update"]
    assert result["modes"]["scan"]["gflops_per_s"] == pytest.approx(result["updates_per_s"]["scan"] * flops / 1e9)
    assert result["jax_version"] == jax.__version__  # the same Python ran both sides here

def test_op_profile_puts_each_compiled_operation_in_its_kind():
    """benchmarks/op_profile.py reads kinds from the compiled HLO: a fused matmul is a matmul, a row gather is a
    gather, a sum is a reduction, a transpose is a layout change, the rest is elementwise."""
    import os

    before = os.environ.get("XLA_FLAGS")
    import op_profile  # it asks XLA for trace events: harmless here (the backend has started), undone below

    if before is None:
        os.environ.pop("XLA_FLAGS", None)
    else:
        os.environ["XLA_FLAGS"] = before
    kinds, sources = op_profile.hlo_kinds(COMPILED_HLO)
    assert kinds == {"ynn_fusion": "matmul", "dot.3": "matmul", "gather_fusion": "gather/slice",
                     "reduce_fusion": "reduction", "copy.5": "copy/layout", "transpose_fusion": "copy/layout",
                     "loop_fusion": "elementwise"}  # the while loop and its plumbing are not operations of their own
    assert sources["ynn_fusion"] == "jit(chunk)/while/body/jvp(mlp)/dot_general"
    assert op_profile.phase(sources["ynn_fusion"]) == "forward"
    assert op_profile.phase("jit(chunk)/while/body/transpose(jvp(mlp))/dot_general") == "backward"
    assert op_profile.phase("jit(chunk)/while/body/adam/mul") == "rest"


# the shape of XLA:CPU's compiled text (jax 0.10), cut down to one instruction of each kind
COMPILED_HLO = """HloModule jit_chunk, is_scheduled=true

%fused_dot (p0: f32[8,4], p1: f32[4,4]) -> f32[8,4] {
  %p0 = f32[8,4]{1,0} parameter(0)
  %p1 = f32[4,4]{1,0} parameter(1)
  %dot.1 = f32[8,4]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %tanh.1 = f32[8,4]{1,0} tanh(%dot.1)
}

%fused_gather (p0.1: f32[100,4], p1.1: s32[8,1]) -> f32[8,4] {
  %p0.1 = f32[100,4]{1,0} parameter(0)
  %p1.1 = s32[8,1]{1,0} parameter(1)
  ROOT %gather.1 = f32[8,4]{1,0} gather(%p0.1, %p1.1), offset_dims={1}, slice_sizes={1,4}
}

%add_region (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %add.1 = f32[] add(%a, %b)
}

%fused_reduce (p0.2: f32[8,4]) -> f32[4] {
  %p0.2 = f32[8,4]{1,0} parameter(0)
  %c = f32[] constant(0)
  %mul.1 = f32[8,4]{1,0} multiply(%p0.2, %p0.2)
  ROOT %reduce.1 = f32[4]{0} reduce(%mul.1, %c), dimensions={0}, to_apply=%add_region
}

%fused_transpose (p0.3: f32[8,4]) -> f32[4,8] {
  %p0.3 = f32[8,4]{1,0} parameter(0)
  ROOT %transpose.1 = f32[4,8]{0,1} transpose(%p0.3), dimensions={1,0}
}

%fused_loop (p0.4: f32[8,4]) -> f32[8,4] {
  %p0.4 = f32[8,4]{1,0} parameter(0)
  %exp.1 = f32[8,4]{1,0} exponential(%p0.4)
  ROOT %mul.2 = f32[8,4]{1,0} multiply(%exp.1, %p0.4)
}

%body (t: (f32[8,4], f32[4,4], f32[100,4], s32[8,1])) -> (f32[8,4], f32[4,4], f32[100,4], s32[8,1]) {
  %t = (f32[8,4]{1,0}, f32[4,4]{1,0}, f32[100,4]{1,0}, s32[8,1]{1,0}) parameter(0)
  %x = f32[8,4]{1,0} get-tuple-element(%t), index=0
  %w = f32[4,4]{1,0} get-tuple-element(%t), index=1
  %data = f32[100,4]{1,0} get-tuple-element(%t), index=2
  %rows = s32[8,1]{1,0} get-tuple-element(%t), index=3
  %gather_fusion = f32[8,4]{1,0} fusion(%data, %rows), kind=kLoop, calls=%fused_gather
  %ynn_fusion = f32[8,4]{1,0} fusion(%gather_fusion, %w), kind=kCustom, calls=%fused_dot, \
metadata={op_name="jit(chunk)/while/body/jvp(mlp)/dot_general" stack_frame_id=3}
  %dot.3 = f32[8,4]{1,0} dot(%ynn_fusion, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %reduce_fusion = f32[4]{0} fusion(%dot.3), kind=kInput, calls=%fused_reduce
  %transpose_fusion = f32[4,8]{0,1} fusion(%dot.3), kind=kLoop, calls=%fused_transpose
  %loop_fusion = f32[8,4]{1,0} fusion(%dot.3), kind=kLoop, calls=%fused_loop
  %copy.5 = f32[8,4]{1,0} copy(%loop_fusion)
  ROOT %tuple.1 = (f32[8,4]{1,0}, f32[4,4]{1,0}, f32[100,4]{1,0}, s32[8,1]{1,0}) tuple(%copy.5, %w, %data, %rows)
}

ENTRY %main (x.1: f32[8,4], w.1: f32[4,4], d.1: f32[100,4], r.1: s32[8,1]) -> f32[8,4] {
  %x.1 = f32[8,4]{1,0} parameter(0)
  %w.1 = f32[4,4]{1,0} parameter(1)
  %d.1 = f32[100,4]{1,0} parameter(2)
  %r.1 = s32[8,1]{1,0} parameter(3)
  %tuple.0 = (f32[8,4]{1,0}, f32[4,4]{1,0}, f32[100,4]{1,0}, s32[8,1]{1,0}) tuple(%x.1, %w.1, %d.1, %r.1)
  %while.1 = (f32[8,4]{1,0}, f32[4,4]{1,0}, f32[100,4]{1,0}, s32[8,1]{1,0}) while(%tuple.0), body=%body
  ROOT %out = f32[8,4]{1,0} get-tuple-element(%while.1), index=0
}
"""


@pytest.mark.slow
def test_op_profile_traces_a_real_chunk_and_accounts_for_all_its_time(tmp_path):
    """The per-operation profile of a script's real chunk at toy size, in its own process (XLA's flag must be set
    before the backend starts): every kind and phase is there, their shares add up to the whole, matmuls are found.
    Slow (a process of its own that compiles a chunk): it is the only test that the trace events are read at all."""
    out = tmp_path / "profile.json"
    proc = run_script("benchmarks/op_profile.py", "--script", "iql_ddpgbc", "--hidden-dims", "16", "--batch-size",
                      "16", "--members", "1", "--chunk", "3", "--dataset-size", "2000", "--top", "3",
                      "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert [row["members"] for row in result["members"]] == [1]
    for row in result["members"]:
        assert row["operations_per_update"] > 10 and row["wall_us_per_update"] > 0
        for split in ("kinds", "phases"):
            assert sum(v["share"] for v in row[split].values()) == pytest.approx(1.0)
            assert sum(v["us_per_update"] for v in row[split].values()) == pytest.approx(row["op_us_per_update"])
        assert row["kinds"]["matmul"]["share"] > 0 and row["phases"]["backward"]["share"] > 0
        assert len(row["costliest"]) == 3 and all(op["kind"] in row["kinds"] for op in row["costliest"])
    assert "| K | wall us per member-update |" in proc.stdout


def test_bad_script_exits_2():
    proc = run_script("benchmarks/throughput.py", "--script", "iql_dpgbc")
    assert proc.returncode == 2 and "--script iql_dpgbc is not one of" in proc.stderr


def test_flops_per_update_are_counted_by_hand_on_bc():
    import algos.bc as algo

    config = envs.fill_from_table(algo.Config(hidden_dims=(16, 16), batch_size=8), "bc")[0]
    state = algo.init_state(jax.random.PRNGKey(0), 2, 2, 2, config)
    data = envs.to_device(throughput.synthetic_split(throughput.Args(dataset_size=400)))
    fields = {k: v[0] for k, v in throughput.member_fields(algo, 1, 400).items()}
    # One actor MLP, batch 8, layers (2 + 2 goal) x 16, 16 x 16, 16 x 2: forward 2 B (in x out) per layer; backward
    # the same again for every weight gradient, and once more for every input gradient but the first layer's.
    forward = 2 * 8 * (4 * 16 + 16 * 16 + 16 * 2)
    backward = forward + 2 * 8 * (16 * 16 + 16 * 2)
    assert flops(lambda s: algo.update(s, data, fields, config, True), state) == forward + backward
    result = throughput.run(throughput.Args(script="bc", hidden_dims=(16, 16), batch_size=8, members=(1,), chunk=2,
                                            repeats=1, reference_steps=0, dataset_size=400, matmul_size=64))
    assert result["matmul_flops_per_update"] == forward + backward


def test_parity_needs_a_reference_checkout_and_consecutive_seeds(tmp_path):
    import parity

    with pytest.raises(runs.UsageError, match="has no impls/main.py"):
        parity.check(parity.Args(ogbench_dir=str(tmp_path)))
    (tmp_path / "impls").mkdir()
    (tmp_path / "impls" / "main.py").write_text("")
    parity.check(parity.Args(ogbench_dir=str(tmp_path)))
    with pytest.raises(runs.UsageError, match="consecutive"):
        parity.check(parity.Args(ogbench_dir=str(tmp_path), seeds=(0, 2)))
    with pytest.raises(runs.UsageError, match="--pairs"):
        parity.check(parity.Args(ogbench_dir=str(tmp_path), pairs=("iql_sfbc",)))
    # the matched settings come from our table: the reference's tuned pointmaze alpha for IQL + DDPG+BC
    assert parity.settings(parity.Args(ogbench_dir=str(tmp_path)), "iql_ddpgbc") == {
        "alpha": 0.003, "discount": 0.99, "actor_p_randomgoal": 0.0}
    # on stitch data the reference gets our table's actor goals: half random, half from the trajectory (GCIQL's and
    # CRL's hyperparameters.sh rows); the mixture is handed over, never left at the reference's default
    stitch = parity.Args(ogbench_dir=str(tmp_path), env="pointmaze-medium-stitch-v0")
    assert parity.settings(stitch, "crl_ddpgbc") == {"alpha": 0.03, "discount": 0.99, "actor_p_randomgoal": 0.5}
    with pytest.raises(runs.UsageError, match="has no impls/main.py"):
        parity.check(parity.Args())


FAKE_REFERENCE = '''#!{python}
"""Stands in for `python -c LAUNCHER` + OGBench's impls/main.py: writes the CSVs main.py writes (task columns named
as OGBench names them, e.g. task1_horizontal), records each call's seed and the rows of the training file it finds
and of the -val file beside it, where OGBench looks for them ($HOME/.ogbench/data)."""
import csv, os, sys
from pathlib import Path
import numpy as np
flags = dict(a[2:].split("=", 1) for a in sys.argv[3:])  # argv: -c LAUNCHER --name=value ...
seed, steps, interval = int(flags["seed"]), int(flags["train_steps"]), int(flags["log_interval"])
folder = Path(flags["save_dir"]) / flags["run_group"] / "sd000_fake"
folder.mkdir(parents=True)
home = Path(os.environ["HOME"]) / ".ogbench" / "data"
rows = [len(np.load(home / (flags["env_name"] + suffix))["terminals"]) for suffix in (".npz", "-val.npz")]
with open(Path({calls!r}), "a") as f:
    f.write(" ".join([flags["seed"], *map(str, rows)]) + "\\n")
with open(Path({calls!r} + ".flags"), "a") as f:
    f.write(" ".join(sys.argv[3:]) + "\\n")
with open(folder / "train.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["step", "training/value/v_mean", "training/critic/q_mean", "training/value/value_loss",
                "training/critic/critic_loss", "training/actor/actor_loss", "time/epoch_time"])
    for step in range(interval, steps + 1, interval):
        w.writerow([step, -step - seed, -step, 0.5, 0.25, 1.0, 0.01])
with open(folder / "eval.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["step", "evaluation/overall_success", *(f"evaluation/task{{k}}_shape_success" for k in range(1, 6))])
    every = int(flags["eval_interval"])
    for step in [1] + [k for k in range(every, steps + 1, every) if k > 1]:  # main.py evaluates at step 1 too
        w.writerow([step, seed / 10 * step / steps, *(seed / 10 * step / steps for _ in range(5))])
'''


@pytest.mark.slow
def test_parity_runs_both_sides_in_blocks_and_reuses_completed_runs(tmp_path, data_dir):
    """The real tool on a stand-in reference (same command line and CSV files as OGBench's main.py) and our real
    script: both sides per seed, ours in blocks of --seeds-per-run, the table from their files, nothing rerun."""
    import shutil

    import parity

    calls = tmp_path / "reference_calls.txt"
    flags = tmp_path / "reference_calls.txt.flags"
    (tmp_path / "ogbench" / "impls").mkdir(parents=True)
    (tmp_path / "ogbench" / "impls" / "main.py").write_text("")
    fake = tmp_path / "reference_python"
    fake.write_text(FAKE_REFERENCE.format(python=sys.executable, calls=str(calls)))
    fake.chmod(0o755)
    # the tool's dataset folder, filled with the session's small dataset (so nothing is generated here)
    data = tmp_path / "work" / POINTMAZE / "home" / ".ogbench" / "data"
    data.mkdir(parents=True)
    for f in data_dir.glob(f"{POINTMAZE}*"):
        shutil.copy(f, data)
    args = parity.Args(ogbench_dir=str(tmp_path / "ogbench"), reference_python=str(fake), env=POINTMAZE,
                       pairs=("iql_ddpgbc",), seeds=(4, 5), seeds_per_run=1, steps=2, log_interval=1,
                       hidden_dims=(16,), batch_size=8, eval_episodes=1, eval_interval=1,
                       work_dir=str(tmp_path / "work"), out=str(tmp_path / "parity.md"))
    results = parity.main(args)["iql_ddpgbc"]
    # both sides read the same two files, whole: the reference the training and -val files where OGBench looks, our
    # script the same folder, training on the whole training file and validating on the -val file
    rows = [len(np.load(data / f"{POINTMAZE}{suffix}")["terminals"]) for suffix in (".npz", "-val.npz")]
    assert calls.read_text().split() == ["4", *map(str, rows), "5", *map(str, rows)]
    assert "--agent.actor_p_randomgoal=0.0" in flags.read_text() and "--agent.actor_p_trajgoal=1.0" in flags.read_text()
    ours_dir = tmp_path / "work" / POINTMAZE / "ours-official-split" / "iql_ddpgbc" / "2-steps"
    assert sorted(p.name for p in ours_dir.iterdir() if p.is_dir()) == ["s4-4", "s5-5"]
    config = json.loads((ours_dir / "s4-4" / "config.json").read_text())
    assert config["validation"] == envs.VALIDATION_FILE and config["config"]["dataset_dir"] == str(data)
    reference, ours = results["reference"], results["ours"]
    assert reference["success"] == [0.4, 0.5] and reference["tasks"]["task3_success"] == [0.4, 0.5]
    assert reference["stats"][2]["v_mean"] == -6.5  # the mean over seeds of -step - seed
    assert len(ours["success"]) == 2 and sorted(ours["tasks"]) == sorted(reference["tasks"])
    # every statistic but CRL's critic accuracy
    assert set(ours["stats"]) == {1, 2} and set(ours["stats"][2]) == set(parity.STATS) - {"critic_categorical_accuracy"}
    # the success curve, every --eval-interval steps on both sides (the reference's extra step-1 evaluation left out)
    assert reference["success_by_step"] == {1: [0.2, 0.25], 2: [0.4, 0.5]} and set(ours["success_by_step"]) == {1, 2}
    assert ours["success_by_step"][2] == ours["success"]
    table = (tmp_path / "parity.md").read_text()
    assert "| overall success | 0.450 ± 0.050 |" in table and "| success per seed | 0.40 0.50 |" in table
    assert "| success at step 1 | 0.225 ± 0.025 |" in table
    # a second call reruns nothing on either side and writes the same numbers
    again = parity.main(args)["iql_ddpgbc"]
    assert calls.read_text().split() == ["4", *map(str, rows), "5", *map(str, rows)]
    assert again["ours"]["success"] == ours["success"] and again["reference"] == reference
    # ... while a call of another length has runs of its own (never a 2-step run read as a 3-step one)
    assert [p.name for p in (tmp_path / "work" / POINTMAZE / "reference" / "iql_ddpgbc").iterdir()] == ["2-steps"]


@pytest.mark.slow
def test_soak_kills_a_sweep_and_finds_its_results_intact(tmp_path):
    """The soak benchmark itself, at its smallest: a reference sweep, one SIGKILL of the soaked sweep's launcher, the
    relaunch finishing it; the same numbers as the reference (its comparison is what the full soak relies on)."""
    import soak

    summary = soak.main(soak.Args(kills=1, steps=100, work_dir=str(tmp_path / "soak")))
    assert summary["kills"] == 1 and summary["launches"] >= 2 and summary["runs_per_round"] == 2
    assert summary["results_lost"] == summary["results_altered"] == summary["launches_failed"] == 0
    assert json.loads((tmp_path / "soak" / "soak.json").read_text())["kills"] == 1
    # and the comparison sees an altered result: one record of a soaked run changed
    folder = soak.run_folders(tmp_path / "soak" / "soaked")[0]
    result = json.loads((folder / "result.json").read_text())
    result["success"]["mean"] += 0.01
    (folder / "result.json").write_text(json.dumps(result))
    reference = soak.run_folders(tmp_path / "soak" / "reference")[0]
    assert soak.comparable(folder) != soak.comparable(reference)


def test_every_mutation_still_applies_and_names_tests_that_exist():
    """benchmarks/mutations.py (run by hand: it takes minutes) stays true to the code: each mutation's line occurs
    exactly once in its file, and each test it names exists in the suite."""
    import ast

    import mutations

    assert len(mutations.MUTATIONS) >= 18
    for mutation in mutations.MUTATIONS:
        assert (ROOT / mutation.file).read_text().count(mutation.before) == 1, mutation.name
        for test in mutation.tests:
            path, name = test.split("::")
            name = name.split("[")[0]  # a parametrized test's id names its function
            defined = {node.name for node in ast.parse((ROOT / path).read_text()).body
                       if isinstance(node, ast.FunctionDef)}
            assert name in defined, (mutation.name, test)


@pytest.mark.slow
def test_the_gpu_check_runs_in_one_command_at_toy_size(tmp_path):
    """benchmarks/gpu.sh with TINY=1 (what a CPU can run): the throughput rows for each K, a packed 2 x 2 matrix of
    2 seeds trained to completion in one process, and gpu.json gathering both. (~70 s on 2 cores: two JAX programs
    compiled, a dataset generated, one packed run.)"""
    import os
    import subprocess

    out = tmp_path / "gpu"
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), str(out)], capture_output=True, text=True,
                          env={**os.environ, "TINY": "1", "PYTHON": sys.executable}, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads((out / "gpu.json").read_text())
    assert [row["members"] for row in summary["throughput"]] == [1, 2]
    assert all(row["member_updates_per_second"] > 0 for row in summary["throughput"])
    assert len(summary["matrix"]["runs"]) == 8 and summary["matrix"]["member_updates_per_second"] > 0
    sweep = json.loads((out / "matrix" / "sweep.json").read_text())
    [pack] = (out / "matrix" / "packs").glob("*.json")  # all 8 runs in one process
    assert sweep["counts"]["done"] == 8 and len(json.loads(pack.read_text())) == 8
