"""Do the tests catch the bugs that matter? Apply each plausible one-line bug to a copy of the repository and run the
tests that claim to cover it; every mutation must make at least one of them fail.

    python benchmarks/mutations.py                 # every mutation (about 2 minutes on 2 cores)
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
