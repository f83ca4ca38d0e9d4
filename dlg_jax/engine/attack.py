"""A case and an attack as the per-lane pure functions the engine runs.

    case = make_case("lenet", num_classes=100, input_shape=(32, 32, 3), model_seed=1234, dtype=jnp.float32)
    attack = make_attack(case, config, batch_size=1)
    problem = make_problem(attack, images, labels, seed)      # simulate the client, draw the dummy
    value = attack.objective(problem.init, 0.0, problem, case.params)

breaching's vocabulary: the case is what is attacked (the model, its weights, and the client: its gradient and
the transforms applied to it before it is shared); the attack is what the attacker brings.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from dlg_jax import defenses as defenses_lib
from dlg_jax.config import AttackConfig
from dlg_jax.models import Model, get_model
from dlg_jax.parts import dummies
from dlg_jax.parts.attempts import Rules
from dlg_jax.parts.labels import analytic_labels, last_layer_weight_grad
from dlg_jax.parts.objectives import DISTANCES, PRIORS, Problem, gradient_matching
from dlg_jax.solvers import make_solver

CLIENT_STREAM = 0xC11E  # the client's transforms (noise, ...) draw from fold_in(key(seed), CLIENT_STREAM)


class Case(NamedTuple):
    model: Model
    params: Any
    transforms: tuple = ()  # the client's gradient transforms, in order (dlg_jax.client), after the defenses
    defenses: tuple = ()  # names of the client's defenses, in order (dlg_jax.defenses.KINDS)
    strengths: tuple = ()  # their strengths, unless a task brings its own (a sweep axis: one per lane)
    dp_clip: float = 1.0  # DP-SGD's per-example clip norm C (defense `dp`)
    local: defenses_lib.LocalTraining = defenses_lib.LocalTraining()  # FedAvg's client (defense `fedavg`)


def make_case(model: str, num_classes: int, input_shape: Sequence[int], model_seed: int = 1234,
              dtype=jnp.float32, transforms: Sequence[Callable] = (), defenses: Sequence[tuple[str, float]] = (),
              dp_clip: float = 1.0, checkpoint: str | None = None,
              local: defenses_lib.LocalTraining = defenses_lib.LocalTraining()) -> Case:
    """The case: model `model` with weights from `model_seed`, or from a `checkpoint` file (dlg_jax.train's:
    its weights and running statistics), and the client's defenses."""
    spec = get_model(model, num_classes, input_shape)
    if checkpoint is not None:
        from dlg_jax.models import checkpoint as checkpoints

        spec, params = checkpoints.load(checkpoint, spec, dtype)
    else:
        params = spec.init(model_seed, dtype)
    return Case(spec, params, tuple(transforms), tuple(n for n, _ in defenses),
                tuple(float(s) for _, s in defenses), float(dp_clip), local)


class Attack(NamedTuple):
    config: AttackConfig
    case: Case
    layout: dummies.Layout  # the flat dummy the solver sees
    dummy: dummies.Dummy
    solver: Any  # one evaluation per call (dlg_jax.solvers)
    rules: Rules
    objective: Callable  # (z, prior weight, problem, params) -> D

    @property
    def batch_size(self) -> int:
        return self.layout.shapes["inputs"][0]

    def inputs(self, z: jax.Array) -> jax.Array:
        """The model inputs a flat dummy stands for (e.g. sigmoid of its pixels)."""
        return self.dummy.decode(self.layout.unravel(z)["inputs"])

    def labels(self, z: jax.Array, problem: Problem) -> jax.Array:
        """The attack's label guess: argmax of the dummy's label logits, or the labels read off the gradient."""
        parts = self.layout.unravel(z)
        return jnp.argmax(parts["label_logits"] if "label_logits" in parts else problem.known_labels, axis=-1)

    def report(self, progress, problem: Problem) -> dict:
        """What an attack's progress (`parts.attempts.Attempt`) says: the best and the current inputs, the label
        guess, D, status and counts. One lane's; the engine vmaps it over its lanes."""
        return dict(inputs=self.inputs(progress.best), current=self.inputs(progress.current),
                    label_pred=self.labels(progress.best, problem), grad_distance=progress.best_value,
                    status=progress.status, attempts=progress.attempt + 1, iterations=progress.iterations,
                    evaluations=progress.evaluations, target=problem.target)


def make_attack(case: Case, config: AttackConfig, batch_size: int = 1, solver=None) -> Attack:
    model = case.model
    layout = dummies.layout((batch_size, *model.input_shape), model.num_classes, config.labels == "joint", config.dtype)
    dummy = dummies.DUMMIES[config.dummy]
    gradient, compare = None, None  # None: the client's plain gradient
    if config.adaptive and case.defenses:  # the attacker models the defenses it knows of (dlg_jax.defenses)
        compare = functools.partial(defenses_lib.adapt, case.defenses)
        if case.defenses[0] == "dp":  # its dummy's per-example gradients clipped alike, without the noise
            gradient = functools.partial(_clipped_gradient, clip=case.dp_clip)
        elif case.defenses[0] == "fedavg":  # its dummy through the same local steps
            gradient = functools.partial(_local_update, local=case.local)
    objective = functools.partial(gradient_matching, model=model, layout=layout, dummy=dummy,
                                  distance=DISTANCES[config.objective.distance],
                                  prior=PRIORS[config.objective.prior] if config.objective.tv_weight > 0 else None,
                                  gradient=gradient, compare=compare)
    if solver is None and config.solver.optimizer != "jaxopt-lbfgs":
        solver = make_solver(config)
        if dummy.project is not None:  # a boxed dummy: every step ends projected onto the box
            solver = solver.projected(functools.partial(_project_inputs, layout, dummy.project))
    return Attack(config, case, layout, dummy, solver, Rules.from_config(config), objective)


def _project_inputs(layout, project, z: jax.Array) -> jax.Array:
    parts = layout.unravel(z)
    return layout.ravel({**parts, "inputs": project(parts["inputs"])})


def _clipped_gradient(model, params, inputs, soft_labels, strengths, *, clip: float):
    return defenses_lib.dp_gradient(model, params, inputs, soft_labels, None, 0.0, clip, noise=False)


def _local_update(model, params, inputs, soft_labels, strengths, *, local):
    return defenses_lib.local_update(model, params, inputs, soft_labels, strengths[0], local)


def make_problem(attack: Attack, inputs: jax.Array, labels: jax.Array, seed, strengths=None) -> Problem:
    """Simulate the client on private `inputs` (in the model's range, e.g. pixels in [0, 1]) with integer
    `labels`, and draw the dummy: N(0, 1) from `seed`, as in the reference. `strengths`: the client's defense
    strengths (an array, one per `case.defenses`; default the case's own)."""
    config, case = attack.config, attack.case
    dtype, classes = config.dtype, case.model.num_classes
    key = jax.random.key(seed)
    strengths = jnp.asarray(case.strengths if strengths is None else strengths, dtype)
    client_key = jax.random.fold_in(key, CLIENT_STREAM)
    soft = jax.nn.one_hot(labels, classes, dtype=dtype)
    shared = defenses_lib.share(case.model, case.params, jnp.asarray(inputs, dtype), soft, case.defenses, strengths,
                                jax.random.fold_in(client_key, 1), case.dp_clip, case.local)
    for k, transform in zip(jax.random.split(client_key, len(case.transforms)), case.transforms):
        shared = transform(k, shared)
    n = attack.batch_size
    if config.labels == "idlg":
        known = jax.nn.one_hot(analytic_labels(last_layer_weight_grad(shared), n), classes, dtype=dtype)
    else:
        known = jnp.zeros((n, classes), dtype)
    target = config.rules.tolerance * sum(jnp.sum(g**2) for g in jax.tree.leaves(shared))
    init = dummies.first_start(key, attack.layout)
    least = jnp.zeros((), dtype)
    if config.adaptive and config.objective.distance == "l2":  # stop at the noise's floor, not below it
        parameters = sum(g.size for g in jax.tree.leaves(shared))
        floor = defenses_lib.noise_floor(case.defenses, strengths, parameters, n, case.dp_clip)
        # a dummy of d numbers absorbs the noise's part in its d-dimensional tangent space: least squares leaves
        # E min D = floor (1 - d / P). Measured: the naive attack under gauss 1e-5 ends at D = 0.819-0.821, this
        # target 0.819 (floor 0.850, d = 3,172, P = 85,036); at the bare floor the attack stopped at 13.6 dB
        # instead of 21.1 dB (10 images).
        least = jnp.asarray(floor * max(0.0, 1.0 - init.size / parameters), dtype)
        target = target + least
    # at least one strength: a lane's zero-size array came back from `fill` sharded unlike what `run` was
    # compiled for (8 CPU devices: "input shardings that disagree")
    known_strengths = strengths if strengths.size else jnp.zeros(1, dtype)
    return Problem(shared, known, init, jax.random.key_data(key), target, known_strengths, least)


def precision_scope(config: AttackConfig) -> contextlib.ExitStack:
    """Context in which to build, compile and run an attack: float64 needs JAX's x64 mode switched on, and
    matrix products run at the full precision of the dtype on every backend (on GPUs, float32 products would
    otherwise use TF32, whose 10-bit mantissa cannot match gradients to the 1e-7 the attack converges to)."""
    scope = contextlib.ExitStack()
    scope.enter_context(jax.enable_x64(config.precision == "float64"))
    scope.enter_context(jax.default_matmul_precision("highest"))
    return scope
