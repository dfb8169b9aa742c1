"""Behaviour cloning (BC): the imitation baseline every value x extractor pair is compared against, in one file.

What it learns
  A Gaussian policy pi = N(mu(s[, g]), I) (unbounded mean, std fixed at 1: the reference's GCBC) fitted to the
  dataset's actions:  L_pi = -E[ log pi(a | s[, g]) ] = E[ 0.5 ||mu(s[, g]) - a||^2 ] + const.  On goal-conditioned data
  the goal is a future state of the same trajectory (OGBench's actor goals), i.e. goal-conditioned BC. The agent acts
  with clip(mu, -1, 1).

Knobs that matter
  --policy-data-size: the transitions it clones (a prefix of the seeded trajectory order); there is no value function,
    hence no --value-data-size and no alpha. BC is the reference a value-based method has to beat on the same data.
  --obs-transform warp: the paper's representation experiment. The policy sees y = x + 0.9 / w * sin(w * x) of every
    observation and goal coordinate (w = --obs-transform-frequency), a continuous invertible map (dy/dx >= 0.1), so
    no information is lost, only the geometry the network generalizes over changes.

Easy to get wrong
  On goal-conditioned data the goal must be a future state of the same trajectory (what the action was heading
  for), never a random state. Compare BC with the other scripts by `policy_mse_to_data` and the oracle MSEs, which
  every script logs, not by its loss (whose constant depends on the action dimension).

Reading guide: `# ALGO LOGIC` marks the algorithm; `# HARNESS`, shared plumbing to skip (envs.py: data, evaluation;
runs.py: run folders, logs, resume; testtime.py: OPEX / TTT). `python algos/bc.py --help`: every flag.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from pathlib import Path
from typing import Literal

sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # after the script's own folder: a fork's copies win

import envs  # noqa: E402  (sets MUJOCO_GL before anything imports mujoco)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
import runs  # noqa: E402
import tyro  # noqa: E402

SCRIPT, TABLE_ROW = "bc", "bc"  # TABLE_ROW: whose per-dataset table entries (alpha, ...) it takes


# ALGO LOGIC: the algorithm's flags ----------------------------------------------------------------------------------
@dataclasses.dataclass
class Config:
    env: str = "pointmaze-medium-navigate-v0"
    """Environment / dataset name (`python envs.py list`)."""
    dataset_dir: str = envs.DEFAULT_DATASET_DIR
    """Folder holding the dataset (OGBench .npz, or ExORL <domain>/<algo>/buffer/)."""
    policy_data_size: int | None = None
    """Transitions the policy clones (a prefix of the seeded trajectory order); all when omitted."""
    seed: int = 0
    """Seed of the first member; member i uses seed + i. The data split uses --split-seed."""
    num_seeds: int = 1
    """Members trained together in one vmapped program, seeds seed .. seed + num_seeds - 1."""
    split_seed: int = 0
    """Seed of the trajectory permutation (and of the 10% validation hold-out where no -val file exists)."""
    steps: int = 1_000_000
    """Gradient steps."""
    batch_size: int = 1024
    """Transitions per batch."""
    hidden_dims: tuple[int, ...] = (512, 512, 512)
    """Hidden layer widths of the policy MLP."""
    lr: float = 3e-4
    """Adam learning rate."""
    obs_transform: Literal["none", "warp"] = "none"
    """Representation of observations and goals the policy sees: none (raw) or warp (x + 0.9/w sin(w x), invertible)."""
    obs_transform_frequency: float = 1.0
    """w of --obs-transform warp, in inverse observation units (> 0); larger folds the state space more finely."""
    actor_p_randomgoal: float | None = None
    """Share of goals drawn at random (the rest: the trajectory's future states); default: the table."""
    harness: runs.HarnessFlags = dataclasses.field(default_factory=runs.Harness)
    """HARNESS: logging, evaluation, run folders, resume (runs.Harness; flags flattened)."""


def validate(config: Config) -> None:
    """Reject bad flags with a one-line UsageError naming the flag; the harness checks its own."""
    runs.check([
        (config.num_seeds >= 1, "--num-seeds must be >= 1"),
        (config.steps >= 1, "--steps must be >= 1"),
        (config.batch_size >= 1, "--batch-size must be >= 1"),
        (len(config.hidden_dims) >= 1 and min(config.hidden_dims) >= 1, "--hidden-dims needs positive widths"),
        (config.obs_transform_frequency > 0, "--obs-transform-frequency must be > 0"),
        (config.actor_p_randomgoal is None or 0 <= config.actor_p_randomgoal <= 1,
         "--actor-p-randomgoal must be in [0, 1]"),
    ])
    config.harness.validate(config.steps)


# ALGO LOGIC: networks, textbook MLPs as in the reference; parameters are pytrees (lists of dicts) ------------------
def mlp_init(key, sizes: tuple[int, ...], layer_norm: bool = True, final_scale: float = 1.0) -> list[dict]:
    """Glorot-uniform weights (the output layer's variance x final_scale), zero biases, LayerNorm if `layer_norm`."""
    params = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        key, sub = jax.random.split(key)
        last = i == len(sizes) - 2
        limit = math.sqrt(6.0 * (final_scale if last else 1.0) / (fan_in + fan_out))
        layer = {"w": jax.random.uniform(sub, (fan_in, fan_out), minval=-limit, maxval=limit), "b": jnp.zeros(fan_out)}
        if layer_norm and not last:
            layer["scale"], layer["shift"] = jnp.ones(fan_out), jnp.zeros(fan_out)
        params.append(layer)
    return params


def layer_norm(x, scale, shift, eps: float = 1e-6):
    mean = x.mean(-1, keepdims=True)
    variance = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(variance + eps) * scale + shift


def mlp_apply(params: list[dict], x):
    """Dense -> GELU -> LayerNorm (where the network has it) per hidden layer, the reference's order; linear output."""
    for layer in params[:-1]:
        x = jax.nn.gelu(x @ layer["w"] + layer["b"])
        if "scale" in layer:
            x = layer_norm(x, layer["scale"], layer["shift"])
    return x @ params[-1]["w"] + params[-1]["b"]


def actor_fn(params, obs, goals):
    """The mean of the Gaussian policy N(mu(s[, g]), I): unbounded, std fixed at 1, no tanh (the reference's); the agent
    acts with clip(mu, -1, 1)."""
    return mlp_apply(params, _inputs(obs, goals))


def gaussian_log_prob(mean, actions):
    """log N(actions; mean, I), summed over action dimensions: a squared error up to a constant."""
    return (-0.5 * (actions - mean) ** 2 - 0.5 * math.log(2 * math.pi)).sum(-1)


def transform_observations(x, kind: str, frequency: float):
    """--obs-transform: the representation the policy sees. warp: y = x + 0.9 / w * sin(w * x) per coordinate, strictly
    increasing (dy/dx = 1 + 0.9 cos(w x) >= 0.1), hence continuous and invertible; none: y = x."""
    if kind == "none" or x is None:
        return x
    return x + 0.9 / frequency * jnp.sin(frequency * x)


def _inputs(obs, goals):
    return obs if goals is None else jnp.concatenate([obs, goals], -1)


def init_params(key, obs_dim: int, goal_dim: int, action_dim: int, hidden_dims: tuple[int, ...]) -> dict:
    return {"actor": mlp_init(key, (obs_dim + goal_dim, *hidden_dims, action_dim), layer_norm=False, final_scale=0.01)}


# ALGO LOGIC: the loss, returning (loss, info) -----------------------------------------------------------------------
def bc_actor_loss(actor_params, batch):
    mean = actor_fn(actor_params, batch["observations"], batch.get("goals"))
    log_prob = gaussian_log_prob(mean, batch["actions"])
    loss = -log_prob.mean()
    info = {"actor_loss": loss, "actor_bc_log_prob": log_prob.mean(),
            "policy_mse_to_data": ((mean - batch["actions"]) ** 2).mean()}
    return loss, info


# ALGO LOGIC: one update, and a jitted chunk of updates for every member at once -------------------------------------
def init_state(key, obs_dim, goal_dim, action_dim, config: Config) -> dict:
    k_params, k_train = jax.random.split(key)
    params = init_params(k_params, obs_dim, goal_dim, action_dim, config.hidden_dims)
    return {"params": params, "opt_state": optax.adam(config.lr).init(params), "key": k_train,
            "step": jnp.zeros((), jnp.int32)}


def update(state, data, member, config: Config, goal_conditioned: bool):
    """One gradient step of behaviour cloning. `member` holds this member's traced policy_data_size, so one compiled
    program trains every data size of a sweep."""
    key, k_batch = jax.random.split(state["key"])
    batch = envs.sample_batch(k_batch, data, member["policy_data_size"], config.batch_size,
                              "actor" if goal_conditioned else "none",
                              actor_p_random=config.actor_p_randomgoal)
    # The policy learns on the transformed representation (the actions, and so the loss, are unchanged).
    for key_name in ("observations", "goals"):
        if key_name in batch:
            batch[key_name] = transform_observations(batch[key_name], config.obs_transform,
                                                     config.obs_transform_frequency)
    params = state["params"]
    (_, info), grad = jax.value_and_grad(bc_actor_loss, has_aux=True)(params["actor"], batch)
    updates, opt_state = optax.adam(config.lr).update({"actor": grad}, state["opt_state"], params)
    params = optax.apply_updates(params, updates)
    return {"params": params, "opt_state": opt_state, "key": key, "step": state["step"] + 1}, info


def make_train_chunk(config: Config, goal_conditioned: bool):
    """jit(over members(scan over log_interval updates)); metrics are averaged over the chunk on device."""

    def chunk(state, data, member):
        def body(carry, _):
            return update(carry, data, member, config, goal_conditioned)

        state, infos = jax.lax.scan(body, state, None, length=config.harness.log_interval)
        return state, jax.tree_util.tree_map(jnp.mean, infos)

    # The dataset is an argument, shared, never a closed-over constant; states are donated (updated in place).
    # Members: vmapped on accelerators, one after another on CPU, where that is faster (runs.over_members).
    return jax.jit(runs.over_members(chunk), donate_argnums=(0,))


def act(params, obs, goals, key, obs_transform: str = "none", obs_transform_frequency: float = 1.0):
    """The action rule: the policy's mean on the --obs-transform representation of the raw observations and goals."""
    transform = lambda x: transform_observations(x, obs_transform, obs_transform_frequency)  # noqa: E731
    return jnp.clip(actor_fn(params["actor"], transform(obs), transform(goals)), -1.0, 1.0)


# The training loop (HARNESS calls: runs.Run keeps the run folders, logs, resume states and result.json) -------------
def main(config: Config) -> list[dict]:
    validate(config)
    spec = envs.parse_env(config.env)
    config, from_table = envs.fill_from_table(config, TABLE_ROW)  # unset flags: the dataset's row of the table
    train, val, validation = envs.load_splits(spec, config.dataset_dir, config.split_seed, config.harness.download)
    gc, h = spec.goal_conditioned, config.harness
    obs_dim, action_dim = train["observations"].shape[1], train["actions"].shape[1]
    run = runs.Run(config, SCRIPT, len(train["actions"]), from_table, validation)
    states = jax.vmap(lambda k: init_state(k, obs_dim, obs_dim if gc else 0, action_dim, config))(run.keys())
    device_data, train_chunk = envs.to_device(train), make_train_chunk(config, gc)
    bc_act = functools.partial(act, obs_transform=config.obs_transform,
                               obs_transform_frequency=config.obs_transform_frequency)
    batched_act = jax.jit(jax.vmap(bc_act, in_axes=(0, 0, 0, None)))

    def policy(obs, goals):  # obs [M, N, d] -> actions [M, N, a]: one jitted call for every member and environment
        return batched_act(states["params"], obs, goals, None)

    # HARNESS: success and the oracle MSEs (envs.py)
    probe = envs.OracleProbe(spec, train, val, run.arrays["policy_data_size"].tolist(), h.mse_samples,
                             config.split_seed)
    evaluator = envs.Evaluator(spec, len(run.seeds), h.eval_episodes, h.eval_envs, max_steps=h.eval_max_steps)
    states = run.resume(states, lambda: probe.train_val(policy))  # --resume: continue bit for bit
    for step in run.chunks():
        states, infos = train_chunk(states, device_data, run.arrays)
        run.record(step, infos, states, lambda step: envs.evaluate(evaluator, probe, policy, run.seeds))
    return run.finish()


if __name__ == "__main__":
    runs.exit_on_usage_error(lambda: main(tyro.cli(Config)))
