"""SARSA value learning + AWR policy extraction, in one file.

What it learns
  Value (SARSA: IQL's losses at expectile tau = 0.5, so V and Q are the value of the behaviour policy that
  collected the data, not of the best policy in its support; in-sample, only dataset actions are ever evaluated):
    L_V = E[ 0.5 (Qbar - V)^2 ],  Qbar = min(Q1_target, Q2_target)(s, a)    (|tau - 1(Qbar - V < 0)| = 0.5 always)
    L_Q = sum_i E[ (r + discount * mask * V(s') - Q_i(s, a))^2 ],  targets Polyak-averaged with rate 0.005
  Policy (AWR, Gaussian policy pi = N(mu(s), diag(std^2)), tanh mean, learned state-independent std):
    L_pi = -E[ min(exp(alpha * (min_i Q_i(s, a) - V(s))), 100) * log pi(a|s) ]   (advantage-weighted cloning)

Knobs that matter
  --alpha: the inverse temperature; the paper sweeps {0.3, 1, 3, 10}. Large alpha clones only the best actions,
    and overfits at small policy data; small alpha is plain behaviour cloning.
  No --expectile flag: 0.5 is what makes it SARSA (iql_*.py has the flag).
  --value-data-size / --policy-data-size: value and policy learn from nested prefixes of one trajectory order.

Easy to get wrong
  The weight exp(alpha * A) is a constant of the actor's loss (no gradient flows into Q or V), and it is clipped at
  100, or a few high-advantage transitions dominate the batch. AWR only reweights dataset actions: its policy cannot
  leave the span of the data's actions, which is why it extracts less from the same Q than DDPG+BC (PAPER.md).

Run `python algos/sarsa_awr.py --help` for every flag.
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

SCRIPT = "sarsa_awr"
EXPECTILE = 0.5  # the mean, not an upper expectile: the behaviour policy's value


# ------------------------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------------------------
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
    """Seed of the trajectory permutation and the 10% validation hold-out (shared by all members)."""
    steps: int = 1_000_000
    """Gradient steps (each updates value, critic and actor once)."""
    batch_size: int = 256
    """Transitions per batch, for the value batch and the policy batch alike."""
    hidden_dims: tuple[int, ...] = (512, 512, 512)
    """Hidden layer widths of every MLP (value, twin critics, actor)."""
    lr: float = 3e-4
    """Adam learning rate of all networks."""
    alpha: float = 3.0
    """AWR inverse temperature (OURS as a default; the paper sweeps {0.3, 1, 3, 10} per environment)."""
    discount: float = 0.99
    """Discount factor (also the geometric goal-offset discount of goal sampling)."""
    tau: float = 0.005
    """Polyak rate of the target critics."""
    log_interval: int = 5_000
    """Steps per jitted training chunk; metrics are logged once per chunk."""
    eval_interval: int = 100_000
    """Steps between evaluations (a multiple of --log-interval); the last step is always evaluated."""
    eval_episodes: int = 5
    """Evaluation episodes per evaluation task (OGBench goal-conditioned envs have 5 tasks)."""
    mse_samples: int = 2048
    """States sampled once from the policy subset and from the validation split for the train / val MSE."""
    test_time: tuple[Literal["opex", "ttt"], ...] = ()
    """Test-time methods evaluated beside the plain policy on the same episodes at each evaluation (e.g. opex ttt)."""
    opex_beta: float = 0.1
    """OPEX step size: a <- clip(a + beta * dQ/da); with --opex-normalize, the step length in action units."""
    opex_steps: int = 1
    """OPEX gradient steps per action (>= 1)."""
    opex_normalize: bool = True
    """Divide OPEX's action gradient by its norm per state (OURS: makes beta independent of the scale of Q)."""
    ttt_steps_per_env_step: int = 1
    """TTT: Adam steps on the policy copy after every environment step."""
    ttt_lr: float = 1e-4
    """TTT: learning rate of the policy copy (0 gives plain evaluation)."""
    ttt_batch_size: int = 64
    """TTT: visited states per gradient step, drawn from the copy's buffer."""
    ttt_alpha: float = 1.0
    """TTT: weight of staying near the pre-trained policy's actions (DDPG+BC's alpha; larger changes less)."""
    ttt_reset: Literal["episode", "never"] = "episode"
    """TTT: a fresh policy copy per evaluation episode, or one per member shared by its lockstep episodes."""
    online_steps: int = 0
    """Offline-to-online: environment steps after the --steps offline updates, one update each (0: offline only)."""
    online_noise: float = 0.1
    """Offline-to-online: std of the Gaussian noise added to the policy's actions while collecting (OURS)."""
    checkpoint_interval: int = 0
    """Steps between parameter checkpoints in <out-dir>/checkpoints (0: none)."""
    out_dir: str | None = None
    """Run folder; default runs/<env>/sarsa_awr/<time>_s<seed>."""
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
        (config.alpha >= 0, "--alpha must be >= 0"),
        (0 < config.discount <= 1, "--discount must be in (0, 1]"),
        (0 < config.tau <= 1, "--tau must be in (0, 1]"),
        (config.log_interval >= 1 and config.steps % config.log_interval == 0,
         f"--steps {config.steps} must be a positive multiple of --log-interval {config.log_interval}"),
        (config.eval_interval >= 1 and config.eval_interval % config.log_interval == 0,
         "--eval-interval must be a positive multiple of --log-interval"),
        (config.checkpoint_interval >= 0 and config.checkpoint_interval % config.log_interval == 0,
         "--checkpoint-interval must be 0 or a multiple of --log-interval"),
        (config.mse_samples >= 1, "--mse-samples must be >= 1"),
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


def value_fn(params, obs, goals):
    """V(s[, g]) -> [B]."""
    return mlp_apply(params, _inputs(obs, goals))[..., 0]


def critic_fn(params, obs, goals, actions):
    """Twin Q(s, a[, g]) -> [2, B]; the two critics' parameters are stacked on a leading axis."""
    x = jnp.concatenate([_inputs(obs, goals), actions], -1)
    return jax.vmap(lambda p: mlp_apply(p, x)[..., 0])(params)


LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


def actor_fn(params, obs, goals):
    """Gaussian policy: (mean in [-1, 1], log std [a]); the std is learned and state-independent."""
    mean = jnp.tanh(mlp_apply(params["net"], _inputs(obs, goals)))
    return mean, jnp.clip(params["log_std"], LOG_STD_MIN, LOG_STD_MAX)


def gaussian_log_prob(mean, log_std, actions):
    """log N(actions; mean, diag(exp(log_std)^2)), summed over action dimensions."""
    z = (actions - mean) * jnp.exp(-log_std)
    return (-0.5 * z**2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


def _inputs(obs, goals):
    return obs if goals is None else jnp.concatenate([obs, goals], -1)


def init_params(key, obs_dim: int, goal_dim: int, action_dim: int, hidden_dims: tuple[int, ...]) -> dict:
    k_value, k_critic, k_actor = jax.random.split(key, 3)
    state_dim = obs_dim + goal_dim
    critic = jax.vmap(lambda k: mlp_init(k, (state_dim + action_dim, *hidden_dims, 1)))(jax.random.split(k_critic))
    return {
        "value": mlp_init(k_value, (state_dim, *hidden_dims, 1)),
        "critic": critic,
        "actor": {"net": mlp_init(k_actor, (state_dim, *hidden_dims, action_dim)), "log_std": jnp.zeros(action_dim)},
    }


# ------------------------------------------------------------------------------------------------------------------
# Losses, each returning (loss, info)
# ------------------------------------------------------------------------------------------------------------------
def expectile_loss(diff, expectile):
    """|tau - 1(diff < 0)| * diff^2, elementwise, with diff = Qbar - V; at tau = 0.5 it is half the squared error."""
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


AWR_MAX_WEIGHT = 100.0


def awr_actor_loss(actor_params, value_params, critic_params, batch, alpha):
    q = critic_fn(critic_params, batch["observations"], batch.get("goals"), batch["actions"]).min(0)
    v = value_fn(value_params, batch["observations"], batch.get("goals"))
    advantage = q - v
    # The weight is a constant of this loss (Q and V are frozen here); clipping keeps a few transitions from dominating.
    weight = jnp.minimum(jnp.exp(alpha * advantage), AWR_MAX_WEIGHT)
    mean, log_std = actor_fn(actor_params, batch["observations"], batch.get("goals"))
    log_prob = gaussian_log_prob(mean, log_std, batch["actions"])
    loss = -(jax.lax.stop_gradient(weight) * log_prob).mean()
    info = {"actor_loss": loss, "actor_advantage_mean": advantage.mean(), "awr_weight_mean": weight.mean(),
            "awr_weight_clipped_fraction": (weight >= AWR_MAX_WEIGHT).mean(), "actor_bc_log_prob": log_prob.mean(),
            "actor_std_mean": jnp.exp(log_std).mean(), "policy_mse_to_data": ((mean - batch["actions"]) ** 2).mean()}
    return loss, info


# ------------------------------------------------------------------------------------------------------------------
# One update, a scanned chunk of updates, and the vmap over members
# ------------------------------------------------------------------------------------------------------------------
def init_state(key, obs_dim, goal_dim, action_dim, config: Config) -> dict:
    k_params, k_train = jax.random.split(key)
    params = init_params(k_params, obs_dim, goal_dim, action_dim, config.hidden_dims)
    # The target starts as a copy (a distinct buffer: the training state is donated to each jitted chunk).
    target_critic = jax.tree_util.tree_map(jnp.copy, params["critic"])
    return {"params": params, "target_critic": target_critic, "opt_state": make_optimizer(config).init(params),
            "key": k_train, "step": jnp.zeros((), jnp.int32)}


def make_optimizer(config: Config):
    return optax.adam(config.lr)


def update(state, data, member, config: Config, goal_conditioned: bool, online=None):
    """One gradient step on value, critics and actor. `member` holds this member's traced value_data_size,
    policy_data_size and alpha, so one compiled program trains any cell of a data-scaling matrix.
    `online`: this member's online rows (offline-to-online), sampled together with both subsets."""
    key, k_value_batch, k_policy_batch = jax.random.split(state["key"], 3)
    value_batch = envs.sample_batch(k_value_batch, data, member["value_data_size"], config.batch_size,
                                    "value" if goal_conditioned else "none", envs.GoalConfig(discount=config.discount),
                                    online=online)
    policy_batch = envs.sample_batch(k_policy_batch, data, member["policy_data_size"], config.batch_size,
                                     "actor" if goal_conditioned else "none", online=online)
    params = state["params"]
    (_, v_info), v_grad = jax.value_and_grad(value_loss, has_aux=True)(
        params["value"], state["target_critic"], value_batch, EXPECTILE)
    (_, c_info), c_grad = jax.value_and_grad(critic_loss, has_aux=True)(
        params["critic"], params["value"], value_batch, config.discount)
    # The actor's gradient is taken with respect to the actor's parameters only: V and Q stay fixed inside it.
    (_, a_info), a_grad = jax.value_and_grad(awr_actor_loss, has_aux=True)(
        params["actor"], params["value"], params["critic"], policy_batch, member["alpha"])
    grads = {"value": v_grad, "critic": c_grad, "actor": a_grad}
    updates, opt_state = make_optimizer(config).update(grads, state["opt_state"], params)
    params = optax.apply_updates(params, updates)
    target = jax.tree_util.tree_map(lambda t, p: (1 - config.tau) * t + config.tau * p, state["target_critic"],
                                    params["critic"])
    new_state = {"params": params, "target_critic": target, "opt_state": opt_state, "key": key,
                 "step": state["step"] + 1}
    return new_state, {**v_info, **c_info, **a_info}


def make_train_chunk(config: Config, goal_conditioned: bool):
    """jit(vmap over members(scan over log_interval updates)); metrics are averaged over the chunk on device."""

    def chunk(state, data, member, online):
        def body(carry, _):
            return update(carry, data, member, config, goal_conditioned, online)

        state, infos = jax.lax.scan(body, state, None, length=config.log_interval)
        return state, jax.tree_util.tree_map(jnp.mean, infos)

    # The dataset is an argument (in_axes None), never a closed-over constant; states are donated (updated in place).
    # `online`: None offline, else each member's online rows (in_axes 0).
    return jax.jit(jax.vmap(chunk, in_axes=(0, None, 0, 0)), donate_argnums=(0,))


def make_act(goal_conditioned: bool):
    """act(actor params [M], obs [M, N, d], goals [M, N, g] or None) -> actions [M, N, a], jitted: the policy's mean."""

    def act(params, obs, goals):
        return actor_fn(params, obs, goals)[0]

    if goal_conditioned:
        return jax.jit(jax.vmap(act))
    return jax.jit(jax.vmap(lambda p, o: act(p, o, None)))


def make_test_time(config: Config, evaluator, method: str):
    """One --test-time method, opex or ttt (envs.TestTime), from this script's action rule (the AWR policy's mean), the
    Q its extractor climbs (min of the twin critics) and the policy's mean action (what TTT trains)."""

    def act(params, obs, goals, key):
        return actor_fn(params["actor"], obs, goals)[0]

    def q_value(params, obs, goals, actions):
        return critic_fn(params["critic"], obs, goals, actions).min(0)

    def mean_action(actor, obs, goals):
        return actor_fn(actor, obs, goals)[0]

    return envs.TestTime(config, evaluator, method, act, q_value, mean_action)


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
    train_chunk, act = make_train_chunk(config, gc), make_act(gc)

    def policy(obs, goals):  # [M, N, d] -> [M, N, a], one jitted call for every member and environment
        return act(states["params"]["actor"], obs, goals) if gc else act(states["params"]["actor"], obs)

    policy_sizes = members["policy_data_size"].tolist()
    probe = envs.OracleProbe(spec, train, val, policy_sizes, config.mse_samples, config.split_seed)
    evaluator = envs.Evaluator(spec, M, config.eval_episodes)
    test_time = {method: make_test_time(config, evaluator, method) for method in config.test_time}

    def evaluate(step: int) -> list[dict]:
        metrics = {**envs.rollout_metrics(evaluator.evaluate(policy, seeds), probe), **probe.train_val(policy)}
        for method, improved in test_time.items():  # the same episodes (same seeds) again, acting with OPEX / TTT
            rollout = evaluator.evaluate(improved.policy(states["params"], seeds, step), seeds)
            metrics.update(envs.rollout_metrics(rollout, probe, f"{method}_"))
        return envs.member_records("eval", step, seeds, metrics)

    # --resume continues bit for bit: the device state, the loop's progress and metrics.jsonl up to the saved step.
    states, progress = runs.restore(states, envs.Progress.start(M))
    if progress.step == 0:
        runs.log(envs.member_records("init", 0, seeds, probe.train_val(policy)))
    resume_interval = config.eval_interval if config.resume_interval is None else config.resume_interval
    # Offline-to-online (--online-steps): after the offline steps, each chunk first collects --log-interval
    # environment steps with the current policy, then trains on the offline subsets and the online rows together.
    online = envs.OnlineBuffer(spec, seeds, config.online_steps, config.online_noise) if config.online_steps else None
    total_steps = config.steps + config.online_steps
    bar = tqdm(total=total_steps, initial=progress.step, desc=f"{SCRIPT} {config.env}", disable=not config.progress,
               unit="step")
    start = time.time() - progress.seconds
    for step in range(progress.step + config.log_interval, total_steps + 1, config.log_interval):
        if step == config.debug_poison_step:
            device_data = envs.poison(device_data)
        online_rows = online.collect(policy, config.log_interval) if step > config.steps else None
        chunk_start = time.time()
        states, infos = train_chunk(states, device_data, members, online_rows)
        infos = jax.device_get(infos)  # the only host transfer of a chunk
        if online_rows is not None:
            infos = {**infos, **online.metrics()}
        records = envs.member_records("train", step, seeds, infos, seconds=time.time() - start,
                                      updates_per_second=config.log_interval / (time.time() - chunk_start))
        runs.check_finite(step, records, states["params"])  # NaN / inf: failure.json, exit status 3
        if step % config.eval_interval == 0 or step in (config.steps, total_steps):
            progress.last_eval = evaluate(step)
            progress.best_success = np.maximum(progress.best_success, [r["success"] for r in progress.last_eval]
                                               ).tolist()
            records += progress.last_eval
            bar.set_postfix(success=f"{np.mean([r['success'] for r in progress.last_eval]):.2f}")
        runs.log(records)
        if config.checkpoint_interval and step % config.checkpoint_interval == 0:
            runs.checkpoint(step, states["params"])
        progress.step, progress.seconds = step, time.time() - start
        if envs.resume_due(step, resume_interval, config.steps, total_steps):
            runs.save_resume(states, progress)
        bar.update(config.log_interval)
    bar.close()

    return runs.finish({"env": config.env, "script": SCRIPT, "steps": config.steps,
                        "wall_seconds": time.time() - start}, progress.last_eval, progress.best_success)


if __name__ == "__main__":
    envs.exit_on_usage_error(lambda: main(tyro.cli(Config)))
