"""Where our IQL + AWR update differs from JAX-CORL's iql.py in cost: our chunk (one member, the runs.over_members
path) with JAX-CORL's choices swapped in (its networks, its one batch: each alone, then together), timed in
interleaved rounds in one process. Measurement only: the variants are built here by rebinding the script's
functions; the scripts never change.

    python benchmarks/ablation.py        # 1M synthetic rows, obs 29, action 8, 2 x 256, batch 256 (docs/speed.md)
"""

import importlib
import statistics
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import envs  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import runs  # noqa: E402

CHUNK = 200
n = 1_000_000
rng = np.random.default_rng(0)
term = np.zeros(n, np.float32)
term[999::1000] = 1
raw = {
    "observations": rng.normal(size=(n, 29)).astype(np.float32),
    "next_observations": rng.normal(size=(n, 29)).astype(np.float32),
    "actions": rng.uniform(-1, 1, (n, 8)).astype(np.float32),
    "rewards": rng.normal(size=n).astype(np.float32),
    "masks": np.ones(n, np.float32),
    "terminals": term,
}
train, _ = envs.split_dataset(raw, 0, 0.0)
data = envs.to_device(train)


def variant(relu, ln_value_only, one_batch):
    algo = importlib.import_module("algos.iql_awr")
    mod = types.ModuleType("v")
    mod.__dict__.update(algo.__dict__)
    if relu:

        def mlp_apply(params, x):
            for layer in params[:-1]:
                x = jax.nn.relu(x @ layer["w"] + layer["b"])
                if "scale" in layer:
                    x = algo.layer_norm(x, layer["scale"], layer["shift"])
            return x @ params[-1]["w"] + params[-1]["b"]

        mod.mlp_apply = mlp_apply
        # value_fn etc. look up mlp_apply in their globals: rebuild them in mod's namespace
        for name in (
            "value_fn",
            "critic_fn",
            "actor_fn",
            "awr_actor_loss",
            "value_loss",
            "critic_loss",
            "update",
            "init_params",
            "init_state",
            "make_train_chunk",
        ):
            f = getattr(algo, name)
            setattr(mod, name, types.FunctionType(f.__code__, mod.__dict__, name, f.__defaults__, f.__closure__))
    if ln_value_only:
        orig_init = algo.mlp_init

        def init_params(key, obs_dim, goal_dim, action_dim, hidden_dims):
            k_value, k_critic, k_actor = jax.random.split(key, 3)
            s = obs_dim + goal_dim
            critic = jax.vmap(lambda k: orig_init(k, (s + action_dim, *hidden_dims, 1), layer_norm=False))(
                jax.random.split(k_critic)
            )
            return {
                "value": orig_init(k_value, (s, *hidden_dims, 1)),
                "critic": critic,
                "actor": orig_init(k_actor, (s, *hidden_dims, action_dim), layer_norm=False, final_scale=0.01),
            }

        mod.init_params = init_params
        for name in ("init_state",):
            f = getattr(algo, name)
            setattr(mod, name, types.FunctionType(f.__code__, mod.__dict__, name, f.__defaults__, f.__closure__))
    if one_batch:
        real = envs.sample_batch
        fake_envs = types.ModuleType("e")
        fake_envs.__dict__.update(envs.__dict__)
        cache = {}

        def sample_batch(key, data, size, batch_size, goals, *a, **k):
            if "b" in cache:  # the update's second call (the policy batch): the value batch again
                return cache.pop("b")
            cache["b"] = real(key, data, size, batch_size, goals, *a, **k)
            return cache["b"]

        fake_envs.sample_batch = sample_batch
        mod.envs = fake_envs
        for name in ("update", "make_train_chunk"):
            f = getattr(algo, name)
            setattr(mod, name, types.FunctionType(f.__code__, mod.__dict__, name, f.__defaults__, f.__closure__))
    return mod


progs = {}
for name, flags in {
    "ours (GELU, LayerNorm on V and Q, two batches)": (False, False, False),
    "ours, one batch for V, Q and actor": (False, False, True),
    "ReLU": (True, False, False),
    "ReLU, LayerNorm on V only (JAX-CORL's nets)": (True, True, False),
    "JAX-CORL's nets and one batch for V, Q and actor": (True, True, True),
}.items():
    mod = variant(*flags)
    config, _ = envs.fill_from_table(
        runs.make_config(
            mod.Config, env="walker-run-random", hidden_dims=(256, 256), batch_size=256, log_interval=CHUNK
        ),
        "iql_awr",
    )
    state = jax.tree_util.tree_map(lambda x: x[None], mod.init_state(jax.random.PRNGKey(0), 29, 0, 8, config))
    member = {
        "value_data_size": jnp.full(1, n, jnp.int32),
        "policy_data_size": jnp.full(1, n, jnp.int32),
        "alpha": jnp.full(1, 3.0),
    }
    progs[name] = [mod.make_train_chunk(config, False), state, member]
times = {k: [] for k in progs}
for r in range(6):
    for name, box in progs.items():
        f, s, m = box
        t = time.perf_counter()
        s, infos = f(s, data, m, None)
        jax.block_until_ready(infos)
        dt = time.perf_counter() - t
        box[1] = s
        if r:
            times[name].append(CHUNK / dt)
for name, v in times.items():
    rounds = ", ".join(f"{x:.0f}" for x in v)
    print(f"{name:52s} {statistics.median(v):6.1f} updates/s (median of rounds 2-6: {rounds})", flush=True)
