"""Behaviour cloning (BC): the imitation baseline every value x extractor pair is compared against, in one file.

What it learns
  A Gaussian policy pi = N(mu(s[, g]), diag(std^2)) (tanh mean, learned state-independent std) fitted to the dataset's
  actions:  L_pi = -E[ log pi(a | s[, g]) ].  On goal-conditioned data the goal is a future state of the same
  trajectory (OGBench's actor goals), i.e. goal-conditioned BC. The agent acts with the mean.

Knobs that matter
  --policy-data-size: the transitions it clones (a prefix of the seeded trajectory order); there is no value function,
    hence no --value-data-size and no alpha. BC is the reference a value-based method has to beat on the same data.
  --obs-transform warp: the paper's representation experiment. The policy sees y = x + 0.9 / w * sin(w * x) of every
    observation and goal coordinate (w = --obs-transform-frequency), a continuous invertible map (dy/dx >= 0.1), so
    no information is lost, only the geometry the network generalizes over changes.

Easy to get wrong
  On goal-conditioned data the goal must be a future state of the same trajectory (what the action was heading
  for), never a random state. And with a learned std, -log pi is not the squared error: compare BC with the other
  scripts by `policy_mse_to_data` and the oracle MSEs, which every script logs, not by its loss.

Run `python algos/bc.py --help` for every flag.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Literal

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # envs.py lives at the repository root

import envs  # noqa: E402  (sets MUJOCO_GL before anything imports mujoco)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import tyro  # noqa: E402
from tqdm import tqdm  # noqa: E402

SCRIPT = "bc"


# ------------------------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------------------------
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
    """Seed of the trajectory permutation and the 10% validation hold-out (shared by all members)."""
    steps: int = 1_000_000
    """Gradient steps."""
    batch_size: int = 256
    """Transitions per batch."""
    hidden_dims: tuple[int, ...] = (512, 512, 512)
    """Hidden layer widths of the policy MLP."""
    lr: float = 3e-4
    """Adam learning rate."""
    log_interval: int = 5_000
    """Steps per jitted training chunk; metrics are logged once per chunk."""
    eval_interval: int = 100_000
    """Steps between evaluations (a multiple of --log-interval); the last step is always evaluated."""
    eval_episodes: int = 5
    """Evaluation episodes per evaluation task (OGBench goal-conditioned envs have 5 tasks)."""
    mse_samples: int = 2048
    """States sampled once from the policy subset and from the validation split for the train / val MSE."""
    obs_transform: Literal["none", "warp"] = "none"
    """Representation of observations and goals the policy sees: none (raw) or warp (x + 0.9/w sin(w x), invertible)."""
    obs_transform_frequency: float = 1.0
    """w of --obs-transform warp, in inverse observation units (> 0); larger folds the state space more finely."""
    checkpoint_interval: int = 0
    """Steps between parameter checkpoints in <out-dir>/checkpoints (0: none)."""
    out_dir: str | None = None
    """Run folder; default runs/<env>/bc/<time>_s<seed>."""
    members_file: str | None = None
    """JSON list of members to train together, one run folder each (scaling.py --pack writes it)."""
    resume: bool = False
    """Continue from the run folder's latest resume state if it has one (scaling.py always asks)."""
    resume_interval: int | None = None
    """Steps between resume states (the whole training state, deleted at the end); default --eval-interval."""
    debug_poison_step: int = 0
    """Test hook: NaN observations from the chunk ending at this step on (0: off), to exercise the NaN guard."""
    progress: bool = True
    """Show a progress bar."""


def validate(config: Config) -> None:
    """Reject bad flags with a one-line UsageError naming the flag."""
    checks = [
        (config.num_seeds >= 1, "--num-seeds must be >= 1"),
        (config.steps >= 1, "--steps must be >= 1"),
        (config.batch_size >= 1, "--batch-size must be >= 1"),
        (len(config.hidden_dims) >= 1 and min(config.hidden_dims) >= 1, "--hidden-dims needs positive widths"),
        (config.log_interval >= 1 and config.steps % config.log_interval == 0,
         f"--steps {config.steps} must be a positive multiple of --log-interval {config.log_interval}"),
        (config.eval_interval >= 1 and config.eval_interval % config.log_interval == 0,
         "--eval-interval must be a positive multiple of --log-interval"),
        (config.checkpoint_interval >= 0 and config.checkpoint_interval % config.log_interval == 0,
         "--checkpoint-interval must be 0 or a multiple of --log-interval"),
        (config.mse_samples >= 1, "--mse-samples must be >= 1"),
        (config.obs_transform_frequency > 0, "--obs-transform-frequency must be > 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise envs.UsageError(message)


# ------------------------------------------------------------------------------------------------------------------
# Networks: pure-JAX MLPs with LayerNorm; parameters are pytrees (lists of dicts)
# ------------------------------------------------------------------------------------------------------------------
def mlp_init(key, sizes: tuple[int, ...]) -> list[dict]:
    params = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        key, sub = jax.random.split(key)
        limit = math.sqrt(6.0 / (fan_in + fan_out))  # Glorot uniform
        layer = {"w": jax.random.uniform(sub, (fan_in, fan_out), minval=-limit, maxval=limit), "b": jnp.zeros(fan_out)}
        if i < len(sizes) - 2:  # hidden layers get LayerNorm
            layer["scale"], layer["shift"] = jnp.ones(fan_out), jnp.zeros(fan_out)
        params.append(layer)
    return params


def mlp_apply(params: list[dict], x):
    for layer in params[:-1]:
        x = jax.nn.gelu(layer_norm(add_bias(x @ layer["w"], layer["b"]), layer["scale"], layer["shift"]))
    return add_bias(x @ params[-1]["w"], params[-1]["b"])


# Speed, not maths: add_bias is x + b and layer_norm is (x - mean) / sqrt(var + 1e-6) * scale + shift. Their gradients
# are mostly sums (a bias's gradient is a sum over the batch), and XLA:CPU sums over an axis several times slower than
# it multiplies by a vector of ones. So every sum here, forward and in the hand-written backward pass, is a matmul
# with ones: 1.47x the updates/s of the textbook MLP on a 2-core CPU (benchmarks/throughput.py). Tests check values
# and gradients against the textbook formulas.
def _mean_last(x):
    """Mean over the last axis, kept as a size-1 axis."""
    return jnp.matmul(x, jnp.full((x.shape[-1], 1), 1.0 / x.shape[-1], x.dtype), precision="highest")


def _sum_leading(x):
    """Sum over every axis but the last: [..., n] -> [n]."""
    rows = x.reshape(-1, x.shape[-1])
    return jnp.matmul(jnp.ones((1, rows.shape[0]), x.dtype), rows, precision="highest")[0]


@jax.custom_vjp
def add_bias(x, bias):
    return x + bias


def _add_bias_fwd(x, bias):
    return x + bias, None


def _add_bias_bwd(_, grad):
    return grad, _sum_leading(grad)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


@jax.custom_vjp
def layer_norm(x, scale, shift):
    return _layer_norm_fwd(x, scale, shift)[0]


def _layer_norm_fwd(x, scale, shift):
    centered = x - _mean_last(x)
    inv_std = jax.lax.rsqrt(_mean_last(centered * centered) + 1e-6)
    normed = centered * inv_std
    return normed * scale + shift, (normed, inv_std, scale)


def _layer_norm_bwd(saved, grad):
    normed, inv_std, scale = saved
    grad_normed = grad * scale
    # Through (x - mean) * inv_std: drop the gradient's mean and its component along `normed`, then rescale.
    grad_x = inv_std * (grad_normed - _mean_last(grad_normed) - normed * _mean_last(grad_normed * normed))
    return grad_x, _sum_leading(grad * normed), _sum_leading(grad)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


def actor_fn(params, obs, goals):
    """Gaussian policy: (mean in [-1, 1], log std [a]); the std is learned and state-independent."""
    mean = jnp.tanh(mlp_apply(params["net"], _inputs(obs, goals)))
    return mean, jnp.clip(params["log_std"], LOG_STD_MIN, LOG_STD_MAX)


def gaussian_log_prob(mean, log_std, actions):
    """log N(actions; mean, diag(exp(log_std)^2)), summed over action dimensions."""
    z = (actions - mean) * jnp.exp(-log_std)
    return (-0.5 * z**2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


def transform_observations(x, kind: str, frequency: float):
    """--obs-transform: the representation the policy sees. warp: y = x + 0.9 / w * sin(w * x) per coordinate, strictly
    increasing (dy/dx = 1 + 0.9 cos(w x) >= 0.1), hence continuous and invertible; none: y = x."""
    if kind == "none" or x is None:
        return x
    return x + 0.9 / frequency * jnp.sin(frequency * x)


def _inputs(obs, goals):
    return obs if goals is None else jnp.concatenate([obs, goals], -1)


def init_params(key, obs_dim: int, goal_dim: int, action_dim: int, hidden_dims: tuple[int, ...]) -> dict:
    return {"actor": {"net": mlp_init(key, (obs_dim + goal_dim, *hidden_dims, action_dim)),
                      "log_std": jnp.zeros(action_dim)}}


# ------------------------------------------------------------------------------------------------------------------
# Loss, returning (loss, info)
# ------------------------------------------------------------------------------------------------------------------
def bc_actor_loss(actor_params, batch):
    mean, log_std = actor_fn(actor_params, batch["observations"], batch.get("goals"))
    log_prob = gaussian_log_prob(mean, log_std, batch["actions"])
    loss = -log_prob.mean()
    info = {"actor_loss": loss, "actor_bc_log_prob": log_prob.mean(), "actor_std_mean": jnp.exp(log_std).mean(),
            "policy_mse_to_data": ((mean - batch["actions"]) ** 2).mean()}
    return loss, info


# ------------------------------------------------------------------------------------------------------------------
# One update, a scanned chunk of updates, and the vmap over members
# ------------------------------------------------------------------------------------------------------------------
def init_state(key, obs_dim, goal_dim, action_dim, config: Config) -> dict:
    k_params, k_train = jax.random.split(key)
    params = init_params(k_params, obs_dim, goal_dim, action_dim, config.hidden_dims)
    return {"params": params, "opt_state": make_optimizer(config).init(params), "key": k_train,
            "step": jnp.zeros((), jnp.int32)}


def make_optimizer(config: Config):
    return optax.adam(config.lr)


def update(state, data, member, config: Config, goal_conditioned: bool):
    """One gradient step of behaviour cloning. `member` holds this member's traced policy_data_size, so one compiled
    program trains every data size of a sweep."""
    key, k_batch = jax.random.split(state["key"])
    batch = envs.sample_batch(k_batch, data, member["policy_data_size"], config.batch_size,
                              "actor" if goal_conditioned else "none")
    # The policy learns on the transformed representation (the actions, and so the loss, are unchanged).
    for key_name in ("observations", "goals"):
        if key_name in batch:
            batch[key_name] = transform_observations(batch[key_name], config.obs_transform,
                                                     config.obs_transform_frequency)
    params = state["params"]
    (_, info), grad = jax.value_and_grad(bc_actor_loss, has_aux=True)(params["actor"], batch)
    updates, opt_state = make_optimizer(config).update({"actor": grad}, state["opt_state"], params)
    params = optax.apply_updates(params, updates)
    return {"params": params, "opt_state": opt_state, "key": key, "step": state["step"] + 1}, info


def make_train_chunk(config: Config, goal_conditioned: bool):
    """jit(vmap over members(scan over log_interval updates)); metrics are averaged over the chunk on device."""

    def chunk(state, data, member):
        def body(carry, _):
            return update(carry, data, member, config, goal_conditioned)

        state, infos = jax.lax.scan(body, state, None, length=config.log_interval)
        return state, jax.tree_util.tree_map(jnp.mean, infos)

    # The dataset is an argument (in_axes None), never a closed-over constant; states are donated (updated in place).
    return jax.jit(jax.vmap(chunk, in_axes=(0, None, 0)), donate_argnums=(0,))


def make_act(config: Config, goal_conditioned: bool):
    """act(actor params [M], obs [M, N, d], goals [M, N, g] or None) -> actions [M, N, a], jitted: the policy's mean
    on the --obs-transform representation of the raw observations and goals."""

    def act(params, obs, goals):
        transform = lambda x: transform_observations(x, config.obs_transform, config.obs_transform_frequency)  # noqa
        return actor_fn(params, transform(obs), transform(goals))[0]

    if goal_conditioned:
        return jax.jit(jax.vmap(act))
    return jax.jit(jax.vmap(lambda p, o: act(p, o, None)))


# ------------------------------------------------------------------------------------------------------------------
# Training loop
# ------------------------------------------------------------------------------------------------------------------
def main(config: Config) -> list[dict]:
    validate(config)
    spec = envs.parse_env(config.env)
    train, val = envs.split_dataset(envs.load_dataset(spec, config.dataset_dir), config.split_seed)
    gc = spec.goal_conditioned
    obs_dim, action_dim = train["observations"].shape[1], train["actions"].shape[1]

    # This program's members: --num-seeds seeds of the flags' setting in one run folder, or a --members-file list
    # (scaling.py --pack) of seeds, data sizes and alphas with one run folder each. Data sizes are traced values.
    runs = envs.Members(config, SCRIPT, train)
    seeds, members, M = runs.seeds, runs.arrays, len(runs.seeds)
    states = jax.vmap(lambda k: init_state(k, obs_dim, obs_dim if gc else 0, action_dim, config))(
        jax.vmap(jax.random.PRNGKey)(jnp.asarray(seeds)))
    device_data = envs.to_device(train)
    train_chunk, act = make_train_chunk(config, gc), make_act(config, gc)

    def policy(obs, goals):  # [M, N, d] -> [M, N, a], one jitted call for every member and environment
        return act(states["params"]["actor"], obs, goals) if gc else act(states["params"]["actor"], obs)

    policy_sizes = members["policy_data_size"].tolist()
    probe = envs.OracleProbe(spec, train, val, policy_sizes, config.mse_samples, config.split_seed)
    evaluator = envs.Evaluator(spec, M, config.eval_episodes)

    def evaluate(step: int) -> list[dict]:
        rollout = evaluator.evaluate(policy, seeds)
        metrics = {"success": rollout["success"].mean(1), "return": rollout["returns"].mean(1),
                   **probe.train_val(policy), **probe.eval(rollout)}
        return envs.member_records("eval", step, seeds, metrics)

    # --resume continues bit for bit: the device state, the loop's progress and metrics.jsonl up to the saved step.
    states, progress = runs.restore(states, envs.Progress.start(M))
    if progress.step == 0:
        runs.log(envs.member_records("init", 0, seeds, probe.train_val(policy)))
    resume_interval = config.eval_interval if config.resume_interval is None else config.resume_interval
    bar = tqdm(total=config.steps, initial=progress.step, desc=f"{SCRIPT} {config.env}", disable=not config.progress,
               unit="step")
    start = time.time() - progress.seconds
    for step in range(progress.step + config.log_interval, config.steps + 1, config.log_interval):
        if step == config.debug_poison_step:
            device_data = envs.poison(device_data)
        chunk_start = time.time()
        states, infos = train_chunk(states, device_data, members)
        infos = jax.device_get(infos)  # the only host transfer of a chunk
        records = envs.member_records("train", step, seeds, infos, seconds=time.time() - start,
                                      updates_per_second=config.log_interval / (time.time() - chunk_start))
        runs.check_finite(step, records, states["params"])  # NaN / inf: failure.json, exit status 3
        if step % config.eval_interval == 0 or step == config.steps:
            progress.last_eval = evaluate(step)
            progress.best_success = np.maximum(progress.best_success, [r["success"] for r in progress.last_eval]
                                               ).tolist()
            records += progress.last_eval
            bar.set_postfix(success=f"{np.mean([r['success'] for r in progress.last_eval]):.2f}")
        runs.log(records)
        if config.checkpoint_interval and step % config.checkpoint_interval == 0:
            runs.checkpoint(step, states["params"])
        progress.step, progress.seconds = step, time.time() - start
        if resume_interval and step % resume_interval == 0 and step < config.steps:
            runs.save_resume(states, progress)
        bar.update(config.log_interval)
    bar.close()

    return runs.finish({"env": config.env, "script": SCRIPT, "steps": config.steps,
                        "wall_seconds": time.time() - start}, progress.last_eval, progress.best_success)


if __name__ == "__main__":
    envs.exit_on_usage_error(lambda: main(tyro.cli(Config)))
