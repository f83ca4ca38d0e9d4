"""Solvers behind one protocol in which one call is one evaluation of the objective:

    state = solver.init(x0, reuse=None)          # a (re)start at x0, evaluated next; `reuse`: buffers to keep
    point = solver.ask(state)                    # where to evaluate
    state, step = solver.tell(state, point, value, grad)   # step: started / iterated (dlg_jax.parts.attempts)

so the engine runs any of them lane by lane on CPU and vmapped on accelerators, no lane waiting for another's
line search. x is a flat vector (the dummy's `Layout`). A new solver is a module with such a class and a line
in `SOLVERS`: a function from the attack's config to the solver.

`jaxopt-lbfgs` (jaxopt's own LBFGS, the oracle of the engine's) is the exception: jaxopt's iteration holds its
line search, so it runs one attack at a time (`dlg_jax.solvers.jaxopt_lbfgs.run`), not in the engine's lanes.
"""

from __future__ import annotations

from dlg_jax.solvers.adam import Adam
from dlg_jax.solvers.lbfgs import LBFGS
from dlg_jax.solvers.torch_lbfgs import TorchLBFGS


def _lbfgs(config) -> LBFGS:
    s = config.solver
    return LBFGS(s.history_size, s.linesearch_condition, s.linesearch_decrease, s.max_linesearch_steps)


def _torch_lbfgs(config) -> TorchLBFGS:
    r = config.rules
    return TorchLBFGS(max_iter=r.iterations_per_step, max_eval=r.step_evaluations, history_size=config.solver.history_size)


def _adam(config) -> Adam:
    s = config.solver
    return Adam(s.learning_rate, s.schedule, config.rules.max_iterations, s.signed)


SOLVERS = {"lbfgs": _lbfgs, "torch-lbfgs": _torch_lbfgs, "adam": _adam, "jaxopt-lbfgs": None}
ENGINE_SOLVERS = ("lbfgs", "torch-lbfgs", "adam")


def make_solver(config):
    """The solver `config.solver.optimizer` names, set up from the config (one evaluation per call)."""
    make = SOLVERS[config.solver.optimizer]
    if make is None:
        raise ValueError(f"{config.solver.optimizer} runs one attack at a time (dlg_jax.solvers.jaxopt_lbfgs), "
                         f"not in the engine: choose from {', '.join(ENGINE_SOLVERS)}")
    return make(config)
