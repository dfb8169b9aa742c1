"""SARSA value learning + DDPG+BC policy extraction, in one file.

What it learns
  Value (SARSA: IQL's losses at expectile 0.5, i.e. the behaviour policy's value; in-sample, dataset actions only):
    L_V = E[ |tau - 1(Qbar - V < 0)| (Qbar - V)^2 ],  Qbar = min(Q1_target, Q2_target)(s, a),  expectile tau
    L_Q = sum_i E[ (r + discount * mask * V(s') - Q_i(s, a))^2 ],  targets Polyak-averaged with rate 0.005
  Policy (DDPG+BC; the policy's mean mu is unbounded, Q is evaluated at, and the agent acts with, clip(mu, -1, 1)):
    L_pi = -E[ min_i Q_i(s, clip(mu(s))) ] / stopgrad(E|Q|) + alpha * E[ 0.5 * ||mu(s) - a||^2 ]
    The BC term is -log pi(a|s) of a unit-std Gaussian up to a constant, so alpha means what it means in the paper.

Knobs that matter
  --alpha: the paper sweeps {0.003, 0.01, 0.03, 0.1, 0.3, 1, 3, 10}; small alpha trusts Q, large alpha clones.
  No --expectile flag: the expectile EXPECTILE = 0.5 (the mean) is what makes it SARSA (iql_*.py has the flag).
  --value-data-size / --policy-data-size: value and policy learn from nested prefixes of one trajectory order.

Easy to get wrong
  The actor's loss is differentiated with respect to the actor's parameters only: Q is a frozen function inside it,
  so value learning never depends on the policy. And the Q normalisation is stop-gradient, or the actor learns to
  shrink |Q| instead of raising Q. `--tau` is the Polyak rate of the targets; the expectile is fixed at 0.5.

Reading guide: `# ALGO LOGIC` marks the algorithm; `# HARNESS`, shared plumbing to skip (envs.py: data, evaluation;
runs.py: run folders, logs, resume; testtime.py: OPEX / TTT). `python algos/sarsa_ddpgbc.py --help`: every flag.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # after the script's own folder: a fork's copies win

import envs  # noqa: E402  (sets MUJOCO_GL before anything imports mujoco)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
import runs  # noqa: E402
import testtime  # noqa: E402
import tyro  # noqa: E402

SCRIPT, TABLE_ROW = "sarsa_ddpgbc", "sarsa_ddpgbc"  # TABLE_ROW: whose per-dataset table entries (alpha, ...) it takes
EXPECTILE = 0.5  # the mean, not an upper expectile: the behaviour policy's value


# ALGO LOGIC: the algorithm's flags ----------------------------------------------------------------------------------
@dataclasses.dataclass
class Config:
    env: str = "pointmaze-medium-navigate-v0"
    """Environment / dataset name (`python envs.py list`)."""
    dataset_dir: str = envs.DEFAULT_DATASET_DIR
    """Folder holding the dataset (OGBench .npz, or ExORL <domain>/<algo>/buffer/)."""
    value_data_size: int | None = None
    """Transitions the value function learns from (a prefix of the seeded trajectory order); all when omitted."""
    policy_data_size: int | None = None
    """Transitions the policy learns from (a prefix of the same order); all when omitted."""
    seed: int = 0
    """Seed of the first member; member i uses seed + i. The data split uses --split-seed."""
    num_seeds: int = 1
    """Members trained together in one vmapped program, seeds seed .. seed + num_seeds - 1."""
    split_seed: int = 0
    """Seed of the trajectory permutation (and of the 10% validation hold-out where no -val file exists)."""
    steps: int = 1_000_000
    """Gradient steps (each updates value, critic and actor once)."""
    batch_size: int = 1024
    """Transitions per batch, for the value batch and the policy batch alike."""
    hidden_dims: tuple[int, ...] = (512, 512, 512)
    """Hidden layer widths of every MLP (value, twin critics, actor)."""
    lr: float = 3e-4
    """Adam learning rate of all networks."""
    alpha: float | None = None
    """DDPG+BC behaviour-cloning weight (default: the table in envs.py; the paper sweeps it per environment)."""
    discount: float | None = None
    """Discount factor (also the geometric goal-offset discount of goal sampling); default: the table in envs.py."""
    actor_p_randomgoal: float | None = None
    """Share of actor goals drawn at random (the rest: the trajectory's future states); default: the table."""
    tau: float = 0.005
    """Polyak rate of the target critics."""
    harness: runs.QHarnessFlags = dataclasses.field(default_factory=runs.QHarness)
    """HARNESS: logging, evaluation, test time, online, run folders, resume (runs.QHarness; flags flattened)."""


def validate(config: Config) -> None:
    """Reject bad flags with a one-line UsageError naming the flag; the harness checks its own."""
    runs.check([
        (config.num_seeds >= 1, "--num-seeds must be >= 1"),
        (config.steps >= 1, "--steps must be >= 1"),
        (config.batch_size >= 1, "--batch-size must be >= 1"),
        (len(config.hidden_dims) >= 1 and min(config.hidden_dims) >= 1, "--hidden-dims needs positive widths"),
        (config.alpha is None or config.alpha >= 0, "--alpha must be >= 0"),
        (config.discount is None or 0 < config.discount < 1, "--discount must be in (0, 1) (geometric goal offsets)"),
        (0 < config.tau <= 1, "--tau must be in (0, 1]"),
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


def value_fn(params, obs, goals):
    """V(s[, g]) -> [B]."""
    return mlp_apply(params, _inputs(obs, goals))[..., 0]


def critic_fn(params, obs, goals, actions):
    """Twin Q(s, a[, g]) -> [2, B]; the two critics' parameters are stacked on a leading axis."""
    x = jnp.concatenate([_inputs(obs, goals), actions], -1)
    return jax.vmap(lambda p: mlp_apply(p, x)[..., 0])(params)


def actor_fn(params, obs, goals):
    """The policy's mean mu(s[, g]), unbounded (the reference's Gaussian with fixed std 1 and no tanh); the agent acts
    with clip(mu, -1, 1), and Q is evaluated there."""
    return mlp_apply(params, _inputs(obs, goals))


def _inputs(obs, goals):
    return obs if goals is None else jnp.concatenate([obs, goals], -1)


def init_params(key, obs_dim: int, goal_dim: int, action_dim: int, hidden_dims: tuple[int, ...]) -> dict:
    k_value, k_critic, k_actor = jax.random.split(key, 3)
    state_dim = obs_dim + goal_dim
    critic = jax.vmap(lambda k: mlp_init(k, (state_dim + action_dim, *hidden_dims, 1)))(jax.random.split(k_critic))
    return {"value": mlp_init(k_value, (state_dim, *hidden_dims, 1)), "critic": critic,
            "actor": mlp_init(k_actor, (state_dim, *hidden_dims, action_dim), layer_norm=False, final_scale=0.01)}


# ALGO LOGIC: losses, each returning (loss, info) --------------------------------------------------------------------
def expectile_loss(diff, expectile):
    """|tau - 1(diff < 0)| * diff^2, elementwise, with diff = Qbar - V."""
    weight = jnp.where(diff < 0, 1.0 - expectile, expectile)
    return weight * diff**2


def value_loss(value_params, target_critic_params, batch, expectile):
    q = critic_fn(target_critic_params, batch["observations"], batch.get("goals"), batch["actions"]).min(0)
    v = value_fn(value_params, batch["observations"], batch.get("goals"))
    loss = expectile_loss(q - v, expectile).mean()
    return loss, {"value_loss": loss, "v_mean": v.mean(), "advantage_mean": (q - v).mean()}


def critic_loss(critic_params, value_params, batch, discount):
    next_v = value_fn(value_params, batch["next_observations"], batch.get("goals"))
    target = batch["rewards"] + discount * batch["masks"] * next_v
    q = critic_fn(critic_params, batch["observations"], batch.get("goals"), batch["actions"])
    loss = ((q - jax.lax.stop_gradient(target)) ** 2).mean(1).sum()
    return loss, {"critic_loss": loss, "q_mean": q.mean(), "q_max": q.max(), "q_min": q.min()}


def ddpgbc_actor_loss(actor_params, critic_params, batch, alpha):
    mu = actor_fn(actor_params, batch["observations"], batch.get("goals"))
    q = critic_fn(critic_params, batch["observations"], batch.get("goals"), jnp.clip(mu, -1.0, 1.0)).min(0)
    # Normalising by the (stop-gradient) mean |Q| makes alpha independent of the reward scale.
    q_loss = -q.mean() / jax.lax.stop_gradient(jnp.abs(q).mean() + 1e-6)
    bc_loss = 0.5 * ((mu - batch["actions"]) ** 2).sum(-1).mean()  # = -log N(a; mu, I) + const
    loss = q_loss + alpha * bc_loss
    info = {"actor_loss": loss, "actor_q_loss": q_loss, "actor_bc_loss": bc_loss,
            "actor_bc_log_prob": -bc_loss - 0.5 * mu.shape[-1] * math.log(2 * math.pi),
            "policy_mse_to_data": ((mu - batch["actions"]) ** 2).mean()}
    return loss, info


# ALGO LOGIC: one update, and a jitted chunk of updates for every member at once -------------------------------------
def init_state(key, obs_dim, goal_dim, action_dim, config: Config) -> dict:
    k_params, k_train = jax.random.split(key)
    params = init_params(k_params, obs_dim, goal_dim, action_dim, config.hidden_dims)
    # The target starts as a copy (a distinct buffer: the training state is donated to each jitted chunk).
    target_critic = jax.tree_util.tree_map(jnp.copy, params["critic"])
    return {"params": params, "target_critic": target_critic, "opt_state": optax.adam(config.lr).init(params),
            "key": k_train, "step": jnp.zeros((), jnp.int32)}


def update(state, data, member, config: Config, goal_conditioned: bool, online=None):
    """One gradient step on value, critics and actor. `member` holds this member's traced value_data_size,
    policy_data_size and alpha (the member's, not config.alpha: scaling.py packs members of different alphas), so one
    compiled program trains any cell of a data-scaling matrix. `online`: this member's online rows, if any."""
    key, k_value_batch, k_policy_batch = jax.random.split(state["key"], 3)
    value_batch = envs.sample_batch(k_value_batch, data, member["value_data_size"], config.batch_size,
                                    "value" if goal_conditioned else "none", envs.GoalConfig(discount=config.discount),
                                    online=online)
    policy_batch = envs.sample_batch(k_policy_batch, data, member["policy_data_size"], config.batch_size,
                                     "actor" if goal_conditioned else "none",
                                     online=online, actor_p_random=config.actor_p_randomgoal)
    params = state["params"]
    (_, v_info), v_grad = jax.value_and_grad(value_loss, has_aux=True)(
        params["value"], state["target_critic"], value_batch, EXPECTILE)
    (_, c_info), c_grad = jax.value_and_grad(critic_loss, has_aux=True)(
        params["critic"], params["value"], value_batch, config.discount)
    # The actor's gradient is taken with respect to the actor's parameters only: the critics stay fixed inside it.
    (_, a_info), a_grad = jax.value_and_grad(ddpgbc_actor_loss, has_aux=True)(
        params["actor"], params["critic"], policy_batch, member["alpha"])
    grads = {"value": v_grad, "critic": c_grad, "actor": a_grad}
    updates, opt_state = optax.adam(config.lr).update(grads, state["opt_state"], params)
    params = optax.apply_updates(params, updates)
    # Polyak towards the critic as it was before this step's Adam update (the reference's order).
    target = jax.tree_util.tree_map(lambda t, p: (1 - config.tau) * t + config.tau * p, state["target_critic"],
                                    state["params"]["critic"])
    new_state = {"params": params, "target_critic": target, "opt_state": opt_state, "key": key,
                 "step": state["step"] + 1}
    return new_state, {**v_info, **c_info, **a_info}


def make_train_chunk(config: Config, goal_conditioned: bool):
    """jit(over members(scan over log_interval updates)); metrics are averaged over the chunk on device."""

    def chunk(state, data, member, online):
        def body(carry, _):
            return update(carry, data, member, config, goal_conditioned, online)

        state, infos = jax.lax.scan(body, state, None, length=config.harness.log_interval)
        return state, jax.tree_util.tree_map(jnp.mean, infos)

    # The dataset is an argument, never a closed-over constant; states are donated. `online`: None offline, else
    # each member's online rows. Members: vmapped on accelerators, one after another on CPU (runs.over_members).
    return jax.jit(runs.over_members(chunk), donate_argnums=(0,))


def act(params, obs, goals, key):
    """The action rule: the policy's mean, clipped to the action box (`key` unused; SfBC's rule samples)."""
    return jnp.clip(actor_fn(params["actor"], obs, goals), -1.0, 1.0)


def q_value(params, obs, goals, actions):
    """The Q this extractor climbs, and OPEX / TTT with it: the min of the twin critics."""
    return critic_fn(params["critic"], obs, goals, actions).min(0)


def mean_action(actor_params, obs, goals):
    """What TTT fine-tunes: the action the policy takes, from actor parameters."""
    return jnp.clip(actor_fn(actor_params, obs, goals), -1.0, 1.0)


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
    batched_act = jax.jit(jax.vmap(act, in_axes=(0, 0, 0, None)))

    def policy(obs, goals):  # obs [M, N, d] -> actions [M, N, a]: one jitted call for every member and environment
        return batched_act(states["params"], obs, goals, None)

    # HARNESS: success and the oracle MSEs (envs.py), and --test-time methods on the same episodes (testtime.py)
    probe = envs.OracleProbe(spec, train, val, run.arrays["policy_data_size"].tolist(), h.mse_samples,
                             config.split_seed)
    evaluator = envs.Evaluator(spec, len(run.seeds), h.eval_episodes, h.eval_envs, max_steps=h.eval_max_steps)
    test_time = testtime.Methods(h, evaluator, probe, act, q_value, mean_action)

    def evaluate(step):
        return {**envs.evaluate(evaluator, probe, policy, run.seeds),
                **test_time.metrics(states["params"], run.seeds, step)}

    online = envs.OnlineBuffer(spec, run.seeds, h.online_steps, h.online_noise) if h.online_steps else None
    states = run.resume(states, lambda: probe.train_val(policy))  # --resume: continue bit for bit
    for step in run.chunks():
        # Offline-to-online: after --steps, collect --log-interval environment steps before each chunk.
        online_rows = online.collect(policy, h.log_interval) if step > config.steps else None
        states, infos = train_chunk(states, device_data, run.arrays, online_rows)
        run.record(step, {**infos, **(online.metrics() if online_rows else {})}, states, evaluate)
    return run.finish()


if __name__ == "__main__":
    runs.exit_on_usage_error(lambda: main(tyro.cli(Config)))
