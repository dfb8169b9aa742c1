"""benchmarks/throughput.py: the FLOP count by hand, a tiny end-to-end run, bad input. (Speed itself is measured by
running the benchmark, never asserted in a test.)"""

import json
import sys

import jax
import jax.numpy as jnp
import pytest
from conftest import ROOT, run_script

sys.path.insert(0, str(ROOT / "benchmarks"))
import envs  # noqa: E402
import runs  # noqa: E402
import throughput  # noqa: E402


def flops(fn, *args):
    return throughput.count_matmul_flops(jax.make_jaxpr(fn)(*args).jaxpr)


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
    assert parity.settings(parity.Args(ogbench_dir=str(tmp_path)), "iql_ddpgbc") == {"alpha": 0.003, "discount": 0.99}
