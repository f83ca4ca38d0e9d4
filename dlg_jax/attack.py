"""Deep Leakage from Gradients: recover private training data from a shared gradient.

A client shares  g = dL(f_w(x), y)/dw  for private data (x, y). The attacker draws a dummy (x', y') and
minimises the gradient distance

    D(x', y') = sum_l || dL(f_w(x'), softmax(y'))/dw_l - g_l ||^2

over the dummy; at D = 0 the dummy's gradient equals the shared one, and for this network that pins x' = x
pixel for pixel (Zhu, Liu, Han, NeurIPS 2019). A batch of N images shares the gradient of its mean loss and
the dummy is a batch of N. With label strategy `idlg` the labels are read off the shared gradient first
(iDLG, Zhao et al., 2020; LLG counts for batches, Wainakh et al., 2022) and only the images are optimised.

For N >= 4 CIFAR images this LeNet's gradient has fewer independent numbers than the batch has pixels (README,
"Batches"), so D = 0 holds on a whole set of batches and gradient matching alone cannot say which one was
private. An image prior then picks the natural one: pixels kept in [0, 1] (`pixel_range="sigmoid"`: the dummy
holds logits z and the images are sigmoid(z)) and a total-variation penalty whose weight falls tenfold per
stage down to 0 (`tv_weight`, `tv_stages`; Geiping et al., 2020 use TV for the same reason).

Everything here is a pure function of arrays, so one attack, a `vmap` over many, or a sharded batch all run
the same code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import jaxopt

Params = Any  # a pytree of model parameters
ApplyFn = Callable[[Params, jax.Array], jax.Array]  # (params, images NHWC) -> logits

RUNNING, CONVERGED, MAX_STEPS, DIVERGED, STALLED = 0, 1, 2, 3, 4
STATUS_NAMES = {RUNNING: "running", CONVERGED: "converged", MAX_STEPS: "max_steps", DIVERGED: "diverged",
                STALLED: "stalled"}
LABEL_STRATEGIES = ("joint", "idlg")
OPTIMIZERS = ("lbfgs", "torch-lbfgs")
PIXEL_RANGES = ("free", "sigmoid")
LINESEARCH_CONDITIONS = ("armijo", "wolfe", "strong-wolfe")


def cross_entropy(logits: jax.Array, soft_labels: jax.Array) -> jax.Array:
    """Soft-label cross entropy  mean_n sum_c -t_nc log softmax(z_n)_c  (the reference's loss)."""
    return jnp.mean(jnp.sum(-soft_labels * jax.nn.log_softmax(logits), axis=-1))


def parameter_gradient(apply_fn: ApplyFn, params: Params, images: jax.Array, soft_labels: jax.Array) -> Params:
    """dL/dw for every parameter: what a federated client shares after one local step."""
    return jax.grad(lambda p: cross_entropy(apply_fn(p, images), soft_labels))(params)


def gradient_distance(dummy: dict, params: Params, shared_grads: Params, known_labels: jax.Array, apply_fn: ApplyFn):
    """D(x', y') = sum over parameters of ||grad(x', y') - shared||^2.

    `dummy` holds `images` and, when the label is optimised too, `label_logits` (entering as their
    softmax); without them the `known_labels` (e.g. recovered by iDLG) are used.
    """
    labels = jax.nn.softmax(dummy["label_logits"]) if "label_logits" in dummy else known_labels
    dummy_grads = parameter_gradient(apply_fn, params, dummy["images"], labels)
    squared = jax.tree.map(lambda g, s: jnp.sum((g - s) ** 2), dummy_grads, shared_grads)
    return sum(jax.tree.leaves(squared))


def total_variation(images: jax.Array, smoothing: float = 1e-4) -> jax.Array:
    """Smoothed colour total variation  sum_{n,i,j} sqrt(sum_c (x_{i,j,c} - x_{i+1,j,c})^2 + (x_{i,j,c} - x_{i,j+1,c})^2 + eps).

    Small for piecewise-smooth natural images, large for the noise a gradient match leaves free. The channels
    share one root (vectorial TV, Blomgren and Chan, 1998), so an edge costs the same in every colour and
    colour edges stay aligned: measured 1.4 dB better than per-channel TV on batches of 4 (README, "Batches").
    `eps` keeps it differentiable where the image is flat, as LBFGS needs.
    """
    down = images[:, :-1, :-1] - images[:, 1:, :-1]
    right = images[:, :-1, :-1] - images[:, :-1, 1:]
    return jnp.sum(jnp.sqrt(jnp.sum(down**2 + right**2, axis=-1) + smoothing))


def dummy_images(dummy: dict, config: "AttackConfig") -> jax.Array:
    """The images a dummy stands for: its pixels, or sigmoid of its logits when `pixel_range="sigmoid"`."""
    return jax.nn.sigmoid(dummy["images"]) if config.pixel_range == "sigmoid" else dummy["images"]


def attack_objective(dummy: dict, params: Params, shared_grads: Params, known_labels: jax.Array,
                     prior_weight: jax.Array | float = 0.0, *, apply_fn: ApplyFn, config: "AttackConfig"):
    """What LBFGS minimises: D of the dummy's images, plus `prior_weight` * TV when a prior is asked for."""
    images = dummy_images(dummy, config)
    value = gradient_distance({**dummy, "images": images}, params, shared_grads, known_labels, apply_fn)
    return value + prior_weight * total_variation(images) if config.tv_weight > 0 else value


def analytic_labels(last_weight_grad: jax.Array, n: int) -> jax.Array:
    """The labels of a batch of n images, read off the last layer's weight gradient (n,).

    With features h >= 0 (sigmoid outputs) and soft-label CE averaged over the batch, the column sums of
    dL/dW (in, classes) are  s_c = (1/n) sum_i (p_ic - y_ic) |h_i|_1:  a class no image has gets s_c > 0, so
    every class with s_c < 0 holds at least one label. For one image only the true class is negative and
    this is iDLG (Zhao et al., 2020), exact. For a batch (LLG, Wainakh et al., 2022) each negative class
    first takes one label; the rest go one at a time to the class whose sum is still most negative after
    removing, per label it holds, the mean impact of one image  m = sum_c min(s_c, 0) / n.  The counts are
    an estimate: exact when each image pushes its class alike, wrong when a class the model already
    predicts strongly is in the batch (its s_c can be >= 0).
    """
    sums = jnp.sum(last_weight_grad, axis=0)
    impact = jnp.sum(jnp.minimum(sums, 0.0)) / n

    def pick(counts, _):
        unclaimed = (sums < 0) & (counts == 0)
        label = jnp.where(unclaimed.any(), jnp.argmin(jnp.where(unclaimed, sums, jnp.inf)),
                          jnp.argmin(sums - impact * counts))
        return counts.at[label].add(1), label

    _, labels = jax.lax.scan(pick, jnp.zeros(sums.shape, jnp.int32), None, length=n)
    return labels


# ----------------------------------------------------------------------------------------------------------
# The attack loop: jaxopt LBFGS on D, run in chunks so that progress can be shown between them.


@dataclasses.dataclass(frozen=True)
class AttackConfig:
    """Settings of one attack, as plain data. The defaults are the measured best (README, 'Solver settings')."""

    steps: int = 300  # reported steps, as the reference's 300 `optimizer.step` calls
    iterations_per_step: int = 20  # LBFGS iterations per step (torch's max_iter)
    evaluations_per_step: int | None = None  # ...and evaluations of D per step; None: torch's max_eval, max_iter * 5 // 4
    label_strategy: str = "joint"
    optimizer: str = "lbfgs"  # jaxopt LBFGS; "torch-lbfgs": torch.optim.LBFGS's semantics (torch_lbfgs.py)
    precision: str = "float32"
    history_size: int = 100
    linesearch: str = "backtracking"
    linesearch_condition: str = "armijo"  # what backtracking accepts: sufficient decrease alone, or (strong) Wolfe
    linesearch_decrease: float = 0.5  # backtracking's step shrink per rejected trial
    max_linesearch_steps: int = 30
    tolerance: float = 1e-7  # converged when D <= tolerance * ||shared gradient||^2 (~40 dB on CIFAR)
    retries: int = 3  # fresh random starts after an attempt stalls or diverges
    probe_steps: int = 25  # an attempt must have cut D by `probe_reduction` after this many steps...
    probe_reduction: float = 1e-2  # ...or it counts as stalled
    pixel_range: str = "free"  # "sigmoid": images = sigmoid(dummy), always in (0, 1) (an image prior for batches)
    tv_weight: float = 0.0  # weight of total variation in the first stage (0: no prior, the paper's objective)...
    tv_stages: int = 4  # ...divided by 10 at each of these equal stages of the steps, the last one at 0

    def __post_init__(self):
        for name, value, allowed in (("label_strategy", self.label_strategy, LABEL_STRATEGIES),
                                     ("optimizer", self.optimizer, OPTIMIZERS),
                                     ("pixel_range", self.pixel_range, PIXEL_RANGES),
                                     ("linesearch_condition", self.linesearch_condition, LINESEARCH_CONDITIONS),
                                     ("precision", self.precision, ("float32", "float64"))):
            if value not in allowed:
                raise ValueError(f"{name} {value!r}: choose from {', '.join(allowed)}")
        if min(self.steps, self.iterations_per_step, self.max_step_evaluations, self.history_size) <= 0:
            raise ValueError("steps, iterations_per_step, evaluations_per_step and history_size must be positive")
        if not 0 < self.linesearch_decrease < 1:
            raise ValueError("linesearch_decrease must be between 0 and 1")
        if self.tv_weight < 0 or self.tv_stages <= 0 or (self.tv_weight > 0 and self.tv_stages > self.steps):
            raise ValueError("tv_weight must be >= 0 and tv_stages between 1 and steps")
        if self.optimizer == "torch-lbfgs" and self.has_prior:
            raise ValueError("the image prior (pixel_range, tv_weight) is for the lbfgs optimizer; torch-lbfgs is the reference's")

    @property
    def has_prior(self) -> bool:
        return self.pixel_range != "free" or self.tv_weight > 0

    @property
    def stage_iterations(self) -> int:
        """Iterations of an attempt at one prior weight (the whole budget without a TV prior)."""
        return self.max_iterations // self.tv_stages if self.tv_weight > 0 else self.max_iterations

    def prior_weight(self, attempt_iterations: jax.Array | int) -> jax.Array:
        """TV weight after `attempt_iterations` of an attempt: tv_weight / 10^stage, and 0 in the last stage."""
        stage = jnp.asarray(attempt_iterations, jnp.int32) // self.stage_iterations
        decayed = self.tv_weight * 10.0 ** (-stage.astype(self.dtype))
        return jnp.where(stage >= self.tv_stages - 1, 0.0, decayed).astype(self.dtype)

    @property
    def max_iterations(self) -> int:
        return self.steps * self.iterations_per_step

    @property
    def max_evaluations(self) -> int:
        """The budget of evaluations of D over all attempts: an iteration whose line searches cannot find a
        decrease (D at float rounding level, say) costs up to `max_linesearch_steps` of them."""
        return self.steps * self.max_step_evaluations

    @property
    def max_step_evaluations(self) -> int:
        """`evaluations_per_step`, or torch's max_eval for max_iter = `iterations_per_step` when it is None."""
        return self.iterations_per_step * 5 // 4 if self.evaluations_per_step is None else self.evaluations_per_step

    @property
    def dtype(self):
        return jnp.float64 if self.precision == "float64" else jnp.float32


class Problem(NamedTuple):
    """One attack instance as arrays: what the attacker knows, plus where it starts."""

    params: Params  # the model's weights (the attacker knows them: it is the server)
    shared_grads: Params  # the gradient the client shared
    known_labels: jax.Array  # (N, classes) labels used when they are not optimised
    init: dict  # the first dummy: `images` (N,H,W,C) and, for `joint`, `label_logits` (N, classes)
    key: jax.Array  # where retries draw their fresh dummies from

    @property
    def solver_args(self) -> tuple:
        return self.params, self.shared_grads, self.known_labels


class AttackState(NamedTuple):
    dummy: dict
    solver_state: NamedTuple
    best_dummy: dict  # the lowest finite D seen in any attempt: what we return, whatever came after it
    best_value: jax.Array
    iterations: jax.Array  # LBFGS iterations over all attempts
    status: jax.Array
    attempt: jax.Array
    attempt_start: jax.Array  # iteration at which the current attempt began
    attempt_value: jax.Array  # D at the start of the current attempt
    earlier_evaluations: jax.Array  # objective evaluations spent by finished attempts

    @property
    def evaluations(self) -> jax.Array:
        return self.earlier_evaluations + self.solver_state.num_fun_eval


def make_solver(apply_fn: ApplyFn, config: AttackConfig) -> jaxopt.LBFGS:
    """jaxopt's LBFGS on `attack_objective`, its backtracking line search set as `config` asks.

    jaxopt's LBFGS always backtracks to strong Wolfe, shrinking the step by 0.8. From a N(0, 1) start the
    step LBFGS proposes is often too *short* for Wolfe's curvature test, which backtracking cannot fix (it
    only shortens): 30 trials, then the shortest step is taken anyway and the next search starts from it.
    Armijo's sufficient decrease alone accepts such a step at once, and halving reaches a step that does
    decrease D in fewer trials. Without the curvature test s . y > 0 is no longer ensured, so pairs without
    it are skipped (`skip_nonpositive_curvature`). On the 50 shared CIFAR-100 images, seeds 1234, 1, 2, this
    took 30-60% fewer evaluations at the same success (README, "Solver settings").

    Armijo runs as jaxopt's weak-Wolfe search with the curvature test switched off (c2 = inf, so
    c2 * slope - new_slope = -inf along any descent direction): jaxopt's own "armijo" evaluates D alone at
    each trial and its gradient again at the accepted point, which costs more than both at once when most
    first trials are accepted, and counts evaluations differently from the sweep engine.
    """
    solver = jaxopt.LBFGS(
        fun=lambda dummy, *args: attack_objective(dummy, *args, apply_fn=apply_fn, config=config),
        history_size=config.history_size,
        linesearch=config.linesearch,
        maxls=config.max_linesearch_steps,
        maxiter=config.max_iterations,
    )
    if config.linesearch == "backtracking":
        armijo = config.linesearch_condition == "armijo"
        solver.linesearch_solver = dataclasses.replace(
            solver.linesearch_solver, condition="wolfe" if armijo else config.linesearch_condition,
            c2=float("inf") if armijo else solver.linesearch_solver.c2, decrease_factor=config.linesearch_decrease)
        solver.run_ls = solver.linesearch_solver.run
    return solver


def skip_nonpositive_curvature(solver: jaxopt.LBFGS, before: NamedTuple, after: NamedTuple) -> NamedTuple:
    """`after` (jaxopt's LBFGS state after an iteration from `before`) without its new pair if s . y <= 0.

    LBFGS's inverse-Hessian estimate stays positive definite only while every pair has s . y > 0. Wolfe's
    curvature test ensures it; Armijo's test alone does not, and one such pair (with gamma = s.y / y.y < 0)
    turns the next direction uphill, where no step decreases D: 30 trials, then a step of ~1e-9. The pair is
    dropped as a zero-curvature pair is (rho = 0) and gamma stays what it was, as torch's LBFGS skips pairs
    with s . y <= 1e-10.
    """
    slot = before.iter_num % solver.history_size
    curved = after.rho_history[slot] > 0  # rho = 1 / (s . y), and 0 where s . y = 0
    return after._replace(rho_history=after.rho_history.at[slot].set(jnp.where(curved, after.rho_history[slot], 0.0)),
                          gamma=jnp.where(curved, after.gamma, before.gamma))


def init_state(solver: jaxopt.LBFGS, problem: Problem, prior_weight: jax.Array | float = 0.0) -> AttackState:
    solver_state = solver.init_state(problem.init, *problem.solver_args, prior_weight)
    value = solver_state.value
    status = jnp.where(jnp.isfinite(value), RUNNING, DIVERGED)
    zero = jnp.zeros((), jnp.int32)
    return AttackState(problem.init, solver_state, problem.init, value, zero, status, zero, zero, value, zero)


def advance(solver: jaxopt.LBFGS, config: AttackConfig, state: AttackState, problem: Problem,
            until: jax.Array) -> AttackState:
    """LBFGS iterations until `until` iterations are done in all, or the attempt stops.

    An attempt stops when D converges (relative to the shared gradient's size), when it turns non-finite
    (diverged), when the budget of iterations or evaluations is spent, or, while retries remain, when it has
    not cut D by `probe_reduction` within `probe_steps` steps (stalled: `retry` then starts it afresh).
    """
    target = config.tolerance * sum(jnp.sum(g**2) for g in jax.tree.leaves(problem.shared_grads))
    probe_iteration = config.probe_steps * config.iterations_per_step
    stage = (state.iterations - state.attempt_start) // config.stage_iterations  # the prior's weight is fixed in a stage
    stage_end = state.attempt_start + (stage + 1) * config.stage_iterations
    weight = config.prior_weight(state.iterations - state.attempt_start)

    def running(s: AttackState):
        return (s.status == RUNNING) & (s.iterations < until) & (s.iterations < stage_end)

    def iterate(s: AttackState) -> AttackState:
        dummy, solver_state = solver.update(s.dummy, s.solver_state, *problem.solver_args, weight)
        solver_state = skip_nonpositive_curvature(solver, s.solver_state, solver_state)
        value = solver_state.value
        finite = jnp.isfinite(value) & jnp.all(jnp.array([jnp.isfinite(x).all() for x in jax.tree.leaves(dummy)]))
        improved = finite & (value < s.best_value)
        best_dummy = jax.tree.map(lambda new, old: jnp.where(improved, new, old), dummy, s.best_dummy)
        iterations = s.iterations + 1
        stalled = ((iterations - s.attempt_start == probe_iteration) & (value > config.probe_reduction * s.attempt_value)
                   & (s.attempt < config.retries))
        spent = (iterations >= config.max_iterations) | (s.earlier_evaluations + solver_state.num_fun_eval
                                                          >= config.max_evaluations)
        status = jnp.select(
            [~finite, (value <= target) & (weight == 0), stalled, spent],
            [DIVERGED, CONVERGED, STALLED, MAX_STEPS],
            RUNNING,
        )
        best_value = jnp.where(improved, value, s.best_value)
        return s._replace(dummy=dummy, solver_state=solver_state, best_dummy=best_dummy, best_value=best_value,
                          iterations=iterations, status=status)

    return jax.lax.while_loop(running, iterate, state)


def retry(solver: jaxopt.LBFGS, config: AttackConfig, state: AttackState, problem: Problem) -> AttackState:
    """Start a stalled or diverged attempt afresh from a new N(0, 1) dummy, while retries and budget remain.

    Called between chunks rather than inside the loop, so that under `vmap` the fresh start is not
    computed for every lane at every iteration.
    """
    failed = (state.status == STALLED) | (state.status == DIVERGED)
    again = (failed & (state.attempt < config.retries) & (state.iterations < config.max_iterations)
             & (state.evaluations < config.max_evaluations))
    attempt = state.attempt + 1
    dummy = fresh_dummy(problem.key, attempt, problem.init)
    fresh = solver.init_state(dummy, *problem.solver_args, config.prior_weight(0))
    pick = lambda new, old: jax.tree.map(lambda a, b: jnp.where(again, a, b), new, old)  # noqa: E731
    return state._replace(dummy=pick(dummy, state.dummy), solver_state=pick(fresh, state.solver_state),
                          status=jnp.where(again, jnp.where(jnp.isfinite(fresh.value), RUNNING, DIVERGED),
                                           jnp.where(state.status == STALLED, MAX_STEPS, state.status)),
                          attempt=jnp.where(again, attempt, state.attempt),
                          attempt_start=jnp.where(again, state.iterations, state.attempt_start),
                          attempt_value=jnp.where(again, fresh.value, state.attempt_value),
                          earlier_evaluations=jnp.where(again, state.evaluations, state.earlier_evaluations))


def next_stage(solver: jaxopt.LBFGS, config: AttackConfig, state: AttackState, problem: Problem) -> AttackState:
    """At the end of a stage of the TV prior, go on from where the attempt is with the next, lower weight.

    The objective changes there, so LBFGS starts a fresh memory; D's at different weights are not
    comparable, so the best iterate is tracked anew from this point.
    """
    done = state.iterations - state.attempt_start
    boundary = (state.status == RUNNING) & (done > 0) & (done % config.stage_iterations == 0)
    fresh = solver.init_state(state.dummy, *problem.solver_args, config.prior_weight(done))
    pick = lambda new, old: jax.tree.map(lambda a, b: jnp.where(boundary, a, b), new, old)  # noqa: E731
    return state._replace(solver_state=pick(fresh, state.solver_state), best_dummy=pick(state.dummy, state.best_dummy),
                          best_value=jnp.where(boundary, fresh.value, state.best_value),
                          earlier_evaluations=jnp.where(boundary, state.evaluations, state.earlier_evaluations))


def make_problem(apply_fn: ApplyFn, params: Params, images: jax.Array, labels: jax.Array, num_classes: int,
                 config: AttackConfig, seed: int) -> Problem:
    """Simulate the client (its shared gradient on `images` with integer `labels`) and draw the dummy.

    The dummy image and label logits are N(0, 1) from `seed`, as in the reference.
    """
    dtype = config.dtype
    params = jax.tree.map(lambda p: jnp.asarray(p, dtype), params)
    images = jnp.asarray(images, dtype)
    shared_grads = parameter_gradient(apply_fn, params, images, jax.nn.one_hot(labels, num_classes, dtype=dtype))
    key = jax.random.key(seed)
    image_key, label_key = jax.random.split(key)
    init = {"images": standard_normal(image_key, images.shape, dtype)}
    if config.label_strategy == "joint":
        init["label_logits"] = standard_normal(label_key, (len(images), num_classes), dtype)
        known_labels = jnp.zeros((len(images), num_classes), dtype)
    elif config.label_strategy == "idlg":
        recovered = analytic_labels(last_layer_weight_grad(shared_grads), len(images))
        known_labels = jax.nn.one_hot(recovered, num_classes, dtype=dtype)
    else:
        raise ValueError(f"unknown label strategy {config.label_strategy!r}; choose from {LABEL_STRATEGIES}")
    return Problem(params, shared_grads, known_labels, init, key)


def fresh_dummy(key: jax.Array, attempt: jax.Array, like: dict) -> dict:
    """The N(0, 1) start of retry `attempt`: a dummy shaped `like`, from a key of its own."""
    keys = jax.random.split(jax.random.fold_in(key, attempt), len(like))
    return {name: standard_normal(k, x.shape, x.dtype) for k, (name, x) in zip(keys, sorted(like.items()))}


def standard_normal(key: jax.Array, shape, dtype) -> jax.Array:
    """N(0, 1) drawn in float32 whatever the precision, so float32 and float64 attacks start alike."""
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def last_layer_weight_grad(grads: Params) -> jax.Array:
    """The gradient of the final dense kernel (in, classes): the last 2-D leaf in parameter order."""
    return [g for g in jax.tree.leaves(grads) if g.ndim == 2][-1]


def predicted_labels(state: AttackState, problem: Problem) -> jax.Array:
    """The attack's label guess: argmax of the dummy label, or the known (e.g. iDLG) label."""
    labels = state.best_dummy.get("label_logits", problem.known_labels)
    return jnp.argmax(labels, axis=-1)


@dataclasses.dataclass
class Attack:
    """A compiled attack, jaxopt style: `init`, then `advance` in chunks of steps (retrying stalled starts)."""

    apply_fn: ApplyFn
    config: AttackConfig

    def __post_init__(self):
        solver, config = make_solver(self.apply_fn, self.config), self.config
        options = compiler_options()
        self._init = jax.jit(lambda problem: init_state(solver, problem, config.prior_weight(0)),
                             compiler_options=options)

        def chunk(state, problem, until):
            state = retry(solver, config, advance(solver, config, state, problem, until), problem)
            return next_stage(solver, config, state, problem) if config.tv_weight > 0 else state

        self._advance = jax.jit(chunk, compiler_options=options)
        self.compile_seconds = 0.0

    def compile(self, problem: Problem) -> None:
        """Compile ahead of time (or load from JAX's persistent cache), timing it."""
        start = time.perf_counter()
        state_shape = jax.eval_shape(self._init, problem)
        self._init = self._init.lower(problem).compile()
        self._advance = self._advance.lower(state_shape, problem, jnp.zeros((), jnp.int32)).compile()
        self.compile_seconds = time.perf_counter() - start

    def init(self, problem: Problem) -> AttackState:
        return self._init(problem)

    def advance(self, state: AttackState, problem: Problem, until_step: int) -> AttackState:
        """Run until `until_step` steps are done in all (or the attack stops)."""
        until = jnp.asarray(until_step * self.config.iterations_per_step, jnp.int32)
        state = self._advance(state, problem, until)
        while bool(state.status == RUNNING) and int(state.iterations) < until:  # a retry began mid-chunk
            state = self._advance(state, problem, until)
        return state


# XLA:CPU hands matrix products and reductions to YNNPACK. jaxlib 0.10's default runs each product on its own;
# as fusions with the elementwise work around them, one evaluation of D and its gradient takes 0.83x the time
# in float32, 0.86x in float64 (`experiments/bench_objective.py --compiler-options dlg_jax default`).
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE"}


@functools.cache
def _cpu_accepts(options: tuple) -> bool:
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    probe = jax.jit(lambda x: x + 1).lower(jax.ShapeDtypeStruct((), jnp.float32, sharding=cpu))
    try:
        probe.compile(compiler_options=dict(options))
    except Exception:  # an experimental option this jaxlib does not know (or no longer parses)
        return False
    return True


def compiler_options(platform: str | None = None) -> dict[str, str]:
    """XLA options to compile an attack's programs with, for `platform` (default: JAX's default backend).

    On CPU `CPU_COMPILER_OPTIONS` where this jaxlib accepts them (they are experimental: without them the
    attack is the same, only slower); elsewhere none.
    """
    if (platform or jax.default_backend()) != "cpu" or not _cpu_accepts(tuple(CPU_COMPILER_OPTIONS.items())):
        return {}
    return dict(CPU_COMPILER_OPTIONS)


def precision_scope(config: AttackConfig) -> contextlib.ExitStack:
    """Context in which to build, compile and run an attack: float64 needs JAX's x64 mode switched on, and
    matrix products run at the full precision of the dtype on every backend (on GPUs, float32 products would
    otherwise use TF32, whose 10-bit mantissa cannot match gradients to the 1e-7 the attack converges to)."""
    scope = contextlib.ExitStack()
    scope.enter_context(jax.enable_x64(config.precision == "float64"))
    scope.enter_context(jax.default_matmul_precision("highest"))
    return scope
