"""Adam from optax, one evaluation per `tell` (every evaluation is an iteration).

The Inverting Gradients recipe (Geiping et al., 2020) is Adam on the sign of the gradient with the learning
rate cut tenfold at 3/8, 5/8 and 7/8 of the iterations (`schedule="step"`, `signed=True`); LAMP and the text
prototype used a cosine decay. The update itself is optax's: nothing of Adam is written here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dlg_jax.parts.attempts import Step


class AdamState(NamedTuple):
    x: jax.Array  # where the next evaluation is
    opt_state: Any
    fresh: jax.Array  # bool: the next evaluation is the first from a (re)start


def schedule(name: str, learning_rate: float, iterations: int) -> optax.Schedule:
    if name == "constant":
        return optax.constant_schedule(learning_rate)
    if name == "step":
        return optax.piecewise_constant_schedule(
            learning_rate, {int(iterations * f): 0.1 for f in (3 / 8, 5 / 8, 7 / 8)})
    if name == "cosine":
        return optax.cosine_decay_schedule(learning_rate, max(iterations, 1))
    raise ValueError(f"unknown schedule {name!r}")


@dataclasses.dataclass(frozen=True)
class Adam:
    """optax.adam on the objective (or on its gradient's sign), its learning rate on `schedule`."""

    learning_rate: float = 0.1
    schedule: str = "constant"
    iterations: int = 6000  # the schedule's horizon: the attack's iteration budget
    signed: bool = False
    project: Callable[[jax.Array], jax.Array] | None = None  # onto a feasible set after each step (a boxed dummy)

    def projected(self, project: Callable[[jax.Array], jax.Array]) -> "Adam":
        """This Adam, every step followed by `project` (projected gradient descent: Inverting Gradients' box)."""
        return dataclasses.replace(self, project=project)

    @property
    def transform(self) -> optax.GradientTransformation:
        return optax.adam(schedule(self.schedule, self.learning_rate, self.iterations))

    def init(self, x: jax.Array, reuse: AdamState | None = None) -> AdamState:
        return AdamState(x, self.transform.init(x), jnp.ones((), bool))

    def ask(self, state: AdamState) -> jax.Array:
        return state.x

    def tell(self, state: AdamState, point, value, grad) -> tuple[AdamState, Step]:
        direction = jnp.sign(grad) if self.signed else grad
        updates, opt_state = self.transform.update(direction, state.opt_state, point)
        x = optax.apply_updates(point, updates)
        if self.project is not None:
            x = self.project(x)
        return (AdamState(x, opt_state, jnp.zeros((), bool)),
                Step(started=state.fresh, iterated=jnp.ones((), bool)))
