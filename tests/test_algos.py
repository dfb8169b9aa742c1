"""Every script in algos/: losses by hand, known values on a tiny MDP, invariants, sampling, smoke runs, bad input."""

import dataclasses
import functools
import importlib
import inspect
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import POINTMAZE, ROOT, run_in_process, run_script

import envs
import runs

VALUE_LEARNERS, EXTRACTORS = ("iql", "sarsa", "crl"), ("awr", "ddpgbc", "sfbc")
SCRIPTS = [f"{v}_{e}" for v in VALUE_LEARNERS for e in EXTRACTORS] + ["bc"]
Q_SCRIPTS = [s for s in SCRIPTS if s != "bc"]
TD_SCRIPTS = [s for s in Q_SCRIPTS if not s.startswith("crl")]  # IQL and SARSA: value + twin critics + targets


def load(script):
    return importlib.import_module(f"algos.{script}")


def member(script, value_size, policy_size, alpha=1.0):
    """The traced per-member fields a script's update reads."""
    fields = {"policy_data_size": policy_size}
    if script != "bc":
        fields["value_data_size"] = value_size
    if hasattr(load(script).Config, "alpha"):
        fields["alpha"] = alpha
    return fields


def tiny_config(script, **overrides):
    config = runs.make_config(load(script).Config, **{"hidden_dims": (16,), "batch_size": 32, **overrides})
    return envs.fill_from_table(config, script)[0]  # the flags left unset: the dataset's row of the table


def constant(params, value):
    """Make an MLP output `value` everywhere: zero last-layer weights, bias = value."""
    last = dict(params[-1])
    last["w"] = jnp.zeros_like(last["w"])
    last["b"] = jnp.full_like(last["b"], value)
    return params[:-1] + [last]


def constant_twins(critic, first, second):
    q1 = constant(jax.tree_util.tree_map(lambda x: x[0], critic), first)
    q2 = constant(jax.tree_util.tree_map(lambda x: x[1], critic), second)
    return jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), q1, q2)


BATCH = {"observations": jnp.array([[0.1, 0.2], [0.3, -0.4]]), "actions": jnp.array([[0.0, 1.0], [0.0, 1.0]]),
         "next_observations": jnp.array([[0.0, 0.0], [1.0, 1.0]]), "rewards": jnp.array([-1.0, -1.0]),
         "masks": jnp.array([1.0, 0.0])}


# ----------------------------------------------------------------------------------------------------------------
# The MLP: the textbook formula, differentiated by JAX itself
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("script", SCRIPTS)
def test_mlp_is_the_textbook_formula_with_jax_gradients(script):
    algo = load(script)
    source = (ROOT / "algos" / f"{script}.py").read_text()
    assert "custom_vjp" not in source and "custom_jvp" not in source  # no hand-written derivatives anywhere
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    params = algo.mlp_init(keys[0], (5, 32, 16, 3))
    params = jax.tree_util.tree_map(lambda p: p + 0.3 * jax.random.normal(keys[1], p.shape), params)
    x = 2.0 * jax.random.normal(keys[2], (4, 7, 5)) + 1.0
    # the same network in float64 numpy, in the reference's order: dense + bias, tanh-approximated GELU, LayerNorm
    h = np.asarray(x, np.float64)
    for i, layer in enumerate(params):
        h = h @ np.asarray(layer["w"], np.float64) + np.asarray(layer["b"], np.float64)
        if i < len(params) - 1:
            h = 0.5 * h * (1 + np.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
            h = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-6)
            h = h * np.asarray(layer["scale"]) + np.asarray(layer["shift"])
    np.testing.assert_allclose(algo.mlp_apply(params, x), h, rtol=1e-4, atol=1e-4)
    # forward-mode autodiff works through every network (a custom VJP would refuse jax.jvp)
    _, tangent = jax.jvp(lambda x: algo.mlp_apply(params, x), (x,), (jnp.ones_like(x),))
    assert tangent.shape == (4, 7, 3) and bool(jnp.isfinite(tangent).all())


@pytest.mark.parametrize("script", SCRIPTS)
def test_fresh_networks_have_the_reference_architecture(script):
    """OGBench's networks: value and critic MLPs Dense -> GELU -> LayerNorm per hidden layer; the actor without
    LayerNorm, its output layer initialised at 0.01 of the Glorot variance; a Gaussian with fixed std 1 and no tanh
    (SfBC keeps a learned std: OURS); the agent acts with the mean clipped to [-1, 1]."""
    algo = load(script)
    crl = script.startswith("crl")
    params = algo.init_params(jax.random.PRNGKey(0), 4, 4, 3, (256, 256), *((64,) if crl else ()))
    actor = params["actor"]["net"] if script.endswith("sfbc") else params["actor"]
    assert [sorted(layer) for layer in actor] == [["b", "w"]] * 3  # no LayerNorm anywhere in the actor
    glorot = lambda fan_in, fan_out: math.sqrt(6 / (fan_in + fan_out))  # noqa: E731  (uniform's bound)
    assert 0.09 * glorot(256, 3) < float(jnp.abs(actor[-1]["w"]).max()) <= 0.1 * glorot(256, 3)  # sqrt(0.01) = 0.1
    assert 0.9 * glorot(8, 256) < float(jnp.abs(actor[0]["w"]).max()) <= glorot(8, 256)
    assert ("log_std" in params["actor"]) == script.endswith("sfbc")  # fixed std 1 but for SfBC's BC policy
    if script != "bc":
        nets = [params["critic"]["phi"], params["critic"]["psi"]] if crl else [params["critic"], params["value"]]
        for net in nets:
            assert [sorted(layer) for layer in net] == [["b", "scale", "shift", "w"]] * 2 + [["b", "w"]]
        # the order: GELU before LayerNorm, checked against both orders written out by hand
        net = jax.tree_util.tree_map(lambda x: x[0], params["critic"]["phi"] if crl else params["critic"])
        x = jax.random.normal(jax.random.PRNGKey(1), (5, net[0]["w"].shape[0]))
        norm = lambda h: (h - h.mean(-1, keepdims=True)) / jnp.sqrt(h.var(-1, keepdims=True) + 1e-6)  # noqa: E731
        reference, other = x, x
        for layer in net[:-1]:
            reference = norm(jax.nn.gelu(reference @ layer["w"] + layer["b"]))
            other = jax.nn.gelu(norm(other @ layer["w"] + layer["b"]))
        reference, other = (h @ net[-1]["w"] + net[-1]["b"] for h in (reference, other))
        np.testing.assert_allclose(algo.mlp_apply(net, x), reference, rtol=1e-4, atol=1e-5)
        assert float(jnp.abs(reference - other).max()) > 1e-2
    # the mean is unbounded (no tanh); acting clips it to the action box
    far = constant(actor, 3.0)
    far_actor = {**params["actor"], "net": far} if script.endswith("sfbc") else far
    obs, goals = jnp.ones((2, 4)), jnp.ones((2, 4))
    mean = algo.actor_fn(far_actor, obs, goals)
    np.testing.assert_allclose(mean[0] if script.endswith("sfbc") else mean, 3.0)
    if not script.endswith("sfbc"):
        act = functools.partial(algo.act, obs_transform="none") if script == "bc" else algo.act
        np.testing.assert_allclose(act({**params, "actor": far_actor}, obs, goals, None), 1.0)


# ----------------------------------------------------------------------------------------------------------------
# Losses against hand-computed values
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("script", TD_SCRIPTS)
def test_expectile_value_and_td_critic_losses_by_hand(script):
    algo = load(script)
    diff = jnp.array([-2.0, 1.0])
    np.testing.assert_allclose(algo.expectile_loss(diff, 0.9), [0.1 * 4, 0.9 * 1], rtol=1e-6)
    np.testing.assert_allclose(algo.expectile_loss(diff, 0.5), [0.5 * 4, 0.5 * 1], rtol=1e-6)
    # The script's own expectile: IQL's default 0.9, SARSA's fixed 0.5 (half the squared error).
    expectile = algo.EXPECTILE if script.startswith("sarsa") else algo.Config().expectile
    assert expectile == (0.5 if script.startswith("sarsa") else 0.9)
    params = algo.init_params(jax.random.PRNGKey(0), 2, 0, 2, (8,))
    value, critic = constant(params["value"], -3.0), constant_twins(params["critic"], -2.0, -4.0)
    # Qbar = min(-2, -4) = -4, V = -3: diff = -1 < 0, so the weight is 1 - expectile.
    loss, info = algo.value_loss(value, critic, BATCH, expectile)
    np.testing.assert_allclose(loss, 1 - expectile, rtol=1e-5)
    np.testing.assert_allclose(info["advantage_mean"], -1.0, rtol=1e-5)
    # TD targets with discount 0.5: -1 + 0.5 * 1 * V(s') = -2.5 and -1 + 0 (terminal); Q1 = -2, Q2 = -4, summed.
    loss, _ = algo.critic_loss(critic, value, BATCH, 0.5)
    np.testing.assert_allclose(loss, np.mean([0.5**2, 1.0**2]) + np.mean([1.5**2, 3.0**2]), rtol=1e-5)


@pytest.mark.parametrize("script", ["iql_awr", "sarsa_awr", "crl_awr"])
def test_awr_weights_are_exponentiated_advantages_clipped_at_100(script):
    algo = load(script)
    params = algo.init_params(jax.random.PRNGKey(0), 2, 2, 2, (8,), *((4,) if script.startswith("crl") else ()))
    batch = {**BATCH, "goals": jnp.zeros((2, 2))}
    actor = constant(params["actor"], 0.5)  # N(0.5, I): the std is fixed at 1
    log_prob = -0.5 * (0.25 + 0.25) - math.log(2 * math.pi)  # both rows: a - mu = (-0.5, 0.5)
    if script.startswith("crl"):  # contrastive functions: make the logits constant through the representations
        critic = {"phi": params["critic"]["phi"], "psi": params["critic"]["psi"]}
        critic["phi"] = constant_twins(critic["phi"], 1.0, 1.0)
        critic["psi"] = constant_twins(critic["psi"], -2.0, -4.0)  # Q_k = 4 * c_k / sqrt(4): -4 and -8
        value = {"phi": constant(jax.tree_util.tree_map(lambda x: x[0], params["value"]["phi"]), 1.0),
                 "psi": constant(jax.tree_util.tree_map(lambda x: x[0], params["value"]["psi"]), -5.0)}
        value = jax.tree_util.tree_map(lambda x: x[None], value)  # V = 4 * -5 / 2 = -10; A = -8 - (-10) = 2
    else:
        critic = constant_twins(params["critic"], -6.0, -8.0)
        value = constant(params["value"], -10.0)  # A = min(-6, -8) - (-10) = 2
    for alpha, weight in ((0.5, math.exp(1.0)), (3.0, 100.0)):  # exp(6) = 403 is clipped to 100
        loss, info = algo.awr_actor_loss(actor, value, critic, batch, alpha)
        np.testing.assert_allclose(info["actor_advantage_mean"], 2.0, rtol=1e-5)
        np.testing.assert_allclose(loss, -weight * log_prob, rtol=1e-5)
        assert float(info["awr_weight_clipped_fraction"]) == (1.0 if weight == 100.0 else 0.0)


@pytest.mark.parametrize("script", ["iql_ddpgbc", "sarsa_ddpgbc", "crl_ddpgbc"])
def test_ddpgbc_normalises_q_by_its_batch_mean_absolute_value(script):
    algo = load(script)
    params = algo.init_params(jax.random.PRNGKey(0), 2, 2, 2, (8,), *((4,) if script.startswith("crl") else ()))
    batch = {**BATCH, "goals": jnp.zeros((2, 2))}
    actor = constant(params["actor"], 0.5)
    if script.startswith("crl"):
        critic = {"phi": constant_twins(params["critic"]["phi"], 1.0, 1.0),
                  "psi": constant_twins(params["critic"]["psi"], -2.0, -4.0)}  # Q = -4, -8
    else:
        critic = constant_twins(params["critic"], -2.0, -4.0)
    # -mean(minQ) / mean|minQ| = 1 whatever the scale; BC: 0.5 * ((0.5 - 0)^2 + (0.5 - 1)^2) = 0.25 per row.
    for alpha in (0.0, 2.0):
        loss, info = algo.ddpgbc_actor_loss(actor, critic, batch, alpha)
        np.testing.assert_allclose(loss, 1.0 + alpha * 0.25, rtol=1e-5)
        np.testing.assert_allclose(info["policy_mse_to_data"], 0.25, rtol=1e-5)
    # The normaliser is a constant (stop-gradient): the Q term's gradient is that of -mean(Q) / c with c = mean|Q| held
    # fixed. Without the stop-gradient, -mean(Q) / mean|Q| of an all-negative Q would be 1 and its gradient zero.
    random = algo.init_params(jax.random.PRNGKey(7), 2, 2, 2, (8,), *((4,) if script.startswith("crl") else ()))
    min_q = lambda a: algo.critic_fn(random["critic"], batch["observations"], batch["goals"],  # noqa: E731
                                     algo.actor_fn(a, batch["observations"], batch["goals"])).min(0)
    batch["goals"] = jax.random.normal(jax.random.PRNGKey(8), (2, 2))  # (psi(0) = 0 for a fresh CRL network)
    c = jnp.abs(min_q(random["actor"])).mean()
    by_hand = jax.grad(lambda a: -min_q(a).mean() / c)(random["actor"])
    by_loss = jax.grad(lambda a: algo.ddpgbc_actor_loss(a, random["critic"], batch, 0.0)[0])(random["actor"])
    for a, b in zip(jax.tree_util.tree_leaves(by_hand), jax.tree_util.tree_leaves(by_loss)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree_util.tree_leaves(by_loss))


@pytest.mark.parametrize("script", ["iql_ddpgbc", "sarsa_ddpgbc", "crl_ddpgbc"])
def test_ddpgbc_loss_and_actor_gradient_by_hand_where_the_clip_and_the_min_both_matter(script):
    """The docstring's L_pi = -mean_i min_k Q_k(s_i, clip(mu_i, -1, 1)) / stopgrad(mean_i |min_k Q_k|)
    + alpha * mean_i 0.5 ||mu_i - a_i||^2: its value, its two terms and its gradient in every actor parameter, by hand,
    on a batch where the actor's mean lies beyond +-1 in some entries (there Q sees the bound, and no Q gradient flows
    back through the clip) and the critics disagree (the min is one critic on some rows and the other on the rest).
    Q_k is written out from the networks: the k-th twin MLP on [s, g, a] (IQL, SARSA), phi_k([s, a]) . psi_k(g) /
    sqrt(d) (CRL)."""
    algo = load(script)
    crl = script.startswith("crl")
    batch_size, action_dim, latent, alpha = 8, 3, 8, 0.5
    # Generic networks, in the script's own structure, drawn with numpy (no compilation): weights of variance
    # 1 / fan-in, and biases and LayerNorm parameters away from their fresh zeros and ones, which make parts symmetric.
    rng = np.random.default_rng(11)
    shapes = jax.eval_shape(lambda: algo.init_params(jax.random.PRNGKey(0), 2, 2, action_dim, (16,),
                                                     *((latent,) if crl else ())))

    def draw(path, leaf):
        name, noise = path[-1].key, rng.standard_normal(leaf.shape, np.float32)
        return jnp.asarray(noise / math.sqrt(leaf.shape[-2]) if name == "w" else noise * 0.5 + (name == "scale"))

    params = jax.tree_util.tree_map_with_path(draw, shapes)
    # The actor's output layer puts mu around +2.5, -3 and 0 in its three action dimensions, varying by row.
    last = params["actor"][-1]
    actor = params["actor"][:-1] + [{"w": 0.1 * last["w"] / np.abs(last["w"]).max(), "b": jnp.array([2.5, -3.0, 0.0])}]
    # CRL: one goal for the whole batch, so that psi_k(g) is one vector p_k and a shift of phi_k's output bias by delta
    # shifts Q_k by the constant delta . p_k / sqrt(d) (below).
    goals = jnp.asarray(np.repeat(rng.standard_normal((1, 2), np.float32), batch_size, 0) if crl
                        else rng.standard_normal((batch_size, 2), np.float32))
    batch = {"observations": jnp.asarray(rng.standard_normal((batch_size, 2), np.float32)), "goals": goals,
             "actions": jnp.asarray(rng.uniform(-1, 1, (batch_size, action_dim)).astype(np.float32))}
    obs, data_actions = batch["observations"], np.asarray(batch["actions"], np.float64)
    mu = np.asarray(jax.jit(algo.actor_fn)(actor, obs, goals), np.float64)
    inside = np.abs(mu) < 1
    assert (mu > 1.1).any() and (mu < -1.1).any() and inside.any() and (np.abs(np.abs(mu) - 1) > 0.05).all()

    member = lambda net, k: jax.tree_util.tree_map(lambda x: x[k], net)  # noqa: E731

    def q_members(critic, actions):  # [K, B], from the networks themselves
        if crl:
            return jnp.stack([(algo.mlp_apply(member(critic["phi"], k), jnp.concatenate([obs, actions], -1))
                               * algo.mlp_apply(member(critic["psi"], k), goals)).sum(-1) / math.sqrt(latent)
                              for k in range(2)])
        return jnp.stack([algo.mlp_apply(member(critic, k), jnp.concatenate([obs, goals, actions], -1))[:, 0]
                          for k in range(2)])

    def shifted(critic, amounts):  # Q_k + amounts[k] for every input, through the networks' last biases
        if crl:
            p = jnp.stack([algo.mlp_apply(member(critic["psi"], k), goals[:1])[0] for k in range(2)])  # [K, d]
            delta = (jnp.asarray(amounts)[:, None] * math.sqrt(latent) * p / (p**2).sum(-1, keepdims=True))
            phi = critic["phi"][:-1] + [{**critic["phi"][-1], "b": critic["phi"][-1]["b"] + delta}]
            return {**critic, "phi": phi}
        return critic[:-1] + [{**critic[-1], "b": critic[-1]["b"] + jnp.asarray(amounts)[:, None]}]

    # Each critic moved to median 0 on the batch, at clip(mu), so that they cross, then both together so that their min
    # has median 0: the min takes both signs, as it must for the Q term to tell it from another Q (-mean(Q) / mean|Q|
    # is -+1 for any Q of one sign).
    # Q_k and its slopes: rows are independent, so row i's slope is dQ_k(s_i, a_i) / da_i.
    values_and_slopes = jax.jit(lambda critic, a: (q_members(critic, a), jnp.stack([
        jax.grad(lambda a, k=k: q_members(critic, a)[k].sum())(a) for k in range(2)])))
    q_k = np.asarray(values_and_slopes(params["critic"], jnp.clip(jnp.asarray(mu, jnp.float32), -1, 1))[0])
    centred = q_k - np.median(q_k, 1, keepdims=True)
    critic = shifted(params["critic"], -np.median(q_k, 1) - np.median(centred.min(0)))
    q_and_slopes = functools.partial(values_and_slopes, critic)

    def by_hand(clip=True, reduce="min"):
        """(loss, Q term, BC term, dL/dmu [B, a]) in float64; `clip` and `reduce` as the docstring has them or not."""
        q_k, dq_k = (np.asarray(x, np.float64) for x in q_and_slopes(jnp.asarray(np.clip(mu, -1, 1) if clip else mu,
                                                                                   jnp.float32)))
        if reduce == "min":
            lowest = q_k.argmin(0)
            q, dq = q_k[lowest, np.arange(batch_size)], dq_k[lowest, np.arange(batch_size)]
        else:
            q, dq = q_k.mean(0), dq_k.mean(0)
        scale = np.abs(q).mean() + 1e-6  # a constant for the gradient (stop-gradient)
        q_term = -q.mean() / scale
        bc_term = 0.5 * ((mu - data_actions) ** 2).sum(-1).mean()  # on mu itself, not clipped
        through_clip = inside if clip else np.ones_like(inside)  # d clip(mu) / d mu: 0 where clipped
        dmu = -dq * through_clip / (batch_size * scale) + alpha * (mu - data_actions) / batch_size
        return q_term + alpha * bc_term, q_term, bc_term, dmu

    loss, q_term, bc_term, dmu = by_hand()
    # The case tells the clip and the min apart: the min is not always the same critic, and without the clip, or with
    # the critics' mean, the loss and the gradient are far from these.
    q_k = np.asarray(q_and_slopes(jnp.clip(jnp.asarray(mu, jnp.float32), -1, 1))[0])
    assert 0 < q_k.argmin(0).sum() < batch_size and (q_k.min(0) > 0).any() and (q_k.min(0) < 0).any()
    for other in (by_hand(clip=False), by_hand(reduce="mean")):
        assert abs(other[0] - loss) > 0.05 and np.abs(other[3] - dmu).max() > 0.01, (other[0], loss)

    value_and_grad = jax.jit(jax.value_and_grad(algo.ddpgbc_actor_loss, has_aux=True))
    (value, info), grads = value_and_grad(actor, critic, batch, alpha)
    np.testing.assert_allclose(value, loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(info["actor_q_loss"], q_term, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(info["actor_bc_loss"], bc_term, rtol=1e-5, atol=1e-6)
    # The gradient in the actor's parameters: dL/dmu by hand, pulled back through the actor network by JAX.
    pull_back = jax.jit(lambda p, cotangent: jax.vjp(lambda p: algo.actor_fn(p, obs, goals), p)[1](cotangent)[0])
    expected = pull_back(actor, jnp.asarray(dmu, jnp.float32))
    for got, want in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("script", ["crl_ddpgbc", "crl_awr", "crl_sfbc"])
def test_crl_logits_pair_every_input_with_every_goal_and_positives_sit_on_the_diagonal(script):
    algo = load(script)
    params = algo.init_params(jax.random.PRNGKey(1), 3, 3, 2, (8,), 4)["critic"]
    key_obs, key_act, key_goal = jax.random.split(jax.random.PRNGKey(2), 3)
    obs, actions = jax.random.normal(key_obs, (5, 3)), jax.random.normal(key_act, (5, 2))
    goals = jax.random.normal(key_goal, (5, 3))
    inputs = jnp.concatenate([obs, actions], -1)
    logits = algo.contrastive_logits(params, inputs, goals)
    assert logits.shape == (2, 5, 5)
    for k in range(2):
        phi = algo.mlp_apply(jax.tree_util.tree_map(lambda x: x[k], params["phi"]), inputs)  # noqa: B023
        psi = algo.mlp_apply(jax.tree_util.tree_map(lambda x: x[k], params["psi"]), goals)  # noqa: B023
        np.testing.assert_allclose(logits[k], phi @ psi.T / 2.0, rtol=1e-5, atol=1e-6)  # sqrt(latent 4) = 2
    # Q(s_i, a_i, g_i) is the diagonal: the positive pairs.
    np.testing.assert_allclose(algo.critic_fn(params, obs, goals, actions),
                               jnp.diagonal(logits, axis1=1, axis2=2), rtol=1e-5, atol=1e-6)
    # Binary NCE by hand on a 2 x 2 logit matrix: -log sigmoid on the diagonal, -log(1 - sigmoid) off it.
    hand = np.array([[[2.0, -1.0], [0.5, 3.0]]])
    sig = 1 / (1 + np.exp(-hand[0]))
    expected = -np.mean([np.log(sig[0, 0]), np.log(1 - sig[0, 1]), np.log(1 - sig[1, 0]), np.log(sig[1, 1])])
    np.testing.assert_allclose(algo.binary_nce_loss(jnp.asarray(hand)), expected, rtol=1e-5)


@pytest.mark.parametrize("script", ["iql_sfbc", "sarsa_sfbc", "crl_sfbc"])
def test_sfbc_acts_with_the_candidate_of_highest_q(script):
    algo = load(script)
    candidates = jnp.array([[[0.1], [0.2]], [[0.3], [0.4]], [[0.5], [0.6]]])  # [N=3, B=2, a=1]
    q = jnp.array([[1.0, 9.0], [5.0, 2.0], [3.0, 4.0]])
    np.testing.assert_allclose(algo.select_best(candidates, q), [[0.3], [0.2]])
    # End to end: the chosen action scores at least as high as every one of the same candidates.
    crl = script.startswith("crl")
    params = algo.init_params(jax.random.PRNGKey(3), 2, 2, 2, (8,), *((4,) if crl else ()))
    obs, goals = jax.random.normal(jax.random.PRNGKey(4), (6, 2)), jax.random.normal(jax.random.PRNGKey(5), (6, 2))
    key = jax.random.PRNGKey(6)
    chosen = algo.sfbc_action(params["actor"], params["critic"], obs, goals, key, 16)
    mean, log_std = algo.actor_fn(params["actor"], obs, goals)
    drawn = jnp.clip(mean + jnp.exp(log_std) * jax.random.normal(key, (16, *mean.shape)), -1, 1)
    q_drawn = jax.vmap(lambda a: algo.critic_fn(params["critic"], obs, goals, a).min(0))(drawn)
    q_chosen = algo.critic_fn(params["critic"], obs, goals, chosen).min(0)
    np.testing.assert_allclose(q_chosen, q_drawn.max(0), rtol=1e-5)
    assert np.any(np.abs(np.asarray(chosen) - np.asarray(mean)) > 1e-3)  # not simply the BC mean


# Known values: a two-state MDP where the behaviour policy's Q and IQL's expectile fixed point are known exactly,
# and so is what each extractor makes of them
# ----------------------------------------------------------------------------------------------------------------
# s0 --(-1)--> end, reward 0.5;  s0 --(+1)--> s1, reward 0;  s1 --(+1)--> end, reward 1;  s1 --(-1)--> end, reward 0.
# The data's behaviour policy picks -1 / +1 with equal probability in both states; discount 0.9. Then
#   SARSA (tau = 0.5): V(s1) = 0.5,           Q(s0, +1) = 0.9 * 0.5 = 0.45 (the behaviour policy's value)
#   IQL  (tau = 0.9): V(s1) = the 0.9-expectile of {0, 1} w.p. 1/2 each = 0.9, Q(s0, +1) = 0.81 (toward Q* = 0.9)
# and Q(s0, -1) = 0.5 for both: SARSA prefers -1 in s0, IQL prefers +1. What the extractors do with a critic Q:
#   AWR, Gaussian N(mu, 1): mu(s) maximises sum_a w(a) log N(a; mu, 1), w(a) = exp(alpha (Q(s, a) - V(s))), so mu(s)
#     is the w-weighted mean of the data's actions: mu(s) = tanh(alpha (Q(s, +1) - Q(s, -1)) / 2) (V cancels);
#     positive for IQL in s0, negative for SARSA.
#   SfBC: the BC Gaussian of the data's actions {-1, +1} has mean 0 and std 1 exactly; of 32 candidates drawn from it
#     and clipped to [-1, 1] one lands on each bound (probability 1 - 0.84^32 > 0.99), and the argmax of Q over
#     them is the bound where Q is higher: +1 for IQL, -1 for SARSA in s0.
#   DDPG+BC with a small alpha: gradient ascent on Q(s, clip(mu)) from mu = 0. Q between the data's two actions is
#     the critic's interpolation (the data never shows it), so the known value is only where it stops: a local
#     maximum of the critic over [-1, 1] (at a bound here) and not necessarily the better action.

def chain_data(copies=64):
    s0, s1, end = [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]
    rows = [(s0, -1.0, 0.5, 0.0, end), (s0, 1.0, 0.0, 1.0, s1), (s1, 1.0, 1.0, 0.0, end), (s1, -1.0, 0.0, 0.0, end)]
    rows = rows * copies
    return {"observations": jnp.array([r[0] for r in rows]), "actions": jnp.array([[r[1]] for r in rows]),
            "rewards": jnp.array([r[2] for r in rows]), "masks": jnp.array([r[3] for r in rows]),
            "next_observations": jnp.array([r[4] for r in rows])}


CHAIN_ALPHA = {"awr": 10.0, "ddpgbc": 0.01}


@pytest.mark.parametrize("script", ["iql_awr", "sarsa_awr", "iql_sfbc", "sarsa_sfbc", "iql_ddpgbc", "sarsa_ddpgbc"])
def test_value_learning_and_extraction_reach_their_known_values(script):
    algo = load(script)
    data = chain_data()
    extractor, sarsa = script.split("_")[1], script.startswith("sarsa")
    alpha = CHAIN_ALPHA.get(extractor, 1.0)
    # Batches of 1024 (the default) keep the minibatch noise of the targets below the tolerance.
    config = runs.make_config(algo.Config, hidden_dims=(32, 32), batch_size=1024, lr=1e-3, discount=0.9, tau=0.05,
                              log_interval=3000)
    state = jax.jit(lambda k: algo.init_state(k, 2, 0, 1, config))(jax.random.PRNGKey(0))
    chunk = algo.make_train_chunk(config, False)
    stacked = jax.tree_util.tree_map(lambda x: x[None], state)
    fields = {k: jnp.asarray([v]) for k, v in member(script, len(data["actions"]), len(data["actions"]),
                                                       alpha).items()}
    stacked, _ = chunk(stacked, data, fields, None)  # None: no online rows
    params = jax.tree_util.tree_map(lambda x: x[0], stacked["params"])
    obs = jnp.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    q = algo.critic_fn(params["critic"], obs, None, jnp.array([[1.0], [-1.0], [1.0], [-1.0]])).mean(0)
    v_s1 = algo.value_fn(params["value"], obs[2:3], None)[0]
    expected_q = [0.45 if sarsa else 0.81, 0.5, 1.0, 0.0]
    np.testing.assert_allclose(q, expected_q, atol=0.05)  # tolerance: 0.05, a tenth of the SARSA / IQL gap
    np.testing.assert_allclose(v_s1, 0.5 if sarsa else 0.9, atol=0.05)

    states = obs[::2]  # s0, s1
    q_min = algo.critic_fn(params["critic"], obs, None, jnp.array([[1.0], [-1.0], [1.0], [-1.0]])).min(0)
    q_plus, q_minus = q_min[::2], q_min[1::2]  # per state: the min over the critics, as the extractors use it
    if extractor == "awr":
        mu = algo.actor_fn(params["actor"], states, None)[:, 0]
        np.testing.assert_allclose(mu, np.tanh(alpha * (q_plus - q_minus) / 2), atol=0.03)
        assert (mu[0] < -0.1) if sarsa else (mu[0] > 0.5)  # SARSA's AWR leans to -1 in s0, IQL's to +1
    elif extractor == "sfbc":
        mean, log_std = algo.actor_fn(params["actor"], states, None)
        np.testing.assert_allclose(mean[:, 0], 0.0, atol=0.05)
        np.testing.assert_allclose(np.exp(log_std), 1.0, atol=0.05)
        actions = algo.act(params, states, None, jax.random.PRNGKey(1))[:, 0]
        # the best candidate: at (or, where Q peaks just inside, next to) the bound where Q is higher
        np.testing.assert_allclose(actions, np.where(q_plus > q_minus, 1.0, -1.0), atol=0.02)
        assert actions[0] == pytest.approx(-1.0 if sarsa else 1.0, abs=0.02)
    else:
        mu = np.clip(algo.actor_fn(params["actor"], states, None)[:, 0], -1.0, 1.0)
        q_at = lambda a: algo.critic_fn(params["critic"], states, None, jnp.asarray(a)[:, None]).min(0)  # noqa: E731
        assert np.all(np.abs(mu) > 0.95), mu  # at a bound of the action box ...
        assert np.all(q_at(mu) >= q_at(mu - 0.1 * np.sign(mu))), (mu, q_at(mu))  # ... where Q is locally highest


# ----------------------------------------------------------------------------------------------------------------
# Invariants
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def indexed_train(data_dir):
    """The pointmaze training split with the row index written into observation feature 0 (and into the goals, which
    are observations), so a batch tells which rows it came from."""
    train, _ = envs.split_dataset(envs.load_dataset(envs.parse_env(POINTMAZE), str(data_dir)), seed=0)
    train = {k: v.copy() for k, v in train.items()}
    train["observations"][:, 0] = np.arange(len(train["actions"]))
    return train


@pytest.mark.parametrize("script", SCRIPTS)
def test_value_and_policy_batches_stay_inside_their_data_sizes(script, indexed_train, monkeypatch):
    algo, seen = load(script), {"value": [], "actor": []}
    original = envs.sample_batch

    def recording(key, data, data_size, batch_size, goals, *args, **kwargs):
        batch = original(key, data, data_size, batch_size, goals, *args, **kwargs)
        rows = [batch["observations"][:, 0].max()] + ([batch["goals"][:, 0].max()] if "goals" in batch else [])
        jax.debug.callback(lambda r, g=goals: seen[g].append(float(r)), jnp.max(jnp.stack(rows)))
        return batch

    monkeypatch.setattr(envs, "sample_batch", recording)
    config, data = tiny_config(script), envs.to_device(indexed_train)
    state = algo.init_state(jax.random.PRNGKey(0), 2, 2, 2, config)
    value_size, policy_size = 700, 2500
    step = jax.jit(lambda s: algo.update(s, data, member(script, value_size, policy_size), config, True))
    for _ in range(40):
        state, _ = step(state)
    jax.effects_barrier()  # every debug callback has run
    assert max(seen["actor"]) < policy_size and max(seen["actor"]) > 0.9 * policy_size
    if script != "bc":
        assert max(seen["value"]) < value_size and max(seen["value"]) > 0.9 * value_size
    else:
        assert not seen["value"]


@pytest.mark.parametrize("script", Q_SCRIPTS)
def test_actor_update_never_changes_value_parameters(script, data_dir):
    algo = load(script)
    train, _ = envs.split_dataset(envs.load_dataset(envs.parse_env(POINTMAZE), str(data_dir)), seed=0)
    config, data = tiny_config(script), envs.to_device(train)
    state = algo.init_state(jax.random.PRNGKey(0), 2, 2, 2, config)
    step = jax.jit(lambda s, m: algo.update(s, data, m, config, True))
    # Same keys, same value batches; only the policy's data size (and alpha) differ.
    outs = [step(state, member(script, 3000, p, a))[0]["params"] for p, a in ((3000, 0.01), (500, 10.0))]
    for name in [k for k in outs[0] if k != "actor"]:
        for a, b in zip(jax.tree_util.tree_leaves(outs[0][name]), jax.tree_util.tree_leaves(outs[1][name])):
            np.testing.assert_array_equal(a, b)
    actor_pairs = zip(jax.tree_util.tree_leaves(outs[0]["actor"]), jax.tree_util.tree_leaves(outs[1]["actor"]))
    assert any(not np.array_equal(a, b) for a, b in actor_pairs)


# ----------------------------------------------------------------------------------------------------------------
# Smoke runs: every script, every environment family it supports, a complete run folder
# ----------------------------------------------------------------------------------------------------------------
FAMILIES = {"goal-conditioned": POINTMAZE, "singletask": "cube-single-noisy-singletask-v0", "dmc": "walker-run-random"}
TRAIN_KEYS = {"actor_loss", "actor_bc_log_prob", "policy_mse_to_data", "seconds", "updates_per_second"}
VALUE_KEYS = {"q_mean", "critic_loss"}


def smoke_config(script, env, data_dir, out_dir, **overrides):
    flags = {"env": env, "dataset_dir": str(data_dir), "steps": 100, "log_interval": 50, "eval_interval": 100,
             "hidden_dims": (32,), "batch_size": 32, "eval_episodes": 1, "mse_samples": 128,
             "eval_max_steps": 50, "out_dir": out_dir and str(out_dir), "progress": False}
    return runs.make_config(load(script).Config, **{**flags, **overrides})


@pytest.mark.parametrize("script,family", [(s, f) for s in SCRIPTS for f in FAMILIES
                                           if f == "goal-conditioned" or not s.startswith("crl")])
def test_smoke_every_script_on_every_family_it_supports(script, family, data_dir, tmp_path):
    env = FAMILIES[family]
    out = tmp_path / "run"
    num_seeds = 2 if family == "goal-conditioned" else 1
    [result] = load(script).main(smoke_config(script, env, data_dir, out, num_seeds=num_seeds))
    saved = json.loads((out / "result.json").read_text())
    assert saved == result and saved["script"] == script and saved["seeds"] == list(range(num_seeds))
    assert json.loads((out / "config.json").read_text())["config"]["env"] == env
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["event"] == "train"]
    assert len(train) == 2 * num_seeds and {r["event"] for r in records} == {"init", "train", "eval"}
    expected = TRAIN_KEYS | (VALUE_KEYS if script != "bc" else set())
    assert expected <= set(train[0]), expected - set(train[0])
    assert all(math.isfinite(v) for r in train for v in r.values() if isinstance(v, float))
    evals = [r for r in records if r["event"] == "eval"]
    assert len(evals) == num_seeds and all({"success", "return"} <= set(r) for r in evals)
    if family == "dmc":  # no oracle: the MSE metrics say so instead of inventing a number
        assert saved["eval_mse"]["mean"] == "n/a" and "eval_mse" not in evals[0]
    else:
        for key in ("train_mse", "val_mse", "eval_mse"):
            assert all(math.isfinite(v) for v in saved[key]["per_member"]), key
    if num_seeds == 2:  # two members are two different networks
        assert saved["train_mse"]["per_member"][0] != saved["train_mse"]["per_member"][1]


@pytest.mark.parametrize("script", ["iql_ddpgbc", "bc"])
def test_members_file_packs_settings_into_one_program_with_a_folder_each(script, data_dir, tmp_path):
    """scaling.py --pack: members of different seeds, data sizes and alphas train in one vmapped program, and each
    folder holds what a standalone run of its setting writes (the same episodes; numbers equal to float rounding)."""
    has_value = script != "bc"
    settings = [{"seed": 5, "policy_data_size": 2000}, {"seed": 6, "policy_data_size": 4000}]
    if has_value:
        settings[0].update(value_data_size=4000, alpha=1.0)
        settings[1].update(value_data_size=2000, alpha=0.1)
    members = [{**s, "out_dir": str(tmp_path / f"packed{i}")} for i, s in enumerate(settings)]
    (tmp_path / "members.json").write_text(json.dumps(members))
    packed = load(script).main(smoke_config(script, POINTMAZE, data_dir, None,
                                            members_file=str(tmp_path / "members.json")))
    assert len(packed) == 2
    for i, setting in enumerate(settings):
        folder = tmp_path / f"packed{i}"
        saved = json.loads((folder / "result.json").read_text())
        assert saved == packed[i] and saved["seeds"] == [setting["seed"]]
        for key, value in setting.items():
            if key != "seed":
                assert saved[key] == value, key
        flags = json.loads((folder / "config.json").read_text())["config"]
        assert flags["seed"] == setting["seed"] and flags["num_seeds"] == 1 and flags["out_dir"] == str(folder)
        records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        assert {r["member"] for r in records} == {0} and {r["seed"] for r in records} == {setting["seed"]}
        # the standalone run of the same setting
        [alone] = load(script).main(smoke_config(script, POINTMAZE, data_dir, tmp_path / f"alone{i}", **setting))
        for key in runs.RESULT_METRICS:
            np.testing.assert_allclose(saved[key]["mean"], alone[key]["mean"], rtol=1e-3, atol=1e-4, err_msg=key)


def test_bad_members_files_exit_2(data_dir, tmp_path, capsys):
    cases = [("[]", "non-empty JSON list"), ("{", "cannot read --members-file"),
             ('[{"seed": 0}]', "must have 'seed' and 'out_dir'"),
             ('[{"seed": 0, "out_dir": "x", "expectile": 0.7}]', "must have 'seed' and 'out_dir'"),
             ('[{"seed": 0, "out_dir": "x", "alpha": -1}]', "it must be >= 0"),
             ('[{"seed": 0, "out_dir": "x", "policy_data_size": 99999999}]', "--policy-data-size 99999999"),
             ('[{"seed": 0, "out_dir": "x", "alpha": 1}, {"seed": 1, "out_dir": "x", "alpha": 2}]',
              "different settings")]
    for text, message in cases:
        (tmp_path / "members.json").write_text(text.replace('"x"', json.dumps(str(tmp_path / "x"))))
        code, stderr = run_in_process("algos/iql_ddpgbc.py", ["--env", POINTMAZE, "--dataset-dir", str(data_dir),
                                      "--members-file", str(tmp_path / "members.json"), "--no-progress"], capsys)
        assert code == 2 and message in stderr, (text, stderr[-1000:])
        assert len(stderr.strip().splitlines()) == 1 and not (tmp_path / "x").exists(), stderr


@pytest.mark.parametrize("script", ["crl_ddpgbc", "crl_awr", "crl_sfbc"])
def test_crl_on_a_reward_based_task_exits_2_and_says_why(script, data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code, stderr = run_in_process(f"algos/{script}.py", ["--env", "pointmaze-medium-navigate-singletask-v0",
                                                         "--dataset-dir", str(data_dir), "--out-dir", str(out),
                                                         "--no-progress"], capsys)
    assert code == 2, stderr[-2000:]
    assert "needs a goal-conditioned environment" in stderr and len(stderr.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("script", ["sarsa_sfbc", "bc"])
def test_sfbc_and_bc_runs_are_deterministic(script, data_dir, tmp_path):
    results = [load(script).main(smoke_config(script, POINTMAZE, data_dir, tmp_path / name, seed=3))[0]
               for name in ("a", "b")]
    for key in runs.RESULT_METRICS:
        assert results[0][key] == results[1][key]


def test_every_script_documents_every_flag_and_rejects_bad_ones(data_dir, tmp_path, capsys):
    common = ["--env", POINTMAZE, "--dataset-dir", str(data_dir), "--out-dir", str(tmp_path / "bad"), "--no-progress"]
    cases = {"iql_awr": (["--alpha", "-1"], "--alpha must be >= 0"),
             "sarsa_ddpgbc": (["--expectile", "0.9"], "--expectile"),  # SARSA has no expectile to set
             "iql_sfbc": (["--num-samples", "0"], "--num-samples must be >= 1"),
             "crl_awr": (["--latent-dim", "0"], "--latent-dim must be >= 1"),
             "bc": (["--value-data-size", "10"], "--value-data-size")}  # BC has no value function
    for script, (extra, message) in cases.items():
        code, stderr = run_in_process(f"algos/{script}.py", [*common, *extra], capsys)
        assert code == 2 and message in stderr, (script, stderr[-1500:])
        assert not (tmp_path / "bad" / "result.json").exists()


def test_every_flag_has_a_one_line_docstring_shown_by_help():
    for script in SCRIPTS:
        config = load(script).Config
        source = inspect.getsource(config)
        for field in dataclasses.fields(config):
            following = source.split(f"    {field.name}:", 1)[1].splitlines()[1].strip()
            assert following.startswith('"""') and following.endswith('"""') and len(following) > 12, (script, field)
    proc = run_script("algos/crl_sfbc.py", "--help")
    assert proc.returncode == 0 and "--num-samples" in proc.stdout and "Candidate actions sampled" in proc.stdout


def test_bc_obs_transform_is_invertible_and_changes_what_the_policy_learns(data_dir, tmp_path):
    bc = load("bc")
    x = np.linspace(-30.0, 30.0, 6_001).astype(np.float32)  # steps of 0.01: far above float32 rounding at |x| = 30
    for frequency in (0.5, 1.0, 4.0):
        y = np.asarray(bc.transform_observations(jnp.asarray(x), "warp", frequency), np.float64)
        slopes = np.diff(y) / np.diff(x.astype(np.float64))
        assert slopes.min() > 0.09 and slopes.max() < 1.91, frequency  # strictly increasing: continuous, invertible
        assert np.abs(y - x).max() <= 0.9 / frequency + 1e-4
        # known values: y = x + 0.9 / w at w x = pi / 2, x - 0.9 / w at 3 pi / 2, x where sin(w x) = 0
        points = np.array([np.pi / 2, 3 * np.pi / 2, np.pi], np.float32) / frequency
        np.testing.assert_allclose(bc.transform_observations(jnp.asarray(points), "warp", frequency),
                                   points + np.array([0.9, -0.9, 0.0]) / frequency, atol=1e-5)
    assert bc.transform_observations(x, "none", 1.0) is x
    results = {kind: bc.main(smoke_config("bc", POINTMAZE, data_dir, tmp_path / kind, obs_transform=kind))[0]
               for kind in ("none", "warp")}
    config = json.loads((tmp_path / "warp" / "config.json").read_text())["config"]
    assert config["obs_transform"] == "warp" and config["obs_transform_frequency"] == 1.0
    for key in ("train_mse", "val_mse", "eval_mse"):
        assert math.isfinite(results["warp"][key]["mean"])
        assert results["warp"][key]["mean"] != results["none"][key]["mean"], key


def test_members_run_one_after_another_on_cpu_and_side_by_side_elsewhere(data_dir, monkeypatch):
    """runs.over_members: on CPU the chunk maps its members in sequence (lax.map), on an accelerator it vmaps them;
    both give every member the same training up to float rounding (the shared dataset is not mapped over)."""
    script = "iql_ddpgbc"
    algo = load(script)
    train, _ = envs.split_dataset(envs.load_dataset(envs.parse_env(POINTMAZE), str(data_dir)), seed=0)
    config = tiny_config(script, log_interval=5)
    data = envs.to_device(train)
    members = {k: jnp.asarray(v) for k, v in
               {"value_data_size": [3000, 1000], "policy_data_size": [500, 3000], "alpha": [0.1, 3.0]}.items()}
    states = jax.vmap(lambda k: algo.init_state(k, 2, 2, 2, config))(jax.random.split(jax.random.PRNGKey(0), 2))
    copy = lambda tree: jax.tree_util.tree_map(jnp.copy, tree)  # noqa: E731  (the chunk donates its state)
    def program(state, shared, member):  # a toy chunk: its jaxpr shows whether members are mapped or vmapped
        return state * shared + member

    toy = (jnp.ones((2, 3)), jnp.ones(3), jnp.ones((2, 3)))
    assert jax.default_backend() == "cpu"
    assert "scan" in str(jax.make_jaxpr(runs.over_members(program))(*toy))
    mapped = algo.make_train_chunk(config, True)(copy(states), data, members, None)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert "scan" not in str(jax.make_jaxpr(runs.over_members(program))(*toy))
    vmapped = algo.make_train_chunk(config, True)(copy(states), data, members, None)
    for a, b in zip(jax.tree_util.tree_leaves(mapped), jax.tree_util.tree_leaves(vmapped)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # and each member is the member alone: the same as a one-member chunk of that setting
    alone = algo.make_train_chunk(config, True)(copy(jax.tree_util.tree_map(lambda x: x[1:], states)), data,
                                                {k: v[1:] for k, v in members.items()}, None)
    for a, b in zip(jax.tree_util.tree_leaves(vmapped), jax.tree_util.tree_leaves(alone)):
        np.testing.assert_allclose(np.asarray(a)[1:], b, rtol=1e-4, atol=1e-5)
