"""testtime.py: test-time policy improvement, the paper's remedies for poor test-time generalization (B3).

    OPEX  move the policy's action up the frozen Q at every step: a <- clip(a + beta * dQ(s, a)/da, -1, 1)
    TTT   keep training a copy of the policy on the states it visits, with DDPG+BC's objective anchored at the
          pre-trained policy's actions: -Q(s, mu(s)) / stopgrad(E|Q|) + alpha/2 ||mu(s) - mu_0(s)||^2

A script with a Q function hands `Methods` three single-member functions: its action rule `act(params, obs, goals,
key)`, the Q its extractor maximises `q_value(params, obs, goals, actions) -> [N]`, and its policy's mean
`mean_action(actor_params, obs, goals)`. Each evaluation then runs the same episodes plainly and once per method in
--test-time, and logs them side by side (`success`, `opex_success`, `ttt_success`; `_return`, `_eval_mse`).
The flags (--test-time, --opex-*, --ttt-*) are `runs.QHarness`'s.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import envs
import runs


def opex_actions(q_of_actions: Callable, actions, beta: float, steps: int, normalize: bool):
    """OPEX: `steps` moves up the frozen Q, a <- clip(a + beta * g, -1, 1) with g = dQ(s, a)/da, divided by its norm
    per state when `normalize` (then beta is the step length in action units). No parameter changes."""

    def move(a, _):
        g = jax.grad(lambda a: q_of_actions(a).sum())(a)  # states are independent: the sum's gradient is per state
        if normalize:
            g = g / (jnp.linalg.norm(g, axis=-1, keepdims=True) + 1e-8)
        return jnp.clip(a + beta * g, -1.0, 1.0), None

    return jax.lax.scan(move, actions, None, length=steps)[0]


def ttt_loss(actor_params, anchor_actions, params, obs, goals, q_value: Callable, mean_action: Callable,
             alpha: float):
    """TTT's DDPG+BC objective on visited states: raise the (normalised, frozen) Q of the policy's action and stay
    near the pre-trained policy's action there: -Q(s, mu(s)) / stopgrad(E|Q|) + alpha/2 ||mu(s) - mu_0(s)||^2."""
    mu = mean_action(actor_params, obs, goals)
    q = q_value(params, obs, goals, mu)
    q_loss = -q.mean() / jax.lax.stop_gradient(jnp.abs(q).mean() + 1e-8)
    return q_loss + alpha * 0.5 * ((mu - anchor_actions) ** 2).sum(-1).mean()


def ttt_gradient(actor_params, params, obs, goals, q_value: Callable, mean_action: Callable, alpha: float):
    """The gradient of `ttt_loss` for the copy `actor_params`, anchored at the pre-trained policy's actions on these
    states (`params["actor"]`, never the copy's own: then the anchor term would vanish)."""
    anchor = mean_action(params["actor"], obs, goals)
    return jax.grad(ttt_loss)(actor_params, anchor, params, obs, goals, q_value, mean_action, alpha)


def sample_visited(key, valid, filled, count: int):
    """`count` buffer rows drawn uniformly among the states of episodes that were still running when stored (`valid`),
    or among all `filled` rows while there is none (a copy whose episodes all ended acts for nobody)."""
    rows = jnp.arange(valid.shape[0])
    eligible = valid | (~valid.any() & (rows < filled))
    return jax.random.choice(key, rows, (count,), p=eligible / eligible.sum())


class TestTime:
    """One test-time `method` ("opex" or "ttt") for one script: `policy(params, seeds, step)` returns the batched
    callable the Evaluator steps the environments with (obs [M, E, d], goals [M, E, g] | None -> actions [M, E, a]).

    opex  act with the script's rule, then `opex_actions` on the frozen Q (SfBC: from the chosen candidate).
    ttt   a copy of the actor per episode (`--ttt-reset episode`: fresh at each of the Evaluator's waves) or one per
          member shared by its episodes (`never`: kept for the whole evaluation, across waves; the episodes of a
          wave run in lockstep, the waves one after the other). At every environment step the visited state
          of a running episode is written to the copy's fixed-size device buffer (finished episodes' frozen last
          states are not: `Evaluator.alive` says which run), the copy takes `--ttt-steps-per-env-step` Adam steps
          of `ttt_loss` on `--ttt-batch-size` states drawn from its buffer, and then acts. The trained parameters
          are never modified: each evaluation starts from fresh copies.
    Keys derive from (member seed, training step) only, so a member's test-time episodes do not depend on packing.
    """

    def __init__(self, harness: runs.QHarness, evaluator: envs.Evaluator, method: str, act: Callable,
                 q_value: Callable, mean_action: Callable):
        self.method, self.evaluator = method, evaluator
        episodes = evaluator.wave  # per member, stepped together
        self.per_episode = harness.ttt_reset == "episode"
        self.copies = episodes if self.per_episode else 1
        self.per_copy = episodes // self.copies  # environments each copy acts in
        # buffer rows per copy, every state it can visit: one wave's (episode), every wave's (never)
        self.slots = evaluator.max_steps * self.per_copy * (1 if self.per_episode else evaluator.waves)
        optimizer = optax.adam(harness.ttt_lr)

        def opex_act(params, obs, goals, key):
            actions = act(params, obs, goals, key)
            return opex_actions(lambda a: q_value(params, obs, goals, a), actions, harness.opex_beta,
                                harness.opex_steps, harness.opex_normalize)

        def ttt_step(carry, params, obs, goals, alive, key):
            """One environment step of one member: store the visited states, train every copy, act."""
            # Acting uses `key` itself as OPEX does, so with one copy SfBC draws the candidates the plain rule draws.
            k_train = jax.random.fold_in(key, 1)
            k_act = key[None] if self.copies == 1 else jax.random.split(key, self.copies)
            split = lambda x: None if x is None else x.reshape(self.copies, self.per_copy, -1)  # noqa: E731
            obs_c, goals_c = split(obs), split(goals)
            store = lambda buffer, new: jax.lax.dynamic_update_slice(buffer, new, (0, carry["filled"], 0))  # noqa
            buffers = {"obs": store(carry["obs"], obs_c), "goals": None if goals is None else store(carry["goals"],
                                                                                                  goals_c),
                       "valid": jax.lax.dynamic_update_slice(carry["valid"], alive.reshape(self.copies, -1),
                                                             (0, carry["filled"]))}
            filled = carry["filled"] + self.per_copy

            def train_copy(actor, opt_state, buffer_obs, buffer_goals, valid, key):
                def gradient_step(inner, key):
                    actor, opt_state = inner
                    rows = sample_visited(key, valid, filled, harness.ttt_batch_size)
                    s, g = buffer_obs[rows], None if buffer_goals is None else buffer_goals[rows]
                    grads = ttt_gradient(actor, params, s, g, q_value, mean_action, harness.ttt_alpha)
                    updates, opt_state = optimizer.update(grads, opt_state, actor)
                    return (optax.apply_updates(actor, updates), opt_state), None

                keys = jax.random.split(key, harness.ttt_steps_per_env_step)
                return jax.lax.scan(gradient_step, (actor, opt_state), keys)[0]

            actors, opt_states = jax.vmap(train_copy)(carry["actor"], carry["opt_state"], buffers["obs"],
                                                      buffers["goals"], buffers["valid"],
                                                      jax.random.split(k_train, self.copies))
            actions = jax.vmap(lambda actor, o, g, k: act({**params, "actor": actor}, o, g, k))(
                actors, obs_c, goals_c, k_act)
            carry = {"actor": actors, "opt_state": opt_states, **buffers, "filled": filled}
            return carry, actions.reshape(obs.shape[0], -1)

        def ttt_init(params, obs_dim, goal_dim):
            actors = jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (self.copies, *x.shape)), params["actor"])
            actors = jax.tree_util.tree_map(jnp.copy, actors)
            return {"actor": actors, "opt_state": jax.vmap(optimizer.init)(actors),
                    "obs": jnp.zeros((self.copies, self.slots, obs_dim)),
                    "goals": None if goal_dim is None else jnp.zeros((self.copies, self.slots, goal_dim)),
                    "valid": jnp.zeros((self.copies, self.slots), bool), "filled": jnp.zeros((), jnp.int32)}

        self._opex = jax.jit(jax.vmap(opex_act))
        self._ttt_step = jax.jit(jax.vmap(ttt_step), donate_argnums=(0,))
        self._ttt_init = jax.jit(jax.vmap(ttt_init, in_axes=(0, None, None)), static_argnums=(1, 2))

    def policy(self, params, seeds: list[int], step: int) -> Callable:
        """A fresh test-time policy for one evaluation of the members' current `params` ([M]-stacked pytree)."""
        keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.PRNGKey(s), step))(jnp.asarray(seeds))
        calls = itertools.count()
        carry, wave = None, None

        def step_keys():
            return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, next(calls))

        def policy(obs, goals):
            nonlocal carry, wave
            if self.method == "opex":
                return self._opex(params, obs, goals, step_keys())
            if self.per_episode and self.evaluator.wave_index != wave:  # per-episode copies start afresh each wave
                carry, wave = None, self.evaluator.wave_index
            if carry is None:
                carry = self._ttt_init(params, obs.shape[-1], None if goals is None else goals.shape[-1])
            alive = getattr(self.evaluator, "alive", None)  # None: every episode runs
            alive = np.ones(obs.shape[:2], bool) if alive is None else np.asarray(alive, bool)
            carry, actions = self._ttt_step(carry, params, obs, goals, alive, step_keys())
            return actions

        return policy


class Methods:
    """Every method of --test-time for one script, evaluated on the episodes of `evaluator`."""

    def __init__(self, harness: runs.QHarness, evaluator: envs.Evaluator, probe: envs.OracleProbe, act: Callable,
                 q_value: Callable, mean_action: Callable):
        self.evaluator, self.probe = evaluator, probe
        self.methods = {method: TestTime(harness, evaluator, method, act, q_value, mean_action)
                        for method in harness.test_time}

    def metrics(self, params, seeds: list[int], step: int) -> dict[str, np.ndarray]:
        """Per member, for each method: success, return and evaluation MSE on the same episodes as the plain policy's
        (names prefixed `opex_` / `ttt_`). Empty without --test-time."""
        out = {}
        for method, improved in self.methods.items():
            rollout = self.evaluator.evaluate(improved.policy(params, seeds, step), seeds)
            out.update(envs.rollout_metrics(rollout, self.probe, f"{method}_"))
        return out
