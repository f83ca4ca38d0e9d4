"""The engine's L-BFGS: jaxopt's algorithm with a backtracking line search, one evaluation per `tell`.

jaxopt's `LBFGS.update` is a whole iteration, its line search a `while_loop` inside it; under `vmap` every lane
then waits for the longest search of the batch (measured: 2.5x the evaluations a batch of 32 needed). Here a
lane is always either trying a line-search step or starting, so one call is one evaluation and no lane waits:

    state = solver.init(x0)
    point = solver.ask(state)                               # x0, or x + t d
    state, step = solver.tell(state, point, *value_and_grad(point))

Its decisions are jaxopt's (backtracking on Armijo / Wolfe / strong Wolfe, the "increase" first trial,
gamma = s.y / y.y), so each lane follows jaxopt.LBFGS's trajectory to float rounding (the oracle test). Two
changes, both measured on the shared CIFAR-100 images (docs/performance.md, "Solver settings"):

- Armijo's sufficient decrease alone, halving the step (jaxopt's strong Wolfe by 0.8 spent 30 trials on
  steps too short for the curvature test, which backtracking cannot fix): 30-60% fewer evaluations.
- Pairs with s.y <= 1e-10 are skipped, as torch's LBFGS skips them (Armijo does not ensure curvature; one pair
  with gamma < 0 turned the next direction uphill: 30 trials, then a step of ~1e-9; `CURVATURE_EPS`).

The direction is the compact form of the L-BFGS product (`inverse_hessian_product`): two matrix passes over
the history instead of the 200-step two-loop recursion, which cost as much as an evaluation of D.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dlg_jax.parts.attempts import Step

MAX_STEPSIZE, MIN_STEPSIZE, INCREASE_FACTOR = 1.0, 1e-6, 1.5  # jaxopt.LBFGS's defaults
C1, WOLFE_C2 = 1e-4, 0.9  # jaxopt.BacktrackingLineSearch's defaults
# A pair counts only with s.y > 1e-10, torch's threshold. With s.y > 0 alone, float32 pairs at the rounding floor
# (|g| ~ 1e-5, y mostly rounding) set gamma = s.y / y.y to 432 and then 2e-4 within 200 iterations: every line
# search then failed (30 evaluations), and the batch preset's non-final TV stages, which run to that floor, spent
# the whole budget (12 batches of 4: 15,000 of 15,000 evaluations each, against 11,871 to converge with it).
CURVATURE_EPS = 1e-10


class LbfgsState(NamedTuple):
    x: jax.Array  # the current iterate (flat)
    value: jax.Array  # D(x)
    grad: jax.Array  # dD/dx
    s_history: jax.Array  # (history, n) ring buffers; slots >= count are stale (never read unmasked)
    y_history: jax.Array
    sy: jax.Array  # (history, history): sy[i, j] = s_i . y_j, kept up to date pair by pair
    yy: jax.Array  # (history, history): yy[i, j] = y_i . y_j
    gamma: jax.Array
    count: jax.Array  # iterations since the start: ring position, and how many slots are valid
    stepsize: jax.Array  # the last accepted step size
    direction: jax.Array
    slope: jax.Array  # grad . direction
    trial: jax.Array  # step size of the next trial
    ls_iter: jax.Array  # trials done in this line search
    fresh: jax.Array  # bool: the next evaluation starts at x instead of trying a step


def inverse_hessian_product(g, s_history, y_history, sy, yy, gamma, count):
    """H g for L-BFGS's inverse-Hessian approximation H, from a ring buffer of pairs, in compact form.

    The compact representation of Byrd, Nocedal and Schnabel (1994; Nocedal & Wright eq. 7.24), with the k
    valid pairs as columns of S, Y (n x k) in chronological order,

        H = gamma I + [S  gamma Y] [[R^-T (D + gamma Y'Y) R^-1, -R^-T], [-R^-1, 0]] [S'; gamma Y']

    (R the upper triangle of S'Y, D its diagonal) gives

        H g = gamma g + S R^-T ((D + gamma Y'Y) c - gamma Y'g) - gamma Y c,   c = R^-1 S'g:

    two matrix products over the history and k x k triangular solves (~0.1 ms against the two-loop's ~0.4 ms
    for 100 pairs on a CPU core). `sy` and `yy` are kept by slot; the pair written last, at slot
    (count - 1) % history, enters them here in the same pass as S'g and Y'g (at count 0 that slot is stale and
    what enters is masked). Stale slots and pairs with s . y <= CURVATURE_EPS are masked out, which leaves H as the
    two-loop over the valid pairs. Returns (H g, sy, yy).
    """
    size = s_history.shape[0]
    newest = (count - 1) % size
    vectors = jnp.stack([y_history[newest], s_history[newest], g], axis=1)  # one pass: (history, 3) each
    s_dots, y_dots = s_history @ vectors, y_history @ vectors
    sy = sy.at[:, newest].set(s_dots[:, 0]).at[newest, :].set(y_dots[:, 1])
    yy = yy.at[:, newest].set(y_dots[:, 0]).at[newest, :].set(y_dots[:, 0])
    order = (count + jnp.arange(size)) % size  # slots oldest first
    sy_ordered = sy[order][:, order]
    valid = (order < count) & (jnp.diagonal(sy_ordered) > CURVATURE_EPS)
    both = valid[:, None] & valid[None, :]
    upper = jnp.arange(size)[:, None] <= jnp.arange(size)[None, :]
    r = jnp.where(both & upper, sy_ordered, 0.0) + jnp.diag(jnp.where(valid, 0.0, 1.0)).astype(sy.dtype)
    d = jnp.where(valid, jnp.diagonal(sy_ordered), 0.0)
    a = jnp.where(valid, s_dots[order, 2], 0.0)
    b = jnp.where(valid, y_dots[order, 2], 0.0)
    c = jax.scipy.linalg.solve_triangular(r, a, lower=False)
    yy_c = jnp.where(both, yy[order][:, order], 0.0) @ c
    top = jax.scipy.linalg.solve_triangular(r, d * c + gamma * (yy_c - b), lower=False, trans="T")
    slot_of = (jnp.arange(size) - count) % size  # back from chronological to slot order (order's inverse)
    return gamma * g + top[slot_of] @ s_history - gamma * c[slot_of] @ y_history, sy, yy


def armijo_accepts(value, value0, slope0, t, new_slope, condition: str, c2: float, tol: float = 0.0):
    """jaxopt's backtracking test of a trial step t from (value0, slope0): sufficient decrease, and for (strong)
    Wolfe the curvature condition; a NaN counts as failing."""
    diff1 = value - (value0 + C1 * t * slope0)
    error = jnp.maximum(jnp.where(jnp.isnan(diff1), jnp.inf, diff1), 0.0)
    if condition != "armijo":
        diff2 = jnp.abs(new_slope) - c2 * jnp.abs(slope0) if condition == "strong-wolfe" else c2 * slope0 - new_slope
        error = jnp.maximum(error, jnp.maximum(jnp.where(jnp.isnan(diff2), jnp.inf, diff2), 0.0))
    return error <= tol


@dataclasses.dataclass(frozen=True)
class LBFGS:
    """L-BFGS with a backtracking line search, one evaluation per `tell` (module docstring)."""

    history_size: int = 100
    condition: str = "armijo"  # armijo, wolfe, strong-wolfe
    decrease: float = 0.5
    max_linesearch_steps: int = 30

    def init(self, x: jax.Array, reuse: LbfgsState | None = None) -> LbfgsState:
        """Start at x (evaluated next). `reuse`: a state whose history buffers to keep (stale slots are never
        read, so a lane's 2 x history x n floats are not rewritten at each start)."""
        n, dtype = x.shape[0], x.dtype
        zero_i, zero = jnp.zeros((), jnp.int32), jnp.zeros((), dtype)
        history = jnp.zeros((self.history_size, n), dtype)
        table = jnp.zeros((self.history_size, self.history_size), dtype)
        return LbfgsState(x=x, value=zero, grad=jnp.zeros_like(x),
                          s_history=history if reuse is None else reuse.s_history,
                          y_history=history if reuse is None else reuse.y_history, sy=table, yy=table,
                          gamma=jnp.ones((), dtype), count=zero_i, stepsize=jnp.asarray(MAX_STEPSIZE, dtype),
                          direction=jnp.zeros_like(x), slope=zero, trial=zero, ls_iter=zero_i,
                          fresh=jnp.ones((), bool))

    def ask(self, state: LbfgsState) -> jax.Array:
        return jnp.where(state.fresh, state.x, state.x + state.trial * state.direction)

    def tell(self, state: LbfgsState, point, value, grad) -> tuple[LbfgsState, Step]:
        fresh, t = state.fresh, state.trial
        c2 = float("inf") if self.condition == "armijo" else WOLFE_C2  # Armijo: weak Wolfe without curvature
        done = armijo_accepts(value, state.value, state.slope, t, grad @ state.direction, self.condition, c2)
        failed = (state.ls_iter + 1 == self.max_linesearch_steps) & ~done
        accepted = ~fresh & (done | failed)  # the iteration is complete at `point` (jaxopt takes a failed trial too)
        s, y = point - state.x, grad - state.grad
        curved = s @ y > CURVATURE_EPS
        yy_new = y @ y
        gamma = jnp.where(curved, jnp.where(yy_new > 0, (s @ y) / yy_new, 1.0), state.gamma)
        finite = lambda a: jnp.where(jnp.isfinite(a), a, 0.0)  # noqa: E731  (a diverged pair: zeros, not NaN)
        slot = jnp.where(accepted, state.count % self.history_size, self.history_size)  # out of range: dropped
        moved = accepted | fresh
        state = state._replace(
            x=jnp.where(moved, point, state.x), value=jnp.where(moved, value, state.value),
            grad=jnp.where(moved, grad, state.grad),
            s_history=state.s_history.at[slot].set(finite(s), mode="drop"),
            y_history=state.y_history.at[slot].set(finite(y), mode="drop"),
            gamma=jnp.where(accepted, gamma, state.gamma), count=state.count + accepted,
            stepsize=jnp.where(accepted, t, state.stepsize),
            trial=jnp.minimum(MAX_STEPSIZE, t * self.decrease), ls_iter=state.ls_iter + 1, fresh=jnp.zeros((), bool))
        state = jax.lax.cond(moved, self._next_direction, lambda s: s, state)
        return state, Step(started=fresh, iterated=accepted)

    def _next_direction(self, state: LbfgsState) -> LbfgsState:
        """The next search direction (bringing the s.y / y.y tables up to date), its slope and first trial."""
        product, sy, yy = inverse_hessian_product(state.grad, state.s_history, state.y_history, state.sy, state.yy,
                                                  state.gamma, state.count)
        trial = jnp.where(state.stepsize <= MIN_STEPSIZE, MAX_STEPSIZE, state.stepsize * INCREASE_FACTOR)
        return state._replace(direction=-product, slope=-product @ state.grad, sy=sy, yy=yy,
                              trial=jnp.minimum(MAX_STEPSIZE, trial), ls_iter=jnp.zeros_like(state.ls_iter))
