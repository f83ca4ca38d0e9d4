"""jaxopt's own LBFGS, the design card's solver, driven by the same attempt rules as the engine.

jaxopt's `update` is a whole iteration (its line search a loop inside it), so it cannot run in the engine's
one-evaluation-per-call lanes; it runs here, one attack at a time, and is the oracle the engine's L-BFGS is
tested against (tests/test_solvers.py: the same iterates to float tolerance). Its line search is configured
through jaxopt's public API (a `BacktrackingLineSearch` instance); Armijo is its weak-Wolfe test with the
curvature condition switched off (c2 = inf), which evaluates D and its gradient together at each trial, as
the engine does. The one addition: pairs with s.y <= 1e-10 are dropped from the state jaxopt returns (rho = 0,
gamma kept), as the engine's L-BFGS and torch's skip them.

Budgets are checked as each jaxopt iteration ends, so an evaluation budget that runs out inside a line search
ends the attack at the end of that iteration (the engine stops at the evaluation itself).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import jaxopt

from dlg_jax.parts import attempts as rules_lib
from dlg_jax.solvers.lbfgs import CURVATURE_EPS, WOLFE_C2


def make_jaxopt_lbfgs(fun: Callable, history_size: int, condition: str, decrease: float, max_linesearch_steps: int,
                      maxiter: int) -> jaxopt.LBFGS:
    linesearch = jaxopt.BacktrackingLineSearch(
        fun=fun, value_and_grad=False, maxiter=max_linesearch_steps, decrease_factor=decrease,
        condition="wolfe" if condition == "armijo" else condition,
        c2=float("inf") if condition == "armijo" else WOLFE_C2)
    return jaxopt.LBFGS(fun=fun, history_size=history_size, maxiter=maxiter, linesearch=linesearch)


def skip_nonpositive_curvature(history_size: int, before, after):
    """`after` (jaxopt's state after an iteration from `before`) without its new pair if s . y <= CURVATURE_EPS."""
    slot = before.iter_num % history_size
    rho = after.rho_history[slot]  # 1 / (s . y), and 0 where s . y = 0
    curved = (rho > 0) & (rho < 1.0 / CURVATURE_EPS)
    return after._replace(rho_history=after.rho_history.at[slot].set(jnp.where(curved, after.rho_history[slot], 0.0)),
                          gamma=jnp.where(curved, after.gamma, before.gamma))


class Carry(NamedTuple):
    x: jax.Array
    state: Any  # jaxopt's LbfgsState
    attempt: rules_lib.Attempt
    restart: jax.Array  # bool: the next call starts jaxopt afresh at x


def start(solver: jaxopt.LBFGS, problem, params) -> Carry:
    """The carry of an attack about to start at `problem.init` (its first evaluation pending)."""
    state = jax.eval_shape(lambda: solver.init_state(problem.init, jnp.zeros((), problem.init.dtype), problem, params))
    state = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), state)
    return Carry(problem.init, state, rules_lib.begin(problem.init), jnp.ones((), bool))


def advance(solver: jaxopt.LBFGS, rules: rules_lib.Rules, problem, params, layout, carry: Carry,
            until_iteration) -> Carry:
    """jaxopt iterations (or fresh starts) until the attempt rules stop the attack or `until_iteration`
    iterations are done in all."""

    def begin(x, weight):
        state = solver.init_state(x, weight, problem, params)
        return state, rules_lib.Step(jnp.ones((), bool), jnp.zeros((), bool)), x, state.num_fun_eval

    def iterate(c: Carry, weight):
        x, state = solver.update(c.x, c.state, weight, problem, params)
        state = skip_nonpositive_curvature(solver.history_size, c.state, state)
        return state, rules_lib.Step(jnp.zeros((), bool), jnp.ones((), bool)), x, state.num_fun_eval - c.state.num_fun_eval

    def body(c: Carry) -> Carry:
        weight = rules_lib.prior_weight(rules, c.attempt)
        state, step, point, used = jax.lax.cond(c.restart, lambda: begin(c.x, weight), lambda: iterate(c, weight))
        attempt, again, restart = rules_lib.after_evaluation(rules, c.attempt, step, point, state.value,
                                                             c.attempt.evaluations + used, problem.target,
                                                             problem.floor)
        return Carry(rules_lib.restart_point(attempt, again, point, problem.key, layout), state, attempt, restart)

    def going(c: Carry):
        return (c.attempt.status == rules_lib.RUNNING) & (c.attempt.iterations < until_iteration)

    return jax.lax.while_loop(going, body, carry)
