"""Known values: each component whose formula the paper or the reference fixes, computed on inputs whose answer numpy
gives, compared with a margin far below the smallest plausible bug's effect (each test says its margin).

Goal sampling per script and role, SfBC's candidates and argmax, OPEX's step, TTT's anchored objective."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_algos import SCRIPTS, load, member, tiny_config

import envs
import testtime

# ----------------------------------------------------------------------------------------------------------------
# Goal sampling: which mixture each script asks of envs.sample_batch for each of its roles (the sampler's own
# shares and trajectory relations are pinned in tests/test_envs.py for any mixture)
# ----------------------------------------------------------------------------------------------------------------
IQL_VALUE = (0.2, 0.5, 0.3)  # OGBench GCIQL's value goals: current / future of the trajectory (geometric) / random
CRL_CRITIC = (0.0, 1.0, 0.0)  # CRL's contrastive positives: future states of the same trajectory only


@pytest.mark.parametrize("script", SCRIPTS)
def test_each_script_asks_the_reference_goal_mixture_for_each_role(script, monkeypatch):
    algo = load(script)
    config = tiny_config(script, actor_p_randomgoal=0.25, **({} if script == "bc" else {"discount": 0.97}))
    calls = []
    original = envs.sample_batch

    def spy(key, data, data_size, batch_size, goals, goal_config=None, online=None, actor_p_random=0.0):
        goal_config = envs.GoalConfig() if goal_config is None else goal_config  # the sampler's own default
        calls.append((goals, goal_config, actor_p_random, batch_size))
        return original(key, data, data_size, batch_size, goals, goal_config, online, actor_p_random)

    monkeypatch.setattr(envs, "sample_batch", spy)
    rows = 64
    data = {"observations": jnp.zeros((rows, 2)), "actions": jnp.zeros((rows, 2)),
            "next_observations": jnp.zeros((rows, 2)), "rewards": jnp.zeros(rows), "masks": jnp.ones(rows),
            "terminals": jnp.zeros(rows), "final_idxs": jnp.full(rows, rows - 1, jnp.int32)}
    state = algo.init_state(jax.random.PRNGKey(0), 2, 2, 2, config)
    jax.eval_shape(lambda s: algo.update(s, data, member(script, 32, 48), config, True), state)
    by_role = {goals: (tuple(round(p, 9) for p in (c.p_current, c.p_trajectory, c.p_random)), c.discount, p, b)
               for goals, c, p, b in calls}
    # the actor's goals: the trajectory's future, or with --actor-p-randomgoal any row (GCBC's and SfBC's too)
    assert by_role["actor"][2] == 0.25 and by_role["actor"][3] == config.batch_size
    if script == "bc":
        assert set(by_role) == {"actor"}
        return
    mixture, discount, _, _ = by_role["value"]
    # the value learner's goals, with the geometric offset's discount from --discount
    assert mixture == (CRL_CRITIC if script.startswith("crl") else IQL_VALUE) and discount == 0.97
    assert set(by_role) == {"value", "actor"} and len(calls) == 2


# ----------------------------------------------------------------------------------------------------------------
# SfBC: candidates from the learned BC Gaussian, the argmax by the pessimistic Q (CRL: the logits' ensemble min)
# ----------------------------------------------------------------------------------------------------------------
SFBC = ["iql_sfbc", "sarsa_sfbc", "crl_sfbc"]
N_STATES, N_SAMPLES = 4096, 32


def expected_max_of_normals(n: int) -> float:
    """E[max of n standard normals], by numerical integration of n x phi(x) Phi(x)^(n-1)."""
    x = np.linspace(-8, 8, 200_001)
    phi, cdf = np.exp(-x**2 / 2) / math.sqrt(2 * math.pi), 0.5 * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
    return float(np.trapezoid(x * n * phi * cdf ** (n - 1), x))


@pytest.mark.parametrize("script", SFBC)
def test_sfbc_candidates_follow_the_bc_gaussian_and_the_pessimistic_q_picks(script, monkeypatch):
    algo = load(script)
    mean, std = np.array([-0.3, 0.1]), np.array([0.05, 0.2])
    monkeypatch.setattr(algo, "actor_fn", lambda params, obs, goals: (jnp.broadcast_to(jnp.asarray(mean), (
        obs.shape[0], 2)), jnp.log(jnp.asarray(std))))

    # twin Q: the first rises with action dimension 1, the second falls with it; min picks the lower (pessimism)
    def critic(params, obs, goals, actions):
        return jnp.stack([actions[:, 1] + 10.0, -actions[:, 1] + params["offset"]])

    monkeypatch.setattr(algo, "critic_fn", critic)
    obs = jnp.zeros((N_STATES, 2))
    goals = jnp.zeros((N_STATES, 2)) if script.startswith("crl") else None
    # min(Q1, Q2) = Q2 = -a1 + 0: the argmax takes the smallest a1 of the 32 candidates; dimension 0 is untouched
    chosen = np.asarray(algo.sfbc_action({}, {"offset": 0.0}, obs, goals, jax.random.PRNGKey(0), N_SAMPLES))
    e_max = expected_max_of_normals(N_SAMPLES)  # 2.0697
    # The chosen a1 is mean - std * (max of 32 normals): mean -0.414 at std 0.2, s.e. 0.2 * 0.52 / 64 = 0.0017; a
    # candidate with unit noise (the learned std ignored) would sit near -1 (clipped), a fixed std 1 likewise.
    margin = 6 * std[1] * 0.53 / math.sqrt(N_STATES)
    assert abs(chosen[:, 1].mean() - (mean[1] - std[1] * e_max)) < margin
    # dimension 0 is one draw of N(mean, std^2), whichever candidate wins: its mean and spread are the BC head's
    assert abs(chosen[:, 0].mean() - mean[0]) < 6 * std[0] / math.sqrt(N_STATES)
    assert abs(chosen[:, 0].std() - std[0]) < 6 * std[0] / math.sqrt(2 * N_STATES)
    # with Q2 offset far up, Q1 = a1 + 10 is the min: the argmax now takes the largest a1 (the min of twins decides)
    chosen = np.asarray(algo.sfbc_action({}, {"offset": 100.0}, obs, goals, jax.random.PRNGKey(0), N_SAMPLES))
    assert abs(chosen[:, 1].mean() - (mean[1] + std[1] * e_max)) < margin


# ----------------------------------------------------------------------------------------------------------------
# OPEX: a <- clip(a + beta g), g = dQ/da normalised per state, steps times, on a known quadratic Q
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("steps", [1, 3])
def test_opex_steps_up_a_known_quadratic_per_state(normalize, steps):
    # Q(s, a) = -scale_s ||a - target_s||^2: the two states' gradients differ by a factor 10 in size, so normalising
    # over the batch instead of per state moves the small one 10x less (a difference of 0.05 or more)
    target = jnp.array([[0.5, -0.5], [0.0, 0.9]])
    scale = jnp.array([10.0, 1.0])
    start = jnp.array([[0.0, 0.0], [0.2, 0.1]])
    beta = 0.05
    q_of_actions = lambda a: -scale * ((a - target) ** 2).sum(-1)  # noqa: E731
    expected = np.asarray(start, np.float64)
    for _ in range(steps):
        g = -2 * np.asarray(scale)[:, None] * (expected - np.asarray(target))
        if normalize:
            g = g / (np.linalg.norm(g, axis=-1, keepdims=True) + 1e-8)
        expected = np.clip(expected + beta * g, -1, 1)
    moved = np.asarray(testtime.opex_actions(q_of_actions, start, beta, steps, normalize))
    np.testing.assert_allclose(moved, expected, atol=1e-6)  # float32 rounding: 1e-7; a batch-wide norm: >= 0.004
    if normalize:  # a step length of beta in action units, per state
        np.testing.assert_allclose(np.linalg.norm(moved - np.asarray(start), axis=-1)[0], beta * steps, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# TTT: -Q(s, mu(s)) / stopgrad(E|Q|) + alpha/2 ||mu(s) - mu_0(s)||^2, anchored at the pre-trained policy
# ----------------------------------------------------------------------------------------------------------------
def test_ttt_objective_is_q_alone_at_the_start_and_pulls_back_to_the_pretrained_policy():
    rng = np.random.default_rng(0)
    obs = jnp.asarray(rng.normal(size=(16, 3)), jnp.float32)
    target = jnp.asarray([0.4, -0.2])
    w0 = jnp.asarray(rng.normal(size=(3, 2)) * 0.3, jnp.float32)  # the pre-trained linear policy mu_0(s) = s W0
    mean_action = lambda actor, s, g: s @ actor["w"]  # noqa: E731
    q_value = lambda params, s, g, a: -((a - target) ** 2).sum(-1)  # noqa: E731
    params, alpha = {"actor": {"w": w0}}, 2.5

    def by_hand(w):  # numpy: the gradient of the objective with respect to W
        s, a, a0 = np.asarray(obs, np.float64), np.asarray(obs @ w, np.float64), np.asarray(obs @ w0, np.float64)
        q = -((a - np.asarray(target)) ** 2).sum(-1)
        dq = -2 * s.T @ (a - np.asarray(target)) / len(s)  # d mean(q) / dW
        return -dq / np.abs(q).mean() + alpha * s.T @ (a - a0) / len(s)

    # at the start the copy is the pre-trained policy: the anchor term is exactly zero, the gradient Q's alone
    grad = testtime.ttt_gradient({"w": w0}, params, obs, None, q_value, mean_action, alpha)["w"]
    loss = testtime.ttt_loss({"w": w0}, obs @ w0, params, obs, None, q_value, mean_action, alpha)
    q = q_value(params, obs, None, obs @ w0)
    np.testing.assert_allclose(loss, -q.mean() / jnp.abs(q).mean(), rtol=1e-6)  # -1 up to rounding
    np.testing.assert_allclose(grad, by_hand(w0), rtol=1e-4, atol=1e-6)
    # a copy that has moved: the anchor term pulls it back toward W0 (the gradient of alpha/2 ||s(W - W0)||^2); an
    # anchor taken from the copy itself would drop that term, a difference of alpha * 0.5 per entry here
    w1 = w0 + 0.5
    grad = testtime.ttt_gradient({"w": w1}, params, obs, None, q_value, mean_action, alpha)["w"]
    np.testing.assert_allclose(grad, by_hand(w1), rtol=1e-4, atol=1e-5)
    anchor_part = alpha * np.asarray(obs).T @ np.asarray(obs @ (w1 - w0)) / len(obs)
    assert np.abs(anchor_part).max() > 1.0  # the term a copy-anchored objective would lose
