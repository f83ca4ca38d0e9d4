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

The interface is jaxopt's: `init_state(x, *args)`, then `update(x, state, *args) -> (x, state)` where one
update is one torch `optimizer.step`; x is any pytree (flattened with `ravel_pytree`, so the flat order, and
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

CURVATURE_EPS = 1e-10  # torch stores a pair only if y.s > 1e-10 (hard-coded in LBFGS.step)


class TorchLBFGSState(NamedTuple):
    """Optimiser state between two steps; arrays only, so it can be carried by `jit`, `vmap` and loops.

    `value` and `error` are f and max|g| at the *last evaluated* point. That is the returned x when
    `value_at_x` is true (the step stopped early, right after an evaluation); after a full step (max_iter
    iterations, the usual case) the last move is unevaluated and `value` belongs to the point before it,
    exactly like torch's internal `loss`. `start_value` is f at the x the step started from: the value torch's
    `optimizer.step` returns. `init_state` evaluates f(x0) for `value`/`start_value`/`error` without
    counting it (torch evaluates nothing before its first step).
    """

    iter_num: jax.Array  # outer steps done (updates)
    value: jax.Array  # f at the last evaluated point (see above)
    start_value: jax.Array  # f at the start of the last step (= torch's step return value)
    error: jax.Array  # max|g| at the last evaluated point
    value_at_x: jax.Array  # bool: whether value/error were evaluated at the returned x
    num_fun_eval: jax.Array  # cumulative evaluations, the step-start ones included (torch's func_evals)
    n_iter: jax.Array  # cumulative inner iterations (torch's state['n_iter'])
    d: jax.Array  # last direction (flat)
    t: jax.Array  # last step length
    H_diag: jax.Array  # scale of the initial inverse Hessian
    prev_grad: jax.Array  # gradient at the start of the last inner iteration (torch's prev_flat_grad)
    prev_loss: jax.Array  # f there (torch's prev_loss)
    s_history: jax.Array  # (history_size, n) steps s = t d (torch's old_stps), ring buffer
    y_history: jax.Array  # (history_size, n) gradient changes y (torch's old_dirs), ring buffer
    rho_history: jax.Array  # (history_size,) 1 / y.s (torch's ro)
    history_start: jax.Array  # ring index of the oldest stored pair
    history_count: jax.Array  # number of stored pairs (<= history_size)


class _Inner(NamedTuple):
    """Carry of the inner loop of one step (torch's local variables of `LBFGS.step`)."""

    x: jax.Array
    loss: jax.Array
    g: jax.Array
    error: jax.Array
    start_value: jax.Array
    moved: jax.Array  # x changed since the last evaluation
    evals: jax.Array  # torch's current_evals
    k: jax.Array  # torch's local n_iter
    done: jax.Array
    n_iter: jax.Array
    d: jax.Array
    t: jax.Array
    H_diag: jax.Array
    prev_grad: jax.Array
    prev_loss: jax.Array
    s_history: jax.Array
    y_history: jax.Array
    rho_history: jax.Array
    history_start: jax.Array
    history_count: jax.Array


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
    """torch.optim.LBFGS (line_search_fn=None) with one `update` = one `optimizer.step(closure)`.

    `fun(x, *args)` is the scalar objective of a pytree x; its gradient comes from `jax.value_and_grad`.
    lr, max_iter, max_eval (None -> max_iter * 5 // 4, as torch), history_size, tolerance_grad and
    tolerance_change are torch's options. `maxiter` (outer steps) and `tol` are for jaxopt-style drivers:
    `attack.advance` stops when `iter_num`-many updates reach `maxiter` or when `state.error <= tol` (default
    tolerance_grad, where torch's steps turn into single evaluations). Torch itself never stops the outer loop;
    `run_torch_lbfgs` does all its steps, as the reference does.
    """

    fun: Callable[..., jax.Array]
    lr: float = 1.0
    max_iter: int = 20
    max_eval: int | None = None
    history_size: int = 100
    tolerance_grad: float = 1e-7
    tolerance_change: float = 1e-9
    maxiter: int = 300
    tol: float | None = None

    def __post_init__(self):
        if self.max_eval is None:
            self.max_eval = self.max_iter * 5 // 4
        if self.tol is None:
            self.tol = self.tolerance_grad

    def _value_and_grad(self, unravel, flat, args):
        value, grad = jax.value_and_grad(lambda v: self.fun(unravel(v), *args))(flat)
        return value, grad

    def init_state(self, x: Any, *args) -> TorchLBFGSState:
        flat, unravel = ravel_pytree(x)
        dtype, n, m = flat.dtype, flat.shape[0], self.history_size
        value, grad = self._value_and_grad(unravel, flat, args)
        zero_i = jnp.zeros((), jnp.int32)
        return TorchLBFGSState(
            iter_num=zero_i, value=value, start_value=value, error=jnp.max(jnp.abs(grad)),
            value_at_x=jnp.ones((), bool), num_fun_eval=zero_i, n_iter=zero_i,
            d=jnp.zeros(n, dtype), t=jnp.zeros((), dtype), H_diag=jnp.ones((), dtype),
            prev_grad=jnp.zeros(n, dtype), prev_loss=jnp.zeros((), dtype),
            s_history=jnp.zeros((m, n), dtype), y_history=jnp.zeros((m, n), dtype), rho_history=jnp.zeros(m, dtype),
            history_start=zero_i, history_count=zero_i,
        )

    def update(self, x: Any, state: TorchLBFGSState, *args) -> tuple[Any, TorchLBFGSState]:
        """One torch `optimizer.step(closure)` from x: returns the new x and state."""
        flat, unravel = ravel_pytree(x)
        dtype = flat.dtype
        lr = jnp.asarray(self.lr, dtype)
        tolerance_change = jnp.asarray(self.tolerance_change, dtype)
        size = self.history_size

        def evaluate(c: _Inner) -> _Inner:
            """Evaluate at c.x, then the stopping tests torch makes after an evaluation."""
            loss, g = self._value_and_grad(unravel, c.x, args)
            error = jnp.max(jnp.abs(g))
            step_start = c.evals == 0
            optimal = error <= self.tolerance_grad
            evals = c.evals + 1
            no_progress = ((evals >= self.max_eval) | (jnp.max(jnp.abs(c.d * c.t)) <= tolerance_change)
                           | (jnp.abs(loss - c.prev_loss) < tolerance_change))
            done = optimal | (~step_start & no_progress)
            start_value = jnp.where(step_start, loss, c.start_value)
            return c._replace(loss=loss, g=g, error=error, start_value=start_value, moved=jnp.zeros((), bool),
                              evals=evals, done=done)

        def iterate(c: _Inner) -> _Inner:
            """One inner iteration: update the memory, new direction and step length, move (or stop)."""
            k, n_iter = c.k + 1, c.n_iter + 1
            first = n_iter == 1  # the very first iteration of the run: steepest descent, fresh memory
            y = c.g - c.prev_grad
            s = c.d * c.t
            ys = jnp.dot(y, s)
            store = ~first & (ys > CURVATURE_EPS)
            full = c.history_count == size
            slot = jnp.where(full, c.history_start, (c.history_start + c.history_count) % size)
            s_history = c.s_history.at[slot].set(jnp.where(store, s, c.s_history[slot]))
            y_history = c.y_history.at[slot].set(jnp.where(store, y, c.y_history[slot]))
            rho_history = c.rho_history.at[slot].set(jnp.where(store, 1.0 / ys, c.rho_history[slot]))
            start = jnp.where(store & full, (c.history_start + 1) % size, c.history_start)
            count = jnp.where(store & ~full, c.history_count + 1, c.history_count)
            H_diag = jnp.where(store, ys / jnp.dot(y, y), c.H_diag)
            start, count = jnp.where(first, 0, start), jnp.where(first, 0, count)
            H_diag = jnp.where(first, jnp.ones((), dtype), H_diag)
            d = two_loop(c.g, s_history, y_history, rho_history, start, count, H_diag)
            inverse_l1 = 1.0 / jnp.sum(jnp.abs(c.g))
            t = jnp.where(first, jnp.where(inverse_l1 < 1.0, inverse_l1, 1.0) * lr, lr)  # python min(1, 1/|g|_1)
            descending = ~(jnp.dot(c.g, d) > -tolerance_change)
            x = jnp.where(descending, c.x + t * d, c.x)
            return c._replace(
                x=x, moved=descending, k=k, done=~descending | (k == self.max_iter), n_iter=n_iter, d=d, t=t,
                H_diag=H_diag, prev_grad=c.g, prev_loss=c.loss, s_history=s_history, y_history=y_history,
                rho_history=rho_history, history_start=start, history_count=count)

        def body(c: _Inner) -> _Inner:
            c = evaluate(c)
            return jax.lax.cond(c.done, lambda c: c, iterate, c)

        zero_i = jnp.zeros((), jnp.int32)
        carry = _Inner(
            x=flat, loss=state.value, g=jnp.zeros_like(flat), error=state.error, start_value=state.start_value,
            moved=jnp.zeros((), bool), evals=zero_i, k=zero_i, done=jnp.zeros((), bool), n_iter=state.n_iter,
            d=state.d, t=state.t, H_diag=state.H_diag, prev_grad=state.prev_grad, prev_loss=state.prev_loss,
            s_history=state.s_history, y_history=state.y_history, rho_history=state.rho_history,
            history_start=state.history_start, history_count=state.history_count)
        c = jax.lax.while_loop(lambda c: ~c.done, body, carry)
        new_state = TorchLBFGSState(
            iter_num=state.iter_num + 1, value=c.loss, start_value=c.start_value, error=c.error, value_at_x=~c.moved,
            num_fun_eval=state.num_fun_eval + c.evals, n_iter=c.n_iter, d=c.d, t=c.t, H_diag=c.H_diag,
            prev_grad=c.prev_grad, prev_loss=c.prev_loss, s_history=c.s_history, y_history=c.y_history,
            rho_history=c.rho_history, history_start=c.history_start, history_count=c.history_count)
        return unravel(c.x), new_state


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
    solver = TorchLBFGS(fun, maxiter=steps, **options)

    def run(x0, *args) -> TorchLBFGSResult:
        state = solver.init_state(x0, *args)
        dtype = state.value.dtype
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
