"""Plant each of issue 14's engine bugs, one at a time, and show which tests catch it.

    python experiments/mutation_check.py            # prints one line per bug: the tests that failed

Each bug is a text substitution in one library file; the file is restored after its tests ran (also on
Ctrl-C). A bug that no listed test catches prints CAUGHT BY NOTHING and the script exits 1.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BUGS = [
    ("the engine never converges", "dlg_jax/parts/attempts.py",
     "[~finite, (value <= target) & last_stage, stalled, spent_iterations]",
     "[~finite, (value < -1.0) & last_stage, stalled, spent_iterations]",
     ["tests/test_engine.py::test_lanes_that_converge_equal_jaxopt_lbfgs_alone",
      "tests/test_engine.py::test_real_length_sweep_of_two_images_reaches_30_db"]),
    ("the line search accepts any decrease", "dlg_jax/solvers/lbfgs.py",
     "diff1 = value - (value0 + C1 * t * slope0)", "diff1 = value - value0",
     ["tests/test_solvers.py::test_line_search_refuses_a_decrease_above_the_armijo_line",
      "tests/test_solvers.py::test_engine_lbfgs_follows_jaxopt_lbfgs"]),
    ("earlier attempts' evaluations counted twice from the third attempt", "dlg_jax/engine/lanes.py",
     "lane.progress.evaluations + 1, lane.problem.target)",
     "lane.progress.evaluations + 1 + jnp.where((lane.progress.attempt >= 2) & step.started, "
     "lane.progress.evaluations, 0), lane.problem.target)",
     ["tests/test_engine.py::test_a_chain_of_four_attempts_starts_each_from_its_own_fresh_dummy"]),
    ("every retry starts from the same point (in the rules' restart point)", "dlg_jax/parts/attempts.py",
     "fresh_start(jax.random.wrap_key_data(key_data), a.attempt, layout)",
     "fresh_start(jax.random.wrap_key_data(key_data), 1, layout)",
     ["tests/test_engine.py::test_a_chain_of_four_attempts_starts_each_from_its_own_fresh_dummy"]),
    ("every retry starts from the same point (in the shared helper)", "dlg_jax/parts/dummies.py",
     "jax.random.fold_in(key, attempt)", "jax.random.fold_in(key, 1)",
     ["tests/test_engine.py::test_a_chain_of_four_attempts_starts_each_from_its_own_fresh_dummy"]),
    ("the attack returns the last iterate instead of the best", "dlg_jax/engine/attack.py",
     "inputs=self.inputs(progress.best), current=", "inputs=self.inputs(progress.current), current=",
     ["tests/test_engine.py::test_what_comes_back_is_the_best_iterate_not_the_last"]),
]


def main() -> int:
    missed = 0
    for name, path, old, new, tests in BUGS:
        file = ROOT / path
        original = file.read_text()
        assert original.count(old) == 1, (name, "the text to mutate is not found once")
        try:
            file.write_text(original.replace(old, new))
            proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
                                  cwd=ROOT, capture_output=True, text=True)
        finally:
            file.write_text(original)
        failed = [line.split(" ")[1] for line in proc.stdout.splitlines() if line.startswith("FAILED ")]
        if not failed:
            missed += 1
        print(f"{name}: {'caught by ' + ', '.join(f.split('::')[1].split(' ')[0] for f in failed) if failed else 'CAUGHT BY NOTHING'}",
              flush=True)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
