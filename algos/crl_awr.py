"""CRL value learning (contrastive RL) + AWR policy extraction, in one file. Goal-conditioned tasks only.

What it learns
  Value (CRL): a critic Q(s, a, g) = phi(s, a) . psi(g) / sqrt(d), trained as a binary classifier of whether g is a
    future state of (s, a): over a batch of B pairs (s_i, a_i, g_i), g_i drawn a geometric number of steps ahead in
    the same trajectory, the B x B logits l_ij = Q(s_i, a_i, g_j) are labelled 1 on the diagonal, 0 elsewhere:
      L_Q = E_ij[ BCE(l_ij, 1(i = j)) ],  for each of a two-member ensemble (phi_k, psi_k).
    AWR needs a baseline, so a state-only V(s, g) = phi_V(s) . psi_V(g) / sqrt(d) is trained the same way on the same
    pairs. Both are log-density ratios (log Q, log V). No TD, no target networks.
  Policy (AWR, Gaussian policy pi = N(mu(s, g), I): unbounded mean, std fixed at 1, as the reference's; acts with
    clip(mu, -1, 1)):
    L_pi = -E[ min(exp(alpha * (min_k Q_k(s, a, g) - V(s, g))), 100) * log pi(a|s, g) ]

Knobs that matter
  --alpha: the inverse temperature; the paper sweeps {0.3, 1, 3, 10}. Large alpha clones only the best actions,
    and overfits at small policy data; small alpha is plain behaviour cloning.
  --latent-dim: width d of phi and psi (512).
  --discount: the geometric offset of the positive goals (0.99), i.e. CRL's horizon.
  --value-data-size / --policy-data-size: critic, V and policy learn from nested prefixes of one trajectory order.

Easy to get wrong
  The advantage is a difference of logits (log Q - log V), not of probabilities. The weight exp(alpha * A) is a
  constant of the actor's loss and is clipped at 100. CRL needs goals: on a singletask or dm_control environment
  the script exits 2.

Reading guide: `# ALGO LOGIC` marks the algorithm; `# HARNESS`, shared plumbing to skip (envs.py: data, evaluation;
runs.py: run folders, logs, resume; testtime.py: OPEX / TTT). `python algos/crl_awr.py --help`: every flag.
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

SCRIPT, TABLE_ROW = "crl_awr", "crl_awr"  # TABLE_ROW: whose per-dataset table entries (alpha, ...) it takes


# ALGO LOGIC: the algorithm's flags ----------------------------------------------------------------------------------
@dataclasses.dataclass
class Config:
    env: str = "pointmaze-medium-navigate-v0"
    """Goal-conditioned environment / dataset name (`python envs.py list`)."""
    dataset_dir: str = envs.DEFAULT_DATASET_DIR
    """Folder holding the dataset (OGBench .npz, or ExORL <domain>/<algo>/buffer/)."""
    value_data_size: int | None = None
    """Transitions the contrastive critic and V learn from (a prefix of the seeded trajectory order); all if omitted."""
    policy_data_size: int | None = None
    """Transitions the policy learns from (a prefix of the same order); all when omitted."""
    seed: int = 0
    """Seed of the first member; member i uses seed + i. The data split uses --split-seed."""
    num_seeds: int = 1
    """Members trained together in one vmapped program, seeds seed .. seed + num_seeds - 1."""
    split_seed: int = 0
    """Seed of the trajectory permutation (and of the 10% validation hold-out where no -val file exists)."""
    steps: int = 1_000_000
    """Gradient steps (each updates critic, V and actor once)."""
    batch_size: int = 1024
    """Transitions per batch, for the value batch and the policy batch alike."""
    hidden_dims: tuple[int, ...] = (512, 512, 512)
    """Hidden layer widths of every MLP (phi, psi of the critic and of V, actor)."""
    latent_dim: int = 512
    """Width of the contrastive representations phi(s, a) and psi(g)."""
    lr: float = 3e-4
    """Adam learning rate of all networks."""
    alpha: float | None = None
    """AWR inverse temperature (default: the table in envs.py; the paper sweeps {0.3, 1, 3, 10} per environment)."""
    discount: float | None = None
    """Discount of the geometric offset of the critic's positive goals; default: the table in envs.py."""
    actor_p_randomgoal: float | None = None
    """Share of actor goals drawn at random (the rest: the trajectory's future states); default: the table."""
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
        (config.latent_dim >= 1, "--latent-dim must be >= 1"),
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


def representations(params, inputs, goals):
    """phi_k(inputs) and psi_k(goals) for every ensemble member k (parameters stacked on a leading axis): [K, B, d]."""
    phi = jax.vmap(lambda p: mlp_apply(p, inputs))(params["phi"])
    psi = jax.vmap(lambda p: mlp_apply(p, goals))(params["psi"])
    return phi, psi


def contrastive_logits(params, inputs, goals):
    """l[k, i, j] = phi_k(inputs_i) . psi_k(g_j) / sqrt(d): every input against every goal of the batch, [K, B, B]."""
    phi, psi = representations(params, inputs, goals)
    return jnp.einsum("kid,kjd->kij", phi, psi) / math.sqrt(phi.shape[-1])


def critic_fn(params, obs, goals, actions):
    """Q_k(s, a, g) = phi_k(s, a) . psi_k(g) / sqrt(d): the logits' diagonal only, [K, B]."""
    phi, psi = representations(params, jnp.concatenate([obs, actions], -1), goals)
    return (phi * psi).sum(-1) / math.sqrt(phi.shape[-1])


def value_fn(params, obs, goals):
    """V(s, g) = phi_V(s) . psi_V(g) / sqrt(d) (a one-member ensemble) -> [B]."""
    phi, psi = representations(params, obs, goals)
    return (phi * psi).sum(-1)[0] / math.sqrt(phi.shape[-1])


def actor_fn(params, obs, goals):
    """The mean of the Gaussian policy N(mu(s[, g]), I): unbounded, std fixed at 1, no tanh (the reference's); the agent
    acts with clip(mu, -1, 1)."""
    return mlp_apply(params, jnp.concatenate([obs, goals], -1))


def gaussian_log_prob(mean, actions):
    """log N(actions; mean, I), summed over action dimensions: a squared error up to a constant."""
    return (-0.5 * (actions - mean) ** 2 - 0.5 * math.log(2 * math.pi)).sum(-1)


def init_params(key, obs_dim: int, goal_dim: int, action_dim: int, hidden_dims: tuple[int, ...],
                latent_dim: int) -> dict:
    k_phi, k_psi, k_v_phi, k_v_psi, k_actor = jax.random.split(key, 5)
    ensemble = lambda k, sizes, n=2: jax.vmap(lambda kk: mlp_init(kk, sizes))(jax.random.split(k, n))  # noqa: E731
    return {
        "critic": {"phi": ensemble(k_phi, (obs_dim + action_dim, *hidden_dims, latent_dim)),
                   "psi": ensemble(k_psi, (goal_dim, *hidden_dims, latent_dim))},
        "value": {"phi": ensemble(k_v_phi, (obs_dim, *hidden_dims, latent_dim), 1),
                  "psi": ensemble(k_v_psi, (goal_dim, *hidden_dims, latent_dim), 1)},
        "actor": mlp_init(k_actor, (obs_dim + goal_dim, *hidden_dims, action_dim), layer_norm=False, final_scale=0.01),
    }


# ALGO LOGIC: losses, each returning (loss, info) --------------------------------------------------------------------
def binary_nce_loss(logits):
    """Mean binary cross-entropy of logits [K, B, B] against the identity: positives on the diagonal."""
    labels = jnp.eye(logits.shape[-1])
    return optax.sigmoid_binary_cross_entropy(logits, labels).mean()


def contrastive_loss(params, inputs, goals, name: str, stat: str):
    """Binary NCE of one contrastive function (`name` critic, `stat` q) with its diagnostics; the diagonal of the
    logits is the function itself (log Q), so its statistics come for free."""
    logits = contrastive_logits(params, inputs, goals)
    loss = binary_nce_loss(logits)
    eye, mean_logits = jnp.eye(logits.shape[-1]), logits.mean(0)
    diagonal = jnp.diagonal(logits, axis1=1, axis2=2)
    info = {f"{name}_loss": loss, f"{stat}_mean": diagonal.mean(), f"{stat}_max": diagonal.max(),
            f"{stat}_min": diagonal.min(), f"{name}_logits_negative": (mean_logits * (1 - eye)).sum() / (1 - eye).sum(),
            f"{name}_categorical_accuracy": (mean_logits.argmax(1) == jnp.arange(logits.shape[-1])).mean()}
    return loss, info


def contrastive_critic_loss(critic_params, batch):
    inputs = jnp.concatenate([batch["observations"], batch["actions"]], -1)
    return contrastive_loss(critic_params, inputs, batch["goals"], "critic", "q")


def contrastive_value_loss(value_params, batch):
    return contrastive_loss(value_params, batch["observations"], batch["goals"], "value", "v")


AWR_MAX_WEIGHT = 100.0


def awr_actor_loss(actor_params, value_params, critic_params, batch, alpha):
    q = critic_fn(critic_params, batch["observations"], batch["goals"], batch["actions"]).min(0)
    v = value_fn(value_params, batch["observations"], batch["goals"])
    advantage = q - v
    # The weight is a constant of this loss (Q and V are frozen here); clipping keeps a few transitions from dominating.
    weight = jnp.minimum(jnp.exp(alpha * advantage), AWR_MAX_WEIGHT)
    mean = actor_fn(actor_params, batch["observations"], batch["goals"])
    log_prob = gaussian_log_prob(mean, batch["actions"])
    loss = -(jax.lax.stop_gradient(weight) * log_prob).mean()
    info = {"actor_loss": loss, "actor_advantage_mean": advantage.mean(), "awr_weight_mean": weight.mean(),
            "awr_weight_clipped_fraction": (weight >= AWR_MAX_WEIGHT).mean(), "actor_bc_log_prob": log_prob.mean(),
            "policy_mse_to_data": ((mean - batch["actions"]) ** 2).mean()}
    return loss, info


# ALGO LOGIC: one update, and a jitted chunk of updates for every member at once -------------------------------------
def init_state(key, obs_dim, goal_dim, action_dim, config: Config) -> dict:
    k_params, k_train = jax.random.split(key)
    params = init_params(k_params, obs_dim, goal_dim, action_dim, config.hidden_dims, config.latent_dim)
    return {"params": params, "opt_state": optax.adam(config.lr).init(params), "key": k_train,
            "step": jnp.zeros((), jnp.int32)}


def update(state, data, member, config: Config, goal_conditioned: bool = True, online=None):
    """One gradient step on critic, V and actor. `member` holds this member's traced value_data_size,
    policy_data_size and alpha, so one compiled program trains any cell of a data-scaling matrix.
    `online`: this member's online rows (offline-to-online), sampled together with both subsets.
    `goal_conditioned` is always True for CRL (the argument keeps every script's signature the same)."""
    key, k_value_batch, k_policy_batch = jax.random.split(state["key"], 3)
    # Critic goals: always a future state of the same trajectory, at a geometric offset (the positives of the NCE).
    critic_goals = envs.GoalConfig(p_current=0.0, p_trajectory=1.0, p_random=0.0, discount=config.discount)
    value_batch = envs.sample_batch(k_value_batch, data, member["value_data_size"], config.batch_size, "value",
                                    critic_goals, online=online)
    policy_batch = envs.sample_batch(k_policy_batch, data, member["policy_data_size"], config.batch_size, "actor",
                                     online=online, actor_p_random=config.actor_p_randomgoal)
    params = state["params"]
    (_, c_info), c_grad = jax.value_and_grad(contrastive_critic_loss, has_aux=True)(params["critic"], value_batch)
    (_, v_info), v_grad = jax.value_and_grad(contrastive_value_loss, has_aux=True)(params["value"], value_batch)
    # The actor's gradient is taken with respect to the actor's parameters only: V and Q stay fixed inside it.
    (_, a_info), a_grad = jax.value_and_grad(awr_actor_loss, has_aux=True)(
        params["actor"], params["value"], params["critic"], policy_batch, member["alpha"])
    grads = {"critic": c_grad, "value": v_grad, "actor": a_grad}
    updates, opt_state = optax.adam(config.lr).update(grads, state["opt_state"], params)
    params = optax.apply_updates(params, updates)
    new_state = {"params": params, "opt_state": opt_state, "key": key, "step": state["step"] + 1}
    return new_state, {**c_info, **v_info, **a_info}


def make_train_chunk(config: Config, goal_conditioned: bool = True):
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
    """The Q this extractor climbs, and OPEX / TTT with it: log Q (the critic's logit), the min over the ensemble."""
    return critic_fn(params["critic"], obs, goals, actions).min(0)


def mean_action(actor_params, obs, goals):
    """What TTT fine-tunes: the action the policy takes, from actor parameters."""
    return jnp.clip(actor_fn(actor_params, obs, goals), -1.0, 1.0)


# The training loop (HARNESS calls: runs.Run keeps the run folders, logs, resume states and result.json) -------------
def main(config: Config) -> list[dict]:
    validate(config)
    spec = envs.parse_env(config.env)
    if not spec.goal_conditioned:
        raise runs.UsageError(f"{SCRIPT} needs a goal-conditioned environment (CRL's critic is a function of goals), "
                              f"and {config.env} has none; use iql_awr or sarsa_awr for it")
    config, from_table = envs.fill_from_table(config, TABLE_ROW)  # unset flags: the dataset's row of the table
    train, val, validation = envs.load_splits(spec, config.dataset_dir, config.split_seed, config.harness.download)
    h = config.harness
    obs_dim, action_dim = train["observations"].shape[1], train["actions"].shape[1]
    run = runs.Run(config, SCRIPT, len(train["actions"]), from_table, validation)
    states = jax.vmap(lambda k: init_state(k, obs_dim, obs_dim, action_dim, config))(run.keys())
    device_data, train_chunk = envs.to_device(train), make_train_chunk(config, True)
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
