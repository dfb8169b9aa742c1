"""Do the tests catch the bugs that matter? Apply each plausible one-line bug to a copy of the repository and run the
tests that claim to cover it; every mutation must make at least one of them fail.

    python benchmarks/mutations.py                 # every mutation (minutes on 2 cores)
    python benchmarks/mutations.py --only clip     # the ones whose name contains "clip"

The working tree is never touched: each mutation is applied to a fresh copy of the tracked files (`git ls-files`)
in a temporary folder, whose tests then run with this Python. A mutation that no longer applies (its line changed)
is reported as such, and counts as a failure of this check: update the mutation with the code. docs/reliability.md
lists the mutations and the tests that catch them. Exit status 0 when every mutation is caught, 1 otherwise.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import tyro

ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    before: str  # must occur exactly once in the file
    after: str
    tests: tuple[str, ...]  # pytest node ids (or file::name prefixes, selected with -k)


MUTATIONS = (
    Mutation("geometric offset with log(1 - discount)", "envs.py",
             "/ jnp.log(goal_config.discount))", "/ jnp.log(1 - goal_config.discount))",
             ("tests/test_envs.py::test_geometric_value_goals_are_a_geometric_number_of_steps_ahead",)),
    Mutation("DDPG+BC evaluates Q at mu, not clip(mu)", "algos/iql_ddpgbc.py",
             'batch.get("goals"), jnp.clip(mu, -1.0, 1.0)).min(0)', 'batch.get("goals"), mu).min(0)',
             ("tests/test_algos.py::test_ddpgbc_loss_and_actor_gradient_by_hand_where_the_clip_and_the_min_both_matter",)),
    Mutation("DDPG+BC climbs the mean of the twin critics, not their min", "algos/iql_ddpgbc.py",
             'jnp.clip(mu, -1.0, 1.0)).min(0)', 'jnp.clip(mu, -1.0, 1.0)).mean(0)',
             ("tests/test_algos.py::test_ddpgbc_loss_and_actor_gradient_by_hand_where_the_clip_and_the_min_both_matter",)),
    Mutation("a 99% interval labelled 95%", "analyze.py",
             "tail = 50 * (1 - self.confidence)", "tail = 50 * (1 - 0.99)",
             ("tests/test_analyze.py::test_intervals_cover_the_true_value_at_their_stated_rate_neither_more_nor_less",
              "tests/test_analyze.py::test_interval_width_is_the_normal_theory_width_at_each_confidence")),
    Mutation("a 90% interval labelled 95%", "analyze.py",
             "tail = 50 * (1 - self.confidence)", "tail = 50 * (1 - 0.90)",
             ("tests/test_analyze.py::test_intervals_cover_the_true_value_at_their_stated_rate_neither_more_nor_less",
              "tests/test_analyze.py::test_interval_width_is_the_normal_theory_width_at_each_confidence")),
    Mutation("best_success not carried across a resume", "runs.py",
             "                merged.best_success[m] = part.best_success[i]\n", "",
             ("tests/test_reliability.py::test_a_resume_carries_every_host_field_with_a_success_above_zero",)),
    # issue 38: one-line bugs of the same plausibility, over every script family, sampling, test time, runs, analysis
    Mutation("CRL's critic goals: IQL's value mixture instead of future states only", "algos/crl_ddpgbc.py",
             "envs.GoalConfig(p_current=0.0, p_trajectory=1.0, p_random=0.0, discount=config.discount)",
             "envs.GoalConfig(discount=config.discount)",
             ("tests/test_known_values.py::test_each_script_asks_the_reference_goal_mixture_for_each_role[crl_ddpgbc]",)),
    Mutation("CRL + AWR's critic goals with a current-state share", "algos/crl_awr.py",
             "envs.GoalConfig(p_current=0.0, p_trajectory=1.0, p_random=0.0, discount=config.discount)",
             "envs.GoalConfig(p_current=0.2, p_trajectory=0.8, p_random=0.0, discount=config.discount)",
             ("tests/test_known_values.py::test_each_script_asks_the_reference_goal_mixture_for_each_role[crl_awr]",)),
    Mutation("BC's actor goals ignore --actor-p-randomgoal", "algos/bc.py",
             "actor_p_random=config.actor_p_randomgoal)", ")",
             ("tests/test_known_values.py::test_each_script_asks_the_reference_goal_mixture_for_each_role[bc]",)),
    Mutation("SfBC's candidates ignore the learned std (mean + unit noise)", "algos/iql_sfbc.py",
             "jnp.clip(mean + jnp.exp(log_std) * noise, -1.0, 1.0)", "jnp.clip(mean + noise, -1.0, 1.0)",
             ("tests/test_known_values.py::test_sfbc_candidates_follow_the_bc_gaussian_and_the_pessimistic_q_picks[iql_sfbc]",)),
    Mutation("CRL + SfBC picks by the ensemble max, not the min", "algos/crl_sfbc.py",
             "critic_fn(critic_params, obs, goals, a).min(0))(candidates)",
             "critic_fn(critic_params, obs, goals, a).max(0))(candidates)",
             ("tests/test_known_values.py::test_sfbc_candidates_follow_the_bc_gaussian_and_the_pessimistic_q_picks[crl_sfbc]",)),
    Mutation("TTT's anchor from the copy being adapted (the anchor term always zero)", "testtime.py",
             'anchor = mean_action(params["actor"], obs, goals)', "anchor = mean_action(actor_params, obs, goals)",
             ("tests/test_known_values.py::test_ttt_objective_is_q_alone_at_the_start_and_pulls_back_to_the_pretrained_policy",)),
    Mutation("OPEX normalises the gradient over the whole batch, not per state", "testtime.py",
             "g = g / (jnp.linalg.norm(g, axis=-1, keepdims=True) + 1e-8)", "g = g / (jnp.linalg.norm(g) + 1e-8)",
             ("tests/test_known_values.py::test_opex_steps_up_a_known_quadratic_per_state",)),
    Mutation("next_actions cross into the next trajectory", "envs.py",
             'batch["next_actions"] = rows("actions", jnp.minimum(idxs + 1, final))',
             'batch["next_actions"] = rows("actions", jnp.minimum(idxs + 1, data_size - 1))',
             ("tests/test_online.py::test_next_actions_are_the_next_row_of_the_same_trajectory_subset_and_online_episode",)),
    Mutation("value goals rewarded 1 at the goal instead of 0 (reward = success)", "envs.py",
             'batch["rewards"] = success - 1.0', 'batch["rewards"] = success',
             ("tests/test_envs.py::test_value_goals_are_current_trajectory_or_random_with_the_configured_probabilities",)),
    Mutation("a reversed Polyak rate", "algos/iql_awr.py",
             "lambda t, p: (1 - config.tau) * t + config.tau * p", "lambda t, p: config.tau * t + (1 - config.tau) * p",
             ("tests/test_fidelity.py::test_targets_move_towards_the_critic_before_its_update[iql_awr]",)),
    Mutation("IQL's expectile weights swapped", "algos/iql_ddpgbc.py",
             "weight = jnp.where(diff < 0, 1.0 - expectile, expectile)",
             "weight = jnp.where(diff < 0, expectile, 1.0 - expectile)",
             ("tests/test_algos.py::test_expectile_value_and_td_critic_losses_by_hand[iql_ddpgbc]",)),
    Mutation("CRL + AWR's weight not clipped at 100", "algos/crl_awr.py",
             "weight = jnp.minimum(jnp.exp(alpha * advantage), AWR_MAX_WEIGHT)",
             "weight = jnp.exp(alpha * advantage)",
             ("tests/test_algos.py::test_awr_weights_are_exponentiated_advantages_clipped_at_100[crl_awr]",)),
    Mutation("SARSA + DDPG+BC's Q term not normalised by E|Q|", "algos/sarsa_ddpgbc.py",
             "q_loss = -q.mean() / jax.lax.stop_gradient(jnp.abs(q).mean() + 1e-6)", "q_loss = -q.mean()",
             ("tests/test_algos.py::test_ddpgbc_normalises_q_by_its_batch_mean_absolute_value[sarsa_ddpgbc]",)),
    Mutation("the NaN guard reads the losses only, not the parameters", "runs.py",
             "        if not all(bool(jnp.isfinite(leaf).all()) for leaf in jax.tree_util.tree_leaves(params)):\n"
             "            bad.append(\"parameters\")\n", "",
             ("tests/test_reliability.py::test_nan_guard_exits_3_names_the_step_and_keeps_the_last_good_state",)),
    Mutation("a verdict's axis matters only when its interval lies above zero", "analyze.py",
             "> floor and (low > 0 or high < 0))", "> floor and low > 0)",
             ("tests/test_analyze.py::test_verdicts_policy_value_both_flat_and_noise",)),
)


@dataclasses.dataclass
class Args:
    only: str = ""
    """Run only the mutations whose name contains this text."""


def tracked_copy(target: Path) -> None:
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


def run_tests(tests: list[str], copy: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests], cwd=copy,
                          capture_output=True, text=True)


def check(mutation: Mutation, copy: Path) -> str:
    """'caught by <test>', 'NOT CAUGHT' or 'does not apply'; the copy's file is restored afterwards."""
    path = copy / mutation.file
    original = path.read_text()
    if original.count(mutation.before) != 1:
        return "does not apply (the line changed: update the mutation)"
    path.write_text(original.replace(mutation.before, mutation.after))
    try:
        for test in mutation.tests:
            proc = run_tests([test], copy)
            if proc.returncode == 1:  # 1: tests ran and some failed (2+: collection or usage errors)
                return f"caught by {test}"
            if proc.returncode != 0:
                return f"error running {test} (exit {proc.returncode}): {proc.stdout[-500:]}"
        return "NOT CAUGHT"
    finally:
        path.write_text(original)


def main(args: Args) -> int:
    chosen = [m for m in MUTATIONS if args.only in m.name]
    with tempfile.TemporaryDirectory(prefix="mutations-") as folder:
        copy = Path(folder)
        tracked_copy(copy)
        # the named tests pass on the code as it is: a failure under a mutation is then the mutation's doing
        baseline = run_tests(sorted({t for m in chosen for t in m.tests}), copy)
        if baseline.returncode != 0:
            print(f"the tests fail without any mutation:\n{baseline.stdout[-3000:]}")
            return 1
        results = [(m, check(m, copy)) for m in chosen]
    for mutation, outcome in results:
        print(f"{mutation.name} ({mutation.file}): {outcome}")
    caught = sum(outcome.startswith("caught") for _, outcome in results)
    print(f"{caught} of {len(results)} mutations caught")
    return 0 if caught == len(results) else 1


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Args)))
