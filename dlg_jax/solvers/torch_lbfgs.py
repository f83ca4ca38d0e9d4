"""`torch.optim.LBFGS` without a line search, as the DLG reference drives it, in pure JAX.

The reference attack calls `optimizer.step(closure)` 300 times on an LBFGS with torch's defaults: lr 1,
max_iter 20, max_eval 25, history_size 100, line_search_fn None, tolerance_grad 1e-7, tolerance_change 1e-9.
`TorchLBFGS` reproduces one such step per `update`, decision for decision (torch 2.x `LBFGS.step`):

- Each step starts by evaluating f and g at x (counted in `num_fun_eval`, as torch's `func_evals`); if
  max|g| <= tolerance_grad the step returns at once, changing nothing else.
- Then up to max_iter inner iterations. The very first iteration of the whole run (torch's global
  `n_iter == 1`) takes d = -g, clears the history, H_diag = 1 and t = min(1, 1/||g||_1) * lr. Every later
  one first stores the curvature pair y = g - g_prev, s = t d (only if y.s > 1e-10, dropping the oldest
  pair once history_size are stored; then H_diag = y.s / y.y), takes d from the two-loop recursion and t = lr.
- If g.d > -tolerance_change the step stops without moving (torch still keeps the new d and t).
- Otherwise x += t d, a fixed step, no line search. Unless this was the max_iter-th iteration, f and g are
  evaluated at the new x and the step stops when max_eval evaluations are used, max|g| <= tolerance_grad,
  max|t d| <= tolerance_change or |f - f_prev| < tolerance_change. After the max_iter-th iteration nothing
  is evaluated: the next step's first evaluation is at the new point, and its pair (s, y) is stored then.

With the defaults a step makes 20 evaluations (1 + 19) and 20 moves, the last of them unevaluated.

The engine runs it as every solver, one evaluation per `tell`: torch's step loop unrolled into the flat state
machine (a step ends after max_iter moves or at a stop; the next evaluation starts the next step). `init_state(x,
*args)`, then `update(x, state, *args) -> (x, state)`, one update = one torch `optimizer.step`, drive the same
`tell`; x is any pytree (flattened with `ravel_pytree`, so the flat order, and
with it the rounding of dot products, differs from torch's NCHW tensors, nothing else). No Python control
flow depends on traced values: `update` runs under `jit` and `vmap` (each lane stops on its own in the
inner `lax.while_loop`). `run_torch_lbfgs` / `make_torch_lbfgs_runner` drive the reference's 300 steps.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from dlg_jax.parts.attempts import Step

CURVATURE_EPS = 1e-10  # torch stores a pair only if y.s > 1e-10 (hard-coded in LBFGS.step)


class TorchLBFGSState(NamedTuple):
    """Between two evaluations; arrays only, so it can be carried by `jit`, `vmap` and loops.

    `x` is where the next evaluation is (after a move, or the step's start point again after a stop without one).
    """

    x: jax.Array  # flat
    loss: jax.Array  # f at the last evaluated point (torch's `loss`)
    start_value: jax.Array  # f at the start of the last step (= torch's `optimizer.step` return value)
    error: jax.Array  # max|g| at the last evaluated point
    evals: jax.Array  # evaluations in the current step (torch's current_evals); 0: the next one starts a step
    k: jax.Array  # iterations in the current step (torch's local n_iter)
    iter_num: jax.Array  # steps done
    num_fun_eval: jax.Array  # cumulative evaluations (torch's func_evals)
    n_iter: jax.Array  # cumulative inner iterations (torch's state['n_iter'])
    d: jax.Array  # last direction
    t: jax.Array  # last step length
    H_diag: jax.Array  # scale of the initial inverse Hessian
    prev_grad: jax.Array  # gradient at the start of the last inner iteration (torch's prev_flat_grad)
    prev_loss: jax.Array  # f there (torch's prev_loss)
    s_history: jax.Array  # (history_size, n) steps s = t d (torch's old_stps), ring buffer
    y_history: jax.Array  # (history_size, n) gradient changes y (torch's old_dirs), ring buffer
    rho_history: jax.Array  # (history_size,) 1 / y.s (torch's ro)
    history_start: jax.Array  # ring index of the oldest stored pair
    history_count: jax.Array  # number of stored pairs (<= history_size)
    fresh: jax.Array  # bool: the next evaluation is the first since `init`


def two_loop(g: jax.Array, s_history: jax.Array, y_history: jax.Array, rho_history: jax.Array, start: jax.Array,
             count: jax.Array, H_diag: jax.Array) -> jax.Array:
    """d = -H g by the L-BFGS two-loop recursion over the `count` stored pairs, oldest at ring index `start`.

    Same operations in the same order as torch (q -= al_i y_i newest first, r = H_diag q, r += (al_i - be_i) s_i
    oldest first); with no pairs it returns -g * H_diag.
    """
    size = s_history.shape[0]

    def newest_first(j, carry):
        q, al = carry
        k = (start + count - 1 - j) % size
        a = jnp.dot(s_history[k], q) * rho_history[k]
        return q - a * y_history[k], al.at[k].set(a)

    q, al = jax.lax.fori_loop(0, count, newest_first, (-g, jnp.zeros_like(rho_history)))

    def oldest_first(i, r):
        k = (start + i) % size
        be = jnp.dot(y_history[k], r) * rho_history[k]
        return r + (al[k] - be) * s_history[k]

    return jax.lax.fori_loop(0, count, oldest_first, q * H_diag)


@dataclasses.dataclass(eq=False)
class TorchLBFGS:
    """torch.optim.LBFGS (line_search_fn=None), one evaluation per `tell` (the engine's protocol).

    lr, max_iter, max_eval (None -> max_iter * 5 // 4, as torch), history_size, tolerance_grad and
    tolerance_change are torch's options. `init_state` / `update(x, state, *args)` (one `update` = one torch
    `optimizer.step(closure)`, x any pytree) drive the same `tell` for `fun(x, *args)`.
    """

    fun: Callable[..., jax.Array] | None = None
    lr: float = 1.0
    max_iter: int = 20
    max_eval: int | None = None
    history_size: int = 100
    tolerance_grad: float = 1e-7
    tolerance_change: float = 1e-9

    def __post_init__(self):
        if self.max_eval is None:
            self.max_eval = self.max_iter * 5 // 4

    # -- the engine's protocol: one evaluation per call
    def init(self, x: jax.Array, reuse: TorchLBFGSState | None = None) -> TorchLBFGSState:
        """A fresh optimiser at x (flat), as `torch.optim.LBFGS(...)` made anew; `reuse`: a state whose history
        buffers to keep (they are cleared logically: no pair is stored)."""
        dtype, n, m = x.dtype, x.shape[0], self.history_size
        zero_i, zero = jnp.zeros((), jnp.int32), jnp.zeros((), dtype)
        return TorchLBFGSState(
            x=x, loss=zero, start_value=zero, error=zero, evals=zero_i, k=zero_i, iter_num=zero_i,
            num_fun_eval=zero_i, n_iter=zero_i, d=jnp.zeros(n, dtype), t=zero, H_diag=jnp.ones((), dtype),
            prev_grad=jnp.zeros(n, dtype), prev_loss=zero,
            s_history=jnp.zeros((m, n), dtype) if reuse is None else reuse.s_history,
            y_history=jnp.zeros((m, n), dtype) if reuse is None else reuse.y_history,
            rho_history=jnp.zeros(m, dtype), history_start=zero_i, history_count=zero_i, fresh=jnp.ones((), bool))

    def ask(self, state: TorchLBFGSState) -> jax.Array:
        return state.x

    def tell(self, state: TorchLBFGSState, point, value, grad) -> tuple[TorchLBFGSState, Step]:
        """torch's tests after an evaluation at `point` (= state.x), then, unless they stop the step, one inner
        iteration: update the memory, new direction and step length, move."""
        c, dtype, size = state, point.dtype, self.history_size
        lr, tolerance_change = jnp.asarray(self.lr, dtype), jnp.asarray(self.tolerance_change, dtype)
        loss, g = value, grad
        error = jnp.max(jnp.abs(g))
        step_start = c.evals == 0
        evals = c.evals + 1
        no_progress = ((evals >= self.max_eval) | (jnp.max(jnp.abs(c.d * c.t)) <= tolerance_change)
                       | (jnp.abs(loss - c.prev_loss) < tolerance_change))
        stop = (error <= self.tolerance_grad) | (~step_start & no_progress)

        k, n_iter = c.k + 1, c.n_iter + 1
        first = n_iter == 1  # the very first iteration of the run: steepest descent, fresh memory
        y, s = g - c.prev_grad, c.d * c.t
        ys = jnp.dot(y, s)
        store = ~stop & ~first & (ys > CURVATURE_EPS)
        full = c.history_count == size
        slot = jnp.where(store, jnp.where(full, c.history_start, (c.history_start + c.history_count) % size), size)
        s_history = c.s_history.at[slot].set(s, mode="drop")
        y_history = c.y_history.at[slot].set(y, mode="drop")
        rho_history = c.rho_history.at[slot].set(1.0 / ys, mode="drop")
        start = jnp.where(store & full, (c.history_start + 1) % size, c.history_start)
        count = jnp.where(store & ~full, c.history_count + 1, c.history_count)
        H_diag = jnp.where(store, ys / jnp.dot(y, y), c.H_diag)
        start, count = jnp.where(first, 0, start), jnp.where(first, 0, count)
        H_diag = jnp.where(first, jnp.ones((), dtype), H_diag)
        d = jax.lax.cond(stop, lambda: c.d, lambda: two_loop(g, s_history, y_history, rho_history, start, count,
                                                                  H_diag))
        inverse_l1 = 1.0 / jnp.sum(jnp.abs(g))
        t = jnp.where(first, jnp.where(inverse_l1 < 1.0, inverse_l1, 1.0) * lr, lr)  # python min(1, 1/|g|_1)
        descending = ~(jnp.dot(g, d) > -tolerance_change)
        iterate = ~stop
        step_ends = stop | ~descending | (k == self.max_iter)
        pick = lambda new, old: jnp.where(iterate, new, old)  # noqa: E731
        state = TorchLBFGSState(
            x=jnp.where(iterate & descending, point + t * d, point), loss=loss,
            start_value=jnp.where(step_start, loss, c.start_value), error=error,
            evals=jnp.where(step_ends, 0, evals), k=jnp.where(step_ends, 0, pick(k, c.k)),
            iter_num=c.iter_num + step_ends, num_fun_eval=c.num_fun_eval + 1, n_iter=pick(n_iter, c.n_iter),
            d=pick(d, c.d), t=pick(t, c.t), H_diag=pick(H_diag, c.H_diag), prev_grad=pick(g, c.prev_grad),
            prev_loss=pick(loss, c.prev_loss),
            s_history=s_history, y_history=y_history, rho_history=pick(rho_history, c.rho_history),
            history_start=pick(start, c.history_start), history_count=pick(count, c.history_count),
            fresh=jnp.zeros((), bool))
        return state, Step(started=c.fresh, iterated=iterate)

    # -- jaxopt style: one update = one torch optimizer.step(closure)
    def init_state(self, x: Any, *args) -> TorchLBFGSState:
        return self.init(ravel_pytree(x)[0])

    def update(self, x: Any, state: TorchLBFGSState, *args) -> tuple[Any, TorchLBFGSState]:
        """One torch `optimizer.step(closure)` from x: evaluations and inner iterations until the step ends."""
        flat, unravel = ravel_pytree(x)
        value_and_grad = jax.value_and_grad(lambda v: self.fun(unravel(v), *args))

        def body(carry):
            state, _ = carry
            point = self.ask(state)
            state, _ = self.tell(state, point, *value_and_grad(point))
            return state, state.evals == 0

        state, _ = jax.lax.while_loop(lambda c: ~c[1], body, (state._replace(x=flat), jnp.zeros((), bool)))
        return unravel(state.x), state


# ----------------------------------------------------------------------------------------------------------
# The reference's outer loop: `steps` updates, keeping the best iterate.


class TorchLBFGSResult(NamedTuple):
    x: Any  # the best iterate: lowest finite f among every step's start point and the final point
    value: jax.Array  # f(x)
    final_x: Any  # the iterate after the last step (what the published script ends with)
    final_value: jax.Array  # f(final_x): one extra evaluation, not counted in num_fun_eval
    values: jax.Array  # (steps,) f at the start of each step, torch's `optimizer.step` return values
    evaluations: jax.Array  # (steps,) cumulative evaluations after each step (torch's func_evals)
    state: TorchLBFGSState  # the optimiser state after the last step
    iterates: Any  # with keep_iterates: x after each step (leaves with a leading (steps,) axis), else None


def make_torch_lbfgs_runner(fun: Callable[..., jax.Array], steps: int = 300, keep_iterates: bool = False,
                            **options) -> Callable[..., TorchLBFGSResult]:
    """A jitted `runner(x0, *args) -> TorchLBFGSResult` doing `steps` TorchLBFGS steps from x0.

    `options` go to `TorchLBFGS` (lr, max_iter, history_size, ...). All steps are done whatever happens, as
    the reference does (a converged run costs one evaluation per step, a diverged one keeps going on NaN);
    the best finite iterate is kept. `keep_iterates` also returns x after every step. Make the runner once
    and call it for every problem of the same shape: the compiled program is reused.
    `runner.lower(x0, *args).compile()` compiles ahead of time. The runner can be vmapped.
    """
    solver = TorchLBFGS(fun, **options)

    def run(x0, *args) -> TorchLBFGSResult:
        state = solver.init_state(x0, *args)
        dtype = state.loss.dtype
        keep = lambda x: jax.tree.map(lambda a: jnp.zeros((steps, *a.shape), a.dtype), x) if keep_iterates else None  # noqa: E731

        def step(i, carry):
            x, state, best_x, best_value, values, evaluations, iterates = carry
            new_x, state = solver.update(x, state, *args)
            better = jnp.isfinite(state.start_value) & (state.start_value < best_value)
            best_x = jax.tree.map(lambda a, b: jnp.where(better, a, b), x, best_x)
            best_value = jnp.where(better, state.start_value, best_value)
            if keep_iterates:
                iterates = jax.tree.map(lambda buf, a: buf.at[i].set(a), iterates, new_x)
            return (new_x, state, best_x, best_value, values.at[i].set(state.start_value),
                    evaluations.at[i].set(state.num_fun_eval), iterates)

        carry = (x0, state, x0, jnp.asarray(jnp.inf, dtype), jnp.zeros(steps, dtype), jnp.zeros(steps, jnp.int32),
                 keep(x0))
        x, state, best_x, best_value, values, evaluations, iterates = jax.lax.fori_loop(0, steps, step, carry)
        final_value = fun(x, *args)
        better = jnp.isfinite(final_value) & (final_value < best_value)
        best_x = jax.tree.map(lambda a, b: jnp.where(better, a, b), x, best_x)
        best_value = jnp.where(better, final_value, best_value)
        return TorchLBFGSResult(best_x, best_value, x, final_value, values, evaluations, state, iterates)

    return jax.jit(run)


def run_torch_lbfgs(fun: Callable[..., jax.Array], x0: Any, args: tuple = (), steps: int = 300,
                    keep_iterates: bool = False, **options) -> TorchLBFGSResult:
    """`steps` torch-LBFGS steps of `fun(x, *args)` from x0, jitted (compiles on every call: for many problems
    of one shape, make the runner once with `make_torch_lbfgs_runner`)."""
    return make_torch_lbfgs_runner(fun, steps, keep_iterates, **options)(x0, *args)
